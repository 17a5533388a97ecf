"""FSDP2 engine (config.DISTRIBUTED.ENGINE=fsdp) against the DDP reference, on CPU/gloo with 2 processes.

Every run is a real Trainer on ``numerics.base_overrides`` (quick_simclr_synthetic: ResNet-18, SyncBN, LARC, 2
processes x 4 images, 3 steps; bf16: 2 x 2 images, 2 steps; fp16: 1 step), the same config and DDP references as
tests/test_deepspeed_engine.py. Limits (tests/numerics.py derives them):
* fp32 FSDP / HSDP vs DDP: step 1 (same weights and images) the loss within the rounding floor and every tensor
  within 1e-3 of its own update; later steps within 4x the distance of DDP 1 x 8 to DDP 2 x 4 (the same global
  batch in another reduction order: ``numerics.noise_run``) or the floor.
* negative control: LARC fed shard-local norms must fail those checks by >10x.
* bf16 mixed precision: FSDP (MixedPrecisionPolicy + autocast) vs DDP (autocast), both with fp32 BatchNorm: the same
  computation at step 1 (loss to rounding, update within the bf16 step-1 limit), then within the bf16 noise;
  BN parameters, buffers and inputs fp32, conv weights bf16 inside the forward. fp16 with the sharded grad
  scaler: step 1 to rounding, the scaler active, everything finite.
* activation checkpointing, stage units, DCP round trip: identical values (the same operations on the same
  values); BN running statistics are not updated twice.
* 1 vs 2 processes: step 1 the same forward (loss to rounding), the state within the ReLU-flip bound.
* reshard-on-resume 2->1 and 1->2 (constant global batch, mid-epoch): the resumed model and optimizer state equal
  the saved ones exactly, the first resumed loss equals the same-world resume's to rounding.
"""
import os
import shutil

import pytest
import torch

import numerics as nm
from dist_helpers import run_distributed
from numerics import BF16, FP16, LARC, OPTIONS

pytestmark = pytest.mark.dist



def _trainer(rank, world, overrides):
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    root, _ = load_config(overrides, world_size=world)
    return Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world)


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


def _run(rank, world, out_dir, extra=(), norm_fn=None, probe=False, count_block=False):
    """numerics.train_case (3 steps; the Run: rank-averaged losses, rank 0 the full fp32 states after step 1 and
    the last step), plus probes; returns (result, trainer). ``norm_fn`` replaces the engine's LARC / clipping norm
    for the whole run (negative control)."""
    from scaleclr.engines import fsdp as fsdp_mod

    probes = {}

    def prepare(tr):
        probes["seen"] = _dtype_probe(tr.engine.module) if probe else None
        probes["calls"] = _count_forwards(tr.engine.module.trunk.layer2[0].bn1) if count_block else None

    saved_norm = fsdp_mod.dtensor_norms
    if norm_fn is not None:
        fsdp_mod.dtensor_norms = norm_fn
    try:
        run, tr = nm.train_case(rank, world, out_dir, extra, prepare=prepare)
    finally:
        fsdp_mod.dtensor_norms = saved_norm
    out = {"run": run, "seen": probes["seen"], "bn_forwards": probes["calls"][0] if count_block else None}
    if probe:  # sharded (master) parameters of BN layers and buffers after training
        from torch.nn.modules.batchnorm import _BatchNorm
        out["bn_master"] = {str(p.dtype) for m in tr.engine.module.modules() if isinstance(m, _BatchNorm)
                            for p in list(m.parameters()) + list(m.buffers()) if p.is_floating_point()}
    return out, tr


FSDP = ["config.DISTRIBUTED.ENGINE=fsdp"]
FSDP_BF16 = FSDP + ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=bfloat16"] + nm.LOW_PRECISION_STEPS
FSDP_FP16 = FSDP + ["config.MODEL.FSDP_CONFIG.MIXED_PRECISION=float16", "config.TRAINER.MAX_ITERATIONS=1"]  # as FP16
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]
ONE_STEP = ["config.TRAINER.MAX_ITERATIONS=1"]


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


STAGE = ["config.MODEL.FSDP_CONFIG.SHARD_UNIT=stage", "config.MODEL.FSDP_CONFIG.RESHARD_AFTER_FORWARD=False"]


