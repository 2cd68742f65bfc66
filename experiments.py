"""The study as functions and as a command line.

One training run is the unit (``run``): it trains, or loads an identical finished run,
and writes ``reports/runs/<run_id>.json`` plus ``models/<run_id>.pt``. Everything else
(the stage x p_aug grid, Optuna tuning, distillation, the whole study) is built from runs,
and every table and figure is rebuilt from the JSON reports without retraining.

    python experiments.py --help
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import config
from atomic_io import atomic_torch_save, atomic_write_json, atomic_write_text
from config import ConfigError, TrainConfig

REPORT_SCHEMA_VERSION = 1
# Data subsets and the validation split use a fixed seed, so runs with different
# seeds differ only in initialisation, batch order and augmentation draws.
SPLIT_SEED = 0
CORRUPTION_SEED = 1234
DEFAULT_SEVERITIES = (1, 2, 3)
DEFAULT_STUDY_NAME = "grid"
TUNE_STUDY_NAME = "svhn-resnet"


class ReportError(RuntimeError):
    """A report file that cannot be read; the message says which file and what to do."""


# ---------------------------------------------------------------- data for a run


@dataclass
class RunData:
    """Train / validation / test tensors of one dataset configuration (uint8 on the CPU)."""

    train_x: torch.Tensor  # (N_train, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N_train,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Corrupted test copies, fixed by CORRUPTION_SEED: made once per process, reused by every run.
    corrupted: dict = dataclasses.field(default_factory=dict)  # (kind, severity) -> uint8 (N, 3, 32, 32)


_DATA_CACHE: dict[tuple, RunData] = {}


def prepare_data(cfg: TrainConfig) -> RunData:
    """Load, subsample and split the data a configuration asks for (cached per process)."""
    from data_loading import compute_channel_stats, load_split, split_indices, stratified_subset

    key = (cfg.dataset, cfg.n_train, cfg.n_test, cfg.val_fraction, str(config.DATA_DIR))
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    images, labels = load_split(cfg.dataset, "train")
    # The same split as the per-sample DataLoader path (get_dataloaders_with_custom_train_transform).
    train_idx, val_idx = split_indices(labels, cfg.val_fraction, SPLIT_SEED, cfg.n_train)
    test_x, test_y = load_split(cfg.dataset, "test")
    if cfg.n_test is not None and cfg.n_test < len(test_y):
        keep = stratified_subset(test_y, cfg.n_test, SPLIT_SEED)
        test_x, test_y = test_x[keep], test_y[keep]
    mean, std = compute_channel_stats(images[train_idx])
    data = RunData(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
                   test_x, test_y, tuple(mean), tuple(std))
    _DATA_CACHE[key] = data
    return data


def make_loaders(cfg: TrainConfig, data: RunData, device: str):
    """(train, val, test) loaders: on-device batches, or the original per-sample pipeline."""
    from augmentations import BatchAugment
    from data_loading import DeviceLoader

    if cfg.loader == "torch":
        return _torch_loaders(cfg, data)
    augment = None if cfg.stage == "none" else BatchAugment(cfg.stage, cfg.p_aug, data.mean, data.std)
    train = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std,
                         device=device, shuffle=True, augment=augment, seed=cfg.seed)
    val = DeviceLoader(data.val_x, data.val_y, cfg.eval_batch_size, data.mean, data.std,
                       device=device, shuffle=False)
    test = DeviceLoader(data.test_x, data.test_y, cfg.eval_batch_size, data.mean, data.std,
                        device=device, shuffle=False)
    return train, val, test


def _torch_loaders(cfg: TrainConfig, data: RunData):
    """The original study's pipeline: PIL images through torchvision, DataLoader workers."""
    from augmentations import ProbTransform, build_stage_transform, get_eval_transform
    from data_loading import get_dataloaders_with_custom_train_transform

    eval_t = get_eval_transform(data.mean, data.std)
    train_t = eval_t
    if cfg.stage != "none":
        train_t = ProbTransform(eval_t, build_stage_transform(cfg.stage, data.mean, data.std), cfg.p_aug)
    return get_dataloaders_with_custom_train_transform(
        train_t, eval_t, cfg.dataset, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
        seed=SPLIT_SEED, num_workers=cfg.num_workers, n_train=cfg.n_train, n_test=cfg.n_test,
    )


# ---------------------------------------------------------------- one run


def report_path(run_id: str) -> Path:
    return config.RUNS_DIR / f"{run_id}.json"


def model_path(run_id: str) -> Path:
    return config.MODELS_DIR / f"{run_id}.pt"


def checkpoint_path(run_id: str) -> Path:
    return config.MODELS_DIR / "checkpoints" / f"{run_id}.ckpt"


