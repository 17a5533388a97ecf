"""Fused Triton kernels for the SimCLR / multi-crop InfoNCE loss (the only module in scaleclr importing triton).

Same loss and gradient as :mod:`scaleclr.losses.streaming` (SimCLR, arXiv 2002.05709; VISSL's per-positive
multi-crop form), fused on the GPU so that the ``[L, N]`` logits never exist in memory:

- forward kernel ``_lse_kernel``: grid ``(row tiles, column splits)``; each program streams its column range of
  the gathered rows ``Z`` through ``S = Z_I Z_C^T`` (``tl.dot``), masks the same-image columns from index
  arithmetic (``image(g) = (g // (C*B)) * B + g % B`` for global row ``g``) before any max, and keeps per-row
  ``(m, l)`` in fp32: a running max ``m`` (online softmax) or, when ``1/T <= 40``, the exact fixed shift
  ``exp2(alpha * (s - 1))`` with ``alpha = log2(e)/T`` (``|s| <= 1`` for normalised rows, and ``e^{-2/T}`` is a
  normal fp32 number). The per-split partials are merged in a fixed order (log-add-exp), so the result is
  deterministic; there are no atomics anywhere.
- backward kernel ``_grad_kernel``: symmetric recompute (brief 5.2 (B)/6.2). For every owned row ``k`` it
  recomputes each tile once and accumulates ``sum_j K_kj z_j`` with ``K_kj = a_k e^{x_kj - lse_k} +
  a_j e^{x_kj - lse_j}`` over negatives ``j`` (row term + column term of row ``j``), one ``tl.dot`` per tile;
  per-split partial accumulators ``[splits, L, D]`` are summed in a fixed order. With the fixed shift this is
  one exp per element: ``K = E0 * (dr_k + dc_j)``.
- D is tiled, so any width compiles with bounded tiles (``_chunks``). D <= ``MAX_BLOCK_K`` (128) is one chunk:
  the row tile stays resident and the backward's column tile is also its GEMM operand. Wider D: each logits tile
  is the sum of ``ceil(D / 64)`` chunk products (row and column chunks loaded per tile, the last one masked), and
  the backward gets a third grid axis of 128-wide output chunks: each program recomputes its logits over all of
  D and accumulates only its ``[BLOCK_M, 128]`` slice of ``sum_j K_kj z_j``, so the backward runs the logits
  GEMM ``ceil(D / 128)`` times. No atomics either way.

Both are registered with :func:`torch.library.triton_op` (so ``torch.compile`` can trace into them); the loss
``scaleclr::infonce_triton_loss`` is a :func:`torch.library.custom_op` with ``register_fake`` and
``register_autograd``. Its backward all-gathers two floats per row (``lse``, ``q``) plus the upstream gradient
of every rank, so each rank computes the complete gradient of its own rows with no ``N x D`` collective.
Contract (as every scaleclr loss): forward = mean over this rank's pairs, backward = ``d(sum_r L_r)/dz_own``; DDP
averaging gives the gradient of the global mean loss.

Precision: ``input_precision`` is passed explicitly to every ``tl.dot``: ``"ieee"`` (tests; default when
``torch.get_float32_matmul_precision() == "highest"``), ``"tf32"`` / ``"tf32x3"`` for speed. Accumulators, ``m``,
``l``, ``lse`` and all epilogues are fp32 (fp64 for fp64 inputs, used by the CPU interpreter tests). The
backward feeds ``K * M`` (``M`` = pairs per rank, so ``K*M <= 2(C-1)``) to the GEMM and rescales the fp32
accumulator afterwards, so tiny per-element gradients never underflow a low-precision operand.

CPU: set ``TRITON_INTERPRET=1`` before triton is first imported to run the same kernels in the interpreter.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..distributed.gather import all_gather_rows, world_info
from .indices import pair_columns, transpose_shift

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MAX_FIXED_SHIFT_INV_T = 40.0
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
#: Widest D taken as one chunk. Wider embeddings are tiled over D (``_chunks``): the logits sum
#: ``MAX_BLOCK_K // 2``-wide ``tl.dot``s, and the backward adds a grid axis of ``MAX_BLOCK_K``-wide output chunks.
#: Read at launch, so a test can lower it to exercise several chunks at a small D.
MAX_BLOCK_K = 128


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _image_of(g, rows_per_rank, batch):
    """Global image id of global row index ``g`` in the rank-major, crop-major layout."""
    return (g // rows_per_rank) * batch + g % batch


@triton.jit
def _chunked_logits(ZR, ZC, rows, cols, row_ok, col_ok, dim, stride_r, stride_c, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """``S = Z_rows Z_cols^T`` ``[BLOCK_M, BLOCK_N]`` summed over D in ``BLOCK_K``-wide chunks (the last masked);
    both operands' chunks are loaded here, per tile, so nothing D-wide stays resident."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, dim, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        d_ok = offs < dim
        zr = tl.load(ZR + rows[:, None] * stride_r + offs[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        zc = tl.load(ZC + cols[:, None] * stride_c + offs[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s += tl.dot(zr, tl.trans(zc), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return s


@triton.jit
def _lse_kernel(ZR, ZC, PART_M, PART_L, ALPHA, n_rows, n_cols, dim, row_offset, rows_per_rank, batch,
                cols_per_split, stride_r, stride_c,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKED: tl.constexpr,
                FIXED_SHIFT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Partial ``(m, l)`` (log2 units) of each row over one column split; masked entries never enter a max."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    alpha = tl.load(ALPHA)                      # log2(e)/T as a 0-d tensor: exact in fp64 too
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    d_ok = offs_d < dim
    # one D chunk: the row tile stays resident (CHUNKED: unused; _chunked_logits streams the chunks)
    zr = tl.load(ZR + rows[:, None] * stride_r + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    img_r = _image_of(row_offset + rows, rows_per_rank, batch)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, n_cols)
    # m starts at the lower bound -alpha of alpha * s (|s| <= 1), so it is never -inf and never NaN-producing.
    m = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) - alpha
    l = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_end
        if CHUNKED:
            s = _chunked_logits(ZR, ZC, rows, cols, row_ok, col_ok, dim, stride_r, stride_c, BLOCK_M, BLOCK_N,
                                BLOCK_K, INPUT_PRECISION, ACC_DTYPE)
        else:
            zc = tl.load(ZC + cols[:, None] * stride_c + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                         other=0.0)
            s = tl.dot(zr, tl.trans(zc), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        valid = col_ok[None, :] & (img_r[:, None] != _image_of(cols, rows_per_rank, batch)[None, :])
        if FIXED_SHIFT:
            l += tl.sum(tl.where(valid, tl.exp2(alpha * s - alpha), 0.0), 1)
        else:
            x = tl.where(valid, alpha * s, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
            m = m_new
    out = pid_s * n_rows + rows
    tl.store(PART_M + out, m, mask=row_ok)
    tl.store(PART_L + out, l, mask=row_ok)


@triton.jit
def _grad_kernel(ZR, ZC, ROW_A, ROW_B, COL_A, COL_B, PART, ALPHA, n_rows, n_cols, dim, row_offset,
                 rows_per_rank, batch, cols_per_split, stride_r, stride_c,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                 CHUNKED: tl.constexpr, FIXED_SHIFT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """Partial ``sum_j K_kj z_j[d-chunk]`` of each row over one column split (symmetric row + column coefficient).

    Grid ``(row tiles, splits, output chunks)``: program ``(i, s, c)`` owns output columns ``[c BLOCK_O, (c+1)
    BLOCK_O)`` and recomputes its logits over all of D (``_chunked_logits``), so the accumulator is ``[BLOCK_M,
    BLOCK_O]`` whatever D is. One chunk (not ``CHUNKED``, ``BLOCK_O = BLOCK_K``): the column tile loaded for the
    logits is the GEMM operand, as before.
    FIXED_SHIFT: ``K = exp2(alpha*(s-1)) * (ROW_A[k] + COL_A[j])``; otherwise
    ``K = ROW_A[k] * exp2(alpha*s - ROW_B[k]) + COL_A[j] * exp2(alpha*s - COL_B[j])`` (``*_B`` = lse in log2).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    alpha = tl.load(ALPHA)                      # log2(e)/T as a 0-d tensor: exact in fp64 too
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    d_ok = offs_d < dim
    if CHUNKED:                                 # this program's output chunk
        offs_o = pid_d * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = offs_o < dim
    else:
        offs_o = offs_d
        o_ok = d_ok
    zr = tl.load(ZR + rows[:, None] * stride_r + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    img_r = _image_of(row_offset + rows, rows_per_rank, batch)
    ra = tl.load(ROW_A + rows, mask=row_ok, other=0.0)
    rb = tl.load(ROW_B + rows, mask=row_ok, other=0.0)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, n_cols)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=ACC_DTYPE)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c_end
        # zo: the columns' output chunk, the GEMM operand below (one chunk: the tile the logits were computed from)
        if CHUNKED:
            s = _chunked_logits(ZR, ZC, rows, cols, row_ok, col_ok, dim, stride_r, stride_c, BLOCK_M, BLOCK_N,
                                BLOCK_K, INPUT_PRECISION, ACC_DTYPE)
            zo = tl.load(ZC + cols[:, None] * stride_c + offs_o[None, :], mask=col_ok[:, None] & o_ok[None, :],
                         other=0.0)
        else:
            zo = tl.load(ZC + cols[:, None] * stride_c + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                         other=0.0)
            s = tl.dot(zr, tl.trans(zo), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ca = tl.load(COL_A + cols, mask=col_ok, other=0.0)
        valid = col_ok[None, :] & (img_r[:, None] != _image_of(cols, rows_per_rank, batch)[None, :])
        if FIXED_SHIFT:
            k = tl.exp2(alpha * s - alpha) * (ra[:, None] + ca[None, :])
        else:
            cb = tl.load(COL_B + cols, mask=col_ok, other=0.0)
            x = alpha * s
            k = ra[:, None] * tl.exp2(x - rb[:, None]) + ca[None, :] * tl.exp2(x - cb[None, :])
        k = tl.where(valid, k, 0.0)
        acc += tl.dot(k.to(zo.dtype), zo, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    out = (pid_s * n_rows + rows)[:, None] * dim + offs_o[None, :]
    tl.store(PART + out, acc, mask=row_ok[:, None] & o_ok[None, :])


# Under TRITON_INTERPRET=1, @triton.jit yields eager-only interpreted kernels that cannot be traced inside a
# triton_op; register the two kernel ops as opaque custom ops with explicit fake kernels there instead.
INTERPRET = type(_lse_kernel).__name__ == "InterpretedFunction"


def _kernel_op(name: str):
    if INTERPRET:
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


# --------------------------------------------------------------------------------------- launch helpers
def _chunks(dim: int) -> Tuple[int, int]:
    """``(BLOCK_K, BLOCK_O)``: the D chunk of the logits' ``tl.dot``s and the backward's output chunk.

    D <= MAX_BLOCK_K: one chunk, ``next_pow2(D)`` wide (at least 16, ``tl.dot``'s minimum). Wider: logits in
    ``MAX_BLOCK_K // 2``-wide chunks, gradient in ``MAX_BLOCK_K``-wide output chunks (the backward recomputes the
    logits once per output chunk, so these are twice as wide as the reduction chunks).
    """
    block = max(16, triton.next_power_of_2(dim))
    return (block, block) if block <= MAX_BLOCK_K else (MAX_BLOCK_K // 2, MAX_BLOCK_K)


def _launch_config(z_rows: torch.Tensor, n_cols: int, splits: int,
                   d_tiles: int = 1) -> Tuple[int, int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_O, splits, num_warps, num_stages)`` for the device (interpreter: small).

    ``BLOCK_K, BLOCK_O = _chunks(D)``: no tile grows with D. ``d_tiles``: programs per (row tile, split) along D
    (the backward's output chunks); the automatic split count divides the GPU among all of them.
    """
    L, D = z_rows.shape
    block_k, block_o = _chunks(D)
    if z_rows.device.type == "cuda":
        # fp32 operands in one D chunk: 64x64 tiles keep zr + 2 stages of zc + the K tile well inside shared
        # memory on H100/H200 (and A100). Several chunks: the row and column chunks stream per tile; 8 warps hold
        # the [64, 128] accumulator and the 64-wide chunks without spilling (ptxas for sm_90a, tf32 and ieee:
        # <= 199 registers per thread, no spill stores, <= 48 KiB shared memory). fp64: one stage.
        block_m, block_n, warps, stages = 64, 64, 4, 2
        if D > block_k:
            block_m, block_n, warps, stages = 64, 32, 8, 2
        if z_rows.element_size() > 4:
            block_m, block_n, warps, stages = 64, 32, warps, 1
    else:
        block_m, block_n, warps, stages = 32, 32, 4, 1
    col_tiles = triton.cdiv(n_cols, block_n)
    if splits <= 0:  # fill the GPU: about 2 programs per SM (brief 6.6); CPU interpreter: 2 (exercises merges)
        if z_rows.device.type == "cuda":
            sms = torch.cuda.get_device_properties(z_rows.device).multi_processor_count
            splits = triton.cdiv(2 * sms, triton.cdiv(L, block_m) * d_tiles)
        else:
            splits = 2
    splits = max(1, min(splits, col_tiles))
    return block_m, block_n, block_k, block_o, splits, warps, stages


def _alpha(temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((1,), LOG2E / temperature, dtype=dtype, device=device)


def _acc_torch_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _acc_dtype(z: torch.Tensor):
    return tl.float64 if z.dtype == torch.float64 else tl.float32


def _precision(z: torch.Tensor, input_precision: str) -> str:
    return input_precision if z.dtype == torch.float32 else "ieee"   # only fp32 operands have TF32 modes


@_kernel_op("scaleclr::infonce_lse")
def infonce_lse(z_rows: torch.Tensor, z_cols: torch.Tensor, row_offset: int, rows_per_rank: int, batch: int,
                temperature: float, input_precision: str, splits: int) -> torch.Tensor:
    """``lse[k] = log sum_{j: image(j) != image(row_offset + k)} exp(z_k . z_j / T)``; ``[L]`` fp32 (fp64 in).

    Args:
        z_rows: ``[L, D]`` this rank's normalised rows; z_cols: ``[N, D]`` all ranks' rows (rank-major).
        row_offset: global index of ``z_rows[0]`` (``rank * C * B``); rows_per_rank: ``C * B``; batch: ``B``.
        temperature: ``T``; input_precision: ``tl.dot`` mode for fp32; splits: column splits (<= 0: auto).
    """
    L, D = z_rows.shape
    N = z_cols.shape[0]
    acc = _acc_torch_dtype(z_rows)
    bm, bn, bk, _, splits, warps, stages = _launch_config(z_rows, N, splits)
    cols_per_split = triton.cdiv(triton.cdiv(N, splits), bn) * bn
    splits = triton.cdiv(N, cols_per_split)
    inv_t = 1.0 / temperature
    fixed = inv_t <= MAX_FIXED_SHIFT_INV_T
    part_m = torch.empty(splits, L, dtype=acc, device=z_rows.device)
    part_l = torch.empty(splits, L, dtype=acc, device=z_rows.device)
    wrap_triton(_lse_kernel)[(triton.cdiv(L, bm), splits)](
        z_rows, z_cols, part_m, part_l, _alpha(temperature, acc, z_rows.device), L, N, D, row_offset,
        rows_per_rank, batch, cols_per_split, z_rows.stride(0), z_cols.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, CHUNKED=D > bk, FIXED_SHIFT=fixed,
        INPUT_PRECISION=_precision(z_rows, input_precision), ACC_DTYPE=_acc_dtype(z_rows), num_warps=warps,
        num_stages=stages)
    if fixed:  # l is in units of e^{1/T}: plain fixed-order sum over splits
        return torch.log(part_l.sum(0)) + inv_t
    return torch.logsumexp((part_m + torch.log2(part_l)) * LN2, dim=0)


@_kernel_op("scaleclr::infonce_grad")
def infonce_grad(z_rows: torch.Tensor, z_cols: torch.Tensor, row_a: torch.Tensor, row_b: torch.Tensor,
                 col_a: torch.Tensor, col_b: torch.Tensor, row_offset: int, rows_per_rank: int, batch: int,
                 temperature: float, fixed_shift: bool, input_precision: str, splits: int) -> torch.Tensor:
    """``sum_j K_kj z_j`` over negatives (see ``_grad_kernel`` for ``K``); ``[L, D]`` fp32 (fp64 in)."""
    L, D = z_rows.shape
    N = z_cols.shape[0]
    acc = _acc_torch_dtype(z_rows)
    d_tiles = triton.cdiv(D, _chunks(D)[1])
    bm, bn, bk, bo, splits, warps, stages = _launch_config(z_rows, N, splits, d_tiles)
    cols_per_split = triton.cdiv(triton.cdiv(N, splits), bn) * bn
    splits = triton.cdiv(N, cols_per_split)
    part = torch.empty(splits, L, D, dtype=acc, device=z_rows.device)
    wrap_triton(_grad_kernel)[(triton.cdiv(L, bm), splits, d_tiles)](
        z_rows, z_cols, row_a, row_b, col_a, col_b, part, _alpha(temperature, acc, z_rows.device), L, N, D,
        row_offset, rows_per_rank, batch, cols_per_split, z_rows.stride(0), z_cols.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_O=bo, CHUNKED=D > bk, FIXED_SHIFT=fixed_shift,
        INPUT_PRECISION=_precision(z_rows, input_precision), ACC_DTYPE=_acc_dtype(z_rows), num_warps=warps,
        num_stages=stages)
    return part.sum(0)


if INTERPRET:  # triton_op derives its fake kernel by tracing the body; custom_op needs them spelled out
    @infonce_lse.register_fake
    def _(z_rows, z_cols, row_offset, rows_per_rank, batch, temperature, input_precision, splits):
        return z_rows.new_empty(z_rows.shape[0], dtype=_acc_torch_dtype(z_rows))

    @infonce_grad.register_fake
    def _(z_rows, z_cols, row_a, row_b, col_a, col_b, row_offset, rows_per_rank, batch, temperature, fixed_shift,
          input_precision, splits):
        return z_rows.new_empty(z_rows.shape, dtype=_acc_torch_dtype(z_rows))


# ------------------------------------------------------------------------------------ loss op + autograd
def _round_tf32(z: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10-bit mantissa, round to nearest) so positives match the kernel's logits."""
    bits = z.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _positive_logits(z_local: torch.Tensor, num_crops: int, temperature: float, input_precision: str):
    L = z_local.shape[0]
    zq = _round_tf32(z_local) if z_local.dtype == torch.float32 and input_precision != "ieee" else z_local
    pos, _ = pair_columns(num_crops, L // num_crops, 0, z_local.device)
    return torch.einsum("kd,kpd->kp", zq, zq[pos]) / temperature


@torch.library.custom_op("scaleclr::infonce_triton_loss", mutates_args=())
def infonce_triton_loss(z_local: torch.Tensor, z_all: torch.Tensor, rank: int, world: int, num_crops: int,
                        temperature: float, input_precision: str, splits: int,
                        group_name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, w)``: mean over this rank's pairs, per-row negative log-sum-exp ``[L]``, positive weights
    ``w = sigmoid(lse - x_pos)`` ``[L, C-1]``. ``z_all`` is the gathered (no-grad) ``[W*L, D]`` buffer."""
    L = z_local.shape[0]
    lse = infonce_lse(z_local.contiguous(), z_all.contiguous(), rank * L, L, L // num_crops, temperature,
                      input_precision, splits)
    x_pos = _positive_logits(z_local, num_crops, temperature, input_precision)
    loss = F.softplus(lse[:, None] - x_pos, threshold=40.0).sum() / x_pos.numel()
    return loss, lse, torch.sigmoid(lse[:, None] - x_pos)


@infonce_triton_loss.register_fake
def _(z_local, z_all, rank, world, num_crops, temperature, input_precision, splits, group_name):
    L = z_local.shape[0]
    return (z_local.new_empty(()), z_local.new_empty(L), z_local.new_empty(L, num_crops - 1))


def _setup_context(ctx, inputs, output):
    z_local, z_all, rank, world, num_crops, temperature, input_precision, splits, group_name = inputs
    _, lse, w = output
    ctx.save_for_backward(z_local, z_all, lse, w)
    ctx.args = (rank, world, num_crops, temperature, input_precision, splits, group_name)


def _resolve_group(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def _backward(ctx, g_loss, g_lse, g_w):
    z_local, z_all, lse, w = ctx.saved_tensors
    rank, world, C, temperature, input_precision, splits, group_name = ctx.args
    L, inv_t = z_local.shape[0], 1.0 / temperature
    n_pairs = w.numel()
    g = g_loss.to(lse.dtype).reshape(1).expand(L)
    q = w.sum(1)
    stats = torch.stack([lse, q, g], dim=1)                                        # [L, 3]
    if world > 1:
        stats = all_gather_rows(stats, _resolve_group(group_name))                 # [N, 3], no N x D traffic
    lse_c, q_c, g_c = stats.unbind(1)
    # Scale out the largest upstream gradient so the kernel coefficients stay O(C) whatever g (AMP) is.
    g_scale = g_c.abs().amax().clamp_min(torch.finfo(lse.dtype).tiny)
    a_r, a_c = q * (g / g_scale), q_c * (g_c / g_scale)
    fixed = inv_t <= MAX_FIXED_SHIFT_INV_T
    if fixed:
        row_a, row_b = a_r * torch.exp(inv_t - lse), lse
        col_a, col_b = a_c * torch.exp(inv_t - lse_c), lse_c
    else:
        row_a, row_b, col_a, col_b = a_r, lse * LOG2E, a_c, lse_c * LOG2E
    acc = infonce_grad(z_local.contiguous(), z_all.contiguous(), row_a.contiguous(), row_b.contiguous(),
                       col_a.contiguous(), col_b.contiguous(), rank * L, L, L // C, temperature, fixed,
                       input_precision, splits)
    acc = acc * (g_scale / n_pairs)
    p_rows, t_cols = transpose_shift(C, L // C, z_local.device)
    w_sym = w + w[p_rows, t_cols[None, :]]
    acc = acc - torch.einsum("kp,kpd->kd", w_sym, z_local[p_rows]) * (g[0] / n_pairs)
    return acc * inv_t, None, None, None, None, None, None, None, None


infonce_triton_loss.register_autograd(_backward, setup_context=_setup_context)


def default_input_precision() -> str:
    """``"ieee"`` when ``torch.get_float32_matmul_precision() == "highest"``, else ``"tf32"`` (PyTorch's switch)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def info_nce_triton(z_local: torch.Tensor, *, temperature: float, num_crops: int, negatives: str = "global",
                    group=None, input_precision: Optional[str] = None, splits: int = 0) -> torch.Tensor:
    """Fused-kernel InfoNCE on this rank's normalised rows (all-gathers across ``group`` for global negatives).

    Args:
        z_local: ``[C*B, D]`` normalised rows (crop-major), fp32/fp64 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        temperature: ``T > 0``; num_crops: ``C``; negatives: ``"global"`` or ``"local"``.
        group: process group (``None``: default group).
        input_precision: ``tl.dot`` mode for fp32 operands (``"ieee" | "tf32" | "tf32x3"``; ``None``: follow
            ``torch.get_float32_matmul_precision()``).
        splits: column splits per row tile (``0``: enough programs to fill the GPU).

    Returns:
        0-d tensor: mean over this rank's ``C*(C-1)*B`` pairs (same contract as the reference).
    """
    if z_local.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"info_nce_triton takes normalised fp32/fp64 rows, got {z_local.dtype}")
    input_precision = input_precision or default_input_precision()
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    rank, world = world_info(group) if negatives == "global" else (0, 1)
    z_all = all_gather_rows(z_local.detach().contiguous(), group) if world > 1 else z_local.detach()
    group_name = ""
    if world > 1:
        import torch.distributed as dist
        group_name = (group or dist.group.WORLD).group_name
    loss, _, _ = infonce_triton_loss(z_local, z_all, rank, world, num_crops, float(temperature), input_precision,
                                     int(splits), group_name)
    return loss
