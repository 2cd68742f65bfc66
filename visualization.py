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
METRIC_LABELS = {"f1_macro": "macro-F1 (test)", "accuracy": "accuracy (test)",
                 "corruption_f1": "macro-F1 under corruptions"}


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


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (rendered in memory, then one atomic write)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _suptitle(fig: Figure, title: str, dataset: str, budget: str | None = None) -> None:
    """Title naming the dataset, wrapped to the figure's width, with the budget on a second line."""
    chars_per_line = max(30, int(fig.get_figwidth() * 10))  # ~0.1 inch per character at 12 pt
    text = textwrap.fill(f"{title} — {dataset_label(dataset)}", chars_per_line)
    fig.suptitle(text if budget is None else f"{text}\n{textwrap.fill(budget, chars_per_line)}")


def _figure(title: str, dataset: str, budget: str | None = None, **subplots_kwargs):
    """A constrained-layout figure whose title names the dataset (and budget); returns (fig, axes)."""
    fig, axes = plt.subplots(layout="constrained", **subplots_kwargs)
    _suptitle(fig, title, dataset, budget)
    return fig, axes


def _chance_line(ax, chance: float | None) -> None:
    """A dashed horizontal line at the chance level, labelled at its right end."""
    if chance is None:
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


def _color_limits(values: np.ndarray, margin: float = 0.1) -> tuple[float, float]:
    """Colour limits around the finite values, kept within [0, 1] when the values lie there."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    spread = max(high - low, 0.01)  # a flat table still gets a visible range
    low, high = low - margin * spread, high + margin * spread
    # A metric in [0, 1] keeps its colour bar there: values below 0 or above 1 cannot occur.
    return (max(low, 0.0) if finite.min() >= 0 else low), (min(high, 1.0) if finite.max() <= 1 else high)


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
        ax.set(xlabel="intensity (0-255)", ylabel="share of pixels", xlim=(0, 255))
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
    fig, ax = _figure("Mean image per class", dataset, figsize=(11, 2.9))
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


def plot_channel_correlation(images, dataset: str) -> Figure:
    """3x3 heatmap of the correlation between the R, G and B channels over all pixels."""
    corr = channel_correlation(images)
    fig, ax = _figure("RGB channel correlation", dataset, figsize=(5.2, 4.3))
    _heatmap(ax, corr, np.vectorize(lambda v: f"{v:.3f}")(corr), CHANNEL_NAMES, CHANNEL_NAMES, cmap="viridis",
             vmin=min(0.0, float(corr.min())), vmax=1.0, colorbar_label="Pearson r", fontsize=11)
    ax.set(xlabel="channel", ylabel="channel")
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
    ax.set(xlabel="channel", ylabel="value (0..1 intensity units)", ylim=(0, max(max(mean), max(std)) * 1.15))
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- study figures


def plot_learning_curves(history: Sequence[Mapping], dataset: str, title: str = "Learning curves",
                         budget: str | None = None, chance: float | None = None) -> Figure:
    """Loss, accuracy and validation macro-F1 per epoch; the best-validation-F1 epoch is marked.

    ``history``: one dict per epoch with epoch, train_loss, val_loss, train_accuracy,
    val_accuracy, val_f1_macro; a key missing from the records is left out of its panel.
    ``chance``: macro-F1 of guessing, drawn on the F1 panel. One epoch draws points and says so.
    """
    epochs = [record["epoch"] for record in history]
    fig, axes = _figure(title, dataset, budget, ncols=3, figsize=(14, 4))
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
                ax.plot(epochs, np.array(values, dtype=float), marker="o", ms=3 if len(epochs) > 1 else 7,
                        label=key.split("_")[0])
        if best is not None:
            ax.axvline(best, color="0.5", ls=":", lw=1, label=f"best val F1 (epoch {best})")
        # Metrics on their whole 0..1; one epoch still gets a unit-wide axis, with integer ticks.
        ax.set(xlabel="epoch", ylabel=ylabel, title=ylabel, xlim=(min(epochs) - 0.5, max(epochs) + 0.5),
               ylim=(0.0, 1.1 * ax.dataLim.y1 if ylabel == "loss" else 1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.legend(fontsize=8)
    _chance_line(axes[2], chance)
    if len(epochs) == 1:
        fig.supxlabel("one epoch only: each value is a single point, there is no curve to draw", fontsize=9)
    return fig


def plot_confusion_matrix(cm, dataset: str, class_names: Sequence[str] = config.CLASS_NAMES, normalize: bool = True,
                          title: str = "Confusion matrix", budget: str | None = None) -> Figure:
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
    fig, ax = _figure(title + (" (row-normalized)" if normalize else ""), dataset, budget,
                      figsize=(size + 1.2, size + (0.3 if budget else 0.0)))
    _heatmap(ax, values, texts, class_names, class_names, cmap="Blues", vmin=0.0, vmax=vmax,
             colorbar_label=bar_label, fontsize=8)
    ax.set(xlabel="predicted label", ylabel="true label")
    return fig


def plot_per_class_f1(f1_by_run: Mapping[str, Sequence[float]], dataset: str,
                      class_names: Sequence[str] = config.CLASS_NAMES, title: str = "Per-class F1",
                      budget: str | None = None, chance: float | None = None) -> Figure:
    """Grouped bars of per-class F1 (seaborn), one colour per run; the legend gives each run's macro-F1."""
    scores = pd.DataFrame({f"{model_label(run)} (macro {np.mean(f1):.3f})": np.asarray(f1, dtype=float)
                           for run, f1 in f1_by_run.items()}, index=pd.Index(class_names, name="digit"))
    long = scores.reset_index().melt(id_vars="digit", var_name="run", value_name="F1")
    fig, ax = _figure(title, dataset, budget, figsize=(max(8.0, 0.9 * len(class_names) + 2), 4.5))
    sns.barplot(long, x="digit", y="F1", hue="run", ax=ax, saturation=0.9)
    _chance_line(ax, chance)
    ax.set(xlabel="digit", ylabel="F1 (test)", ylim=(0.0, 1.0))  # the whole range: zoomed bars exaggerate gaps
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would hide bars.
    sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.14), ncols=min(len(f1_by_run), 3), fontsize=8,
                    title=None, frameon=False)
    return fig


