"""Training and evaluation loops, metrics and the distillation loss.

Works with any model and any loader that yields ``(x, y)`` batches: the project's DeviceLoader
(normalized float32 (B, 3, 32, 32) and int64 (B,) already on the device) or a torch DataLoader
(CPU tensors, moved here). The hot loop never waits for the device: losses, correct counts and the
first non-finite loss are tracked on the device and read once per epoch. Every ``CHECK_EVERY``
steps the host looks for a diverged loss: on the CPU and MPS directly, on CUDA through an
asynchronous copy that it reads only once it has landed (never waiting), so a diverged CUDA run
stops a check or two later. Evaluation keeps labels and logits on the device and counts the confusion matrix there.

On CUDA the model's forward pass runs in bfloat16 autocast on channels_last tensors, with cuDNN's
autotuner on while a loop runs; the loader's batches (augmentation included), the loss and the metrics
stay float32. On the CPU and on Apple's MPS everything stays float32 (channels_last on the CPU when
``CPU_CHANNELS_LAST``), so CPU runs are bit-for-bit reproducible and resumable.

``fit`` prints one line per epoch (loss, validation macro-F1, images/s, ETA) unless ``quiet``, with a
per-step bar on a terminal or in a notebook; it can also log each epoch to a CSV file and to
TensorBoard. Its checkpoints (``checkpoints.py``) keep the previous one (``<checkpoint>.prev``) until a new
one is complete.

Randomness comes from the caller: seed the globals (``data_loading.set_seed``) before building the
model; the loaders own their generators. Nothing here reseeds anything.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import TqdmWarning

with warnings.catch_warnings():
    # tqdm.auto: widgets in a notebook (with ipywidgets), text bars elsewhere; without ipywidgets a
    # notebook gets text bars instead of a warning in every cell that imports this module.
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

import atomic_io
import config
from checkpoints import RunState, load_checkpoint, save_checkpoint
from stats import metrics_from_confusion

# A diverged loss is looked for on the host every this many steps (never waiting for a CUDA device).
CHECK_EVERY = 50
# float32 training on the CPU in channels_last (oneDNN's blocked convolutions): measured by
# benchmarks/bench_training.py --layout (results in benchmarks/results/training_cpu.json, "layout").
CPU_CHANNELS_LAST = True
# Devices with torch's fused Adam, AdamW and SGD kernels (on the CPU about 5x faster than foreach for
# ResNet18Cifar's 11 M parameters).
FUSED_DEVICES = ("cuda", "cpu")
# The model's forward pass runs in autocast with this dtype on these device types; everything else
# (MPS included, until bf16 is shown to work there) stays float32.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"cuda": torch.bfloat16}


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; names the epoch and the step (1-based, within the epoch)."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(
            f"training diverged in epoch {epoch} at step {step}: loss = {value}; "
            f"try a lower learning rate (lr)"
        )

    def __reduce__(self):
        # Rebuild from the three fields, so the error survives pickling (worker processes, Optuna).
        return (type(self), (self.epoch, self.step, self.value))


# ---------------------------------------------------------------------------------------------
# Metrics and losses
# ---------------------------------------------------------------------------------------------


def _as_label_tensor(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).long()
    return torch.as_tensor(np.array(values)).reshape(-1).long()


def confusion_matrix(y_true, y_pred, num_classes: int = config.NUM_CLASSES) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts on the labels' device; rows are true, columns predicted."""
    y_true, y_pred = _as_label_tensor(y_true), _as_label_tensor(y_pred)
    y_pred = y_pred.to(y_true.device)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.numel()} labels but y_pred has {y_pred.numel()}")
    if y_true.numel() == 0:
        raise ValueError("no labels to score")
    both = torch.cat([y_true, y_pred])
    lo, hi = torch.stack([both.min(), both.max()]).tolist()  # one host read
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got values in {lo}..{hi}")
    counts = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def compute_metrics(y_true, y_pred, num_classes: int = config.NUM_CLASSES) -> dict:
    """stats.metrics_from_confusion of the labels' confusion matrix: accuracy, macro/weighted and
    per-class precision, recall and F1, support and the matrix, as plain Python numbers (JSON-ready).

    Accepts numpy arrays, lists or tensors on any device; the matrix is counted on the labels' device
    and copied to the host once.
    """
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes).cpu().numpy())


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    T: float = 4.0,
    alpha: float = 0.7,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton distillation: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    The KL term is averaged over the batch ("batchmean"); T^2 keeps its gradients on the scale of
    the cross-entropy's. Logits (B, C) are promoted to float32 (they are bfloat16 under autocast).
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * T * T * kl + (1.0 - alpha) * ce


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: config.TrainConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, optional Nesterov) with cfg.lr and cfg.weight_decay on every
    parameter; torch's fused kernels (one kernel per step) on CUDA and the CPU, the foreach ones
    elsewhere."""
    params = list(model.parameters())
    speed = {"fused": True} if params[0].device.type in FUSED_DEVICES else {"foreach": True}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **speed)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **speed)
    if cfg.optimizer == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise config.ConfigError(f"nesterov needs a positive momentum, got {cfg.momentum}")
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay, **speed,
        )
    raise config.ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose one of {config.OPTIMIZERS}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: config.TrainConfig, steps_per_epoch: int):
    """None for "none"; OneCycleLR (peak cfg.lr) or CosineAnnealingLR over every step of the run.

    Both are stepped once per batch, so ``steps_per_epoch`` must be the train loader's length.
    """
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "none":
        return None
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise config.ConfigError(f"unknown scheduler {cfg.scheduler!r}; choose one of {config.SCHEDULERS}")


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------


def autocast_dtype(device) -> torch.dtype | None:
    """The dtype the model's forward pass autocasts to on ``device`` (``AUTOCAST_DTYPES``), or None
    for float32 throughout."""
    return AUTOCAST_DTYPES.get(torch.device(device).type)


def _autocast(device: torch.device):
    # Wraps the model's forward pass only: loaders (augmentation), losses and metrics stay float32.
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device):
    """cuDNN times its convolution algorithms once per new shape while a loop runs (batch shapes repeat,
    so the search pays for itself within an epoch); the caller's setting is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def synchronize(device) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA, MPS); nothing to wait for on the CPU.

    Read clocks only after this, or an accelerator's time is not measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_label(device) -> str:
    """A readable name of ``device`` for reports and benchmarks: the GPU's name on CUDA, "Apple MPS" on
    MPS, the CPU's model name (or "cpu") otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return _cpu_model_name()


def _cpu_model_name() -> str:
    try:  # Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":  # macOS names its CPU through sysctl ("Apple M2 Pro")
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=True)
            return out.stdout.strip() or "cpu"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "cpu"


def _channels_last(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and CPU_CHANNELS_LAST)


def prepare_model(model: nn.Module, device) -> None:
    """Put ``model``'s weights in the memory format the loops use on ``device`` (channels_last on CUDA,
    and on the CPU when ``CPU_CHANNELS_LAST``), in place. ``fit`` does this before it builds the
    optimizer; do the same when building an optimizer for ``train_epoch`` yourself."""
    # channels_last lets cuDNN (oneDNN on the CPU) pick its fastest convolutions; a no-op once converted.
    if _channels_last(torch.device(device)):
        model.to(memory_format=torch.channels_last)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if x.ndim == 4 and _channels_last(device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


class _EpochStats:
    """Sums of one training epoch, kept on the device so that the steps never wait for it.

    Tracks the per-sample loss sum, the correct predictions and the first step whose loss was not
    finite (with that loss). ``poll`` lets the host look at them mid-epoch without blocking;
    ``finish`` is the epoch's one read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)  # -1: every loss finite so far
        self.bad_value = torch.zeros((), device=device)
        self.images = 0  # known on the host: batch sizes are shapes
        self._pending = None  # CUDA: (pinned host copy, images at that time, event marking its arrival)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Fold in one step: loss () float32, logits (B, C), y (B,); only device work is queued."""
        first_bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_value = torch.where(first_bad, loss, self.bad_value)
        self.loss_sum += loss * y.shape[0]
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.images += y.shape[0]

    def _snapshot(self) -> torch.Tensor:
        # (3,): first bad step (exact in float32 below 2**24 steps), its loss, the loss sum.
        return torch.stack([self.bad_step.float(), self.bad_value, self.loss_sum])

    def poll(self, epoch: int) -> float | None:
        """Raise DivergenceError when the host can see a non-finite loss; else the mean loss it saw.

        CPU: the current values (reading them costs nothing). CUDA: the copy started by the previous
        poll if it has landed (else None), and a new copy is started; the host never waits.
        """
        if self.device.type != "cuda":
            return self._mean_loss(epoch, self._snapshot().tolist(), self.images)
        seen = None
        if self._pending is not None:
            host, images, landed = self._pending
            if not landed.query():
                return None
            seen = self._mean_loss(epoch, host.tolist(), images)
        host = torch.empty(3, pin_memory=True)
        host.copy_(self._snapshot(), non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        self._pending = (host, self.images, landed)
        return seen

    def finish(self, epoch: int) -> tuple[float, float]:
        """(mean loss, accuracy) of the epoch: the one blocking read; raises DivergenceError."""
        if self.images == 0:
            raise ValueError("the train loader yielded no batches")
        loss = self._mean_loss(epoch, self._snapshot().tolist(), self.images)
        return loss, self.correct.item() / self.images

    @staticmethod
    def _mean_loss(epoch: int, values: list[float], images: int) -> float:
        bad_step, bad_value, loss_sum = values
        if bad_step >= 0:
            raise DivergenceError(epoch, int(bad_step), bad_value)
        return loss_sum / images


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device,
    *,
    scheduler=None,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    kd_temperature: float = 4.0,
    kd_alpha: float = 0.7,
    epoch: int = 1,
    epochs: int | None = None,
    progress: bool | None = False,
    drop_partial: bool = False,
) -> dict:
    """One pass over ``loader``; the scheduler (if any) steps after every batch.

    With a ``teacher`` the loss is ``kd_loss`` against the frozen teacher's logits on the same batch.
    ``progress``: a per-step bar ("epoch 3/15") on stderr; None shows it on a terminal or in a
    notebook only. ``drop_partial`` skips every batch whose size differs from the first one (the
    trailing partial batch), so that a compiled model sees one input shape and never recompiles.
    Returns {"loss": mean train loss, "accuracy", "images", "seconds"} (seconds between two device
    synchronizations). Raises DivergenceError when a loss is NaN or infinite (seen at a periodic
    check, see the module's docstring, or at the end of the epoch).
    """
    device = torch.device(device)
    model.train()
    prepare_model(model, device)
    if teacher is not None:
        teacher.eval()
        prepare_model(teacher, device)
    stats = _EpochStats(device)
    synchronize(device)
    start = time.perf_counter()
    label = f"epoch {epoch}" if epochs is None else f"epoch {epoch}/{epochs}"
    bar = tqdm(loader, total=_length(loader), desc=label, disable=None if progress is None else not progress,
               leave=False, file=sys.stderr)
    full_size, step = None, 0
    with _cudnn_autotune(device), bar:
        for x, y in bar:
            full_size = full_size or y.shape[0]
            if drop_partial and y.shape[0] != full_size:
                continue
            step += 1
            x, y = _to_device(x, y, device)
            loss, logits = _train_step(model, x, y, optimizer, scheduler, teacher,
                                       label_smoothing, kd_temperature, kd_alpha)
            stats.add(step, loss, logits, y)
            if step % CHECK_EVERY == 0:
                mean_loss = stats.poll(epoch)
                if mean_loss is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
    loss, accuracy = stats.finish(epoch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"loss": loss, "accuracy": accuracy, "images": stats.images, "seconds": seconds}


