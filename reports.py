"""Reports to tables and figures: rows per run, cells with their statistics, Markdown and CSV
summaries, and every study figure rebuilt from the JSON reports without retraining."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd

import config
import visualization as viz
from atomic_io import atomic_write_text
from data_loading import compute_channel_stats, load_split
from runs import ReportError, best_val_f1, model_path, parse_digits, read_report, report_path
from stats import FAMILY_METHOD, at_chance, chance_band, compare_family, format_estimate, seed_summary, still_improving
from work_queue import is_storage, open_storage, reports_from_storage


def grid_queue_name(dataset: str) -> str:
    """The queue a grid uses when none is named: it follows the dataset ("synthetic-grid")."""
    return f"{dataset}-grid"


DEFAULT_QUEUE_NAME = grid_queue_name("synthetic")  # what worker, status and summary read unless told

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
    if source is not None:
        _check_source(str(source))
    if source is not None and is_storage(source):
        return reports_from_storage(open_storage(str(source)), study_name or DEFAULT_QUEUE_NAME)
    folder = Path(source) if source is not None else config.RUNS_DIR
    return [read_report(path) for path in sorted(folder.glob("*.json"))]


def _check_source(source: str) -> None:
    """A source must exist (a reports folder, a journal or SQLite file; a database URL's server answers for
    itself): a mistyped path is an error rather than an empty table."""
    if "://" in source and not source.startswith(("journal://", "sqlite:///")):
        return
    path = Path(source.removeprefix("journal://").removeprefix("sqlite:///"))
    if is_storage(source):
        config.require(path.is_file(), f"source {source}: no such queue storage file; name an existing journal "
                                       "or database, or a reports folder such as reports/runs")
    else:
        config.require(path.is_dir(), f"source {source} is not a folder of reports; name an existing one "
                                      "(default: reports/runs) or a queue storage")


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
        "corruption_f1": _or_nan(report["robustness"]["mean_f1_macro"]),
        "train_images_per_s": report["train_images_per_s"],
        "inference_images_per_s": report["inference_images_per_s"],
        "params": report["params"], "seconds": sum(report["seconds_per_epoch"]),
        "augment_path": report["augment_path"], "finished_at": report["finished_at"], "report": report,
    }


def run_summary_line(report: dict) -> str:
    """One run in a sentence: test macro-F1 with its interval, its budget, and its flags."""
    ci, flags = report["test_f1_macro_ci"], report["flags"]
    text = (f"{report['run_id']} ({viz.dataset_label(report['dataset'])}; {run_budget(report)}): test macro-F1 "
            f"{format_estimate(report['test']['f1_macro'], ci['low'], ci['high'])}")
    corrupted = report["robustness"]["mean_f1_macro"]
    text += f", under corruptions {corrupted:.3f}" if corrupted is not None else ""
    if flags["at_chance"]:
        text += f" -- AT CHANCE (a random or constant predictor reaches {flags['chance_f1_macro']:.3f})"
    if flags["still_improving"]:
        text += " -- still improving at the last epoch (train longer before reading it as final)"
    return text


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
    """Configuration minus stage, p_aug and seed: the cells of one family share a baseline and form
    one multiple-comparison family (one grid per model and settings, its extra stages included)."""
    cfg = {k: v for k, v in report["config"].items() if k not in CELL_VARYING}
    return json.dumps(cfg, sort_keys=True)


def budget_text(train_images: int, epochs: int, seeds: int) -> str:
    """The training budget as figures and tables show it."""
    return (f"{viz.count_text(train_images, 'train image')}, {viz.count_text(epochs, 'epoch')}, "
            f"{viz.count_text(seeds, 'seed')}")


def family_label(report: dict) -> str:
    """A family's short name: model, preset and budget."""
    cfg = report["config"]
    return (f"{viz.model_label(cfg['model'])}, {cfg['preset']} preset, lr {cfg['lr']:.3g}, "
            f"{viz.count_text(report['sizes']['train'], 'train image')}, {viz.count_text(cfg['epochs'], 'epoch')}")


