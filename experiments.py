"""The study from the command line: one subcommand per job, each a thin call into the library.

    python experiments.py --help
    python experiments.py run --model simplecnn --stage stage3_color --p-aug 0.5
    python experiments.py study --dataset synthetic --quick

Training flags come from the fields of ``config.TrainConfig`` (their help, choices and
defaults); a flag left out keeps the preset's value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

# Only light modules at the top: --help and usage errors answer before torch, pandas or Optuna load.
# Each handler imports the library modules it needs.
import config
from cli_flags import (
    HelpFormatter,
    OneLineErrorParser,
    add_config_flags,
    add_device_flags,
    add_queue_flags,
    add_run_flags,
    at_least,
    config_from_args,
    no_hflip_problem,
    text_table,
    workers_count,
)

# Errors the library raises on purpose, as (module, class): their message names the problem and the fix,
# so the command line prints that one line (no traceback unless --debug). Named rather than imported:
# an error can only come from a module already loaded, so checking one loads nothing.
EXPECTED_ERRORS = (("config", "ConfigError"), ("runs", "ReportError"), ("data_loading", "DatasetError"),
                   ("work_queue", "QueueError"), ("training", "DivergenceError"), ("atomic_io", "DiskFullError"))
# Fields a grid takes as lists of values (--models, --stages, --p-augs, --seeds), not as --field.
_GRID_FIELDS = ("model", "stage", "p_aug", "seed")
# Subcommands with the training configuration's flags: it is built and checked before anything heavy loads.
_CONFIG_COMMANDS = ("run", "grid", "tune")


def is_expected_error(err: BaseException) -> bool:
    """Whether ``err`` is one of the library's own errors (``EXPECTED_ERRORS``)."""
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in EXPECTED_ERRORS)
    return any(isinstance(err, kind) for kind in loaded if kind is not None)


# ---------------------------------------------------------------- one handler per subcommand


def cmd_run(args) -> None:
    import reports
    import runs

    report = runs.run(args.config, device=args.device, quiet=args.quiet, severities=tuple(args.severities),
                      force=args.force)
    print(reports.run_summary_line(report))
    print(f"report: {runs.report_path(report['run_id'])}")


def cmd_grid(args) -> None:
    import pipeline
    import reports

    if args.no_hflip:
        config.require(no_hflip_problem(args.stages) is None, no_hflip_problem(args.stages) or "")
    stages = [s + config.NOFLIP_SUFFIX if args.no_hflip and s in config.STAGES[1:] else s for s in args.stages]
    done = pipeline.grid(args.models, stages, args.p_augs, args.seeds, base=args.config,
                         storage=args.storage, queue_name=args.queue, workers=args.workers, device=args.device,
                         quiet=args.quiet, heartbeat=args.heartbeat, severities=tuple(args.severities),
                         top_up=top_up_from_args(args, pipeline.TopUp()))
    ids = {r["run_id"] for r in done}
    frame = reports.load_reports()
    print(reports.summary_markdown(reports.summarize(frame[frame["run_id"].isin(ids)])))


def cmd_worker(args) -> None:
    import pipeline

    ran = pipeline.worker(args.storage, args.queue, device=args.device, quiet=args.quiet,
                          heartbeat=args.heartbeat)
    print(f"worker ran {ran} cell(s)")


def cmd_status(args) -> None:
    import work_queue

    storage = work_queue.open_existing_storage(args.storage)
    if args.queue is None:
        rows = work_queue.storage_overview(storage)
        config.require(bool(rows), f"no queue in {args.storage or work_queue.default_storage()} yet: run grid or "
                                   "study first")
        for row in rows:
            row["progress"] = f"{row['done']}/{row['total']} ({row['done'] / max(row['total'], 1):.0%})"
        print(text_table(rows, ["study", "kind", "progress", "done", "running", "waiting", "failed"]))
        print("tuning studies count trials; `status --study NAME` lists a queue's cells")
        return
    cells = work_queue.cell_states(storage, args.queue)
    done = sum(cell["state"] == "done" for cell in cells)
    if cells:
        print(text_table(cells))
    print(f"{args.queue}: {done}/{len(cells)} cell(s) done")