def _train_step(model, x, y, optimizer, scheduler, teacher, label_smoothing, kd_temperature, kd_alpha):
    """One optimizer step on x (B, C, H, W), y (B,); returns the detached loss () and logits (B, K)."""
    with _autocast(x.device):  # the model only: the loss below is computed in float32
        logits = model(x)  # (B, K)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
    if teacher is None:
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    else:
        loss = kd_loss(logits, teacher_logits, y, kd_temperature, kd_alpha, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def _forward_all(model: nn.Module, loader: Iterable, device, label_smoothing: float = 0.0):
    """(y_true (N,), logits (N, C) float32, summed loss ()) on the device: nothing is read on the host.

    Autocast wraps the model call only, so an augmenting loader's batches stay float32."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    prepare_model(model, device)
    targets, logits_list = [], []
    loss_sum = torch.zeros((), device=device)
    with _cudnn_autotune(device):
        for x, y in loader:
            x, y = _to_device(x, y, device)
            with _autocast(device):
                logits = model(x)
            logits = logits.float()  # (B, C)
            loss_sum += F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
            targets.append(y)
            logits_list.append(logits)
    model.train(was_training)
    if not targets:
        raise ValueError("the evaluation loader yielded no batches")
    return torch.cat(targets), torch.cat(logits_list), loss_sum


def predict(model: nn.Module, loader: Iterable, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_true (N,), y_pred (N,), logits (N, C) float32) over the loader, as CPU tensors.

    The model runs in eval mode (its previous mode is restored afterwards)."""
    y_true, logits, _ = _forward_all(model, loader, device)
    return y_true.cpu(), logits.argmax(dim=1).cpu(), logits.cpu()


def eval_epoch(model: nn.Module, loader: Iterable, device, label_smoothing: float = 0.0) -> dict:
    """{"loss": mean cross-entropy, "accuracy", "metrics": compute_metrics of the predictions,
    "y_true", "y_pred" (label CPU tensors)}. The confusion matrix is counted on the device."""
    y_true, logits, loss_sum = _forward_all(model, loader, device, label_smoothing)
    y_pred = logits.argmax(dim=1)  # (N,)
    metrics = compute_metrics(y_true, y_pred)
    return {
        "loss": loss_sum.item() / y_true.numel(),
        "accuracy": metrics["accuracy"],
        "metrics": metrics,
        "y_true": y_true.cpu(),
        "y_pred": y_pred.cpu(),
    }


def evaluate(model: nn.Module, loader: Iterable, device) -> dict:
    """compute_metrics plus "loss" (mean cross-entropy) for the whole loader.

    Two more keys hold the raw labels in loader order, as CPU int64 tensors (drop them before
    writing JSON): "predictions" and "targets".
    """
    result = eval_epoch(model, loader, device)
    return {**result["metrics"], "loss": result["loss"], "predictions": result["y_pred"],
            "targets": result["y_true"]}


# ---------------------------------------------------------------------------------------------
# Watching a run: a line per epoch, a CSV log, TensorBoard
# ---------------------------------------------------------------------------------------------


def epoch_line(record: dict, epochs: int, seconds_left: float) -> str:
    """"epoch 3/15  loss 0.4123  val macro-F1 0.8710  img/s 12,345  ETA 1m05s" for one history record."""
    return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
            f"val macro-F1 {record['val_f1_macro']:.4f}  img/s {record['train_images_per_s']:,.0f}  "
            f"ETA {format_duration(seconds_left)}")


