"""DeepSpeed JSON configs: "auto" is filled from the Hydra config (the single source of truth), explicit
contradictions are errors naming both keys, and all of it runs before any worker starts, without deepspeed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaleclr.config import ConfigError, load_config
from scaleclr.config.deepspeed_json import build_deepspeed_config, check_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["config=test/integration_test/quick_simclr_synthetic", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
         "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"]
SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]


@pytest.fixture(scope="module")
def cfg():
    root, _ = load_config(QUICK + ["config.OPTIMIZER.gradient_clipping=0.5", "config.MODEL.AMP_PARAMS.USE_AMP=True",
                                   "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
                                   "config.MODEL.AMP_PARAMS.AMP_DTYPE=bfloat16"])
    return root


def write(tmp_path, data, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_all_auto_and_filled_from_hydra(cfg, name):
    raw = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw[key] == "auto", key
    assert raw["bf16"]["enabled"] == raw["fp16"]["enabled"] == "auto"
    ds = build_deepspeed_config(cfg.config, world_size=2, path=f"ds_configs/{name}.json")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage"] == int(name[4])
    if name == "zero3_offload":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_fp32_and_fp16_and_clipping_off(tmp_path):
    root, _ = load_config(QUICK)
    ds = build_deepspeed_config(root.config, 2, "ds_configs/zero2.json")
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.0  # explicit 0: DeepSpeed would otherwise clip at 1.0
    root, _ = load_config(QUICK + ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch",
                                   "config.MODEL.AMP_PARAMS.AMP_DTYPE=float16"])
    ds = build_deepspeed_config(root.config, 2, "ds_configs/zero2.json")
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale"] == 0  # dynamic scaling settings stay the JSON's


def test_absent_keys_are_filled_and_equal_explicit_values_accepted(cfg, tmp_path):
    ds = build_deepspeed_config(cfg.config, 2, write(tmp_path, {"zero_optimization": {"stage": 1}}))
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    same = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.5, "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert build_deepspeed_config(cfg.config, 2, write(tmp_path, same))["train_batch_size"] == 8


@pytest.mark.parametrize("json_value, json_key, hydra_key", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu",
     "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4"),
    ({"train_batch_size": 64}, "train_batch_size", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4 x world size 2"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps", "scaleclr"),
    ({"gradient_clipping": 1.0}, "gradient_clipping", "config.OPTIMIZER.gradient_clipping=0.5"),
    ({"bf16": {"enabled": False}}, "bf16.enabled", "config.MODEL.AMP_PARAMS.USE_AMP=True, AMP_DTYPE=bfloat16"),
    ({"fp16": {"enabled": True}}, "fp16.enabled", "config.MODEL.AMP_PARAMS.USE_AMP=True, AMP_DTYPE=bfloat16"),
])
def test_explicit_value_contradicting_hydra_names_both(cfg, tmp_path, json_value, json_key, hydra_key):
    path = write(tmp_path, {"zero_optimization": {"stage": 2}, **json_value})
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(cfg.config, 2, path)
    msg = str(e.value)
    assert msg.startswith("config.DISTRIBUTED.DEEPSPEED_CONFIG")
    assert f"sets {json_key} = " in msg and hydra_key in msg and path in msg and '"auto"' in msg


@pytest.mark.parametrize("data, needle", [
    ({"optimizer": {"type": "Adam"}}, "'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({"torch_autocast": {"enabled": True}}, "'torch_autocast' section"),
    ({"zero_optimization": {"stage": 4}}, "allowed: 0, 1, 2, 3"),
    ({"steps_per_print": "auto"}, "give explicit values for steps_per_print"),
    ({"zero_allow_untested_optimizer": False}, "zero_allow_untested_optimizer"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True},
     "zero_force_ds_cpu_optimizer"),
])
def test_sections_scaleclr_owns_and_bad_values_are_errors(cfg, tmp_path, data, needle):
    with pytest.raises(ConfigError, match="config.DISTRIBUTED.DEEPSPEED_CONFIG") as e:
        build_deepspeed_config(cfg.config, 2, write(tmp_path, data))
    assert needle in str(e.value)


def test_missing_or_invalid_file(cfg, tmp_path):
    with pytest.raises(ConfigError, match="no such file.*zero2.json"):
        build_deepspeed_config(cfg.config, 2, str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_deepspeed_config(cfg.config, 2, str(bad))


def test_apex_amp_with_deepspeed_is_an_error(tmp_path):
    """Any engine: apex's AMP is refused while the config is validated, pointing at AMP_TYPE=pytorch."""
    with pytest.raises(ConfigError, match="AMP_TYPE=pytorch"):
        load_config(QUICK + ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_TYPE=apex",
                             "config.DISTRIBUTED.ENGINE=deepspeed",
                             "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero2.json"])


def test_preflight_uses_config_world_size(tmp_path):
    root, _ = load_config(QUICK + ["config.DISTRIBUTED.ENGINE=deepspeed",
                                   "config.DISTRIBUTED.DEEPSPEED_CONFIG=ds_configs/zero3.json"])
    assert check_deepspeed_config(root)["train_batch_size"] == 8


def test_cli_conflict_stops_before_any_worker_and_without_deepspeed(tmp_path):
    """train.py --deepspeed_config with a contradicting JSON exits 2 in preflight; this runs with deepspeed
    made unimportable, so checking the JSON never needs it (and never starts a worker)."""
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}})
    out = tmp_path / "run"
    code = ("import sys\n"
            "sys.modules['deepspeed'] = None  # as if not installed\n"
            "from scaleclr.main import main\n"
            f"sys.exit(main({QUICK + ['--deepspeed_config', path, f'config.CHECKPOINT.DIR={out}']!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train_micro_batch_size_per_gpu = 16" in r.stderr
    assert "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4" in r.stderr
    assert "spawning" not in r.stderr and not (out / "metrics.jsonl").exists()