def cmd_tune(args) -> None:
    import pipeline

    tuning = pipeline.tune(args.n_trials, base=args.config, epochs=args.trial_epochs, storage=args.storage,
                           queue_name=args.queue, device=args.device, quiet=args.quiet)
    print(pipeline.tuning_line(tuning, args.config))


def cmd_distill(args) -> None:
    import pipeline

    table = pipeline.distill(args.teacher, args.student, args.temperature, args.alpha, seeds=args.seeds,
                             epochs=args.epochs,
                             dataset=args.dataset, preset=args.preset, n_train=args.n_train, device=args.device,
                             quiet=args.quiet,
                             severities=tuple(args.severities))
    print(json.dumps(table, indent=2))


def cmd_summary(args) -> None:
    import reports

    markdown, csv_path = reports.write_summary(reports.load_reports(args.source, args.study))
    print(markdown + f"\nCSV: {csv_path}")


def cmd_figures(args) -> None:
    import reports

    frame = reports.load_reports(args.source, args.study)
    if args.gallery is not None:
        paths = reports.gallery(frame, args.gallery)
    else:
        paths = reports.figures(frame, formats=args.format)
    for path in paths:
        print(path)
    if not paths:
        print(f"no figures: none of the {len(frame)} run(s) belongs to a family with a no-augmentation baseline "
              "and an augmented cell (run a grid)", file=sys.stderr)


def cmd_presets(args) -> None:
    import pipeline

    table = pipeline.compare_presets(seeds=args.seeds, dataset=args.dataset, device=args.device,
                                     n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                                     quiet=args.quiet)
    print(json.dumps(table, indent=2))


def cmd_eda(args) -> None:
    import reports

    for path in reports.eda_figures(args.dataset, formats=args.format):
        print(path)


def cmd_study(args) -> None:
    import pipeline

    plan = pipeline.study_plan(args.quick)
    plan = dataclasses.replace(plan, top_up=top_up_from_args(args, plan.top_up))
    print(pipeline.run_study(args.dataset, args.quick, device=args.device, storage=args.storage,
                             workers=args.workers, quiet=args.quiet, heartbeat=args.heartbeat, plan=plan))


def top_up_from_args(args, default):
    """The seed top-up the flags ask for (a ``pipeline.TopUp``): ``default`` with --seeds-max / --min-effect,
    None with --no-top-up."""
    import pipeline

    changes = {name: getattr(args, name) for name in ("seeds_max", "min_effect") if getattr(args, name) is not None}
    if args.no_top_up:
        config.require(not changes, "--no-top-up contradicts --seeds-max and --min-effect: give one or the other")
        return None
    return dataclasses.replace(default or pipeline.TopUp(), **changes)


def cmd_runs_list(args) -> None:
    import run_catalog

    rows = run_catalog.list_runs(dataset=args.dataset, model=args.model, stage=args.stage, family=args.family)
    if rows:
        print(text_table(rows, run_catalog.LIST_COLUMNS))
    filtered = any(value is not None for value in (args.dataset, args.model, args.stage, args.family))
    print(f"{len(rows)} finished run(s) in {config.RUNS_DIR}" + (" match the filters" if filtered else ""))


def cmd_runs_show(args) -> None:
    import run_catalog

    print(run_catalog.show_run(args.run))


def cmd_runs_diff(args) -> None:
    import run_catalog

    rows = run_catalog.diff_runs(args.first, args.second)
    print(text_table(rows) if rows else "the two runs have the same configuration and sizes")


# ---------------------------------------------------------------- the parser


def _subcommand(sub, name: str, handler, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _heartbeat_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat", type=at_least(0, float, strict=True), default=30.0,
                        help="seconds between worker heartbeats; a cell silent for 4 heartbeats is retried")


def _top_up_flags(parser: argparse.ArgumentParser, seeds_max_default: str) -> None:
    parser.add_argument("--seeds-max", type=at_least(2), help="most seeds in all the seed top-up may give a cell "
                        f"(default: {seeds_max_default})")
    parser.add_argument("--min-effect", type=at_least(0, float, strict=True),
                        help=f"smallest macro-F1 difference the top-up plans seeds to detect "
                             f"(default: {config.TOP_UP_MIN_EFFECT})")
    parser.add_argument("--no-top-up", action="store_true",
                        help="run the given seeds only: no seeds added where the first seeds spread widely")


