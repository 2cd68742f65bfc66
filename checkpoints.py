"""Checkpoints of a training run: everything ``training.fit`` needs to resume after its last finished epoch.

A checkpoint holds the configuration, the weights, the optimizer's and the scheduler's state, the run's
history and best weights (``RunState``), the loaders' generators and the global RNG of the CPU and the
training device, so that a resumed CPU run ends bit for bit like an uninterrupted one. It records the
device type it was written on: resumed on another one (written on a CPU, resumed on CUDA, or back), the
weights, optimizer, scheduler, history and the CPU's generator are restored, and what cannot move between
devices (the loaders' generators and the device's global generator, whose states differ in kind) is
re-seeded from the run's seed and epoch, deterministically, with a warning. Each save is
complete on disk before it replaces the file, and the one it replaces stays beside it as
``<checkpoint>.prev`` until the next save: a crash at any moment leaves a readable checkpoint, and a
damaged latest one falls back to the previous one.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

import atomic_io
import config

CHECKPOINT_FORMAT = 2  # 2: the device type is recorded ("device"); format 1 lacks it
CHECKPOINT_KEYS = frozenset({"format", "config", "epoch", "model", "optimizer", "scheduler", "history",
                             "best_state", "best_epoch", "best_f1", "loader_states", "rng"})


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` on the CPU (what a checkpoint keeps as the best weights)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _loader_states(train_loader, val_loader) -> dict:
    loaders = {"train": train_loader, "val": val_loader}
    return {name: loader.state_dict() for name, loader in loaders.items() if hasattr(loader, "state_dict")}


def _rng_state(device: torch.device) -> dict:
    # The global generators drive dropout (and anything else the model draws).
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    mps = torch.mps.get_rng_state() if device.type == "mps" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "mps": mps}


def _restore_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("mps") is not None and torch.backends.mps.is_available():  # absent in older checkpoints
        torch.mps.set_rng_state(rng["mps"])


def resume_seed(cfg: config.TrainConfig, epoch: int) -> int:
    """The seed that replaces the device-bound generators of a run resumed on another device after
    ``epoch``: a function of the run's seed and the epoch only, so two such resumptions agree."""
    return cfg.seed * 1_000_003 + epoch


def _reseed_device_bound(cfg: config.TrainConfig, epoch: int, loaders: tuple, device: torch.device) -> list[str]:
    """Re-seed the loaders' generators and ``device``'s global generator from ``resume_seed``; the names of
    what was re-seeded."""
    seed = resume_seed(cfg, epoch)
    reseeded = []
    for name, loader in zip(("train", "val"), loaders, strict=True):
        if hasattr(loader, "reseed"):
            loader.reseed(seed)
            reseeded.append(f"the {name} loader's generators")
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
        reseeded.append("CUDA's global generator")
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
        reseeded.append("MPS's global generator")
    return reseeded


def _restore_loaders(ckpt: dict, loaders: tuple) -> None:
    for name, loader in zip(("train", "val"), loaders, strict=True):
        if name in ckpt["loader_states"]:
            loader.load_state_dict(ckpt["loader_states"][name])


def _restore_randomness(ckpt: dict, cfg: config.TrainConfig, loaders: tuple, device: torch.device,
                        source: Path) -> None:
    """The loaders' and global generators as saved when the checkpoint was written on ``device``'s type
    (or by a format without the device, as long as its states fit); else the CPU's generator as saved and
    the device-bound ones re-seeded, with a warning."""
    saved = ckpt.get("device")
    if saved in (None, device.type):
        try:
            _restore_loaders(ckpt, loaders)
            _restore_rng_state(ckpt["rng"])
            return
        except RuntimeError:  # a format-1 checkpoint of another device: generator states of another kind
            if saved is not None:
                raise
    torch.set_rng_state(ckpt["rng"]["cpu"])
    reseeded = _reseed_device_bound(cfg, ckpt["epoch"], loaders, device)
    warnings.warn(f"checkpoint {source} was written on {saved or 'another device'} and resumes on {device.type}: "
                  f"weights, optimizer, schedule and history restored; {', '.join(reseeded) or 'nothing'} re-seeded "
                  f"from the run's seed and epoch {ckpt['epoch']} (deterministic, but the remaining epochs differ "
                  "from an uninterrupted run's)", RuntimeWarning, stacklevel=3)


@dataclasses.dataclass
class RunState:
    """What fit carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0  # last finished epoch
    history: list = dataclasses.field(default_factory=list)
    best_state: dict | None = None  # cpu_state of the best epoch's model
    best_epoch: int = 0
    best_f1: float = -1.0

    def add_epoch(self, record: dict, model: nn.Module) -> None:
        """Append a finished epoch's record (its "epoch" and "val_f1_macro" are read); keep a CPU copy of
        ``model``'s weights when that macro-F1 is the best so far."""
        self.history.append(record)
        self.epoch = record["epoch"]
        if record["val_f1_macro"] > self.best_f1:
            self.best_state, self.best_epoch, self.best_f1 = cpu_state(model), self.epoch, record["val_f1_macro"]


