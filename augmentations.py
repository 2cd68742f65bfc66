"""The study's augmentation stages, defined once and applied two ways.

``STAGE_SPECS`` maps every built-in stage name to a tuple of op specs; ``register_stage`` adds a
user's own. Each op spec (a small frozen dataclass holding the original study's values) owns its
three faces:

- ``torchvision(mean, std)``: its torchvision v2 transform, for the per-sample path
  (``build_stage_transform``, ``stage1_basic`` ... ``stage5_occlusion``, ``ProbTransform``) that runs
  on PIL images one at a time inside DataLoader workers, as the original study did;
- ``sample(draws)``: its per-sample random parameters for a whole batch, drawn in vectorized calls from
  one ``torch.Generator`` with torchvision's distributions, as a typed parameter object
  (``augment_params``);
- ``apply(x, params, context)``: the batched op on a float (B, 3, H, W) batch (kernels in ``augment_ops``).

``BatchAugment`` chains the batched faces. It returns float images in [0, 1] units; normalization is
the data loader's job (``augment_ops.normalize_batch``, always after the optional augmentation). Ops
that a stage places after ``Normalize`` (random erasing) act in normalized units: their values are
mapped back to [0, 1] units (v * std + mean), so that normalizing afterwards gives exactly what
torchvision's Normalize-then-RandomErasing gives.

One deliberate difference: geometry on uint8 input is not rounded back to uint8 between ops
(torchvision's uint8 kernels round after each op); the batch stays float. The learned policies do
round as torchvision's uint8 kernels, and draw one op and magnitude per image (torchvision v2's
batched call draws one per batch; its per-image calls, the original study's path, draw per image).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
from dataclasses import dataclass
from typing import ClassVar

import torch
from torchvision.transforms import v2

import config
from augment_ops import (
    SVHN_POLICY,
    WIDE_OPS,
    affine_batch,
    blur_batch,
    channel_constant,
    erase_batch,
    hflip_batch,
    jitter_batch,
    noise_batch,
    policy_op_batch,
    policy_tables,
    quantize,
    rotate_batch,
    to_unit_float,
)
from augment_params import (
    AffineParams,
    ApplyContext,
    AugmentParams,
    BlurParams,
    Draws,
    EraseParams,
    FlipParams,
    JitterParams,
    NoiseParams,
    NormalizeParams,
    PolicyParams,
    RotateParams,
)

_BILINEAR = v2.InterpolationMode.BILINEAR


# --------------------------------------------------------------------------------------------
# Op specs: frozen dataclasses, validated on construction, each with its three faces.
# --------------------------------------------------------------------------------------------


def _check_interval(name: str, pair: tuple[float, float], lo: float, hi: float) -> None:
    """An ordered pair inside [lo, hi]."""
    config.require(
        len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi,
        f"{name} must be an ordered pair inside [{lo}, {hi}], got {pair}",
    )


def _non_finite_fields(op) -> list[str]:
    """Names of the op's numeric fields (or numbers inside tuple fields) that are nan or infinite."""
    bad = []
    for field in dataclasses.fields(op):
        value = getattr(op, field.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, (int, float)) and not math.isfinite(v) for v in numbers):
            bad.append(f"{field.name}={value!r}")
    return bad


@dataclass(frozen=True)
class HFlip:
    """Horizontal flip with probability ``p``."""

    params_type: ClassVar[type] = FlipParams

    p: float = 0.5

    def __post_init__(self) -> None:
        config.require(0.0 <= self.p <= 1.0, f"HFlip.p must lie in [0, 1], got {self.p}")

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.RandomHorizontalFlip(self.p)

    def sample(self, draws: Draws) -> FlipParams:
        return FlipParams(draws.bernoulli(self.p))

    def apply(self, x: torch.Tensor, params: FlipParams, context: ApplyContext) -> torch.Tensor:
        return x if context.folded_flip is not None else hflip_batch(x, params.flip)


@dataclass(frozen=True)
class Rotate:
    """Rotation by U(-degrees, degrees) about the centre, bilinear, constant ``fill``."""

    params_type: ClassVar[type] = RotateParams

    degrees: float = 15.0
    fill: float = 0.0

    def __post_init__(self) -> None:
        config.require(0.0 <= self.degrees <= 180.0, f"Rotate.degrees must lie in [0, 180], got {self.degrees}")
        config.require(0.0 <= self.fill <= 1.0, f"Rotate.fill must lie in [0, 1], got {self.fill}")

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.RandomRotation(self.degrees, interpolation=_BILINEAR, fill=self.fill)

    def sample(self, draws: Draws) -> RotateParams:
        return RotateParams(draws.uniform(-self.degrees, self.degrees))

    def apply(self, x: torch.Tensor, params: RotateParams, context: ApplyContext) -> torch.Tensor:
        return rotate_batch(x, params.angle, flip=context.folded_flip, fill=self.fill)


