"""Image sources: where the pixels of ``config.DATA.TRAIN.DATA_SOURCES[i]`` come from (spec 7.1).

A source is an indexed collection of RGB images: ``len(source)``, ``source.load(i) -> PIL.Image`` (RGB,
fully decoded), ``source.open(i) -> PIL.Image`` (header read, pixels not decoded yet: the two-stage host
stage picks a reduced JPEG decode from the crop boxes first, ``scaleclr.data.host_stage``),
``source.path(i)`` (for messages) and ``source.labels`` (int64 numpy array, -1 where unknown). Sources
hold only paths and labels; decoding happens inside the data workers, and a decode error propagates to
the dataset, which skips the file (``scaleclr.data.dataset``).

At ImageNet scale the path list lives in numpy buffers (:class:`PathTable`, or the memory-mapped ``.npy``
of ``disk_filelist``), never in Python lists: forked data workers read a list of 1.28M ``str`` objects
and touch their reference counts, which copies every page they sit on into every worker (copy-on-read).

- ``disk_folder``: a torchvision ``ImageFolder`` root (one sub-folder per class, labels from the sorted
  folder names).
- ``disk_filelist``: a ``.npy`` array of paths (memory-mapped when ``config.DATA.TRAIN.MMAP_MODE``) or a
  ``.txt`` file with one path per line; no labels (-1) unless a labels ``.npy`` is given.
- ``synthetic``: deterministic drawings (smooth-noise background plus a class-specific shape) generated
  from the index, so that a contrastive model has something to learn without any files.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from scaleclr.data.decode import to_rgb
from scaleclr.data.listing import list_image_folder

SOURCE_NAMES = ("disk_filelist", "disk_folder", "synthetic", "webdataset")  # webdataset: scaleclr.data.shards


def load_rgb(path: str | BinaryIO) -> Image.Image:
    """Decodes an image file (a path, or a binary file object such as a shard member's ``io.BytesIO``) fully and
    converts it to 8-bit RGB (:func:`scaleclr.data.decode.to_rgb`: 16-bit scaled, transparency composited over grey,
    both counted).

    Raises:
        OSError: unreadable, truncated or unidentifiable file (``PIL.UnidentifiedImageError``).
    """
    with open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path) as f:
        img = Image.open(f)
        return to_rgb(img, path)  # decodes while the file is open


def open_image(path: str) -> Image.Image:
    """Reads an image file and parses its header, leaving the pixels undecoded (``Image.open`` on the
    file's bytes): size, mode and format are known, ``draft`` can still pick a reduced JPEG decode.

    Raises:
        OSError: unreadable file or unidentifiable image (``PIL.UnidentifiedImageError``), as ``load_rgb``.
    """
    with open(path, "rb") as f:
        data = f.read()
        try:
            img = Image.open(io.BytesIO(data))
            img.scaleclr_path = path  # named by to_rgb's conversion warning (``filename`` would make Pillow mmap it)
            return img
        except UnidentifiedImageError:
            f.seek(0)
            Image.open(f)  # raises what load_rgb raises, so the skip warning reads the same
            raise


class PathTable:
    """An immutable list of paths in two numpy arrays (one byte buffer + offsets), so that forked data
    workers share its pages: reading entry ``i`` touches no Python object of the table.

    ``len(table)``, ``table[i] -> str``; paths round-trip through ``os.fsencode`` / ``os.fsdecode``.
    """

    def __init__(self, paths: Sequence[str]):
        encoded = [os.fsencode(p) for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, idx: int) -> str:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"path index {idx} out of range [0, {len(self)})")
        idx %= len(self)
        return os.fsdecode(self._buffer[self._offsets[idx]:self._offsets[idx + 1]].tobytes())

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes + self._offsets.nbytes)


class ImageSource:
    """Interface of an image source (see the module docstring)."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, idx: int) -> Image.Image:
        raise NotImplementedError

    def open(self, idx: int) -> Image.Image:
        """The image with its pixels possibly not decoded yet; sources without files decode here."""
        return self.load(idx)

    def path(self, idx: int) -> str:
        raise NotImplementedError


class DiskFolderSource(ImageSource):
    """An ImageFolder tree ``root/<class>/**/<image>``: classes are the sorted sub-folder names and
    images are listed recursively in sorted order with torchvision's rules (same indices and labels as
    ``torchvision.datasets.ImageFolder``), except that symlink loops are not followed and a file reached
    twice through links is listed once (:mod:`scaleclr.data.listing`; ``duplicates`` and ``skipped_links``
    say what was left out, and a warning names each link).

    Raises:
        ValueError: ``root`` is missing, has no class folders, or a class folder has no image.
    """

    def __init__(self, root: str):
        listing = list_image_folder(root)  # symlink loops not followed, each real file once (data/listing.py)
        self.classes, samples = listing.classes, listing.samples
        self.duplicates, self.skipped_links = listing.duplicates, listing.skipped_links
        self.root = root
        self._paths = PathTable([p for p, _ in samples])
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))

    def load(self, idx: int) -> Image.Image:
        return load_rgb(self._paths[idx])

    def open(self, idx: int) -> Image.Image:
        return open_image(self._paths[idx])

    def path(self, idx: int) -> str:
        return self._paths[idx]


