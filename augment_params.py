"""Random draws and the typed parameters that the augmentation ops sample for a batch.

``Draws`` hands out one batch's random numbers from one ``torch.Generator``; each op spec of
``augmentations`` turns them into its own frozen parameter object (tensors with the batch as first
dimension), and ``AugmentParams`` holds them for a whole stage with the p_aug mask. Every parameter
object describes a sample in words (``describe``), which figures print under each image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from augment_ops import POLICY_OPS, SIGNED_OPS

# --------------------------------------------------------------------------------------------
# Random draws and sampled parameters.
# --------------------------------------------------------------------------------------------


class Draws:
    """The random draws of one batch: ``n`` samples of ``size`` (H, W), all from ``gen``, on its device."""

    def __init__(self, n: int, size: tuple[int, int], gen: torch.Generator):
        self.n, self.size, self.gen = n, size, gen
        self._normals: torch.Tensor | None = None

    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        """U(lo, hi) of shape (n, *shape)."""
        u = torch.rand((self.n, *shape), generator=self.gen, device=self.gen.device)
        return u.mul_(hi - lo).add_(lo)

    def bernoulli(self, p: float, *shape: int) -> torch.Tensor:
        """Bool (n, *shape), True with probability p."""
        return torch.rand((self.n, *shape), generator=self.gen, device=self.gen.device) < p

    def integers(self, high: int, *shape: int) -> torch.Tensor:
        """Uniform integers in [0, high), long (n, *shape)."""
        return torch.randint(high, (self.n, *shape), generator=self.gen, device=self.gen.device)

    def normals(self) -> torch.Tensor:
        """N(0, 1) per pixel (n, 3, H, W), drawn once per batch and shared by noise and random erasing.

        Erasing overwrites the noise inside its box, so the box's values and the noise left visible
        come from disjoint pixels: independent, as with torchvision's two separate draws, at half the
        cost of the largest draw.
        """
        if self._normals is None:
            self._normals = torch.randn((self.n, 3, *self.size), generator=self.gen, device=self.gen.device)
        return self._normals


@dataclass(frozen=True)
class OpParams:
    """Sampled parameters of one op for a batch: tensor fields with the batch as first dimension."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """The same parameters with ``fn`` applied to every tensor (device moves, sample subsets)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: fn(v) for k, v in values.items() if v is not None})

    def describe(self, index: int) -> str:
        """Sample ``index``'s parameters in a few words ("" when there is nothing to show)."""
        return ""


@dataclass(frozen=True)
class FlipParams(OpParams):
    flip: torch.Tensor  # bool (B,)

    def describe(self, index: int) -> str:
        return "flip" if bool(self.flip[index]) else ""


@dataclass(frozen=True)
class RotateParams(OpParams):
    angle: torch.Tensor  # (B,) degrees, RandomRotation's convention (anticlockwise)

    def describe(self, index: int) -> str:
        return f"rot {float(self.angle[index]):+.0f}°"


@dataclass(frozen=True)
class AffineParams(OpParams):
    angle: torch.Tensor  # (B,) degrees, RandomAffine's convention
    translate: torch.Tensor  # (B, 2) integer pixels (tx, ty)
    scale: torch.Tensor  # (B,)

    def describe(self, index: int) -> str:
        tx, ty = self.translate[index].tolist()
        return f"rot {float(self.angle[index]):+.0f}° s {float(self.scale[index]):.2f}\nt ({tx:+.0f},{ty:+.0f}) px"


@dataclass(frozen=True)
class JitterParams(OpParams):
    brightness: torch.Tensor  # (B,) factors
    contrast: torch.Tensor  # (B,) factors
    contrast_first: torch.Tensor  # bool (B,)

    def describe(self, index: int) -> str:
        return f"b {float(self.brightness[index]):.2f} c {float(self.contrast[index]):.2f}"


@dataclass(frozen=True)
class BlurParams(OpParams):
    sigma: torch.Tensor  # (B,)

    def describe(self, index: int) -> str:
        return f"σ {float(self.sigma[index]):.2f}"


@dataclass(frozen=True)
class NoiseParams(OpParams):
    noise: torch.Tensor  # (B, 3, H, W), N(0, std)

    def describe(self, index: int) -> str:
        return "+noise"


@dataclass(frozen=True)
class NormalizeParams(OpParams):
    """Normalize draws nothing."""


@dataclass(frozen=True)
class EraseParams(OpParams):
    erase: torch.Tensor  # bool (B,): a box is erased
    box: torch.Tensor  # long (B, 4) = (top, left, height, width)
    value: torch.Tensor | None = None  # (B, 3, H, W) N(0, 1) in normalized units when the spec's value is "random"

    def describe(self, index: int) -> str:
        return "erased" if bool(self.erase[index]) else "not erased"


# Policy ops without a magnitude (torchvision passes 0.0 to them).
_NO_MAGNITUDE = frozenset({"Identity", "AutoContrast", "Equalize", "Invert"})


@dataclass(frozen=True)
class PolicyParams(OpParams):
    op: torch.Tensor  # long (B, R): index into augment_ops.POLICY_OPS per round (Identity: skipped)
    magnitude: torch.Tensor  # float32 (B, R): the signed magnitude torchvision would pass to the op

    def describe(self, index: int) -> str:
        words = []
        for op, magnitude in zip(self.op[index].tolist(), self.magnitude[index].tolist(), strict=True):
            name = POLICY_OPS[op]
            if name != "Identity":
                number = f"{magnitude:+.2f}" if name in SIGNED_OPS else f"{magnitude:g}"
                words.append(name if name in _NO_MAGNITUDE else f"{name} {number}")
        return "\n".join(words) or "identity"


@dataclass(frozen=True)
class AugmentParams:
    """Everything one batch draws: ``apply`` bool (B,), the samples chosen by p_aug (the others stay
    clean), and ``ops``, one parameter object per op of the stage, in the stage's order."""

    apply: torch.Tensor
    ops: tuple[OpParams, ...]

    def __getitem__(self, op_type: type) -> OpParams:
        """The parameters of the stage's op of type ``op_type`` (e.g. ``params[Affine]``; each op spec
        class names the parameter class it samples as ``params_type``)."""
        for params in self.ops:
            if params.__class__ is op_type.params_type:
                return params
        raise KeyError(f"the stage has no {op_type.__name__} op")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AugmentParams:
        """The same parameters with ``fn`` applied to every tensor."""
        return AugmentParams(fn(self.apply), tuple(params.map(fn) for params in self.ops))

    def to(self, device) -> AugmentParams:
        return self.map(lambda tensor: tensor.to(device))

    def describe(self, index: int) -> str:
        """Sample ``index`` in words, one line per op ("clean" when p_aug left it alone)."""
        if not bool(self.apply[index]):
            return "clean"
        return "\n".join(text for params in self.ops if (text := params.describe(index))) or "clean"


@dataclass(frozen=True)
class ApplyContext:
    """What the batched ops need besides their own parameters: the stage's channel statistics (erasing
    acts in normalized units), the flip draw when a flip is folded into the warp that follows it, and
    whether the ops must stay sync-free (the accelerator path)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    folded_flip: torch.Tensor | None = None  # bool (B,)
    masked: bool = True  # the accelerator way (no host sync); False: ops may gather samples by index
