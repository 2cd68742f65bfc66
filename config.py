"""Paths, constants and the run configuration shared by every module.

Imports none of the project's modules and has no side effects at import: no
directory is created here (callers create what they write into).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says what would."""


# Every path can be moved with an environment variable (tests point them at tmp dirs). A variable set
# but empty (an unset shell variable expanded: SVHN_AUG_DATA_DIR=$UNSET) would mean the current folder:
# its paths are then left undefined and reading them raises ConfigError naming the variable (__getattr__).
PATH_VARIABLES = {"DATA_DIR": "SVHN_AUG_DATA_DIR", "MODELS_DIR": "SVHN_AUG_MODELS_DIR",
                  "REPORTS_DIR": "SVHN_AUG_REPORTS_DIR"}
_DERIVED_PATHS = {"FIGURES_DIR": ("REPORTS_DIR", "figures"), "RUNS_DIR": ("REPORTS_DIR", "runs")}
# Figure files: PNG always; PDF and SVG are the vector copies a paper prints (`figures --format`).
FIGURE_FORMATS = ("png", "pdf", "svg")


def empty_path_variables(environ: typing.Mapping[str, str] = os.environ) -> dict[str, str]:
    """Path names (``DATA_DIR``...) whose environment variable is set but empty or blank -> the variable."""
    return {name: var for name, var in PATH_VARIABLES.items() if var in environ and not environ[var].strip()}


_EMPTY_PATH_VARIABLES = empty_path_variables()
for _name, _var in PATH_VARIABLES.items():
    if _name not in _EMPTY_PATH_VARIABLES:
        globals()[_name] = Path(os.environ.get(_var, ROOT / _name.removesuffix("_DIR").lower()))
for _name, (_parent, _child) in _DERIVED_PATHS.items():
    if _parent not in _EMPTY_PATH_VARIABLES:
        globals()[_name] = globals()[_parent] / _child


def __getattr__(name: str):
    """Only reached for a path whose environment variable is set but empty (see PATH_VARIABLES)."""
    source = _DERIVED_PATHS.get(name, (name,))[0]
    if source in _EMPTY_PATH_VARIABLES:
        var, default = _EMPTY_PATH_VARIABLES[source], ROOT / source.removesuffix("_DIR").lower()
        raise ConfigError(f"the environment variable {var} is set but empty (it would mean the current folder); "
                          f"set it to a folder, or unset it for the default {default}")
    raise AttributeError(f"module 'config' has no attribute {name!r}")


# ---------------------------------------------------------------- names that become file names

