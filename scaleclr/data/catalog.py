"""Dataset catalog: `DATASET_NAMES` -> paths, as VISSL's ``configs/dataset_catalog.json``.

Built in: ``scaleclr_demo_digits`` (real handwritten-digit scans shipped in scikit-learn, prepared once into
an ImageFolder cache under ``$SCALECLR_DATA_CACHE``, default ``~/.cache/scaleclr``). Other names are read
from ``configs/dataset_catalog.json`` ({name: {split: [image_path, label_path]}}); edit it to point
``imagenet1k_folder`` at your copy, or pass ``config.DATA.TRAIN.DATA_PATHS=[/path]`` instead.
"""
import json
import os
from pathlib import Path
from typing import Optional

from scaleclr.paths import config_dir

DEMO = "scaleclr_demo_digits"


def cache_dir() -> str:
    return os.environ.get("SCALECLR_DATA_CACHE", os.path.join(Path.home(), ".cache", "scaleclr"))


def catalog_path() -> Path:
    return config_dir() / "dataset_catalog.json"


def resolve_path(name: str, split: str, key: str) -> str:
    """The image path of catalog entry `name` for `split` ("train" | "val")."""
    if name == DEMO:
        from scaleclr.data.demo import prepare_demo_data
        return prepare_demo_data(os.path.join(cache_dir(), "demo_digits"))[split]
    catalog = {}
    if catalog_path().exists():
        catalog = json.loads(catalog_path().read_text())
    if name not in catalog:
        raise ValueError(f"{key}={name!r} is not in the dataset catalog ({catalog_path()}); known names: "
                         f"{', '.join([DEMO] + sorted(catalog))}. Add it there or set the path directly "
                         "with config.DATA.TRAIN.DATA_PATHS=[/path/to/images].")
    path = catalog[name].get(split, [None])[0]
    if not path or path.startswith("<") or not os.path.exists(path):
        raise ValueError(f"{key}={name!r}: its {split} path {path!r} in {catalog_path()} does not exist on this "
                         "machine. Edit the catalog or set config.DATA.TRAIN.DATA_PATHS=[/path/to/images].")
    return path


#: ``config.DATA.<SPLIT>`` -> the catalog split it reads (VISSL's catalog names: ``train``, ``val``).
CATALOG_SPLITS = {"TRAIN": "train", "TEST": "val"}


def split_path(data_paths, dataset_names, source: str, split: str = "TRAIN") -> Optional[str]:
    """The image path of ``config.DATA.<split>``: ``DATA_PATHS[0]``, else catalog entry ``DATASET_NAMES[0]``'s
    ``train`` (TRAIN) or ``val`` (TEST) path; None for the synthetic source."""
    if source == "synthetic":
        return None
    if data_paths:
        return data_paths[0]
    return resolve_path(dataset_names[0], CATALOG_SPLITS[split], f"config.DATA.{split}.DATASET_NAMES[0]")


def train_path(data_paths, dataset_names, source: str) -> Optional[str]:
    return split_path(data_paths, dataset_names, source, "TRAIN")


def catalog_entry(name: str, split: str) -> Optional[str]:
    """What the catalog says for ``name``'s ``split`` (``train`` | ``val``), without checking that it exists or
    preparing the demo data (for ``--dry-run``); None for an unknown name."""
    if name == DEMO:
        return os.path.join(cache_dir(), "demo_digits", "sklearn_digits_32px", split)
    catalog = json.loads(catalog_path().read_text()) if catalog_path().exists() else {}
    entry = catalog.get(name, {}).get(split)
    return entry[0] if entry else None
