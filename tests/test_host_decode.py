"""The host stage's decoding (issue 10), against the all-host path: the reduced-size (DCT draft) JPEG decode and
when it is used, bad files (corrupt, truncated, CMYK, 16-bit, palette, tiny) skipped or converted exactly as the
all-host path does, and the sources' compact path table. The device stage: tests/test_device_augment.py.

Tolerances are in uint8 levels (1 level = 1/255 of the [0, 1] range) and stated at each assertion.
"""
import io
import logging
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image

from scaleclr.data import HostStage, SSLDataset, build_source, build_transforms, sample_generator, simclr_collator
from scaleclr.data.host_stage import Step, ViewPlan, decode_rgb, draft_scale
from scaleclr.data.sources import PathTable

EPS_LEVELS = 255 * 4 * 1e-6  # float32 rounding on [0, 1] values (16 u), in uint8 levels


def _levels(a, b):
    return (a.float() - b.float()).abs() * 255


# ------------------------------------------------------------------------------------- draft decode
def _jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_draft_scale_rule():
    def plan(h, w, out):
        return ViewPlan((out, out), (Step("crop", (0, 0, h, w), (out, out)),))
    assert draft_scale([plan(500, 470, 224)]) == 2
    assert draft_scale([plan(500, 470, 224), plan(447, 600, 224)]) == 1  # the smaller crop decides
    assert draft_scale([plan(1800, 2000, 224)]) == 8 and draft_scale([plan(900, 1000, 224)]) == 4
    assert draft_scale([ViewPlan((10, 10))]) == 1  # a view of the whole image needs full resolution
    flip_first = ViewPlan((224, 224), (Step("flip", (), (900, 900)), Step("crop", (0, 0, 900, 900), (224, 224))))
    assert draft_scale([flip_first]) == 1


