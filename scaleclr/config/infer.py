"""Values VISSL infers from the rest of the config, computed once from the true world size.

- ``LOSS.<loss>.buffer_params.world_size`` and ``effective_batch_size`` (spec 2.2): the 2-crop loss counts
  rows (2 x BATCHSIZE_PER_REPLICA x world), the multicrop loss counts images; ``num_crops`` comes from
  ImgPilToMultiCrop's ``total_num_crops``; the multicrop loss forces ``multicrop_collator``.
- The LR schedule: auto-scaling by the global batch (linear or sqrt rule), warmup start at one node's LR,
  single-node warmup removal (spec 6.1), written back into ``OPTIMIZER.param_schedulers.lr``.
- Head dimensions: the first head's input follows the trunk (2048 x width, 512 x width for depths 18/34),
  hidden dims that equal the old input dim follow it too, the last output follows ``embedding_dim``.
  A head spelled out on the command line is taken as written and must agree with both, else an error
  names both keys.
- Linear evaluation (``MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON``): the classifier's input (``dims[0]``, and
  ``in_channels`` of ``eval_mlp``) follows the trunk (so ``+models=resnet50_w2`` gives 4096, w4 8192); its output
  (the classes) is the config's. ``METERS.accuracy_list_meter.num_meters`` = the number of heads (as VISSL).
  The InfoNCE loss's inferred values are not computed (the loss is cross-entropy). With PRECOMPUTE_FEATURES,
  ``DATA.TRAIN.DEVICE_AUGMENTATION: auto`` becomes ``off`` (the batches are features).
- The data paths each split will read (``DATA_PATHS[0]``, else the dataset catalog's entry for ``DATASET_NAMES[0]``;
  TEST reads the catalog's ``val``), reported in the ``inferred`` log line (``--dry-run`` prints it too).
"""
import copy
import logging
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from scaleclr.config.errors import ConfigError
from scaleclr.config.data_checks import transforms_num_views

logger = logging.getLogger(__name__)


def trunk_dim(depth: int, width_multiplier: int) -> int:
    return (512 if depth in (18, 34) else 2048) * width_multiplier


def loss_cfg(c: DictConfig) -> DictConfig:
    return c.LOSS[c.LOSS.name]


def _head_dims(params: List[Any]) -> List[List[int]]:
    """dims of every mlp module, in execution order (composite heads flattened)."""
    out = []
    for i, p in enumerate(params):
        mods = p if (isinstance(p, list) and p and isinstance(p[0], list)) else [p]
        for m in mods:
            if not (isinstance(m, list) and len(m) == 2 and isinstance(m[1], dict) and "dims" in m[1]):
                raise ConfigError(f"config.MODEL.HEAD.PARAMS[{i}]",
                                  f"each head is [\"mlp\", {{\"dims\": [...], ...}}], got {m!r}.")
            out.append(m[1]["dims"])
    return out


def _rewrite_head(params: List[Any], old_in: int, new_in: int, out_dim: int) -> List[Any]:
    params = copy.deepcopy(params)
    mods = []
    for p in params:
        mods.extend(p if (isinstance(p, list) and p and isinstance(p[0], list)) else [p])
    for m in mods:
        m[1]["dims"] = [new_in if d == old_in else d for d in m[1]["dims"]]
    mods[-1][1]["dims"][-1] = out_dim
    return params


def infer_classifier(c: DictConfig, explicit: Mapping[str, str], info: Dict[str, Any]) -> None:
    """Linear evaluation: the classifier's input width follows the trunk (validated: one ``mlp`` / ``eval_mlp``)."""
    params = OmegaConf.to_container(c.MODEL.HEAD.PARAMS, resolve=True)
    name, kw = params[0]
    r = c.MODEL.TRUNK.RESNETS
    t_dim = trunk_dim(r.DEPTH, r.WIDTH_MULTIPLIER)
    ins = [kw["dims"][0]] + ([kw["in_channels"]] if name == "eval_mlp" else [])
    if any(k.startswith("config.MODEL.HEAD.PARAMS") for k in explicit):
        if any(int(i) != t_dim for i in ins):
            raise ConfigError("config.MODEL.HEAD.PARAMS", f"the classifier's input {ins} contradicts the trunk: "
                              f"config.MODEL.TRUNK.RESNETS.DEPTH={r.DEPTH} WIDTH_MULTIPLIER={r.WIDTH_MULTIPLIER} "
                              f"outputs {t_dim} features (its final average pool).")
    elif any(int(i) != t_dim for i in ins):
        kw["dims"][0] = t_dim
        if name == "eval_mlp":
            kw["in_channels"] = t_dim
        c.MODEL.HEAD.PARAMS = params
        info["head_dims"] = [kw["dims"]]
        logger.info("classifier input inferred from the trunk (%d features): %s", t_dim, params)
    c.METERS.accuracy_list_meter.num_meters = len(params)


