"""Every figure of the project: EDA of the image tensors and the study's results.

Each ``plot_*`` function returns a matplotlib ``Figure`` (never shows it) and names the
dataset in the title, so results on the synthetic data are never mistaken for SVHN.
Study figures take plain Python / pandas structures, so they can be rebuilt from the
JSON reports without retraining. Image statistics run vectorized in chunks, so the
whole SVHN train split (73k images) needs no per-sample Python loop.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

import augmentations
import config
from atomic_io import atomic_write_bytes

# Images per chunk for the full-split statistics: 4096 x 3 x 32 x 32 float32 is ~50 MB.
CHUNK = 4096
CHANNEL_NAMES = ("R", "G", "B")
CHANNEL_COLORS = ("tab:red", "tab:green", "tab:blue")
# ITU-R BT.601 luma weights, the ones torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# 3x3 Laplacian (4-neighbour), the kernel of scipy.ndimage.laplace and cv2.Laplacian(ksize=1).
LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
ANNOT_FONTSIZE = 9


# ----------------------------------------------------------------------------- helpers


def dataset_label(dataset: str) -> str:
    """Human name of a dataset for titles: "SVHN" or "synthetic SVHN (not real data)"."""
    labels = {"svhn": "SVHN", "synthetic": "synthetic SVHN (not real data)"}
    if dataset not in labels:
        raise config.ConfigError(f"unknown dataset {dataset!r}; choose one of {tuple(labels)}")
    return labels[dataset]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (rendered in memory, then one atomic write)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _suptitle(fig: Figure, title: str, dataset: str) -> None:
    """Title naming the dataset, wrapped to the figure's width (long titles would be cut off)."""
    chars_per_line = max(30, int(fig.get_figwidth() * 10))  # ~0.1 inch per character at 12 pt
    fig.suptitle(textwrap.fill(f"{title} — {dataset_label(dataset)}", chars_per_line))


def _figure(title: str, dataset: str, **subplots_kwargs):
    """A constrained-layout figure whose title names the dataset; returns (fig, axes)."""
    fig, axes = plt.subplots(layout="constrained", **subplots_kwargs)
    _suptitle(fig, title, dataset)
    return fig, axes


def _images_uint8(images) -> torch.Tensor:
    """Any (N, 3, H, W) uint8 tensor or array as a CPU torch uint8 tensor."""
    images = torch.as_tensor(images).cpu()
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(labels).cpu().long().reshape(-1)