def summarize(frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per cell (stage, p_aug within a family): seeds, mean, interval, flags, and the verdict
    of the seed-aware comparison with the family's no-augmentation baseline (stats.compare_family).

    Each family (same settings but stage, p_aug and seed) is one multiple-comparison family: Holm runs
    over its tested cells, so a cell's verdict is the same in every table or figure showing it.
    """
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(family=[family_key(r) for r in frame["report"]])
    rows = []
    for _, members in frame.groupby("family", sort=False):
        rows += _family_rows(members, alpha)
    return pd.DataFrame(rows).sort_values(["dataset", "model", "family", "stage", "p_aug"]).reset_index(drop=True)


def _family_rows(members: pd.DataFrame, alpha: float) -> list[dict]:
    """The cells of one family with their verdicts (cells tested on other images are refused)."""
    y_true = same_test_labels(members["report"])
    cells = {key: cell for key, cell in members.groupby(["stage", "p_aug"], sort=False)}
    base = cells.get(("none", 0.0))
    verdicts = {}
    if base is not None:
        compared = {key: _predictions(cell) for key, cell in cells.items() if key[0] != "none"}
        verdicts = compare_family(y_true, _predictions(base), compared, alpha=alpha) if compared else {}
    label = family_label(members.iloc[0]["report"])
    return [_cell_row(cell, verdicts.get(key), y_true, label) for key, cell in cells.items()]


def same_test_labels(reports_: pd.Series) -> list[int]:
    """The test labels shared by these reports; runs tested on other images cannot be compared."""
    labels = {r["test_labels"] for r in reports_}
    if len(labels) != 1:
        ids = ", ".join(r["run_id"] for r in reports_)
        raise ReportError(f"runs {ids} were tested on different test images and cannot be compared; "
                          "retrain them on the same data (same dataset files, n_test and split)")
    return parse_digits(labels.pop())


def _predictions(cell: pd.DataFrame) -> list[list[int]]:
    return [parse_digits(r["test_predictions"]) for r in cell["report"]]


def _cell_row(cell: pd.DataFrame, verdict: dict | None, y_true: list[int], family: str) -> dict:
    first = cell.iloc[0]
    seeds = seed_summary(cell["f1_macro"].to_numpy())
    report = first["report"]
    row = {
        "family": family, "dataset": first["dataset"], "model": first["model"], "preset": first["preset"],
        "train_images": report["sizes"]["train"], "epochs": first["epochs"], "lr": report["config"]["lr"],
        "teacher": first["teacher"], "stage": first["stage"], "p_aug": first["p_aug"], "n_seeds": len(cell),
        "run_ids": list(cell["run_id"]),
        "f1_mean": seeds["mean"], "f1_std": seeds["std"], "ci_low": seeds["ci_low"], "ci_high": seeds["ci_high"],
        "val_f1_mean": float(np.mean([best_val_f1(r) for r in cell["report"]])),
        "corruption_f1": float(cell["corruption_f1"].mean()),
        "at_chance": at_chance(seeds["mean"], y_true),
        "still_improving": any(still_improving([h["val_f1_macro"] for h in r["history"]]) for r in cell["report"]),
    }
    row["corruption_drop"] = row["f1_mean"] - row["corruption_f1"]
    if len(cell) == 1:  # one seed: the interval is the bootstrap over test images
        row["ci_low"], row["ci_high"] = float(first["ci_low"]), float(first["ci_high"])
    # A Student-t interval over two or three seeds can reach past the metric's range [0, 1].
    row["ci_low"], row["ci_high"] = max(row["ci_low"], 0.0), min(row["ci_high"], 1.0)
    row.update(_verdict_columns(verdict))
    return row


def _verdict_columns(verdict: dict | None) -> dict:
    if verdict is None:
        return {"diff": np.nan, "diff_low": np.nan, "diff_high": np.nan, "p_value": np.nan, "p_holm": np.nan,
                "significant": False, "note": "", "family_size": 0}
    return {"diff": verdict["diff"], "diff_low": verdict["low"], "diff_high": verdict["high"],
            "p_value": _or_nan(verdict["p_value"]), "p_holm": _or_nan(verdict["p_holm"]),
            "significant": bool(verdict["significant"]), "note": verdict["reason"] or "",
            "family_size": verdict["family_tested"]}


def _or_nan(value) -> float:
    return np.nan if value is None else float(value)


def conclusion(row) -> str:
    """What one cell's numbers support, in words: flags first, then the verdict."""
    if row["at_chance"]:
        return "at chance: the model did not learn; no effect can be read"
    flags = "still improving at the last epoch; " if row["still_improving"] else ""
    if row["stage"] == "none":
        return flags + "baseline"
    if np.isnan(row["diff"]):
        return flags + "no baseline in its family"
    if row["note"]:
        return flags + f"not tested ({row['note']})"
    if not row["significant"]:
        return flags + "no significant difference from no augmentation"
    return flags + ("significantly better" if row["diff"] > 0 else "significantly worse") + " than no augmentation"


def summary_markdown(table: pd.DataFrame) -> str:
    """The cell table as Markdown: one table per family, headed by the dataset (synthetic results are
    never mistaken for SVHN) and with its multiple-comparison family named under it."""
    if table.empty:
        return "No finished runs.\n"
    lines = []
    for (dataset, family), part in table.groupby(["dataset", "family"], sort=False):
        tested = int(part["family_size"].max())
        lines += [f"### {viz.dataset_label(dataset)}: {family}", "",
                  "| stage | p_aug | seeds | macro-F1 [95% CI] | diff vs no augmentation [95% CI] | p (Holm) "
                  "| corruption F1 (drop) | conclusion |",
                  "|---|---:|---:|---|---|---:|---|---|"]
        lines += [_markdown_row(r) for _, r in part.iterrows()]
        lines += ["", f"Family: Holm over the {tested} tested cell(s) of this table, alpha 0.05; "
                      f"{FAMILY_METHOD}", ""]
    return "\n".join(lines)


def _markdown_row(r) -> str:
    """One cell of the summary; a distilled run names its teacher's model, not its run id."""
    stage = r["stage"] if not isinstance(r["teacher"], str) else f"{r['stage']} (distilled student)"
    diff = "" if np.isnan(r["diff"]) else format_estimate(r["diff"], r["diff_low"], r["diff_high"])
    p_holm = "" if np.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}"
    return (f"| {stage} | {r['p_aug']:g} | {r['n_seeds']} "
            f"| {format_estimate(r['f1_mean'], r['ci_low'], r['ci_high'])} | {diff} | {p_holm} "
            f"| {_corruption_text(r)} | {conclusion(r)} |")


