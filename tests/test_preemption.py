"""Stopping on a signal (issue 12): every rank finishes its step, the ranks agree on the step, one checkpoint of
that exact step is written, the process exits 75, and the rerun resumes it bitwise-exactly.

Runs through train.py (spawn and torchrun, 2 gloo processes on CPU, synthetic data, a head with dropout so the
per-rank RNG states must be restored too) and, for the sharded engines, in-process with
``dist_helpers.run_distributed``. Signals are sent once metrics.jsonl shows a step (an observable event),
never after a sleep.
"""
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from train_helpers import (EXIT_RESUMABLE, QUICK, TWO, assert_every_step_logged_once, assert_models_equal,
                           assert_stopped_at_agreed_step, finish, last_logged_step, latest, load, records,
                           resumed_steps, run, start, stop_record, wait_for_step)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- spawn
@pytest.mark.dist
def test_sigterm_to_spawn_process_group_checkpoints_agreed_step_and_resumes_exactly(uninterrupted, tmp_path):
    """SIGTERM to the whole process group (what SLURM does: the launcher, both workers and their 2 data-loader
    workers each get it; the launcher also forwards it): the workers finish the step in flight, agree, write
    model_iteration{s}, exit 75; the loader workers neither die nor act. The rerun resumes at s + 1 (no step
    redone) and ends bitwise equal to the uninterrupted run; metrics.jsonl and TensorBoard hold every step
    once."""
    overrides = [*TWO, "config.DATA.NUM_DATALOADER_WORKERS=2"]
    proc = start(tmp_path, *overrides, new_session=True)
    wait_for_step(tmp_path, 2, proc)
    k, sent = last_logged_step(tmp_path), time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == EXIT_RESUMABLE, err[-6000:]
    assert "DataLoader worker" not in err and "killed by signal" not in err
    stop = assert_stopped_at_agreed_step(tmp_path, k)
    observed = stop["time"] - sent  # from sending the signal to the checkpoint being recorded
    print(f"\nspawn: SIGTERM after step {k}, stopped at {stop['step']}; signal -> checkpoint "
          f"{stop['signal_to_checkpoint_s']:.2f} s in the trainer ({observed:.2f} s observed), save "
          f"{stop['save_s']:.2f} s, step time {records(tmp_path)[0]['step_time']:.2f} s")

    resume_started = time.time()
    run(tmp_path, *overrides)
    assert resumed_steps(tmp_path, resume_started) == list(range(stop["step"] + 1, 9))  # 0 steps redone
    assert_models_equal(load(tmp_path, "model_final_checkpoint_phase1.torch")["model"],
                        load(uninterrupted, "model_final_checkpoint_phase1.torch")["model"])
    assert_every_step_logged_once(tmp_path, 8)
    ref_epochs = [r["epoch_loss"] for r in records(uninterrupted) if "epoch_loss" in r]
    assert [r["epoch_loss"] for r in records(tmp_path) if "epoch_loss" in r] == ref_epochs


@pytest.mark.dist
def test_second_signal_during_save_keeps_checkpoints_loadable(uninterrupted, tmp_path):
    """Rank 0 alone gets SIGTERM during step 3 (rank 1 learns of it through the agreement); while rank 0 writes
    model_iteration3 the launcher gets a second SIGTERM and forwards it to both workers. The save completes:
    the earlier iteration checkpoint and the new one load, the pointer names the new one, exit 75; the rerun
    finishes like the uninterrupted run."""
    overrides = [*TWO, "config.MULTI_PROCESSING_METHOD=fork", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2"]
    rc, _, err = finish(start(tmp_path, *overrides,
                              launcher=[sys.executable, str(ROOT / "tests" / "signal_during_save.py"), "2"]))
    assert rc == EXIT_RESUMABLE, err[-6000:]
    assert (tmp_path / "second_signal_sent").exists()
    assert stop_record(tmp_path)["step"] == 3 and latest(tmp_path)["path"] == "model_iteration3.torch"
    for name in ("model_iteration2.torch", "model_iteration3.torch"):
        assert load(tmp_path, name)["client_state"]["train_state"]["step"] == int(name[15])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    run(tmp_path, *overrides)
    assert_models_equal(load(tmp_path, "model_final_checkpoint_phase1.torch")["model"],
                        load(uninterrupted, "model_final_checkpoint_phase1.torch")["model"])


# ----------------------------------------------------------------------------------------------- torchrun
@pytest.mark.dist
def test_sigterm_to_torchrun_is_forwarded_and_resumes_exactly(uninterrupted, tmp_path):
    """SIGTERM to the torchrun agent only: torchrun forwards SIGTERM to its workers (and SIGKILLs them after
    30 s), the workers checkpoint the agreed step and exit 75, torchrun itself exits 1 (its SignalException);
    a second torchrun resumes and ends bitwise equal to the uninterrupted (spawn) run."""
    from dist_helpers import free_port

    def torchrun():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port())]

    proc = start(tmp_path, *TWO, launcher=torchrun())
    wait_for_step(tmp_path, 2, proc)
    k = last_logged_step(tmp_path)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc == 1 and "got signal: 15" in err, err[-6000:]
    stop = assert_stopped_at_agreed_step(tmp_path, k)
    run(tmp_path, *TWO, launcher=torchrun())
    assert_models_equal(load(tmp_path, "model_final_checkpoint_phase1.torch")["model"],
                        load(uninterrupted, "model_final_checkpoint_phase1.torch")["model"])
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == list(range(1, 9))
    assert stop["step"] < 8


