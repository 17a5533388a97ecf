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
@pytest.mark.slow  # covered by test_sbatch_usr1_warning_checkpoints_requeues_and_resumes_exactly (2 srun tasks, == 1 process)
def test_srun_two_tasks_equal_one_process(tmp_path, reference):
    out, log = sbatch(tmp_path, ["--ntasks=2"], "")
    assert "launcher=slurm" in log
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    assert abs(got[1] - reference[1]) <= nm.loss_floor(reference[1]), (got, reference)


@pytest.mark.dist
@pytest.mark.skipif(not slurm_available(), reason="no local SLURM cluster (slurm/localhost_cluster.sh start)")
@pytest.mark.slow  # covered by the same agent launch: tests/test_train.py::test_slurm_one_task_per_node_agents_equal_one_process
def test_one_task_per_node_spawns_its_workers(tmp_path, reference):
    out, log = sbatch(tmp_path, ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2"], "--ntasks-per-node=1")
    assert "spawning 2 workers (node 0 of 1, world 2" in log
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    assert abs(got[1] - reference[1]) <= nm.loss_floor(reference[1]), (got, reference)


# --------------------------------------------------------------------------------- preemption / time limit
from train_helpers import (TWO, assert_models_equal, last_logged_step, load, records,  # noqa: E402
                           resumed_steps, run)

# The signal tests train 2 epochs x 12 steps (0.25 s a step on 2 cores), not the 8 steps of the preemption tests'
# reference: between the step a test sees in metrics.jsonl and the end of the run there must be seconds, not a
# step or two, for the test's polling (0.5 s) and SLURM's scheduling of the preempting job. With 8 steps the
# preemption landed after the run had completed (a CI failure: COMPLETED, Restarts=1).
LONG = [*TWO, "config.DATA.TRAIN.DATA_LIMIT=96"]
STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted_long(tmp_path_factory):
    """The same run as the signal tests', uninterrupted: the weights they must equal bitwise."""
    out = tmp_path_factory.mktemp("uninterrupted_long")
    run(out, *LONG)
    return out

SLURM_CPU = ["--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]  # README's CPU line
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def partitions():
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    return {p.rstrip("*") for p in r.stdout.split()}


def submitit_available():
    import importlib.util
    return importlib.util.find_spec("submitit") is not None


needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no local SLURM cluster (slurm/localhost_cluster.sh "
                                 "start; .ci/run starts it)")


def job(jid):
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_job(jid, pred, what, timeout=420):
    deadline = time.monotonic() + timeout
    while True:
        info = job(jid)
        if pred(info):
            return info
        if info.get("JobState") in TERMINAL or time.monotonic() > deadline:
            subprocess.run(["scancel", str(jid)], timeout=30)
            pytest.fail(f"job {jid}: waited for {what}, got {info.get('JobState')} (Restarts={info.get('Restarts')})")
        time.sleep(0.5)


def wait_step(out, step, jid, timeout=420):
    """Until metrics.jsonl shows `step` (the job is training past it)."""
    wait_job(jid, lambda _: last_logged_step(out) >= step, f"step {step} in {out}/metrics.jsonl", timeout)


def submit_template(tmp_path, out):
    env = dict(os.environ, PY=sys.executable, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = ["sbatch", "--parsable", *SLURM_CPU, f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch",
           "config=test/integration_test/quick_simclr_synthetic", "config.MACHINE.DEVICE=cpu",
           f"config.CHECKPOINT.DIR={out}", *[o for o in LONG if "NUM_PROC_PER_NODE" not in o]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=True)
    return r.stdout.strip().split(";")[0]


def preempt():
    """A one-CPU job in the high-priority partition: SLURM preempts the low-priority job to run it."""
    r = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--ntasks", "1", "--cpus-per-task", "1",
                        "--output=/dev/null", "--wrap", "true"], capture_output=True, text=True, timeout=60,
                       check=True)
    return r.stdout.strip()


def check_resumed_exactly(out, uninterrupted_long, stop):
    """The restart logged steps s+1.. (none redone), every step is logged once, the weights are equal."""
    assert resumed_steps(out, stop["time"]) == list(range(stop["step"] + 1, STEPS + 1))
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert_models_equal(load(out, "model_final_checkpoint_phase1.torch")["model"],
                        load(uninterrupted_long, "model_final_checkpoint_phase1.torch")["model"])


def stop_of_run(out, run_index):
    stops = [r for r in records(out) if "stop_signal" in r]
    return stops[run_index]


@pytest.mark.dist
@needs_slurm
def test_sbatch_usr1_warning_checkpoints_requeues_and_resumes_exactly(tmp_path, uninterrupted_long):
    """slurm/train.sbatch, 2 tasks: the time-limit warning (SIGUSR1, what --signal=USR1@s sends; injected with
    scancel --signal because SLURM's own timer is coarse) mid-epoch: both tasks checkpoint the agreed step and
    exit 75, the script requeues the job, the restart resumes and the job completes: Restarts=1, weights equal
    to the uninterrupted run's."""
    out = tmp_path / "run"
    jid = submit_template(tmp_path, out)
    wait_step(out, 2, jid)
    k = last_logged_step(out)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True, timeout=30)
    wait_job(jid, lambda j: j.get("Restarts") == "1", "the requeue")
    info = wait_job(jid, lambda j: j.get("JobState") == "COMPLETED", "completion")
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    stop = stop_of_run(out, 0)
    assert stop["stop_signal"] == "SIGUSR1" and stop["step"] >= k and stop["steps_after_signal"] <= 1, stop
    log = Path(f"{tmp_path}/job-{jid}.out").read_text()
    assert "requeueing job" in log and "run 2 on" in log
    check_resumed_exactly(out, uninterrupted_long, stop)


