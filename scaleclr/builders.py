"""Builders from the `config` node to components: model, loss, data, optimizer, schedule, engine spec.

Each builder reads only its part of the config and passes plain arguments down, so models, losses, data code
and engines never see the config tree.
"""
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from scaleclr.data import (DeviceAugmentation, DeviceStage, EvalDataset, HostStage, ShardedSampler, SSLDataset,
                           build_dataloader, build_source, build_transforms, eval_transform_specs, get_collator)
from scaleclr.config.validate_linear import is_linear_eval
from scaleclr.data.catalog import DEMO, resolve_path, split_path
from scaleclr.data.shards import ShardSource, copy_to_local, expand_shards, is_shard_spec, shard_lengths
from scaleclr.data.sources import LimitedSource
from scaleclr.distributed.stop import parse_signals
from scaleclr.engines.spec import DTYPES, EngineSpec, FSDPSpec, PrecisionSpec
from scaleclr.interchange import init_model_from_weights
from scaleclr.losses import CrossEntropyMultipleOutputSingleTargetLoss, MulticropSimclrInfoNCELoss, SimclrInfoNCELoss
from scaleclr.models import LinearEvalModel, ResNet, SimCLRModel, build_heads
from scaleclr.optim import build_optimizer
from scaleclr.optim.param_groups import build_param_groups
from scaleclr.optim.schedulers import build_scheduler


def plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def stop_signals(c) -> list:
    """``config.TRAINER.STOP_SIGNALS`` as signal numbers (the training process's; loader workers ignore them)."""
    return parse_signals(c.TRAINER.STOP_SIGNALS)


def build_model(c, init_weights: bool = True) -> SimCLRModel:
    """ResNet trunk + VISSL heads, initialised from `SEED_VALUE` (identical on every rank), then from
    ``config.MODEL.WEIGHTS_INIT`` unless ``init_weights`` is False (the caller loads a state dict anyway).

    In linear evaluation (``FEATURE_EVAL_SETTINGS.EVAL_MODE_ON``) the model is a :class:`LinearEvalModel`: frozen
    trunk + the classifier; WEIGHTS_INIT then loads the trunk only, unless ``EVAL_TRUNK_AND_HEAD`` (VISSL)."""
    r = c.MODEL.TRUNK.RESNETS
    torch.manual_seed(c.SEED_VALUE)
    trunk = ResNet(depth=r.DEPTH, width_multiplier=r.WIDTH_MULTIPLIER, groups=r.GROUPS,
                   width_per_group=r.WIDTH_PER_GROUP, zero_init_residual=r.ZERO_INIT_RESIDUAL,
                   layer4_stride=r.LAYER4_STRIDE, norm_layer=r.NORM)
    h = c.MODEL.HEAD
    heads = build_heads(plain(h.PARAMS), batchnorm_eps=h.BATCHNORM_EPS, batchnorm_momentum=h.BATCHNORM_MOMENTUM,
                        params_multiplier=h.PARAMS_MULTIPLIER, init_seed=c.SEED_VALUE)
    fe = c.MODEL.FEATURE_EVAL_SETTINGS
    model = LinearEvalModel(trunk, heads, flatten=fe.SHOULD_FLATTEN_FEATS) if is_linear_eval(c) else \
        SimCLRModel(trunk, heads)
    if init_weights and c.MODEL.WEIGHTS_INIT.PARAMS_FILE:
        load_init_weights(model, c.MODEL.WEIGHTS_INIT, load_heads=not is_linear_eval(c) or fe.EVAL_TRUNK_AND_HEAD)
    for name, p in model.named_parameters():
        if any(s in name for s in c.MODEL.NON_TRAINABLE_PARAMS):
            p.requires_grad_(False)
    return model


def load_init_weights(model: nn.Module, weights_init, load_heads: bool = True) -> None:
    """Initialise ``model`` from ``config.MODEL.WEIGHTS_INIT`` (VISSL's keys: PARAMS_FILE, STATE_DICT_KEY_NAME,
    SKIP_LAYERS, REMOVE_PREFIX, APPEND_PREFIX): a scaleclr, VISSL model-zoo or torchvision file, detected and
    loaded strictly on the trunk (:func:`scaleclr.interchange.init_model_from_weights`); ``load_heads=False``
    leaves the heads at their initialisation (a linear-evaluation classifier on a pretrained trunk)."""
    w = weights_init
    init_model_from_weights(model, w.PARAMS_FILE, state_dict_key_name=plain(w.STATE_DICT_KEY_NAME),
                            skip_layers=list(plain(w.SKIP_LAYERS)), remove_prefix=w.REMOVE_PREFIX,
                            append_prefix=w.APPEND_PREFIX, load_heads=load_heads)