@dataclass(frozen=True)
class Affine:
    """Rotation, integer translation (fraction of width, height) and scaling, bilinear."""

    params_type: ClassVar[type] = AffineParams

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

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.RandomAffine(self.degrees, self.translate, self.scale, interpolation=_BILINEAR, fill=self.fill)

    def sample(self, draws: Draws) -> AffineParams:
        h, w = draws.size
        angle = draws.uniform(-self.degrees, self.degrees)
        # torchvision: tx = int(round(U(-t * W, t * W))), ty likewise with H (integer pixels).
        translate = draws.uniform(-1.0, 1.0, 2)  # (B, 2)
        translate[:, 0].mul_(self.translate[0] * w)
        translate[:, 1].mul_(self.translate[1] * h)
        scale = draws.uniform(self.scale[0], self.scale[1])
        return AffineParams(angle, translate.round_(), scale)

    def apply(self, x: torch.Tensor, params: AffineParams, context: ApplyContext) -> torch.Tensor:
        return affine_batch(x, params.angle, params.translate, params.scale, flip=context.folded_flip,
                            fill=self.fill)


@dataclass(frozen=True)
class ColorJitter:
    """Brightness and contrast factors U(1 - b, 1 + b), U(1 - c, 1 + c), in random order."""

    params_type: ClassVar[type] = JitterParams

    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast"):
            value = getattr(self, name)
            config.require(0.0 <= value <= 1.0, f"ColorJitter.{name} must lie in [0, 1], got {value}")

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.ColorJitter(brightness=self.brightness, contrast=self.contrast)

    def sample(self, draws: Draws) -> JitterParams:
        # torchvision applies its four adjustments in torch.randperm(4) order; with only brightness
        # and contrast active, just their relative order matters, and in a uniform permutation either
        # comes first with probability 1/2: one Bernoulli(0.5) per sample is the same distribution.
        return JitterParams(draws.uniform(1.0 - self.brightness, 1.0 + self.brightness),
                            draws.uniform(1.0 - self.contrast, 1.0 + self.contrast), draws.bernoulli(0.5))

    def apply(self, x: torch.Tensor, params: JitterParams, context: ApplyContext) -> torch.Tensor:
        return jitter_batch(x, params.brightness, params.contrast, params.contrast_first, inplace=True)


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur, odd ``kernel`` size, sigma ~ U(sigma), reflect padding."""

    params_type: ClassVar[type] = BlurParams

    kernel: int = 3
    sigma: tuple[float, float] = (0.1, 1.2)

    def __post_init__(self) -> None:
        config.require(
            isinstance(self.kernel, int) and self.kernel % 2 == 1 and 1 <= self.kernel <= 31,
            f"GaussianBlur.kernel must be an odd integer in [1, 31], got {self.kernel}",
        )
        _check_interval("GaussianBlur.sigma", self.sigma, 1e-3, 100.0)

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.GaussianBlur(self.kernel, self.sigma)

    def sample(self, draws: Draws) -> BlurParams:
        return BlurParams(draws.uniform(self.sigma[0], self.sigma[1]))

    def apply(self, x: torch.Tensor, params: BlurParams, context: ApplyContext) -> torch.Tensor:
        return blur_batch(x, params.sigma, self.kernel)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive N(0, std) noise per pixel on [0, 1] images, clamped back to [0, 1]."""

    params_type: ClassVar[type] = NoiseParams

    std: float = 0.03

    def __post_init__(self) -> None:
        config.require(0.0 <= self.std <= 1.0, f"GaussianNoise.std must lie in [0, 1], got {self.std}")

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.GaussianNoise(mean=0.0, sigma=self.std, clip=True)

    def sample(self, draws: Draws) -> NoiseParams:
        return NoiseParams(draws.normals() * self.std)  # (B, 3, H, W)

    def apply(self, x: torch.Tensor, params: NoiseParams, context: ApplyContext) -> torch.Tensor:
        return noise_batch(x, params.noise, inplace=True)


