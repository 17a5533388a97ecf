"""Two-stage data path (issue 10): host stage (decode, crops, flips -> uint8 + parameters) and device stage
(batched colour distortion, blur, normalisation), tested against the all-host path. The host stage's decoding
(reduced-size JPEG decode, bad files) and the sources' path table: tests/test_host_decode.py.

Tolerances are in uint8 levels (1 level = 1/255 of the [0, 1] range) and stated at each assertion. "Exact"
means equal up to float32 rounding (1e-6 on [0, 1] values).
"""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from scaleclr.data import (DeviceAugmentation, DeviceStage, HostStage, SSLDataset, ShardedSampler, batch_to_device,
                           build_dataloader, build_source, build_transforms, build_two_stage, multicrop_collator,
                           param_columns, resolve_device_augmentation, sample_generator, simclr_collator,
                           split_transforms)
from scaleclr.data import device_augment, device_ops as D
from scaleclr.data.sources import ImageSource

EPS = 1e-6  # float32 rounding on [0, 1] values: the formulas take a handful of roundings of u = 6e-8 (16 u)
EPS_LEVELS = 255 * 4 * EPS  # the same in uint8 levels
NORM = {"name": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
SIMCLR = [{"name": "ImgReplicatePil", "num_times": 2}, {"name": "RandomResizedCrop", "size": 32},
          {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ImgPilColorDistortion", "strength": 1.0},
          {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0}, {"name": "ToTensor"}]
SIMCLR_NORM = SIMCLR + [NORM]
MULTICROP = [{"name": "ImgPilToMultiCrop", "total_num_crops": 5, "size_crops": [24, 12], "num_crops": [2, 3],
              "crop_scales": [[0.3, 1.0], [0.05, 0.3]]},
             {"name": "RandomHorizontalFlip", "p": 0.5}, {"name": "ImgPilColorDistortion", "strength": 0.5},
             {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 1.0}, {"name": "ToTensor"}, NORM]


class MemorySource(ImageSource):
    """Decoded images held in memory (keeps the host path's cost to the transforms)."""

    def __init__(self, images):
        self.images = images
        self.labels = np.arange(len(images), dtype=np.int64)

    def load(self, idx):
        return self.images[idx]

    def path(self, idx):
        return f"memory://{idx}"


def _photo_patches(count=48, size=64, seed=0):
    """Patches of scikit-learn's two sample photos (real colour statistics), resized to ``size``."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(count):
        side = int(rng.integers(120, 400))
        x, y = int(rng.integers(0, 640 - side)), int(rng.integers(0, 427 - side))
        out.append(photos[i % 2].crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR))
    return out


@pytest.fixture(scope="module")
def patches():
    return _photo_patches()


def _u8(images):
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def _levels(a, b):
    return (a.float() - b.float()).abs() * 255


# ------------------------------------------------------------------------------- per-op, fixed params
def test_colour_ops_equal_torchvision_tensor_ops(patches):
    x = _u8(patches).float() / 255
    g = torch.Generator().manual_seed(0)
    f = 0.2 + 1.6 * torch.rand(len(x), generator=g)
    h = torch.rand(len(x), generator=g) - 0.5
    cases = [(D.adjust_brightness, F.adjust_brightness, f), (D.adjust_contrast, F.adjust_contrast, f),
             (D.adjust_saturation, F.adjust_saturation, f), (D.adjust_hue, F.adjust_hue, h)]
    for ours, theirs, factor in cases:
        got = ours(x.clone(), factor)
        ref = torch.stack([theirs(x[i], float(factor[i])) for i in range(len(x))])
        assert (got - ref).abs().max() <= EPS, ours.__name__  # same formulas: float32 rounding only
    ref = torch.stack([F.rgb_to_grayscale(x[i], 3) for i in range(len(x))])
    assert (D.grayscale3(x) - ref).abs().max() <= EPS
    mean, std = torch.tensor(NORM["mean"]), torch.tensor(NORM["std"])
    assert (D.normalize(x.clone(), mean, std) - F.normalize(x, NORM["mean"], NORM["std"])).abs().max() <= EPS


# Measured max / mean |device - PIL| in uint8 levels on these patches (docs/data.md "Two data paths" table); the
# bounds below add a margin. PIL rounds (blend: truncates) to uint8 after each op; hue also goes through
# PIL's uint8 HSV (H in 1/256 turns) and torchvision's trunc(255 * hue) shift.
PIL_BOUNDS = {"brightness": (1.0, 0.5), "contrast": (1.5, 0.55), "saturation": (1.5, 0.55), "hue": (12.0, 0.6),
              "grayscale": (0.6, 0.3), "blur": (3.0, 0.5)}


def test_colour_ops_match_the_host_path_pil_ops_within_uint8_rounding(patches):
    x = _u8(patches).float() / 255
    g = torch.Generator().manual_seed(1)
    f = 0.2 + 1.6 * torch.rand(len(x), generator=g)
    h = 0.4 * torch.rand(len(x), generator=g) - 0.2
    sigma = 0.1 + 1.9 * torch.rand(len(x), generator=g)
    ours = {"brightness": D.adjust_brightness(x.clone(), f), "contrast": D.adjust_contrast(x.clone(), f),
            "saturation": D.adjust_saturation(x.clone(), f), "hue": D.adjust_hue(x, h),
            "grayscale": D.grayscale3(x), "blur": D.pil_gaussian_blur(x, sigma)}
    pil = {"brightness": lambda i: F.adjust_brightness(patches[i], float(f[i])),
           "contrast": lambda i: F.adjust_contrast(patches[i], float(f[i])),
           "saturation": lambda i: F.adjust_saturation(patches[i], float(f[i])),
           "hue": lambda i: F.adjust_hue(patches[i], float(h[i])),
           "grayscale": lambda i: F.rgb_to_grayscale(patches[i], 3),
           "blur": lambda i: patches[i].filter(ImageFilter.GaussianBlur(float(sigma[i])))}
    for name, fn in pil.items():
        d = _levels(ours[name], _u8([fn(i) for i in range(len(x))]).float() / 255)
        max_bound, mean_bound = PIL_BOUNDS[name]
        assert d.max() <= max_bound and d.mean() <= mean_bound, (name, d.max().item(), d.mean().item())


def test_blur_kernel_is_pillows_extended_box_filter(patches):
    u8 = _u8(patches[:16])
    sigma = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 1.7, 1.9, 2.0, 2.5, 3.0, 4.0, 0.05, 1.1])
    pil = _u8([im.filter(ImageFilter.GaussianBlur(float(s))) for im, s in zip(patches[:16], sigma)]).double()
    # Pillow's six passes with its rounding after each: bit for bit
    assert torch.equal(D.pil_gaussian_blur_passes(u8.double(), sigma, round_each_pass=True), pil)
    # the composed-matrix form used on the device equals the pass-by-pass form (float32 rounding)
    x = u8.float() / 255
    assert (D.pil_gaussian_blur(x, sigma) - D.pil_gaussian_blur_passes(x, sigma)).abs().max() <= 4 * EPS
    # without Pillow's per-pass rounding: at most 6 x 0.5 levels away
    assert _levels(D.pil_gaussian_blur(x, sigma), pil / 255).max() <= 3.0
    assert torch.equal(D.pil_gaussian_blur(x[:1], sigma[:1]), x[:1])  # radius 0 is the identity
    rect = torch.rand(3, 3, 20, 33)  # non-square planes use one matrix per axis
    s = torch.tensor([0.4, 1.3, 2.0])
    assert (D.pil_gaussian_blur(rect, s) - D.pil_gaussian_blur_passes(rect, s)).abs().max() <= 4 * EPS


# ------------------------------------------------------------------------------- split and layout
def test_param_layout_of_the_vissl_recipe():
    assert param_columns(SIMCLR_NORM) == ["jitter_applied", "order_0", "order_1", "order_2", "order_3",
                                          "brightness", "contrast", "saturation", "hue", "gray", "blur_applied",
                                          "sigma"]
    split = split_transforms([{"name": "RandomResizedCrop", "size": 8}, {"name": "ColorJitter", "hue": 0.1},
                              {"name": "RandomGrayscale", "p": 0.3}, {"name": "ToTensor"}])
    assert split.width == 10 and [type(t).__name__ for t in split.host] == ["RandomResizedCrop"]


def test_split_errors_name_the_key():
    with pytest.raises(ValueError, match=r"TRANSFORMS\[4\] \(RandomHorizontalFlip\) is a host-stage transform after "
                                         r"the device-stage transform config.DATA.TRAIN.TRANSFORMS\[2\] "
                                         r"\(ImgPilColorDistortion\).*DEVICE_AUGMENTATION=off"):
        split_transforms(SIMCLR[:2] + [SIMCLR[3], SIMCLR[4], SIMCLR[2], SIMCLR[5]])
    with pytest.raises(ValueError, match=r"TRANSFORMS\[3\] \(Normalize\) comes before ToTensor"):
        split_transforms(SIMCLR[:3] + [NORM, {"name": "ToTensor"}])
    with pytest.raises(ValueError, match=r"TRANSFORMS\[4\] \(ImgPilGaussianBlur\) comes after .*ToTensor"):
        split_transforms(SIMCLR[:3] + [{"name": "ToTensor"}, SIMCLR[4]])
    with pytest.raises(ValueError, match=r"has no ToTensor"):
        split_transforms(SIMCLR[:5])
    with pytest.raises(ValueError, match=r"TRANSFORMS\[1\].name='RandomResizedCrp'"):  # the host path's own check
        split_transforms([SIMCLR[0], {"name": "RandomResizedCrp", "size": 32}])


def test_transform_without_device_implementation_is_named(monkeypatch):
    from scaleclr.data import transforms as T

    class Solarize:
        def __init__(self, threshold: int = 128):
            self.threshold = threshold

    monkeypatch.setitem(T.TRANSFORMS, "Solarize", Solarize)
    with pytest.raises(ValueError, match=r"config.DATA.TRAIN.TRANSFORMS\[3\] \(Solarize\) has no device "
                                         r"implementation; device-stage transforms: \[.*ImgPilGaussianBlur.*\].*"
                                         r"DEVICE_AUGMENTATION=off"):
        split_transforms(SIMCLR[:3] + [{"name": "Solarize"}] + SIMCLR[3:])


def test_resolve_device_augmentation():
    assert resolve_device_augmentation("auto", torch.device("cuda", 0)) is True
    assert resolve_device_augmentation("auto", torch.device("cpu")) is False
    assert resolve_device_augmentation("on", "cpu") is True and resolve_device_augmentation("off", "cuda") is False
    with pytest.raises(ValueError, match=r"DEVICE_AUGMENTATION='yes'.*auto, on, off"):
        resolve_device_augmentation("yes", "cpu")


# ----------------------------------------------------------------------- same draws as the host path
def test_host_stage_draws_exactly_what_the_host_path_draws(patches):
    source = MemorySource(patches)
    for specs in (SIMCLR_NORM, MULTICROP):
        host_path, stage = build_transforms(specs), HostStage.from_specs(specs)
        for i in range(12):
            g_host, g_stage = sample_generator(0, 3, i), sample_generator(0, 3, i)
            host_path(source.load(i), g_host)
            views, params = stage(source.open(i), g_stage)
            assert torch.equal(g_host.get_state(), g_stage.get_state())  # same number of draws, same order
            assert len(views) == host_path.num_views and params.shape == (len(views), stage.width)


class _Recorder:
    """Wraps a transform's ``draw`` to record what it returns (host path and host stage alike)."""

    def __init__(self, transform, log):
        self.draw_fn, self.log = transform.draw, log
        transform.draw = self

    def __call__(self, generator):
        out = self.draw_fn(generator)
        self.log.append(out)
        return out


def test_view_parameters_are_the_host_paths(patches):
    host_path, stage = build_transforms(SIMCLR_NORM), HostStage.from_specs(SIMCLR_NORM)
    logs = {"host": [], "stage": []}
    for t in host_path.transforms[3:5]:
        _Recorder(t, logs["host"])
    for t, _ in stage.device:
        if hasattr(t, "draw"):
            _Recorder(t, logs["stage"])
    for i in range(10):
        host_path(patches[i], sample_generator(1, 0, i))
        stage(patches[i], sample_generator(1, 0, i))
    assert logs["host"] == logs["stage"] and len(logs["host"]) == 40


def _two_paths(images, specs, seed=0, epoch=0):
    source = MemorySource(images)
    host_ds = SSLDataset(source, build_transforms(specs), seed=seed)
    stage, augment = build_two_stage(specs)
    stage_ds = SSLDataset(source, stage, seed=seed)
    for ds in (host_ds, stage_ds):
        ds.set_epoch(epoch)
    collate = multicrop_collator if specs[0]["name"] == "ImgPilToMultiCrop" else simclr_collator
    ref = collate([host_ds[i] for i in range(len(images))])
    batch = collate([stage_ds[i] for i in range(len(images))])
    return ref, batch, augment


def test_per_sample_device_view_equals_host_view(patches):
    """Same sample, same epoch: the device-path view is the host-path view up to the PIL-vs-tensor maths."""
    ref, batch, augment = _two_paths(patches, SIMCLR)
    assert batch["data"].dtype == torch.uint8 and batch["aug_params"].shape == (96, 12)
    views = augment(batch["data"], batch["aug_params"])
    d = _levels(views, ref["data"])
    per_view = d.flatten(1).mean(1)
    # Documented tolerance for the whole chain (crop resize <= 1 level, each PIL op's uint8 rounding, PIL's
    # quantised HSV, the blur's per-pass rounding, amplified by later contrast/saturation factors <= 1.8):
    assert d.mean() <= 1.5 and per_view.max() <= 4.0 and d.flatten().quantile(0.999) <= 16 and d.max() <= 48, \
        (d.mean().item(), per_view.max().item(), d.max().item())
    gray = ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).flatten(1).all(1)
    gray_ref = ((ref["data"][:, 0] == ref["data"][:, 1]) & (ref["data"][:, 1] == ref["data"][:, 2])).flatten(1).all(1)
    assert torch.equal(gray, gray_ref) and torch.equal(gray, batch["aug_params"][:, 9] > 0.5)
    # no colour op at all: the views are the host path's up to the crop resize (torch vs Pillow bilinear)
    geometry = SIMCLR[:3] + [{"name": "ToTensor"}, NORM]
    ref, batch, augment = _two_paths(patches, geometry)
    assert _levels(augment(batch["data"], batch["aug_params"]), ref["data"]).max() <= 1.0 * 4.5  # 1 level / std
    plain = _levels(batch["data"].float() / 255, _two_paths(patches, geometry[:4])[0]["data"])
    assert plain.max() <= 1.0 + EPS_LEVELS and plain.mean() < 0.5  # torch's uint8 antialiased bilinear vs Pillow's


def test_multicrop_layout_and_values(patches):
    ref, batch, augment = _two_paths(patches[:16], MULTICROP)
    assert [tuple(t.shape) for t in batch["data"]] == [(16, 3, 24, 24)] * 2 + [(16, 3, 12, 12)] * 3
    assert [tuple(p.shape) for p in batch["aug_params"]] == [(16, 12)] * 5
    views = augment(batch["data"], batch["aug_params"])
    assert [v.dtype for v in views] == [torch.float32] * 5
    for v, r in zip(views, ref["data"]):
        assert v.shape == r.shape and _levels(v, r).mean() <= 2.0 * 4.5  # normalised: levels / std


# ----------------------------------------------------------------------------------- distributions
def _view_stats(views, crops):
    """Per-view statistics: intensity (luma) mean and std, mean HSV saturation, hue shift against the
    un-jittered crop (saturation-weighted circular mean, non-gray views), gray flag, high-frequency energy."""
    luma = D.rgb_to_grayscale(views)[:, 0]
    hsv, hsv_crop = D.rgb_to_hsv(views), D.rgb_to_hsv(crops.float() / 255)

    def angle(h, s):
        return torch.angle((s * torch.exp(2j * np.pi * h.double())).sum((-1, -2))) / (2 * np.pi)

    gray = ((views[:, 0] == views[:, 1]) & (views[:, 1] == views[:, 2])).flatten(1).all(1)
    shift = (angle(hsv[:, 0], hsv[:, 1]) - angle(hsv_crop[:, 0], hsv_crop[:, 1]) + 0.5) % 1.0 - 0.5
    hf = luma.diff(dim=-1).abs().mean((-1, -2)) + luma.diff(dim=-2).abs().mean((-1, -2))
    return {"intensity_mean": luma.mean((-1, -2)), "intensity_std": luma.std((-1, -2)),
            "saturation": hsv[:, 1].mean((-1, -2)), "hue_shift": shift[~gray], "high_freq": hf, "gray": gray}


def _p_values(a, b):
    from scipy import stats

    out = {}
    for k in a:
        if k == "gray":
            na, nb = int(a[k].sum()), int(b[k].sum())
            out[k] = stats.fisher_exact([[na, len(a[k]) - na], [nb, len(b[k]) - nb]]).pvalue
        else:
            out[k] = stats.ks_2samp(a[k].numpy(), b[k].numpy()).pvalue
    return out


@pytest.fixture(scope="module")
def distribution_runs():
    """3000 views (1500 images x 2, 48 px photo patches -> 32 px crops): host path with SEED_VALUE 0,
    device path with SEED_VALUE 1 (independent draws), and the device path's host-stage batch."""
    pytest.importorskip("scipy")
    images = _photo_patches(1500, 48, seed=1)
    source = MemorySource(images)
    stage, augment = build_two_stage(SIMCLR)
    host_ds = SSLDataset(source, build_transforms(SIMCLR), seed=0)
    host_views = simclr_collator([host_ds[i] for i in range(len(images))])["data"]
    host_crops = simclr_collator([SSLDataset(source, stage, seed=0)[i] for i in range(len(images))])["data"]
    batch = simclr_collator([SSLDataset(source, stage, seed=1)[i] for i in range(len(images))])
    return _view_stats(host_views, host_crops), batch, augment


NULL_P = 1e-3  # same distribution: every statistic's p-value stays above this (6 tests: family-wise ~0.6 %)
REJECT_P = NULL_P  # a wrong parameter: at least one p-value falls below the same threshold


def test_device_path_distribution_equals_host_path(distribution_runs):
    host, batch, augment = distribution_runs
    device = _view_stats(augment(batch["data"], batch["aug_params"]), batch["data"])
    p = _p_values(host, device)
    assert min(p.values()) >= NULL_P, p
    assert 0.17 < float(device["gray"].float().mean()) < 0.23  # RandomGrayscale p 0.2


def _tampered(params, kind):
    g = torch.Generator().manual_seed(7)
    p = params.clone()
    if kind == "grayscale p 0.3":  # 0.2 + 0.8 * 0.125
        p[:, 9] = torch.where(torch.rand(len(p), generator=g) < 0.125, 1.0, p[:, 9])
    elif kind == "brightness 1.0 instead of 0.8":
        p[:, 5] = torch.where(p[:, 0] > 0.5, 1 + (p[:, 5] - 1) * 1.0 / 0.8, p[:, 5])
    elif kind == "hue 0.25 instead of 0.2":
        p[:, 8] = p[:, 8] * 1.25
    elif kind == "blur always on":
        p[:, 11] = torch.where(p[:, 10] > 0.5, p[:, 11], 0.1 + 1.9 * torch.rand(len(p), generator=g))
        p[:, 10] = 1.0
    return p


@pytest.mark.parametrize("kind", ["grayscale p 0.3", "brightness 1.0 instead of 0.8", "hue 0.25 instead of 0.2",
                                  "blur always on"])
def test_distribution_test_catches_a_wrong_parameter(distribution_runs, kind):
    """Negative control: the same test rejects a device stage fed one deliberately wrong parameter.
    (Brightness 0.9 instead of 0.8 gives p ~ 0.02 at 3000 views: below this test's resolution.)"""
    host, batch, augment = distribution_runs
    device = _view_stats(augment(batch["data"], _tampered(batch["aug_params"], kind)), batch["data"])
    assert min(_p_values(host, device).values()) < REJECT_P


# ------------------------------------------------------------------------------------ no sample loop
def test_device_stage_has_no_loop_over_samples(monkeypatch):
    """Op calls depend on the (position, op) groups, never on the batch size; B = 1 and B = 512 work."""
    augment = DeviceAugmentation.from_specs(SIMCLR_NORM)
    stage = HostStage.from_specs(SIMCLR_NORM)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    rows = [stage(img, sample_generator(0, 0, i)) for i in range(256)]
    data = torch.stack([v for views, _ in rows for v in views])
    params = torch.cat([p for _, p in rows])
    calls = {}

    def counting(fn):
        def counted(*a, **k):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*a, **k)
        return counted

    monkeypatch.setattr(device_augment, "_JITTER_FNS", tuple(counting(f) for f in device_augment._JITTER_FNS))
    for name in ("grayscale3", "pil_gaussian_blur", "normalize"):
        monkeypatch.setattr(D, name, counting(getattr(D, name)))
    counts = []
    for n in (1, 64, 512):
        calls.clear()
        out = augment(data[:n], params[:n])
        assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
        counts.append(dict(calls))
    assert counts[1] == counts[2]  # every group populated: same calls for 64 and 512 samples
    assert max(counts[2]["adjust_hue"], counts[2]["adjust_brightness"]) == 4  # one per position of the order
    assert counts[2]["pil_gaussian_blur"] == counts[2]["grayscale3"] == counts[2]["normalize"] == 1
    assert sum(counts[0].values()) <= sum(counts[2].values())


