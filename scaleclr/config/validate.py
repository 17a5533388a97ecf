"""Semantic checks of a composed configuration, run before any worker starts.

Types are enforced by the schema during composition; this module checks what types cannot express:
keys added with ``+`` that the schema does not know, allowed names, ranges and cross-key consistency.
Every error names the full key and what is allowed.
"""
import logging
import os
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from scaleclr.config import schema
from scaleclr.config.compose import unknown_key_error
from scaleclr.config.data_checks import check_data, transforms_num_views
from scaleclr.config.errors import ConfigError
from scaleclr.config.policy import apply_policies
from scaleclr.config.validate_gpu import check_gpu_combinations
from scaleclr.config.validate_linear import check_linear_eval, is_linear_eval
from scaleclr.config.validate_numbers import check_numbers

logger = logging.getLogger(__name__)

ALLOWED = {
    "config.LOSS.name": ("simclr_info_nce_loss", "multicrop_simclr_info_nce_loss",
                         "cross_entropy_multiple_output_single_target"),
    "config.METERS.name": ("", "accuracy_list_meter"),
    "config.MODEL.AMP_PARAMS.AMP_TYPE": ("apex", "pytorch"),
    "config.MODEL.AMP_PARAMS.AMP_DTYPE": ("float16", "bfloat16"),
    "config.MODEL.MEMORY_CHECK": ("warn", "error", "off"),
    "config.MODEL.TORCH_COMPILE_MODE": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "config.MODEL.TORCH_COMPILE_BACKEND": ("inductor", "aot_eager", "eager"),
    "config.MODEL.FLOAT32_MATMUL_PRECISION": ("highest", "high", "medium"),
    "config.MODEL.FSDP_CONFIG.MIXED_PRECISION": ("none", "bfloat16", "float16"),
    "config.OPTIMIZER.name": ("sgd",),
    "config.DISTRIBUTED.BACKEND": ("nccl", "gloo"),
    "config.DISTRIBUTED.INIT_METHOD": ("tcp", "env", "file"),
    "config.MACHINE.DEVICE": ("gpu", "cpu"),
    "config.MULTI_PROCESSING_METHOD": ("forkserver", "spawn", "fork"),
}


