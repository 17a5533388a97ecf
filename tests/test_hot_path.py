"""The training step's collectives and host synchronisations, counted, so a regression shows.

A steady-state step (after the first, which checks shapes and builds cached plans) of a real Trainer on 2
gloo ranks is run under counting wrappers around the ``torch.distributed`` collectives and the tensor methods
that read a value on the host (``item``, ``__bool__``, ``tolist``, ``__float__``, ``__int__``, ``__index__``).
On a GPU every such read stalls the host until the queued work finishes; on the CPU nothing stalls, but the
same calls would, so counting them here guards the CUDA hot path. Expected counts are derived from the model:
scaleclr's SyncBN does one all-gather (forward) and one all-reduce (backward) per BatchNorm layer, the loss's
gather one all-gather and one all-reduce; DDP's gradient all-reduces run inside its C++ reducer (not counted).
"""
import os

import pytest

from dist_helpers import run_distributed
from hot_path_helpers import counting

pytestmark = pytest.mark.dist

QUICK = "config=test/integration_test/quick_simclr_synthetic"


def _batches(trainer, n):
    trainer.sampler.set_epoch(0)
    trainer.dataset.set_epoch(0)
    it = iter(trainer.loader)
    return [next(it) for _ in range(n)]


def _count_steps(rank, world, overrides, steps=2):
    """Counts per steady-state step, after one warm-up step (shape checks, cached tiling plans)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from torch.nn.modules.batchnorm import _BatchNorm

    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    root, _ = load_config([QUICK, f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
                           "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.LOG_FREQUENCY=1000",
                           "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", "config.CHECKPOINT.DIR=/tmp/unused",
                           *overrides], world_size=world)
    tr = Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    batches = _batches(tr, steps + 1)
    tr.train_step(batches[0], 0.0)
    tr.should_stop()
    with counting() as counts:
        for b in batches[1:]:
            tr.train_step(b, 0.0)
            tr.should_stop()  # the step boundary of the training loop
    n_bn = sum(isinstance(m, _BatchNorm) for m in tr.engine.module.modules())
    return {k: v / steps for k, v in counts.items()}, n_bn


def _zero_larc_collectives(rank, world):
    """(all-reduces issued by ZeroLARC's norms, calls of ZeroLARC's step with adapted parameters) per ZeRO-2 step;
    DeepSpeed's own collectives are not counted."""
    import torch.distributed as dist

    from scaleclr.engines import deepspeed as ds_engine

    calls = {"reduces": 0, "steps": 0, "inside": False}
    real_norms, real_all_reduce = ds_engine.ZeroLARC._full_norms, dist.all_reduce

    def norms(self, tensors):
        calls["inside"], calls["steps"] = True, calls["steps"] + 1
        try:
            return real_norms(self, tensors)
        finally:
            calls["inside"] = False

    def all_reduce(*a, **k):
        calls["reduces"] += calls["inside"]
        return real_all_reduce(*a, **k)

    ds_engine.ZeroLARC._full_norms, dist.all_reduce = norms, all_reduce
    try:
        _count_steps(rank, world, ["config.DISTRIBUTED.ENGINE=deepspeed",
                                   "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero2.json",
                                   "config.OPTIMIZER.larc_config.exclude_bias_and_norm=True"], steps=1)
    finally:
        ds_engine.ZeroLARC._full_norms, dist.all_reduce = real_norms, real_all_reduce
    return calls["reduces"] / 2, calls["steps"] / 2  # warm-up step + 1 counted step


def _hot_path_body(rank, world):
    out = {}
    out["zero_larc_all_reduces"] = _zero_larc_collectives(rank, world)
    out["fsdp_bf16"], _ = _count_steps(rank, world, ["config.DISTRIBUTED.ENGINE=fsdp",
                                                     "config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"])
    out["ddp"], out["n_bn"] = _count_steps(rank, world, [])
    out["ddp_streaming"], _ = _count_steps(rank, world, ["config.LOSS.simclr_info_nce_loss.impl=streaming"])
    out["ddp_clip_bf16"], _ = _count_steps(rank, world, [
        "config.OPTIMIZER.gradient_clipping=0.5", "config.MODEL.AMP_PARAMS.USE_AMP=True",
        "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch", "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"])
    return out


