"""Every figure of the project: EDA of the image tensors and the study's results.

Each ``plot_*`` function returns a matplotlib ``Figure`` (never shows it) and names the
dataset in the title, so results on the synthetic data are never mistaken for SVHN. Study
figures take plain Python / pandas structures (so they can be rebuilt from the JSON reports
without retraining) and an optional ``budget`` text shown under the title. Metric axes and
colour scales stay within the metric's range. Image statistics run vectorized in chunks, so
the whole SVHN train split (73k images) needs no per-sample Python loop.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torchvision.transforms.v2.functional import rgb_to_grayscale
from torchvision.utils import make_grid

import augmentations
import config
import stats
from atomic_io import atomic_write_bytes

# Images per chunk for the full-split statistics: 4096 x 3 x 32 x 32 float32 is ~50 MB.
CHUNK = 4096
CHANNEL_NAMES = ("R", "G", "B")
CHANNEL_COLORS = ("tab:red", "tab:green", "tab:blue")
# 3x3 Laplacian (4-neighbour), the kernel of scipy.ndimage.laplace and cv2.Laplacian(ksize=1).
LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
ANNOT_FONTSIZE = 9
# What kind of policy each policy stage is: RandAugment and TrivialAugment draw their ops at
# random (no search); AutoAugment's SVHN policy was learned on SVHN.
POLICY_KINDS = {"randaugment": "automated policy", "trivialaugment": "automated policy",
                "autoaugment_svhn": "learned policy"}
# Fewer completed trials than this give importances that are noise.
MIN_TRIALS_FOR_IMPORTANCES = 10
THUMBNAIL_WIDTH_PX = 480  # README gallery


# ----------------------------------------------------------------------------- helpers


def dataset_label(dataset: str) -> str:
    """Human name of a dataset for titles: "SVHN" or "synthetic SVHN (not real data)"."""
    labels = {"svhn": "SVHN", "synthetic": "synthetic SVHN (not real data)"}
    if dataset not in labels:
        raise config.ConfigError(f"unknown dataset {dataset!r}; choose one of {tuple(labels)}")
    return labels[dataset]


def model_label(name: str) -> str:
    """Display name of a model ("simplecnn" -> "SimpleCNN"); any other name is returned as is."""
    return config.MODEL_DISPLAY_NAMES.get(name, name)


def count_text(count: int, noun: str) -> str:
    """A count with its noun in the right number: "1 epoch", "3 seeds", "2,700 train images"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The figure file formats asked for, checked: PNG always, plus PDF and/or SVG."""
    unknown = sorted(set(formats) - set(config.FIGURE_FORMATS))
    config.require(not unknown, f"unknown figure format(s) {unknown}; choose from {', '.join(config.FIGURE_FORMATS)}")
    return tuple(dict.fromkeys(("png", *formats)))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``fig`` once per format (PNG always; "pdf" and "svg" add vector copies) beside ``path``, cropped
    to what it draws (tight bounding box), each rendered in memory and written atomically. Returns the paths."""
    written = []
    for fmt in check_formats(formats):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
        written.append(atomic_write_bytes(Path(path).with_suffix(f".{fmt}"), buffer.getvalue()))
    return written


def save_thumbnail(fig: Figure, path: str | Path, stamp: str, width_px: int = THUMBNAIL_WIDTH_PX) -> Path:
    """A small PNG of ``fig`` about ``width_px`` wide, with ``stamp`` (e.g. "SYNTHETIC DATA") written above its
    top-left corner (the tight crop grows to hold it, so it never covers the title), so a thumbnail too small
    to read its title still says what data it shows."""
    fig.text(0.01, 1.0, stamp, ha="left", va="bottom", fontsize=14, fontweight="bold", color="tab:red",
             bbox={"fc": "white", "ec": "tab:red", "alpha": 0.9, "pad": 2})
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=width_px / fig.get_figwidth(), bbox_inches="tight", pad_inches=0.05)
    return atomic_write_bytes(path, buffer.getvalue())


def _wrap_phrases(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken between phrases (after "; " or ", ") rather than inside
    one; a single phrase longer than a line is broken between words."""
    lines: list[str] = []
    for phrase in re.split(r"(?<=[;,])\s+", text):
        if lines and len(lines[-1]) + 1 + len(phrase) <= width:
            lines[-1] += " " + phrase
        else:
            lines += textwrap.wrap(phrase, width, break_on_hyphens=False) or [""]
    return lines


def _suptitle(fig: Figure, title: str, dataset: str, budget: str | None = None) -> None:
    """The title, then the dataset and the budget on their own lines, each wrapped between phrases to the
    figure's width (about 0.09 inch per character at 11 pt)."""
    width = max(30, int(fig.get_figwidth() / 0.09))
    subtitle = dataset_label(dataset) + ("" if budget is None else f"; {budget}")
    lines = _wrap_phrases(title, width) + _wrap_phrases(subtitle, width)
    fig.suptitle("\n".join(lines), fontsize=11)


def _figure(title: str, dataset: str, budget: str | None = None, **subplots_kwargs):
    """A constrained-layout figure whose title names the dataset (and budget); returns (fig, axes)."""
    fig, axes = plt.subplots(layout="constrained", **subplots_kwargs)
    _suptitle(fig, title, dataset, budget)
    return fig, axes


def _chance_line(ax, chance: float | None) -> None:
    """A dashed horizontal line at the chance level, labelled at its right end; a chance level below the
    axis is said in words at the axis' bottom instead."""
    if chance is None:
        return
    low, high = ax.get_ylim()
    if not low <= chance <= high:
        ax.annotate(f"chance {chance:.2f} (below the axis)", (0.99, 0.01), xycoords="axes fraction", ha="right",
                    va="bottom", color="tab:red", fontsize=8)
        return
    ax.axhline(chance, color="tab:red", ls="--", lw=1)
    ax.annotate(f"chance {chance:.2f}", (0.99, chance), xycoords=("axes fraction", "data"), ha="right",
                va="bottom", color="tab:red", fontsize=8, bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 1})


def _images_uint8(images) -> torch.Tensor:
    """Any (N, 3, H, W) uint8 tensor or array as a CPU torch uint8 tensor."""
    images = torch.as_tensor(images).cpu()
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(labels).cpu().long().reshape(-1)