def data_paths(c: DictConfig, splits=("TRAIN",)) -> Dict[str, Optional[str]]:
    """Where each split's images come from, without touching the file system (for the log and ``--dry-run``)."""
    from scaleclr.data.catalog import CATALOG_SPLITS, catalog_entry

    out: Dict[str, Optional[str]] = {}
    for split in splits:
        s = c.DATA[split]
        if not s.DATA_SOURCES or s.DATA_SOURCES[0] == "synthetic":
            continue
        if s.DATA_PATHS:
            out[split] = s.DATA_PATHS[0]
        elif s.DATASET_NAMES:
            path = catalog_entry(s.DATASET_NAMES[0], CATALOG_SPLITS[split])
            out[split] = f"{path} (dataset catalog: {s.DATASET_NAMES[0]})"
    return out


def infer_head(c: DictConfig, explicit: Mapping[str, str], info: Dict[str, Any]) -> None:
    params = OmegaConf.to_container(c.MODEL.HEAD.PARAMS, resolve=True)
    if not params:
        raise ConfigError("config.MODEL.HEAD.PARAMS", "is empty; SimCLR needs a projection head.")
    dims = _head_dims(params)
    for a, b in zip(dims, dims[1:]):
        if a[-1] != b[0]:
            raise ConfigError("config.MODEL.HEAD.PARAMS", f"consecutive heads do not chain: {a} -> {b}.")
    r = c.MODEL.TRUNK.RESNETS
    t_dim = trunk_dim(r.DEPTH, r.WIDTH_MULTIPLIER)
    emb_key = f"config.LOSS.{c.LOSS.name}.buffer_params.embedding_dim"
    emb = loss_cfg(c).buffer_params.embedding_dim
    if any(k.startswith("config.MODEL.HEAD.PARAMS") for k in explicit):
        if dims[0][0] != t_dim:
            raise ConfigError("config.MODEL.HEAD.PARAMS", f"the head's input dim {dims[0][0]} contradicts the "
                              f"trunk: config.MODEL.TRUNK.RESNETS.DEPTH={r.DEPTH} WIDTH_MULTIPLIER="
                              f"{r.WIDTH_MULTIPLIER} outputs {t_dim} features.")
        if dims[-1][-1] != emb:
            raise ConfigError("config.MODEL.HEAD.PARAMS", f"the head's output dim {dims[-1][-1]} contradicts "
                              f"{emb_key}={emb}.")
        return
    if dims[0][0] != t_dim or dims[-1][-1] != emb:
        new = _rewrite_head(params, dims[0][0], t_dim, emb)
        c.MODEL.HEAD.PARAMS = new
        info["head_dims"] = _head_dims(new)
        logger.info("head dims inferred from the trunk (%d) and embedding_dim (%d): %s", t_dim, emb,
                    info["head_dims"])