def _to_display(images) -> np.ndarray:
    """(N, 3, H, W) uint8 or [0, 1] float -> (N, H, W, 3) float numpy in [0, 1] for imshow."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _montage(tiles: np.ndarray, pad: int = 2) -> np.ndarray:
    """(R, C, H, W, 3) tiles -> one (R*(H+pad)-pad, C*(W+pad)-pad, 3) image with white gaps."""
    rows, cols, h, w, _ = tiles.shape
    padded = np.pad(tiles, ((0, 0), (0, 0), (0, pad), (0, pad), (0, 0)), constant_values=1.0)
    # (R, C, H+p, W+p, 3) -> (R, H+p, C, W+p, 3) -> one image, minus the trailing gap.
    grid = padded.transpose(0, 2, 1, 3, 4).reshape(rows * (h + pad), cols * (w + pad), 3)
    return grid[: rows * (h + pad) - pad, : cols * (w + pad) - pad]


def _show_montage(ax, tiles: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], pad: int = 2):
    """Draw a montage on ``ax`` with one tick label per row and per column."""
    _, _, h, w, _ = tiles.shape
    ax.imshow(_montage(tiles, pad), interpolation="nearest")
    ax.set_yticks([r * (h + pad) + h / 2 - 0.5 for r in range(len(row_labels))], row_labels)
    ax.set_xticks([c * (w + pad) + w / 2 - 0.5 for c in range(len(col_labels))], col_labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _text_color(cmap, norm, value: float) -> str:
    """Black text on light cells, white on dark ones (relative luminance of the cell colour)."""
    r, g, b, _ = cmap(norm(value))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def _annotated_heatmap(
    ax,
    values: np.ndarray,
    texts: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    colorbar_label: str,
    fontsize: float = ANNOT_FONTSIZE,
):
    """Heatmap of ``values`` (R, C) with ``texts`` (R, C) written in the cells; NaN cells grey."""
    cmap = plt.get_cmap(cmap).with_extremes(bad="0.85")
    norm = Normalize(vmin=vmin, vmax=vmax)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for (r, c), text in np.ndenumerate(texts):
        color = "black" if np.isnan(values[r, c]) else _text_color(cmap, norm, values[r, c])
        ax.text(c, r, text, ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)


def _metric_limits(values: np.ndarray, margin: float = 0.1) -> tuple[float, float]:
    """Colour limits around the finite values (a flat table still gets a visible range)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    spread = max(high - low, 0.01)
    return low - margin * spread, high + margin * spread


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
    for ax, ylabel in ((ax_count, "images"), (ax_share, "share of split (%)")):
        ax.set_xticks(x, config.CLASS_NAMES)
        ax.set_xlabel("digit")
        ax.set_ylabel(ylabel)
    ax_count.set_title("counts")
    ax_share.set_title("shares")
    # One legend for both panels, below them (inside, it would hide bars).
    fig.legend(*ax_share.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    return fig


def plot_samples_per_class(images, labels, dataset: str, per_class: int = 8, seed: int = 0) -> Figure:
    """A grid of random examples: one row per digit, ``per_class`` columns."""
    images, labels = _images_uint8(images), _labels(labels)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    _, _, h, w = images.shape
    tiles = np.ones((config.NUM_CLASSES, per_class, h, w, 3))  # missing examples stay white
    for digit in range(config.NUM_CLASSES):
        picked = order[labels[order] == digit][:per_class]
        tiles[digit, : len(picked)] = _to_display(images[picked])
    fig, ax = _figure("Random examples per class", dataset, figsize=(1.0 + 0.75 * per_class, 8.5))
    _show_montage(ax, tiles, config.CLASS_NAMES, [str(i + 1) for i in range(per_class)])
    ax.set_xlabel("example")
    ax.set_ylabel("digit (label)")
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
    """Per-channel intensity histograms (share of pixels at each value 0..255)."""
    counts = channel_histograms(images)
    shares = counts / counts.sum(axis=1, keepdims=True)
    levels = np.arange(256)
    fig, axes = _figure("Pixel intensity per channel", dataset, ncols=3, figsize=(12, 3.8), sharey=True)
    for c, ax in enumerate(axes):
        mean = (shares[c] * levels).sum()
        std = math.sqrt((shares[c] * (levels - mean) ** 2).sum())
        ax.fill_between(levels, shares[c], step="mid", color=CHANNEL_COLORS[c], alpha=0.6)
        title = f"{CHANNEL_NAMES[c]}: mean {mean / 255:.3f}, std {std / 255:.3f} (0..1 units)"
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, 255)
        ax.set_xlabel("intensity (0-255)")
        ax.set_ylabel("share of pixels")
    return fig


def image_statistics(images, chunk_size: int = CHUNK) -> dict[str, np.ndarray]:
    """Per-image brightness, contrast and sharpness, each a float64 array (N,).

    On the grayscale image (BT.601 luma, 0-255 units): brightness is its mean, contrast its
    standard deviation, sharpness the variance of its 3x3 Laplacian (edges replicated, as
    scipy.ndimage.laplace's default mode).
    """
    images = _images_uint8(images)
    weights = torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    kernel = torch.tensor(LAPLACIAN_3X3).view(1, 1, 3, 3)
    parts = {"brightness": [], "contrast": [], "sharpness": []}
    for chunk in images.split(chunk_size):
        gray = (chunk.float() * weights).sum(dim=1, keepdim=True)  # (B, 1, H, W)
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
    columns = {
        "brightness": ("brightness (mean gray, 0-255)", np.asarray(stats["brightness"])),
        "contrast": ("contrast (std of gray, 0-255)", np.asarray(stats["contrast"])),
        "sharpness": ("sharpness: log10(1 + Laplacian variance)", log_sharp),
    }
    fig = plt.figure(layout="constrained", figsize=(13, 8))
    _suptitle(fig, f"Image statistics (n={len(log_sharp):,})", dataset)
    axes = fig.subplot_mosaic([["brightness"] * 2 + ["contrast"] * 2 + ["sharpness"] * 2,
                               ["bc"] * 3 + ["cs"] * 3])
    for name, (label, values) in columns.items():
        ax = axes[name]
        ax.hist(values, bins=60, color="tab:blue", alpha=0.8)
        ax.axvline(np.median(values), color="k", ls="--", lw=1, label=f"median {np.median(values):.3g}")
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    n = len(log_sharp)
    rng = np.random.default_rng(seed)
    shown = rng.choice(n, size=min(n, max_points), replace=False)
    for key, (x_name, y_name) in (("bc", ("brightness", "contrast")), ("cs", ("contrast", "sharpness"))):
        ax = axes[key]
        ax.scatter(columns[x_name][1][shown], columns[y_name][1][shown], s=4, alpha=0.3, rasterized=True)
        ax.set_xlabel(columns[x_name][0])
        ax.set_ylabel(columns[y_name][0])
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
    means = class_mean_images(images, labels).nan_to_num(1.0)  # (10, 3, H, W)
    low = means.amin(dim=(1, 2, 3), keepdim=True)
    high = means.amax(dim=(1, 2, 3), keepdim=True)
    stretched = (means - low) / (high - low).clamp_min(1e-8)
    tiles = np.stack([_to_display(means), _to_display(stretched)])  # (2, 10, H, W, 3)
    fig, ax = _figure("Mean image per class", dataset, figsize=(11, 2.9))
    _show_montage(ax, tiles, ["mean", "mean,\nstretched"], config.CLASS_NAMES)
    ax.set_xlabel("digit")
    ax.set_ylabel("rendering")
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


