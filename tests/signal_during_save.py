"""Test helper: ``python tests/signal_during_save.py STEP train.py <overrides>`` runs train.py (spawn, run the
workers with config.MULTI_PROCESSING_METHOD=fork so they inherit the patches) where

- rank 0 sends SIGTERM to itself while it trains the step after step STEP (no other rank gets a signal, so
  the stop after step STEP + 1 is learnt through the agreement);
- while rank 0 writes that stop checkpoint (after the data, before the rename), it sends SIGTERM to the
  launcher (which forwards it to every worker): a second signal during the save.

The parent's PID is written to ``$CHECKPOINT_DIR/second_signal_sent`` when the second signal is sent.
"""
import os
import runpy
import signal
import sys

from scaleclr import io
from scaleclr.trainer import Trainer

step = int(sys.argv[1])
_train_step = Trainer.train_step
_atomic_write = io._atomic_write


def signalling_train_step(self, batch, data_time):
    if self.rank == 0 and self.state.step == step:
        os.kill(os.getpid(), signal.SIGTERM)
    return _train_step(self, batch, data_time)


def signalling_atomic_write(path, write, binary, suffix="", **kw):
    def write_then_signal(f):
        write(f)
        if os.path.basename(path) == f"model_iteration{step + 1}.torch":
            os.kill(os.getppid(), signal.SIGTERM)
            with open(os.path.join(os.path.dirname(path), "second_signal_sent"), "w") as marker:
                marker.write(str(os.getppid()))
    return _atomic_write(path, write_then_signal, binary, suffix, **kw)


Trainer.train_step = signalling_train_step
io._atomic_write = signalling_atomic_write
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