def component_values() -> dict:
    """Allowed values that the components define (one home each: the component that implements them)."""
    from scaleclr.data.collators import COLLATORS
    from scaleclr.data.dataset import LABEL_TYPES
    from scaleclr.data.device_augment import SETTINGS
    from scaleclr.distributed.parallelize import SHARD_UNITS
    from scaleclr.distributed.sync_bn import SYNC_BN_TYPES
    from scaleclr.engines import ENGINES
    from scaleclr.losses.indices import IMPLS, NEGATIVES
    from scaleclr.models.resnet import NORM_NAMES, RESNET_LAYERS

    return {
        "config.MODEL.TRUNK.RESNETS.DEPTH": tuple(RESNET_LAYERS),
        "config.MODEL.TRUNK.RESNETS.NORM": NORM_NAMES,
        "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE": SYNC_BN_TYPES,
        "config.MODEL.FSDP_CONFIG.SHARD_UNIT": SHARD_UNITS,
        "config.MODEL.CHANNELS_LAST": SETTINGS,
        "config.DISTRIBUTED.ENGINE": ENGINES,
        "config.DATA.TRAIN.COLLATE_FUNCTION": tuple(COLLATORS),
        "config.DATA.TRAIN.DEVICE_AUGMENTATION": SETTINGS,
        "config.DATA.TRAIN.LABEL_TYPE": LABEL_TYPES,
        "config.LOSS.simclr_info_nce_loss.impl": IMPLS,
        "config.LOSS.multicrop_simclr_info_nce_loss.impl": IMPLS,
        "config.LOSS.multicrop_simclr_info_nce_loss.negatives": NEGATIVES,
    }


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
    check_unknown_keys(root, schema.defaults(), "")
    key = "config.DATA.TRAIN.DEVICE_AUGMENTATION"
    if _get(root, key) in ("True", "False"):  # YAML 1.1 reads unquoted on / off as booleans
        raise ConfigError(key, f"= {_get(root, key)} (a boolean: YAML reads unquoted on/off as true/false); "
                          "write 'on' or 'off' in quotes, or auto.")
    for key, allowed in {**ALLOWED, **component_values()}.items():
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
                     "config.KNN_EVAL.TOPK", "config.KNN_EVAL.BATCHSIZE", "config.TEST_EVERY_NUM_EPOCH",
                     "config.DATA.TEST.BATCHSIZE_PER_REPLICA"])
    _positive(root, ["config.DATA.NUM_DATALOADER_WORKERS", "node_id"], allow_zero=True)  # floats: validate_numbers
    if c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE < -1:
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE",
                          f"= {c.MODEL.SYNC_BN_CONFIG.GROUP_SIZE}; allowed: -1 (processes of one node), "
                          "0 (whole world) or k > 0 (groups of k contiguous ranks).")
    if c.OPTIMIZER.use_larc and c.OPTIMIZER.name != "sgd":
        raise ConfigError("config.OPTIMIZER.use_larc", f"LARC wraps SGD only; config.OPTIMIZER.name is "
                          f"{c.OPTIMIZER.name!r}.")
    apply_policies(root)
    if c.DISTRIBUTED.DEEPSPEED_CONFIG and c.DISTRIBUTED.ENGINE != "deepspeed":
        logger.warning("config.DISTRIBUTED.DEEPSPEED_CONFIG=%s has no effect with config.DISTRIBUTED.ENGINE=%s "
                       "(pass --deepspeed_config or ENGINE=deepspeed to use it)", c.DISTRIBUTED.DEEPSPEED_CONFIG,
                       c.DISTRIBUTED.ENGINE)
    if c.MODEL.TORCH_COMPILE and c.DISTRIBUTED.ENGINE == "deepspeed":
        raise ConfigError("config.MODEL.TORCH_COMPILE", "= True is not supported with config.DISTRIBUTED.ENGINE="
                          "deepspeed (compiled ZeRO steps are not checked against eager ones; ZeRO-3 gathers "
                          "parameters in hooks on every layer, which would run inside the blocks' compiled "
                          "code); use ENGINE=ddp or fsdp with TORCH_COMPILE=True, or TORCH_COMPILE=False.")
    _check_head_lr(root)
    if c.CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM < 1:
        raise ConfigError("config.CHECKPOINT.LATEST_CHECKPOINT_RESUME_FILE_NUM", "must be >= 1 (1 = latest).")
    if not 0 <= root.node_id < c.DISTRIBUTED.NUM_NODES:
        raise ConfigError("node_id", f"= {root.node_id} must be in [0, config.DISTRIBUTED.NUM_NODES="
                          f"{c.DISTRIBUTED.NUM_NODES}).")
    k = c.KNN_EVAL
    if k.ENABLED:
        if bool(k.TRAIN_PATH) != bool(k.VAL_PATH):
            raise ConfigError("config.KNN_EVAL.TRAIN_PATH" if not k.TRAIN_PATH else "config.KNN_EVAL.VAL_PATH",
                              "is empty: set both TRAIN_PATH and VAL_PATH (labelled ImageFolder roots), or "
                              "DATASET_NAME.")
        if not k.TRAIN_PATH and not k.DATASET_NAME:
            raise ConfigError("config.KNN_EVAL.DATASET_NAME", "is empty and so are TRAIN_PATH/VAL_PATH: say "
                              "which labelled data the kNN evaluation uses (e.g. scaleclr_demo_digits).")
    _check_online_evaluation(root)
    if c.MODEL.FSDP_CONFIG.HSDP_REPLICATE < 1:
        raise ConfigError("config.MODEL.FSDP_CONFIG.HSDP_REPLICATE", "must be >= 1.")
    if c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY == 0 or c.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY < -1:
        raise ConfigError("config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY", "must be -1 (off) or > 0.")
    if c.CHECKPOINT.KEEP_LAST < -1:
        raise ConfigError("config.CHECKPOINT.KEEP_LAST", f"= {c.CHECKPOINT.KEEP_LAST}; allowed: -1 (keep every "
                          "checkpoint) or k >= 0 (keep the last k model_iteration checkpoints).")
    if c.CHECKPOINT.ON_CORRUPT not in ("fallback", "error"):
        raise ConfigError("config.CHECKPOINT.ON_CORRUPT", f"= {c.CHECKPOINT.ON_CORRUPT!r}; allowed: fallback "
                          "(resume from the newest readable checkpoint) or error (stop with exit status 2).")
    if not c.CHECKPOINT.LOCK_STALE_MINUTES > 0:
        raise ConfigError("config.CHECKPOINT.LOCK_STALE_MINUTES", f"= {c.CHECKPOINT.LOCK_STALE_MINUTES}; must be "
                          "> 0 (minutes after which another host's unrefreshed run lock is taken over).")
    _check_stop_signals(root)
    _check_slurm(root)
    _check_weights_init(root)
    check_data(root)
    _check_transforms(root)
    check_numbers(root)
    check_linear_eval(root)
    _check_loss_vs_views(root)
    check_gpu_combinations(root)


