"""Streaming (tiled, recompute-in-backward) InfoNCE against the dense float64 reference; distributed W=2/3.

The dense reference (``info_nce_dense``) is itself checked against an explicit-loop oracle in
``test_losses.py``; here it serves as the float64 ground truth at sizes where loops would be slow.
Tolerances (u: unit roundoff; logits x = cos / T from D-term dot products, |x| <= 1/T <= 50; tiles sum N <= 6000
columns): float64 streaming vs float64 reference ``rtol=1e-10`` (two summation orders: <~ (D + N) u / T = 3e-11);
fp32 (default tiles) vs float64 ``rtol=1e-4`` (values: logit errors ~ sqrt(D) u / T = 3.4e-5 absolute at
T = 0.02, D = 128, relative on losses >= 1) / ``1e-3`` of the gradient's max (gradients: per element the logit
error times 1/T, not averaged over anchors); bf16/fp16 inputs vs the float64 loss of the same rounded inputs
``rtol=1e-5`` (the loss accumulates in fp32: sqrt(64) u / 0.1 = 4.8e-6), their gradients (rounded to the input
dtype, u_bf16 = 3.9e-3) ``1e-2``; distributed float64 vs the single-process oracle ``rtol=1e-9`` / ``1e-8``
(gathered tiles, other sums: <~ 1e5 u, generous).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import scaleclr.losses.streaming as streaming
from dist_helpers import run_distributed
from references import dense64, loss_grad, oracle_info_nce
from scaleclr.losses import MulticropSimclrInfoNCELoss, info_nce_dense, info_nce_streaming

SMALL_TILES = (32, 48)  # not dividing any N below: partial tiles in both directions


def _rows(n, num_crops):
    b = max(2, n // num_crops)
    return num_crops * b


def _streaming(temperature, num_crops, tiles=SMALL_TILES, negatives="global"):
    return lambda h: info_nce_streaming(F.normalize(h, dim=1), temperature=temperature, num_crops=num_crops,
                                        negatives=negatives, tile_rows=tiles[0], tile_cols=tiles[1])


def _assert_grad_close(got, want, rel):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"max grad error {err:.3e} > {rel:.0e} x {scale:.3e}"


@pytest.mark.parametrize("n", [8, 64, 250, 1000])
@pytest.mark.parametrize("num_crops", [2, 6])
@pytest.mark.parametrize("temperature", [0.02, 0.1, 0.5])
def test_matches_dense_reference(n, num_crops, temperature):
    dim = 128 if n in (64, 1000) else 64
    rows = _rows(n, num_crops)
    h = torch.randn(rows, dim, dtype=torch.float64)
    h[rows // num_crops:2 * rows // num_crops] += 2 * h[:rows // num_crops]   # correlated crops 0/1
    want, want_g = loss_grad(lambda x: dense64(x, temperature, num_crops), h)
    got, got_g = loss_grad(_streaming(temperature, num_crops), h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    _assert_grad_close(got_g, want_g, 1e-10)
    if n >= 250:  # fp32 path (fixed shift for T >= 0.025, running max below) with default tiles
        got32, got32_g = loss_grad(_streaming(temperature, num_crops, tiles=(256, 512)), h.float())
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=0)
        _assert_grad_close(got32_g, want_g, 1e-3)


@pytest.mark.parametrize("negatives", ["global", "local"])
def test_module_impl_streaming_matches_reference(negatives):
    h = torch.randn(4 * 24, 32, dtype=torch.float64)
    ref = loss_grad(MulticropSimclrInfoNCELoss(0.1, 4, negatives, impl="reference"), h)
    st = loss_grad(MulticropSimclrInfoNCELoss(0.1, 4, negatives, impl="streaming"), h)
    # float64, N = 96 columns, D = 32, T = 0.1: <~ (D + N) u / T = 1.4e-13
    torch.testing.assert_close(st[0], ref[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(st[1], ref[1], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("temperature", [0.02, 0.1])
def test_degenerate_inputs(temperature):
    cases = {
        "all_equal": torch.ones(2 * 40, 64),
        "orthogonal": torch.cat([torch.eye(64)[:40]] * 2),
        "tiny_norms": torch.randn(2 * 40, 64) * 1e-20,       # below F.normalize's eps: rows of norm < 1
        "small_norms": torch.randn(2 * 40, 64) * 1e-8,
    }
    for name, h in cases.items():
        want, want_g = loss_grad(lambda x: dense64(x, temperature, 2), h.double())
        got, got_g = loss_grad(_streaming(temperature, 2), h)
        assert torch.isfinite(got) and torch.isfinite(got_g).all(), name
        # fp32, small tiles of 40 rows: as the fp32 case above (D = 64, T >= 0.02: 2.4e-5 absolute logit error,
        # here on exactly representable logits for all_equal / orthogonal); atol for losses ~0
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7, msg=name)
        _assert_grad_close(got_g, want_g, 1e-4)
    collapsed = _streaming(temperature, 2)(torch.ones(80, 64))
    assert collapsed.item() == pytest.approx(math.log(79), rel=1e-6)  # equal logits cancel: fp32 rounding of log


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    h = torch.randn(3 * 30, 64).to(dtype)
    want, want_g = loss_grad(lambda x: oracle_info_nce(x, 3, 0.1) if x.shape[0] <= 30 else dense64(x, 0.1, 3),
                              h.double())
    hh = h.clone().requires_grad_()
    loss = MulticropSimclrInfoNCELoss(0.1, num_crops=3, impl="streaming")(hh)
    loss.backward()
    assert loss.dtype == torch.float32 and hh.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    _assert_grad_close(hh.grad.float(), want_g, 1e-2)          # gradient rounded to the input dtype


def test_huge_upstream_gradient_is_exact_without_a_host_check():
    """At T=0.025 fixed-shift coefficients that contained a 1e30 upstream gradient would overflow fp32; they are
    taken relative to it (and the sum scaled back), so the backward needs no host-side overflow check.
    Tolerance 1e-4 of the gradient's max: fp32 tiles of length 100 vs the float64 reference (as for g = 1:
    logit errors ~ sqrt(32) u / 0.025 = 1.4e-5, times 1/T in the gradient's chain: < 1e-4 of its max)."""
    h = torch.randn(2 * 50, 32)
    fn = _streaming(0.025, 2)
    _, want_g = loss_grad(lambda x: dense64(x, 0.025, 2), h.double())
    _, g1 = loss_grad(fn, h)
    _, g_big = loss_grad(lambda x: fn(x) * 1e30, h)
    assert torch.isfinite(g_big).all()
    _assert_grad_close(g1, want_g, 1e-4)
    _assert_grad_close(g_big / 1e30, want_g, 1e-4)


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match="tile_rows"):
        info_nce_streaming(torch.randn(4, 3), temperature=0.1, num_crops=2, tile_rows=0)