@dataclass(frozen=True)
class Normalize:
    """Where the per-sample path normalizes (the stage's mean and std). The batched path leaves the
    normalization to the loader; ops after this marker act in normalized units."""

    params_type: ClassVar[type] = NormalizeParams

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.Normalize(list(mean), list(std))

    def sample(self, draws: Draws) -> NormalizeParams:
        return NormalizeParams()

    def apply(self, x: torch.Tensor, params: NormalizeParams, context: ApplyContext) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class Erase:
    """Random erasing after normalization: one box, ``value`` a constant or "random" N(0, 1) pixels
    (both in normalized units)."""

    params_type: ClassVar[type] = EraseParams

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 0.15)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float | str = "random"

    def __post_init__(self) -> None:
        config.require(0.0 <= self.p <= 1.0, f"Erase.p must lie in [0, 1], got {self.p}")
        _check_interval("Erase.scale", self.scale, 1e-6, 1.0)
        _check_interval("Erase.ratio", self.ratio, 1e-3, 1e3)
        config.require(
            self.value == "random" or (isinstance(self.value, (int, float)) and math.isfinite(self.value)),
            f"Erase.value must be a finite number or 'random', got {self.value!r}",
        )

    def torchvision(self, mean, std) -> v2.Transform:
        return v2.RandomErasing(self.p, self.scale, self.ratio, value=self.value)

    def sample(self, draws: Draws, tries: int = 10) -> EraseParams:
        """torchvision's RandomErasing (forward's p, then make_params), all samples and all 10 tries at once.

        Per try: area ~ U(scale) * H * W, log-ratio ~ U(log r0, log r1), h = round(sqrt(area * r)),
        w = round(sqrt(area / r)); the first try with h < H and w < W wins; the top-left corner is
        uniform over the valid positions. No accepted try: nothing is erased.
        """
        h_img, w_img = draws.size
        apply = draws.bernoulli(self.p)
        area = draws.uniform(self.scale[0], self.scale[1], tries) * (h_img * w_img)  # (B, tries)
        ratio = draws.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), tries).exp_()
        bh = torch.sqrt(area * ratio).round_().long()
        bw = torch.sqrt(area / ratio).round_().long()
        ok = (bh < h_img) & (bw < w_img)  # (B, tries)
        first = ok.int().argmax(dim=1, keepdim=True)  # index of the first accepted try (0 if none)
        bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)  # (B,)
        # torch.randint(0, H - h + 1): floor(U * (H - h + 1)), clamped against U rounding up to 1.
        u = draws.uniform(0.0, 1.0, 2)
        top = torch.minimum((u[:, 0] * (h_img - bh + 1)).long(), h_img - bh)
        left = torch.minimum((u[:, 1] * (w_img - bw + 1)).long(), w_img - bw)
        value = draws.normals() if self.value == "random" else None  # (B, 3, H, W)
        return EraseParams(apply & ok.any(dim=1), torch.stack([top, left, bh, bw], dim=1), value)

    def apply(self, x: torch.Tensor, params: EraseParams, context: ApplyContext) -> torch.Tensor:
        """Erase in [0, 1] units with v * std + mean, so that the loader's normalization gives v."""
        mean = channel_constant(context.mean, x.device, x.dtype)
        std = channel_constant(context.std, x.device, x.dtype)
        if params.value is not None:
            value = params.value * std + mean  # (B, 3, H, W)
        else:
            value = channel_constant(tuple(float(self.value) * s + m for m, s in zip(context.mean, context.std,
                                                                                   strict=True)), x.device, x.dtype)
        return erase_batch(x, params.box, params.erase, value, inplace=True)


