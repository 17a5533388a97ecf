"""The steady-state training step traced on fake CUDA (and its backward on meta), piece by piece: device
augmentation, model forward (fp32, channels_last + bf16 autocast), SimCLR loss (reference and streaming) and
the LARC + SGD step. Each piece must record no host-to-device copy of a host-built tensor, no host read of a
device value, no data-dependent shape, no CPU operand in device work and no integer convolution
(tests/fake_cuda.py; DESIGN.md "CUDA checks on a CPU"; docs/gpu.md).

"Steady state": caches that a first call fills (Normalize's mean/std, the streaming loss's tiling plan, SGD's
momentum buffers) may copy once; the call after must record nothing. Negative controls below reintroduce
each kind of bug and check that the recorder catches it.
"""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fake_cuda import cuda_autocast, fake_cuda, fake_module, to_channels_last, trace
from scaleclr.data import DeviceAugmentation, HostStage, batch_to_device, sample_generator
from scaleclr.data import device_augment
from scaleclr.losses import streaming
from scaleclr.optim import larc as larc_module

QUICK = "config=test/integration_test/quick_simclr_synthetic"
NORM = {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SIMCLR = [{"name": "ImgReplicatePil", "num_times": 2}, {"name": "RandomResizedCrop", "size": 32},
          {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ImgPilColorDistortion", "strength": 1.0},
          {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0}, {"name": "ToTensor"},
          NORM]
IMAGES = 8  # 16 views: every colour-jitter group and the blur populated (checked below)


@pytest.fixture(autouse=True)
def _no_fake_tensors_in_global_caches(monkeypatch):
    """The streaming loss caches its tiling plan per device string: keep fake/meta plans out of the real cache."""
    monkeypatch.setattr(streaming, "_TILINGS", {})


@pytest.fixture(scope="module")
def cfg():
    from scaleclr.config import load_config

    root, _ = load_config([QUICK, "config.CHECKPOINT.DIR=/tmp/unused"])
    return root.config


def _host_params():
    """What the loader's host stage makes for IMAGES images: uint8 views are not needed, their parameters are."""
    stage = HostStage.from_specs(SIMCLR)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return torch.cat([stage(img, sample_generator(0, 0, i))[1] for i in range(IMAGES)])


# ------------------------------------------------------------------------------------------ device stage
def test_device_stage_apply_records_nothing_and_plan_copies_once():
    aug = DeviceAugmentation.from_specs(SIMCLR)
    params_host = _host_params()
    n = params_host.shape[0]
    plan = aug.plan(params_host)  # host bookkeeping, outside the traced region (real CPU tensors)
    assert plan.infos[1] is not None and all(c for counts in plan.counts for c in counts[:1])
    with fake_cuda():
        data = torch.empty(n, 3, 32, 32, dtype=torch.uint8, device="cuda")
        params = torch.empty(n, aug.width, device="cuda")
        moved = []
        copies = trace(lambda: moved.append(plan.to("cuda")))
        assert [(e.kind, "int64" in e.detail) for e in copies] == [("h2d", True)]  # ONE copy of all indices
        trace(lambda: aug.apply(data, params, moved[0]))  # first call: Normalize caches its mean and std
        out = []
        assert trace(lambda: out.append(aug.apply(data, params, moved[0]))) == []
        assert out[0].shape == (n, 3, 32, 32) and out[0].dtype == torch.float32


def test_device_stage_blur_width_from_device_value_is_caught(monkeypatch):
    """Negative control: the blur's kernel width read from the device radii (the bug fixed) is a host read."""
    aug = DeviceAugmentation.from_specs(SIMCLR)
    params_host = _host_params()
    monkeypatch.setattr(device_augment.BlurOp, "plan", lambda self, cols: ([cols[:, 0] > 0.5], None))
    plan = aug.plan(params_host)
    with fake_cuda():
        data = torch.empty(len(params_host), 3, 32, 32, dtype=torch.uint8, device="cuda")
        params = torch.empty(len(params_host), aug.width, device="cuda")
        dev_plan = plan.to("cuda")
        trace(lambda: aug.apply(data, params, dev_plan))
        events = trace(lambda: aug.apply(data, params, dev_plan))
    assert [e.kind for e in events] == ["host_read"]


def test_device_stage_without_host_params_is_caught():
    """Negative control: without the loader's CPU copy the stage copies the parameters back (a host read)."""
    aug = DeviceAugmentation.from_specs(SIMCLR)
    with fake_cuda():
        data = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device="cuda")
        params = torch.empty(4, aug.width, device="cuda")
        events = trace(lambda: aug(data, params))
    assert events and events[0].kind == "host_read"


def test_batch_to_device_copies_pageable_memory_blocking():
    """A non_blocking copy from pageable memory is a blocking copy in disguise: only pinned tensors ask for it
    (nothing can be pinned without CUDA, so here every copy must be blocking)."""
    batch = {"data": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "aug_params": [torch.zeros(2, 12)], "x": 1}
    with fake_cuda():
        events = trace(lambda: batch_to_device(batch, "cuda"))
    assert [e.kind for e in events] == ["h2d", "h2d"]


def test_pageable_async_copy_is_caught():
    with fake_cuda():
        events = trace(lambda: torch.zeros(3).to("cuda", non_blocking=True))
    assert [e.kind for e in events] == ["h2d", "pageable_async"]


def test_loaders_pin_only_for_cuda_runs_and_async_copies_need_pinning(cfg, monkeypatch):
    from scaleclr import builders

    c = cfg.copy()
    c.DATA.PIN_MEMORY, c.MACHINE.DEVICE = True, "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert builders.pin_memory(c)
    c.MACHINE.DEVICE = "cpu"
    assert not builders.pin_memory(c)
    c.DATA.PIN_MEMORY, c.MACHINE.DEVICE = False, "gpu"
    assert not builders.pin_memory(c)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("channels_last_bf16", [False, True], ids=["fp32", "channels_last-bf16"])
def test_model_forward_records_nothing(cfg, channels_last_bf16):
    from scaleclr import builders

    with fake_cuda():
        model = fake_module(lambda: builders.build_model(cfg))
        x = torch.empty(8, 3, 32, 32, device="cuda")
        if channels_last_bf16:
            to_channels_last(model)
            x = x.contiguous(memory_format=torch.channels_last)
            with cuda_autocast(torch.bfloat16):
                out = []
                events = trace(lambda: out.append(model(x)))
            assert out[0].dtype == torch.bfloat16  # autocast really ran
        else:
            events = trace(lambda: model(x))
    assert events == []


class _HostRead(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


class _CpuOperand(nn.Module):
    def forward(self, x):
        return x + torch.ones(x.shape[1:])


@pytest.mark.parametrize("bug", ["item", "cpu_operand", "uint8_batch"])
def test_model_negative_controls(cfg, bug):
    from scaleclr import builders

    with fake_cuda():
        if bug == "uint8_batch":  # views that skipped the device stage
            model = fake_module(lambda: builders.build_model(cfg))
            x = torch.empty(4, 3, 32, 32, dtype=torch.uint8, device="cuda")
        else:
            model = fake_module(lambda: nn.Sequential(nn.Linear(4, 4), _HostRead() if bug == "item" else _CpuOperand()))
            x = torch.empty(2, 4, device="cuda")
        events = trace(lambda: model(x))
    expected = {"item": "host_read", "cpu_operand": "mixed_devices", "uint8_batch": "integer_conv"}[bug]
    assert events and events[0].kind == expected


# ------------------------------------------------------------------------------------------------- loss
def _cache_tiling(rows, device):
    """Fills the streaming loss's tiling cache as its first call would (host index arithmetic, then one copy):
    the host part runs outside the fake mode, where the CPU tensors are real (DESIGN.md: host bookkeeping stays
    outside the traced region)."""
    from scaleclr.losses.indices import pair_columns

    tr, tc = streaming.DEFAULT_TILE_ROWS, streaming.DEFAULT_TILE_COLS
    _, same = pair_columns(2, rows // 2, 0, "cpu")
    tiling = streaming._Tiling(same, rows, 0, tr, tc, torch.device("cpu"))
    return lambda: _move_tiling(tiling, (2, rows // 2, 0, rows, tr, tc, str(torch.device(device))), device)


def _move_tiling(tiling, key, device):
    move = lambda tiles: [(*t[:4], None if t[4] is None else t[4].to(device), t[5]) for t in tiles]  # noqa: E731
    tiling.tiles, tiling.sym_tiles = move(tiling.tiles), move(tiling.sym_tiles)
    streaming._TILINGS[key] = tiling


@pytest.mark.parametrize("impl", ["reference", "streaming"])
def test_loss_forward_records_nothing(impl):
    from scaleclr.losses import SimclrInfoNCELoss

    loss_fn = SimclrInfoNCELoss(temperature=0.1, impl=impl)
    fill_cache = _cache_tiling(16, "cuda:0")
    with fake_cuda():
        fill_cache()
        emb = torch.empty(16, 128, device="cuda", requires_grad=True)
        trace(lambda: loss_fn(emb))  # the streaming loss builds and caches its tiling plan once
        assert trace(lambda: loss_fn(emb)) == []


# -------------------------------------------------------------------------------------------- optimizer
def _fake_step(cfg, clip):
    """LARC + SGD over the quick config's param groups on fake CUDA; returns the events of steps 1 and 2 (the
    LR changes every step, as under a schedule)."""
    from scaleclr import builders

    c = cfg.copy()
    c.OPTIMIZER.larc_config.clip = clip
    with fake_cuda():
        model = fake_module(lambda: builders.build_model(c))
        opt = builders.make_optimizer_factory(c)(model)
        assert isinstance(opt, larc_module.LARC) and len({g["weight_decay"] for g in opt.param_groups}) >= 1
        events = []
        for lr in (0.3, 0.29):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            for g in opt.param_groups:
                g["lr"] = lr
            events.append(trace(opt.step))
    return events


@pytest.mark.parametrize("clip", [False, True], ids=["scale", "clip"])
def test_larc_sgd_step_records_nothing(cfg, clip):
    first, second = _fake_step(cfg, clip)
    assert second == [] and first == []


def _host_built_filled(counts_values, like):
    """The bug fixed: per-entry weight decays / LRs as a host-built tensor copied to the device every step."""
    return torch.tensor([v for n, v in counts_values for _ in range(n)], dtype=like.dtype, device=like.device)


@pytest.mark.parametrize("clip", [False, True], ids=["scale", "clip"])
def test_larc_host_built_tensor_is_caught(cfg, clip, monkeypatch):
    monkeypatch.setattr(larc_module, "_filled", _host_built_filled)
    _, second = _fake_step(cfg, clip)
    assert [e.kind for e in second] == ["h2d"] * (2 if clip else 1)


def test_larc_python_list_index_is_caught(cfg, monkeypatch):
    """Negative control: indexing a device tensor with a Python list (the old ``wd_eff[with_wd]``) copies it."""
    real = larc_module._scalars
    monkeypatch.setattr(larc_module, "_scalars", lambda values, like: real(values[list(range(len(values)))], like))
    _, second = _fake_step(cfg, False)
    assert second and {e.kind for e in second} == {"h2d"} and any("int64" in e.detail for e in second)


# ------------------------------------------------------------------------------------ backward on meta
def _autocast_accepting_meta(monkeypatch):
    """The loss turns autocast off around its fp32 math (``torch.autocast(device.type, enabled=False)``), which
    torch refuses for ``meta``; a disabled autocast on meta is a no-op anyway."""
    real = torch.autocast

    def autocast(device_type, *args, **kwargs):
        if device_type == "meta" and kwargs.get("enabled", True) is False:
            return contextlib.nullcontext()
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)


@pytest.mark.parametrize("impl", ["reference", "streaming"])
def test_meta_forward_backward_and_step_record_nothing(cfg, impl, monkeypatch):
    """Where the autograd backward must run: forward, loss, backward and the LARC step on meta tensors."""
    from scaleclr import builders
    from scaleclr.losses import SimclrInfoNCELoss

    _autocast_accepting_meta(monkeypatch)

    model = fake_module(lambda: builders.build_model(cfg), device="meta")
    opt = builders.make_optimizer_factory(cfg)(model)
    loss_fn = SimclrInfoNCELoss(temperature=0.1, impl=impl)
    x = torch.empty(8, 3, 32, 32, device="meta")

    def step(lr):
        opt.zero_grad()
        loss_fn(model(x)).backward()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()

    trace(lambda: step(0.3), device_type="meta")  # first step: cached plans, momentum buffers
    assert trace(lambda: step(0.29), device_type="meta") == []


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float(g.sum())


def test_meta_backward_host_read_is_caught():
    """Negative control: a host read in a backward is recorded (and raises on meta)."""
    w = torch.empty(4, device="meta", requires_grad=True)
    events = trace(lambda: _ReadsInBackward.apply(w * 2).sum().backward(), device_type="meta")
    assert events and events[0].kind == "host_read"


# ---------------------------------------------------------------------------------- ZeRO's LARC norms
def _zero_norms_events(index_with_list: bool, monkeypatch):
    """ZeroLARC's norm function over partitioned fragments on fake CUDA (no process group: the grouping and
    reassembly run, the all-reduce does not); ``index_with_list`` reintroduces the old ``sq[idx]``."""
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    from scaleclr.engines import deepspeed as ds_engine

    if index_with_list:
        def old_stack(tensors, *a, **k):  # the old code's torch.stack(...)[list] equivalent
            out = real_stack(tensors, *a, **k)
            return out[list(range(out.shape[0]))] if out.dim() == 1 else out
        real_stack = torch.stack
        monkeypatch.setattr(torch, "stack", old_stack)
    with fake_cuda():
        params = [torch.randn(4, 3, device="cuda"), torch.randn(5, device="cuda"), torch.randn(2, device="cuda")]
        grads = [torch.randn_like(p) for p in params]
        zl = ds_engine.ZeroLARC.__new__(ds_engine.ZeroLARC)
        part = SimpleNamespace(partitioned=True, group=None)
        zl._entry_layouts = [part, None, part]
        return trace(lambda: zl._full_norms(params + grads))


def test_zero_larc_norms_record_nothing(monkeypatch):
    assert _zero_norms_events(False, monkeypatch) == []


def test_zero_larc_norms_list_index_is_caught(monkeypatch):
    """Negative control: a Python-list index into the stacked norms (the old ``sq[idx]``) copies an index tensor."""
    assert {e.kind for e in _zero_norms_events(True, monkeypatch)} == {"h2d"}
