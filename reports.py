"""Reports to tables and figures: rows per run, cells with their statistics, Markdown and CSV
summaries, and every study figure rebuilt from the JSON reports without retraining."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from optuna.visualization import matplotlib as optuna_plots

import config
import visualization as viz
from atomic_io import atomic_write_text
from data_loading import compute_channel_stats, load_split
from runs import model_path, parse_digits, read_report
from stats import compare_to_baseline, format_estimate, holm_bonferroni, seed_summary
from work_queue import is_storage, open_storage, reports_from_storage

DEFAULT_QUEUE_NAME = "grid"  # the queue a grid uses when none is named

ROW_COLUMNS = [
    "run_id", "dataset", "model", "stage", "p_aug", "seed", "preset", "epochs", "teacher",
    "f1_macro", "ci_low", "ci_high", "accuracy", "corruption_f1", "train_images_per_s",
    "inference_images_per_s", "params", "seconds", "augment_path", "finished_at", "report",
]
# What varies between the cells of one grid; every other setting defines the grid's family.
CELL_VARYING = ("stage", "p_aug", "seed")


# ---------------------------------------------------------------- reports as rows


def load_reports(source: str | Path | None = None, study_name: str | None = None) -> pd.DataFrame:
    """One row per run from JSON reports or from a queue storage.

    ``source`` is a folder of reports (default ``reports/runs``), or a storage URL /
    journal file whose finished cells carry their reports (``study_name`` names the queue).
    Rows are keyed by run_id: a run reported twice yields one row (the newest).
    """
    rows = [report_row(report) for report in _reports_from_source(source, study_name)]
    frame = pd.DataFrame(rows, columns=ROW_COLUMNS)
    if frame.empty:
        return frame
    frame = frame.sort_values("finished_at").drop_duplicates("run_id", keep="last")
    return frame.sort_values(["dataset", "model", "stage", "p_aug", "seed"]).reset_index(drop=True)


def _reports_from_source(source, study_name) -> list[dict]:
    if source is not None and is_storage(source):
        return reports_from_storage(open_storage(str(source)), study_name or DEFAULT_QUEUE_NAME)
    folder = Path(source) if source is not None else config.RUNS_DIR
    return [read_report(path) for path in sorted(folder.glob("*.json"))]


def report_row(report: dict) -> dict:
    """The columns of one run (ROW_COLUMNS), the whole report kept in the last one."""
    cfg = report["config"]
    ci = report["test_f1_macro_ci"]
    return {
        "run_id": report["run_id"], "dataset": cfg["dataset"], "model": cfg["model"],
        "stage": cfg["stage"], "p_aug": cfg["p_aug"], "seed": cfg["seed"], "preset": cfg["preset"],
        "epochs": cfg["epochs"], "teacher": cfg["teacher"],
        "f1_macro": report["test"]["f1_macro"], "ci_low": ci["low"], "ci_high": ci["high"],
        "accuracy": report["test"]["accuracy"],
        "corruption_f1": report["robustness"]["mean_f1_macro"],
        "train_images_per_s": report["train_images_per_s"],
        "inference_images_per_s": report["inference_images_per_s"],
        "params": report["params"], "seconds": sum(report["seconds_per_epoch"]),
        "augment_path": report["augment_path"], "finished_at": report["finished_at"], "report": report,
    }


def run_label(report: dict) -> str:
    cfg = report["config"]
    return "no augmentation" if cfg["stage"] == "none" else f"{cfg['stage']} p={cfg['p_aug']:g}"


def comparison_row(name: str, report: dict) -> dict:
    """One model in a comparison table: macro-F1 with CI, size and speed."""
    ci = report["test_f1_macro_ci"]
    return {"name": f"{name} ({report['config']['model']})", "run_id": report["run_id"],
            "f1_macro": report["test"]["f1_macro"], "ci_low": ci["low"], "ci_high": ci["high"],
            "params": report["params"], "images_per_s": report["inference_images_per_s"],
            "checkpoint_mb": model_path(report["run_id"]).stat().st_size / 1e6}


# ---------------------------------------------------------------- statistics over cells


def family_key(report: dict) -> str:
    """Configuration minus stage, p_aug and seed: cells of one family share a baseline."""
    cfg = {k: v for k, v in report["config"].items() if k not in CELL_VARYING}
    return json.dumps(cfg, sort_keys=True)


def summarize(frame: pd.DataFrame, alpha: float = 0.05, n_boot: int = 1000) -> pd.DataFrame:
    """One row per cell (stage, p_aug within a family): seeds, mean, CI, and a paired test
    against the family's no-augmentation baseline on the same test images.

    p-values are Holm-corrected over all cells of the table, so a grid of 20 comparisons
    does not produce a "significant" difference by chance.
    """
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(family=[family_key(r) for r in frame["report"]])
    rows = []
    for (family, _stage, _p_aug), cell in frame.groupby(["family", "stage", "p_aug"], sort=False):
        base = frame[(frame["family"] == family) & (frame["stage"] == "none")]
        rows.append(_cell_row(cell, base, n_boot))
    table = pd.DataFrame(rows)
    tested = table["p_value"].notna()
    table["p_holm"] = np.nan
    table["significant"] = False
    if tested.any():
        adjusted = holm_bonferroni(table.loc[tested, "p_value"].to_numpy())
        table.loc[tested, "p_holm"] = adjusted
        table.loc[tested, "significant"] = adjusted < alpha
    return table.sort_values(["dataset", "model", "stage", "p_aug"]).reset_index(drop=True)


def _cell_row(cell: pd.DataFrame, base: pd.DataFrame, n_boot: int) -> dict:
    first = cell.iloc[0]
    seeds = seed_summary(cell["f1_macro"].to_numpy())
    row = {
        "family": first["family"], "dataset": first["dataset"], "model": first["model"], "preset": first["preset"],
        "epochs": first["epochs"], "lr": first["report"]["config"]["lr"], "teacher": first["teacher"],
        "stage": first["stage"],
        "p_aug": first["p_aug"], "n_seeds": len(cell), "f1_mean": seeds["mean"], "f1_std": seeds["std"],
        "ci_low": seeds["ci_low"], "ci_high": seeds["ci_high"],
        "corruption_f1": float(cell["corruption_f1"].mean()),
        "diff": float("nan"), "diff_low": float("nan"), "diff_high": float("nan"), "p_value": float("nan"),
    }
    if len(cell) == 1:  # one seed: the interval is the bootstrap over test images
        row["ci_low"], row["ci_high"] = float(first["ci_low"]), float(first["ci_high"])
    if first["stage"] != "none" and not base.empty:
        y_true = parse_digits(first["report"]["test_labels"])
        test = compare_to_baseline(
            y_true,
            [parse_digits(r["test_predictions"]) for r in base["report"]],
            [parse_digits(r["test_predictions"]) for r in cell["report"]],
            n_boot=n_boot,
        )
        # Conservative: a cell counts as different only when the paired bootstrap of macro-F1
        # and McNemar's test on the same images both say so.
        row.update(diff=test["diff"], diff_low=test["low"], diff_high=test["high"],
                   p_value=max(test["p_value"], test["mcnemar_p"]))
    return row


def summary_markdown(table: pd.DataFrame) -> str:
    """The cell table as Markdown, headed by the dataset so synthetic results are never mistaken."""
    if table.empty:
        return "No finished runs.\n"
    lines = []
    for dataset, part in table.groupby("dataset"):
        lines += [f"### {viz.dataset_label(dataset)}: test macro-F1 per cell", "",
                  "| model | epochs | lr | stage | p_aug | seeds | macro-F1 [95% CI] "
                  "| diff vs no augmentation [95% CI] | p (Holm) | significant | corruption F1 |",
                  "|---|---:|---:|---|---:|---:|---|---|---:|:---:|---:|"]
        lines += [_markdown_row(r) for _, r in part.iterrows()]
        lines.append("")
    return "\n".join(lines)


def _markdown_row(r) -> str:
    """One cell of the summary; cells without a same-family baseline say so instead of 'nan'."""
    model = r["model"] if not isinstance(r["teacher"], str) else f"{r['model']} (distilled from {r['teacher']})"
    if r["stage"] == "none":
        diff, p_holm, mark = "baseline", "", ""
    elif r["p_value"] != r["p_value"]:  # NaN: no no-augmentation run of the same family
        diff, p_holm, mark = "no baseline", "", ""
    else:
        diff = format_estimate(r["diff"], r["diff_low"], r["diff_high"])
        p_holm, mark = f"{r['p_holm']:.3g}", ("yes" if r["significant"] else "no")
    return (f"| {model} | {r['epochs']} | {r['lr']:.3g} | {r['stage']} | {r['p_aug']:g} | {r['n_seeds']} "
            f"| {format_estimate(r['f1_mean'], r['ci_low'], r['ci_high'])} | {diff} | {p_holm} | {mark} "
            f"| {r['corruption_f1']:.3f} |")


def write_summary(frame: pd.DataFrame | None = None, out_dir: Path | None = None) -> tuple[str, Path]:
    """Print-ready Markdown and a CSV under reports/ (both written atomically)."""
    frame = load_reports() if frame is None else frame
    out_dir = out_dir or config.REPORTS_DIR
    table = summarize(frame)
    markdown = summary_markdown(table)
    atomic_write_text(out_dir / "summary.md", markdown)
    csv_path = atomic_write_text(out_dir / "summary.csv", table.to_csv(index=False))
    return markdown, csv_path


# ---------------------------------------------------------------- grids as tables


def grid_family(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells of one model's grid: the family (same settings but stage, p_aug and seed) with a
    no-augmentation baseline and the most cells, so tuned or distilled runs stay off its heatmap."""
    with_baseline = cells[cells["family"].isin(cells.loc[cells["stage"] == "none", "family"])]
    pool = with_baseline if not with_baseline.empty else cells
    return pool[pool["family"] == pool["family"].value_counts().idxmax()]