def read_report(path: Path) -> dict:
    """One JSON report; a corrupt file raises ReportError saying how to recover."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(
            f"report {path} cannot be read ({err}); delete it to retrain that run, "
            "every other report is untouched"
        ) from err
    if not isinstance(report, dict) or report.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ReportError(f"report {path} has an unknown schema; delete it to retrain that run")
    return report


def run(cfg: TrainConfig, *, device: str = "auto", progress: bool = False,
        severities: tuple[int, ...] = DEFAULT_SEVERITIES, on_epoch_end=None) -> dict:
    """Train one configuration, or load it when an identical run has finished.

    An interrupted run resumes from its last finished epoch (per-epoch checkpoint).
    Returns the report (also written to ``reports/runs/<run_id>.json``).
    """
    cfg = cfg.effective()
    run_id = cfg.run_id()
    if report_path(run_id).exists():
        return read_report(report_path(run_id))
    device = config.resolve_device(device)
    model, fit_result, data, loaders = train_model(cfg, device, progress=progress,
                                                   checkpoint=checkpoint_path(run_id),
                                                   on_epoch_end=on_epoch_end)
    report = build_report(cfg, model, fit_result, data, loaders, device, severities)
    atomic_torch_save(model.state_dict(), model_path(run_id))
    atomic_write_json(report_path(run_id), report)  # the report is the commit point
    checkpoint_path(run_id).unlink(missing_ok=True)
    return report


def train_model(cfg: TrainConfig, device: str, *, progress: bool = False, checkpoint: Path | None = None,
                on_epoch_end=None):
    """Build data, loaders and model; fit. Returns (model, fit_result, data, loaders)."""
    from data_loading import set_seed
    from model import build_model
    from training import fit

    data = prepare_data(cfg)
    loaders = make_loaders(cfg, data, device)
    set_seed(cfg.seed)  # model initialisation is the only user of the global RNG
    model = build_model(cfg.model).to(device)
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    fit_result = fit(model, loaders[0], loaders[1], cfg, device, teacher=teacher,
                     checkpoint_path=checkpoint, on_epoch_end=on_epoch_end, progress=progress)
    return model, fit_result, data, loaders


def load_teacher(run_id: str, device: str) -> torch.nn.Module:
    """The frozen model of a finished run (eval mode, no gradients)."""
    from model import build_model

    path = report_path(run_id)
    if not path.exists():
        raise ConfigError(f"teacher run {run_id!r} has no report at {path}; train it first")
    teacher_cfg = read_report(path)["config"]
    teacher = build_model(teacher_cfg["model"]).to(device)
    teacher.load_state_dict(torch.load(model_path(run_id), map_location=device, weights_only=True))
    teacher.eval().requires_grad_(False)
    return teacher


def build_report(cfg, model, fit_result, data, loaders, device, severities) -> dict:
    """Everything a table or figure needs later, so nothing is retrained to draw it."""
    from augmentations import BatchAugment
    from model import count_params
    from stats import bootstrap_ci
    from training import compute_metrics, predict

    y_true, y_pred, _ = predict(model, loaders[2], device)
    y_true, y_pred = y_true.cpu(), y_pred.cpu()
    metrics = compute_metrics(y_true, y_pred)
    ci = bootstrap_ci(y_true.numpy(), y_pred.numpy(), metric="f1_macro", seed=cfg.seed)
    per_sample = cfg.stage != "none" and BatchAugment(cfg.stage, cfg.p_aug, data.mean, data.std).per_sample
    history = fit_result["history"]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": cfg.run_id(),
        "config": dataclasses.asdict(cfg),
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset == "synthetic",
        "sizes": {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
        "channel_stats": {"mean": list(data.mean), "std": list(data.std)},
        "augment_path": "none" if cfg.stage == "none" else ("per-sample" if per_sample else "batched"),
        "test": metrics,
        "test_f1_macro_ci": ci,
        "test_labels": _digits(y_true),
        "test_predictions": _digits(y_pred),
        "robustness": evaluate_robustness(model, data, device, cfg.eval_batch_size, severities),
        "history": history,
        "best_epoch": fit_result["best_epoch"],
        "seconds_per_epoch": fit_result["seconds_per_epoch"],
        "train_images_per_s": _mean([h["train_images_per_s"] for h in history]),
        "inference_images_per_s": inference_throughput(model, data, device, cfg.eval_batch_size),
        "params": count_params(model),
        "environment": environment(device),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _digits(labels: torch.Tensor) -> str:
    """Labels 0-9 as one compact string (a 26k-image test set is 26 kB of JSON)."""
    return "".join(map(str, labels.tolist()))


def parse_digits(text: str) -> list[int]:
    return [int(c) for c in text]


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_robustness(model, data: RunData, device: str, batch_size: int,
                        severities: tuple[int, ...]) -> dict:
    """Macro-F1 on corrupted copies of the test images, per kind (mean over severities)."""
    from augmentations import CORRUPTION_KINDS, corrupt
    from data_loading import DeviceLoader
    from training import compute_metrics, predict

    per_kind = {}
    for kind in CORRUPTION_KINDS:
        scores = []
        for severity in severities:
            if (kind, severity) not in data.corrupted:
                data.corrupted[kind, severity] = corrupt(data.test_x, kind, severity, seed=CORRUPTION_SEED)
            images = data.corrupted[kind, severity]
            loader = DeviceLoader(images, data.test_y, batch_size, data.mean, data.std,
                                  device=device, shuffle=False)
            y_true, y_pred, _ = predict(model, loader, device)
            scores.append(compute_metrics(y_true.cpu(), y_pred.cpu())["f1_macro"])
        per_kind[kind] = _mean(scores)
    return {"severities": list(severities), "f1_macro": per_kind, "mean_f1_macro": _mean(per_kind.values())}


def inference_throughput(model, data: RunData, device: str, batch_size: int, n_images: int = 8192) -> float:
    """Images per second in eval mode on (up to) n_images test images, after a one-batch warm-up;
    the device is synchronised before the clocks are read."""
    from data_loading import DeviceLoader
    from training import predict

    loader = DeviceLoader(data.test_x[:n_images], data.test_y[:n_images], batch_size, data.mean, data.std,
                          device=device, shuffle=False)
    warmup = DeviceLoader(data.test_x[:batch_size], data.test_y[:batch_size], batch_size, data.mean, data.std,
                          device=device, shuffle=False)
    predict(model, warmup, device)
    _synchronize(device)
    start = time.perf_counter()
    predict(model, loader, device)
    _synchronize(device)
    return loader.num_samples / (time.perf_counter() - start)


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else "cpu"
    return {"torch": torch.__version__, "device": str(device), "device_name": name,
            "git_commit": git_commit(), "python": sys.version.split()[0]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=config.ROOT,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# ---------------------------------------------------------------- reports as a table


def load_reports(source: str | Path | None = None, study_name: str | None = None):
    """One row per run (a pandas DataFrame) from JSON reports or from a queue storage.

    ``source`` is a folder of reports (default ``reports/runs``), or a storage URL /
    journal file whose finished cells carry their reports (``study_name`` names the study).
    Rows are keyed by run_id: a run reported twice yields one row (the newest).
    """
    import pandas as pd

    reports = _reports_from_source(source, study_name)
    rows = [_report_row(report) for report in reports]
    frame = pd.DataFrame(rows, columns=_ROW_COLUMNS)
    if frame.empty:
        return frame
    frame = frame.sort_values("finished_at").drop_duplicates("run_id", keep="last")
    return frame.sort_values(["dataset", "model", "stage", "p_aug", "seed"]).reset_index(drop=True)


def _reports_from_source(source, study_name) -> list[dict]:
    if source is not None and _is_storage(source):
        from work_queue import open_storage, reports_from_storage

        return reports_from_storage(open_storage(str(source)), study_name or DEFAULT_STUDY_NAME)
    folder = Path(source) if source is not None else config.RUNS_DIR
    return [read_report(path) for path in sorted(folder.glob("*.json"))]


def _is_storage(source) -> bool:
    text = str(source)
    return "://" in text or text.endswith(".journal") or text.endswith(".db")


_ROW_COLUMNS = [
    "run_id", "dataset", "model", "stage", "p_aug", "seed", "preset", "epochs", "teacher",
    "f1_macro", "ci_low", "ci_high", "accuracy", "corruption_f1", "train_images_per_s",
    "inference_images_per_s", "params", "seconds", "augment_path", "finished_at", "report",
]


def _report_row(report: dict) -> dict:
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


# ---------------------------------------------------------------- statistics over cells

_CELL_VARYING = ("stage", "p_aug", "seed")


def _family(report: dict) -> str:
    """Configuration minus stage, p_aug and seed: cells of one family share a baseline."""
    cfg = {k: v for k, v in report["config"].items() if k not in _CELL_VARYING}
    return json.dumps(cfg, sort_keys=True)


def summarize(frame, alpha: float = 0.05, n_boot: int = 1000):
    """One row per cell (stage, p_aug within a family): seeds, mean, CI, and a paired test
    against the family's no-augmentation baseline on the same test images.

    p-values are Holm-corrected over all cells of the table, so a grid of 20 comparisons
    does not produce a "significant" difference by chance.
    """
    import numpy as np
    import pandas as pd

    from stats import compare_to_baseline, holm_bonferroni, seed_summary

    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(family=[_family(r) for r in frame["report"]])
    rows = []
    for (family, _stage, _p_aug), cell in frame.groupby(["family", "stage", "p_aug"], sort=False):
        base = frame[(frame["family"] == family) & (frame["stage"] == "none")]
        rows.append(_cell_row(cell, base, seed_summary, compare_to_baseline, n_boot))
    table = pd.DataFrame(rows)
    tested = table["p_value"].notna()
    table["p_holm"] = np.nan
    table["significant"] = False
    if tested.any():
        adjusted = holm_bonferroni(table.loc[tested, "p_value"].to_numpy())
        table.loc[tested, "p_holm"] = adjusted
        table.loc[tested, "significant"] = adjusted < alpha
    return table.sort_values(["dataset", "model", "stage", "p_aug"]).reset_index(drop=True)


def _cell_row(cell, base, seed_summary, compare_to_baseline, n_boot) -> dict:
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
        # and McNemar's test on the same images both say so (the bootstrap alone is
        # optimistic when only a handful of images change).
        row.update(diff=test["diff"], diff_low=test["low"], diff_high=test["high"],
                   p_value=max(test["p_value"], test["mcnemar_p"]))
    return row


def summary_markdown(table) -> str:
    """The cell table as Markdown, headed by the dataset so synthetic results are never mistaken."""
    from visualization import dataset_label

    if table.empty:
        return "No finished runs.\n"
    lines = []
    for dataset, part in table.groupby("dataset"):
        lines += [f"### {dataset_label(dataset)}: test macro-F1 per cell", "",
                  "| model | epochs | lr | stage | p_aug | seeds | macro-F1 [95% CI] "
                  "| diff vs no augmentation [95% CI] | p (Holm) | significant | corruption F1 |",
                  "|---|---:|---:|---|---:|---:|---|---|---:|:---:|---:|"]
        for _, r in part.iterrows():
            lines.append(_markdown_row(r))
        lines.append("")
    return "\n".join(lines)


def _markdown_row(r) -> str:
    """One cell of the summary; cells without a same-family baseline say so instead of 'nan'."""
    from stats import format_estimate

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


def write_summary(frame=None, out_dir: Path | None = None) -> tuple[str, Path]:
    """Print-ready Markdown and a CSV under reports/ (both written atomically)."""
    frame = load_reports() if frame is None else frame
    out_dir = out_dir or config.REPORTS_DIR
    table = summarize(frame)
    markdown = summary_markdown(table)
    atomic_write_text(out_dir / "summary.md", markdown)
    csv_path = atomic_write_text(out_dir / "summary.csv", table.to_csv(index=False))
    return markdown, csv_path


# ---------------------------------------------------------------- figures from reports


def figures(frame=None, out_dir: Path | None = None) -> list[Path]:
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


def eda_figures(dataset: str = "synthetic", out_dir: Path | None = None) -> list[Path]:
    """The EDA notebook's figures from the command line: class balance, samples per class,
    channel histograms, image statistics, mean images, channel correlation and normalization
    statistics of the train split, and the stage gallery on 8 train images."""
    import visualization as viz
    from data_loading import compute_channel_stats, load_split

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


def grid_family(cells):
    """The cells of one model's grid: the family (same settings but stage, p_aug and seed) with a
    no-augmentation baseline and the most cells, so tuned or distilled runs stay off its heatmap."""
    with_baseline = cells[cells["family"].isin(cells.loc[cells["stage"] == "none", "family"])]
    pool = with_baseline if not with_baseline.empty else cells
    return pool[pool["family"] == pool["family"].value_counts().idxmax()]


def grid_tables(cells) -> dict:
    """stage x p_aug tables (mean F1, significance marks, corruption F1) for one model.

    p_aug = 0 trains without augmentation whatever the stage, so that column repeats the
    baseline in every stage row.
    """
    import pandas as pd

    augmented = cells[cells["stage"] != "none"]
    base = cells[cells["stage"] == "none"]
    stages = [s for s in config.ALL_STAGES if s in set(augmented["stage"])]

    def pivot(column, fill):
        table = augmented.pivot_table(index="stage", columns="p_aug", values=column, aggfunc="first")
        table = table.reindex(stages)
        if not base.empty:
            table.insert(0, 0.0, fill(base.iloc[0][column]))
        return table.sort_index(axis=1)

    marks = augmented.assign(mark=augmented["significant"].map({True: "*", False: ""}))
    significance = marks.pivot_table(index="stage", columns="p_aug", values="mark", aggfunc="first").reindex(stages)
    if not base.empty:
        significance.insert(0, 0.0, "")
    return {"f1": pivot("f1_mean", lambda v: v), "corruption": pivot("corruption_f1", lambda v: v),
            "significance": significance.sort_index(axis=1).fillna(""),
            "n_seeds": int(pd.concat([augmented, base])["n_seeds"].max())}


def _grid_figures(frame, cells, dataset: str, model: str, out_dir: Path) -> list[Path]:
    import visualization as viz

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


def best_runs(frame, cells, dataset: str, model: str) -> tuple[dict, dict | None]:
    """The report of the best cell (highest mean macro-F1; its first seed) and the baseline's."""
    best_cell = cells.sort_values("f1_mean", ascending=False).iloc[0]
    runs = frame[(frame["dataset"] == dataset) & (frame["model"] == model) & frame["teacher"].isna()]
    best = runs[(runs["stage"] == best_cell["stage"]) & (runs["p_aug"] == best_cell["p_aug"])]
    base = runs[runs["stage"] == "none"]
    return best.iloc[0]["report"], (base.iloc[0]["report"] if not base.empty else None)


