"""Figures: structure (axes, titles naming the dataset, axis labels) and the statistics behind them."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402
from torchvision.transforms.v2.functional import rgb_to_grayscale  # noqa: E402

import config  # noqa: E402
import stats  # noqa: E402
import visualization as viz  # noqa: E402

N = 60


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=generator)


@pytest.fixture
def labels():
    return torch.arange(N) % config.NUM_CLASSES


def main_axes(fig):
    """Plot axes, without colorbars."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def cell_texts(ax):
    """Texts of a seaborn heatmap by cell: {(row, col): text} (seaborn writes at the cell centre)."""
    return {(int(t.get_position()[1]), int(t.get_position()[0])): t for t in ax.texts}


def assert_metric_axis(ax, axis="y"):
    assert (ax.get_ylim() if axis == "y" else ax.get_xlim()) == (0.0, 1.0)


def assert_figure(fig, n_axes, dataset="synthetic"):
    """A Figure with ``n_axes`` plot axes, every one labelled, and a title naming the dataset."""
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = main_axes(fig)
    assert len(axes) == n_axes
    title = fig.get_suptitle()
    if dataset == "synthetic":
        assert "synthetic" in title
    else:
        assert "SVHN" in title and "synthetic" not in title
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip()


def test_dataset_label():
    assert viz.dataset_label("svhn") == "SVHN"
    assert viz.dataset_label("synthetic") == "synthetic SVHN (not real data)"
    with pytest.raises(config.ConfigError):
        viz.dataset_label("cifar")


def test_class_balance_bars_are_the_counts(labels):
    test_labels = labels[:23]
    fig = viz.plot_class_balance(labels, test_labels, "synthetic")
    assert_figure(fig, 2)
    ax_count, ax_share = main_axes(fig)
    heights = np.array([patch.get_height() for patch in ax_count.patches]).reshape(2, config.NUM_CLASSES)
    np.testing.assert_array_equal(heights[0], np.bincount(labels.numpy(), minlength=10))
    np.testing.assert_array_equal(heights[1], np.bincount(test_labels.numpy(), minlength=10))
    shares = np.array([patch.get_height() for patch in ax_share.patches]).reshape(2, config.NUM_CLASSES)
    np.testing.assert_allclose(shares.sum(axis=1), [100.0, 100.0])


def test_samples_per_class(images, labels):
    assert_figure(viz.plot_samples_per_class(images, labels, "synthetic", per_class=3), 1)
    # A class with fewer examples than per_class still renders (blank tiles).
    assert_figure(viz.plot_samples_per_class(images, labels, "svhn", per_class=8), 1, dataset="svhn")


def test_channel_histograms_match_bincount(images):
    counts = viz.channel_histograms(images)
    for c in range(3):
        np.testing.assert_array_equal(counts[c], np.bincount(images[:, c].numpy().ravel(), minlength=256))
    images = images.clone()
    images[:5] = 255  # a spike at 255 is left out of the curve and given in words
    fig = viz.plot_channel_histograms(images, "synthetic")
    axes = main_axes(fig)
    assert len(axes) == 3 and axes[0].get_ylabel() == "share of pixels (%)"
    share_255 = 100 * (images[:, 0] == 255).float().mean().item()
    assert f"{share_255:.1f} % at 255" in axes[0].get_title()
    drawn = axes[0].collections[0].get_paths()[0].vertices[:, 0]
    assert drawn.min() >= 0.5 and drawn.max() <= 254.5  # 1..254 drawn as steps


def test_image_statistics_match_per_image_reference(images):
    # Chunks smaller than N exercise the chunked path.
    stats = viz.image_statistics(images, chunk_size=7)
    for i in (0, 13, N - 1):
        gray = rgb_to_grayscale(images[i].double())[0].numpy()  # (H, W), torchvision's luma weights
        assert stats["brightness"][i] == pytest.approx(gray.mean(), rel=1e-5)
        assert stats["contrast"][i] == pytest.approx(gray.std(), rel=1e-5)
        assert stats["sharpness"][i] == pytest.approx(ndimage.laplace(gray).var(), rel=1e-4)
    assert all(values.shape == (N,) for values in stats.values())


