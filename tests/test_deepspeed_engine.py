"""DeepSpeed engine (ZeRO 0-3) against the DDP reference engine: CPU, gloo, 2 processes, synthetic data.

Every run is ``numerics.base_overrides``: the quick synthetic config (ResNet-18, SyncBN, 32 px crops), 2 processes
x 4 images, one epoch of 3 steps (bf16 runs: 2 steps). Each ZeRO run is compared with DDP on the same processes
and data (tests/numerics.py says where every limit comes from):
* step 1, same weights and images: the loss within the rounding floor, every tensor within 1e-3 of its own update
  (the runs differ only in the order in which LARC / clipping norms are summed);
* later steps: the losses and the final state as close to DDP as DDP on 1 process x 8 images is to DDP on 2 x 4
  (the same global batch in another reduction order: ``numerics.noise_run``), times 4, or within the floor.
  (A ReLU input within rounding of zero can take the other branch in one run; that is noise, not an engine bug.)
The negative control runs LARC on DeepSpeed's flat partitions (the test replaces the partition bookkeeping with an
empty one, so every flat partition is normed as if it were one parameter) and must fail those checks by >10x.
Exact (the same operations on the same values): activation checkpointing, save/stop/resume, the launcher run,
the consolidated exports; BN buffers are equal on both ranks.

Cost: the matrix runs as one 2-process gloo job (``tests/dist_helpers.run_distributed``) that builds one
``Trainer`` per case, exactly as ``train.py``'s worker does; the DDP references shared with
tests/test_fsdp_engine.py are trained by whichever file runs first. The save/resume case also goes through the
real ``deepspeed --num_gpus 2 train.py --deepspeed_config ...`` launcher.
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
import numerics as nm  # noqa: E402
from dist_helpers import run_distributed  # noqa: E402
from numerics import BF16, LARC, OPTIONS, SGD  # noqa: E402

STAGES = (0, 1, 2, 3)


def ds(stage, json_name=None):
    return ["config.DISTRIBUTED.ENGINE=deepspeed",
            f"config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/{json_name or f'zero{stage}'}.json"]


# LARC variant: clip mode, zero-norm parameters (zero-initialised last BN of every block: no adaptation and no
# weight decay at step 1), BN/bias regularisation groups. (numerics.OPTIONS: clip mode, exclude_bias_and_norm
# groups, gradient clipping.)
VARIANT = ["config.OPTIMIZER.larc_config.clip=True", "config.MODEL.TRUNK.RESNETS.ZERO_INIT_RESIDUAL=True",
           "config.OPTIMIZER.regularize_bn=True", "config.OPTIMIZER.regularize_bias=False",
           "config.OPTIMIZER.weight_decay=0.0001"]
AC = ["config.MODEL.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING=True"]
# What each engine case is compared with: (DDP reference, overrides of both and of the noise run)
CASES = {"larc": LARC, "sgd": SGD, "variant": VARIANT, "options": OPTIONS, "bf16": BF16}
REF = {k: f"ddp_{k}" for k in CASES}

# (name, overrides, patch, save); one process group runs them in this order (ZeRO-3 last: it installs hooks on
# its model, nothing global, but that keeps the other cases independent of it). Plain SGD (no ZeroLARC) runs at
# ZeRO-2 only: the LARC cases step the same inner SGD on the same flat partitions at every stage.
RUNS = [("ddp_sgd", nm.DDP + SGD, None, False), ("ddp_variant", nm.DDP + VARIANT, None, False)]
RUNS += [(f"z{s}_larc", ds(s), None, True) for s in (0, 1, 2)]
RUNS += [("z2_sgd", ds(2) + SGD, None, False), ("z2_variant", ds(2) + VARIANT, None, False),
         ("z2_options", ds(2) + OPTIONS, None, False),
         ("negative_z2_partition_norms", ds(2), "flat_partitions", False)]
# stopped after 2 steps with a checkpoint: test_deepspeed_launcher_zero2_resume_export resumes it with the launcher
RUNS += [("z2_stop", ds(2) + ["config.TRAINER.MAX_ITERATIONS=2"], None, True)]
RUNS += [("z3_larc", ds(3), None, True), ("z3offload_larc", ds(3, "zero3_offload"), None, False),
         ("z3_variant", ds(3) + VARIANT, None, False), ("z3_options", ds(3) + OPTIONS, None, False),
         # activation checkpointing: ZeRO-3 is the case that must re-gather partitioned parameters for the recompute
         ("z3_ac_larc", ds(3) + AC + ["config.TRAINER.MAX_ITERATIONS=1"], None, False)]  # 1 step: see its test
# bf16: ZeRO-0 keeps one fp32 master per parameter (plain LARC math); ZeRO-3 partitions them
RUNS += [(f"z{s}_bf16", ds(s) + BF16, None, False) for s in (0, 3)]
# save after 2 steps, stop (the trainer and engine are discarded), resume in a fresh Trainer, finish
RUNS += [("z3_resume", ds(3) + ["config.TRAINER.MAX_ITERATIONS=2"], None, True), ("z3_resume", ds(3), None, True)]


def _train_cases(rank, world_size, base, runs):
    """One Trainer per case in this process group (what train.py's worker does); returns per case the Run
    (numerics.record: rank-averaged losses, rank 0 the full fp32 states after step 1 and the last step), the
    rank's BN buffers, the engine and optimizer names and DeepSpeed's gradient clipping."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from scaleclr.engines import deepspeed as ds_engine

    out = {}
    for i, (name, overrides, patch, save) in enumerate(runs):
        real_layouts = ds_engine.build_flat_layouts
        if patch == "flat_partitions":  # no partition bookkeeping: LARC norms DeepSpeed's flat partitions
            ds_engine.build_flat_layouts = lambda ds_optimizer: {}
        try:
            run, trainer = nm.train_case(rank, world_size, f"{base}/{name}", overrides, save=save)
            engine = trainer.engine
            out[f"{i}:{name}"] = {
                "run": run, "buffers": {n: b.detach().clone() for n, b in engine.module.named_buffers()},
                "engine": engine.name, "optimizer": type(engine.optimizer).__name__,
                "ds_clip": engine.ds.gradient_clipping() if engine.name == "deepspeed" else None,
                "param_dtypes": {str(p.dtype) for p in engine.module.parameters()}}
        finally:
            ds_engine.build_flat_layouts = real_layouts
        del trainer, engine
        gc.collect()
    return out


def result(matrix, name, rank=0, last=True):
    keys = [k for k in matrix[rank] if k.split(":", 1)[1] == name]
    return matrix[rank][keys[-1] if last else keys[0]]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    base = tmp_path_factory.mktemp("ds_matrix")
    runs = [(n, o, None, False) for n, o in nm.missing_references()] + RUNS
    results = run_distributed(_train_cases, 2, str(base), runs)
    nm.store_references({n: result(results, n)["run"] for n, _ in nm.missing_references()})
    return base, results


def run_of(matrix, name):
    """The Run of an engine case, or of a DDP reference (possibly trained by tests/test_fsdp_engine.py)."""
    _, results = matrix
    if name in nm.SHARED_REFERENCES:
        return nm.reference(name)
    return result(results, name)["run"]


def compare(matrix, name, case):
    """numerics.check_all of engine case ``name`` against DDP on the same overrides ``CASES[case]``."""
    return nm.check_all(run_of(matrix, name), run_of(matrix, REF[case]), nm.noise_run(CASES[case]), name)


def final(run):
    return run["states"][max(run["states"])]


@pytest.mark.parametrize("stage,use_larc", [(s, True) for s in STAGES] + [(2, False)])
def test_zero_matches_ddp(matrix, stage, use_larc):
    base, results = matrix
    case = "larc" if use_larc else "sgd"
    name = f"z{stage}_{case}"
    assert len(run_of(matrix, name)["losses"]) == nm.STEPS
    nm.assert_ok(compare(matrix, name, case))
    r = result(results, name)
    assert r["engine"] == "deepspeed"
    assert r["optimizer"] == ("ZeroLARC" if use_larc else "SGD")
    if use_larc:  # the consolidated fp32 export written with the final checkpoint holds the same weights
        exported = torch.load(base / name / "model_final_checkpoint_phase0_consolidated_fp32.torch",
                              weights_only=True)
        state = final(r["run"])
        assert exported["model"].keys() == state.keys()
        assert all(torch.equal(exported["model"][k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["z2_variant", "z3_variant", "z3_options"])
def test_larc_options_and_param_groups_match_ddp(matrix, name):
    """LARC clip mode, zero-norm handling, regularize_bn / regularize_bias and exclude_bias_and_norm groups under
    ZeRO equal DDP's single-process LARC."""
    case = name.split("_", 1)[1]
    nm.assert_ok(compare(matrix, name, case))
    if case == "variant":  # the zero-initialised BN weights moved (plain SGD step at step 1, then LARC); their
        ref = run_of(matrix, "ddp_variant")  # error is part of the checks above
        init = nm.noise_run(VARIANT)["init"]
        k = next(k for k in init if k.endswith("bn2.weight") and "layer1.0" in k)
        assert init[k].abs().max() == 0 and ref["states"][1][k].abs().max() > 0


def test_gradient_clipping_from_hydra_matches_ddp(matrix):
    """config.OPTIMIZER.gradient_clipping reaches DeepSpeed through "auto" and clips like DDP's clip_grad_norm_
    (numerics.OPTIONS, ZeRO-2: flat partitions; the exclude_bias_and_norm groups are plain SGD, so an unclipped
    gradient would move them ~1000x further at step 1)."""
    _, results = matrix
    assert result(results, "z2_options")["ds_clip"] == 0.05
    nm.assert_ok(compare(matrix, "z2_options", "options"))
    norms = run_of(matrix, "ddp_options")["clip_norms"]
    assert len(norms) == nm.STEPS and min(norms) > 10 * 0.05  # clipping is active at every step


def test_zero3_optimizer_state_offload_matches_ddp(matrix):
    nm.assert_ok(compare(matrix, "z3offload_larc", "larc"))


def test_bf16_zero3_matches_bf16_zero0(matrix):
    """DeepSpeed bf16 (bf16 weights, fp32 masters, BN in fp32): ZeRO-3's partitioned LARC follows ZeRO-0's
    per-parameter LARC: at step 1 (same bf16 forward and gradients) to rounding, after that as closely as two bf16
    DDP runs with different reduction orders follow each other; the export holds the fp32 masters; BN statistics
    stay fp32 (checked for every run in test_bn_buffers_equal_on_both_ranks)."""
    got, ref = run_of(matrix, "z3_bf16"), run_of(matrix, "z0_bf16")
    noise_1x8, noise_2x4 = nm.noise_run(BF16), run_of(matrix, "ddp_bf16")
    init = noise_1x8["init"]
    checks = nm.check_step1(got, ref, "z3_bf16 vs z0_bf16", init, torch.bfloat16)
    # the noise: DDP-bf16 1 x 8 against DDP-bf16 2 x 4, applied to ZeRO-3 against ZeRO-0 (both 2 x 4)
    n = len(ref["losses"])
    for s in range(1, n + 1):
        sample = abs(noise_1x8["losses"][s - 1] - noise_2x4["losses"][s - 1])
        floor = nm.loss_floor(ref["losses"][s - 1], s, torch.bfloat16)
        checks.append(nm.Check("z3_bf16 vs z0_bf16", f"step-{s} loss |diff|",
                               abs(got["losses"][s - 1] - ref["losses"][s - 1]),
                               max(nm.NOISE_FACTOR * sample, floor), f"bf16 noise {sample:.2g}, floor {floor:.2g}"))
    sample = nm.update_error(noise_1x8["states"][n], noise_2x4["states"][n], init, n)
    err = nm.update_error(final(got), final(ref), init, n)
    checks.append(nm.Check("z3_bf16 vs z0_bf16", f"step-{n} update error ({err.name})", err.value,
                           max(nm.NOISE_FACTOR * sample.value, nm.UPDATE_NOISE_FLOOR), f"bf16 noise {sample.value:.2g}"))
    nm.assert_ok(checks)
    _, results = matrix
    for name in ("z0_bf16", "z3_bf16"):  # bf16 really ran: DeepSpeed keeps bf16 weights in the module (BN casts
        assert result(results, name)["param_dtypes"] == {"torch.bfloat16"}, name  # its own up for the layer)
    for k, v in final(got).items():  # fp32 masters, not bf16-rounded weights
        if v.is_floating_point() and "running" not in k and v.numel() > 1000:
            assert not torch.equal(v, v.bfloat16().float()), k
            break


def test_negative_control_partition_trust_ratios_are_caught(matrix):
    """Plain LARC on DeepSpeed's flat partitions (one trust ratio per partition) must fail the comparison
    that the exact engine passes (test_zero_matches_ddp[2-True]), by a wide margin."""
    _, results = matrix
    assert result(results, "negative_z2_partition_norms")["optimizer"] == "ZeroLARC"  # the real class,
    nm.assert_fails(compare(matrix, "negative_z2_partition_norms", "larc"))  # without its partition bookkeeping


def test_activation_checkpointing_under_zero3_matches_ddp(matrix):
    """USE_ACTIVATION_CHECKPOINTING under DeepSpeed (ZeRO-3: the recompute re-gathers the partitioned
    parameters): the same run as without it, hence as DDP. The recompute repeats the same operations on the same
    values in the same process (deterministic CPU kernels), so the two runs are identical, not merely close. One
    step suffices: its state holds the whole effect of a step (gradients, BN statistics, LARC)."""
    got, plain = run_of(matrix, "z3_ac_larc"), run_of(matrix, "z3_larc")
    assert got["losses"] == plain["losses"][:1] and sorted(got["states"]) == [1]
    assert all(torch.equal(got["states"][1][k], plain["states"][1][k]) for k in plain["states"][1])


def test_save_stop_resume_equals_uninterrupted_zero3(matrix):
    """Stop after 2 steps, resume in a fresh Trainer from the checkpoint: step 3 repeats the uninterrupted run's
    operations on the restored values (fp32 masters, momentum, data position, RNG): identical."""
    base, results = matrix
    first, resumed = result(results, "z3_resume", last=False)["run"], result(results, "z3_resume")["run"]
    ref = run_of(matrix, "z3_larc")
    assert first["losses"] + resumed["losses"] == ref["losses"]
    assert sorted(first["states"]) == [1, 2] and sorted(resumed["states"]) == [3]
    assert all(torch.equal(first["states"][1][k], ref["states"][1][k]) for k in ref["states"][1])
    assert all(torch.equal(resumed["states"][3][k], ref["states"][3][k]) for k in ref["states"][3])
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
        state = final(r0["run"])
        for n, b in r0["buffers"].items():
            assert torch.equal(state[n].to(b.dtype), b.cpu()), (key, n)


# ----------------------------------------------------------------------------------- deepspeed launcher
def _launch(out_dir, *overrides, json_name="zero2.json"):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(ROOT))
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "train.py"),
           "--deepspeed_config", f"ds_configs/{json_name}", *nm.base_overrides(2, out_dir, overrides)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return r


def _free_port():
    from dist_helpers import free_port
    return free_port()


def step_losses(out_dir):
    recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def initial_state(overrides=()):
    """The model a run with ``overrides`` starts from (seeded by SEED_VALUE)."""
    from scaleclr import builders
    from scaleclr.config import load_config
    root, _ = load_config(nm.base_overrides(2, "/tmp/unused", overrides), world_size=2)
    return {k: v.detach().clone() for k, v in builders.build_model(root.config).state_dict().items()}


def test_deepspeed_launcher_zero2_resume_export(matrix, tmp_path):
    """`deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json` resumes (AUTO_RESUME) the
    ZeRO-2 checkpoint written after step 2 of 3 (case z2_stop) in a new launch, and the continued run matches the
    uninterrupted in-process ZeRO-2 run (the launcher may give its workers more threads, i.e. other reduction
    orders: step 1 to rounding, then within the reduction-order noise); the offline export of the mid-run
    checkpoint loads into scaleclr.models.ResNet without deepspeed."""
    base, _ = matrix
    shutil.copytree(base / "z2_stop", tmp_path, dirs_exist_ok=True)
    assert (tmp_path / "model_iteration2" / "scaleclr_meta.json").exists()
    _launch(tmp_path)
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(1, nm.STEPS + 1))
    final_export = torch.load(tmp_path / "model_final_checkpoint_phase0_consolidated_fp32.torch", weights_only=True)
    got = {"losses": [losses[s] for s in sorted(losses)], "states": {nm.STEPS: final_export["model"]}}
    ref = run_of(matrix, "z2_larc")
    loss1 = nm.Check("launcher z2", "step-1 loss |diff|", abs(got["losses"][0] - ref["losses"][0]),
                     nm.loss_floor(ref["losses"][0]), "same forward: rounding floor")
    nm.assert_ok([loss1] + nm.check_noise(got, ref, nm.noise_run(LARC), "launcher z2 vs in-process z2"))

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


# ---------------------------------------------------------------------------------------------- LOCAL_RANK
def test_local_rank_is_the_chosen_cuda_device_never_none(monkeypatch):
    """DeepSpeed sets its device from LOCAL_RANK: a bare ``cuda`` device (no index) used to export "None"."""
    from scaleclr.engines.deepspeed import deepspeed_local_rank

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # no GPU here: the current device is faked
    assert deepspeed_local_rank(torch.device("cuda", 2), {"LOCAL_RANK": "5"}) == "2"  # srun: rank 5 on cuda:2
    assert deepspeed_local_rank(torch.device("cuda"), {}) == "3"
    assert deepspeed_local_rank(torch.device("cpu"), {"LOCAL_RANK": "1"}) == "1"
    assert deepspeed_local_rank(torch.device("cpu"), {}) == "0"
    # negative control: the old expression, ``str(device.index)``, gives the string DeepSpeed cannot parse
    assert str(torch.device("cuda").index) == "None"
