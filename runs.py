"""One training run: its data and loaders, training, the JSON report, and reading reports back.

A run is the unit of the study: ``run(cfg)`` trains, or loads an identical finished run, and
writes ``reports/runs/<run_id>.json`` plus ``models/<run_id>.pt``. Everything else (grids,
tuning, distillation, tables, figures) is built from runs and their reports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pickle
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
    stage_fingerprint,
    stage_ops,
)
from checkpoints import remove_checkpoint
from config import DEFAULT_SEVERITIES, ConfigError, TrainConfig
from data_loading import (
    DeviceLoader,
    RunData,
    data_fingerprint,
    load_split,
    per_sample_loaders,
    prepare_data,
    set_seed,
)
from model import build_model, count_params
from report_schema import REPORT_SCHEMA_VERSION, ReportError, check_report
from stats import at_chance, bootstrap_ci, chance_band, still_improving
from training import compute_metrics, device_label, fit, predict, synchronize

CORRUPTION_SEED = 1234  # the corrupted test copies are the same for every run


# ---------------------------------------------------------------- identity


def canonical_config(cfg: TrainConfig) -> TrainConfig:
    """The configuration as it will run: nothing augmented at p_aug = 0, and a subset size at or above
    its split's size replaced by the whole split (None), said on stderr so the clamping is not silent."""
    cfg = cfg.effective()
    for name, split in (("n_train", "train"), ("n_test", "test")):
        requested = getattr(cfg, name)
        if requested is not None:
            available = len(load_split(cfg.dataset, split)[1])
            if requested >= available:
                print(f"note: {name}={requested} is at least the {split} split's {available:,} images: "
                      "the whole split is used", file=sys.stderr)
                cfg = dataclasses.replace(cfg, **{name: None})
    return cfg


def run_id(cfg: TrainConfig) -> str:
    """A readable key of everything that changes a run's result: the canonical settings
    (``TrainConfig.identity``), the stage's op specs (custom stages included) and the fingerprints of
    the data files actually read, hashed into its last part. Identical runs share it; a change to any
    of these gives a new one. The readable part names dataset, model, stage, p_aug, learning rate,
    epochs, train images ("nfull": the whole split) and seed, e.g.
    ``synthetic-simplecnn-stage3_color-p0.5-lr0.001-e15-nfull-s42-1a2b3c4d5e``."""
    return run_ids(cfg)[0]


def run_ids(cfg: TrainConfig) -> tuple[str, str]:
    """(run id, legacy run id): the legacy id is the one the library gave the same run before the
    readable part named lr, epochs and train size (same hash), under which older reports are stored."""
    cfg = canonical_config(cfg)
    identity = {
        "config": cfg.identity(),
        "stage": stage_fingerprint(cfg.stage),
        "data": {split: data_fingerprint(cfg.dataset, split) for split in ("train", "test")},
    }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    head = f"{cfg.dataset}-{'kd-' if cfg.teacher else ''}{cfg.model}-{cfg.stage}-p{cfg.p_aug:g}"
    budget = f"lr{cfg.lr:g}-e{cfg.epochs}-n{cfg.n_train or 'full'}"
    return f"{head}-{budget}-s{cfg.seed}-{digest}", f"{head}-s{cfg.seed}-{digest}"


def finished_report_path(cfg: TrainConfig) -> Path | None:
    """The report of ``cfg``'s finished run, under its run id or its legacy id (so reports written before
    run ids named lr, epochs and train size are still found, never retrained); None when unfinished."""
    for key in run_ids(cfg):
        if report_path(key).exists():
            return report_path(key)
    return None


# ---------------------------------------------------------------- where a run's files live


def _run_file(folder: Path, run_id: str, suffix: str) -> Path:
    """``folder/<run_id><suffix>``; a run id that is not a safe name, or a path that would leave the
    folder (through a link), is a ConfigError before anything is read or written."""
    config.check_name("run id", run_id)
    return config.inside(folder, folder / f"{run_id}{suffix}")


def report_path(run_id: str) -> Path:
    return _run_file(config.RUNS_DIR, run_id, ".json")


def model_path(run_id: str) -> Path:
    return _run_file(config.MODELS_DIR, run_id, ".pt")


def metrics_csv_path(run_id: str) -> Path:
    """One row per epoch, written as the run trains (open it to watch a long run)."""
    return _run_file(config.RUNS_DIR, run_id, ".metrics.csv")


def checkpoint_path(run_id: str) -> Path:
    return _run_file(config.MODELS_DIR / "checkpoints", run_id, ".ckpt")