def _check_stop_signals(root) -> None:
    from scaleclr.distributed.stop import parse_signals

    key = "config.TRAINER.STOP_SIGNALS"
    try:
        parse_signals(root.config.TRAINER.STOP_SIGNALS, key)
    except ValueError as e:
        raise ConfigError(key, str(e).split(": ", 1)[1]) from None


def _check_slurm(root) -> None:
    """``config.SLURM.*`` (VISSL's submitit keys), checked when USE_SLURM is on."""
    s = root.config.SLURM
    if not s.USE_SLURM:
        return
    import importlib.util

    if importlib.util.find_spec("submitit") is None:
        raise ConfigError("config.SLURM.USE_SLURM", "= True needs submitit: pip install -e '.[slurm]' (or "
                          "pip install submitit), or submit slurm/train.sbatch instead.")
    if not s.PARTITION:
        raise ConfigError("config.SLURM.PARTITION", "is empty; USE_SLURM=True needs the partition to submit to "
                          "(sinfo lists them).")
    if s.TIME_HOURS < 0 or s.TIME_MINUTES < 0 or s.TIME_HOURS * 60 + s.TIME_MINUTES <= 0:
        raise ConfigError("config.SLURM.TIME_HOURS", f"= {s.TIME_HOURS} with TIME_MINUTES = {s.TIME_MINUTES}: the "
                          "time limit must be > 0 minutes (both >= 0).")
    _positive(root, ["config.SLURM.MEM_GB", "config.SLURM.NUM_CPU_PER_PROC"])
    _positive(root, ["config.SLURM.SIGNAL_DELAY_S", "config.SLURM.MAX_NUM_TIMEOUT"], allow_zero=True)
    if not 0 < s.PORT_ID < 65536:
        raise ConfigError("config.SLURM.PORT_ID", f"= {s.PORT_ID} is not a TCP port (1-65535).")
    if s.SIGNAL_DELAY_S >= (s.TIME_HOURS * 60 + s.TIME_MINUTES) * 60:
        raise ConfigError("config.SLURM.SIGNAL_DELAY_S", f"= {s.SIGNAL_DELAY_S} s is not shorter than the time "
                          "limit (TIME_HOURS/TIME_MINUTES): the job would be signalled as it starts.")
    if not isinstance(OmegaConf.to_container(s.ADDITIONAL_PARAMETERS, resolve=True), dict):
        raise ConfigError("config.SLURM.ADDITIONAL_PARAMETERS", "must be a mapping of sbatch options, e.g. "
                          "{account: myproj}.")
    if not root.config.TRAINER.STOP_SIGNALS:
        raise ConfigError("config.TRAINER.STOP_SIGNALS", "is empty but USE_SLURM=True: the job could not "
                          "checkpoint on preemption or at the time limit; keep SIGTERM in the list.")


