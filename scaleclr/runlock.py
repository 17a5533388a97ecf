"""One owner per run directory: ``CHECKPOINT.DIR/.scaleclr.lock``.

Rank 0 of a run takes the lock before the run writes anything in ``CHECKPOINT.DIR`` (the trainer's first act)
and releases it when the run ends, normally, on an exception or after a stop signal's checkpoint. The file is
JSON: ``host``, ``pid``, ``started`` (Unix time), ``slurm_job_id`` and ``slurm_restart_count`` (when under
SLURM), ``token`` (unique per acquisition). A second run on the same directory stops with
:class:`RunDirLocked` (exit status 2) naming the owner.

Shared file systems: the lock is written to a temporary file and then hard-linked to its name, which is atomic
and fails when the name exists (the classic NFS-safe create; ``flock`` is not used, NFS may not honour it);
where the file system has no hard links, ``O_CREAT | O_EXCL`` is used. A reader never sees a half-written lock.

When the lock exists it is taken over (with a warning naming the previous owner) when the owner is gone:

* same host, and no process with that pid is alive;
* the same SLURM job (``SLURM_JOB_ID``) with another ``SLURM_RESTART_COUNT``: a requeued job takes over its
  own previous instance's lock, wherever that ran;
* another host whose lock was not refreshed for ``stale_s`` seconds (``config.CHECKPOINT.LOCK_STALE_MINUTES``):
  the owner refreshes the lock's mtime every ``stale_s / 5`` seconds (at most every 60 s) from a daemon
  thread, so a live owner, however long its steps, never looks stale.

Taking over renames the stale lock aside (only one of two racing runs can rename the same file), checks that
what it moved is the lock it judged stale, then creates its own with the atomic create above.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunDirLocked", "RunLock"]

LOCK_FILE = ".scaleclr.lock"


class RunDirLocked(ValueError):
    """Another live run owns the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def describe(owner: Dict[str, Any]) -> str:
    """``host ... pid ...`` (and the SLURM job) of a lock's owner, for messages."""
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else "?"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')}{job}, started {when}"


class RunLock:
    """The lock of one run directory.

    Args:
        directory: ``config.CHECKPOINT.DIR``.
        stale_s: a lock from another host whose mtime is older than this is taken over.
        environ: where ``SLURM_JOB_ID`` / ``SLURM_RESTART_COUNT`` are read (tests pass their own).
    """

    def __init__(self, directory: str, stale_s: float = 600.0, environ: Optional[Dict[str, str]] = None):
        env = os.environ if environ is None else environ
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.stale_s = float(stale_s)
        self.heartbeat_s = min(60.0, self.stale_s / 5)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "slurm_job_id": env.get("SLURM_JOB_ID") or None,
                     "slurm_restart_count": env.get("SLURM_RESTART_COUNT") or "0", "token": uuid.uuid4().hex}
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --------------------------------------------------------------------------------------- acquire
    def acquire(self) -> "RunLock":
        """Take the lock (taking over a stale one with a warning) and start the heartbeat; returns ``self``.

        Raises:
            RunDirLocked: a live run owns the directory (the message names its host and pid).
        """
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(3):  # a racing run may create or take over the lock between our steps
            if self._create():
                self.held = True
                self._start_heartbeat()
                return self
            owner = self.read()
            reason = self._stale_reason(owner)
            if reason is None:
                raise RunDirLocked(self._message(owner or {}))
            if self._move_aside(owner):
                logger.warning("taking over the run directory %s from %s: %s", self.directory,
                               describe(owner or {}), reason)
        raise RunDirLocked(f"could not take the lock {self.path}: other runs keep taking it")

    def check(self) -> None:
        """Raise :class:`RunDirLocked` now if a live run owns the directory (a launcher's early check before it
        starts workers; the lock itself is taken by rank 0 with :meth:`acquire`)."""
        owner = self.read()
        if owner is not None and self._stale_reason(owner) is None:
            raise RunDirLocked(self._message(owner))

    def _message(self, owner: Dict[str, Any]) -> str:
        return (f"{self.directory} is in use by another scaleclr run ({describe(owner)}; lock file {self.path}). "
                "Wait for it to finish, stop it, or use another config.CHECKPOINT.DIR. If that run is gone, "
                f"delete {self.path}.")

    def _create(self) -> bool:
        """Create the lock file with our content atomically; False if it exists."""
        tmp = f"{self.path}.{self.info['token']}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create (a reader may briefly see it empty)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            os.remove(tmp)

    def read(self) -> Optional[Dict[str, Any]]:
        """The lock's content (``{}`` while unreadable, e.g. being written), None when there is no lock."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, owner: Optional[Dict[str, Any]]) -> Optional[str]:
        """Why the existing lock may be taken over, or None when its owner may be alive."""
        if owner is None:
            return "the lock disappeared"
        me = self.info
        if owner.get("token") == me["token"]:
            return "it is this run's own lock"
        job = owner.get("slurm_job_id")
        if job and job == me["slurm_job_id"] and str(owner.get("slurm_restart_count")) != me["slurm_restart_count"]:
            return f"SLURM job {job} was requeued (restart {me['slurm_restart_count']})"
        if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int):
            return None if _pid_alive(owner["pid"]) else f"no process {owner['pid']} runs on {me['host']}"
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "the lock disappeared"
        if age > self.stale_s:
            return (f"the lock was not refreshed for {age / 60:.1f} min (> config.CHECKPOINT.LOCK_STALE_MINUTES="
                    f"{self.stale_s / 60:g})")
        return None

    def _move_aside(self, owner: Optional[Dict[str, Any]]) -> bool:
        """Rename the stale lock aside and drop it; False (nothing changed) if another run got there first."""
        if owner is None:
            return False
        aside = f"{self.path}.stale.{self.info['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            try:
                moved = json.load(f)
            except ValueError:
                moved = {}
        if owner and moved.get("token") != owner.get("token"):  # a new owner's lock: put it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    # ------------------------------------------------------------------------------ heartbeat, release
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="scaleclr-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.refresh()

    def refresh(self) -> None:
        """Touch the lock (its mtime is the owner's heartbeat); warns if it disappeared. (A run that took it over
        as stale is not noticed here: release() removes the lock only while it is still ours.)"""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            logger.warning("the run lock %s disappeared", self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.held:
            return
        self.held = False
        owner = self.read()
        if owner and owner.get("token") == self.info["token"]:
            os.remove(self.path)
        else:
            logger.warning("the run lock %s is no longer this run's (%s); left in place", self.path,
                           describe(owner or {}))

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
