"""Command-line building blocks: usage errors on one line, defaults in every --help, argument types
checked at parsing, and the training flags derived from ``config.TrainConfig``'s fields (their help,
choices and defaults), so a new field needs no command-line edit."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import types
import typing

import config
from config import TrainConfig


class OneLineErrorParser(argparse.ArgumentParser):
    """A usage error is one line on stderr (the problem, then where the help is) and exit status 2,
    like every other error of the command line; subcommand parsers inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every --help (flags whose default is "not given" say what applies instead), and the
    module docstrings' line breaks kept."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------- argument types checked at parsing


def at_least(minimum: float, kind: type = int, *, strict: bool = False):
    """An argparse type: a number of ``kind`` that is at least ``minimum`` (above it when ``strict``),
    so a count or a period that cannot work is refused before any work starts."""
    bound = f"{'above' if strict else 'at least'} {minimum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {bound}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def workers_count(text: str) -> int | str:
    """An argparse type for --workers: "auto" (runs packed onto the GPU as its memory allows, 1 on a
    CPU) or a count of at least 1."""
    return "auto" if text == "auto" else at_least(1)(text)


workers_count.__name__ = "workers"
def safe_name(text: str) -> str:
    """An argparse type: a name that may become part of a file name (``config.safe_name_problem``)."""
    problem = config.safe_name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be a queue name: {problem}")
    return text


# ---------------------------------------------------------------- flags from TrainConfig


@functools.cache
def _field_types() -> dict[str, type]:
    """TrainConfig's annotations, evaluated once (each evaluation compiles every one of them anew)."""
    return typing.get_type_hints(TrainConfig)


def _flag_type(field: dataclasses.Field):
    """The argparse type of a TrainConfig field: int, float or str (``X | None`` -> X)."""
    hint = _field_types()[field.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _shown_default(name: str, default):
    return config.PRESETS["original"].get(name, default)


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (``--n-train`` for n_train), its help and choices from the field."""
    group = parser.add_argument_group("training configuration (defaults: the original preset's values)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {_shown_default(field.name, field.default)})"
        kind = _flag_type(field)
        if kind is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=kind, choices=field.metadata["choices"], default=None,
                               help=help_text)
    group.add_argument("--no-hflip", action="store_true",
                       help="use the stages' variants without the horizontal flip")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset named by --preset with every field flag that was given; flags that contradict each
    other, or have no effect with the others given, are a ConfigError (``flag_contradiction``)."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    preset = overrides.pop("preset", "original")
    given = dict(overrides)
    if args.no_hflip and overrides.get("stage", "none") in config.STAGES[1:]:
        overrides["stage"] += config.NOFLIP_SUFFIX
    cfg = config.preset_config(preset, **overrides)  # each value's own type and range first
    problem = flag_contradiction(getattr(args, "command", "run"), given, cfg, args.no_hflip)
    config.require(problem is None, problem or "")
    if cfg.loader == "torch" and cfg.num_workers > (os.cpu_count() or 1):
        print(f"warning: --num-workers {cfg.num_workers} is more than this machine's {os.cpu_count()} CPUs; the "
              "extra worker processes only compete for them", file=sys.stderr)
    return cfg


def flag_contradiction(command: str, given: dict, cfg: TrainConfig, no_hflip: bool) -> str | None:
    """What is wrong with a combination of training flags (``given``: the field flags given, by field
    name; ``cfg``: the configuration they make), or None. A flag that would be silently ignored is
    refused rather than left to mislead."""
    return _ignored_flag(given, cfg) or _augmentation_flags(command, given, no_hflip)


def _ignored_flag(given: dict, cfg: TrainConfig) -> str | None:
    for name in ("kd_alpha", "kd_temperature"):
        if name in given and cfg.teacher is None:
            return f"--{name.replace('_', '-')} applies to distillation only: add --teacher RUN_ID, or drop it"
    for name in ("momentum", "nesterov"):
        if name in given and cfg.optimizer != "sgd":
            return f"--{name} applies to --optimizer sgd only (here: {cfg.optimizer}): add --optimizer sgd, or drop it"
    if "num_workers" in given and cfg.loader != "torch":
        return ("--num-workers sets the DataLoader workers of --loader torch; the device loader starts none: "
                "add --loader torch, or drop --num-workers")
    return None


def _augmentation_flags(command: str, given: dict, no_hflip: bool) -> str | None:
    stage = given.get("stage")
    if no_hflip and command != "grid" and stage not in config.STAGES[1:]:  # grid: no_hflip_problem
        return (f"--no-hflip removes the flip of the stages {config.STAGES[1]}..{config.STAGES[-1]}; "
                f"{'no stage was given' if stage is None else repr(stage) + ' has no flip to remove'}: drop it")
    if command == "tune":
        if "p_aug" in given:
            return "tune searches p_aug itself: drop --p-aug"
        if stage in (None, "none"):
            return "tune searches p_aug, which needs an augmentation stage: add --stage (e.g. stage1_basic)"
        return None
    if given.get("p_aug", 0.0) > 0 and stage in (None, "none"):
        return (f"--p-aug {given['p_aug']:g} has no effect without an augmentation stage (nothing is augmented): "
                "add --stage (e.g. stage1_basic), or drop --p-aug")
    if stage not in (None, "none") and "p_aug" not in given:
        return (f"--stage {stage} augments nothing at the default p_aug 0: add --p-aug (e.g. --p-aug 0.5), "
                "or use --stage none")
    return None


def no_hflip_problem(stages) -> str | None:
    """Why --no-hflip has no effect on a grid's stages (none of them has a flip), or None."""
    if any(stage in config.STAGES[1:] for stage in stages):
        return None
    return (f"--no-hflip removes the flip of the stages {config.STAGES[1]}..{config.STAGES[-1]}, and none of "
            f"{', '.join(stages)} has one: drop it")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of every subcommand that trains: the device and quietness."""
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto (the first available)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (one line per epoch by default)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Device and quietness, and the corruption severities of the runs' robustness evaluation."""
    add_device_flags(parser)
    parser.add_argument("--severities", nargs="*", type=int, choices=(1, 2, 3), default=list(config.DEFAULT_SEVERITIES),
                        help="corruption severities of the robustness evaluation (none: skip it)")


def add_queue_flags(parser: argparse.ArgumentParser, default_queue: str | None, shown_default: str = "") -> None:
    """--storage and --study; ``shown_default`` tells what applies when the queue's default is None."""
    parser.add_argument("--storage", help="queue storage: a journal file, sqlite:/// or postgresql+psycopg2:// URL "
                                          "(default: reports/optuna.journal)")
    parser.add_argument("--study", dest="queue", default=default_queue, type=safe_name,
                        help="name of the queue in the storage" + (f" (default: {shown_default})" if shown_default
                                                                    else ""))


# ---------------------------------------------------------------- printed tables


def text_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows as an aligned plain-text table (numbers right-aligned), for a terminal; columns default to
    the first row's keys."""
    columns = columns or list(rows[0])
    cells = [[_cell_text(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(text) for text in [column, *(line[i] for line in cells)]) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row.get(column), int | float) for row in rows) for column in columns]

    def line(texts: list[str]) -> str:
        padded = (t.rjust(w) if right else t.ljust(w) for t, w, right in zip(texts, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _cell_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
