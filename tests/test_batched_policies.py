"""The batched learned policies (AutoAugment SVHN, RandAugment, TrivialAugmentWide) against torchvision.

- Each op with fixed magnitudes against ``torchvision.transforms.v2.functional`` on uint8 images, as
  torchvision's policies call it (nearest interpolation, no fill, shears about the top-left corner).
  Compared exactly: the batched ops compute on float images holding uint8 values with torchvision's
  formulas (float64 matrices, float32 blends via addcmul like ``add_(alpha=)``, the same rounding before
  each cast); one uint8 step of difference would already fail.
- Whole policies: the batch equals each image run through the same functional ops with its drawn ops.
- Draws: op frequencies, magnitude values and signs against torchvision's own sampling (its forward
  with the op application recorded instead of run), within 5 standard errors.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import augment_ops as O
import augmentations as A

NEAREST = v2.InterpolationMode.NEAREST
N_DRAWS = 20_000


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """16 uint8 images: smooth colour fields (like photos) and pixel noise, half each."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(8, 3, 6, 6, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear").mul(255).round()
    noise = torch.randint(0, 256, (8, 3, 32, 32), generator=gen).float()
    return torch.cat([smooth, noise]).to(torch.uint8)


def reference_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision's _AutoAugmentBase._apply_image_or_video_transform, on one uint8 image."""
    affine = {"interpolation": NEAREST, "fill": None, "scale": 1.0, "angle": 0.0}
    shear = math.degrees(math.atan(magnitude))
    ops = {
        "Identity": lambda: image,
        "ShearX": lambda: TF.affine(image, translate=[0, 0], shear=[shear, 0.0], center=[0, 0], **affine),
        "ShearY": lambda: TF.affine(image, translate=[0, 0], shear=[0.0, shear], center=[0, 0], **affine),
        "TranslateX": lambda: TF.affine(image, translate=[int(magnitude), 0], shear=[0.0, 0.0], **affine),
        "TranslateY": lambda: TF.affine(image, translate=[0, int(magnitude)], shear=[0.0, 0.0], **affine),
        "Rotate": lambda: TF.rotate(image, angle=magnitude, interpolation=NEAREST, fill=None),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + magnitude),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + magnitude),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + magnitude),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + magnitude),
        "Posterize": lambda: TF.posterize(image, int(magnitude)),
        "Solarize": lambda: TF.solarize(image, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }
    return ops[name]()


# Magnitudes per op: the extremes of every policy's range, both signs, and values between bins.
MAGNITUDES = {
    **dict.fromkeys(("ShearX", "ShearY"), (-0.99, -0.3, 0.0, 0.1, 0.2333, 0.99)),
    **dict.fromkeys(("TranslateX", "TranslateY"), (-32.0, -14.5, -3.2, 0.0, 4.35, 31.9)),
    "Rotate": (-135.0, -30.0, -9.0, 0.0, 4.5, 90.0),
    **dict.fromkeys(("Brightness", "Color", "Contrast", "Sharpness"), (-0.99, -0.5, 0.0, 0.27, 0.6, 0.99)),
    "Posterize": (2.0, 3.0, 4.0, 6.0, 7.0, 8.0),
    "Solarize": (0.0, 0.1, 0.3, 0.5, 0.8, 1.0),
    **dict.fromkeys(("Identity", "AutoContrast", "Equalize", "Invert"), (0.0,)),
}


@pytest.mark.parametrize("name", O.POLICY_OPS)
def test_each_policy_op_equals_torchvision_functional_on_uint8(images, name):
    values = MAGNITUDES[name]
    magnitude = torch.tensor([values[i % len(values)] for i in range(len(images))], dtype=torch.float32)
    op = torch.full((len(images),), O.POLICY_OPS.index(name))
    out = O.policy_op_batch(images.float(), op, magnitude)  # (16, 3, 32, 32) uint8 values as float
    reference = torch.stack([reference_op(img, name, float(m)) for img, m in zip(images, magnitude, strict=True)])
    assert torch.equal(out, reference.float())


@pytest.mark.parametrize("masked", [True, False])  # the accelerator's masks, the CPU's gathering by index
def test_ops_are_picked_per_sample_in_one_batch(images, masked):
    op = torch.arange(len(images)) % len(O.POLICY_OPS)
    magnitude = torch.tensor([MAGNITUDES[O.POLICY_OPS[k]][-2 % len(MAGNITUDES[O.POLICY_OPS[k]])] for k in op.tolist()])
    out = O.policy_op_batch(images.float(), op, magnitude, masked=masked)
    for k in range(len(images)):
        expected = reference_op(images[k], O.POLICY_OPS[int(op[k])], float(magnitude[k]))
        assert torch.equal(out[k], expected.float()), O.POLICY_OPS[int(op[k])]


@pytest.mark.parametrize("policy", ["autoaugment_svhn", "randaugment", "trivialaugment"])
def test_whole_policy_batch_equals_torchvision_ops_with_the_drawn_parameters(images, policy):
    aug = A.BatchAugment(policy, 1.0)
    params = aug.sample_params(len(images), torch.Generator().manual_seed(1), "cpu")
    out = aug.apply(images, params)  # float in [0, 1]
    drawn = params[A.LearnedPolicy]
    for k in range(len(images)):
        expected = images[k]
        for op, magnitude in zip(drawn.op[k].tolist(), drawn.magnitude[k].tolist(), strict=True):
            expected = reference_op(expected, O.POLICY_OPS[op], magnitude)
        assert torch.equal(out[k], O.to_unit_float(expected)), (k, drawn.describe(k))