def build_loss(c, group=None) -> nn.Module:
    lc = c.LOSS[c.LOSS.name]
    if c.LOSS.name == "cross_entropy_multiple_output_single_target":
        return CrossEntropyMultipleOutputSingleTargetLoss(temperature=lc.temperature, ignore_index=lc.ignore_index,
                                                          normalize_output=lc.normalize_output,
                                                          label_smoothing=lc.label_smoothing)
    if c.LOSS.name == "simclr_info_nce_loss":
        return SimclrInfoNCELoss(temperature=lc.temperature, impl=lc.impl, group=group)
    return MulticropSimclrInfoNCELoss(temperature=lc.temperature, num_crops=lc.num_crops,
                                      negatives=lc.negatives, impl=lc.impl, group=group)


def make_optimizer_factory(c) -> Callable[..., torch.optim.Optimizer]:
    """SGD (+ LARC) over VISSL's param groups; engines call it on the (possibly wrapped) module."""
    o = c.OPTIMIZER

    def make(module: nn.Module, norm_fn=None, split: Optional[Callable[[nn.Parameter], str]] = None
             ) -> torch.optim.Optimizer:
        """``norm_fn``: LARC's sharding-aware norms; ``split``: parameter -> kind, each group is cut into one
        group per kind with the same hyperparameters (FSDP: DTensor shards and replicated plain tensors, which
        foreach kernels cannot mix)."""
        head_wd = o.head_optimizer_params.weight_decay if o.head_optimizer_params.use_different_wd else None
        groups = build_param_groups(module, weight_decay=o.weight_decay, regularize_bn=o.regularize_bn,
                                    regularize_bias=o.regularize_bias,
                                    exclude_bias_and_norm=o.larc_config.exclude_bias_and_norm,
                                    head_weight_decay=head_wd,
                                    non_regularized_parameters=list(o.non_regularized_parameters))
        if split is not None:
            groups = [{**g, "params": ps, "name": f"{g['name']}_{kind}"} for g in groups
                      for kind, ps in _split(g["params"], split).items()]
        return build_optimizer(groups, name=o.name, lr=0.0, momentum=o.momentum, nesterov=o.nesterov,
                               use_larc=o.use_larc, larc_config=plain(o.larc_config), norm_fn=norm_fn)

    return make


def _split(params, kind_of) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for p in params:
        out.setdefault(kind_of(p), []).append(p)
    return out


def build_lr_schedules(c) -> Tuple[Callable[[float], float], Optional[Callable[[float], float]]]:
    """``(trunk/all-groups schedule, head schedule or None)`` as functions of ``where`` in [0, 1).

    The head gets ``config.OPTIMIZER.param_schedulers.lr_head`` when
    ``config.OPTIMIZER.head_optimizer_params.use_different_lr`` is set (VISSL), else the common schedule.
    """
    o = c.OPTIMIZER
    main = build_scheduler(plain(o.param_schedulers.lr), num_epochs=o.num_epochs)
    head = None
    if o.head_optimizer_params.use_different_lr:
        head = build_scheduler(plain(o.param_schedulers.lr_head), num_epochs=o.num_epochs)
    return main, head


