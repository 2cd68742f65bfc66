"""The study's augmentation stages, defined once and applied two ways.

``STAGE_SPECS`` maps every stage name to a tuple of op specs (small frozen dataclasses
holding the original study's values). Two engines read it:

- the per-sample path (``build_stage_transform``, ``stage1_basic`` ... ``stage5_occlusion``,
  ``ProbTransform``): torchvision v2 transforms on PIL images, one image at a time, as the
  original study ran them inside DataLoader workers;
- the batched path (``BatchAugment``): per-sample random parameters drawn in vectorized calls
  from a ``torch.Generator`` with torchvision's distributions, then applied to a whole
  (B, 3, H, W) batch on any device with masks and ``torch.where``.

The batched ops mirror torchvision's tensor kernels (``torchvision.transforms.v2.functional``
on float images): rotation/affine use torchvision's inverse matrix about the image centre,
bilinear sampling with ``align_corners=False`` and its fill-mask blend; colour jitter blends with
zeros (brightness) or the grayscale mean (contrast); blur uses torchvision's 1-D kernel with reflect
padding. One deliberate difference: geometry on uint8 input is not rounded back to uint8 between
ops (torchvision's uint8 kernels round after each op); the batch stays float in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import config

# --------------------------------------------------------------------------------------------
# Op specs: plain frozen dataclasses, validated on construction.
# --------------------------------------------------------------------------------------------


def _check_interval(name: str, pair: tuple[float, float], lo: float, hi: float) -> None:
    """An ordered pair inside [lo, hi]."""
    config.require(
        len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi,
        f"{name} must be an ordered pair inside [{lo}, {hi}], got {pair}",
    )


@dataclass(frozen=True)
class HFlip:
    """Horizontal flip with probability ``p``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        config.require(0.0 <= self.p <= 1.0, f"HFlip.p must lie in [0, 1], got {self.p}")


@dataclass(frozen=True)
class Rotate:
    """Rotation by U(-degrees, degrees) about the centre, bilinear, constant ``fill``."""

    degrees: float = 15.0
    fill: float = 0.0

    def __post_init__(self) -> None:
        config.require(0.0 <= self.degrees <= 180.0, f"Rotate.degrees must lie in [0, 180], got {self.degrees}")
        config.require(0.0 <= self.fill <= 1.0, f"Rotate.fill must lie in [0, 1], got {self.fill}")


@dataclass(frozen=True)
class Affine:
    """Rotation, integer translation (fraction of width, height) and scaling, bilinear."""

    degrees: float = 15.0
    translate: tuple[float, float] = (0.1, 0.1)
    scale: tuple[float, float] = (0.9, 1.1)
    fill: float = 0.0

    def __post_init__(self) -> None:
        config.require(0.0 <= self.degrees <= 180.0, f"Affine.degrees must lie in [0, 180], got {self.degrees}")
        config.require(
            len(self.translate) == 2 and all(0.0 <= t <= 1.0 for t in self.translate),
            f"Affine.translate must be two fractions in [0, 1], got {self.translate}",
        )
        _check_interval("Affine.scale", self.scale, 1e-3, 10.0)
        config.require(0.0 <= self.fill <= 1.0, f"Affine.fill must lie in [0, 1], got {self.fill}")


