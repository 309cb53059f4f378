import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# One thread: the tests use tiny tensors, where a second thread only adds synchronisation
# (and stalls badly on a busy machine). Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_global_rng_leak():
    """Seed the global RNG per test so failures reproduce (the library never uses it)."""
    torch.manual_seed(0)
    yield