def format_duration(seconds: float) -> str:
    """"1m05s" or "2h03m": a duration as progress lines show it."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def write_metrics_csv(path: str | Path, history: list[dict]) -> Path:
    """All epoch records as CSV (one row per epoch, columns in record order), written atomically: a
    reader sees the previous epoch's file or this one, and a resumed run rewrites it from its history."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return atomic_io.atomic_write_text(path, buffer.getvalue())


def _warn_tensorboard(what: str, err: BaseException) -> None:
    """TensorBoard is a convenience: its failure (a broken install, a full disk) is said and never stops a run."""
    warnings.warn(f"TensorBoard logging off for this run ({what}: {type(err).__name__}: {err}); the run goes on "
                  "and its metrics CSV and report are written as usual", RuntimeWarning, stacklevel=4)


def _tensorboard_writer(log_dir: str | Path | None):
    """A SummaryWriter, or None without a log_dir, without tensorboard or when it fails to start (said once)."""
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))
    except ModuleNotFoundError as err:  # tensorboard is optional: not installed is no failure
        if err.name not in ("tensorboard", "torch.utils.tensorboard"):  # installed, but something it imports
            # is missing: a broken install
            _warn_tensorboard("cannot start a writer", err)
        return None
    except Exception as err:  # noqa: BLE001 - a broken install raises anything (protobuf, numpy, OSError)
        _warn_tensorboard("cannot start a writer", err)
        return None


