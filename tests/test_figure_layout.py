"""Every figure type renders paper-ready: from matplotlib's own layout (each text's window extent, taken while
the figure draws), no text leaves the canvas and no two texts overlap."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import augmentations  # noqa: E402
import config  # noqa: E402
import visualization as viz  # noqa: E402

# Pixels two boxes may share (antialiased edges of neighbouring labels touch).
TOLERANCE_PX = 1.0
STAGES = ("stage1_basic", "stage3_color", "stage5_occlusion")
P_AUGS = (0.25, 0.5, 1.0)
BUDGET = "2,700 train images, 5 epochs, 3 seeds"


def _images(n=60, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _labels(n=60):
    return torch.arange(n) % config.NUM_CLASSES


def _history(epochs, seed):
    rng = np.random.default_rng(seed)
    return [dict(epoch=e, train_loss=2 / e + rng.random() * 0.1, val_loss=2.1 / e, train_accuracy=1 - 0.6 / e,
                 val_accuracy=0.95 - 0.6 / e, val_f1_macro=0.94 - 0.6 / e + 0.02 * rng.random())
            for e in range(1, epochs + 1)]


def _forest_rows():
    rng = np.random.default_rng(0)
    rows = [dict(label="no augmentation", diff=0.0, low=np.nan, high=np.nan, verdict="baseline",
                 seed_diffs=rng.normal(0, 0.008, 3))]
    verdicts = iter(["better", "worse", "no difference", "not tested", "no difference", "at chance", "worse",
                     "no difference", "better"])
    for stage, p in itertools.product(STAGES, P_AUGS):
        verdict = next(verdicts)
        diff = {"better": 0.03, "worse": -0.2, "at chance": -0.8}.get(verdict, 0.004)
        seeds = 1 if verdict == "not tested" else 3
        rows.append(dict(label=f"{stage}, p_aug {p:g}", diff=diff, low=diff - 0.02 if seeds > 1 else np.nan,
                         high=diff + 0.02 if seeds > 1 else np.nan, verdict=verdict,
                         seed_diffs=diff + rng.normal(0, 0.01, seeds)))
    return rows


def _grid(values):
    return pd.DataFrame(np.asarray(values, dtype=object).reshape(len(STAGES), len(P_AUGS)), index=list(STAGES),
                        columns=list(P_AUGS))


def _difference_heatmap():
    diff = _grid(np.linspace(-0.25, 0.03, 9)).astype(float)
    verdicts = _grid(["worse", "worse", "no difference", "not tested", "no difference", "better", "worse",
                      "no difference", "better"])
    n_seeds = _grid([3, 3, 3, 1, 3, 3, 3, 3, 3]).astype(float)
    return viz.plot_difference_heatmap(diff, verdicts, n_seeds, "synthetic", budget=BUDGET, low=diff - 0.02,
                                       high=diff + 0.02, note="seed-aware test, Holm over 8 tested cells")


def _effect_vs_budget():
    rng = np.random.default_rng(0)
    base = 0.9 + rng.normal(0, 0.01, (3, 5))
    cells = {(s, p): base - 0.05 * p + rng.normal(0, 0.01, (3, 5)) for s in STAGES for p in P_AUGS}
    verdicts = {key: "no difference" for key in cells}
    return viz.plot_effect_vs_budget(base, cells, "synthetic", budget=BUDGET, verdicts=verdicts)


def _robustness_drops():
    rng = np.random.default_rng(0)
    runs = ["SimpleCNN, no augmentation", "SimpleCNN, stage1_basic p=1", "SimpleCNN, stage5_occlusion p=1",
            "ResNet18Cifar, tuned"]
    rows = [dict(run=run, kind=kind, drop=d, low=d - 0.03, high=d + 0.03, n_seeds=1 if "tuned" in run else 3)
            for run in runs for kind in augmentations.CORRUPTION_KINDS + ("mean over kinds",)
            for d in [rng.uniform(-0.02, 0.4)]]
    return viz.plot_robustness_drops(pd.DataFrame(rows), "synthetic", severities=(1, 2, 3), budget=BUDGET)


COMPARISON_ROWS = [
    dict(name="SimpleCNN", f1_macro=0.929, ci_low=0.925, ci_high=0.933, params=141_000, images_per_s=5366.0,
         checkpoint_mb=0.6),
    dict(name="ResNet18Cifar", f1_macro=0.32, ci_low=0.3, ci_high=0.35, params=11_174_000, images_per_s=812.0,
         checkpoint_mb=42.7),
    dict(name="distilled student (simplecnn)", f1_macro=0.93, ci_low=None, ci_high=None, params=141_000,
         images_per_s=None, checkpoint_mb=0.6),
]

# Every figure type, built on data shaped like the study's (long labels, all verdict kinds, a one-seed group).
FIGURES = {
    "class_balance": lambda: viz.plot_class_balance(_labels(), _labels(23), "synthetic"),
    "samples_per_class": lambda: viz.plot_samples_per_class(_images(), _labels(), "synthetic"),
    "channel_histograms": lambda: viz.plot_channel_histograms(_images(), "synthetic"),
    "image_statistics": lambda: viz.plot_image_statistics(_images(), "synthetic"),
    "mean_images": lambda: viz.plot_mean_images(_images(), _labels(), "synthetic"),
    "stage_gallery": lambda: viz.plot_stage_gallery(_images(6), config.STAGES[1:], (0.45,) * 3, (0.2,) * 3,
                                                    "synthetic"),
    "learning_curves": lambda: viz.plot_learning_curves(
        {"stage1_basic, p_aug 0.5": [_history(5, s) for s in range(3)],
         "no augmentation": [_history(5, 10 + s) for s in range(3)]},
        "synthetic", title="SimpleCNN, stage1_basic p_aug 0.5 (best on validation) and no augmentation",
        budget=BUDGET, chance=0.12),
    "learning_curves_one_epoch": lambda: viz.plot_learning_curves(_history(1, 0), "svhn", budget="1 epoch"),
    "confusion_matrix": lambda: viz.plot_confusion_matrix(np.random.default_rng(0).integers(0, 300, (10, 10)),
                                                          "synthetic", title="SimpleCNN, stage1_basic p=0.5, "
                                                          "seed 0 (selected on validation)", budget=BUDGET),
    "per_class_f1": lambda: viz.plot_per_class_f1(
        {"stage1_basic p=0.5": 0.9 + 0.05 * np.random.default_rng(0).random((3, 10)),
         "no augmentation": 0.88 + 0.05 * np.random.default_rng(1).random((3, 10)),
         "ResNet18Cifar, tuned": np.linspace(0.5, 0.9, 10)},
        "synthetic", budget=BUDGET, chance=0.12),
    "forest": lambda: viz.plot_forest(_forest_rows(), "synthetic", title="SimpleCNN: difference from no "
                                      "augmentation per cell", budget="SimpleCNN, strong preset, lr 0.003; " + BUDGET),
    "difference_heatmap": _difference_heatmap,
    "heatmap_f1": lambda: viz.plot_heatmap(_grid(np.linspace(0.6, 0.95, 9)).astype(float), "synthetic",
                                           significance=_grid(["", "*"] * 4 + [""]), budget=BUDGET,
                                           note="* = differs from no augmentation (Holm over 8 tested cells)"),
    "effect_vs_budget": _effect_vs_budget,
    "robustness_drops": _robustness_drops,
    "model_comparison": lambda: viz.plot_model_comparison(COMPARISON_ROWS, "synthetic", budget=BUDGET, chance=0.12),
    "distillation": lambda: viz.plot_distillation_comparison(COMPARISON_ROWS, "svhn", budget=BUDGET, chance=0.12),
    "confused_pairs": lambda: viz.plot_confused_pairs(_images(), _labels(), (_labels() + 1) % 10, "synthetic",
                                                      budget=BUDGET),
    "tuning_history": lambda: viz.plot_tuning_history([0.2, 0.5, np.nan, 0.7, 0.65], "synthetic", budget=BUDGET),
    "param_importances": lambda: viz.plot_param_importances({"lr": 0.6, "weight_decay": 0.3, "p_aug": 0.1}, 3,
                                                            "synthetic", budget=BUDGET),
}


def drawn_texts(fig, monkeypatch) -> list[tuple[Text, object]]:
    """(text, window extent) of every non-empty text as the figure draws it (tick labels outside the view
    limits, hidden texts and empty strings are not drawn, so they are not counted)."""
    drawn = []
    draw = Text.draw

    def recording_draw(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self, self.get_window_extent(renderer)))

    monkeypatch.setattr(Text, "draw", recording_draw)
    fig.canvas.draw()
    monkeypatch.undo()
    return drawn


def layout_problems(fig, monkeypatch) -> list[str]:
    """Texts outside the canvas and pairs of overlapping texts, described."""
    texts = drawn_texts(fig, monkeypatch)
    canvas = fig.bbox
    problems = [f"{text.get_text()!r} leaves the canvas ({box.x0:.0f}, {box.y0:.0f}, {box.x1:.0f}, {box.y1:.0f}; "
                f"canvas {canvas.width:.0f} x {canvas.height:.0f})"
                for text, box in texts
                if box.x0 < canvas.x0 - TOLERANCE_PX or box.y0 < canvas.y0 - TOLERANCE_PX
                or box.x1 > canvas.x1 + TOLERANCE_PX or box.y1 > canvas.y1 + TOLERANCE_PX]
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > TOLERANCE_PX and height > TOLERANCE_PX:
            problems.append(f"{a.get_text()!r} overlaps {b.get_text()!r}")
    return problems


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_text_fits_and_does_not_overlap(name, monkeypatch):
    fig = FIGURES[name]()
    try:
        assert layout_problems(fig, monkeypatch) == []
    finally:
        plt.close(fig)


def test_layout_check_catches_overlap_and_overflow(monkeypatch):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.text(0.5, 0.5, "first label", transform=ax.transAxes)
    ax.text(0.52, 0.5, "second label", transform=ax.transAxes)
    ax.text(1.2, 0.5, "outside the canvas", transform=ax.transAxes)
    problems = layout_problems(fig, monkeypatch)
    plt.close(fig)
    assert any("overlaps" in p and "first label" in p for p in problems)
    assert any("'outside the canvas' leaves the canvas" in p for p in problems)
