"""Test-wide settings: CPU only (unless the run selects the ``gpu`` mark), one intra-op thread per process, passive
OpenMP waits; ``gpu``-marked tests skip without CUDA; the shared uninterrupted reference run of the preemption
tests."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not initialise CUDA: CUDA_VISIBLE_DEVICES still applies below)


def selects_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` asks for the ``gpu`` tests (``make test-gpu``: ``-m gpu``)."""
    return "gpu" in markexpr and "not gpu" not in markexpr


def pytest_configure(config):
    # CPU/gloo tests: never let a stray GPU change the path. Only a run that selects the gpu mark sees CUDA (set
    # before anything initialises CUDA; spawned workers inherit it).
    if not selects_gpu_tests(config.option.markexpr or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

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
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not torch.cuda.is_available():
        reason = ("needs CUDA: no CUDA device is visible (run `make test-gpu` on a GPU machine)"
                  if selects_gpu_tests(config.option.markexpr or "") else
                  "needs CUDA: hidden from runs that do not select the gpu mark (run `make test-gpu`: -m gpu)")
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=reason))