def _parity_body(rank, world, tmp, references):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {}
    for name, overrides in references:  # the shared DDP references, unless tests/test_deepspeed_engine.py ran
        res[name], _ = _run(rank, world, d(name), overrides)
    res["fsdp"], tr = _run(rank, world, d("fsdp"), FSDP, count_block=True)
    # DCP round trip: save, load into a fresh engine, compare everything exactly.
    client = tr.client_state()
    path = tr.engine.save(d("dcp"), "roundtrip", client)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    osd_saved = get_optimizer_state_dict(tr.engine.model, tr.engine.optimizer, options=opts)
    fresh = _trainer(rank, world, nm.base_overrides(world, d("fresh"), FSDP))
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
    res["fsdp_local_norms"], _ = _run(rank, world, d("neg"), FSDP, norm_fn=shard_local_norms)
    res["norms"] = _norms_probe(world)
    res["fsdp_options"], _ = _run(rank, world, d("fsdp_options"), FSDP + OPTIONS)
    res["hsdp"], _ = _run(rank, world, d("hsdp"), FSDP + ["config.MODEL.FSDP_CONFIG.HSDP_REPLICATE=2"])
    res["fsdp_bf16"], _ = _run(rank, world, d("fsdp_bf16"), FSDP_BF16, probe=True)
    # activation checkpointing, 1 step, against the same engine without it (fsdp: block units, resharded after
    # forward): the step-1 state is the whole effect of a step (gradients, BN statistics)
    res["fsdp_stage_ac"], _ = _run(rank, world, d("stage_ac"), FSDP + STAGE + AC + ONE_STEP, count_block=True)
    res["ddp_ac"], _ = _run(rank, world, d("ddp_ac"), nm.DDP + AC + ONE_STEP, count_block=True)
    res["fsdp_ac"], _ = _run(rank, world, d("fsdp_ac"), FSDP + AC + ONE_STEP)
    res["ddp_fp16"], _ = _run(rank, world, d("ddp_fp16"), nm.DDP + FP16)
    try:  # last: an error here (the same on both ranks) is reported by its test, not by every test of the file
        res["fsdp_fp16"], tr = _run(rank, world, d("fsdp_fp16"), FSDP_FP16)
        res["fsdp_fp16"]["grad_scale"] = float(tr.engine.scaler.get_scale())
    except Exception:  # noqa: BLE001
        import traceback
        res["fsdp_fp16"] = {"error": traceback.format_exc()}
    return res


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp_parity"))
    references = nm.missing_references()
    res = run_distributed(_parity_body, 2, tmp, references)[0]
    nm.store_references({n: res[n]["run"] for n, _ in references})
    return res


def run_of(parity, name):
    """The Run of a case, or of a DDP reference (possibly trained by tests/test_deepspeed_engine.py)."""
    return nm.reference(name) if name in nm.SHARED_REFERENCES else parity[name]["run"]


def test_fsdp_matches_ddp_fp32(parity):
    nm.assert_ok(nm.check_all(run_of(parity, "fsdp"), run_of(parity, "ddp_larc"), nm.noise_run(LARC), "fsdp"))


def test_negative_control_shard_local_larc_norms_are_caught(parity):
    """LARC on local shard norms (the fairscale#696 bug) must fail the checks the real engine passes, by >10x."""
    nm.assert_fails(nm.check_all(run_of(parity, "fsdp_local_norms"), run_of(parity, "ddp_larc"),
                                 nm.noise_run(LARC), "negative fsdp_local_norms"))


def test_dtensor_norms_are_full_norms(parity):
    n = parity["norms"]
    # <= 15 elements per tensor: the squared local norms, their all-reduced sum and the full tensor's norm each
    # round <= n + 2 times (u = 6e-8): rtol (15 + 2) u = 1e-6.
    torch.testing.assert_close(torch.tensor(n["dtensor"]), torch.tensor(n["full"]),
                               rtol=17 * nm.unit_roundoff(), atol=0)
    assert n["dtensor"][2] == 0.0  # zero-norm parameter stays zero (LARC then skips it)
    assert not torch.allclose(torch.tensor(n["local"]), torch.tensor(n["full"][:4]))  # what the control uses


def test_fsdp_matches_ddp_with_larc_clip_mode_exclusions_and_grad_clipping(parity):
    ref = run_of(parity, "ddp_options")
    nm.assert_ok(nm.check_all(run_of(parity, "fsdp_options"), ref, nm.noise_run(OPTIONS), "fsdp_options"))
    # the options changed the trajectory (so this case tests something the plain one does not): at step 1 the two
    # DDP runs differ far beyond any engine limit
    plain = run_of(parity, "ddp_larc")
    err = nm.update_error(ref["states"][1], plain["states"][1], nm.noise_run(LARC)["init"], 1)
    assert err.value > nm.NEGATIVE_MARGIN * nm.STEP1_UPDATE_TOL, err
    assert min(ref["clip_norms"]) > 10 * 0.05  # gradient clipping is active at every step


def test_hsdp_2d_mesh_matches_ddp(parity):
    nm.assert_ok(nm.check_all(run_of(parity, "hsdp"), run_of(parity, "ddp_larc"), nm.noise_run(LARC), "hsdp"))


