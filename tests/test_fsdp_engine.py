"""FSDP2 engine (config.DISTRIBUTED.ENGINE=fsdp) against the DDP reference, on CPU/gloo with 2 processes.

Every run is a real Trainer (quick_simclr_synthetic: ResNet-18, SyncBN, LARC, 4 images per rank, 3 steps, the same
global batch on every engine). Tolerances:
* fp32 FSDP vs DDP: per-step losses within 1e-5 relative; final parameters and buffers allclose (rtol 1e-5,
  atol 1e-6); every parameter's *update* (final - initial) within 1e-3 relative of DDP's update (the update is
  ~1e-4 of the weight, so a plain allclose on weights alone could miss a wrong trust ratio).
* negative control: LARC fed shard-local norms must FAIL the same update check.
* bf16 mixed precision: FSDP (MixedPrecisionPolicy + autocast) vs DDP (autocast), both with fp32 BatchNorm: first
  loss within 1e-6, all losses within 1e-2 relative, parameter updates within 0.25 relative and within half the
  DDP-bf16-vs-DDP-fp32 gap (bf16 rounding of fp32-level differences); BN parameters, buffers and inputs fp32, conv weights bf16 inside the forward.
* activation checkpointing: identical values (rtol 1e-6) with and without it, for DDP and FSDP; BN running
  statistics are not updated twice.
* DCP round trip: exact; reshard-on-resume 2->1 and 1->2 (constant global batch) vs same-world resume: losses 1e-5
  relative, states allclose.
"""
import os
import shutil

import pytest
import torch

from dist_helpers import run_distributed
from test_train import assert_states_close as _assert_states_close

pytestmark = pytest.mark.dist

QUICK = "config=test/integration_test/quick_simclr_synthetic"
GLOBAL_BATCH = 8


def _overrides(world, out_dir, engine, extra=(), max_iters=3, auto_resume=False, data_limit=32):
    return [QUICK, f"config.DISTRIBUTED.NUM_PROC_PER_NODE={world}",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={GLOBAL_BATCH // world}",
            f"config.DATA.TRAIN.DATA_LIMIT={data_limit}",
            f"config.TRAINER.MAX_ITERATIONS={max_iters}", f"config.CHECKPOINT.DIR={out_dir}",
            f"config.CHECKPOINT.AUTO_RESUME={auto_resume}", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
            f"config.DISTRIBUTED.ENGINE={engine}", *extra]


def _trainer(rank, world, overrides):
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    root, _ = load_config(overrides, world_size=world)
    return Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)


def _record_losses(tr):
    """Record every step's loss, averaged over ranks (what metrics.jsonl logs)."""
    from scaleclr.distributed.collectives import all_reduce_sum

    losses = []
    step = tr.train_step

    def recording(batch, data_time):
        loss = step(batch, data_time)
        losses.append(float(all_reduce_sum(loss.detach())) / tr.world_size)
        return loss

    tr.train_step = recording
    return losses