def _significance_mark(value) -> str:
    """A cell's mark: strings as given, True -> "*", and nothing for False / None / NaN."""
    if isinstance(value, str):
        return value
    return "*" if value is not None and not pd.isna(value) and bool(value) else ""


def _heatmap_texts(values: np.ndarray, significance, ci_halfwidth) -> np.ndarray:
    """Cell texts: value with 3 decimals, a significance mark, and "± half-width" on a second line."""
    texts = np.full(values.shape, "", dtype=object)  # NaN cells stay blank (seaborn masks them)
    for (r, c), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        mark = "" if significance is None else _significance_mark(significance[r, c])
        text = f"{value:.3f}{mark}"
        if ci_halfwidth is not None and np.isfinite(ci_halfwidth[r, c]):
            text += f"\n±{ci_halfwidth[r, c]:.3f}"
        texts[r, c] = text
    return texts


def _table_heatmap(table, dataset: str, title: str, metric_label: str, xlabel: str, ylabel: str,
                   significance=None, ci_halfwidth=None, note: str | None = None, budget: str | None = None):
    """Annotated heatmap of a DataFrame; the best cell's text is bold, missing cells grey."""
    values = table.to_numpy(dtype=float)
    # Marks and intervals are aligned on the table's labels (a missing cell gets none).
    if significance is not None:
        significance = significance.reindex(index=table.index, columns=table.columns).to_numpy(dtype=object)
    if ci_halfwidth is not None:
        ci_halfwidth = ci_halfwidth.reindex(index=table.index, columns=table.columns).to_numpy(dtype=float)
    rows, cols = values.shape
    height = 1.6 + (0.75 if ci_halfwidth is None else 0.9) * rows + (0.3 if budget else 0.0)
    fig, ax = _figure(title, dataset, budget, figsize=(3.5 + 1.1 * cols, height))
    vmin, vmax = _color_limits(values)
    _heatmap(ax, values, _heatmap_texts(values, significance, ci_halfwidth),
             [_fmt_axis_value(v) for v in table.index], [_fmt_axis_value(v) for v in table.columns],
             cmap="viridis", vmin=vmin, vmax=vmax, colorbar_label=metric_label)
    if np.isfinite(values).any():
        best_row, best_col = np.unravel_index(np.nanargmax(values), values.shape)
        # seaborn writes cell (r, c)'s text at its centre (c + 0.5, r + 0.5).
        for text in ax.texts:
            if text.get_position() == (best_col + 0.5, best_row + 0.5):
                text.set_fontweight("bold")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if note:
        ax.set_title(note, fontsize=9)
    return fig


def plot_heatmap(table, dataset: str, title: str = "Stage × p_aug → macro-F1", metric_label: str = "macro-F1 (test)",
                 significance=None, ci_halfwidth=None, note: str | None = None, budget: str | None = None) -> Figure:
    """Annotated "stage × p_aug → metric" heatmap (DataFrame: index stage, columns p_aug).

    ``significance``: same-shape DataFrame of marks ("*", "**", "") or booleans (True -> "*");
    ``ci_halfwidth``: same-shape DataFrame, written as "±h" under each value; ``note`` explains
    the marks under the title. Colour limits follow the values' range (within [0, 1] for a metric
    there); the best cell is bold, a missing one grey.
    """
    return _table_heatmap(table, dataset, title, metric_label, "p_aug (share of augmented samples)",
                          "augmentation stage", significance, ci_halfwidth, note, budget)


