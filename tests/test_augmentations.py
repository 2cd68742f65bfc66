"""The augmentation engine against torchvision: each batched op vs v2.functional, the parameter
distributions vs torchvision's samplers, and the per-sample path.

Tolerances (float32 images in [0, 1]):
- rotate / affine: atol 2e-5. The batched warp builds its grid as torchvision does, but from the
  inverse matrix in float32 (torchvision: float64, then float32) and with the fill mask computed
  analytically (torchvision resamples a channel of ones): the values differ by a few 1e-6.
- jitter, blur: atol 1e-6 (same formulas and kernels; equal to float32 rounding).
- hflip, erase, normalize, p_aug=0 vs the eval transform: exact.
- whole stage vs a chain of torchvision ops: atol 1e-4 after normalization (2e-5 / std ~ 1e-4).
- erasing after Normalize, done in [0, 1] units as v * std + mean and normalized afterwards: atol 1e-6
  (float32 rounding of v * std + mean, divided by std ~ 0.2).
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import augment_ops as O
import augmentations as A
import config
from config import ConfigError

BILINEAR = v2.InterpolationMode.BILINEAR
ATOL_GEOMETRY = 2e-5
ATOL_PIXEL = 1e-6
N_DRAWS = 200_000


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Eight float images in [0, 1] (3, 32, 32)."""
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def images_uint8() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)


def to_pil(image_uint8: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_uint8.permute(1, 2, 0).numpy())


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """Allowed |share - p| for a share of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def assert_uniform(values: torch.Tensor, lo: float, hi: float) -> None:
    """Inside [lo, hi], reaching near both ends, mean and variance of U(lo, hi) within 5 sigma."""
    values = values.double()
    n, width = values.numel(), hi - lo
    assert lo <= values.min() < lo + 1e-3 * width
    assert hi - 1e-3 * width < values.max() <= hi
    assert abs(values.mean().item() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * n)
    # Var of U is w^2/12; the sample variance has sd w^2 * sqrt(1/180 / n).
    assert abs(values.var().item() - width**2 / 12) < 5 * width**2 * math.sqrt(1 / 180 / n)


def big_draw(p_aug: float = 1.0, seed: int = 0) -> A.AugmentParams:
    """N_DRAWS parameter sets of stage 5's ops without the per-pixel tensors (noise, random erase values)."""
    ops = tuple(op for op in A.STAGE_SPECS["stage5_occlusion"] if not isinstance(op, A.GaussianNoise))
    ops = tuple(dataclasses.replace(op, value=0.0) if isinstance(op, A.Erase) else op for op in ops)
    return A.BatchAugment(ops, p_aug).sample_params(N_DRAWS, torch.Generator().manual_seed(seed), "cpu")


@pytest.fixture(scope="module")
def smooth_uint8() -> torch.Tensor:
    """Six low-frequency images (random 4x4 colour fields upsampled), closer to photos than pixel noise."""
    coarse = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bicubic", align_corners=False)
    return fine.clamp(0, 1).mul(255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def draws() -> A.AugmentParams:
    return big_draw()


# ---------------------------------------------------------------- stage definitions and validation


def test_stage_specs_cover_every_stage_with_the_study_values():
    assert set(A.STAGE_SPECS) == set(config.ALL_STAGES)
    stage5 = A.STAGE_SPECS["stage5_occlusion"]
    assert [type(op) for op in stage5] == [A.HFlip, A.Affine, A.ColorJitter, A.GaussianBlur, A.GaussianNoise,
                                          A.Normalize, A.Erase]
    assert A.STAGE_SPECS["stage1_basic"][:2] == (A.HFlip(0.5), A.Rotate(15.0, fill=0.0))
    assert stage5[1] == A.Affine(15.0, (0.1, 0.1), (0.9, 1.1))
    assert stage5[2:5] == (A.ColorJitter(0.2, 0.2), A.GaussianBlur(3, (0.1, 1.2)), A.GaussianNoise(0.03))
    assert stage5[-1] == A.Erase(0.5, (0.02, 0.15), (0.3, 3.3), "random")
    for stage in config.STAGES[1:]:  # each stage extends the previous one (stage 2 swaps rotation for affine)
        noflip = A.STAGE_SPECS[stage + config.NOFLIP_SUFFIX]
        assert noflip == tuple(op for op in A.STAGE_SPECS[stage] if not isinstance(op, A.HFlip))
    for stage in config.POLICY_STAGES:
        assert isinstance(A.STAGE_SPECS[stage][0], A.LearnedPolicy)


def test_unknown_stage_and_bad_p_aug_raise_config_errors_naming_the_choices():
    for make in (lambda: A.BatchAugment("stage9"), lambda: A.build_stage_transform("stage9")):
        with pytest.raises(ConfigError) as err:
            make()
        assert all(name in str(err.value) for name in config.ALL_STAGES)
    for p_aug in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="p_aug"):
            A.BatchAugment("stage1_basic", p_aug)
        with pytest.raises(ConfigError, match="p_aug"):
            A.ProbTransform(A.get_eval_transform(), A.stage1_basic(), p_aug)


