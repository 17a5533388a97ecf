"""VISSL's SimCLR augmentations, driven by an explicit per-sample random generator.

SimCLR (Chen et al. 2020, arXiv 2002.05709, Sec. 3 and Appendix A) draws two independent views of every
image with "random cropping followed by resize back to the original size, random color distortions, and
random Gaussian blur". The classes below reproduce VISSL's transform names and parameters
(``config.DATA.TRAIN.TRANSFORMS``; spec sections 7.2-7.4) with one difference: every random decision is
drawn from a ``torch.Generator`` passed to ``__call__``, never from the global torch/numpy/python RNG.
The dataset seeds that generator from ``(SEED_VALUE, epoch, sample index)`` (:func:`sample_generator`),
so a sample's views do not depend on the number of data workers, the world size or the resume point.

Every transform is a callable ``t(x, generator)``. "Copy" transforms (``ImgReplicatePil``,
``ImgPilToMultiCrop``; ``is_copy = True``) return a list of outputs; :class:`SSLTransforms` flattens them
and applies every other transform independently to each element, like VISSL's ``SSLTransformsWrapper``.
The random transforms separate drawing from applying (``draw(generator)`` / ``apply(img, params)``,
``RandomResizedCrop.params_for_size``), so the two-stage data path (``scaleclr.data.host_stage``) draws
exactly the numbers this path draws, in the same order, and applies them elsewhere.
"""
from __future__ import annotations

import difflib
import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


# ------------------------------------------------------------------------------------------- seeding
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Mixes ``(seed, epoch, index)`` into one 63-bit seed with numpy's ``SeedSequence`` hash.

    Neighbouring triples (index 7 vs 8, epoch 0 vs 1) give unrelated seeds, unlike ``seed + index``.

    Raises:
        ValueError: if any of the three is negative.
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got seed={seed} epoch={epoch} "
                         f"index={index} (config.SEED_VALUE must be non-negative)")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Returns a CPU ``torch.Generator`` seeded by :func:`sample_seed` ``(seed, epoch, index)``."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator


_SCRATCH = threading.local()


