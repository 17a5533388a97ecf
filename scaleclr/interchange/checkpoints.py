"""Read any scaleclr checkpoint (every engine) or foreign weight file into a plain fp32 scaleclr state dict.

No process group and no GPU are needed:

* DDP checkpoint file ``<tag>.torch`` (``{"engine": "ddp", "model": state, "optimizer", ..., "client_state"}``);
* FSDP2 checkpoint directory (``torch.distributed.checkpoint``, ``.metadata``):
  :func:`scaleclr.engines.fsdp.load_full_state_dict`;
* DeepSpeed checkpoint directory (``scaleclr_meta.json``, ``*model_states.pt``):
  :func:`scaleclr.engines.deepspeed.read_fp32_state_dict` (imports deepspeed, which only that module does);
* scaleclr export / consolidated files (``{"model": state, ...}``: ``python -m scaleclr.export --format scaleclr``,
  the ``<tag>_consolidated_fp32.torch`` next to a DeepSpeed run's final checkpoint, :func:`write_consolidated`);
* a VISSL model-zoo checkpoint or a torchvision ResNet state dict (:mod:`scaleclr.interchange.formats`).

Files are read with ``torch.load(weights_only=True)``; one that needs pickle is refused with the command that
converts it (:func:`load_weights_file`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Any, Dict

import torch

from scaleclr.interchange import formats
from scaleclr.io import atomic_torch_save

__all__ = ["Checkpoint", "read_checkpoint", "load_weights_file", "pickle_error", "write_consolidated",
           "migrate_checkpoint", "migrate_record", "migrate_train_state"]

RUN_POINTER = "checkpoint.json"  # scaleclr.checkpoint.POINTER (not imported: keeps this module light)


@dataclass
class Checkpoint:
    """A checkpoint read into scaleclr names.

    Attributes:
        state: fp32 ``{"trunk.*", "heads.*"}`` state dict on the CPU (integer buffers keep their dtype).
        source: what was read, e.g. ``"ddp checkpoint"``, ``"fsdp checkpoint (DCP directory)"``,
            ``"deepspeed checkpoint (ZeRO-2)"``, ``"scaleclr export"``, ``"vissl"``, ``"torchvision"``.
        phase_idx, iteration: position of the checkpoint when the file says so (else 0).
    """

    state: Dict[str, torch.Tensor]
    source: str
    phase_idx: int = 0
    iteration: int = 0
    info: Dict[str, Any] = field(default_factory=dict)


def pickle_error(path: str, err: Exception, what: str = "") -> ValueError:
    """The error for a file ``torch.load(weights_only=True)`` refuses, saying how to convert it."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else repr(err))
    stem = os.path.splitext(os.path.basename(path))[0]
    label = f"{what}={path}" if what else path
    return ValueError(
        f"{label} needs pickle to load: torch.load(weights_only=True) refused it ({reason[:200]}). scaleclr only "
        "loads files of tensors, dicts, lists and numbers; a pickled object can run arbitrary code. If you trust "
        f"the file, convert it once: `python -m scaleclr.export {path} {stem}_weights.torch --format scaleclr "
        "--allow-pickle` (or torch.load it yourself with weights_only=False and torch.save({'model': "
        "state_dict}) with tensors only), then use the converted file.")