def test_sharpness_orders_blurred_below_sharp(images):
    blurred = torch.from_numpy(ndimage.uniform_filter(images.numpy(), size=(1, 1, 3, 3))).to(torch.uint8)
    assert (viz.image_statistics(blurred)["sharpness"] < viz.image_statistics(images)["sharpness"]).all()


def test_plot_image_statistics(images):
    assert_figure(viz.plot_image_statistics(images, "synthetic", max_points=20), 5)
    stats = viz.image_statistics(images)
    assert_figure(viz.plot_image_statistics(images, "svhn", stats=stats), 5, dataset="svhn")


def test_class_mean_images(images, labels):
    means = viz.class_mean_images(images, labels)
    assert means.shape == (config.NUM_CLASSES, 3, 32, 32)
    for digit in (0, 7):
        expected = images[labels == digit].double().mean(dim=0) / 255
        torch.testing.assert_close(means[digit], expected)
    assert_figure(viz.plot_mean_images(images, labels, "synthetic"), 1)


def test_channel_correlation_matches_numpy(images):
    images = images.clone()
    images[:, 1] = images[:, 0] // 2 + images[:, 1] // 2  # correlated channels
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).numpy().astype(np.float64)
    np.testing.assert_allclose(viz.channel_correlation(images), np.corrcoef(pixels), atol=1e-9)


def history(epochs=5, shift=0.0):
    return [dict(epoch=e, train_loss=1 / e, val_loss=1.1 / e, train_accuracy=1 - 0.5 / e,
                 val_accuracy=0.9 - 0.5 / e, val_f1_macro=0.8 - 0.3 / e + (0.2 if e == 3 else 0.0) + shift)
            for e in range(1, epochs + 1)]


def test_learning_curves_overlay_every_seed_and_mark_best_epochs():
    runs = {"stage1_basic p=0.5": [history(), history(shift=0.01)], "no augmentation": [history(shift=-0.02)]}
    fig = viz.plot_learning_curves(runs, "synthetic", title="run x", budget="5 epochs, 2 seeds")
    assert_figure(fig, 3)
    assert "run x" in fig.get_suptitle()
    loss_ax, acc_ax, f1_ax = main_axes(fig)
    assert len(loss_ax.get_lines()) == 6  # train and val of each of the three seeds
    curves = [line for line in f1_ax.get_lines() if len(line.get_xdata()) > 1]
    np.testing.assert_allclose(curves[1].get_ydata(), [h["val_f1_macro"] for h in history(shift=0.01)])
    best = [line for line in f1_ax.get_lines() if len(line.get_xdata()) == 1]
    assert [line.get_xdata()[0] for line in best] == [3, 3, 3]  # each seed's best-validation epoch
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "stage1_basic p=0.5 (2 seeds)" in labels and "no augmentation (1 seed)" in labels