def grid_tables(cells: pd.DataFrame) -> dict:
    """stage x p_aug tables (mean F1, significance marks, corruption F1) for one model.

    p_aug = 0 trains without augmentation whatever the stage, so that column repeats the
    baseline in every stage row.
    """
    augmented = cells[cells["stage"] != "none"]
    base = cells[cells["stage"] == "none"]
    stages = [s for s in config.ALL_STAGES if s in set(augmented["stage"])]

    def pivot(column):
        table = augmented.pivot_table(index="stage", columns="p_aug", values=column, aggfunc="first")
        table = table.reindex(stages)
        if not base.empty:
            table.insert(0, 0.0, base.iloc[0][column])
        return table.sort_index(axis=1)

    marks = augmented.assign(mark=augmented["significant"].map({True: "*", False: ""}))
    significance = marks.pivot_table(index="stage", columns="p_aug", values="mark", aggfunc="first").reindex(stages)
    if not base.empty:
        significance.insert(0, 0.0, "")
    return {"f1": pivot("f1_mean"), "corruption": pivot("corruption_f1"),
            "significance": significance.sort_index(axis=1).fillna(""),
            "n_seeds": int(pd.concat([augmented, base])["n_seeds"].max())}


def best_runs(frame: pd.DataFrame, cells: pd.DataFrame, dataset: str, model: str) -> tuple[dict, dict | None]:
    """The report of the best cell (highest mean macro-F1; its first seed) and the baseline's."""
    best_cell = cells.sort_values("f1_mean", ascending=False).iloc[0]
    runs = frame[(frame["dataset"] == dataset) & (frame["model"] == model) & frame["teacher"].isna()]
    best = runs[(runs["stage"] == best_cell["stage"]) & (runs["p_aug"] == best_cell["p_aug"])]
    base = runs[runs["stage"] == "none"]
    return best.iloc[0]["report"], (base.iloc[0]["report"] if not base.empty else None)