class _RunLog:
    """Where fit reports each finished epoch: a line on stderr, the CSV file, TensorBoard."""

    def __init__(self, epochs: int, quiet: bool, metrics_csv, tensorboard_dir) -> None:
        self.epochs, self.quiet, self.metrics_csv = epochs, quiet, metrics_csv
        self.writer = _tensorboard_writer(tensorboard_dir)
        self.seconds: list[float] = []  # epochs timed in this process (a resumed run's ETA uses them)

    def epoch_done(self, record: dict, history: list[dict]) -> None:
        self.seconds.append(record["seconds"])
        if not self.quiet:
            left = (self.epochs - record["epoch"]) * sum(self.seconds) / len(self.seconds)
            tqdm.write(epoch_line(record, self.epochs, left), file=sys.stderr)
        if self.metrics_csv is not None:
            write_metrics_csv(self.metrics_csv, history)
        self._tensorboard(lambda writer: self._scalars(writer, record), "cannot write an epoch")

    @staticmethod
    def _scalars(writer, record: dict) -> None:
        for key, value in record.items():
            if key != "epoch":
                writer.add_scalar(key, value, record["epoch"])
        writer.flush()

    def _tensorboard(self, action, what: str) -> None:
        """``action(writer)``; a failure warns and turns the writer off for the rest of the run (so once)."""
        if self.writer is None:
            return
        try:
            action(self.writer)
        except Exception as err:  # noqa: BLE001 - any failure of an optional logger
            self.writer = None
            _warn_tensorboard(what, err)

    def close(self) -> None:
        self._tensorboard(lambda writer: writer.close(), "cannot close the writer")
        self.writer = None


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------


