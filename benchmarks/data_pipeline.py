"""Data-path throughput per CPU core: the all-host VISSL pipeline vs the two-stage path (issue 10).

In one process, one intra-op thread, interleaved round by round, on real JPEGs of ImageNet-like size made at
run time from the photos that ship with scikit-learn (``load_sample_images``: china.jpg and flower.jpg,
427 x 640; crops, flips and resizes to 500 x 375 / 375 x 500, saved as JPEG quality 90 in a temporary
ImageFolder):

(a) the host path (today's pipeline: decode + every transform in PIL + ToTensor + Normalize, float32 views),
(b) the host stage of the two-stage path (decode + crops + flips to uint8 views + parameter rows),
(c) the device stage on CPU for one batch of ``--views`` views (colour distortion, blur, normalisation),
(d) lightly's ``SimCLRTransform`` (``input_size=224``), if lightly is importable,

for the SimCLR recipe at 224 px (2 views) and the multi-crop recipe (2 x 160 + 4 x 96). (a), (b) and (d)
include reading the file, decoding and collating a batch; they report images/s per core. (c) reports
views/s per core. "Per core" is measured as this process's CPU time (``time.process_time``, one intra-op
thread), so other load on a shared machine inflates the figures less than wall time would; the ratios
are the median of the per-round ratios. It also prints the bytes per image handed to the device
(float32 views for (a), uint8 views + float32 parameters for (b)) and the ratios (b)/(a).

``--blur`` times the per-sample-radius blur three ways on a batch (``views`` at ``size``, about half of them
blurred): (i) per-sample kernels padded to the largest size, one grouped convolution (groups = N*C) per
pass; (ii) the same grouped by kernel size; (iii) the three passes of an axis composed into one matrix per
sample, two batched matmuls (what the device stage uses).

Usage::

    python benchmarks/data_pipeline.py                    # 224 px + multi-crop, 3 rounds
    python benchmarks/data_pipeline.py --rounds 5 --images 48 --views 256
    python benchmarks/data_pipeline.py --blur

``benchmark_device_stage(device, views=256, size=224)`` returns the device stage's views/s on any device
and ``device_stage_parity(device)`` its largest difference from the CPU result in uint8 levels
(``benchmarks/gpu_check.py`` calls them on CUDA).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scaleclr.data import (DeviceAugmentation, HostStage, SSLDataset, build_source, build_transforms,  # noqa: E402
                           multicrop_collator, simclr_collator)
from scaleclr.data import device_ops  # noqa: E402

CLOCK = time.process_time  # CPU seconds of this process: per-core cost, robust to other load
NORMALIZE = {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
COLOUR_BLUR = [{"name": "ImgPilColorDistortion", "strength": 1.0},
               {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0},
               {"name": "ToTensor"}, NORMALIZE]
RECIPES = {
    "simclr_224": ([{"name": "ImgReplicatePil", "num_times": 2}, {"name": "RandomResizedCrop", "size": 224},
                    {"name": "RandomHorizontalFlip", "p": 0.5}] + COLOUR_BLUR, simclr_collator),
    "multicrop_2x160_4x96": ([{"name": "ImgPilToMultiCrop", "total_num_crops": 6, "size_crops": [160, 96],
                               "num_crops": [2, 4], "crop_scales": [[0.08, 1], [0.05, 0.14]]},
                              {"name": "RandomHorizontalFlip", "p": 0.5}] + COLOUR_BLUR, multicrop_collator),
}


# ------------------------------------------------------------------------------------------ images
def make_jpegs(root: str, count: int = 24, quality: int = 90) -> str:
    """Writes ``count`` JPEGs of ~500 x 375 (and 375 x 500) px made from scikit-learn's sample photos into
    an ImageFolder ``root/<photo>/<i>.jpg``; returns ``root``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    rng = np.random.default_rng(0)
    for name, arr in zip(photos.filenames, photos.images):
        cls = os.path.splitext(os.path.basename(name))[0]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        img = Image.fromarray(arr)  # 640 x 427
        for i in range(count // 2):
            w, h = (500, 375) if i % 3 else (375, 500)
            cw, ch = int(rng.integers(int(0.7 * 640), 641)), int(rng.integers(int(0.7 * 427), 428))
            left, top = int(rng.integers(0, 640 - cw + 1)), int(rng.integers(0, 427 - ch + 1))
            view = img.crop((left, top, left + cw, top + ch))
            if i % 2:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            view.resize((w, h), Image.BICUBIC).save(os.path.join(root, cls, f"{i:03d}.jpg"), quality=quality)
    return root


# -------------------------------------------------------------------------------------------- timers
def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def time_dataset(dataset: SSLDataset, collate: Callable, batch: int) -> tuple[float, dict]:
    """Seconds to load and collate ``len(dataset)`` images in batches of ``batch`` (one process); the last
    collated batch is returned for byte counts."""
    start = CLOCK()
    last: dict = {}
    for b in range(0, len(dataset), batch):
        last = collate([dataset[i] for i in range(b, min(b + batch, len(dataset)))])
    return CLOCK() - start, last


def time_lightly(source, batch: int) -> float | None:
    try:
        from lightly.transforms import SimCLRTransform
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    transform = SimCLRTransform(input_size=224)
    start = CLOCK()
    for b in range(0, len(source), batch):
        views = [transform(source.load(i)) for i in range(b, min(b + batch, len(source)))]
        torch.stack([v[0] for v in views] + [v[1] for v in views])
    return CLOCK() - start


def _device_batch(views: int, size: int, device: torch.device | str, seed: int = 0):
    """A realistic batch for the device stage: uint8 crops of the sample photos + SimCLR parameter rows."""
    from sklearn.datasets import load_sample_images
    from PIL import Image

    stage = HostStage.from_specs(RECIPES["simclr_224"][0][:3] + COLOUR_BLUR)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    data, params = [], []
    g = torch.Generator().manual_seed(seed)
    for i in range((views + 1) // 2):
        v, p = stage(photos[i % 2], g)
        data += v
        params.append(p)
    data = torch.stack(data[:views])
    if size != 224:
        data = torch.nn.functional.interpolate(data, size=(size, size), mode="bilinear", antialias=True)
    return data.to(device), torch.cat(params)[:views].to(device)


def benchmark_device_stage(device: torch.device | str = "cpu", views: int = 256, size: int = 224,
                           reps: int = 5) -> float:
    """Views per second of the SimCLR device stage (ImgPilColorDistortion(1.0), ImgPilGaussianBlur(0.5,
    0.1, 2.0), ToTensor, Normalize) on ``views`` uint8 views of ``size`` px already on ``device``; median
    of ``reps`` timed runs after one warm-up (synchronised on CUDA)."""
    device = torch.device(device)
    augment = DeviceAugmentation.from_specs(RECIPES["simclr_224"][0][:3] + COLOUR_BLUR)
    data, params = _device_batch(views, size, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    augment(data, params)
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        augment(data, params)
        sync()
        times.append(time.perf_counter() - start)
    return views / statistics.median(times)


def device_stage_parity(device: torch.device | str, views: int = 64, size: int = 64) -> float:
    """Max |device - CPU| of the SimCLR device stage (without Normalize) on one batch, in uint8 levels: the
    check to run next to :func:`benchmark_device_stage` on CUDA (float rounding only; TF32 matmuls, if
    enabled, add ~0.1 level in the blur)."""
    specs = RECIPES["simclr_224"][0][:3] + COLOUR_BLUR[:3]
    data, params = _device_batch(views, size, "cpu")
    ref = DeviceAugmentation.from_specs(specs)(data, params)
    got = DeviceAugmentation.from_specs(specs)(data.to(device), params.to(device)).cpu()
    return float((got - ref).abs().max()) * 255


# ----------------------------------------------------------------------------------------------- blur
def blur_methods(views: int = 256, size: int = 224, reps: int = 3, device: str = "cpu") -> dict[str, float]:
    """Milliseconds per batch of the three per-sample blur implementations (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    n = views // 2  # ImgPilGaussianBlur p = 0.5
    x = torch.rand(n, 3, size, size, generator=g).to(device)
    sigma = (0.1 + 1.9 * torch.rand(n, generator=g)).to(device)

    def grouped(x, s):
        return device_ops.pil_gaussian_blur_passes(x, s)

    def by_size(x, s):
        r = torch.floor(device_ops.pil_box_radius(s)).to(torch.int64)
        out = torch.empty_like(x)
        for value in r.unique().tolist():
            idx = (r == value).nonzero().squeeze(1)
            out[idx] = device_ops.pil_gaussian_blur_passes(x[idx], s[idx])
        return out

    results = {}
    for name, fn in (("(i) grouped conv, kernels padded to the max size", grouped),
                     ("(ii) grouped conv per kernel size", by_size),
                     ("(iii) composed passes, batched matmul (used)", device_ops.pil_gaussian_blur)):
        fn(x, sigma)
        times = []
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x, sigma)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = 1e3 * statistics.median(times)
    return results


# ----------------------------------------------------------------------------------------------- main
def run_recipe(name: str, root: str, rounds: int, batch: int, views: int) -> dict[str, Any]:
    specs, collate = RECIPES[name]
    source = build_source("disk_folder", root)
    host_path = SSLDataset(source, build_transforms(specs), seed=0)
    host_stage = SSLDataset(source, HostStage.from_specs(specs), seed=0)
    augment = DeviceAugmentation.from_specs(specs)
    num_views = host_stage.transforms.num_views
    times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    bytes_a = bytes_b = 0
    for r in range(rounds + 1):  # round 0 warms up (imports, page cache, allocator)
        for ds in (host_path, host_stage):
            ds.set_epoch(r)
        t_a, batch_a = time_dataset(host_path, collate, batch)
        t_b, batch_b = time_dataset(host_stage, collate, batch)
        # (c): enough host-stage batches for `views` views, then one device-stage call
        samples = [host_stage[i % len(host_stage)] for i in range((views + num_views - 1) // num_views)]
        device_batch = collate(samples)
        start = CLOCK()
        augment(device_batch["data"], device_batch["aug_params"])
        t_c = CLOCK() - start
        t_d = time_lightly(source, batch) if name == "simclr_224" else None
        if r == 0:
            images = len(batch_a["data_idx"]) // num_views  # the last batch (same size in both)
            bytes_a = _nbytes(batch_a["data"]) / images
            bytes_b = (_nbytes(batch_b["data"]) + _nbytes(batch_b["aug_params"])) / images
            continue
        times["a"].append(t_a)
        times["b"].append(t_b)
        times["c"].append(t_c)
        if t_d is not None:
            times["d"].append(t_d)
    n = len(source)
    out = {"recipe": name, "images": n, "views_per_image": num_views,
           "a_img_s": n / statistics.median(times["a"]), "b_img_s": n / statistics.median(times["b"]),
           "c_views_s": (len(samples) * num_views) / statistics.median(times["c"]),
           "d_img_s": n / statistics.median(times["d"]) if times["d"] else None,
           "bytes_a": bytes_a, "bytes_b": bytes_b}
    out["b_over_a"] = statistics.median(a / b for a, b in zip(times["a"], times["b"]))
    out["bytes_ratio"] = bytes_a / bytes_b
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument("--images", type=int, default=24, help="JPEGs made and read per round")
    p.add_argument("--batch", type=int, default=8, help="images per collated batch")
    p.add_argument("--views", type=int, default=256, help="views in the device-stage batch (c)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--blur", action="store_true", help="only compare the three blur implementations")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # per-core figures

    if args.blur:
        print(f"per-sample-radius blur, {args.views // 2} of {args.views} views blurred, 224 px, 1 thread, ms:")
        for name, ms in blur_methods(args.views).items():
            print(f"  {name}: {ms:.0f}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpegs(os.path.join(tmp, "jpegs"), args.images)
        print(f"{args.images} JPEGs (~500 x 375, q90, from sklearn sample photos), 1 thread, "
              f"{args.rounds} interleaved rounds (median), batch {args.batch}, device batch {args.views} views")
        print("| recipe | (a) host path img/s | (b) host stage img/s | (b)/(a) | (c) device stage on CPU views/s "
              "| (d) lightly img/s | bytes/img to device (a) | (b) | (a)/(b) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name in args.recipes:
            r = run_recipe(name, root, args.rounds, args.batch, args.views)
            d = f"{r['d_img_s']:.1f}" if r["d_img_s"] else "not installed"
            print(f"| {name} | {r['a_img_s']:.1f} | {r['b_img_s']:.1f} | {r['b_over_a']:.2f}x | "
                  f"{r['c_views_s']:.1f} | {d} | {r['bytes_a']:,.0f} | {r['bytes_b']:,.0f} | "
                  f"{r['bytes_ratio']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
