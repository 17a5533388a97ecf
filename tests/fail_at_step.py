"""Test helper: ``python tests/fail_at_step.py RANK STEP train.py <overrides>`` runs train.py with rank RANK
raising in the step that starts at step STEP (0-based). Patched here, in the launcher process; run the
workers with config.MULTI_PROCESSING_METHOD=fork so they inherit the patch."""
import runpy
import sys

from scaleclr.trainer import Trainer

rank, step = int(sys.argv[1]), int(sys.argv[2])
_train_step = Trainer.train_step


def failing_train_step(self, batch, data_time):
    if self.rank == rank and self.state.step == step:
        raise RuntimeError(f"injected failure at rank {rank}, step {step}")
    return _train_step(self, batch, data_time)


Trainer.train_step = failing_train_step
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