@dataclass(frozen=True)
class ColorJitter:
    """Brightness and contrast factors U(1 - b, 1 + b), U(1 - c, 1 + c), in random order."""

    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            config.require(0.0 <= value <= 1.0, f"ColorJitter.{name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur, odd ``kernel`` size, sigma ~ U(sigma), reflect padding."""

    kernel: int = 3
    sigma: tuple[float, float] = (0.1, 1.2)

    def __post_init__(self) -> None:
        config.require(
            isinstance(self.kernel, int) and self.kernel % 2 == 1 and 1 <= self.kernel <= 31,
            f"GaussianBlur.kernel must be an odd integer in [1, 31], got {self.kernel}",
        )
        _check_interval("GaussianBlur.sigma", self.sigma, 1e-3, 100.0)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive N(0, std) noise per pixel on [0, 1] images, clamped back to [0, 1]."""

    std: float = 0.03

    def __post_init__(self) -> None:
        config.require(0.0 <= self.std <= 1.0, f"GaussianNoise.std must lie in [0, 1], got {self.std}")


@dataclass(frozen=True)
class Normalize:
    """Marks where the per-channel normalization happens (the stage's mean and std)."""


@dataclass(frozen=True)
class Erase:
    """Random erasing after normalization: one box, ``value`` a constant or "random" N(0, 1) pixels."""

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.15)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float | str = "random"

    def __post_init__(self) -> None:
        config.require(0.0 <= self.p <= 1.0, f"Erase.p must lie in [0, 1], got {self.p}")
        _check_interval("Erase.scale", self.scale, 1e-6, 1.0)
        _check_interval("Erase.ratio", self.ratio, 1e-3, 1e3)
        config.require(
            self.value == "random" or isinstance(self.value, (int, float)),
            f"Erase.value must be a number or 'random', got {self.value!r}",
        )


@dataclass(frozen=True)
class LearnedPolicy:
    """One of torchvision's learned policies with its defaults (AutoAugment uses the SVHN policy)."""

    name: str

    def __post_init__(self) -> None:
        config.require(
            self.name in config.POLICY_STAGES,
            f"unknown learned policy {self.name!r}; choose one of {config.POLICY_STAGES}",
        )


OpSpec = (
    HFlip | Rotate | Affine | ColorJitter | GaussianBlur | GaussianNoise | Normalize | Erase | LearnedPolicy
)

# The original study's stages (FACTS.md): stage 2 trades the rotation for an affine, later ones add ops.
_STAGE1 = (HFlip(0.5), Rotate(15.0))
_STAGE2 = (HFlip(0.5), Affine(15.0, (0.1, 0.1), (0.9, 1.1)))
_STAGE3 = _STAGE2 + (ColorJitter(0.2, 0.2),)
_STAGE4 = _STAGE3 + (GaussianBlur(3, (0.1, 1.2)), GaussianNoise(0.03))
_BASE_OPS = {
    "none": (),
    "stage1_basic": _STAGE1,
    "stage2_geometry": _STAGE2,
    "stage3_color": _STAGE3,
    "stage4_blur_noise": _STAGE4,
    "stage5_occlusion": _STAGE4 + (Normalize(), Erase(0.5, (0.02, 0.15), (0.3, 3.3), "random")),
}


def _with_normalize(ops: tuple) -> tuple:
    """Every stage normalizes; stages that erase place Normalize themselves (erasing comes after it)."""
    return ops if any(isinstance(op, Normalize) for op in ops) else ops + (Normalize(),)


STAGE_SPECS: dict[str, tuple[OpSpec, ...]] = {
    **{name: _with_normalize(ops) for name, ops in _BASE_OPS.items()},
    **{
        f"{name}{config.NOFLIP_SUFFIX}": _with_normalize(tuple(op for op in ops if not isinstance(op, HFlip)))
        for name, ops in _BASE_OPS.items()
        if name != "none"
    },
    **{name: (LearnedPolicy(name), Normalize()) for name in config.POLICY_STAGES},
}

_TENSOR_ONLY = (GaussianNoise, Normalize, Erase)  # ops that need a float tensor, not a PIL image


def validate_ops(ops: tuple) -> None:
    """Raise ConfigError unless ``ops`` is a stage the engines can run.

    Exactly one Normalize; only Erase may follow it (the other ops assume [0, 1] images); each op
    type at most once (their parameters share one dict); at most one of Rotate / Affine; a learned
    policy stands alone before Normalize.
    """
    config.require(isinstance(ops, tuple) and len(ops) > 0, f"a stage must be a non-empty op tuple, got {ops!r}")
    for op in ops:
        config.require(isinstance(op, OpSpec), f"not an op spec: {op!r}")
    types = [type(op) for op in ops]
    config.require(len(set(types)) == len(types), f"each op type may appear once in a stage, got {types}")
    config.require(not (Rotate in types and Affine in types), "a stage holds Rotate or Affine, not both")
    config.require(types.count(Normalize) == 1, "a stage needs exactly one Normalize")
    after = types[types.index(Normalize) + 1:]
    config.require(all(t is Erase for t in after), f"only Erase may follow Normalize, got {after}")
    if LearnedPolicy in types:
        config.require(types == [LearnedPolicy, Normalize], "a learned policy stage is (LearnedPolicy, Normalize)")


def stage_ops(stage: str | tuple) -> tuple[OpSpec, ...]:
    """The validated op tuple of a stage name in ``config.ALL_STAGES`` (or a custom op tuple)."""
    if isinstance(stage, tuple):
        ops = stage
    else:
        config.require(stage in STAGE_SPECS, f"unknown stage {stage!r}; choose one of {tuple(STAGE_SPECS)}")
        ops = STAGE_SPECS[stage]
    validate_ops(ops)
    return ops


def register_stage(name: str, ops: tuple) -> tuple[OpSpec, ...]:
    """Add a custom stage under ``name``: both paths and ``TrainConfig(stage=name)`` accept it.

    ``ops`` is validated like the built-in stages (a Normalize is appended when missing). The
    registration lives in this process only: worker processes must import the module that
    registers it.
    """
    config.require(name not in config.ALL_STAGES, f"{name!r} is a built-in stage; choose another name")
    ops = _with_normalize(tuple(ops))
    validate_ops(ops)
    STAGE_SPECS[name] = ops
    config.CUSTOM_STAGES.add(name)
    return ops


def _check_p_aug(p_aug: float) -> float:
    config.require(0.0 <= float(p_aug) <= 1.0, f"p_aug must lie in [0, 1], got {p_aug}")
    return float(p_aug)


# --------------------------------------------------------------------------------------------
# Per-sample path: torchvision v2 transforms on PIL images (the original study's way).
# --------------------------------------------------------------------------------------------


def _policy_transform(name: str) -> v2.Transform:
    if name == "autoaugment_svhn":
        return v2.AutoAugment(v2.AutoAugmentPolicy.SVHN)
    if name == "randaugment":
        return v2.RandAugment()
    return v2.TrivialAugmentWide()


def _torchvision_op(op: OpSpec, mean, std) -> v2.Transform:
    """The torchvision v2 transform of one op spec."""
    bilinear = v2.InterpolationMode.BILINEAR
    if isinstance(op, HFlip):
        return v2.RandomHorizontalFlip(op.p)
    if isinstance(op, Rotate):
        return v2.RandomRotation(op.degrees, interpolation=bilinear, fill=op.fill)
    if isinstance(op, Affine):
        return v2.RandomAffine(op.degrees, op.translate, op.scale, interpolation=bilinear, fill=op.fill)
    if isinstance(op, ColorJitter):
        return v2.ColorJitter(brightness=op.brightness, contrast=op.contrast)
    if isinstance(op, GaussianBlur):
        return v2.GaussianBlur(op.kernel, op.sigma)
    if isinstance(op, GaussianNoise):
        return v2.GaussianNoise(mean=0.0, sigma=op.std, clip=True)
    if isinstance(op, Normalize):
        return v2.Normalize(list(mean), list(std))
    if isinstance(op, Erase):
        return v2.RandomErasing(op.p, op.scale, op.ratio, value=op.value)
    return _policy_transform(op.name)


def build_stage_transform(stage: str, mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Per-sample transform of any stage: PIL image (or uint8 tensor) -> normalized float (3, H, W).

    PIL-capable ops run on the PIL image; the conversion to a float tensor in [0, 1] comes right
    before the first tensor-only op (noise, normalize, erase), as in the original study.
    """
    steps: list[v2.Transform] = []
    converted = False
    for op in stage_ops(stage):
        if isinstance(op, _TENSOR_ONLY) and not converted:
            steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
            converted = True
        steps.append(_torchvision_op(op, mean, std))
    steps.append(v2.ToPureTensor())  # plain tensors collate everywhere
    return v2.Compose(steps)


def get_eval_transform(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """To float tensor in [0, 1], then normalize."""
    return build_stage_transform("none", mean, std)


def stage1_basic(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Flip p=0.5, rotation +-15 degrees."""
    return build_stage_transform("stage1_basic", mean, std)


def stage2_geometry(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Flip, affine (rotation +-15, translate 0.1, scale 0.9-1.1)."""
    return build_stage_transform("stage2_geometry", mean, std)


def stage3_color(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Stage 2 plus brightness/contrast jitter 0.2."""
    return build_stage_transform("stage3_color", mean, std)


def stage4_blur_noise(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Stage 3 plus Gaussian blur (3, sigma 0.1-1.2) and noise std 0.03."""
    return build_stage_transform("stage4_blur_noise", mean, std)


def stage5_occlusion(mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
    """Stage 4, normalize, then random erasing (p 0.5, scale 0.02-0.15, noise-filled)."""
    return build_stage_transform("stage5_occlusion", mean, std)


class ProbTransform:
    """Per sample: ``aug_t`` with probability ``p_aug``, else ``base_t``.

    Draws from torch's global RNG, which DataLoader seeds per worker (as the original study ran it).
    """

    def __init__(self, base_t, aug_t, p_aug: float):
        self.base_t = base_t
        self.aug_t = aug_t
        self.p_aug = _check_p_aug(p_aug)

    def __call__(self, img):
        if torch.rand(1).item() < self.p_aug:
            return self.aug_t(img)
        return self.base_t(img)

    def __repr__(self) -> str:
        return f"ProbTransform(p_aug={self.p_aug}, aug_t={self.aug_t!r})"


# --------------------------------------------------------------------------------------------
# Batched functional ops: float images (B, C, H, W) in [0, 1], per-sample parameters (B,).
# --------------------------------------------------------------------------------------------


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] exactly as torchvision's ToDtype(scale=True); float -> float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.to(torch.float32)


def normalize_batch(x: torch.Tensor, mean, std, *, inplace: bool = False) -> torch.Tensor:
    """(x - mean) / std per channel, the same arithmetic as torchvision's normalize."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x.sub_(mean_t) if inplace else x.sub(mean_t)).div_(std_t)


def _fill_mask(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear weight that an all-ones image gets at each sampling point: (B, H, W, 2) -> (B, 1, H, W).

    torchvision's fill blend resamples a channel of ones with zero padding; per axis that is 1 inside
    the pixel centres [0, size-1] and falls linearly to 0 one pixel outside. With align_corners=False
    the pixel coordinate is ((g + 1) * size - 1) / 2, so min(pix + 1, size - pix) = size/2 (1 - |g|) + 1/2.
    """
    half = torch.tensor([-width / 2, -height / 2], dtype=grid.dtype, device=grid.device)
    coverage = grid.abs().mul_(half).add_(half.neg() + 0.5).clamp_(0.0, 1.0)  # (B, H, W, 2)
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


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's _affine_grid for a batch of matrices: (B, 2, 3) -> sampling grid (B, H, W, 2).

    Centred pixel coordinates of the output times theta^T, divided by half the size: the same grid
    ``F.affine_grid`` gives for the matrix in normalized units, computed as torchvision does.
    """
    opts = {"dtype": theta.dtype, "device": theta.device}
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, **opts)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, **opts)
    ones = torch.ones(height, width, **opts)
    base = torch.stack([xs.expand(height, width), ys.view(-1, 1).expand(height, width), ones], dim=-1)
    base = base.view(1, height * width, 3)  # (1, H*W, 3): centred x, y, 1
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height], **opts)  # (B, 3, 2)
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
    grid = _affine_grid(theta, h, w)  # (B, H, W, 2)
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


def _grayscale_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of torchvision's rgb_to_grayscale per image: (B, C, H, W) -> (B, 1, 1, 1)."""
    r, g, b = x.unbind(dim=1)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114)  # (B, H, W)
    return gray.mean(dim=(1, 2)).view(-1, 1, 1, 1)


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
    shift = torch.where(first_c, (1.0 - fc) * _grayscale_mean(x), zero)
    factor = torch.where(first_c, fc, fb)
    x = (x.mul_(factor) if inplace else x.mul(factor)).add_(shift).clamp_(0.0, 1.0)
    # Second pass: the other one (contrast uses the mean of the image as it is now).
    shift = torch.where(first_c, zero, (1.0 - fc) * _grayscale_mean(x))
    return x.mul_(torch.where(first_c, fb, fc)).add_(shift).clamp_(0.0, 1.0)


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's 1-D Gaussian kernel per sample: sigma (B,) -> (B, kernel_size)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)  # (K,)
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
    rows = torch.arange(height, device=boxes.device).view(1, -1, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    in_rows = (rows >= top) & (rows < top + bh) & active.view(-1, 1, 1)  # (B, H, 1)
    in_cols = (cols >= left) & (cols < left + bw)  # (B, 1, W)
    return (in_rows & in_cols).unsqueeze(1)


def noise_batch(x: torch.Tensor, noise: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Additive noise (B, C, H, W) clamped to [0, 1], as ``v2.functional.gaussian_noise`` with clip."""
    return (x.add_(noise) if inplace else x.add(noise)).clamp_(0.0, 1.0)


def erase_batch(
    x: torch.Tensor, boxes: torch.Tensor, active: torch.Tensor, value, *, inplace: bool = False
) -> torch.Tensor:
    """``v2.functional.erase`` per sample: each active box takes ``value`` (a number or (B, C, H, W))."""
    mask = box_mask(boxes, active, x.shape[-2], x.shape[-1])
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return torch.where(mask, value, x, out=x if inplace else None)


# --------------------------------------------------------------------------------------------
# Parameter sampling: torchvision's distributions, one vectorized draw per parameter.
# --------------------------------------------------------------------------------------------


class _Draws:
    """The random draws of one batch: ``n`` samples of ``size`` (H, W), all from ``gen``, on its device."""

    def __init__(self, n: int, size: tuple[int, int], gen: torch.Generator):
        self.n, self.size, self.gen = n, size, gen
        self._normals: torch.Tensor | None = None

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        """U(lo, hi) of shape (n, *shape)."""
        u = torch.rand((self.n, *shape), generator=self.gen, device=self.gen.device)
        return u.mul_(hi - lo).add_(lo)

    def bernoulli(self, p: float) -> torch.Tensor:
        """Bool (n,), True with probability p."""
        return torch.rand(self.n, generator=self.gen, device=self.gen.device) < p

    def normals(self) -> torch.Tensor:
        """N(0, 1) per pixel (n, 3, H, W), drawn once per batch and shared by noise and random erasing.

        Erasing overwrites the noise inside its box, so the box's values and the noise left visible
        come from disjoint pixels: independent, as with torchvision's two separate draws, at half the
        cost of the largest draw.
        """
        if self._normals is None:
            self._normals = torch.randn((self.n, 3, *self.size), generator=self.gen, device=self.gen.device)
        return self._normals


def _sample_flip(op: HFlip, draws: _Draws) -> dict:
    return {"flip": draws.bernoulli(op.p)}


def _sample_rotate(op: Rotate, draws: _Draws) -> dict:
    return {"angle": draws.uniform(-op.degrees, op.degrees)}


def _sample_affine(op: Affine, draws: _Draws) -> dict:
    h, w = draws.size
    angle = draws.uniform(-op.degrees, op.degrees)
    # torchvision: tx = int(round(U(-t * W, t * W))), ty likewise with H (integer pixels).
    max_shift = torch.tensor([op.translate[0] * w, op.translate[1] * h], device=draws.gen.device)
    translate = draws.uniform(-1.0, 1.0, 2).mul_(max_shift).round_()  # (B, 2)
    scale = draws.uniform(op.scale[0], op.scale[1])
    return {"angle": angle, "translate": translate, "scale": scale}


def _sample_jitter(op: ColorJitter, draws: _Draws) -> dict:
    # torchvision applies its four adjustments in torch.randperm(4) order; with only brightness
    # and contrast active, just their relative order matters, and in a uniform permutation either
    # comes first with probability 1/2: one Bernoulli(0.5) per sample is the same distribution.
    return {
        "brightness": draws.uniform(1.0 - op.brightness, 1.0 + op.brightness),
        "contrast": draws.uniform(1.0 - op.contrast, 1.0 + op.contrast),
        "contrast_first": draws.bernoulli(0.5),
    }


def _sample_blur(op: GaussianBlur, draws: _Draws) -> dict:
    return {"sigma": draws.uniform(op.sigma[0], op.sigma[1])}


def _sample_noise(op: GaussianNoise, draws: _Draws) -> dict:
    return {"noise": draws.normals() * op.std}  # (B, 3, H, W)


def _sample_erase(op: Erase, draws: _Draws, tries: int = 10) -> dict:
    """torchvision's RandomErasing (forward's p, then make_params), all samples and all 10 tries at once.

    Per try: area ~ U(scale) * H * W, log-ratio ~ U(log r0, log r1), h = round(sqrt(area * r)),
    w = round(sqrt(area / r)); the first try with h < H and w < W wins; the top-left corner is
    uniform over the valid positions. No accepted try: nothing is erased.
    """
    h_img, w_img = draws.size
    apply = draws.bernoulli(op.p)
    area = draws.uniform(op.scale[0], op.scale[1], tries) * (h_img * w_img)  # (B, tries)
    ratio = draws.uniform(math.log(op.ratio[0]), math.log(op.ratio[1]), tries).exp_()
    bh = torch.sqrt(area * ratio).round_().long()
    bw = torch.sqrt(area / ratio).round_().long()
    ok = (bh < h_img) & (bw < w_img)  # (B, tries)
    first = ok.int().argmax(dim=1, keepdim=True)  # index of the first accepted try (0 if none)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)  # (B,)
    # torch.randint(0, H - h + 1): floor(U * (H - h + 1)), clamped against U rounding up to 1.
    u = draws.uniform(0.0, 1.0, 2)
    top = torch.minimum((u[:, 0] * (h_img - bh + 1)).long(), h_img - bh)
    left = torch.minimum((u[:, 1] * (w_img - bw + 1)).long(), w_img - bw)
    params = {"erase": apply & ok.any(dim=1), "erase_box": torch.stack([top, left, bh, bw], dim=1)}
    if op.value == "random":
        params["erase_value"] = draws.normals()  # (B, 3, H, W)
    return params


def _sample_policy(op: LearnedPolicy, draws: _Draws) -> dict:
    # One seed per sample for torch's CPU RNG, which torchvision's policies draw from.
    return {"policy_seed": torch.randint(0, 2**62, (draws.n,), generator=draws.gen, device=draws.gen.device)}


def _sample_nothing(op: Normalize, draws: _Draws) -> dict:
    return {}


_SAMPLERS = {
    HFlip: _sample_flip,
    Rotate: _sample_rotate,
    Affine: _sample_affine,
    ColorJitter: _sample_jitter,
    GaussianBlur: _sample_blur,
    GaussianNoise: _sample_noise,
    Normalize: _sample_nothing,
    Erase: _sample_erase,
    LearnedPolicy: _sample_policy,
}


# Samples per pass of the ops on the CPU: a chunk's working tensors stay in cache (a 1024 batch runs
# about 30% faster in chunks of 256 than whole on a 2-core machine).
_CPU_CHUNK = 256


def fresh_generator(device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded from torch's default (global) RNG."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# The batched engine.
# --------------------------------------------------------------------------------------------


class BatchAugment:
    """Augment a whole batch with per-sample random parameters; returns the normalized batch.

    ``sample_params`` draws every random quantity in vectorized calls from one generator, with
    torchvision's distributions; ``apply`` is deterministic given those parameters, so a batch can
    be replayed (for a figure) from the dict. Keys (B = batch size): "apply" bool (B,), the samples
    augmented (Bernoulli(p_aug); the others are only normalized); then per op: "flip" bool (B,);
    "angle" (B,) degrees (RandomRotation's or RandomAffine's convention); "translate" (B, 2)
    integer pixels (tx, ty); "scale" (B,); "brightness", "contrast" (B,) factors and
    "contrast_first" bool (B,); "sigma" (B,); "noise" (B, 3, H, W), N(0, std); "erase" bool (B,),
    "erase_box" long (B, 4) = (top, left, height, width) and "erase_value" (B, 3, H, W), N(0, 1)
    (the noise's draw before scaling, see ``_Draws.normals``); "policy_seed" int64 (B,).

    On the CPU only the chosen samples are computed, in chunks; on an accelerator every sample is
    computed and a mask picks (no host-device sync). Learned policies (``per_sample`` True) loop over
    the chosen samples through torchvision's policy on uint8 tensors, each under its own seed of
    torch's CPU RNG (forked: the global state is untouched), so their dict replays too, per sample.
    """

    def __init__(self, stage: str | tuple = "none", p_aug: float = 1.0, mean=config.SVHN_MEAN,
                 std=config.SVHN_STD):
        self.ops = stage_ops(stage)
        self.stage = stage
        self.p_aug = _check_p_aug(p_aug)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.per_sample = isinstance(self.ops[0], LearnedPolicy)
        self._policy = _policy_transform(self.ops[0].name) if self.per_sample else None
        types = [type(op) for op in self.ops]
        # A flip directly before the warp is folded into the warp's matrix (one resampling pass).
        self._fold_flip = HFlip in types and types.index(HFlip) + 1 < len(types) and (
            types[types.index(HFlip) + 1] in (Rotate, Affine)
        )

    def __repr__(self) -> str:
        return f"BatchAugment(stage={self.stage!r}, p_aug={self.p_aug}, per_sample={self.per_sample})"

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                      image_size: tuple[int, int] = config.IMAGE_SHAPE[1:]) -> dict[str, torch.Tensor]:
        """Per-sample parameters for a batch, drawn on the generator's device, returned on ``device``.

        ``generator`` None: a fresh one seeded from torch's default RNG (see ``fresh_generator``).
        """
        gen = generator if generator is not None else fresh_generator(device or "cpu")
        draws = _Draws(batch_size, tuple(image_size), gen)
        params = {"apply": draws.bernoulli(self.p_aug)}
        for op in self.ops:
            params.update(_SAMPLERS[type(op)](op, draws))
        target = torch.device(device) if device is not None else gen.device
        return {key: value.to(target) for key, value in params.items()}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment the samples chosen by params["apply"], normalize all: float32 (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = to_unit_float(images)  # (B, 3, H, W) in [0, 1]
        if x is images:
            x = x.clone()  # the ops work in place on the engine's own copy
        if self.per_sample or x.device.type == "cpu":
            return self._apply_chosen(images, x, params)
        return self._apply_masked(images, x, params)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """sample_params + apply; ``generator`` None draws a fresh one from torch's default RNG."""
        params = self.sample_params(images.shape[0], generator, images.device, tuple(images.shape[-2:]))
        return self.apply(images, params)

    def _apply_masked(self, images: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Augment every sample, then pick with the mask: no host-device sync (used on accelerators)."""
        clean = normalize_batch(x, self.mean, self.std)
        return torch.where(params["apply"].view(-1, 1, 1, 1), self._augment(images, x, params), clean)

    def _apply_chosen(self, images: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Augment only the chosen samples, _CPU_CHUNK at a time (indexing them syncs with the device:
        used on the CPU and for the learned policies, where skipping the clean samples' work pays)."""
        chosen = params["apply"].nonzero().flatten()  # (n,)
        everyone = chosen.numel() == x.shape[0]  # then slices: views instead of gathered copies
        out = torch.empty_like(x) if everyone else normalize_batch(x, self.mean, self.std)
        for start in range(0, chosen.numel(), _CPU_CHUNK):
            index = slice(start, start + _CPU_CHUNK) if everyone else chosen[start:start + _CPU_CHUNK]
            subset = {key: value[index] for key, value in params.items()}
            out[index] = self._augment(images[index], x[index], subset)
        return out

    def _augment(self, images: torch.Tensor, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Every op on every sample given: float (B, 3, H, W) in [0, 1], overwritten -> normalized."""
        if self.per_sample:
            return normalize_batch(self._policy_batch(images, params), self.mean, self.std)
        for op in self.ops:
            x = _APPLIERS[type(op)](self, op, x, params)
        return x

    def _policy_batch(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """The learned policy on each uint8 sample under its own seed: float (B, 3, H, W) in [0, 1]."""
        if images.dtype != torch.uint8:
            images = quantize(images)
        seeds = params["policy_seed"].tolist()
        out = torch.empty_like(images)
        for index, seed in enumerate(seeds):
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU RNG
                torch.default_generator.manual_seed(seed)
                out[index] = self._policy(images[index])
        return to_unit_float(out)


# How BatchAugment applies each op: (engine, op, x (B, 3, H, W), params) -> x. Ops that can work in
# place do: x is the engine's own working copy.
def _apply_flip(aug: BatchAugment, op: HFlip, x, params):
    return x if aug._fold_flip else hflip_batch(x, params["flip"])


def _apply_rotate(aug: BatchAugment, op: Rotate, x, params):
    flip = params["flip"] if aug._fold_flip else None
    return rotate_batch(x, params["angle"], flip=flip, fill=op.fill)


def _apply_affine(aug: BatchAugment, op: Affine, x, params):
    flip = params["flip"] if aug._fold_flip else None
    return affine_batch(x, params["angle"], params["translate"], params["scale"], flip=flip, fill=op.fill)


def _apply_jitter(aug: BatchAugment, op: ColorJitter, x, params):
    return jitter_batch(x, params["brightness"], params["contrast"], params["contrast_first"], inplace=True)


def _apply_blur(aug: BatchAugment, op: GaussianBlur, x, params):
    return blur_batch(x, params["sigma"], op.kernel)


def _apply_noise(aug: BatchAugment, op: GaussianNoise, x, params):
    return noise_batch(x, params["noise"], inplace=True)


def _apply_normalize(aug: BatchAugment, op: Normalize, x, params):
    return normalize_batch(x, aug.mean, aug.std, inplace=True)


def _apply_erase(aug: BatchAugment, op: Erase, x, params):
    value = params["erase_value"] if op.value == "random" else float(op.value)
    return erase_batch(x, params["erase_box"], params["erase"], value, inplace=True)


_APPLIERS = {
    HFlip: _apply_flip,
    Rotate: _apply_rotate,
    Affine: _apply_affine,
    ColorJitter: _apply_jitter,
    GaussianBlur: _apply_blur,
    GaussianNoise: _apply_noise,
    Normalize: _apply_normalize,
    Erase: _apply_erase,
}


# --------------------------------------------------------------------------------------------
# Fixed-magnitude corruptions for robustness tests (same batched ops, deterministic per seed).
# --------------------------------------------------------------------------------------------

CORRUPTION_KINDS = ("affine", "color", "blur", "noise", "occlusion")
SEVERITIES = (1, 2, 3)
# Per severity 1, 2, 3:
_AFFINE_DEGREES = (10.0, 20.0, 30.0)  # rotation, random sign per image
_AFFINE_SHIFT = (1.0, 2.0, 3.0)  # translation in pixels, random sign per axis
_COLOR_STRENGTH = (0.2, 0.35, 0.5)  # brightness 1 +- m (random sign), contrast 1 - m
_BLUR_SIGMA = (0.8, 1.2, 1.8)  # kernel 2 * ceil(2 sigma) + 1
_NOISE_STD = (0.04, 0.08, 0.12)
_OCCLUSION_AREA = (0.1, 0.2, 0.3)  # one grey square covering about this share of the image
_OCCLUSION_GREY = 0.5


def _random_sign(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float().mul_(2.0).sub_(1.0)


def _corrupt_affine(x, level, gen):
    n = x.shape[0]
    angle = _random_sign(gen, n) * _AFFINE_DEGREES[level]
    translate = _random_sign(gen, n, 2) * _AFFINE_SHIFT[level]
    return affine_batch(x, angle.to(x.device), translate.to(x.device), torch.ones(n, device=x.device))


def _corrupt_color(x, level, gen):
    n, m = x.shape[0], _COLOR_STRENGTH[level]
    brightness = 1.0 + m * _random_sign(gen, n)
    contrast = torch.full((n,), 1.0 - m)
    order = torch.zeros(n, dtype=torch.bool)  # brightness, then contrast
    return jitter_batch(x, brightness.to(x.device), contrast.to(x.device), order.to(x.device))


def _corrupt_blur(x, level, gen):
    sigma = _BLUR_SIGMA[level]
    kernel = 2 * math.ceil(2 * sigma) + 1
    return blur_batch(x, torch.full((x.shape[0],), sigma, device=x.device), kernel)


def _corrupt_noise(x, level, gen):
    noise = torch.randn(x.shape, generator=gen).mul_(_NOISE_STD[level])
    return noise_batch(x, noise.to(x.device))


def _corrupt_occlusion(x, level, gen):
    n, _, h, w = x.shape
    side = min(round(math.sqrt(_OCCLUSION_AREA[level] * h * w)), h - 1, w - 1)
    top = torch.randint(0, h - side + 1, (n,), generator=gen)
    left = torch.randint(0, w - side + 1, (n,), generator=gen)
    boxes = torch.stack([top, left, torch.full_like(top, side), torch.full_like(top, side)], dim=1)
    active = torch.ones(n, dtype=torch.bool)
    return erase_batch(x, boxes.to(x.device), active.to(x.device), _OCCLUSION_GREY)


_CORRUPTORS = {
    "affine": _corrupt_affine,
    "color": _corrupt_color,
    "blur": _corrupt_blur,
    "noise": _corrupt_noise,
    "occlusion": _corrupt_occlusion,
}


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 (round, clamp)."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A fixed-magnitude corruption of uint8 images (N, 3, H, W) -> uint8, deterministic for ``seed``."""
    config.require(kind in CORRUPTION_KINDS, f"unknown corruption {kind!r}; choose one of {CORRUPTION_KINDS}")
    config.require(severity in SEVERITIES, f"severity must be one of {SEVERITIES}, got {severity!r}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(int(seed))  # CPU draws: the same result on any device
    x = to_unit_float(images)  # (N, 3, H, W)
    return quantize(_CORRUPTORS[kind](x, severity - 1, gen))