@pytest.mark.parametrize("make", [
    lambda: A.HFlip(1.5),
    lambda: A.Rotate(-1.0),
    lambda: A.Affine(translate=(0.1, 1.5)),
    lambda: A.Affine(scale=(1.1, 0.9)),
    lambda: A.ColorJitter(brightness=1.5),
    lambda: A.GaussianBlur(4),
    lambda: A.GaussianBlur(3, (0.0, 1.0)),
    lambda: A.GaussianNoise(-0.1),
    lambda: A.Erase(scale=(0.5, 0.1)),
    lambda: A.Erase(value="grey"),
    lambda: A.LearnedPolicy("cutmix"),
    lambda: A.validate_ops((A.HFlip(), A.Normalize(), A.Normalize())),
    lambda: A.validate_ops((A.Normalize(), A.ColorJitter())),
    lambda: A.validate_ops((A.Rotate(), A.Affine(), A.Normalize())),
    lambda: A.validate_ops((A.HFlip(),)),
])
def test_out_of_range_specs_raise_config_errors(make):
    with pytest.raises(ConfigError):
        make()


# ---------------------------------------------------------------- batched ops vs torchvision functional


def test_rotate_matches_torchvision_per_sample(images):
    angles = torch.tensor([-15.0, -14.99, -7.5, 0.0, 3.3, 10.0, 14.99, 15.0])
    out = O.rotate_batch(images, angles)
    pairs = zip(images, angles.tolist(), strict=True)
    ref = torch.stack([TF.rotate(img, a, interpolation=BILINEAR, fill=0) for img, a in pairs])
    torch.testing.assert_close(out, ref, atol=ATOL_GEOMETRY, rtol=0)


@pytest.mark.parametrize("scale", [0.9, 1.0, 1.1])
def test_affine_with_folded_flip_matches_torchvision_per_sample(images, scale):
    angles = torch.tensor([-15.0, -15.0, 0.0, 7.0, 15.0, 15.0, -4.0, 0.0])
    shifts = torch.tensor([[-3, -3], [3, 3], [0, 0], [1, -2], [-3, 3], [3, -3], [2, 0], [0, 3]]).float()
    flips = torch.tensor([False, True, False, True, True, False, False, True])
    out = O.affine_batch(images, angles, shifts, torch.full((8,), scale), flip=flips)
    ref = torch.stack([
        TF.affine(TF.hflip(img) if f else img, float(a), [int(t[0]), int(t[1])], scale, [0.0, 0.0],
                  interpolation=BILINEAR, fill=0)
        for img, a, t, f in zip(images, angles, shifts, flips, strict=True)
    ])
    torch.testing.assert_close(out, ref, atol=ATOL_GEOMETRY, rtol=0)