def _unit_float(images) -> torch.Tensor:
    """(N, 3, H, W) uint8 or float -> float32 CPU tensor clamped to [0, 1]."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float().clamp(0, 1)


def _to_display(images) -> np.ndarray:
    """(N, 3, H, W) uint8 or [0, 1] float -> (N, H, W, 3) float numpy in [0, 1] for imshow."""
    return _unit_float(images).permute(0, 2, 3, 1).numpy()


def _show_montage(ax, tiles: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str], pad: int = 2):
    """Draw (R*C, 3, H, W) tiles in [0, 1] as an R x C montage with white gaps, one tick label per row/column."""
    _, _, h, w = tiles.shape
    grid = make_grid(tiles, nrow=len(col_labels), padding=pad, pad_value=1.0)  # (3, R*(H+pad)+pad, C*(W+pad)+pad)
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 - 0.5 for r in range(len(row_labels))], row_labels)
    ax.set_xticks([pad + c * (w + pad) + w / 2 - 0.5 for c in range(len(col_labels))], col_labels)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)


def _heatmap(ax, values: np.ndarray, texts: np.ndarray, row_labels, col_labels, *, cmap: str, vmin: float,
             vmax: float, colorbar_label: str, fontsize: float = ANNOT_FONTSIZE) -> None:
    """seaborn's annotated heatmap of ``values`` (R, C) with ``texts`` in the cells; NaN cells grey and blank."""
    sns.heatmap(values, ax=ax, annot=texts, fmt="", cmap=cmap, vmin=vmin, vmax=vmax, xticklabels=list(col_labels),
                yticklabels=list(row_labels), cbar_kws={"label": colorbar_label, "shrink": 0.9},
                annot_kws={"fontsize": fontsize})
    ax.set_facecolor("0.85")  # seaborn masks NaN cells: the background shows through
    ax.tick_params(axis="y", rotation=0)


def _fmt_axis_value(value) -> str:
    """Column/row labels of tables: floats compactly (0.25), everything else as is."""
    return f"{value:g}" if isinstance(value, float | np.floating) else str(value)


# ----------------------------------------------------------------------------- EDA


