"""Checks of a data split's keys, shared by the pretraining and the linear-evaluation validators."""
import logging

from omegaconf import DictConfig

from scaleclr.config.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["check_data", "transforms_num_views"]


def transforms_num_views(transforms) -> int:
    """Views per image the transform list produces (ImgReplicatePil / ImgPilToMultiCrop), 1 if neither."""
    for t in transforms:
        if t.get("name") == "ImgReplicatePil":
            return int(t.get("num_times", 2))
        if t.get("name") == "ImgPilToMultiCrop":
            return int(t["total_num_crops"])
    return 1


def check_data(root: DictConfig, split: str = "TRAIN") -> None:
    """``config.DATA.<split>``'s sources, labels and paths (the source names are the data package's)."""
    from scaleclr.data.sampler import SHUFFLE_MODES
    from scaleclr.data.sources import SOURCE_NAMES as DATA_SOURCES

    train = root.config.DATA[split]
    if not train.DATA_SOURCES:
        raise ConfigError(f"config.DATA.{split}.DATA_SOURCES", f"is empty; allowed sources: {', '.join(DATA_SOURCES)}.")
    for i, s in enumerate(train.DATA_SOURCES):
        if s not in DATA_SOURCES:
            raise ConfigError(f"config.DATA.{split}.DATA_SOURCES[{i}]",
                              f"= {s!r} is not allowed; allowed sources: {', '.join(DATA_SOURCES)}.")
    if len(train.DATA_SOURCES) > 1:
        raise ConfigError(f"config.DATA.{split}.DATA_SOURCES", "one source per split is supported, got "
                          f"{list(train.DATA_SOURCES)}.")
    labels = list(train.LABEL_SOURCES)
    if labels and labels != [train.DATA_SOURCES[0]]:
        raise ConfigError(f"config.DATA.{split}.LABEL_SOURCES", f"= {labels}; labels come from the data source "
                          f"itself: [{train.DATA_SOURCES[0]}] (disk_folder: the class folders; disk_filelist: a .npy "
                          "of integer labels in LABEL_PATHS) or [] .")
    if labels == ["disk_filelist"] and not train.LABEL_PATHS:
        raise ConfigError(f"config.DATA.{split}.LABEL_PATHS", "is empty but LABEL_SOURCES=[disk_filelist]: give the "
                          ".npy of integer labels, one per path of DATA_PATHS[0].")
    if train.LABEL_PATHS and labels != ["disk_filelist"]:
        logger.warning("config.DATA.%s.LABEL_PATHS is read only with LABEL_SOURCES=[disk_filelist] (disk_folder "
                       "labels are its class folders)", split)
    source = train.DATA_SOURCES[0]
    if train.SHUFFLE_MODE not in SHUFFLE_MODES:
        raise ConfigError(f"config.DATA.{split}.SHUFFLE_MODE", f"= {train.SHUFFLE_MODE!r} is not allowed; allowed: "
                          f"{', '.join(SHUFFLE_MODES)}.")
    if train.SHUFFLE_BLOCK_SHARDS < 1:
        raise ConfigError(f"config.DATA.{split}.SHUFFLE_BLOCK_SHARDS", f"= {train.SHUFFLE_BLOCK_SHARDS} must be >= 1.")
    if train.SHUFFLE_MODE == "shard_block" and source != "webdataset":
        raise ConfigError(f"config.DATA.{split}.SHUFFLE_MODE", f"= shard_block needs DATA_SOURCES=[webdataset], got "
                          f"[{source}]; use global.")
    if train.COPY_TO_LOCAL_DISK and source != "webdataset":
        raise ConfigError(f"config.DATA.{split}.COPY_TO_LOCAL_DISK", f"is implemented for shards only "
                          f"(DATA_SOURCES=[webdataset]), got [{source}]; write shards with python -m "
                          "scaleclr.data.shards write, or set it to False.")
    if source != "synthetic" and not (train.DATA_PATHS or train.DATASET_NAMES):
        raise ConfigError(f"config.DATA.{split}.DATA_PATHS", f"is empty and so is config.DATA.{split}.DATASET_NAMES: "
                          "give the image folder / file list path.")