def _corruption_text(r) -> str:
    if np.isnan(r["corruption_f1"]):
        return "not evaluated"
    return f"{r['corruption_f1']:.3f} ({-r['corruption_drop']:+.3f})"


def write_summary(frame: pd.DataFrame | None = None, out_dir: Path | None = None) -> tuple[str, Path]:
    """Print-ready Markdown and a CSV under reports/ (both written atomically). An empty frame is an
    error: an existing summary is never replaced by an empty one."""
    frame = load_reports() if frame is None else frame
    if frame.empty:
        raise ReportError("no finished runs to summarize; the existing summary (if any) is kept")
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
    """The report of the best augmented cell, selected on VALIDATION macro-F1 (mean over seeds; the
    seed with the best validation score), and the baseline's report. The test set never chooses."""
    augmented = cells[cells["stage"] != "none"]
    pool = augmented if not augmented.empty else cells
    best_cell = pool.sort_values("val_f1_mean", ascending=False).iloc[0]
    runs_ = frame[(frame["dataset"] == dataset) & (frame["model"] == model) & frame["teacher"].isna()]
    best = runs_[(runs_["stage"] == best_cell["stage"]) & (runs_["p_aug"] == best_cell["p_aug"])]
    best_report = max(best["report"], key=best_val_f1)
    base = runs_[runs_["stage"] == "none"]
    return best_report, (max(base["report"], key=best_val_f1) if not base.empty else None)


def run_budget(report: dict, seeds: int = 1) -> str:
    return budget_text(report["sizes"]["train"], report["config"]["epochs"], seeds)


# ---------------------------------------------------------------- figures

def save_and_close(fig, path: Path, formats=("png",)) -> list[Path]:
    """Write a figure as PNG (and the vector ``formats`` asked for), atomically, and free it: a study draws
    many figures."""
    written = viz.save_figure(fig, path, formats=formats)
    plt.close(fig)
    return written