def infer(root: DictConfig, world_size: Optional[int] = None,
          explicit: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Fill inferred values into `root` in place; return what was inferred (for the log)."""
    from scaleclr.optim.schedulers import auto_scale_lr, build_scheduler

    explicit = explicit or {}
    c = root.config
    d = c.DISTRIBUTED
    config_world = d.NUM_NODES * d.NUM_PROC_PER_NODE
    world = world_size or config_world
    info: Dict[str, Any] = {"world_size": world}
    bs = c.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    info["global_batch_size"] = bs * world

    for key in explicit:
        other = key.split(".")[2] if key.startswith("config.LOSS.") and key.count(".") >= 3 else None
        if other and other != c.LOSS.name and other in c.LOSS:
            raise ConfigError(key, f"sets a key of the inactive loss: config.LOSS.name is {c.LOSS.name!r}; use "
                              f"config.LOSS.{c.LOSS.name}.{key.split('.', 3)[3]} instead.")
    linear = bool(c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON)
    lc = loss_cfg(c)
    if not linear:  # linear evaluation's cross-entropy has no InfoNCE buffers to infer
        lc.buffer_params.world_size = world
        if c.LOSS.name == "multicrop_simclr_info_nce_loss":
            lc.num_crops = transforms_num_views(c.DATA.TRAIN.TRANSFORMS)
            lc.buffer_params.effective_batch_size = bs * world
            if c.DATA.TRAIN.COLLATE_FUNCTION != "multicrop_collator":
                c.DATA.TRAIN.COLLATE_FUNCTION = "multicrop_collator"
                info["collate_function"] = "multicrop_collator"
            info["num_crops"] = lc.num_crops
        else:
            lc.buffer_params.effective_batch_size = 2 * bs * world
        info["effective_batch_size"] = lc.buffer_params.effective_batch_size

    sg = c.MODEL.SYNC_BN_CONFIG
    if sg.CONVERT_BN_TO_SYNC_BN and sg.GROUP_SIZE > 0 and world % min(sg.GROUP_SIZE, world) != 0:
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE", f"= {sg.GROUP_SIZE} does not divide the "
                          f"world size {world}; use a divisor of {world}, 0 (whole world) or -1 (one node).")

    fc = c.MODEL.FSDP_CONFIG
    if d.ENGINE == "fsdp" and world % fc.HSDP_REPLICATE != 0:
        raise ConfigError("config.MODEL.FSDP_CONFIG.HSDP_REPLICATE", f"= {fc.HSDP_REPLICATE} does not divide the "
                          f"world size {world}; use NUM_NODES ({d.NUM_NODES}) or 1.")
    if d.ENGINE != "fsdp" and (fc.MIXED_PRECISION != "none" or fc.HSDP_REPLICATE != 1):
        logger.warning("config.MODEL.FSDP_CONFIG.* has no effect with config.DISTRIBUTED.ENGINE=%s; use "
                       "config.MODEL.AMP_PARAMS for mixed precision", d.ENGINE)

    nodes = max(1, world // d.NUM_PROC_PER_NODE) if world_size else d.NUM_NODES
    procs = min(d.NUM_PROC_PER_NODE, world)
    for name in ("lr", "lr_head"):
        sched = OmegaConf.to_container(c.OPTIMIZER.param_schedulers[name], resolve=True)
        if not sched:
            continue
        try:
            if sched.get("auto_lr_scaling", {}).get("auto_scale", False):
                new_lr, lr_info = auto_scale_lr(sched, bs, procs, nodes)
                c.OPTIMIZER.param_schedulers[name] = new_lr
                info[name] = lr_info
            build_scheduler(OmegaConf.to_container(c.OPTIMIZER.param_schedulers[name], resolve=True),
                            num_epochs=c.OPTIMIZER.num_epochs)
        except ValueError as e:
            raise ConfigError(f"config.OPTIMIZER.param_schedulers.{name}", str(e)) from e
    if linear and c.MODEL.FEATURE_EVAL_SETTINGS.PRECOMPUTE_FEATURES and c.DATA.TRAIN.DEVICE_AUGMENTATION == "auto":
        c.DATA.TRAIN.DEVICE_AUGMENTATION = "off"  # batches of precomputed features: no image stage on the device
    if linear:
        infer_classifier(c, explicit, info)
    else:
        infer_head(c, explicit, info)
    paths = data_paths(c, ("TRAIN", "TEST") if linear and (c.TEST_MODEL or c.TEST_ONLY) else ("TRAIN",))
    if paths:
        info["data_paths"] = paths
    if c.CHECKPOINT.APPEND_DISTR_RUN_ID:  # VISSL: one sub-folder per run id
        c.CHECKPOINT.DIR = f"{c.CHECKPOINT.DIR.rstrip('/')}/{d.RUN_ID}"
        info["checkpoint_dir"] = c.CHECKPOINT.DIR
    if not linear:
        _check_inferred(c, explicit)
    return info


def _check_inferred(c: DictConfig, explicit: Mapping[str, str]) -> None:
    """A value VISSL infers that the command line set to something else is an error (it would be overwritten)."""
    lc = loss_cfg(c)
    prefix = f"config.LOSS.{c.LOSS.name}"
    inferred = {f"{prefix}.buffer_params.world_size": lc.buffer_params.world_size,
                f"{prefix}.buffer_params.effective_batch_size": lc.buffer_params.effective_batch_size}
    if c.LOSS.name == "multicrop_simclr_info_nce_loss":
        inferred[f"{prefix}.num_crops"] = lc.num_crops
    for key, value in inferred.items():
        if key in explicit and str(explicit[key]) != str(value):
            raise ConfigError(key, f"= {explicit[key]} but scaleclr infers {value} from the world size, the batch "
                              "size and the transforms (as VISSL does); drop the override.")