@pytest.mark.dist
@needs_slurm
@pytest.mark.skipif(slurm_available() and "urgent" not in partitions(), reason="the local cluster has no 'urgent' "
                    "partition to preempt from (slurm/localhost_cluster.sh configures debug < urgent)")
def test_real_preemption_requeues_and_resumes_exactly(tmp_path, uninterrupted_long):
    """Real preemption: slurm/train.sbatch in `debug` (PreemptMode=REQUEUE, GraceTime=20 s) is preempted by a
    one-CPU job in `urgent`. SLURM sends SIGTERM to the tasks; they finish the step in flight, checkpoint it
    and exit 75 within the grace time; the script requeues; the urgent job runs; the victim restarts, resumes
    at the next step and ends equal to the uninterrupted run. Time lost: the rest of one step plus the save
    (signal_to_checkpoint_s), and no step is trained twice."""
    out = tmp_path / "run"
    jid = submit_template(tmp_path, out)
    wait_step(out, 2, jid)
    k, sent = last_logged_step(out), time.time()
    urgent = preempt()
    wait_job(jid, lambda j: j.get("Restarts") == "1", "the requeue after preemption")
    info = wait_job(jid, lambda j: j.get("JobState") == "COMPLETED", "completion")
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert job(urgent).get("JobState") == "COMPLETED"
    stop = stop_of_run(out, 0)
    assert stop["stop_signal"] == "SIGTERM" and stop["step"] >= k and stop["steps_after_signal"] <= 1, stop
    assert stop["signal_to_checkpoint_s"] < 20  # within GraceTime
    print(f"\npreemption: urgent job submitted after step {k}; stopped after step {stop['step']} "
          f"({stop['steps_after_signal']} step finished after SIGTERM); SIGTERM -> checkpoint "
          f"{stop['signal_to_checkpoint_s']:.2f} s (save {stop['save_s']:.2f} s; {stop['time'] - sent:.2f} s after "
          f"the urgent submission); steps redone after resume: 0")
    check_resumed_exactly(out, uninterrupted_long, stop)


@pytest.mark.dist
@needs_slurm
@pytest.mark.skipif(not submitit_available(), reason="submitit is not installed (pip install -e '.[slurm]')")
@pytest.mark.skipif(slurm_available() and "urgent" not in partitions(), reason="no 'urgent' partition to preempt "
                    "from")
