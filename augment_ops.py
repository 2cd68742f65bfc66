"""Batched image kernels: whole (B, C, H, W) batches with per-sample parameters, on any device.

Each kernel mirrors a ``torchvision.transforms.v2.functional`` op (the tests compare them): geometry
builds torchvision's inverse affine matrix and sampling grid per sample; colour ops blend as
torchvision's ``_blend``; blur uses its 1-D kernel with reflect padding; the learned policies' ops
reproduce torchvision's uint8 kernels (rounding and truncation included) on float images holding
integer values 0..255.

No kernel builds a tensor from Python values or reads a tensor back to the host: constants (channel
statistics, sampling grids, pixel indices, kernels, the policies' sampling tables) are made once per
device and dtype and cached, so an accelerator never waits on the host. ``count_host_syncs`` counts
the calls that would make it wait (tests and benchmarks assert zero per training step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# torchvision's rgb_to_grayscale weights (ITU-R BT.601 as torchvision rounds them); every luma in the
# project uses these.
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# Constants made once per device and dtype.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as a cached (1, C, 1, 1) tensor on ``device``."""
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


@functools.lru_cache(maxsize=64)
def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torchvision's _affine_grid base: centred pixel coordinates (x, y, 1) of the output, (1, H*W, 3)."""
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=device, dtype=dtype)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=device, dtype=dtype)
    ones = torch.ones(height, width, device=device, dtype=dtype)
    base = torch.stack([xs.expand(height, width), ys.view(-1, 1).expand(height, width), ones], dim=-1)
    return base.view(1, height * width, 3)


@functools.lru_cache(maxsize=64)
def _grid_constants(height: int, width: int, device: torch.device, dtype: torch.dtype):
    """(half size (0.5 W, 0.5 H), -half size, 0.5 + half size): the grid's rescaling and fill-mask constants."""
    half = torch.tensor([0.5 * width, 0.5 * height], dtype=dtype, device=device)
    return half, -half, half + 0.5


@functools.lru_cache(maxsize=64)
def _pixel_index(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (1, H, 1) and column indices (1, 1, W)."""
    rows = torch.arange(height, device=device).view(1, -1, 1)
    return rows, torch.arange(width, device=device).view(1, 1, -1)


@functools.lru_cache(maxsize=64)
def _kernel_positions(kernel_size: int, device: torch.device) -> torch.Tensor:
    """torchvision's Gaussian kernel sample positions (1, K)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    return torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=device).view(1, -1)


@functools.lru_cache(maxsize=16)
def _sharpness_kernel(channels: int, device: torch.device) -> torch.Tensor:
    """torchvision's adjust_sharpness smoothing kernel (1 at the edges, 5 in the middle, / 13): (C, 1, 3, 3)."""
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=device)
    return kernel.expand(channels, 1, 3, 3).contiguous()


# --------------------------------------------------------------------------------------------
# Conversions and normalization.
# --------------------------------------------------------------------------------------------


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] exactly as torchvision's ToDtype(scale=True); float -> float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.to(torch.float32)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 (round, clamp)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def normalize_batch(x: torch.Tensor, mean, std, *, inplace: bool = False) -> torch.Tensor:
    """(x - mean) / std per channel, torchvision's normalize; the only normalizer of the project.

    ``mean``, ``std``: sequences of floats; their device tensors are cached (no per-batch copies).
    """
    mean_t = channel_constant(tuple(float(m) for m in mean), x.device, x.dtype)
    std_t = channel_constant(tuple(float(s) for s in std), x.device, x.dtype)
    return (x.sub_(mean_t) if inplace else x.sub(mean_t)).div_(std_t)


# --------------------------------------------------------------------------------------------
# Geometry.
# --------------------------------------------------------------------------------------------