def _rand01(generator: torch.Generator) -> float:
    """One U[0, 1) float64 draw: the value and generator state of ``torch.rand((), dtype=float64)`` (which
    is ``uniform_(0, 1)`` on a new tensor), into a reused per-thread scalar (about half the overhead)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = torch.empty((), dtype=torch.float64)
    return buf.uniform_(0.0, 1.0, generator=generator).item()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * _rand01(generator)


def _coin(generator: torch.Generator, p: float) -> bool:
    return _rand01(generator) < p


def _size_pair(size: int | Sequence[int], name: str) -> list[int]:
    pair = [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or [height, width], got {size!r}")
    return pair


def _interpolation(value: str | InterpolationMode) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    if str(value).lower() not in _INTERPOLATIONS:
        raise ValueError(f"interpolation={value!r}; allowed: {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[str(value).lower()]


def _check_probability(p: float, name: str = "p") -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name}={p} must lie in [0, 1]")
    return float(p)


def _check_finite(name: str, values: Sequence[float]) -> None:
    """NaN and inf pass every ``<`` / ``<=`` test written for finite numbers: refuse them first."""
    if not all(math.isfinite(float(v)) for v in values):
        raise ValueError(f"{name}={list(values)} must be finite numbers (no nan / inf)")


# ------------------------------------------------------------------------------------ copy transforms
class ImgReplicatePil:
    """Returns ``num_times`` references to the input image (VISSL ``img_replicate_pil.py``).

    The later transforms never modify an image in place, so sharing the object is safe.
    """

    is_copy = True

    def __init__(self, num_times: int = 2):
        if int(num_times) < 1:
            raise ValueError(f"num_times={num_times} must be >= 1")
        self.num_times = int(num_times)
        self.num_outputs = self.num_times

    def __call__(self, img: Any, generator: torch.Generator) -> list:
        return [img] * self.num_times

    def __repr__(self) -> str:
        return f"ImgReplicatePil(num_times={self.num_times})"


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` (area fraction U(scale), log-uniform aspect ratio, 10 attempts
    then a centre-crop fallback, resize to ``size``) with draws from the passed generator.

    Args:
        size: output side, or ``[height, width]``.
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (width / height).
        interpolation: ``"bilinear"`` (torchvision's default), ``"bicubic"`` or ``"nearest"``.
    """

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), interpolation: str = "bilinear"):
        self.size = _size_pair(size, "size")
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        _check_finite("scale", self.scale)
        _check_finite("ratio", self.ratio)
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale={list(scale)} must be [low, high] with 0 < low <= high <= 1 (fractions of the "
                             "image's area)")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={list(ratio)} must be [low, high] with 0 < low <= high")
        self.interpolation = _interpolation(interpolation)

    def get_params(self, img: Any, generator: torch.Generator) -> tuple[int, int, int, int]:
        """Draws the crop box ``(top, left, height, width)`` exactly like torchvision does."""
        _, height, width = F.get_dimensions(img)
        return self.params_for_size(height, width, generator)

    def params_for_size(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """:meth:`get_params` for an image of ``height x width`` pixels, without the pixels (the two-stage
        host stage draws every crop box from the header size before it decodes)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(generator, *self.scale)
            aspect_ratio = math.exp(_uniform(generator, *log_ratio))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        top, left, h, w = self.get_params(img, generator)
        return F.resized_crop(img, top, left, h, w, self.size, self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class ImgPilToMultiCrop:
    """Multi-crop (Caron et al. 2020, arXiv 2006.09882) as VISSL's ``img_pil_to_multicrop.py``.

    Builds ``num_crops[k]`` ``RandomResizedCrop(size_crops[k], scale=crop_scales[k])`` per group ``k`` and
    returns one crop per transform, in group order (e.g. 2x160 then 4x96).

    Args:
        total_num_crops: must equal ``sum(num_crops)``.
        size_crops: output side of each group.
        num_crops: number of crops of each group.
        crop_scales: ``[low, high]`` area-fraction range of each group.
    """

    is_copy = True

    def __init__(self, total_num_crops: int, size_crops: Sequence[int], num_crops: Sequence[int],
                 crop_scales: Sequence[Sequence[float]]):
        size_crops, num_crops, crop_scales = list(size_crops), list(num_crops), list(crop_scales)
        if not len(size_crops) == len(num_crops) == len(crop_scales):
            raise ValueError(f"size_crops, num_crops and crop_scales need one entry per crop group, got "
                             f"{len(size_crops)}, {len(num_crops)} and {len(crop_scales)} entries")
        if int(total_num_crops) != sum(int(n) for n in num_crops):
            raise ValueError(f"total_num_crops={total_num_crops} must equal sum(num_crops)="
                             f"{sum(int(n) for n in num_crops)} (num_crops={num_crops})")
        if any(int(n) < 1 for n in num_crops):
            raise ValueError(f"num_crops={num_crops}: every group needs at least one crop")
        self.total_num_crops = self.num_outputs = int(total_num_crops)
        self.crops = [RandomResizedCrop(size, scale=tuple(scale))
                      for size, n, scale in zip(size_crops, num_crops, crop_scales) for _ in range(int(n))]

    def __call__(self, img: Any, generator: torch.Generator) -> list:
        return [crop(img, generator) for crop in self.crops]

    def __repr__(self) -> str:
        return f"ImgPilToMultiCrop({self.crops})"


# ---------------------------------------------------------------------------------- pixel transforms
class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = _check_probability(p)

    def draw(self, generator: torch.Generator) -> bool:
        """Whether to mirror (one draw)."""
        return _coin(generator, self.p)

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        return F.hflip(img) if self.draw(generator) else img


class ColorJitter:
    """torchvision's ``ColorJitter``: the four adjustments in a random order, each factor drawn from
    ``U[max(0, 1 - x), 1 + x]`` (hue shift from ``U[-hue, hue]``); a zero strength skips that op."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0):
        _check_finite("brightness, contrast, saturation, hue", (brightness, contrast, saturation, hue))
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if float(value) < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if not 0.0 <= float(hue) <= 0.5:
            raise ValueError(f"hue={hue} must lie in [0, 0.5]")
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def draw(self, generator: torch.Generator) -> tuple[list[int], list[float | None]]:
        """Draws ``(order, factors)``: a permutation of the op ids 0..3 (brightness, contrast, saturation,
        hue), then one factor per op with a non-zero strength (``None`` for the others), in that order."""
        order = torch.randperm(4, generator=generator).tolist()
        factors = [_uniform(generator, max(0.0, 1.0 - x), 1.0 + x) if x > 0 else None
                   for x in (self.brightness, self.contrast, self.saturation)]
        factors.append(_uniform(generator, -self.hue, self.hue) if self.hue > 0 else None)
        return order, factors

    @staticmethod
    def apply(img: Any, params: tuple[list[int], list[float | None]]) -> Any:
        """Applies the drawn ``(order, factors)`` with torchvision's functional ops (PIL or tensor)."""
        order, factors = params
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op_id in order:
            if factors[op_id] is not None:
                img = ops[op_id](img, factors[op_id])
        return img

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        return self.apply(img, self.draw(generator))


class RandomGrayscale:
    """Converts to 3-channel grayscale with probability ``p``."""

    def __init__(self, p: float = 0.1):
        self.p = _check_probability(p)

    def draw(self, generator: torch.Generator) -> bool:
        """Whether to convert (one draw)."""
        return _coin(generator, self.p)

    @staticmethod
    def apply(img: Any, gray: bool) -> Any:
        return F.rgb_to_grayscale(img, num_output_channels=3) if gray else img

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        return self.apply(img, self.draw(generator))


class ImgPilColorDistortion:
    """SimCLR's colour distortion (arXiv 2002.05709, Appendix A, "color_distort"), VISSL
    ``img_pil_color_distortion.py``: with p 0.8 ``ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)``, then
    ``RandomGrayscale(p=0.2)``.

    Args:
        strength: the colour distortion strength ``s`` (1.0 for ImageNet); at most 2.5 (hue <= 0.5).
    """

    def __init__(self, strength: float = 1.0):
        s = float(strength)
        if not 0.0 <= s <= 2.5:
            raise ValueError(f"strength={strength} must lie in [0, 2.5] (hue jitter 0.2*strength <= 0.5)")
        self.strength = s
        self.jitter = ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.grayscale = RandomGrayscale(p=0.2)

    def draw(self, generator: torch.Generator) -> tuple[tuple | None, bool]:
        """Draws ``(jitter params or None, gray)``: the p 0.8 coin, the jitter's ``(order, factors)`` only
        when it comes up, then the grayscale coin."""
        jitter = self.jitter.draw(generator) if _coin(generator, 0.8) else None
        return jitter, self.grayscale.draw(generator)

    def apply(self, img: Any, params: tuple[tuple | None, bool]) -> Any:
        jitter, gray = params
        if jitter is not None:
            img = self.jitter.apply(img, jitter)
        return self.grayscale.apply(img, gray)

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        return self.apply(img, self.draw(generator))

    def __repr__(self) -> str:
        return f"ImgPilColorDistortion(strength={self.strength})"


class ImgPilGaussianBlur:
    """PIL Gaussian blur with radius ~ U(radius_min, radius_max), applied with probability ``p``
    (VISSL ``img_pil_gaussian_blur.py``; SimCLR blurs with sigma in [0.1, 2.0], arXiv 2002.05709 App. A).
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p = _check_probability(p)
        _check_finite("radius_min, radius_max", (radius_min, radius_max))
        if not 0.0 <= float(radius_min) <= float(radius_max):
            raise ValueError(f"need 0 <= radius_min <= radius_max, got radius_min={radius_min} "
                             f"radius_max={radius_max}")
        self.radius_min, self.radius_max = float(radius_min), float(radius_max)

    def draw(self, generator: torch.Generator) -> float | None:
        """Draws the radius, or ``None`` when the p coin says no blur (then no radius is drawn)."""
        if not _coin(generator, self.p):
            return None
        return _uniform(generator, self.radius_min, self.radius_max)

    @staticmethod
    def apply(img: Any, radius: float | None) -> Any:
        if radius is None:
            return img
        if not isinstance(img, Image.Image):
            raise TypeError("ImgPilGaussianBlur needs a PIL image: place it before ToTensor in "
                            "config.DATA.TRAIN.TRANSFORMS")
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __call__(self, img: Any, generator: torch.Generator) -> Any:
        return self.apply(img, self.draw(generator))


# ----------------------------------------------------------------------------- deterministic transforms
class ToTensor:
    """PIL image -> float tensor in [0, 1], shape ``[3, H, W]``."""

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.to_tensor(img)


class Normalize:
    """Per-channel ``(x - mean) / std`` on a ``[3, H, W]`` tensor (ImageNet statistics by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        _check_finite("mean, std", self.mean + self.std)
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean} and std={self.std} need equal lengths and std > 0")

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return F.normalize(img, self.mean, self.std)


class Resize:
    """Resizes the shorter side to ``size`` (int) or to exactly ``[height, width]``."""

    def __init__(self, size: int | Sequence[int], interpolation: str = "bilinear"):
        self.size = [int(size)] if isinstance(size, (int, np.integer)) else _size_pair(size, "size")
        if self.size[0] <= 0:
            raise ValueError(f"size={size} must be positive")
        self.interpolation = _interpolation(interpolation)

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        return F.resize(img, self.size, self.interpolation, antialias=True)


class CenterCrop:
    """Crops the centre ``size`` x ``size`` (or ``[height, width]``) region."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size_pair(size, "size")

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> Any:
        return F.center_crop(img, self.size)


TRANSFORMS: dict[str, type] = {cls.__name__: cls for cls in (
    ImgReplicatePil, ImgPilToMultiCrop, RandomResizedCrop, RandomHorizontalFlip, ImgPilColorDistortion,
    ImgPilGaussianBlur, ColorJitter, RandomGrayscale, ToTensor, Normalize, Resize, CenterCrop)}


# ------------------------------------------------------------------------------------------ pipeline
class SSLTransforms:
    """An ordered transform list with VISSL ``SSLTransformsWrapper`` semantics.

    The input starts as a one-element list; a copy transform replaces each element by its outputs (the
    list is flattened), any other transform maps each element independently. One generator is consumed
    in a fixed order (transform by transform, element by element), so the output is a function of the
    image and the generator seed only.

    Shapes:
        ``SimCLR``: ``[PIL] -> [view0, view1]``, each ``[3, H, W]`` after ``ToTensor``.
        Multi-crop: ``[PIL] -> [crop_0, ..., crop_{C-1}]``, crop ``c`` shaped ``[3, H_c, W_c]``.
    """

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    @property
    def num_views(self) -> int:
        """Number of outputs per image (product of the copy transforms' output counts)."""
        return math.prod(getattr(t, "num_outputs", 1) for t in self.transforms if getattr(t, "is_copy", False))

    def __call__(self, img: Any, generator: torch.Generator) -> list:
        items = [img]
        for transform in self.transforms:
            if getattr(transform, "is_copy", False):
                items = [out for item in items for out in transform(item, generator)]
            else:
                items = [transform(item, generator) for item in items]
        return items

    def __repr__(self) -> str:
        return "SSLTransforms([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _plain(value: Any) -> Any:
    """Converts OmegaConf containers (or any Mapping/Sequence) into dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_transform(spec: Mapping[str, Any], key: str = "transform") -> Any:
    """Builds one transform from a VISSL-style dict ``{"name": "RandomResizedCrop", "size": 224}``.

    Raises:
        ValueError: naming ``key``, the transform and the bad parameter (with the allowed ones).
    """
    spec = _plain(spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{key}={spec!r} must be a mapping with a 'name' entry, e.g. "
                         "{name: RandomResizedCrop, size: 224}")
    params = dict(spec)
    name = params.pop("name")
    if name not in TRANSFORMS:
        raise ValueError(f"{key}.name={name!r} is not a known transform{_suggest(str(name), TRANSFORMS)}; "
                         f"allowed: {sorted(TRANSFORMS)}")
    cls = TRANSFORMS[name]
    named = {p: v for p, v in inspect.signature(cls.__init__).parameters.items()
             if p != "self" and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
    allowed = list(named)
    for param in params:
        if param not in allowed:
            raise ValueError(f"{key} ({name}): unknown parameter {param!r}{_suggest(param, allowed)}; "
                             f"allowed keys: {allowed or 'none'}")
    missing = [p for p, v in named.items() if v.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"{key} ({name}): missing required parameter(s) {missing}; allowed keys: {allowed}")
    try:
        return cls(**params)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key} ({name}): {e}") from e


def build_transforms(specs: Sequence[Mapping[str, Any]],
                     key: str = "config.DATA.TRAIN.TRANSFORMS") -> SSLTransforms:
    """Builds the pipeline for a VISSL ``TRANSFORMS`` list (spec 1.1 and 7.3).

    Args:
        specs: list of dicts, each ``{"name": <transform>, <param>: <value>, ...}``.
        key: config key used in error messages.

    Raises:
        ValueError: unknown transform name or parameter, or an invalid value (the message names
            ``key[i]``, the transform, the bad key and the allowed keys).
    """
    specs = _plain(specs)
    if not isinstance(specs, list):
        raise ValueError(f"{key} must be a list of transform dicts, got {specs!r}")
    return SSLTransforms([build_transform(spec, f"{key}[{i}]") for i, spec in enumerate(specs)])


def eval_transform_specs(crop_size: int, resize_size: int | None = None,
                         mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> list[dict[str, Any]]:
    """The deterministic evaluation pipeline: Resize(shorter side) -> CenterCrop -> ToTensor -> Normalize.

    Args:
        crop_size: side of the evaluated crop (224 for ImageNet, 32 for the demo data).
        resize_size: shorter side before cropping; defaults to ``round(crop_size * 256 / 224)``, the
            ImageNet linear-eval ratio (spec 1.3).
    """
    resize_size = round(crop_size * 256 / 224) if resize_size is None else resize_size
    return [{"name": "Resize", "size": int(resize_size)}, {"name": "CenterCrop", "size": int(crop_size)},
            {"name": "ToTensor"}, {"name": "Normalize", "mean": list(mean), "std": list(std)}]
