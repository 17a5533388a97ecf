"""End-to-end training through train.py: single process, resume, NaN stop, checkpoint safety, and
N processes == 1 process (spawn and torchrun), failure propagation. CPU, gloo, synthetic data."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import numerics as nm
from train_helpers import assert_states_close, final_state, run_train_py, step_losses

ROOT = Path(__file__).resolve().parents[1]

QUICK = "config=test/integration_test/quick_simclr_synthetic"


def run(out_dir, *overrides, launcher=(), env_extra=None, timeout=600, check=True):
    return run_train_py(out_dir, *overrides, launcher=launcher, env_extra=env_extra, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """Reference: 1 process x 8 images, 2 epochs x 4 steps, SyncBN config + LARC."""
    out = tmp_path_factory.mktemp("single")
    run(out)
    return out


def test_single_process_run_outputs(single_run):
    files = set(os.listdir(single_run))
    assert {"train_config.yaml", "metrics.jsonl", "checkpoint.json", "model_phase0.torch",
            "model_final_checkpoint_phase1.torch", "tb"} <= files
    recs = [json.loads(line) for line in open(single_run / "metrics.jsonl")]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert {"epoch", "lr", "images_per_sec", "data_time", "step_time", "skipped_images"} <= r.keys()
    assert sum("epoch_loss" in r for r in recs) == 2
    state = final_state(single_run)
    assert state["client_state"]["train_state"] == {"epochs_done": 2, "step": 8, "step_in_epoch": 0}
    assert "larc" in state["optimizer"]


def test_resume_mid_epoch_equals_uninterrupted(single_run, tmp_path):
    run(tmp_path, "config.TRAINER.MAX_ITERATIONS=3")  # stops mid-epoch 0, saves model_iteration3
    assert (tmp_path / "model_iteration3.torch").exists()
    run(tmp_path)  # AUTO_RESUME continues from iteration 3
    ref, got = step_losses(single_run), step_losses(tmp_path)
    assert got.keys() == ref.keys()
    for s in ref:  # same process count, same kernels: the resumed run repeats the uninterrupted one exactly
        assert got[s] == ref[s], s
    assert_states_close(final_state(tmp_path)["model"], final_state(single_run)["model"])


def test_finished_run_is_not_repeated(single_run):
    before = (single_run / "metrics.jsonl").read_text()
    r = run(single_run)
    assert "already finished" in r.stderr and (single_run / "metrics.jsonl").read_text() == before


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    run(tmp_path, "config.TRAINER.MAX_ITERATIONS=4")  # model_phase0 written at the epoch end
    ckpt = tmp_path / "model_phase0.torch"
    before = ckpt.read_bytes(), (tmp_path / "checkpoint.json").read_text()
    r = run(tmp_path, "config.OPTIMIZER.param_schedulers.lr.start_value=1e30",
            "config.OPTIMIZER.use_larc=False", check=False)
    assert r.returncode != 0
    assert "not finite at step" in r.stderr and "last good checkpoint" in r.stderr
    assert (ckpt.read_bytes(), (tmp_path / "checkpoint.json").read_text()) == before


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from scaleclr import io
    from scaleclr.checkpoint import CheckpointManager
    from scaleclr.io import atomic_torch_save

    target = tmp_path / "model_phase0.torch"
    atomic_torch_save({"w": torch.ones(3)}, str(target))
    CheckpointManager(str(tmp_path)).record(str(target), "ddp", 1, 4, False)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"w": torch.zeros(3)}, str(target))
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert CheckpointManager(str(tmp_path)).latest()["path"] == "model_phase0.torch"


TWO_PROCESSES = ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"]
# 3 steps, a checkpoint after each (the step-1 states are compared below)
THREE_STEPS = ["config.TRAINER.MAX_ITERATIONS=3", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1"]


def state_after(out_dir, step):
    return torch.load(Path(out_dir) / f"model_iteration{step}.torch", map_location="cpu", weights_only=True)["model"]


def initial_state():
    """The model every run of the quick config starts from (seeded by SEED_VALUE)."""
    from scaleclr import builders
    from scaleclr.config import load_config
    root, _ = load_config([QUICK])
    return {k: v.detach().clone() for k, v in builders.build_model(root.config).state_dict().items()}


def as_run(out_dir, init=None):
    """A train.py output (THREE_STEPS) as a numerics Run: losses of steps 1-3, states after steps 1 and 3."""
    losses = step_losses(out_dir)
    return {"losses": [losses[s] for s in (1, 2, 3)], "states": {1: state_after(out_dir, 1), 3: state_after(out_dir, 3)},
            "init": init}


def assert_step1_equals_one_process(single_run, out_dir, label):
    """N processes x 8/N images vs 1 process x 8 images, the same global batch: step 1 is the same forward
    (same weights, same images) summed in another order, so its loss agrees to rounding (numerics.loss_floor).
    That is the exact claim: every later forward, and already step 1's backward, follow ReLU masks that can differ
    where an input lies within rounding of zero (tests/numerics.py), so later values are compared against that
    bound (test_two_processes_equal_one_process_spawn) or not at all."""
    ref, got = step_losses(single_run)[1], step_losses(out_dir)[1]
    nm.assert_ok([nm.Check(label, "step-1 loss |diff|", abs(got - ref), nm.loss_floor(ref),
                           "same forward, another reduction order")])


@pytest.fixture(scope="module")
def one_process_3steps(single_run):
    """1 process x 8 images, 3 steps, a checkpoint after each (the first 3 steps of single_run)."""
    out = Path(str(single_run) + "_3steps")
    run(out, *THREE_STEPS)
    return out


@pytest.fixture(scope="module")
def spawn_run(tmp_path_factory):
    """2 processes x 4 images (spawned by train.py with VISSL's default start method, forkserver; the quick
    config forks), 3 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("spawn")
    run(out, *TWO_PROCESSES, *THREE_STEPS, "config.MULTI_PROCESSING_METHOD=forkserver")
    return out


