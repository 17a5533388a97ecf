"""The GPU pass (``make test-gpu``; every test here carries the ``gpu`` mark and skips without CUDA).

What only a GPU verifies, each against an independent reference with the tolerances of tests/numerics.py:

* every engine's training step on CUDA (DDP, FSDP, DeepSpeed ZeRO 1-3; bf16 and fp16) against DDP on CUDA, and
  DDP on CUDA (fp32, no TF32) against DDP on the CPU, in one process with a 1-rank NCCL group (file store);
* the device augmentation stage on CUDA against the same stage on the CPU, op by op;
* the Triton InfoNCE kernels compiled for the GPU against the float64 dense reference, D in {128, 256, 512, 2048}
  and multicrop;
* torch's SyncBatchNorm sync path (its autograd function on the 1-rank group and its kernels on 2 emulated ranks of
  unequal size) against float64 batch norm of the whole batch (``benchmarks/sync_bn_check.py``);
* a ``torch.compile``-d (inductor) step against the eager step;
* the whole training step (two-stage data path, bf16) under ``torch.cuda.set_sync_debug_mode("error")`` after
  warm-up: no host synchronisation.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import numerics as nm  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
# Every run: the host data path (identical float views on both devices; the device stage has its own test below)
HOST_VIEWS = ["config.DATA.TRAIN.DEVICE_AUGMENTATION=off"]
FSDP = ["config.DISTRIBUTED.ENGINE=fsdp"]
FSDP_PRECISION = {"bf16": FSDP + ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"],
                  "fp16": FSDP + ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=float16"]}
AMP = {"bf16": nm.AMP + ["config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"],
       "fp16": nm.AMP + ["config.MODEL.AMP_PARAMS.AMP_DTYPE=float16"]}
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
ONE_STEP = ["config.TRAINER.MAX_ITERATIONS=1"]
FP16_INIT_SCALE_POWER = 8  # 2^16 (the default) overflows R18's scaled fp16 gradients: the first step would be skipped


def _deepspeed(stage, tmp, precision):
    """ZeRO-``stage`` overrides; fp16: the repository's JSON with a lower initial loss scale (see above)."""
    cfg = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["fp16"]["initial_scale_power"] = FP16_INIT_SCALE_POWER
    path = Path(tmp) / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return ["config.DISTRIBUTED.ENGINE=deepspeed", f"config.DISTRIBUTED.DEEPSPEED_CONFIG={path}", *AMP[precision]]


def _lower_grad_scale(trainer):
    """DDP's torch.amp.GradScaler reads ``_init_scale`` at its first ``scale()``; FSDP's ShardLossScaler holds
    its scale as a device tensor from the start."""
    scaler = trainer.engine.scaler
    if isinstance(scaler, torch.amp.GradScaler):
        scaler._init_scale = 2.0 ** FP16_INIT_SCALE_POWER
    else:
        scaler._scale.fill_(2.0 ** FP16_INIT_SCALE_POWER)


def _run(extra, device, tmp, prepare=None):
    """One recorded step (numerics.record: loss, initial and step-1 state) of the quick config on ``device``."""
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    torch.manual_seed(0)
    machine = [f"config.MACHINE.DEVICE={'gpu' if device.type == 'cuda' else 'cpu'}"]
    root, _ = load_config(nm.base_overrides(1, tmp, [*HOST_VIEWS, *ONE_STEP, *machine, *extra]))
    tr = Trainer(root, device=device)
    tr.save_checkpoint = lambda *a, **k: None
    if prepare is not None:
        prepare(tr)
    run = nm.record(tr, init=True)
    tr.train()
    nm.finish(run, tr)
    del tr
    torch.cuda.empty_cache()
    return run


@pytest.fixture(scope="module")
def nccl(tmp_path_factory):
    """A 1-rank NCCL group with a file store (the engines reuse it)."""
    import torch.distributed as dist

    torch.cuda.set_device(CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons: full fp32 products
    torch.backends.cudnn.allow_tf32 = False
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"file://{tmp_path_factory.mktemp('rdv')}/store", rank=0,
                                world_size=1, device_id=CUDA)
    yield dist.group.WORLD


