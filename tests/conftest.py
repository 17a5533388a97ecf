"""Test-wide settings: CPU only, one intra-op thread per process, passive OpenMP waits; the shared
uninterrupted reference run of the preemption tests."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU/gloo tests: never let a stray GPU change the path

import pytest  # noqa: E402
import torch  # noqa: E402

# two pytest-xdist workers share the 2 cores: one thread each
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """train.py without interruption: 2 spawned processes x 4 images, 2 epochs x 4 steps, dropout in the head;
    the reference that signal-stopped and resumed runs (tests/test_preemption.py, tests/test_slurm.py) must
    equal bitwise (srun tasks and torchrun workers train exactly like spawned ones)."""
    from train_helpers import TWO, run

    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, *TWO)
    return out


# pytest-xdist (make test: -n 2 --dist loadgroup): a file's tests run on one worker, so its module fixtures are
# built once; files that share session-level state run on the same worker: the engine files share the DDP
# references of tests/numerics.py, the signal files the `uninterrupted` run.
XDIST_GROUPS = {"test_deepspeed_engine.py": "engines", "test_fsdp_engine.py": "engines",
                "test_preemption.py": "uninterrupted", "test_slurm.py": "uninterrupted"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS.get(name, name)))