# ----------------------------------------------------------------------------------------- distributed
B_DIST, DIN, DOUT = 5, 8, 16


def _global(world, num_crops):
    g = torch.Generator().manual_seed(99 + 7 * world + num_crops)
    x = torch.randn(num_crops * world * B_DIST, DIN, generator=g, dtype=torch.float64)
    w = torch.randn(DIN, DOUT, generator=g, dtype=torch.float64)
    return x, w


def _shard(x, rank, world, num_crops):
    n_img = world * B_DIST
    return x[[c * n_img + rank * B_DIST + i for c in range(num_crops) for i in range(B_DIST)]]


def _dist_body(rank, world):
    """Streaming loss on rank-distinct shards; small tiles; also two deliberately broken variants."""
    streaming.DEFAULT_TILE_ROWS, streaming.DEFAULT_TILE_COLS = 4, 7
    out = {}
    configs = [("simclr", 2, "global", 0.1), ("simclr_lowT", 2, "global", 0.02), ("mc_global", 3, "global", 0.1),
               ("mc_local", 3, "local", 0.2), ("mc_global_lowT", 3, "global", 0.02)]

    def run(name, num_crops, negatives, temperature, scale=1.0):
        x, w = _global(world, num_crops)
        w = w.clone().requires_grad_()
        loss = MulticropSimclrInfoNCELoss(temperature, num_crops, negatives, impl="streaming")(
            _shard(x, rank, world, num_crops) @ w)
        (loss * scale).backward()
        out[name] = (loss.detach(), w.grad / scale)

    for cfg in configs:
        run(*cfg)
    # rank-dependent upstream scale (e.g. a per-rank loss weight): the g all-gather keeps the contract exact
    run("simclr_scaled", 2, "global", 0.1, scale=1.0 + rank)

    real = streaming._gather_row_stats
    # Negative control 1: no normaliser all-gather (own stats reused for every rank's columns).
    streaming._gather_row_stats = lambda stats, group: stats.repeat(world, 1)
    run("broken_normalisers", *configs[0][1:])
    # Negative control 2: drop the cross-rank column term (zero weight for every other rank's rows).
    def no_remote_columns(stats, group):
        full = real(stats, group)
        keep = torch.zeros(full.shape[0], 1, dtype=full.dtype)
        keep[rank * stats.shape[0]:(rank + 1) * stats.shape[0]] = 1
        return torch.cat([full[:, :1], full[:, 1:] * keep], dim=1)
    streaming._gather_row_stats = no_remote_columns
    run("broken_columns", *configs[0][1:])
    streaming._gather_row_stats = real
    return out