def run_label(report: dict) -> str:
    cfg = report["config"]
    return "no augmentation" if cfg["stage"] == "none" else f"{cfg['stage']} p={cfg['p_aug']:g}"


def _best_cell_figures(frame, cells, dataset, model, out_dir) -> list[Path]:
    import visualization as viz

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
    import visualization as viz

    fig = viz.plot_distillation_comparison(table["rows"], dataset=table["dataset"])
    return save_and_close(fig, out_dir / f"{table['dataset']}_distillation.png")


# ---------------------------------------------------------------- the grid as a work queue


def default_storage() -> str:
    """Optuna's journal file: safe for several worker processes on one machine (SQLite is not)."""
    return str(config.REPORTS_DIR / "optuna.journal")


def grid_configs(models, stages, p_augs, seeds, base: TrainConfig) -> list[TrainConfig]:
    """Every cell and seed as a configuration; cells that train identically appear once
    (p_aug = 0 is the same run for every stage)."""
    configs = {}
    for model in models:
        for stage in stages:
            for p_aug in p_augs:
                for seed in seeds:
                    cfg = dataclasses.replace(base, model=model, stage=stage, p_aug=float(p_aug), seed=seed)
                    configs.setdefault(cfg.run_id(), cfg.effective())
    return list(configs.values())


