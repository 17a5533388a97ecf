"""DeepSpeed engine (ZeRO 0-3) against the DDP reference engine: CPU, gloo, 2 processes, synthetic data.

Every run is the quick synthetic config (ResNet-18, SyncBN, 32 px) at 4 images per process, one epoch of 3
steps (DATA_LIMIT 24), so each run ends with a *final* checkpoint. Compared with DDP on the same data:
per-step losses (``metrics.jsonl``, 1e-4 relative) and the final parameters (the consolidated fp32 export,
allclose). A negative control runs LARC on DeepSpeed's flat partitions (the test replaces the partition
bookkeeping with an empty one, so every flat partition is normed as if it were one parameter) and must fail the
same comparison. Save/stop/resume must equal the uninterrupted run, BN
buffers must be equal on both ranks.

Cost: the ZeRO x LARC matrix runs as one 2-process gloo job (``tests/dist_helpers.run_distributed``) that
builds one ``Trainer`` per case, exactly as ``train.py``'s worker does; the save/resume case also goes through
the real ``deepspeed --num_gpus 2 train.py --deepspeed_config ...`` launcher.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from dist_helpers import run_distributed  # noqa: E402

COMMON = ["config=test/integration_test/quick_simclr_synthetic", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
          "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.DATA.TRAIN.DATA_LIMIT=24",
          "config.OPTIMIZER.num_epochs=1", "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False"]
STEPS = 3
LOSS_RTOL = 1e-4
# Parameters (|p| <~ 0.3): gradients agree to rounding (ZeRO-3 without LARC is bitwise equal to DDP); with LARC,
# torch's fp32 norm of a 2.4M-element tensor is itself only accurate to ~3e-5 relative on CPU, and DDP (norm of
# the whole tensor) and ZeRO (norms of 1/N fragments, summed) round differently, so trust ratios agree to
# ~2e-5 and 3 steps later single elements to ~1e-6 absolute. Two checks: allclose, and every tensor's distance
# to DDP below UPDATE_RTOL of the size of its own update (the negative control is O(1) there).
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5
UPDATE_RTOL = 2e-2
STAGES = (0, 1, 2, 3)


def ds(stage, json_name=None):
    return ["config.DISTRIBUTED.ENGINE=deepspeed",
            f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/{json_name or f'zero{stage}'}.json"]


def larc(on):
    return [f"config.OPTIMIZER.use_larc={on}"]


# (name, overrides, patch); one process group runs them in this order (ZeRO-3 last: it
# installs hooks on its model, nothing global, but that keeps the other cases independent of it).
RUNS = [("ddp_larc_True", larc(True), None), ("ddp_larc_False", larc(False), None)]
RUNS += [(f"z{s}_larc_{on}", ds(s) + larc(on), None) for s in (0, 1, 2) for on in (True, False)]
# LARC options: clip mode, zero-norm parameters (zero-initialised last BN of every block: no adaptation and no
# weight decay at step 1), BN/bias regularisation groups; and SimCLR's exclude_bias_and_norm groups
# (larc_exclude: plain SGD with their own weight decay).
VARIANT = larc(True) + ["config.OPTIMIZER.larc_config.clip=True", "config.MODEL.TRUNK.RESNETS.ZERO_INIT_RESIDUAL=True",
                        "config.OPTIMIZER.regularize_bn=True", "config.OPTIMIZER.regularize_bias=False",
                        "config.OPTIMIZER.weight_decay=0.0001"]
EXCLUDE = larc(True) + ["config.OPTIMIZER.larc_config.exclude_bias_and_norm=True",
                        "config.OPTIMIZER.regularize_bn=True", "config.OPTIMIZER.weight_decay=0.0001"]
RUNS += [("ddp_variant", VARIANT, None), ("z2_variant", ds(2) + VARIANT, None), ("ddp_exclude", EXCLUDE, None)]
CLIP = ["config.OPTIMIZER.gradient_clipping=0.05"]  # well below the gradient norm: clipping is active
RUNS += [("ddp_clip", larc(False) + CLIP, None), ("z2_clip", ds(2) + larc(False) + CLIP, None)]
RUNS += [("negative_z2_partition_norms", ds(2) + larc(True), "flat_partitions")]
RUNS += [(f"z3_larc_{on}", ds(3) + larc(on), None) for on in (True, False)]
RUNS += [("z3offload_larc_True", ds(3, "zero3_offload") + larc(True), None)]
RUNS += [("z3_variant", ds(3) + VARIANT, None), ("z3_exclude", ds(3) + EXCLUDE, None)]
# activation checkpointing: ZeRO-3 is the case that must re-gather partitioned parameters for the recompute
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]
RUNS += [("z3_ac_larc_True", ds(3) + larc(True) + AC, None)]
BF16 = ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
        "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"]
# bf16: ZeRO-0 keeps one fp32 master per parameter (plain LARC math); ZeRO-3 partitions them
RUNS += [(f"z{s}_bf16_larc_True", ds(s) + larc(True) + BF16, None) for s in (0, 3)]
# save after 2 steps, stop (the trainer and engine are discarded), resume in a fresh Trainer, finish
RUNS += [("z3_resume", ds(3) + larc(True) + ["config.TRAINER.MAX_ITERATIONS=2"], None),
         ("z3_resume", ds(3) + larc(True), None)]


def _train_cases(rank, world_size, base, runs):
    """One Trainer per case in this process group (what train.py's worker does); returns per case the
    rank's BN buffers and (rank 0) the consolidated fp32 state."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from scaleclr.config import load_config
    from scaleclr.trainer import Trainer

    from scaleclr.engines import deepspeed as ds_engine

    out = {}
    for i, (name, overrides, patch) in enumerate(runs):
        real_layouts = ds_engine.build_flat_layouts
        if patch == "flat_partitions":  # no partition bookkeeping: LARC norms DeepSpeed's flat partitions
            ds_engine.build_flat_layouts = lambda ds_optimizer: {}
        try:
            root, _ = load_config(COMMON + overrides + [f"config.CHECKPOINT.DIR={base}/{name}"],
                                  world_size=world_size)
            trainer = Trainer(root, rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)
            trainer.train()
            state = trainer.engine.full_state_dict()
            buffers = {n: b.detach().clone() for n, b in trainer.engine.module.named_buffers()}
            out[f"{i}:{name}"] = {"state": state, "buffers": buffers, "engine": trainer.engine.name,
                                  "optimizer": type(trainer.engine.optimizer).__name__}
        finally:
            ds_engine.build_flat_layouts = real_layouts
        del trainer
        gc.collect()
    return out


def step_losses(out_dir):
    recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def result(matrix, name, rank=0, last=True):
    keys = [k for k in matrix[rank] if k.split(":", 1)[1] == name]
    return matrix[rank][keys[-1] if last else keys[0]]


def losses_close(a, b, rtol=LOSS_RTOL):
    return a.keys() == b.keys() and all(abs(a[s] - b[s]) <= rtol * abs(b[s]) for s in b)


def states_close(a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL):
    assert a.keys() == b.keys()
    return all(torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol) if a[k].is_floating_point()
               else torch.equal(a[k], b[k]) for k in a)


