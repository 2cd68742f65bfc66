"""Offline SVHN-like digits, written in SVHN's exact ``.mat`` layout.

Each image is a house-number crop: the labelled digit in the centre, parts of its
neighbours in the same font at the left and right edges, printed in one colour on a
textured, unevenly lit plate, then slightly rotated, sheared and scaled, blurred, noised
and JPEG-compressed. Class frequencies follow SVHN's train split.

Speed comes from doing the per-image work on small arrays only: every (font, weight,
digit) glyph is rendered once as an alpha mask; per image the digit line is assembled with
numpy and placed by one PIL affine warp into a 64x64 alpha map (2x supersampled); colours,
lighting, texture, blur and noise are then computed in numpy over a whole chunk at once, and
the JPEG round trip codes all images of one quality in one call.

The files match ``torchvision.datasets.SVHN``: ``X`` uint8 (32, 32, 3, N), ``y`` float64
(N, 1) with 10 standing for the digit 0. A ``params.json`` beside them records what made
them, so an unchanged request reuses the files.

Command line: ``python synthetic_svhn.py --n-train N --n-test N --seed S [--root DIR]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import time
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import config
from atomic_io import atomic_write_bytes, atomic_write_json

# Bump whenever the images a seed produces change, so stale files are regenerated.
GENERATOR_VERSION = 1
SUBDIR = "synthetic"
PARAMS_FILE = "params.json"
SPLIT_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# Separate random streams per split, so the test images do not depend on n_train.
_SPLIT_STREAMS = {"train": 0, "test": 1}

# TrueType faces bundled with matplotlib (mpl-data/fonts/ttf) that draw lining digits.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf",
)
MIN_FONTS = 10

SIZE = 32  # output side
SUPER = 2  # alpha maps are drawn at SUPER * SIZE and box-averaged down (anti-aliasing)
GLYPH_HEIGHT = 48  # height of the digit line in the glyph bank, in pixels
_PAD = 4  # empty border around each banked glyph so the bilinear warp fades to zero
_CHUNK = 512  # images per vectorized chunk


class SyntheticDataError(RuntimeError):
    """The synthetic generator cannot run (e.g. too few usable fonts)."""


# ----------------------------------------------------------------------------- glyph bank


def _font_dir() -> Path:
    import matplotlib  # local: only needed when the glyph bank is first built

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _render_digits(font: ImageFont.FreeTypeFont) -> list[np.ndarray]:
    """Each digit as a uint8 mask, tight horizontally, sharing the font's digit line vertically."""
    boxes = [font.getbbox(str(d)) for d in range(10)]
    top = min(b[1] for b in boxes)
    bottom = max(b[3] for b in boxes)
    masks = []
    for digit, (left, _, right, _) in enumerate(boxes):
        img = Image.new("L", (max(right - left, 1), max(bottom - top, 1)))
        ImageDraw.Draw(img).text((-left, -top), str(digit), font=font, fill=255)
        masks.append(np.asarray(img))
    return masks


def _usable(masks: list[np.ndarray]) -> bool:
    """Ten distinct, non-empty glyphs of similar ink height (rules out missing glyphs, old-style digits)."""
    if len({m.tobytes() for m in masks}) < 10 or min(int(m.max()) for m in masks) == 0:
        return False
    rows = [np.flatnonzero(m.max(axis=1) > 64) for m in masks]
    heights = [r[-1] - r[0] + 1 for r in rows]
    return min(heights) >= 0.8 * max(heights)


def _pad(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask.astype(np.float32) / 255.0, _PAD)


@functools.lru_cache(maxsize=1)
def glyph_bank() -> tuple[tuple[tuple[np.ndarray, ...], ...], ...]:
    """bank[font][weight][digit] -> float32 alpha mask (GLYPH_HEIGHT + 2*_PAD, width).

    Weights 0, 1, 2 are the face as designed and emboldened by a 3x3 or 5x5 max filter (thinning
    would erase the hairlines of serif faces; their light weights come from the faces themselves).
    """
    faces = []
    for name in FONT_FILES:
        path = _font_dir() / name
        if not path.exists():
            continue
        probe = _render_digits(ImageFont.truetype(str(path), 64))
        if not _usable(probe):
            continue
        # Size the face so its digit line is GLYPH_HEIGHT pixels tall.
        size = round(64 * GLYPH_HEIGHT / probe[0].shape[0])
        masks = _render_digits(ImageFont.truetype(str(path), size))
        bold = [[np.asarray(Image.fromarray(m).filter(ImageFilter.MaxFilter(k))) for m in masks] for k in (3, 5)]
        faces.append(tuple(tuple(_pad(m) for m in weight) for weight in (masks, *bold)))
    if len(faces) < MIN_FONTS:
        raise SyntheticDataError(
            f"only {len(faces)} usable fonts found in {_font_dir()} (need {MIN_FONTS}); "
            "reinstall matplotlib, whose bundled TrueType fonts the generator draws with"
        )
    return tuple(faces)