def build_engine_spec(c, world_size: int, device: Optional[torch.device] = None) -> EngineSpec:
    """Everything the engine reads from the config (engines never see the config tree). ``device`` resolves
    ``config.MODEL.CHANNELS_LAST=auto`` (on with CUDA)."""
    d, m = c.DISTRIBUTED, c.MODEL
    amp = m.AMP_PARAMS
    autocast_dtype = DTYPES[amp.AMP_DTYPE] if amp.USE_AMP else None
    param_dtype = None
    fsdp = ds_config = None
    if d.ENGINE == "fsdp":
        fc = m.FSDP_CONFIG
        param_dtype = DTYPES[fc.MIXED_PRECISION] if fc.MIXED_PRECISION != "none" else autocast_dtype
        autocast_dtype = autocast_dtype or param_dtype
        fsdp = FSDPSpec(shard_unit=fc.SHARD_UNIT, reshard_after_forward=bool(fc.RESHARD_AFTER_FORWARD),
                        hsdp_replicate=int(fc.HSDP_REPLICATE))
    elif d.ENGINE == "deepspeed":
        from scaleclr.config.deepspeed_json import build_deepspeed_config
        ds_config = build_deepspeed_config(c, world_size)
        param_dtype = autocast_dtype
    channels_last = m.CHANNELS_LAST == "on" or (m.CHANNELS_LAST == "auto" and device is not None and
                                                 device.type == "cuda")
    precision = PrecisionSpec(autocast_dtype=autocast_dtype, param_dtype=param_dtype, channels_last=channels_last,
                              compile=bool(m.TORCH_COMPILE), compile_mode=str(m.TORCH_COMPILE_MODE),
                              compile_backend=str(m.TORCH_COMPILE_BACKEND))
    return EngineSpec(name=d.ENGINE, precision=precision,
                      gradient_clipping=float(c.OPTIMIZER.gradient_clipping),
                      activation_checkpointing=bool(m.ACTIVATION_CHECKPOINTING.USE_ACTIVATION_CHECKPOINTING),
                      broadcast_buffers=bool(d.BROADCAST_BUFFERS), ddp_bucket_cap_mb=int(c.DATA.DDP_BUCKET_CAP_MB),
                      fsdp=fsdp, deepspeed_config=ds_config)


def resolve_train_data_path(c, split: str = "TRAIN") -> Optional[str]:
    """The path of ``config.DATA.<split>``'s source (catalog names resolved, the demo cache prepared), checked to
    exist, without listing its images (a 1.28M-image folder is scanned once per rank, by :func:`build_train_data`).

    Raises:
        ValueError: naming the key and the path that does not exist.
    """
    t = c.DATA[split]
    name = t.DATA_SOURCES[0]
    path = split_path(list(t.DATA_PATHS), list(t.DATASET_NAMES), name, split)
    if name == "webdataset":
        expand_shards(path, f"config.DATA.{split}.DATA_PATHS[0]")
    elif path is not None and not os.path.exists(path):
        needs = "an ImageFolder root" if name == "disk_folder" else "a .npy or .txt file"
        raise ValueError(f"config.DATA.{split}.DATA_PATHS[0]={path!r} does not exist (config.DATA.{split}.DATA_SOURCES"
                         f"[0]={name!r} needs {needs})")
    for p in list(t.LABEL_PATHS)[:1]:
        if name == "disk_filelist" and not os.path.exists(p):
            raise ValueError(f"config.DATA.{split}.LABEL_PATHS[0]={p!r} does not exist")
    return path


def build_split_source(c, split: str = "TRAIN"):
    """The image source of ``config.DATA.<split>`` (``TRAIN`` | ``TEST``), catalog names resolved (TEST reads the
    catalog's ``val`` entry; the synthetic TEST source draws with ``SEED_VALUE + 1``, i.e. other images)."""
    t = c.DATA[split]
    name = t.DATA_SOURCES[0]
    kw: Dict[str, Any] = {}
    if name == "synthetic":
        kw = {"size": t.SYNTHETIC_IMAGE_SIZE, "seed": c.SEED_VALUE + (split == "TEST")}
    elif name == "disk_filelist":
        kw = {"mmap_mode": t.MMAP_MODE}
        if t.LABEL_SOURCES and t.LABEL_PATHS:
            kw["labels_path"] = t.LABEL_PATHS[0]
    path = split_path(list(t.DATA_PATHS), list(t.DATASET_NAMES), name, split)
    if name == "webdataset":
        return build_shard_source(path, t.DATA_LIMIT, require_labels=t.LABEL_TYPE == "standard",
                                  key=f"config.DATA.{split}.DATA_PATHS[0]",
                                  copy_to=(t.COPY_DESTINATION_DIR or os.environ.get("TMPDIR") or "/tmp")
                                  if t.COPY_TO_LOCAL_DISK else None)
    return build_source(name, path, data_limit=t.DATA_LIMIT, key=f"config.DATA.{split}.DATA_SOURCES[0]",
                        path_key=f"config.DATA.{split}.DATA_PATHS[0]", **kw)


