"""Semantic checks of a composed configuration, run before any worker starts.

Types are enforced by the schema during composition; this module checks what types cannot express:
keys added with ``+`` that the schema does not know, allowed names, ranges and cross-key consistency.
Every error names the full key and what is allowed.
"""
import logging
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from scaleclr.config import schema
from scaleclr.config.compose import unknown_key_error
from scaleclr.config.errors import ConfigError

logger = logging.getLogger(__name__)

ALLOWED = {
    "config.LOSS.name": ("simclr_info_nce_loss", "multicrop_simclr_info_nce_loss"),
    "config.MODEL.TRUNK.NAME": ("resnet",),
    "config.MODEL.TRUNK.RESNETS.DEPTH": (18, 34, 50, 101, 152, 200),
    "config.MODEL.TRUNK.RESNETS.NORM": ("BatchNorm", "LayerNorm", "GroupNorm"),
    "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": ("pytorch", "apex", "native"),
    "config.MODEL.AMP_PARAMS.AMP_TYPE": ("apex", "pytorch"),
    "config.MODEL.AMP_PARAMS.AMP_DTYPE": ("float16", "bfloat16"),
    "config.MODEL.FSDP_CONFIG.SHARD_UNIT": ("block", "stage"),
    "config.MODEL.FSDP_CONFIG.MIXED_PRECISION": ("none", "bfloat16", "float16"),
    "config.OPTIMIZER.name": ("sgd",),
    "config.DISTRIBUTED.ENGINE": ("ddp", "deepspeed", "fsdp"),
    "config.DISTRIBUTED.BACKEND": ("nccl", "gloo"),
    "config.DISTRIBUTED.INIT_METHOD": ("tcp", "env", "file"),
    "config.MACHINE.DEVICE": ("gpu", "cpu"),
    "config.DATA.TRAIN.COLLATE_FUNCTION": ("simclr_collator", "multicrop_collator"),
    "config.DATA.TRAIN.DEVICE_AUGMENTATION": ("auto", "on", "off"),
    "config.LOSS.simclr_info_nce_loss.impl": ("reference", "streaming", "triton", "auto"),
    "config.LOSS.multicrop_simclr_info_nce_loss.impl": ("reference", "streaming", "triton", "auto"),
    "config.LOSS.multicrop_simclr_info_nce_loss.negatives": ("global", "local"),
    "engine_name": ("train",),
    "config.MULTI_PROCESSING_METHOD": ("forkserver", "spawn", "fork"),
    "config.MODEL.INPUT_TYPE": ("rgb",),
}
DATA_SOURCES = ("disk_folder", "disk_filelist", "synthetic")


def _get(root: DictConfig, key: str) -> Any:
    return OmegaConf.select(root, key)


def check_unknown_keys(node: DictConfig, schema_node: DictConfig, prefix: str) -> None:
    """Keys added with `+config.X=v` (or in a YAML file under a free-form parent) that the schema lacks."""
    for k in node.keys():
        full = f"{prefix}{k}"
        if k not in schema_node:
            raise unknown_key_error(full)
        child, schema_child = node._get_node(k), schema_node._get_node(k)
        typed = isinstance(schema_child, DictConfig) and schema_child._metadata.object_type not in (dict, None)
        if isinstance(child, DictConfig) and typed:
            check_unknown_keys(child, schema_child, full + ".")


def _positive(root, keys: List[str], allow_zero=False) -> None:
    for key in keys:
        v = _get(root, key)
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}.")


def transforms_num_views(transforms) -> int:
    """Views per image the transform list produces (ImgReplicatePil / ImgPilToMultiCrop), 1 if neither."""
    for t in transforms:
        if t.get("name") == "ImgReplicatePil":
            return int(t.get("num_times", 2))
        if t.get("name") == "ImgPilToMultiCrop":
            return int(t["total_num_crops"])
    return 1


