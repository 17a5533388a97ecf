"""Decoded image -> 8-bit RGB, with the two conversions Pillow's ``convert("RGB")`` gets wrong said out loud.

- **High bit depth.** ``convert("RGB")`` clips 16-bit greyscale (modes ``I;16*``, how Pillow opens a 16-bit
  PNG, and ``I``, 32-bit integers, how it opens 16-bit TIFFs) at 255: almost every pixel turns white. Here
  the values are scaled to 8 bits: ``round(v / 257)`` (65535 -> 255, exact for 8-bit values stored as 16-bit
  ``v * 257``); ``I`` is read as 16-bit data (values clipped to [0, 65535] first). ``F`` (float) images keep
  Pillow's conversion (their range is not known) and are counted as ``float``.
- **Transparency.** ``convert("RGB")`` drops the alpha channel of ``RGBA`` / ``LA`` / ``PA`` images and the
  transparent palette entry of ``P`` images, exposing whatever colour the file stores under transparent pixels
  (often black, sometimes garbage). Here the image is composited over mid-grey ``(128, 128, 128)``
  (:data:`ALPHA_BACKGROUND`): a dark and a light subject both stay visible, and grey sits near the dataset mean,
  so normalised transparent areas are close to 0.

Both are counted per process (each data worker counts its own): the first image of each kind is named in a
warning, with the rule applied, and the running count is logged again at 10, 100, 1000, ... images.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["to_rgb", "ALPHA_BACKGROUND", "CONVERSIONS", "conversion_kind"]

#: colour transparent pixels are composited over (documented in docs/faults.md)
ALPHA_BACKGROUND = (128, 128, 128)
#: kind -> images converted in this process ("16-bit", "alpha", "float")
CONVERSIONS: Counter = Counter()
_RULES = {"16-bit": "scaled to 8 bits (value / 257) instead of clipped at 255 (white)",
          "alpha": f"composited over grey {ALPHA_BACKGROUND} instead of dropping the alpha channel",
          "float": "converted by Pillow (values outside [0, 255] clip)"}
_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def conversion_kind(img: Image.Image) -> str | None:
    """Which counted conversion ``img`` needs: ``"16-bit"``, ``"alpha"``, ``"float"`` or None."""
    if img.mode in _SIXTEEN:
        return "16-bit"
    if img.mode in _ALPHA or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        return "alpha"
    if img.mode == "F":
        return "float"
    return None


def _note(kind: str, path: str) -> None:
    CONVERSIONS[kind] += 1
    n = CONVERSIONS[kind]
    if n == 1:
        logger.warning("image %s (%s): %s; further images of this kind are counted, not named", path or "?", kind,
                       _RULES[kind])
    elif n >= 10 and str(n).strip("0") == "1":  # 10, 100, 1000, ...
        logger.warning("%d %s images converted in this process so far (%s)", n, kind, _RULES[kind])


def to_rgb(img: Image.Image, path: str = "") -> Image.Image:
    """Decodes ``img`` (if not yet) and returns it as 8-bit RGB (see the module docstring).

    Args:
        img: an opened Pillow image, any mode.
        path: the file, named in the first warning of each kind.

    Raises:
        OSError and the other decode errors of ``Image.load``.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        img.load()
        return img
    kind = conversion_kind(img)
    if kind == "16-bit":
        v = np.asarray(img).astype(np.int64)
        v = np.clip(v, 0, 65535)
        gray = ((v * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), halves up
        out = Image.fromarray(gray, "L").convert("RGB")
    elif kind == "alpha":
        rgba = img.convert("RGBA")
        out = Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,)), rgba).convert("RGB")
    else:
        out = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, F: Pillow's conversion is right (F: counted)
    if kind is not None:
        _note(kind, path)
    return out