@pytest.fixture(scope="module")
def engine_runs(nccl):
    """DDP fp32 on the CPU (before anything else touches the model RNG) and every CUDA engine case."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["cpu_ddp_fp32"] = _run(nm.DDP, torch.device("cpu"), tmp)
        runs["ddp_fp32"] = _run(nm.DDP, CUDA, tmp)
        for p in ("bf16", "fp16"):
            prep = _lower_grad_scale if p == "fp16" else None
            runs[f"ddp_{p}"] = _run(nm.DDP + AMP[p], CUDA, tmp, prep)
            runs[f"fsdp_{p}"] = _run(FSDP_PRECISION[p], CUDA, tmp, prep)
            for stage in (1, 2, 3):
                runs[f"zero{stage}_{p}"] = _run(_deepspeed(stage, tmp, p), CUDA, tmp)
    return runs


def _moved(run):
    return any(not torch.equal(run["states"][1][k], v) for k, v in run["init"].items() if v.is_floating_point())


def test_ddp_on_cuda_matches_ddp_on_cpu(engine_runs):
    """fp32 without TF32: another device's kernels round the forward differently, so a ReLU input within rounding of
    zero may flip: the update within ``relu_flip_bound`` (numerics), the loss within its rounding floor."""
    got, ref = engine_runs["ddp_fp32"], engine_runs["cpu_ddp_fp32"]
    assert torch.equal(torch.stack([v.flatten()[0].cpu() for v in got["init"].values() if v.is_floating_point()]),
                       torch.stack([v.flatten()[0] for v in ref["init"].values() if v.is_floating_point()]))
    checks = nm.check_step1(got, ref, "ddp cuda vs cpu", ref["init"])
    checks[1].limit = max(checks[1].limit, nm.relu_flip_bound(nm.GLOBAL_BATCH))
    nm.assert_ok(checks)
    assert _moved(ref)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("engine", ["fsdp", "zero1", "zero2", "zero3"])
def test_engine_step_matches_ddp_on_cuda(engine_runs, engine, precision):
    ref, got = engine_runs[f"ddp_{precision}"], engine_runs[f"{engine}_{precision}"]
    assert _moved(ref), "the DDP reference skipped its step (fp16 overflow)"
    nm.assert_ok(nm.check_step1(got, ref, f"{engine} {precision}", ref["init"], DTYPE[precision]))


def test_engine_negative_control_is_caught(engine_runs):
    """The step-1 check tells a run that missed its update (the initial state) from the DDP step."""
    ref = engine_runs["ddp_bf16"]
    frozen = {"losses": ref["losses"], "states": {1: ref["init"]}, "init": ref["init"]}
    nm.assert_fails(nm.check_step1(frozen, ref, "no update", ref["init"], torch.bfloat16))


# ------------------------------------------------------------------------------------------ device stage
OPS = {"colour": [{"name": "ImgPilColorDistortion", "strength": 1.0}, {"name": "ToTensor"}],
       "blur": [{"name": "ImgPilGaussianBlur", "p": 1.0, "radius_min": 0.1, "radius_max": 2.0}, {"name": "ToTensor"}],
       "grayscale": [{"name": "RandomGrayscale", "p": 0.5}, {"name": "ToTensor"}],
       "normalize": [{"name": "ToTensor"}, {"name": "Normalize", "mean": [0.485, 0.456, 0.406],
                                           "std": [0.229, 0.224, 0.225]}]}


@pytest.mark.parametrize("op", sorted(OPS))
def test_device_stage_on_cuda_matches_cpu(op):
    """Float rounding only: each op is a handful of fp32 roundings (16 u, as tests/test_device_augment.py's EPS), of
    values that went through at most an H*W-term sum (contrast's image mean; the blur's passes are shorter)."""
    from data_pipeline import _device_batch  # crops of the sample photos, uint8
    from scaleclr.data import DeviceAugmentation

    torch.backends.cuda.matmul.allow_tf32 = False
    size = 64
    data, _ = _device_batch(32, size, "cpu")
    stage = DeviceAugmentation.from_specs(OPS[op])
    params = _params_for(stage.columns, data.shape[0], torch.Generator().manual_seed(0))
    ref = stage(data, params)
    got = stage(data.to(CUDA), params.to(CUDA)).cpu()
    tol = 16 * (nm.unit_roundoff() + nm.sum_rel_err(size * size)) * float(ref.abs().max())
    assert float((got - ref).abs().max()) <= tol, op


def _params_for(cols, rows, g):
    """Random parameter rows in a stage's column layout (``DeviceAugmentation.columns``): every op applied,
    factors in [0.2, 1.8], hue in [-0.2, 0.2], random op orders, blur radii in [0.1, 2]."""
    out = torch.empty(rows, len(cols))
    for j, name in enumerate(cols):
        if name.endswith("applied"):
            out[:, j] = 1.0
        elif name == "gray":
            out[:, j] = (torch.rand(rows, generator=g) < 0.5).float()
        elif name.startswith("order_"):
            out[:, j] = torch.stack([torch.randperm(4, generator=g) for _ in range(rows)])[:, int(name[-1])].float()
        elif name == "hue":
            out[:, j] = torch.rand(rows, generator=g) * 0.4 - 0.2
        elif name == "sigma":
            out[:, j] = 0.1 + 1.9 * torch.rand(rows, generator=g)
        else:
            out[:, j] = 0.2 + 1.6 * torch.rand(rows, generator=g)
    return out


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("dim", [128, 256, 512, 2048])
@pytest.mark.parametrize("num_crops", [2, 6])
def test_triton_loss_matches_float64_reference(dim, num_crops):
    """fp32 ``ieee`` kernels: logit errors ~ sqrt(D) u / T (D-term dot products), passed on to the loss
    (1-Lipschitz in the logits, loss >= 1: relative); 2x margin. Gradients per element: 10x that of their max
    (tests/test_triton_loss.py's ratio of the gradient to the value tolerance)."""
    pytest.importorskip("triton")
    from scaleclr.kernels import infonce_triton as it
    from test_streaming_loss import _dense64, _loss_grad

    t = 0.1
    h = torch.randn(num_crops * (1536 // num_crops), dim, device=CUDA)
    want, want_g = _loss_grad(lambda x: _dense64(x, t, num_crops), h.double())
    got, got_g = _loss_grad(lambda x: it.info_nce_triton(F.normalize(x, dim=1), temperature=t, num_crops=num_crops,
                                                         input_precision="ieee"), h)
    rtol = 2 * dim ** 0.5 * nm.unit_roundoff() / t
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    assert float((got_g.double() - want_g).abs().max()) <= 10 * rtol * float(want_g.abs().max())


# -------------------------------------------------------------------------------------------- SyncBN
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_sync_batchnorm_cuda_path_matches_group_statistics(nccl, dtype):
    import sync_bn_check as sbc

    case = sbc.make_case(16, 32, 8, dtype, CUDA)
    ref = sbc.reference64(case)
    for got in (sbc.run_torch(case, nccl), sbc.run_emulated(case, (5, 11))):
        res = sbc.compare(got, ref, dtype)
        assert res["ok"], res
    # negative control: statistics of the first 5 samples only (a merge that drops a rank) are caught
    assert not sbc.compare(sbc.run_scaleclr(case, nccl, stats_rows=5), ref, dtype)["ok"]


# ------------------------------------------------------------------------------------ compile, sync
def test_compiled_step_matches_eager(nccl):
    """inductor fuses and reorders fp32 arithmetic: the same step within rounding (numerics.check_step1)."""
    with tempfile.TemporaryDirectory() as tmp:
        eager = _run(nm.DDP, CUDA, tmp)
        compiled = _run(nm.DDP + ["config.MODEL.TORCH_COMPILE=True"], CUDA, tmp)
    nm.assert_ok(nm.check_step1(compiled, eager, "compiled vs eager", eager["init"]))


def test_training_step_has_no_host_sync_after_warmup(nccl, tmp_path):
    """The steady-state step (two-stage data path, bf16, channels_last) under sync debug mode "error": any
    host synchronisation raises."""
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    root, _ = load_config(nm.base_overrides(1, str(tmp_path), [*nm.DDP, *AMP["bf16"], "config.MACHINE.DEVICE=gpu",
                                                                "config.DATA.TRAIN.DEVICE_AUGMENTATION=auto",
                                                                "config.MODEL.CHANNELS_LAST=on"]))
    tr = Trainer(root, device=CUDA)
    assert tr.device_stage.enabled
    batches = iter(tr.loader)
    for _ in range(2):  # warm-up: lazy initialisation (cuDNN plans, allocator, optimizer state)
        tr.train_step(next(batches), 0.0)
    batch = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = tr.train_step(batch, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_gpu_tests_see_cuda():
    """Guards the conftest: a run that selects the gpu mark must not have CUDA hidden."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != "" and torch.cuda.is_available()