def _oracle(world, num_crops, negatives, temperature):
    x, w = _global(world, num_crops)
    w = w.clone().requires_grad_()
    loss = oracle_info_nce(x @ w, num_crops, temperature, ranks=world, negatives=negatives)
    loss.backward()
    return loss.detach(), w.grad


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_streaming_matches_single_process(world):
    res = run_distributed(_dist_body, world)

    def ddp(name):
        return (torch.stack([r[name][0] for r in res]).mean(), torch.stack([r[name][1] for r in res]).mean(0))

    for name, num_crops, negatives, temperature in [
            ("simclr", 2, "global", 0.1), ("simclr_lowT", 2, "global", 0.02), ("mc_global", 3, "global", 0.1),
            ("mc_local", 3, "local", 0.2), ("mc_global_lowT", 3, "global", 0.02)]:
        loss, grad = ddp(name)
        want_loss, want_grad = _oracle(world, num_crops, negatives, temperature)
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0, msg=name)
        torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12, msg=name)

    # Per-rank upstream scales s_r: the DDP average of the rank gradients of s_r * L_r must equal the gradient
    # of mean_r(s_r * L_r) (rank r's loss = dense reference over its own anchors against all rows).
    scales = [1.0 + r for r in range(world)]
    x, w = _global(world, 2)
    w = w.clone().requires_grad_()
    total = 0
    z_all = F.normalize(torch.cat([_shard(x, q, world, 2) for q in range(world)]) @ w, dim=1)
    for r in range(world):
        zl = z_all[r * 2 * B_DIST:(r + 1) * 2 * B_DIST]
        total = total + scales[r] * info_nce_dense(zl, z_all, temperature=0.1, num_crops=2, rank=r)
    (total / world).backward()
    got = torch.stack([res[r]["simclr_scaled"][1] * scales[r] for r in range(world)]).mean(0)
    torch.testing.assert_close(got, w.grad, rtol=1e-8, atol=1e-12)

    want_loss, want_grad = _oracle(world, 2, "global", 0.1)
    for name in ["broken_normalisers", "broken_columns"]:
        loss, grad = ddp(name)
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)   # forward is unaffected
        rel = ((grad - want_grad).norm() / want_grad.norm()).item()
        # the correct variant is within ~1e-12 (float64); a broken one is off by O(0.1): > 1e-3 is 1e9 x rounding
        assert rel > 1e-3, f"{name}: broken variant unexpectedly matched (rel err {rel:.2e})"