def test_learning_curves_integer_epochs_and_metric_axes():
    fig = viz.plot_learning_curves(history(2), "synthetic", chance=0.1)
    loss_ax, acc_ax, f1_ax = main_axes(fig)
    for ax in (loss_ax, acc_ax, f1_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # no 1.25 / 1.75 epochs
    assert_metric_axis(acc_ax)
    assert_metric_axis(f1_ax)
    assert "chance 0.10" in [t.get_text() for t in f1_ax.texts]


def test_learning_curves_one_epoch_says_so():
    fig = viz.plot_learning_curves(history(1), "svhn", budget="1 epoch")
    assert "1 epoch only" in main_axes(fig)[1].get_title()
    assert main_axes(fig)[0].get_lines()[0].get_marker() == "o"


def test_learning_curves_skip_missing_keys():
    records = [{k: v for k, v in r.items() if k != "train_accuracy"} for r in history()]
    fig = viz.plot_learning_curves(records, "svhn")
    assert_figure(fig, 3, dataset="svhn")
    assert len(main_axes(fig)[1].get_lines()) == 1  # validation accuracy only


def test_confusion_matrix_is_row_normalized():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    cm = confusion_matrix(y_true, y_pred, labels=range(10))
    fig = viz.plot_confusion_matrix(cm.tolist(), "synthetic")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    texts = cell_texts(ax)
    assert len(texts) == 100
    assert texts[2, 5].get_text() == f"{cm[2, 5] / cm[2].sum():.2f}"
    assert ax.collections[0].get_clim() == (0.0, 1.0)
    counts = viz.plot_confusion_matrix(cm, "svhn", normalize=False, budget="500 test images")
    assert cell_texts(main_axes(counts)[0])[0, 0].get_text() == str(cm[0, 0])
    assert "500 test images" in counts.get_suptitle()


def test_per_class_f1_means_and_intervals_over_seeds():
    rng = np.random.default_rng(0)
    seeds = 0.85 + 0.1 * rng.random((3, 10))
    fig = viz.plot_per_class_f1({"a": seeds, "b": np.linspace(0.8, 0.9, 10)}, "synthetic", chance=0.1)
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    points_a, points_b = (container.lines[0] for container in ax.containers)
    np.testing.assert_allclose(points_a.get_ydata(), seeds.mean(axis=0))
    # The error bar of digit 4 spans stats.seed_summary's Student-t interval over the seeds.
    summary = stats.seed_summary(seeds[:, 4])
    segment = ax.containers[0].lines[2][0].get_segments()[4]
    np.testing.assert_allclose(segment[:, 1], [summary["ci_low"], summary["ci_high"]])
    assert not ax.containers[1].has_yerr  # one run: no interval
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [f"a (3 seeds, macro-F1 {seeds.mean():.3f})", "b (1 seed, macro-F1 0.850), no interval"]
    assert ax.get_ylim()[1] == 1.0 and ax.get_ylim()[0] >= 0.0


def forest_rows():
    return [dict(label="no augmentation", diff=0.0, low=np.nan, high=np.nan, verdict="baseline",
                 seed_diffs=[-0.01, 0.0, 0.01]),
            dict(label="stage1_basic, p_aug 0.5", diff=0.03, low=0.01, high=0.05, verdict="better",
                 seed_diffs=[0.02, 0.03, 0.04]),
            dict(label="stage5_occlusion, p_aug 0.5", diff=-0.2, low=np.nan, high=np.nan, verdict="not tested",
                 seed_diffs=[-0.2])]


def test_forest_plot_draws_intervals_seeds_and_verdicts():
    fig = viz.plot_forest(forest_rows(), "synthetic", budget="3 seeds")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["label"] for r in forest_rows()]
    (intervals,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    interval = intervals.get_segments()[0]  # the only interval: stage1_basic, second row from the top
    np.testing.assert_allclose(interval, [[0.01, 1.0], [0.05, 1.0]])
    seeds = [c for c in ax.collections if not isinstance(c, LineCollection)]
    assert sum(len(c.get_offsets()) for c in seeds) == 7  # every seed a dot
    mean_markers = [line for line in ax.get_lines() if line.get_marker() not in ("None", None, "")]
    seed_layer = max(c.get_zorder() for c in seeds)
    assert all(seed_layer > line.get_zorder() for line in mean_markers)  # seeds drawn over the means
    right = [t.get_text() for t in ax.child_axes[0].get_yticklabels()]
    assert "+0.030 [+0.010, +0.050]" in right and "reference" in right and "-0.200" in right
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "significantly better" in legend and "not tested (one seed or no baseline)" in legend
    with pytest.raises(config.ConfigError):
        viz.plot_forest([], "synthetic")


def grid(values):
    return pd.DataFrame(np.asarray(values, dtype=object).reshape(2, 2), index=["stage1_basic", "stage5_occlusion"],
                        columns=[0.5, 1.0])


def test_difference_heatmap_is_centred_on_zero_with_marks_and_hatching():
    diff = grid([0.02, -0.1, 0.001, -0.3]).astype(float)
    verdicts = grid(["better", "worse", "no difference", "not tested"])
    fig = viz.plot_difference_heatmap(diff, verdicts, grid([3, 3, 3, 1]).astype(float), "synthetic",
                                      low=diff - 0.01, high=diff + 0.01, note="Holm over 3 tested cells")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    texts = cell_texts(ax)
    assert texts[0, 0].get_text() == "+0.020 ▲\n[+0.010, +0.030]"
    assert texts[0, 1].get_text().startswith("-0.100 ▼") and texts[1, 0].get_text().startswith("+0.001\n")
    low, high = ax.collections[0].get_clim()
    assert low == -high and high >= 0.3  # white is 0
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert [(p.get_x(), p.get_y()) for p in hatched] == [(1, 1)]  # the one-seed cell
    assert "Holm over 3 tested cells" in ax.get_title() and "hatched: 1 seed" in ax.get_title()
    colorbar = [a for a in fig.axes if a.get_label() == "<colorbar>"][0]
    assert "difference in test macro-F1" in colorbar.get_ylabel()


def test_f1_heatmap_marks_cells_bolds_the_best_and_keeps_its_colours_in_the_metric_range():
    f1 = grid([0.91, 0.62, np.nan, 0.95]).astype(float)
    fig = viz.plot_heatmap(f1, "synthetic", significance=grid(["", "*", "", "*"]), note="* = differs")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    texts = cell_texts(ax)
    assert texts[0, 0].get_text() == "0.910" and texts[0, 1].get_text() == "0.620*"
    assert (1, 0) not in texts or texts[1, 0].get_text() == ""  # a missing cell stays blank
    bold = [t.get_text() for t in ax.texts if t.get_fontweight() == "bold"]
    assert bold == ["0.950*"]
    low, high = ax.collections[0].get_clim()
    assert 0.0 <= low < 0.62 and 0.95 < high <= 1.0
    assert ax.get_title() == "* = differs"


def test_effect_vs_budget_subtracts_the_baseline_mean_per_epoch():
    base = np.array([[0.80, 0.90], [0.82, 0.92]])
    cell = np.array([[0.70, 0.95], [0.74, 0.97]])
    fig = viz.plot_effect_vs_budget(base, {("stage1_basic", 0.5): cell}, "synthetic",
                                    verdicts={("stage1_basic", 0.5): "better"})
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    mean_line = [line for line in ax.get_lines() if line.get_label().startswith("p_aug")][0]
    np.testing.assert_allclose(mean_line.get_ydata(), [-0.09, 0.05])
    assert mean_line.get_label() == "p_aug 0.5 (2 seeds): significantly better"
    with pytest.raises(config.ConfigError):
        viz.plot_effect_vs_budget(base, {}, "synthetic")


def test_robustness_drops_name_the_severity_and_show_intervals():
    drops = pd.DataFrame([dict(run="a", kind="blur", drop=0.1, low=0.05, high=0.15, n_seeds=3),
                          dict(run="b", kind="blur", drop=0.3, low=np.nan, high=np.nan, n_seeds=1),
                          dict(run="a", kind="noise", drop=-0.01, low=-0.02, high=0.0, n_seeds=3),
                          dict(run="b", kind="noise", drop=0.2, low=np.nan, high=np.nan, n_seeds=1)])
    fig = viz.plot_robustness_drops(drops, "synthetic", severities=(2,))
    assert "severity 2" in fig.get_suptitle()
    blur, noise = main_axes(fig)
    assert blur.get_title() == "blur" and [t.get_text() for t in blur.get_yticklabels()] == ["b", "a"]
    np.testing.assert_allclose(blur.collections[0].get_segments()[0], [[0.05, 1.0], [0.15, 1.0]])
    assert len(blur.collections) == 1  # the one-seed run has no interval
    assert "severities 1, 2, 3 (mean)" == viz.severity_text((1, 2, 3))


ROWS = [
    dict(name="SimpleCNN", f1_macro=0.929, ci_low=0.925, ci_high=0.933, params=141_000, images_per_s=5366.0,
         checkpoint_mb=0.6),
    dict(name="ResNet18Cifar", f1_macro=0.932, ci_low=None, ci_high=None, params=11_174_000,
         images_per_s=None, checkpoint_mb=42.7),
]


@pytest.mark.parametrize("plot", [viz.plot_model_comparison, viz.plot_distillation_comparison])
def test_comparison_bars(plot):
    fig = plot(ROWS, "synthetic")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [0.929, 0.932])
    text = " ".join(t.get_text() for t in ax.texts)
    assert "0.141 M params" in text and "5,366 img/s" in text and "42.7 MB" in text
    assert_metric_axis(ax)


