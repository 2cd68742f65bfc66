"""What a run's report must hold, checked as data: the type and range of every field that tables,
figures and model loading read.

Reports are shared between machines and people, so a report is input like any other: a metric
outside [0, 1], a size that is not a positive integer, a prediction string of the wrong length, a
non-finite number or a model, dataset, stage or run id that is not a name the library knows (or
that could reach outside its folder as part of a file name) makes ``check_report`` raise a
ReportError naming the file and the field. Fields nothing reads are not checked.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from pathlib import Path

import config
from config import ConfigError, TrainConfig

# 2: run ids hash data and stage fingerprints; reports carry flags, budget and the model's hash.
REPORT_SCHEMA_VERSION = 2
AUGMENT_PATHS = ("none", "batched", "per-sample")


class ReportError(RuntimeError):
    """A report file that cannot be read; the message says which file and what to do."""


# A check takes the field's value and the whole report, and returns what is wrong with it, or None.
Check = Callable[[object, dict], "str | None"]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> Check:
    """A finite number in [low, high] (in (low, high] with ``low_open``)."""
    def check(value, _report):
        if not _is_number(value) or not math.isfinite(value):
            return f"is {_shown(value)}, not a finite number"
        if value < low or value > high or (low_open and value == low):
            return f"is {_shown(value)}, outside {'(' if low_open else '['}{low:g}, {high:g}]"
        return None

    return check


UNIT = number(0.0, 1.0)  # metrics and shares
POSITIVE = number(0.0, low_open=True)


def integer(minimum: int) -> Check:
    def check(value, _report):
        if not _is_int(value) or value < minimum:
            return f"is {_shown(value)}, not an integer of at least {minimum}"
        return None

    return check


def optional(inner: Check) -> Check:
    return lambda value, report: None if value is None else inner(value, report)


def one_of(choices: tuple) -> Check:
    return lambda value, _report: None if value in choices else f"is {_shown(value)}, not one of {choices}"


def boolean(value, _report) -> str | None:
    return None if isinstance(value, bool) else f"is {_shown(value)}, not true or false"


def safe_name(value, _report) -> str | None:
    problem = config.safe_name_problem(value)
    return None if problem is None else f"is {_shown(value)}, not a usable name ({problem})"


def digits_of_test_size(value, report) -> str | None:
    """One character 0-9 per test image."""
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
        return "is not a string of the digits 0-9"
    size = report["sizes"]["test"]
    return None if len(value) == size else f"holds {len(value)} labels for {size} test images"


def unit_list(length: int) -> Check:
    def check(value, report):
        if not isinstance(value, list) or len(value) != length:
            return f"is not a list of {length} numbers"
        return next((f"[{i}] {p}" for i, item in enumerate(value) if (p := UNIT(item, report))), None)

    return check


def confusion_matrix(value, report) -> str | None:
    k = config.NUM_CLASSES
    if not (isinstance(value, list) and len(value) == k and all(isinstance(row, list) and len(row) == k
                                                                for row in value)):
        return f"is not a {k} x {k} matrix"
    if not all(_is_int(n) and n >= 0 for row in value for n in row):
        return "holds a count that is not a non-negative integer"
    total, size = sum(map(sum, value)), report["sizes"]["test"]
    return None if total == size else f"counts {total} images for {size} test images"


def history(value, report) -> str | None:
    """One record per epoch: epoch numbers from 1, metrics in [0, 1], finite losses."""
    if not isinstance(value, list) or not value:
        return "is not a non-empty list of epoch records"
    fields = {"epoch": integer(1), "val_f1_macro": UNIT, "train_loss": number(0.0), "val_loss": number(0.0),
              "train_accuracy": UNIT, "val_accuracy": UNIT}
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            return f"[{i}] is not an epoch record"
        for name, check in fields.items():
            if name not in record:
                return f"[{i}] lacks {name!r}"
            if problem := check(record[name], report):
                return f"[{i}].{name} {problem}"
    return None


def seconds_per_epoch(value, report) -> str | None:
    if not isinstance(value, list) or len(value) != len(report["history"]):
        return "is not a list with one number per epoch of the history"
    return next((f"[{i}] {p}" for i, item in enumerate(value) if (p := number(0.0)(item, report))), None)


def unit_per_kind(value, report) -> str | None:
    if not isinstance(value, dict):
        return "is not a mapping of corruption kinds to macro-F1"
    return next((f"[{kind!r}] {p}" for kind, item in value.items() if (p := UNIT(item, report))), None)


def iso_time(value, _report) -> str | None:
    try:
        dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return f"is {_shown(value)}, not an ISO date and time"
    return None


def sha256(value, _report) -> str | None:
    return None if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else "is not a SHA-256 hex digest"


def train_config(value, report) -> str | None:
    """The stored TrainConfig: every field's type, range and name (model, dataset, stage, teacher)."""
    if not isinstance(value, dict):
        return "is not a mapping of settings"
    try:
        cfg = TrainConfig(**value)
    except TypeError as err:
        return f"does not fit TrainConfig ({err})"
    except ConfigError as err:
        return f"holds a bad setting: {err}"
    if cfg.dataset != report["dataset"]:
        return f"names dataset {cfg.dataset!r}, the report {report['dataset']!r}"
    return None