# ----------------------------------------------------------------------------- labels


def class_counts(n: int) -> np.ndarray:
    """Per-digit counts summing to n in SVHN train shares (largest remainder rounding)."""
    shares = np.asarray(config.SVHN_TRAIN_CLASS_COUNTS, dtype=np.float64)
    exact = n * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(10), class_counts(n)))


# ----------------------------------------------------------------------------- layout


def _layout_params(labels: np.ndarray, n_fonts: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image geometry of the digit line, drawn in one vectorized call per field."""
    b = len(labels)
    # A house number of 1-4 digits; the labelled digit sits at a random position in it.
    length = rng.choice(4, size=b, p=(0.45, 0.33, 0.15, 0.07)) + 1
    position = (rng.random(b) * length).astype(np.int64)
    p = dict(
        font=rng.integers(0, n_fonts, b),
        weight=rng.choice(3, size=b, p=(0.5, 0.3, 0.2)),
        left=np.minimum(position, 2),
        right=np.minimum(length - 1 - position, 2),
        neighbours=rng.integers(0, 10, (b, 4)),  # two digits per side, used if present
        gap=np.rint(rng.uniform(0.02, 0.25, b) * GLYPH_HEIGHT).astype(np.int64),  # spacing, bank pixels
    )
    out = SUPER * SIZE
    sy = rng.uniform(0.62, 0.92, b) * out / GLYPH_HEIGHT  # digit height 62-92% of the frame
    sx = sy * np.exp(rng.normal(0.0, 0.06, b))  # horizontal stretch
    angle = np.deg2rad(rng.normal(0.0, 2.5, b))
    shear = rng.normal(0.0, 0.06, b)
    shift = rng.normal(0.0, 0.015, (b, 2))  # centre jitter, in frame widths
    # Forward map source -> frame: rotation @ shear @ scale, (b, 2, 2); PIL wants its inverse.
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear_scale = np.zeros((b, 2, 2))
    shear_scale[:, 0, 0], shear_scale[:, 0, 1], shear_scale[:, 1, 1] = sx, shear * sy, sy
    p["inverse"] = np.linalg.inv(rotation @ shear_scale)
    p["target"] = out / 2 + shift * out  # where the labelled digit's centre lands
    return p


def _digit_line(glyphs: tuple[np.ndarray, ...], digits: list[int], gap: int) -> tuple[np.ndarray, list[int]]:
    """Glyphs side by side, ``gap`` pixels apart, and the x offset of each."""
    starts, x = [], 0
    for digit in digits:
        starts.append(x)
        x += glyphs[digit].shape[1] + gap
    line = np.zeros((glyphs[0].shape[0], x - gap), np.float32)
    for digit, x0 in zip(digits, starts, strict=True):
        line[:, x0 : x0 + glyphs[digit].shape[1]] = glyphs[digit]
    return line, starts


def _render_alpha(label: int, p: dict[str, np.ndarray], i: int, bank) -> np.ndarray:
    """Alpha map (SUPER*SIZE, SUPER*SIZE) of image i: its digit line warped into the frame."""
    glyphs = bank[p["font"][i]][p["weight"][i]]
    n_left, n_right = int(p["left"][i]), int(p["right"][i])
    digits = [*p["neighbours"][i, :n_left].tolist(), label, *p["neighbours"][i, 2 : 2 + n_right].tolist()]
    line, starts = _digit_line(glyphs, digits, int(p["gap"][i]))
    # Source point that lands on the target: the middle of the labelled glyph.
    centre = np.array([starts[n_left] + glyphs[label].shape[1] / 2, line.shape[0] / 2])
    inverse = p["inverse"][i]
    offset = centre - inverse @ p["target"][i]
    coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
    out = SUPER * SIZE
    warped = Image.fromarray(line).transform(
        (out, out), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


# ----------------------------------------------------------------------------- appearance


def _upsample_matrix(n: int, size: int = SIZE) -> np.ndarray:
    """(size, n) bilinear interpolation weights from an n-point grid to size pixels."""
    pos = np.linspace(0, n - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - lo
    m = np.zeros((size, n))
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _per_image(rng: np.random.Generator, low: float, high: float, b: int, ndim: int = 4) -> np.ndarray:
    """One uniform float32 value per image, shaped (b, 1, ...) to broadcast over an ndim batch."""
    return rng.uniform(low, high, b).astype(np.float32).reshape((b,) + (1,) * (ndim - 1))


def _smooth_noise(rng: np.random.Generator, b: int, grid: int) -> np.ndarray:
    """(b, SIZE, SIZE) float32 smooth random field, roughly N(0, 1) at the grid points."""
    up = _upsample_matrix(grid).astype(np.float32)
    return up @ rng.standard_normal((b, grid, grid), dtype=np.float32) @ up.T


def _colours(rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Plate and ink colours (b, 3) float32 in [0, 1]: either polarity, luminance gap 0.25-0.8."""
    gap = rng.uniform(0.25, 0.8, b)
    dark = rng.uniform(0.0, 1.0 - gap)
    light = dark + gap
    ink_is_dark = rng.random(b) < 0.6
    plate_lum = np.where(ink_is_dark, light, dark)
    ink_lum = np.where(ink_is_dark, dark, light)

    def tint(lum: np.ndarray) -> np.ndarray:
        # Mostly muted paints (greys, browns, dull blues), now and then a saturated one.
        strength = np.where(rng.random(b) < 0.15, 0.3, 0.12)[:, None]
        chroma = strength * rng.random((b, 1)) * rng.standard_normal((b, 3))
        colour = lum[:, None] + chroma - chroma.mean(axis=1, keepdims=True)
        return np.clip(colour, 0.0, 1.0).astype(np.float32)

    return tint(plate_lum), tint(ink_lum)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), each (SIZE, SIZE) float32 in [-0.5, 0.5], centred on the frame."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1) - 0.5
    return yy, xx


