"""The host stage of the two-stage data path: decode, crops and flips to uint8 views, plus every random
parameter of the device stage (``config.DATA.TRAIN.DEVICE_AUGMENTATION``).

Only what needs the original image runs here, in the data-loader workers: decoding, ``RandomResizedCrop``,
``ImgPilToMultiCrop``, ``RandomHorizontalFlip`` (and the deterministic ``Resize`` / ``CenterCrop``). Each
view leaves as uint8 ``[3, H, W]`` (4x fewer bytes than float32 to pin and copy to the device); the colour
distortion, blur and normalisation run batched on the device (:mod:`scaleclr.data.device_augment`).

Same draws as the all-host path. :class:`HostStage` walks the TRANSFORMS list exactly like
:class:`scaleclr.data.transforms.SSLTransforms` (transform by transform, view by view) and calls the same
drawing code (``RandomResizedCrop.params_for_size``, ``draw`` of the flip, colour distortion, grayscale and
blur transforms) on the sample's generator, seeded by ``(SEED_VALUE, epoch, sample index)``. A view's crop
box, flip, jitter order and factors, grayscale coin and blur radius are therefore the very numbers the
host path draws for it, whichever path, worker count, world size or resume point.

Steps of one sample:

1. *plan* from the header only (``Image.open`` reads the size, no pixels): every crop box in original
   image coordinates, the flips, and the device parameters ``[V, P]``;
2. *decode*, at 1/2, 1/4 or 1/8 scale by JPEG DCT scaling (``PIL.Image.draft``) when every view's first
   step is a crop that keeps at least its output size per side at that scale (:func:`draft_scale`),
   converting to RGB exactly like the host path (:func:`scaleclr.data.decode.to_rgb`);
3. *execute* the geometry on uint8 tensors: crop = slicing, resize = ``torch.nn.functional.interpolate``
   (bilinear, antialiased, uint8: the same filter as Pillow's bilinear resize, within 1 uint8 level and
   ~2.8x faster), flip. A reduced decode resamples the crop box mapped to the small image with Pillow's
   sub-pixel ``resize(box=...)``. Views with a non-bilinear interpolation are resampled with Pillow, as on
   the host path.

Decode errors surface in step 2 (or in ``Image.open``) inside the dataset's skipping loader, so corrupt
files get the same warning and ``skipped`` count as on the host path.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from scaleclr.data.decode import to_rgb
from scaleclr.data.device_augment import TransformSplit, split_transforms
from scaleclr.data.transforms import (CenterCrop, ImgPilToMultiCrop, ImgReplicatePil, RandomHorizontalFlip,
                                      RandomResizedCrop, Resize)

DRAFT_SCALES = (8, 4, 2)  # JPEG DCT scaling factors libjpeg offers (besides 1)
_PIL_FILTERS = {InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
                InterpolationMode.NEAREST: Image.NEAREST}


class Step(NamedTuple):
    """One geometric step of a view: ``kind`` in ``crop`` (``args = (top, left, height, width)``, then resize
    to ``size``), ``resize`` (to ``size``), ``center_crop`` (to ``size``) or ``flip``."""

    kind: str
    args: tuple
    size: tuple[int, int]
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


class ViewPlan(NamedTuple):
    """The steps of one view and its current ``(height, width)``."""

    size: tuple[int, int]
    steps: tuple[Step, ...] = ()

    def then(self, step: Step) -> "ViewPlan":
        return ViewPlan(step.size, self.steps + (step,))


class Prepared(NamedTuple):
    """A planned and decoded sample: the RGB image (decoded at ``1/scale``), the view plans and the
    device parameters ``[V, P]``."""

    image: Image.Image
    scale: int
    plans: list[ViewPlan]
    params: torch.Tensor


def _resized_size(size: tuple[int, int], requested: Sequence[int]) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` (no ``max_size``): the shorter side to ``requested[0]``,
    or exactly ``[height, width]``."""
    h, w = size
    if len(requested) == 2:
        return int(requested[0]), int(requested[1])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(requested[0]), int(int(requested[0]) * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def draft_scale(plans: Sequence[ViewPlan], max_scale: int = DRAFT_SCALES[0]) -> int:
    """The largest JPEG reduction (1, 2, 4 or 8) at which every view's first step is a crop whose box still
    has at least the view's output size per side, i.e. the crop is never upsampled from the reduced image.
    1 when a view starts with anything else (it needs the full image)."""
    best = max_scale
    for plan in plans:
        if not plan.steps or plan.steps[0].kind != "crop":
            return 1
        step = plan.steps[0]
        _, _, h, w = step.args
        ratio = min(h / step.size[0], w / step.size[1])
        best = min(best, next((s for s in DRAFT_SCALES if s <= best and ratio >= s), 1))
        if best == 1:
            return 1
    return best


def decode_rgb(img: Image.Image, scale: int = 1) -> tuple[Image.Image, int]:
    """Decodes an opened (not yet loaded) image to RGB like the host path (:func:`scaleclr.data.decode.to_rgb`).

    With ``scale > 1`` and a JPEG, libjpeg decodes at ``1/scale`` by DCT scaling (``Image.draft``), giving
    ``ceil(W / scale) x ceil(H / scale)`` pixels where original pixel ``x`` maps to ``x / scale``.

    Returns:
        ``(RGB image, the scale actually used)`` (1 when the format cannot be drafted).

    Raises:
        OSError and the other ``DECODE_ERRORS`` of :mod:`scaleclr.data.dataset`, like ``load_rgb``.
    """
    used = 1
    if scale > 1 and img.format in ("JPEG", "MPO"):
        width, height = img.size
        drafted = img.draft("RGB", (width // scale, height // scale))
        if drafted is not None:
            used = int(round(width / drafted[1][2]))
    return to_rgb(img, getattr(img, "scaleclr_path", "")), used  # loads; exactly the host path's conversion


def _to_tensor(img: Image.Image, padded: bool = False) -> torch.Tensor:
    """RGB PIL image -> uint8 ``[3, H, W]``, a channels-last view of one copy of the pixels. With ``padded``
    ``[4, H, W]`` with a fourth filler channel: Pillow's own 4-byte pixel layout copies out twice as fast,
    and torch's uint8 antialiased resize runs as fast on 4 channels (the filler is dropped at the end)."""
    with warnings.catch_warnings():  # read-only buffer: the views below never write into it
        warnings.simplefilter("ignore", UserWarning)
        if padded:
            width, height = img.size
            return torch.from_numpy(np.frombuffer(img.tobytes("raw", "RGBX"), np.uint8).reshape(height, width, 4)
                                    ).permute(2, 0, 1)
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)


def _resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 ``[3, h, w]`` (torchvision's rule: no-op when the size is equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nnf.interpolate(x.unsqueeze(0), size=list(size), mode="bilinear", align_corners=False,
                           antialias=True).squeeze(0)


def _apply_tensor(step: Step, x: torch.Tensor) -> torch.Tensor:
    if step.kind == "crop":
        top, left, h, w = step.args
        return _resize_uint8(x[:, top:top + h, left:left + w], step.size)
    if step.kind == "resize":
        return _resize_uint8(x, step.size)
    if step.kind == "center_crop":
        return F.center_crop(x, list(step.size))
    return x.flip(-1)


def _apply_pil(step: Step, img: Image.Image) -> Image.Image:
    """The host path's own PIL ops (for views with a non-bilinear interpolation)."""
    if step.kind == "crop":
        return F.resized_crop(img, *step.args, list(step.size), step.interpolation, antialias=True)
    if step.kind == "resize":
        return F.resize(img, list(step.size), step.interpolation, antialias=True)
    if step.kind == "center_crop":
        return F.center_crop(img, list(step.size))
    return F.hflip(img)


class HostStage:
    """The host part of a TRANSFORMS list plus the parameter drawing of its device part.

    Args:
        split: from :func:`scaleclr.data.device_augment.split_transforms` (or use :meth:`from_specs`).
        allow_draft: use reduced-size JPEG decoding when the crops allow it.

    Shapes:
        ``load(source, idx, generator)`` then ``finish(prepared)`` (or ``__call__(img, generator)`` for an
        opened image) give ``(views, params)``: ``V`` uint8 tensors ``[3, H_v, W_v]`` and float32
        ``[V, P]`` (layout in :mod:`scaleclr.data.device_augment`).
    """

    def __init__(self, split: TransformSplit, allow_draft: bool = True):
        self.split = split
        self.host = split.host
        self.device = split.device
        self.width = split.width
        self.allow_draft = allow_draft

    @classmethod
    def from_specs(cls, specs: Sequence[Mapping[str, Any]], key: str = "config.DATA.TRAIN.TRANSFORMS",
                   allow_draft: bool = True) -> "HostStage":
        return cls(split_transforms(specs, key), allow_draft=allow_draft)

    @property
    def num_views(self) -> int:
        return math.prod(getattr(t, "num_outputs", 1) for t in self.host if getattr(t, "is_copy", False))

    # ------------------------------------------------------------------------------------- planning
    def plan(self, size: tuple[int, int], generator: torch.Generator) -> tuple[list[ViewPlan], torch.Tensor]:
        """Draws every random parameter of one sample, in the host path's order, from ``(height, width)``.

        Returns:
            ``(view plans, params [V, P])``.
        """
        items = [ViewPlan((int(size[0]), int(size[1])))]
        for t in self.host:
            if isinstance(t, ImgReplicatePil):
                items = [item for item in items for _ in range(t.num_times)]
            elif isinstance(t, ImgPilToMultiCrop):
                items = [self._crop(item, crop, generator) for item in items for crop in t.crops]
            elif isinstance(t, RandomResizedCrop):
                items = [self._crop(item, t, generator) for item in items]
            elif isinstance(t, RandomHorizontalFlip):
                items = [item.then(Step("flip", (), item.size)) if t.draw(generator) else item for item in items]
            elif isinstance(t, Resize):
                items = [item.then(Step("resize", (), _resized_size(item.size, t.size), t.interpolation))
                         for item in items]
            elif isinstance(t, CenterCrop):
                items = [item.then(Step("center_crop", (), (t.size[0], t.size[1]))) for item in items]
            else:  # split_transforms admits nothing else
                raise TypeError(f"{type(t).__name__} is not a host-stage transform")
        rows: list[list[float]] = [[] for _ in items]
        for transform, op in self.device:
            for row in rows:
                row.extend(op.encode(transform.draw(generator)) if op.width else ())
        return items, torch.tensor(rows, dtype=torch.float32).reshape(len(items), self.width)

    @staticmethod
    def _crop(item: ViewPlan, crop: RandomResizedCrop, generator: torch.Generator) -> ViewPlan:
        box = crop.params_for_size(item.size[0], item.size[1], generator)
        return item.then(Step("crop", box, (crop.size[0], crop.size[1]), crop.interpolation))

    # ------------------------------------------------------------------------------- decode + execute
    def prepare(self, img: Image.Image, generator: torch.Generator) -> Prepared:
        """Plans from the header of the opened ``img``, then decodes it (reduced when the plan allows).

        Raises:
            the decode errors of :func:`decode_rgb`.
        """
        width, height = img.size
        plans, params = self.plan((height, width), generator)
        scale = draft_scale(plans) if self.allow_draft else 1
        decoded, used = decode_rgb(img, scale)
        return Prepared(decoded, used, plans, params)

    def load(self, source: Any, idx: int, generator: torch.Generator) -> Prepared:
        """``prepare(source.open(idx), generator)``: what the dataset's skipping loader tries per index."""
        return self.prepare(source.open(idx), generator)

    def finish(self, prepared: Prepared) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Runs the view plans on the decoded image: ``(V uint8 [3, H_v, W_v] tensors, params [V, P])``."""
        img, scale = prepared.image, prepared.scale
        base: torch.Tensor | None = None
        views = []
        for plan in prepared.plans:
            steps = plan.steps
            if any(s.interpolation != InterpolationMode.BILINEAR for s in steps if s.kind in ("crop", "resize")):
                views.append(self._finish_pil(img, scale, steps))
                continue
            if scale > 1:
                x = _to_tensor(self._reduced_crop(img, scale, steps[0]))
                steps = steps[1:]
            else:
                base = _to_tensor(img, padded=True) if base is None else base
                x = base
            for step in steps:
                x = _apply_tensor(step, x)
            views.append(x[:3].contiguous())
        return views, prepared.params

    @staticmethod
    def _reduced_crop(img: Image.Image, scale: int, step: Step) -> Image.Image:
        """The first crop of a view on an image decoded at ``1/scale``: the box mapped by ``1/scale`` with
        sub-pixel precision, resampled by Pillow to the output size (never an upsampling)."""
        top, left, h, w = step.args
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        return img.resize((step.size[1], step.size[0]), _PIL_FILTERS[step.interpolation], box=box)

    def _finish_pil(self, img: Image.Image, scale: int, steps: tuple[Step, ...]) -> torch.Tensor:
        if scale > 1:
            img, steps = self._reduced_crop(img, scale, steps[0]), steps[1:]
        for step in steps:
            img = _apply_pil(step, img)
        return _to_tensor(img).contiguous()

    def __call__(self, img: Image.Image, generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Plan, decode and execute for an opened (or already decoded) image."""
        return self.finish(self.prepare(img, generator))

    def __repr__(self) -> str:
        return (f"HostStage(host={[type(t).__name__ for t in self.host]}, "
                f"device params={self.split.columns()})")


def build_two_stage(specs: Sequence[Mapping[str, Any]], key: str = "config.DATA.TRAIN.TRANSFORMS",
                    allow_draft: bool = True):
    """``(HostStage, DeviceAugmentation)`` for one TRANSFORMS list (one split, shared)."""
    from scaleclr.data.device_augment import DeviceAugmentation

    split = split_transforms(specs, key)
    return HostStage(split, allow_draft=allow_draft), DeviceAugmentation(split)
