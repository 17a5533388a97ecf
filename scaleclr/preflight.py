"""Checks of the run's inputs and outputs on this machine, run by ``train.py`` before any worker starts
(:func:`scaleclr.main.preflight`): what a preflight can see stops the run with exit status 2 and names the key
and the path, instead of failing in every worker (or training on nothing).

- the data of ``config.DATA.TRAIN`` (and ``DATA.TEST`` when linear evaluation tests): readable; a
  ``disk_folder`` whose every class folder holds an image (each folder is walked only to its first image, then
  images are counted only up to one global batch: :func:`scaleclr.data.listing.probe_image_folder`); at least
  one global batch of images with ``DROP_LAST=True`` (else an epoch has 0 steps);
- ``config.CHECKPOINT.DIR``: a folder, or creatable, and writable (``os.access``: a process running as root
  passes the permission bits, so only a path through a regular file or a read-only file system stops it).
"""
import os
from typing import Optional

from scaleclr.config import ConfigError


def _readable(path: str, key: str) -> None:
    mode = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
    if not os.access(path, mode):
        raise ConfigError(key, f"= {path!r} is not readable by this user (uid {os.getuid()}); fix its permissions "
                          "or point the key at a readable copy.")


def _count_images(c, split: str, need: int) -> int:
    """``min(images of config.DATA.<split>, need)`` with DATA_LIMIT applied; raises for empty data."""
    from scaleclr.builders import build_split_source, resolve_train_data_path
    from scaleclr.data.listing import probe_image_folder

    t = c.DATA[split]
    path = resolve_train_data_path(c, split)
    key = f"config.DATA.{split}.DATA_PATHS[0]"
    if path is not None:
        _readable(path, key)
    limit = t.DATA_LIMIT if t.DATA_LIMIT > 0 else None
    if t.DATA_SOURCES[0] == "disk_folder":
        try:
            n = probe_image_folder(path, need if limit is None else min(need, limit))
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    else:  # a file list (memory-mapped .npy / .txt) or synthetic: cheap to build in full
        n = len(build_split_source(c, split))
    if n == 0:
        raise ConfigError(key, f"= {path!r} holds no images.")
    return min(n, need) if limit is None else min(n, limit, need)


def check_data(root, world_size: int) -> None:
    """The data of the splits this run reads: readable, not empty, and one global batch with DROP_LAST."""
    c = root.config
    t = c.DATA.TRAIN
    global_batch = t.BATCHSIZE_PER_REPLICA * world_size
    need = global_batch if t.DROP_LAST else 1
    n = _count_images(c, "TRAIN", need)
    if t.DROP_LAST and n < global_batch:
        limit = f" (config.DATA.TRAIN.DATA_LIMIT={t.DATA_LIMIT})" if n == t.DATA_LIMIT else ""
        raise ConfigError("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA", f"= {t.BATCHSIZE_PER_REPLICA} x world size "
                          f"{world_size} = {global_batch} images per step, but the training data holds {n}{limit}: "
                          "with config.DATA.TRAIN.DROP_LAST=True an epoch would have 0 steps. Lower the batch size, "
                          "add images, or set DROP_LAST=False.")
    if c.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON and (c.TEST_MODEL or c.TEST_ONLY):
        _count_images(c, "TEST", 1)


def check_checkpoint_dir(root) -> None:
    """``config.CHECKPOINT.DIR`` is a folder (or can be made one) that this process can write."""
    key = "config.CHECKPOINT.DIR"
    path = os.path.abspath(root.config.CHECKPOINT.DIR)
    probe: Optional[str] = path
    while probe and not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        probe = parent if parent != probe else None
    if probe is None:
        return
    if not os.path.isdir(probe):
        what = "is" if probe == path else f"is inside {probe!r}, which is"
        raise ConfigError(key, f"= {root.config.CHECKPOINT.DIR!r} {what} not a folder (a regular file or a broken "
                          "link); give a folder path for the checkpoints and metrics.jsonl.")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is" if probe == path else f"would be created in {probe!r}, which is"
        raise ConfigError(key, f"= {root.config.CHECKPOINT.DIR!r} {what} not writable by this user (uid "
                          f"{os.getuid()}); choose a writable folder.")


def check_inputs(root, world_size: int) -> None:
    """Every check of this module; raises :class:`ConfigError`."""
    check_checkpoint_dir(root)
    check_data(root, world_size)