def enqueue_grid(configs: list[TrainConfig], storage: str, study_name: str,
                 severities=DEFAULT_SEVERITIES) -> int:
    """Put every configuration in the queue once (from this one process); returns how many were new."""
    from work_queue import enqueue_cells, open_storage

    cells = [{"cell_key": cfg.run_id(), "config": dataclasses.asdict(cfg), "severities": list(severities)}
             for cfg in configs]
    return enqueue_cells(open_storage(storage), study_name, cells)


def worker(storage: str | None = None, study_name: str = DEFAULT_STUDY_NAME, *, device: str = "auto",
           progress: bool = False, heartbeat: float = 30.0) -> int:
    """Take waiting cells from the queue and run them until none is left; returns cells run.

    A cell whose worker stops sending heartbeats for 4 x ``heartbeat`` seconds is retried by
    another worker (see work_queue). ``run`` loads a finished report, so a rare double claim
    never trains twice.
    """
    from work_queue import open_storage, run_worker

    def execute(cell: dict) -> dict:
        return run(TrainConfig(**cell["config"]), device=device, progress=progress,
                   severities=tuple(cell["severities"]))

    return run_worker(open_storage(storage or default_storage()), study_name, execute,
                      value_key=None, heartbeat_interval=heartbeat, grace_period=4 * heartbeat)