def _steps_per_epoch(loader, drop_partial: bool) -> int:
    """Batches ``train_epoch`` trains on per epoch: without the trailing partial batch when
    ``drop_partial`` and the loader says how many samples it holds (DeviceLoader, DataLoader)."""
    samples = getattr(loader, "num_samples", None)
    if samples is None and hasattr(loader, "dataset"):
        samples = len(loader.dataset)
    batch_size = getattr(loader, "batch_size", None)
    if not drop_partial or samples is None or not batch_size:
        return len(loader)
    return max(samples // batch_size, 1)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    cfg: config.TrainConfig,
    device,
    *,
    teacher: nn.Module | None = None,
    checkpoint_path: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    quiet: bool = False,
    metrics_csv: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    progress: bool | None = None,
) -> dict:
    """Train for cfg.epochs, pick the epoch with the best validation macro-F1 and restore its weights.

    Optimizer, schedule, label smoothing and distillation settings come from ``cfg``; with a
    ``teacher`` the loss is ``kd_loss``. With ``cfg.compile`` the training steps run a compiled copy
    of the model on full batches only (the trailing partial batch is skipped, so nothing recompiles)
    and validation runs the uncompiled model. With ``checkpoint_path`` the whole state (weights,
    optimizer, scheduler, history, best weights, loader generators, global RNG) is saved after every
    epoch (see ``checkpoints.save_checkpoint``), and a run that finds it resumes after its last finished epoch: on
    the CPU the resumed run ends with exactly the weights and history (timings aside) of an
    uninterrupted one. ``on_epoch_end(epoch, record)`` runs after each epoch's checkpoint; it may raise
    to stop the run (e.g. Optuna pruning), in which case the last epoch's weights stay on the model.

    Unless ``quiet``, each epoch leaves one line on stderr (``epoch_line``), with a per-step bar on a
    terminal or in a notebook; ``progress`` is the older spelling of ``not quiet`` and wins when given.
    ``metrics_csv``: every epoch's record as a CSV row (``write_metrics_csv``); ``tensorboard_dir``:
    the records as TensorBoard scalars when tensorboard is installed (skipped silently otherwise; any
    failure of TensorBoard warns once per run and never stops it).

    Returns {"history": [record per epoch], "best_epoch", "best_val_f1_macro", "seconds_per_epoch",
    "resumed_from_epoch"}; a record holds epoch, train_loss, train_accuracy, val_loss, val_accuracy,
    val_f1_macro, lr (at the epoch's first step), seconds (train + validation), train_seconds and
    train_images_per_s.
    """
    quiet = quiet if progress is None else not progress
    device = torch.device(device)
    optimizer, scheduler = _prepare_fit(model, teacher, train_loader, cfg, device)
    loaders = (train_loader, val_loader)
    state = RunState()
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path, cfg, model, optimizer, scheduler, loaders, device)
    resumed_from = state.epoch
    train_model = torch.compile(model) if cfg.compile else model
    log = _RunLog(cfg.epochs, quiet, metrics_csv, tensorboard_dir)
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            record = _fit_epoch(epoch, train_model, model, loaders, optimizer, scheduler, cfg, device,
                                teacher, quiet)
            state.add_epoch(record, model)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, cfg, model, optimizer, scheduler, state, loaders, device)
            log.epoch_done(record, state.history)
            if on_epoch_end is not None:
                on_epoch_end(epoch, copy.deepcopy(record))
    finally:
        log.close()

    model.load_state_dict(state.best_state)
    return {
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_val_f1_macro": state.best_f1,
        "seconds_per_epoch": [r["seconds"] for r in state.history],
        "resumed_from_epoch": resumed_from,
    }


