"""The device stage of the two-stage data path: SimCLR's colour distortion, blur and normalisation on whole
batches, after the host-to-device copy (``config.DATA.TRAIN.DEVICE_AUGMENTATION``).

SimCLR (Chen et al. 2020, arXiv 2002.05709, Sec. 3 and Appendix A) draws each view's crop, flip, colour
distortion and blur independently. The host stage (:mod:`scaleclr.data.host_stage`) decodes, crops and
flips, outputs uint8 views, and draws every random parameter of the remaining transforms from the sample's
generator in exactly the order the all-host path (:class:`scaleclr.data.transforms.SSLTransforms`) draws
them; those parameters travel with the batch as one small float32 tensor. This module applies them: for a
fixed parameter row it computes what torchvision's tensor functional ops compute
(:mod:`scaleclr.data.device_ops`), vectorised over the batch, on CPU or CUDA with the same code and no
Python loop over samples.

Parameter layout (one row per view, float32). The columns are the blocks of the device transforms,
concatenated in config order (:func:`param_columns` names them):

====================== ===== ===========================================================================
transform              width columns
====================== ===== ===========================================================================
ImgPilColorDistortion  10    jitter_applied, order_0..order_3, brightness, contrast, saturation, hue, gray
ColorJitter            9     jitter_applied (always 1), order_0..order_3, brightness, contrast,
                             saturation, hue
RandomGrayscale        1     gray
ImgPilGaussianBlur     2     blur_applied, sigma (Pillow's radius)
ToTensor, Normalize    0     (deterministic)
====================== ===== ===========================================================================

``order_k`` is the id (0 brightness, 1 contrast, 2 saturation, 3 hue) of the k-th op of torchvision's
random order; factors that were not drawn (jitter not applied, zero strength) hold the identity (1, 1, 1,
0), the blur radius 0. VISSL's SimCLR recipe (``ImgPilColorDistortion`` + ``ImgPilGaussianBlur``) gives 12
columns: ``[jitter_applied, order_0, order_1, order_2, order_3, brightness, contrast, saturation, hue,
gray, blur_applied, sigma]``.

Batch layout: ``simclr_collator`` gives ``data`` uint8 ``[V*B, 3, H, W]`` and ``aug_params``
``[V*B, P]`` (row ``v*B + i`` = view ``v`` of image ``i``); ``multicrop_collator`` gives lists of ``C``
tensors ``[B, 3, H_c, W_c]`` and ``[B, P]``. :class:`DeviceAugmentation` returns float32 views in the same
layout.

The random order is applied as at most 16 groups (position k x op j): each group gathers the samples whose
k-th op is j, applies the op with their factors, and scatters them back, so every sample sees its own
order and no op runs twice on a sample. The group indices are built on the host from the parameters as the
data loader delivered them (``params_host``; the trainer passes that CPU tensor along with the device copy),
so the stage never reads a device value back: no host synchronisation. The host part is a separate step,
:meth:`DeviceAugmentation.plan` (group indices of every op, copied to the device in ONE copy from pinned memory
when the device is CUDA, and the blur's kernel width from the host radii), and :meth:`DeviceAugmentation.apply`
does only device work with that plan (what tests/test_fake_cuda.py traces on fake CUDA).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from scaleclr.data import device_ops as ops
from scaleclr.data.transforms import (ColorJitter, ImgPilColorDistortion, ImgPilGaussianBlur, Normalize,
                                      RandomGrayscale, ToTensor, _plain, build_transform)

SETTINGS = ("auto", "on", "off")
SETTING_KEY = "config.DATA.TRAIN.DEVICE_AUGMENTATION"

# Transforms the host stage runs (they need the original image); everything else must have a device op.
HOST_TRANSFORMS = ("ImgReplicatePil", "ImgPilToMultiCrop", "RandomResizedCrop", "RandomHorizontalFlip",
                   "Resize", "CenterCrop")


def resolve_device_augmentation(setting: str, device: torch.device | str) -> bool:
    """``config.DATA.TRAIN.DEVICE_AUGMENTATION`` -> whether the two-stage path is used.

    ``auto`` is on exactly when training runs on CUDA; ``on`` also works on CPU (the device stage then
    runs in the training process, after collation).

    Raises:
        ValueError: ``setting`` is not one of ``auto``, ``on``, ``off``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"{SETTING_KEY}={setting!r} is not allowed; allowed values: {', '.join(SETTINGS)}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