def _add_run_and_grid(sub) -> None:
    p = _subcommand(sub, "run", cmd_run, "train one configuration (or load it when finished)")
    add_config_flags(p)
    add_run_flags(p)
    p.add_argument("--force", action="store_true", help="retrain a finished run (its report and model are "
                   "replaced only once the new ones are written)")

    p = _subcommand(sub, "grid", cmd_grid, "enqueue a models x stages x p_aug x seeds grid and work on it")
    add_config_flags(p, skip=_GRID_FIELDS)
    add_run_flags(p)
    add_queue_flags(p, None, shown_default=config.grid_queue_name("<dataset>"))
    _heartbeat_flag(p)
    p.add_argument("--models", nargs="+", choices=config.MODELS, default=["simplecnn"], help="models of the grid")
    p.add_argument("--stages", nargs="+", choices=config.ALL_STAGES, default=list(config.STAGES[1:]), metavar="STAGE",
                   help=f"augmentation stages of the grid, from {', '.join(config.ALL_STAGES)}")
    p.add_argument("--p-augs", nargs="+", type=float, default=list(config.P_AUG_GRID), help="p_aug values")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="training seeds of every cell")
    p.add_argument("--workers", type=workers_count, default=1, help="worker processes on this machine, sharing "
                   "its device (auto: as many runs as fit on the GPU at once, at most 8; 1 on a CPU)")
    _top_up_flags(p, str(config.TOP_UP_SEEDS_MAX))


def _add_tune_and_distill(sub) -> None:
    p = _subcommand(sub, "tune", cmd_tune, "Optuna TPE over lr, weight decay, p_aug and scheduler")
    add_config_flags(p)
    add_device_flags(p)
    add_queue_flags(p, None, shown_default=f"<dataset>-{config.TUNE_QUEUE_NAME}")
    p.add_argument("--n-trials", type=at_least(1), default=40, help="trials wanted in the study in total")
    p.add_argument("--trial-epochs", type=at_least(1), default=3, help="epochs of each trial")

    p = _subcommand(sub, "distill", cmd_distill, "distil a teacher run into a student, and train the student alone")
    p.add_argument("--teacher", default="best", help="a run id, or 'best' (the ResNet18Cifar run best on validation)")
    p.add_argument("--student", choices=config.MODELS, default="simplecnn", help="the student network")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature T")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation term")
    p.add_argument("--seeds", nargs="+", type=int, help=f"training seeds of each student (default: "
                   f"{config.COMPARISON_SEEDS} from the teacher's seed on; one seed gives no verdict)")
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
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(config.COMPARISON_SEEDS)),
                   help="training seeds of each preset (one seed gives no verdict)")
    p.add_argument("--n-train", type=int, default=6000, help="train images (stratified subset)")
    p.add_argument("--n-test", type=int, default=2000, help="test images (stratified subset)")
    p.add_argument("--epochs", type=int, default=8, help="epochs of every run")
    add_device_flags(p)

    p = _subcommand(sub, "study", cmd_study, "the whole study, in order and resumably")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic", help="data set")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes on a CPU")
    p.add_argument("--workers", type=workers_count, default=1, help="worker processes on this machine, sharing "
                   "its device (auto: as many runs as fit on the GPU at once, at most 8; 1 on a CPU)")
    p.add_argument("--storage", help="queue storage (default: reports/optuna.journal)")
    add_device_flags(p)
    _heartbeat_flag(p)
    _top_up_flags(p, f"{config.TOP_UP_SEEDS_MAX}; with --quick {config.QUICK_SEEDS_MAX}")


def _add_queue_and_report_commands(sub) -> None:
    p = _subcommand(sub, "worker", cmd_worker, "take waiting cells from a queue until none is left")
    add_queue_flags(p, config.DEFAULT_QUEUE_NAME)
    p.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto")
    p.add_argument("--quiet", action="store_true", help="no progress lines (one line per epoch by default)")
    _heartbeat_flag(p)

    p = _subcommand(sub, "status", cmd_status, "progress of every queue in the storage, or of each cell of one")
    add_queue_flags(p, None, shown_default="every queue and tuning study in the storage, one line each")

    for name, handler, help_text in (
        ("summary", cmd_summary, "Markdown table of every cell (printed) and reports/summary.csv"),
        ("figures", cmd_figures, "every study figure from the reports, into reports/figures/"),
    ):
        p = _subcommand(sub, name, handler, help_text)
        p.add_argument("--source", help="reports folder or queue storage (default: reports/runs)")
        p.add_argument("--study", help=f"queue name when --source is a storage (default: {config.DEFAULT_QUEUE_NAME})")
        if name == "figures":
            _format_flag(p)
            p.add_argument("--gallery", type=Path, metavar="DIR",
                           help="instead, small PNGs of the main figures (one family) into DIR, e.g. "
                           "docs/gallery (default: none, the full figures)")

    p = _subcommand(sub, "eda", cmd_eda, "the EDA figures of a dataset's train split, into reports/figures/")
    p.add_argument("--dataset", choices=config.DATASETS, default="synthetic", help="data set")
    _format_flag(p)

    _add_runs_command(sub)


