"""Peak bytes per GPU for every engine x activation checkpointing, and the largest batch that fits.

Per row: the engine's own :meth:`~scaleclr.engines.base.Engine.memory_layout` (what it shards, replicates, keeps
in fp32) for the model states, plus the traced step (:mod:`scaleclr.planner.trace`) for everything a batch
costs. The step is traced at a few small batch sizes; every allocation of the step is the same operator at
every batch, and each tensor's size is a polynomial of degree <= 2 in the batch (activations are linear, the
reference loss's ``N x W*N`` logits quadratic), so each timeline point is fitted exactly by a line (two
traces: streaming loss) or a parabola (three traces: reference loss) and the peak at any batch, and the largest
batch that fits (a bisection), need no further trace.

Peak of a row (bytes per rank)::

    forward/backward: params + optimizer + buffers + held gradients
                      + max(forward peak + gathered_forward,
                            max_t (activations(t) + backward_grads x gradients(t) + gathered_backward(t)))
                      + workspace
    optimizer step:   params + optimizer + buffers + gradients + step temporaries x step_share
    peak = max of both, the batch-dependent part x ``overhead`` (``scaleclr.planner.rows``: 1 on CPU and CUDA)

``overhead`` is for what a live-tensor count does not see (allocator rounding, convolution scratch, storages
freed a little later than their last use); ``benchmarks/plan_accuracy.py`` compares the prediction with the
anonymous memory of real CPU steps (``benchmarks/RESULTS.md``), ``benchmarks/gpu_check.py`` with
``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from scaleclr.engines.base import MemoryLayout
from scaleclr.planner.trace import StepTrace

__all__ = ["ScaledTrace", "row_bytes", "max_batch", "TRACE_BATCHES"]

#: batches traced: a parabola through three (the reference loss's logits), a line through two (linear steps)
TRACE_BATCHES = {2: (2, 4), 3: (2, 3, 4)}


def _quad(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float, float]:
    """Coefficients ``(c0, c1, c2)`` of the parabola through three points (Lagrange), or of the line through
    two (``c2 = 0``)."""
    if len(xs) == 2:
        (x0, x1), (y0, y1) = xs, ys
        c1 = (y1 - y0) / (x1 - x0)
        return y0 - c1 * x0, c1, 0.0
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    c2 = y0 / d0 + y1 / d1 + y2 / d2
    c1 = -(y0 * (x1 + x2) / d0 + y1 * (x0 + x2) / d1 + y2 * (x0 + x1) / d2)
    c0 = y0 * x1 * x2 / d0 + y1 * x0 * x2 / d1 + y2 * x0 * x1 / d2
    return c0, c1, c2


@dataclass
class ScaledTrace:
    """Traces of the same step at ``batches`` (two or three), evaluated at any batch; ``step_transient``: the
    optimizer step's temporaries (:func:`~scaleclr.planner.trace.trace_optimizer_step`)."""

    traces: List[StepTrace]
    batches: Tuple[int, ...]
    step_transient: int = 0

    def __post_init__(self):
        lengths = {len(t.points) for t in self.traces}
        if len(lengths) != 1:
            raise ValueError(f"the traced steps differ between batches {self.batches} ({sorted(lengths)} "
                             "allocations): the step's operators depend on the batch size")
        f = lambda ys: _quad(self.batches, ys)  # noqa: E731
        self._act = [f(col) for col in zip(*[[a for a, _, _ in t.points] for t in self.traces])]
        self._grad = [g for _, g, _ in self.traces[-1].points]
        self._unit = [u for _, _, u in self.traces[-1].points]
        self._arrived = [g // 4 for g in self._grad]  # parameters whose (fp32) gradients exist
        self._saved = f([t.saved for t in self.traces])
        self._loss = f([t.loss_saved for t in self.traces])
        self._fwd = f([t.forward_peak for t in self.traces])
        self._largest = f([t.largest for t in self.traces])
        self.grad_bytes = self.traces[-1].grad_bytes

    @staticmethod
    def _at(c, b: float) -> float:
        return c[0] + c[1] * b + c[2] * b * b

    def saved(self, b: int) -> int:
        return int(self._at(self._saved, b))

    def loss_saved(self, b: int) -> int:
        return int(self._at(self._loss, b))

    def largest(self, b: int) -> int:
        return int(self._at(self._largest, b))

    def peak(self, b: int, layout: MemoryLayout) -> Tuple[int, int, int]:
        """The largest ``activations + gathered + backward_grads x gradients`` over forward and backward under
        ``layout``, as ``(activations and temporaries, gradients, gathered)`` at that moment. Gathered: in
        forward ``gathered_forward`` (default ``gathered``); in backward ``gathered_backward`` per point where
        the layout gives it, else ``gathered``."""
        held = layout.gathered if layout.gathered_forward is None else layout.gathered_forward
        act = self._at(self._fwd, b)
        best, top = (act, 0.0, held), act + held
        by_point = ([layout.gathered] * len(self._grad) if layout.gathered_backward is None
                    else layout.gathered_backward(self._unit, self._arrived))
        for c, g, held in zip(self._act, self._grad, by_point):
            act, grads = self._at(c, b), layout.backward_grads * g
            if act + grads + held > top:
                best, top = (act, grads, held), act + grads + held
        return tuple(int(x) for x in best)


def row_bytes(layout: MemoryLayout, trace: ScaledTrace, b: int, *, workspace: Callable[[int], int],
              overhead: float) -> Dict[str, int]:
    """The peak and its split for one engine at ``b`` images per rank.

    Returns:
        ``params``, ``grads`` (held at the peak), ``optimizer``, ``buffers``, ``activations`` (saved for
        backward, input views included), ``loss`` (the loss's saved buffers), ``transient`` (the rest: backward
        temporaries, gathered units, workspace, allocator overhead; negative when part of the saved activations
        was freed before the peak), ``peak``.
    """
    held_grads = max(0, layout.grads - int(layout.backward_grads * trace.grad_bytes))
    states = layout.params + layout.optimizer + layout.buffers
    dyn, grads_at_peak, gathered = trace.peak(b, layout)
    dyn += workspace(b)  # activations and temporaries at the peak
    fwd_bwd = states + held_grads + grads_at_peak + gathered + int(overhead * dyn)
    step = states + layout.grads + int(trace.step_transient * layout.step_share)
    saved, loss = trace.saved(b), trace.loss_saved(b)
    if fwd_bwd >= step:
        peak, grads = fwd_bwd, held_grads + grads_at_peak
    else:
        peak, grads, saved, loss = step, layout.grads, 0, 0
    out = dict(params=layout.params, grads=grads, optimizer=layout.optimizer, buffers=layout.buffers,
               activations=saved - loss, loss=loss)
    out["transient"] = peak - sum(out.values())
    out["peak"] = peak
    return out


def max_batch(fits: Callable[[int], bool], upper: int = 1 << 20) -> int:
    """Largest ``b >= 1`` with ``fits(b)`` (0 if none), for a monotone ``fits``."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    if hi > upper:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