def test_reduced_decode_equals_full_decode_then_crop():
    """Verification of the reduced-size (DCT) decode: for random crops that allow 1/2, 1/4 and 1/8, compare
    draft-decode + crop + resize with full decode + the host path's crop + resize. The geometry is exact (the
    box maps by 1/scale with sub-pixel precision); the pixels differ by libjpeg's DCT-domain reduction vs
    Pillow's bilinear filter (docs/data.md: mean 0.5-1.1 levels, max ~40 levels at sharp edges)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photo = Image.fromarray(load_sample_images().images[0]).resize((1280, 854), Image.BICUBIC)
    data = _jpeg_bytes(photo)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for scale in (2, 4, 8):
        diffs = []
        for _ in range(6):
            out = 96 if scale < 8 else 64
            h, w = (int(rng.integers(out * scale, min(854, out * scale * 2) + 1)) for _ in range(2))
            top, left = int(rng.integers(0, 854 - h + 1)), int(rng.integers(0, 1280 - w + 1))
            stage_plan = [ViewPlan((out, out), (Step("crop", (top, left, h, w), (out, out)),))]
            assert draft_scale(stage_plan) >= scale
            decoded, used = decode_rgb(Image.open(io.BytesIO(data)), scale)
            assert used == scale and decoded.size == (-(-1280 // scale), -(-854 // scale))
            got = HostStage._reduced_crop(decoded, used, stage_plan[0].steps[0])
            ref = F.resized_crop(full, top, left, h, w, [out, out], antialias=True)
            diffs.append(np.abs(np.asarray(got, float) - np.asarray(ref, float)))
        d = np.stack(diffs)
        assert d.mean() <= 2.0 and d.max() <= 64, (scale, d.mean(), d.max())  # filters differ, geometry equal


def test_host_stage_uses_the_reduced_decode_only_when_allowed(tmp_path):
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[1]).resize((1600, 1200), Image.BICUBIC)
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "big.jpg").write_bytes(_jpeg_bytes(photo))
    source = build_source("disk_folder", str(tmp_path))
    spec = [{"name": "RandomResizedCrop", "size": 64, "scale": [0.9, 1.0]}, {"name": "ToTensor"}]
    stage = HostStage.from_specs(spec)
    prepared = stage.load(source, 0, sample_generator(0, 0, 0))
    assert prepared.scale == 8 and prepared.image.size == (200, 150)
    (view,), _ = stage.finish(prepared)
    host_view = build_transforms(spec)(source.load(0), sample_generator(0, 0, 0))[0]
    assert view.shape == (3, 64, 64) and _levels(view.float() / 255, host_view).mean() <= 2.0
    small = HostStage.from_specs([{"name": "RandomResizedCrop", "size": 1000}, {"name": "ToTensor"}])
    assert small.load(source, 0, sample_generator(0, 0, 0)).scale == 1


# -------------------------------------------------------------------------------------- bad input
def _bad_folder(root):
    """One folder per case: the old path's reference behaviour is skip (corrupt, truncated) or convert."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    os.makedirs(root / "a")
    good = _jpeg_bytes(rgb)
    (root / "a" / "0_ok.jpg").write_bytes(good)
    (root / "a" / "1_corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 4)
    (root / "a" / "2_truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (40, 30), (10, 200, 30, 5)).save(root / "a" / "3_cmyk.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(root / "a" / "4_gray.png")
    Image.fromarray((rng.integers(0, 65536, (30, 40))).astype(np.uint16)).save(root / "a" / "5_gray16.png")
    pal = rgb.convert("P", palette=Image.ADAPTIVE)
    pal.save(root / "a" / "6_palette.png", transparency=0)
    rgb.convert("RGBA").save(root / "a" / "7_rgba.png")
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(root / "a" / "8_tiny.png")
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(root / "a" / "9_gray.jpg", quality=90)
    return root


def test_bad_input_same_skip_or_conversion_as_the_host_path(tmp_path, caplog):
    root = _bad_folder(tmp_path / "bad")
    source = build_source("disk_folder", str(root))
    names = [os.path.basename(source.path(i)) for i in range(len(source))]
    assert Image.open(root / "a" / "5_gray16.png").mode == "I;16"
    geometry = [{"name": "ImgReplicatePil", "num_times": 2}, {"name": "RandomResizedCrop", "size": 16},
                {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ToTensor"}]
    host_ds = SSLDataset(source, build_transforms(geometry), seed=0)
    stage_ds = SSLDataset(source, HostStage.from_specs(geometry), seed=0)
    records = {}
    for key, ds in (("host", host_ds), ("stage", stage_ds)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scaleclr.data.dataset"):
            samples = [ds[i] for i in range(len(ds))]
            ds[1]  # a bad file is warned about once per process
        records[key] = (samples, [r.getMessage() for r in caplog.records if r.name == "scaleclr.data.dataset"])
    (host, host_warn), (stage, stage_warn) = records["host"], records["stage"]
    assert host_warn == stage_warn and len(stage_warn) == 2  # same messages, naming each bad file once
    assert "1_corrupt.jpg" in stage_warn[0] and "2_truncated.jpg" in stage_warn[1]
    for i, (a, b) in enumerate(zip(host, stage)):
        assert (a["skipped"], a["label"], a["data_idx"]) == (b["skipped"], b["label"], b["data_idx"]), names[i]
        for va, vb in zip(a["data"], b["data"]):  # converted by the same to_rgb; crop resize <= 1 level
            assert vb.dtype == torch.uint8 and _levels(vb.float() / 255, va).max() <= 1.0 + EPS_LEVELS, names[i]
    # skipped counts the sample's own file (0 | 1): each unreadable file once per epoch
    assert [s["skipped"] for s in stage] == [0, 1, 1] + [0] * 7
    batch = simclr_collator(stage)
    assert batch["skipped"] == 2 and batch["data"].shape == (20, 3, 16, 16)


# ---------------------------------------------------------------------------- sources and memory
def test_path_table_and_numpy_labels(tmp_path):
    table = PathTable(["/a/b.jpg", "/c/\u00e9t\u00e9.png", "rel/x.jpg"])
    assert len(table) == 3 and table[1] == "/c/\u00e9t\u00e9.png" and table[-1] == "rel/x.jpg"
    assert isinstance(table._buffer, np.ndarray) and isinstance(table._offsets, np.ndarray)
    with pytest.raises(IndexError):
        table[3]
    for c in ("x", "y"):
        os.makedirs(tmp_path / c)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    source = build_source("disk_folder", str(tmp_path))
    assert isinstance(source._paths, PathTable) and not isinstance(source._paths, list)
    assert source.labels.dtype == np.int64 and source.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert source.path(4).endswith(os.path.join("y", "1.png")) and source.open(4).size == (8, 8)
    (tmp_path / "list.txt").write_text("\n".join(source.path(i) for i in range(6)))
    assert isinstance(build_source("disk_filelist", str(tmp_path / "list.txt"))._paths, PathTable)