@dataclass(frozen=True)
class LearnedPolicy:
    """One of torchvision's learned policies with its defaults (AutoAugment uses the SVHN policy).

    Batched: each image draws its own op(s) and magnitude(s) from torchvision's distributions
    (TrivialAugmentWide: one op, a random magnitude bin of 31; RandAugment: two ops at bin 9 of 31;
    AutoAugment: one of 25 sub-policies, each step applied with its probability), signs +-1 with
    probability 1/2 for signed ops; the ops reproduce torchvision's uint8 kernels.
    """

    params_type: ClassVar[type] = PolicyParams

    name: str

    def __post_init__(self) -> None:
        config.require(
            self.name in config.POLICY_STAGES,
            f"unknown learned policy {self.name!r}; choose one of {config.POLICY_STAGES}",
        )

    def torchvision(self, mean, std) -> v2.Transform:
        if self.name == "autoaugment_svhn":
            return v2.AutoAugment(v2.AutoAugmentPolicy.SVHN)
        if self.name == "randaugment":
            return v2.RandAugment()
        return v2.TrivialAugmentWide()

    def sample(self, draws: Draws) -> PolicyParams:
        tables = policy_tables(self.name, *draws.size, draws.gen.device)
        if self.name == "autoaugment_svhn":
            sub = draws.integers(len(SVHN_POLICY))  # (B,)
            chosen = draws.uniform(0.0, 1.0, 2) <= tables["steps_p"][sub]  # (B, 2): torch.rand() <= p
            op = torch.where(chosen, tables["steps_op"][sub], 0)  # skipped steps: Identity
            magnitude = tables["magnitudes"][op, tables["steps_bin"][sub]]  # (B, 2)
        elif self.name == "randaugment":
            op = draws.integers(WIDE_OPS, 2)  # num_ops = 2
            magnitude = tables["magnitudes"][op, 9]  # magnitude = 9, the same for every op
        else:
            op = draws.integers(WIDE_OPS, 1)
            magnitude = tables["magnitudes"][op, draws.integers(tables["magnitudes"].shape[1], 1)]  # (B, 1)
        negative = tables["signed"][op] & (draws.uniform(0.0, 1.0, op.shape[1]) <= 0.5)
        return PolicyParams(op, torch.where(negative, -magnitude, magnitude))

    def apply(self, x: torch.Tensor, params: PolicyParams, context: ApplyContext) -> torch.Tensor:
        """The drawn ops in turn on uint8 values (x is float in [0, 1]; 1/255 steps when it came from uint8)."""
        values = x.mul_(255.0).round_()
        for step in range(params.op.shape[1]):
            values = policy_op_batch(values, params.op[:, step], params.magnitude[:, step], masked=context.masked)
        return values.mul_(1.0 / 255)


OpSpec = (
    HFlip | Rotate | Affine | ColorJitter | GaussianBlur | GaussianNoise | Normalize | Erase | LearnedPolicy
)


# --------------------------------------------------------------------------------------------
# Stages: the built-in ones and the custom-stage registry.
# --------------------------------------------------------------------------------------------

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
# Stages added by register_stage in this process (name -> ops).
_CUSTOM_STAGES: dict[str, tuple[OpSpec, ...]] = {}

_TENSOR_ONLY = (GaussianNoise, Normalize, Erase)  # ops that need a float tensor, not a PIL image


def validate_ops(ops: tuple) -> None:
    """Raise ConfigError unless ``ops`` is a stage the engines can run.

    Exactly one Normalize; only Erase may follow it (the other ops assume [0, 1] images); each op
    type at most once (their parameters are looked up by type); at most one of Rotate / Affine; a
    learned policy stands alone before Normalize; every number finite.
    """
    config.require(isinstance(ops, tuple) and len(ops) > 0, f"a stage must be a non-empty op tuple, got {ops!r}")
    for op in ops:
        config.require(isinstance(op, OpSpec), f"not an op spec: {op!r}; use the op classes of augmentations")
        bad = _non_finite_fields(op)
        config.require(not bad, f"{type(op).__name__} has non-finite values ({', '.join(bad)}); use finite numbers")
    types = [type(op) for op in ops]
    config.require(len(set(types)) == len(types), f"each op type may appear once in a stage, got {types}")
    config.require(not (Rotate in types and Affine in types), "a stage holds Rotate or Affine, not both")
    config.require(types.count(Normalize) == 1, "a stage needs exactly one Normalize")
    after = types[types.index(Normalize) + 1:]
    config.require(all(t is Erase for t in after), f"only Erase may follow Normalize, got {after}")
    if LearnedPolicy in types:
        config.require(types == [LearnedPolicy, Normalize], "a learned policy stage is (LearnedPolicy, Normalize)")


def stage_ops(stage: str | tuple) -> tuple[OpSpec, ...]:
    """The validated op tuple of a built-in or registered stage name (or of a custom op tuple)."""
    if isinstance(stage, tuple):
        ops = stage
    else:
        ops = STAGE_SPECS.get(stage) or _CUSTOM_STAGES.get(stage)
        config.require(ops is not None, f"unknown stage {stage!r}; choose one of the built-in stages "
                       f"{tuple(STAGE_SPECS)} or a stage registered with augmentations.register_stage "
                       f"(registered: {tuple(_CUSTOM_STAGES)})")
    validate_ops(ops)
    return ops


