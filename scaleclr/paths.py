"""Where this checkout keeps its configuration files (read by the config composer and the dataset catalog)."""
import os
from pathlib import Path

__all__ = ["config_dir"]


def config_dir() -> Path:
    """``configs/`` of this checkout, or ``$SCALECLR_CONFIG_DIR``."""
    env = os.environ.get("SCALECLR_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[1] / "configs").resolve()