# ---------------------------------------------------------------- tables and draws vs torchvision


@pytest.mark.parametrize("policy, transform, bins", [
    ("autoaugment_svhn", v2.AutoAugment(v2.AutoAugmentPolicy.SVHN), 10),
    ("randaugment", v2.RandAugment(), 31),
    ("trivialaugment", v2.TrivialAugmentWide(), 31),
])
def test_magnitude_tables_and_signs_are_torchvision_s(policy, transform, bins):
    ours = O.policy_magnitudes(policy, bins, 32, 32)
    space = transform._AUGMENTATION_SPACE
    for index, name in enumerate(O.POLICY_OPS):
        if name not in space:
            continue
        magnitudes_fn, signed = space[name]
        expected = magnitudes_fn(bins, 32, 32)
        expected = torch.zeros(bins) if expected is None else expected.float()
        assert torch.equal(ours[index], expected), name
        assert (name in O.SIGNED_OPS) == signed, name
    if policy == "autoaugment_svhn":
        assert [tuple(sub) for sub in O.SVHN_POLICY] == transform._get_policies(v2.AutoAugmentPolicy.SVHN)
    else:
        assert tuple(space)[:O.WIDE_OPS] == O.POLICY_OPS[:O.WIDE_OPS] and len(space) == O.WIDE_OPS


class RecordingPolicy:
    """A torchvision policy whose forward records each (op, magnitude) instead of applying it."""

    def __init__(self, transform: v2.Transform):
        self.transform, self.records = transform, []
        transform._apply_image_or_video_transform = self.record

    def record(self, image, transform_id, magnitude, interpolation, fill):
        self.records[-1].append((transform_id, magnitude))
        return image

    def draw(self, n: int) -> list[list[tuple[str, float]]]:
        torch.manual_seed(0)
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        for _ in range(n):
            self.records.append([])
            self.transform(image)
        return self.records


def summaries(per_image: list[list[tuple[str, float]]]) -> dict:
    """Ops per image (Identity left out), and per op: count, share of negative magnitudes, |magnitude| values."""
    ops = Counter()
    negative, values = Counter(), {}
    for steps in per_image:
        for name, magnitude in steps:
            if name == "Identity":
                continue
            ops[name] += 1
            negative[name] += magnitude < 0
            values.setdefault(name, Counter())[round(abs(magnitude), 4)] += 1
    n_applied = Counter(sum(name != "Identity" for name, _ in steps) for steps in per_image)
    return {"ops": ops, "negative": negative, "values": values, "n_applied": n_applied}


def ours_as_records(policy: str, n: int) -> list[list[tuple[str, float]]]:
    drawn = A.BatchAugment(policy, 1.0).sample_params(n, torch.Generator().manual_seed(0), "cpu")[A.LearnedPolicy]
    return [[(O.POLICY_OPS[op], m) for op, m in zip(ops, mags, strict=True)]
            for ops, mags in zip(drawn.op.tolist(), drawn.magnitude.tolist(), strict=True)]


def assert_shares_agree(a: Counter, b: Counter, n_a: int, n_b: int, label: str) -> None:
    for key in set(a) | set(b):
        p, q = a[key] / n_a, b[key] / n_b
        pooled = (a[key] + b[key]) / (n_a + n_b)
        se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_a + 1 / n_b))
        assert abs(p - q) < 5 * se + 1e-9, (label, key, p, q)


@pytest.mark.parametrize("policy, transform", [
    ("autoaugment_svhn", v2.AutoAugment(v2.AutoAugmentPolicy.SVHN)),
    ("randaugment", v2.RandAugment()),
    ("trivialaugment", v2.TrivialAugmentWide()),
])
def test_op_magnitude_and_sign_draws_follow_torchvision_sampling(policy, transform):
    n_ref = 8_000
    theirs = summaries(RecordingPolicy(transform).draw(n_ref))
    ours = summaries(ours_as_records(policy, N_DRAWS))
    assert_shares_agree(ours["n_applied"], theirs["n_applied"], N_DRAWS, n_ref, "ops applied per image")
    assert_shares_agree(ours["ops"], theirs["ops"], N_DRAWS, n_ref, "op frequency")
    assert set(ours["ops"]) == set(theirs["ops"])
    for name in ours["ops"]:
        # Signed ops: negative half the time; the others never. Magnitude values: the same bins, equally often.
        assert_shares_agree(Counter({"neg": ours["negative"][name]}), Counter({"neg": theirs["negative"][name]}),
                            ours["ops"][name], theirs["ops"][name], f"{name} sign")
        if name not in O.SIGNED_OPS:
            assert ours["negative"][name] == 0, name
        assert set(ours["values"][name]) <= set(theirs["values"][name]) | {0.0}, name
        assert_shares_agree(ours["values"][name], theirs["values"][name], ours["ops"][name], theirs["ops"][name],
                            f"{name} magnitude")