def load_weights_file(path: str, allow_pickle: bool = False, what: str = "") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=not allow_pickle)`` with errors that name the file.

    Args:
        path: the file.
        allow_pickle: load arbitrary pickled objects (only for files you trust).
        what: the option that named the file, for messages (e.g. ``"config.MODEL.WEIGHTS_INIT.PARAMS_FILE"``).

    Raises:
        ValueError: missing file, a directory, a file needing pickle (:func:`pickle_error`), or not a torch file.
    """
    label = f"{what}={path}" if what else path
    if not os.path.exists(path):
        raise ValueError(f"{label}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{label} is a directory, not a weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise pickle_error(path, e, what) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{label} is not a readable torch.save file: {str(e).splitlines()[0][:300]}") from None


def _position(train_state: Dict[str, Any]) -> Dict[str, int]:
    """``phase_idx`` (epochs done: VISSL's restart phase) and ``iteration`` (steps done) of a scaleclr train
    state."""
    ts = migrate_train_state(train_state) if train_state else {}
    return {"phase_idx": int(ts.get("epochs_done", 0)), "iteration": int(ts.get("step", 0))}


def _from_loaded(obj: Any, path: str) -> Checkpoint:
    det = formats.detect_format(obj)
    if det.name == "scaleclr" and det.where == "model":
        engine = obj.get("engine")
        source = {"ddp": "ddp checkpoint", "deepspeed": "deepspeed consolidated export",
                  "fsdp-export": "fsdp export"}.get(engine, "scaleclr export")
        cs = obj.get("client_state", {}).get("train_state", {}) if isinstance(obj.get("client_state"), dict) else {}
        return Checkpoint(formats.fp32(obj["model"]), source, **_position(cs), info={"engine": engine})
    if det.module_prefix:
        raise ValueError(f"{path}: the keys start with 'module.' (saved from a DDP-wrapped model); strip it first "
                         "(state = {k[len('module.'):]: v for k, v in state.items()}) and save the result")
    if det.name == "scaleclr":
        return Checkpoint(formats.fp32(obj), "scaleclr state dict")
    if det.name == "vissl":
        return Checkpoint(formats.fp32(formats.from_vissl(obj)), "vissl", phase_idx=int(obj.get("phase_idx", 0)),
                          iteration=int(obj.get("iteration", 0)))
    if det.name == "torchvision":
        return Checkpoint(formats.fp32(formats.from_torchvision(obj)), "torchvision")
    if det.name == "vissl_trunk":
        trunk = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        wrapped = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}
        return Checkpoint(formats.fp32(formats.from_vissl(wrapped)), "vissl trunk")
    top = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: not a scaleclr, VISSL or torchvision weights file (top-level keys: {top})")


def _read_directory(path: str) -> Checkpoint:
    if os.path.exists(os.path.join(path, ".metadata")):
        from scaleclr.engines.fsdp import load_full_state_dict

        client = os.path.join(path, "client_state.torch")
        train_state: Dict[str, Any] = {}
        if os.path.exists(client):
            meta = load_weights_file(client)
            train_state = meta.get("client_state", {}).get("train_state", {})
        return Checkpoint(load_full_state_dict(path), "fsdp checkpoint (DCP directory)",
                          **_position(train_state))
    from scaleclr.engines.deepspeed import META_FILE

    if os.path.exists(os.path.join(path, META_FILE)) or glob.glob(os.path.join(path, "*model_states.pt")):
        from scaleclr.engines.deepspeed import read_fp32_state_dict

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's reader prints progress: keep stdout for results
            state, meta, _ = read_fp32_state_dict(path)
        ts = meta.get("train_state", {})
        return Checkpoint(state, f"deepspeed checkpoint (ZeRO-{meta.get('zero_stage', '?')})",
                          **_position(ts), info={"meta": meta})
    pointer = os.path.join(path, RUN_POINTER)
    if os.path.exists(pointer):
        with open(pointer) as f:
            latest = json.load(f).get("latest", {}).get("path", "<tag>")
        raise ValueError(f"{path} is a run directory (config.CHECKPOINT.DIR); name one checkpoint in it, e.g. the "
                         f"latest: {os.path.join(path, latest)}")
    raise ValueError(f"{path} is a directory but neither an FSDP checkpoint (no .metadata) nor a DeepSpeed checkpoint "
                     f"(no {META_FILE}, no *model_states.pt)")


def read_checkpoint(path: str, allow_pickle: bool = False) -> Checkpoint:
    """Any engine's checkpoint, a scaleclr export, a VISSL or a torchvision file -> :class:`Checkpoint`.

    Raises:
        ValueError: missing path, unknown layout, a file needing pickle without ``allow_pickle``, or a directory
            that is no FSDP / DeepSpeed checkpoint (a run directory names its latest checkpoint).
    """
    if os.path.isdir(path):
        return _read_directory(os.path.normpath(path))
    return _from_loaded(load_weights_file(path, allow_pickle=allow_pickle), path)


def write_consolidated(engine, path: str, tag: str) -> None:
    """``<path>_consolidated_fp32.torch`` next to checkpoint ``path``: the engine's full fp32 state in scaleclr's export
    layout (:func:`scaleclr.interchange.formats.scaleclr_payload`) with ``engine``, ``tag`` and the engine's
    ``checkpoint_meta()``. Collective (``engine.full_state_dict()``); rank 0 writes it, atomically."""
    state = engine.full_state_dict()
    if engine.rank == 0:
        atomic_torch_save(formats.scaleclr_payload(state, engine=engine.name, tag=tag, meta=engine.checkpoint_meta()),
                          path + formats.CONSOLIDATED_SUFFIX)


# ------------------------------------------------------------------------------ older layouts, in one place
def migrate_train_state(ts: Dict[str, Any]) -> Dict[str, int]:
    """A train state in today's names (``epochs_done`` / ``step`` / ``step_in_epoch``; older checkpoints say
    ``epoch`` / ``iteration`` / ``iteration_in_epoch``)."""
    if "epochs_done" in ts:
        return dict(ts)
    return {"epochs_done": ts.get("epoch", 0), "step": ts.get("iteration", 0),
            "step_in_epoch": ts.get("iteration_in_epoch", 0)}


def migrate_checkpoint(client: Dict[str, Any], global_batch_size: int) -> Dict[str, Any]:
    """A checkpoint's client state in today's layout (the one home of every older-format rule).

    Older scaleclr checkpoints: ``train_state`` with ``epoch`` / ``iteration`` / ``iteration_in_epoch`` (now
    ``epochs_done`` / ``step`` / ``step_in_epoch``), ``iters_per_epoch`` (now ``steps_per_epoch``), no ``sampler``
    (its resume point follows from the train state and this run's ``global_batch_size``), ``rng_cpu`` (rank 0's CPU
    generator only; now ``rng`` = every rank's CPU and CUDA states).
    """
    c = dict(client)
    ts = c["train_state"] = migrate_train_state(c["train_state"])
    if "steps_per_epoch" not in c and "iters_per_epoch" in c:
        c["steps_per_epoch"] = c.pop("iters_per_epoch")
    if "sampler" not in c:
        c["sampler"] = {"epoch": ts["epochs_done"], "consumed_samples": ts["step_in_epoch"] * global_batch_size}
    if "rng" not in c:
        c["rng"] = {"cpu": [c.pop("rng_cpu")], "cuda": [None]}
    return c


def migrate_record(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A pointer record in today's layout (older ones say ``epoch`` for ``epochs_done``)."""
    return entry if "epochs_done" in entry else {**entry, "epochs_done": entry["epoch"]}