def _dtype_probe(model):
    """Forward pre-hooks recording, per module kind, the dtypes seen during the first forward."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    seen = {"bn_input": set(), "bn_weight": set(), "bn_buffers": set(), "conv_weight": set()}

    def bn_hook(m, args):
        seen["bn_input"].add(str(args[0].dtype))
        seen["bn_weight"].add(str(m.weight.dtype))
        seen["bn_buffers"].update({str(m.running_mean.dtype), str(m.running_var.dtype)})

    def conv_hook(m, args):
        seen["conv_weight"].add(str(m.weight.dtype))

    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.register_forward_pre_hook(bn_hook)
        elif isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(conv_hook)
    return seen


def _count_forwards(module):
    calls = [0]
    module.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def shard_local_norms(tensors):
    """The WRONG norm for sharded LARC (each local shard's norm): the negative control."""
    from torch.distributed.tensor import DTensor

    from scaleclr.optim.larc import local_norms

    return local_norms([t.to_local() if isinstance(t, DTensor) else t for t in tensors])


def _run(rank, world, out_dir, engine, extra=(), norm_fn=None, probe=False, count_block=False):
    """3 training steps; returns per-step losses and (rank 0) the full fp32 state after training.
    ``norm_fn`` replaces the engine's LARC / clipping norm for the whole run (negative control)."""
    from scaleclr.engines import fsdp as fsdp_mod

    saved_norm = fsdp_mod.dtensor_norms
    if norm_fn is not None:
        fsdp_mod.dtensor_norms = norm_fn
    try:
        return _run_inner(rank, world, out_dir, engine, extra, probe, count_block)
    finally:
        fsdp_mod.dtensor_norms = saved_norm


def _run_inner(rank, world, out_dir, engine, extra, probe, count_block):
    tr = _trainer(rank, world, _overrides(world, out_dir, engine, extra))
    tr.save_checkpoint = lambda *a, **k: None
    losses = _record_losses(tr)
    seen = _dtype_probe(tr.engine.module) if probe else None
    calls = _count_forwards(tr.engine.module.trunk.layer2[0].bn1) if count_block else None
    tr.train()
    out = {"losses": losses, "state": tr.engine.full_state_dict(), "seen": seen,
           "bn_forwards": calls[0] if calls else None}
    if probe:  # sharded (master) parameters of BN layers and buffers after training
        from torch.nn.modules.batchnorm import _BatchNorm
        out["bn_master"] = {str(p.dtype) for m in tr.engine.module.modules() if isinstance(m, _BatchNorm)
                            for p in list(m.parameters()) + list(m.buffers()) if p.is_floating_point()}
    return out, tr


AMP_BF16 = ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
            "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]
FSDP_BF16 = ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"]
AMP_FP16 = AMP_BF16[:2] + ["config.MODEL.AMP_PARAMS.AMP_DTYPE=float16"]
FSDP_FP16 = ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=float16"]
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]


CLIP = ["config.OPTIMIZER.larc_config.clip=True", "config.OPTIMIZER.larc_config.exclude_bias_and_norm=True",
        "config.OPTIMIZER.gradient_clipping=0.05"]


