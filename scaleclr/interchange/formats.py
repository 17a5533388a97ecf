"""Weight layouts scaleclr reads and writes, and the conversions between them (pure dict manipulation, no I/O).

Three layouts, for ResNe(X)t trunks whose module names are torchvision's (:mod:`scaleclr.models.resnet`):

* **scaleclr**: a :class:`scaleclr.models.SimCLRModel` state dict ``{"trunk.conv1.weight", ...,
  "heads.0.clf.0.weight", ...}``. Files: ``{"format": "scaleclr", "model": state, "trunk": {...}, "heads": {...},
  "trunk_config": {depth, width_multiplier, groups, width_per_group}, ...}`` (:func:`scaleclr_payload`); the DDP
  engine's checkpoint ``{"engine": "ddp", "model": state, "optimizer", ...}`` holds the same ``model``.
* **torchvision**: the flat state dict of ``torchvision.models.resnet50()`` & co. (``conv1.weight``,
  ``layer1.0.conv1.weight``, ..., ``fc.weight``, ``fc.bias``).
* **VISSL model zoo**: ``{"classy_state_dict": {"base_model": {"model": {"trunk": {"_feature_blocks.conv1.weight",
  ...}, "heads": {"0.clf.0.weight", ...}}, "meta": ...}, ...}, "type": "consolidated", "phase_idx", ...}``
  (``/work/shared/spec/vissl_checkpoints.md`` section 1). Trunks of VISSL linear-evaluation runs (feature
  extractors) are named ``base_model._feature_blocks.*``.

Linear-evaluation checkpoints hold ``trunk.*`` and one head, the classifier, in one of the layouts of
:data:`CLASSIFIER_LAYOUTS` (VISSL's head names); :func:`classifier_of` recognises them and :func:`to_torchvision`
turns them into torchvision's ``fc`` (folding an eval-mode BatchNorm exactly).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torchvision.models.resnet import BasicBlock

from scaleclr.models.resnet import RESNET_LAYERS, feature_dim

__all__ = ["TRUNK", "HEADS", "VISSL_TRUNK_PREFIXES", "CLASSIFIER_LAYOUTS", "TORCHVISION_ARCHS", "Classifier",
           "Detected", "classifier_of", "infer_trunk_config", "torchvision_arch", "to_torchvision",
           "from_torchvision", "to_vissl", "from_vissl", "scaleclr_payload", "detect_format", "fp32",
           "describe_trunk", "fold_bn_into_linear"]

State = Dict[str, torch.Tensor]

TRUNK, HEADS = "trunk.", "heads."
#: Prefixes of a VISSL ResNet trunk's keys: the pretraining trunk, then the linear-evaluation feature extractor.
VISSL_TRUNK_PREFIXES = ("_feature_blocks.", "base_model._feature_blocks.")

#: The classifier of a linear-evaluation checkpoint: its only head, ``heads.0``, named as VISSL names its heads
#: (so the VISSL export needs no renaming). ``F`` = trunk features (``2048·w``, ``512·w`` for depths 18/34),
#: ``C`` = classes. Layout name -> (required keys, optional keys):
#:
#: * ``"linear"``: VISSL ``["mlp", {"dims": [F, C]}]`` = ``Linear(F, C)``:
#:   ``heads.0.clf.0.weight [C, F]``, ``heads.0.clf.0.bias [C]`` (optional).
#: * ``"bn_linear"``: VISSL ``["eval_mlp", {"in_channels": F, "dims": [F, C]}]`` = BatchNorm (affine or not,
#:   BatchNorm1d or BatchNorm2d on ``[N, F, 1, 1]``) then ``Linear(F, C)``:
#:   ``heads.0.channel_bn.running_mean [F]``, ``.running_var [F]``, ``.weight [F]`` / ``.bias [F]`` (affine only),
#:   ``.num_batches_tracked`` (optional), ``heads.0.clf.clf.0.weight [C, F]``, ``heads.0.clf.clf.0.bias [C]``
#:   (optional).
CLASSIFIER_LAYOUTS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "linear": (("heads.0.clf.0.weight",), ("heads.0.clf.0.bias",)),
    "bn_linear": (("heads.0.channel_bn.running_mean", "heads.0.channel_bn.running_var",
                   "heads.0.clf.clf.0.weight"),
                  ("heads.0.channel_bn.weight", "heads.0.channel_bn.bias", "heads.0.channel_bn.num_batches_tracked",
                   "heads.0.clf.clf.0.bias")),
}

#: (depth, groups, width_per_group) at width multiplier 1 -> torchvision constructor with the same modules.
TORCHVISION_ARCHS: Dict[Tuple[int, int, int], str] = {
    (18, 1, 64): "resnet18", (34, 1, 64): "resnet34", (50, 1, 64): "resnet50", (101, 1, 64): "resnet101",
    (152, 1, 64): "resnet152", (50, 32, 4): "resnext50_32x4d", (101, 32, 8): "resnext101_32x8d",
    (101, 64, 4): "resnext101_64x4d", (50, 1, 128): "wide_resnet50_2", (101, 1, 128): "wide_resnet101_2",
}

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.")


def fp32(state: Mapping[str, torch.Tensor]) -> State:
    """Floating tensors as float32 on the CPU, integer buffers (``num_batches_tracked``) unchanged."""
    return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()) for k, v in state.items()}


def _sub(state: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------- architecture
def infer_trunk_config(state: Mapping[str, torch.Tensor], prefix: str = TRUNK) -> Dict[str, int]:
    """The :class:`scaleclr.models.ResNet` arguments a state dict was saved from, read from tensor shapes.

    Args:
        state: a state dict with ResNet keys under ``prefix`` (``"trunk."`` for scaleclr, ``""`` for torchvision).
        prefix: where the trunk keys start.

    Returns:
        ``{"depth", "width_multiplier", "groups", "width_per_group"}``: depth from the blocks per stage
        (``layer{i}.{j}.``) and the block type (``conv3`` present: Bottleneck), ``width_multiplier`` = conv1's
        output channels / 64, ResNeXt ``groups`` / ``width_per_group`` from ``layer1.0.conv2.weight``
        ``[w·wpg·groups, w·wpg, 3, 3]``. (``layer4_stride`` and the norm's eps are not stored in weights.)

    Raises:
        ValueError: no ``conv1.weight`` under ``prefix``, or blocks per stage that match no supported depth.
    """
    trunk = _sub(state, prefix)
    if "conv1.weight" not in trunk:
        raise ValueError(f"no ResNet trunk: {prefix}conv1.weight is missing (keys start with "
                         f"{sorted({k.split('.')[0] for k in state})[:8]})")
    stem = int(trunk["conv1.weight"].shape[0])
    if stem % 64:
        raise ValueError(f"{prefix}conv1.weight has {stem} output channels, not a multiple of 64: not a scaleclr/"
                         "torchvision ResNet")
    w = stem // 64
    blocks = [set() for _ in range(4)]
    for k in trunk:
        m = _BLOCK_KEY.match(k)
        if m:
            blocks[int(m.group(1)) - 1].add(int(m.group(2)))
    counts = tuple(len(b) for b in blocks)
    bottleneck = "layer1.0.conv3.weight" in trunk
    depth = next((d for d, (blk, layers) in RESNET_LAYERS.items()
                  if tuple(layers) == counts and (blk is BasicBlock) != bottleneck), None)
    if depth is None:
        raise ValueError(f"{prefix}layer1..layer4 have {list(counts)} {'Bottleneck' if bottleneck else 'BasicBlock'}"
                         f" blocks, which is no supported ResNet depth ({sorted(RESNET_LAYERS)})")
    groups, wpg = 1, 64
    if bottleneck:
        c_out, c_in = (int(s) for s in trunk["layer1.0.conv2.weight"].shape[:2])
        groups, wpg = c_out // c_in, c_in // w
    return {"depth": depth, "width_multiplier": w, "groups": groups, "width_per_group": wpg}


def describe_trunk(cfg: Mapping[str, int]) -> str:
    """``"ResNet-50"``, ``"ResNet-50 w2"``, ``"ResNeXt-101 32x8d"``."""
    name = f"ResNet-{cfg['depth']}" if cfg["groups"] == 1 else f"ResNeXt-{cfg['depth']} {cfg['groups']}x" \
                                                               f"{cfg['width_per_group']}d"
    if cfg["groups"] == 1 and cfg["width_per_group"] != 64:
        name += f" width_per_group={cfg['width_per_group']}"
    return name + (f" w{cfg['width_multiplier']}" if cfg["width_multiplier"] != 1 else "")


def torchvision_arch(cfg: Mapping[str, int]) -> str:
    """The ``torchvision.models`` constructor with exactly this trunk's modules and shapes.

    Raises:
        ValueError: a width multiplier other than 1 (SimCLR's w2/w4 widen every layer, torchvision has no class
            for them) or a depth/ResNeXt shape torchvision does not build; the message names ``--format scaleclr``.
    """
    if cfg["width_multiplier"] != 1:
        raise ValueError(
            f"the trunk is {describe_trunk(cfg)} (conv1 has {64 * cfg['width_multiplier']} output channels): SimCLR's "
            "width multiplier widens every layer, and torchvision has no class for it (torchvision's "
            "wide_resnet50_2 widens only the bottleneck's 3x3 convolutions). Export it with --format scaleclr "
            "(or --format vissl) and build it with scaleclr.models.ResNet(depth=%d, width_multiplier=%d)."
            % (cfg["depth"], cfg["width_multiplier"]))
    key = (cfg["depth"], cfg["groups"], cfg["width_per_group"])
    if key not in TORCHVISION_ARCHS:
        raise ValueError(f"the trunk is {describe_trunk(cfg)}, which no torchvision constructor builds (torchvision "
                         f"has {', '.join(sorted(set(TORCHVISION_ARCHS.values())))}); export it with --format "
                         "scaleclr or --format vissl.")
    return TORCHVISION_ARCHS[key]


def _has_batchnorm(trunk: Mapping[str, torch.Tensor]) -> bool:
    return "bn1.running_mean" in trunk


# --------------------------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class Classifier:
    """A recognised linear-evaluation classifier (:data:`CLASSIFIER_LAYOUTS`).

    Attributes:
        layout: ``"linear"`` or ``"bn_linear"``.
        weight, bias: keys of the Linear's weight ``[C, F]`` and bias ``[C]`` (``bias`` None when absent).
        bn: prefix of the BatchNorm's keys (``"heads.0.channel_bn."``), None for ``"linear"``.
        affine: the BatchNorm has weight and bias.
        in_features, num_classes: ``F``, ``C``.
    """

    layout: str
    weight: str
    bias: Optional[str]
    bn: Optional[str]
    affine: bool
    in_features: int
    num_classes: int

    def describe(self) -> str:
        bn = f"BatchNorm({'affine' if self.affine else 'affine=False'}) + " if self.bn else ""
        return f"heads.0 = {bn}Linear({self.in_features}, {self.num_classes})"


def classifier_of(state: Mapping[str, torch.Tensor]) -> Optional[Classifier]:
    """The linear-evaluation classifier of a scaleclr state dict, or None.

    Recognised when the ``heads.*`` keys are exactly one layout of :data:`CLASSIFIER_LAYOUTS` (required keys
    present, nothing but optional keys besides) with a 2-d weight whose input width equals the trunk's features.
    A pretraining checkpoint whose projection head is a single ``Linear(F, D)`` has the same layout; the
    export's ``--no-fc`` drops it.
    """
    heads = {k for k in state if k.startswith(HEADS)}
    if not heads:
        return None
    try:
        cfg = infer_trunk_config(state)
        feats = feature_dim(cfg["depth"], cfg["width_multiplier"])
    except ValueError:
        return None
    for layout, (required, optional) in CLASSIFIER_LAYOUTS.items():
        if not set(required) <= heads or not heads <= set(required) | set(optional):
            continue
        weight = "heads.0.clf.0.weight" if layout == "linear" else "heads.0.clf.clf.0.weight"
        bias = weight[:-len("weight")] + "bias"
        w = state[weight]
        if w.ndim != 2 or w.shape[1] != feats:
            return None
        bn = "heads.0.channel_bn." if layout == "bn_linear" else None
        affine = bool(bn) and bn + "weight" in heads and bn + "bias" in heads
        if bn and (bn + "weight" in heads) != (bn + "bias" in heads):
            return None
        return Classifier(layout, weight, bias if bias in heads else None, bn, affine, int(w.shape[1]),
                          int(w.shape[0]))
    return None


def fold_bn_into_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                        running_var: torch.Tensor, bn_weight: Optional[torch.Tensor] = None,
                        bn_bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """``Linear(BN_eval(x)) = W' x + b'`` exactly, computed in float64 and returned in ``weight``'s dtype.

    Eval-mode BatchNorm is ``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` (``gamma = 1``,
    ``beta = 0`` when not affine), so ``W' = W * s`` (per input column) and ``b' = b + W (beta - mean * s)``.

    Args:
        weight: ``[C, F]``; bias: ``[C]`` or None; running_mean, running_var, bn_weight, bn_bias: ``[F]``.
        eps: the BatchNorm's eps (not stored in state dicts; VISSL's and scaleclr's default 1e-5).

    Returns:
        ``(W' [C, F], b' [C])``.
    """
    d = torch.float64
    s = 1.0 / torch.sqrt(running_var.to(d) + eps)
    if bn_weight is not None:
        s = s * bn_weight.to(d)
    shift = -running_mean.to(d) * s
    if bn_bias is not None:
        shift = shift + bn_bias.to(d)
    w = weight.to(d)
    b = (bias.to(d) if bias is not None else torch.zeros(w.shape[0], dtype=d)) + w @ shift
    return (w * s[None, :]).to(weight.dtype), b.to(weight.dtype)


# ------------------------------------------------------------------------------------------- torchvision
def to_torchvision(state: Mapping[str, torch.Tensor], classifier: bool = True, bn_eps: float = 1e-5
                   ) -> Tuple[State, str, Optional[Classifier]]:
    """A scaleclr state dict as the state dict of the matching ``torchvision.models`` ResNet.

    Args:
        state: ``trunk.*`` (+ ``heads.*``) fp32 state dict.
        classifier: map a recognised linear-evaluation classifier (:func:`classifier_of`) to ``fc.weight`` /
            ``fc.bias`` (a BatchNorm in front is folded in, :func:`fold_bn_into_linear`); False drops all heads.
        bn_eps: eps of that BatchNorm.

    Returns:
        ``(torchvision state dict, constructor name e.g. "resnet50", the classifier used or None)``. With a
        classifier the result loads into ``torchvision.models.<name>(num_classes=C)`` with ``strict=True``;
        without, every key but ``fc.weight`` / ``fc.bias`` is there. Projection heads are dropped.

    Raises:
        ValueError: width multiplier != 1 or a shape torchvision has no constructor for (names ``--format
            scaleclr``), or a trunk without BatchNorm (torchvision's ResNets use BatchNorm2d).
    """
    cfg = infer_trunk_config(state)
    arch = torchvision_arch(cfg)
    trunk = _sub(state, TRUNK)
    if not _has_batchnorm(trunk):
        raise ValueError(f"the trunk has no BatchNorm running statistics (trunk.bn1.running_mean): it was built with "
                         "config.MODEL.TRUNK.RESNETS.NORM=GroupNorm/LayerNorm, which torchvision's "
                         f"{arch} cannot hold; export it with --format scaleclr.")
    out = dict(trunk)
    clf = classifier_of(state) if classifier else None
    if clf is not None:
        w, b = state[clf.weight], state[clf.bias] if clf.bias else None
        if clf.bn is not None:
            g = state[clf.bn + "weight"] if clf.affine else None
            beta = state[clf.bn + "bias"] if clf.affine else None
            w, b = fold_bn_into_linear(w, b, state[clf.bn + "running_mean"], state[clf.bn + "running_var"], g, beta,
                                       eps=bn_eps)
        out["fc.weight"] = w.clone()
        out["fc.bias"] = b.clone() if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return out, arch, clf


def from_torchvision(tv: Mapping[str, torch.Tensor]) -> State:
    """A torchvision ResNet state dict in scaleclr names: ``trunk.<name>``; ``fc.weight`` / ``fc.bias`` become the
    ``"linear"`` classifier ``heads.0.clf.0.weight`` / ``.bias`` (:data:`CLASSIFIER_LAYOUTS`)."""
    out = {TRUNK + k: v for k, v in tv.items() if not k.startswith("fc.")}
    for name in ("weight", "bias"):
        if f"fc.{name}" in tv:
            out[f"heads.0.clf.0.{name}"] = tv[f"fc.{name}"]
    return out


# ------------------------------------------------------------------------------------------------- VISSL
def to_vissl(state: Mapping[str, torch.Tensor], phase_idx: int = 0, iteration: int = 0) -> Dict[str, Any]:
    """A scaleclr state dict in VISSL's model-zoo checkpoint layout (only dicts, lists, ints, bools, tensors).

    ``trunk.<name>`` -> ``classy_state_dict.base_model.model.trunk["_feature_blocks.<name>"]``, ``heads.<name>`` ->
    ``...model.heads["<name>"]`` (VISSL's ``heads.state_dict()`` names, e.g. ``0.clf.0.weight``); ``type:
    consolidated``, ``base_model.meta = {"trunk": {}, "heads": []}`` (DDP checkpoints), empty optimizer, meters,
    losses and hooks. VISSL's ``extra_scripts/convert_vissl_to_torchvision.py`` turns it into a torchvision state
    dict without ``fc``, and ``config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=classy_state_dict`` loads it in VISSL.
    """
    trunk = {VISSL_TRUNK_PREFIXES[0] + k: v for k, v in _sub(state, TRUNK).items()}
    heads = _sub(state, HEADS)
    return {
        "phase_idx": int(phase_idx), "iteration": int(iteration), "loss": {}, "iteration_num": int(iteration),
        "train_phase_idx": int(phase_idx), "type": "consolidated",
        "classy_state_dict": {
            "train": True,
            "base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {"trunk": {}, "heads": []}},
            "meters": [], "optimizer": {}, "phase_idx": int(phase_idx), "train_phase_idx": int(phase_idx),
            "num_updates": int(iteration), "losses": [], "hooks": {}, "loss": {},
        },
    }


def from_vissl(ckpt: Mapping[str, Any]) -> State:
    """The scaleclr state dict of a VISSL checkpoint (``classy_state_dict.base_model.model``): trunk keys lose a
    leading ``_feature_blocks.`` or ``base_model._feature_blocks.`` and gain ``trunk.``, head keys gain ``heads.``
    (VISSL's ``get_checkpoint_model_state_dict`` for a model that is not a feature extractor, plus VISSL's trunk
    module names -> scaleclr's).

    Raises:
        ValueError: no ``classy_state_dict.base_model.model`` with ``trunk`` / ``heads`` dicts.
    """
    try:
        model = ckpt["classy_state_dict"]["base_model"]["model"]
        trunk, heads = model.get("trunk", {}), model.get("heads", {})
    except (KeyError, TypeError, AttributeError):
        raise ValueError("not a VISSL checkpoint: no classy_state_dict.base_model.model") from None
    if not isinstance(trunk, Mapping) or not isinstance(heads, Mapping):
        raise ValueError("not a VISSL checkpoint: classy_state_dict.base_model.model.trunk/heads are not dicts")
    out: State = {}
    for k, v in trunk.items():
        for p in VISSL_TRUNK_PREFIXES[::-1]:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[TRUNK + k] = v
    out.update({HEADS + k: v for k, v in heads.items()})
    return out


# ---------------------------------------------------------------------------------------------- scaleclr
#: the consolidated fp32 export written next to a run's final checkpoint (engines with ``consolidate_final``)
CONSOLIDATED_SUFFIX = "_consolidated_fp32.torch"


def scaleclr_payload(state: Mapping[str, torch.Tensor], **extra: Any) -> Dict[str, Any]:
    """scaleclr's export file: ``{"format": "scaleclr", "model": state, "trunk": {name: tensor}, "heads": {name:
    tensor}, "trunk_config": {depth, width_multiplier, groups, width_per_group}, **extra}`` in fp32 (the
    ``trunk`` / ``heads`` entries share the tensors of ``model``, so the file holds them once). ``trunk`` loads into
    ``scaleclr.models.ResNet(**trunk_config)``, ``model`` into ``SimCLRModel``; ``torch.load(weights_only=True)``
    reads it when ``extra`` holds only plain values."""
    model = fp32(state)
    return {"format": "scaleclr", "model": model, "trunk": _sub(model, TRUNK), "heads": _sub(model, HEADS),
            "trunk_config": infer_trunk_config(model), **extra}


# --------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detected:
    """What :func:`detect_format` found.

    Attributes:
        name: ``"scaleclr"`` (``model`` dict or flat with ``trunk.`` / ``heads.`` keys), ``"vissl"``
            (``classy_state_dict``), ``"torchvision"`` (flat ``conv1.weight``, ``layer1.*``, optional ``fc.*``),
            ``"vissl_trunk"`` (flat ``_feature_blocks.*``, e.g. a VISSL trunk dump) or ``"unknown"``.
        module_prefix: the keys start with ``module.`` (saved from a DDP-wrapped model).
        where: where the weights sit in the file: ``"classy_state_dict"``, ``"model"`` or ``""`` (top level).
    """

    name: str
    module_prefix: bool = False
    where: str = ""

    def __str__(self) -> str:
        return self.name + (" (keys prefixed with 'module.')" if self.module_prefix else "")


def _flat_format(keys) -> str:
    keys = list(keys)
    if keys and all(k.startswith((TRUNK, HEADS)) for k in keys):
        return "scaleclr"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if any(k.startswith(p + "conv1.weight") for p in VISSL_TRUNK_PREFIXES for k in keys):
        return "vissl_trunk"
    return "unknown"


def detect_format(obj: Any) -> Detected:
    """Which layout a loaded file (or a part of one) is in; see :class:`Detected`."""
    if not isinstance(obj, Mapping):
        return Detected("unknown")
    if "classy_state_dict" in obj:
        return Detected("vissl", where="classy_state_dict")
    model = obj.get("model")
    if isinstance(model, Mapping) and _flat_format(model) == "scaleclr":
        return Detected("scaleclr", where="model")
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if not tensors:
        return Detected("unknown")
    name = _flat_format(tensors)
    if name == "unknown" and all(k.startswith("module.") for k in tensors):
        inner = _flat_format(k[len("module."):] for k in tensors)
        if inner != "unknown":
            return Detected(inner, module_prefix=True)
    return Detected(name)