@pytest.mark.dist
def test_two_processes_equal_one_process_spawn(single_run, one_process_3steps, spawn_run):
    """2 processes x 4 images == 1 process x 8 images: SyncBN global, LARC on, gathered InfoNCE. Step 1: the same
    forward (loss to rounding); after it the state within numerics.relu_flip_bound of the update (a ReLU
    input within rounding of zero may take the other branch in one of the runs; missing or doubled gradient
    averaging, a wrong LR or a rank's own batch statistics move every tensor by O(1) of its update)."""
    assert_step1_equals_one_process(single_run, spawn_run, "spawn 2x4 vs 1x8")
    assert step_losses(one_process_3steps) == {s: step_losses(single_run)[s] for s in (1, 2, 3)}  # same run
    got_state = final_state(spawn_run)
    assert got_state["client_state"]["world_size"] == 2
    err = nm.update_error(state_after(spawn_run, 1), state_after(one_process_3steps, 1), initial_state(), 1)
    nm.assert_ok([nm.Check("spawn 2x4 vs 1x8", f"step-1 update error ({err.name})", err.value, nm.relu_flip_bound(),
                           "ReLU flip bound")])
    assert all(math.isfinite(v) for v in step_losses(spawn_run).values()) and sorted(step_losses(spawn_run)) == [1, 2, 3]


@pytest.mark.dist
def test_two_processes_equal_one_process_torchrun(single_run, spawn_run, tmp_path):
    """torchrun starts the same 2 workers (same world, same threads per worker) as the spawn launcher: the same
    computation, identical values; and like it, step 1 equals 1 process."""
    run(tmp_path, *TWO_PROCESSES, *THREE_STEPS,
        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(_free_port())))
    assert step_losses(tmp_path) == step_losses(spawn_run)
    assert_states_close(final_state(tmp_path)["model"], final_state(spawn_run)["model"])
    assert_step1_equals_one_process(single_run, tmp_path, "torchrun 2x4 vs 1x8")


