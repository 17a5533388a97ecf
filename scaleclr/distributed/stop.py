"""Stopping on a signal (preemption, time limit, ``kill``): a handler that only sets a flag, and one small
collective at each step boundary where every rank agrees on the step to stop at.

    stop = StopSignal(parse_signals(["SIGUSR1", "SIGTERM"])).install()   # in every training process
    stop.bind(control_group())                                           # collectively, once
    ...
    if stop.agree(step):      # at each step boundary: one int all-reduce (MAX) over a CPU group
        save a checkpoint for `step`, exit with EXIT_RESUMABLE

Contracts:

- **The handler only records** the first signal's number and time (and counts repeats); a second signal
  during the save changes nothing, so the save completes under the usual atomic rules. Python runs the
  handler in the main thread between bytecodes, never inside a collective or a write.
- **Agreement**: :meth:`StopSignal.agree` all-reduces (MAX) the local signal number over ``group`` once per
  step; every rank calls it at the same step boundaries, so all ranks stop after the same step and no rank
  enters a collective the others have left. The message is a CPU tensor on a gloo group (under NCCL a
  separate gloo group, :func:`control_group`), so the hot path gains no host-device synchronisation.
- **Exit status** :data:`EXIT_RESUMABLE` (75, ``EX_TEMPFAIL``: "temporary failure, retry"): the run stopped on
  a signal after writing a checkpoint for the agreed step; rerunning the same command resumes it. A run that
  was signalled at its last step finishes normally and exits 0. 75 is unambiguous where 143 (128 + SIGTERM)
  is not: a shell reports 143 for a process killed by SIGTERM before it could save anything.
- **Launcher processes** (``train.py``'s spawn parent, one-task-per-node SLURM agents) forward the signals
  to their workers with :class:`SignalForwarder`; duplicates (SLURM signals every process of a step, the
  parent forwards again) are harmless because the flag is idempotent.
- **Data-loader workers** ignore the stop signals (``scaleclr.data.loader``'s ``worker_init_fn``): a worker
  that died of SIGTERM would make the DataLoader raise, and a worker has nothing to save.
- Once the worker's work is done (after its last collective), :meth:`StopSignal.ignore_from_now` sets the
  signals to SIG_IGN for the teardown: Python's finalisation resets its handlers to the default action, and a
  late signal (``srun --kill-on-bad-exit`` SIGTERMs the tasks still running when the first one exits 75, a
  spawn parent does the same) would otherwise kill a rank that has saved, turning its 75 into 143.
  :meth:`StopSignal.restore` is for library use and tests.
- Processes forked from a process with these handlers (data-loader workers, fork-started spawn workers before
  they install their own) ignore the inherited handler: it acts only in the process that installed it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["EXIT_RESUMABLE", "ALLOWED_SIGNALS", "parse_signals", "StopSignal",
           "SignalForwarder", "control_group"]

#: exit status of a run that stopped on a signal after checkpointing the agreed step (sysexits.h EX_TEMPFAIL)
EXIT_RESUMABLE = 75
ALLOWED_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGHUP", "SIGINT")


def parse_signals(names: Iterable[str], key: str = "config.TRAINER.STOP_SIGNALS") -> List[signal.Signals]:
    """``["SIGUSR1", "TERM"]`` -> ``[Signals.SIGUSR1, Signals.SIGTERM]`` (duplicates dropped, order kept).

    Raises:
        ValueError: a name outside :data:`ALLOWED_SIGNALS` (the message names ``key`` and what is allowed).
    """
    out: List[signal.Signals] = []
    for raw in names:
        name = str(raw).strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in ALLOWED_SIGNALS:
            raise ValueError(f"{key}: {raw!r} is not a stop signal; allowed: {', '.join(ALLOWED_SIGNALS)} "
                             "(SIGKILL and SIGSTOP cannot be caught)")
        sig = signal.Signals[name]
        if sig not in out:
            out.append(sig)
    return out


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopSignal:
    """The stop flag of one training process and the step-boundary agreement.

    Args:
        signals: the signals that request a stop (``parse_signals``); empty: never stops on a signal.

    Attributes:
        signum: the first signal received here (or requested), None before.
        received_at: ``time.time()`` when it arrived.
        count: how many stop signals arrived (repeats are recorded and otherwise ignored).
        agreed_step: the step all ranks agreed to stop after, None while training goes on.
        agreed_signum: the signal that stop was agreed for (the largest number over ranks).
        progress: steps done so far (the trainer sets it after each step; a plain int, no synchronisation).
        progress_at_signal: ``progress`` when the first signal arrived (so ``agreed_step - progress_at_signal``
            is the number of steps finished after the signal: at most the one in flight).
    """

    def __init__(self, signals: Sequence[int] = ()):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self.count = 0
        self.agreed_step: Optional[int] = None
        self.agreed_signum: Optional[int] = None
        self.progress = 0
        self.progress_at_signal: Optional[int] = None
        self._group = None
        self._distributed = False
        self._checked_step: Optional[int] = None
        self._reasserted = False
        self._previous: Dict[int, object] = {}
        self._pid: Optional[int] = None

    # ---------------------------------------------------------------------------------------- handlers
    def install(self) -> "StopSignal":
        """Install the handler for every configured signal (main thread only); returns ``self``."""
        if not self.signals:
            return self
        if not _in_main_thread():
            raise RuntimeError("StopSignal.install() must run in the main thread (Python delivers signals there)")
        self._pid = os.getpid()
        for s in self.signals:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(int(s), previous)
        return self

    def restore(self) -> None:
        """Put the handlers that were installed before :meth:`install` back."""
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def ignore_from_now(self) -> None:
        """Ignore the stop signals from now on (the work is done; see the module docstring)."""
        if self._previous and _in_main_thread() and os.getpid() == self._pid:
            for s in self.signals:
                signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited this handler: not ours to act on
            return
        self._record(signum)
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (self._handle, signal.default_int_handler):
            previous(signum, frame)  # chain a handler a host program installed before us (not KeyboardInterrupt)

    def _record(self, signum: int) -> None:
        self.count += 1
        if self.signum is None:
            self.signum, self.received_at, self.progress_at_signal = int(signum), time.time(), self.progress

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if ``signum`` had arrived (tests, launchers that learnt of a stop another way)."""
        self._record(signum)

    @property
    def requested(self) -> bool:
        """A stop signal arrived in this process (not yet agreed with the other ranks)."""
        return self.signum is not None

    @property
    def name(self) -> str:
        s = self.agreed_signum or self.signum
        return signal.Signals(s).name if s else "none"

    # -------------------------------------------------------------------------------------- agreement
    def bind(self, group=None) -> "StopSignal":
        """Use ``group`` (from :func:`control_group`) for :meth:`agree`; without a process group the local
        flag is the decision."""
        self._group = group
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        return self

    def agree(self, step: int) -> bool:
        """Whether every rank stops after ``step``: one all-reduce (MAX) of the local signal number per step.

        Call it on every rank at the same step boundaries; further calls for the same step, and every call
        after a stop was agreed, return the cached answer without communicating.
        """
        if self.agreed_step is not None:
            return True
        if step == self._checked_step:
            return False
        self._checked_step = step
        if not self._reasserted and step > 0:
            self._reassert()
        local = self.signum or 0
        if self._distributed:
            flag = torch.tensor([local], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            local = int(flag.item())
        if local:
            self.agreed_step, self.agreed_signum = step, local
        return self.agreed_step is not None

    def _reassert(self) -> None:
        """Re-register the handlers once, after the first step: a library that initialises lazily (an NCCL
        communicator at the first collective) may have replaced one at the C level (NCCL 2.12 took SIGUSR1)."""
        self._reasserted = True
        if self._previous and _in_main_thread() and os.getpid() == self._pid:
            for s in self.signals:
                signal.signal(s, self._handle)

    def seconds_since_signal(self) -> Optional[float]:
        """Seconds from the local signal to now (None when the stop came from another rank's signal)."""
        return None if self.received_at is None else time.time() - self.received_at


class SignalForwarder:
    """A launcher process's handler: forward each signal to the worker processes (``pids()``) and chain the
    handler that was installed before (e.g. submitit's; not Python's SIGINT handler: a KeyboardInterrupt would
    end the launcher's wait while its workers run on). Used by ``train.py``'s spawn parent, which starts
    its workers with the signals blocked so that none is lost or fatal before a worker's own handler is in.

    Args:
        signals: the workers' stop signals.
        pids: returns the PIDs of the live workers.
    """

    def __init__(self, signals: Sequence[int], pids: Callable[[], List[int]]):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.pids = pids
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    def install(self) -> "SignalForwarder":
        if _in_main_thread():
            for s in self.signals:
                self._previous[int(s)] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def forward(self, signum: int) -> None:
        """Send ``signum`` to every live worker."""
        if self.signum is None:
            self.signum = int(signum)
        for pid in self.pids():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # inherited by a fork-started worker before it installed its own
            return
        logger.info("received %s: forwarding it to the workers", signal.Signals(signum).name)
        self.forward(signum)
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # e.g. submitit's; never KeyboardInterrupt: the launcher keeps waiting


def control_group():
    """The process group for small control messages (the stop agreement): the default group when its backend
    is gloo, else a new gloo group over every rank. Collective when it creates a group: call it on every rank,
    once, at start-up. None without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "gloo":
        return None  # None = the default group
    return dist.new_group(backend="gloo")