def register_stage(name: str, ops) -> tuple[OpSpec, ...]:
    """Add (or redefine) a custom stage under ``name``: both paths and ``TrainConfig(stage=name)`` accept it.

    ``ops`` (a non-empty tuple or list of op specs with finite values) is validated like the built-in
    stages (a Normalize is appended when missing). The registration lives in this process only: worker
    processes must import the module that registers it. Returns the stored op tuple.
    """
    config.require(isinstance(name, str) and name.strip() != "",
                   f"a stage name must be a non-empty string, got {name!r}; pass e.g. 'my_stage'")
    config.check_name("stage name", name)  # it becomes part of run ids, hence of file names
    config.require(name not in STAGE_SPECS, f"{name!r} is a built-in stage; choose another name")
    config.require(isinstance(ops, (tuple, list)) and len(ops) > 0,
                   f"stage {name!r} needs a non-empty tuple of op specs, e.g. (HFlip(0.5), Rotate(10.0)); "
                   f"got {ops!r}")
    ops = _with_normalize(tuple(ops))
    validate_ops(ops)
    _CUSTOM_STAGES[name] = ops
    return ops


def registered_stages() -> tuple[str, ...]:
    """Names of the custom stages registered in this process."""
    return tuple(_CUSTOM_STAGES)


def stage_fingerprint(stage: str | tuple) -> str:
    """A short stable hash of the stage's op specs (types and values): redefining a custom stage or
    editing a spec changes it, so a run's identity can include it."""
    specs = [[type(op).__name__, dataclasses.asdict(op)] for op in stage_ops(stage)]
    return hashlib.sha1(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:12]


def _check_p_aug(p_aug: float) -> float:
    config.require(0.0 <= float(p_aug) <= 1.0, f"p_aug must lie in [0, 1], got {p_aug}")
    return float(p_aug)


# --------------------------------------------------------------------------------------------
# Per-sample path: torchvision v2 transforms on PIL images (the original study's way).
# --------------------------------------------------------------------------------------------


def build_stage_transform(stage: str | tuple, mean=config.SVHN_MEAN, std=config.SVHN_STD) -> v2.Compose:
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
        steps.append(op.torchvision(mean, std))
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
# The batched engine.
# --------------------------------------------------------------------------------------------

# Samples per pass of the ops on the CPU: a chunk's working tensors stay in cache (a 1024 batch runs
# about 30% faster in chunks of 256 than whole on a 2-core machine).
_CPU_CHUNK = 256


