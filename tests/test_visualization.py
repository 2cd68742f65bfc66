"""Figures: structure (axes, titles naming the dataset, axis labels) and the statistics behind them."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
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
    assert_figure(viz.plot_channel_histograms(images, "synthetic"), 3)


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
    fig = viz.plot_channel_correlation(images, "synthetic")
    assert_figure(fig, 1)
    texts = [t.get_text() for t in main_axes(fig)[0].texts]
    assert f"{np.corrcoef(pixels)[0, 1]:.3f}" in texts


def test_channel_stats_annotated():
    mean, std = config.SVHN_MEAN, config.SVHN_STD
    fig = viz.plot_channel_stats(mean, std, "svhn")
    assert_figure(fig, 1, dataset="svhn")
    texts = {t.get_text() for t in main_axes(fig)[0].texts}
    assert {f"{v:.3f}" for v in (*mean, *std)} <= texts


def history(epochs=5):
    return [dict(epoch=e, train_loss=1 / e, val_loss=1.1 / e, train_accuracy=1 - 0.5 / e,
                 val_accuracy=0.9 - 0.5 / e, val_f1_macro=0.8 - 0.3 / e + (0.2 if e == 3 else 0.0))
            for e in range(1, epochs + 1)]


def test_learning_curves_mark_best_epoch():
    fig = viz.plot_learning_curves(history(), "synthetic", title="run x")
    assert_figure(fig, 3)
    assert "run x" in fig.get_suptitle()
    loss_ax, acc_ax, f1_ax = main_axes(fig)
    assert len(loss_ax.get_lines()) == 3  # train, val, best-epoch marker
    best_line = f1_ax.get_lines()[-1]
    assert best_line.get_xdata()[0] == 3


def test_learning_curves_integer_epochs_and_metric_axes():
    fig = viz.plot_learning_curves(history(2), "synthetic", chance=0.1)
    loss_ax, acc_ax, f1_ax = main_axes(fig)
    for ax in (loss_ax, acc_ax, f1_ax):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # no 1.25 / 1.75 epochs
    assert_metric_axis(acc_ax)
    assert_metric_axis(f1_ax)
    assert "chance 0.10" in [t.get_text() for t in f1_ax.texts]
    assert not fig.get_supxlabel()


def test_learning_curves_one_epoch_says_so():
    fig = viz.plot_learning_curves(history(1), "svhn", budget="1 epoch")
    assert "one epoch only" in fig.get_supxlabel()
    assert main_axes(fig)[0].get_lines()[0].get_marker() == "o"


def test_learning_curves_skip_missing_keys():
    records = [{k: v for k, v in r.items() if k != "train_accuracy"} for r in history()]
    fig = viz.plot_learning_curves(records, "svhn")
    assert_figure(fig, 3, dataset="svhn")
    assert len(main_axes(fig)[1].get_lines()) == 2  # val accuracy and the marker


def test_confusion_matrix_is_row_normalized():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    cm = confusion_matrix(y_true, y_pred, labels=range(10))
    fig = viz.plot_confusion_matrix(cm.tolist(), "synthetic")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    texts = cell_texts(ax)
    assert len(texts) == 100
    assert texts[2, 5].get_text() == f"{cm[2, 5] / cm[2].sum():.3f}"
    assert ax.collections[0].get_clim() == (0.0, 1.0)
    counts = viz.plot_confusion_matrix(cm, "svhn", normalize=False, budget="500 test images")
    assert cell_texts(main_axes(counts)[0])[0, 0].get_text() == str(cm[0, 0])
    assert "500 test images" in counts.get_suptitle()


def test_per_class_f1_grouped_bars():
    runs = {"a": list(np.linspace(0.8, 0.9, 10)), "b": list(np.linspace(0.85, 0.95, 10))}
    fig = viz.plot_per_class_f1(runs, "synthetic", chance=0.1)
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    bars = [p for container in ax.containers for p in container]
    assert len(bars) == 20
    np.testing.assert_allclose([p.get_height() for p in bars[10:]], runs["b"])
    assert_metric_axis(ax)  # the whole 0..1 range, not zoomed onto the scores
    assert "chance 0.10" in [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (macro 0.850)", "b (macro 0.900)"]


def grid_table():
    stages = ["none", "stage1_basic", "stage2_geometry"]
    values = np.array([[0.9012, np.nan], [0.9123, 0.8871], [0.9255, 0.8766]])
    return pd.DataFrame(values, index=stages, columns=[0.0, 0.25])


def test_heatmap_annotates_values_marks_and_intervals():
    table = grid_table()
    significance = pd.DataFrame([["", ""], ["*", ""], [True, "**"]], index=table.index, columns=table.columns)
    ci = pd.DataFrame(0.0042, index=table.index, columns=table.columns)
    fig = viz.plot_heatmap(table, "synthetic", significance=significance, ci_halfwidth=ci)
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    texts = cell_texts(ax)
    assert texts[1, 0].get_text() == "0.912*\n±0.004"
    assert texts[2, 0].get_text() == "0.925*\n±0.004"
    assert texts[2, 1].get_text() == "0.877**\n±0.004"
    assert (0, 1) not in texts  # the missing cell is left blank (grey background)
    assert texts[2, 0].get_fontweight() == "bold" and texts[1, 0].get_fontweight() != "bold"
    # Colour limits follow the values' range, not 0..1.
    low, high = ax.collections[0].get_clim()
    assert 0.8 < low < 0.8766 and 0.9255 < high < 1.0


def test_heatmap_plain_and_eight_columns():
    table = pd.DataFrame(np.linspace(0.8, 0.9, 16).reshape(2, 8), index=["a", "b"], columns=np.arange(8) / 8)
    fig = viz.plot_heatmap(table, "svhn", title="t")
    assert_figure(fig, 1, dataset="svhn")
    texts = cell_texts(main_axes(fig)[0])
    expected = [f"{v:.3f}" for v in table.to_numpy().ravel()]
    assert [texts[r, c].get_text() for r in range(2) for c in range(8)] == expected


def test_robustness_heatmap():
    table = pd.DataFrame([[0.9, 0.7, 0.8], [0.92, 0.8, 0.85]], index=["none", "stage5_occlusion"],
                         columns=["clean", "affine", "noise"])
    fig = viz.plot_robustness(table, "synthetic", budget="2,250 train images, 8 epochs, 3 seeds")
    assert_figure(fig, 1)
    ax = main_axes(fig)[0]
    assert "0.800" in [t.get_text() for t in ax.texts]
    assert fig.get_suptitle().endswith("\n2,250 train images, 8 epochs, 3 seeds")
    # The colour scale of a metric in [0, 1] never leaves it, even with values near 0.
    low_scores = pd.DataFrame([[0.02, 0.5], [0.05, 0.99]], index=["a", "b"], columns=["clean", "noise"])
    assert main_axes(viz.plot_robustness(low_scores, "svhn"))[0].collections[0].get_clim() == (0.0, 1.0)


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


def test_seed_spread():
    rng = np.random.default_rng(2)
    df = pd.DataFrame([dict(stage=s, p_aug=p, seed=k, f1_macro=0.9 + rng.normal(0, 0.01))
                       for s in ("stage1_basic", "stage2_geometry") for p in (0.0, 0.5) for k in range(3)])
    fig = viz.plot_seed_spread(df, "synthetic", chance=0.1)
    assert_figure(fig, 2)
    axes = main_axes(fig)
    assert {ax.get_title() for ax in axes} == {"stage1_basic", "stage2_geometry"}
    low, high = axes[0].get_ylim()
    assert 0.0 <= low <= 0.1 and 0.9 < high <= 1.0  # zoomed on the seeds, the chance line included
    # The interval drawn for the first cell is stats.seed_summary's Student-t interval.
    cell = df[(df["stage"] == "stage1_basic") & (df["p_aug"] == 0.0)]["f1_macro"]
    summary = stats.seed_summary(cell)
    # seaborn draws each interval with its caps as one line, the pieces separated by NaN.
    intervals = [line.get_ydata() for line in axes[0].get_lines() if np.isnan(line.get_ydata()).any()]
    assert len(intervals) == 2  # one per p_aug
    np.testing.assert_allclose([np.nanmin(intervals[0]), np.nanmax(intervals[0])],
                               [summary["ci_low"], summary["ci_high"]])


def test_seed_spread_with_one_seed_says_so():
    df = pd.DataFrame([dict(stage=s, p_aug=p, seed=0, f1_macro=0.9) for s in ("a", "b") for p in (0.0, 0.5)])
    fig = viz.plot_seed_spread(df, "synthetic")
    assert "synthetic" in fig.get_suptitle()
    (ax,) = fig.axes
    assert not ax.collections and not ax.get_lines()  # no dots drawn
    assert "one seed per cell" in ax.texts[0].get_text()


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


def test_save_figure_writes_png_atomically(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    path = viz.save_figure(fig, tmp_path / "sub" / "f.png", dpi=50)
    assert path == tmp_path / "sub" / "f.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (100, 75)
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]  # no temporary file left


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
