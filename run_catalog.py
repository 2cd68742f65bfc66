"""Finished runs found again: list them with filters, show one, and compare the configurations of two.

Everything is read from the JSON reports in ``reports/runs`` (``config.RUNS_DIR``) through
``reports.load_reports``, so a damaged report is named the same way as in every table. A run is named
by its id or by a prefix of it that only one run has.
"""

from __future__ import annotations

import hashlib

import config
from reports import family_key, family_label, load_reports, run_summary_line
from runs import model_path, report_path

LIST_COLUMNS = ["run_id", "model", "stage", "p_aug", "lr", "epochs", "train_images", "seed", "family",
                "test_f1_macro"]


def family_id(report: dict) -> str:
    """A short name of a run's family (``reports.family_key``): the first 8 hex digits of its hash, so
    ``runs list --family`` can name it."""
    return hashlib.sha1(family_key(report).encode()).hexdigest()[:8]


def _reports() -> list[dict]:
    frame = load_reports()
    return [] if frame.empty else list(frame["report"])


def list_runs(*, dataset: str | None = None, model: str | None = None, stage: str | None = None,
              family: str | None = None) -> list[dict]:
    """One row per finished run (``LIST_COLUMNS``, plus dataset), those matching every filter given;
    ``family`` is a family id or a prefix of one, as the rows show it."""
    rows = []
    for report in _reports():
        cfg = report["config"]
        row = {"run_id": report["run_id"], "dataset": cfg["dataset"], "model": cfg["model"], "stage": cfg["stage"],
               "p_aug": cfg["p_aug"], "lr": cfg["lr"], "epochs": cfg["epochs"],
               "train_images": report["sizes"]["train"], "seed": cfg["seed"], "family": family_id(report),
               "test_f1_macro": round(report["test"]["f1_macro"], 4)}
        wanted = {"dataset": dataset, "model": model, "stage": stage}
        if all(value is None or row[name] == value for name, value in wanted.items()) and (
                family is None or row["family"].startswith(family)):
            rows.append(row)
    return rows


def find_run(reference: str) -> dict:
    """The report of the run named by ``reference``: its id, or a prefix only one run's id has. The
    reference is only compared with the ids present, never made into a path."""
    reports_ = {report["run_id"]: report for report in _reports()}
    if reference in reports_:
        return reports_[reference]
    matches = sorted(run_id for run_id in reports_ if run_id.startswith(reference))
    config.require(len(matches) != 0, f"no finished run {reference!r} in {config.RUNS_DIR}; "
                                      "`python experiments.py runs list` shows the run ids")
    config.require(len(matches) == 1, f"{len(matches)} runs start with {reference!r} ({', '.join(matches[:3])}"
                                      f"{', ...' if len(matches) > 3 else ''}); give more of the id")
    return reports_[matches[0]]


def show_run(reference: str) -> str:
    """One run in a few lines: its result, files, family, budget and every configuration field."""
    report = find_run(reference)
    sizes, env = report["sizes"], report.get("environment", {})
    lines = [
        run_summary_line(report),
        f"report: {report_path(report['run_id'])}",
        f"model: {model_path(report['run_id'])}",
        f"family: {family_id(report)} ({family_label(report)})",
        f"images: {sizes['train']:,} train, {sizes['val']:,} validation, {sizes['test']:,} test; best epoch "
        f"{report.get('best_epoch', '?')} of {report['config']['epochs']}",
        f"finished: {report['finished_at']} on {env.get('device_name', '?')} (git {env.get('git_commit') or '?'})",
        "configuration:",
        *(f"  {name}: {value}" for name, value in report["config"].items()),
    ]
    return "\n".join(lines)


def diff_runs(first: str, second: str) -> list[dict]:
    """The settings in which two runs differ: every configuration field, and the images each trained
    and was tested on; one row per difference (``setting``, then each run's id)."""
    a, b = find_run(first), find_run(second)

    def settings(report: dict) -> dict:
        return {**report["config"], "train_images": report["sizes"]["train"], "test_images": report["sizes"]["test"]}

    left, right = settings(a), settings(b)
    return [{"setting": name, a["run_id"]: left.get(name), b["run_id"]: right.get(name)}
            for name in dict.fromkeys([*left, *right]) if left.get(name) != right.get(name)]
