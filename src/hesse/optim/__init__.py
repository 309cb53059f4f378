"""Second-order optimizers as ``torch.optim.Optimizer`` subclasses, and preconditioners."""

__all__: list[str] = []
