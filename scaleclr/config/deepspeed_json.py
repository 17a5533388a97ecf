"""DeepSpeed JSON configs: load, fill ``"auto"`` from the Hydra config, check. Never imports deepspeed.

The Hydra config is the single source of truth for everything the training loop also uses; the JSON only
describes how DeepSpeed shards and communicates (ZeRO stage, buckets, offload, loss-scaler tuning). The
keys below are owned by the Hydra config: in the JSON they are ``"auto"`` (or absent) and scaleclr fills
them; an explicit value must equal what the Hydra config implies, else :class:`ConfigError` names both::

    JSON key                             Hydra source
    train_micro_batch_size_per_gpu       config.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    gradient_accumulation_steps          1 (scaleclr steps every batch)
    train_batch_size                     BATCHSIZE_PER_REPLICA x world size
    gradient_clipping                    config.OPTIMIZER.gradient_clipping (0 = off)
    bf16.enabled                         config.MODEL.AMP_PARAMS.USE_AMP and AMP_DTYPE == bfloat16
    fp16.enabled                         config.MODEL.AMP_PARAMS.USE_AMP and AMP_DTYPE == float16

The optimizer (SGD + LARC over VISSL's param groups) and the LR schedule come from ``config.OPTIMIZER``,
so ``optimizer`` and ``scheduler`` sections are errors. ``zero_allow_untested_optimizer`` is set (DeepSpeed
needs it for a torch SGD / LARC client optimizer); ``zero_force_ds_cpu_optimizer`` is set to false when the
optimizer state is offloaded to the CPU (scaleclr keeps its own SGD there).

``check_deepspeed_config(root)`` runs in ``train.py``'s preflight, before any worker starts; every worker's
``builders.build_engine_spec`` calls :func:`build_deepspeed_config` again with the true world size and hands the
filled dict to the engine (engines never see the config tree).
"""
import copy
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from scaleclr.config.errors import ConfigError

AUTO = "auto"
KEY = "config.DISTRIBUTED.DEEPSPEED_CONFIG"
#: sections whose content scaleclr builds from the Hydra config
FORBIDDEN_SECTIONS = {
    "optimizer": "the optimizer is SGD (+ LARC) from config.OPTIMIZER (name, momentum, weight_decay, use_larc, "
                 "larc_config, regularize_bn, ...)",
    "scheduler": "the LR schedule is config.OPTIMIZER.param_schedulers.lr (scaleclr sets the LR every step)",
    "torch_autocast": "mixed precision comes from config.MODEL.AMP_PARAMS (USE_AMP, AMP_DTYPE) and is applied "
                      "through the JSON's bf16 / fp16 sections",
    "amp": "mixed precision comes from config.MODEL.AMP_PARAMS (USE_AMP, AMP_DTYPE)",
}
ZERO_STAGES = (0, 1, 2, 3)


def resolve_path(path: str) -> str:
    """``path`` as given (absolute or relative to the working directory), else relative to the repository
    root (so ``ds_configs/zero2.json`` works from any directory)."""
    if not path:
        raise ConfigError(KEY, "is empty but config.DISTRIBUTED.ENGINE=deepspeed; pass --deepspeed_config "
                          "ds_configs/zero2.json (or set config.DISTRIBUTED.DEEPSPEED_CONFIG=<json>).")
    if os.path.isfile(path):
        return os.path.abspath(path)
    from scaleclr.paths import config_dir
    repo = os.path.dirname(os.path.abspath(str(config_dir())))
    alt = os.path.join(repo, path)
    if not os.path.isabs(path) and os.path.isfile(alt):
        return alt
    shipped = ", ".join(sorted(f for f in os.listdir(os.path.join(repo, "ds_configs")) if f.endswith(".json"))) \
        if os.path.isdir(os.path.join(repo, "ds_configs")) else "none found"
    raise ConfigError(KEY, f"= {path!r}: no such file (looked in {os.getcwd()} and {repo}); shipped configs "
                      f"in ds_configs/: {shipped}.")