def plot_channel_correlation(images, dataset: str) -> Figure:
    """3x3 heatmap of the correlation between the R, G and B channels over all pixels."""
    corr = channel_correlation(images)
    fig, ax = _figure("RGB channel correlation", dataset, figsize=(5.2, 4.3))
    texts = np.vectorize(lambda v: f"{v:.3f}")(corr)
    _annotated_heatmap(ax, corr, texts, CHANNEL_NAMES, CHANNEL_NAMES, cmap="viridis",
                       vmin=min(0.0, float(corr.min())), vmax=1.0, colorbar_label="Pearson r",
                       fontsize=11)
    ax.set_xlabel("channel")
    ax.set_ylabel("channel")
    return fig


def plot_channel_stats(mean: Sequence[float], std: Sequence[float], dataset: str) -> Figure:
    """Bars of the per-channel normalization mean and std (0..1 units), values written on the bars."""
    fig, ax = _figure("Normalization statistics", dataset, figsize=(6, 4))
    x = np.arange(3)
    width = 0.38
    for offset, values, name, hatch in ((-width / 2, mean, "mean", ""), (width / 2, std, "std", "//")):
        bars = ax.bar(x + offset, values, width, color=CHANNEL_COLORS, alpha=0.75, hatch=hatch,
                      edgecolor="black", label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=ANNOT_FONTSIZE, padding=2)
    ax.set_xticks(x, CHANNEL_NAMES)
    ax.set_xlabel("channel")
    ax.set_ylabel("value (0..1 intensity units)")
    ax.set_ylim(0, max(max(mean), max(std)) * 1.15)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- study figures


