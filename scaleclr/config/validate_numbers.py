"""Numbers a run cannot train with, refused before any worker starts (run by
:func:`scaleclr.config.validate.validate`).

- every float key of the schema must be finite (YAML ``.nan`` / ``.inf`` and the overrides ``nan`` / ``inf``
  / ``'nan'`` all arrive as float NaN / inf), and the keys of :data:`RANGES` must lie in their range;
- the LR schedules (``config.OPTIMIZER.param_schedulers.lr`` / ``lr_head``, free-form VISSL dicts): every
  value, start/end value, ``values`` entry and ``auto_lr_scaling.base_value`` finite and >= 0 (a negative LR
  climbs the loss and "trains" without an error), ``gamma`` > 0, ``lengths`` in (0, 1],
  ``base_lr_batch_size`` > 0; the structure (names, milestones, lengths summing to 1) is checked by
  :func:`scaleclr.optim.schedulers.build_scheduler` itself, in :func:`scaleclr.config.infer.infer`;
- the transforms of the used splits are built once by :func:`scaleclr.data.transforms.build_transform`, whose
  constructors hold the allowed values (probabilities in [0, 1], crop scales in (0, 1], finite strengths);
- head dims are positive integers;
- an InfoNCE batch needs two images in the set of negatives: ``BATCHSIZE_PER_REPLICA x world >= 2``
  (``BATCHSIZE_PER_REPLICA >= 2`` with multicrop ``negatives: local``).

Every error names the key, the value and what is allowed.
"""
import math
from typing import Any, Dict, Tuple

from omegaconf import DictConfig, OmegaConf

from scaleclr.config import schema
from scaleclr.config.errors import ConfigError

__all__ = ["check_numbers", "RANGES"]

#: key -> (low, low included, high, high included, why). Float keys only; int keys are checked in validate.py.
RANGES: Dict[str, Tuple[float, bool, float, bool, str]] = {
    "config.OPTIMIZER.momentum": (0.0, True, 1.0, False, "SGD momentum; 1 never forgets a gradient"),
    "config.OPTIMIZER.weight_decay": (0.0, True, math.inf, False, "a negative decay grows the weights"),
    "config.OPTIMIZER.head_optimizer_params.weight_decay": (0.0, True, math.inf, False, "the head's weight decay"),
    "config.OPTIMIZER.larc_config.trust_coefficient": (0.0, False, math.inf, False, "LARC's local LR factor"),
    "config.OPTIMIZER.larc_config.eps": (0.0, True, math.inf, False, "added to LARC's norm ratio denominator"),
    "config.OPTIMIZER.gradient_clipping": (0.0, True, math.inf, False, "max gradient norm; 0 = off"),
    "config.LOSS.simclr_info_nce_loss.temperature": (0.0, False, math.inf, False,
                                                     "it divides the cosine similarities"),
    "config.LOSS.multicrop_simclr_info_nce_loss.temperature": (0.0, False, math.inf, False,
                                                               "it divides the cosine similarities"),
    "config.LOSS.cross_entropy_multiple_output_single_target.temperature": (0.0, False, math.inf, False,
                                                                            "it divides the logits"),
    "config.LOSS.cross_entropy_multiple_output_single_target.label_smoothing": (0.0, True, 1.0, False,
                                                                                "a probability mass"),
    "config.KNN_EVAL.TEMPERATURE": (0.0, False, math.inf, False, "it divides the kNN similarities"),
    "config.MODEL.HEAD.BATCHNORM_EPS": (0.0, False, math.inf, False, "added to the variance before its root"),
    "config.MODEL.HEAD.BATCHNORM_MOMENTUM": (0.0, True, 1.0, True, "weight of the new batch statistics"),
    "config.MODEL.HEAD.PARAMS_MULTIPLIER": (0.0, True, math.inf, False, "factor on the head's initialisation"),
    "config.ONLINE_LINEAR_PROBE.LR": (0.0, False, math.inf, False, "the online probe's learning rate"),
    "config.ONLINE_LINEAR_PROBE.MOMENTUM": (0.0, True, 1.0, False, "the online probe's SGD momentum"),
    "config.ONLINE_LINEAR_PROBE.WEIGHT_DECAY": (0.0, True, math.inf, False, "the online probe's weight decay"),
}

#: LR schedule keys holding learning rates (>= 0), and the other numeric keys with a rule of their own.
LR_KEYS = ("value", "start_value", "end_value", "base_value")
_SCHEDULE_RULES: Dict[str, Tuple[float, bool, float, bool, str]] = {
    **{k: (0.0, True, math.inf, False, "a learning rate; a negative one climbs the loss") for k in LR_KEYS},
    "values": (0.0, True, math.inf, False, "learning rates; a negative one climbs the loss"),
    "gamma": (0.0, False, math.inf, False, "the decay factor"),
    "lengths": (0.0, False, 1.0, True, "fractions of training"),
    "base_lr_batch_size": (0.0, False, math.inf, False, "the batch size base_value is given for"),
}