def verdict_kind(row) -> str:
    """A cell's verdict against no augmentation as a key of visualization.VERDICT_STYLES (flags first)."""
    if row["stage"] == "none":
        return "baseline"
    if row["at_chance"]:
        return "at chance"
    if np.isnan(row["diff"]) or row["note"]:
        return "not tested"
    if not row["significant"]:
        return "no difference"
    return "better" if row["diff"] > 0 else "worse"


def cell_runs(frame: pd.DataFrame, cell) -> pd.DataFrame:
    """The runs (rows of ``frame``) of one summarize() cell, one per seed."""
    return frame[frame["run_id"].isin(cell["run_ids"])]


def cells_budget(cells: pd.DataFrame) -> str:
    """The budget of a family's cells; the seeds as a range when the cells have different numbers."""
    first, seeds = cells.iloc[0], cells["n_seeds"].astype(int)
    text = budget_text(int(first["train_images"]), int(first["epochs"]), int(seeds.max()))
    if seeds.min() != seeds.max():
        text = text.replace(viz.count_text(int(seeds.max()), "seed"),
                            f"{seeds.min()}-{seeds.max()} seeds per cell")
    return text


def family_slug(frame: pd.DataFrame, cells: pd.DataFrame) -> str:
    """A file-name part naming a family: model, preset, train size, epochs and a short hash of its settings
    (two families never share it, so their figures never overwrite each other)."""
    first = cells.iloc[0]
    report = cell_runs(frame, first)["report"].iloc[0]
    digest = hashlib.sha1(family_key(report).encode()).hexdigest()[:6]
    return (f"{first['model']}-{first['preset']}-{int(first['train_images'])}img-{int(first['epochs'])}ep-"
            f"{digest}")


def ordered_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The baseline first, then the stages in the study's order, each by p_aug."""
    order = {stage: i for i, stage in enumerate(("none", *config.ALL_STAGES))}
    return cells.assign(_order=cells["stage"].map(order).fillna(len(order))).sort_values(
        ["_order", "stage", "p_aug"]).drop(columns="_order")


def forest_rows(frame: pd.DataFrame, cells: pd.DataFrame) -> list[dict]:
    """visualization.plot_forest's rows for a family: the baseline's seeds around 0, then each cell's
    difference, interval, verdict and seeds (each seed's score minus the baseline's mean)."""
    base = cells[cells["stage"] == "none"]
    base_mean = float(base["f1_mean"].iloc[0]) if not base.empty else np.nan
    rows = []
    for _, cell in ordered_cells(cells).iterrows():
        seeds = cell_runs(frame, cell)["f1_macro"].to_numpy(dtype=float) - base_mean
        label = f"no augmentation (macro-F1 {base_mean:.3f})" if cell["stage"] == "none" else cell_label(cell)
        rows.append({"label": label, "diff": 0.0 if cell["stage"] == "none" else cell["diff"],
                     "low": cell["diff_low"], "high": cell["diff_high"], "verdict": verdict_kind(cell),
                     "seed_diffs": seeds})
    return rows


