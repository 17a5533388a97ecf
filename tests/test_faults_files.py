"""Nothing lost, nothing silent (issue 17): files, runs and signals, each fault injected and each check with a
negative control (docs/faults.md lists the cases).

- export never replaces a file the user did not ask to replace, and never its own input;
- a run directory has one owner (``scaleclr.runlock``): live, stale, other-host, SLURM-requeue locks;
- resume verifies what it reads (``CheckpointManager.choose_resume``): missing, truncated, bit-rotted files,
  directory checkpoints; ``config.CHECKPOINT.ON_CORRUPT``;
- the spawn launcher forwards an interrupt sent to it alone, leaves no worker running and exits 0/1/2/75.

End to end (three train.py runs, 2 spawned gloo workers each, waits on metrics.jsonl, never sleeps): run A holds
the directory, run B on it exits 2 naming A's owner, SIGINT to A's launcher alone checkpoints (75) and releases
the lock; A's latest checkpoint is then truncated, run C resumes from the one before it (naming the bad one) and
SIGKILL of C's rank-1 worker makes C's launcher exit 1 with no worker left.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scaleclr.checkpoint import CheckpointManager, CheckpointUnreadable, unreadable_reason
from scaleclr.io import OutputExistsError, atomic_torch_save
from scaleclr.runlock import LOCK_FILE, RunDirLocked, RunLock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from train_helpers import EXIT_RESUMABLE, TWO, finish, last_logged_step, latest, start, wait_for_step  # noqa: E402


def export(*args):
    from scaleclr.export import main

    return main([str(a) for a in args])


@pytest.fixture
def weights(tmp_path):
    """A scaleclr export file of a ResNet-18 trunk (an input ``python -m scaleclr.export`` reads)."""
    from scaleclr.interchange.formats import scaleclr_payload
    from scaleclr.models import ResNet

    state = {f"trunk.{k}": v for k, v in ResNet(depth=18).state_dict().items()}
    path = tmp_path / "in.torch"
    torch.save(scaleclr_payload(state), path)
    return path


# -------------------------------------------------------------------------------------------------- export
def test_export_refuses_existing_out_unless_overwrite(weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.pth"
    out.write_bytes(b"the user's file")
    assert export(weights, out, "--format", "torchvision") == 2
    assert out.read_bytes() == b"the user's file"
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert export(weights, out, "--format", "torchvision", "--overwrite") == 0
    assert "conv1.weight" in torch.load(out, weights_only=True)
    # negative control: without the check the same command silently replaces the user's file
    out.write_bytes(b"the user's file")
    monkeypatch.setattr("scaleclr.export.check_output_path", lambda *a, **k: None)
    monkeypatch.setattr("scaleclr.export.atomic_torch_save", lambda obj, path, overwrite: torch.save(obj, path))
    assert export(weights, out, "--format", "torchvision") == 0 and out.read_bytes() != b"the user's file"


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "inside"])
def test_export_never_writes_its_input(weights, tmp_path, how):
    """OUT = CHECKPOINT (or a link to it, or a path inside a checkpoint directory): refused even with
    --overwrite, the input unchanged."""
    src, before = weights, weights.read_bytes()
    if how == "same":
        out = src
    elif how in ("symlink", "hardlink"):
        out = tmp_path / "link.torch"
        (os.symlink if how == "symlink" else os.link)(src, out)
    else:  # a directory checkpoint: OUT inside it
        src = tmp_path / "model_phase0"
        src.mkdir()
        out = src / "weights.torch"
    assert export(src, out, "--format", "scaleclr", "--overwrite") == 2
    assert weights.read_bytes() == before and (how != "inside" or not out.exists())


def test_export_input_overwrite_negative_control(weights, monkeypatch):
    """Without the check, `export CK CK --overwrite` destroys the checkpoint (a torchvision dict replaces it)."""
    monkeypatch.setattr("scaleclr.export.check_output_path", lambda *a, **k: None)
    assert export(weights, weights, "--format", "torchvision", "--overwrite") == 0
    assert "format" not in torch.load(weights, weights_only=True)


def test_no_clobber_write_does_not_replace_a_file_that_appears(tmp_path):
    """The final step of a no-overwrite write is a hard link: a file created meanwhile is not replaced."""
    out = tmp_path / "o.torch"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="appeared while writing"):
        atomic_torch_save({"a": 1}, str(out), overwrite=False)
    assert out.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["o.torch"]
    atomic_torch_save({"a": 1}, str(out))  # control: the default (checkpoints) replaces
    assert torch.load(out, weights_only=True) == {"a": 1}


# ------------------------------------------------------------------------------------------------ run lock
def _write_lock(d, **info):
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "slurm_job_id": None,
            "slurm_restart_count": "0", "token": "other"}
    (Path(d) / LOCK_FILE).write_text(json.dumps({**base, **info}))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_live_owner_and_takes_over_dead_one(tmp_path, caplog):
    with RunLock(str(tmp_path)) as mine:
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"] > 0
        with pytest.raises(RunDirLocked, match=rf"host {socket.gethostname()} pid {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
        assert mine.held
    assert not (tmp_path / LOCK_FILE).exists()  # released
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level(logging.WARNING, logger="scaleclr.runlock"):
        lock = RunLock(str(tmp_path)).acquire()
    assert f"pid {dead}" in caplog.text and f"no process {dead} runs" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.info["token"]
    lock.release()
    # negative control: the same lock naming a live process (this one) is not taken over
    _write_lock(tmp_path, pid=os.getpid())
    with pytest.raises(RunDirLocked):
        RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "other"


def test_lock_from_another_host_is_alive_until_not_refreshed(tmp_path):
    _write_lock(tmp_path, host="node-elsewhere", pid=1)
    with pytest.raises(RunDirLocked, match="host node-elsewhere pid 1"):
        RunLock(str(tmp_path), stale_s=600).acquire()
    old = time.time() - 601
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock(str(tmp_path), stale_s=600).acquire().release()


def test_lock_heartbeat_refreshes_mtime(tmp_path):
    lock = RunLock(str(tmp_path), stale_s=0.5).acquire()  # heartbeat every 0.1 s
    try:
        old = time.time() - 3600
        os.utime(tmp_path / LOCK_FILE, (old, old))
        deadline = time.monotonic() + 30
        while os.stat(tmp_path / LOCK_FILE).st_mtime < old + 1:  # an observable event: the mtime moves
            assert time.monotonic() < deadline, "the heartbeat never refreshed the lock"
            time.sleep(0.02)
    finally:
        lock.release()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path):
    _write_lock(tmp_path, host="node-a", pid=1, slurm_job_id="4242", slurm_restart_count="0")
    with pytest.raises(RunDirLocked):  # negative control: another step of the same job instance
        RunLock(str(tmp_path), environ={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "0"}).acquire()
    with pytest.raises(RunDirLocked):  # nor another job
        RunLock(str(tmp_path), environ={"SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "1"}).acquire()
    lock = RunLock(str(tmp_path), environ={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart_count"] == "1"
    lock.release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    _write_lock(tmp_path, token="someone-else")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "someone-else"


# ------------------------------------------------------------------------------------------ resume checks
def _record(d, name, step, payload=None, directory=False):
    m = CheckpointManager(str(d))
    path = Path(d) / name
    if directory:  # an FSDP-like directory: a torch.save client file and a raw shard
        path.mkdir()
        torch.save({"client_state": {"step": step}}, path / "client_state.torch")
        (path / "__0_0.distcp").write_bytes(os.urandom(4096))
    else:
        torch.save(payload or {"w": torch.randn(256, 256), "step": step}, path)
    m.record(str(path), "ddp", 0, step, False)
    return path


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["truncated", "bitflip", "missing", "dir_shard_truncated", "dir_client_bitflip"])
def test_resume_names_the_unreadable_checkpoint_and_falls_back(tmp_path, caplog, fault):
    older = _record(tmp_path, "model_iteration1.torch", 1)
    newer = _record(tmp_path, "model_iteration2" + ("" if fault.startswith("dir") else ".torch"), 2,
                    directory=fault.startswith("dir"))
    ref = torch.load(newer, weights_only=True) if not fault.startswith("dir") else None
    if fault == "truncated":
        newer.write_bytes(newer.read_bytes()[:1000])
        with pytest.raises(RuntimeError, match="central directory"):  # control: torch cannot read it
            torch.load(newer, weights_only=True)
    elif fault == "bitflip":
        _flip_bit(newer)
        # control: torch.load does not notice, the values are silently wrong
        assert not torch.equal(torch.load(newer, weights_only=True)["w"], ref["w"])
    elif fault == "missing":
        newer.unlink()
    elif fault == "dir_shard_truncated":
        shard = newer / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        _flip_bit(newer / "client_state.torch")
    m = CheckpointManager(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="scaleclr.checkpoint"):
        entry = m.choose_resume()
    assert entry["path"] == older.name and entry["abspath"] == str(older)
    assert str(newer) in caplog.text and "nothing is deleted" in caplog.text
    assert {"truncated": "truncated", "bitflip": "CRC-32", "missing": "missing",
            "dir_shard_truncated": "__0_0.distcp is truncated", "dir_client_bitflip": "CRC-32"}[fault] in caplog.text
    assert older.exists() and (fault == "missing" or newer.exists())  # nothing deleted
    with pytest.raises(CheckpointUnreadable, match=f"cannot resume from {newer}.*ON_CORRUPT=error"):
        m.choose_resume(on_corrupt="error")


def test_resume_verification_negative_control(tmp_path, monkeypatch):
    """Without the check, the bit-rotted latest checkpoint is the one chosen (and torch.load reads it)."""
    _record(tmp_path, "model_iteration1.torch", 1)
    newer = _record(tmp_path, "model_iteration2.torch", 2)
    _flip_bit(newer)
    monkeypatch.setattr("scaleclr.checkpoint.unreadable_reason", lambda d, e: None)
    assert CheckpointManager(str(tmp_path)).choose_resume()["path"] == newer.name


def test_no_readable_checkpoint_stops_instead_of_starting_afresh(tmp_path):
    only = _record(tmp_path, "model_iteration1.torch", 1)
    only.write_bytes(b"")
    with pytest.raises(CheckpointUnreadable, match="no readable checkpoint.*model_iteration1.torch"):
        CheckpointManager(str(tmp_path)).choose_resume()
    assert unreadable_reason(str(tmp_path), latest(tmp_path)) is not None
    assert CheckpointManager(str(tmp_path / "empty")).choose_resume() is None  # nothing recorded: fresh start


def test_keep_last_keeps_k_iteration_checkpoints(tmp_path):
    """KEEP_LAST=3 keeps the last three iteration checkpoints (the old slice kept one: with fewer than k
    candidates, ``prunable[len - k:]`` started at a negative index and dropped the older ones)."""
    m = CheckpointManager(str(tmp_path), keep_last=3)
    for step in range(1, 16):  # 4 steps per epoch: model_phase{E} at epoch ends
        name = f"model_phase{step // 4 - 1}.torch" if step % 4 == 0 else f"model_iteration{step}.torch"
        torch.save({"step": step}, tmp_path / name)
        m.record(str(tmp_path / name), "ddp", step // 4, step, False)
    kept = [h["path"] for h in m.read()["history"]]
    assert kept == ["model_phase0.torch", "model_phase1.torch", "model_phase2.torch", "model_iteration13.torch",
                    "model_iteration14.torch", "model_iteration15.torch"]
    assert sorted(p.name for p in tmp_path.glob("*.torch")) == sorted(kept)
    prunable = ["it13", "it14"]  # negative control: the old expression on two candidates with k = 3
    assert prunable[len(prunable) - 3:] == ["it14"]


def test_on_corrupt_is_validated():
    from scaleclr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"ON_CORRUPT.*'ignore'.*fallback.*error"):
        load_config(["config=test/integration_test/quick_simclr_synthetic", "config.CHECKPOINT.ON_CORRUPT=ignore"])
    with pytest.raises(ConfigError, match="LOCK_STALE_MINUTES"):
        load_config(["config=test/integration_test/quick_simclr_synthetic", "config.CHECKPOINT.LOCK_STALE_MINUTES=0"])


# ------------------------------------------------------------------------------------------ launcher signals
def test_launcher_exit_status_is_a_documented_one():
    from scaleclr.distributed.launch import exit_status

    assert [exit_status(c) for c in (0, 2, 75, 1, 3, -9, -15, None)] == [0, 2, 75, 1, 1, 1, 1, 1]
    # negative control: the old `exit_code or 1` handed a killed worker's -9 to sys.exit -> status 247
    r = subprocess.run([sys.executable, "-c", "import sys; sys.exit(-9 or 1)"])
    assert r.returncode == 247


def test_forwarder_never_raises_keyboardinterrupt_in_the_launcher():
    from scaleclr.distributed.stop import SignalForwarder

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    forwarded = []
    fwd = SignalForwarder([signal.SIGINT], lambda: []).install()
    fwd.forward = forwarded.append
    try:
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before the next bytecode
        assert forwarded == [signal.SIGINT]
        # negative control: chaining Python's SIGINT handler (the old forwarder) ends the launcher's wait
        with pytest.raises(KeyboardInterrupt):
            fwd._previous[int(signal.SIGINT)](signal.SIGINT, None)
    finally:
        fwd.restore()
        signal.signal(signal.SIGINT, previous)


def _children(pid):
    """The training workers the launcher ``pid`` started (not multiprocessing's resource tracker)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid and \
                        b"resource_tracker" not in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if \
        Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


@pytest.mark.dist
def test_lock_sigint_to_launcher_and_fallback_resume_end_to_end(tmp_path):
    """A holds the directory: B exits 2 naming A's rank-0 host and pid; SIGINT to A's launcher alone (SIGINT a
    stop signal) checkpoints the agreed step, exits 75, leaves no worker and releases the lock. A's latest
    checkpoint is truncated: C resumes from the one before it with a warning naming it; SIGKILL of C's rank-1
    worker makes C's launcher exit 1 with no worker left."""
    overrides = [*TWO, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1", "config.CHECKPOINT.KEEP_LAST=3",
                 "config.OPTIMIZER.num_epochs=50", "config.TRAINER.STOP_SIGNALS=[SIGUSR1,SIGTERM,SIGINT]"]
    a = start(tmp_path, *overrides)
    wait_for_step(tmp_path, 2, a)
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    workers = _children(a.pid)
    assert owner["pid"] in workers and len(workers) >= 2

    rc, _, err = finish(start(tmp_path, *overrides))
    assert rc == 2 and f"host {owner['host']} pid {owner['pid']}" in err, err[-4000:]
    assert "spawning" not in err  # refused by the launcher before any worker started

    os.kill(a.pid, signal.SIGINT)  # the launcher only
    rc, _, err = finish(a)
    assert rc == EXIT_RESUMABLE, err[-6000:]
    assert not [p for p in workers if _alive(p)] and not (tmp_path / LOCK_FILE).exists()
    s = latest(tmp_path)["step"]  # model_iteration{s}, or model_phase{E} when s ended an epoch

    previous = json.loads((tmp_path / "checkpoint.json").read_text())["history"][-2]["path"]
    bad = tmp_path / latest(tmp_path)["path"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    c = start(tmp_path, *overrides)
    wait_for_step(tmp_path, s + 1, c)
    c_workers = _children(c.pid)
    rank1 = [p for p in c_workers if p != json.loads((tmp_path / LOCK_FILE).read_text())["pid"]]
    os.kill(rank1[0], signal.SIGKILL)
    rc, _, err = finish(c)
    assert rc == 1, err[-6000:]
    assert f"cannot resume from {bad}: {bad.name} is truncated" in err, err[-6000:]
    assert f"resumed from {tmp_path / previous}" in err, "\n".join(l for l in err.splitlines() if "resum" in l)
    assert bad.exists() and last_logged_step(tmp_path) >= s + 1
    assert not [p for p in c_workers if _alive(p)]