def _format_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", nargs="+", choices=config.FIGURE_FORMATS[1:], default=[],
                        help="file formats besides PNG: pdf and/or svg (vector copies for a paper)")


def _add_runs_command(sub) -> None:
    runs_parser = _subcommand(sub, "runs", None, "find finished runs again: list them, show one, compare two "
                              "(read from reports/runs by default; SVHN_AUG_REPORTS_DIR moves it)")
    actions = runs_parser.add_subparsers(dest="runs_command", required=True)
    p = _subcommand(actions, "list", cmd_runs_list, "every finished run, one line each, with the filters given")
    p.add_argument("--dataset", choices=config.DATASETS, help="only runs on this data set (default: all)")
    p.add_argument("--model", choices=config.MODELS, help="only runs of this network (default: all)")
    p.add_argument("--stage", help="only runs of this augmentation stage, e.g. none or stage3_color (default: all)")
    p.add_argument("--family", help="only runs of this family: its id as the list shows it, or a prefix "
                   "(default: all)")
    p = _subcommand(actions, "show", cmd_runs_show, "one run: result, files, family and configuration")
    p.add_argument("run", help="a run id, or a prefix only one run's id has")
    p = _subcommand(actions, "diff", cmd_runs_diff, "the settings in which two runs differ")
    p.add_argument("first", help="a run id, or a prefix only one run's id has")
    p.add_argument("second", help="the other run")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_and_grid(sub)
    _add_tune_and_distill(sub)
    _add_presets_and_study(sub)
    _add_queue_and_report_commands(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the one it was made with: ``main``
    may run several times in one process (a notebook, the tests) with stderr replaced in between."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_library_log() -> None:
    """The library's log lines (queue events, Optuna's trials) on stderr, as plain text; other
    libraries' INFO chatter stays off."""
    log = logging.getLogger("work_queue")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so the same clean-up runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


# What an interrupted command leaves behind; running the same command again resumes from there.
_KEPT = {
    "run": "the run's finished epochs are kept in its checkpoint",
    "tune": "finished trials are kept in the study",
    "figures": "every figure already written is complete",
    "summary": "the previous summary is unchanged",
    "eda": "every figure already written is complete",
    "status": "nothing was changed",
}
_KEPT_BY_DEFAULT = "finished runs keep their reports and the interrupted run its last finished epoch"


def interrupted_line(command: str, argv: list[str], signal_name: str) -> str:
    """The one line an interrupted command prints: what was kept, and the command that resumes."""
    kept = _KEPT.get(command, _KEPT_BY_DEFAULT)
    return f"interrupted ({signal_name}): {kept}; resume with: python experiments.py {shlex.join(argv)}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; an expected error ends with one line on stderr and exit code 2, Ctrl-C with
    one line and 130, SIGTERM with one line and 143 (no temporary file is left either way)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    show_library_log()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        if args.command in _CONFIG_COMMANDS:
            args.config = config_from_args(args)  # a bad setting is refused before the library loads
        import work_queue

        work_queue.configure_optuna_logging()  # Optuna's lines (one per trial) through that log, without colours
        if getattr(args, "device", None) is not None:
            import runs

            runs.check_device(args.device)  # before any data is read or cell enqueued
        args.handler(args)
    except Exception as err:
        if args.debug or not is_expected_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        if args.debug:
            raise
        ctrl_c = isinstance(stop, KeyboardInterrupt)
        print(interrupted_line(args.command, argv, "Ctrl-C" if ctrl_c else "SIGTERM"), file=sys.stderr)
        return 130 if ctrl_c else 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