def _norms_probe(world):
    """dtensor_norms on unevenly sharded DTensors (an empty shard on rank 1, an all-zero tensor) vs full norms."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from scaleclr.engines.fsdp import dtensor_norms

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(1, generator=gen), torch.randn(3, 5, generator=gen), torch.zeros(4, 2),
             torch.randn(7, generator=gen)]
    dts = [distribute_tensor(t, mesh, [Shard(0)]) for t in fulls]
    return {"dtensor": dtensor_norms(dts + fulls).tolist(), "full": [float(t.norm()) for t in fulls] * 2,
            "local": shard_local_norms(dts).tolist()}


def _parity_body(rank, world, tmp):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {}
    res["ddp"], _ = _run(rank, world, d("ddp"), "ddp")
    res["fsdp"], tr = _run(rank, world, d("fsdp"), "fsdp")
    # DCP round trip: save, load into a fresh engine, compare everything exactly.
    client = tr.client_state()
    path = tr.engine.save(d("dcp"), "roundtrip", client)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd_saved = get_optimizer_state_dict(tr.engine.model, tr.engine.optimizer, options=opts)
    fresh = _trainer(rank, world, _overrides(world, d("fresh"), "fsdp"))
    loaded_client = fresh.engine.load(path)
    res["roundtrip"] = {"path": path, "state": fresh.engine.full_state_dict(), "client": loaded_client,
                        "client_saved": client,
                        "osd_saved": osd_saved,
                        "osd_loaded": get_optimizer_state_dict(fresh.engine.model, fresh.engine.optimizer,
                                                               options=opts),
                        "groups": [{k: v for k, v in g.items() if k != "params"}
                                   for g in fresh.engine.optimizer.param_groups],
                        "groups_saved": [{k: v for k, v in g.items() if k != "params"}
                                         for g in tr.engine.optimizer.param_groups]}
    del tr, fresh
    res["fsdp_local_norms"], _ = _run(rank, world, d("neg"), "fsdp", norm_fn=shard_local_norms)
    res["norms"] = _norms_probe(world)
    res["ddp_clip"], _ = _run(rank, world, d("ddp_clip"), "ddp", CLIP)
    res["fsdp_clip"], _ = _run(rank, world, d("fsdp_clip"), "fsdp", CLIP)
    res["hsdp"], _ = _run(rank, world, d("hsdp"), "fsdp", ["config.MODEL.FSDP_CONFIG.HSDP_REPLICATE=2"])
    res["ddp_bf16"], _ = _run(rank, world, d("ddp_bf16"), "ddp", AMP_BF16, probe=True)
    res["fsdp_bf16"], _ = _run(rank, world, d("fsdp_bf16"), "fsdp", FSDP_BF16, probe=True)
    res["ddp_fp16"], _ = _run(rank, world, d("ddp_fp16"), "ddp", AMP_FP16)
    res["fsdp_fp16"], tr = _run(rank, world, d("fsdp_fp16"), "fsdp", FSDP_FP16)
    res["fsdp_fp16"]["grad_scale"] = float(tr.engine.scaler.get_scale())
    stage = ["config.MODEL.FSDP_CONFIG.SHARD_UNIT=stage", "config.MODEL.FSDP_CONFIG.RESHARD_AFTER_FORWARD=False"]
    res["fsdp_stage"], _ = _run(rank, world, d("stage"), "fsdp", stage, count_block=True)
    res["fsdp_stage_ac"], _ = _run(rank, world, d("stage_ac"), "fsdp", stage + AC, count_block=True)
    res["ddp_ac"], _ = _run(rank, world, d("ddp_ac"), "ddp", AC, count_block=True)
    res["fsdp_ac"], _ = _run(rank, world, d("fsdp_ac"), "fsdp", AC)
    return res


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp_parity"))
    return run_distributed(_parity_body, 2, tmp)[0]


@pytest.fixture(scope="module")
def initial_state():
    from scaleclr import builders
    from scaleclr.config import load_config

    root, _ = load_config(_overrides(1, "/tmp/unused", "ddp"), world_size=1)
    return {k: v.float() if v.is_floating_point() else v for k, v in builders.build_model(root.config)
            .state_dict().items()}


def _loss_rel_err(a, b, n=3):
    assert len(a) == len(b) == n
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _update_rel_err(state, ref, init):
    """max over parameters of ||(state - init) - (ref - init)|| / ||ref - init|| (params that moved)."""
    worst, name = 0.0, None
    for k, v in ref.items():
        if not v.is_floating_point() or "running" in k:
            continue
        du_ref, du = v - init[k], state[k] - init[k]
        n = float(du_ref.norm())
        if n == 0:
            assert float(du.norm()) == 0, k
            continue
        err = float((du - du_ref).norm()) / n
        if err > worst:
            worst, name = err, k
    return worst, name




def test_fsdp_matches_ddp_fp32(parity, initial_state):
    ddp, fsdp = parity["ddp"], parity["fsdp"]
    assert _loss_rel_err(fsdp["losses"], ddp["losses"]) < 1e-5
    _assert_states_close(fsdp["state"], ddp["state"], rtol=1e-5, atol=1e-6)
    err, name = _update_rel_err(fsdp["state"], ddp["state"], initial_state)
    assert err < 1e-3, (name, err)


def test_negative_control_shard_local_larc_norms_are_caught(parity, initial_state):
    """LARC on local shard norms (the fairscale#696 bug) must fail the check the real engine passes."""
    bad, ddp = parity["fsdp_local_norms"], parity["ddp"]
    err, name = _update_rel_err(bad["state"], ddp["state"], initial_state)
    assert err > 1e-2, (name, err)
    with pytest.raises(AssertionError):
        _assert_states_close(bad["state"], ddp["state"], rtol=1e-5, atol=1e-6)


def test_dtensor_norms_are_full_norms(parity):
    n = parity["norms"]
    torch.testing.assert_close(torch.tensor(n["dtensor"]), torch.tensor(n["full"]), rtol=1e-6, atol=0)
    assert n["dtensor"][2] == 0.0  # zero-norm parameter stays zero (LARC then skips it)
    assert not torch.allclose(torch.tensor(n["local"]), torch.tensor(n["full"][:4]))  # what the control uses


def test_fsdp_matches_ddp_with_larc_clip_mode_exclusions_and_grad_clipping(parity, initial_state):
    ddp, fsdp = parity["ddp_clip"], parity["fsdp_clip"]
    assert _loss_rel_err(fsdp["losses"], ddp["losses"]) < 1e-5
    _assert_states_close(fsdp["state"], ddp["state"], rtol=1e-5, atol=1e-6)
    err, name = _update_rel_err(fsdp["state"], ddp["state"], initial_state)
    assert err < 1e-3, (name, err)
    # the options changed the trajectory (so this case tests something the plain one does not)
    assert _update_rel_err(ddp["state"], parity["ddp"]["state"], initial_state)[0] > 1e-2


def test_hsdp_2d_mesh_matches_ddp(parity, initial_state):
    ddp, hsdp = parity["ddp"], parity["hsdp"]
    assert _loss_rel_err(hsdp["losses"], ddp["losses"]) < 1e-5
    _assert_states_close(hsdp["state"], ddp["state"], rtol=1e-5, atol=1e-6)
    assert _update_rel_err(hsdp["state"], ddp["state"], initial_state)[0] < 1e-3


def test_bf16_keeps_batchnorm_fp32_and_matches_ddp_bf16(parity, initial_state):
    ddp, fsdp = parity["ddp_bf16"], parity["fsdp_bf16"]
    seen = fsdp["seen"]
    assert seen["conv_weight"] == {"torch.bfloat16"}  # the policy is really on
    assert seen["bn_weight"] == {"torch.float32"} and seen["bn_buffers"] == {"torch.float32"}
    # native autocast policy: BN activations stay bf16; weights, statistics and their accumulation fp32
    assert seen["bn_input"] == {"torch.bfloat16"}
    assert fsdp["bn_master"] == {"torch.float32"}
    assert all(v.dtype == torch.float32 for k, v in fsdp["state"].items() if v.is_floating_point())
    assert ddp["seen"]["bn_input"] == {"torch.bfloat16"} and ddp["seen"]["bn_weight"] == {"torch.float32"}
    # same op-level policy as DDP's AMP: the first step (same parameters) is the same computation ...
    assert abs(fsdp["losses"][0] - ddp["losses"][0]) <= 1e-6 * abs(ddp["losses"][0])
    # ... later steps differ by bf16 rounding of fp32-level differences (reduction order)
    assert _loss_rel_err(fsdp["losses"], ddp["losses"]) < 1e-2
    assert _loss_rel_err(fsdp["losses"], parity["fsdp"]["losses"]) < 5e-2  # bf16 vs fp32
    # parameter updates: FSDP-vs-DDP (same policy) is well inside the bf16-vs-fp32 gap
    err, name = _update_rel_err(fsdp["state"], ddp["state"], initial_state)
    bf16_gap, _ = _update_rel_err(ddp["state"], parity["ddp"]["state"], initial_state)
    assert err < min(0.25, 0.5 * bf16_gap), (name, err, bf16_gap)
    for k, v in ddp["state"].items():  # BN running statistics: same to bf16 accuracy
        if "running" in k:
            torch.testing.assert_close(fsdp["state"][k], v, rtol=5e-2, atol=5e-2)


def test_fp16_with_sharded_grad_scaler_matches_ddp_fp16(parity):
    ddp, fsdp = parity["ddp_fp16"], parity["fsdp_fp16"]
    assert abs(fsdp["losses"][0] - ddp["losses"][0]) <= 1e-6 * abs(ddp["losses"][0])
    assert _loss_rel_err(fsdp["losses"], ddp["losses"]) < 1e-2
    assert fsdp["grad_scale"] > 1  # the scaler is active
    assert all(torch.isfinite(v).all() for v in fsdp["state"].values() if v.is_floating_point())


def test_activation_checkpointing_leaves_values_unchanged(parity):
    for plain, ckpt in (("fsdp_stage", "fsdp_stage_ac"), ("ddp", "ddp_ac"), ("fsdp", "fsdp_ac")):
        a, b = parity[plain], parity[ckpt]
        assert _loss_rel_err(b["losses"], a["losses"]) < 1e-6, ckpt
        _assert_states_close(b["state"], a["state"], rtol=1e-6, atol=1e-7)  # incl. BN running stats
    # the recomputation really ran (a BN inside a checkpointed block runs twice per step) ...
    assert parity["fsdp_stage"]["bn_forwards"] == 3
    assert parity["fsdp_stage_ac"]["bn_forwards"] == 6 and parity["ddp_ac"]["bn_forwards"] == 6
    # ... and stage units + no reshard still equal DDP
    assert _loss_rel_err(parity["fsdp_stage"]["losses"], parity["ddp"]["losses"]) < 1e-5


def test_dcp_save_load_round_trip_is_exact(parity):
    rt = parity["roundtrip"]
    _assert_states_close(rt["state"], parity["fsdp"]["state"], rtol=0, atol=0)
    assert rt["client"]["train_state"] == rt["client_saved"]["train_state"]
    assert torch.equal(rt["client"]["rng_cpu"], rt["client_saved"]["rng_cpu"])
    assert rt["groups"] == rt["groups_saved"]  # param groups (lr, wd, larc_exclude, names) preserved
    saved, loaded = rt["osd_saved"], rt["osd_loaded"]
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) > 0
    for k in saved["state"]:
        torch.testing.assert_close(loaded["state"][k]["momentum_buffer"], saved["state"][k]["momentum_buffer"],
                                   rtol=0, atol=0)
    assert os.path.exists(os.path.join(rt["path"], "client_state.torch"))
    assert not any(n.startswith(".tmp_") for n in os.listdir(os.path.dirname(rt["path"])))


