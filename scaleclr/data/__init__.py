"""Data pipeline: image sources, per-sample-seeded VISSL transforms, datasets, collators, sampler, loader.

Typical use (what the trainer does)::

    source = build_source("disk_folder", path, data_limit=-1)
    dataset = SSLDataset(source, build_transforms(cfg.DATA.TRAIN.TRANSFORMS), seed=cfg.SEED_VALUE)
    sampler = ShardedSampler(len(dataset), world_size, rank, seed=cfg.SEED_VALUE, batch_size=B)
    loader = build_dataloader(dataset, B, num_workers, get_collator("simclr_collator"), sampler)
    for epoch in ...:
        sampler.set_epoch(epoch); dataset.set_epoch(epoch)    # both before iter(loader)
        for batch in loader: ...                               # batch["data"]: [2B, 3, H, W]

Two-stage path (``config.DATA.TRAIN.DEVICE_AUGMENTATION``, default on when training on CUDA)::

    host, device = build_two_stage(cfg.DATA.TRAIN.TRANSFORMS)      # one split of the TRANSFORMS list
    dataset = SSLDataset(source, host, seed=cfg.SEED_VALUE)          # uint8 views + "aug_params" [V, P]
    ...
    batch = batch_to_device(batch, device)
    views = device(batch["data"], batch["aug_params"])               # float32, same layout

The demo data (``scaleclr.data.demo.prepare_demo_data``) is imported on demand (it needs scikit-learn).
"""
from scaleclr.data.collators import get_collator, multicrop_collator, simclr_collator
from scaleclr.data.dataset import EvalDataset, SSLDataset
from scaleclr.data.device_augment import (DeviceAugmentation, DeviceStage, batch_to_device, param_columns,
                                          resolve_device_augmentation, split_transforms)
from scaleclr.data.host_stage import HostStage, build_two_stage
from scaleclr.data.loader import build_dataloader
from scaleclr.data.sampler import ShardedSampler
from scaleclr.data.sources import SOURCE_NAMES, build_source
from scaleclr.data.transforms import (TRANSFORMS, SSLTransforms, build_transforms, eval_transform_specs,
                                      sample_generator, sample_seed)

__all__ = [
    "SOURCE_NAMES", "TRANSFORMS", "DeviceAugmentation", "DeviceStage", "EvalDataset", "HostStage", "SSLDataset",
    "SSLTransforms", "ShardedSampler", "batch_to_device", "build_dataloader", "build_source", "build_transforms",
    "build_two_stage", "eval_transform_specs", "get_collator", "multicrop_collator", "param_columns",
    "resolve_device_augmentation", "sample_generator", "sample_seed", "simclr_collator", "split_transforms",
]
