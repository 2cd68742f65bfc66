"""One training run: its data and loaders, training, the JSON report, and reading reports back.

A run is the unit of the study: ``run(cfg)`` trains, or loads an identical finished run, and
writes ``reports/runs/<run_id>.json`` plus ``models/<run_id>.pt``. Everything else (grids,
tuning, distillation, tables, figures) is built from runs and their reports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import config
from atomic_io import atomic_torch_save, atomic_write_json
from augmentations import (
    CORRUPTION_KINDS,
    BatchAugment,
    ProbTransform,
    build_stage_transform,
    corrupt,
    get_eval_transform,
)
from config import ConfigError, TrainConfig
from data_loading import DeviceLoader, RunData, per_sample_loaders, prepare_data, set_seed
from model import build_model, count_params
from stats import bootstrap_ci
from training import compute_metrics, fit, predict, synchronize

REPORT_SCHEMA_VERSION = 1
CORRUPTION_SEED = 1234  # the corrupted test copies are the same for every run
DEFAULT_SEVERITIES = (1, 2, 3)


class ReportError(RuntimeError):
    """A report file that cannot be read; the message says which file and what to do."""


# ---------------------------------------------------------------- where a run's files live


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


# ---------------------------------------------------------------- loaders


def make_loaders(cfg: TrainConfig, data: RunData, device: str) -> tuple[tuple, str]:
    """((train, val, test) loaders, augment_path): on-device batches, or the original per-sample
    pipeline; ``augment_path`` says which augmentation path the train loader actually runs."""
    if cfg.loader == "torch":
        return _per_sample_loaders(cfg, data), ("none" if cfg.stage == "none" else "per-sample")
    augment = None if cfg.stage == "none" else BatchAugment(cfg.stage, cfg.p_aug, data.mean, data.std)
    train = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std,
                         device=device, shuffle=True, augment=augment, seed=cfg.seed)
    val = evaluation_loader(data.val_x, data.val_y, data, cfg.eval_batch_size, device)
    test = evaluation_loader(data.test_x, data.test_y, data, cfg.eval_batch_size, device)
    if augment is None:
        return (train, val, test), "none"
    return (train, val, test), ("per-sample" if augment.per_sample else "batched")


def evaluation_loader(images: torch.Tensor, labels: torch.Tensor, data: RunData, batch_size: int,
                      device: str) -> DeviceLoader:
    """In-order, unaugmented batches normalized with the run's channel statistics."""
    return DeviceLoader(images, labels, batch_size, data.mean, data.std, device=device, shuffle=False)


def _per_sample_loaders(cfg: TrainConfig, data: RunData):
    """The original study's pipeline: PIL images through torchvision, DataLoader workers; the
    run's seed drives the batch order and the workers' augmentation draws."""
    eval_t = get_eval_transform(data.mean, data.std)
    train_t = eval_t
    if cfg.stage != "none":
        train_t = ProbTransform(eval_t, build_stage_transform(cfg.stage, data.mean, data.std), cfg.p_aug)
    return per_sample_loaders(data, train_t, eval_t, batch_size=cfg.batch_size,
                              eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, seed=cfg.seed)


# ---------------------------------------------------------------- one run


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
    trained = train_model(cfg, device, progress=progress, checkpoint=checkpoint_path(run_id),
                          on_epoch_end=on_epoch_end)
    report = build_report(cfg, trained, device, severities)
    atomic_torch_save(trained.model.state_dict(), model_path(run_id))
    atomic_write_json(report_path(run_id), report)  # the report is the commit point
    checkpoint_path(run_id).unlink(missing_ok=True)
    return report


@dataclasses.dataclass
class TrainedRun:
    """What training one configuration leaves behind, before its report is written."""

    model: torch.nn.Module
    fit_result: dict
    data: RunData
    loaders: tuple  # (train, val, test)
    augment_path: str  # "none", "batched" or "per-sample": the path the train loader ran


def train_model(cfg: TrainConfig, device: str, *, progress: bool = False, checkpoint: Path | None = None,
                on_epoch_end=None) -> TrainedRun:
    """Build data, loaders and model; fit."""
    data = prepare_data(cfg)
    loaders, augment_path = make_loaders(cfg, data, device)
    set_seed(cfg.seed)  # model initialisation is the only user of the global RNG
    model = build_model(cfg.model).to(device)
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    fit_result = fit(model, loaders[0], loaders[1], cfg, device, teacher=teacher,
                     checkpoint_path=checkpoint, on_epoch_end=on_epoch_end, progress=progress)
    return TrainedRun(model, fit_result, data, loaders, augment_path)