def grid(models=("simplecnn",), stages=config.STAGES[1:], p_augs=config.P_AUG_GRID, seeds=(42,), *,
         base: TrainConfig | None = None, storage: str | None = None, study_name: str = DEFAULT_STUDY_NAME,
         workers: int = 1, device: str = "auto", severities=DEFAULT_SEVERITIES,
         progress: bool = False, heartbeat: float = 30.0) -> list[dict]:
    """Run a models x stages x p_augs x seeds grid through the queue; returns the reports.

    ``workers > 1`` starts that many worker processes on this machine; more workers on other
    machines can join with ``python experiments.py worker --storage URL --study NAME``.
    """
    base = base or config.preset_config("original")
    configs = grid_configs(models, stages, p_augs, seeds, base)
    storage = storage or default_storage()
    enqueue_grid(configs, storage, study_name, severities)
    if workers <= 1:
        worker(storage, study_name, device=device, progress=progress, heartbeat=heartbeat)
    else:
        prepare_data(configs[0])  # generate / cache the data once, before the workers race for it
        _run_worker_processes(workers, storage, study_name, device, heartbeat)
    return _collect_reports(configs)


def _run_worker_processes(workers: int, storage: str, study_name: str, device: str, heartbeat: float) -> None:
    command = [sys.executable, str(config.ROOT / "experiments.py"), "worker", "--storage", storage,
               "--study", study_name, "--device", device, "--heartbeat", str(heartbeat)]
    processes = [subprocess.Popen(command) for _ in range(workers)]
    codes = [process.wait() for process in processes]
    if any(codes):
        print(f"warning: worker exit codes {codes}; unfinished cells stay queued", file=sys.stderr)


def _collect_reports(configs: list[TrainConfig]) -> list[dict]:
    missing = [cfg.run_id() for cfg in configs if not report_path(cfg.run_id()).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} cell(s) did not finish: {missing[:5]}...; see the queue's "
                           "failed trials (python experiments.py status) and run a worker again")
    return [read_report(report_path(cfg.run_id())) for cfg in configs]


# ---------------------------------------------------------------- Optuna tuning

TUNE_SPACE = {"lr": (1e-4, 5e-3), "weight_decay": (1e-6, 1e-3), "p_aug": (0.0, 1.0),
              "scheduler": config.SCHEDULERS}


def _suggest(trial, base: TrainConfig, epochs: int) -> TrainConfig:
    """The original study's search space (FACTS.md, part 5)."""
    return dataclasses.replace(
        base, epochs=epochs,
        lr=trial.suggest_float("lr", *TUNE_SPACE["lr"], log=True),
        weight_decay=trial.suggest_float("weight_decay", *TUNE_SPACE["weight_decay"], log=True),
        p_aug=trial.suggest_float("p_aug", *TUNE_SPACE["p_aug"]),
        scheduler=trial.suggest_categorical("scheduler", list(TUNE_SPACE["scheduler"])),
    )