def test_bf16_keeps_batchnorm_fp32_and_matches_ddp_bf16(parity):
    fsdp = parity["fsdp_bf16"]
    seen = fsdp["seen"]
    assert seen["conv_weight"] == {"torch.bfloat16"}  # the policy is really on
    assert seen["bn_weight"] == {"torch.float32"} and seen["bn_buffers"] == {"torch.float32"}
    # native autocast policy: BN activations stay bf16; weights, statistics and their accumulation fp32
    assert seen["bn_input"] == {"torch.bfloat16"}
    assert fsdp["bn_master"] == {"torch.float32"}
    got = fsdp["run"]
    assert all(v.dtype == torch.float32 for st in got["states"].values() for v in st.values()
               if v.is_floating_point())
    # (DDP's bf16 BatchNorm policy: tests/test_engine_precision.py)
    # same op-level policy as DDP's AMP, gradients reduced in fp32: step 1 (same weights) is the same computation;
    # later steps differ as two bf16 DDP runs with different reduction orders do
    nm.assert_ok(nm.check_all(got, run_of(parity, "ddp_bf16"), nm.noise_run(BF16), "fsdp_bf16", torch.bfloat16))


def test_fp16_with_sharded_grad_scaler_matches_ddp_fp16(parity):
    assert "error" not in parity["fsdp_fp16"], parity["fsdp_fp16"].get("error")
    ddp, fsdp = parity["ddp_fp16"]["run"], parity["fsdp_fp16"]["run"]
    # step 1: the same fp16 forward and (scaled, then unscaled) gradients as DDP's AMP
    nm.assert_ok(nm.check_step1(fsdp, ddp, "fsdp_fp16", nm.noise_run(LARC)["init"], torch.float16))
    assert parity["fsdp_fp16"]["grad_scale"] > 1  # the scaler is active
    assert len(fsdp["losses"]) == 1 and all(torch.isfinite(v).all() for st in fsdp["states"].values()
                                            for v in st.values() if v.is_floating_point())


def test_activation_checkpointing_leaves_values_unchanged(parity):
    """The recompute repeats the same operations on the same values in the same process: identical runs (and
    stage units without resharding, the same sums as block units: identical too)."""
    for plain, ckpt in (("fsdp", "fsdp_stage_ac"), ("ddp_larc", "ddp_ac"), ("fsdp", "fsdp_ac")):
        a, b = run_of(parity, plain), run_of(parity, ckpt)
        assert b["losses"] == a["losses"][:1], ckpt
        state = a["states"][1]  # incl. BN running stats
        assert all(torch.equal(b["states"][1][k], v) for k, v in state.items()), ckpt
    # the recomputation really ran (a BN inside a checkpointed block runs twice per step) ...
    assert parity["fsdp"]["bn_forwards"] == nm.STEPS
    assert parity["fsdp_stage_ac"]["bn_forwards"] == 2 and parity["ddp_ac"]["bn_forwards"] == 2


def test_dcp_save_load_round_trip_is_exact(parity):
    rt = parity["roundtrip"]
    _assert_equal(rt["state"], run_of(parity, "fsdp")["states"][nm.STEPS])
    assert rt["client"]["train_state"] == rt["client_saved"]["train_state"]
    assert all(torch.equal(a, b) for a, b in zip(rt["client"]["rng"]["cpu"], rt["client_saved"]["rng"]["cpu"]))
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

    from scaleclr.engines.fsdp import load_full_state_dict
    from scaleclr.export import export
    from scaleclr.models import ResNet

    assert not dist.is_initialized()
    full = load_full_state_dict(parity["roundtrip"]["path"])
    _assert_equal(full, run_of(parity, "fsdp")["states"][nm.STEPS])
    trunk = ResNet(depth=18)
    trunk.load_state_dict({k[len("trunk."):]: v for k, v in full.items() if k.startswith("trunk.")}, strict=True)
    out = str(tmp_path / "export.torch")
    export(parity["roundtrip"]["path"], out, "scaleclr")
    exported = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert exported.keys() == full.keys()