def _check_transforms(root) -> None:
    key = "config.DATA.TRAIN.TRANSFORMS"
    for i, t in enumerate(_get(root, key)):
        if not isinstance(t, (dict, DictConfig)) or "name" not in t:
            raise ConfigError(f"{key}[{i}]", f"each transform is a mapping with a 'name', got {t!r}.")
        if t["name"] == "ImgPilToMultiCrop":
            k = f"{key}[{i}]"
            for p in ("total_num_crops", "size_crops", "num_crops", "crop_scales"):
                if p not in t:
                    raise ConfigError(f"{k}.{p}", "is required by ImgPilToMultiCrop.")
            if int(t["total_num_crops"]) != sum(t["num_crops"]):
                raise ConfigError(f"{k}.total_num_crops", f"= {t['total_num_crops']} but num_crops "
                                  f"{list(t['num_crops'])} add up to {sum(t['num_crops'])}; they must be equal.")
            if not len(t["size_crops"]) == len(t["num_crops"]) == len(t["crop_scales"]):
                raise ConfigError(f"{k}.size_crops", "size_crops, num_crops and crop_scales must have the "
                                  f"same length, got {len(t['size_crops'])}, {len(t['num_crops'])}, "
                                  f"{len(t['crop_scales'])}.")
            if any(n <= 0 for n in t["num_crops"]) or any(s <= 0 for s in t["size_crops"]):
                raise ConfigError(f"{k}.num_crops", "crop counts and sizes must be > 0.")


def validate(root: DictConfig) -> None:
    """Raise ConfigError for the first problem found in the composed tree `root`."""
    check_unknown_keys(root, OmegaConf.structured(schema.Root), "")
    key = "config.DATA.TRAIN.DEVICE_AUGMENTATION"
    if _get(root, key) in ("True", "False"):  # YAML 1.1 reads unquoted on / off as booleans
        raise ConfigError(key, f"= {_get(root, key)} (a boolean: YAML reads unquoted on/off as true/false); "
                          "write 'on' or 'off' in quotes, or auto.")
    for key, allowed in ALLOWED.items():
        v = _get(root, key)
        if v not in allowed:
            raise ConfigError(key, f"= {v!r} is not allowed; allowed values: {', '.join(map(str, allowed))}.")
    c = root.config
    _positive(root, ["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA", "config.DISTRIBUTED.NUM_NODES",
                     "config.DISTRIBUTED.NUM_PROC_PER_NODE", "config.OPTIMIZER.num_epochs",
                     "config.LOG_FREQUENCY", "config.CHECKPOINT.CHECKPOINT_FREQUENCY",
                     "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER", "config.MODEL.TRUNK.RESNETS.GROUPS",
                     "config.MODEL.TRUNK.RESNETS.WIDTH_PER_GROUP", "config.DISTRIBUTED.TIMEOUT_SECONDS",
                     "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim",
                     "config.LOSS.multicrop_simclr_info_nce_loss.buffer_params.embedding_dim",
                     "config.KNN_EVAL.TOPK", "config.KNN_EVAL.BATCHSIZE"])
    _positive(root, ["config.DATA.NUM_DATALOADER_WORKERS", "config.OPTIMIZER.weight_decay",
                     "config.OPTIMIZER.momentum", "config.OPTIMIZER.larc_config.trust_coefficient",
                     "config.OPTIMIZER.larc_config.eps", "config.OPTIMIZER.gradient_clipping",
                     "node_id"], allow_zero=True)
    for loss in ("simclr_info_nce_loss", "multicrop_simclr_info_nce_loss"):
        key = f"config.LOSS.{loss}.temperature"
        if _get(root, key) <= 0:
            raise ConfigError(key, f"must be > 0 (it divides the cosine similarities), got {_get(root, key)}.")
    if c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE < -1:
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE",
                          f"= {c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE}; allowed: -1 (processes of one node), "
                          "0 (whole world) or k > 0 (groups of k contiguous ranks).")
    if c.OPTIMIZER.use_larc and c.OPTIMIZER.name != "sgd":
        raise ConfigError("config.OPTIMIZER.use_larc", f"LARC wraps SGD only; config.OPTIMIZER.name is "
                          f"{c.OPTIMIZER.name!r}.")
    if c.SLURM.USE_SLURM:
        raise ConfigError("config.SLURM.USE_SLURM", "VISSL's submitit launcher is not part of scaleclr: submit "
                          "slurm/train.sbatch (srun, one task per GPU) instead; see README 'Multi-process training'.")
    if c.DATA.TRAIN.COPY_TO_LOCAL_DISK:
        logger.warning("config.DATA.TRAIN.COPY_TO_LOCAL_DISK=True has no effect in scaleclr: images are read "
                       "from config.DATA.TRAIN.DATA_PATHS in place")
    if c.CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM < 1:
        raise ConfigError("config.CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM", "must be >= 1 (1 = latest).")
    if not 0 <= root.node_id < c.DISTRIBUTED.NUM_NODES:
        raise ConfigError("node_id", f"= {root.node_id} must be in [0, config.DISTRIBUTED.NUM_NODES="
                          f"{c.DISTRIBUTED.NUM_NODES}).")
    k = c.KNN_EVAL
    if k.ENABLED:
        if k.TEMPERATURE <= 0:
            raise ConfigError("config.KNN_EVAL.TEMPERATURE", f"must be > 0, got {k.TEMPERATURE}.")
        if bool(k.TRAIN_PATH) != bool(k.VAL_PATH):
            raise ConfigError("config.KNN_EVAL.TRAIN_PATH" if not k.TRAIN_PATH else "config.KNN_EVAL.VAL_PATH",
                              "is empty: set both TRAIN_PATH and VAL_PATH (labelled ImageFolder roots), or "
                              "DATASET_NAME.")
        if not k.TRAIN_PATH and not k.DATASET_NAME:
            raise ConfigError("config.KNN_EVAL.DATASET_NAME", "is empty and so are TRAIN_PATH/VAL_PATH: say "
                              "which labelled data the kNN evaluation uses (e.g. scaleclr_demo_digits).")
    if c.MODEL.FSDP_CONFIG.HSDP_REPLICATE < 1:
        raise ConfigError("config.MODEL.FSDP_CONFIG.HSDP_REPLICATE", "must be >= 1.")
    if c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY == 0 or c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY < -1:
        raise ConfigError("config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY", "must be -1 (off) or > 0.")
    _check_data(root)
    _check_transforms(root)
    _check_loss_vs_views(root)