# ------------------------------------------------------------------------------------ deepspeed launcher
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.slow  # covered by the DeepSpeed engine's stop: test_stop_request_checkpoints_exactly_that_step_for_every_engine[deepspeed]; the launcher: tests/test_deepspeed_engine.py::test_deepspeed_launcher_zero2_resume_export
def test_sigterm_to_deepspeed_launcher_process_group_checkpoints_agreed_step(tmp_path):
    """`deepspeed --num_gpus 2 train.py --deepspeed_config ds_configs/zero2.json`, SIGTERM to its process group
    (a terminal's Ctrl-C or SLURM do the same; the outer `deepspeed` command itself forwards nothing on one
    node): deepspeed.launcher.launch SIGTERMs each worker's process tree, the workers checkpoint the agreed
    step (a ZeRO-2 directory) and exit 75."""
    import shutil

    from dist_helpers import free_port

    pytest.importorskip("deepspeed")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    proc = start(tmp_path, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
                 "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
                 launcher=[launcher, "--num_gpus", "2", "--master_port", str(free_port())], new_session=True,
                 extra_args=["--deepspeed_config", "ds_configs/zero2.json"])
    wait_for_step(tmp_path, 2, proc)
    k = last_logged_step(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    finish(proc)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the launch process and the workers outlive the outer command
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the deepspeed launcher's processes did not exit after SIGTERM")
    stop = stop_record(tmp_path)
    s = stop["step"]
    assert s >= k and stop["checkpoint"] == f"model_iteration{s}" and stop["steps_after_signal"] <= 1, stop
    assert latest(tmp_path)["path"] == f"model_iteration{s}" and latest(tmp_path)["engine"] == "deepspeed"
    assert (tmp_path / f"model_iteration{s}" / "scaleclr_meta.json").exists()
    assert last_logged_step(tmp_path) == s


# ----------------------------------------------------------------------------------------- every engine
def _stop_at_step_body(rank, world, out, engine_overrides, k):
    """Rank 1 requests a stop while training step k (as its signal handler would); every rank must stop after
    step k and the engine's checkpoint of step k must be the latest."""
    from scaleclr.config import load_config
    from scaleclr.distributed.stop import StopSignal
    from scaleclr.trainer import Trainer

    root, _ = load_config([QUICK, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
                           "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", f"config.CHECKPOINT.DIR={out}",
                           "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False", *engine_overrides],
                          world_size=world)
    tr = Trainer(root, rank=rank, world_size=world, local_rank=rank, local_world_size=world, stop=StopSignal())
    step = tr.train_step

    def train_step(batch, data_time):
        if rank == 1 and tr.state.step == k - 1:
            tr.stop.request(signal.SIGUSR1)
        return step(batch, data_time)

    tr.train_step = train_step
    results = tr.train()
    return {"stopped_by": results.get("stopped_by"), "step": tr.state.step}


@pytest.mark.dist
@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_stop_request_checkpoints_exactly_that_step_for_every_engine(engine, tmp_path):
    from dist_helpers import run_distributed

    overrides = {"fsdp": ["config.DISTRIBUTED.ENGINE=fsdp"],
                 "deepspeed": ["config.DISTRIBUTED.ENGINE=deepspeed",
                               "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero2.json"]}[engine]
    r0, r1 = run_distributed(_stop_at_step_body, 2, str(tmp_path), overrides, 3)
    for r in (r0, r1):
        assert r["step"] == 3 and r["stopped_by"]["signal"] == "SIGUSR1", r
    assert latest(tmp_path)["path"] == "model_iteration3" and latest(tmp_path)["engine"] == engine
    assert (tmp_path / "model_iteration3").is_dir()
    assert "steps_after_signal" not in r0["stopped_by"] and r1["stopped_by"]["steps_after_signal"] == 1


# ------------------------------------------------------------------------------------------------- units
def test_parse_signals_names_the_key_and_what_is_allowed():
    from scaleclr.config import ConfigError, load_config
    from scaleclr.distributed.stop import parse_signals

    assert parse_signals(["usr1", "SIGTERM", "TERM"]) == [signal.SIGUSR1, signal.SIGTERM]
    with pytest.raises(ValueError, match="SIGKILL and SIGSTOP cannot be caught"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ConfigError, match=r"config\.TRAINER\.STOP_SIGNALS: 'SIGFOO' is not a stop signal; "
                                          "allowed: SIGUSR1, SIGUSR2, SIGTERM, SIGHUP, SIGINT"):
        load_config([QUICK, "config.TRAINER.STOP_SIGNALS=[SIGTERM,SIGFOO]"])


def test_handler_records_first_signal_chains_and_restores():
    from scaleclr.distributed.stop import StopSignal

    seen = []
    before = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        stop = StopSignal([signal.SIGUSR2]).install()
        stop.progress = 5
        signal.raise_signal(signal.SIGUSR2)
        stop.progress = 6
        signal.raise_signal(signal.SIGUSR2)  # a second one changes nothing but the count
        assert (stop.signum, stop.count, stop.progress_at_signal) == (signal.SIGUSR2, 2, 5)
        assert seen == [signal.SIGUSR2, signal.SIGUSR2]  # the host program's handler still runs
        assert stop.agree(6) and stop.agreed_step == 6 and stop.agree(7) and stop.agreed_step == 6
        stop.restore()
        signal.raise_signal(signal.SIGUSR2)
        assert stop.count == 2 and len(seen) == 3
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_agree_is_one_decision_per_step():
    from scaleclr.distributed.stop import StopSignal

    stop = StopSignal([signal.SIGUSR2])
    assert not stop.agree(3)
    stop.request(signal.SIGUSR2)
    assert not stop.agree(3)  # step 3 was already decided (all ranks answered "go on")
    assert stop.agree(4) and stop.agreed_step == 4 and stop.name == "SIGUSR2"