# ---------------------------------------------------------------- figures


def save_and_close(fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and free it: a study draws many figures."""
    written = viz.save_figure(fig, path)
    plt.close(fig)
    return written


def figures(frame: pd.DataFrame | None = None, out_dir: Path | None = None) -> list[Path]:
    """Every study figure, rebuilt from the reports (no training), as PNGs under reports/figures/."""
    frame = load_reports() if frame is None else frame
    out_dir = out_dir or config.FIGURES_DIR
    if frame.empty:
        return []
    table = summarize(frame)
    written = []
    for (dataset, model), cells in table[table["teacher"].isna()].groupby(["dataset", "model"]):
        written += _grid_figures(frame, grid_family(cells), dataset, model, out_dir)
    distillation = config.REPORTS_DIR / "distillation.json"
    if distillation.exists():
        written.append(_distillation_figure(json.loads(distillation.read_text()), out_dir))
    return written


def _grid_figures(frame, cells, dataset: str, model: str, out_dir: Path) -> list[Path]:
    written = []
    tables = grid_tables(cells)
    if not tables["f1"].empty:
        seeds = tables["n_seeds"]
        fig = viz.plot_heatmap(tables["f1"], dataset=dataset, significance=tables["significance"],
                               title=f"{model}: test macro-F1, stage x p_aug (mean of {seeds} seed(s); "
                                     "* = differs from no augmentation, Holm p<0.05)",
                               metric_label="macro-F1")
        written.append(save_and_close(fig, out_dir / f"{dataset}_{model}_heatmap_f1.png"))
        fig = viz.plot_heatmap(tables["corruption"], dataset=dataset,
                               title=f"{model}: macro-F1 under corruptions (mean over kinds)",
                               metric_label="corruption macro-F1")
        written.append(save_and_close(fig, out_dir / f"{dataset}_{model}_heatmap_corruption.png"))
    written += _best_cell_figures(frame, cells, dataset, model, out_dir)
    return written


def _best_cell_figures(frame, cells, dataset, model, out_dir) -> list[Path]:
    best, base = best_runs(frame, cells, dataset, model)
    label = run_label(best)
    prefix = out_dir / f"{dataset}_{model}_best"
    written = [
        save_and_close(viz.plot_learning_curves(best["history"], title=f"{model}, {label}", dataset=dataset),
                       Path(f"{prefix}_learning_curves.png")),
        save_and_close(viz.plot_confusion_matrix(best["test"]["confusion_matrix"], dataset=dataset,
                                                 title=f"{model}, {label}: confusion matrix (test)"),
                       Path(f"{prefix}_confusion.png")),
    ]
    f1_by_run = {label: best["test"]["f1_per_class"]}
    if base is not None and base["run_id"] != best["run_id"]:
        f1_by_run[run_label(base)] = base["test"]["f1_per_class"]
    written.append(save_and_close(viz.plot_per_class_f1(f1_by_run, dataset=dataset),
                                  Path(f"{prefix}_per_class_f1.png")))
    return written


def _distillation_figure(table: dict, out_dir: Path) -> Path:
    fig = viz.plot_distillation_comparison(table["rows"], dataset=table["dataset"])
    return save_and_close(fig, out_dir / f"{table['dataset']}_distillation.png")


def eda_figures(dataset: str = "synthetic", out_dir: Path | None = None) -> list[Path]:
    """The EDA notebook's figures: class balance, samples per class, channel histograms, image
    statistics, mean images, channel correlation and normalization statistics of the train split,
    and the stage gallery on 8 train images."""
    out_dir = out_dir or config.FIGURES_DIR
    train_x, train_y = load_split(dataset, "train")
    _, test_y = load_split(dataset, "test")
    mean, std = compute_channel_stats(train_x)
    figures_ = {
        "class_balance": viz.plot_class_balance(train_y, test_y, dataset),
        "samples_per_class": viz.plot_samples_per_class(train_x, train_y, dataset),
        "channel_histograms": viz.plot_channel_histograms(train_x, dataset),
        "image_statistics": viz.plot_image_statistics(train_x, dataset),
        "mean_images": viz.plot_mean_images(train_x, train_y, dataset),
        "channel_correlation": viz.plot_channel_correlation(train_x, dataset),
        "channel_stats": viz.plot_channel_stats(mean, std, dataset),
        "stage_gallery": viz.plot_stage_gallery(train_x[:8], list(config.STAGES[1:]), mean, std, dataset),
    }
    return [save_and_close(fig, out_dir / f"{dataset}_eda_{name}.png") for name, fig in figures_.items()]


def save_tuning_figures(study: optuna.Study, dataset: str, out_dir: Path | None = None) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs."""
    out_dir = out_dir or config.FIGURES_DIR
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written = []
    plots = [("optimization_history", optuna_plots.plot_optimization_history, 1),
             ("param_importances", optuna_plots.plot_param_importances, 2)]
    for name, plot, min_trials in plots:
        if len(complete) < min_trials:
            continue
        # Optuna's plots switch matplotlib to its own style; keep that inside this figure.
        with plt.rc_context():
            ax = plot(study, target_name="validation macro-F1")
            ax.set_title(f"{ax.get_title(loc='left')} ({viz.dataset_label(dataset)})", loc="left")
            ax.figure.tight_layout()
            written.append(save_and_close(ax.figure, out_dir / f"{dataset}_tuning_{name}.png"))
    return written