def test_full_export_loads_into_resnet_without_process_group(parity, tmp_path):
    import torch.distributed as dist

    from scaleclr.engines.fsdp import export_checkpoint, load_full_state_dict
    from scaleclr.models import ResNet

    assert not dist.is_initialized()
    full = load_full_state_dict(parity["roundtrip"]["path"])
    _assert_states_close(full, parity["fsdp"]["state"], rtol=0, atol=0)
    trunk = ResNet(depth=18)
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in full.items() if k.startswith("trunk.")}, strict=True)
    out = export_checkpoint(parity["roundtrip"]["path"], str(tmp_path / "export.torch"))
    exported = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert exported.keys() == full.keys()


# ------------------------------------------------------------------------------------- reshard on resume
def _phase(rank, world, out_dir, engine, max_iters):
    """Train (or AUTO_RESUME) in out_dir up to max_iters with a global batch of 8; 2 iterations per epoch."""
    tr = _trainer(rank, world, _overrides(world, out_dir, engine, max_iters=max_iters, auto_resume=True,
                                          data_limit=16))
    losses = _record_losses(tr)
    tr.train()
    return {"losses": losses, "state": tr.engine.full_state_dict(), "step": tr.state.step}


def _copy(rank, src, dsts):
    import torch.distributed as dist

    if rank == 0:
        for dst in dsts:
            shutil.copytree(src, dst)
    dist.barrier()