def _check_data(root) -> None:
    train = root.config.DATA.TRAIN
    if not train.DATA_SOURCES:
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES", f"is empty; allowed sources: {', '.join(DATA_SOURCES)}.")
    for i, s in enumerate(train.DATA_SOURCES):
        if s not in DATA_SOURCES:
            raise ConfigError(f"config.DATA.TRAIN.DATA_SOURCES[{i}]",
                              f"= {s!r} is not allowed; allowed sources: {', '.join(DATA_SOURCES)}.")
    if len(train.DATA_SOURCES) > 1:
        raise ConfigError("config.DATA.TRAIN.DATA_SOURCES", "one training source is supported, got "
                          f"{list(train.DATA_SOURCES)}.")
    if train.DATA_SOURCES[0] != "synthetic" and not (train.DATA_PATHS or train.DATASET_NAMES):
        raise ConfigError("config.DATA.TRAIN.DATA_PATHS", "is empty and so is config.DATA.TRAIN.DATASET_NAMES: "
                          "give the image folder / file list path.")


def _check_loss_vs_views(root) -> None:
    c = root.config
    views = transforms_num_views(c.DATA.TRAIN.TRANSFORMS)
    if c.LOSS.name == "simclr_info_nce_loss":
        if views != 2:
            raise ConfigError("config.DATA.TRAIN.TRANSFORMS", f"produce {views} view(s) per image but "
                              "simclr_info_nce_loss needs exactly 2 (ImgReplicatePil num_times: 2); for more "
                              "crops use config.LOSS.name=multicrop_simclr_info_nce_loss.")
        if c.DATA.TRAIN.COLLATE_FUNCTION != "simclr_collator":
            raise ConfigError("config.DATA.TRAIN.COLLATE_FUNCTION", "simclr_info_nce_loss needs "
                              f"simclr_collator, got {c.DATA.TRAIN.COLLATE_FUNCTION!r}.")
    elif views < 2:
        raise ConfigError("config.DATA.TRAIN.TRANSFORMS", f"produce {views} view per image; "
                          "multicrop_simclr_info_nce_loss needs ImgPilToMultiCrop or ImgReplicatePil with >= 2.")