def fresh_generator(device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded from torch's default (global) RNG."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


# One code object of BatchAugment._augment_masked per stage (see BatchAugment._compiled_apply).
_STAGE_APPLY_CODE: dict[tuple, types.CodeType] = {}


class BatchAugment:
    """Augment a whole batch with per-sample random parameters; returns float32 (B, 3, H, W) in [0, 1]
    units, not normalized (the loader normalizes every batch with ``normalize_batch``, same ``mean``,
    ``std``: erasing needs them to act in normalized units).

    ``sample_params`` draws every random quantity in vectorized calls from one generator, with
    torchvision's distributions (an ``AugmentParams``); ``apply`` is deterministic given them, so a
    batch can be replayed (for a figure). Samples not chosen by p_aug stay clean.

    Two ways to apply: the accelerator path augments every sample and picks with the mask (no host
    sync; constants cached per device), the CPU path augments only the chosen samples, in chunks.
    ``accelerator_path`` None picks by the images' device; True forces it (tests run it on the CPU).
    ``compile`` compiles the accelerator path's apply with torch.compile (sampling stays eager) and
    implies that path. Every stage, the learned policies included, runs batched: ``per_sample`` is False.
    """

    per_sample = False

    def __init__(self, stage: str | tuple = "none", p_aug: float = 1.0, mean=config.SVHN_MEAN,
                 std=config.SVHN_STD, *, accelerator_path: bool | None = None, compile: bool = False):
        self.ops = stage_ops(stage)
        self.stage = stage
        self.p_aug = _check_p_aug(p_aug)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.accelerator_path = True if compile else accelerator_path
        types = [type(op) for op in self.ops]
        # A flip directly before the warp is folded into the warp's matrix (one resampling pass).
        self._fold_flip = HFlip in types and types.index(HFlip) + 1 < len(types) and (
            types[types.index(HFlip) + 1] in (Rotate, Affine)
        )
        self._augment_all = self._compiled_apply() if compile else self._augment_masked

    def __repr__(self) -> str:
        return f"BatchAugment(stage={self.stage!r}, p_aug={self.p_aug})"

    def sample_params(self, batch_size: int, generator: torch.Generator | None = None, device=None,
                      image_size: tuple[int, int] = config.IMAGE_SHAPE[1:]) -> AugmentParams:
        """Per-sample parameters for a batch, drawn on the generator's device, returned on ``device``.

        ``generator`` None: a fresh one seeded from torch's default RNG (see ``fresh_generator``).
        """
        gen = generator if generator is not None else fresh_generator(device or "cpu")
        draws = Draws(batch_size, tuple(image_size), gen)
        params = AugmentParams(draws.bernoulli(self.p_aug), tuple(op.sample(draws) for op in self.ops))
        target = torch.device(device) if device is not None else gen.device
        return params if target == gen.device else params.to(target)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment the samples chosen by params.apply: float32 (B, 3, H, W) in [0, 1] units."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = to_unit_float(images)  # (B, 3, H, W) in [0, 1]
        if x is images:
            x = x.clone()  # the ops work in place on the engine's own copy
        accelerator = self.accelerator_path if self.accelerator_path is not None else x.device.type != "cpu"
        if accelerator:
            return self._augment_all(x, params)
        return self._apply_chosen(x, params)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """sample_params + apply; ``generator`` None draws a fresh one from torch's default RNG."""
        params = self.sample_params(images.shape[0], generator, images.device, tuple(images.shape[-2:]))
        return self.apply(images, params)

    def _compiled_apply(self):
        """``_augment_masked`` under torch.compile, one graph per stage and batch shape in this process.

        torch.compile keeps its graphs on the function's code object and recompiles up to a limit (8 by
        default) before running the rest uncompiled, silently: with one code object for every stage, a
        worker going through a study's stages would hit the limit and lose compilation. So each stage
        (ops, mean, std) gets a copy of the code object of its own; instances of one stage share it,
        whatever their p_aug (the apply never reads it)."""
        key = (repr(self.ops), self.mean, self.std)
        code = _STAGE_APPLY_CODE.setdefault(key, BatchAugment._augment_masked.__code__.replace(
            co_name=f"_augment_masked_{len(_STAGE_APPLY_CODE)}"))
        apply = types.FunctionType(code, BatchAugment._augment_masked.__globals__, code.co_name)
        return torch.compile(apply.__get__(self), dynamic=False)

    def _augment_masked(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment every sample, then pick with the mask: no host-device sync (the accelerator path)."""
        return torch.where(params.apply.view(-1, 1, 1, 1), self._augment(x.clone(), params), x)

    def _apply_chosen(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment only the chosen samples, _CPU_CHUNK at a time (indexing them syncs with the device, so
        the CPU only: skipping the clean samples' work pays there)."""
        chosen = params.apply.nonzero().flatten()  # (n,)
        everyone = chosen.numel() == x.shape[0]  # then slices: views instead of gathered copies
        for start in range(0, chosen.numel(), _CPU_CHUNK):
            index = slice(start, start + _CPU_CHUNK) if everyone else chosen[start:start + _CPU_CHUNK]
            x[index] = self._augment(x[index], params.map(lambda tensor, index=index: tensor[index]), masked=False)
        return x

    def _augment(self, x: torch.Tensor, params: AugmentParams, masked: bool = True) -> torch.Tensor:
        """Every op on every sample given: float (B, 3, H, W) in [0, 1], overwritten."""
        flip = params[HFlip].flip if self._fold_flip else None
        context = ApplyContext(self.mean, self.std, flip, masked)
        for op, op_params in zip(self.ops, params.ops, strict=True):
            x = op.apply(x, op_params, context)
        return x


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


def corrupt(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A fixed-magnitude corruption of uint8 images (N, 3, H, W) -> uint8, deterministic for ``seed``."""
    config.require(kind in CORRUPTION_KINDS, f"unknown corruption {kind!r}; choose one of {CORRUPTION_KINDS}")
    config.require(severity in SEVERITIES, f"severity must be one of {SEVERITIES}, got {severity!r}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(int(seed))  # CPU draws: the same result on any device
    x = to_unit_float(images)  # (N, 3, H, W)
    return quantize(_CORRUPTORS[kind](x, severity - 1, gen))
