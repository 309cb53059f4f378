"""The embedded default workload: scikit-learn's offline digits and a small MLP."""

from .digits import Workload, default_workload, load_digits_tensors, make_mlp, train_full_batch
from .lm import LMWorkload, lm_workload

__all__ = [
    "LMWorkload",
    "Workload",
    "default_workload",
    "lm_workload",
    "load_digits_tensors",
    "make_mlp",
    "train_full_batch",
]