# Stage names, run ids, queue and study names and teacher ids end up in file names (reports/runs/<run id>.json)
# or beside them: one rule keeps them a single, portable path component.
NAME_MAX_LENGTH = 150
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def safe_name_problem(name) -> str | None:
    """Why ``name`` cannot be part of a file name, or None: 1-150 ASCII letters, digits and ``._+-``,
    starting with a letter or digit, no ``..`` (so no separators, control characters or dots-only parts)."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > NAME_MAX_LENGTH:
        return f"it is {len(name)} characters long (at most {NAME_MAX_LENGTH})"
    if not _SAFE_NAME.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._+-]", c)})
        if bad:
            return f"it holds {', '.join(map(repr, bad))} (only ASCII letters, digits and . _ + - are allowed)"
        return "it must start with a letter or a digit"
    if ".." in name:
        return "it holds '..'"
    return None


def check_name(kind: str, name) -> str:
    """``name`` when it is safe as a file name (``safe_name_problem``), else ConfigError naming ``kind``."""
    problem = safe_name_problem(name)
    if problem is not None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(f"{kind} {shown} is refused: {problem}; such names become file names, so use e.g. "
                          "'my_name-2'")
    return name


def inside(folder: str | Path, path: str | Path) -> Path:
    """``path`` when it resolves inside ``folder`` (links followed), else ConfigError: a file the library
    builds from a name is never read or written elsewhere."""
    base, target = Path(folder).resolve(), Path(path).resolve()
    if not target.is_relative_to(base):
        raise ConfigError(f"refusing {path}: it lies outside {folder}")
    return Path(path)

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
# torchvision's learned policies (batched by BatchAugment; per sample in the original DataLoader path).
POLICY_STAGES = ("autoaugment_svhn", "randaugment", "trivialaugment")
ALL_STAGES = STAGES + NOFLIP_STAGES + POLICY_STAGES

P_AUG_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PRESET_NAMES = ("original", "strong")  # settings in PRESETS below
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "onecycle", "cosine")
LOADERS = ("device", "torch")  # fast on-device batches, or the original per-sample DataLoader

# Default size of the offline synthetic SVHN (generated once, then reused).
SYNTHETIC_N_TRAIN = 20_000
SYNTHETIC_N_TEST = 5_000
SYNTHETIC_SEED = 0


def require(ok: bool, message: str) -> None:
    """Raise ConfigError with ``message`` unless ``ok`` (every module's input checks use this)."""
    if not ok:
        raise ConfigError(message)


def _field(default, help_text: str, choices: tuple[str, ...] | None = None):
    """A TrainConfig field whose help text (and choices) the command line shows as they are."""
    return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one training run; reports store ``asdict(cfg)``."""

    model: str = _field("simplecnn", "network to train", MODELS)
    dataset: str = _field("synthetic", "data set (synthetic: the offline SVHN look-alike)", DATASETS)
    stage: str = _field("none", "augmentation stage (built-in, or a name given to augmentations.register_stage)",
                        ALL_STAGES)
    p_aug: float = _field(0.0, "share of training samples that are augmented, in [0, 1]")
    seed: int = _field(42, "seed of model initialisation, batch order and augmentation draws")
    epochs: int = _field(15, "training epochs")
    batch_size: int = _field(384, "training batch size")
    eval_batch_size: int = _field(2048, "evaluation batch size (does not change results)")
    optimizer: str = _field("adam", "optimizer", OPTIMIZERS)
    lr: float = _field(1e-3, "learning rate (the peak rate with the one-cycle schedule)")
    weight_decay: float = _field(1e-4, "weight decay")
    momentum: float = _field(0.9, "SGD momentum (sgd only)")
    nesterov: bool = _field(False, "Nesterov momentum (sgd only)")
    scheduler: str = _field("none", "learning-rate schedule", SCHEDULERS)
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    val_fraction: float = _field(0.1, "share of the train images held out for validation")
    n_train: int | None = _field(None, "train on a stratified subset of this many images (default: the whole split)")
    n_test: int | None = _field(None, "test on a stratified subset of this many images (default: the whole split)")
    loader: str = _field("device", "device: batches and augmentation on the device; torch: the original "
                                   "per-sample DataLoader pipeline", LOADERS)
    num_workers: int = _field(2, "DataLoader worker processes of the torch loader")
    compile: bool = _field(False, "compile the model and the batched augmentation's apply with torch.compile")
    teacher: str | None = _field(None, "run id of a teacher to distil from (default: none)")
    kd_temperature: float = _field(4.0, "distillation temperature T")
    kd_alpha: float = _field(0.7, "weight of the distillation term, in [0, 1]")
    preset: str = _field("original", "named settings the other fields start from", tuple(PRESET_NAMES))

    def __post_init__(self) -> None:
        _check_types(self)
        for name in _FLOAT_FIELDS:  # 1 and 1.0 are the same setting: store floats
            object.__setattr__(self, name, float(getattr(self, name)))
        validate_config(self)

    def effective(self) -> TrainConfig:
        """The same run in canonical form: with p_aug = 0 or no stage, nothing is augmented."""
        if self.p_aug == 0.0 or self.stage == "none":
            return dataclasses.replace(self, stage="none", p_aug=0.0)
        return self

    def identity(self) -> dict:
        """The settings that change a run's result, in canonical form: what a run id hashes.

        Left out: the evaluation batch size, the preset's name (its values are in the other
        fields), DataLoader workers when the device loader runs, distillation settings without a teacher.
        """
        fields = dataclasses.asdict(self.effective())
        ignored = ["eval_batch_size", "preset"]
        ignored += ["num_workers"] if self.loader == "device" else []
        ignored += ["kd_temperature", "kd_alpha"] if self.teacher is None else []
        return {name: value for name, value in fields.items() if name not in ignored}


# Smallest subsets that leave every class a few validation and test images.
MIN_IMAGES_PER_CLASS = 10
MIN_IMAGES = MIN_IMAGES_PER_CLASS * NUM_CLASSES
_FLOAT_FIELDS = ("p_aug", "lr", "weight_decay", "momentum", "label_smoothing", "val_fraction",
                 "kd_temperature", "kd_alpha")


def _type_ok(value, hint) -> bool:
    """Whether ``value`` fits a field's annotation: ints are ints (not bools), floats are finite numbers."""
    if isinstance(hint, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(cfg):
        value, hint = getattr(cfg, field.name), hints[field.name]
        expected = getattr(hint, "__name__", str(hint))
        expected = "a finite number" if expected == "float" else expected
        require(_type_ok(value, hint), f"{field.name} must be {expected}, got {value!r} ({type(value).__name__})")


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the valid choices or range for the first bad field."""
    for field in dataclasses.fields(cfg):
        choices = field.metadata.get("choices")
        if choices and field.name != "stage":  # custom stages are checked where they are registered
            value = getattr(cfg, field.name)
            require(value in choices, f"unknown {field.name} {value!r}; choose one of {choices}")
    require(cfg.stage != "", "stage must be a stage name, e.g. 'stage1_basic' or 'none'")
    check_name("stage", cfg.stage)  # it becomes part of the run id, hence of file names
    if cfg.teacher is not None:
        check_name("teacher run id", cfg.teacher)
    require(0.0 <= cfg.p_aug <= 1.0, f"p_aug must lie in [0, 1], got {cfg.p_aug}")
    require(cfg.seed >= 0, f"seed must be a non-negative integer, got {cfg.seed}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        require(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    require(cfg.num_workers >= 0, f"num_workers must be 0 or more, got {cfg.num_workers}")
    require(cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    require(cfg.weight_decay >= 0, f"weight_decay must be non-negative, got {cfg.weight_decay}")
    require(0.0 <= cfg.momentum < 1.0, f"momentum must lie in [0, 1), got {cfg.momentum}")
    require(0.0 < cfg.val_fraction < 1.0, f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    require(0.0 <= cfg.label_smoothing < 1.0, f"label_smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    require(0.0 <= cfg.kd_alpha <= 1.0, f"kd_alpha must lie in [0, 1], got {cfg.kd_alpha}")
    require(cfg.kd_temperature > 0, f"kd_temperature must be positive, got {cfg.kd_temperature}")
    for name in ("n_train", "n_test"):
        size = getattr(cfg, name)
        require(size is None or size >= MIN_IMAGES,
                f"{name} must be at least {MIN_IMAGES} ({MIN_IMAGES_PER_CLASS} images per class), got {size}")


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


# ---------------------------------------------------------------- defaults the command line shows
# Here rather than in runs, reports or pipeline, whose imports (torch, pandas, Optuna) would make
# every --help wait for them.

# Seeds: the top-up's defaults (pipeline.TopUp), its cap in the quick study, and the seeds per arm of a
# distillation or preset comparison. Here, not in pipeline, so the command line's help loads no library.
TOP_UP_SEEDS_MAX = 8
TOP_UP_MIN_EFFECT = 0.02  # macro-F1
QUICK_SEEDS_MAX = 3
COMPARISON_SEEDS = 3
DEFAULT_SEVERITIES = (1, 2, 3)  # corruption severities of a run's robustness evaluation
TUNE_QUEUE_NAME = "tuning"  # prefixed with the dataset: "<dataset>-tuning"


def grid_queue_name(dataset: str) -> str:
    """The queue a grid uses when none is named: it follows the dataset ("synthetic-grid")."""
    return f"{dataset}-grid"


DEFAULT_QUEUE_NAME = grid_queue_name("synthetic")  # what worker and summary read unless told