# ------------------------------------------------------------------------------------- reshard on resume
def _phase(rank, world, out_dir, max_iters=None, save=True):
    """Train (or AUTO_RESUME) the base config in out_dir, up to max_iters (global batch 8, 3 steps in the one
    epoch); records the Run, the model and full optimizer state the first step starts from (the resumed ones)
    and the final optimizer state (what the checkpoint saved)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    extra = FSDP + ([f"config.TRAINER.MAX_ITERATIONS={max_iters}"] if max_iters else [])
    tr = _trainer(rank, world, nm.base_overrides(world, out_dir, extra))
    if not save:
        tr.save_checkpoint = lambda *a, **k: None
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def optim():  # copied: entries already full and on the CPU (replicated BN, world 1) are the live buffers
        sd = get_optimizer_state_dict(tr.engine.model, tr.engine.optimizer, options=opts)
        return {"state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
                          for k, st in sd.get("state", {}).items()}}

    start = {}
    step = tr.train_step

    def first(batch, data_time):
        if not start:  # collective, every rank
            start["model"], start["optim"] = nm.snapshot(tr), optim()
        return step(batch, data_time)

    tr.train_step = first
    run = nm.record(tr)
    tr.train()
    nm.finish(run, tr)
    return {"run": run, "start": start, "optim": optim(), "step": tr.state.step}


def _copy(rank, src, dsts):
    import torch.distributed as dist

    if rank == 0:
        for dst in dsts:
            shutil.copytree(src, dst)
    dist.barrier()


def _reshard_world1_body(rank, world, tmp):
    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {"b_first": _phase(rank, world, d("b"), 2)}  # 1 process x 8: stop after step 2 of 3 (mid-epoch)
    _copy(rank, d("b"), [d("b_1to1"), d("b_1to2")])
    res["b_1to1"] = _phase(rank, world, d("b_1to1"), save=False)
    return res


def _reshard_world2_body(rank, world, tmp):
    d = lambda name: os.path.join(tmp, name)  # noqa: E731
    res = {"a_first": _phase(rank, world, d("a"), 2)}  # 2 processes x 4
    _copy(rank, d("a"), [d("a_2to2"), d("a_2to1")])
    res["a_2to2"] = _phase(rank, world, d("a_2to2"), save=False)
    res["b_1to2"] = _phase(rank, world, d("b_1to2"), save=False)  # resume the 1-process checkpoint on 2
    return res


def _reshard_world1_resume_body(rank, world, tmp):
    return {"a_2to1": _phase(rank, world, os.path.join(tmp, "a_2to1"), save=False)}


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp_reshard"))
    res = run_distributed(_reshard_world1_body, 1, tmp)[0]
    res.update(run_distributed(_reshard_world2_body, 2, tmp)[0])
    res.update(run_distributed(_reshard_world1_resume_body, 1, tmp)[0])
    res["tmp"] = tmp
    return res


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_optim_equal(a, b):
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for k in a["state"]:
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]), k


def test_first_phases_agree_across_world_sizes(reshard):
    """FSDP on 1 process x 8 images vs 2 x 4, the same global batch: the same first forward (step-1 loss to
    rounding), and after step 1 the state within numerics.relu_flip_bound of the update (the two runs' forwards
    round differently, so a ReLU may take the other branch; the backward then follows another mask)."""
    a, b = reshard["a_first"]["run"], reshard["b_first"]["run"]
    assert reshard["a_first"]["step"] == reshard["b_first"]["step"] == 2
    init = nm.noise_run(LARC)["init"]
    checks = nm.check_step1(a, b, "fsdp 2x4 vs 1x8", init)[:1]
    err = nm.update_error(a["states"][1], b["states"][1], init, 1)
    checks.append(nm.Check("fsdp 2x4 vs 1x8", f"step-1 update error ({err.name})", err.value, nm.relu_flip_bound(),
                           "ReLU flip bound"))
    nm.assert_ok(checks)


@pytest.mark.parametrize("resharded,same", [("a_2to1", "a_2to2"), ("b_1to2", "b_1to1")])
def test_reshard_on_resume_equals_same_world_resume(reshard, resharded, same):
    """Resuming a checkpoint on another number of processes (constant global batch, mid-epoch) restores the
    model and the optimizer state exactly (DCP reshards by copying) and the data position: the first resumed
    step is the same forward as the same-world resume's (loss to rounding)."""
    r, s = reshard[resharded], reshard[same]
    first = reshard["a_first" if resharded.startswith("a") else "b_first"]
    assert r["step"] == s["step"] == nm.STEPS
    assert len(r["run"]["losses"]) == len(s["run"]["losses"]) == 1  # resumed at iteration 2
    saved = first["run"]["states"][2]
    _assert_equal(r["start"]["model"], saved)
    _assert_equal(s["start"]["model"], saved)
    _assert_optim_equal(r["start"]["optim"], first["optim"])
    _assert_optim_equal(s["start"]["optim"], first["optim"])
    loss = s["run"]["losses"][0]
    nm.assert_ok([nm.Check(f"{resharded} vs {same}", "step-3 loss |diff|", abs(r["run"]["losses"][0] - loss),
                           nm.loss_floor(loss), "same weights and images: rounding floor")])
