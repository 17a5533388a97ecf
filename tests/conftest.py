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


# pytest-xdist (make test: -n 2 --dist loadfile): a file's tests run on one worker, so its module fixtures are
# built once. Files are handed to the workers in collection order: the longest go first, so that neither worker
# is left with a long file at the end (measured on 2 cores; other files keep their order, tests within a file
# always keep theirs).
LONGEST_FIRST = ["test_deepspeed_engine.py", "test_train.py", "test_slurm.py", "test_fsdp_engine.py",
                 "test_preemption.py", "test_hot_path.py", "test_triton_loss.py", "test_interchange.py",
                 "test_linear_eval.py", "test_config.py", "test_benchmarks.py", "test_device_augment.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
