"""Projection heads in VISSL's ``MODEL.HEAD.PARAMS`` syntax.

SimCLR (Chen et al. 2020, arXiv 2002.05709, Sec. 2.1 and 4.2) maps trunk features ``h`` to the space
where the contrastive loss is applied with a small MLP ``g(h) = W2 σ(W1 h)``. VISSL expresses it as two
``"mlp"`` heads applied one after the other::

    [["mlp", {"dims": [2048, 2048], "use_relu": True, "skip_last_layer_relu_bn": False}],
     ["mlp", {"dims": [2048, 128]}]]

Parameter names match VISSL (``heads.0.clf.0.weight``, ``heads.1.clf.0.bias``, ...) once the heads are
placed in :class:`scaleclr.models.SimCLRModel`.

Linear evaluation uses either a plain ``["mlp", {"dims": [F, C]}]`` (a Linear; SimCLR's protocol, arXiv 2002.05709
Appendix B.6) or VISSL's ``["eval_mlp", {"in_channels": F, "dims": [F, C]}]`` (:class:`LinearEvalMLP`: BatchNorm
then Linear; ``heads.0.channel_bn.*``, ``heads.0.clf.clf.0.*``), the layouts of
``scaleclr.interchange.formats.CLASSIFIER_LAYOUTS``.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["MLP", "LinearEvalMLP", "build_head", "build_heads", "HEADS"]


class MLP(nn.Module):
    """VISSL's ``"mlp"`` head: a stack of Linear (→ BatchNorm1d) (→ ReLU) (→ Dropout) layers.

    For every consecutive pair ``(d_j, d_{j+1})`` of ``dims`` the head adds
    ``Linear(d_j, d_{j+1}, bias=use_bias)``, followed — except after the last Linear when
    ``skip_last_layer_relu_bn`` — by ``BatchNorm1d`` if ``use_bn``, ``ReLU(inplace=True)`` if ``use_relu``
    and ``Dropout(0.5)`` if ``use_dropout``. The layers live in ``self.clf`` (``nn.Sequential``).

    Args:
        dims: layer widths ``[d_0, ..., d_k]`` (at least two entries).
        use_bn: add ``BatchNorm1d`` after each Linear.
        use_relu: add ``ReLU`` after each Linear (after the norm).
        use_dropout: add ``Dropout(0.5)`` after each Linear (after the ReLU).
        use_bias: give the Linear layers a bias.
        skip_last_layer_relu_bn: no BN/ReLU/Dropout after the last Linear.
        batchnorm_eps: ``eps`` of the BatchNorm1d layers (VISSL ``MODEL.HEAD.BATCHNORM_EPS``).
        batchnorm_momentum: ``momentum`` of the BatchNorm1d layers (``MODEL.HEAD.BATCHNORM_MOMENTUM``).
        params_multiplier: factor applied to the default-initialised Linear weights and biases
            (``MODEL.HEAD.PARAMS_MULTIPLIER``, 1.0 leaves PyTorch's default init).

    Raises:
        ValueError: fewer than two dims or a non-positive dim.
    """

    def __init__(
        self,
        dims: Sequence[int],
        use_bn: bool = False,
        use_relu: bool = False,
        use_dropout: bool = False,
        use_bias: bool = True,
        skip_last_layer_relu_bn: bool = True,
        batchnorm_eps: float = 1e-5,
        batchnorm_momentum: float = 0.1,
        params_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"mlp head needs dims with at least two positive entries, got {dims}")
        layers: List[nn.Module] = []
        num_linear = len(dims) - 1
        for j in range(num_linear):
            layers.append(nn.Linear(dims[j], dims[j + 1], bias=use_bias))
            if j == num_linear - 1 and skip_last_layer_relu_bn:
                break
            if use_bn:
                layers.append(nn.BatchNorm1d(dims[j + 1], eps=batchnorm_eps, momentum=batchnorm_momentum))
            if use_relu:
                layers.append(nn.ReLU(inplace=True))
            if use_dropout:
                layers.append(nn.Dropout(p=0.5))
        self.clf = nn.Sequential(*layers)
        self.in_features = dims[0]
        self.out_features = dims[-1]
        if params_multiplier != 1.0:
            with torch.no_grad():
                for m in self.clf:
                    if isinstance(m, nn.Linear):
                        m.weight.mul_(params_multiplier)
                        if m.bias is not None:
                            m.bias.mul_(params_multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the head.

        Args:
            x: features, shape ``[N, C]`` or ``[N, C, 1, 1]``.

        Returns:
            Shape ``[N, dims[-1]]``.

        Raises:
            ValueError: a 4-d input whose spatial size is not 1×1.
        """
        if x.ndim > 2:
            if any(d != 1 for d in x.shape[2:]):
                raise ValueError(f"mlp head expects [N, C] or [N, C, 1, 1] input, got {tuple(x.shape)}")
            x = x.reshape(x.shape[0], x.shape[1])
        return self.clf(x)


class LinearEvalMLP(nn.Module):
    """VISSL's ``"eval_mlp"`` head (``vissl/models/heads/linear_eval_mlp.py``): ``BatchNorm2d(in_channels)`` on the
    features viewed as ``[N, F, 1, 1]``, flatten, then an :class:`MLP` over ``dims`` (a single Linear for
    ``dims = [F, C]``).

    The BatchNorm is affine in VISSL; ``affine=False`` (a scaleclr option) gives the parameter-free BatchNorm of
    mmselfsup's linear protocol. Names: ``channel_bn.{weight, bias, running_mean, running_var,
    num_batches_tracked}``, ``clf.clf.0.{weight, bias}``.

    Args:
        in_channels: features ``F`` (channels of the BatchNorm).
        dims: widths of the MLP, ``dims[0] == in_channels`` for a pooled feature.
        use_bn, use_relu: the MLP's options (VISSL's; off for a linear classifier).
        affine: the BatchNorm has a learnable scale and shift.
        batchnorm_eps, batchnorm_momentum: of the BatchNorm (``MODEL.HEAD.BATCHNORM_EPS`` / ``_MOMENTUM``).
        params_multiplier: factor on the Linear's default initialisation (``MODEL.HEAD.PARAMS_MULTIPLIER``; 0 gives
            the zero-initialised logits layer of google-research/simclr's ``--zero_init_logits_layer``).

    Raises:
        ValueError: ``in_channels`` < 1.
    """

    def __init__(self, in_channels: int, dims: Sequence[int], use_bn: bool = False, use_relu: bool = False,
                 affine: bool = True, batchnorm_eps: float = 1e-5, batchnorm_momentum: float = 0.1,
                 params_multiplier: float = 1.0) -> None:
        super().__init__()
        if int(in_channels) < 1:
            raise ValueError(f"eval_mlp head needs in_channels >= 1, got {in_channels}")
        self.channel_bn = nn.BatchNorm2d(int(in_channels), eps=batchnorm_eps, momentum=batchnorm_momentum,
                                         affine=affine)
        self.clf = MLP(dims, use_bn=use_bn, use_relu=use_relu, batchnorm_eps=batchnorm_eps,
                       batchnorm_momentum=batchnorm_momentum, params_multiplier=params_multiplier)
        self.in_features = int(in_channels)
        self.out_features = self.clf.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the head.

        Args:
            x: features ``[N, F]`` or ``[N, F, 1, 1]`` (or ``[N, F, H, W]`` when ``dims[0] == F·H·W``).

        Returns:
            ``[N, dims[-1]]``.
        """
        if x.ndim == 2:
            x = x[:, :, None, None]
        if x.ndim != 4:
            raise ValueError(f"eval_mlp head expects a [N, C] or [N, C, H, W] input, got {tuple(x.shape)}")
        return self.clf(torch.flatten(self.channel_bn(x), start_dim=1))


#: Head name (first element of a ``MODEL.HEAD.PARAMS`` entry) -> constructor.
HEADS = {"mlp": MLP, "eval_mlp": LinearEvalMLP}


@contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    """Runs the block under ``torch.manual_seed(seed)`` without disturbing the global RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_head(name: str, kwargs: Optional[Mapping[str, Any]] = None, **defaults: Any) -> nn.Module:
    """Builds one head from a ``["name", {kwargs}]`` pair.

    Args:
        name: head name, a key of :data:`HEADS` (``"mlp"``, ``"eval_mlp"``).
        kwargs: constructor arguments from the config.
        **defaults: arguments used when ``kwargs`` does not give them (e.g. ``batchnorm_eps``).

    Returns:
        The head module.

    Raises:
        ValueError: unknown head name or unknown argument.
    """
    if name not in HEADS:
        raise ValueError(f"Unknown head {name!r} in MODEL.HEAD.PARAMS; supported heads: {sorted(HEADS)}")
    cls = HEADS[name]
    args: Dict[str, Any] = dict(defaults)
    args.update(dict(kwargs or {}))
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown argument(s) {unknown} for head {name!r}; allowed: {allowed}")
    return cls(**args)


def _is_pair(entry: Any) -> bool:
    return (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2
            and isinstance(entry[0], str) and (entry[1] is None or isinstance(entry[1], Mapping)))


def build_heads(
    params: Sequence[Any],
    batchnorm_eps: float = 1e-5,
    batchnorm_momentum: float = 0.1,
    params_multiplier: float = 1.0,
    init_seed: Optional[int] = None,
) -> nn.ModuleList:
    """Builds the heads listed in VISSL's ``MODEL.HEAD.PARAMS``.

    Each element is either a pair ``["mlp", {kwargs}]`` (one head) or a list of such pairs (a composite
    head, built as ``nn.Sequential``). For a single-output trunk the heads are applied one after the other
    (arXiv 2002.05709's projection head ``g`` for the SimCLR configs). Lists/dicts may be plain Python
    containers or OmegaConf ``ListConfig``/``DictConfig``.

    Args:
        params: the ``MODEL.HEAD.PARAMS`` list.
        batchnorm_eps: default BatchNorm1d ``eps`` (``MODEL.HEAD.BATCHNORM_EPS``).
        batchnorm_momentum: default BatchNorm1d ``momentum`` (``MODEL.HEAD.BATCHNORM_MOMENTUM``).
        params_multiplier: default init multiplier (``MODEL.HEAD.PARAMS_MULTIPLIER``).
        init_seed: if given, each head is built under ``torch.manual_seed(init_seed)`` (``init_seed + idx``
            for the idx-th member of a composite head), as VISSL does with ``MODEL._MODEL_INIT_SEED``; the
            global RNG state is left untouched.

    Returns:
        ``nn.ModuleList`` of heads, applied sequentially.

    Raises:
        ValueError: malformed entry or unknown head name (see :data:`HEADS`).
    """
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise ValueError(f"MODEL.HEAD.PARAMS must be a list, got {params!r}")
    defaults = {"batchnorm_eps": batchnorm_eps, "batchnorm_momentum": batchnorm_momentum,
                "params_multiplier": params_multiplier}
    heads = nn.ModuleList()
    for k, entry in enumerate(params):
        if _is_pair(entry):
            with _seeded(init_seed):
                heads.append(build_head(entry[0], entry[1], **defaults))
        elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) > 0 \
                and all(_is_pair(e) for e in entry):
            members = []
            for idx, (name, kwargs) in enumerate(entry):
                with _seeded(None if init_seed is None else init_seed + idx):
                    members.append(build_head(name, kwargs, **defaults))
            heads.append(nn.Sequential(*members))
        else:
            raise ValueError(
                f"MODEL.HEAD.PARAMS[{k}] must be ['name', {{kwargs}}] or a list of such pairs, got {entry!r}")
    return heads