def plot_learning_curves(history: Sequence[Mapping], dataset: str, title: str = "Learning curves") -> Figure:
    """Loss, accuracy and validation macro-F1 per epoch; the best-validation-F1 epoch is marked.

    ``history``: one dict per epoch with epoch, train_loss, val_loss, train_accuracy,
    val_accuracy, val_f1_macro; a key missing from the records is left out of its panel.
    """
    epochs = [record["epoch"] for record in history]
    fig, axes = _figure(title, dataset, ncols=3, figsize=(14, 4))
    panels = (
        ("loss", ("train_loss", "val_loss")),
        ("accuracy", ("train_accuracy", "val_accuracy")),
        ("validation macro-F1", ("val_f1_macro",)),
    )
    f1 = [record.get("val_f1_macro") for record in history]
    best = epochs[int(np.nanargmax(np.array(f1, dtype=float)))] if any(v is not None for v in f1) else None
    for ax, (ylabel, keys) in zip(axes, panels, strict=True):
        for key in keys:
            values = [record.get(key) for record in history]
            if any(v is not None for v in values):
                ax.plot(epochs, np.array(values, dtype=float), marker="o", ms=3, label=key.split("_")[0])
        if best is not None:
            ax.axvline(best, color="0.5", ls=":", lw=1, label=f"best val F1 (epoch {best})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel)
        ax.legend(fontsize=8)
    return fig


def plot_confusion_matrix(
    cm,
    dataset: str,
    class_names: Sequence[str] = config.CLASS_NAMES,
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> Figure:
    """Confusion matrix (rows = true, columns = predicted); normalized per true class by default."""
    counts = np.asarray(cm, dtype=float)
    if normalize:
        support = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
        texts = np.where(values == 0, "0", np.vectorize(lambda v: f"{v:.3f}")(values))
        vmax, bar_label = 1.0, "share of the true class"
    else:
        values = counts
        texts = np.vectorize(lambda v: f"{v:.0f}")(values)
        vmax, bar_label = max(float(values.max()), 1.0), "images"
    size = 1.6 + 0.62 * len(class_names)
    fig, ax = _figure(title + (" (row-normalized)" if normalize else ""), dataset, figsize=(size + 1.2, size))
    _annotated_heatmap(ax, values, texts, class_names, class_names, cmap="Blues", vmin=0.0, vmax=vmax,
                       colorbar_label=bar_label, fontsize=8)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    return fig


def plot_per_class_f1(
    f1_by_run: Mapping[str, Sequence[float]],
    dataset: str,
    class_names: Sequence[str] = config.CLASS_NAMES,
    title: str = "Per-class F1",
) -> Figure:
    """Grouped bars of per-class F1, one colour per run; the legend gives each run's macro-F1."""
    fig, ax = _figure(title, dataset, figsize=(max(8.0, 0.9 * len(class_names) + 2), 4.5))
    x = np.arange(len(class_names))
    width = 0.8 / max(len(f1_by_run), 1)
    lowest = 1.0
    for i, (label, scores) in enumerate(f1_by_run.items()):
        scores = np.asarray(scores, dtype=float)
        lowest = min(lowest, float(scores.min()))
        ax.bar(x - 0.4 + width * (i + 0.5), scores, width, label=f"{label} (macro {scores.mean():.3f})")
    # Zoom on the range the scores occupy (bars start at the lower limit, which the axis states).
    ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 20) / 20), 1.0)
    ax.set_xticks(x, class_names)
    ax.set_xlabel("digit")
    ax.set_ylabel("F1 (test)")
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would hide bars.
    fig.legend(loc="outside lower center", ncols=min(len(f1_by_run), 3), fontsize=8)
    return fig