def plot_class_balance(train_labels, test_labels, dataset: str) -> Figure:
    """Class counts and class shares of the train and test splits, side by side."""
    train = torch.bincount(_labels(train_labels), minlength=config.NUM_CLASSES).numpy()
    test = torch.bincount(_labels(test_labels), minlength=config.NUM_CLASSES).numpy()
    fig, (ax_count, ax_share) = _figure("Class balance", dataset, ncols=2, figsize=(11, 4))
    x = np.arange(config.NUM_CLASSES)
    width = 0.4
    for offset, counts, name in ((-width / 2, train, "train"), (width / 2, test, "test")):
        label = f"{name} (n={counts.sum():,})"
        ax_count.bar(x + offset, counts, width, label=label)
        ax_share.bar(x + offset, 100 * counts / max(counts.sum(), 1), width, label=label)
    ax_share.axhline(100 / config.NUM_CLASSES, color="0.4", ls="--", lw=1, label="uniform (10 %)")
    for ax, ylabel, title in ((ax_count, "images", "counts"), (ax_share, "share of split (%)", "shares")):
        ax.set_xticks(x, config.CLASS_NAMES)
        ax.set(xlabel="digit", ylabel=ylabel, title=title)
    # One legend for both panels, below them (inside, it would hide bars).
    fig.legend(*ax_share.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    return fig


def plot_samples_per_class(images, labels, dataset: str, per_class: int = 8, seed: int = 0) -> Figure:
    """A grid of random examples: one row per digit, ``per_class`` columns."""
    images, labels = _images_uint8(images), _labels(labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    _, _, h, w = images.shape
    tiles = torch.ones(config.NUM_CLASSES, per_class, 3, h, w)  # missing examples stay white
    for digit in range(config.NUM_CLASSES):
        picked = order[labels[order] == digit][:per_class]
        tiles[digit, : len(picked)] = _unit_float(images[picked])
    fig, ax = _figure("Random examples per class", dataset, figsize=(1.0 + 0.75 * per_class, 8.5))
    _show_montage(ax, tiles.flatten(0, 1), config.CLASS_NAMES, [str(i + 1) for i in range(per_class)])
    ax.set(xlabel="example", ylabel="digit (label)")
    return fig


def channel_histograms(images) -> np.ndarray:
    """Pixel counts per channel and intensity: int64 (3, 256), chunked over the images."""
    images = _images_uint8(images)
    offsets = (torch.arange(3) * 256).view(1, 3, 1, 1)  # one bincount serves all three channels
    counts = torch.zeros(3 * 256, dtype=torch.int64)
    for chunk in images.split(CHUNK):
        counts += torch.bincount((chunk.long() + offsets).reshape(-1), minlength=3 * 256)
    return counts.view(3, 256).numpy()


def plot_channel_histograms(images, dataset: str) -> Figure:
    """Per-channel intensity histograms (share of pixels at each value 1..254).

    Clipped pixels pile up at 0 and 255; drawn, those two spikes would flatten the rest of the curve,
    so each panel leaves them out and gives their shares in words.
    """
    counts = channel_histograms(images)
    shares = counts / counts.sum(axis=1, keepdims=True)  # (3, 256)
    levels = np.arange(256)
    inner = slice(1, 255)  # 1..254: the levels drawn
    fig, axes = _figure("Pixel intensity per channel", dataset, ncols=3, figsize=(12, 4), sharey=True)
    for c, ax in enumerate(axes):
        mean = (shares[c] * levels).sum()
        std = math.sqrt((shares[c] * (levels - mean) ** 2).sum())
        ax.fill_between(levels[inner], 100 * shares[c, inner], step="mid", color=CHANNEL_COLORS[c], alpha=0.6)
        ax.set_title(f"{CHANNEL_NAMES[c]}: mean {mean / 255:.3f}, std {std / 255:.3f} (0-1 units)\n"
                     f"not drawn: {100 * shares[c, 0]:.1f} % of pixels at 0, {100 * shares[c, 255]:.1f} % at 255",
                     fontsize=9)
        ax.set(xlabel="intensity (0-255)", xlim=(0, 255))
    axes[0].set_ylabel("share of pixels (%)")
    return fig


def image_statistics(images, chunk_size: int = CHUNK) -> dict[str, np.ndarray]:
    """Per-image brightness, contrast and sharpness, each a float64 array (N,).

    On the grayscale image (torchvision's rgb_to_grayscale, 0-255 units): brightness is its mean,
    contrast its standard deviation, sharpness the variance of its 3x3 Laplacian (edges replicated,
    as scipy.ndimage.laplace's default mode).
    """
    images = _images_uint8(images)
    kernel = torch.tensor(LAPLACIAN_3X3).view(1, 1, 3, 3)
    parts = {"brightness": [], "contrast": [], "sharpness": []}
    for chunk in images.split(chunk_size):
        gray = rgb_to_grayscale(chunk.float())  # (B, 1, H, W); float input: no rounding
        laplacian = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernel)  # (B, 1, H, W)
        parts["brightness"].append(gray.mean(dim=(1, 2, 3)))
        parts["contrast"].append(gray.std(dim=(1, 2, 3), correction=0))
        parts["sharpness"].append(laplacian.var(dim=(1, 2, 3), correction=0))
    return {name: torch.cat(values).double().numpy() for name, values in parts.items()}
def plot_image_statistics(
    images, dataset: str, stats: Mapping[str, np.ndarray] | None = None, max_points: int = 5000, seed: int = 0
) -> Figure:
    """Histograms of brightness, contrast and sharpness, and two scatter plots between them.

    ``stats`` (the output of ``image_statistics``) skips the recomputation; the scatters show
    a random subsample of ``max_points`` images so they stay legible.
    """
    stats = image_statistics(images) if stats is None else stats
    log_sharp = np.log10(1.0 + np.asarray(stats["sharpness"]))  # heavy-tailed: log scale
    columns = {"brightness": ("brightness (mean gray, 0-255)", np.asarray(stats["brightness"])),
               "contrast": ("contrast (std of gray, 0-255)", np.asarray(stats["contrast"])),
               "sharpness": ("sharpness: log10(1 + Laplacian variance)", log_sharp)}
    fig = plt.figure(layout="constrained", figsize=(13, 8))
    _suptitle(fig, f"Image statistics (n={len(log_sharp):,})", dataset)
    axes = fig.subplot_mosaic([["brightness"] * 2 + ["contrast"] * 2 + ["sharpness"] * 2,
                               ["bc"] * 3 + ["cs"] * 3])
    for name, (label, values) in columns.items():
        ax = axes[name]
        ax.hist(values, bins=60, color="tab:blue", alpha=0.8)
        ax.axvline(np.median(values), color="k", ls="--", lw=1, label=f"median {np.median(values):.3g}")
        ax.set(xlabel=label, ylabel="images")
        ax.legend(fontsize=8)
    shown = np.random.default_rng(seed).choice(len(log_sharp), size=min(len(log_sharp), max_points), replace=False)
    for key, (x_name, y_name) in (("bc", ("brightness", "contrast")), ("cs", ("contrast", "sharpness"))):
        ax = axes[key]
        ax.scatter(columns[x_name][1][shown], columns[y_name][1][shown], s=4, alpha=0.3, rasterized=True)
        ax.set(xlabel=columns[x_name][0], ylabel=columns[y_name][0])
        ax.set_title(f"{y_name} vs {x_name} ({len(shown):,} random images)", fontsize=10)
    return fig


def class_mean_images(images, labels) -> torch.Tensor:
    """Mean image of each class: float64 (NUM_CLASSES, 3, H, W) in [0, 1] (NaN for an empty class)."""
    images, labels = _images_uint8(images), _labels(labels)
    _, c, h, w = images.shape
    sums = torch.zeros(config.NUM_CLASSES, c * h * w, dtype=torch.float64)
    for chunk, chunk_labels in zip(images.split(CHUNK), labels.split(CHUNK), strict=True):
        sums.index_add_(0, chunk_labels, chunk.reshape(len(chunk), -1).double())
    counts = torch.bincount(labels, minlength=config.NUM_CLASSES).double()
    return (sums / counts[:, None] / 255.0).view(config.NUM_CLASSES, c, h, w)


def plot_mean_images(images, labels, dataset: str) -> Figure:
    """Mean image per class, as is and contrast-stretched per image (the digit shape shows better)."""
    means = class_mean_images(images, labels).nan_to_num(1.0).float()  # (10, 3, H, W)
    low = means.amin(dim=(1, 2, 3), keepdim=True)
    high = means.amax(dim=(1, 2, 3), keepdim=True)
    stretched = (means - low) / (high - low).clamp_min(1e-8)
    fig, ax = _figure("Mean image per class", dataset, figsize=(11, 3.4))
    _show_montage(ax, torch.cat([means, stretched]), ["mean", "mean,\nstretched"], config.CLASS_NAMES)
    ax.set(xlabel="digit", ylabel="rendering")
    return fig


def channel_correlation(images) -> np.ndarray:
    """Pearson correlation (3, 3) of the R, G, B values over all pixels, chunked in float64."""
    images = _images_uint8(images)
    total = torch.zeros(3, dtype=torch.float64)
    cross = torch.zeros(3, 3, dtype=torch.float64)
    for chunk in images.split(CHUNK):
        pixels = chunk.double().permute(1, 0, 2, 3).reshape(3, -1)  # (3, B*H*W)
        total += pixels.sum(dim=1)
        cross += pixels @ pixels.T
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    cov = cross / count - torch.outer(mean, mean)
    scale = cov.diagonal().sqrt()
    return (cov / torch.outer(scale, scale)).numpy()


# ----------------------------------------------------------------------------- study figures

# How each verdict of a cell against no augmentation is drawn: (legend text, colour, marker). Better is blue
# and worse red, as on the diverging colour map of the difference heatmap.
VERDICT_STYLES = {
    "better": ("significantly better", "tab:blue", "^"),
    "worse": ("significantly worse", "tab:red", "v"),
    "no difference": ("no significant difference", "0.3", "o"),
    "not tested": ("not tested (one seed or no baseline)", "0.55", "s"),
    "at chance": ("at chance: no effect can be read", "tab:purple", "X"),
    "baseline": ("no augmentation (the reference)", "black", "D"),
}
VERDICT_MARKS = {"better": " ▲", "worse": " ▼", "at chance": " ×"}  # the heatmap's text marks
DIFF_LABEL = "difference in test macro-F1 from no augmentation"


def _seed_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds (stats.seed_summary); one seed: no interval (NaN bounds)."""
    summary = stats.seed_summary(values)
    if summary["single_run"]:
        return summary["mean"], np.nan, np.nan
    return summary["mean"], summary["ci_low"], summary["ci_high"]


def _histories_by_group(runs) -> dict[str, list[Sequence[Mapping]]]:
    """{label: [history per seed]} from either that mapping or a single run's history (a list of epochs)."""
    if isinstance(runs, Mapping):
        return {label: list(histories) for label, histories in runs.items()}
    return {"run": [runs]}


def plot_learning_curves(runs, dataset: str, title: str = "Learning curves", budget: str | None = None,
                         chance: float | None = None) -> Figure:
    """Loss, accuracy and validation macro-F1 per epoch for every seed of every group (e.g. a cell and the
    baseline), overlaid: one colour per group, dashed = training, solid = validation; a dot marks each seed's
    best-validation epoch, whose weights were tested.

    ``runs``: {label: [history of each seed]} or one run's history; a history is one dict per epoch with
    epoch, train_loss, val_loss, train_accuracy, val_accuracy, val_f1_macro (a key missing from the records
    is left out of its panel). ``chance``: macro-F1 of guessing, drawn on the F1 panel.
    """
    groups = _histories_by_group(runs)
    fig, axes = _figure(title, dataset, budget, ncols=3, figsize=(13, 4.6))
    panels = (("loss (cross-entropy)", ("train_loss", "val_loss")),
              ("accuracy", ("train_accuracy", "val_accuracy")), ("validation macro-F1", ("val_f1_macro",)))
    epochs = sorted({record["epoch"] for histories in groups.values() for h in histories for record in h})
    handles = []
    for index, (label, histories) in enumerate(groups.items()):
        color = plt.get_cmap("tab10")(index % 10)
        handles.append(Line2D([], [], color=color, lw=2, label=f"{label} ({count_text(len(histories), 'seed')})"))
        for history in histories:
            x = [record["epoch"] for record in history]
            for ax, (_, keys) in zip(axes, panels, strict=True):
                for key in keys:
                    values = np.array([record.get(key, np.nan) for record in history], dtype=float)
                    if np.isfinite(values).any():
                        ax.plot(x, values, color=color, lw=1.2, alpha=0.75, marker="o" if len(x) == 1 else None,
                                ls="--" if key.startswith("train") else "-")
            f1 = np.array([record.get("val_f1_macro", np.nan) for record in history], dtype=float)
            if np.isfinite(f1).any():
                axes[2].plot(x[int(np.nanargmax(f1))], np.nanmax(f1), "o", color=color, ms=6, mec="black", zorder=3)
    for ax, (ylabel, _) in zip(axes, panels, strict=True):
        top = 1.05 * ax.dataLim.y1 if ylabel.startswith("loss") else 1.0
        ax.set(xlabel="epoch", ylabel=ylabel, xlim=(min(epochs) - 0.5, max(epochs) + 0.5), ylim=(0.0, top))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    _chance_line(axes[2], chance)
    handles += [Line2D([], [], color="0.3", ls="--", label="training"), Line2D([], [], color="0.3", label="validation"),
                Line2D([], [], ls="none", marker="o", color="0.6", mec="black", label="best epoch (tested)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    if len(epochs) == 1:
        axes[1].set_title("1 epoch only: each value is a single point", fontsize=9)
    return fig


def plot_confusion_matrix(cm, dataset: str, class_names: Sequence[str] = config.CLASS_NAMES, normalize: bool = True,
                          title: str = "Confusion matrix", budget: str | None = None) -> Figure:
    """Confusion matrix (rows = true, columns = predicted); normalized per true class by default."""
    counts = np.asarray(cm, dtype=float)
    if normalize:
        support = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
        texts = np.where(values == 0, "0", np.vectorize(lambda v: f"{v:.2f}")(values))
        vmax, bar_label = 1.0, "share of the true class's test images"
    else:
        values = counts
        texts = np.vectorize(lambda v: f"{v:.0f}")(values)
        vmax, bar_label = max(float(values.max()), 1.0), "test images"
    size = 1.6 + 0.55 * len(class_names)
    fig, ax = _figure(title + (" (row-normalized)" if normalize else ""), dataset, budget,
                      figsize=(size + 1.8, size + 0.6))
    _heatmap(ax, values, texts, class_names, class_names, cmap="Blues", vmin=0.0, vmax=vmax,
             colorbar_label=bar_label, fontsize=8)
    ax.set(xlabel="predicted digit", ylabel="true digit")
    return fig


def plot_per_class_f1(f1_by_run: Mapping[str, Sequence], dataset: str,
                      class_names: Sequence[str] = config.CLASS_NAMES, title: str = "Per-class F1",
                      budget: str | None = None, chance: float | None = None) -> Figure:
    """Per-class test F1 of each run group: the mean over its seeds with a 95% Student-t interval over seeds
    (a group with one seed: a hollow marker, no interval), groups side by side per digit.

    ``f1_by_run``: {label: per-class F1 of each seed, (S, K), or of one run, (K,)}; the legend gives each
    group's seeds and macro-F1 (the mean of its per-class F1).
    """
    fig, ax = _figure(title, dataset, budget, figsize=(max(8.0, 0.8 * len(class_names) + 2.5), 4.8))
    x = np.arange(len(class_names))
    width = 0.8 / len(f1_by_run)
    lowest = 1.0
    for index, (label, scores) in enumerate(f1_by_run.items()):
        scores = np.atleast_2d(np.asarray(scores, dtype=float))  # (S, K)
        summary = np.array([_seed_interval(scores[:, k]) for k in range(scores.shape[1])])  # (K, 3)
        mean, low, high = summary.T
        color = plt.get_cmap("tab10")(index % 10)
        has_interval = len(scores) > 1
        offsets = x + (index - (len(f1_by_run) - 1) / 2) * width
        errors = np.vstack([mean - low, high - mean]) if has_interval else None
        text = f"{label} ({count_text(len(scores), 'seed')}, macro-F1 {scores.mean():.3f})"
        ax.errorbar(offsets, mean, yerr=errors, fmt="o", color=color, mfc=color if has_interval else "white",
                    ms=6, capsize=3, lw=1.3, label=text if has_interval else f"{text}, no interval")
        lowest = min(lowest, float(np.nanmin(low if has_interval else mean)))
    # Points with intervals, not bars: the axis may start above 0 to show the intervals (never below 0).
    ax.set(xlabel="digit", ylabel="F1 (test), mean and 95% interval over seeds", ylim=(max(0.0, lowest - 0.05), 1.0))
    ax.set_xticks(x, class_names)
    ax.grid(axis="y", alpha=0.3)
    _chance_line(ax, chance)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(f1_by_run), 2), fontsize=8,
               frameon=False)
    return fig


def plot_forest(rows: Sequence[Mapping], dataset: str, title: str = "Difference from no augmentation",
                budget: str | None = None, interval_label: str = "95% interval of the difference") -> Figure:
    """Forest plot: each cell's difference in test macro-F1 from no augmentation, with its interval, every seed
    as a dot (drawn just under the row, above everything else, so no marker hides it) and the verdict as the
    marker's shape and colour; the difference and interval are written at the right.

    ``rows``: one dict per cell, top to bottom, with label, diff, low, high, verdict (a key of VERDICT_STYLES)
    and seed_diffs (each seed's score minus the baseline's mean). A baseline row (verdict "baseline",
    diff 0) shows the baseline's own seeds around 0: the seed noise every difference is read against.
    """
    n = len(rows)
    config.require(n > 0, "no cells to plot: the forest plot needs at least one cell")
    fig, ax = _figure(title, dataset, budget, figsize=(9.5, 2.4 + 0.45 * n))
    y = np.arange(n)[::-1]  # the first row on top
    ax.axvline(0.0, color="0.5", lw=1, ls="--", zorder=0)
    right_texts = []
    for yi, row in zip(y, rows, strict=True):
        _, color, marker = VERDICT_STYLES[row["verdict"]]
        low, high, diff = (float(row.get(key, np.nan)) for key in ("low", "high", "diff"))
        if np.isfinite(low) and np.isfinite(high):
            ax.hlines(yi, low, high, color=color, lw=2.2, zorder=2)
        if np.isfinite(diff):
            ax.plot(diff, yi, marker=marker, ms=9, color=color, mec="white", ls="none", zorder=3)
        seeds = np.asarray(row.get("seed_diffs", ()), dtype=float)
        ax.scatter(seeds, np.full(seeds.shape, yi - 0.28), s=16, facecolor="white", edgecolor=color, lw=1.2,
                   zorder=4)
        right_texts.append(_forest_text(row["verdict"], diff, low, high))
    ax.set_yticks(y, [row["label"] for row in rows])
    ax.set_ylim(-0.8, n - 0.4)
    right = ax.secondary_yaxis("right")
    right.set_yticks(y, right_texts)
    right.tick_params(length=0, labelsize=8)
    ax.set(xlabel=f"{DIFF_LABEL} (cell − baseline)", ylabel="cell (stage, p_aug)")
    ax.grid(axis="x", alpha=0.3)
    present = list(dict.fromkeys(row["verdict"] for row in rows))
    handles = [Line2D([], [], ls="none", marker=VERDICT_STYLES[k][2], color=VERDICT_STYLES[k][1], ms=8,
                      label=VERDICT_STYLES[k][0]) for k in present]
    handles += [Line2D([], [], color="0.3", lw=2.2, label=interval_label),
                Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3", label="one seed")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


def _forest_text(verdict: str, diff: float, low: float, high: float) -> str:
    """The right-hand text of a forest row: the difference and its interval, or what the row is."""
    if verdict == "baseline":
        return "reference"
    if not np.isfinite(diff):
        return "no baseline"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{diff:+.3f}"
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def plot_difference_heatmap(diff: pd.DataFrame, verdicts: pd.DataFrame, n_seeds: pd.DataFrame, dataset: str,
                            title: str = "Difference from no augmentation, stage × p_aug", budget: str | None = None,
                            low: pd.DataFrame | None = None, high: pd.DataFrame | None = None,
                            note: str | None = None) -> Figure:
    """Heatmap of each cell's difference in test macro-F1 from no augmentation (index: stage, columns: p_aug),
    on a diverging colour map centred on 0 (blue better, red worse); ▲/▼ mark the cells the family's test
    calls significantly better/worse, × the cells at chance, hatching the cells with one seed (never
    tested); ``low``/``high`` add the interval under each value; ``note`` (e.g. the family's test) goes under
    the title.

    ``verdicts``: same-shape DataFrame of VERDICT_STYLES keys; ``n_seeds``: seeds per cell.
    """
    values = diff.to_numpy(dtype=float)
    aligned = {name: frame.reindex(index=diff.index, columns=diff.columns).to_numpy(dtype=object if name == "v"
                                                                                    else float)
               for name, frame in (("v", verdicts), ("n", n_seeds), ("low", low), ("high", high)) if frame is not None}
    texts = np.full(values.shape, "", dtype=object)
    for (r, c), value in np.ndenumerate(values):
        if np.isfinite(value):
            texts[r, c] = f"{value:+.3f}{VERDICT_MARKS.get(aligned['v'][r, c], '')}"
            if "low" in aligned and np.isfinite(aligned["low"][r, c]):
                texts[r, c] += f"\n[{aligned['low'][r, c]:+.3f}, {aligned['high'][r, c]:+.3f}]"
    rows, cols = values.shape
    fig, ax = _figure(title, dataset, budget, figsize=(3.8 + 1.45 * cols, 2.3 + 0.75 * rows))
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(finite.max()) * 1.1 if finite.size else 0.0, 0.01)  # symmetric: white is 0
    _heatmap(ax, values, texts, diff.index, [_fmt_axis_value(float(p)) for p in diff.columns], cmap="RdBu",
             vmin=-limit, vmax=limit, colorbar_label=f"{DIFF_LABEL}\n(blue: better, red: worse)", fontsize=8)
    for (r, c), seeds in np.ndenumerate(aligned["n"]):
        if seeds == 1 and np.isfinite(values[r, c]):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, hatch="///", edgecolor="0.45", lw=0))
    ax.set(xlabel="p_aug (share of augmented training images)", ylabel="augmentation stage")
    marks = "▲/▼: significantly better/worse; ×: at chance; hatched: 1 seed, not tested"
    ax.set_title(marks if note is None else f"{note}\n{marks}", fontsize=8)
    return fig