def _fill_mask(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear weight that an all-ones image gets at each sampling point: (B, H, W, 2) -> (B, 1, H, W).

    torchvision's fill blend resamples a channel of ones with zero padding; per axis that is 1 inside
    the pixel centres [0, size-1] and falls linearly to 0 one pixel outside. With align_corners=False
    the pixel coordinate is ((g + 1) * size - 1) / 2, so min(pix + 1, size - pix) = size/2 (1 - |g|) + 1/2.
    """
    _, neg_half, offset = _grid_constants(height, width, grid.device, grid.dtype)
    coverage = grid.abs().mul_(neg_half).add_(offset).clamp_(0.0, 1.0)  # (B, H, W, 2)
    return (coverage[..., 0] * coverage[..., 1]).unsqueeze(1)


def _inverse_affine_matrix(angle, translate, scale, flip) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix (centre 0, no shear) per sample: (B, 2, 3), float32.

    Maps output to input pixels in centred coordinates:
    [cos, sin, -(cos tx + sin ty); -sin, cos, sin tx - cos ty] / scale. A flip before the warp
    negates the input's x coordinate, i.e. the first row.
    """
    rad = torch.deg2rad(angle.float())  # (B,)
    inv_scale = 1.0 / scale.float() if scale is not None else torch.ones_like(rad)
    cos, sin = torch.cos(rad) * inv_scale, torch.sin(rad) * inv_scale
    tx, ty = translate.float().unbind(1) if translate is not None else (torch.zeros_like(rad),) * 2
    row0 = torch.stack([cos, sin, -(cos * tx + sin * ty)], dim=1)  # (B, 3)
    row1 = torch.stack([-sin, cos, sin * tx - cos * ty], dim=1)
    if flip is not None:
        row0 = torch.where(flip.view(-1, 1), -row0, row0)
    return torch.stack([row0, row1], dim=1)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's _affine_grid for a batch of matrices: (B, 2, 3) -> sampling grid (B, H, W, 2).

    Centred pixel coordinates of the output times theta^T, divided by half the size, as torchvision does.
    """
    base = _base_grid(height, width, theta.device, theta.dtype)  # (1, H*W, 3)
    half, _, _ = _grid_constants(height, width, theta.device, theta.dtype)
    rescaled = theta.transpose(1, 2) / half  # (B, 3, 2)
    return torch.matmul(base, rescaled).view(-1, height, width, 2)


def affine_batch(
    x: torch.Tensor,
    angle: torch.Tensor,
    translate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    flip: torch.Tensor | None = None,
    fill: float = 0.0,
) -> torch.Tensor:
    """Per-sample ``v2.functional.affine`` (bilinear, about the centre, no shear) on (B, C, H, W).

    angle (B,) degrees clockwise as in torchvision's affine; translate (B, 2) pixels (tx, ty);
    scale (B,). ``flip`` (B,) bool mirrors those inputs first (a flip folded into the same warp).
    ``fill`` follows torchvision's blend ``(sample - fill) * mask + fill`` with the resampled
    coverage mask (for fill=0 this is sample * mask).
    """
    h, w = x.shape[-2:]
    theta = _inverse_affine_matrix(angle, translate, scale, flip).to(x.dtype)  # (B, 2, 3)
    grid = affine_grid(theta, h, w)  # (B, H, W, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = _fill_mask(grid, h, w)  # (B, 1, H, W)
    if fill == 0.0:
        return out.mul_(mask)
    return out.sub_(fill).mul_(mask).add_(fill)


def rotate_batch(
    x: torch.Tensor, angle: torch.Tensor, *, flip: torch.Tensor | None = None, fill: float = 0.0
) -> torch.Tensor:
    """Per-sample ``v2.functional.rotate`` (bilinear, about the centre); angle (B,) degrees, anticlockwise."""
    return affine_batch(x, -angle, flip=flip, fill=fill)  # torchvision's rotate passes -angle to the matrix


def hflip_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where ``flip`` (B,) is True."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


# --------------------------------------------------------------------------------------------
# Colour, blur, noise, erasing.
# --------------------------------------------------------------------------------------------


def luma(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale (LUMA_WEIGHTS), float: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2]).unsqueeze(1)


def jitter_batch(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    contrast_first: torch.Tensor,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-sample brightness and contrast adjustment, each clamped to [0, 1], in a per-sample order.

    brightness: x * f; contrast: f * x + (1 - f) * mean(grayscale(x)) (torchvision's _blend).
    Each is ``x * s + t`` clamped, so each of the two passes picks s, t per sample.
    """
    first_c = contrast_first.view(-1, 1, 1, 1)
    fb = brightness.view(-1, 1, 1, 1).to(x.dtype)
    fc = contrast.view(-1, 1, 1, 1).to(x.dtype)
    zero = torch.zeros_like(fb)
    # First pass: contrast where contrast_first, else brightness.
    shift = torch.where(first_c, (1.0 - fc) * luma(x).mean(dim=(1, 2, 3), keepdim=True), zero)
    factor = torch.where(first_c, fc, fb)
    x = (x.mul_(factor) if inplace else x.mul(factor)).add_(shift).clamp_(0.0, 1.0)
    # Second pass: the other one (contrast uses the mean of the image as it is now).
    shift = torch.where(first_c, zero, (1.0 - fc) * luma(x).mean(dim=(1, 2, 3), keepdim=True))
    return x.mul_(torch.where(first_c, fb, fc)).add_(shift).clamp_(0.0, 1.0)


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel per sample: sigma (B,) -> (B, kernel_size)."""
    pos = _kernel_positions(kernel_size, sigma.device)  # (1, K)
    return torch.softmax(-(pos / sigma.float().view(-1, 1)).pow(2), dim=1)


def blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample ``v2.functional.gaussian_blur`` (same sigma on both axes, reflect padding).

    As torchvision: the 2-D kernel is the outer product of the 1-D one; one grouped convolution
    with a kernel per image channel (B*C groups) blurs the whole batch.
    """
    b, c, h, w = x.shape
    k1 = gaussian_kernel1d(sigma, kernel_size).to(x.dtype)  # (B, K)
    k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).repeat_interleave(c, dim=0)  # (B*C, K, K): rows y, columns x
    half = kernel_size // 2
    flat = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")  # (1, B*C, H+2r, W+2r)
    return F.conv2d(flat, k2.unsqueeze(1), groups=b * c).view(b, c, h, w)


