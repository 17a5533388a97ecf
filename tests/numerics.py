"""Tolerances for comparing training runs, derived from the dtype and the length of the computation.

Why this module exists: two runs of the same training that only add numbers in another order (another engine,
another number of processes) do not stay equal to rounding. Where a ReLU input lies within rounding of zero one run
can take the other branch; that one flip changes whole gradients by ~1e-3..1e-2 relative, and clipping or a few
SGD steps carry it on (the history of tests/test_deepspeed_engine.py: a 1.4e-4 loss difference at step 3 between
ZeRO-2 and DDP, from a 7.8e-7 difference in one clip norm). Which side of the kink a run lands on depends on the
CPU's kernels. So a comparison claims, in order of strength:

1. *exact* where the same operations run on the same values (asserted with ``==`` / ``torch.equal``);
2. *rounding-close* at step 1 (``check_step1``): every engine starts from the same weights and images, so its step-1
   loss is the same forward and its step-1 update differs only by the rounding of the norms it takes (LARC trust
   ratios, the clip norm); ``loss_floor`` / ``step1_update_tol`` derive the limits from the dtype and the
   reduction length. Runs on another number of processes already round the step-1 forward differently: their
   step-1 update is only within ``relu_flip_bound``;
3. *as close as the reference engine is to itself* at later steps (``check_noise``): the engine's distance to DDP
   (2 processes x 4 images) at step s within NOISE_FACTOR times the distance of two DDP runs that differ only in
   reduction order (DDP 1 process x 8 images vs DDP 2 x 4, the same global batch: ``noise_run``), or within the
   rounding floor when that noise sample happens to be tiny.

Negative controls must exceed these limits by NEGATIVE_MARGIN (``assert_fails``).

API (tests/test_deepspeed_engine.py, tests/test_fsdp_engine.py, tests/test_train.py, tests/test_slurm.py, and
tests/test_engine_precision.py may use it)
-----------------------------------------------------------------------------------------------------------------
Precision:
    ``eps(dtype)``: spacing of the floats at 1.0 (``torch.finfo``): fp32 2^-23 = 1.19e-7, bf16 2^-7 = 7.8e-3, fp16
    2^-10 = 9.8e-4; two values rounded to neighbouring floats are <= ``eps * |x|`` apart.
    ``unit_roundoff(dtype)`` = eps / 2, the relative error of one rounding (fp32 6.0e-8, bf16 3.9e-3).
    ``sum_rel_err(n, dtype)``: error estimate of an n-term sum of same-sign terms (a squared norm), sqrt(n) u.
Limits:
    ``loss_floor(loss, step=1, forward_dtype=fp32)``: |L_a - L_b| of two runs at ``step`` that differ only in
    reduction order (no flip): (2 step - 1) * 400 u_fp32 (+ u * |loss| for a bf16/fp16 forward).
    ``step1_update_tol(dtype=fp32)``: the step-1 limit of ``update_error`` for an engine vs DDP: 1e-3 (fp32),
    + 4 u(dtype) for bf16/fp16. ``relu_flip_bound()``: the step-1 limit for 1 vs N processes (0.25).
    Constants: STEP1_UPDATE_TOL, UPDATE_NOISE_FLOOR, NOISE_FACTOR, NEGATIVE_MARGIN (each derived where defined).
Metric (state dicts name -> tensor, e.g. ``engine.full_state_dict()``):
    ``update_error(got, ref, init, steps, dtype=fp32) -> Err(value, name)``: the worst tensor's floored update error
    ``max(0, ||got - ref|| - steps * eps * ||ref||) / ||ref - init||`` over every floating tensor (parameters and
    BN buffers); non-float tensors (num_batches_tracked) must be equal, else inf.
Checks (lists of :class:`Check`: ``label``, ``what``, ``value``, ``limit``, ``why``, ``ok``, ``ratio``):
    ``check_step1(got, ref, label, init=None, dtype=fp32)``: step-1 loss and state.
    ``check_noise(got, ref, noise, label, init=None, dtype=fp32)``: losses of steps 2.. and the last state,
    against ``noise`` (the DDP 1 x 8 Run for the same overrides) vs ``ref`` (DDP 2 x 4).
    ``check_all(got, ref, noise, label, dtype=fp32)`` = both. ``assert_ok(checks)``; ``assert_fails(checks,
    margin=NEGATIVE_MARGIN)`` for negative controls (the worst check must exceed its limit ``margin`` times).
Runs (dicts ``{"losses": [rank-averaged loss per step], "states": {step: full fp32 state (rank 0) or None},
"init": state before step 1 or None, "seconds": wall time, "clip_norms": DDP's clip norms if clipping}``):
    ``base_overrides(world, out_dir, extra=())``: the shared config: quick synthetic (ResNet-18, SyncBN, LARC, 32 px),
    ``global_batch(extra)`` images per step (8; 4 for bf16/fp16), one epoch of STEPS = 3 steps.
    Shared overrides: LARC, SGD, OPTIONS (LARC clip mode, exclude_bias_and_norm, gradient clipping), BF16, FP16, DDP.
    ``train_case(rank, world, out_dir, extra, save=False, prepare=None, init=False) -> (run, trainer)``: one
    recorded Trainer run on this rank (collective: every rank of the process group calls it).
    ``record(trainer, state_steps=(1,), init=False)`` + ``finish(run, trainer)``: the recording itself;
    ``snapshot(trainer)``: a copied ``full_state_dict()``.
    ``noise_run(extra)``: DDP, 1 process, the same overrides, trained in this (pytest) process on one thread;
    cached for the session.
    ``missing_references()``, ``store_references(runs)``, ``reference(name)``: the DDP 2 x 4 runs of
    SHARED_REFERENCES, trained by whichever engine file runs first.
Margins: every asserted Check is appended to the JSON-lines file ``$SCALECLR_MARGINS`` when that is set
(``python tests/numerics.py FILE`` prints them as a table).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

QUICK = "config=test/integration_test/quick_simclr_synthetic"
GLOBAL_BATCH = 8
# bf16/fp16 runs: on CPUs without native bf16/fp16 convolutions (AVX2) torch falls back to its slow im2col
# kernels (~1 s per image and step), so they train half the batch, for 2 of the epoch's 3 steps: step 1 is the
# tight check, step 2 the noise-referenced one.
LOW_PRECISION_BATCH = 4
LOW_PRECISION_STEPS = ["config.TRAINER.MAX_ITERATIONS=2"]
# One epoch of STEPS steps (DATA_LIMIT = global batch x STEPS); the cosine LR ends with the epoch.
STEPS = 3

# ------------------------------------------------------------------------------------------- precision


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Spacing of ``dtype``'s floats at 1.0: neighbouring floats near ``x`` are <= ``eps * |x|`` apart."""
    return float(torch.finfo(dtype).eps)


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """Relative error of one round-to-nearest: ``|fl(x) - x| <= u |x|``, ``u = eps / 2``."""
    return eps(dtype) / 2