def _significance_mark(value) -> str:
    """A cell's mark: strings as given, True -> "*", and nothing for False / None / NaN."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "*" if bool(value) else ""


def _heatmap_texts(values: np.ndarray, significance, ci_halfwidth) -> np.ndarray:
    """Cell texts: value with 3 decimals, a significance mark, and "± half-width" on a second line."""
    texts = np.empty(values.shape, dtype=object)
    for (r, c), value in np.ndenumerate(values):
        if np.isnan(value):
            texts[r, c] = "n/a"
            continue
        mark = "" if significance is None else _significance_mark(significance[r, c])
        text = f"{value:.3f}{mark}"
        if ci_halfwidth is not None and np.isfinite(ci_halfwidth[r, c]):
            text += f"\n±{ci_halfwidth[r, c]:.3f}"
        texts[r, c] = text
    return texts


def _table_heatmap(table, dataset: str, title: str, metric_label: str, xlabel: str, ylabel: str,
                   significance=None, ci_halfwidth=None, note: str | None = None) -> Figure:
    """Annotated heatmap of a DataFrame; the best cell's text is bold."""
    values = table.to_numpy(dtype=float)
    # Marks and intervals are aligned on the table's labels (a missing cell gets none).
    if significance is not None:
        significance = significance.reindex(index=table.index, columns=table.columns).to_numpy(dtype=object)
    if ci_halfwidth is not None:
        ci_halfwidth = ci_halfwidth.reindex(index=table.index, columns=table.columns).to_numpy(dtype=float)
    texts = _heatmap_texts(values, significance, ci_halfwidth)
    rows, cols = values.shape
    width = 3.5 + 1.1 * cols
    fig, ax = _figure(title, dataset, figsize=(width, 1.6 + (0.75 if ci_halfwidth is None else 0.9) * rows))
    vmin, vmax = _metric_limits(values)
    _annotated_heatmap(ax, values, texts, [_fmt_axis_value(v) for v in table.index],
                       [_fmt_axis_value(v) for v in table.columns], cmap="viridis", vmin=vmin, vmax=vmax,
                       colorbar_label=metric_label)
    if np.isfinite(values).any():
        best = np.unravel_index(np.nanargmax(values), values.shape)
        ax.texts[best[0] * cols + best[1]].set_fontweight("bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if note:
        ax.set_title(note, fontsize=9)
    return fig


def plot_heatmap(
    table,
    dataset: str,
    title: str = "Stage × p_aug → macro-F1",
    metric_label: str = "macro-F1 (test)",
    significance=None,
    ci_halfwidth=None,
    note: str | None = None,
) -> Figure:
    """Annotated "stage × p_aug → metric" heatmap (DataFrame: index stage, columns p_aug).

    ``significance``: same-shape DataFrame of marks ("*", "**", "") or booleans (True -> "*");
    ``ci_halfwidth``: same-shape DataFrame, written as "±h" under each value; ``note`` explains
    the marks under the title. Colour limits follow the values' range; the best cell is bold.
    """
    return _table_heatmap(table, dataset, title, metric_label, "p_aug (share of augmented samples)",
                          "augmentation stage", significance, ci_halfwidth, note)


def plot_robustness(
    table,
    dataset: str,
    title: str = "Robustness to corruptions",
    metric_label: str = "macro-F1 (test)",
) -> Figure:
    """Heatmap of a metric per run (rows) and corruption kind (columns)."""
    return _table_heatmap(table, dataset, title, metric_label, "corruption", "run")


def _cost_annotation(row: Mapping) -> str:
    """Short text of a run's cost: parameters, inference speed, checkpoint size (those given)."""
    parts = []
    if row.get("params") is not None:
        parts.append(f"{row['params'] / 1e6:.3g} M params")
    if row.get("images_per_s") is not None:
        parts.append(f"{row['images_per_s']:,.0f} img/s")
    if row.get("checkpoint_mb") is not None:
        parts.append(f"{row['checkpoint_mb']:.1f} MB")
    return "\n".join(parts)


def _or(value, default):
    return default if value is None else value


def _comparison_bars(rows: Sequence[Mapping], dataset: str, title: str, xlabel: str = "model") -> Figure:
    """Macro-F1 bars with confidence-interval error bars, each annotated with its cost."""
    names = [row["name"] for row in rows]
    f1 = np.array([row["f1_macro"] for row in rows], dtype=float)
    # A row without an interval gets none (its bounds collapse onto the value).
    low = np.array([_or(row.get("ci_low"), v) for row, v in zip(rows, f1, strict=True)], dtype=float)
    high = np.array([_or(row.get("ci_high"), v) for row, v in zip(rows, f1, strict=True)], dtype=float)
    fig, ax = _figure(title, dataset, figsize=(max(6.0, 1.9 * len(rows) + 2), 5))
    x = np.arange(len(rows))
    colors = plt.get_cmap("tab10")(x % 10)
    ax.bar(x, f1, 0.6, color=colors, alpha=0.8, yerr=[f1 - low, high - f1], capsize=6,
           error_kw={"elinewidth": 1.5})
    # The bars are zoomed onto the values' range (stated by the axis), with room for the texts.
    spread = max(float(high.max() - low.min()), 0.02)
    bottom = max(0.0, float(low.min()) - 1.5 * spread)
    top = float(high.max()) + 1.6 * spread
    for xi, row, value, upper in zip(x, rows, f1, high, strict=True):
        text = f"{value:.3f}\n{_cost_annotation(row)}".strip()
        ax.text(xi, upper + 0.05 * spread, text, ha="center", va="bottom", fontsize=ANNOT_FONTSIZE)
    ax.set_ylim(bottom, top)
    ax.set_xticks(x, names)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("macro-F1 (test), 95% CI")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_model_comparison(rows: Sequence[Mapping], dataset: str, title: str = "Model comparison",
                          xlabel: str = "model") -> Figure:
    """Bars of macro-F1 with CI per model, annotated with parameters, img/s and checkpoint size.

    ``rows``: dicts with name, f1_macro, ci_low, ci_high, params, images_per_s, checkpoint_mb
    (None or missing cost fields are left out of the annotation); ``xlabel`` names what the bars are.
    """
    return _comparison_bars(rows, dataset, title, xlabel)


def plot_distillation_comparison(
    rows: Sequence[Mapping], dataset: str, title: str = "Distillation: teacher vs student"
) -> Figure:
    """Teacher, distilled student and student trained alone: the same bars as plot_model_comparison."""
    return _comparison_bars(rows, dataset, title)


def top_confused_pairs(y_true, y_pred, top_k: int = 5) -> list[tuple[int, int, int]]:
    """The ``top_k`` most frequent (true, predicted, count) errors, most frequent first."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    k = config.NUM_CLASSES
    counts = torch.bincount(y_true * k + y_pred, minlength=k * k).view(k, k)
    counts.fill_diagonal_(0)
    flat = counts.reshape(-1)
    # Stable sort so equal counts keep (true, pred) order: the choice is reproducible.
    order = torch.sort(flat, descending=True, stable=True).indices[:top_k]
    return [(int(i) // k, int(i) % k, int(flat[i])) for i in order if flat[i] > 0]


def plot_confused_pairs(images, y_true, y_pred, dataset: str, top_k: int = 5, per_pair: int = 4,
                        title: str = "Most confused pairs") -> Figure:
    """The most confused (true, predicted) pairs, one row each, with example misclassified images."""
    images, y_true, y_pred = _images_uint8(images), _labels(y_true), _labels(y_pred)
    pairs = top_confused_pairs(y_true, y_pred, top_k)
    figsize = (2.8 + 0.9 * per_pair, 1.2 + 1.0 * max(len(pairs), 1))
    fig, ax = _figure(title, dataset, figsize=figsize)
    ax.set_xlabel("misclassified example")
    ax.set_ylabel("true → predicted (errors)")
    if not pairs:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    _, _, h, w = images.shape
    tiles = np.ones((len(pairs), per_pair, h, w, 3))
    for r, (true, pred, _) in enumerate(pairs):
        picked = torch.nonzero((y_true == true) & (y_pred == pred)).view(-1)[:per_pair]
        tiles[r, : len(picked)] = _to_display(images[picked])
    row_labels = [f"{true} → {pred}  (n={count})" for true, pred, count in pairs]
    _show_montage(ax, tiles, row_labels, [str(i + 1) for i in range(per_pair)])
    return fig


METRIC_LABELS = {"f1_macro": "macro-F1 (test)", "accuracy": "accuracy (test)",
                 "corruption_f1": "macro-F1 under corruptions"}


def _mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and Student-t confidence half-width (NaN for a single value)."""
    from scipy import stats  # local: only this figure needs scipy

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem


def plot_seed_spread(df, dataset: str, metric: str = "f1_macro", title: str = "Spread over seeds") -> Figure:
    """Per stage, one panel: the metric of every seed (dots) and its mean with a 95% t-interval per p_aug.

    ``df``: DataFrame with columns stage, p_aug, seed and ``metric``.
    """
    stages = list(dict.fromkeys(df["stage"]))
    ncols = min(len(stages), 3)
    nrows = math.ceil(len(stages) / ncols)
    fig, axes = _figure(title, dataset, nrows=nrows, ncols=ncols, figsize=(4.6 * ncols, 3.6 * nrows),
                        sharey=True, squeeze=False)
    p_values = sorted(df["p_aug"].unique())
    for ax, stage in zip(axes.flat, stages, strict=False):
        part = df[df["stage"] == stage]
        for i, p in enumerate(p_values):
            scores = part.loc[part["p_aug"] == p, metric].to_numpy(dtype=float)
            if scores.size == 0:
                continue
            # Deterministic jitter so overlapping seeds stay visible.
            jitter = np.linspace(-0.12, 0.12, scores.size) if scores.size > 1 else np.zeros(1)
            ax.scatter(i + jitter, scores, s=14, color="tab:blue", alpha=0.6, zorder=2)
            mean, half = _mean_ci(scores)
            ax.errorbar(i + 0.3, mean, yerr=None if np.isnan(half) else half, fmt="D", color="black",
                        ms=5, capsize=4, zorder=3)
        ax.set_xticks(range(len(p_values)), [_fmt_axis_value(float(p)) for p in p_values])
        ax.set_xlim(-0.5, len(p_values) - 0.5)  # every p_aug keeps its slot, even if a stage lacks it
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("p_aug")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(stages):]:
        ax.remove()  # empty slots of the last row
    axes.flat[0].scatter([], [], s=14, color="tab:blue", label="one seed")
    axes.flat[0].errorbar([], [], fmt="D", color="black", label="mean ± 95% CI")
    axes.flat[0].legend(fontsize=8)
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
        axes[r, 0].set_ylabel(stage, rotation=0, ha="right", va="center", fontsize=9)
    return fig