def previous_checkpoint_path(path: str | Path) -> Path:
    """Where ``save_checkpoint`` keeps the checkpoint it replaced: ``<path>.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | Path, cfg: config.TrainConfig, model: nn.Module, optimizer, scheduler,
                    state: RunState, loaders: tuple, device) -> Path:
    """Save everything a run needs to resume (weights, optimizer, scheduler, ``state``, the generators of
    the (train, val) ``loaders`` that have ``state_dict``, the global RNG of the CPU and ``device``).

    The new file is complete on disk before it replaces ``path``; the one it replaces is kept as
    ``previous_checkpoint_path(path)``, so a crash at any moment leaves a readable checkpoint."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(cfg),
        "epoch": state.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": state.history,
        "best_state": state.best_state,
        "best_epoch": state.best_epoch,
        "best_f1": state.best_f1,
        "loader_states": _loader_states(*loaders),
        "rng": _rng_state(torch.device(device)),
        "device": torch.device(device).type,
    }
    fresh = atomic_io.atomic_torch_save(payload, path.with_name(path.name + ".next"))
    if path.exists():
        os.replace(path, previous_checkpoint_path(path))
    os.replace(fresh, path)
    return path


def remove_checkpoint(path: str | Path) -> None:
    """Delete a run's checkpoint and the previous one kept beside it (once the run is finished)."""
    path = Path(path)
    for stale in (path, previous_checkpoint_path(path), path.with_name(path.name + ".next")):
        stale.unlink(missing_ok=True)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint's contents, or None (with a warning) when the file is damaged or incomplete."""
    try:
        # Only tensors and plain containers inside, so the safe weights_only loader reads it.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).split(". ")[0] or type(err).__name__  # torch's first sentence says enough
        if path.stat().st_size == 0:
            reason = "the file is empty"
        warnings.warn(f"checkpoint {path} is damaged and cannot be read ({reason})", RuntimeWarning,
                      stacklevel=4)
        return None
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        warnings.warn(f"checkpoint {path} is incomplete and cannot be read (no {sorted(missing)})",
                      RuntimeWarning, stacklevel=4)
        return None
    return ckpt


def _newest_readable_checkpoint(path: Path) -> tuple[Path, dict] | None:
    """(file, contents) of ``path``, else of the previous checkpoint; None when neither is readable."""
    candidates = [c for c in (path, previous_checkpoint_path(path)) if c.exists()]
    for candidate in candidates:
        ckpt = _read_checkpoint(candidate)
        if ckpt is not None:
            if candidate != path:
                warnings.warn(f"resuming from the previous checkpoint {candidate} (one epoch more to train)",
                              RuntimeWarning, stacklevel=3)
            return candidate, ckpt
    if candidates:
        warnings.warn(f"no readable checkpoint at {path}: the run restarts from its first epoch",
                      RuntimeWarning, stacklevel=3)
    return None


def load_checkpoint(path: str | Path, cfg: config.TrainConfig, model: nn.Module, optimizer, scheduler,
                    loaders: tuple, device=None) -> RunState:
    """Restore what ``save_checkpoint`` saved into the model, optimizer, scheduler, loaders and the
    global RNG, and return the run's state; a fresh ``RunState()`` (nothing restored) when there is no
    checkpoint. A damaged latest checkpoint falls back to the previous one, and a run with none readable
    restarts from scratch, each with a warning. ``device``: where the run resumes (None: the model's
    device); a checkpoint written on another device type re-seeds what cannot move (see the module's
    docstring). Raises ConfigError for a checkpoint of another configuration."""
    found = _newest_readable_checkpoint(Path(path))
    if found is None:
        return RunState()
    source, ckpt = found
    saved_cfg = ckpt["config"]
    if saved_cfg != dataclasses.asdict(cfg):
        changed = sorted(k for k in saved_cfg.keys() | dataclasses.asdict(cfg).keys()
                         if saved_cfg.get(k) != getattr(cfg, k, None))
        raise config.ConfigError(
            f"checkpoint {source} belongs to another configuration (fields {changed} differ); "
            f"delete it or resume with the same TrainConfig"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # its state moves to the parameters' device
    if scheduler is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    _restore_randomness(ckpt, cfg, loaders, device, source)
    return RunState(ckpt["epoch"], ckpt["history"], ckpt["best_state"], ckpt["best_epoch"], ckpt["best_f1"])