def test_hflip_normalize_and_erase_are_exact(images):
    flips = torch.tensor([True, False] * 4)
    ref = torch.stack([TF.hflip(img) if f else img for img, f in zip(images, flips, strict=True)])
    assert torch.equal(O.hflip_batch(images, flips), ref)

    mean, std = config.SVHN_MEAN, config.SVHN_STD
    assert torch.equal(O.normalize_batch(images, mean, std), TF.normalize(images, list(mean), list(std)))

    boxes = torch.tensor([[0, 0, 5, 7], [20, 25, 11, 6], [3, 4, 31, 2], [10, 10, 1, 1]] * 2)
    active = torch.tensor([True, True, True, True, False, True, False, True])
    values = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = O.erase_batch(images, boxes, active, values)
    for k in range(8):
        i, j, h, w = boxes[k].tolist()
        expected = TF.erase(images[k], i, j, h, w, values[k, :, i:i + h, j:j + w]) if active[k] else images[k]
        assert torch.equal(out[k], expected)


def test_brightness_contrast_in_both_orders_match_torchvision(images):
    brightness = torch.tensor([0.8, 0.8, 1.2, 1.2, 0.8, 1.2, 1.0, 0.8])
    contrast = torch.tensor([1.2, 1.2, 0.8, 0.8, 0.8, 1.2, 0.8, 1.0])
    contrast_first = torch.tensor([False, True, False, True, True, False, True, False])
    out = O.jitter_batch(images, brightness, contrast, contrast_first)
    ref = []
    for img, b, c, cf in zip(images, brightness.tolist(), contrast.tolist(), contrast_first, strict=True):
        if cf:
            ref.append(TF.adjust_brightness(TF.adjust_contrast(img, c), b))
        else:
            ref.append(TF.adjust_contrast(TF.adjust_brightness(img, b), c))
    torch.testing.assert_close(out, torch.stack(ref), atol=ATOL_PIXEL, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample(images):
    sigmas = torch.tensor([0.1, 0.6, 1.2, 0.35, 1.2, 0.1, 0.6, 0.9])
    out = O.blur_batch(images, sigmas, 3)
    pairs = zip(images, sigmas.tolist(), strict=True)
    ref = torch.stack([TF.gaussian_blur(img, [3, 3], [s, s]) for img, s in pairs])
    torch.testing.assert_close(out, ref, atol=ATOL_PIXEL, rtol=0)


def reference_stage5(image: torch.Tensor, p: A.AugmentParams, k: int) -> torch.Tensor:
    """Stage 5 on one float image through torchvision's functional ops with the batch's parameters."""
    affine, jitter, erase = p[A.Affine], p[A.ColorJitter], p[A.Erase]
    x = TF.hflip(image) if p[A.HFlip].flip[k] else image
    tx, ty = (int(v) for v in affine.translate[k].tolist())
    x = TF.affine(x, float(affine.angle[k]), [tx, ty], float(affine.scale[k]), [0.0, 0.0],
                  interpolation=BILINEAR, fill=0)
    b, c = float(jitter.brightness[k]), float(jitter.contrast[k])
    if jitter.contrast_first[k]:
        x = TF.adjust_brightness(TF.adjust_contrast(x, c), b)
    else:
        x = TF.adjust_contrast(TF.adjust_brightness(x, b), c)
    s = float(p[A.GaussianBlur].sigma[k])
    x = TF.gaussian_blur(x, [3, 3], [s, s])
    x = (x + p[A.GaussianNoise].noise[k]).clamp(0, 1)
    x = TF.normalize(x, list(config.SVHN_MEAN), list(config.SVHN_STD))
    if erase.erase[k]:
        i, j, h, w = erase.box[k].tolist()
        x = TF.erase(x, i, j, h, w, erase.value[k, :, i:i + h, j:j + w])
    return x


def normalized(x: torch.Tensor) -> torch.Tensor:
    """The loader's normalization of a BatchAugment output."""
    return O.normalize_batch(x, config.SVHN_MEAN, config.SVHN_STD)


def test_whole_stage5_batch_equals_torchvision_chain_per_sample(images):
    aug = A.BatchAugment("stage5_occlusion", 0.75)
    params = aug.sample_params(8, torch.Generator().manual_seed(5), "cpu")
    assert params.apply.any() and not params.apply.all() and params[A.Erase].erase.any()
    out = normalized(aug.apply(images, params))
    clean = TF.normalize(images, list(config.SVHN_MEAN), list(config.SVHN_STD))
    for k in range(8):
        expected = reference_stage5(images[k], params, k) if params.apply[k] else clean[k]
        torch.testing.assert_close(out[k], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("value", [0.0, 0.7, "random"])
def test_erasing_after_normalize_matches_torchvision_random_erasing(images, value):
    """Erase acts in normalized units although the engine's output is normalized later, by the loader."""
    ops = (A.Normalize(), A.Erase(p=1.0, value=value))
    aug = A.BatchAugment(ops, 1.0)
    params = aug.sample_params(8, torch.Generator().manual_seed(0), "cpu")
    out = normalized(aug.apply(images, params))
    erase = params[A.Erase]
    assert erase.erase.all()
    for k in range(8):
        i, j, h, w = erase.box[k].tolist()
        fill = erase.value[k, :, i:i + h, j:j + w] if value == "random" else torch.tensor(float(value))
        expected = TF.erase(TF.normalize(images[k], list(config.SVHN_MEAN), list(config.SVHN_STD)), i, j, h, w,
                            fill)
        torch.testing.assert_close(out[k], expected, atol=1e-6, rtol=0)
        if value == 0.0:
            assert torch.equal(out[k, :, i:i + h, j:j + w], torch.zeros(3, h, w))


# ---------------------------------------------------------------- parameter distributions


def test_angles_scales_factors_and_sigmas_are_uniform_over_the_spec_ranges(draws):
    assert_uniform(draws[A.Affine].angle, -15.0, 15.0)
    assert_uniform(draws[A.Affine].scale, 0.9, 1.1)
    assert_uniform(draws[A.ColorJitter].brightness, 0.8, 1.2)
    assert_uniform(draws[A.ColorJitter].contrast, 0.8, 1.2)
    assert_uniform(draws[A.GaussianBlur].sigma, 0.1, 1.2)


def test_translations_are_rounded_uniform_integer_pixels(draws):
    shifts = draws[A.Affine].translate  # (N, 2)
    assert torch.equal(shifts, shifts.round())
    assert set(shifts.unique().tolist()) == {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    # round(U(-3.2, 3.2)): the edge values +-3 cover [2.5, 3.2], inner values a full unit.
    for value, width in ((3.0, 0.7), (-3.0, 0.7), (0.0, 1.0), (2.0, 1.0)):
        for axis in (0, 1):
            share = (shifts[:, axis] == value).double().mean().item()
            assert abs(share - width / 6.4) < binomial_bound(N_DRAWS, width / 6.4)


def test_flip_jitter_order_and_apply_rates(draws):
    assert abs(draws[A.HFlip].flip.double().mean().item() - 0.5) < binomial_bound(N_DRAWS, 0.5)
    assert abs(draws[A.ColorJitter].contrast_first.double().mean().item() - 0.5) < binomial_bound(N_DRAWS, 0.5)
    assert draws.apply.all()
    apply = big_draw(p_aug=0.25, seed=1).apply
    assert abs(apply.double().mean().item() - 0.25) < binomial_bound(N_DRAWS, 0.25)


def test_jitter_order_matches_torchvision_permutation_share():
    """torchvision orders 4 adjustments by randperm(4): contrast (1) precedes brightness (0) half the time."""
    jitter = v2.ColorJitter(brightness=0.2, contrast=0.2)
    torch.manual_seed(0)
    n = 4000
    orders = [jitter.make_params([])["fn_idx"].tolist() for _ in range(n)]
    share = sum(order.index(1) < order.index(0) for order in orders) / n
    assert abs(share - 0.5) < binomial_bound(n, 0.5)


STAGE5_ERASE = A.STAGE_SPECS["stage5_occlusion"][-1]
# Large boxes and wide ratios: many tries are rejected, some samples run out of tries.
HARD_ERASE = A.Erase(p=1.0, scale=(0.3, 0.95), ratio=(0.2, 5.0), value=0.0)


def torchvision_erasing(spec: A.Erase, n: int) -> dict[str, torch.Tensor]:
    """n draws of torchvision's RandomErasing: forward's apply decision, then make_params."""
    erasing = v2.RandomErasing(spec.p, spec.scale, spec.ratio, value=spec.value)
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    applied, boxes = [], []
    for _ in range(n):
        applied.append(bool(torch.rand(1) < spec.p))  # _RandomApplyTransform.forward
        params = erasing.make_params([image])
        applied[-1] &= params["v"] is not None  # no accepted try: nothing erased
        boxes.append([params["i"], params["j"], params["h"], params["w"]])
    return {"erase": torch.tensor(applied), "erase_box": torch.tensor(boxes)}


def box_summaries(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Box sides, area, log aspect ratio, the corner within its valid range, and corners at the far edge."""
    top, left, h, w = boxes.double().unbind(1)
    return {"h": h, "w": w, "area": h * w, "log_ratio": (h / w).log(),
            "top_frac": top / (33 - h), "left_frac": left / (33 - w),
            "at_bottom": (top == 32 - h).double(), "at_right": (left == 32 - w).double()}


@pytest.mark.parametrize("spec, n_ref", [(STAGE5_ERASE, 10_000), (HARD_ERASE, 5_000)])
def test_erase_rate_and_boxes_follow_torchvision_random_erasing(spec, n_ref):
    ops = (A.Normalize(), dataclasses.replace(spec, value=0.0))  # no per-pixel values: N_DRAWS stay small
    draws = A.BatchAugment(ops, 1.0).sample_params(N_DRAWS, torch.Generator().manual_seed(0), "cpu")
    ref = torchvision_erasing(spec, n_ref)
    erase = draws[A.Erase]
    ours_rate, ref_rate = erase.erase.double().mean().item(), ref["erase"].double().mean().item()
    assert abs(ours_rate - ref_rate) < 5 * math.sqrt(0.25 / N_DRAWS + 0.25 / n_ref)
    ours = erase.box[erase.erase]  # (n, 4) = top, left, h, w of erased samples
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (h < 32).all() and (w < 32).all() and (h >= 1).all() and (w >= 1).all()
    theirs = box_summaries(ref["erase_box"][ref["erase"]])
    for name, a in box_summaries(ours).items():
        b = theirs[name]
        se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
        assert abs(a.mean().item() - b.mean().item()) < 5 * se, name
        if name in ("h", "w", "area", "log_ratio"):
            assert abs(a.std().item() / b.std().item() - 1) < 0.08, name


def test_noise_and_random_erase_values_have_the_spec_spread():
    aug = A.BatchAugment("stage5_occlusion", 1.0)
    params = aug.sample_params(64, torch.Generator().manual_seed(0), "cpu")
    noise, values = params[A.GaussianNoise].noise.double(), params[A.Erase].value.double()  # (64, 3, 32, 32)
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * 0.03 / math.sqrt(n)
    assert abs(noise.std().item() / 0.03 - 1) < 5 / math.sqrt(2 * n)
    assert abs(values.mean().item()) < 5 / math.sqrt(n)
    assert abs(values.std().item() - 1) < 5 / math.sqrt(2 * n)


# ---------------------------------------------------------------- the engine as a whole


def test_p_aug_zero_equals_the_eval_transform_exactly(images_uint8):
    out = normalized(A.BatchAugment("stage5_occlusion", 0.0)(images_uint8, torch.Generator().manual_seed(0)))
    eval_t = A.get_eval_transform()
    ref = torch.stack([eval_t(to_pil(img)) for img in images_uint8])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("stage", ["stage1_basic", "stage3_color_noflip", "stage5_occlusion",
                                   "trivialaugment", "randaugment", "autoaugment_svhn"])
def test_same_seed_same_batch_different_seed_different_batch(images_uint8, stage):
    aug = A.BatchAugment(stage, 1.0)
    rng_before = torch.get_rng_state()
    first = aug(images_uint8, torch.Generator().manual_seed(7))
    again = aug(images_uint8, torch.Generator().manual_seed(7))
    other = aug(images_uint8, torch.Generator().manual_seed(8))
    assert torch.equal(rng_before, torch.get_rng_state())  # the global RNG is not touched
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not aug.per_sample  # every stage, the learned policies included, runs batched


def test_default_generator_comes_from_the_global_rng(images_uint8):
    aug = A.BatchAugment("stage2_geometry", 1.0)
    torch.manual_seed(3)
    first = aug(images_uint8)
    torch.manual_seed(3)
    assert torch.equal(first, aug(images_uint8))


def test_uint8_and_float_input_give_the_same_batch(images_uint8):
    aug = A.BatchAugment("stage5_occlusion", 0.5)
    params = aug.sample_params(6, torch.Generator().manual_seed(0), "cpu")
    from_uint8 = aug.apply(images_uint8, params)
    floats = images_uint8.float() / 255
    kept = floats.clone()
    from_float = aug.apply(floats, params)
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=0)
    assert torch.equal(floats, kept)  # the engine works on its own copy


@pytest.mark.parametrize("stage", ["stage5_occlusion", "autoaugment_svhn"])
def test_masked_path_for_accelerators_equals_the_indexed_cpu_path(images_uint8, stage):
    aug = A.BatchAugment(stage, 0.5)
    params = aug.sample_params(6, torch.Generator().manual_seed(0), "cpu")
    assert 0 < params.apply.sum() < 6
    masked = A.BatchAugment(stage, 0.5, accelerator_path=True).apply(images_uint8, params)
    torch.testing.assert_close(masked, aug.apply(images_uint8, params), atol=1e-5, rtol=0)


def test_policy_stage_replays_and_keeps_unchosen_samples_clean(images_uint8):
    aug = A.BatchAugment("autoaugment_svhn", 0.5)
    params = aug.sample_params(6, torch.Generator().manual_seed(4), "cpu")
    out = aug.apply(images_uint8, params)
    assert torch.equal(out, aug.apply(images_uint8, params))
    clean = A.BatchAugment("none", 0.0)(images_uint8)
    chosen = params.apply
    assert torch.equal(out[~chosen], clean[~chosen])
    # Augmented samples stay on the uint8 grid (torchvision's policies work on uint8 images).
    assert torch.equal(out, O.to_unit_float(O.quantize(out)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_matches_cpu_batch(images_uint8):
    aug = A.BatchAugment("stage5_occlusion", 0.75)
    params = aug.sample_params(6, torch.Generator().manual_seed(0), "cpu")
    on_cuda = aug.apply(images_uint8.cuda(), params.to("cuda"))
    torch.testing.assert_close(on_cuda.cpu(), aug.apply(images_uint8, params), atol=1e-4, rtol=0)
    drawn = aug(images_uint8.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert drawn.is_cuda and drawn.shape == (6, 3, 32, 32)


# ---------------------------------------------------------------- per-sample path


def test_per_sample_transform_of_every_stage_gives_a_normalized_tensor(images_uint8):
    pil = to_pil(images_uint8[0])
    torch.manual_seed(0)
    for stage in config.ALL_STAGES:
        out = A.build_stage_transform(stage)(pil)
        assert type(out) is torch.Tensor and out.shape == (3, 32, 32) and out.dtype == torch.float32, stage
    builders = [A.stage1_basic, A.stage2_geometry, A.stage3_color, A.stage4_blur_noise, A.stage5_occlusion]
    for builder, stage in zip(builders, config.STAGES[1:], strict=True):
        assert repr(builder()) == repr(A.build_stage_transform(stage))
    steps = [type(t).__name__ for t in A.stage5_occlusion().transforms]
    assert steps == ["RandomHorizontalFlip", "RandomAffine", "ColorJitter", "GaussianBlur", "ToImage",
                     "ToDtype", "GaussianNoise", "Normalize", "RandomErasing", "ToPureTensor"]


def test_prob_transform_picks_per_sample_and_works_in_a_dataloader(images_uint8):
    eval_t = A.get_eval_transform()
    pil = [to_pil(img) for img in images_uint8]
    never = A.ProbTransform(eval_t, A.stage5_occlusion(), 0.0)
    assert all(torch.equal(never(img), eval_t(img)) for img in pil)
    marker = A.ProbTransform(lambda img: "clean", lambda img: "augmented", 0.3)
    torch.manual_seed(0)
    picks = [marker(None) for _ in range(4000)]
    assert abs(picks.count("augmented") / 4000 - 0.3) < binomial_bound(4000, 0.3)

    # Pickled and back, as DataLoader workers receive it.
    transform = pickle.loads(pickle.dumps(A.ProbTransform(eval_t, A.stage5_occlusion(), 0.5)))
    loader = torch.utils.data.DataLoader(PilDataset(pil, transform), batch_size=3)
    x, y = next(iter(loader))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0, 0, 0]


class PilDataset(torch.utils.data.Dataset):
    """PIL images through a per-sample transform, as the original study's loaders did."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), 0


# ---------------------------------------------------------------- corruptions


@pytest.mark.parametrize("kind", A.CORRUPTION_KINDS)
def test_corruptions_are_deterministic_and_grow_with_severity(smooth_uint8, images_uint8, kind):
    for batch in (smooth_uint8, images_uint8):
        outs = [A.corrupt(batch, kind, severity, seed=0) for severity in (1, 2, 3)]
        assert all(o.dtype == torch.uint8 and o.shape == batch.shape for o in outs)
        assert torch.equal(outs[0], A.corrupt(batch, kind, 1, seed=0))
        diffs = [(o.float() - batch.float()).abs().mean().item() for o in outs]
        assert 0 < diffs[0] < diffs[1] < diffs[2], diffs
        if kind != "blur":  # blur has no random part
            assert not torch.equal(A.corrupt(batch, kind, 2, seed=1), outs[1])


def test_corrupt_rejects_unknown_kind_and_severity(images_uint8):
    with pytest.raises(ConfigError, match="occlusion"):
        A.corrupt(images_uint8, "fog", 1)
    with pytest.raises(ConfigError, match="severity"):
        A.corrupt(images_uint8, "blur", 4)


@pytest.fixture
def registry(monkeypatch):
    """An empty custom-stage registry, restored after the test."""
    monkeypatch.setattr(A, "_CUSTOM_STAGES", {})


def test_registered_custom_stage_runs_in_both_paths_and_in_a_config(registry):
    ops = A.register_stage("test_custom",
                           (A.Affine(10.0, (0.05, 0.05), (0.95, 1.05)), A.ColorJitter(0.3, 0.3)))
    assert A.stage_ops("test_custom") == ops and isinstance(ops[-1], A.Normalize)
    assert A.registered_stages() == ("test_custom",) and "test_custom" not in A.STAGE_SPECS
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = A.BatchAugment("test_custom", 1.0)(batch, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32) and not torch.equal(out, A.BatchAugment("none", 1.0)(batch))
    assert A.build_stage_transform("test_custom")(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    assert config.TrainConfig(stage="test_custom", p_aug=0.5).stage == "test_custom"
    with pytest.raises(ConfigError, match="built-in"):
        A.register_stage("stage1_basic", ops)


def test_config_takes_any_stage_name_and_stage_ops_names_the_choices(registry):
    A.register_stage("mine", (A.HFlip(),))
    assert config.TrainConfig(stage="not_registered").stage == "not_registered"
    for bad in ("", None, 3):
        with pytest.raises(ConfigError, match="stage"):
            config.TrainConfig(stage=bad)
    with pytest.raises(ConfigError) as err:
        A.stage_ops("not_registered")
    assert all(name in str(err.value) for name in config.ALL_STAGES) and "mine" in str(err.value)
    assert "register_stage" in str(err.value)


@pytest.mark.parametrize("name, ops, match", [
    (None, (A.HFlip(),), "non-empty string"),
    ("", (A.HFlip(),), "non-empty string"),
    (7, (A.HFlip(),), "non-empty string"),
    ("empty", (), "non-empty tuple of op specs"),
    ("not_ops", "HFlip", "non-empty tuple of op specs"),
    ("not_a_spec", (v2.RandomHorizontalFlip(),), "not an op spec"),
])
def test_register_stage_rejects_bad_names_and_op_lists(registry, name, ops, match):
    with pytest.raises(ConfigError, match=match):
        A.register_stage(name, ops)
    assert A.registered_stages() == ()


@pytest.mark.parametrize("make", [
    lambda: A.Erase(value=float("nan")),
    lambda: A.Erase(value=float("inf")),
    lambda: A.Rotate(degrees=float("nan")),
    lambda: A.GaussianNoise(std=float("nan")),
    lambda: A.Affine(scale=(0.9, float("inf"))),
])
def test_non_finite_spec_values_are_rejected(make):
    with pytest.raises(ConfigError, match="finite|must"):
        make()


def test_register_stage_rejects_non_finite_values_that_bypass_construction(registry):
    # A spec built without its checks (e.g. unpickled from elsewhere) is still caught at registration.
    erase = object.__new__(A.Erase)
    for field, value in (("p", 0.5), ("scale", (0.02, 0.15)), ("ratio", (0.3, 3.3)), ("value", float("nan"))):
        object.__setattr__(erase, field, value)
    with pytest.raises(ConfigError, match="non-finite.*value=nan.*finite numbers"):
        A.register_stage("nan_stage", (A.Normalize(), erase))
    assert A.registered_stages() == ()


def test_stage_fingerprint_follows_the_op_specs(registry):
    fingerprints = {stage: A.stage_fingerprint(stage) for stage in config.ALL_STAGES}
    assert len(set(fingerprints.values())) == len(config.ALL_STAGES)  # every stage its own
    assert all(len(f) == 12 for f in fingerprints.values())
    assert A.stage_fingerprint("stage1_basic") == A.stage_fingerprint(A.STAGE_SPECS["stage1_basic"])  # stable
    A.register_stage("mine", (A.HFlip(0.5), A.Rotate(10.0)))
    first = A.stage_fingerprint("mine")
    assert first == A.stage_fingerprint((A.HFlip(0.5), A.Rotate(10.0), A.Normalize()))
    A.register_stage("mine", (A.HFlip(0.5), A.Rotate(11.0)))  # redefined: a new identity
    assert A.stage_fingerprint("mine") != first
    edited = tuple(dataclasses.replace(op, p=0.4) if isinstance(op, A.HFlip) else op
                   for op in A.STAGE_SPECS["stage1_basic"])
    assert A.stage_fingerprint(edited) != fingerprints["stage1_basic"]


# ---------------------------------------------------------------- no host syncs on the accelerator path


BATCHED_STAGES = [stage for stage in config.ALL_STAGES if stage != "none"]


@pytest.mark.parametrize("stage", BATCHED_STAGES)
def test_accelerator_path_has_no_host_syncs_in_augment_and_normalize(images_uint8, stage):
    """The path CUDA takes, forced on the CPU: a few batches through the loader with the stage's
    augmentation build no tensor from Python data and read nothing back (constants are cached)."""
    from data_loading import DeviceLoader

    labels = torch.arange(len(images_uint8))
    augment = A.BatchAugment(stage, 0.5, accelerator_path=True)
    loader = DeviceLoader(images_uint8, labels, 4, config.SVHN_MEAN, config.SVHN_STD, augment=augment, seed=0)
    list(loader)  # warm-up: the cached constants are made here, once
    with O.count_host_syncs() as count:
        for _ in range(2):
            for x, _y in loader:
                x.sum()
    assert count.total == 0, count.events


def test_sync_counter_sees_syncs_and_host_data():
    t = torch.ones(3)
    with O.count_host_syncs() as count:
        t[0].item()
        bool(t.any())
        t[t > 0]
        t.nonzero()
        torch.tensor([1.0])
        torch.full((2,), 3.0)
    assert count.syncs == 4 and count.host_data == 2, count.events


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the cached constants
def test_compiled_apply_equals_eager(images_uint8):
    eager = A.BatchAugment("stage1_basic", 0.5, accelerator_path=True)
    params = eager.sample_params(6, torch.Generator().manual_seed(0), "cpu")
    try:
        compiled = A.BatchAugment("stage1_basic", 0.5, compile=True).apply(images_uint8, params)
    except Exception as error:  # no C++ compiler or an unsupported platform: nothing to compare
        pytest.skip(f"torch.compile cannot run here: {error}")
    torch.testing.assert_close(compiled, eager.apply(images_uint8, params), atol=1e-5, rtol=0)
