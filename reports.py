"""Reports to tables and figures: rows per run, cells with their statistics, Markdown and CSV
summaries, and every study figure rebuilt from the JSON reports without retraining."""

from __future__ import annotations

import hashlib
import json
import sys
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
from config import DEFAULT_QUEUE_NAME, TrainConfig
from data_loading import compute_channel_stats, load_split
from report_schema import POSITIVE, UNIT, ReportError, check_report
from runs import best_val_f1, model_path, parse_digits, read_report, report_path
from stats import (
    IMAGES_ONLY,
    MODERATED_METHOD,
    SEEDS_AND_IMAGES,
    at_chance,
    cell_estimate,
    chance_band,
    compare_family,
    format_estimate,
    seed_summary,
    still_improving,
)
from work_queue import is_storage, mask_password, open_storage, queue_plans, reports_from_storage

ROW_COLUMNS = [
    "run_id", "dataset", "model", "stage", "p_aug", "seed", "preset", "epochs", "teacher",
    "f1_macro", "ci_low", "ci_high", "accuracy", "corruption_f1", "train_images_per_s",
    "inference_images_per_s", "params", "seconds", "augment_path", "finished_at", "report",
]
# What varies between the cells of one grid; every other setting defines the grid's family.
CELL_VARYING = ("stage", "p_aug", "seed")
# Settings that change how a run is computed, not the experiment: one family whatever their values.
HOW_COMPUTED = ("loader", "compile", "num_workers")
# The report field listing the declared plans a run belongs to (pipeline.declare_plan).
PLANS_FIELD = "plans"
OUTSIDE_PLAN_NOTE = "outside any declared plan: interval only, no verdict"


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
    """The sound reports of the source; each one that fails its checks (``report_schema``) is left out
    with one line on stderr naming its file (or queue cell) and the field, so one bad report, received or
    damaged, does not hide every other run."""
    if source is not None:
        _check_source(str(source))
    if source is not None and is_storage(source):
        queue, storage = study_name or DEFAULT_QUEUE_NAME, open_storage(str(source))
        plans = queue_plans(storage, queue)
        found = [(f"{mask_password(str(source))} (queue {queue}, cell {_cell_name(r)})",
                  lambda r=r: _with_plans([r], plans)[0]) for r in reports_from_storage(storage, queue)]
    else:
        folder = Path(source) if source is not None else config.RUNS_DIR
        found = [(path, lambda path=path: read_report(path)) for path in sorted(folder.glob("*.json"))]
    sound = []
    for where, read in found:
        try:
            report = check_report(read(), where)
            report_plans(report)  # a damaged plans field leaves the report out too
            sound.append(report)
        except ReportError as err:
            print(f"warning: left out {err}", file=sys.stderr)
    return sound


def _cell_name(report) -> str:
    run_id = report.get("run_id") if isinstance(report, dict) else None
    return run_id if config.safe_name_problem(run_id) is None else "?"


def _with_plans(reports_: list[dict], plans: list[dict]) -> list[dict]:
    """Reports stored in a queue with the plans the queue declares (a queue keeps each report as its cell
    finished, before its plan was complete)."""
    for report in reports_:
        known = {plan["id"] for plan in report_plans(report)}
        extra = [plan for plan in plans if report["run_id"] in plan["run_ids"] and plan["id"] not in known]
        report[PLANS_FIELD] = report_plans(report) + extra
    return reports_


def _check_source(source: str) -> None:
    """A source must exist (a reports folder, a journal or SQLite file; a database URL's server answers for
    itself): a mistyped path is an error rather than an empty table."""
    if "://" in source and not source.startswith(("journal://", "sqlite:///")):
        return
    path = Path(source.removeprefix("journal://").removeprefix("sqlite:///"))
    source = mask_password(source)  # the text is shown in the error below
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
    """One run in a sentence: test macro-F1 with its interval (over test images only: one seed), its budget,
    and its flags."""
    ci, flags = report["test_f1_macro_ci"], report["flags"]
    text = (f"{report['run_id']} ({viz.dataset_label(report['dataset'])}; {run_budget(report)}): test macro-F1 "
            f"{format_estimate(report['test']['f1_macro'], ci['low'], ci['high'])} (test images only)")
    corrupted = report["robustness"]["mean_f1_macro"]
    text += f", under corruptions {corrupted:.3f}" if corrupted is not None else ""
    if flags["at_chance"]:
        text += (" -- NOT DISTINGUISHABLE FROM CHANCE (its interval reaches the band a random or constant "
                 f"predictor reaches, {flags['chance_f1_macro']:.3f})")
    if flags["still_improving"]:
        text += " -- still improving over the last epochs (train longer before reading it as final)"
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
    """The settings that change a run's result (``TrainConfig.identity``) minus stage, p_aug and seed, and
    minus how it was computed (loader, compile, DataLoader workers): runs that share it belong to one grid
    of one model and settings, the same experiment."""
    identity = TrainConfig(**report["config"]).identity()
    return json.dumps({k: v for k, v in identity.items() if k not in CELL_VARYING + HOW_COMPUTED}, sort_keys=True)


