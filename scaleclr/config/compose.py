"""Compose the configuration with Hydra's compose API, the way VISSL's command line does.

``compose(["config=pretrain/simclr/simclr_8node_resnet", "config.OPTIMIZER.num_epochs=200",
"+config/pretrain/simclr/transforms=multicrop_2x160_4x96"])`` returns the merged tree (schema defaults <-
the selected config file <- extra config groups <- ``config.X.Y=v`` overrides). Hydra and OmegaConf errors
(unknown key, wrong type, unknown config file) are re-raised as :class:`ConfigError` with the full key and
the closest valid keys.
"""
import re
from typing import Dict, List, Optional, Sequence

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaleclr.config import schema
from scaleclr.config.errors import ConfigError, suggest
from scaleclr.paths import config_dir


def _hydra_literal(v) -> str:
    """Python value -> Hydra override grammar (dict keys unquoted, strings single-quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_hydra_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra_literal(x)}" for k, x in v.items()) + "}"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _normalise(overrides: Sequence[str]) -> List[str]:
    out = []
    for o in overrides:
        # VISSL's guide sometimes writes config=pretrain/simclr/simclr_8node_resnet.yaml
        m = re.match(r"^(\+?config(?:/[\w/]+)?)=(.+)\.yaml$", o)
        if m:
            o = f"{m.group(1)}={m.group(2)}"
        # JSON/YAML-style values with quoted keys, as VISSL's docs write MODEL.HEAD.PARAMS:
        # [["mlp", {"dims": [2048, 128], "use_relu": True}]] -> Hydra's grammar
        key, sep, value = o.partition("=")
        if sep and value[:1] in "[{" and '"' in value:
            try:
                o = f"{key}={_hydra_literal(yaml.safe_load(value))}"
            except yaml.YAMLError:
                pass
        out.append(o)
    return out


def _schema_node(path: List[str]):
    node = schema.defaults()
    for p in path:
        if not isinstance(node, DictConfig) or p not in node:
            return None
        node = node[p]
    return node


def all_keys(node=None, prefix: str = "") -> List[str]:
    """Every leaf and inner key of the schema as dotted paths (``config.MODEL.TRUNK.NAME``)."""
    node = schema.defaults() if node is None else node
    keys = []
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        v = node._get_node(k)
        if isinstance(v, DictConfig) and not v._is_none() and v._metadata.object_type not in (dict, None):
            keys.extend(all_keys(v, full + "."))
    return keys


def unknown_key_error(full_key: str, where: str = "") -> ConfigError:
    """Error for a key that is not in the schema, listing the closest valid keys."""
    parts = full_key.split(".")
    parent = _schema_node(parts[:-1])
    hints = []
    if isinstance(parent, DictConfig):
        hints += [".".join(parts[:-1] + [s]) for s in suggest(parts[-1], list(parent.keys()))]
    # same leaf name elsewhere in the tree (config.MODEL.DEPTH -> config.MODEL.TRUNK.RESNETS.DEPTH)
    hints += [k for k in all_keys() if k.split(".")[-1] == parts[-1] and k not in hints]
    if not hints:
        hints = suggest(full_key, all_keys(), n=3)
    msg = f"unknown configuration key{(' in ' + where) if where else ''}."
    if hints:
        msg += " Closest valid keys: " + ", ".join(hints[:5]) + "."
    return ConfigError(full_key, msg)


def _key_from_exception(e: BaseException) -> Optional[str]:
    while e is not None:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return e.full_key
        m = re.search(r"Could not (?:override|append to config)\W+'?([\w.\[\]]+)'?", str(e))
        if m and "." in m.group(1):
            return m.group(1)
        e = e.__cause__ or e.__context__
    return None


def _chain_text(e: BaseException) -> str:
    texts = []
    while e is not None:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(texts)


def _translate(e: Exception, overrides: Sequence[str]) -> ConfigError:
    text = _chain_text(e)
    key = _key_from_exception(e)
    if "Key '" in text and ("not in" in text or "is not in struct" in text) and key:
        return unknown_key_error(key)
    if "could not be converted" in text or "Value '" in text and "is not a valid" in text or \
            "Invalid type assigned" in text:
        lines = [ln for ln in text.splitlines() if "could not be converted" in ln or "is not a valid" in ln
                 or "Invalid type" in ln] or text.strip().splitlines()
        return ConfigError(key or "", f"wrong type: {lines[0].strip()}")
    if "You must specify 'config'" in text or "'config' is missing" in text.lower() or \
            "Missing mandatory value: config" in text:
        return ConfigError("config", "no config file selected: pass config=<path under configs/config/>, "
                           "e.g. config=pretrain/simclr/simclr_8node_resnet or config=quickstart.")
    if "Could not find" in text or "Could not load" in text:
        return ConfigError("config", text.strip().replace("\n", " ") +
                           f" (config files live under {config_dir() / 'config'})")
    return ConfigError(key or "", text.strip())


def yaml_error(e: "yaml.YAMLError") -> ConfigError:
    """A YAML file that does not parse: its path, line and column (1-based) and the parser's words."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "a YAML config file"
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    return ConfigError("config", f"{where}: the YAML does not parse ({what}); fix that line (indentation, a "
                       "missing ']' or '}', a ':' inside an unquoted value).")


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose the whole tree for `overrides` (Hydra syntax). Raises ConfigError."""
    schema.register()
    overrides = _normalise(overrides)
    if not any(re.match(r"^config=", o) for o in overrides):
        raise ConfigError("config", "no config file selected: pass config=<path under configs/config/>, "
                          "e.g. config=pretrain/simclr/simclr_8node_resnet or config=quickstart.")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose(config_name="defaults", overrides=list(overrides))
    except yaml.YAMLError as e:
        raise yaml_error(e) from None
    except (HydraException, OmegaConfBaseException, ValueError, KeyError) as e:
        raise _translate(e, overrides) from e
    finally:
        GlobalHydra.instance().clear()
    return cfg


def explicit_keys(overrides: Sequence[str]) -> Dict[str, str]:
    """`config.X.Y=v` keys the user set on the command line (to tell spelled-out values from file values)."""
    out = {}
    for o in overrides:
        m = re.match(r"^[+~]{0,2}(config\.[\w.]+)=(.*)$", o)
        if m:
            out[m.group(1)] = m.group(2)
    return out