def _directional(rng: np.random.Generator, b: int) -> np.ndarray:
    """(b, SIZE, SIZE) projection of each pixel on a random unit direction, in [-0.71, 0.71]."""
    yy, xx = _grid()
    theta = rng.uniform(0, 2 * np.pi, b).astype(np.float32)[:, None, None]
    return np.cos(theta) * xx + np.sin(theta) * yy


def _plate_edge(rng: np.random.Generator, b: int) -> np.ndarray:
    """(b, SIZE, SIZE) soft half-plane masks: a plate border or wall in some images, zero in others."""
    signed = _directional(rng, b) - _per_image(rng, 0.3, 0.55, b, 3)  # edge stays off the centre
    present = (rng.random(b) < 0.3).astype(np.float32)[:, None, None]
    return present / (1.0 + np.exp(-signed / np.float32(0.02)))


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of (b, H, W, 3) with one sigma per image (5-tap, edge padding)."""
    taps = np.arange(-2, 3, dtype=np.float32)
    kernel = np.exp(-(taps[None, :] ** 2) / (2 * sigma.astype(np.float32)[:, None] ** 2))
    kernel /= kernel.sum(axis=1, keepdims=True)  # (b, 5)
    k = kernel[:, :, None, None, None]
    padded = np.pad(images, ((0, 0), (2, 2), (0, 0), (0, 0)), mode="edge")
    images = sum(k[:, t] * padded[:, t : t + SIZE] for t in range(5))
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    return sum(k[:, t] * padded[:, :, t : t + SIZE] for t in range(5))


def _jpeg(images: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """(b, 32, 32, 3) uint8 through JPEG encode/decode, each at its own quality.

    Images of one quality are stacked into one tall picture and coded in one call. Without
    chroma subsampling JPEG codes every 8x8 block on its own, so each 32x32 tile comes out
    exactly as if it had been coded alone, at a fraction of the per-call cost.
    """
    out = np.empty_like(images)
    for q in np.unique(quality):
        idx = np.flatnonzero(quality == q)
        buffer = io.BytesIO()
        tall = Image.fromarray(images[idx].reshape(-1, SIZE, 3))  # (k * 32, 32, 3)
        tall.save(buffer, format="JPEG", quality=int(q), subsampling=0)
        out[idx] = np.asarray(Image.open(buffer, formats=("JPEG",))).reshape(-1, SIZE, SIZE, 3)
    return out


def _alpha_maps(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(b, 32, 32, 1) float32 ink coverage: the digit line per image, box-averaged from 64x64."""
    bank = glyph_bank()
    b = len(labels)
    layout = _layout_params(labels, len(bank), rng)
    alpha = np.stack([_render_alpha(int(labels[i]), layout, i, bank) for i in range(b)])
    alpha = alpha.reshape(b, SIZE, SUPER, SIZE, SUPER).mean(axis=(2, 4))[..., None]
    return alpha * _per_image(rng, 0.85, 1.0, b)  # worn or thin paint