def report_plans(report: dict) -> list[dict]:
    """The declared plans (one model's family each) a run belongs to: written to it by the grid that ran
    or reused it. A report is input: a plan that is not what `pipeline.declare_plan` writes is refused."""
    plans = report.get(PLANS_FIELD, [])
    if not isinstance(plans, list) or not all(_is_plan(plan) for plan in plans):
        raise ReportError(f"report {report.get('run_id')!r}: its {PLANS_FIELD!r} field is not a list of declared "
                          "plans; rerun the grid that made it, or delete the field (the run then counts as outside "
                          "any plan)")
    return plans


def _is_plan(plan) -> bool:
    lists = ("cells", "first_seeds", "run_ids")
    return (isinstance(plan, dict) and isinstance(plan.get("id"), str) and all(isinstance(plan.get(k), list)
                                                                                 for k in lists)
            and (plan.get("top_up") is None or isinstance(plan["top_up"], dict)))


def complete_plans(frame: pd.DataFrame) -> dict[str, dict]:
    """The plans declared in these reports whose every run is among them, by plan id (a plan with runs
    missing here cannot give its declared verdicts, so its runs count as outside any plan)."""
    present = set(frame["run_id"])
    plans = {plan["id"]: plan for report in frame["report"] for plan in report_plans(report)}
    return {plan_id: plan for plan_id, plan in plans.items() if set(plan["run_ids"]) <= present}


def plan_cells(table: pd.DataFrame, family: list[dict]) -> pd.DataFrame:
    """The summarize() rows of the declared family whose runs are ``family`` (the reports one
    ``pipeline.grid`` call returned for one model)."""
    ids = {report["run_id"] for report in family}
    plans = [plan["id"] for report in family for plan in report_plans(report) if set(plan["run_ids"]) == ids]
    config.require(bool(plans), "these runs are not the runs of one declared plan: pass the reports that one "
                                "pipeline.grid call returned for one model")
    return table[table["plan"] == plans[0]]


def budget_text(train_images: int, epochs: int, seeds: int) -> str:
    """The training budget as figures and tables show it."""
    return (f"{viz.count_text(train_images, 'train image')}, {viz.count_text(epochs, 'epoch')}, "
            f"{viz.count_text(seeds, 'seed')}")


def family_label(report: dict) -> str:
    """A family's short name: model, preset and budget."""
    cfg = report["config"]
    return (f"{viz.model_label(cfg['model'])}, {cfg['preset']} preset, lr {cfg['lr']:.3g}, "
            f"{viz.count_text(report['sizes']['train'], 'train image')}, {viz.count_text(cfg['epochs'], 'epoch')}")


def plan_label(plan: dict) -> str:
    """What a declared plan ran, for a table's heading: its cells and its seeds."""
    stages = sorted({stage for stage, _ in plan["cells"] if stage != "none"})
    p_augs = sorted({p_aug for _, p_aug in plan["cells"]})
    return (f"plan {plan['id']}: {len(stages)} stage(s) x p_aug {', '.join(f'{p:g}' for p in p_augs)}, "
            f"seeds {', '.join(map(str, plan['first_seeds']))}{_top_up_text(plan)}")


def _top_up_text(plan: dict) -> str:
    top_up = plan["top_up"]
    if top_up is None:
        return ", no seed top-up"
    return (f", topped up to detect {top_up['min_effect']:+g} macro-F1 (cap {top_up['seeds_max']} seeds: "
            f"{top_up['added']} seed(s) added)")


