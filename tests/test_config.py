"""Every command of VISSL's SimCLR guide composes and means what the guide says; bad input is a clear error."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaleclr.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = "config=pretrain/simclr/simclr_8node_resnet"


def cfg(*overrides, world_size=None):
    root, info = load_config([BASE, *overrides] if not any(o.startswith("config=") for o in overrides)
                             else list(overrides), world_size=world_size)
    return root.config, info


def head_dims(c):
    return [m[1]["dims"] for m in c.MODEL.HEAD.PARAMS]


def test_8node_recipe_value_for_value():
    c, info = cfg()
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 64 and c.DATA.NUM_DATALOADER_WORKERS == 5
    assert [t["name"] for t in c.DATA.TRAIN.TRANSFORMS] == [
        "ImgReplicatePil", "RandomResizedCrop", "RandomHorizontalFlip", "ImgPilColorDistortion",
        "ImgPilGaussianBlur", "ToTensor", "Normalize"]
    assert c.MODEL.TRUNK.RESNETS.DEPTH == 50 and c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE == 8
    assert c.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE == "apex"
    assert c.LOSS.simclr_info_nce_loss.temperature == 0.1
    assert c.OPTIMIZER.use_larc and not c.OPTIMIZER.larc_config.clip
    assert c.OPTIMIZER.larc_config.trust_coefficient == 0.001 and c.OPTIMIZER.weight_decay == 1e-6
    assert c.OPTIMIZER.num_epochs == 100 and c.CHECKPOINT.CHECKPOINT_FREQUENCY == 5
    # inferred (spec 2.2, 6.1): world 64, 8192 rows, warmup 0.6 -> 4.8 then cosine
    assert info["world_size"] == 64 and c.LOSS.simclr_info_nce_loss.buffer_params.effective_batch_size == 8192
    lr = c.OPTIMIZER.param_schedulers.lr
    # float64 config arithmetic (products of a few decimals): approx's default rel 1e-6 absorbs their ~1e-16
    assert lr.schedulers[0].start_value == pytest.approx(0.6) and lr.schedulers[0].end_value == pytest.approx(4.8)
    assert lr.schedulers[1].start_value == pytest.approx(4.8)
    assert head_dims(c) == [[2048, 2048], [2048, 128]]


def test_4node_recipe():
    c, info = cfg("config=pretrain/simclr/simclr_4node_resnet")
    assert c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 128 and c.DISTRIBUTED.NUM_NODES == 4
    assert c.OPTIMIZER.num_epochs == 300 and info["global_batch_size"] == 4096
    assert c.OPTIMIZER.param_schedulers.lr.schedulers[0].start_value == pytest.approx(1.2)


def test_temperature_and_embedding_dim():
    c, _ = cfg("config.LOSS.simclr_info_nce_loss.temperature=0.2",
               "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=256")
    assert c.LOSS.simclr_info_nce_loss.temperature == 0.2
    assert head_dims(c)[-1][-1] == 256


def test_depth_and_width_head_follows_trunk():
    c, _ = cfg("config.MODEL.TRUNK.NAME=resnet", "config.MODEL.TRUNK.RESNETS.DEPTH=101")
    assert c.MODEL.TRUNK.RESNETS.DEPTH == 101 and head_dims(c) == [[2048, 2048], [2048, 128]]
    c, _ = cfg("config.MODEL.TRUNK.RESNETS.DEPTH=101", "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2")
    assert head_dims(c) == [[4096, 4096], [4096, 128]]


def test_model_groups():
    for name, depth, w, dims in [("resnet50_w2", 50, 2, 4096), ("resnet50_w4", 50, 4, 8192),
                                 ("resnet101", 101, 1, 2048)]:
        c, _ = cfg(f"+config/pretrain/simclr/models={name}")
        assert (c.MODEL.TRUNK.RESNETS.DEPTH, c.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER) == (depth, w)
        assert head_dims(c) == [[dims, dims], [dims, 128]]
    c, _ = cfg("+config/pretrain/simclr/models=resnext101")
    assert (c.MODEL.TRUNK.RESNETS.GROUPS, c.MODEL.TRUNK.RESNETS.WIDTH_PER_GROUP) == (32, 8)


def test_multicrop_switches_loss_and_infers_num_crops():
    c, info = cfg("+config/pretrain/simclr/transforms=multicrop_2x160_4x96")
    assert c.LOSS.name == "multicrop_simclr_info_nce_loss"
    assert c.LOSS.multicrop_simclr_info_nce_loss.num_crops == 6
    assert c.DATA.TRAIN.COLLATE_FUNCTION == "multicrop_collator"
    assert c.LOSS.multicrop_simclr_info_nce_loss.buffer_params.effective_batch_size == 4096


def test_plus_is_required_for_extra_groups():
    with pytest.raises(ConfigError, match=r"\+config/pretrain/simclr/transforms"):
        cfg("config/pretrain/simclr/transforms=multicrop_2x160_4x96")


def test_optimizer_and_syncbn_keys():
    c, _ = cfg("config.OPTIMIZER.num_epochs=100", "config.OPTIMIZER.use_larc=True",
               "config.OPTIMIZER.larc_config.clip=True", "config.OPTIMIZER.larc_config.trust_coefficient=0.02",
               "config.OPTIMIZER.larc_config.eps=1e-6", "config.OPTIMIZER.larc_config.exclude_bias_and_norm=True",
               "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True",
               "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE=pytorch", "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=0",
               "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1")
    assert c.OPTIMIZER.larc_config.clip and c.OPTIMIZER.larc_config.trust_coefficient == 0.02
    # one GPU: LR 0.3 x 64/256 = 0.075, warmup removed (one node) -> plain cosine
    lr = c.OPTIMIZER.param_schedulers.lr
    assert lr.name == "cosine" and lr.start_value == pytest.approx(0.075)


def test_head_examples_from_the_guide():
    three = ('config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[2048,2048],"use_relu":True}],'
             '["mlp",{"dims":[2048,2048],"use_relu":True}],["mlp",{"dims":[2048,128]}]]')
    c, _ = cfg(three)
    assert head_dims(c) == [[2048, 2048], [2048, 2048], [2048, 128]]
    wide = 'config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[2048,4096],"use_relu":True}],["mlp",{"dims":[4096,128]}]]'
    c, _ = cfg(wide)
    assert head_dims(c) == [[2048, 4096], [4096, 128]]


def test_explicit_head_contradicting_trunk_is_an_error():
    wide = 'config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[2048,4096],"use_relu":True}],["mlp",{"dims":[4096,128]}]]'
    with pytest.raises(ConfigError, match="WIDTH_MULTIPLIER=2 outputs 4096"):
        cfg(wide, "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2")
    with pytest.raises(ConfigError, match="embedding_dim=256"):
        cfg(wide, "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=256")


@pytest.mark.parametrize("override, match", [
    ("config.MODEL.TRUNK.RESNETS.DEPH=3", r"config.MODEL.TRUNK.RESNETS.DEPTH"),
    ("+config.MODEL.DEPTH=101", r"config.MODEL.TRUNK.RESNETS.DEPTH"),
    ("config.OPTIMIZER.larc_config.trust_coef=0.1", r"trust_coefficient"),
    ("config.LOSS.simclr_info_nce_loss.temperature=abc", r"temperature.*wrong type"),
    ("config.LOSS.simclr_info_nce_loss.temperature=0", r"temperature: must be > 0"),
    ("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=-4", r"BATCHSIZE_PER_REPLICA: must be > 0"),
    ("config.OPTIMIZER.name=adam", r"config.OPTIMIZER.name.*allowed values: sgd"),
    ("config.MODEL.TRUNK.RESNETS.DEPTH=77", r"DEPTH.*allowed values: 18, 34, 50"),
    ("config.DISTRIBUTED.ENGINE=horovod", r"ENGINE.*ddp, deepspeed, fsdp"),
    ("config.LOSS.simclr_info_nce_loss.impl=cuda", r"impl.*reference, streaming"),
    ("config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=3", r"GROUP_SIZE.*does not divide the world size 64"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        cfg(override)


def test_multicrop_counts_must_add_up():
    with pytest.raises(ConfigError, match=r"total_num_crops.*add up to 6"):
        cfg("+config/pretrain/simclr/transforms=multicrop_2x160_4x96",
            "config.DATA.TRAIN.TRANSFORMS.0.total_num_crops=5")


def test_missing_config_and_unknown_file():
    with pytest.raises(ConfigError, match="no config file selected"):
        load_config(["config.OPTIMIZER.num_epochs=3"])
    with pytest.raises(ConfigError, match="Could not find"):
        load_config(["config=pretrain/simclr/nope"])


def test_sqrt_scaling_rule():
    lin, _ = cfg("config=test/integration_test/quick_simclr_synthetic",
                 "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=true",
                 "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.3",
                 "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=256",
                 "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32")
    assert lin.OPTIMIZER.param_schedulers.lr.start_value == pytest.approx(0.3 * 32 / 256)
    sq, _ = cfg("config=test/integration_test/quick_simclr_synthetic",
                "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=true",
                "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value=0.3",
                "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=256",
                "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type=sqrt",
                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32")
    assert sq.OPTIMIZER.param_schedulers.lr.start_value == pytest.approx(0.3 * math.sqrt(32 / 256))


def test_true_world_drives_inference():
    c, info = cfg("config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", world_size=2)
    assert info["global_batch_size"] == 128 and c.LOSS.simclr_info_nce_loss.buffer_params.world_size == 2


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_dry_run_prints_yaml_on_stdout(tmp_path):
    r = run_cli(BASE, "+config/pretrain/simclr/transforms=multicrop_2x160_4x96",
                "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.DISTRIBUTED.NUM_NODES=1", "--dry-run")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["config"]["LOSS"]["multicrop_simclr_info_nce_loss"]["num_crops"] == 6
    assert "inferred" in r.stderr  # logs on stderr only
    r = run_cli(BASE, "config.MODEL.TRUNK.RESNETS.DEPH=3", "--dry-run")
    assert r.returncode == 2 and "config.MODEL.TRUNK.RESNETS.DEPTH" in r.stderr


def test_every_shipped_config_composes():
    base = ROOT / "configs" / "config"
    for f in sorted(base.rglob("*.yaml")):
        rel = f.relative_to(base).with_suffix("")
        if len(rel.parts) > 1 and rel.parts[-2] in ("models", "transforms", "optimization"):
            load_config([BASE, f"+config/{'/'.join(rel.parts[:-1])}={rel.parts[-1]}"])
        else:
            load_config([f"config={rel.as_posix()}"])


def test_inactive_loss_override_is_an_error():
    with pytest.raises(ConfigError, match="config.LOSS.multicrop_simclr_info_nce_loss.temperature instead"):
        cfg("+config/pretrain/simclr/transforms=multicrop_2x160_4x96", "config.LOSS.simclr_info_nce_loss.temperature=0.2")


@pytest.mark.parametrize("override, match", [
    ("config.MULTI_PROCESSING_METHOD=forksrv", "forkserver, spawn, fork"),
    ("config.CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM=0", ">= 1"),
    ("node_id=8", r"node_id: = 8 must be in \[0"),
])
def test_more_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        cfg(override)


def test_knn_eval_needs_its_data():
    with pytest.raises(ConfigError, match="config.KNN_EVAL.VAL_PATH"):
        cfg("config=quickstart", "config.KNN_EVAL.TRAIN_PATH=/tmp/x")
