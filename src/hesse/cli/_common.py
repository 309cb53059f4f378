"""What every subcommand shares: options, user-module loading, the output folder.

The output folder never loses work: a file hesse did not write (or that was edited since) is
never replaced without ``--overwrite``; files are staged inside the folder itself (so the
final rename works on any file system) and moved in only when all of them were written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HelpFormatter",
    "Loaded",
    "OutputDir",
    "UsageError",
    "add_model_options",
    "add_output_options",
    "add_runtime_options",
    "library_errors",
    "load_factory",
    "load_model_and_data",
    "setup_runtime",
]

LOSSES = ("ce", "mse", "bce")


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once, and only when there is one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def new_parser(subparsers: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=description, formatter_class=HelpFormatter
    )


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch's default). Products on small models are "
        "latency-bound: a second thread gains little and stalls when another process holds "
        "a core",
    )
    g.add_argument(
        "--train-mode",
        action="store_true",
        help="evaluate the model in train mode (Dropout/BatchNorm active); default eval mode",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_output_options(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default, help="output folder")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --out that hesse did not write (refused otherwise)",
    )
    g.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")


def add_model_options(p: argparse.ArgumentParser, *, test_data: bool = False) -> None:
    from ..data import WORKLOADS

    g = p.add_argument_group("model and data (default: --workload digits)")
    g.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        help="an embedded model + data (used when --model is not given; default: digits)",
    )
    g.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="callable returning an nn.Module (module path or path/to/file.py:name)",
    )
    g.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="callable returning (X, y) or a list/iterable of (X, y) batches",
    )
    if test_data:
        g.add_argument(
            "--test-data",
            metavar="MODULE:FACTORY",
            help="callable returning evaluation data (default: --data)",
        )
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="state_dict to load into --model (torch.load with weights_only=True)",
    )
    g.add_argument(
        "--loss",
        metavar="{ce,mse,bce} or MODULE:FACTORY",
        help="ce = cross-entropy, mse, bce (with logits; class labels of a workload become "
        "one-hot targets), or a callable returning a loss module (default: the workload's "
        "own loss; ce with --model)",
    )
    g.add_argument(
        "--reduction",
        choices=["mean", "sum"],
        default="mean",
        help="how the loss combines samples: the mean or the sum over all data",
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="floating-point precision of the model and data",
    )


def setup_runtime(args: argparse.Namespace) -> Any:
    """Apply ``--threads``, check ``--device``; returns the ``torch.device``."""
    import torch

    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0.")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device {args.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {args.device}: MPS is not available on this machine.")
    return device


def load_factory(spec: str, what: str) -> Any:
    """Import ``MODULE:NAME`` or ``path/to/file.py:NAME``; call it if callable."""
    if ":" not in spec:
        raise UsageError(
            f"--{what} expects MODULE:FACTORY or path/to/file.py:FACTORY, got {spec!r}."
        )
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UsageError(f"--{what}: no file {mod_name!r}.")
            sp = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except UsageError:
        raise
    except Exception as e:  # an import error of the user's module
        raise UsageError(f"--{what}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise UsageError(f"--{what}: module {mod_name!r} has no attribute {attr!r}.")
    try:
        return fn() if callable(fn) else fn
    except Exception as e:
        raise UsageError(f"--{what}: {spec} raised {type(e).__name__}: {e}") from e


def make_loss(args: argparse.Namespace) -> Any:
    """The loss ``--loss`` names (``None``: cross-entropy)."""
    from torch import nn

    if args.loss is None:
        return nn.CrossEntropyLoss(reduction=args.reduction)
    losses = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
    if ":" in args.loss:
        return load_factory(args.loss, "loss")
    if args.loss not in losses:
        raise UsageError(f"--loss {args.loss!r}: expected one of {list(LOSSES)} or MODULE:FACTORY.")
    return losses[args.loss](reduction=args.reduction)


def check_model_args(args: argparse.Namespace) -> None:
    """The model/data options fit together (checked before anything is loaded)."""
    if args.model is None:
        extra = [
            f"--{k.replace('_', '-')}"
            for k in ("data", "test_data", "checkpoint")
            if getattr(args, k, None) is not None
        ]
        if extra:
            raise UsageError(f"{'/'.join(extra)} need --model as well.")
    else:
        if args.workload is not None:
            raise UsageError("--workload and --model exclude each other: pass one.")
        if ":" not in args.model:
            load_factory(args.model, "model")  # raises the format message
        if args.data is None:
            raise UsageError(
                "--model needs --data MODULE:FACTORY (returning (X, y) or a list of batches)."
            )
    if args.loss is not None and ":" not in args.loss and args.loss not in LOSSES:
        raise UsageError(f"--loss {args.loss!r}: expected one of {list(LOSSES)} or MODULE:FACTORY.")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint!r}: no such file.")


@dataclass
class Loaded:
    model: Any
    loss_fn: Any
    train: Any
    test: Any
    name: str
    meta: dict


class _OnDevice:
    """Re-iterable batches moved to ``device``/``dtype`` as they are drawn."""

    def __init__(self, batches: Iterable, convert: Any):
        self.batches, self.convert = batches, convert

    def __iter__(self):
        return (self.convert(b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _converter(dtype: Any, device: Any):
    from torch import Tensor

    def cast(t: Any) -> Any:
        if isinstance(t, Tensor):
            return t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype)
        if isinstance(t, (tuple, list)):
            return type(t)(cast(x) for x in t)
        if isinstance(t, dict):
            return {k: cast(v) for k, v in t.items()}
        return t

    return cast


def _place(data: Any, dtype: Any, device: Any) -> Any:
    cast = _converter(dtype, device)
    if data is None or isinstance(data, (tuple, list, dict)):
        return cast(data)
    return _OnDevice(data, cast)


def _with_reduction(loss_fn: Any, reduction: str, name: str) -> Any:
    import copy

    if getattr(loss_fn, "reduction", reduction) == reduction:
        return loss_fn
    if not hasattr(loss_fn, "reduction"):
        raise UsageError(f"--reduction {reduction}: the {name} workload's loss has no reduction.")
    loss_fn = copy.copy(loss_fn)
    loss_fn.reduction = reduction
    return loss_fn


def _one_hot(data: Any) -> Any:
    import torch

    if isinstance(data, tuple) and len(data) == 2 and not data[1].dtype.is_floating_point:
        X, y = data
        return X, torch.nn.functional.one_hot(y, int(y.max()) + 1).to(X.dtype)
    return data


def load_model_and_data(args: argparse.Namespace, device: Any, **workload_kwargs: Any) -> Loaded:
    """The model, loss and data the options name, on ``device`` in ``--dtype``."""
    import torch
    from torch import nn

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    loss_fn = make_loss(args) if args.loss is not None or args.model is not None else None
    if args.model is None:
        from ..data import workload

        name = args.workload or "digits"
        try:
            w = workload(name, seed=args.seed, dtype=dtype, **workload_kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--workload {name}: {e}") from e
        model, train, test, label = w.model, w.train, w.test, w.name
        if loss_fn is None:
            loss_fn = _with_reduction(w.loss_fn, args.reduction, name)
        if args.loss in ("mse", "bce"):  # regression losses on class labels: one-hot targets
            train, test = _one_hot(train), _one_hot(test)
        meta: dict[str, Any] = {"name": label, "workload": name}
    else:
        model = load_factory(args.model, "model")
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model {args.model} returned {type(model).__name__}, expected a torch.nn.Module."
            )
        if args.checkpoint is not None:
            try:
                state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
                if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                    state = state["state_dict"]
                model.load_state_dict(state)
            except Exception as e:
                raise UsageError(
                    f"--checkpoint {args.checkpoint!r}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}"
                ) from e
        train = load_factory(args.data, "data")
        test_spec = getattr(args, "test_data", None)
        test = load_factory(test_spec, "test-data") if test_spec else None
        label = args.model
        meta = {"name": label}
    model = model.to(device=device, dtype=dtype)
    return Loaded(
        model, loss_fn, _place(train, dtype, device), _place(test, dtype, device), label, meta
    )


# words of torch's errors when a model and its data do not fit together
_MISFIT = ("shape", "size", "mat1", "dimension", "Expected", "expected", "dtype")


class library_errors:
    """Turn a library's invalid-input error into a one-line :class:`UsageError`."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or not issubclass(kind, Exception) or isinstance(e, UsageError):
            return False
        first = str(e).splitlines()[0] if str(e) else kind.__name__
        if issubclass(kind, (ValueError, TypeError, NotImplementedError)):
            raise UsageError(first) from e
        if issubclass(kind, RuntimeError) and any(w in first for w in _MISFIT):
            raise UsageError(f"model and data do not fit together: {first}") from e
        return False  # a crash: the traceback helps


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OutputDir:
    """The ``--out`` folder of one run.

    Args:
        path: the folder.
        names: the files this run may write (refused if a file of that name exists that
            hesse did not write, unless ``overwrite``).
        overwrite: replace such files anyway.

    Checks happen at construction, before any computation; nothing is created until
    :meth:`write`.
    """

    MANIFEST = ".hesse-manifest.json"

    def __init__(self, path: str | Path, names: Iterable[str], *, overwrite: bool = False):
        self.path = Path(path)
        self.names = list(names)
        p = self.path
        if p.exists() and not p.is_dir():
            raise UsageError(f"cannot write to --out {str(p)!r}: it exists and is not a folder.")
        anc = p
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
            raise UsageError(
                f"cannot write to --out {str(p)!r}: {str(anc)!r} is not a writable folder."
            )
        foreign = [n for n in self.names if (p / n).exists() and not self._ours(n)]
        if foreign and not overwrite:
            raise UsageError(
                f"--out {str(p)!r} holds files hesse did not write: {', '.join(foreign)}; "
                "pass --overwrite to replace them, or choose another --out."
            )

    def _manifest(self) -> dict[str, str]:
        try:
            m = json.loads((self.path / self.MANIFEST).read_text())
            return m if isinstance(m, dict) else {}
        except (OSError, ValueError):
            return {}

    def _ours(self, name: str) -> bool:
        """Written by hesse and not changed since."""
        digest = self._manifest().get(name)
        f = self.path / name
        return digest is not None and f.is_file() and _sha(f) == digest

    @property
    def work(self) -> Path:
        """A folder inside ``--out`` for resumable state (kept until a run completes)."""
        return self.path / ".hesse-work"

    def write(self, writer: Any) -> list[Path]:
        """``writer(staging_folder) -> files`` writes into a staging folder inside ``--out``;
        all files are then moved in (atomic renames on the same file system)."""
        self.path.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".hesse-staging-", dir=self.path))
        try:
            files = [Path(f) for f in writer(stage)]
            manifest = self._manifest()
            done = []
            for f in files:
                os.replace(f, self.path / f.name)
                done.append(self.path / f.name)
                manifest[f.name] = _sha(self.path / f.name)
            tmp = stage / self.MANIFEST
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, self.path / self.MANIFEST)
            return done
        finally:
            shutil.rmtree(stage, ignore_errors=True)