def load_teacher(run_id: str, device: str) -> torch.nn.Module:
    """The frozen model of a finished run (eval mode, no gradients)."""
    path = report_path(run_id)
    if not path.exists():
        raise ConfigError(f"teacher run {run_id!r} has no report at {path}; train it first")
    teacher_cfg = read_report(path)["config"]
    teacher = build_model(teacher_cfg["model"]).to(device)
    teacher.load_state_dict(torch.load(model_path(run_id), map_location=device, weights_only=True))
    teacher.eval().requires_grad_(False)
    return teacher


# ---------------------------------------------------------------- the report


def build_report(cfg: TrainConfig, trained: TrainedRun, device: str, severities) -> dict:
    """Everything a table or figure needs later, so nothing is retrained to draw it."""
    model, data = trained.model, trained.data
    y_true, y_pred, _ = predict(model, trained.loaders[2], device)
    y_true, y_pred = y_true.cpu(), y_pred.cpu()
    history = trained.fit_result["history"]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": cfg.run_id(),
        "config": dataclasses.asdict(cfg),
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset == "synthetic",
        "sizes": {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
        "channel_stats": {"mean": list(data.mean), "std": list(data.std)},
        "augment_path": trained.augment_path,
        "test": compute_metrics(y_true, y_pred),
        "test_f1_macro_ci": bootstrap_ci(y_true.numpy(), y_pred.numpy(), metric="f1_macro", seed=cfg.seed),
        "test_labels": encode_digits(y_true),
        "test_predictions": encode_digits(y_pred),
        "robustness": evaluate_robustness(model, data, device, cfg.eval_batch_size, severities),
        "history": history,
        "best_epoch": trained.fit_result["best_epoch"],
        "seconds_per_epoch": trained.fit_result["seconds_per_epoch"],
        "train_images_per_s": _mean([h["train_images_per_s"] for h in history]),
        "inference_images_per_s": inference_throughput(model, data, device, cfg.eval_batch_size),
        "params": count_params(model),
        "environment": environment(device),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def encode_digits(labels: torch.Tensor) -> str:
    """Labels 0-9 as one compact string (a 26k-image test set is 26 kB of JSON)."""
    return "".join(map(str, labels.tolist()))


def parse_digits(text: str) -> list[int]:
    """The inverse of ``encode_digits``: a report's test labels or predictions as a list."""
    return [int(c) for c in text]


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_robustness(model, data: RunData, device: str, batch_size: int,
                        severities: tuple[int, ...]) -> dict:
    """Macro-F1 on corrupted copies of the test images, per kind (mean over severities)."""
    per_kind = {}
    for kind in CORRUPTION_KINDS:
        scores = []
        for severity in severities:
            if (kind, severity) not in data.corrupted:
                data.corrupted[kind, severity] = corrupt(data.test_x, kind, severity, seed=CORRUPTION_SEED)
            loader = evaluation_loader(data.corrupted[kind, severity], data.test_y, data, batch_size, device)
            y_true, y_pred, _ = predict(model, loader, device)
            scores.append(compute_metrics(y_true.cpu(), y_pred.cpu())["f1_macro"])
        per_kind[kind] = _mean(scores)
    return {"severities": list(severities), "f1_macro": per_kind, "mean_f1_macro": _mean(per_kind.values())}


def inference_throughput(model, data: RunData, device: str, batch_size: int, n_images: int = 8192) -> float:
    """Images per second in eval mode on (up to) n_images test images, after a one-batch warm-up;
    the device is synchronised before the clocks are read."""
    loader = evaluation_loader(data.test_x[:n_images], data.test_y[:n_images], data, batch_size, device)
    warmup = evaluation_loader(data.test_x[:batch_size], data.test_y[:batch_size], data, batch_size, device)
    predict(model, warmup, device)
    synchronize(torch.device(device))
    start = time.perf_counter()
    predict(model, loader, device)
    synchronize(torch.device(device))
    return loader.num_samples / (time.perf_counter() - start)


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