class DiskFilelistSource(ImageSource):
    """A list of image paths in a ``.npy`` string array or a ``.txt`` file (one path per line).

    Relative paths are resolved against the list file's folder.

    Args:
        list_path: the ``.npy`` or ``.txt`` file.
        mmap_mode: memory-map the ``.npy`` (``config.DATA.TRAIN.MMAP_MODE``), so that forked data workers
            share its pages instead of each holding a copy.
        labels_path: optional ``.npy`` of integer labels, one per path.
        remove_prefix, new_prefix: rewrite paths that start with ``remove_prefix`` (VISSL's
            ``REMOVE_IMG_PATH_PREFIX`` / ``NEW_IMG_PATH_PREFIX``).

    Raises:
        ValueError: unsupported extension, a non-string or object ``.npy``, or a label count mismatch.
    """

    def __init__(self, list_path: str, mmap_mode: bool = True, labels_path: str | None = None,
                 remove_prefix: str = "", new_prefix: str = ""):
        self.list_path = list_path
        self._base = os.path.dirname(os.path.abspath(list_path))
        self.remove_prefix, self.new_prefix = remove_prefix, new_prefix
        if list_path.endswith(".npy"):
            try:
                self._paths: Sequence[str] = np.load(list_path, mmap_mode="r" if mmap_mode else None)
            except ValueError as e:  # object arrays need pickle, which we refuse (as VISSL does)
                raise ValueError(f"disk_filelist {list_path!r}: {e}; save the paths as a fixed-width string "
                                 "array, e.g. np.save(path, np.array(paths, dtype=str))") from e
            if self._paths.ndim != 1 or self._paths.dtype.kind not in "US":
                raise ValueError(f"disk_filelist {list_path!r} must hold a 1-D string array, got dtype "
                                 f"{self._paths.dtype} and shape {self._paths.shape}")
        elif list_path.endswith(".txt"):
            with open(list_path) as f:
                self._paths = PathTable([line.strip() for line in f if line.strip()])
        else:
            raise ValueError(f"disk_filelist {list_path!r} must end in .npy or .txt")
        if labels_path:
            labels = np.load(labels_path, allow_pickle=False)
            if labels.shape != (len(self._paths),):
                raise ValueError(f"labels {labels_path!r} have shape {labels.shape}, expected "
                                 f"({len(self._paths)},) to match {list_path!r}")
            self.labels = labels.astype(np.int64)
        else:
            self.labels = np.full(len(self._paths), -1, dtype=np.int64)

    def path(self, idx: int) -> str:
        p = self._paths[idx]
        p = p.decode() if isinstance(p, bytes) else str(p)
        if self.remove_prefix and p.startswith(self.remove_prefix):
            p = self.new_prefix + p[len(self.remove_prefix):]
        return os.path.join(self._base, p)  # join keeps absolute paths unchanged

    def load(self, idx: int) -> Image.Image:
        return load_rgb(self.path(idx))

    def open(self, idx: int) -> Image.Image:
        return open_image(self.path(idx))


