"""The precision policy every engine applies: BatchNorm under mixed precision, channels_last, torch.compile.

BatchNorm policy (what native autocast does): fp32 weights, fp32 running statistics and fp32 accumulation of
the batch statistics; activations in the autocast dtype. Checked on the model the trainer builds, against an
fp32 forward on the same input, with tolerances derived from bf16's unit roundoff.
"""
import pytest
import torch
from torch import nn

QUICK = "config=test/integration_test/quick_simclr_synthetic"
BF16_EPS = 2.0 ** -8  # unit roundoff of bf16 (8 significand bits)


def _model():
    from scaleclr import builders
    from scaleclr.config import load_config

    root, _ = load_config([QUICK])
    return builders.build_model(root.config)


def _engine(overrides=()):
    from scaleclr import builders
    from scaleclr.config import load_config
    from scaleclr.engines import build_engine

    root, _ = load_config([QUICK, *overrides])
    c = root.config
    engine = build_engine(builders.build_engine_spec(c, 1, torch.device("cpu")), torch.device("cpu"), 0, 1)
    engine.setup(builders.build_model(c), builders.make_optimizer_factory(c))
    return engine


AMP = ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
       "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]


def test_bf16_batchnorm_keeps_fp32_weights_and_statistics_with_bf16_activations():
    engine = _engine(AMP)
    seen = {}

    def probe(m, args, out):
        seen.setdefault("in", set()).add(args[0].dtype)
        seen.setdefault("out", set()).add(out.dtype)
        seen.setdefault("weight", set()).add(m.weight.dtype)

    bns = [m for m in engine.module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    for m in bns:
        m.register_forward_hook(probe)
    x = torch.randn(8, 3, 32, 32)
    with engine.autocast():
        engine.model(x)
    assert seen["in"] == {torch.bfloat16} and seen["out"] == {torch.bfloat16}  # activations stay bf16
    assert seen["weight"] == {torch.float32}
    assert all(b.dtype == torch.float32 for m in bns for b in (m.running_mean, m.running_var))


def test_bf16_running_statistics_match_fp32_within_bf16_rounding():
    """The stem BN sees conv1's output y, computed from bf16-rounded inputs and weights: each output carries an
    error |d| <= 2u * a (u = 2^-8, a = sum |w||x| over its 147 products), then fp32 accumulation. The batch mean
    over N*H*W outputs moves by at most 2u * mean(a); the batch variance by |2 cov(y, d) + var(d)| <=
    2 sqrt(var y) sqrt(E d^2) + E d^2 with E d^2 <= 4u^2 E a^2. Running statistics take 0.1 (momentum) of that,
    the variance times n/(n-1). Deeper layers compound; the stem is the one BN with an analytic bound."""
    torch.manual_seed(0)
    fp32, bf16 = _model(), _model()
    x = torch.randn(16, 3, 32, 32)
    fp32.train()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16.train()(x)
    conv = fp32.trunk.conv1
    with torch.no_grad():
        a = nn.functional.conv2d(x.abs(), conv.weight.abs(), stride=2, padding=3)  # sum |w||x| per output
        y = conv(x)
        dims = (0, 2, 3)
        n = y.numel() // y.shape[1]
        ed2 = 4 * BF16_EPS ** 2 * (a ** 2).mean(dim=dims)
        batch_var_bound = 2 * y.var(dim=dims, correction=0).sqrt() * ed2.sqrt() + ed2
        bound_mean = 0.1 * 2 * BF16_EPS * a.mean(dim=dims)
        bound_var = 0.1 * n / (n - 1) * batch_var_bound
    r, b = fp32.trunk.bn1, bf16.trunk.bn1
    assert b.running_mean.dtype == torch.float32 and b.running_var.dtype == torch.float32
    assert ((r.running_mean - b.running_mean).abs() <= bound_mean).all()
    assert ((r.running_var - b.running_var).abs() <= bound_var).all()
    # not vacuous: bf16 really changed the statistics, and the bound is well below the statistic it bounds
    assert not torch.equal(r.running_mean, b.running_mean)
    assert (batch_var_bound < 0.5 * y.var(dim=dims)).all()


def test_deepspeed_style_low_precision_batchnorm_parameters_compute_in_fp32():
    """An engine that stores BN parameters in bf16 (DeepSpeed) gets fp32 copies for the layer's call and fp32
    buffers (scaleclr.engines.precision.batchnorm_fp32); gradients reach the stored bf16 parameters."""
    from scaleclr.engines.precision import batchnorm_fp32

    bn = nn.BatchNorm2d(4).to(torch.bfloat16)
    assert batchnorm_fp32(nn.Sequential(bn)) == 1
    assert bn.running_mean.dtype == torch.float32 and bn.weight.dtype == torch.bfloat16
    seen = {}
    bn.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight.dtype))  # runs after the cast hook
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    y = bn(x)
    y.float().sum().backward()
    assert seen["w"] == torch.float32 and y.dtype == torch.bfloat16
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
    assert bn.weight.dtype == torch.bfloat16  # the stored parameter is restored after the call


def test_channels_last_reaches_weights_and_inputs():
    """CHANNELS_LAST=on: DDP keeps 4-d weights channels_last; the trainer hands channels_last batches."""
    engine = _engine(["config.MODEL.CHANNELS_LAST=on"])
    w = engine.module.trunk.conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert engine.spec.precision.channels_last


@pytest.mark.parametrize("setting,device,expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                     ("on", "cpu", True), ("off", "cuda", False)])
def test_channels_last_auto_follows_the_device(setting, device, expected):
    from scaleclr import builders
    from scaleclr.config import load_config

    root, _ = load_config([QUICK, f"config.MODEL.CHANNELS_LAST={setting}"])
    assert builders.build_engine_spec(root.config, 1, torch.device(device)).precision.channels_last is expected
