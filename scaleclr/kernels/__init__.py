"""Fused GPU kernels. ``infonce_triton`` is the only module importing triton; import it lazily
(``scaleclr.losses`` does so only for ``impl="triton"``), so ``import scaleclr`` works without triton."""