def test_a_views_output_does_not_depend_on_the_rest_of_the_batch(patches):
    """Bit for bit the same view whether the batch is split across ranks or reordered (the world-size and
    worker-count invariance carries through the device stage)."""
    _, batch, augment = _two_paths(patches[:32], SIMCLR_NORM)
    data, params = batch["data"], batch["aug_params"]
    full = augment(data, params)
    halves = torch.cat([augment(data[:24], params[:24]), augment(data[24:], params[24:])])
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, halves) and torch.equal(augment(data[perm], params[perm]), full[perm])


def test_device_stage_leaves_inputs_alone_and_checks_shapes():
    augment = DeviceAugmentation.from_specs(SIMCLR_NORM)
    data = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    params = torch.tensor([[1, 3, 2, 1, 0, 1.5, 0.5, 1.2, 0.1, 0, 1, 1.0]] * 4)
    before = (data.clone(), params.clone())
    augment(data, params)
    assert torch.equal(data, before[0]) and torch.equal(params, before[1])
    with pytest.raises(ValueError, match=r"aug_params must be \[N, 12\]"):
        augment(data, params[:, :5])
    with pytest.raises(ValueError, match="uint8"):
        augment(data.float(), params)


# ------------------------------------------------------------------------------ loader and trainer
def test_views_identical_regardless_of_workers_and_path(tmp_path):
    def epochs(num_workers):
        source = build_source("synthetic", None, size=40, count=16)
        ds = SSLDataset(source, HostStage.from_specs(SIMCLR_NORM), seed=3)
        sampler = ShardedSampler(len(ds), 1, 0, seed=3, batch_size=4)
        loader = build_dataloader(ds, 4, num_workers, simclr_collator, sampler)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            out += list(loader)
        return out

    serial, parallel = epochs(0), epochs(2)
    for a, b in zip(serial, parallel):
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["aug_params"], b["aug_params"])
        assert torch.equal(a["data_idx"], b["data_idx"])
    assert not torch.equal(serial[0]["aug_params"], serial[4]["aug_params"])  # epoch 1 draws anew


