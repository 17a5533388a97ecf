"""``config.MODEL.WEIGHTS_INIT``: initialise a :class:`scaleclr.models.SimCLRModel` from a weights file, with VISSL's
keys and meanings (``vissl/utils/checkpoint.py::init_model_from_consolidated_weights``), but strict about the trunk.

Keys (VISSL defaults):

* ``PARAMS_FILE``: a file (or a scaleclr FSDP / DeepSpeed checkpoint directory). Read with
  ``torch.load(weights_only=True)``; a file that needs pickle is refused with the command that converts it.
* ``STATE_DICT_KEY_NAME`` (``"classy_state_dict"``): the key (or list of nested keys) holding the weights; ``""``
  = the file is a flat ``{name: tensor}`` dict. With ``classy_state_dict`` the VISSL layout is read as VISSL does:
  ``base_model.model.trunk`` -> ``trunk.*``, ``...heads`` -> ``heads.*``, and **REMOVE_PREFIX / APPEND_PREFIX are
  ignored** (as in VISSL; a warning says so). A file without ``classy_state_dict`` that is a scaleclr file
  (``{"model": {"trunk.*", "heads.*"}}``, any engine's export) is read from ``model``.
* ``REMOVE_PREFIX`` (``""``): a leading prefix removed from every key that starts with it, then
* ``APPEND_PREFIX`` (``""``): a prefix put in front of every key (torchvision files: ``trunk.``).
* ``SKIP_LAYERS`` (``["num_batches_tracked"]``): keys containing any of these substrings are not loaded.

VISSL's model names are accepted too: ``trunk._feature_blocks.*`` and ``trunk.base_model._feature_blocks.*`` (what
VISSL's recipes produce, e.g. ``APPEND_PREFIX=trunk._feature_blocks.``) are scaleclr's ``trunk.*``.

Then every file key that survived is matched with the model's keys. Unlike VISSL (which loads non-strictly, so a
mistyped prefix silently leaves a random trunk), these are errors that name the keys:

* a shape mismatch (file shape vs model shape);
* a trunk key (``trunk.*``, or a key ending in a trunk name such as ``conv1.weight``) that matches no model key,
  listed with the closest model keys;
* no trunk tensor loaded at all.

Counted (one log line, :class:`InitReport`): loaded; skipped (SKIP_LAYERS, torchvision ``fc``, heads the model does
not have, other keys); left at initialisation (model keys the file did not provide, e.g. ``heads: 4``).
"""
from __future__ import annotations

import difflib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from scaleclr.interchange import formats
from scaleclr.interchange.checkpoints import load_weights_file, read_checkpoint

__all__ = ["InitReport", "init_model_from_weights", "KEY"]

logger = logging.getLogger(__name__)

KEY = "config.MODEL.WEIGHTS_INIT"
_TV_FC = ("fc.weight", "fc.bias")
_SHOW = 10


@dataclass
class InitReport:
    """What :func:`init_model_from_weights` did.

    Attributes:
        format: the detected layout (``"vissl"``, ``"scaleclr"``, ``"torchvision"``, ``"vissl_trunk"``, ...).
        loaded: model keys copied from the file, by part (``{"trunk": n, "heads": m}``).
        skipped: file keys not loaded, by reason (``"SKIP_LAYERS"``, ``"torchvision fc"``, ``"heads not in the
            model"``, ``"heads (trunk only)"``, ``"not in the model"``).
        left_at_init: model keys the file did not set, by part (``"heads"``, ``"trunk"``, ``"trunk SKIP_LAYERS"``).
    """

    format: str
    loaded: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    left_at_init: Dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        def fmt(d: Dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in d.items() if v) or "none"
        return (f"format {self.format}; loaded {sum(self.loaded.values())} tensors ({fmt(self.loaded)}); "
                f"skipped {sum(self.skipped.values())} ({fmt(self.skipped)}); left at initialisation "
                f"{sum(self.left_at_init.values())} ({fmt(self.left_at_init)})")


def _key_names(name: Union[str, Sequence[str], None]) -> List[str]:
    if name is None or name == "":
        return []
    if isinstance(name, str):
        return [name]
    return [str(n) for n in name]