def _reshard_world1_body(rank, world, tmp):
    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {"b_first": _phase(rank, world, d("b"), "fsdp", 2)}  # 1 process x 8: epoch 0
    _copy(rank, d("b"), [d("b_1to1"), d("b_1to2")])
    res["b_1to1"] = _phase(rank, world, d("b_1to1"), "fsdp", 4)
    return res


def _reshard_world2_body(rank, world, tmp):
    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {"a_first": _phase(rank, world, d("a"), "fsdp", 2)}  # 2 processes x 4: epoch 0
    _copy(rank, d("a"), [d("a_2to2"), d("a_2to1")])
    res["a_2to2"] = _phase(rank, world, d("a_2to2"), "fsdp", 4)
    res["b_1to2"] = _phase(rank, world, d("b_1to2"), "fsdp", 4)  # resume the 1-process checkpoint on 2
    return res


def _reshard_world1_resume_body(rank, world, tmp):
    return {"a_2to1": _phase(rank, world, os.path.join(tmp, "a_2to1"), "fsdp", 4)}


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp_reshard"))
    res = run_distributed(_reshard_world1_body, 1, tmp)[0]
    res.update(run_distributed(_reshard_world2_body, 2, tmp)[0])
    res.update(run_distributed(_reshard_world1_resume_body, 1, tmp)[0])
    res["tmp"] = tmp
    return res


def test_first_phases_agree_across_world_sizes(reshard):
    a, b = reshard["a_first"], reshard["b_first"]
    assert a["step"] == b["step"] == 2
    assert _loss_rel_err(a["losses"], b["losses"], n=2) < 1e-5
    _assert_states_close(a["state"], b["state"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resharded,same", [("a_2to1", "a_2to2"), ("b_1to2", "b_1to1")])
def test_reshard_on_resume_equals_same_world_resume(reshard, resharded, same):
    r, s = reshard[resharded], reshard[same]
    assert r["step"] == s["step"] == 4
    assert _loss_rel_err(r["losses"], s["losses"], n=2) < 1e-5  # 2 steps: resumed at iteration 2
    _assert_states_close(r["state"], s["state"], rtol=1e-5, atol=1e-6)
