"""Configuration: typed schema, Hydra composition, validation and inference.

    root, info = load_config(["config=pretrain/simclr/simclr_8node_resnet", "config.OPTIMIZER.num_epochs=200"])
    root.config.MODEL.TRUNK.RESNETS.DEPTH   # 50
"""
from typing import Any, Dict, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from scaleclr.config.compose import compose, config_dir, explicit_keys
from scaleclr.config.errors import ConfigError
from scaleclr.config.infer import infer
from scaleclr.config.validate import validate

__all__ = ["ConfigError", "load_config", "to_yaml", "compose", "config_dir"]


def load_config(overrides: Sequence[str], world_size: Optional[int] = None) -> Tuple[DictConfig, Dict[str, Any]]:
    """Compose, validate and infer. `world_size`: the launcher's world when one is running."""
    root = compose(overrides)
    validate(root)
    info = infer(root, world_size=world_size, explicit=explicit_keys(overrides))
    return root, info


def to_yaml(root: DictConfig) -> str:
    return OmegaConf.to_yaml(root, resolve=True)
