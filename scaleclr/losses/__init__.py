"""SimCLR InfoNCE losses (Chen et al. 2020, arXiv 2002.05709) with VISSL semantics.

Public API: :class:`SimclrInfoNCELoss`, :class:`MulticropSimclrInfoNCELoss` and their functional forms; for linear
evaluation, :class:`CrossEntropyMultipleOutputSingleTargetLoss` (VISSL's classifier loss).
Implementations (``impl=``): ``reference`` (dense autograd), ``streaming`` (tiled custom autograd, never builds
the N x N logits), ``triton`` (fused kernels, ``scaleclr.losses.infonce_triton``, imported lazily), ``auto``.
"""
from .cross_entropy import CrossEntropyMultipleOutputSingleTargetLoss
from .functional import multicrop_simclr_info_nce_loss, resolve_impl, simclr_info_nce_loss, triton_available
from .indices import pair_columns
from .multicrop_simclr_info_nce import MulticropSimclrInfoNCELoss
from .reference import info_nce_dense
from .simclr_info_nce import SimclrInfoNCELoss
from .streaming import info_nce_streaming

__all__ = ["SimclrInfoNCELoss", "MulticropSimclrInfoNCELoss", "CrossEntropyMultipleOutputSingleTargetLoss",
           "simclr_info_nce_loss", "multicrop_simclr_info_nce_loss", "info_nce_dense", "info_nce_streaming",
           "pair_columns", "resolve_impl", "triton_available"]