@pytest.fixture(scope="module")
def counts():
    return run_distributed(_hot_path_body, 2)[0]


def test_ddp_step_has_no_host_sync(counts):
    for case in ("ddp", "ddp_streaming", "ddp_clip_bf16", "fsdp_bf16"):
        syncs = {k: v for k, v in counts[case].items() if k.startswith("Tensor.")}
        assert syncs == {}, (case, syncs)


def test_stop_agreement_is_one_cpu_collective_per_step(counts):
    """The stop-signal agreement at each step boundary: one all-reduce of a CPU int (gloo; a separate gloo group
    under NCCL) and its read, never a device tensor."""
    for case in ("ddp", "fsdp_bf16"):
        control = {k: v for k, v in counts[case].items() if k.startswith("control.")}
        assert control == {"control.dist.all_reduce": 1, "control.Tensor.item": 1}, (case, control)


def test_ddp_step_collectives_are_syncbn_and_the_loss_gather(counts):
    n_bn = counts["n_bn"]
    ddp = {k: v for k, v in counts["ddp"].items() if k.startswith("dist.")}
    gathers = ddp.get("dist.all_gather_single", 0) + ddp.get("dist.all_gather_into_tensor", 0)
    assert gathers == n_bn + 1  # one per SyncBN forward + the embeddings
    assert ddp.get("dist.all_reduce", 0) == n_bn + 1  # one per SyncBN backward + the gather's backward
    assert set(ddp) <= {"dist.all_gather_single", "dist.all_gather_into_tensor", "dist.all_reduce"}, ddp


def test_streaming_loss_collectives(counts):
    """Streaming: the embeddings gathered without autograd, two floats per row gathered in backward."""
    n_bn = counts["n_bn"]
    s = {k: v for k, v in counts["ddp_streaming"].items() if k.startswith("dist.")}
    gathers = s.get("dist.all_gather_single", 0) + s.get("dist.all_gather_into_tensor", 0)
    assert gathers == n_bn + 2 and s.get("dist.all_reduce", 0) == n_bn


def test_fsdp_collectives_one_pair_per_unit(counts):
    """FSDP2 (bf16): per unit (8 residual blocks, 2 heads, root) one all-gather in forward, one more in backward
    (RESHARD_AFTER_FORWARD, the root included), one reduce-scatter; BatchNorm parameters are
    replicated: ONE all-reduce of their gradients, not a unit (and collectives) per BatchNorm. Plus SyncBN's and
    the loss gather's collectives (as DDP) and one all-reduce of the LARC norms."""
    n_bn, units = counts["n_bn"], 8 + 2 + 1
    f = counts["fsdp_bf16"]
    gathers = f.get("dist.all_gather_single", 0) + f.get("dist.all_gather_into_tensor", 0)
    assert f.get("dist.reduce_scatter_single", 0) + f.get("dist.reduce_scatter_tensor", 0) == units
    assert gathers == 2 * units + n_bn + 1
    assert f.get("dist.all_reduce", 0) == 1 + 1 + n_bn + 1  # BN grads, LARC norms, SyncBN backward, gather


def test_zero_larc_one_collective_per_deepspeed_group_step(counts):
    """ZeroLARC: the squared norms of all fragments DeepSpeed hands over in one call, in ONE all-reduce. ZeRO-2
    steps its param groups one at a time (2 LARC-adapted groups here: trunk and head; the excluded bias/BN
    groups need no norms), so a training step costs one all-reduce per adapted group, not one per fragment or
    per parameter."""
    reduces, steps = counts["zero_larc_all_reduces"]
    assert steps == 2 and reduces == steps