def test_comparison_bars_use_display_names_and_chance_line():
    rows = [dict(ROWS[0], name="simplecnn"), dict(ROWS[1], name="resnet18", f1_macro=0.12, ci_low=0.1, ci_high=0.14)]
    fig = viz.plot_model_comparison(rows, "svhn", budget="full train split, 15 epochs", chance=0.1)
    assert_figure(fig, 1, dataset="svhn")
    ax = main_axes(fig)[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SimpleCNN", "ResNet18Cifar"]
    assert any(line.get_ydata()[0] == 0.1 for line in ax.get_lines())
    texts = {t.get_text(): t for t in ax.texts}
    assert "chance 0.10" in texts
    assert texts["0.120\n11.2 M params\n42.7 MB"].get_position()[1] > 0.14  # a short bar's text sits above it
    assert_metric_axis(ax)


def test_top_confused_pairs_match_sklearn():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 10, 400)
    y_pred = np.where(rng.random(400) < 0.3, rng.integers(0, 10, 400), y_true)
    cm = confusion_matrix(y_true, y_pred, labels=range(10))
    np.fill_diagonal(cm, 0)
    pairs = viz.top_confused_pairs(y_true, y_pred, top_k=4)
    assert [count for _, _, count in pairs] == sorted(cm.ravel(), reverse=True)[:4]
    assert all(cm[t, p] == count for t, p, count in pairs)