def load_json(path: str) -> Dict[str, Any]:
    """The JSON object in ``path`` (resolved with :func:`resolve_path`). Raises ConfigError."""
    full = resolve_path(path)
    try:
        with open(full) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(KEY, f"{full} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(KEY, f"{full} must hold a JSON object, got {type(data).__name__}.")
    return data


def hydra_values(c, world_size: int) -> List[Tuple[Tuple[str, ...], Any, str]]:
    """``[(json key path, value, hydra source)]`` for every key the Hydra config owns."""
    bs = int(c.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
    amp = c.MODEL.AMP_PARAMS
    use_amp = bool(amp.USE_AMP)
    amp_src = (f"config.MODEL.AMP_PARAMS.USE_AMP={use_amp}" +
               (f", AMP_DTYPE={amp.AMP_DTYPE}" if use_amp else ""))
    return [
        (("train_micro_batch_size_per_gpu",), bs, f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={bs}"),
        (("gradient_accumulation_steps",), 1, "scaleclr (one optimizer step per batch)"),
        (("train_batch_size",), bs * world_size,
         f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={bs} x world size {world_size}"),
        (("gradient_clipping",), float(c.OPTIMIZER.gradient_clipping),
         f"config.OPTIMIZER.gradient_clipping={float(c.OPTIMIZER.gradient_clipping)} (0 = off)"),
        (("bf16", "enabled"), use_amp and amp.AMP_DTYPE == "bfloat16", amp_src),
        (("fp16", "enabled"), use_amp and amp.AMP_DTYPE == "float16", amp_src),
    ]


def _same(json_value: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(json_value, bool):
        return isinstance(json_value, bool) and json_value == value
    if isinstance(json_value, (int, float)):
        return float(json_value) == float(value)
    return False


def _find_autos(node: Any, prefix: str = "") -> List[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_autos(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _find_autos(v, f"{prefix}[{i}].")]
    return [prefix.rstrip(".")] if node == AUTO else []


def build_deepspeed_config(c, world_size: int, path: Optional[str] = None) -> Dict[str, Any]:
    """The DeepSpeed config dict to pass to ``deepspeed.initialize``: the JSON with every Hydra-owned key filled.

    Args:
        c: the ``config`` node.
        world_size: number of data-parallel processes.
        path: JSON path; default ``config.DISTRIBUTED.DEEPSPEED_CONFIG``.

    Raises:
        ConfigError: missing/invalid file, an explicit value that contradicts the Hydra config (the message
            names both), a forbidden section, an unknown ``"auto"``, or a bad ZeRO stage.
    """
    path = path or str(c.DISTRIBUTED.DEEPSPEED_CONFIG)
    src = f"{KEY}={path}"
    ds = copy.deepcopy(load_json(path))
    for section, why in FORBIDDEN_SECTIONS.items():
        if section in ds:
            raise ConfigError(KEY, f"{path} has a {section!r} section, but {why}; remove it from the JSON.")
    for keys, value, source in hydra_values(c, world_size):
        node = ds
        for k in keys[:-1]:
            sub = node.setdefault(k, {})
            if not isinstance(sub, dict):
                raise ConfigError(KEY, f"{path}: {k!r} must be an object, got {sub!r}.")
            node = sub
        name = ".".join(keys)
        current = node.get(keys[-1], AUTO)
        if current == AUTO:
            node[keys[-1]] = value
        elif not _same(current, value):
            raise ConfigError(KEY, f"{path} sets {name} = {json.dumps(current)}, which contradicts {source} "
                              f"(= {json.dumps(value)}). The Hydra config is the single source of truth: set "
                              f"{name} to \"auto\" in the JSON (scaleclr fills it), or change the Hydra config.")
    leftover = _find_autos(ds)
    if leftover:
        raise ConfigError(KEY, f"{path}: \"auto\" is only filled for "
                          f"{', '.join('.'.join(k) for k, _, _ in hydra_values(c, world_size))}; "
                          f"give explicit values for {', '.join(leftover)}.")
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(KEY, f"{path}: zero_optimization must be an object, got {zero!r}.")
    stage = zero.setdefault("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(KEY, f"{path}: zero_optimization.stage = {stage!r}; allowed: 0, 1, 2, 3.")
    if ds.get("zero_allow_untested_optimizer", True) is not True:
        raise ConfigError(KEY, f"{path} sets zero_allow_untested_optimizer = false, but scaleclr's optimizer "
                          "(torch SGD, LARC) is a client optimizer DeepSpeed calls untested; remove the key or "
                          "set it to true.")
    ds["zero_allow_untested_optimizer"] = True
    offload = zero.get("offload_optimizer") or {}
    if isinstance(offload, dict) and offload.get("device", "none") not in ("none", None):
        if ds.get("zero_force_ds_cpu_optimizer", False) is not False:
            raise ConfigError(KEY, f"{path} offloads the optimizer state and sets zero_force_ds_cpu_optimizer = "
                              "true, but scaleclr steps its own SGD/LARC on the CPU; set it to false.")
        ds["zero_force_ds_cpu_optimizer"] = False
        if stage not in (1, 2, 3):
            raise ConfigError(KEY, f"{path}: offload_optimizer needs zero_optimization.stage 1, 2 or 3, "
                              f"got {stage}.")
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:  # unreachable through hydra_values; kept as a guard
        raise ConfigError(KEY, f"{path}: bf16 and fp16 cannot both be enabled.")
    return ds


def check_deepspeed_config(root) -> Dict[str, Any]:
    """Preflight (train.py, before workers start): load the JSON, fill "auto", raise ConfigError on conflicts.

    The world size is ``NUM_NODES x NUM_PROC_PER_NODE`` (preflight has already checked it against the
    launcher's). Returns the filled dict.
    """
    c = root.config
    d = c.DISTRIBUTED
    return build_deepspeed_config(c, int(d.NUM_NODES) * int(d.NUM_PROC_PER_NODE))
