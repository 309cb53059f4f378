import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _no_global_rng_leak():
    """Seed the global RNG per test so failures reproduce (the library never uses it)."""
    torch.manual_seed(0)
    yield
