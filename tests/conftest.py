"""Test-wide settings: CPU only, one intra-op thread per process, passive OpenMP waits."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU/gloo tests: never let a stray GPU change the path

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