# Every field that tables, figures and model loading read ("a.b": field b inside field a), in the
# order they are checked: a later check may rely on an earlier field (sizes before predictions).
FIELDS: dict[str, Check] = {
    "run_id": safe_name,
    "dataset": one_of(config.DATASETS),
    "sizes.train": integer(1),
    "sizes.test": integer(1),
    "augment_path": one_of(AUGMENT_PATHS),
    "config.model": one_of(config.MODELS),
    "config.dataset": one_of(config.DATASETS),
    "config.stage": safe_name,  # a built-in stage, or a custom one registered in the process that trained it
    "config.p_aug": UNIT,
    "config.seed": integer(0),
    "config.preset": one_of(config.PRESET_NAMES),
    "config.epochs": integer(1),
    "config.lr": POSITIVE,
    "config.teacher": optional(safe_name),
    "config": train_config,  # every other setting, as TrainConfig checks it
    "test.f1_macro": UNIT,
    "test.accuracy": UNIT,
    "test.f1_per_class": unit_list(config.NUM_CLASSES),
    "test.confusion_matrix": confusion_matrix,
    "test_f1_macro_ci.low": UNIT,
    "test_f1_macro_ci.high": UNIT,
    "test_labels": digits_of_test_size,
    "test_predictions": digits_of_test_size,
    "robustness.mean_f1_macro": optional(UNIT),
    "robustness.f1_macro": unit_per_kind,
    "history": history,
    "seconds_per_epoch": seconds_per_epoch,
    "train_images_per_s": POSITIVE,
    "inference_images_per_s": POSITIVE,
    "params": integer(1),
    "flags.at_chance": boolean,
    "flags.still_improving": boolean,
    "flags.chance_f1_macro": UNIT,
    "finished_at": iso_time,
    "model_sha256": sha256,
}


def _lookup(report: dict, dotted: str):
    """The value of a dotted field, or KeyError naming the first missing part."""
    holder, names = report, dotted.split(".")
    for depth, name in enumerate(names, start=1):
        if not isinstance(holder, dict) or name not in holder:
            raise KeyError(".".join(names[:depth]))
        holder = holder[name]
    return holder


def report_problem(report) -> tuple[str, str] | None:
    """(field, what is wrong) for the first field that fails its check, or None for a sound report."""
    if not isinstance(report, dict):
        return "(top level)", f"is a {type(report).__name__}, not a mapping of fields"
    if report.get("schema_version") != REPORT_SCHEMA_VERSION:
        return "schema_version", (f"is {_shown(report.get('schema_version'))}: written by another version of "
                                  f"the library (expected {REPORT_SCHEMA_VERSION})")
    for dotted, check in FIELDS.items():
        try:
            value = _lookup(report, dotted)
        except KeyError as missing:
            return missing.args[0], "is missing (damaged or edited)"
        if problem := check(value, report):
            return dotted, problem
    ci = report["test_f1_macro_ci"]
    if ci["low"] > ci["high"]:
        return "test_f1_macro_ci", f"has low {ci['low']} above high {ci['high']}"
    return None


def check_report(report, source: str | Path) -> dict:
    """``report`` when every field tables, figures and model loading read is sound; else ReportError
    naming ``source`` (its file), the field and what to do."""
    found = report_problem(report)
    if found is not None:
        field, problem = found
        raise ReportError(f"report {source}: field {field!r} {problem}; delete it to retrain that run, "
                          "every other report is untouched")
    return report
