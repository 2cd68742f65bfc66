"""The study from the command line: one subcommand per job, each a thin call into the library.

    python experiments.py --help
    python experiments.py run --model simplecnn --stage stage3_color --p-aug 0.5
    python experiments.py study --dataset synthetic --quick

Training flags come from the fields of ``config.TrainConfig`` (their help, choices and
defaults); a flag left out keeps the preset's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import config
import pipeline
import reports
import runs
from cli_flags import (
    HelpFormatter,
    OneLineErrorParser,
    add_config_flags,
    add_device_flags,
    add_queue_flags,
    add_run_flags,
    at_least,
    config_from_args,
)
from config import ConfigError
from data_loading import DatasetError
from training import DivergenceError
from work_queue import QueueError, configure_optuna_logging, default_storage, open_storage, queue_status

# Errors the library raises on purpose: their message names the problem and the fix, so the
# command line prints that one line (no traceback unless --debug).
EXPECTED_ERRORS = (ConfigError, runs.ReportError, DatasetError, QueueError, DivergenceError)
# Fields a grid takes as lists of values (--models, --stages, --p-augs, --seeds), not as --field.
_GRID_FIELDS = ("model", "stage", "p_aug", "seed")


# ---------------------------------------------------------------- one handler per subcommand


def cmd_run(args) -> None:
    report = runs.run(config_from_args(args), device=args.device, quiet=args.quiet,
                      severities=tuple(args.severities))
    print(reports.run_summary_line(report))
    print(f"report: {runs.report_path(report['run_id'])}")


def cmd_grid(args) -> None:
    stages = [s + config.NOFLIP_SUFFIX if args.no_hflip and s in config.STAGES[1:] else s for s in args.stages]
    done = pipeline.grid(args.models, stages, args.p_augs, args.seeds, base=config_from_args(args),
                         storage=args.storage, queue_name=args.queue, workers=args.workers, device=args.device,
                         quiet=args.quiet, heartbeat=args.heartbeat, severities=tuple(args.severities))
    ids = {r["run_id"] for r in done}
    frame = reports.load_reports()
    print(reports.summary_markdown(reports.summarize(frame[frame["run_id"].isin(ids)])))


def cmd_worker(args) -> None:
    ran = pipeline.worker(args.storage, args.queue, device=args.device, quiet=args.quiet,
                          heartbeat=args.heartbeat)
    print(f"worker ran {ran} cell(s)")


def cmd_status(args) -> None:
    status = queue_status(open_storage(args.storage or default_storage()), args.queue)
    status.pop("reports")  # the finished cells' whole reports: `summary --source` tabulates them
    print(json.dumps(status, indent=2))


def cmd_tune(args) -> None:
    base = config_from_args(args)
    tuning = pipeline.tune(args.n_trials, base=base, epochs=args.trial_epochs, storage=args.storage,
                           queue_name=args.queue, device=args.device, quiet=args.quiet)
    print(pipeline.tuning_line(tuning, base))


def cmd_distill(args) -> None:
    table = pipeline.distill(args.teacher, args.student, args.temperature, args.alpha, epochs=args.epochs,
                             dataset=args.dataset, preset=args.preset, n_train=args.n_train, device=args.device,
                             quiet=args.quiet,
                             severities=tuple(args.severities))
    print(json.dumps(table, indent=2))


def cmd_summary(args) -> None:
    markdown, csv_path = reports.write_summary(reports.load_reports(args.source, args.study))
    print(markdown + f"\nCSV: {csv_path}")


def cmd_figures(args) -> None:
    frame = reports.load_reports(args.source, args.study)
    if args.gallery is not None:
        paths = reports.gallery(frame, args.gallery)
    else:
        paths = reports.figures(frame, formats=args.format)
    for path in paths:
        print(path)


def cmd_presets(args) -> None:
    table = pipeline.compare_presets(seeds=args.seeds, dataset=args.dataset, device=args.device,
                                     n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                                     quiet=args.quiet)
    print(json.dumps(table, indent=2))


def cmd_eda(args) -> None:
    for path in reports.eda_figures(args.dataset, formats=args.format):
        print(path)


def cmd_study(args) -> None:
    print(pipeline.run_study(args.dataset, args.quick, device=args.device, storage=args.storage,
                             workers=args.workers, quiet=args.quiet, heartbeat=args.heartbeat))


# ---------------------------------------------------------------- the parser


def _subcommand(sub, name: str, handler, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _heartbeat_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat", type=at_least(0, float, strict=True), default=30.0,
                        help="seconds between worker heartbeats; a cell silent for 4 heartbeats is retried")


def _add_run_and_grid(sub) -> None:
    p = _subcommand(sub, "run", cmd_run, "train one configuration (or load it when finished)")
    add_config_flags(p)
    add_run_flags(p)

    p = _subcommand(sub, "grid", cmd_grid, "enqueue a models x stages x p_aug x seeds grid and work on it")
    add_config_flags(p, skip=_GRID_FIELDS)
    add_run_flags(p)
    add_queue_flags(p, None, shown_default=reports.grid_queue_name("<dataset>"))
    _heartbeat_flag(p)
    p.add_argument("--models", nargs="+", choices=config.MODELS, default=["simplecnn"], help="models of the grid")
    p.add_argument("--stages", nargs="+", choices=config.ALL_STAGES, default=list(config.STAGES[1:]), metavar="STAGE",
                   help=f"augmentation stages of the grid, from {', '.join(config.ALL_STAGES)}")
    p.add_argument("--p-augs", nargs="+", type=float, default=list(config.P_AUG_GRID), help="p_aug values")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="training seeds of every cell")
    p.add_argument("--workers", type=at_least(1), default=1, help="worker processes on this machine")


def _add_tune_and_distill(sub) -> None:
    p = _subcommand(sub, "tune", cmd_tune, "Optuna TPE over lr, weight decay, p_aug and scheduler")
    add_config_flags(p)
    add_device_flags(p)
    add_queue_flags(p, None, shown_default=f"<dataset>-{pipeline.TUNE_QUEUE_NAME}")
    p.add_argument("--n-trials", type=at_least(1), default=40, help="trials wanted in the study in total")
    p.add_argument("--trial-epochs", type=at_least(1), default=3, help="epochs of each trial")

    p = _subcommand(sub, "distill", cmd_distill, "distil a teacher run into a student, and train the student alone")
    p.add_argument("--teacher", default="best", help="a run id, or 'best' (the ResNet18Cifar run best on validation)")
    p.add_argument("--student", choices=config.MODELS, default="simplecnn", help="the student network")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation term")
    p.add_argument("--epochs", type=at_least(1), help="student epochs (default: the teacher's)")
    p.add_argument("--n-train", type=at_least(config.MIN_IMAGES), help="student train images (default: the "
                   "teacher's; the test images are always the teacher's, so that the three compare)")
    p.add_argument("--preset", choices=config.PRESET_NAMES, help="the students' optimizer settings (default: the "
                   "teacher's)")
    p.add_argument("--dataset", choices=config.DATASETS, help="data set of the 'best' teacher (default: any)")
    add_run_flags(p)


def _add_presets_and_study(sub) -> None:
    p = _subcommand(sub, "presets", cmd_presets, "train the original and the strong preset side by side")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic", help="data set")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds of each preset")
    p.add_argument("--n-train", type=int, default=6000, help="train images (stratified subset)")
    p.add_argument("--n-test", type=int, default=2000, help="test images (stratified subset)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every run")
    add_device_flags(p)

    p = _subcommand(sub, "study", cmd_study, "the whole study, in order and resumably")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic", help="data set")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a CPU")
    p.add_argument("--workers", type=at_least(1), default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="queue storage (default: reports/optuna.journal)")
    add_device_flags(p)
    _heartbeat_flag(p)


def _add_queue_and_report_commands(sub) -> None:
    p = _subcommand(sub, "worker", cmd_worker, "take waiting cells from a queue until none is left")
    add_queue_flags(p, reports.DEFAULT_QUEUE_NAME)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto")
    p.add_argument("--quiet", action="store_true", help="no progress lines (one line per epoch by default)")
    _heartbeat_flag(p)

    p = _subcommand(sub, "status", cmd_status, "count the cells of a queue per state")
    add_queue_flags(p, reports.DEFAULT_QUEUE_NAME)

    for name, handler, help_text in (
        ("summary", cmd_summary, "Markdown table of every cell (printed) and reports/summary.csv"),
        ("figures", cmd_figures, "every study figure from the reports, into reports/figures/"),
    ):
        p = _subcommand(sub, name, handler, help_text)
        p.add_argument("--source", help="reports folder or queue storage (default: reports/runs)")
        p.add_argument("--study", help=f"queue name when --source is a storage (default: {reports.DEFAULT_QUEUE_NAME})")
        if name == "figures":
            _format_flag(p)
            p.add_argument("--gallery", type=Path, metavar="DIR",
                           help="instead, small PNGs of the main figures (one family) into DIR, e.g. docs/gallery")

    p = _subcommand(sub, "eda", cmd_eda, "the EDA figures of a dataset's train split, into reports/figures/")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic", help="data set")
    _format_flag(p)


def _format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", nargs="+", choices=config.FIGURE_FORMATS[1:], default=[],
                        help="file formats besides PNG: pdf and/or svg (vector copies for a paper)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_and_grid(sub)
    _add_tune_and_distill(sub)
    _add_presets_and_study(sub)
    _add_queue_and_report_commands(sub)
    return parser


def show_library_log() -> None:
    """The library's log lines (queue events, Optuna's trials) on stderr, as plain text; other
    libraries' INFO chatter stays off."""
    log = logging.getLogger("work_queue")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; an expected error ends with one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    show_library_log()
    configure_optuna_logging()  # Optuna's lines (one per trial) through that log, without colour codes
    try:
        if getattr(args, "device", None) is not None:
            runs.check_device(args.device)  # before any data is read or cell enqueued
        args.handler(args)
    except EXPECTED_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
