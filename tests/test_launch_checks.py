"""GPU configurations refused or adjusted before launch (docs/gpu.md, "Configurations checked before launch").

No GPU is needed: the decisions are taken from the config and from ``torch.cuda.is_available()`` /
``device_count()``, which the tests monkeypatch; nothing here touches a real CUDA device (``set_device`` is
recorded, not called). Each fix has a case that failed before it and a control that must keep passing.
"""
import logging
import os

import pytest
import torch

from scaleclr import launch
from scaleclr import main as cli
from scaleclr.config import ConfigError, load_config
from scaleclr.losses.functional import resolve_impl

QUICK = "config=test/integration_test/quick_simclr_synthetic"
APEX = ["config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True", "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex"]
BF16 = ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
        "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]


# ---------------------------------------------------------------------------------------- apex SyncBN
@pytest.mark.parametrize("precision", [BF16, ["config.DISTRIBUTED.ENGINE=fsdp",
                                              "config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"]])
def test_apex_sync_bn_with_bf16_is_refused_naming_both_keys(precision):
    with pytest.raises(ConfigError, match="SYNC_BN_TYPE: = apex cannot run with config.MODEL.*bfloat16") as e:
        load_config([QUICK, *APEX, *precision])
    assert "SYNC_BN_TYPE=pytorch" in str(e.value) and "native" in str(e.value)


@pytest.mark.parametrize("overrides", [
    APEX + ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch"],  # apex + fp16
    ["config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True",
     "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch", *BF16],  # bf16 + torch's SyncBN
    ["config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=False", "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex",
     *BF16],  # apex named but no conversion
])
def test_apex_fp16_and_other_sync_bn_with_bf16_pass(overrides):
    """Controls: the refusal is specific to apex SyncBN actually converting with bf16 activations."""
    load_config([QUICK, *overrides])


def test_apex_with_channels_last_on_is_refused():
    with pytest.raises(ConfigError, match="CHANNELS_LAST: = on with config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=apex"):
        load_config([QUICK, *APEX, "config.MODEL.CHANNELS_LAST=on"])


def test_apex_turns_channels_last_auto_off_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        root, _ = load_config([QUICK, *APEX])
    assert root.config.MODEL.CHANNELS_LAST == "off"
    assert "CHANNELS_LAST=auto resolves to off" in caplog.text
    # control: without apex, auto stays auto (on with CUDA, resolved by the builder)
    assert load_config([QUICK])[0].config.MODEL.CHANNELS_LAST == "auto"


# ---------------------------------------------------------------------------------------- launcher
@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA "available" with 4 devices; set_device recorded. Returns the list of devices set."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    return calls


