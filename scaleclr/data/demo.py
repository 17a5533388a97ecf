"""Bundled demo data: real handwritten-digit scans, prepared once into an ImageFolder cache.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set (1797 scans, 8 x 8
grayscale, 10 classes) inside its package, so nothing is downloaded. ``prepare_demo_data`` upscales each
scan to 32 x 32 RGB (bicubic), writes PNGs into ``<cache_dir>/sklearn_digits_<size>px/{train,val}/<digit>/``
with a stratified labelled hold-out split, and returns the two roots for ``disk_folder``. The cache is
built in a temporary folder and renamed into place with a completion marker written last, so a
half-written cache is never used and concurrent callers (several ranks) are safe.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

MARKER = ".complete"
NUM_CLASSES = 10


def _expected_marker(size: int, val_fraction: float, seed: int) -> dict:
    return {"dataset": "sklearn.datasets.load_digits", "size": size, "val_fraction": val_fraction,
            "seed": seed, "version": 1}


def _is_complete(root: str, marker: dict) -> bool:
    try:
        with open(os.path.join(root, MARKER)) as f:
            return json.load(f) == marker
    except (OSError, ValueError):
        return False


def _write_split(root: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, size: int) -> None:
    for digit in range(NUM_CLASSES):
        os.makedirs(os.path.join(root, str(digit)), exist_ok=True)
    for i in indices:
        gray = np.clip(np.rint(images[i] / 16.0 * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB")
        img.save(os.path.join(root, str(int(labels[i])), f"{int(i):04d}.png"))


def prepare_demo_data(cache_dir: str, val_fraction: float = 0.2, seed: int = 0, size: int = 32) -> dict:
    """Prepares (once) the digits demo data set as ImageFolder trees.

    Args:
        cache_dir: folder holding the cache (created if missing).
        val_fraction: labelled hold-out fraction, stratified by class.
        seed: seed of the split.
        size: side of the stored RGB images.

    Returns:
        ``{"train": <train root>, "val": <val root>, "num_classes": 10}``.

    Raises:
        ValueError: ``val_fraction`` outside (0, 1) or ``size < 8``.
    """
    from sklearn.datasets import load_digits  # demo only: keep sklearn out of `import scaleclr.data`
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    if size < 8:
        raise ValueError(f"size={size} must be >= 8 (the scans are 8 x 8)")
    root = os.path.join(os.path.abspath(cache_dir), f"sklearn_digits_{size}px")
    paths = {"train": os.path.join(root, "train"), "val": os.path.join(root, "val"), "num_classes": NUM_CLASSES}
    marker = _expected_marker(size, float(val_fraction), int(seed))
    if _is_complete(root, marker):
        return paths

    digits = load_digits()
    images, labels = digits.images, digits.target  # [1797, 8, 8] in 0..16, [1797]
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=seed,
                                          stratify=labels)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-digits-", dir=cache_dir)
    try:
        _write_split(os.path.join(tmp, "train"), images, labels, np.sort(train_idx), size)
        _write_split(os.path.join(tmp, "val"), images, labels, np.sort(val_idx), size)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f)
        if os.path.exists(root) and not _is_complete(root, marker):
            shutil.rmtree(root, ignore_errors=True)  # stale or half-written cache
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not _is_complete(root, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
