"""Triton InfoNCE kernels on CPU tensors under the Triton interpreter, against the float64 dense reference.

``TRITON_INTERPRET=1`` must be set before triton is first imported in a process, so when this module is
collected without it, a single test re-runs this file in a fresh ``pytest`` subprocess with the variable set
(all the real tests run there; its output is shown on failure). With a CUDA device and triton the same kernels
run compiled (``benchmarks/loss_gpu.py`` holds the GPU checks).

Tolerances (u: unit roundoff; logits x = cos / T with D-term dot products, |x| <= 1/T <= 50; the tiled
log-sum-exp sums N <= 1000 columns): float64 kernels (the interpreter runs fp64 ``tl.dot``) vs float64 reference
``rtol=1e-10`` (two summation orders differ by <~ (D + N) u / T ~ 6e-12); fp32 ``ieee`` kernels vs float64
``rtol=1e-5`` (values: logit errors ~ sqrt(D) u / T = 3.4e-5 absolute at T = 0.02, D = 128, average out over the
anchors to ~1e-6 relative on losses >= 1) / ``1e-4`` of the gradient's max (gradients: per element, the logit
error times the softmax weight, not averaged); ``tf32`` (u = 2^-11): ``rtol=1e-2`` (sqrt(32) u / 0.1 = 2.8e-2
absolute on a loss ~3).

D wider than ``it.MAX_BLOCK_K`` (128) is tiled in chunks: the tiling cases run D = 16, 200, 256 with the default
and D = 64, 200 with ``MAX_BLOCK_K`` lowered to 32, so several chunks and a masked last chunk run on tiny N.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET:
    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    def test_triton_kernels_under_interpreter_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", __file__],
                             capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                             timeout=600)
        assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-4000:]
        assert " passed" in out.stdout and "failed" not in out.stdout.splitlines()[-1]

else:
    import torch
    import torch.nn.functional as F

    from dist_helpers import run_distributed
    from scaleclr.losses import infonce_triton as it
    from scaleclr.losses import MulticropSimclrInfoNCELoss

    from references import dense64 as _dense64, loss_grad as _loss_grad  # the streaming tests' float64 reference

    def _triton(temperature, num_crops, negatives="global", splits=0, precision="ieee"):
        return lambda h: it.info_nce_triton(F.normalize(h, dim=1), temperature=temperature, num_crops=num_crops,
                                            negatives=negatives, input_precision=precision, splits=splits)

    def _assert_grad_close(got, want, rel):
        err = (got.double() - want).abs().max().item()
        assert err <= rel * want.abs().max().item(), f"max grad error {err:.3e}"

    @pytest.mark.parametrize("n", [8, 64, 250])
    @pytest.mark.parametrize("num_crops", [2, 6])
    @pytest.mark.parametrize("temperature", [0.02, 0.1, 0.5])
    def test_kernels_match_dense_reference(n, num_crops, temperature):
        rows = num_crops * max(2, n // num_crops)
        h = torch.randn(rows, 64 if n < 250 else 128, dtype=torch.float64)
        want, want_g = _loss_grad(lambda x: _dense64(x, temperature, num_crops), h)
        got, got_g = _loss_grad(_triton(temperature, num_crops, splits=3), h)       # fp64 kernels
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        _assert_grad_close(got_g, want_g, 1e-10)
        got32, got32_g = _loss_grad(_triton(temperature, num_crops), h.float())     # fp32, ieee dot
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=0)
        _assert_grad_close(got32_g, want_g, 1e-4)

    def test_module_dispatch_and_degenerate_inputs():
        for h in [torch.ones(2 * 20, 16), torch.cat([torch.eye(16)[:10]] * 2), torch.randn(3 * 10, 16) * 1e-20]:
            c = 3 if h.shape[0] == 30 else 2
            want, want_g = _loss_grad(lambda x: _dense64(x, 0.1, c), h.double())
            got, got_g = _loss_grad(MulticropSimclrInfoNCELoss(0.1, c, impl="triton"), h)
            # fp32 as above; atol for the tiny-norm rows (loss = log(2N - 1) exactly representable to ~1e-7)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
            _assert_grad_close(got_g, want_g, 1e-4)

    def test_deterministic_and_split_invariant():
        h = torch.randn(2 * 40, 32, dtype=torch.float64)
        a = _loss_grad(_triton(0.1, 2, splits=1), h)
        b = _loss_grad(_triton(0.1, 2, splits=1), h)
        c = _loss_grad(_triton(0.1, 2, splits=3), h)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])                 # bitwise repeatable
        # fp64, another split of the column sums: <~ N u / T = 1e-13
        torch.testing.assert_close(a[0], c[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(a[1], c[1], rtol=1e-10, atol=1e-16)

    def test_tf32_mode_runs():
        h = torch.randn(2 * 16, 32)
        want = _dense64(h, 0.1, 2)
        got = _triton(0.1, 2, precision="tf32")(h)
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=0)  # tf32: see the module docstring
        with pytest.raises(ValueError, match="input_precision"):
            _triton(0.1, 2, precision="fp8")(h)

    def test_huge_upstream_gradient_is_scaled_out():
        h = torch.randn(2 * 20, 16)
        _, want_g = _loss_grad(lambda x: _dense64(x, 0.025, 2), h.double())
        _, g_big = _loss_grad(lambda x: _triton(0.025, 2)(x) * 1e30, h)
        assert torch.isfinite(g_big).all()
        _assert_grad_close(g_big / 1e30, want_g, 1e-4)

    def test_opcheck():
        z = F.normalize(torch.randn(12, 16, dtype=torch.float64), dim=1).requires_grad_()
        za = z.detach().clone()
        a = torch.rand(12, dtype=torch.float64)
        torch.library.opcheck(it.infonce_triton_loss, (z, za, 0, 1, 3, 0.1, "ieee", 2, ""))
        torch.library.opcheck(torch.ops.scaleclr.infonce_lse.default, (za, za, 0, 12, 4, 0.1, "ieee", 2))
        torch.library.opcheck(torch.ops.scaleclr.infonce_grad.default,
                              (za, za, a, a, a, a, 0, 12, 4, 0.1, True, "ieee", 2))
        torch.library.opcheck(torch.ops.scaleclr.infonce_grad.default,
                              (za, za, a, a, a, a, 0, 12, 4, 0.02, False, "ieee", 2))

    # ------------------------------------------------------------------------- D tiled in BLOCK_K chunks
    def _lse64(z, num_crops, temperature):
        """float64 ``log sum_{j: image(j) != image(k)} exp(z_k . z_j / T)`` on one rank (crop-major rows)."""
        img = torch.arange(z.shape[0]) % (z.shape[0] // num_crops)
        x = (z @ z.T / temperature).masked_fill(img[:, None] == img[None, :], float("-inf"))
        return torch.logsumexp(x, 1)

    def _grad_err(got, want):
        return (got.double() - want).abs().max().item() / want.abs().max().item()

    @pytest.mark.parametrize("dim, max_block_k, chunks, temperature, num_crops", [
        (16, 128, (1, 1), 0.1, 2),     # one chunk (16 wide, tl.dot's minimum)
        (200, 128, (4, 2), 0.02, 2),   # not a power of two: logits 3 x 64 + 8 (masked), gradient 128 + 72; 1/T > 40
        (256, 128, (4, 2), 0.1, 3),    # full chunks
        (64, 32, (4, 2), 0.1, 2),      # MAX_BLOCK_K lowered: a narrow D spans several chunks (cheap to interpret)
        (200, 32, (13, 7), 0.02, 3),   # logits 12 x 16 + 8, gradient 6 x 32 + 8
    ])
    def test_wide_embeddings_are_tiled_over_d(monkeypatch, dim, max_block_k, chunks, temperature, num_crops):
        """fp64 kernels vs the float64 dense reference at the module docstring's ``rtol=1e-10`` ((D + N) u / T
        <= 3e-12 here), for the loss, ``lse`` and the gradient (whose output chunks are a grid axis)."""
        monkeypatch.setattr(it, "MAX_BLOCK_K", max_block_k)
        block_k, block_o = it._chunks(dim)
        assert (-(-dim // block_k), -(-dim // block_o)) == chunks
        h = torch.randn(num_crops * 8, dim, dtype=torch.float64)
        want, want_g = _loss_grad(lambda x: _dense64(x, temperature, num_crops), h)
        got, got_g = _loss_grad(_triton(temperature, num_crops, splits=2), h)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        assert _grad_err(got_g, want_g) <= 1e-10
        z = F.normalize(h, dim=1)
        lse_want = _lse64(z, num_crops, temperature)
        lse = it.infonce_lse(z, z, 0, z.shape[0], 8, temperature, "ieee", 2)
        torch.testing.assert_close(lse, lse_want, rtol=1e-10, atol=0)
        if chunks[0] > 1:
            # negative controls, 1e4 x the tolerance: a chunk loop stopping before the last (partial) chunk is
            # the kernel run on z[:, :start of last chunk] (same strides, dim shortened) ...
            last = (chunks[0] - 1) * block_k
            dropped = it.infonce_lse(z[:, :last], z[:, :last], 0, z.shape[0], 8, temperature, "ieee", 2)
            assert ((dropped - lse_want).abs() / lse_want.abs()).max().item() > 1e4 * 1e-10
            # ... and a grid missing the last output chunk leaves those gradient columns unset (here: zero)
            cut = got_g.clone()
            cut[:, (chunks[1] - 1) * block_o:] = 0
            assert _grad_err(cut, want_g) > 1e4 * 1e-10

    def test_fp32_chunked_matches_reference(monkeypatch):
        """fp32 ``ieee`` with several chunks: the module docstring's fp32 tolerances (logit error ~ sqrt(D) u / T,
        D = 200 < 2 x 128 adds < 1.3x to the D = 128 estimate, still inside the ``1e-5`` / ``1e-4`` margins)."""
        monkeypatch.setattr(it, "MAX_BLOCK_K", 64)
        h = torch.randn(2 * 12, 200, dtype=torch.float64)
        want, want_g = _loss_grad(lambda x: _dense64(x, 0.1, 2), h)
        got, got_g = _loss_grad(_triton(0.1, 2), h.float())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
        assert _grad_err(got_g, want_g) <= 1e-4

    def test_tiles_stay_bounded_for_any_width():
        """No chunk exceeds MAX_BLOCK_K (128): D <= 128 is one chunk, D = 2048 runs 32 logits chunks of 64 and 16
        output chunks of 128."""
        for dim, chunks in [(16, (16, 16)), (100, (128, 128)), (128, (128, 128)), (129, (64, 128)),
                            (2048, (64, 128))]:
            assert it._chunks(dim) == chunks
            assert it._launch_config(torch.empty(64, dim, device="meta"), 64, 0)[2:4] == chunks

    # ------------------------------------------------------------------------------ distributed (gloo)
    B, DIN, DOUT = 3, 6, 16

    def _global(world, num_crops):
        g = torch.Generator().manual_seed(7 + world + num_crops)
        return (torch.randn(num_crops * world * B, DIN, generator=g, dtype=torch.float64),
                torch.randn(DIN, DOUT, generator=g, dtype=torch.float64))

    def _dist_body(rank, world):
        out = {}
        for name, c, neg, t in [("simclr", 2, "global", 0.1), ("mc_lowT", 3, "global", 0.02),
                                ("mc_local", 3, "local", 0.1)]:
            x, w = _global(world, c)
            w = w.clone().requires_grad_()
            n_img = world * B
            shard = x[[k * n_img + rank * B + i for k in range(c) for i in range(B)]]
            loss = MulticropSimclrInfoNCELoss(t, c, neg, impl="triton")(shard @ w)
            loss.backward()
            out[name] = (loss.detach(), w.grad)
        return out

    @pytest.mark.dist
    def test_distributed_w2_matches_single_process():
        from test_losses import oracle_info_nce
        world = 2
        res = run_distributed(_dist_body, world)
        for name, c, neg, t in [("simclr", 2, "global", 0.1), ("mc_lowT", 3, "global", 0.02),
                                ("mc_local", 3, "local", 0.1)]:
            x, w = _global(world, c)
            w = w.clone().requires_grad_()
            want = oracle_info_nce(x @ w, c, t, ranks=world, negatives=neg)
            want.backward()
            loss = torch.stack([r[name][0] for r in res]).mean()
            grad = torch.stack([r[name][1] for r in res]).mean(0)
            torch.testing.assert_close(loss, want.detach(), rtol=1e-9, atol=0, msg=name)
            torch.testing.assert_close(grad, w.grad, rtol=1e-8, atol=1e-12, msg=name)