def plot_heatmap(table: pd.DataFrame, dataset: str, title: str = "Test macro-F1, stage × p_aug",
                 metric_label: str = "macro-F1 (test)", significance: pd.DataFrame | None = None,
                 note: str | None = None, budget: str | None = None) -> Figure:
    """The study's annotated stage × p_aug heatmap of a metric (index: stage, columns: p_aug), "*" after the
    cells marked in ``significance`` (same labels, "*" or ""); colours span the values' range within [0, 1],
    the highest cell is bold, a missing one grey; ``note`` (what the marks mean) goes under the title."""
    values = table.to_numpy(dtype=float)  # (stages, p_augs)
    marks = (np.full(values.shape, "", dtype=object) if significance is None
             else significance.reindex(index=table.index, columns=table.columns).fillna("").to_numpy(dtype=object))
    texts = np.array([[f"{v:.3f}{m}" if np.isfinite(v) else "" for v, m in zip(row, mark_row, strict=True)]
                      for row, mark_row in zip(values, marks, strict=True)], dtype=object).reshape(values.shape)
    finite = values[np.isfinite(values)]
    spread = max(float(finite.max() - finite.min()), 0.01) if finite.size else 1.0  # a flat table stays visible
    vmin = max(float(finite.min()) - 0.1 * spread, 0.0) if finite.size else 0.0
    vmax = min(float(finite.max()) + 0.1 * spread, 1.0) if finite.size else 1.0
    rows, cols = values.shape
    fig, ax = _figure(title, dataset, budget, figsize=(3.5 + 1.1 * cols, 2.3 + 0.7 * rows))
    _heatmap(ax, values, texts, table.index, [_fmt_axis_value(float(p)) for p in table.columns], cmap="viridis",
             vmin=vmin, vmax=vmax, colorbar_label=metric_label)
    if finite.size:
        best_row, best_col = np.unravel_index(np.nanargmax(values), values.shape)
        for text in ax.texts:  # seaborn writes cell (r, c)'s text at its centre (c + 0.5, r + 0.5)
            if text.get_position() == (best_col + 0.5, best_row + 0.5):
                text.set_fontweight("bold")
    ax.set(xlabel="p_aug (share of augmented training images)", ylabel="augmentation stage")
    if note:
        ax.set_title(note, fontsize=8)
    return fig