def _hint_for(det: formats.Detected) -> str:
    fix = {"torchvision": f"{KEY}.STATE_DICT_KEY_NAME='' {KEY}.APPEND_PREFIX=trunk.",
           "vissl_trunk": f"{KEY}.STATE_DICT_KEY_NAME='' {KEY}.APPEND_PREFIX=trunk.",
           "scaleclr": f"{KEY}.STATE_DICT_KEY_NAME=''"}.get(det.name)
    if fix is None:
        return ""
    if det.module_prefix:
        fix += f" {KEY}.REMOVE_PREFIX=module."
    return f"it is a {det} file; load it with {fix}"


def _descend(obj: Any, names: List[str], path: str) -> Any:
    cur, seen = obj, []
    for name in names:
        if not isinstance(cur, Mapping) or name not in cur:
            avail = sorted(map(str, cur))[:_SHOW] if isinstance(cur, Mapping) else type(cur).__name__
            where = "the file" if not seen else "['" + "']['".join(seen) + "']"
            det = formats.detect_format(obj)
            hint = _hint_for(det) if det.name != "unknown" else ""
            raise ValueError(f"{KEY}.STATE_DICT_KEY_NAME={names if len(names) > 1 else names[0]!r}: {path} has no "
                             f"key {name!r} in {where} (keys there: {avail})" + (f"; {hint}" if hint else ""))
        cur = cur[name]
        seen.append(name)
    return cur


def _select(obj: Any, names: List[str], remove_prefix: str, append_prefix: str, path: str):
    """(flat state dict in candidate model names, detected format name, notes for messages)."""
    notes: List[str] = []
    det = formats.detect_format(obj)
    if names == ["classy_state_dict"]:
        if isinstance(obj, Mapping) and "classy_state_dict" in obj:
            if remove_prefix or append_prefix:
                logger.warning("%s.REMOVE_PREFIX=%r / APPEND_PREFIX=%r are ignored with STATE_DICT_KEY_NAME="
                               "classy_state_dict, as in VISSL: the VISSL layout names the trunk and heads itself",
                               KEY, remove_prefix, append_prefix)
            return formats.from_vissl(obj), "vissl", notes
        if det.name != "scaleclr":
            top = sorted(map(str, obj))[:_SHOW] if isinstance(obj, Mapping) else type(obj).__name__
            hint = _hint_for(det) or f"top-level keys: {top}; set {KEY}.STATE_DICT_KEY_NAME to the key holding the " \
                                     "weights ('' for a flat {name: tensor} file)"
            raise ValueError(f"{KEY}.STATE_DICT_KEY_NAME=classy_state_dict (the default, VISSL's layout) but {path} "
                             f"has no 'classy_state_dict': {hint}")
        state = obj["model"] if det.where == "model" else obj
        fmt = "scaleclr"
    else:
        state = _descend(obj, names, path)
        if not isinstance(state, Mapping):
            raise ValueError(f"{KEY}.STATE_DICT_KEY_NAME={names!r}: {path} holds a {type(state).__name__} there, "
                             "not a {name: tensor} dict")
        nested = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
        if nested:
            inner = formats.detect_format(state)
            hint = {"scaleclr": f"its weights are under 'model': use {KEY}.STATE_DICT_KEY_NAME=model (or leave the "
                                "default)",
                    "vissl": f"it is a VISSL checkpoint: use {KEY}.STATE_DICT_KEY_NAME=classy_state_dict"
                    }.get(inner.name, f"point {KEY}.STATE_DICT_KEY_NAME at a flat {{name: tensor}} dict")
            raise ValueError(f"{KEY}.STATE_DICT_KEY_NAME={names if names else repr('')}: {path} has non-tensor "
                             f"entries there ({nested[:_SHOW]}): {hint}")
        fmt = str(formats.detect_format(state))
    state = dict(state)
    if remove_prefix:
        hits = sum(k.startswith(remove_prefix) for k in state)
        state = {(k[len(remove_prefix):] if k.startswith(remove_prefix) else k): v for k, v in state.items()}
        if not hits:
            notes.append(f"REMOVE_PREFIX={remove_prefix!r} matched no key")
    if append_prefix:
        state = {append_prefix + k: v for k, v in state.items()}
    # VISSL's model names for the same trunk modules
    translated = 0
    out: Dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for p in formats.VISSL_TRUNK_PREFIXES[::-1]:
            if k.startswith(formats.TRUNK + p):
                k = formats.TRUNK + k[len(formats.TRUNK + p):]
                translated += 1
                break
        out[k] = v
    if translated:
        logger.info("%s: %d VISSL trunk names (trunk._feature_blocks.* / trunk.base_model._feature_blocks.*) read as "
                    "scaleclr's trunk.*", KEY, translated)
    return out, fmt, notes


