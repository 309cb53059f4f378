"""Second-order optimizers as ``torch.optim.Optimizer`` subclasses, and preconditioners."""

__all__: list[str] = []

from .kfac import KFAC, KFACPreconditioner  # noqa: E402

__all__ += ["KFAC", "KFACPreconditioner"]