def test_device_stage_callable_and_model_forward():
    from scaleclr.models import ResNet

    source = build_source("synthetic", None, size=40, count=8)
    stage, augment = build_two_stage(SIMCLR_NORM)
    batch = simclr_collator([SSLDataset(source, stage, seed=0)[i] for i in range(8)])
    moved = batch_to_device(batch, "cpu")
    assert DeviceStage(None)(moved) is moved["data"]
    views = DeviceStage(augment)(moved)
    assert views.shape == (16, 3, 32, 32) and views.dtype == torch.float32
    with pytest.raises(ValueError, match="aug_params"):
        DeviceStage(augment)({"data": batch["data"]})
    model = ResNet(depth=18)
    with torch.no_grad():
        assert model(views).shape[0] == 16


def test_builders_switch_the_dataset(tmp_path):
    from scaleclr import builders
    from scaleclr.config import load_config

    root, _ = load_config(["config=test/integration_test/quick_simclr_synthetic",
                           "config.DATA.TRAIN.DEVICE_AUGMENTATION=on", f"config.CHECKPOINT.DIR={tmp_path}"])
    c = root.config
    assert c.DATA.TRAIN.DEVICE_AUGMENTATION == "on"
    on = resolve_device_augmentation(c.DATA.TRAIN.DEVICE_AUGMENTATION, torch.device("cpu"))
    dataset, _, loader = builders.build_train_data(c, 0, 1, device_augmentation=on)
    batch = next(iter(loader))
    views = builders.build_device_augmentation(c, on)(batch_to_device(batch, "cpu"))
    assert batch["data"].dtype == torch.uint8 and views.dtype == torch.float32 and views.shape == (16, 3, 32, 32)
    _, _, off_loader = builders.build_train_data(c, 0, 1)
    off = next(iter(off_loader))
    assert "aug_params" not in off and builders.build_device_augmentation(c, False)(off) is off["data"]
    assert _levels(views, off["data"]).mean() <= 1.5 * 4.5  # same views (normalised: levels / std)
    assert device_augment.SETTINGS == ("auto", "on", "off")


def test_config_key_values():
    from scaleclr.config import ConfigError, load_config

    quick = "config=test/integration_test/quick_simclr_synthetic"
    assert load_config([quick])[0].config.DATA.TRAIN.DEVICE_AUGMENTATION == "auto"
    with pytest.raises(ConfigError, match=r"DEVICE_AUGMENTATION.*allowed values: auto, on, off"):
        load_config([quick, "config.DATA.TRAIN.DEVICE_AUGMENTATION=maybe"])
    with pytest.raises(ConfigError, match=r"DEVICE_AUGMENTATION.*YAML reads unquoted on/off.*quotes"):
        load_config([quick, "config.DATA.TRAIN.DEVICE_AUGMENTATION=false"])



ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config", ["quick_simclr_synthetic",
                                    pytest.param("quick_simclr_multicrop", marks=pytest.mark.slow)])
def test_train_py_with_device_augmentation_on(tmp_path, config):
    """End to end on CPU: train.py with the host stage in the loader and the device stage in train_step."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"config=test/integration_test/{config}",
           "config.DATA.TRAIN.DEVICE_AUGMENTATION=on", f"config.CHECKPOINT.DIR={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert "DEVICE_AUGMENTATION: 'on'" in (tmp_path / "train_config.yaml").read_text()