def test_submitit_route_survives_time_limit_signal_and_preemption(tmp_path, uninterrupted_long):
    """config.SLURM.USE_SLURM=True: train.py submits one task that spawns 2 workers (VISSL's layout). First
    submitit's time-limit signal (USR2, as --signal=USR2@SIGNAL_DELAY_S sends it): submitit calls
    TrainJob.checkpoint(), which waits for the workers' checkpoint, and requeues. Then a real preemption
    (SIGTERM): the workers checkpoint, the task hands over to submitit's requeue. Restarts=2, weights equal to
    the uninterrupted run's."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(ROOT),
                                                                              os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "train.py", "config=test/integration_test/quick_simclr_synthetic",
                        f"config.CHECKPOINT.DIR={out}", *LONG, "config.SLURM.USE_SLURM=True",
                        "config.SLURM.PARTITION=debug", f"config.SLURM.LOG_FOLDER={logs}",
                        "config.SLURM.NUM_CPU_PER_PROC=1", "config.SLURM.MEM_GB=2", "config.SLURM.TIME_HOURS=1"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]
    jid = r.stdout.split("submitted SLURM job ")[1].split()[0]
    assert f"logs: {logs}/{jid}_0_log.err" in r.stdout

    wait_step(out, 2, jid)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)  # submitit's time-limit signal
    wait_job(jid, lambda j: j.get("Restarts") == "1", "submitit's requeue after USR2")
    first = stop_of_run(out, 0)
    wait_step(out, first["step"] + 1, jid)
    urgent = preempt()
    wait_job(jid, lambda j: j.get("Restarts") == "2", "the requeue after preemption")
    info = wait_job(jid, lambda j: j.get("JobState") == "COMPLETED", "completion")
    assert info["Restarts"] == "2", info
    assert job(urgent).get("JobState") == "COMPLETED"
    second = stop_of_run(out, 1)
    assert (first["stop_signal"], second["stop_signal"]) == ("SIGUSR2", "SIGTERM")
    assert first["step"] < second["step"] < STEPS
    submitit_log = (logs / f"{jid}_0_log.out").read_text()  # submitit's own log lines
    assert submitit_log.count("Calling checkpoint method") == 2 and submitit_log.count("Requeued job") == 2
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, STEPS + 1))
    assert_models_equal(load(out, "model_final_checkpoint_phase1.torch")["model"],
                        load(uninterrupted_long, "model_final_checkpoint_phase1.torch")["model"])


# ------------------------------------------------------------------------------------- config, no cluster
SUBMIT = ["config=test/integration_test/quick_simclr_synthetic", "config.SLURM.USE_SLURM=True"]


@pytest.mark.skipif(not submitit_available(), reason="submitit is not installed (pip install -e '.[slurm]')")
@pytest.mark.parametrize("override,message", [
    ("config.SLURM.PARTITION=", r"config\.SLURM\.PARTITION: is empty"),
    ("config.SLURM.TIME_HOURS=0", r"config\.SLURM\.TIME_HOURS: = 0 with TIME_MINUTES = 0"),
    ("config.SLURM.PORT_ID=70000", r"config\.SLURM\.PORT_ID: = 70000 is not a TCP port"),
    ("config.SLURM.MEM_GB=0", r"config\.SLURM\.MEM_GB: must be > 0"),
    ("config.SLURM.SIGNAL_DELAY_S=99999999", r"config\.SLURM\.SIGNAL_DELAY_S: = 99999999 s is not shorter"),
    ("config.TRAINER.STOP_SIGNALS=[]", r"config\.TRAINER\.STOP_SIGNALS: is empty but USE_SLURM=True"),
])
def test_slurm_keys_are_validated_naming_the_key(override, message):
    from scaleclr.config import ConfigError, load_config

    overrides = SUBMIT + ([] if "PARTITION" in override else ["config.SLURM.PARTITION=debug"]) + [override]
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


@pytest.mark.skipif(not submitit_available(), reason="submitit is not installed (pip install -e '.[slurm]')")
def test_executor_parameters_follow_vissl():
    from scaleclr.config import load_config
    from scaleclr.slurm import executor_parameters

    root, _ = load_config(SUBMIT + ["config.SLURM.PARTITION=learnfair", "config.SLURM.CONSTRAINT=volta",
                                    "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=8",
                                    "config.MACHINE.DEVICE=gpu", "config.SLURM.TIME_HOURS=3",
                                    "config.SLURM.TIME_MINUTES=30", "+config.SLURM.ADDITIONAL_PARAMETERS.account=p"])
    assert executor_parameters(root.config) == {
        "name": "vissl", "slurm_partition": "learnfair", "timeout_min": 210, "nodes": 2, "tasks_per_node": 1,
        "cpus_per_task": 64, "mem_gb": 250, "slurm_signal_delay_s": 120, "gpus_per_node": 8,
        "slurm_comment": "vissl job", "slurm_constraint": "volta", "slurm_additional_parameters": {"account": "p"}}


def test_use_slurm_inside_a_launcher_is_refused(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RANK="0", WORLD_SIZE="1", TORCHELASTIC_RUN_ID="x",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not submitit_available():
        pytest.skip("submitit is not installed (pip install -e '.[slurm]')")
    r = subprocess.run([sys.executable, "train.py", *SUBMIT, "config.SLURM.PARTITION=debug",
                        f"config.CHECKPOINT.DIR={tmp_path}"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 2 and "config.SLURM.USE_SLURM: = True submits a job" in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------- slurm/net_env.sh (no cluster needed)
def _net_env(tmp_path, nodelist, route, **env):
    """Source slurm/net_env.sh as train.sbatch's srun line does, with scontrol / getent / ip stubbed: node01 and
    the given node list, ``ip route get`` answering ``route``. Returns (exported variables, stderr)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in {"scontrol": f"printf '%s\\n' {' '.join(nodelist)}",
                       "getent": "echo \"10.0.0.$(( ${#2} )) STREAM $2\"",
                       "ip": f"echo '{route}'"}.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.endswith("_SOCKET_IFNAME")}
    r = subprocess.run(["bash", "-c", '. slurm/net_env.sh && exec "$@"', "scaleclr", "sh", "-c",
                        'echo "${GLOO_SOCKET_IFNAME:-} ${NCCL_SOCKET_IFNAME:-}"'],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=30,
                       env={**base, "PATH": f"{stubs}:{base['PATH']}", "SLURMD_NODENAME": "node01",
                            "SLURM_JOB_NODELIST": "node[01-02]", **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.split(), r.stderr


def test_template_exports_the_interface_that_reaches_the_other_nodes(tmp_path):
    assert _net_env(tmp_path, ["node01", "node02"], "10.0.0.6 dev ib0 src 10.0.0.5 uid 0")[0] == ["ib0", "ib0"]


def test_template_keeps_the_users_interfaces(tmp_path):
    got, _ = _net_env(tmp_path, ["node01", "node02"], "10.0.0.6 dev ib0 src 10.0.0.5", GLOO_SOCKET_IFNAME="eth1")
    assert got == ["eth1", "ib0"]


def test_template_leaves_one_node_jobs_and_loopback_routes_alone(tmp_path):
    """Controls: one node (loopback works) and a route through lo (nothing better to say) export nothing."""
    assert _net_env(tmp_path, ["node01"], "10.0.0.6 dev ib0 src 10.0.0.5")[0] == []
    got, err = _net_env(tmp_path, ["node01", "node02"], "local 10.0.0.6 dev lo src 10.0.0.6")
    assert got == [] and "set GLOO_SOCKET_IFNAME yourself" in err


def test_template_sources_net_env_before_train_py():
    text = (Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch").read_text()
    assert """srun --kill-on-bad-exit=1 bash -c '. slurm/net_env.sh && exec "$@"' scaleclr "$PY" train.py""" in text