def update_rel_diffs(got, ref, init):
    """{name: max |got - ref| / max |ref - init|} over the trained floating tensors: how far two runs' final
    values are apart, relative to the size of the reference run's update of that tensor."""
    out = {}
    for k in init:
        if init[k].is_floating_point() and "running" not in k:
            upd = (ref[k].float() - init[k].float()).abs().max().item()
            if upd > 0:
                out[k] = (got[k].float() - ref[k].float()).abs().max().item() / upd
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    base = tmp_path_factory.mktemp("ds_matrix")
    results = run_distributed(_train_cases, 2, str(base), RUNS)
    return base, results


def initial_state(overrides=()):
    """The model every rank starts from (seeded by SEED_VALUE)."""
    from scaleclr import builders
    from scaleclr.config import load_config
    root, _ = load_config(COMMON + list(overrides), world_size=2)
    return {k: v.detach().clone() for k, v in builders.build_model(root.config).state_dict().items()}


@pytest.fixture(scope="module")
def init_state():
    return initial_state()


@pytest.mark.parametrize("use_larc", [True, False])
@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_ddp(matrix, init_state, stage, use_larc):
    base, results = matrix
    name, ref_name = f"z{stage}_larc_{use_larc}", f"ddp_larc_{use_larc}"
    ref, got = step_losses(base / ref_name), step_losses(base / name)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert losses_close(got, ref), (got, ref)
    r = result(results, name)
    assert r["engine"] == "deepspeed"
    assert r["optimizer"] == ("ZeroLARC" if use_larc else "SGD")
    ref_state = result(results, ref_name)["state"]
    assert states_close(r["state"], ref_state)
    worst = max(update_rel_diffs(r["state"], ref_state, init_state).items(), key=lambda kv: kv[1])
    assert worst[1] < UPDATE_RTOL, worst
    # the consolidated fp32 export written with the final checkpoint holds the same weights
    exported = torch.load(base / name / "model_final_checkpoint_phase0_consolidated_fp32.torch", weights_only=True)
    assert all(torch.equal(exported["model"][k], r["state"][k]) for k in r["state"])