def test_confused_pairs_figure(images, labels):
    y_pred = (labels + (torch.arange(N) % 3 == 0).long()) % 10
    fig = viz.plot_confused_pairs(images, labels, y_pred, "synthetic", top_k=3, per_pair=2)
    assert_figure(fig, 1)
    assert len(main_axes(fig)[0].get_yticklabels()) == 3
    assert_figure(viz.plot_confused_pairs(images, labels, labels, "svhn"), 1, dataset="svhn")


def test_model_label():
    assert viz.model_label("simplecnn") == "SimpleCNN"
    assert viz.model_label("resnet18") == "ResNet18Cifar"
    assert viz.model_label("teacher run 7") == "teacher run 7"


def test_tuning_history_best_so_far():
    values = [0.2, 0.5, np.nan, 0.4, 0.7]
    fig = viz.plot_tuning_history(values, "synthetic", budget="2,000 train images, 2 epochs per trial")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    trial_dots, best = ax.get_lines()
    np.testing.assert_allclose(best.get_ydata(), [0.2, 0.5, 0.5, 0.5, 0.7])
    assert list(trial_dots.get_xdata()) == [0, 1, 2, 3, 4]
    assert_metric_axis(ax)
    assert "5 trials" in fig.get_suptitle() and "2 epochs per trial" in fig.get_suptitle()
    with pytest.raises(config.ConfigError):
        viz.plot_tuning_history([], "synthetic")


def test_param_importances_warn_with_few_trials():
    importances = {"lr": 0.7, "weight_decay": 0.2, "batch_size": 0.1}
    fig = viz.plot_param_importances(importances, n_trials=2, dataset="synthetic")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["batch_size", "weight_decay", "lr"]  # largest on top
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [0.1, 0.2, 0.7])
    assert "too few" in ax.get_title()
    assert_metric_axis(ax, "x")
    many = viz.plot_param_importances(importances, n_trials=viz.MIN_TRIALS_FOR_IMPORTANCES, dataset="svhn")
    assert "too few" not in main_axes(many)[0].get_title()