def plot_robustness(table, dataset: str, title: str = "Robustness to corruptions",
                    metric_label: str = "macro-F1 (test)", budget: str | None = None) -> Figure:
    """Heatmap of a metric per run (rows) and corruption kind (columns)."""
    return _table_heatmap(table, dataset, title, metric_label, "corruption", "run", budget=budget)


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
    low, high = (frame[key].fillna(frame["f1_macro"]).to_numpy() for key in ("ci_low", "ci_high"))
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


def _t_interval(values) -> tuple[float, float]:
    """95% Student-t interval of the mean over seeds (stats.seed_summary), as seaborn's errorbar wants."""
    summary = stats.seed_summary(values)
    return summary["ci_low"], summary["ci_high"]


def plot_seed_spread(df, dataset: str, metric: str = "f1_macro", title: str = "Spread over seeds",
                     budget: str | None = None, chance: float | None = None) -> Figure:
    """Per stage, one panel: the metric of every seed (seaborn strip plot) and its mean with a 95% t-interval.

    ``df``: DataFrame with columns stage, p_aug, seed and ``metric``. With one seed in every
    (stage, p_aug) cell there is no spread: the figure says so instead of drawing single dots.
    """
    if df.groupby(["stage", "p_aug"])["seed"].nunique().max() < 2:
        fig, ax = _figure(title, dataset, budget, figsize=(7, 2.5))
        ax.text(0.5, 0.5, "one seed per cell: there is no spread over seeds to show\n"
                "(train each cell with two or more seeds)", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    stages = list(dict.fromkeys(df["stage"]))
    ncols = min(len(stages), 3)
    nrows = math.ceil(len(stages) / ncols)
    fig, axes = _figure(title, dataset, budget, nrows=nrows, ncols=ncols, figsize=(4.6 * ncols, 3.6 * nrows),
                        sharey=True, squeeze=False)
    # Every p_aug keeps its slot in every panel, even where a stage lacks it.
    p_values = sorted(df["p_aug"].unique())
    for ax, stage in zip(axes.flat, stages, strict=False):
        part = df[df["stage"] == stage]
        sns.stripplot(part, x="p_aug", y=metric, order=p_values, ax=ax, color="tab:blue", alpha=0.6, size=4,
                      jitter=0.12)
        sns.pointplot(part, x="p_aug", y=metric, order=p_values, ax=ax, errorbar=_t_interval, color="black",
                      marker="D", markersize=5, linestyle="none", capsize=0.1, err_kws={"linewidth": 1.2})
        ax.set_xticks(range(len(p_values)), [_fmt_axis_value(float(p)) for p in p_values])
        _chance_line(ax, chance)
        ax.set_title(stage, fontsize=10)
        ax.set(xlabel="p_aug", ylabel=METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
    # Zoomed on the seeds (the spread is the point) but never outside the metric's [0, 1].
    low, high = axes.flat[0].get_ylim()
    axes.flat[0].set_ylim(max(low, 0.0), min(high, 1.0))
    for ax in axes.flat[len(stages):]:
        ax.remove()  # empty slots of the last row
    axes.flat[0].legend(handles=[Line2D([], [], ls="none", marker="o", color="tab:blue", label="one seed"),
                                 Line2D([], [], ls="none", marker="D", color="black", label="mean ± 95% CI")],
                        fontsize=8)
    return fig


def plot_tuning_history(values: Sequence[float], dataset: str, budget: str | None = None) -> Figure:
    """Each tuning trial's validation macro-F1 (dots) and the best so far (steps), by trial number.

    ``values``: the objective of the completed trials in trial order (NaN for a failed one).
    """
    values = np.asarray(values, dtype=float)
    config.require(values.ndim == 1 and values.size > 0, "no trial values to plot: run at least one trial")
    trials = np.arange(values.size)
    fig, ax = _figure(f"Tuning history ({values.size} trials)", dataset, budget, figsize=(7.5, 4.2))
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
    fig, ax = _figure(f"Hyperparameter importances ({n_trials} trials)", dataset, budget,
                      figsize=(7.5, 2.2 + 0.4 * len(names)))
    bars = ax.barh(names, [importances[name] for name in names], color="tab:blue", alpha=0.8)
    ax.bar_label(bars, fmt="%.2f", fontsize=ANNOT_FONTSIZE, padding=2)
    ax.set(xlabel="importance (share of the objective's variance)", ylabel="hyperparameter", xlim=(0.0, 1.0))
    if n_trials < MIN_TRIALS_FOR_IMPORTANCES:
        ax.set_title(f"only {n_trials} trials: too few for importances to mean anything "
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
