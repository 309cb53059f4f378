"""Second-order optimizers as ``torch.optim.Optimizer`` subclasses, and preconditioners.

**The closure contract** (one for every method here: switching from ``LBFGS`` to ``Newton``
or ``HessianFree(curvature="hessian")`` is a one-line change; the default ``"ggn"`` also needs
the outputs, see below)::

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)      # a scalar tensor
        loss.backward()
        return loss                      # or (loss, outputs): see below
    opt.step(closure)

* ``step(closure)`` performs exactly one iteration (one direction and its step), so
  iteration counts compare with scipy's ``nit``. It returns the loss at the starting point.
  ``closure`` is required; it may be called several times (line search, trust-region trial
  points, backtracking) and must compute the same deterministic function each time.
  The value and gradient at the accepted point are reused by the next ``step`` when the
  parameters are unchanged and the same closure object is passed (full batch); a new closure
  object (e.g. one per mini-batch) always triggers a fresh evaluation.
  ``HessianFree`` calls it for losses only (CG backtracking, Armijo) under ``torch.no_grad()``
  with ``backward()`` made a no-op, so those calls cost one forward pass.
* The closure must return a scalar tensor (else ``TypeError``/``ValueError``) and call
  ``backward()``; parameters that get no gradient count as zero-gradient (warned once); if
  none does, ``ValueError``.
* Second derivatives (``Newton``, ``HessianFree(curvature="hessian")``) need nothing from the
  user: the optimizer re-runs the same closure in a mode where ``backward()`` keeps the
  gradient's graph (``torch.autograd.grad(..., create_graph=True)``, ``p.grad`` still receives
  the plain gradient) and takes Hessian-vector products from it. This patches
  ``torch.autograd.backward`` while the closure runs (not thread safe).
* Model outputs, for methods that need them (``HessianFree(curvature="ggn")``, the
  Gauss-Newton), are passed in exactly one way: the closure returns ``(loss, outputs)``
  instead of ``loss``. Every method accepts that form and ignores ``outputs`` if unused.
* **Non-finite values** (the same policy for every optimizer and preconditioner here):
  a NaN/inf loss, gradient or curvature statistic at the point a step starts from (Hessian or
  GGN products, a Hessian-diagonal estimate, K-FAC factors, Shampoo statistics and roots, a
  Fisher solve, a measured ``lambda_max``) raises :class:`~hesse.NonFiniteError` before any
  parameter or optimizer state is written: parameters, ``state`` (counters included), random
  generators and, for K-FAC, the statistics recorded for that step are as before the call,
  so the next finite step works as if the failed one never happened (it equals the step of a
  fresh optimizer loaded from the same ``state_dict``). Where the *method* chose the point (a
  line-search or trust-region trial point) a non-finite value instead shrinks the step or
  restarts the method (``counters["restarts"]``), never leaving NaN parameters.
* ``load_state_dict`` refuses, at load time and with the state unchanged, a state saved by
  another class (``state_dict()`` records the class under ``"hesse_optimizer"``) or missing
  keys or hyperparameters. Parameters on the ``meta`` device are refused at construction;
  float16/bfloat16 models work (flat work vectors and dense linear algebra run in float32).
* Every optimizer takes ``params`` first; those that also need the model (``KFAC``,
  ``NaturalGradient``) take it by keyword, ``Opt(model.parameters(), model=model,
  loss_fn=loss_fn)``, or ``Opt(model, loss_fn)`` for all its trainable parameters.
* Parameter groups are concatenated into one vector; algorithm hyperparameters must agree
  across groups (``ValueError`` otherwise), only ``lr`` may differ (it then scales each
  group's part of the step). ``opt.counters`` holds iterations, function and gradient
  evaluations, HVPs and restarts; ``state_dict``/``load_state_dict`` resume bit-identically.
"""

__all__: list[str] = []

from .kfac import KFAC, KFACPreconditioner  # noqa: E402

__all__ += ["KFAC", "KFACPreconditioner"]

from .hessian_free import HessianFree  # noqa: E402
from .newton import Newton  # noqa: E402
from .quasi_newton import BFGS, DFP, LBFGS, SR1  # noqa: E402

__all__ += ["BFGS", "DFP", "HessianFree", "LBFGS", "Newton", "SR1"]

from .shampoo import Shampoo  # noqa: E402

__all__ += ["Shampoo"]

from .natural_gradient import NaturalGradient  # noqa: E402

__all__ += ["NaturalGradient"]

from .adaptive import AdaHessian, CurvatureLR, SophiaH  # noqa: E402

__all__ += ["AdaHessian", "CurvatureLR", "SophiaH"]
