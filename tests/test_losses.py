"""SimCLR / multi-crop InfoNCE losses on one process: spec test vectors, float64 oracle values and gradients.

The oracle (tests/references.py) is written independently of ``scaleclr.losses``: explicit python loops over anchors and
positives, VISSL's multiplicative form ``-log(pos / (pos + neg))`` without any log-sum-exp trick, float64.

Tolerances (u: unit roundoff, fp32 6e-8, fp64 1.1e-16): the losses compute ``softplus(lse_neg - x_pos)`` with
logits ``x = cos / T``, ``|x| <= 1/T``; a logit from a D-term dot product carries an absolute error <~ D u / T,
which is the relative error of the terms ``e^x`` and, through the softplus, of the loss (absolute when the loss
is O(1), relative when it is tiny: softplus(y) ~ e^y). Spec values are printed to 7 significant digits (<= 1e-7).
"""
import math

import pytest
import torch

from references import loss_grad, oracle_info_nce
from scaleclr.losses import (MulticropSimclrInfoNCELoss, SimclrInfoNCELoss, info_nce_dense,
                             multicrop_simclr_info_nce_loss, pair_columns, resolve_impl, simclr_info_nce_loss)

IMPLS = ["reference", "streaming"]


# --------------------------------------------------------------------------------------- spec test vectors
def test_spec_vissl_unit_embeddings_raw_and_normalised():
    rows = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]])
    raw = info_nce_dense(rows, rows, temperature=0.1, num_crops=2)             # criterion, no normalisation
    # fp32, logits up to 20 exactly representable: y = lse - x_pos off by ~4u * 20 = 5e-6, relative for e^y
    assert raw.item() == pytest.approx(4.539993e-05, rel=1e-5)
    assert raw.item() == pytest.approx(0.5 * (math.log(1 + 2 * math.exp(-20)) + math.log(1 + 2 * math.exp(-10))),
                                       rel=1e-5)
    for impl in IMPLS:
        full = SimclrInfoNCELoss(0.1, impl=impl)(rows)
        assert full.item() == pytest.approx(9.079574e-05, rel=1e-5)
        assert full.item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), rel=1e-5)
    assert oracle_info_nce(rows, 2, 0.1, normalize=False).item() == pytest.approx(4.539993e-05, rel=1e-6)  # 7 digits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,expected", [(16, 2.708050), (2048, 7.624131)])
def test_spec_collapsed_is_log_r_minus_1(impl, rows, expected):
    loss = SimclrInfoNCELoss(0.1, impl=impl)(torch.ones(rows, 128))
    # fp32: every logit 10 up to ~128 u * 10 (normalised 128-term dot products): 8e-5 absolute in lse - x_pos
    # cancels to ~ that over the equal terms; log(r - 1) >= 2.7: <= 3e-7 relative; spec 7 digits
    assert loss.item() == pytest.approx(math.log(rows - 1), rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_spec_perfect_alignment_orthogonal_images(impl):
    eye = torch.eye(4)
    loss = SimclrInfoNCELoss(0.1, impl=impl)(torch.cat([eye, eye]))
    # fp32, tiny loss = e^y-like: relative error = absolute error of y (~4u * 10 = 2.4e-6)
    assert loss.item() == pytest.approx(2.723625e-04, rel=1e-5)
    assert loss.item() == pytest.approx(math.log(1 + 6 * math.exp(-10)), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature,expected", [(1.0, 1.4397092), (0.5, 1.9501829), (0.1, 7.4182785)])
def test_spec_small_explicit_case(impl, temperature, expected):
    rows = torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1]])                     # [img0v0, img1v0, img0v1, img1v1]
    # fp32, D = 2, |x| <= 10: the loss (>= 1.4) off by <~ 10 * 4u = 2.4e-6 absolute, 1.7e-6 relative at worst;
    # typical ~ 1/4 of that; the expected values have 8 digits
    assert SimclrInfoNCELoss(temperature, impl=impl)(rows).item() == pytest.approx(expected, rel=1e-6)
    assert MulticropSimclrInfoNCELoss(temperature, num_crops=2, impl=impl)(rows).item() == pytest.approx(
        expected, rel=1e-6)
    assert oracle_info_nce(rows, 2, temperature).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("negatives", ["local", "global"])
