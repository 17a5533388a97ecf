"""The benchmark scripts stay runnable: ``benchmarks/gpu_check.py --cpu-smoke`` (every GPU section at toy sizes on
the CPU) and ``benchmarks/step_throughput.py --smoke``. Speed is measured by the scripts, never asserted here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for section in ("tests", "loss", "step", "device_aug", "sync_bn", "engine_memory"):
        assert section in res and "error" not in res[section], (section, res.get(section))
    # the GPU pass ran (pytest -m gpu) and was summarised: on a CPU every test skips, with the reason
    t = res["tests"]
    assert t["exit_status"] == 0 and t["skipped"] > 0 and t["passed"] == t["failed"] == t["errors"] == 0, t
    assert all("needs CUDA" in reason for reason in t["skip_reasons"]), t["skip_reasons"]
    assert res["loss"]["streaming_vs_reference"]["loss_rel"] < 1e-5  # fp32 vs fp32 over 256 rows
    # step rows: the two-stage data path on (float views from the device stage, for the bare loop too), eager and
    # compiled trainers, the bare loop on its own eager model
    rows = res["step"]
    assert [row["compile"] for row in rows] == [False, True]
    for row in rows:
        assert row["device_augmentation"] is True and row["channels_last"] is True, row
        assert row["bare_compiled_modules"] == 0 and row["trainer_img_s"] > 0 and row["bare_img_s"] > 0, row
    assert rows[0]["trainer_compiled_modules"] == 0 and rows[1]["trainer_compiled_modules"] > 0
    assert rows[1]["compile_backend"] == "aot_eager"
    assert res["device_aug"]["views_per_s"] > 0
    # SyncBN: the sync function ran (not the one-rank fallback) and is within its limits
    for name, chk in res["sync_bn"]["checks"].items():
        assert chk["ok"] and chk["sync_path"] and "SyncBatchNorm" in chk["grad_fn"], (name, chk)
    assert set(res["sync_bn"]["checks"]) == {"scaleclr_float32", "scaleclr_bfloat16"}
    assert set(res["engine_memory"]) == {"ddp", "fsdp", "zero1", "zero2", "zero3"}
    # the planner's prediction per engine was built (compared with max_memory_allocated on a GPU only)
    for name, m in res["engine_memory"].items():
        assert m["predicted_mib"] > 0 and m["comparison"].startswith("skipped"), (name, m)


def test_compiled_modules_counts_compiled_blocks():
    """Negative control of the bare loop's check (its model must be eager): blocks compiled in place (what the
    trainer does) and compiled wrappers are counted."""
    from step_throughput import compiled_modules

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert compiled_modules(model) == 0
    model[0].compile(backend="aot_eager")  # lazy: nothing is traced here
    assert compiled_modules(model) == 1
    assert compiled_modules(torch.compile(torch.nn.Linear(2, 2), backend="aot_eager")) == 1


@pytest.fixture
def one_rank_gloo():
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sync_bn_check_catches_the_fallback_and_a_broken_merge(one_rank_gloo, dtype):
    """gpu_check's SyncBN section: scaleclr's sync function passes; the two failures it must report do not: a
    module in a one-rank group (plain batch norm, not the sync path) and statistics of part of the batch."""
    import sync_bn_check as sbc
    from scaleclr.distributed.sync_bn import SyncBatchNorm

    case = sbc.make_case(8, 16, 8, dtype, "cpu")
    ref = sbc.reference64(case)
    assert sbc.compare(sbc.run_scaleclr(case, one_rank_gloo), ref, dtype)["ok"]
    broken = sbc.compare(sbc.run_scaleclr(case, one_rank_gloo, stats_rows=4), ref, dtype)
    assert broken["sync_path"] and not broken["ok"]
    bn = SyncBatchNorm(16)
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    x = case["x"].clone().requires_grad_()
    y = bn(x)  # one rank: falls back to plain batch norm
    y.backward(case["dy"])
    fallback = sbc.compare({"y": y.detach(), "dx": x.grad, "grad_fn": type(y.grad_fn).__name__}, ref, dtype)
    assert not fallback["sync_path"] and not fallback["ok"]


def test_junit_summary(tmp_path):
    from gpu_check import junit_summary

    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="4">'
                   '<testcase classname="tests.test_gpu" name="test_a"/>'
                   '<testcase classname="tests.test_gpu" name="test_b"><failure message="assert 1 == 2&#10;more"/>'
                   '</testcase><testcase classname="tests.test_gpu" name="test_c"><skipped message="needs CUDA"/>'
                   '</testcase><testcase classname="tests.test_gpu" name="test_d"><error message="boom"/></testcase>'
                   '</testsuite></testsuites>')
    s = junit_summary(xml)
    assert (s["passed"], s["failed"], s["errors"], s["skipped"]) == (1, 1, 1, 1)
    assert s["failing"][0] == {"id": "tests.test_gpu::test_b", "kind": "failure", "message": ["assert 1 == 2"]}
    assert s["skip_reasons"] == {"needs CUDA": 1}


def test_plan_accuracy_smoke(tmp_path, monkeypatch):
    """``benchmarks/plan_accuracy.py --smoke`` (R18, 64 px, DDP, fresh processes): the planner's per-image growth
    and absolute peak within ``PLAN_TOLERANCE`` of the measured ones. Negative control: a planner whose trace
    misses BatchNorm's outputs (saved for backward by the next ReLU / convolution) is caught on the same numbers."""
    import plan_accuracy
    from numerics import PLAN_TOLERANCE

    out = tmp_path / "plan_accuracy.json"
    r = subprocess.run([sys.executable, "benchmarks/plan_accuracy.py", "--smoke", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row, = json.loads(out.read_text())
    assert abs(row["per_image_error"]) <= PLAN_TOLERANCE and abs(row["absolute_error"]) <= PLAN_TOLERANCE, row
    monkeypatch.setattr(torch.nn.functional, "batch_norm", lambda x, *args, **kwargs: x)  # BN outputs not counted
    case = {k: row[k] for k in ("model", "size", "views", "dtype", "engine", "ac", "procs")}
    p1, p2 = (plan_accuracy.predict({**case, "batch": b}) for b in (row["b1"], row["b2"]))
    m1, m2 = row["measured"]
    assert (p2 - p1) / (m2 - m1) - 1 < -PLAN_TOLERANCE, (p1, p2, row)


def test_data_sources_smoke(tmp_path):
    """``benchmarks/data_sources.py --smoke`` (in this process: no second torch import): every case runs, the shard
    cases open a shard once per round instead of a file per sample, and the shard-block order stays in fewer files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_sources", ROOT / "benchmarks" / "data_sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = __import__("torch").get_num_threads()
    try:
        res = mod.run(8, 1, str(tmp_path), log=lambda *a: None)
    finally:
        __import__("torch").set_num_threads(threads)
    assert set(res["img_per_s_per_core"]) >= {"a_folder", "b_shards", "c_shards_max_side_320", "d_shards_shard_block"}
    assert res["files_opened_per_1000"]["a_folder"] == 1000  # negative control: the folder opens per sample
    assert res["files_opened_per_1000"]["b_shards"] <= 1000 / 8
    assert "b_shards/a_folder" in res["ratios"]
