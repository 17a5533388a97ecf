"""Launcher detection from synthetic environments (Slurm hostlists expanded by a stubbed ``scontrol``),
process-group init and the barrier."""
import pytest
import torch.distributed as dist

from dist_helpers import free_port
from scaleclr.distributed.env import DistEnv, barrier, detect_launcher_env, init_process_group, parse_tasks_per_node

#: what the stub ``scontrol show hostnames`` answers (Slurm's expansion of these lists, written out by hand)
HOSTNAMES = {"node[01-03,07]": "node01 node02 node03 node07", "node[03,07]": "node03 node07", "a1,b2": "a1 b2"}


@pytest.fixture(autouse=True)
def scontrol(tmp_path, monkeypatch):
    """A stub ``scontrol`` first on PATH (as tests/test_slurm.py stubs it for slurm/net_env.sh): ``show hostnames``
    prints :data:`HOSTNAMES`' entry, exits 1 with Slurm's message for any other list; every call's arguments are
    appended to the returned log file."""
    stubs, log = tmp_path / "bin", tmp_path / "scontrol.log"
    stubs.mkdir()
    cases = "".join(f"    '{k}') printf '%s\\n' {v} ;;\n" for k, v in HOSTNAMES.items())
    (stubs / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$3" in\n{cases}'
                                    f'    *) echo "scontrol: error: Invalid hostlist: $3" >&2; exit 1 ;;\nesac\n')
    (stubs / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stubs}:/usr/bin:/bin")
    return log


def test_no_launcher_returns_none():
    assert detect_launcher_env({}) is None
    assert detect_launcher_env({"PATH": "/usr/bin", "HOME": "/root"}) is None


def test_torchrun():
    env = {"TORCHELASTIC_RUN_ID": "abc", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
           # srun + torchrun: the torchrun variables win over the SLURM ones
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert detect_launcher_env(env) == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1,
                                               master_addr="10.0.0.1", master_port=29400, launcher="torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "host0", "MASTER_PORT": "29500",
           "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "2"}
    got = detect_launcher_env(env, local_rank_arg=1)
    assert got == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, master_addr="host0",
                          master_port=29500, launcher="deepspeed")
    # --no_local_rank: recognised from deepspeed's own variables
    assert detect_launcher_env(env).launcher == "deepspeed"
    # only --local_rank (LOCAL_RANK missing from the environment)
    minimal = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    got = detect_launcher_env(minimal, local_rank_arg=0)
    assert (got.launcher, got.local_rank, got.local_world_size, got.node_rank) == ("deepspeed", 0, 2, 0)
    with pytest.raises(ValueError, match="disagrees"):
        detect_launcher_env(env, local_rank_arg=0)


def test_generic_env_launcher():
    got = detect_launcher_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert got == DistEnv(rank=1, local_rank=0, world_size=2, local_world_size=2, node_rank=0,
                          master_addr="127.0.0.1", master_port=29500, launcher="torchrun")
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_launcher_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="invalid rank 2 for world size 2"):
        detect_launcher_env({"RANK": "2", "WORLD_SIZE": "2"})


def _srun(**overrides):
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "node[01-03,07]"}
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_srun_multi_task_step():
    assert detect_launcher_env(_srun()) == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                                                   node_rank=1, master_addr="node01", master_port=23456,
                                                   launcher="slurm")
    # step values win: node list of the step, node id within the step, step tasks per node
    got = detect_launcher_env(_srun(SLURM_STEP_NODELIST="node[03,07]", SLURM_STEP_NODEID="0",
                                    SLURM_STEP_TASKS_PER_NODE="5,3", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="4",
                                    SLURM_PROCID="4"))
    assert (got.master_addr, got.node_rank, got.local_world_size, got.local_rank) == ("node03", 0, 5, 4)
    # hostlist "a1,b2", tasks per node "2,2"
    got = detect_launcher_env(_srun(SLURM_JOB_NODELIST="a1,b2", SLURM_TASKS_PER_NODE="2,2", SLURM_PROCID="2",
                                    SLURM_NTASKS="4", SLURM_LOCALID="0"))
    assert (got.master_addr, got.world_size, got.local_world_size, got.node_rank) == ("a1", 4, 2, 1)
    # only SLURM_NTASKS_PER_NODE
    got = detect_launcher_env(_srun(SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="4"))
    assert got.local_world_size == 4
    # MASTER_ADDR / MASTER_PORT exported by the sbatch script win
    got = detect_launcher_env(_srun(MASTER_ADDR="10.1.2.3", MASTER_PORT="31000"))
    assert (got.master_addr, got.master_port) == ("10.1.2.3", 31000)
    # one task per node (VISSL/submitit style): the task spawns its own workers
    node = detect_launcher_env(_srun(SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
                                     SLURM_TASKS_PER_NODE="1(x2)"))
    assert (node.world_size, node.local_world_size, node.node_rank) == (2, 1, 1)
    worker = node.for_spawned_worker(3, 8)
    assert (worker.rank, worker.world_size, worker.local_rank, worker.local_world_size, worker.launcher) == (
        11, 16, 3, 8, "spawn")
    with pytest.raises(ValueError, match="already started 4 processes"):
        detect_launcher_env(_srun()).for_spawned_worker(0, 2)