@pytest.mark.parametrize("name", ["z2_variant", "z3_variant", "z3_exclude"])
def test_larc_options_and_param_groups_match_ddp(matrix, name):
    """LARC clip mode, zero-norm handling, regularize_bn / regularize_bias and exclude_bias_and_norm groups under
    ZeRO equal DDP's single-process LARC."""
    base, results = matrix
    ref_name = "ddp_" + name.split("_", 1)[1]
    assert losses_close(step_losses(base / name), step_losses(base / ref_name))
    got, ref = result(results, name)["state"], result(results, ref_name)["state"]
    assert states_close(got, ref)
    init = initial_state(VARIANT if "variant" in name else EXCLUDE)
    assert max(update_rel_diffs(got, ref, init).values()) < UPDATE_RTOL
    if "variant" in name:  # the zero-initialised BN weights moved (plain SGD step at step 1, then LARC)
        k = next(k for k in ref if k.endswith("bn2.weight") and "layer1.0" in k)
        assert init[k].abs().max() == 0 and ref[k].abs().max() > 0
        assert torch.allclose(got[k], ref[k], rtol=PARAM_RTOL, atol=PARAM_ATOL)


def test_gradient_clipping_from_hydra_matches_ddp(matrix):
    """config.OPTIMIZER.gradient_clipping reaches DeepSpeed through "auto" and clips like DDP's clip_grad_norm_."""
    base, results = matrix
    got, ref = step_losses(base / "z2_clip"), step_losses(base / "ddp_clip")
    assert losses_close(got, ref), (got, ref)
    assert not losses_close(ref, step_losses(base / "ddp_larc_False"), rtol=1e-3)  # clipping changed the run
    assert states_close(result(results, "z2_clip")["state"], result(results, "ddp_clip")["state"])


def test_zero3_optimizer_state_offload_matches_ddp(matrix):
    base, results = matrix
    assert losses_close(step_losses(base / "z3offload_larc_True"), step_losses(base / "ddp_larc_True"))
    assert states_close(result(results, "z3offload_larc_True")["state"], result(results, "ddp_larc_True")["state"])


def test_bf16_zero3_matches_bf16_zero0(matrix, init_state):
    """DeepSpeed bf16 (bf16 weights, fp32 masters, BN in fp32): ZeRO-3's partitioned LARC equals ZeRO-0's
    per-parameter LARC; the export holds the fp32 masters; BN statistics stay fp32 (checked for every run in
    test_bn_buffers_equal_on_both_ranks)."""
    base, results = matrix
    ref, got = step_losses(base / "z0_bf16_larc_True"), step_losses(base / "z3_bf16_larc_True")
    assert losses_close(got, ref), (got, ref)
    assert not losses_close(ref, step_losses(base / "z0_larc_True"), rtol=1e-6)  # bf16 really ran
    a, b = result(results, "z3_bf16_larc_True")["state"], result(results, "z0_bf16_larc_True")["state"]
    assert states_close(a, b)
    assert max(update_rel_diffs(a, b, init_state).values()) < UPDATE_RTOL
    for k, v in a.items():  # fp32 masters, not bf16-rounded weights
        if v.is_floating_point() and "running" not in k and v.numel() > 1000:
            assert not torch.equal(v, v.bfloat16().float()), k
            break