def pin_memory(c) -> bool:
    """Whether loaders page-lock their batches: ``config.DATA.PIN_MEMORY`` and the run trains on CUDA
    (``config.MACHINE.DEVICE=gpu`` with CUDA present). The trainer copies batches with ``non_blocking`` only
    from such loaders (``config.DATA.ENABLE_ASYNC_GPU_COPY``): from pageable memory it would be a blocking
    copy in disguise."""
    return bool(c.DATA.PIN_MEMORY) and c.MACHINE.DEVICE == "gpu" and torch.cuda.is_available()


def build_shard_source(spec: str, data_limit: int = -1, require_labels: bool = False,
                       key: str = "config.DATA.TRAIN.DATA_PATHS[0]", copy_to: Optional[str] = None):
    """The ``webdataset`` source of ``spec`` (a folder of ``.tar`` shards or brace notation); with ``copy_to``,
    read from a node-local copy made there first (``COPY_TO_LOCAL_DISK``: one copier per node, the others wait)."""
    local = copy_to_local(expand_shards(spec, key), spec, copy_to)[0] if copy_to else None
    source = ShardSource(spec, require_labels=require_labels, key=key, shards=local)
    if 0 < data_limit < len(source):
        return LimitedSource(source, int(data_limit))
    return source


def build_train_data(c, rank: int, world_size: int, start_method: Optional[str] = None, *,
                     device_augmentation: bool = False
                     ) -> Tuple[SSLDataset, ShardedSampler, torch.utils.data.DataLoader]:
    """Dataset, sampler and loader of the training split.

    With ``device_augmentation`` (``resolve_device_augmentation(config.DATA.TRAIN.DEVICE_AUGMENTATION,
    device)``) the dataset runs only the host stage of ``config.DATA.TRAIN.TRANSFORMS``: batches carry
    uint8 ``data`` and ``aug_params``, for :func:`build_device_augmentation` to finish on the device.
    """
    t = c.DATA.TRAIN
    source = build_split_source(c, "TRAIN")
    transforms = HostStage.from_specs(plain(t.TRANSFORMS)) if device_augmentation \
        else build_transforms(plain(t.TRANSFORMS))
    dataset = SSLDataset(source, transforms, seed=c.SEED_VALUE, label_type=t.LABEL_TYPE)
    sampler = ShardedSampler(len(dataset), world_size, rank, shuffle=True, seed=c.SEED_VALUE,
                             drop_last=t.DROP_LAST, batch_size=t.BATCHSIZE_PER_REPLICA, shuffle_mode=t.SHUFFLE_MODE,
                             shard_lengths=shard_lengths(source), block_shards=t.SHUFFLE_BLOCK_SHARDS)
    loader = build_dataloader(dataset, t.BATCHSIZE_PER_REPLICA, c.DATA.NUM_DATALOADER_WORKERS,
                              get_collator(t.COLLATE_FUNCTION), sampler,
                              pin_memory=pin_memory(c),
                              multiprocessing_context=start_method, ignore_signals=stop_signals(c))
    return dataset, sampler, loader


def build_device_augmentation(c, enabled: Optional[bool] = None) -> DeviceStage:
    """The callable the trainer applies to a batch after moving it to the device: ``stage(batch) -> views``.

    ``enabled`` must be the value given to ``build_train_data(..., device_augmentation=...)``; None resolves
    ``config.DATA.TRAIN.DEVICE_AUGMENTATION`` for the training device (``auto``: on with CUDA). Off: returns
    ``batch["data"]`` (the host path made the float views). On: the device part of
    ``config.DATA.TRAIN.TRANSFORMS`` applied to ``batch["data"]`` (uint8) with ``batch["aug_params"]``.

    Raises:
        ValueError: (on) a transform without a device implementation or an order that cannot be split,
            naming ``config.DATA.TRAIN.TRANSFORMS[i]``.
    """
    if enabled is None:
        from scaleclr.data.device_augment import resolve_device_augmentation
        cuda = c.MACHINE.DEVICE == "gpu" and torch.cuda.is_available()
        enabled = resolve_device_augmentation(c.DATA.TRAIN.DEVICE_AUGMENTATION, "cuda" if cuda else "cpu")
    if not enabled:
        return DeviceStage(None)
    return DeviceStage(DeviceAugmentation.from_specs(plain(c.DATA.TRAIN.TRANSFORMS)))


