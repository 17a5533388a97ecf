"""``python -m scaleclr.data.shards write``: an ImageFolder or file list -> WebDataset shards plus their index.

Sample ``i`` of the shards is image ``i`` of the input in the order scaleclr's own sources list it
(``disk_folder``: torchvision's ImageFolder order; ``disk_filelist``: the list's order), under the key
``%09d`` of ``i``, with its label as ``cls`` when it has one. JPEG, PNG and WebP files are stored byte for
byte, so training on the shards sees exactly the pixels the folder gives; other formats are stored as PNG
(lossless). With ``max_side`` an image whose longer side exceeds it is resized (Lanczos) to that side and
stored as JPEG quality 95 (PNG and WebP stay lossless PNG): decoding a 320-px JPEG costs a fraction of a
500-px one, at the price of fewer source pixels under every random crop.

Output is deterministic (fixed member metadata, fixed order, size-driven shard boundaries). A shard is
written to ``*.tar.part`` and renamed when complete; an interrupted run started again with the same
arguments keeps the complete shards and goes on from the first missing one (``writer.json`` records the
arguments and refuses a different input or settings).
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from multiprocessing import get_context

from PIL import Image

from scaleclr.data.shards.index import ShardIndex, index_path, scan_shard
from scaleclr.data.sources import ImageSource, build_source

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"1GiB"`` -> 1073741824 (B, KB, MB, GB, KiB, MiB, GiB; case-insensitive).

    Raises:
        ValueError: an unknown unit or a size < 1 byte.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--shard-size {text!r}: give a number with B, KB, MB, GB, KiB, MiB or GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise ValueError(f"--shard-size {text!r} must be at least 1 byte")
    return size


def input_source(path: str) -> ImageSource:
    """``disk_folder`` for a folder, ``disk_filelist`` for a ``.txt`` / ``.npy`` list (labels from a ``.npy`` of
    the same name ending in ``_labels.npy`` when present)."""
    if os.path.isdir(path):
        return build_source("disk_folder", path, path_key="IMAGEFOLDER_OR_FILELIST")
    labels = os.path.splitext(path)[0] + "_labels.npy"
    kw = {"labels_path": labels} if os.path.exists(labels) else {}
    return build_source("disk_filelist", path, path_key="IMAGEFOLDER_OR_FILELIST", **kw)


def encode(path: str, max_side: int | None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of one input image as stored (see the module docstring).

    Raises:
        OSError: the file cannot be read or is not an image (the writer names it and stops).
    """
    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.convert("RGB") if fmt == "JPEG" or img.mode not in ("RGB", "RGBA", "L", "LA") else img
        img = img.resize(size, Image.LANCZOS)
        out = io.BytesIO()
        if fmt == "JPEG":
            img.save(out, "JPEG", quality=95)
            return "jpg", out.getvalue()
        img.save(out, "PNG")
        return "png", out.getvalue()
    if fmt in KEEP_FORMATS:
        img.verify()  # catches a truncated file before it is written into a shard
        return KEEP_FORMATS[fmt], data
    out = io.BytesIO()
    img.save(out, "PNG")
    return "png", out.getvalue()


def _encode_job(job: tuple[int, str, int | None]) -> tuple[int, str, bytes]:
    i, path, max_side = job
    try:
        ext, data = encode(path, max_side)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {i} ({path}): {type(e).__name__}: {e}") from None
    return i, ext, data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _member_bytes(ext: str, data: bytes, label: int) -> int:
    blocks = lambda n: tarfile.BLOCKSIZE * (1 + -(-n // tarfile.BLOCKSIZE))  # noqa: E731 header + padded data
    return blocks(len(data)) + (blocks(len(str(label))) if label >= 0 else 0)


def write_shards(src: str, out_dir: str, shard_size: int = 2**30, max_side: int | None = None, workers: int = 1,
                 progress: bool = True) -> list[str]:
    """Writes the images of ``src`` (ImageFolder root or file list) as ``out_dir/shard-%06d.tar`` and their index.

    Returns:
        The shard paths.

    Raises:
        ValueError: an unreadable input image (naming it), or ``out_dir`` holds shards written from another
            input or with other settings.
    """
    source = input_source(src)
    os.makedirs(out_dir, exist_ok=True)
    settings = {"input": os.path.abspath(src), "images": len(source), "shard_size": shard_size,
                "max_side": max_side, "format": 1}
    meta = os.path.join(out_dir, "writer.json")
    if os.path.exists(meta):
        with open(meta) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(f"{out_dir} holds shards written with {old}, not {settings}; choose another folder")
    else:
        with open(meta, "w") as f:
            json.dump(settings, f, indent=1)
    shard_name = lambda n: os.path.join(out_dir, f"shard-{n:06d}.tar")  # noqa: E731
    shards, start = [], 0
    while os.path.exists(shard_name(len(shards))):  # resume after the complete shards
        shards.append(shard_name(len(shards)))
        start += len(scan_shard(shards[-1]).keys)
    from tqdm import tqdm
    bar = tqdm(total=len(source), initial=start, unit="img", disable=not progress, file=sys.stderr)
    jobs = ((i, source.path(i), max_side) for i in range(start, len(source)))
    pool = get_context("fork").Pool(workers) if workers > 1 else None  # PIL work only: no torch in the children
    results: Iterator = pool.imap(_encode_job, jobs, chunksize=8) if pool else map(_encode_job, jobs)
    tar, used, part = None, 0, ""
    try:
        for i, ext, data in results:
            label = int(source.labels[i])
            need = _member_bytes(ext, data, label)
            if tar is not None and used + need + 2 * tarfile.BLOCKSIZE > shard_size:
                tar.close()
                os.replace(part, shard_name(len(shards)))
                shards.append(shard_name(len(shards)))
                tar = None
            if tar is None:
                part, used = shard_name(len(shards)) + ".part", 0
                tar = tarfile.open(part, "w", format=tarfile.USTAR_FORMAT)
            _add(tar, f"{i:09d}.{ext}", data)
            if label >= 0:
                _add(tar, f"{i:09d}.cls", str(label).encode())
            used += need
            bar.update(1)
        if tar is not None:
            tar.close()
            os.replace(part, shard_name(len(shards)))
            shards.append(shard_name(len(shards)))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    ShardIndex.build(shards).save(index_path(shards))
    return shards