class SyntheticSource(ImageSource):
    """Deterministic synthetic images: a smooth random-noise background and one shape whose kind is the
    class (disk, square, triangle, plus, ring, stripes, ...), at a random position, size and colour.

    Image ``i`` depends only on ``(seed, i)``; its label is ``i % num_classes``.

    Args:
        size: image side in pixels.
        count: number of images.
        num_classes: number of shape classes, 1..10.
        seed: seed of the drawing (independent of the augmentation seed).
    """

    NUM_SHAPES = 10

    def __init__(self, size: int = 32, count: int = 1024, num_classes: int = 10, seed: int = 0):
        if int(size) < 8 or int(count) < 1 or not 1 <= int(num_classes) <= self.NUM_SHAPES:
            raise ValueError(f"synthetic source needs size >= 8, count >= 1 and 1 <= num_classes <= "
                             f"{self.NUM_SHAPES}, got size={size} count={count} num_classes={num_classes}")
        self.size, self.num_classes, self.seed = int(size), int(num_classes), int(seed)
        self.labels = np.arange(int(count), dtype=np.int64) % self.num_classes

    def path(self, idx: int) -> str:
        return f"synthetic://{self.seed}/{idx}"

    def load(self, idx: int) -> Image.Image:
        if not 0 <= idx < len(self):
            raise IndexError(f"synthetic index {idx} out of range [0, {len(self)})")
        rng = np.random.default_rng([self.seed, idx])
        s = self.size
        low = (rng.uniform(0.15, 0.85, (4, 4, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(low, "RGB").resize((s, s), Image.BICUBIC)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        r = s * rng.uniform(0.18, 0.32)
        cx, cy = rng.uniform(r, s - r, 2)
        _draw_shape(ImageDraw.Draw(img), self.labels[idx], cx, cy, r, colour, max(1, s // 12))
        return img


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float,
                colour: tuple, width: int) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == 3:
        draw.line([(cx - r, cy), (cx + r, cy)], fill=colour, width=2 * width)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=colour, width=2 * width)
    elif kind == 4:
        draw.ellipse(box, outline=colour, width=2 * width)
    elif kind == 5:
        for k in (-1, 0, 1):
            draw.line([(cx - r, cy + k * r / 1.5), (cx + r, cy + k * r / 1.5)], fill=colour, width=width)
    elif kind == 6:
        for k in (-1, 0, 1):
            draw.line([(cx + k * r / 1.5, cy - r), (cx + k * r / 1.5, cy + r)], fill=colour, width=width)
    elif kind == 7:
        h = r / 2
        draw.ellipse((cx - r, cy - h, cx, cy + h), fill=colour)
        draw.ellipse((cx, cy - h, cx + r, cy + h), fill=colour)
    elif kind == 8:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=2 * width)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=colour, width=2 * width)


class LimitedSource(ImageSource):
    """The first ``limit`` images of another source (``config.DATA.TRAIN.DATA_LIMIT``)."""

    def __init__(self, source: ImageSource, limit: int):
        self.source = source
        self.labels = np.asarray(source.labels[:limit])

    def _check(self, idx: int) -> None:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range [0, {len(self)})")

    def load(self, idx: int) -> Image.Image:
        self._check(idx)
        return self.source.load(idx)

    def open(self, idx: int) -> Image.Image:
        self._check(idx)
        return self.source.open(idx)

    def path(self, idx: int) -> str:
        return self.source.path(idx)


_SOURCE_KWARGS = {
    "disk_folder": (),
    "disk_filelist": ("mmap_mode", "labels_path", "remove_prefix", "new_prefix"),
    "synthetic": ("size", "count", "num_classes", "seed"),
}


def build_source(name: str, path: str | None, data_limit: int = -1, *,
                 key: str = "config.DATA.TRAIN.DATA_SOURCES[0]",
                 path_key: str = "config.DATA.TRAIN.DATA_PATHS[0]", **kwargs: Any) -> ImageSource:
    """Builds the image source ``name`` reading ``path``.

    Args:
        name: ``disk_folder``, ``disk_filelist`` or ``synthetic``.
        path: folder root / list file; ignored by ``synthetic``.
        data_limit: if > 0, keep only the first ``data_limit`` images (deterministic). For ``synthetic``
            without an explicit ``count`` it is the number of images (as in the config schema).
        key, path_key: config keys named in error messages.
        **kwargs: source options (``disk_filelist``: mmap_mode, labels_path, remove_prefix, new_prefix;
            ``synthetic``: size, count, num_classes, seed).

    Raises:
        ValueError: unknown source name, missing path, unknown option or an unusable path; the message
            names the config key, the value and the allowed values.
    """
    if name not in _SOURCE_KWARGS:  # (webdataset shards are built by scaleclr.data.shards.ShardSource)
        raise ValueError(f"{key}={name!r} is not a known data source; allowed: {sorted(_SOURCE_KWARGS)} "
                         f"({path_key}={path!r})")
    unknown = sorted(set(kwargs) - set(_SOURCE_KWARGS[name]))
    if unknown:
        raise ValueError(f"{key}={name!r}: unknown option(s) {unknown}; allowed: {list(_SOURCE_KWARGS[name])}")
    if name == "synthetic":
        if "count" not in kwargs and data_limit > 0:
            kwargs["count"] = data_limit
        source: ImageSource = SyntheticSource(**kwargs)
    else:
        if not path or not os.path.exists(path):
            raise ValueError(f"{path_key}={path!r} does not exist ({key}={name!r} needs "
                             f"{'an ImageFolder root' if name == 'disk_folder' else 'a .npy or .txt file'})")
        try:
            source = DiskFolderSource(path) if name == "disk_folder" else DiskFilelistSource(path, **kwargs)
        except ValueError as e:
            raise ValueError(f"{path_key}={path!r} ({key}={name!r}): {e}") from e
    if len(source) == 0:
        raise ValueError(f"{path_key}={path!r} ({key}={name!r}) holds no images")
    if data_limit is not None and data_limit > 0 and data_limit < len(source):
        source = LimitedSource(source, int(data_limit))
    return source
