"""Cross-entropy of a linear classifier on labels: VISSL's ``cross_entropy_multiple_output_single_target``.

Linear evaluation (arXiv 2002.05709, Sec. 4 and Appendix B.6; VISSL's benchmark configs) trains a classifier on
frozen features with the plain softmax cross-entropy. VISSL's loss sums one cross-entropy per head over a list of
outputs against the same target; scaleclr trains one head, so the list has one element (a tensor is accepted as
such). Options as in VISSL (``config.LOSS.cross_entropy_multiple_output_single_target``): ``temperature``
(``logits / T``), ``normalize_output`` (L2-normalise the logits first), ``ignore_index`` (targets with this value
do not count) and ``label_smoothing`` (targets ``(1 - ls) one_hot + ls / C``, torch's definition, which is VISSL's).

Like VISSL, the loss is the mean over this rank's (non-ignored) rows; DDP's gradient averaging then gives the
gradient of the mean over the global batch when every rank holds the same number of labelled rows (scaleclr's
sampler gives every rank equal batches and linear evaluation requires labels >= 0). Nothing here reads a value on
the host: out-of-range targets are checked once, when the data are built (``scaleclr.eval.linear``).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossEntropyMultipleOutputSingleTargetLoss"]


class CrossEntropyMultipleOutputSingleTargetLoss(nn.Module):
    """Sum over outputs of ``cross_entropy(output / temperature, target)``.

    Args:
        temperature: divides the logits (> 0; 1 = plain cross-entropy).
        ignore_index: target value that is left out of the mean (VISSL's -1).
        normalize_output: L2-normalise each row of logits before the temperature.
        label_smoothing: in [0, 1).

    Shapes:
        ``output``: logits ``[N, C]`` (or a list of them); ``target``: ``[N]`` int64 class indices.
        Returns a float32 scalar (the logits are cast to fp32 first, also under autocast).
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -1, normalize_output: bool = False,
                 label_smoothing: float = 0.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
        self.temperature = float(temperature)
        self.ignore_index = int(ignore_index)
        self.normalize_output = bool(normalize_output)
        self.label_smoothing = float(label_smoothing)

    def forward(self, output: Union[torch.Tensor, Sequence[torch.Tensor]], target: torch.Tensor) -> torch.Tensor:
        outputs = [output] if isinstance(output, torch.Tensor) else list(output)
        if not outputs:
            raise ValueError("cross_entropy_multiple_output_single_target got no output")
        loss = None
        for logits in outputs:
            if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
                raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(target.shape)}: "
                                 "expected [N, C] and [N]")
            z = logits.float()
            if self.normalize_output:
                z = F.normalize(z, dim=1, p=2)
            term = F.cross_entropy(z / self.temperature, target, ignore_index=self.ignore_index,
                                   label_smoothing=self.label_smoothing)
            loss = term if loss is None else loss + term
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"normalize_output={self.normalize_output}, label_smoothing={self.label_smoothing}")
