"""Helpers for tests that run train.py as a subprocess, read its outputs (losses, checkpoints), signal it and
check how it stopped and resumed (tests/test_train.py, test_linear_eval.py, test_preemption.py, test_slurm.py).
Waits are on observable events (a step in metrics.jsonl), with deadlines, never on sleeps.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = "config=test/integration_test/quick_simclr_synthetic"
DROPOUT_HEAD = ("config.MODEL.HEAD.PARAMS=[[mlp,{dims:[512,512],use_relu:true,use_dropout:true,"
                "skip_last_layer_relu_bn:false}],[mlp,{dims:[512,128]}]]")
TWO = ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", DROPOUT_HEAD]
EXIT_RESUMABLE = 75


def run_train_py(out_dir, *overrides, config=QUICK, launcher=(), env_extra=None, timeout=600, check=True):
    """``train.py config overrides`` (under ``launcher``) to completion, CPU only; asserts exit 0 unless not
    ``check``. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += [str(ROOT / "train.py"), config, f"config.CHECKPOINT.DIR={out_dir}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def step_losses(out_dir):
    recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def final_state(out_dir):
    latest = json.load(open(Path(out_dir) / "checkpoint.json"))["latest"]["path"]
    return torch.load(Path(out_dir) / latest, map_location="cpu", weights_only=True)


def assert_states_close(a, b, rtol=0, atol=0):
    """Every tensor of ``a`` close to ``b`` (default: equal). Only for runs that repeat the same operations on
    the same values (same process count, same kernels: resume, rerun); runs in another reduction order are
    compared with ``assert_equals_one_process``."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def _env():
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def start(out, *overrides, launcher=None, new_session=False, extra_args=()):
    """train.py (under `launcher`, e.g. torchrun) as a subprocess; `new_session`: its own process group."""
    cmd = [*(launcher or [sys.executable]), str(ROOT / "train.py"), *extra_args, QUICK,
           f"config.CHECKPOINT.DIR={out}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(out, *overrides, launcher=None):
    rc, _, err = finish(start(out, *overrides, launcher=launcher))
    assert rc == 0, err[-6000:]
    return err


def records(out):
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return recs


def last_logged_step(out):
    return max((r["step"] for r in records(out) if "loss" in r), default=0)


def wait_for_step(out, step, proc, timeout=300):
    """Until metrics.jsonl has the loss record of `step` (the run is past it); fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while last_logged_step(out) < step:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} in {out}/metrics.jsonl after {timeout} s")
        time.sleep(0.05)


def latest(out):
    return json.loads((Path(out) / "checkpoint.json").read_text())["latest"]


def load(out, name):
    return torch.load(Path(out) / name, map_location="cpu", weights_only=True)


def stop_record(out):
    recs = [r for r in records(out) if "stop_signal" in r]
    assert len(recs) == 1, recs
    return recs[0]


def assert_models_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_every_step_logged_once(out, steps):
    logged = [r["step"] for r in records(out) if "loss" in r]
    assert logged == list(range(1, steps + 1)), logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out) / "tb"))
    acc.Reload()
    tb_steps = [e.step for e in acc.Scalars("train/loss")]
    assert tb_steps == list(range(1, steps + 1)), tb_steps
    epoch_steps = [e.step for e in acc.Scalars("train/epoch_loss")]
    assert len(epoch_steps) == len(set(epoch_steps)), epoch_steps


def assert_stopped_at_agreed_step(out, k_seen):
    """The stop record, the pointer and the checkpoint all name the same step; no step after it ran."""
    stop = stop_record(out)
    s = stop["step"]
    assert s >= k_seen and stop["checkpoint"] == f"model_iteration{s}", stop
    assert latest(out)["path"] == f"model_iteration{s}.torch" and latest(out)["step"] == s
    state = load(out, f"model_iteration{s}.torch")["client_state"]["train_state"]
    assert state["step"] == s
    assert last_logged_step(out) == s  # the ranks stopped right after the agreed step
    assert stop["steps_after_signal"] <= 1, stop  # at most the step in flight when the signal arrived
    return stop


def resumed_steps(out, since):
    """Steps the resumed run logged (records written after `since`)."""
    return [r["step"] for r in records(out) if "loss" in r and r["time"] >= since]