def _render_chunk(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 images (b, 32, 32, 3) for the given labels."""
    b = len(labels)
    alpha = _alpha_maps(labels, rng)
    plate, ink = _colours(rng, b)
    wall, _ = _colours(rng, b)
    edge = _plate_edge(rng, b)[..., None]
    texture = _per_image(rng, 0.0, 0.08, b) * _smooth_noise(rng, b, 8)[..., None]
    background = plate[:, None, None] * (1 - edge) + wall[:, None, None] * edge + texture
    image = background * (1 - alpha) + ink[:, None, None] * alpha  # (b, 32, 32, 3)

    # Uneven light: a linear ramp in a random direction plus smooth blotches, multiplicative.
    light = 1.0 + _per_image(rng, 0.0, 0.4, b, 3) * _directional(rng, b)
    light += _per_image(rng, 0.0, 0.1, b, 3) * _smooth_noise(rng, b, 4)
    image *= np.clip(light, 0.2, 2.0)[..., None]

    image = _blur(image, rng.uniform(0.3, 1.0, b))
    image += _per_image(rng, 0.0, 0.03, b) * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return _jpeg(image, 5 * rng.integers(8, 20, b))  # quality 40-95


def generate(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 (n, 32, 32, 3) and labels int64 (n,) in 0..9, deterministic in (seed, split)."""
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    labels = _labels(n, rng)
    chunks = [_render_chunk(labels[i : i + _CHUNK], rng) for i in range(0, n, _CHUNK)]
    images = np.concatenate(chunks) if chunks else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, labels


# ----------------------------------------------------------------------------- files


def svhn_mat_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """A MATLAB v5 file in SVHN's layout from (N, 32, 32, 3) uint8 images and 0..9 labels."""
    buffer = io.BytesIO()
    scipy.io.savemat(
        buffer,
        {
            "X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)),  # (32, 32, 3, N)
            "y": np.where(labels == 0, 10, labels).astype(np.float64).reshape(-1, 1),  # 10 = digit 0
        },
    )
    # The 116-byte text header carries a creation time; a fixed one makes equal data equal bytes.
    header = f"MATLAB 5.0 MAT-file, synthetic SVHN generator {GENERATOR_VERSION}".encode().ljust(116)
    return header + buffer.getvalue()[116:]


def _params(n_train: int, n_test: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "fonts": list(FONT_FILES),
    }


def _recorded_params(folder: Path) -> dict | None:
    """The parameters recorded with complete files in ``folder``, or None."""
    if not all((folder / name).exists() for name in SPLIT_FILES.values()):
        return None
    try:
        return json.loads((folder / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _folder(root: str | Path | None) -> Path:
    return Path(config.DATA_DIR if root is None else root) / SUBDIR


def make_synthetic_svhn(
    root: str | Path | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int | None = None,
) -> Path:
    """Write train/test ``.mat`` files of synthetic SVHN into ``<root or DATA_DIR>/synthetic``.

    ``None`` arguments take the config defaults (SYNTHETIC_N_TRAIN/N_TEST/SEED) at call time.
    Files whose recorded parameters match are reused; otherwise both splits are rewritten
    atomically, and the parameters last, so an interrupted run is redone next time.
    Returns the folder.
    """
    folder = _folder(root)
    params = _params(
        config.SYNTHETIC_N_TRAIN if n_train is None else int(n_train),
        config.SYNTHETIC_N_TEST if n_test is None else int(n_test),
        config.SYNTHETIC_SEED if seed is None else int(seed),
    )
    if _recorded_params(folder) == params:
        return folder
    (folder / PARAMS_FILE).unlink(missing_ok=True)
    for split, name in SPLIT_FILES.items():
        images, labels = generate(params[f"n_{split}"], params["seed"], split)
        atomic_write_bytes(folder / name, svhn_mat_bytes(images, labels))
    atomic_write_json(folder / PARAMS_FILE, params)
    return folder


def ensure_synthetic_svhn(root: str | Path | None = None) -> Path:
    """The synthetic folder under ``root``: files made by this generator version are used as they
    are (whatever their sizes and seed); missing or stale ones are generated with the defaults."""
    folder = _folder(root)
    recorded = _recorded_params(folder)
    current = _params(0, 0, 0)
    if recorded and all(recorded.get(k) == current[k] for k in ("generator_version", "fonts")):
        return folder
    return make_synthetic_svhn(root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the offline synthetic SVHN (.mat files).")
    parser.add_argument("--n-train", type=int, default=config.SYNTHETIC_N_TRAIN)
    parser.add_argument("--n-test", type=int, default=config.SYNTHETIC_N_TEST)
    parser.add_argument("--seed", type=int, default=config.SYNTHETIC_SEED)
    parser.add_argument("--root", type=Path, default=None, help="data root (default: config.DATA_DIR)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder = make_synthetic_svhn(args.root, args.n_train, args.n_test, args.seed)
    print(f"synthetic SVHN in {folder} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
