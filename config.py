"""Paths, constants and the run configuration shared by every module.

Imports none of the project's modules and has no side effects at import: no
directory is created here (callers create what they write into).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Every path can be moved with an environment variable (tests point them at tmp dirs).
DATA_DIR = Path(os.environ.get("SVHN_AUG_DATA_DIR", ROOT / "data"))
MODELS_DIR = Path(os.environ.get("SVHN_AUG_MODELS_DIR", ROOT / "models"))
REPORTS_DIR = Path(os.environ.get("SVHN_AUG_REPORTS_DIR", ROOT / "reports"))
FIGURES_DIR = REPORTS_DIR / "figures"
RUNS_DIR = REPORTS_DIR / "runs"

NUM_CLASSES = 10
# One display name per model, used by every table and figure.
MODEL_DISPLAY_NAMES = {"simplecnn": "SimpleCNN", "resnet18": "ResNet18Cifar"}
CLASS_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))
IMAGE_SHAPE = (3, 32, 32)

# Channel statistics of the SVHN train split (FACTS.md), in [0, 1] units.
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1977, 0.2007, 0.1966)
# Train-split class counts for digits 0-9; the synthetic data follows these shares.
SVHN_TRAIN_CLASS_COUNTS = (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659)

DATASETS = ("svhn", "synthetic")
SPLITS = ("train", "test", "extra")
MODELS = ("simplecnn", "resnet18")

# The five cumulative stages of the original study, plus "none" (no augmentation).
STAGES = (
    "none",
    "stage1_basic",
    "stage2_geometry",
    "stage3_color",
    "stage4_blur_noise",
    "stage5_occlusion",
)
# The same stages without the horizontal flip (published SVHN recipes never mirror digits).
NOFLIP_SUFFIX = "_noflip"
NOFLIP_STAGES = tuple(f"{stage}{NOFLIP_SUFFIX}" for stage in STAGES[1:])
# torchvision's learned policies; they run through the per-sample path only.
POLICY_STAGES = ("autoaugment_svhn", "randaugment", "trivialaugment")
ALL_STAGES = STAGES + NOFLIP_STAGES + POLICY_STAGES
# Names added at run time by augmentations.register_stage (a user's own stages).
CUSTOM_STAGES: set[str] = set()

P_AUG_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "onecycle", "cosine")
LOADERS = ("device", "torch")  # fast on-device batches, or the original per-sample DataLoader

# Default size of the offline synthetic SVHN (generated once, then reused).
SYNTHETIC_N_TRAIN = 20_000
SYNTHETIC_N_TEST = 5_000
SYNTHETIC_SEED = 0


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what would."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError with ``message`` unless ``ok`` (every module's input checks use this)."""
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one training run; reports store ``asdict(cfg)``."""

    model: str = "simplecnn"
    dataset: str = "synthetic"
    stage: str = "none"
    p_aug: float = 0.0
    seed: int = 42
    epochs: int = 15
    batch_size: int = 384
    eval_batch_size: int = 2048
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "none"
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    # Use only this many training images (stratified subsample); None = the whole split.
    n_train: int | None = None
    # Evaluate on only this many test images; None = the whole split.
    n_test: int | None = None
    loader: str = "device"
    num_workers: int = 2  # DataLoader workers of the "torch" loader only
    compile: bool = False
    # Distillation: run id of the teacher, or None for ordinary training.
    teacher: str | None = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.7
    preset: str = "original"

    def __post_init__(self) -> None:
        validate_config(self)

    def effective(self) -> TrainConfig:
        """The same run in canonical form: with p_aug = 0 or no stage, nothing is augmented."""
        if self.p_aug == 0.0 or self.stage == "none":
            return dataclasses.replace(self, stage="none", p_aug=0.0)
        return self

    def run_id(self) -> str:
        """A readable, unique key of the configuration (identical runs share it)."""
        cfg = self.effective()
        digest = hashlib.sha1(
            json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()
        ).hexdigest()[:10]
        kind = "kd-" if cfg.teacher else ""
        return f"{cfg.dataset}-{kind}{cfg.model}-{cfg.stage}-p{cfg.p_aug:g}-s{cfg.seed}-{digest}"


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the valid choices for the first bad field."""
    require(cfg.model in MODELS, f"unknown model {cfg.model!r}; choose one of {MODELS}")
    require(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; choose one of {DATASETS}")
    require(cfg.stage in ALL_STAGES or cfg.stage in CUSTOM_STAGES,
             f"unknown stage {cfg.stage!r}; choose one of {ALL_STAGES + tuple(sorted(CUSTOM_STAGES))}")
    require(0.0 <= cfg.p_aug <= 1.0, f"p_aug must lie in [0, 1], got {cfg.p_aug}")
    require(cfg.optimizer in OPTIMIZERS, f"unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}")
    require(cfg.scheduler in SCHEDULERS, f"unknown scheduler {cfg.scheduler!r}; choose one of {SCHEDULERS}")
    require(cfg.loader in LOADERS, f"unknown loader {cfg.loader!r}; choose one of {LOADERS}")
    require(cfg.preset in PRESETS, f"unknown preset {cfg.preset!r}; choose one of {tuple(PRESETS)}")
    require(cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}")
    require(cfg.batch_size >= 1, f"batch_size must be at least 1, got {cfg.batch_size}")
    require(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    require(cfg.weight_decay >= 0, f"weight_decay must be non-negative, got {cfg.weight_decay}")
    require(0.0 < cfg.val_fraction < 1.0, f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    require(0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    require(0.0 <= cfg.kd_alpha <= 1.0, f"kd_alpha must lie in [0, 1], got {cfg.kd_alpha}")
    require(cfg.kd_temperature > 0, f"kd_temperature must be positive, got {cfg.kd_temperature}")


# The original study's exact settings (FACTS.md) and a stronger recipe.
PRESETS: dict[str, dict] = {
    "original": dict(
        epochs=15, batch_size=384, optimizer="adam", lr=1e-3, weight_decay=1e-4,
        scheduler="none", label_smoothing=0.0, val_fraction=0.1, seed=42,
    ),
    # AdamW with a one-cycle schedule (lr is its peak) and label smoothing: it anneals to a
    # small lr by the last epoch whatever the budget (measured: `python experiments.py presets`).
    "strong": dict(
        epochs=15, batch_size=384, optimizer="adamw", lr=3e-3, weight_decay=0.05,
        scheduler="onecycle", label_smoothing=0.1, val_fraction=0.1, seed=42,
    ),
}


def preset_config(preset: str = "original", **overrides) -> TrainConfig:
    """A TrainConfig from a named preset, with any field overridden."""
    require(preset in PRESETS, f"unknown preset {preset!r}; choose one of {tuple(PRESETS)}")
    fields = {**PRESETS[preset], "preset": preset, **overrides}
    return TrainConfig(**fields)


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when present, then Apple's MPS, then the CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch  # local: config must stay importable without heavy work at import

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"