def test_negative_control_partition_trust_ratios_are_caught(matrix, init_state):
    """Plain LARC on DeepSpeed's flat partitions (one trust ratio per partition) must fail the comparison
    that the exact engine passes, by a wide margin."""
    base, results = matrix
    ref = result(results, "ddp_larc_True")["state"]
    bad = result(results, "negative_z2_partition_norms")
    good = result(results, "z2_larc_True")["state"]
    assert bad["optimizer"] == "ZeroLARC"  # the real class, without its partition bookkeeping
    assert not losses_close(step_losses(base / "negative_z2_partition_norms"), step_losses(base / "ddp_larc_True"))
    assert not states_close(bad["state"], ref)
    good_diff = max(update_rel_diffs(good, ref, init_state).values())
    bad_diff = max(update_rel_diffs(bad["state"], ref, init_state).values())
    assert good_diff < UPDATE_RTOL < 0.1 < bad_diff, (good_diff, bad_diff)


def test_activation_checkpointing_under_zero3_matches_ddp(matrix, init_state):
    """USE_ACTIVATION_CHECKPOINTING under DeepSpeed (ZeRO-3: the recompute re-gathers the partitioned
    parameters): the same run as without it, hence as DDP. The recompute repeats the same operations on the same
    values in the same process (deterministic CPU kernels), so the two runs are identical, not merely close."""
    base, results = matrix
    got = result(results, "z3_ac_larc_True")["state"]
    assert step_losses(base / "z3_ac_larc_True") == step_losses(base / "z3_larc_True")
    assert states_close(got, result(results, "z3_larc_True")["state"], rtol=0, atol=0)
    assert losses_close(step_losses(base / "z3_ac_larc_True"), step_losses(base / "ddp_larc_True"))


def test_save_stop_resume_equals_uninterrupted_zero3(matrix):
    base, results = matrix
    got, ref = step_losses(base / "z3_resume"), step_losses(base / "z3_larc_True")
    assert got.keys() == ref.keys() and all(got[s] == pytest.approx(ref[s], rel=1e-6) for s in ref), (got, ref)
    assert states_close(result(results, "z3_resume")["state"], result(results, "z3_larc_True")["state"],
                        rtol=1e-5, atol=1e-7)
    pointer = json.load(open(base / "z3_resume" / "checkpoint.json"))
    assert [h["path"] for h in pointer["history"]] == ["model_iteration2", "model_final_checkpoint_phase0"]


def test_bn_buffers_equal_on_both_ranks(matrix):
    _, results = matrix
    for key, r0 in results[0].items():
        r1 = results[1][key]
        assert r0["buffers"].keys() == r1["buffers"].keys()
        for n, b in r0["buffers"].items():
            assert b.dtype == r1["buffers"][n].dtype and torch.equal(b, r1["buffers"][n]), (key, n)
            if "running" in n:
                assert b.dtype == torch.float32
        # and the exported BN statistics are the trained ones
        if r0["state"] is not None:
            for n, b in r0["buffers"].items():
                assert torch.equal(r0["state"][n].to(b.dtype), b.cpu()), (key, n)


# ----------------------------------------------------------------------------------- deepspeed launcher
def _launch(out_dir, *overrides, json_name="zero2.json"):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "train.py"),
           "--deepspeed_config", f"ds_configs/{json_name}", *COMMON, f"config.CHECKPOINT.DIR={out_dir}",
           *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return r


def _free_port():
    from dist_helpers import free_port
    return free_port()