def _allowed(rule) -> str:
    lo, lo_in, hi, hi_in, _ = rule
    if hi == math.inf:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _as_number(key: str, v: Any, what: str) -> float:
    """``v`` as a float; strings that spell a number are accepted (the schedulers call float() on them)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(key, f"= {v!r} is not a number; {what}.")
    try:
        return float(v)
    except ValueError:
        raise ConfigError(key, f"= {v!r} is not a number; {what}.") from None


def _check(key: str, v: Any, rule) -> None:
    x = _as_number(key, v, f"allowed: a finite number {_allowed(rule)}")
    lo, lo_in, hi, hi_in, why = rule
    if not math.isfinite(x):
        raise ConfigError(key, f"must be a finite number {_allowed(rule)} ({why}), got {v!r}.")
    if x < lo or (x == lo and not lo_in) or x > hi or (x == hi and not hi_in):
        raise ConfigError(key, f"must be {_allowed(rule)} ({why}), got {v!r}.")


def _float_keys(node: DictConfig, prefix: str):
    """Dotted keys of the schema's float leaves."""
    for k in node.keys():
        child = node._get_node(k)
        full = f"{prefix}{k}"
        if isinstance(child, DictConfig) and child._metadata.object_type not in (dict, None):
            yield from _float_keys(child, full + ".")
        elif not OmegaConf.is_config(child) and isinstance(node[k], float):
            yield full


def _check_schedule(node: Any, key: str) -> None:
    """Every number of a free-form LR schedule dict: finite, and in its range where it has one."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}"
            rule = _SCHEDULE_RULES.get(k)
            if isinstance(v, list) and rule is not None:
                for i, x in enumerate(v):
                    _check(f"{sub}[{i}]", x, rule)
            elif rule is not None and not isinstance(v, (dict, list)):
                _check(sub, v, rule)
            else:
                _check_schedule(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_schedule(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(key, f"must be a finite number, got {node!r}.")
    elif isinstance(node, str) and node.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ConfigError(key, f"must be a finite number, got {node!r}.")


def _check_transforms(root: DictConfig, split: str) -> None:
    from scaleclr.data.transforms import build_transform  # the constructors hold the allowed values

    key = f"config.DATA.{split}.TRANSFORMS"
    for i, spec in enumerate(OmegaConf.to_container(root.config.DATA[split].TRANSFORMS, resolve=True)):
        k = f"{key}[{i}]"
        try:
            build_transform(spec, k)
        except ValueError as e:
            text = str(e)
            rest = text[len(k):].strip() if text.startswith(k) else text  # "(RandomResizedCrop): scale=..."
            if rest.startswith("(") and "): " in rest:
                rest = rest[1:].replace("): ", ": ", 1)
            raise ConfigError(k, rest) from None


def _check_head_dims(root: DictConfig) -> None:
    key = "config.MODEL.HEAD.PARAMS"
    params = OmegaConf.to_container(root.config.MODEL.HEAD.PARAMS, resolve=True)
    for i, head in enumerate(params if isinstance(params, list) else []):
        kw = head[1] if isinstance(head, list) and len(head) == 2 and isinstance(head[1], dict) else {}
        dims = kw.get("dims", [])
        for j, d in enumerate(dims if isinstance(dims, list) else [dims]):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ConfigError(f"{key}[{i}]", f"dims[{j}] = {d!r}: layer widths must be integers >= 1, got "
                                  f"dims {dims!r}.")
        for name in ("in_channels",):
            if name in kw and (isinstance(kw[name], bool) or not isinstance(kw[name], int) or kw[name] < 1):
                raise ConfigError(f"{key}[{i}]", f"{name} = {kw[name]!r}: must be an integer >= 1.")


def _check_infonce_batch(root: DictConfig) -> None:
    c = root.config
    if c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON:
        return  # cross-entropy: any batch has a target
    bs = c.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    world = c.DISTRIBUTED.NUM_NODES * c.DISTRIBUTED.NUM_PROC_PER_NODE
    local = c.LOSS.name == "multicrop_simclr_info_nce_loss" and c.LOSS.multicrop_simclr_info_nce_loss.negatives \
        == "local"
    images = bs if local else bs * world
    if images < 2:
        where = "per process (multicrop negatives: local)" if local else \
            f"per step over the world (BATCHSIZE_PER_REPLICA {bs} x {world} processes)"
        raise ConfigError("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA", f"= {bs} gives {images} image {where}; "
                          "InfoNCE needs >= 2 (the other images are the negatives: with one image the loss is 0 "
                          "and nothing is learnt).")


def check_numbers(root: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first number of ``root`` that is not finite or not in its range."""
    for key in _float_keys(schema.defaults(), ""):
        v = OmegaConf.select(root, key)
        if isinstance(v, float) and not math.isfinite(v):
            rule = RANGES.get(key)
            raise ConfigError(key, f"must be a finite number{(' ' + _allowed(rule)) if rule else ''}, got {v!r}.")
    for key, rule in RANGES.items():
        _check(key, OmegaConf.select(root, key), rule)
    for name in ("lr", "lr_head"):
        sched = OmegaConf.to_container(root.config.OPTIMIZER.param_schedulers[name], resolve=True)
        _check_schedule(sched, f"config.OPTIMIZER.param_schedulers.{name}")
    c = root.config
    _check_transforms(root, "TRAIN")
    if c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON and (c.TEST_MODEL or c.TEST_ONLY):
        _check_transforms(root, "TEST")
    _check_head_dims(root)
    _check_infonce_batch(root)