def _spawned_method(monkeypatch, *overrides):
    seen = {}

    def fake_spawn(worker, root, backend, agent=None):
        seen["method"], seen["backend"] = root.config.MULTI_PROCESSING_METHOD, backend
        return 0
    monkeypatch.setattr(cli, "spawn", fake_spawn)
    for k in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    assert cli.main([QUICK, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", *overrides]) == 0
    return seen


def test_fork_becomes_forkserver_for_cuda_workers(monkeypatch, fake_gpus, tmp_path):
    """quick_simclr_synthetic sets fork; on a GPU the launcher has initialised CUDA, so fork would fail."""
    seen = _spawned_method(monkeypatch, "config.MACHINE.DEVICE=gpu", f"config.CHECKPOINT.DIR={tmp_path}")
    assert seen["method"] == "forkserver"


def test_fork_stays_on_cpu(monkeypatch, tmp_path):
    """Control: CPU workers keep the configured fork."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = _spawned_method(monkeypatch, "config.MACHINE.DEVICE=cpu", f"config.CHECKPOINT.DIR={tmp_path}")
    assert seen["method"] == "fork"


@pytest.mark.gpu  # without a CUDA driver whether is_available() poisons fork depends on what ran before it
def test_cuda_is_available_poisons_fork():
    """The fact behind the fork rule: after is_available() has initialised CUDA, a forked child is a "bad fork"."""
    torch.cuda.is_available()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if torch.cuda._is_in_bad_fork() else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_worker_binds_its_gpu_and_sets_cuda_math_whatever_the_backend(monkeypatch, fake_gpus, backend):
    """Local rank 3 works on cuda:3 under gloo too; cuDNN autotuning and the matmul precision come from the config
    and are set before the model is built."""
    import scaleclr.trainer

    root, _ = load_config([QUICK, "config.MACHINE.DEVICE=gpu", f"config.DISTRIBUTED.BACKEND={backend}",
                           "config.MODEL.FLOAT32_MATMUL_PRECISION=medium",
                           "config.MODEL.MEMORY_CHECK=off"])  # the planner's pre-check: tests/test_plan.py
    seen = {}

    class FakeTrainer:
        def __init__(self, root, device, **kw):
            seen.update(device=device, bound=list(fake_gpus), benchmark=torch.backends.cudnn.benchmark,
                        precision=torch.get_float32_matmul_precision())

        def train(self):
            return {}
    monkeypatch.setattr(scaleclr.trainer, "Trainer", FakeTrainer)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    old = torch.get_float32_matmul_precision()
    env = launch.DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4, node_rank=0, master_addr="h",
                      master_port=29500, launcher="torchrun")
    try:
        assert launch.worker(root, env, backend, stop=None) == 0
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen == {"device": torch.device("cuda", 3), "bound": [torch.device("cuda", 3)], "benchmark": True,
                    "precision": "medium"}


def test_cuda_math_untouched_on_cpu(monkeypatch):
    """Control: on CPU the setter changes nothing (oneDNN's fp32 matmuls follow the matmul precision too)."""
    root, _ = load_config([QUICK, "config.MODEL.FLOAT32_MATMUL_PRECISION=medium"])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    launch.set_cuda_math(root.config.MODEL, torch.device("cpu"))
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == (False, before)


def test_matmul_precision_values_are_checked():
    with pytest.raises(ConfigError, match="FLOAT32_MATMUL_PRECISION: = 'tf32' is not allowed; allowed values: "
                                          "highest, high, medium"):
        load_config([QUICK, "config.MODEL.FLOAT32_MATMUL_PRECISION=tf32"])


# ---------------------------------------------------------------------------------------- Triton width
def test_triton_takes_any_embedding_width(monkeypatch):
    """The Triton kernels tile D (tests/test_triton_loss.py), so a wide embedding is no reason to leave Triton:
    auto picks it on CUDA and impl=triton is accepted for D = 2048. (This failed while D was capped at 128.)"""
    import scaleclr.losses.functional as fn

    monkeypatch.setattr(fn, "triton_available", lambda device: True)
    cuda = torch.device("cuda", 0)
    assert resolve_impl("auto", cuda, 512, 512) == "triton"
    assert resolve_impl("triton", cuda, 512, 512) == "triton"
    monkeypatch.setattr(fn, "triton_available", lambda device: False)  # control: no triton / no GPU still refused
    assert resolve_impl("auto", cuda, 512, 512) == "reference"
    with pytest.raises(ValueError, match="impl='triton': triton impl needs CUDA and triton"):
        resolve_impl("triton", torch.device("cpu"), 512, 512)


@pytest.mark.parametrize("loss", ["simclr_info_nce_loss", "multicrop_simclr_info_nce_loss"])
def test_triton_with_a_wide_embedding_passes_preflight(tmp_path, loss):
    root, _ = load_config([QUICK, f"config.LOSS.name={loss}", f"config.LOSS.{loss}.impl=triton",
                           f"config.LOSS.{loss}.buffer_params.embedding_dim=2048", f"config.CHECKPOINT.DIR={tmp_path}"])
    assert root.config.LOSS[loss].buffer_params.embedding_dim == 2048
    cli.preflight(root, None)
    root.config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim = 128  # control
    cli.preflight(root, None)