def test_deepspeed_launcher_zero2_stop_resume_export(matrix, tmp_path):
    """`deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json`: stop after 2 steps, resume
    (AUTO_RESUME) in a new launch, and the continued run equals the uninterrupted ZeRO-2 / DDP runs; the offline
    export of the mid-run checkpoint loads into scaleclr.models.ResNet without deepspeed."""
    base, results = matrix
    _launch(tmp_path, "config.TRAINER.MAX_ITERATIONS=2", "config.OPTIMIZER.use_larc=True")
    assert (tmp_path / "model_iteration2" / "scaleclr_meta.json").exists()
    _launch(tmp_path, "config.OPTIMIZER.use_larc=True")
    got = step_losses(tmp_path)
    ref = step_losses(base / "z2_larc_True")
    assert got.keys() == ref.keys() and all(got[s] == pytest.approx(ref[s], rel=1e-6) for s in ref), (got, ref)
    assert losses_close(got, step_losses(base / "ddp_larc_True"))
    final = torch.load(tmp_path / "model_final_checkpoint_phase0_consolidated_fp32.torch", weights_only=True)
    assert states_close(final["model"], result(results, "z2_larc_True")["state"], rtol=1e-5, atol=1e-7)
    assert states_close(final["model"], result(results, "ddp_larc_True")["state"])

    # offline export (python -m scaleclr.engines.deepspeed export) of the stopped run's checkpoint
    out = tmp_path / "export_it2.torch"
    r = subprocess.run([sys.executable, "-m", "scaleclr.engines.deepspeed", "export",
                        str(tmp_path / "model_iteration2"), str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    code = (
        "import sys, torch\n"
        "sys.modules['deepspeed'] = None  # as if not installed\n"
        "from scaleclr.models import ResNet\n"
        f"p = torch.load({str(out)!r}, weights_only=True)\n"
        "m = ResNet(depth=18, width_multiplier=1, groups=1, width_per_group=64, zero_init_residual=False)\n"
        "m.load_state_dict(p['trunk'])\n"
        "assert m(torch.randn(2, 3, 32, 32)).shape == (2, 512)\n"
        "keys = ['trunk.' + k for k in p['trunk']] + ['heads.' + k for k in p['heads']]\n"
        "assert sorted(p['model']) == sorted(keys)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    # ... and restarts a run: config.MODEL.WEIGHTS_INIT.PARAMS_FILE (what the world-size error tells users)
    exported = torch.load(out, weights_only=True)["model"]
    started = initial_state([f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={out}"])
    # (num_batches_tracked stays at 0: config.MODEL.WEIGHTS_INIT.SKIP_LAYERS' default, as in VISSL)
    assert started.keys() == exported.keys() and all(torch.equal(started[k], exported[k].to(started[k].dtype))
                                                      for k in started if "num_batches_tracked" not in k)


# ---------------------------------------------------------------------------------- resume compatibility
def test_resume_with_other_world_size_or_stage_stops_with_instructions(tmp_path):
    from scaleclr.engines.deepspeed import check_resumable

    check_resumable(str(tmp_path), {"world_size": 2, "zero_stage": 2, "precision": "fp32"},
                    {"world_size": 2, "zero_stage": 2, "precision": "fp32"})
    check_resumable(str(tmp_path), {"world_size": 2, "zero_stage": 0, "precision": "fp32"},
                    {"world_size": 4, "zero_stage": 0, "precision": "fp32"})  # ZeRO-0: nothing partitioned
    for now in ({"world_size": 4, "zero_stage": 2}, {"world_size": 2, "zero_stage": 3}):
        with pytest.raises(ValueError) as e:
            check_resumable(str(tmp_path), {"world_size": 2, "zero_stage": 2, "precision": "fp32"},
                            dict(now, precision="fp32"))
        msg = str(e.value)
        assert "2 processes with ZeRO-2" in msg and "python -m scaleclr.engines.deepspeed export" in msg
        assert "config.MODEL.WEIGHTS_INIT.PARAMS_FILE" in msg
