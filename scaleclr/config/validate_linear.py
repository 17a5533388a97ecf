"""Checks of the linear-evaluation keys (``config.MODEL.FEATURE_EVAL_SETTINGS``, ``config.DATA.TEST``,
``config.TEST_*``, ``config.METERS``, the cross-entropy loss), run by :func:`scaleclr.config.validate.validate`.

What scaleclr implements of VISSL's feature evaluation: ``EVAL_MODE_ON`` + ``FREEZE_TRUNK_ONLY`` (linear
evaluation: frozen trunk, one trained classifier) on the final average pool (``res5avg``), with VISSL's ``mlp``
(Linear) or ``eval_mlp`` (BatchNorm + Linear) head, ``cross_entropy_multiple_output_single_target`` and
``accuracy_list_meter``. Everything else is an error that names the key and says what is implemented: VISSL's
other feature maps (conv1, res2..res5 with pooling), several heads at once, fine-tuning (``EVAL_MODE_ON`` without
``FREEZE_TRUNK_ONLY``), feature extraction (``FREEZE_TRUNK_AND_HEAD``).
"""
import logging
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from scaleclr.config.data_checks import check_data, transforms_num_views
from scaleclr.config.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["check_linear_eval", "is_linear_eval", "FEATURE_KEY", "CE_LOSS", "DETERMINISTIC_TRANSFORMS",
           "CLASSIFIER_HEADS"]

FEATURE_KEY = "config.MODEL.FEATURE_EVAL_SETTINGS"
CE_LOSS = "cross_entropy_multiple_output_single_target"
#: transforms with no random draw (PRECOMPUTE_FEATURES extracts DATA.TRAIN's features once, through them)
DETERMINISTIC_TRANSFORMS = ("Resize", "CenterCrop", "ToTensor", "Normalize")
#: classifier heads (``scaleclr.interchange.formats.CLASSIFIER_LAYOUTS``)
CLASSIFIER_HEADS = ("mlp", "eval_mlp")
_MAP_HELP = ('only ["res5avg", ["Identity", []]] (the final average pool, 2048 x width features; 512 x width for '
             "depths 18/34) is implemented")


def is_linear_eval(c: DictConfig) -> bool:
    """``config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON`` (with FREEZE_TRUNK_ONLY; validated): linear evaluation
    rather than pretraining. ``c`` is the ``config`` node."""
    return bool(c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON)


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _testing(c) -> bool:
    return bool(c.TEST_MODEL or c.TEST_ONLY)