def difference_tables(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """stage x p_aug tables of the augmented cells (p_aug > 0): diff, low, high, verdict, n_seeds."""
    augmented = cells[(cells["stage"] != "none") & (cells["p_aug"] > 0)]
    augmented = augmented.assign(verdict=[verdict_kind(r) for _, r in augmented.iterrows()])
    stages = [s for s in ordered_cells(augmented)["stage"].unique()]
    return {name: augmented.pivot_table(index="stage", columns="p_aug", values=column, aggfunc="first",
                                        dropna=False).reindex(stages).sort_index(axis=1)
            for name, column in (("diff", "diff"), ("low", "diff_low"), ("high", "diff_high"),
                                 ("verdict", "verdict"), ("n_seeds", "n_seeds"))}


def val_f1_curves(frame: pd.DataFrame, cell) -> np.ndarray:
    """(seeds, epochs) validation macro-F1 of a cell's runs per epoch (NaN after a run that stopped early)."""
    histories = [[h["val_f1_macro"] for h in r["history"]] for r in cell_runs(frame, cell)["report"]]
    curves = np.full((len(histories), max(map(len, histories))), np.nan)
    for i, values in enumerate(histories):
        curves[i, : len(values)] = values
    return curves


def robustness_drops(groups: Mapping[str, Sequence[dict]]) -> pd.DataFrame:
    """Per group of runs (e.g. a cell's seeds) and corruption kind (and their mean), the drop from clean to
    corrupted test macro-F1: mean over the runs with a Student-t interval over them (NaN bounds for one run).
    Groups evaluated without corruptions are left out."""
    rows = []
    for label, reports_ in groups.items():
        if not reports_[0]["robustness"]["severities"]:
            continue
        per_kind = {kind: [r["test"]["f1_macro"] - r["robustness"]["f1_macro"][kind] for r in reports_]
                    for kind in reports_[0]["robustness"]["f1_macro"]}
        per_kind["mean over kinds"] = [r["test"]["f1_macro"] - r["robustness"]["mean_f1_macro"] for r in reports_]
        for kind, drops in per_kind.items():
            summary = seed_summary(drops)
            single = summary["single_run"]
            rows.append({"run": label, "kind": kind, "drop": summary["mean"], "n_seeds": summary["n"],
                         "low": np.nan if single else summary["ci_low"],
                         "high": np.nan if single else summary["ci_high"]})
    return pd.DataFrame(rows)


def cell_groups(frame: pd.DataFrame, cells: pd.DataFrame) -> dict[str, list[dict]]:
    """{cell label: the reports of its seeds}, the baseline first, then the stages in the study's order."""
    return {cell_label(cell): list(cell_runs(frame, cell)["report"]) for _, cell in ordered_cells(cells).iterrows()}


def best_and_baseline(frame: pd.DataFrame, cells: pd.DataFrame):
    """The augmented cell with the best mean VALIDATION macro-F1 (the test set never chooses) and the
    baseline cell (None without one)."""
    augmented = cells[cells["stage"] != "none"]
    best = augmented.loc[augmented["val_f1_mean"].idxmax()] if not augmented.empty else None
    base = cells[cells["stage"] == "none"]
    return best, (base.iloc[0] if not base.empty else None)


def cell_label(cell) -> str:
    return "no augmentation" if cell["stage"] == "none" else f"{cell['stage']}, p_aug {cell['p_aug']:g}"


def _family_text(cells: pd.DataFrame) -> tuple[str, str, str]:
    """(model's display name, budget line naming the family, note naming the family's test) of a figure."""
    first = cells.iloc[0]
    name = viz.model_label(first["model"])
    budget = f"{name}, {first['preset']} preset, lr {first['lr']:.3g}; {cells_budget(cells)}"
    tested = int(cells["family_size"].max())
    note = (f"seed-aware test, Holm over {viz.count_text(tested, 'tested cell')}" if tested
            else "no cell is tested (one seed, or no baseline)")
    return name, budget, note


def forest_figure(frame: pd.DataFrame, cells: pd.DataFrame, title: str | None = None):
    """The forest plot of these cells of one family (the baseline among them)."""
    name, budget, note = _family_text(cells)
    return viz.plot_forest(forest_rows(frame, cells), cells["dataset"].iloc[0], budget=budget,
                           title=title or f"{name}: difference from no augmentation per cell ({note})")


def difference_figure(cells: pd.DataFrame, title: str | None = None):
    """The stage x p_aug heatmap of differences from no augmentation (None without augmented cells)."""
    tables = difference_tables(cells)
    if tables["diff"].empty:
        return None
    name, budget, note = _family_text(cells)
    return viz.plot_difference_heatmap(tables["diff"], tables["verdict"], tables["n_seeds"], cells["dataset"].iloc[0],
                                       budget=budget, low=tables["low"], high=tables["high"], note=note,
                                       title=title or f"{name}: difference from no augmentation, stage × p_aug")


def effect_figure(frame: pd.DataFrame, cells: pd.DataFrame, title: str | None = None):
    """Each augmented cell's difference from the baseline in validation macro-F1 after every epoch."""
    name, budget, _ = _family_text(cells)
    _, base = best_and_baseline(frame, cells)
    augmented = {(c["stage"], c["p_aug"]): c for _, c in ordered_cells(cells[cells["stage"] != "none"]).iterrows()}
    return viz.plot_effect_vs_budget(
        val_f1_curves(frame, base), {key: val_f1_curves(frame, c) for key, c in augmented.items()},
        cells["dataset"].iloc[0], budget=budget, verdicts={key: verdict_kind(c) for key, c in augmented.items()},
        title=title or f"{name}: difference from no augmentation in validation macro-F1 per epoch "
                       "(band: range of seeds)")


def drops_figure(frame: pd.DataFrame, cells: pd.DataFrame, title: str | None = None):
    """Each cell's drop in macro-F1 under corruptions (None when the runs were not scored on corruptions)."""
    drops = robustness_drops(cell_groups(frame, cells))
    if drops.empty:
        return None
    name, budget, _ = _family_text(cells)
    severities = cell_runs(frame, cells.iloc[0])["report"].iloc[0]["robustness"]["severities"]
    return viz.plot_robustness_drops(drops, cells["dataset"].iloc[0], severities, budget=budget,
                                     title=title or f"{name}: drop in macro-F1 under corruptions")


def best_cell_figures(frame: pd.DataFrame, cells: pd.DataFrame) -> dict[str, object]:
    """The best augmented cell (on validation) against the baseline: per-class F1 and learning curves of
    every seed of both, and the confusion matrix of the cell's best seed (on validation)."""
    name, budget, _ = _family_text(cells)
    dataset = cells["dataset"].iloc[0]
    best, base = best_and_baseline(frame, cells)
    pair = {f"{cell_label(best)} (best on validation)": best, cell_label(base): base}
    pair_runs = {label: list(cell_runs(frame, cell)["report"]) for label, cell in pair.items()}
    chance = chance_band(parse_digits(pair_runs[cell_label(base)][0]["test_labels"]))
    best_seed = max(pair_runs[next(iter(pair))], key=best_val_f1)
    return {
        "per_class_f1": viz.plot_per_class_f1(
            {label: [r["test"]["f1_per_class"] for r in runs_] for label, runs_ in pair_runs.items()}, dataset,
            budget=budget, chance=chance, title=f"{name}: per-class F1, best cell and no augmentation"),
        "learning_curves": viz.plot_learning_curves(
            {label: [r["history"] for r in runs_] for label, runs_ in pair_runs.items()}, dataset, budget=budget,
            chance=chance, title=f"{name}: learning curves, best cell and no augmentation (every seed)"),
        "confusion_best": viz.plot_confusion_matrix(
            best_seed["test"]["confusion_matrix"], dataset, budget=run_budget(best_seed),
            title=f"{name}, {cell_label(best)}, seed {best_seed['config']['seed']} (best on validation): "
                  "confusion matrix (test)"),
    }


def family_figures(frame: pd.DataFrame, cells: pd.DataFrame) -> dict[str, object]:
    """The main figures of one family (cells sharing a baseline): {name: Figure}. The forest plot, the
    difference heatmap, the effect per epoch, the robustness drops, and the best cell (on validation)
    against the baseline: per-class F1, learning curves and the confusion matrix of its best seed."""
    figures_ = {"forest": forest_figure(frame, cells), "difference_heatmap": difference_figure(cells),
                "effect_vs_budget": effect_figure(frame, cells), "robustness_drops": drops_figure(frame, cells),
                **best_cell_figures(frame, cells)}
    return {name: fig for name, fig in figures_.items() if fig is not None}


def families(cells: pd.DataFrame) -> list[pd.DataFrame]:
    """The families that have figures: no distilled students, a baseline and at least one augmented cell."""
    trained = cells[cells["teacher"].isna()]
    return [part for _, part in trained.groupby("family", sort=False)
            if (part["stage"] == "none").any() and (part["stage"] != "none").any()]


def figures(frame: pd.DataFrame | None = None, out_dir: Path | None = None, formats=("png",)) -> list[Path]:
    """Every study figure, rebuilt from the reports (no training), under reports/figures/ as
    <dataset>_<family>_<figure>.png (and the vector ``formats`` asked for, "pdf" and/or "svg")."""
    frame = load_reports() if frame is None else frame
    out_dir = out_dir or config.FIGURES_DIR
    formats = viz.check_formats(formats)
    if frame.empty:
        return []
    written = []
    for cells in families(summarize(frame)):
        prefix = f"{cells['dataset'].iloc[0]}_{family_slug(frame, cells)}"
        for name, fig in family_figures(frame, cells).items():
            written += save_and_close(fig, out_dir / f"{prefix}_{name}.png", formats)
    distillation = config.REPORTS_DIR / "distillation.json"
    if distillation.exists():
        written += _distillation_figure(json.loads(distillation.read_text()), out_dir, formats)
    return written


# The gallery's figure per family (the README shows one thumbnail of each main figure).
GALLERY_FIGURES = ("forest", "difference_heatmap", "effect_vs_budget", "robustness_drops", "per_class_f1",
                   "learning_curves")


def gallery(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Small PNGs of the main figures of the family with the most cells, for the README, each stamped with
    what data it shows (synthetic data is never mistaken for SVHN)."""
    config.require(not frame.empty, "no finished runs to draw; run `make demo` first")
    candidates = families(summarize(frame))
    config.require(bool(candidates), "no family with a baseline and an augmented cell; run `make demo` first")
    cells = max(candidates, key=len)
    dataset = cells["dataset"].iloc[0]
    stamp = "SYNTHETIC DATA" if dataset == "synthetic" else "SVHN"
    written = []
    for name, fig in family_figures(frame, cells).items():
        if name in GALLERY_FIGURES:
            written.append(viz.save_thumbnail(fig, out_dir / f"{name}.png", stamp=stamp))
        plt.close(fig)
    return written


def _distillation_figure(table: dict, out_dir: Path, formats) -> list[Path]:
    teacher = read_report(report_path(table["rows"][0]["run_id"]))
    fig = viz.plot_distillation_comparison(table["rows"], dataset=table["dataset"], budget=run_budget(teacher),
                                           chance=chance_band(parse_digits(teacher["test_labels"])))
    return save_and_close(fig, out_dir / f"{table['dataset']}_distillation.png", formats)


def eda_figures(dataset: str = "synthetic", out_dir: Path | None = None, formats=("png",)) -> list[Path]:
    """The EDA figures of the train split: class balance, samples per class, channel histograms, image
    statistics, mean images, and the stage gallery on 8 train images (the channel correlation and
    normalization statistics are tables: the EDA notebook prints them)."""
    out_dir = out_dir or config.FIGURES_DIR
    formats = viz.check_formats(formats)
    train_x, train_y = load_split(dataset, "train")
    _, test_y = load_split(dataset, "test")
    mean, std = compute_channel_stats(train_x)
    figures_ = {
        "class_balance": lambda: viz.plot_class_balance(train_y, test_y, dataset),
        "samples_per_class": lambda: viz.plot_samples_per_class(train_x, train_y, dataset),
        "channel_histograms": lambda: viz.plot_channel_histograms(train_x, dataset),
        "image_statistics": lambda: viz.plot_image_statistics(train_x, dataset),
        "mean_images": lambda: viz.plot_mean_images(train_x, train_y, dataset),
        "stage_gallery": lambda: viz.plot_stage_gallery(train_x[:8], list(config.STAGES[1:]), mean, std, dataset),
    }
    return [path for name, draw in figures_.items()
            for path in save_and_close(draw(), out_dir / f"{dataset}_eda_{name}.png", formats)]


def save_tuning_figures(study: optuna.Study, dataset: str, out_dir: Path | None = None) -> list[Path]:
    """The tuning history and the parameter importances (from 2 finished trials on) as PNGs."""
    out_dir = out_dir or config.FIGURES_DIR
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    values = [t.value for t in complete]
    written = save_and_close(viz.plot_tuning_history(values, dataset),
                             out_dir / f"{dataset}_tuning_optimization_history.png")
    if len(complete) >= 2:  # Optuna's importance estimate needs two finished trials
        with warnings.catch_warnings():  # with few trials it warns that all importances are equal; the
            warnings.simplefilter("ignore", UserWarning)  # figure itself says when trials are too few
            importances = optuna.importance.get_param_importances(study)
        written += save_and_close(viz.plot_param_importances(importances, len(complete), dataset),
                                  out_dir / f"{dataset}_tuning_param_importances.png")
    return written