def read_report(path: Path) -> dict:
    """One JSON report, checked as data (``report_schema``): a corrupt file, or one whose field that tables,
    figures or model loading read is missing or out of its type and range, raises ReportError naming the
    file, the field and how to recover."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(
            f"report {path} cannot be read ({err}); delete it to retrain that run, "
            "every other report is untouched"
        ) from err
    return check_report(report, path)


# ---------------------------------------------------------------- loaders


def make_loaders(cfg: TrainConfig, data: RunData, device: str) -> tuple[tuple, str]:
    """((train, val, test) loaders, augment_path): on-device batches, or the original per-sample
    pipeline; ``augment_path`` says which augmentation path the train loader actually runs."""
    if cfg.loader == "torch":
        return _per_sample_loaders(cfg, data), ("none" if cfg.stage == "none" else "per-sample")
    augment = None if cfg.stage == "none" else BatchAugment(cfg.stage, cfg.p_aug, data.mean, data.std,
                                                                compile=cfg.compile)
    # Under compile the trailing partial batch is dropped before it is augmented (training skips it
    # anyway): one batch shape, one compiled graph per stage.
    train = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std,
                         device=device, shuffle=True, augment=augment, seed=cfg.seed, drop_last=cfg.compile)
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


def run(cfg: TrainConfig, *, device: str = "auto", quiet: bool = False,
        severities: tuple[int, ...] = DEFAULT_SEVERITIES, on_epoch_end=None, force: bool = False) -> dict:
    """Train one configuration, or load it (saying so) when an identical run has finished; ``force``
    retrains a finished run, replacing its report and model only once the new ones are written.

    An interrupted run resumes from its last finished epoch (per-epoch checkpoint).
    Returns the report (also written to ``reports/runs/<run_id>.json``).
    """
    requested = cfg
    cfg = canonical_config(cfg)
    say = announcer(quiet)
    finished = finished_report_path(cfg)
    if finished is not None and not force:
        say(f"finished run loaded from {finished} (retrain it with --force, or force=True)")
        return read_report(finished)
    # A forced retrain keeps the id its report was found under, so references to it (teachers) stay valid.
    key = finished.stem if finished is not None else run_id(cfg)
    device = preflight(cfg, device)
    say(f"run {key}: {cfg.model}, {cfg.epochs} epoch(s) on {device}" + (" (retraining a finished run)"
                                                                          if finished is not None else ""))
    trained = train_model(cfg, device, quiet=quiet, checkpoint=checkpoint_path(key), on_epoch_end=on_epoch_end,
                          metrics_csv=metrics_csv_path(key), tensorboard_dir=config.REPORTS_DIR / "tensorboard" / key)
    report = build_report(cfg, trained, device, severities, quiet)
    report["run_id"] = key
    report["requested_sizes"] = {"n_train": requested.n_train, "n_test": requested.n_test}
    atomic_torch_save(trained.model.state_dict(), model_path(key))
    report["model_sha256"] = file_sha256(model_path(key))
    # The report is the commit point: a forced retrain's old report stays whole until this replaces it.
    atomic_write_json(report_path(key), report)
    remove_checkpoint(checkpoint_path(key))
    say(f"report: {report_path(key)}")
    return report


def announcer(quiet: bool):
    """A function printing one progress line (stderr, like the per-epoch lines), or doing nothing."""
    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    return say


def preflight(cfg: TrainConfig, device: str) -> str:
    """Everything that can fail before training, checked before it starts: the device, the stage, the
    teacher and its model file, and that the report and model folders can be written. Returns the device."""
    device = check_device(device)
    stage_ops(cfg.stage)  # an unknown stage name fails here
    if cfg.teacher is not None:
        load_teacher(cfg.teacher, "cpu")  # a missing or damaged teacher fails here
    for folder in (config.RUNS_DIR, config.MODELS_DIR / "checkpoints"):
        ensure_writable(folder)
    return device


def check_device(device: str) -> str:
    """The device to train on ('auto' resolved); one that does not exist here is a ConfigError."""
    resolved = config.resolve_device(device)
    try:
        kind = torch.device(resolved).type
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r} ({err}); use cuda, mps, cpu or auto") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise ConfigError(f"device {device!r} is not available on this machine; use --device auto or cpu")
    return resolved


# Split sizes (train split, test split) of the datasets: what a run without n_train / n_test holds.
DATASET_SIZES = {"svhn": (73_257, 26_032), "synthetic": (config.SYNTHETIC_N_TRAIN, config.SYNTHETIC_N_TEST)}
# A process's CUDA context with cuDNN's and cuBLAS's workspaces: about 0.6 GB on recent GPUs (an
# estimate; benchmarks/bench_packing.py measures each run's peak allocation beside it).
CUDA_CONTEXT_BYTES = 600 * 2**20


def device_bytes(cfg: TrainConfig) -> int:
    """About the device memory one run of ``cfg`` holds: its images resident as uint8 (train, validation
    and test), float32 weights with their gradients and Adam's two moments, the activations a training
    step keeps for its backward pass at ``cfg.batch_size`` (every layer's float32 output, counted with
    forward hooks on a CPU batch of two), the process's CUDA context."""
    n_train, n_test = DATASET_SIZES.get(cfg.dataset, DATASET_SIZES["svhn"])
    images = min(cfg.n_train or n_train, n_train) + min(cfg.n_test or n_test, n_test)
    model = build_model(cfg.model)
    outputs = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
             for module in model.modules() if not list(module.children())]  # the leaf layers
    with torch.no_grad():
        model(torch.zeros(2, *config.IMAGE_SHAPE))
    for hook in hooks:
        hook.remove()
    activations = 4 * sum(outputs) // 2 * cfg.batch_size  # float32 per image, times the batch
    image_bytes = config.IMAGE_SHAPE[0] * config.IMAGE_SHAPE[1] * config.IMAGE_SHAPE[2]  # uint8
    return images * image_bytes + 4 * 4 * count_params(model) + activations + CUDA_CONTEXT_BYTES


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove it takes a file, so no run trains only to fail when saving."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to {folder} ({err.strerror or err}); make it writable or point "
                          "SVHN_AUG_REPORTS_DIR / SVHN_AUG_MODELS_DIR elsewhere") from None