def sum_rel_err(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error estimate of an ``n``-term sum of same-sign terms (a squared norm) in ``dtype``: the
    rounding errors of the partial sums, each <= u relative, add like a random walk, ``sqrt(n) * u``. (The
    worst case, ``n * u``, is not informative for the millions of terms of a gradient norm; blocked or pairwise
    summation, which torch uses, stays below the random-walk value.)"""
    return math.sqrt(n) * unit_roundoff(dtype)


# Parameters of the quick config's SimCLRModel (ResNet-18 trunk 11.2M + MLP heads 0.33M): the longest reduction
# an update depends on (the global gradient-clipping norm).
NUM_PARAMS = 11_500_000

# Step 1, fp32 engine vs DDP, same weights and data: the update differs only through the norms (LARC trust
# ratios, the clip coefficient), summed in another order (whole tensors vs fragments, fp32 vs fp64 partial sums).
# Relative error of a norm over up to NUM_PARAMS terms: sum_rel_err(NUM_PARAMS) / 2 (the square root halves it)
# = 1.0e-4; a trust ratio ||p|| / ||g|| carries two of them: 2e-4. Limit 5x that: 1e-3. (Measured: <= 1e-6.)
STEP1_UPDATE_TOL = 1e-3
# Later steps: the floor of the noise-referenced limit. An engine may always differ from DDP as much as at step 1.
UPDATE_NOISE_FLOOR = STEP1_UPDATE_TOL
# One sample of the reduction-order noise (DDP 1 x 8 vs DDP 2 x 4) varies by orders of magnitude from run to
# run (it depends on whether and where a ReLU flips); the engine pair is another sample. 4x lets the engine's
# sample be 4 times the reference's; below that an engine error cannot be told from noise in 3 steps.
NOISE_FACTOR = 4.0
# Negative controls: their smallest violation must be this many times the limit (so a control that fails by
# luck, near the limit, is reported instead of counted as a pass).
NEGATIVE_MARGIN = 10.0
# Depth of the forward's dependency chain in the quick config (ResNet-18: 17 conv + 1 pool + 2 head layers,
# each followed by BN) and the InfoNCE logit scale 1 / temperature (0.1): see loss_floor.
FORWARD_DEPTH = 20
INV_TEMPERATURE = 10.0


def relu_flip_bound(global_batch: int = GLOBAL_BATCH, views: int = 2, positions: int = 1) -> float:
    """Limit of ``update_error`` at step 1 between runs on different numbers of processes (1 x 8 vs 2 x 4): their
    forwards already round differently, so a ReLU input within rounding of zero can take the other branch in
    one of them (measured over 6 seeds: 1 in 3 pairs), and the backward follows another mask. One flipped
    input changes one of the P = images x views x positions terms a weight gradient sums, ~1/sqrt(P) of the sum,
    and LARC passes it on as a change of that tensor's update direction. The fewest terms: layer4 and the heads
    (1 x 1 positions at 32 px), P = 8 x 2 = 16: 0.25 per flip. (Measured: <= 2.6e-2 with a flip, ~1e-5
    without; gradient-averaging, LR or statistics bugs move tensors by O(1) of their update.)"""
    return 1.0 / math.sqrt(global_batch * views * positions)


def step1_update_tol(dtype: torch.dtype = torch.float32) -> float:
    """The step-1 limit of ``update_error`` for a forward/backward in ``dtype`` (fp32 master weights throughout):
    STEP1_UPDATE_TOL, plus for bf16/fp16 that one engine may round the reduced gradient to ``dtype`` where the
    other keeps it in fp32 (<= u of every element, so <= u of the tensor's update in L2) and takes the LARC
    trust ratio from that gradient's norm (<= u more): 2u, limit 2x that, 4u (bf16 1.6e-2, fp16 2.0e-3)."""
    return STEP1_UPDATE_TOL + (0.0 if dtype == torch.float32 else 4 * unit_roundoff(dtype))


def loss_floor(loss: float, step: int = 1, forward_dtype: torch.dtype = torch.float32) -> float:
    """Rounding bound on ``|L_a - L_b|`` at ``step`` for two runs of the quick config that differ only in
    reduction order and whose weights differ at most by ``update_error``'s floor (no ReLU flip).

    fp32 (the loss and the master weights): one forward rounds every layer's outputs with a relative error ~u;
    BN renormalises each layer, so over the FORWARD_DEPTH layers the errors add, and the embeddings are off by
    <= FORWARD_DEPTH * u relative; the logits (cosine / temperature) by INV_TEMPERATURE times that, absolute; the
    loss (log-softmax: 1-Lipschitz in the logits, which enter twice, as anchor and as positive) by
    2 * INV_TEMPERATURE * FORWARD_DEPTH * u = 400 u = 2.4e-5. Weights that differ element-wise by the update
    floor (s - 1) * eps = 2 (s - 1) u perturb every layer like that rounding, 2 (s - 1) times over: in all
    (2s - 1) * 400 u. (A worst case: the measured step-1 difference of DDP 1 x 8 and 2 x 4 is ~1/60 of it.)
    bf16/fp16 forward: plus one rounding of the loss at that precision, u * |L| (bf16: 1.1e-2 at L = 2.8): two
    low-precision forwards cannot be compared below that (measured at step 1: ~1 u |L|)."""
    fp32 = (2 * step - 1) * 2 * INV_TEMPERATURE * FORWARD_DEPTH * unit_roundoff(torch.float32)
    low = 0.0 if forward_dtype == torch.float32 else unit_roundoff(forward_dtype) * abs(loss)
    return fp32 + low


# -------------------------------------------------------------------------------------------- metrics


@dataclass
class Err:
    value: float
    name: Optional[str]


def update_error(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor],
                 steps: int, dtype: torch.dtype = torch.float32) -> Err:
    """Worst tensor's floored update error: ``max(0, ||got_k - ref_k|| - steps * eps * ||ref_k||) /
    ||ref_k - init_k||`` (L2 norms, fp64).

    The floor: every step rounds each stored ``dtype`` value (weights, BN running statistics) once, and two runs
    whose exact values agree far below an ulp can still round an element to neighbouring floats, <= eps * |x|
    apart; over ``steps`` steps <= steps * eps * |x| element-wise, so <= steps * eps * ||ref_k|| per tensor.
    That removes the 1-ulp differences of weights whose whole update is a few ulps (|p| ~ 1, update 1e-4: one
    ulp is 1e-3 of it). A tensor that did not move (``ref == init``) must not move by more than the floor
    (else inf). Non-float tensors (num_batches_tracked) must be equal, else inf. ``dtype``: the precision of
    the stored (master) values, fp32 for every engine here (bf16 runs keep fp32 masters and BN statistics).
    """
    assert got.keys() == ref.keys() == init.keys(), (set(got) ^ set(ref), set(ref) ^ set(init))
    worst = Err(0.0, None)
    for k, r in ref.items():
        g, i = got[k], init[k]
        if not r.is_floating_point():
            if not torch.equal(g, r):
                return Err(math.inf, k)
            continue
        r64, g64, i64 = r.double(), g.double(), i.double()
        excess = max(0.0, float((g64 - r64).norm()) - steps * eps(dtype) * float(r64.norm()))
        upd = float((r64 - i64).norm())
        value = 0.0 if excess == 0 else (excess / upd if upd > 0 else math.inf)
        if value > worst.value:
            worst = Err(value, k)
    return worst


# --------------------------------------------------------------------------------------------- checks


@dataclass
class Check:
    """One comparison: ``value`` must be <= ``limit`` (``why`` says where the limit comes from)."""
    label: str
    what: str
    value: float
    limit: float
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.limit

    @property
    def ratio(self) -> float:
        """value / limit: <= 1 passes; a negative control must reach NEGATIVE_MARGIN."""
        return self.value / self.limit if self.limit > 0 else math.inf

    def __str__(self):
        return f"{self.label}: {self.what} = {self.value:.3g} vs limit {self.limit:.3g} ({self.why})"


def _init_of(*runs: dict) -> Dict[str, torch.Tensor]:
    for r in runs:
        if r.get("init") is not None:
            return r["init"]
    raise ValueError("no run carries the initial state (noise_run records it)")


def check_step1(got: dict, ref: dict, label: str, init: Optional[Dict[str, torch.Tensor]] = None,
                dtype: torch.dtype = torch.float32) -> List[Check]:
    """Step 1 of ``got`` against ``ref`` (same weights, same images): the loss within ``loss_floor`` and the
    state after step 1 within ``step1_update_tol(dtype)`` of the update (``update_error``, steps=1). ``dtype``:
    the precision of the forward/backward. ``init``: the initial state (default: carried by either run)."""
    init = init if init is not None else _init_of(ref, got)
    loss = ref["losses"][0]
    out = [Check(label, "step-1 loss |diff|", abs(got["losses"][0] - loss), loss_floor(loss, 1, dtype),
                 "same forward: rounding floor")]
    err = update_error(got["states"][1], ref["states"][1], init, 1)
    out.append(Check(label, f"step-1 update error ({err.name})", err.value, step1_update_tol(dtype),
                     "same gradients: norm rounding"))
    return out


def check_noise(got: dict, ref: dict, noise: dict, label: str, init: Optional[Dict[str, torch.Tensor]] = None,
                dtype: torch.dtype = torch.float32) -> List[Check]:
    """Steps 2.. of ``got`` against ``ref`` (DDP 2 x 4): every loss and the final state within NOISE_FACTOR
    times the same distance between ``noise`` (DDP 1 x 8, same overrides: ``noise_run``) and ``ref``, or within
    the rounding floor (``loss_floor``, ``UPDATE_NOISE_FLOOR``) when that is larger."""
    init = init if init is not None else _init_of(noise, ref, got)
    n = len(ref["losses"])
    assert len(got["losses"]) == len(noise["losses"]) == n, (got["losses"], noise["losses"], ref["losses"])
    out = []
    for s in range(2, n + 1):
        loss = ref["losses"][s - 1]
        sample, floor = abs(noise["losses"][s - 1] - loss), loss_floor(loss, s, dtype)
        out.append(Check(label, f"step-{s} loss |diff|", abs(got["losses"][s - 1] - loss),
                         max(NOISE_FACTOR * sample, floor), f"noise {sample:.2g}, floor {floor:.2g}"))
    sample = update_error(noise["states"][n], ref["states"][n], init, n)
    err = update_error(got["states"][n], ref["states"][n], init, n)
    out.append(Check(label, f"step-{n} update error ({err.name})", err.value,
                     max(NOISE_FACTOR * sample.value, UPDATE_NOISE_FLOOR),
                     f"noise {sample.value:.2g} ({sample.name}), floor {UPDATE_NOISE_FLOOR:g}"))
    return out


def check_all(got: dict, ref: dict, noise: dict, label: str, dtype: torch.dtype = torch.float32) -> List[Check]:
    """``check_step1`` + ``check_noise``: the whole comparison of an engine run with its DDP 2 x 4 reference."""
    return check_step1(got, ref, label, _init_of(noise, ref, got), dtype) + \
        check_noise(got, ref, noise, label, dtype=dtype)


def _log(checks: Iterable[Check], kind: str) -> None:
    path = os.environ.get("SCALECLR_MARGINS")
    if not path:
        return
    isa = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    with open(path, "a") as f:
        for c in checks:
            f.write(json.dumps({"isa": isa or "native", "kind": kind, "label": c.label, "what": c.what,
                                "value": c.value, "limit": c.limit, "why": c.why}) + "\n")


def assert_ok(checks: List[Check]) -> None:
    """Every check within its limit."""
    _log(checks, "pass")
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "\n".join(bad)


def assert_fails(checks: List[Check], margin: float = NEGATIVE_MARGIN) -> Check:
    """A negative control: its worst check exceeds the limit ``margin`` times. Returns that check."""
    _log(checks, "negative")
    worst = max(checks, key=lambda c: c.ratio)
    assert worst.ratio > margin, \
        f"negative control not caught by a {margin:g}x margin; worst: {worst}\n" + "\n".join(map(str, checks))
    return worst


# ----------------------------------------------------------------------------------------------- runs
# Overrides shared by the engine files (on top of base_overrides). The quick config trains with LARC (scale mode,
# trust coefficient 1e-3), SGD momentum 0.9, weight decay 1e-6, cosine LR from 0.15.
LARC: List[str] = []
SGD = ["config.OPTIMIZER.use_larc=False"]
# LARC clip mode, SimCLR's exclude_bias_and_norm groups (plain SGD with their own weight decay), BN weight decay,
# and gradient clipping well below the gradient norm (~180 at step 1), so clipping is active at every step.
OPTIONS = ["config.OPTIMIZER.larc_config.clip=True", "config.OPTIMIZER.larc_config.exclude_bias_and_norm=True",
           "config.OPTIMIZER.regularize_bn=True", "config.OPTIMIZER.weight_decay=0.0001",
           "config.OPTIMIZER.gradient_clipping=0.05"]
AMP = ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch"]
BF16 = AMP + ["config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"] + LOW_PRECISION_STEPS
FP16 = AMP + ["config.MODEL.AMP_PARAMS.AMP_DTYPE=float16", "config.TRAINER.MAX_ITERATIONS=1"]
DDP = ["config.DISTRIBUTED.ENGINE=ddp"]


def global_batch(extra: Sequence[str] = ()) -> int:
    """GLOBAL_BATCH, or LOW_PRECISION_BATCH when ``extra`` selects bf16/fp16 (AMP or FSDP mixed precision)."""
    low = any(o.split("=")[0].endswith(("AMP_DTYPE", "MIXED_PRECISION")) and o.endswith(("=bfloat16", "=float16"))
              for o in extra)
    return LOW_PRECISION_BATCH if low else GLOBAL_BATCH


def base_overrides(world: int, out_dir: str, extra: Sequence[str] = ()) -> List[str]:
    """The quick synthetic config (ResNet-18, SyncBN, LARC, 32 px crops) at ``global_batch(extra)`` images per
    step on ``world`` processes: one epoch of STEPS steps (the cosine LR ends with it), checkpoints in
    ``out_dir``, then ``extra``."""
    batch = global_batch(extra)
    return [QUICK, f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch // world}",
            f"config.DATA.TRAIN.DATA_LIMIT={batch * STEPS}", "config.OPTIMIZER.num_epochs=1",
            "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", f"config.CHECKPOINT.DIR={out_dir}", *extra]


def snapshot(trainer) -> Optional[Dict[str, torch.Tensor]]:
    """``trainer.engine.full_state_dict()`` (collective), copied: the DDP engine's is a view of the live model."""
    state = trainer.engine.full_state_dict()
    return None if state is None else {k: v.detach().clone() for k, v in state.items()}


def record(trainer, state_steps: Sequence[int] = (1,), init: bool = False) -> dict:
    """Make ``trainer.train_step`` record a Run: every step's loss averaged over ranks (what metrics.jsonl
    logs) and the full state after the steps in ``state_steps`` (and before the first step with ``init``).
    Collective: call it on every rank of the trainer. ``finish(run, trainer)`` adds the final state."""
    from scaleclr.distributed.collectives import all_reduce_sum

    run = {"losses": [], "states": {}, "init": None}
    step = trainer.train_step

    def recording(batch, data_time):
        if init and not run["losses"]:
            run["init"] = snapshot(trainer)
        loss = step(batch, data_time)
        run["losses"].append(float(all_reduce_sum(loss.detach().double())) / trainer.world_size)
        if trainer.state.step in state_steps:
            run["states"][trainer.state.step] = snapshot(trainer)
        return loss

    trainer.train_step = recording
    return run


def finish(run: dict, trainer) -> dict:
    """Add the final full state (collective) as ``states[last step]``."""
    run["states"][trainer.state.step] = snapshot(trainer)
    return run


def train_case(rank: int, world: int, out_dir: str, extra: Sequence[str] = (), save: bool = False,
               prepare=None, init: bool = False):
    """Build the Trainer for ``base_overrides(world, out_dir, extra)`` on this rank (what train.py's worker does),
    call ``prepare(trainer)`` if given, train with recording (``record``); without ``save`` no checkpoints are
    written. Returns ``(run, trainer)``."""
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    start = time.perf_counter()
    root, _ = load_config(base_overrides(world, out_dir, extra), world_size=world)
    tr = Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    if not save:
        tr.save_checkpoint = lambda *a, **k: None
    if prepare is not None:
        prepare(tr)
    run = record(tr, init=init)
    clip = torch.nn.utils.clip_grad_norm_
    if tr.engine.name == "ddp" and tr.engine.clip > 0:  # the norms DDP clips (shows that clipping is active)
        run["clip_norms"] = []

        def recording_clip(*args, **kwargs):
            norm = clip(*args, **kwargs)
            run["clip_norms"].append(float(norm))
            return norm
        torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        tr.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    finish(run, tr)
    run["seconds"] = time.perf_counter() - start
    return run, tr


_NOISE: Dict[Tuple[str, ...], dict] = {}


def noise_run(extra: Sequence[str] = ()) -> dict:
    """DDP, 1 process x ``global_batch(extra)`` images, ``base_overrides(1, ...)``, trained in this process (a world-1
    Trainer needs no process group) on one thread (as every rank of the 2-process jobs), without checkpoints;
    the Run includes ``init``. Cached per ``extra`` for the pytest session (both engine files use it)."""
    key = tuple(extra)
    if key not in _NOISE:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                _NOISE[key], _ = train_case(0, 1, tmp, [*DDP, *extra], init=True)
        finally:
            torch.set_num_threads(threads)
    return _NOISE[key]


# DDP 2 x 4 runs both engine files compare against: whichever file runs first trains them in its 2-process job
# and stores them here (``store_references``), the other one reuses them.
SHARED_REFERENCES = {"ddp_larc": LARC, "ddp_options": OPTIONS, "ddp_bf16": BF16}
_REFERENCES: Dict[str, dict] = {}


def missing_references() -> List[Tuple[str, List[str]]]:
    """``(name, overrides)`` of the shared DDP references not trained yet in this session."""
    return [(n, [*DDP, *extra]) for n, extra in SHARED_REFERENCES.items() if n not in _REFERENCES]


def store_references(results: Dict[str, dict]) -> None:
    """Keep the shared references' Runs of ``results`` (name -> Run) for the rest of the session."""
    for n in SHARED_REFERENCES:
        if n in results:
            _REFERENCES[n] = results[n]


def reference(name: str) -> dict:
    return _REFERENCES[name]


def _print_margins(path: str) -> None:
    for r in (json.loads(line) for line in open(path)):
        ratio = r["value"] / r["limit"] if r["limit"] else math.inf
        print(f"{r['isa']:<22} {r['kind']:<8} {r['label']:<26} {r['what']:<58} {r['value']:9.2e} "
              f"{r['limit']:9.2e} {ratio:9.2e}  {r['why']}")


if __name__ == "__main__":
    _print_margins(sys.argv[1])


# ------------------------------------------------------------------------------------------ memory planner
#: scaleclr.plan's predicted peak vs the measured one (benchmarks/plan_accuracy.py), relative: issue 20's bound
#: for both the per-image growth and the absolute peak. Not derived from a dtype: allocator rounding, oneDNN
#: scratch and late frees are what the trace cannot see, and they must stay under it.
PLAN_TOLERANCE = 0.10