def box_mask(boxes: torch.Tensor, active: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean (B, 1, H, W) mask of boxes (B, 4) = (top, left, box height, box width) where ``active``."""
    top, left, bh, bw = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    rows, cols = _pixel_index(height, width, boxes.device)
    in_rows = (rows >= top) & (rows < top + bh) & active.view(-1, 1, 1)  # (B, H, 1)
    in_cols = (cols >= left) & (cols < left + bw)  # (B, 1, W)
    return (in_rows & in_cols).unsqueeze(1)


def noise_batch(x: torch.Tensor, noise: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Additive noise (B, C, H, W) clamped to [0, 1], as ``v2.functional.gaussian_noise`` with clip."""
    return (x.add_(noise) if inplace else x.add(noise)).clamp_(0.0, 1.0)


def erase_batch(
    x: torch.Tensor, boxes: torch.Tensor, active: torch.Tensor, value: torch.Tensor | float, *,
    inplace: bool = False,
) -> torch.Tensor:
    """``v2.functional.erase`` per sample: each active box takes ``value`` (a number or a tensor that
    broadcasts to (B, C, H, W))."""
    mask = box_mask(boxes, active, x.shape[-2], x.shape[-1])
    if not isinstance(value, torch.Tensor):
        return x.masked_fill_(mask, value) if inplace else x.masked_fill(mask, value)
    return torch.where(mask, value, x, out=x if inplace else None)


# --------------------------------------------------------------------------------------------
# The learned policies' ops (AutoAugment, RandAugment, TrivialAugmentWide), one op per sample.
# Images are float (B, 3, H, W) holding torchvision's uint8 values 0..255; each op rounds or truncates
# as torchvision's uint8 kernel does, so the batch stays on the uint8 grid between ops.
# --------------------------------------------------------------------------------------------

POLICY_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
              "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
_OP = {name: index for index, name in enumerate(POLICY_OPS)}


def _is(op: torch.Tensor, name: str) -> torch.Tensor:
    return op == _OP[name]


def _wide(magnitude: torch.Tensor) -> torch.Tensor:
    """The magnitude in float64, as torchvision's Python floats compute with it (float32 on MPS, which
    has no float64: a value on a rounding boundary may then land one uint8 step away)."""
    return magnitude.float() if magnitude.device.type == "mps" else magnitude.double()


def _policy_matrix(op: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's _get_inverse_affine_matrix per sample for the geometric policy ops: (B, 2, 3), float32.

    Computed in float64 from the float32 magnitude, as torchvision computes it in Python floats. Shears
    turn about the top-left corner (centre [0, 0]); translations truncate to whole pixels (int());
    rotate passes -(angle mod 360). Non-geometric ops get the identity.
    """
    m = _wide(magnitude)
    zero = torch.zeros_like(m)
    shear = _is(op, "ShearX") | _is(op, "ShearY")
    shear_deg = torch.rad2deg(torch.atan(m))
    sx = torch.deg2rad(torch.where(_is(op, "ShearX"), shear_deg, zero))
    sy = torch.deg2rad(torch.where(_is(op, "ShearY"), shear_deg, zero))
    rot = torch.deg2rad(torch.where(_is(op, "Rotate"), -torch.remainder(m, 360.0), zero))
    tx = torch.where(_is(op, "TranslateX"), torch.trunc(m), zero)
    ty = torch.where(_is(op, "TranslateY"), torch.trunc(m), zero)
    cx = torch.where(shear, zero - 0.5 * width, zero)
    cy = torch.where(shear, zero - 0.5 * height, zero)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    row0 = torch.stack([d, -b, cx - d * (cx + tx) + b * (cy + ty)], dim=1)  # (B, 3)
    row1 = torch.stack([-c, a, cy + c * (cx + tx) - a * (cy + ty)], dim=1)
    return torch.stack([row0, row1], dim=1).float()


def _policy_warp(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate, nearest, zero outside (the policies' defaults): one grid for the batch."""
    h, w = x.shape[-2:]
    grid = affine_grid(_policy_matrix(op, magnitude, h, w), h, w)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False).round_()


def _sharpness_blur(x: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness's rounded smoothing inside a one-pixel border; the border keeps x."""
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, _sharpness_kernel(x.shape[1], x.device), groups=x.shape[1]).round_()
    return out


def _factors(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, 1 - r) for r = 1 + magnitude, in float64 then float32 (torchvision's Python floats): (B, 1, 1, 1) each."""
    ratio = 1.0 + _wide(magnitude)
    return ratio.float().view(-1, 1, 1, 1), (1.0 - ratio).float().view(-1, 1, 1, 1)


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    """The clamp and truncating cast of torchvision's uint8 blends, staying float."""
    return x.clamp_(0.0, 255.0).floor_()


def _brightness(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    ratio, _ = _factors(magnitude)
    return _as_uint8(x.mul(ratio))


def _color(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """adjust_saturation: _blend with the truncated grayscale; addcmul rounds as _blend's add_(alpha=)."""
    ratio, rest = _factors(magnitude)
    return _as_uint8(torch.addcmul(x.mul(ratio), luma(x).floor_(), rest))


def _contrast(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """adjust_contrast: _blend with the mean of the truncated grayscale."""
    ratio, rest = _factors(magnitude)
    mean = luma(x).floor_().mean(dim=(1, 2, 3), keepdim=True)
    return _as_uint8(torch.addcmul(x.mul(ratio), mean, rest))


def _sharpness(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """adjust_sharpness: x + (1 - r)(blur - x) inside a one-pixel border (the border keeps x)."""
    _, rest = _factors(magnitude)
    blur = x.clone()
    blur[..., 1:-1, 1:-1] = F.conv2d(x, _sharpness_kernel(x.shape[1], x.device), groups=x.shape[1]).round_()
    return _as_uint8(torch.addcmul(x, blur.sub_(x), rest))


def _posterize(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits: floor(x / 2^(8 - bits)) * 2^(8 - bits)."""
    shift = torch.exp2(8.0 - magnitude).view(-1, 1, 1, 1)
    return x.div(shift).floor_().mul_(shift)


def _solarize(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above 255 * magnitude (the uint8 bound times the drawn fraction)."""
    threshold = _wide(magnitude).mul(255.0).float().view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255.0 - x, x)


def _invert(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def _autocontrast(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """autocontrast on uint8 values: per channel (x - min) * 255 / (max - min), truncated; flat channels kept."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, torch.ones_like(low), (high - low).mul_(1.0 / 255))
    low = torch.where(flat, torch.zeros_like(low), low)
    return (x - low).div_(inv_scale).clamp_(0.0, 255.0).floor_()


def _equalize(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize (PIL's lookup table) per image channel on uint8 values."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w).long()  # (B, C, HW)
    hist = torch.zeros(b, c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat))
    cum = hist.cumsum(-1)  # (B, C, 256)
    last = cum.argmax(-1, keepdim=True)  # the image's largest value
    step = (h * w - hist.gather(-1, last)).div_(255, rounding_mode="floor")  # (B, C, 1)
    lut = (cum[..., :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = F.pad(lut, (1, 0))  # lut[0] = 0
    equalized = lut.gather(-1, flat).view(b, c, h, w).to(x.dtype)
    return torch.where((step != 0).view(b, c, 1, 1), equalized, x)


# Each family of policy ops: (op names, kernel(x, op, magnitude) for the samples given).
_POLICY_FAMILIES = (
    (("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"), _policy_warp),
    (("Brightness",), _brightness), (("Color",), _color), (("Contrast",), _contrast), (("Sharpness",), _sharpness),
    (("Posterize",), _posterize), (("Solarize",), _solarize), (("AutoContrast",), _autocontrast),
    (("Equalize",), _equalize), (("Invert",), _invert),
)


def policy_op_batch(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, *, masked: bool = True
                    ) -> torch.Tensor:
    """One policy op per sample: x float (B, 3, H, W) with uint8 values, op (B,) long index into
    POLICY_OPS, magnitude (B,) float32 as torchvision draws it (signed). Returns the same layout.

    ``masked`` (the accelerator way): every family is computed for the whole batch and each sample
    picks its own with a mask, no host sync. Otherwise (the CPU way) each family runs on the samples
    that drew it only, gathered by index.
    """
    out = x.clone()
    for names, kernel in _POLICY_FAMILIES:
        chosen = functools.reduce(torch.logical_or, [op == _OP[name] for name in names])  # (B,)
        if masked:
            out = torch.where(chosen.view(-1, 1, 1, 1), kernel(x, op, magnitude), out)
            continue
        index = chosen.nonzero().flatten()
        if index.numel():
            out.index_copy_(0, index, kernel(x[index], op[index], magnitude[index]))
    return out


# AutoAugment's SVHN policy (torchvision's AutoAugmentPolicy.SVHN): 25 sub-policies of two
# (op, probability, magnitude bin) steps.
SVHN_POLICY = (
    (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
    (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
    (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
    (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
    (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
    (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
    (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
    (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
    (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
    (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
    (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
)
# RandAugment and TrivialAugmentWide draw among the first 14 ops (all but Invert), uniformly.
WIDE_OPS = 14
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                     "Contrast", "Sharpness"})


def policy_magnitudes(policy: str, bins: int, height: int, width: int) -> torch.Tensor:
    """torchvision's magnitude bins of every op in POLICY_OPS for ``policy``: float32 (len(POLICY_OPS), bins).

    The same formulas (torch.linspace in float32) as torchvision's _AUGMENTATION_SPACE; ops without a
    magnitude get zeros. TrivialAugmentWide uses its wider ranges.
    """
    wide = policy == "trivialaugment"
    shear, tone, rotate = (0.99, 0.99, 135.0) if wide else (0.3, 0.9, 30.0)
    shift_x, shift_y = (32.0, 32.0) if wide else (150.0 / 331.0 * width, 150.0 / 331.0 * height)
    spans = {"ShearX": shear, "ShearY": shear, "TranslateX": shift_x, "TranslateY": shift_y, "Rotate": rotate,
             **dict.fromkeys(("Brightness", "Color", "Contrast", "Sharpness"), tone)}
    table = torch.zeros(len(POLICY_OPS), bins)
    for index, name in enumerate(POLICY_OPS):
        if name in spans:
            table[index] = torch.linspace(0.0, spans[name], bins)
        elif name == "Posterize":
            table[index] = (8 - (torch.arange(bins) / ((bins - 1) / (6 if wide else 4)))).round().int().float()
        elif name == "Solarize":
            table[index] = torch.linspace(1.0, 0.0, bins)
    return table


@functools.lru_cache(maxsize=32)
def policy_tables(policy: str, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The policy's sampling tables on ``device``, made once: magnitudes, signed ops, and for AutoAugment
    the sub-policies' ops, probabilities and magnitude bins (25, 2)."""
    bins = 10 if policy == "autoaugment_svhn" else 31
    tables = {"magnitudes": policy_magnitudes(policy, bins, height, width),
              "signed": torch.tensor([name in SIGNED_OPS for name in POLICY_OPS])}
    if policy == "autoaugment_svhn":
        tables["steps_op"] = torch.tensor([[POLICY_OPS.index(op) for op, _, _ in sub] for sub in SVHN_POLICY])
        tables["steps_p"] = torch.tensor([[p for _, p, _ in sub] for sub in SVHN_POLICY], dtype=torch.float32)
        tables["steps_bin"] = torch.tensor([[b or 0 for _, _, b in sub] for sub in SVHN_POLICY])
    return {key: value.to(device) for key, value in tables.items()}


# --------------------------------------------------------------------------------------------
# Counting host syncs (the accelerator path must have none).
# --------------------------------------------------------------------------------------------

# Calls that wait for the device (a value read back, or an output whose size depends on the data).
_SYNC_CALLS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.argwhere, torch.argwhere,
    torch.Tensor.masked_select, torch.masked_select, torch.Tensor.unique, torch.unique, torch.unique_consecutive,
    torch.Tensor.bincount, torch.bincount, torch.Tensor.cpu, torch.Tensor.numpy,
}
# Tensors built from Python data (on an accelerator: a blocking host-to-device copy).
_HOST_DATA_CALLS = {
    torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy, torch.scalar_tensor, torch.full,
    torch.Tensor.new_tensor, torch.Tensor.new_full,
}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}


def _bool_index(args) -> bool:
    """Whether an indexing call's index holds a boolean tensor (a data-dependent shape)."""
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


@dataclass
class SyncCount:
    """What ``count_host_syncs`` saw: each event as "kind: function" ("sync" or "host data")."""

    events: list[str] = dataclasses.field(default_factory=list)

    @property
    def syncs(self) -> int:
        return sum(event.startswith("sync") for event in self.events)

    @property
    def host_data(self) -> int:
        return sum(event.startswith("host data") for event in self.events)

    @property
    def total(self) -> int:
        return len(self.events)


class _SyncCounterMode(TorchFunctionMode):
    def __init__(self, count: SyncCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if func in _SYNC_CALLS or (func is torch.where and len(args) + len(kwargs) == 1):
            self.count.events.append(f"sync: {name}")
        elif func in _INDEXING and _bool_index(args):
            self.count.events.append(f"sync: {name} with a boolean index")
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and any(
                isinstance(a, torch.Tensor) for a in args[1:2]) and "output_size" not in kwargs:
            self.count.events.append(f"sync: {name} with tensor repeats")
        elif func in _HOST_DATA_CALLS:
            self.count.events.append(f"host data: {name}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """Count, inside the block, calls that make the host wait for an accelerator or copy Python data to it.

    Counted (as ``torch.overrides`` sees them, so it works on the CPU as a proxy): ``.item()``,
    ``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor, ``nonzero``, ``masked_select``, ``unique``,
    ``bincount``, ``.cpu()``, boolean-mask indexing, one-argument ``torch.where``, ``repeat_interleave``
    with tensor repeats; and tensors built from Python data (``torch.tensor``, ``as_tensor``, ``full`` ...).
    Yields a ``SyncCount``; ``.total`` should be 0 for a training step on the accelerator path.
    """
    count = SyncCount()
    with _SyncCounterMode(count):
        yield count