def check_linear_eval(root: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first linear-evaluation problem (or pretraining misuse of its keys)."""
    c = root.config
    fe = c.MODEL.FEATURE_EVAL_SETTINGS
    if not is_linear_eval(c):
        _check_pretraining(c)
        return
    if fe.FREEZE_TRUNK_AND_HEAD:
        raise ConfigError(f"{FEATURE_KEY}.FREEZE_TRUNK_AND_HEAD", "= True (VISSL's feature extraction with trunk and "
                          "heads frozen) is not implemented; scaleclr trains a classifier on the frozen trunk "
                          f"({FEATURE_KEY}.FREEZE_TRUNK_ONLY=True) or reports kNN accuracy (config.KNN_EVAL).")
    if not fe.FREEZE_TRUNK_ONLY:
        raise ConfigError(f"{FEATURE_KEY}.FREEZE_TRUNK_ONLY", f"= False with {FEATURE_KEY}.EVAL_MODE_ON=True is "
                          "VISSL's full fine-tuning, which scaleclr does not implement; set FREEZE_TRUNK_ONLY=True for "
                          "linear evaluation (frozen trunk, trained classifier).")
    if c.LOSS.name != CE_LOSS:
        raise ConfigError("config.LOSS.name", f"= {c.LOSS.name!r}: linear evaluation ({FEATURE_KEY}.EVAL_MODE_ON=True) "
                          f"trains the classifier with {CE_LOSS}.")
    # temperature and label_smoothing: scaleclr.config.validate_numbers.RANGES
    if not c.MODEL.WEIGHTS_INIT.PARAMS_FILE and not c.TEST_ONLY:
        logger.warning("config.MODEL.WEIGHTS_INIT.PARAMS_FILE is empty: linear evaluation of the trunk at its "
                       "random initialisation (set PARAMS_FILE=<a scaleclr checkpoint or export> to evaluate a "
                       "pretrained one)")
    num_heads = _check_heads(c)
    _check_feature_map(fe, num_heads)
    _check_meters_and_test(c)
    _check_linear_data(root)


def _check_pretraining(c) -> None:
    fe = c.MODEL.FEATURE_EVAL_SETTINGS
    for key in ("FREEZE_TRUNK_ONLY", "FREEZE_TRUNK_AND_HEAD", "EVAL_TRUNK_AND_HEAD", "PRECOMPUTE_FEATURES"):
        if fe[key]:
            raise ConfigError(f"{FEATURE_KEY}.{key}", f"= True needs {FEATURE_KEY}.EVAL_MODE_ON=True (linear "
                              "evaluation, e.g. config=benchmark/linear_image_classification/...).")
    if list(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP):
        raise ConfigError(f"{FEATURE_KEY}.LINEAR_EVAL_FEAT_POOL_OPS_MAP", f"is set but {FEATURE_KEY}.EVAL_MODE_ON is "
                          "False (pretraining).")
    if c.LOSS.name == CE_LOSS:
        raise ConfigError("config.LOSS.name", f"= {CE_LOSS} is linear evaluation's loss: set "
                          f"{FEATURE_KEY}.EVAL_MODE_ON=True and FREEZE_TRUNK_ONLY=True, or pretrain with "
                          "simclr_info_nce_loss / multicrop_simclr_info_nce_loss.")
    if c.TEST_ONLY:
        raise ConfigError("config.TEST_ONLY", f"= True evaluates a linear classifier; pretraining has no test-only "
                          f"phase. Use a linear-evaluation config ({FEATURE_KEY}.EVAL_MODE_ON=True, docs/evaluation.md) or "
                          "config.KNN_EVAL.ENABLED=True.")
    if c.METERS.name:
        raise ConfigError("config.METERS.name", f"= {c.METERS.name!r}: pretraining reports the loss and kNN top-1; "
                          "accuracy_list_meter is for linear evaluation.")
    if c.TEST_MODEL:
        logger.warning("config.TEST_MODEL=True has no effect in pretraining (no test phase; the kNN evaluation, "
                       "config.KNN_EVAL, runs at the start and the end instead) (ignored)")


def _check_heads(c) -> int:
    key = "config.MODEL.HEAD.PARAMS"
    params = _plain(c.MODEL.HEAD.PARAMS)
    if not isinstance(params, list) or len(params) != 1:
        n = len(params) if isinstance(params, list) else 0
        raise ConfigError(key, f"has {n} heads; linear evaluation in scaleclr trains exactly one classifier on the "
                          'final average pool: [["eval_mlp", {"in_channels": F, "dims": [F, C]}]] (BatchNorm + '
                          'Linear, VISSL) or [["mlp", {"dims": [F, C]}]] (Linear, SimCLR). VISSL\'s 7-head '
                          "benchmark (conv1..res5 + two res5avg heads) is not implemented.")
    head = params[0]
    if not (isinstance(head, list) and len(head) == 2 and isinstance(head[0], str) and isinstance(head[1], dict)):
        raise ConfigError(f"{key}[0]", f"= {head!r}: the classifier is one [\"name\", {{kwargs}}] pair.")
    name, kw = head
    if name not in CLASSIFIER_HEADS:
        raise ConfigError(f"{key}[0]", f"= {name!r}: linear evaluation's classifier is one of "
                          f"{', '.join(CLASSIFIER_HEADS)}.")
    dims = kw.get("dims")
    if not (isinstance(dims, list) and len(dims) == 2):
        raise ConfigError(f"{key}[0]", f"dims = {dims!r}: a linear classifier has dims [F, C] (features, classes).")
    if name == "mlp" and any(kw.get(k) for k in ("use_bn", "use_relu", "use_dropout")):
        raise ConfigError(f"{key}[0]", "a linear classifier has no use_bn / use_relu / use_dropout; for BatchNorm "
                          "before the Linear use eval_mlp (optionally {\"affine\": False}).")
    if name == "eval_mlp" and any(kw.get(k) for k in ("use_bn", "use_relu")):
        raise ConfigError(f"{key}[0]", "eval_mlp with use_bn / use_relu is not a linear classifier.")
    return 1


def _check_feature_map(fe, num_heads: int) -> None:
    key = f"{FEATURE_KEY}.LINEAR_EVAL_FEAT_POOL_OPS_MAP"
    entries = _plain(fe.LINEAR_EVAL_FEAT_POOL_OPS_MAP)
    for i, entry in enumerate(entries):
        ok_shape = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list) and len(entry[1]) >= 1
        if not ok_shape:
            raise ConfigError(f"{key}[{i}]", f"= {entry!r}: each entry is [feature, [pool op, args]]; {_MAP_HELP}.")
        feature, (op, *args) = entry[0], entry[1]
        if feature != "res5avg" or op != "Identity" or any(a not in ([], None) for a in args):
            raise ConfigError(f"{key}[{i}]", f"= {entry!r}: {_MAP_HELP}; VISSL's conv1 / res2..res5 feature maps "
                              "with pooling are not implemented.")
    if entries and len(entries) != num_heads:
        raise ConfigError(key, f"has {len(entries)} entries but config.MODEL.HEAD.PARAMS has {num_heads} head(s); "
                          "VISSL pairs them one to one (one res5avg entry for the one classifier).")


def _check_meters_and_test(c) -> None:
    topk = list(c.METERS.accuracy_list_meter.topk_values)
    if not topk or any((not isinstance(k, int)) or k < 1 for k in topk):
        raise ConfigError("config.METERS.accuracy_list_meter.topk_values", f"= {topk}: positive integers, e.g. [1, 5].")
    classes = int(_plain(c.MODEL.HEAD.PARAMS)[0][1]["dims"][-1])
    if max(topk) > classes:
        raise ConfigError("config.METERS.accuracy_list_meter.topk_values", f"= {topk} but the classifier has "
                          f"{classes} classes (config.MODEL.HEAD.PARAMS dims[-1]); top-k needs k <= {classes}.")
    if _testing(c) and c.METERS.name != "accuracy_list_meter":
        raise ConfigError("config.METERS.name", f"= {c.METERS.name!r}: the test phase of linear evaluation "
                          "(config.TEST_MODEL / TEST_ONLY) reports accuracy_list_meter's top-k; set "
                          "config.METERS.name=accuracy_list_meter.")
    w = c.MODEL.WEIGHTS_INIT
    if c.TEST_ONLY and not (w.PARAMS_FILE and c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD):
        raise ConfigError("config.TEST_ONLY", "= True evaluates the trunk and classifier of "
                          "config.MODEL.WEIGHTS_INIT.PARAMS_FILE (e.g. a linear-evaluation checkpoint): set "
                          f"PARAMS_FILE and {FEATURE_KEY}.EVAL_TRUNK_AND_HEAD=True (else the classifier would be "
                          "untrained).")


def _nonrandom(transforms: List[Any], key: str) -> None:
    for i, t in enumerate(transforms):
        if t.get("name") not in DETERMINISTIC_TRANSFORMS:
            raise ConfigError(f"{key}[{i}]", f"= {t.get('name')!r}: with {FEATURE_KEY}.PRECOMPUTE_FEATURES=True the "
                              "features are extracted once, so the transforms must be deterministic ("
                              f"{', '.join(DETERMINISTIC_TRANSFORMS)}); augmentations need PRECOMPUTE_FEATURES=False.")


def _check_linear_data(root) -> None:
    c = root.config
    fe = c.MODEL.FEATURE_EVAL_SETTINGS
    splits = ["TRAIN"] + (["TEST"] if _testing(c) else [])
    for split in splits:
        s = c.DATA[split]
        key = f"config.DATA.{split}"
        if s.LABEL_TYPE != "standard":
            raise ConfigError(f"{key}.LABEL_TYPE", f"= {s.LABEL_TYPE!r}: linear evaluation trains and tests on the "
                              "source's class labels; set LABEL_TYPE=standard.")
        transforms = _plain(s.TRANSFORMS)
        if not isinstance(transforms, list) or any(not isinstance(t, dict) or "name" not in t for t in transforms):
            raise ConfigError(f"{key}.TRANSFORMS", "must be a list of {name: ..., ...} transforms.")
        views = transforms_num_views(transforms)
        if views != 1:
            raise ConfigError(f"{key}.TRANSFORMS", f"produce {views} views per image; linear evaluation takes one "
                              "(no ImgReplicatePil / ImgPilToMultiCrop).")
        if split == "TEST":
            check_data(root, "TEST")
            if s.DROP_LAST:
                raise ConfigError(f"{key}.DROP_LAST", "= True: the test split is evaluated in full (every image "
                                  "counted once on any number of processes); set DROP_LAST=False.")
        if fe.PRECOMPUTE_FEATURES:
            _nonrandom(transforms, f"{key}.TRANSFORMS")
    if fe.PRECOMPUTE_FEATURES and c.DATA.TRAIN.DEVICE_AUGMENTATION == "on":
        raise ConfigError("config.DATA.TRAIN.DEVICE_AUGMENTATION", f"= on, but with {FEATURE_KEY}."
                          "PRECOMPUTE_FEATURES=True the classifier trains on precomputed features, not images; use "
                          "auto or off.")
    if c.DATA.TRAIN.COLLATE_FUNCTION != "simclr_collator":
        raise ConfigError("config.DATA.TRAIN.COLLATE_FUNCTION", f"= {c.DATA.TRAIN.COLLATE_FUNCTION!r}: linear "
                          "evaluation batches one view per image with simclr_collator ([B, 3, H, W]).")