def test_spec_multicrop_collapsed_local_negatives(impl, negatives):
    loss = MulticropSimclrInfoNCELoss(0.1, num_crops=3, negatives=negatives, impl=impl)(torch.ones(12, 16))
    # as test_spec_collapsed_is_log_r_minus_1 (D = 16)
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)
    assert loss.item() == pytest.approx(2.302585, rel=1e-6)


def test_spec_mask_vectors_from_indices():
    """Spec vector 8 (and VISSL's W=2 rank-0 mask test) from the index selection, W=2, B=2."""
    def dense(num_crops, rank, world=2, b=2, local=False):
        pos, same = pair_columns(num_crops, b, rank)
        L = num_crops * b
        neg = torch.zeros(L, world * L, dtype=torch.bool)
        if local:
            neg[:, rank * L:(rank + 1) * L] = True
        else:
            neg[:] = True
        neg.scatter_(1, same, False)
        return pos, neg

    pos, neg = dense(2, rank=1)
    assert pos[:, 0].tolist() == [6, 7, 4, 5]
    for k, own_block_negatives in enumerate([{5, 7}, {4, 6}, {5, 7}, {4, 6}]):
        assert set(torch.nonzero(neg[k]).flatten().tolist()) == {0, 1, 2, 3} | own_block_negatives
    pos, neg = dense(2, rank=0)                                               # VISSL's unit test (rank 0)
    assert pos[:, 0].tolist() == [2, 3, 0, 1]
    for k, off in enumerate([{0, 2}, {1, 3}, {0, 2}, {1, 3}]):
        assert set(torch.nonzero(~neg[k]).flatten().tolist()) == off
    pos, neg = dense(3, rank=1, local=True)                                   # multicrop C=3
    assert pos[:, 0].tolist() == [8, 9, 10, 11, 6, 7]
    assert pos[:, 1].tolist() == [10, 11, 6, 7, 8, 9]
    assert not neg[:, :6].any()
    assert set(torch.nonzero(neg[0]).flatten().tolist()) == {7, 9, 11}
    assert set(torch.nonzero(neg[1]).flatten().tolist()) == {6, 8, 10}


# --------------------------------------------------------------------------- oracle: values and gradients
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_crops,temperature", [(2, 0.1), (2, 0.5), (3, 0.2), (4, 0.1)])
def test_matches_float64_oracle_values_and_gradients(impl, num_crops, temperature):
    h = torch.randn(num_crops * 5, 7, dtype=torch.float64)
    want, want_g = loss_grad(lambda x: oracle_info_nce(x, num_crops, temperature), h)
    for negatives in ["global", "local"]:                                       # identical in one process
        got, got_g = loss_grad(lambda x: multicrop_simclr_info_nce_loss(
            x, temperature, num_crops, negatives, impl), h)
        assert got.dtype == torch.float64
        # fp64, two formulas (log-sum-exp vs explicit sums of <= 20 exponentials of |x| <= 10): <~ 1e3 u = 1e-13
        # apart in the value; gradients pass through 1/T and the normalisation (<~ 1e5 u): rtol 1e-9 leaves 1e3x
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-14)
    if num_crops == 2:
        got, got_g = loss_grad(lambda x: simclr_info_nce_loss(x, temperature, impl), h)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
def test_multicrop_two_crops_equals_simclr(impl):
    h = torch.randn(2 * 16, 32)
    a, ga = loss_grad(SimclrInfoNCELoss(0.2, impl=impl), h)
    b, gb = loss_grad(MulticropSimclrInfoNCELoss(0.2, num_crops=2, impl=impl), h)
    # the same fp32 computation through two entry points: equal up to the default fp32 rtol (1.3e-6 ~ 20 u)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("impl", IMPLS)