# -------------------------------------------------------------------------------------- group indices
class HostPlan:
    """The host-side part of one device-stage call: the row indices of every group of every op (one flat CPU
    int64 tensor and the group sizes) and each op's host-derived settings (``info``, e.g. the blur's kernel
    width). :meth:`to` moves the indices to the device in one copy."""

    def __init__(self, masks: list[list[torch.Tensor]], infos: list[Any]):
        idx = [[m.nonzero().squeeze(1) for m in op_masks] for op_masks in masks]
        self.counts = [[int(i.numel()) for i in op_idx] for op_idx in idx]
        flat = [i for op_idx in idx for i in op_idx]
        self.flat = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.int64)
        self.infos = infos

    def to(self, device: torch.device | str) -> "DevicePlan":
        """One host-to-device copy of all indices; from page-locked memory when ``device`` is CUDA (an
        asynchronous copy needs a pinned source; the caching host allocator keeps it alive until the copy ran)."""
        device = torch.device(device)
        flat = self.flat
        if flat.numel() and device.type == "cuda" and torch.cuda.is_available():
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=flat.is_pinned()) if flat.numel() else None
        groups, start = [], 0
        for op_counts in self.counts:
            op_groups = []
            for n in op_counts:
                op_groups.append(flat[start:start + n] if n else None)
                start += n
            groups.append(op_groups)
        return DevicePlan(groups, self.infos)


class DevicePlan:
    """:class:`HostPlan` on the device: ``groups[op][g]`` (row indices of group ``g`` of op ``op``, or ``None`` for
    an empty group) and ``infos[op]``."""

    def __init__(self, groups: list[list[torch.Tensor | None]], infos: list[Any]):
        self.groups, self.infos = groups, infos


# -------------------------------------------------------------------------------------------- device ops
class DeviceOp:
    """One device transform: ``width`` parameter columns, ``encode`` (host: drawn parameters -> column
    values), ``plan`` (host: its columns as the loader made them -> bool masks of the sample groups it
    treats alike, and any host-derived setting) and ``__call__`` (device: ``x [N, 3, H, W]`` float, its
    columns on the device, the groups' row indices on the device and the setting -> ``x``)."""

    width = 0
    columns: tuple[str, ...] = ()

    def encode(self, drawn: Any) -> list[float]:
        return []

    def plan(self, cols_host: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        return [], None

    def __call__(self, x: torch.Tensor, cols: torch.Tensor, groups: list[torch.Tensor | None], info: Any
                 ) -> torch.Tensor:
        return x


class ToTensorOp(DeviceOp):
    """``ToTensor``: the uint8 -> [0, 1] scaling, done once on entry of the device stage (see
    :meth:`DeviceAugmentation.__call__`)."""


class NormalizeOp(DeviceOp):
    """``Normalize(mean, std)``."""

    def __init__(self, transform: Normalize):
        self.mean, self.std = transform.mean, transform.std
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x, cols, groups, info):
        if x.device not in self._cache:
            self._cache[x.device] = (torch.tensor(self.mean, device=x.device), torch.tensor(self.std, device=x.device))
        return ops.normalize(x, *self._cache[x.device])


