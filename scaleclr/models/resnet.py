"""ResNet trunk with SimCLR's width multiplier (VISSL ``resnet`` trunk).

SimCLR (Chen et al. 2020, arXiv 2002.05709, Sec. 4 / Appendix B.1) scales *every* channel count of a
ResNet-50 by the width multiplier ``w``: the stem has ``64·w`` filters and the four stages use
``planes = 64w, 128w, 256w, 512w``, so R50-w2 / R50-w4 have trunk outputs of 4096 / 8192 channels and
≈94M / ≈375M trunk parameters. This is NOT torchvision's ``wide_resnet50_2``, which only widens the
bottleneck's inner 3×3 convolution.

Module and parameter names follow torchvision (``conv1``, ``bn1``, ``layer1`` … ``layer4`` with
``downsample.0`` / ``downsample.1``) so that, for ``w = 1``, :meth:`ResNet.state_dict` loads into
``torchvision.models.resnet50()`` once its ``fc`` is removed (and VISSL checkpoints load after stripping
their ``_feature_blocks.`` prefix).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["ResNet", "RESNET_LAYERS", "make_norm_layer"]

Block = Union[BasicBlock, Bottleneck]
NormLayer = Callable[[int], nn.Module]

#: Residual block type and number of blocks per stage for every supported depth.
RESNET_LAYERS: Dict[int, Tuple[Type[Block], Tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}

NORM_NAMES = ("BatchNorm", "LayerNorm", "GroupNorm")


def make_norm_layer(name: str, groupnorm_groups: int = 32) -> NormLayer:
    """Returns a 2-d norm-layer factory for VISSL's ``MODEL.TRUNK.RESNETS.NORM`` names.

    Args:
        name: ``"BatchNorm"`` (``nn.BatchNorm2d``), ``"LayerNorm"`` (``nn.GroupNorm`` with one group,
            i.e. normalisation over C×H×W as VISSL does) or ``"GroupNorm"`` (``groupnorm_groups`` groups).
        groupnorm_groups: number of groups for ``"GroupNorm"``.

    Returns:
        A callable ``num_channels -> nn.Module``.

    Raises:
        ValueError: for any other name.
    """
    if name == "BatchNorm":
        return nn.BatchNorm2d
    if name == "LayerNorm":
        return lambda num_channels: nn.GroupNorm(1, num_channels)
    if name == "GroupNorm":
        return lambda num_channels: nn.GroupNorm(groupnorm_groups, num_channels)
    raise ValueError(f"Unknown ResNet norm layer {name!r}; allowed: {', '.join(NORM_NAMES)}")


def _make_stage(block: Type[Block], inplanes: int, planes: int, num_blocks: int, stride: int,
                norm_layer: NormLayer, groups: int, base_width: int) -> Tuple[nn.Sequential, int]:
    """Builds one stage of ``num_blocks`` residual blocks (torchvision ``_make_layer`` layout).

    The first block carries the stride and, when the shape changes, a ``downsample`` shortcut
    (1×1 conv without bias → norm).

    Returns:
        The stage and its output channel count ``planes · block.expansion``.
    """
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
            norm_layer(out_planes),
        )
    blocks: List[nn.Module] = [block(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)]
    for _ in range(1, num_blocks):
        blocks.append(block(out_planes, planes, groups=groups, base_width=base_width, dilation=1,
                            norm_layer=norm_layer))
    return nn.Sequential(*blocks), out_planes


class ResNet(nn.Module):
    """ResNe(X)t trunk (stem, 4 stages, global average pool) with SimCLR's width multiplier.

    Architecture (torchvision "v1.5": stride on the 3×3 convolution of the bottleneck):
    conv 7×7/2 (3 → 64·w) → norm → ReLU → max-pool 3×3/2 → ``layer1`` … ``layer4`` with
    ``planes = 64w·2^i`` and strides ``1, 2, 2, layer4_stride`` → adaptive average pool → flatten.

    Args:
        depth: 18 or 34 (``BasicBlock``), 50, 101, 152 or 200 (``Bottleneck``).
        width_multiplier: SimCLR width multiplier ``w`` (positive int; 1, 2, 4 in the paper), applied to
            the stem and every stage (arXiv 2002.05709, Sec. 4).
        groups: ResNeXt cardinality (``Bottleneck`` depths only).
        width_per_group: ResNeXt width per group (``Bottleneck`` depths only).
        zero_init_residual: zero-initialise the last norm layer of every residual block so that each
            block starts as the identity (Goyal et al., arXiv 1706.02677).
        norm_layer: factory ``num_channels -> nn.Module`` (default ``nn.BatchNorm2d``) or one of the
            VISSL names ``"BatchNorm"``, ``"LayerNorm"``, ``"GroupNorm"``.
        layer4_stride: stride of the first block of ``layer4`` (1 or 2).

    Attributes:
        num_features: channels of the pooled output (``512·w`` for depths 18/34, ``2048·w`` otherwise).
        depth: the depth.
        width_multiplier: the width multiplier.

    Raises:
        ValueError: unknown depth, non-positive width multiplier, ResNeXt options with a ``BasicBlock``
            depth, or an invalid ``layer4_stride``.

    Note:
        Initialisation follows torchvision (Kaiming-normal ``fan_out`` for convolutions, norm weight 1 /
        bias 0). VISSL re-creates the layers after torchvision's init and therefore ends up with PyTorch's
        default init instead; both are valid SimCLR starting points.
    """

    def __init__(
        self,
        depth: int = 50,
        width_multiplier: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        norm_layer: Optional[Union[NormLayer, str]] = None,
        layer4_stride: int = 2,
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            allowed = ", ".join(str(d) for d in RESNET_LAYERS)
            raise ValueError(f"Unsupported ResNet depth {depth!r}; allowed depths: {allowed}")
        if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, int) or width_multiplier < 1:
            raise ValueError(f"width_multiplier must be a positive int, got {width_multiplier!r}")
        if layer4_stride not in (1, 2):
            raise ValueError(f"layer4_stride must be 1 or 2, got {layer4_stride!r}")
        block, layers = RESNET_LAYERS[depth]
        if block is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(
                f"ResNet-{depth} uses BasicBlock, which only supports groups=1 and width_per_group=64 "
                f"(got groups={groups}, width_per_group={width_per_group})")
        if groups < 1 or width_per_group < 1:
            raise ValueError(f"groups and width_per_group must be >= 1, got {groups}, {width_per_group}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        elif isinstance(norm_layer, str):
            norm_layer = make_norm_layer(norm_layer)

        self.depth = depth
        self.width_multiplier = width_multiplier

        w = width_multiplier
        stem_width = 64 * w
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        strides = (1, 2, 2, layer4_stride)
        for i, (num_blocks, stride) in enumerate(zip(layers, strides)):
            stage, inplanes = _make_stage(block, inplanes, 64 * w * 2 ** i, num_blocks, stride,
                                          norm_layer, groups, width_per_group)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * w * block.expansion

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last_norm = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last_norm is not None and getattr(last_norm, "weight", None) is not None:
                    nn.init.zeros_(last_norm.weight)

    def stages(self) -> List[nn.Sequential]:
        """Returns ``[layer1, layer2, layer3, layer4]`` (VISSL's res2 … res5)."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def shard_units(self) -> List[nn.Module]:
        """Returns every residual block in forward order (the units an FSDP engine wraps one by one).

        The stem (``conv1``/``bn1``) is not included; it stays with the root wrapper.
        """
        return [blk for stage in self.stages() for blk in stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes pooled trunk features.

        Args:
            x: images, shape ``[B, 3, H, W]``.

        Returns:
            Features of shape ``[B, num_features]`` (``2048·w`` for Bottleneck depths).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width_multiplier={self.width_multiplier}, num_features={self.num_features}"