def summarize(frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per cell (stage, p_aug within a family): seeds, mean, interval, flags, and the verdict
    of the seed-aware comparison with the family's no-augmentation baseline (stats.compare_family).

    A family is declared by the plan that made its runs (a grid's models x stages x p_augs and its
    settings, written into each of its reports, see ``pipeline.grid``): Holm runs over its tested cells
    and nothing else, so adding runs of another plan to the folder never changes its verdicts. A run in
    several plans (a shared baseline) shows in each plan's table. Runs outside any plan whose runs are
    all in ``frame`` are grouped by ``family_key`` and shown with intervals and no verdict.
    """
    if frame.empty:
        return pd.DataFrame()
    plans = complete_plans(frame)
    rows = []
    for plan in plans.values():
        members = frame[frame["run_id"].isin(plan["run_ids"])]
        label = f"{family_label(members.iloc[0]['report'])}; {plan_label(plan)}"
        rows += [row | {"plan": plan["id"]} for row in _family_rows(members, alpha, label, tested=True)]
    covered = {run for plan in plans.values() for run in plan["run_ids"]}
    outside = frame[~frame["run_id"].isin(covered)]
    outside = outside.assign(family=[family_key(r) for r in outside["report"]])
    for _, members in outside.groupby("family", sort=False):
        label = f"{family_label(members.iloc[0]['report'])}; runs outside any declared plan"
        rows += [row | {"plan": ""} for row in _family_rows(members, alpha, label, tested=False)]
    return pd.DataFrame(rows).sort_values(["dataset", "model", "family", "stage", "p_aug"]).reset_index(drop=True)


def _family_rows(members: pd.DataFrame, alpha: float, label: str, *, tested: bool) -> list[dict]:
    """The cells of one family, with their verdicts when ``tested`` (cells tested on other images are
    refused)."""
    y_true = same_test_labels(members["report"])
    cells = {key: cell for key, cell in members.groupby(["stage", "p_aug"], sort=False)}
    base = cells.get(("none", 0.0))
    verdicts = {}
    if tested and base is not None:
        compared = {key: _predictions(cell) for key, cell in cells.items() if key[0] != "none"}
        verdicts = compare_family(y_true, _predictions(base), compared, alpha=alpha) if compared else {}
    rows = [_cell_row(cell, verdicts.get(key), y_true, label) for key, cell in cells.items()]
    return rows if tested else [row | {"note": OUTSIDE_PLAN_NOTE} for row in rows]


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
        "f1_mean": seeds["mean"], "f1_std": seeds["std"],
        "val_f1_mean": float(np.mean([best_val_f1(r) for r in cell["report"]])),
        "corruption_f1": float(cell["corruption_f1"].mean()),
        "still_improving": any(still_improving([h["val_f1_macro"] for h in r["history"]],
                                               lrs=[h["lr"] for h in r["history"]]) for r in cell["report"]),
    }
    row["corruption_drop"] = row["f1_mean"] - row["corruption_f1"]
    row["drop_low"], row["drop_high"] = _drop_interval((cell["f1_macro"] - cell["corruption_f1"]).to_numpy())
    if len(cell) == 1:  # one seed: the run's bootstrap over test images, which knows nothing of seed noise
        row |= {"ci_low": float(first["ci_low"]), "ci_high": float(first["ci_high"]), "ci_kind": IMAGES_ONLY}
    else:  # seeds and the shared test set's own luck (stats.cell_estimate)
        estimate = cell_estimate(y_true, _predictions(cell))
        row |= {"ci_low": estimate["low"], "ci_high": estimate["high"], "ci_kind": SEEDS_AND_IMAGES}
    # A Student-t interval over two or three seeds can reach past the metric's range [0, 1].
    row["ci_low"], row["ci_high"] = max(row["ci_low"], 0.0), min(row["ci_high"], 1.0)
    # Judged on the interval: a cell whose interval reaches the chance band may have learned nothing.
    row["at_chance"] = at_chance(seeds["mean"], y_true, low=row["ci_low"])
    row.update(_verdict_columns(verdict))
    return row


def _drop_interval(drops: np.ndarray) -> tuple[float, float]:
    """Interval of a cell's mean drop under corruptions from its seeds' drops (each measured on the same
    images as its clean score), as for the cell's macro-F1; NaN with one seed or no corruption scores."""
    if drops.size < 2 or np.isnan(drops).any():
        return np.nan, np.nan
    summary = seed_summary(drops)
    return summary["ci_low"], summary["ci_high"]


def _verdict_columns(verdict: dict | None) -> dict:
    if verdict is None:
        return {"diff": np.nan, "diff_low": np.nan, "diff_high": np.nan, "p_value": np.nan, "p_holm": np.nan,
                "significant": False, "note": "", "family_size": 0, "test_method": "", "test_df": np.nan,
                "outliers": "", "shared_prior": False}
    return {"diff": verdict["diff"], "diff_low": verdict["low"], "diff_high": verdict["high"],
            "p_value": _or_nan(verdict["p_value"]), "p_holm": _or_nan(verdict["p_holm"]),
            "significant": bool(verdict["significant"]), "note": verdict["reason"] or "",
            "family_size": verdict["family_tested"], "test_method": verdict["method"] or "",
            "test_df": _or_nan(verdict["df"]), "outliers": "; ".join(verdict["outliers"]),
            "shared_prior": bool(verdict["shared_prior"])}


def _or_nan(value) -> float:
    return np.nan if value is None else float(value)


def conclusion(row) -> str:
    """What one cell's numbers support, in words: flags first, then the verdict."""
    if row["at_chance"]:
        return "not distinguishable from chance (its interval reaches the chance band): no effect can be read"
    flags = "still improving over the last epochs; " if row["still_improving"] else ""
    if row["note"] == OUTSIDE_PLAN_NOTE:
        return flags + OUTSIDE_PLAN_NOTE
    if row["stage"] == "none":
        return flags + "baseline"
    if np.isnan(row["diff"]):
        return flags + "no baseline in its family"
    if row["note"]:
        return flags + f"no verdict ({row['note']})"
    if not row["significant"]:
        return flags + "no significant difference from no augmentation"
    return flags + ("significantly better" if row["diff"] > 0 else "significantly worse") + " than no augmentation"


def summary_markdown(table: pd.DataFrame) -> str:
    """The cell table as Markdown: one table per family, headed by the dataset (synthetic results are
    never mistaken for SVHN), with what its intervals hold and how its cells were tested under it."""
    if table.empty:
        return "No finished runs.\n"
    lines = []
    for (dataset, family), part in table.groupby(["dataset", "family"], sort=False):
        lines += [f"### {viz.dataset_label(dataset)}: {family}", "",
                  "| stage | p_aug | seeds | macro-F1 [95% interval] | diff vs no augmentation [95% CI] | p (Holm) "
                  "| test (df) | corruption F1 (change [95% CI]) | conclusion |",
                  "|---|---:|---:|---|---|---:|---|---|---|"]
        lines += [_markdown_row(r) for _, r in part.iterrows()]
        lines += ["", " ".join(family_footer(part)), ""]
    return "\n".join(lines)


def family_footer(part: pd.DataFrame) -> list[str]:
    """What one family's table holds, in words: the kinds of interval, which family its verdicts were
    tested in (its declared plan, some of whose cells a filtered table may not show) and how."""
    kinds = set(part["ci_kind"])
    lines = []
    if SEEDS_AND_IMAGES in kinds:
        lines.append("Intervals of cells with 2+ seeds: mean over seeds, Student t with both the spread between "
                     "seeds and the test set's own luck (delta method).")
    if IMAGES_ONLY in kinds:
        lines.append("Intervals marked (images only): one seed, so a bootstrap over test images that ignores "
                     "seed noise; such a cell gets no verdict.")
    if not part["plan"].iloc[0]:
        lines.append("Not a declared family: these runs were made outside any grid, or the plan that made them "
                     "has runs missing here, so no cell is tested; each macro-F1 carries its interval only.")
        return lines
    tested = int(part["family_size"].max())
    if tested == 0:
        lines.append("No cell is tested: a verdict needs at least 2 seeds in the cell and in its baseline.")
        return lines
    shown = int(part["p_value"].notna().sum())
    where = "of this table" if shown == tested else f"of its declared family, {shown} of them shown here"
    lines.append(f"Verdicts: Holm over the {tested} tested cell(s) {where}, alpha 0.05; test-image noise "
                 "counts in every standard error.")
    if not part.loc[part["p_value"].notna(), "shared_prior"].any():
        lines.append("Seed spread differs too much across this family (or it has too few cells) to share: each "
                     "cell is compared with its own seeds' spread and the smaller group's degrees of freedom "
                     "(Welch-style); with 3 seeds that finds only large differences, so 'no significant "
                     "difference' here asks for more seeds, not for a conclusion.")
        return lines
    lines.append("Each cell's seed spread is moderated towards the spread typical of this family, never below "
                 "its own (moderated t): that gives 3-seed cells a usable test.")
    outliers = sorted({name for names in part["outliers"] for name in names.split("; ") if name})
    if outliers:
        lines.append(f"Spread far wider than the rest, so kept as measured and compared Welch-style with its own "
                     f"degrees of freedom: {', '.join(outliers)}.")
    return lines


def _markdown_row(r) -> str:
    """One cell of the summary; a distilled run names its teacher's model, not its run id."""
    stage = r["stage"] if not isinstance(r["teacher"], str) else f"{r['stage']} (distilled student)"
    diff = "" if np.isnan(r["diff"]) else format_estimate(r["diff"], r["diff_low"], r["diff_high"])
    p_holm = "" if np.isnan(r["p_holm"]) else f"{r['p_holm']:.3g}"
    test = "" if np.isnan(r["test_df"]) else f"{_short_method(r['test_method'])} ({r['test_df']:.0f})"
    interval = format_estimate(r["f1_mean"], r["ci_low"], r["ci_high"])
    interval += " (images only)" if r["ci_kind"] == IMAGES_ONLY else ""
    return (f"| {stage} | {r['p_aug']:g} | {r['n_seeds']} | {interval} | {diff} | {p_holm} | {test} "
            f"| {_corruption_text(r)} | {conclusion(r)} |")


def _short_method(method: str) -> str:
    return "moderated t" if method == MODERATED_METHOD else "Welch-style"


def _corruption_text(r) -> str:
    if np.isnan(r["corruption_f1"]):
        return "not evaluated"
    change = -r["corruption_drop"]
    if np.isnan(r["drop_low"]):
        return f"{r['corruption_f1']:.3f} ({change:+.3f}, one seed: no interval)"
    return f"{r['corruption_f1']:.3f} ({format_estimate(change, -r['drop_high'], -r['drop_low'])})"


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
    """The cells of one model's grid: the declared family with a no-augmentation baseline and the most
    cells, so tuned or distilled runs and runs outside any plan stay off its heatmap."""
    planned = cells[cells["plan"] != ""]
    pool = planned if not planned.empty else cells
    with_baseline = pool[pool["family"].isin(pool.loc[pool["stage"] == "none", "family"])]
    pool = with_baseline if not with_baseline.empty else pool
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


def best_runs(frame: pd.DataFrame, cells: pd.DataFrame) -> tuple[dict, dict | None]:
    """Within one family (``cells``: summarize() rows of one family; ``frame``: load_reports() rows holding
    their runs): the report of the best augmented cell, selected on VALIDATION macro-F1 (mean over seeds;
    the seed with the best validation score), and the baseline's report. The test set never chooses, and a
    cell not distinguishable from chance is never named best (unless every cell is)."""
    families = cells["family"].unique()
    config.require(len(families) == 1, f"best_runs compares within one family, got {len(families)}: pass the rows "
                                       "of one family, e.g. reports.grid_family(table)")
    augmented = cells[(cells["stage"] != "none") & ~cells["at_chance"].astype(bool)]
    pool = augmented if not augmented.empty else cells
    best_cell = pool.sort_values("val_f1_mean", ascending=False).iloc[0]
    by_id = frame.set_index("run_id")["report"]
    best_report = max((by_id[run] for run in best_cell["run_ids"]), key=best_val_f1)
    base = cells[cells["stage"] == "none"]
    if base.empty:
        return best_report, None
    return best_report, max((by_id[run] for run in base.iloc[0]["run_ids"]), key=best_val_f1)


def run_budget(report: dict, seeds: int = 1) -> str:
    return budget_text(report["sizes"]["train"], report["config"]["epochs"], seeds)


# ---------------------------------------------------------------- figures

def save_and_close(fig, path: Path, formats=("png",)) -> list[Path]:
    """Write a figure as PNG (and the vector ``formats`` asked for), atomically, and free it: a study draws
    many figures."""
    written = viz.save_figure(fig, path, formats=formats)
    plt.close(fig)
    return written


def figure_path(out_dir: Path, name: str) -> Path:
    """``out_dir/name`` for a file name built from report fields: a name that is not one safe file name,
    or that would lead out of ``out_dir``, is a ConfigError before anything is drawn or written."""
    return config.inside(out_dir, out_dir / config.check_name("figure file name", name))


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
    """The augmented cell with the best mean VALIDATION macro-F1 (the test set never chooses; a cell not
    distinguishable from chance only when every cell is) and the baseline cell (None without one)."""
    augmented = cells[cells["stage"] != "none"]
    readable = augmented[~augmented["at_chance"].astype(bool)]  # a cell at chance is never named best
    pool = readable if not readable.empty else augmented
    best = pool.loc[pool["val_f1_mean"].idxmax()] if not pool.empty else None
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


def f1_heatmap_figure(cells: pd.DataFrame, title: str | None = None):
    """The study's stage x p_aug heatmap of test macro-F1 (mean over seeds), cells that differ from no
    augmentation marked (None without augmented cells)."""
    tables = grid_tables(cells)
    if tables["f1"].empty:
        return None
    name, budget, note = _family_text(cells)
    return viz.plot_heatmap(tables["f1"], dataset=cells["dataset"].iloc[0], significance=tables["significance"],
                            title=title or f"{name}: test macro-F1, stage × p_aug (mean over seeds)",
                            metric_label="macro-F1", note=f"* = differs from no augmentation ({note})", budget=budget)


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
    figures_ = {"heatmap_f1": f1_heatmap_figure(cells), "forest": forest_figure(frame, cells),
                "difference_heatmap": difference_figure(cells),
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
            written += save_and_close(fig, figure_path(out_dir, f"{prefix}_{name}.png"), formats)
    distillation = config.REPORTS_DIR / "distillation.json"
    if distillation.exists():
        try:
            written += _distillation_figure(_read_distillation(distillation), out_dir, formats)
        except (ReportError, config.ConfigError) as err:
            print(f"warning: left out the distillation figure: {err}", file=sys.stderr)
    return written


def _read_distillation(path: Path) -> dict:
    """distillation.json checked as data: its dataset, and rows of finite metrics in [0, 1]."""
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read ({err}); run `distill` again to rewrite it") from None
    rows = table.get("rows") if isinstance(table, dict) else None
    sound = isinstance(rows, list) and bool(rows) and table.get("dataset") in config.DATASETS
    sound = sound and all(_distillation_row_sound(row) for row in rows)
    if not sound:
        raise ReportError(f"{path} is not a distillation table this library wrote (dataset, or a row's macro-F1, "
                          "interval, size or speed); run `distill` again to rewrite it")
    return table


# The gallery's figure per family (the README shows one thumbnail of each main figure).
GALLERY_FIGURES = ("forest", "difference_heatmap", "effect_vs_budget", "robustness_drops", "per_class_f1",
                   "learning_curves")


def gallery(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Small PNGs of the main figures of the family with the most cells, for the README, each stamped with
    what data it shows (synthetic data is never mistaken for SVHN)."""
    out_dir = _in_project(out_dir)
    config.require(not frame.empty, "no finished runs to draw; run `make demo` first")
    candidates = families(summarize(frame))
    config.require(bool(candidates), "no family with a baseline and an augmented cell; run `make demo` first")
    cells = max(candidates, key=len)
    dataset = cells["dataset"].iloc[0]
    stamp = "SYNTHETIC DATA" if dataset == "synthetic" else "SVHN"
    written = []
    for name, fig in family_figures(frame, cells).items():
        if name in GALLERY_FIGURES:
            written.append(viz.save_thumbnail(fig, figure_path(out_dir, f"{name}.png"), stamp=stamp))
        plt.close(fig)
    return written


def _in_project(folder: Path) -> Path:
    """``folder`` when it lies in the project (its checkout or its reports folder), else ConfigError: a
    folder named on the command line is never written elsewhere."""
    for project in (config.ROOT, config.REPORTS_DIR):
        if Path(folder).resolve().is_relative_to(Path(project).resolve()):
            return Path(folder)
    raise config.ConfigError(f"refusing {folder}: a gallery is written inside the project ({config.ROOT}) or its "
                             f"reports folder ({config.REPORTS_DIR}), e.g. docs/gallery")


def _distillation_figure(table: dict, out_dir: Path, formats) -> list[Path]:
    teacher = read_report(report_path(table["rows"][0]["run_id"]))
    fig = viz.plot_distillation_comparison(table["rows"], dataset=table["dataset"], budget=run_budget(teacher),
                                           chance=chance_band(parse_digits(teacher["test_labels"])))
    return save_and_close(fig, figure_path(out_dir, f"{table['dataset']}_distillation.png"), formats)


def _distillation_row_sound(row) -> bool:
    if not isinstance(row, dict):
        return False
    unit = all(UNIT(row.get(name), row) is None for name in ("f1_macro", "ci_low", "ci_high"))
    return unit and all(POSITIVE(row.get(name), row) is None for name in ("params", "images_per_s", "checkpoint_mb"))


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