_JITTER_FNS = (ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation, ops.adjust_hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


class JitterOp(DeviceOp):
    """``ColorJitter`` with torchvision's random order per sample (9 columns)."""

    width = 9
    columns = ("jitter_applied", "order_0", "order_1", "order_2", "order_3", "brightness", "contrast",
               "saturation", "hue")

    def __init__(self, transform: ColorJitter):
        strengths = (transform.brightness, transform.contrast, transform.saturation, transform.hue)
        self.active = [j for j, s in enumerate(strengths) if s > 0]  # zero strength: never drawn, skipped
        self.pairs = [(k, j) for k in range(4) for j in self.active]  # (position in the order, op) groups

    def encode(self, drawn: tuple[list[int], list[float | None]] | None) -> list[float]:
        if drawn is None:
            return [0.0, 0.0, 1.0, 2.0, 3.0, *_IDENTITY]
        order, factors = drawn
        return [1.0, *map(float, order), *(d if f is None else float(f) for f, d in zip(factors, _IDENTITY))]

    def plan(self, cols_host):
        applied = cols_host[:, 0] > 0.5
        order = cols_host[:, 1:5].round().to(torch.int64)
        return [applied & (order[:, k] == j) for k, j in self.pairs], None

    def __call__(self, x, cols, groups, info):
        for (k, j), idx in zip(self.pairs, groups):
            if idx is not None:
                factor = cols[:, 5 + j].index_select(0, idx)
                x.index_copy_(0, idx, _JITTER_FNS[j](x.index_select(0, idx), factor))
        return x


class GrayscaleOp(DeviceOp):
    """``RandomGrayscale``: 3-channel luma where the drawn coin says so (1 column)."""

    width = 1
    columns = ("gray",)

    def encode(self, drawn: bool) -> list[float]:
        return [1.0 if drawn else 0.0]

    def plan(self, cols_host):
        return [cols_host[:, 0] > 0.5], None

    def __call__(self, x, cols, groups, info):
        (idx,) = groups
        if idx is not None:
            x.index_copy_(0, idx, ops.grayscale3(x.index_select(0, idx)))
        return x


class ColorDistortionOp(DeviceOp):
    """``ImgPilColorDistortion(strength)``: the p 0.8 jitter block, then the grayscale block (10 columns)."""

    width = 10
    columns = JitterOp.columns + GrayscaleOp.columns

    def __init__(self, transform: ImgPilColorDistortion):
        self.jitter, self.gray = JitterOp(transform.jitter), GrayscaleOp()

    def encode(self, drawn: tuple[tuple | None, bool]) -> list[float]:
        jitter, gray = drawn
        return self.jitter.encode(jitter) + self.gray.encode(gray)

    def plan(self, cols_host):
        jitter, _ = self.jitter.plan(cols_host[:, :9])
        gray, _ = self.gray.plan(cols_host[:, 9:])
        return jitter + gray, None

    def __call__(self, x, cols, groups, info):
        x = self.jitter(x, cols[:, :9], groups[:-1], None)
        return self.gray(x, cols[:, 9:], groups[-1:], None)


class BlurOp(DeviceOp):
    """``ImgPilGaussianBlur``: Pillow's extended-box Gaussian with each sample's radius (2 columns)."""

    width = 2
    columns = ("blur_applied", "sigma")

    def encode(self, drawn: float | None) -> list[float]:
        return [0.0, 0.0] if drawn is None else [1.0, float(drawn)]

    def plan(self, cols_host):
        """The blurred samples, and the kernel half-width their host radii need (no device value is read)."""
        applied = cols_host[:, 0] > 0.5
        return [applied], ops.kernel_half_width(cols_host[applied, 1])

    def __call__(self, x, cols, groups, info):
        (idx,) = groups
        if idx is not None:
            x.index_copy_(0, idx, ops.pil_gaussian_blur(x.index_select(0, idx), cols[:, 1].index_select(0, idx),
                                                        half=info))
        return x


DEVICE_OPS: dict[type, Callable[[Any], DeviceOp]] = {
    ImgPilColorDistortion: ColorDistortionOp,
    ColorJitter: JitterOp,
    RandomGrayscale: lambda t: GrayscaleOp(),
    ImgPilGaussianBlur: lambda t: BlurOp(),
    ToTensor: lambda t: ToTensorOp(),
    Normalize: NormalizeOp,
}


# ---------------------------------------------------------------------------------------------- split
class TransformSplit:
    """A TRANSFORMS list split into the host part (built transforms, in order) and the device part
    (``(transform, DeviceOp)`` pairs, in order; the transform's ``draw`` makes the parameters that the op's
    ``encode`` stores)."""

    def __init__(self, host: list, device: list[tuple[Any, DeviceOp]]):
        self.host, self.device = host, device
        self.width = sum(op.width for _, op in device)

    def columns(self) -> list[str]:
        return [name for _, op in self.device for name in op.columns]


def split_transforms(specs: Sequence[Mapping[str, Any]], key: str = "config.DATA.TRAIN.TRANSFORMS"
                     ) -> TransformSplit:
    """Splits a VISSL TRANSFORMS list into the host stage (decode-time geometry) and the device stage.

    Rules: every host transform (``HOST_TRANSFORMS``) must come before every device transform; the device
    part needs exactly one ``ToTensor``, with ``Normalize`` after it and ``ImgPilGaussianBlur`` before it
    (the all-host path refuses those orders too).

    Raises:
        ValueError: naming ``key[i]`` and the transform, for a transform without a device implementation,
            a host transform after a device one, or a misplaced ``ToTensor`` / ``Normalize`` / blur; the
            message says what is allowed and that ``config.DATA.TRAIN.DEVICE_AUGMENTATION=off`` runs any
            list on the host.
    """
    specs = _plain(specs)
    if not isinstance(specs, list):
        raise ValueError(f"{key} must be a list of transform dicts, got {specs!r}")
    off = f"or set {SETTING_KEY}=off to run the whole list on the host"
    host: list = []
    device: list[tuple[Any, DeviceOp]] = []
    first_device: str | None = None
    to_tensor_at: str | None = None
    for i, spec in enumerate(specs):
        k = f"{key}[{i}]"
        transform = build_transform(spec, k)
        name = type(transform).__name__
        if name in HOST_TRANSFORMS:
            if first_device is not None:
                raise ValueError(f"{k} ({name}) is a host-stage transform after the device-stage transform "
                                 f"{first_device}: with device augmentation the crops and flips run before "
                                 f"the colour ops, so move {name} before it, {off}")
            host.append(transform)
            continue
        factory = next((f for cls, f in DEVICE_OPS.items() if type(transform) is cls), None)
        if factory is None:
            raise ValueError(f"{k} ({name}) has no device implementation; device-stage transforms: "
                             f"{sorted(c.__name__ for c in DEVICE_OPS)}, host-stage transforms: "
                             f"{list(HOST_TRANSFORMS)}; remove it {off}")
        if isinstance(transform, ToTensor):
            if to_tensor_at is not None:
                raise ValueError(f"{k} (ToTensor) repeats {to_tensor_at}; the device stage converts once")
            to_tensor_at = f"{k} (ToTensor)"
        elif isinstance(transform, Normalize) and to_tensor_at is None:
            raise ValueError(f"{k} (Normalize) comes before ToTensor; put ToTensor first")
        elif isinstance(transform, ImgPilGaussianBlur) and to_tensor_at is not None:
            raise ValueError(f"{k} (ImgPilGaussianBlur) comes after {to_tensor_at}; the blur works on images, "
                             "put it before ToTensor (the host path refuses this order too)")
        first_device = first_device or f"{k} ({name})"
        device.append((transform, factory(transform)))
    if to_tensor_at is None:
        raise ValueError(f"{key} has no ToTensor; the device stage needs one (after the colour ops and blur, "
                         f"before Normalize), {off}")
    return TransformSplit(host, device)


def param_columns(specs: Sequence[Mapping[str, Any]], key: str = "config.DATA.TRAIN.TRANSFORMS") -> list[str]:
    """Names of the ``aug_params`` columns for a TRANSFORMS list (see the module docstring)."""
    return split_transforms(specs, key).columns()


# ------------------------------------------------------------------------------------- device stage
class DeviceAugmentation:
    """Applies the device part of a TRANSFORMS list to a batch of uint8 views and their parameters.

    Args:
        split: from :func:`split_transforms` (or use :meth:`from_specs`).

    ``__call__(data, params, params_host=None) -> views``: ``data`` uint8 ``[N, 3, H, W]`` with ``params``
    ``[N, P]``, or lists of such tensors (multi-crop; crops of equal shape are processed together); returns
    float32 views in the same layout. ``params_host``: the same parameters on the CPU (what the loader made);
    without it, device parameters are copied to the host once (a synchronisation). Inputs are not modified.
    For one batch ``[N, 3, H, W]`` it is ``apply(data, params, plan(params_host).to(data.device))``.
    """

    def __init__(self, split: TransformSplit):
        self.ops = [op for _, op in split.device]
        self.width = split.width
        self.columns = split.columns()
        self._slices, start = [], 0
        for op in self.ops:
            self._slices.append(slice(start, start + op.width))
            start += op.width

    @classmethod
    def from_specs(cls, specs: Sequence[Mapping[str, Any]], key: str = "config.DATA.TRAIN.TRANSFORMS"
                   ) -> "DeviceAugmentation":
        return cls(split_transforms(specs, key))

    def __call__(self, data: torch.Tensor | list[torch.Tensor], params: torch.Tensor | list[torch.Tensor],
                 params_host: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(data, (list, tuple)):
            if not isinstance(params, (list, tuple)) or len(params) != len(data):
                raise ValueError(f"multi-crop data has {len(data)} crops; aug_params must be a list of as many "
                                 f"[B, {self.width}] tensors")
            return self._multicrop(list(data), list(params), None if params_host is None else list(params_host))
        return self._augment(data, params, params_host)

    def _multicrop(self, data: list[torch.Tensor], params: list[torch.Tensor],
                   params_host: list[torch.Tensor] | None) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        start = 0
        while start < len(data):  # consecutive crops of one shape: one batch
            end = start + 1
            while end < len(data) and data[end].shape == data[start].shape:
                end += 1
            host = None if params_host is None else torch.cat(params_host[start:end])
            views = self._augment(torch.cat(data[start:end]), torch.cat(params[start:end]), host)
            out.extend(views.split([d.shape[0] for d in data[start:end]]))
            start = end
        return out

    def _augment(self, data: torch.Tensor, params: torch.Tensor,
                 params_host: torch.Tensor | None = None) -> torch.Tensor:
        host = params_host if params_host is not None else params
        return self.apply(data, params, self.plan(host).to(data.device))

    def plan(self, params_host: torch.Tensor) -> HostPlan:
        """Host side of one batch: every op's sample groups and host-derived settings from the parameters
        ``[N, P]`` as the loader made them (a device tensor is copied to the host: a synchronisation)."""
        if params_host.ndim != 2 or params_host.shape[1] != self.width:
            raise ValueError(f"aug_params must be [N, {self.width}] (columns {self.columns}), got "
                             f"{tuple(params_host.shape)}")
        host = params_host.to(dtype=torch.float32).cpu()  # no copy when on the CPU already
        planned = [op.plan(host[:, cols]) for op, cols in zip(self.ops, self._slices)]
        return HostPlan([masks for masks, _ in planned], [info for _, info in planned])

    @torch.no_grad()
    def apply(self, data: torch.Tensor, params: torch.Tensor, plan: DevicePlan) -> torch.Tensor:
        """Device side of one batch: ``data`` uint8 ``[N, 3, H, W]``, ``params`` ``[N, P]`` and ``plan``
        (:meth:`plan` of the same parameters, moved to the device) -> float32 views ``[N, 3, H, W]``; no
        host synchronisation and no host-to-device copy."""
        if data.dtype != torch.uint8 or data.ndim != 4 or data.shape[1] != 3:
            raise ValueError(f"device augmentation needs uint8 views [N, 3, H, W], got {data.dtype} "
                             f"{tuple(data.shape)}")
        if params.ndim != 2 or params.shape != (data.shape[0], self.width):
            raise ValueError(f"aug_params must be [N, {self.width}] = [{data.shape[0]}, {self.width}] "
                             f"(columns {self.columns}), got {tuple(params.shape)}")
        x = data.to(torch.float32).div_(255)  # ToTensor's scaling, bit for bit
        params = params.to(device=x.device, dtype=torch.float32)
        for op, cols, groups, info in zip(self.ops, self._slices, plan.groups, plan.infos):
            x = op(x, params[:, cols], groups, info)
        return x

    def __repr__(self) -> str:
        return f"DeviceAugmentation({[type(op).__name__ for op in self.ops]}, columns={self.columns})"


# ---------------------------------------------------------------------------------------- batches
def batch_to_device(batch: Mapping[str, Any], device: torch.device | str,
                    keys: Sequence[str] = ("data", "aug_params")) -> dict[str, Any]:
    """A copy of ``batch`` with the tensors (or lists of tensors) under ``keys`` moved to ``device``
    (``non_blocking`` for page-locked tensors, i.e. when the loader pins memory: overlaps with compute; a copy
    from pageable memory is a plain blocking copy)."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=v.is_pinned())
        if isinstance(v, (list, tuple)):
            return [move(t) for t in v]
        return v
    return {k: (move(v) if k in keys else v) for k, v in batch.items()}


class DeviceStage:
    """What the trainer applies to a batch already on the device: ``stage(batch) -> views``.

    With ``augmentation=None`` (device augmentation off) it returns ``batch["data"]`` unchanged (the host
    path already made float views); otherwise ``augmentation(batch["data"], batch["aug_params"])``.
    """

    def __init__(self, augmentation: DeviceAugmentation | None = None):
        self.augmentation = augmentation

    @property
    def enabled(self) -> bool:
        return self.augmentation is not None

    def __call__(self, batch: Mapping[str, Any]) -> torch.Tensor | list[torch.Tensor]:
        if self.augmentation is None:
            return batch["data"]
        if "aug_params" not in batch:
            raise ValueError("device augmentation is on but the batch has no 'aug_params': build the data "
                             "with builders.build_train_data(..., device_augmentation=True)")
        return self.augmentation(batch["data"], batch["aug_params"], batch.get("aug_params_host"))

    def __repr__(self) -> str:
        return f"DeviceStage({self.augmentation!r})"