def tune(n_trials: int = 40, *, base: TrainConfig | None = None, epochs: int = 3, storage: str | None = None,
         study_name: str = TUNE_STUDY_NAME, device: str = "auto", seed: int = 42, progress: bool = False):
    """TPE over lr, weight decay, p_aug and scheduler with a median pruner; resumable.

    ``n_trials`` is the total wanted in the study: a resumed study only runs the rest.
    A diverging trial (non-finite loss) is recorded as failed with its reason and the study
    goes on. Returns the Optuna study; figures go to reports/figures/.
    """
    import optuna

    from training import DivergenceError
    from work_queue import open_storage

    base = base or config.preset_config("original", model="resnet18", stage="stage1_basic")
    device = config.resolve_device(device)
    study = optuna.create_study(
        study_name=study_name, storage=open_storage(storage or default_storage()), direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed), pruner=optuna.pruners.MedianPruner(n_warmup_steps=1),
        load_if_exists=True,
    )
    _fail_interrupted_trials(study)

    def objective(trial) -> float:
        cfg = _suggest(trial, base, epochs)

        def report_epoch(epoch: int, record: dict) -> None:
            trial.report(record["val_f1_macro"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            _, fit_result, _, _ = train_model(cfg, device, progress=progress, on_epoch_end=report_epoch)
        except DivergenceError as err:
            trial.set_user_attr("failure_reason", str(err))
            raise
        trial.set_user_attr("history", fit_result["history"])
        return fit_result["best_val_f1_macro"]

    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, n_trials - len(finished))
    if remaining:
        study.optimize(objective, n_trials=remaining, catch=(DivergenceError,))
    save_tuning_figures(study, base.dataset)
    return study


def _fail_interrupted_trials(study) -> None:
    """Trials left RUNNING by a killed tuning process are failed, so a resume counts them right.
    (tune is one process per study; the grid's workers have their own recovery.)"""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", "interrupted")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)


def save_tuning_figures(study, dataset: str, out_dir: Path | None = None) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    import visualization as viz

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


def save_and_close(fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and free it: a study draws many figures."""
    import matplotlib.pyplot as plt

    import visualization as viz

    written = viz.save_figure(fig, path)
    plt.close(fig)
    return written


def best_tuned_config(study, base: TrainConfig, epochs: int) -> TrainConfig:
    """The final model's configuration: the best trial's parameters, trained for ``epochs``."""
    params = study.best_trial.params
    return dataclasses.replace(base, epochs=epochs, lr=params["lr"], weight_decay=params["weight_decay"],
                               p_aug=round(params["p_aug"], 2), scheduler=params["scheduler"])


# ---------------------------------------------------------------- distillation


def best_run_id(model: str = "resnet18", dataset: str | None = None) -> str:
    """The finished run of ``model`` (trained alone) with the highest test macro-F1."""
    frame = load_reports()
    runs = frame[(frame["model"] == model) & frame["teacher"].isna()] if not frame.empty else frame
    if dataset is not None and not runs.empty:
        runs = runs[runs["dataset"] == dataset]
    if runs.empty:
        raise ConfigError(f"no finished {model} run to use as teacher; train one first (e.g. the grid)")
    return runs.sort_values("f1_macro", ascending=False).iloc[0]["run_id"]


def distill(teacher: str = "best", student: str = "simplecnn", T: float = 4.0, alpha: float = 0.7, *,
            epochs: int | None = None, dataset: str | None = None, device: str = "auto",
            progress: bool = False, severities=DEFAULT_SEVERITIES) -> dict:
    """Train ``student`` from a frozen teacher (same augmented batch), and the same student alone.

    Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE. Writes
    reports/distillation.json with teacher, distilled student and student alone: macro-F1 with
    CI, parameters, inference images/s and checkpoint size.
    """
    teacher_id = best_run_id("resnet18", dataset) if teacher == "best" else teacher
    if not report_path(teacher_id).exists():
        raise ConfigError(f"teacher run {teacher_id!r} not found in {config.RUNS_DIR}")
    teacher_report = read_report(report_path(teacher_id))
    teacher_cfg = TrainConfig(**teacher_report["config"])
    student_cfg = dataclasses.replace(teacher_cfg, model=student, teacher=teacher_id, kd_temperature=T,
                                      kd_alpha=alpha, epochs=epochs or teacher_cfg.epochs)
    alone_cfg = dataclasses.replace(student_cfg, teacher=None)
    reports = {"teacher": teacher_report,
               "distilled student": run(student_cfg, device=device, progress=progress, severities=severities),
               "student alone": run(alone_cfg, device=device, progress=progress, severities=severities)}
    table = {"dataset": teacher_cfg.dataset, "teacher": teacher_id, "T": T, "alpha": alpha,
             "rows": [comparison_row(name, report) for name, report in reports.items()]}
    atomic_write_json(config.REPORTS_DIR / "distillation.json", table)
    return table


def comparison_row(name: str, report: dict) -> dict:
    """One model in a comparison table: macro-F1 with CI, size and speed."""
    ci = report["test_f1_macro_ci"]
    return {"name": f"{name} ({report['config']['model']})", "run_id": report["run_id"],
            "f1_macro": report["test"]["f1_macro"], "ci_low": ci["low"], "ci_high": ci["high"],
            "params": report["params"], "images_per_s": report["inference_images_per_s"],
            "checkpoint_mb": model_path(report["run_id"]).stat().st_size / 1e6}


# ---------------------------------------------------------------- presets side by side


def compare_presets(presets=("original", "strong"), *, seeds=(0, 1), dataset: str = "synthetic",
                    device: str = "auto", **sizes) -> dict:
    """Train each preset with the same data, sizes and seeds; a paired test on the same test
    images says whether the last preset beats the first. Written to reports/presets.json."""
    from stats import compare_to_baseline, format_estimate, seed_summary

    reports = {name: [run(config.preset_config(name, dataset=dataset, seed=seed, **sizes), device=device)
                      for seed in seeds] for name in presets}
    y_true = parse_digits(reports[presets[0]][0]["test_labels"])

    def preds(name):
        return [parse_digits(r["test_predictions"]) for r in reports[name]]

    test = compare_to_baseline(y_true, preds(presets[0]), preds(presets[-1]))
    rows = []
    for name in presets:
        summary = seed_summary([r["test"]["f1_macro"] for r in reports[name]])
        rows.append({"preset": name, "f1_macro": format_estimate(summary["mean"], summary["ci_low"],
                                                                 summary["ci_high"]),
                     "per_seed": [r["test"]["f1_macro"] for r in reports[name]],
                     "run_ids": [r["run_id"] for r in reports[name]]})
    table = {"dataset": dataset, "sizes": sizes, "seeds": list(seeds), "rows": rows,
             "difference": {"of": f"{presets[-1]} - {presets[0]}", "diff": test["diff"], "low": test["low"],
                            "high": test["high"], "p_bootstrap": test["p_value"], "p_mcnemar": test["mcnemar_p"]}}
    atomic_write_json(config.REPORTS_DIR / "presets.json", table)
    return table


# ---------------------------------------------------------------- the whole study


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of each part of the study; ``study_plan`` gives the full and the quick one."""

    simple_stages: tuple[str, ...]
    simple_p_augs: tuple[float, ...]
    seeds: tuple[int, ...]
    extra_stages: tuple[str, ...]  # no-flip variants and learned policies, at p_aug = 1
    resnet_stages: tuple[str, ...]
    resnet_p_augs: tuple[float, ...]
    simple_epochs: int
    resnet_epochs: int
    tune_trials: int
    tune_epochs: int
    final_epochs: int
    n_train: int | None
    n_test: int | None
    resnet_n_train: int | None
    severities: tuple[int, ...]
    large_model: str = "resnet18"  # the model of the second grid, the tuning and the teacher
    batch_size: int = 384


def study_plan(quick: bool) -> StudyPlan:
    if not quick:  # the original study's sizes (FACTS.md), with three seeds per cell
        return StudyPlan(
            simple_stages=config.STAGES[1:], simple_p_augs=config.P_AUG_GRID, seeds=(42, 43, 44),
            extra_stages=config.NOFLIP_STAGES + config.POLICY_STAGES,
            resnet_stages=config.STAGES[1:], resnet_p_augs=config.P_AUG_GRID,
            simple_epochs=15, resnet_epochs=5, tune_trials=40, tune_epochs=3, final_epochs=15,
            n_train=None, n_test=None, resnet_n_train=None, severities=DEFAULT_SEVERITIES,
        )
    # Quick: minutes on a 2-core CPU; three stages x three p_aug still show the structure. Batches
    # of 96 give the small training sets enough optimizer steps to leave chance level.
    return StudyPlan(
        simple_stages=("stage1_basic", "stage3_color", "stage5_occlusion"), simple_p_augs=(0.0, 0.5, 1.0),
        seeds=(42,), extra_stages=("stage3_color_noflip", "trivialaugment"),
        resnet_stages=("stage1_basic",), resnet_p_augs=(0.0, 0.5),
        simple_epochs=3, resnet_epochs=1, tune_trials=2, tune_epochs=1, final_epochs=1,
        n_train=2500, n_test=400, resnet_n_train=500, severities=(2,), batch_size=96,
    )


def study_configs(dataset: str, plan: StudyPlan) -> tuple[TrainConfig, TrainConfig]:
    """Base configurations of the study's two models (original preset, the plan's sizes)."""
    simple = config.preset_config("original", dataset=dataset, epochs=plan.simple_epochs,
                                  n_train=plan.n_train, n_test=plan.n_test, batch_size=plan.batch_size)
    large = dataclasses.replace(simple, model=plan.large_model, epochs=plan.resnet_epochs,
                                n_train=plan.resnet_n_train)
    return simple, large


def study_queue(dataset: str, quick: bool, part: str) -> str:
    """Name of a study part's queue; quick and full studies never share one (a worker runs every
    waiting cell of its queue, so mixing them would train the other plan's leftovers)."""
    return f"{dataset}-{'quick' if quick else 'full'}-{part}"


def study(dataset: str = "synthetic", quick: bool = False, *, device: str = "auto", storage: str | None = None,
          workers: int = 1, progress: bool = False, heartbeat: float = 30.0) -> str:
    """What the original notebook did, in order and resumably; returns the summary Markdown.

    Killed and started again, it loads every finished run, resumes the interrupted one from
    its last epoch, and retries a cell left RUNNING once 4 heartbeats have passed.
    """
    plan = study_plan(quick)
    simple, resnet = study_configs(dataset, plan)
    common = dict(storage=storage, device=device, workers=workers, severities=plan.severities, progress=progress,
                  heartbeat=heartbeat)
    _step("SimpleCNN stage x p_aug grid")
    grid(("simplecnn",), plan.simple_stages, plan.simple_p_augs, plan.seeds, base=simple,
         study_name=study_queue(dataset, quick, "simplecnn-grid"), **common)
    _step("no-flip variants and learned policies")
    grid(("simplecnn",), plan.extra_stages, (1.0,), plan.seeds, base=simple,
         study_name=study_queue(dataset, quick, "simplecnn-extra"), **common)
    _step(f"{plan.large_model} grid")
    grid((plan.large_model,), plan.resnet_stages, plan.resnet_p_augs, plan.seeds[:1], base=resnet,
         study_name=study_queue(dataset, quick, f"{plan.large_model}-grid"), **common)
    _step("Optuna tuning of ResNet18Cifar")
    tuned = tune(plan.tune_trials, base=dataclasses.replace(resnet, stage="stage1_basic"), epochs=plan.tune_epochs,
                 storage=storage, study_name=study_queue(dataset, quick, TUNE_STUDY_NAME), device=device,
                 progress=progress)
    _step("final ResNet18Cifar")
    final = run(best_tuned_config(tuned, dataclasses.replace(resnet, stage="stage1_basic"), plan.final_epochs),
                device=device, progress=progress, severities=plan.severities)
    _step("distillation into SimpleCNN")
    distill(final["run_id"], "simplecnn", epochs=plan.final_epochs, device=device, progress=progress,
            severities=plan.severities)
    _step("figures and summary")
    frame = load_reports()
    frame = frame[frame["dataset"] == dataset]
    paths = figures(frame)
    markdown, csv_path = write_summary(frame)
    print(f"{len(paths)} figures in {config.FIGURES_DIR}; summary in {csv_path}")
    return markdown


def _step(title: str) -> None:
    print(f"== {title}", flush=True)


# ---------------------------------------------------------------- command line


def _config_from_args(args) -> TrainConfig:
    overrides = {name: getattr(args, name) for name in
                 ("model", "dataset", "stage", "p_aug", "seed", "epochs", "batch_size", "lr", "weight_decay",
                  "optimizer", "scheduler", "n_train", "n_test", "loader")
                 if getattr(args, name, None) is not None}
    if getattr(args, "no_hflip", False) and overrides.get("stage", "none") in config.STAGES[1:]:
        overrides["stage"] += config.NOFLIP_SUFFIX
    return config.preset_config(args.preset, **overrides)


def _add_config_args(parser, *, grid_mode: bool = False) -> None:
    parser.add_argument("--preset", default="original", help=f"one of {tuple(config.PRESETS)}")
    parser.add_argument("--dataset", choices=config.DATASETS, default="synthetic")
    if not grid_mode:
        parser.add_argument("--model", help=f"one of {config.MODELS}")
        parser.add_argument("--stage", help=f"one of {config.ALL_STAGES}")
        parser.add_argument("--p-aug", dest="p_aug", type=float)
        parser.add_argument("--seed", type=int)
    parser.add_argument("--no-hflip", action="store_true", help="use the stages' variants without the flip")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", dest="batch_size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", dest="weight_decay", type=float)
    parser.add_argument("--optimizer", help=f"one of {config.OPTIMIZERS}")
    parser.add_argument("--scheduler", help=f"one of {config.SCHEDULERS}")
    parser.add_argument("--n-train", dest="n_train", type=int, help="stratified subset of the train split")
    parser.add_argument("--n-test", dest="n_test", type=int, help="stratified subset of the test split")
    parser.add_argument("--loader", help=f"one of {config.LOADERS}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per epoch")


def _storage_args(parser, default_study: str) -> None:
    parser.add_argument("--storage", help="journal file path, sqlite:/// or postgresql:// URL "
                                          "(default reports/optuna.journal)")
    parser.add_argument("--study", default=default_study, help="name of the study in the storage")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one configuration (or load it when finished)")
    _add_config_args(p)

    p = sub.add_parser("grid", help="enqueue a models x stages x p_aug x seeds grid and work on it")
    _add_config_args(p, grid_mode=True)
    _storage_args(p, DEFAULT_STUDY_NAME)
    p.add_argument("--models", nargs="+", default=["simplecnn"])
    p.add_argument("--stages", nargs="+", default=list(config.STAGES[1:]))
    p.add_argument("--p-augs", nargs="+", type=float, default=list(config.P_AUG_GRID))
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")

    p = sub.add_parser("worker", help="take waiting cells from a queue until none is left")
    _storage_args(p, DEFAULT_STUDY_NAME)
    p.add_argument("--device", default="auto")
    p.add_argument("--heartbeat", type=float, default=30.0,
                   help="seconds between heartbeats; a cell silent for 4 heartbeats is retried")
    p.add_argument("--progress", action="store_true")

    p = sub.add_parser("status", help="count the cells of a queue per state")
    _storage_args(p, DEFAULT_STUDY_NAME)

    p = sub.add_parser("tune", help="Optuna TPE over lr, weight decay, p_aug and scheduler")
    _add_config_args(p)
    _storage_args(p, TUNE_STUDY_NAME)
    p.add_argument("--n-trials", type=int, default=40)
    p.add_argument("--trial-epochs", type=int, default=3)

    p = sub.add_parser("distill", help="distil a teacher run into a student, and train the student alone")
    p.add_argument("--teacher", default="best", help="a run id, or 'best' (the best finished ResNet run)")
    p.add_argument("--student", default="simplecnn")
    p.add_argument("--T", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--epochs", type=int)
    p.add_argument("--dataset", choices=config.DATASETS)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("summary", help="Markdown table of every cell (printed) and reports/summary.csv")
    p.add_argument("--source", help="reports folder or storage (default reports/runs)")
    p.add_argument("--study", help="study name when --source is a storage")
    p = sub.add_parser("figures", help="every study figure from the reports, into reports/figures/")
    p.add_argument("--source", help="reports folder or storage (default reports/runs)")
    p.add_argument("--study", help="study name when --source is a storage")

    p = sub.add_parser("presets", help="train the original and the strong preset side by side")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--n-train", dest="n_train", type=int, default=6000)
    p.add_argument("--n-test", dest="n_test", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("eda", help="the EDA figures of a dataset's train split, into reports/figures/")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic")

    p = sub.add_parser("study", help="the whole study, in order and resumably")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a CPU")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--storage", help="queue storage (default reports/optuna.journal)")
    p.add_argument("--heartbeat", type=float, default=30.0,
                   help="seconds between worker heartbeats; a cell silent for 4 heartbeats is retried")
    return parser


def _print_run(report: dict) -> None:
    from visualization import dataset_label

    ci = report["test_f1_macro_ci"]
    print(f"{report['run_id']} ({dataset_label(report['dataset'])}): test macro-F1 {report['test']['f1_macro']:.4f} "
          f"[{ci['low']:.4f}, {ci['high']:.4f}], accuracy {report['test']['accuracy']:.4f}, "
          f"corruption macro-F1 {report['robustness']['mean_f1_macro']:.4f}")
    print(f"report: {report_path(report['run_id'])}")


def _dispatch(args) -> None:
    if args.command == "run":
        _print_run(run(_config_from_args(args), device=args.device, progress=args.progress))
    elif args.command == "grid":
        stages = [s + config.NOFLIP_SUFFIX if args.no_hflip and s in config.STAGES[1:] else s for s in args.stages]
        reports = grid(args.models, stages, args.p_augs, args.seeds, base=_config_from_args(args),
                       storage=args.storage, study_name=args.study, workers=args.workers, device=args.device,
                       progress=args.progress)
        print(summary_markdown(summarize(load_reports().query("run_id in @ids",
                                                               local_dict={"ids": [r["run_id"] for r in reports]}))))
    elif args.command == "worker":
        ran = worker(args.storage, args.study, device=args.device, progress=args.progress, heartbeat=args.heartbeat)
        print(f"worker ran {ran} cell(s)")
    elif args.command == "status":
        from work_queue import open_storage, queue_status

        print(json.dumps(queue_status(open_storage(args.storage or default_storage()), args.study), indent=2))
    elif args.command == "tune":
        study_ = tune(args.n_trials, base=_config_from_args(args), epochs=args.trial_epochs, storage=args.storage,
                      study_name=args.study, device=args.device, progress=args.progress)
        print(f"best trial {study_.best_trial.number}: val macro-F1 {study_.best_value:.4f} {study_.best_params}")
    elif args.command == "distill":
        table = distill(args.teacher, args.student, args.T, args.alpha, epochs=args.epochs, dataset=args.dataset,
                        device=args.device)
        print(json.dumps(table, indent=2))
    elif args.command == "summary":
        markdown, csv_path = write_summary(load_reports(args.source, args.study))
        print(markdown + f"\nCSV: {csv_path}")
    elif args.command == "figures":
        for path in figures(load_reports(args.source, args.study)):
            print(path)
    elif args.command == "presets":
        table = compare_presets(seeds=args.seeds, dataset=args.dataset, device=args.device, n_train=args.n_train,
                                n_test=args.n_test, epochs=args.epochs)
        print(json.dumps(table, indent=2))
    elif args.command == "eda":
        for path in eda_figures(args.dataset):
            print(path)
    elif args.command == "study":
        print(study(args.dataset, args.quick, device=args.device, storage=args.storage, workers=args.workers,
                    progress=args.progress, heartbeat=args.heartbeat))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; bad input ends with a one-line error and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except (ConfigError, ReportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