def test_slurm_outside_an_srun_step_is_not_a_launcher():
    # sbatch batch script running `python train.py` directly: task 0 of the job, no step id
    assert detect_launcher_env(_srun(SLURM_STEP_ID=None, SLURM_PROCID="0", SLURM_LOCALID="0",
                                     SLURM_NODEID="0")) is None
    # batch step id reported as a special value
    assert detect_launcher_env(_srun(SLURM_STEP_ID=str(0xFFFFFFFE), SLURM_PROCID="0")) is None
    # srun -N1 -n1: the one-task-per-node layout on one node (the task spawns NUM_PROC_PER_NODE workers)
    one = detect_launcher_env(_srun(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                                    SLURM_TASKS_PER_NODE="1"))
    assert (one.launcher, one.world_size, one.local_world_size) == ("slurm", 1, 1)
    # salloc shell (no SLURM_PROCID)
    assert detect_launcher_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}) is None


def test_master_is_the_first_host_scontrol_names(scontrol):
    """The master address comes from Slurm's own expansion (``scontrol show hostnames``); a single name needs none.
    Negative control: the unexpanded list is no host."""
    got = detect_launcher_env(_srun(SLURM_JOB_NODELIST="node[01-03,07]"))
    assert got.master_addr == "node01" != "node[01-03,07]"
    assert scontrol.read_text().splitlines() == ["show hostnames node[01-03,07]"]
    assert detect_launcher_env(_srun(SLURM_JOB_NODELIST="vm")).master_addr == "vm"
    assert len(scontrol.read_text().splitlines()) == 1  # no scontrol call for a single name


def test_hostlist_errors_name_the_variable_and_master_addr(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"SLURM_STEP_NODELIST='n\[3-1\]'.*exit status 1: scontrol: error: "
                                         r"Invalid hostlist.*export MASTER_ADDR"):
        detect_launcher_env(_srun(SLURM_STEP_NODELIST="n[3-1]"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"SLURM_JOB_NODELIST=.*scontrol is not on PATH; export MASTER_ADDR"):
        detect_launcher_env(_srun())
    assert detect_launcher_env(_srun(MASTER_ADDR="10.1.2.3")).master_addr == "10.1.2.3"  # no lookup needed


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("4(x2)") == [4, 4]
    assert parse_tasks_per_node("2,2") == [2, 2]
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("4(2)")


def test_dist_env_validation():
    with pytest.raises(ValueError, match="launcher"):
        DistEnv(0, 0, 1, 1, 0, "h", 1, "mpirun")
    with pytest.raises(ValueError, match="local rank"):
        DistEnv(0, 2, 4, 2, 0, "h", 1, "none")
    assert DistEnv(3, 1, 4, 2, 1, "h", 1, "spawn").num_nodes == 2


def test_barrier_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    barrier()


def test_init_process_group_single_rank():
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                  master_port=free_port(), launcher="none")
    with pytest.raises(ValueError, match="timeout_s"):
        init_process_group(env, "gloo", None, 0)
    init_process_group(env, "gloo", None, 30.0)
    try:
        assert dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) == (0, 1)
        barrier()
        init_process_group(env, "gloo", None, 30.0)  # already initialised with the same rank/world: no-op
        with pytest.raises(ValueError, match="already initialised"):
            init_process_group(DistEnv(1, 0, 2, 1, 1, "127.0.0.1", 1, "none"), "gloo", None, 30.0)
    finally:
        dist.destroy_process_group()
