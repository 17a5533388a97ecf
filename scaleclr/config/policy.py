"""VISSL keys that scaleclr accepts but does not implement, and what happens when they are set.

Every key of the schema either has a reader in scaleclr or an entry here (``tests/test_config_keys.py`` walks
the schema and enforces it). An entry says what scaleclr does instead; its action applies when the key has a
non-default value (or when its own condition holds):

- ``error``: the run stops before any worker starts, with a message naming the key and the alternative;
- ``warn``: VISSL's behaviour is harmless to skip; a warning names the key and says what scaleclr does.

docs/configuration.md lists the same table. (Linear evaluation's VISSL keys, ``config.TEST_ONLY``,
``TEST_MODEL``, ``METERS.*``, ``MODEL.FEATURE_EVAL_SETTINGS.*``, are implemented; their misuse in pretraining is
checked in ``validate_linear``.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional

from omegaconf import DictConfig, OmegaConf

from scaleclr.config.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["KeyPolicy", "POLICIES", "apply_policies", "policy_table"]


@dataclass(frozen=True)
class KeyPolicy:
    """What happens to a VISSL key scaleclr does not implement.

    Attributes:
        key: full dotted key (``config.TRAINER.TRAIN_STEP_NAME``).
        action: ``"error"`` or ``"warn"``.
        instead: what scaleclr does instead (the message's second half).
        applies: when the action fires; default: the value differs from the schema default.
    """

    key: str
    action: str
    instead: str
    applies: Optional[Callable[[DictConfig], bool]] = None


def _amp_on(root: DictConfig) -> bool:
    return bool(root.config.MODEL.AMP_PARAMS.USE_AMP)


POLICIES: List[KeyPolicy] = [
    KeyPolicy("config.HOOKS.PERF_STATS.MONITOR_PERF_STATS", "warn", "scaleclr always logs data_time, step_time "
              "and images_per_sec to metrics.jsonl every config.LOG_FREQUENCY steps"),
    KeyPolicy("config.HOOKS.PERF_STATS.ROLLING_BTIME_FREQ", "warn", "timings are averaged over the "
              "config.LOG_FREQUENCY steps of each metrics.jsonl record"),
    KeyPolicy("config.HOOKS.PERF_STATS.PERF_STAT_FREQUENCY", "warn", "timings are logged every "
              "config.LOG_FREQUENCY steps"),
    KeyPolicy("config.DATA.TEST.SHUFFLE_MODE", "warn", "the test split is read in order (no shuffle)"),
    KeyPolicy("config.DATA.TEST.SHUFFLE_BLOCK_SHARDS", "warn", "the test split is read in order (no shuffle)"),
    KeyPolicy("config.DATA.TEST.DEVICE_AUGMENTATION", "warn", "the test split's deterministic transforms run on "
              "the host (data-loader workers)"),
    KeyPolicy("config.DATA.TEST.COLLATE_FUNCTION", "warn", "the test split of linear evaluation is batched as "
              "(images [B, 3, H, W], labels [B]) with torch's default collation"),
    KeyPolicy("config.TRAINER.TRAIN_STEP_NAME", "error", "scaleclr has one train step (standard_train_step)"),
    KeyPolicy("config.MODEL.AMP_PARAMS.AMP_TYPE", "error", "set config.MODEL.AMP_PARAMS.AMP_TYPE=pytorch (torch "
              "autocast with AMP_DTYPE bfloat16 or float16); apex's AMP is not supported",
              applies=lambda r: _amp_on(r) and r.config.MODEL.AMP_PARAMS.AMP_TYPE == "apex"),
    KeyPolicy("config.MODEL.AMP_PARAMS.AMP_ARGS", "warn", "AMP_ARGS are apex options (opt_level); torch autocast "
              "takes config.MODEL.AMP_PARAMS.AMP_DTYPE"),
    KeyPolicy("config.MODEL.TRUNK.NAME", "error", "scaleclr's trunk is VISSL's resnet (ResNet / ResNeXt, any "
              "depth and width: config.MODEL.TRUNK.RESNETS)"),
    KeyPolicy("config.MODEL.INPUT_TYPE", "error", "scaleclr trains on RGB images only (INPUT_TYPE rgb)"),
    KeyPolicy("engine_name", "error", "train.py pretrains (engine_name train); evaluation is chosen by its config"),
]


def policy_table() -> str:
    """POLICIES as the markdown table docs/configuration.md shows (``tests/test_config_keys.py``
    checks that docs/configuration.md holds exactly this text)."""
    rows = ["| key | when set (non-default) | what scaleclr does instead |", "|---|---|---|"]
    for p in POLICIES:
        rows.append(f"| `{p.key}` | {p.action} | {p.instead} |")
    return "\n".join(rows)


def _defaults() -> DictConfig:
    from scaleclr.config import schema

    return schema.defaults()


def _plain(v):
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def apply_policies(root: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first ``error`` entry that applies; log every ``warn`` entry that does."""
    defaults = _defaults()
    for p in POLICIES:
        value = _plain(OmegaConf.select(root, p.key))
        applies = p.applies(root) if p.applies is not None else value != _plain(OmegaConf.select(defaults, p.key))
        if not applies:
            continue
        msg = f"= {value!r} is not implemented in scaleclr: {p.instead}."
        if p.action == "error":
            raise ConfigError(p.key, msg)
        logger.warning("%s %s (ignored)", p.key, msg)
