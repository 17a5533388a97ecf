"""Batched colour and blur ops with one parameter per sample, for the device stage of the two-stage data path.

SimCLR's colour distortion and blur (Chen et al. 2020, arXiv 2002.05709, Appendix A) are per-pixel or small
separable filters, so they run on a whole batch at once when every sample brings its own factor. Each
function below takes ``x`` shaped ``[N, 3, H, W]`` (float, values in [0, 1] unless said otherwise) and one
factor per sample shaped ``[N]``, on the same device, and equals torchvision's tensor functional op applied
sample by sample with that sample's factor (``torchvision.transforms.functional.adjust_brightness``,
``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``, ``normalize``): the same
formulas in the same order, with the clamp to [0, 1] after each op as torchvision does on float tensors.
They work on CPU and CUDA tensors alike; none loops over samples.

The blur is not torchvision's true Gaussian but what the host path computes: Pillow's
``ImageFilter.GaussianBlur(radius)`` (``src/libImaging/BoxBlur.c``), three passes of an "extended box"
filter per axis whose variance is ``radius**2`` (Gwosdek et al., SSVM 2011), with the border pixel repeated
(see :func:`pil_gaussian_blur`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

# torchvision's luma weights for float tensors (rgb_to_grayscale).
_LUMA = (0.2989, 0.587, 0.114)


def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[N]`` factors -> ``[N, 1, 1, 1]`` in ``x``'s dtype and device."""
    return f.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``; ``[N, 3, H, W] -> [N, 1, H, W]``."""
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * x, 0, 1)`` per sample (torchvision blends with a black image)."""
    return (_per_sample(factor, x) * x).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * x + (1 - f) * mean(gray(x)), 0, 1)`` with one mean per sample."""
    f = _per_sample(factor, x)
    mean = torch.mean(rgb_to_grayscale(x), dim=(-3, -2, -1), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * x + (1 - f) * gray(x), 0, 1)`` per sample."""
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp_(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_rgb2hsv`` (itself Pillow's ``Convert.c`` formulas in float); ``[N, 3, H, W]``."""
    r, g, b = x.unbind(dim=-3)
    maxc = torch.max(x, dim=-3).values
    minc = torch.min(x, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_hsv2rgb``, selecting each channel's value with ``where`` instead of its one-hot
    einsum (the same values, without a ``[N, 6, 3, H, W]`` intermediate)."""
    h, s, v = hsv.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # sector i:  0  1  2  3  4  5
    # R          v  q  p  p  t  v
    # G          t  v  v  q  p  p
    # B          p  p  t  v  v  q
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, q, torch.where(i == 4, t, p)))
    g = torch.where(i == 0, t, torch.where((i == 1) | (i == 2), v, torch.where(i == 3, q, p)))
    b = torch.where(i <= 1, p, torch.where(i == 2, t, torch.where(i == 5, q, v)))
    return torch.stack((r, g, b), dim=-3)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the HSV hue by ``shift`` (in turns, [-0.5, 0.5]) per sample: RGB -> HSV -> RGB."""
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + shift.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def grayscale3(x: torch.Tensor) -> torch.Tensor:
    """3-channel grayscale (``rgb_to_grayscale(img, num_output_channels=3)``)."""
    return rgb_to_grayscale(x).expand(x.shape).contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place (``mean``, ``std``: ``[3]`` on ``x``'s device)."""
    return x.sub_(mean.reshape(1, -1, 1, 1)).div_(std.reshape(1, -1, 1, 1))


# ----------------------------------------------------------------------------------------------- blur
PIL_BLUR_PASSES = 3


def pil_box_radius(sigma: torch.Tensor, passes: int = PIL_BLUR_PASSES) -> torch.Tensor:
    """Pillow's ``_gaussian_blur_radius``: the (fractional) box radius ``l + a`` whose ``passes``-fold
    extended box filter has variance ``sigma**2``, computed in float32 like Pillow's C floats."""
    sigma = sigma.to(torch.float32)
    sigma2 = sigma * sigma / passes
    length = torch.sqrt(12.0 * sigma2 + 1.0)
    l_int = torch.floor((length - 1.0) / 2.0)
    a = (2 * l_int + 1) * (l_int * (l_int + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (l_int + 1) * (l_int + 1)))
    return l_int + a


def pil_box_weights(radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The taps of one pass (``ImagingHorizontalBoxBlur``): ``ww`` for the ``2 * int(r) + 1`` inner pixels
    and ``fw`` for each of the two pixels at distance ``int(r) + 1``; Pillow's 24-bit fixed-point weights
    (``ww = floor(2**24 / (2 r + 1))`` with the division in float32 as in C, ``fw = (2**24 - (2 int(r) + 1)
    ww) // 2``) divided by ``2**24``."""
    radius = radius.to(torch.float32)
    r_int = torch.floor(radius).double()
    # C: (UINT32)(1 << 24) / (floatRadius * 2 + 1) divides in single precision, then truncates
    ww = torch.floor(16777216.0 / (radius * 2 + 1)).double()
    fw = torch.floor((16777216.0 - (r_int * 2 + 1) * ww) / 2)  # UINT32 arithmetic, exact in double
    return (ww / 16777216.0).float(), (fw / 16777216.0).float()


def kernel_half_width(sigma: torch.Tensor) -> int:
    """``max(int(r)) + 1`` over the samples' box radii ``r`` (:func:`pil_box_radius`): the half-width of the
    kernels :func:`box_kernels` makes for ``sigma``. Pass the radii as the loader made them (CPU): on a device
    tensor this reads a value back to the host (a synchronisation). A radius within 1e-4 below an integer
    counts as that integer, so a last-ulp difference between host and device float32 arithmetic can only add a
    zero tap, never cut one."""
    if sigma.numel() == 0:
        return 1
    radius = pil_box_radius(sigma.detach().cpu())
    return int(torch.floor(radius.max() + 1e-4)) + 1


def box_kernels(sigma: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """One 1-D pass kernel per sample, ``[N, K]`` with ``K = 2 * half + 1``, zero-padded and centred; ``half``
    must be at least :func:`kernel_half_width` of ``sigma`` (None: computed from ``sigma``, a host read when it
    is on a device)."""
    radius = pil_box_radius(sigma)
    r_int = torch.floor(radius).to(torch.int64)
    half = kernel_half_width(sigma) if half is None else int(half)
    ww, fw = pil_box_weights(radius)
    offsets = torch.arange(-half, half + 1, device=sigma.device).abs().unsqueeze(0)  # [1, K]
    r_col = r_int.unsqueeze(1)
    return torch.where(offsets <= r_col, ww.unsqueeze(1),
                       torch.where(offsets == r_col + 1, fw.unsqueeze(1), torch.zeros_like(ww).unsqueeze(1)))


def _box_pass_w(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """One pass along W with per-sample kernels ``[N, K]``: replicate-pad, then a depthwise (grouped)
    convolution over all ``N * C`` planes at once."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    padded = nnf.pad(x, (k // 2, k // 2, 0, 0), mode="replicate").reshape(1, n * c, h, w + k - 1)
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0).reshape(n * c, 1, 1, k)
    return nnf.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def pil_gaussian_blur_passes(x: torch.Tensor, sigma: torch.Tensor, round_each_pass: bool = False,
                             half: int | None = None) -> torch.Tensor:
    """Pillow's algorithm transcribed pass by pass: three grouped-convolution passes along W, then three
    along H, each replicate-padded. With ``round_each_pass`` (``x`` in uint8 levels 0..255) it also rounds
    like Pillow's ``SAVE`` macro after every pass and then equals Pillow bit for bit; this is the reference
    the tests check :func:`pil_gaussian_blur` and Pillow against, and benchmark option (i)."""
    kernels = box_kernels(sigma.to(device=x.device), half)

    def passes(y):
        for _ in range(PIL_BLUR_PASSES):
            y = _box_pass_w(y, kernels)
            if round_each_pass:
                y = torch.floor(y + 0.5)
        return y

    return passes(passes(x).transpose(-1, -2)).transpose(-1, -2).contiguous()


def box_blur_matrices(size: int, sigma: torch.Tensor, dtype: torch.dtype = torch.float32,
                      half: int | None = None) -> torch.Tensor:
    """The three replicate-border passes along one axis of length ``size`` as one matrix per sample:
    ``A = M^3`` with ``M[x, clamp(x + o)] += kernel[o]``; ``[N, size, size]`` (``half``: see :func:`box_kernels`)."""
    kernels = box_kernels(sigma, half).to(dtype)
    n, k = kernels.shape
    half = k // 2
    pos = torch.arange(size, device=sigma.device)
    cols = (pos.unsqueeze(1) + torch.arange(-half, half + 1, device=sigma.device)).clamp_(0, size - 1)
    m = torch.zeros(n, size, size, dtype=dtype, device=sigma.device)
    m.scatter_add_(2, cols.unsqueeze(0).expand(n, size, k), kernels.unsqueeze(1).expand(n, size, k).contiguous())
    return torch.bmm(torch.bmm(m, m), m)


def pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """Pillow's ``GaussianBlur(radius=sigma)`` per sample, in float: three extended-box passes along W, then
    three along H, the border pixel repeated at every pass (as ``ImagingLineBoxBlur`` does).

    The three passes of an axis are composed into one matrix per sample (:func:`box_blur_matrices`), so
    the blur is two batched matrix products, ``A_H @ x @ A_W^T``, with each sample's own radius and no loop
    over samples. Pillow rounds to uint8 after each of its six passes; this does not (the difference is
    measured in the tests and stated in docs/data.md). ``sigma == 0`` is the identity, like Pillow's
    ``radius == 0``. Under TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``) add about 0.1 uint8
    levels of error.

    Shapes: ``x`` ``[N, C, H, W]`` float, ``sigma`` ``[N]``. ``half``: the kernels' half-width,
    :func:`kernel_half_width` of the radii computed on the host; None computes it from ``sigma``, which reads a
    value back to the host when ``sigma`` is on a device (the device stage passes it, see
    :class:`scaleclr.data.device_augment.BlurOp`).
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    sigma = sigma.to(device=x.device)
    half = kernel_half_width(sigma) if half is None else half
    a_w = box_blur_matrices(w, sigma, x.dtype, half)
    a_h = a_w if h == w else box_blur_matrices(h, sigma, x.dtype, half)
    y = torch.bmm(x.reshape(n, c * h, w), a_w.transpose(1, 2)).reshape(n, c, h, w)
    return torch.matmul(a_h.unsqueeze(1), y)