def plot_effect_vs_budget(baseline: np.ndarray, cells: Mapping[tuple[str, float], np.ndarray], dataset: str,
                          title: str = "Difference from no augmentation per epoch", budget: str | None = None,
                          verdicts: Mapping[tuple[str, float], str] | None = None) -> Figure:
    """Does an effect still move with the budget? Per stage (one panel each), the difference in validation
    macro-F1 from no augmentation after every epoch, one line per p_aug: the mean over seeds, with a band
    spanning the seeds (each seed's curve minus the baseline's mean curve). The grey band around 0 spans
    the baseline's own seeds: differences inside it are within seed noise.

    ``baseline``: (S_b, E) validation macro-F1 of the baseline's seeds per epoch; ``cells``:
    {(stage, p_aug): (S, E)} likewise (NaN where a run stopped early); ``verdicts``: the test verdict
    (VERDICT_STYLES key) of each cell, named in the legend.
    """
    baseline = np.atleast_2d(np.asarray(baseline, dtype=float))
    reference = np.nanmean(baseline, axis=0)  # (E,)
    epochs = np.arange(1, reference.size + 1)
    stages = list(dict.fromkeys(stage for stage, _ in cells))
    config.require(bool(stages), "no augmented cells to plot against the baseline")
    ncols = min(len(stages), 3)
    nrows = math.ceil(len(stages) / ncols)
    fig, axes = _figure(title, dataset, budget, nrows=nrows, ncols=ncols, figsize=(5.0 * ncols, 0.9 + 3.4 * nrows),
                        sharey=True, squeeze=False)
    p_values = sorted({p for _, p in cells})
    colors = {p: plt.get_cmap("viridis")(0.85 * i / max(len(p_values) - 1, 1)) for i, p in enumerate(p_values)}
    marker = "o" if epochs.size == 1 else None
    for ax, stage in zip(axes.flat, stages, strict=False):
        noise = baseline - reference
        ax.fill_between(epochs, np.nanmin(noise, axis=0), np.nanmax(noise, axis=0), color="0.8", alpha=0.7,
                        label=f"baseline seeds ({count_text(len(baseline), 'seed')})")
        ax.axhline(0.0, color="0.4", lw=1, ls="--")
        for (cell_stage, p), curves in cells.items():
            if cell_stage != stage:
                continue
            curves = np.atleast_2d(np.asarray(curves, dtype=float))[:, : epochs.size] - reference  # (S, E)
            verdict = VERDICT_STYLES[verdicts[stage, p]][0] if verdicts and (stage, p) in verdicts else None
            label = f"p_aug {p:g} ({count_text(len(curves), 'seed')})" + (f": {verdict}" if verdict else "")
            ax.plot(epochs[: curves.shape[1]], np.nanmean(curves, axis=0), color=colors[p], lw=2, marker=marker,
                    label=label)
            if len(curves) > 1:
                ax.fill_between(epochs[: curves.shape[1]], np.nanmin(curves, axis=0), np.nanmax(curves, axis=0),
                                color=colors[p], alpha=0.2)
        ax.set_title(stage, fontsize=10)
        ax.set(xlabel="epoch", xlim=(0.5, epochs.size + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # under the panel
    for ax in axes[:, 0]:
        ax.set_ylabel("difference in validation\nmacro-F1 from no augmentation")
    for ax in axes.flat[len(stages):]:
        ax.remove()  # empty slots of the last row
    return fig


def severity_text(severities: Sequence[int]) -> str:
    """"severity 2" or "severities 1, 2, 3 (mean)": what a robustness score averages over."""
    if len(severities) == 1:
        return f"severity {severities[0]}"
    return f"severities {', '.join(map(str, severities))} (mean)"


def plot_robustness_drops(drops: pd.DataFrame, dataset: str, severities: Sequence[int],
                          title: str = "Robustness: drop in macro-F1 under corruptions",
                          budget: str | None = None) -> Figure:
    """Per corruption kind (one panel each), how much each run group's test macro-F1 falls from clean to
    corrupted images: the mean drop over seeds with its 95% interval (Student-t over seeds; one seed: hollow
    marker, no interval). A smaller drop is more robust; the title names the severity.

    ``drops``: one row per (run, kind) with run, kind, drop, low, high, n_seeds, in display order.
    """
    config.require(not drops.empty, "no corruption scores to plot: train with at least one severity")
    kinds = list(dict.fromkeys(drops["kind"]))
    runs_ = list(dict.fromkeys(drops["run"]))
    ncols = min(len(kinds), 3)
    nrows = math.ceil(len(kinds) / ncols)
    fig, axes = _figure(f"{title} ({severity_text(severities)})", dataset, budget, nrows=nrows, ncols=ncols,
                        figsize=(4.2 * ncols + 2.5, 0.9 + (0.9 + 0.32 * len(runs_)) * nrows), sharex=True,
                        sharey=True, squeeze=False)
    y = {run: i for i, run in enumerate(reversed(runs_))}  # the first run on top
    for ax, kind in zip(axes.flat, kinds, strict=False):
        part = drops[drops["kind"] == kind]
        for row in part.itertuples():
            color = "tab:blue"
            tested = row.n_seeds > 1 and np.isfinite(row.low)
            if tested:
                ax.hlines(y[row.run], row.low, row.high, color=color, lw=2)
            ax.plot(row.drop, y[row.run], "o", color=color, mfc=color if tested else "white", ms=6)
        ax.axvline(0.0, color="0.5", lw=1, ls="--")
        ax.set_title(kind, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("drop in test macro-F1\n(clean − corrupted)")
    axes[0, 0].set_yticks(list(y.values()), list(y))
    for ax in axes.flat[len(kinds):]:
        ax.remove()
    fig.legend(handles=[Line2D([], [], color="0.3", lw=2, marker="o", label="mean drop, 95% interval over seeds"),
                        Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3", label="1 seed: no interval")],
               loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def _cost_annotation(row: Mapping) -> str:
    """Short text of a run's cost: parameters, inference speed, checkpoint size (those given)."""
    formats = {"params": lambda v: f"{v / 1e6:.3g} M params", "images_per_s": lambda v: f"{v:,.0f} img/s",
               "checkpoint_mb": lambda v: f"{v:.1f} MB"}
    return "\n".join(fmt(row[key]) for key, fmt in formats.items() if row.get(key) is not None)


def _comparison_bars(rows: Sequence[Mapping], dataset: str, title: str, xlabel: str = "model",
                     budget: str | None = None, chance: float | None = None) -> Figure:
    """Macro-F1 bars with confidence-interval error bars on a 0..1 axis, each annotated with its cost."""
    frame = pd.DataFrame(rows).reindex(columns=["f1_macro", "ci_low", "ci_high"]).astype(float)
    f1 = frame["f1_macro"].to_numpy()
    # A row without an interval gets none (its bounds collapse onto the value).
    # A Student-t interval over two or three seeds can reach past the metric's range: drawn within [0, 1].
    low, high = (frame[key].fillna(frame["f1_macro"]).clip(0.0, 1.0).to_numpy() for key in ("ci_low", "ci_high"))
    fig, ax = _figure(title, dataset, budget, figsize=(max(6.0, 1.9 * len(rows) + 2), 5))
    x = np.arange(len(rows))
    ax.bar(x, f1, 0.6, color=plt.get_cmap("tab10")(x % 10), alpha=0.8, yerr=[f1 - low, high - f1], capsize=6,
           error_kw={"elinewidth": 1.5})
    for xi, row, value, upper in zip(x, rows, f1, high, strict=True):
        text = f"{value:.3f}\n{_cost_annotation(row)}".strip()
        # Inside a tall bar, above a short one: either way the text stays within the 0..1 axis.
        inside = value > 0.5
        ax.text(xi, value / 2 if inside else upper + 0.02, text, ha="center", va="center" if inside else "bottom",
                fontsize=ANNOT_FONTSIZE)
    _chance_line(ax, chance)
    ax.set_xticks(x, [model_label(row["name"]) for row in rows])
    ax.set(xlabel=xlabel, ylabel="macro-F1 (test), 95% CI", ylim=(0.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_model_comparison(rows: Sequence[Mapping], dataset: str, title: str = "Model comparison",
                          xlabel: str = "model", budget: str | None = None, chance: float | None = None) -> Figure:
    """Bars of macro-F1 with CI per model, annotated with parameters, img/s and checkpoint size.

    ``rows``: dicts with name, f1_macro, ci_low, ci_high, params, images_per_s, checkpoint_mb
    (None or missing cost fields are left out of the annotation); ``xlabel`` names what the bars are.
    """
    return _comparison_bars(rows, dataset, title, xlabel, budget, chance)


def plot_distillation_comparison(rows: Sequence[Mapping], dataset: str, title: str = "Distillation: teacher vs student",
                                 budget: str | None = None, chance: float | None = None) -> Figure:
    """Teacher, distilled student and student trained alone: the same bars as plot_model_comparison."""
    return _comparison_bars(rows, dataset, title, budget=budget, chance=chance)


def top_confused_pairs(y_true, y_pred, top_k: int = 5) -> list[tuple[int, int, int]]:
    """The ``top_k`` most frequent (true, predicted, count) errors, most frequent first."""
    y_true, y_pred = _labels(y_true).numpy(), _labels(y_pred).numpy()
    counts = stats.confusion_matrices(y_true, y_pred, np.arange(len(y_true))[None])[0]  # (K, K)
    np.fill_diagonal(counts, 0)
    flat = counts.reshape(-1)
    # Stable sort so equal counts keep (true, pred) order: the choice is reproducible.
    order = np.argsort(-flat, kind="stable")[:top_k]
    k = config.NUM_CLASSES
    return [(int(i) // k, int(i) % k, int(flat[i])) for i in order if flat[i] > 0]


def plot_confused_pairs(images, y_true, y_pred, dataset: str, top_k: int = 5, per_pair: int = 4,
                        title: str = "Most confused pairs", budget: str | None = None) -> Figure:
    """The most confused (true, predicted) pairs, one row each, with example misclassified images."""
    images, y_true, y_pred = _images_uint8(images), _labels(y_true), _labels(y_pred)
    pairs = top_confused_pairs(y_true, y_pred, top_k)
    figsize = (2.8 + 0.9 * per_pair, 1.2 + 1.0 * max(len(pairs), 1) + (0.3 if budget else 0.0))
    fig, ax = _figure(title, dataset, budget, figsize=figsize)
    ax.set(xlabel="misclassified example", ylabel="true → predicted (errors)")
    if not pairs:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    _, _, h, w = images.shape
    tiles = torch.ones(len(pairs), per_pair, 3, h, w)  # fewer examples than per_pair: white tiles
    for r, (true, pred, _) in enumerate(pairs):
        picked = torch.nonzero((y_true == true) & (y_pred == pred)).view(-1)[:per_pair]
        tiles[r, : len(picked)] = _unit_float(images[picked])
    row_labels = [f"{true} → {pred}  (n={count})" for true, pred, count in pairs]
    _show_montage(ax, tiles.flatten(0, 1), row_labels, [str(i + 1) for i in range(per_pair)])
    return fig


def plot_tuning_history(values: Sequence[float], dataset: str, budget: str | None = None) -> Figure:
    """Each tuning trial's validation macro-F1 (dots) and the best so far (steps), by trial number.

    ``values``: the objective of the completed trials in trial order (NaN for a failed one).
    """
    values = np.asarray(values, dtype=float)
    config.require(values.ndim == 1 and values.size > 0, "no trial values to plot: run at least one trial")
    trials = np.arange(values.size)
    fig, ax = _figure(f"Tuning history ({count_text(values.size, 'trial')})", dataset, budget, figsize=(7.5, 4.2))
    ax.plot(trials, values, "o", color="tab:blue", alpha=0.7, label="trial")
    ax.step(trials, np.fmax.accumulate(values), where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial number", ylabel="validation macro-F1", ylim=(0.0, 1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_param_importances(importances: Mapping[str, float], n_trials: int, dataset: str,
                           budget: str | None = None) -> Figure:
    """Horizontal bars of each hyperparameter's importance (shares summing to 1), largest on top.

    Below MIN_TRIALS_FOR_IMPORTANCES completed trials the figure says the importances mean little.
    """
    config.require(len(importances) > 0, "no importances to plot: the study needs completed trials")
    names = sorted(importances, key=importances.get)  # barh draws the first at the bottom
    fig, ax = _figure(f"Hyperparameter importances ({count_text(n_trials, 'trial')})", dataset, budget,
                      figsize=(7.5, 2.2 + 0.4 * len(names)))
    bars = ax.barh(names, [importances[name] for name in names], color="tab:blue", alpha=0.8)
    ax.bar_label(bars, fmt="%.2f", fontsize=ANNOT_FONTSIZE, padding=2)
    ax.set(xlabel="importance (share of the objective's variance)", ylabel="hyperparameter", xlim=(0.0, 1.0))
    if n_trials < MIN_TRIALS_FOR_IMPORTANCES:
        ax.set_title(f"only {count_text(n_trials, 'trial')}: too few for importances to mean anything "
                     f"(need ≥ {MIN_TRIALS_FOR_IMPORTANCES})", color="tab:red", fontsize=9)
    return fig


def replay_text(params: augmentations.AugmentParams, index: int) -> str:
    """Short text of one sample's replayed augmentation parameters, one line per op ("clean" when
    p_aug left the sample alone)."""
    return params.describe(index)


def plot_stage_gallery(
    images, stages: Sequence[str], mean: Sequence[float], std: Sequence[float], dataset: str,
    p_aug: float = 1.0, seed: int = 0,
) -> Figure:
    """The same images through every stage: rows = stages, columns = images, parameters under each tile.

    Each stage draws its parameters with ``BatchAugment.sample_params`` from a generator seeded
    ``seed`` (so every stage sees the same p_aug draw) and applies them (in [0, 1] units, shown clipped).
    """
    images = _images_uint8(images)  # (N, 3, H, W)
    n, _, h, w = images.shape
    rows = []
    for stage in stages:
        aug = augmentations.BatchAugment(stage, p_aug, mean, std)
        params = aug.sample_params(n, torch.Generator().manual_seed(seed), "cpu", (h, w))
        shown = aug.apply(images, params).clamp(0, 1)  # (N, 3, H, W) in [0, 1] (not normalized)
        rows.append((stage, _to_display(shown), [replay_text(params, i) for i in range(n)]))
    max_lines = max(text.count("\n") + 1 for _, _, texts in rows for text in texts)
    figsize = (2.2 + 1.25 * n, 0.8 + (1.1 + 0.13 * max_lines) * len(stages))
    fig, axes = _figure(f"Augmentation stages, p_aug={p_aug:g}, seed {seed}", dataset, nrows=len(stages),
                        ncols=n, figsize=figsize, squeeze=False)
    for r, (stage, tiles, texts) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.imshow(tiles[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(texts[c], fontsize=7)
            if r == 0:
                ax.set_title(f"image {c + 1}", fontsize=9)
        row_label = f"{stage}\n({POLICY_KINDS[stage]})" if stage in POLICY_KINDS else stage
        axes[r, 0].set_ylabel(row_label, rotation=0, ha="right", va="center", fontsize=9)
    return fig
