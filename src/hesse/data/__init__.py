"""The embedded default workload: scikit-learn's offline digits and a small MLP."""

from .digits import Workload, default_workload, load_digits_tensors, make_mlp, train_full_batch

__all__ = ["Workload", "default_workload", "load_digits_tensors", "make_mlp", "train_full_batch"]