def test_low_temperature_is_finite_and_accurate(impl):
    h = torch.randn(3 * 8, 16)
    h[8:16] = h[:8] + 1e-3 * torch.randn(8, 16)                                  # near-perfect positives
    loss, grad = loss_grad(MulticropSimclrInfoNCELoss(0.02, num_crops=3, impl=impl), h)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want, want_g = loss_grad(lambda x: oracle_info_nce(x, 3, 0.02), h.double())
    # fp32 at T = 0.02: logits up to 50 with absolute errors <~ D u / T = 16 * 6e-8 * 50 = 5e-5, i.e. the loss
    # to ~1e-4 relative; gradients are differences of softmax weights (relative error ~ logit error, times the
    # 1/T chain factor of the near-cancelling positive terms): 1e-3 relative, 1e-5 absolute for entries ~0
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_g, rtol=1e-3, atol=1e-5)
    collapsed, grad_c = loss_grad(SimclrInfoNCELoss(0.02, impl=impl), torch.ones(8, 4))
    # all logits 50 (D = 4 exact sums): the equal terms cancel exactly in lse - x_pos
    assert collapsed.item() == pytest.approx(math.log(7), rel=1e-6) and torch.isfinite(grad_c).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_under_autocast_gives_fp32(impl):
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(2 * 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        assert h.dtype == torch.bfloat16
        loss = SimclrInfoNCELoss(0.1, impl=impl)(h)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    want = oracle_info_nce(h.detach().float(), 2, 0.1)
    # the same bf16 embeddings (upcast); the loss accumulates in fp32: D = 32, |x| <= 10: <~ 32 u * 10 = 2e-5
    # absolute worst case on a loss ~2.7, typical ~ sqrt(32) u * 10: rel 1e-5
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    hb = torch.randn(3 * 4, 8).bfloat16().requires_grad_()
    lb = MulticropSimclrInfoNCELoss(0.1, num_crops=3, impl=impl)(hb)
    lb.backward()
    assert lb.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16


def test_degenerate_inputs_reference():
    tiny = torch.randn(2 * 6, 8, dtype=torch.float64) * 1e-9
    got, got_g = loss_grad(SimclrInfoNCELoss(0.1), tiny)
    want, want_g = loss_grad(lambda x: oracle_info_nce(x, 2, 0.1), tiny)
    # fp64 (rows of norm 1e-9 normalise without underflow): default fp64 rtol 1e-7 ~ 1e9 u, far above the
    # ~1e3 u of two formulas; the gradient scales with 1 / ||h|| = 1e9, its relative error does not
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g, rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------------- API and errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(negatives="all"), r"negatives must be one of \('global', 'local'\)"),
    (dict(impl="cuda"), r"impl must be one of \('reference', 'streaming', 'triton', 'auto'\)"),
    (dict(num_crops=1), "num_crops"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MulticropSimclrInfoNCELoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        multicrop_simclr_info_nce_loss(torch.randn(12, 4), **kwargs)


def test_invalid_embeddings_raise():
    with pytest.raises(ValueError, match="multiple of num_crops"):
        MulticropSimclrInfoNCELoss(num_crops=6)(torch.randn(13, 8))
    with pytest.raises(ValueError, match="multiple of num_crops"):
        SimclrInfoNCELoss()(torch.randn(5, 8))
    with pytest.raises(ValueError, match="2-D"):
        SimclrInfoNCELoss()(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="at least 2 images"):
        SimclrInfoNCELoss()(torch.randn(2, 8))
    with pytest.raises(ValueError, match="temperature"):
        SimclrInfoNCELoss(temperature=0)


def test_triton_impl_needs_cuda_on_plain_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton impl needs CUDA and triton"):
        SimclrInfoNCELoss(impl="triton")(torch.randn(8, 4))


def test_auto_dispatch():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, 2048, 2048) == "streaming"
    assert resolve_impl("auto", cpu, 1024, 2048) == "reference"
    assert resolve_impl("reference", cpu, 10**6, 10**6) == "reference"
    h = torch.randn(2 * 8, 8, dtype=torch.float64)
    # auto resolves to the reference here: the same computation (equal)
    torch.testing.assert_close(SimclrInfoNCELoss(0.1, impl="auto")(h), SimclrInfoNCELoss(0.1)(h), rtol=0, atol=0)


def test_repr_and_module_defaults():
    loss = MulticropSimclrInfoNCELoss()
    assert (loss.temperature, loss.num_crops, loss.negatives, loss.impl) == (0.1, 6, "global", "reference")
    assert "num_crops=6" in repr(loss)
    assert SimclrInfoNCELoss().temperature == 0.1