@pytest.mark.dist
def test_launcher_world_must_match_config():
    """The launcher's world against NUM_NODES x NUM_PROC_PER_NODE, checked before any worker starts (the
    environment torchrun gives its 2 workers; torchrun's own runs: test_two_processes_equal_one_process_torchrun)."""
    from scaleclr.config import ConfigError, load_config
    from scaleclr.distributed.env import detect_launcher_env
    from scaleclr.main import preflight

    env = detect_launcher_env({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                               "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": "29500"})
    assert env.launcher == "torchrun" and env.world_size == 2
    root, _ = load_config([QUICK, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"], world_size=2)
    with pytest.raises(ConfigError, match=r"started 2 processes but config.DISTRIBUTED.NUM_NODES x "
                                          r"NUM_PROC_PER_NODE = 1 x 1 = 1"):
        preflight(root, env)
    preflight(load_config([QUICK, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"], world_size=2)[0], env)  # agree: fine


@pytest.mark.dist
def test_failing_rank_stops_every_process(tmp_path):
    """Rank 1 raises in its second step (tests/fail_at_step.py patches the trainer in the launcher process;
    workers are forked, so they inherit the patch): the launcher stops rank 0 and exits non-zero."""
    start = time.time()
    r = run(tmp_path, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
            "config.DISTRIBUTED.TIMEOUT_SECONDS=60", "config.MULTI_PROCESSING_METHOD=fork", check=False,
            launcher=(sys.executable, str(ROOT / "tests" / "fail_at_step.py"), "1", "1"))
    assert r.returncode != 0 and "injected failure at rank 1, step 1" in r.stderr
    assert time.time() - start < 120


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # covered by tests/test_knn.py (kNN evaluation) and tests/test_data.py::test_demo_data_prepared_once (the demo data); `make train` runs it
def test_demo_data_run_reports_knn(tmp_path):
    """The quickstart path on the bundled digit scans: kNN at init and after training, in metrics.jsonl."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "config=test/integration_test/quick_simclr",
                        f"config.CHECKPOINT.DIR={tmp_path}", "config.TRAINER.MAX_ITERATIONS=2",
                        "config.KNN_EVAL.ENABLED=True", "config.KNN_EVAL.DATASET_NAME=scaleclr_demo_digits",
                        "config.KNN_EVAL.IMAGE_SIZE=32"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "kNN top-1 (k=20)" in r.stdout
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    final = [x for x in recs if "knn_top1" in x][-1]
    assert 10.0 < final["knn_top1_init"] <= 100.0 and 10.0 < final["knn_top1"] <= 100.0


def _bn_buffers_after_save(rank, world_size, tmp):
    """Body for run_distributed: 2 DDP steps without SyncBN (per-rank BN stats), then save."""
    from scaleclr import builders
    from scaleclr.config import load_config
    from scaleclr.engines.ddp import DDPEngine

    root, _ = load_config([QUICK, "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=False",
                           "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"])
    c = root.config
    engine = DDPEngine(builders.build_engine_spec(c, world_size), torch.device("cpu"), rank, world_size)
    engine.setup(builders.build_model(c), builders.make_optimizer_factory(c))
    loss_fn = builders.build_loss(c)
    for _ in range(2):
        x = torch.randn(8, 3, 32, 32) * (rank + 1)  # different data per rank -> different BN stats
        engine.backward(loss_fn(engine.model(x)))
        engine.step()
        engine.zero_grad()
    engine.save(tmp, "model_phase0", {})
    return {k: v.clone() for k, v in engine.module.state_dict().items() if "running" in k}


@pytest.mark.dist
def test_bn_buffers_identical_across_ranks_at_checkpoint(tmp_path):
    from dist_helpers import run_distributed
    r0, r1 = run_distributed(_bn_buffers_after_save, 2, str(tmp_path))
    saved = torch.load(tmp_path / "model_phase0.torch", weights_only=True)["model"]
    for k in r0:
        assert torch.equal(r0[k], r1[k]) and torch.equal(r0[k], saved[k]), k


@pytest.mark.dist
@pytest.mark.slow  # covered by two nodes over tcp: test_slurm_one_task_per_node_agents_equal_one_process
def test_manual_multinode_tcp_equals_one_process(single_run, tmp_path):
    """VISSL's manual multi-node launch: the same command with node_id=0 and node_id=1 (here both on
    localhost), RUN_ID=host:port, INIT_METHOD=tcp."""
    port = _free_port()
    common = [sys.executable, str(ROOT / "train.py"), QUICK, f"config.CHECKPOINT.DIR={tmp_path}",
              "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
              f"config.DISTRIBUTED.RUN_ID=127.0.0.1:{port}", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
              "config.TRAINER.MAX_ITERATIONS=3"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(common + [f"node_id={n}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert sorted(step_losses(tmp_path)) == [1, 2, 3]
    assert_step1_equals_one_process(single_run, tmp_path, "tcp 2 nodes x 4 vs 1x8")


@pytest.mark.dist
def test_slurm_one_task_per_node_agents_equal_one_process(single_run, tmp_path):
    """VISSL's SLURM layout, srun --ntasks-per-node=1 over 2 nodes (here both on localhost, with the variables
    srun sets): each task spawns NUM_PROC_PER_NODE=2 workers; 2 nodes x 2 workers x 2 images == 1 x 8."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="", SLURM_JOB_ID="4242",
                   SLURM_STEP_ID="0", SLURM_PROCID=str(node), SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID="0",
                   SLURM_STEP_NODEID=str(node), SLURM_STEP_TASKS_PER_NODE="1(x2)", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        cmd = [sys.executable, str(ROOT / "train.py"), QUICK, f"config.CHECKPOINT.DIR={tmp_path}",
               "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
               "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=2", "config.TRAINER.MAX_ITERATIONS=3"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "spawning 2 workers (node 0 of 2, world 4" in outs[0][1]
    assert sorted(step_losses(tmp_path)) == [1, 2, 3]
    assert_step1_equals_one_process(single_run, tmp_path, "slurm 4x2 vs 1x8")


@pytest.mark.dist
@pytest.mark.slow  # covered by file init: every tests/dist_helpers.run_distributed job; bf16 DDP: tests/test_fsdp_engine.py and tests/test_engine_precision.py
def test_file_init_method_and_amp_bf16(tmp_path):
    """INIT_METHOD=file rendezvous, and bf16 autocast with BatchNorm kept in fp32."""
    run(tmp_path, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
        "config.DISTRIBUTED.INIT_METHOD=file", "config.TRAINER.MAX_ITERATIONS=2",
        "config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
        "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16")
    losses = step_losses(tmp_path)
    # finite and below InfoNCE's maximum over 16 views at T = 0.1: log(14 negatives) + 2 / T ~ 23
    assert len(losses) == 2 and all(v == v and abs(v) < 100 for v in losses.values())
    state = final_state(tmp_path)["model"]
    assert all(v.dtype == torch.float32 for k, v in state.items() if "bn" in k and v.is_floating_point())


@pytest.mark.dist
@pytest.mark.slow  # covered by tests/test_streaming_loss.py (distributed streaming loss and gradients == single-process reference)
def test_streaming_loss_trains_like_reference(single_run, one_process_3steps, spawn_run, tmp_path):
    """impl=streaming through train.py, 2 processes, against the reference loss on 2 processes: the same forward
    and ReLU masks, the loss gradient in another summation order. Step 1 to rounding (numerics.check_step1);
    steps 2-3 as close as 1 process is to 2 (the reduction-order noise, numerics.check_noise)."""
    run(tmp_path, "config.LOSS.simclr_info_nce_loss.impl=streaming", *TWO_PROCESSES, *THREE_STEPS)
    init = initial_state()
    got, ref, noise = as_run(tmp_path), as_run(spawn_run), as_run(one_process_3steps, init)
    nm.assert_ok(nm.check_all(got, ref, noise, "streaming vs reference loss"))
    assert_step1_equals_one_process(single_run, tmp_path, "streaming 2x4 vs 1x8")


@pytest.mark.slow  # covered by test_finished_run_is_not_repeated (the finished-run decision; OVERWRITE_EXISTING only here)
def test_rerun_after_max_iterations_and_overwrite_existing(tmp_path):
    run(tmp_path, "config.TRAINER.MAX_ITERATIONS=3")
    before = step_losses(tmp_path)
    run(tmp_path, "config.TRAINER.MAX_ITERATIONS=3")  # limit already reached: nothing more is trained
    assert step_losses(tmp_path) == before
    run(tmp_path, "config.TRAINER.MAX_ITERATIONS=2", "config.CHECKPOINT.OVERWRITE_EXISTING=True")
    assert sorted(step_losses(tmp_path)) == [1, 2]  # a fresh run, not a resume
    assert step_losses(tmp_path)[1] == before[1]  # the same process count and kernels: exactly the same step


@pytest.mark.dist
def test_device_augmentation_world_and_resume_invariance(tmp_path):
    """DEVICE_AUGMENTATION=on (CPU: the device stage runs in the training process): 2 processes x 4 images ==
    1 process x 8 images, and stop-at-step-3 + resume == uninterrupted, as on the all-host path. Views come
    from per-sample generators on the host, so every rank and every restart sees the same parameters; the
    comparisons are those of the host-path tests above (same tolerances, same reasons)."""
    on = ["config.DATA.TRAIN.DEVICE_AUGMENTATION=on"]
    ref = tmp_path / "ref"
    run(ref, *on, "config.TRAINER.MAX_ITERATIONS=5")
    two = tmp_path / "two"
    run(two, *on, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
        "config.TRAINER.MAX_ITERATIONS=3")
    assert sorted(step_losses(two)) == [1, 2, 3]
    assert_step1_equals_one_process(ref, two, "device augmentation 2x4 vs 1x8")
    want = step_losses(ref)
    resumed = tmp_path / "resumed"
    run(resumed, *on, "config.TRAINER.MAX_ITERATIONS=3")
    run(resumed, *on, "config.TRAINER.MAX_ITERATIONS=5")
    got = step_losses(resumed)
    assert got.keys() == want.keys()
    for s in want:  # same process count, same kernels: the resumed run repeats the uninterrupted one exactly
        assert got[s] == want[s], s
    assert_states_close(final_state(resumed)["model"], final_state(ref)["model"], rtol=0, atol=0)