def _prepare_fit(model, teacher, train_loader, cfg, device: torch.device):
    """Move the networks to ``device`` and build fit's (optimizer, scheduler)."""
    model.to(device)
    prepare_model(model, device)  # before the optimizer builds its state in the same memory format
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = build_optimizer(model, cfg)
    return optimizer, build_scheduler(optimizer, cfg, _steps_per_epoch(train_loader, cfg.compile))


def _fit_epoch(epoch, train_model, model, loaders, optimizer, scheduler, cfg, device, teacher, quiet) -> dict:
    """Train one epoch (on ``train_model``, maybe compiled), validate ``model``; the epoch's record."""
    lr = float(optimizer.param_groups[0]["lr"])
    train = train_epoch(
        train_model, loaders[0], optimizer, device, scheduler=scheduler,
        label_smoothing=cfg.label_smoothing, teacher=teacher, kd_temperature=cfg.kd_temperature,
        kd_alpha=cfg.kd_alpha, epoch=epoch, epochs=cfg.epochs, progress=False if quiet else None,
        drop_partial=cfg.compile,
    )
    start = time.perf_counter()
    # The uncompiled module: evaluation's own batch sizes never reach the compiled graph.
    val = eval_epoch(model, loaders[1], device, label_smoothing=cfg.label_smoothing)
    return {
        "epoch": epoch,
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_f1_macro": val["metrics"]["f1_macro"],
        "lr": lr,
        "seconds": train["seconds"] + time.perf_counter() - start,
        "train_seconds": train["seconds"],
        "train_images_per_s": train["images"] / max(train["seconds"], 1e-9),
    }