def _check_head_lr(root) -> None:
    o = root.config.OPTIMIZER
    head = OmegaConf.to_container(o.param_schedulers.lr_head, resolve=True)
    if o.head_optimizer_params.use_different_lr and not head:
        raise ConfigError("config.OPTIMIZER.param_schedulers.lr_head", "is empty but config.OPTIMIZER."
                          "head_optimizer_params.use_different_lr=True: give the head's LR schedule (same keys as "
                          "config.OPTIMIZER.param_schedulers.lr).")
    if head and not o.head_optimizer_params.use_different_lr:
        logger.warning("config.OPTIMIZER.param_schedulers.lr_head has no effect without "
                       "config.OPTIMIZER.head_optimizer_params.use_different_lr=True (the head follows lr)")


def _check_weights_init(root) -> None:
    w = root.config.MODEL.WEIGHTS_INIT
    key = "config.MODEL.WEIGHTS_INIT"
    name = w.STATE_DICT_KEY_NAME
    if not (isinstance(name, str) or (OmegaConf.is_list(name) and all(isinstance(n, str) for n in name))):
        raise ConfigError(f"{key}.STATE_DICT_KEY_NAME", f"= {name!r}: must be a key name ('' for a flat "
                          "{name: tensor} file) or a list of nested key names.")
    if not w.PARAMS_FILE:
        return
    if "://" in w.PARAMS_FILE:
        raise ConfigError(f"{key}.PARAMS_FILE", f"= {w.PARAMS_FILE!r}: URLs are not downloaded; download the file "
                          "and give its path.")
    if not os.path.exists(w.PARAMS_FILE):
        raise ConfigError(f"{key}.PARAMS_FILE", f"= {w.PARAMS_FILE!r}: no such file or directory (a scaleclr, "
                          "VISSL or torchvision weights file, or a scaleclr FSDP/DeepSpeed checkpoint directory).")


def _check_loss_vs_views(root) -> None:
    c = root.config
    views = transforms_num_views(c.DATA.TRAIN.TRANSFORMS)
    if is_linear_eval(root.config):
        return  # one labelled view per image (validate_linear)
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



def _check_online_evaluation(root: DictConfig) -> None:
    """``config.KNN_EVAL.EVERY_N_EPOCHS`` and ``config.ONLINE_LINEAR_PROBE`` (evaluation during pretraining)."""
    c = root.config
    if c.KNN_EVAL.EVERY_N_EPOCHS < 0:
        raise ConfigError("config.KNN_EVAL.EVERY_N_EPOCHS", f"= {c.KNN_EVAL.EVERY_N_EPOCHS}; allowed: 0 (only at the "
                          "start and the end) or N > 0 (also after every N epochs).")
    p = c.ONLINE_LINEAR_PROBE
    if not p.ENABLED:
        return
    if is_linear_eval(root.config):
        raise ConfigError("config.ONLINE_LINEAR_PROBE.ENABLED", "= True is for pretraining; linear evaluation "
                          "trains and tests its classifier itself.")
    if not c.KNN_EVAL.ENABLED:
        raise ConfigError("config.ONLINE_LINEAR_PROBE.ENABLED", "= True reports the probe's top-1 on the kNN "
                          "held-out split: set config.KNN_EVAL.ENABLED=True (with its DATASET_NAME or TRAIN_PATH/"
                          "VAL_PATH) too.")
    if c.DATA.TRAIN.LABEL_TYPE != "standard":
        raise ConfigError("config.ONLINE_LINEAR_PROBE.ENABLED", "= True trains a classifier on the training "
                          f"labels, but config.DATA.TRAIN.LABEL_TYPE={c.DATA.TRAIN.LABEL_TYPE!r}: set it to "
                          "'standard' (class folders of disk_folder, or LABEL_SOURCES with LABEL_PATHS).")