def build_eval_data(c, split: str, rank: int, world_size: int, start_method: Optional[str] = None
                    ) -> Tuple[EvalDataset, ShardedSampler, torch.utils.data.DataLoader]:
    """Labelled ``(images, labels)`` batches of ``config.DATA.<split>`` under its (deterministic) TRANSFORMS, for
    the test phase of linear evaluation (``TEST``) or feature extraction (``TRAIN`` with PRECOMPUTE_FEATURES).

    Every rank reads its contiguous slice of each global batch in dataset order (no shuffling), and every rank
    gets the same number of full batches: the last global batch is padded by repeating the first images, which
    the evaluation masks out by position (:func:`scaleclr.eval.linear.valid_rows`), so each image counts once.
    """
    t = c.DATA[split]
    dataset = EvalDataset(build_split_source(c, split),
                          build_transforms(plain(t.TRANSFORMS), key=f"config.DATA.{split}.TRANSFORMS"))
    sampler = ShardedSampler(len(dataset), world_size, rank, shuffle=False, seed=c.SEED_VALUE, drop_last=False,
                             batch_size=t.BATCHSIZE_PER_REPLICA)
    loader = build_dataloader(dataset, t.BATCHSIZE_PER_REPLICA, c.DATA.NUM_DATALOADER_WORKERS, None, sampler,
                              pin_memory=pin_memory(c),
                              multiprocessing_context=start_method)
    return dataset, sampler, loader


def build_feature_data(c, split: str, num_images: int, rank: int, world_size: int, shuffle: bool
                       ) -> Tuple[Any, ShardedSampler, torch.utils.data.DataLoader]:
    """Batches of precomputed features of ``config.DATA.<split>`` (``PRECOMPUTE_FEATURES``): a
    :class:`scaleclr.eval.linear.FeatureDataset` (filled once the features are extracted), the split's sampler
    (``shuffle`` and DROP_LAST for TRAIN, unshuffled and padded for TEST) and an in-process loader."""
    from scaleclr.eval.linear import FeatureDataset, collate_feature_batch

    t = c.DATA[split]
    dataset = FeatureDataset(num_images)
    sampler = ShardedSampler(num_images, world_size, rank, shuffle=shuffle, seed=c.SEED_VALUE,
                             drop_last=bool(t.DROP_LAST) and split == "TRAIN", batch_size=t.BATCHSIZE_PER_REPLICA)
    loader = build_dataloader(dataset, t.BATCHSIZE_PER_REPLICA, 0, collate_feature_batch, sampler)
    return dataset, sampler, loader


def build_knn_data(c, rank: int, world_size: int) -> Dict[str, Tuple[ShardedSampler, torch.utils.data.DataLoader]]:
    """``{"train": (sampler, loader), "val": (sampler, loader)}``: this rank's shard of the kNN split's labelled
    images under deterministic eval transforms (Resize, CenterCrop, Normalize), unshuffled, every rank the same
    number of batches (the last global batch padded; :func:`scaleclr.eval.knn.extract_shard` marks the padding)."""
    k = c.KNN_EVAL
    if k.TRAIN_PATH and k.VAL_PATH:
        paths = {"train": k.TRAIN_PATH, "val": k.VAL_PATH}
    else:
        name = k.DATASET_NAME or DEMO
        paths = {s: resolve_path(name, s, "config.KNN_EVAL.DATASET_NAME") for s in ("train", "val")}
    norm = next((tr for tr in plain(c.DATA.TRAIN.TRANSFORMS) if tr["name"] == "Normalize"), {})
    spec_kw = {kk: norm[kk] for kk in ("mean", "std") if kk in norm}
    tf = build_transforms(eval_transform_specs(k.IMAGE_SIZE, **spec_kw), key="config.KNN_EVAL")
    out = {}
    for split in ("train", "val"):
        key = f"config.KNN_EVAL.{split.upper()}_PATH"
        source = build_shard_source(paths[split], require_labels=True, key=key) if is_shard_spec(paths[split]) \
            else build_source("disk_folder", paths[split], path_key=key)
        ds = EvalDataset(source, tf)
        sampler = ShardedSampler(len(ds), world_size, rank, shuffle=False, seed=c.SEED_VALUE, drop_last=False,
                                 batch_size=k.BATCHSIZE)
        out[split] = (sampler, build_dataloader(ds, k.BATCHSIZE, c.DATA.NUM_DATALOADER_WORKERS, None, sampler,
                                                pin_memory=pin_memory(c),
                                                ignore_signals=stop_signals(c)))
    return out