def test_save_figure_writes_png_and_vector_copies_atomically(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    paths = viz.save_figure(fig, tmp_path / "sub" / "f.png", dpi=50, formats=("pdf", "svg"))
    assert paths == [tmp_path / "sub" / f"f.{ext}" for ext in ("png", "pdf", "svg")]
    with Image.open(paths[0]) as png:
        # Cropped to what is drawn: the tight bounding box is smaller than the 100 x 75 canvas.
        assert png.format == "PNG" and png.size[0] <= 100 and png.size[1] <= 75
    assert paths[1].read_bytes().startswith(b"%PDF") and b"<svg" in paths[2].read_bytes()
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["f.pdf", "f.png", "f.svg"]  # no temporary file
    with pytest.raises(config.ConfigError, match="unknown figure format"):
        viz.save_figure(fig, tmp_path / "g.png", formats=("jpeg",))


def test_count_text():
    assert viz.count_text(1, "epoch") == "1 epoch" and viz.count_text(3, "seed") == "3 seeds"
    assert viz.count_text(2700, "train image") == "2,700 train images"


def test_thumbnail_is_small_and_stamped(tmp_path):
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([0, 1], [0, 1])
    path = viz.save_thumbnail(fig, tmp_path / "t.png", stamp="SYNTHETIC DATA", width_px=200)
    assert "SYNTHETIC DATA" in [t.get_text() for t in fig.texts]
    with Image.open(path) as png:
        assert 150 <= png.size[0] <= 210


def test_replay_text_reads_the_parameters():
    import augmentations as A

    params = A.AugmentParams(torch.tensor([True, False]), (
        A.FlipParams(torch.tensor([True, True])),
        A.AffineParams(torch.tensor([-12.4, 3.0]), torch.tensor([[2.0, -1.0], [0.0, 0.0]]), torch.tensor([1.04, 1.0])),
        A.BlurParams(torch.tensor([0.734, 0.5])),
        A.EraseParams(torch.tensor([True, False]), torch.zeros(2, 4, dtype=torch.long)),
    ))
    assert viz.replay_text(params, 0) == "flip\nrot -12° s 1.04\nt (+2,-1) px\nσ 0.73\nerased"
    assert viz.replay_text(params, 1) == "clean"


def test_stage_gallery_replays_each_stage(images):
    import augmentations

    batch = images[:8]
    stages = ["none", "stage2_geometry", "stage5_occlusion", "trivialaugment"]
    fig = viz.plot_stage_gallery(batch, stages, config.SVHN_MEAN, config.SVHN_STD, "synthetic", seed=3)
    axes = np.array(main_axes(fig)).reshape(len(stages), 8)
    assert "synthetic" in fig.get_suptitle()
    assert [row[0].get_ylabel() for row in axes][:3] == stages[:3]
    assert axes[3, 0].get_ylabel() == "trivialaugment\n(automated policy)"
    # "none" shows the images themselves (normalize, then un-normalize).
    np.testing.assert_allclose(axes[0, 2].images[0].get_array(), batch[2].permute(1, 2, 0).numpy() / 255,
                               atol=1e-5)
    # Tiles carry the parameters that the same seed draws.
    params = augmentations.BatchAugment("stage2_geometry", 1.0).sample_params(
        8, torch.Generator().manual_seed(3), "cpu")
    for c in range(8):
        assert axes[1, c].get_xlabel() == viz.replay_text(params, c)
        assert f"rot {float(params[augmentations.Affine].angle[c]):+.0f}°" in axes[1, c].get_xlabel()
    policy = augmentations.BatchAugment("trivialaugment", 1.0).sample_params(8, torch.Generator().manual_seed(3), "cpu")
    assert [ax.get_xlabel() for ax in axes[3]] == [viz.replay_text(policy, c) for c in range(8)]  # the drawn ops


def test_stage_gallery_leaves_unchosen_samples_clean(images):
    fig = viz.plot_stage_gallery(images[:8], ["stage1_basic"], config.SVHN_MEAN, config.SVHN_STD, "svhn",
                                 p_aug=0.5, seed=1)
    labels = [ax.get_xlabel() for ax in main_axes(fig)]
    assert "SVHN" in fig.get_suptitle()
    assert "clean" in labels and any("rot" in label for label in labels)
