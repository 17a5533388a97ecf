"""Linear evaluation's configuration: the ImageNet configs' protocols (LR after auto-scaling, epochs, head dims
for w2/w4), catalog paths in --dry-run, and the errors that name the key (linear-evaluation keys in pretraining,
classifiers that do not fit, labels beyond the classifier). The training itself: ``tests/test_linear_eval.py``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from linear_eval_helpers import ENV, SIMCLR_CFG, VISSL_CFG, make_trainer, quick

ROOT = Path(__file__).resolve().parents[1]


def test_imagenet_configs_compose_with_their_protocols():
    from scaleclr.config import load_config

    root, info = load_config([VISSL_CFG])
    c = root.config
    lr = c.OPTIMIZER.param_schedulers.lr
    assert info["global_batch_size"] == 256 and c.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 32
    assert lr.name == "multistep" and list(lr["values"]) == [0.01, 0.001, 0.0001, 0.00001]
    assert list(lr.milestones) == [8, 16, 24] and c.OPTIMIZER.num_epochs == 28
    assert (c.OPTIMIZER.nesterov, c.OPTIMIZER.momentum, c.OPTIMIZER.weight_decay, c.OPTIMIZER.regularize_bn) == \
        (True, 0.9, 0.0005, False)
    assert c.SEED_VALUE == 1 and c.TEST_EVERY_NUM_EPOCH == 1 and c.METERS.accuracy_list_meter.num_meters == 1
    assert c.MODEL.HEAD.PARAMS[0][0] == "eval_mlp" and list(c.MODEL.HEAD.PARAMS[0][1]["dims"]) == [2048, 1000]
    assert [t["name"] for t in c.DATA.TEST.TRANSFORMS] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert not c.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES
    for extra, dim in (("+config/benchmark/linear_image_classification/imagenet1k/models=resnet50_w2", 4096),
                       ("config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=4", 8192)):
        head = load_config([VISSL_CFG, extra])[0].config.MODEL.HEAD.PARAMS[0][1]
        assert head["in_channels"] == dim and list(head["dims"]) == [dim, 1000]

    root, info = load_config([SIMCLR_CFG])
    c = root.config
    lr = c.OPTIMIZER.param_schedulers.lr
    assert info["global_batch_size"] == 4096 and lr.name == "cosine"
    assert lr.start_value == pytest.approx(1.6) and lr.end_value == 0.0  # 0.1 x 4096 / 256, no warmup
    assert (c.OPTIMIZER.num_epochs, c.OPTIMIZER.weight_decay, c.OPTIMIZER.nesterov, c.OPTIMIZER.use_larc) == \
        (90, 0.0, True, False)
    assert list(c.MODEL.HEAD.PARAMS[0]) == ["mlp", {"dims": [2048, 1000]}] and c.MODEL.HEAD.PARAMS_MULTIPLIER == 0.0
    assert not c.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES
    w4 = load_config([SIMCLR_CFG, "+config/benchmark/linear_image_classification/imagenet1k/models=resnet50_w4"])[0]
    assert list(w4.config.MODEL.HEAD.PARAMS[0][1]["dims"]) == [8192, 1000]


def test_dry_run_prints_catalog_data_paths():
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), VISSL_CFG, "--dry-run"], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    catalog = json.load(open(ROOT / "configs" / "dataset_catalog.json"))["imagenet1k_folder"]
    assert f"{catalog['train'][0]} (dataset catalog: imagenet1k_folder)" in r.stderr
    assert f"{catalog['val'][0]} (dataset catalog: imagenet1k_folder)" in r.stderr
    assert "EVAL_MODE_ON: true" in r.stdout and "accuracy_list_meter" in r.stdout


@pytest.fixture(scope="module")
def composed():
    """The VISSL linear-eval config and a pretraining config, composed once (validation cases mutate copies)."""
    from scaleclr.config import compose

    return {"linear": compose([VISSL_CFG]), "pretrain": compose(["config=test/integration_test/quick_simclr_synthetic"])}


def _validate(root, changes, explicit=()):
    """validate + infer on a copy of ``root`` with ``changes`` ({key: python value}) applied, as load_config does."""
    import copy

    from omegaconf import OmegaConf

    from scaleclr.config.infer import infer
    from scaleclr.config.validate import validate

    root = copy.deepcopy(root)
    for key, value in changes.items():
        OmegaConf.update(root, key, value, merge=False)
    validate(root)
    infer(root, explicit={k: "" for k in explicit})


FE = "config.MODEL.FEATURE_EVAL_SETTINGS."


@pytest.mark.parametrize("changes,key,message", [
    ({FE + "LINEAR_EVAL_FEAT_POOL_OPS_MAP": [["res4", ["AvgPool2d", [[8, 8], 3, 0]]]]},
     FE + "LINEAR_EVAL_FEAT_POOL_OPS_MAP[0]", "only .*res5avg.* is implemented"),
    ({FE + "LINEAR_EVAL_FEAT_POOL_OPS_MAP": [["res5avg", ["Identity", []]]] * 2}, FE + "LINEAR_EVAL_FEAT_POOL_OPS_MAP",
     "pairs them one to one"),
    ({FE + "FREEZE_TRUNK_ONLY": False}, FE + "FREEZE_TRUNK_ONLY", "fine-tuning"),
    ({FE + "FREEZE_TRUNK_AND_HEAD": True}, FE + "FREEZE_TRUNK_AND_HEAD", "not implemented"),
    ({"config.LOSS.name": "simclr_info_nce_loss"}, "config.LOSS.name", "cross_entropy_multiple_output_single_target"),
    ({"config.METERS.accuracy_list_meter.topk_values": [1, 1001]}, "topk_values", "k <= 1000"),
    ({"config.METERS.name": ""}, "config.METERS.name", "accuracy_list_meter"),
    ({"config.TEST_ONLY": True}, "config.TEST_ONLY", "EVAL_TRUNK_AND_HEAD=True"),
    ({"config.DATA.TEST.DROP_LAST": True}, "config.DATA.TEST.DROP_LAST", "evaluated in full"),
    ({"config.DATA.TEST.LABEL_TYPE": "sample_index"}, "config.DATA.TEST.LABEL_TYPE", "standard"),
    ({"config.DATA.TEST.DATA_SOURCES": ["lmdb"]}, "config.DATA.TEST.DATA_SOURCES[0]", "allowed sources"),
    ({FE + "PRECOMPUTE_FEATURES": True}, "config.DATA.TRAIN.TRANSFORMS[0]", "deterministic"),
    ({"config.MODEL.HEAD.PARAMS": [["mlp", {"dims": [2048, 512, 1000]}]]}, "config.MODEL.HEAD.PARAMS[0]", "dims"),
    ({"config.MODEL.HEAD.PARAMS": [["mlp", {"dims": [2048, 1000], "use_relu": True}]]}, "config.MODEL.HEAD.PARAMS[0]",
     "eval_mlp"),
    ({"config.LOSS.cross_entropy_multiple_output_single_target.temperature": 0.0}, "temperature", "> 0"),
    ({"config.TEST_EVERY_NUM_EPOCH": 0}, "config.TEST_EVERY_NUM_EPOCH", "> 0"),
])
def test_linear_eval_config_errors_name_the_key(composed, changes, key, message):
    import re

    from scaleclr.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        _validate(composed["linear"], changes)
    assert re.search(message, str(e.value)), str(e.value)


@pytest.mark.parametrize("override,message", [
    ('config.MODEL.HEAD.PARAMS=[["eval_mlp", {"in_channels": 2048, "dims": [2048, 1000]}], ["mlp", {"dims": '
     '[2048, 1000]}]]', "has 2 heads"),
    ('config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [1024, 1000]}]]', "contradicts the trunk"),
])
def test_classifier_on_the_command_line_must_fit(override, message):
    """VISSL's JSON-style head on the command line: one classifier, and its input must be the trunk's features."""
    from scaleclr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"config\.MODEL\.HEAD\.PARAMS: .*" + message):
        load_config([VISSL_CFG, override])


@pytest.mark.parametrize("changes,key", [
    ({"config.TEST_ONLY": True}, "config.TEST_ONLY"),
    ({"config.METERS.name": "accuracy_list_meter"}, "config.METERS.name"),
    ({FE + "FREEZE_TRUNK_ONLY": True}, FE + "FREEZE_TRUNK_ONLY"),
    ({FE + "PRECOMPUTE_FEATURES": True}, FE + "PRECOMPUTE_FEATURES"),
    ({"config.LOSS.name": "cross_entropy_multiple_output_single_target"}, "config.LOSS.name"),
])
def test_linear_eval_keys_in_pretraining_are_errors(composed, changes, key):
    import re

    from scaleclr.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key)):
        _validate(composed["pretrain"], changes)


def test_test_model_in_pretraining_warns(caplog):
    import logging

    from scaleclr.config import load_config

    with caplog.at_level(logging.WARNING):
        load_config(["config=test/integration_test/quick_simclr_synthetic", "config.TEST_MODEL=True"])
    assert any("config.TEST_MODEL=True has no effect in pretraining" in r.getMessage() for r in caplog.records)


def test_labels_beyond_the_classifier_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"config\.DATA\.TRAIN: labels reach 9 but the classifier"):
        make_trainer(quick(tmp_path, 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [512, 5]}]]',
                           "config.METERS.accuracy_list_meter.topk_values=[1]"))