@dataclasses.dataclass
class TrainedRun:
    """What training one configuration leaves behind, before its report is written."""

    model: torch.nn.Module
    fit_result: dict
    data: RunData
    loaders: tuple  # (train, val, test)
    augment_path: str  # "none", "batched" or "per-sample": the path the train loader ran


def train_model(cfg: TrainConfig, device: str, *, quiet: bool = False, checkpoint: Path | None = None,
                on_epoch_end=None, **watch) -> TrainedRun:
    """Build data, loaders and model; fit. ``watch`` goes to ``fit`` (metrics_csv, tensorboard_dir)."""
    data = prepare_data(cfg)
    loaders, augment_path = make_loaders(cfg, data, device)
    set_seed(cfg.seed)  # model initialisation is the only user of the global RNG
    model = build_model(cfg.model).to(device)
    teacher = load_teacher(cfg.teacher, device) if cfg.teacher else None
    fit_result = fit(model, loaders[0], loaders[1], cfg, device, teacher=teacher,
                     checkpoint_path=checkpoint, on_epoch_end=on_epoch_end, quiet=quiet, **watch)
    return TrainedRun(model, fit_result, data, loaders, augment_path)


def load_teacher(run_id: str, device: str) -> torch.nn.Module:
    """The frozen model of a finished run (eval mode, no gradients)."""
    path = report_path(run_id)
    if not path.exists():
        raise ConfigError(f"teacher run {run_id!r} has no report at {path}; train it first")
    report = read_report(path)
    teacher = build_model(report["config"]["model"]).to(device)
    teacher.load_state_dict(load_model_state(report, device))
    teacher.eval().requires_grad_(False)
    return teacher


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_model_state(report: dict, device: str) -> dict:
    """The saved weights of a finished run, checked against the hash its report recorded."""
    path = model_path(report["run_id"])
    fix = f"delete {report_path(report['run_id'])} and retrain that run"
    if not path.exists():
        raise ReportError(f"the model file {path} of run {report['run_id']} is missing; {fix}")
    if file_sha256(path) != report["model_sha256"]:
        raise ReportError(f"the model file {path} does not match its report (damaged or replaced); {fix}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # never retried with weights_only=False
        raise ReportError(f"the model file {path} is not a model this library wrote (it holds more than plain "
                          f"weights, so it was not loaded); {fix}") from err


# ---------------------------------------------------------------- the report


def build_report(cfg: TrainConfig, trained: TrainedRun, device: str, severities, quiet: bool = True) -> dict:
    """Everything a table or figure needs later, so nothing is retrained to draw it."""
    model, data = trained.model, trained.data
    announcer(quiet)(f"evaluating on {len(data.test_y):,} test images; "
                     f"corruptions at severities {list(severities) or 'none'}")
    y_true, y_pred, _ = predict(model, trained.loaders[2], device)
    y_true, y_pred = y_true.cpu(), y_pred.cpu()
    history = trained.fit_result["history"]
    test = compute_metrics(y_true, y_pred)
    val_f1 = [h["val_f1_macro"] for h in history]
    # Test images only: one trained model, so seed noise is not in it (reports label it so).
    ci = bootstrap_ci(y_true.numpy(), y_pred.numpy(), metric="f1_macro", seed=cfg.seed)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": run_id(cfg),
        "config": dataclasses.asdict(cfg),
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset == "synthetic",
        "sizes": {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
        "channel_stats": {"mean": list(data.mean), "std": list(data.std)},
        "augment_path": trained.augment_path,
        "test": test,
        "budget": {"train_images": len(data.train_y), "epochs": cfg.epochs},
        "flags": {"at_chance": at_chance(test["f1_macro"], y_true.numpy(), low=ci["low"]),
                  "still_improving": still_improving(val_f1, lrs=[h["lr"] for h in history]),
                  "chance_f1_macro": chance_band(y_true.numpy())},
        "test_f1_macro_ci": ci,
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


def best_val_f1(report: dict) -> float:
    """The validation macro-F1 of the weights a run kept (its best epoch): what selection uses."""
    return max(h["val_f1_macro"] for h in report["history"])


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
    """Macro-F1 on corrupted copies of the test images, per kind (mean over severities); no severities
    skips the evaluation (mean_f1_macro None)."""
    if not severities:
        return {"severities": [], "f1_macro": {}, "mean_f1_macro": None}
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
    return {"torch": torch.__version__, "device": str(device), "device_name": device_label(device),
            "git_commit": git_commit(), "python": sys.version.split()[0]}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=config.ROOT,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