def _trunk_like(key: str, trunk_names: set) -> bool:
    if key.startswith(formats.TRUNK):
        return True
    parts = key.split(".")
    return any(".".join(parts[i:]) in trunk_names for i in range(len(parts)))


def _describe(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    try:
        return formats.describe_trunk(formats.infer_trunk_config(state))
    except (ValueError, KeyError, IndexError):
        return None


def init_model_from_weights(model: nn.Module, params_file: str,
                            state_dict_key_name: Union[str, Sequence[str], None] = "classy_state_dict",
                            skip_layers: Sequence[str] = ("num_batches_tracked",), remove_prefix: str = "",
                            append_prefix: str = "", load_heads: bool = True) -> InitReport:
    """Copy the weights of ``params_file`` into ``model`` (a SimCLRModel: ``trunk.*``, ``heads.*``); see the module
    docstring for the keys' meanings and what is an error.

    Args:
        model: the freshly built model.
        params_file: ``config.MODEL.WEIGHTS_INIT.PARAMS_FILE``.
        state_dict_key_name, skip_layers, remove_prefix, append_prefix: the other ``WEIGHTS_INIT`` keys.
        load_heads: False loads the trunk only (file heads are counted as skipped), e.g. for linear evaluation,
            where the model's head is a new classifier (VISSL's eval mode without ``EVAL_TRUNK_AND_HEAD``).

    Returns:
        The :class:`InitReport` (also logged as one line).

    Raises:
        ValueError: missing or pickle-needing file, missing ``STATE_DICT_KEY_NAME``, shape mismatch, a trunk key
            that matches no model key, or no trunk tensor loaded; each names the file, the keys and the fix.
    """
    path = str(params_file)
    names = _key_names(state_dict_key_name)
    if os.path.isdir(path):
        ck = read_checkpoint(path)
        obj: Any = {"model": ck.state}
        if names and names != ["classy_state_dict"]:
            logger.warning("%s.STATE_DICT_KEY_NAME=%r is not used for a checkpoint directory (%s)", KEY,
                           state_dict_key_name, ck.source)
        names = ["classy_state_dict"]
    else:
        obj = load_weights_file(path, what=f"{KEY}.PARAMS_FILE")
    state, fmt, notes = _select(obj, names, remove_prefix, append_prefix, path)
    if os.path.isdir(path):
        fmt = f"scaleclr ({ck.source})"
    skip = [s for s in skip_layers if s]
    model_sd = model.state_dict()
    trunk_names = {k[len(formats.TRUNK):] for k in model_sd if k.startswith(formats.TRUNK)}
    loaded: Dict[str, torch.Tensor] = {}
    skipped: Counter = Counter()
    unmatched: List[str] = []
    mismatched: List[str] = []
    for k, v in state.items():
        if any(s in k for s in skip):
            skipped["SKIP_LAYERS"] += 1
        elif k in model_sd:
            if k.startswith(formats.HEADS) and not load_heads:
                skipped["heads (trunk only)"] += 1
            elif tuple(v.shape) != tuple(model_sd[k].shape):
                mismatched.append(f"{k}: file {list(v.shape)} vs model {list(model_sd[k].shape)}")
            else:
                loaded[k] = v
        elif k in _TV_FC or k in tuple(formats.TRUNK + n for n in _TV_FC):
            skipped["torchvision fc"] += 1
        elif _trunk_like(k, trunk_names):
            unmatched.append(k)
        elif k.startswith(formats.HEADS):
            skipped["heads not in the model"] += 1
        else:
            skipped["not in the model"] += 1
    where = f"{KEY}.PARAMS_FILE={path} (format {fmt}; STATE_DICT_KEY_NAME={state_dict_key_name!r}, REMOVE_PREFIX=" \
            f"{remove_prefix!r}, APPEND_PREFIX={append_prefix!r})"
    if mismatched:
        file_arch, model_arch = _describe(state), _describe(model_sd)
        arch = f" The file's trunk is {file_arch}, the model's {model_arch} (config.MODEL.TRUNK.RESNETS)." \
            if file_arch and model_arch and file_arch != model_arch else ""
        heads = any(m.startswith(formats.HEADS) for m in mismatched)
        head_hint = (f" To load the trunk only, add 'heads' to {KEY}.SKIP_LAYERS (or make config.MODEL.HEAD.PARAMS "
                     "match).") if heads else ""
        more = " ..." if len(mismatched) > _SHOW else ""
        raise ValueError(f"{where}: {len(mismatched)} tensor(s) do not fit the model: "
                         f"{'; '.join(mismatched[:_SHOW])}{more}.{arch}{head_hint}")
    if unmatched:
        close = []
        model_trunk = [k for k in model_sd if k.startswith(formats.TRUNK)]
        for k in unmatched[:3]:
            m = difflib.get_close_matches(k, model_trunk, n=1, cutoff=0.3)
            close.append(f"{k} -> {m[0]}" if m else f"{k} -> (none)")
        hints = list(notes)
        if any(".module." in f".{k}" for k in unmatched):
            hints.append(f"keys contain 'module.' (saved from a DDP-wrapped model): add {KEY}.REMOVE_PREFIX=module.")
        if not any(k.startswith(formats.TRUNK) for k in unmatched):
            hints.append(f"model trunk keys start with 'trunk.': {KEY}.APPEND_PREFIX=trunk. for torchvision names")
        file_arch, model_arch = _describe(state), _describe(model_sd)
        if file_arch and model_arch and file_arch != model_arch:
            hints.append(f"the file's trunk is {file_arch}, the model's {model_arch} (config.MODEL.TRUNK.RESNETS)")
        raise ValueError(f"{where}: {len(unmatched)} trunk tensor(s) match no model key (scaleclr loads the trunk "
                         f"strictly): {', '.join(unmatched[:_SHOW])}{' ...' if len(unmatched) > _SHOW else ''}; "
                         f"closest model keys: {'; '.join(close)}" + (f". {'; '.join(hints)}." if hints else "."))
    n_trunk = sum(k.startswith(formats.TRUNK) for k in loaded)
    if n_trunk == 0:
        sample = list(state)[:5]
        raise ValueError(f"{where}: no trunk tensor loaded ({len(state)} keys after the prefixes, e.g. {sample}; "
                         f"skipped {dict(skipped)}); the model's trunk keys look like "
                         f"{[k for k in model_sd if k.startswith(formats.TRUNK)][:2]}.")
    _, unexpected = model.load_state_dict(loaded, strict=False)
    assert not unexpected, unexpected
    left: Counter = Counter()
    left_trunk: List[str] = []
    # (not load_state_dict's missing keys: BatchNorm fills a missing num_batches_tracked with its current value)
    for k in (k for k in model_sd if k not in loaded):
        part = k.split(".", 1)[0]
        if any(s in k for s in skip):
            left[f"{part} SKIP_LAYERS"] += 1
        else:
            left[part] += 1
            if part == "trunk":
                left_trunk.append(k)
    report = InitReport(format=fmt, loaded={"trunk": n_trunk, "heads": len(loaded) - n_trunk},
                        skipped=dict(sorted(skipped.items())), left_at_init=dict(sorted(left.items())))
    logger.info("%s.PARAMS_FILE=%s: %s", KEY, path, report.summary())
    if left_trunk:
        logger.warning("%s: %d trunk tensor(s) are not in %s and stay at initialisation: %s%s", KEY, len(left_trunk),
                       path, ", ".join(left_trunk[:_SHOW]), " ..." if len(left_trunk) > _SHOW else "")
    return report
