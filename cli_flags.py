"""Command-line building blocks: usage errors on one line, defaults in every --help, argument types
checked at parsing, and the training flags derived from ``config.TrainConfig``'s fields (their help,
choices and defaults), so a new field needs no command-line edit."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
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
    """The preset named by --preset with every field flag that was given."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    preset = overrides.pop("preset", "original")
    if args.no_hflip and overrides.get("stage", "none") in config.STAGES[1:]:
        overrides["stage"] += config.NOFLIP_SUFFIX
    return config.preset_config(preset, **overrides)


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
    parser.add_argument("--storage", help="queue storage: a journal file, sqlite:/// or postgresql:// URL "
                                          "(default: reports/optuna.journal)")
    parser.add_argument("--study", dest="queue", default=default_queue,
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
