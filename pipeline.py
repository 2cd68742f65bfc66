"""The study built from runs: the stage x p_aug grid through the work queue, Optuna tuning,
distillation, presets side by side, and the study plan with the function that runs it all."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
import torch

import config
from atomic_io import atomic_write_json
from config import DEFAULT_QUEUE_NAME, DEFAULT_SEVERITIES, TUNE_QUEUE_NAME, ConfigError, TrainConfig, grid_queue_name
from data_loading import prepare_data
from reports import (
    PLANS_FIELD,
    comparison_row,
    figures,
    load_reports,
    report_plans,
    run_label,
    same_test_labels,
    save_tuning_figures,
    write_summary,
)
from runs import (
    announcer,
    best_val_f1,
    canonical_config,
    check_device,
    device_bytes,
    finished_report_path,
    load_teacher,
    parse_digits,
    read_report,
    report_path,
    run,
    run_id,
    train_model,
)
from stats import chance_band, compare_family, compare_groups, format_estimate, metric_value, seed_summary, seeds_needed
from training import DivergenceError, format_duration
from work_queue import (
    QueueError,
    create_tuning_study,
    declare_queue_plan,
    default_storage,
    enqueue_cells,
    open_storage,
    queue_status,
    run_worker,
)

# ---------------------------------------------------------------- the grid as a work queue


def grid_configs(models, stages, p_augs, seeds, base: TrainConfig) -> list[TrainConfig]:
    """Every cell and seed as a configuration; cells that train identically appear once
    (p_aug = 0 is the same run for every stage)."""
    configs = {}
    for model in models:
        for stage in stages:
            for p_aug in p_augs:
                for seed in seeds:
                    cfg = dataclasses.replace(base, model=model, stage=stage, p_aug=float(p_aug), seed=seed)
                    configs.setdefault(run_id(cfg), canonical_config(cfg))
    return list(configs.values())


def enqueue_grid(configs: list[TrainConfig], storage: str, queue_name: str,
                 severities=DEFAULT_SEVERITIES) -> int:
    """Put every configuration in the queue once (from this one process); returns how many were new."""
    cells = [{"cell_key": run_id(cfg), "config": dataclasses.asdict(cfg), "severities": list(severities)}
             for cfg in configs]
    return enqueue_cells(open_storage(storage), queue_name, cells)


def worker(storage: str | None = None, queue_name: str = DEFAULT_QUEUE_NAME, *, device: str = "auto",
           quiet: bool = False, heartbeat: float = 30.0) -> int:
    """Take waiting cells from the queue and run them until none is left; returns cells run.

    A cell whose worker stops sending heartbeats for 4 x ``heartbeat`` seconds is retried by
    another worker (see work_queue). ``run`` loads a finished report, so a rare double claim
    never trains twice.
    """
    config.require(heartbeat > 0, f"heartbeat must be a positive number of seconds, got {heartbeat}")
    queue = open_storage(storage or default_storage())
    announce = CellProgress(queue, queue_name, announcer(quiet))

    def execute(cell: dict) -> dict:
        announce(cell)
        return run(TrainConfig(**cell["config"]), device=device, quiet=quiet,
                   severities=tuple(cell["severities"]))

    return run_worker(queue, queue_name, execute, value_key=None, heartbeat_interval=heartbeat,
                      grace_period=4 * heartbeat)


class CellProgress:
    """Announces each cell a worker takes as "cell k/N", with an ETA from this worker's pace so far
    (k counts the queue's finished cells, so workers that join later count on)."""

    def __init__(self, storage, queue_name: str, say: Callable[[str], None]) -> None:
        self.storage, self.queue_name, self.say = storage, queue_name, say
        self.started = time.perf_counter()
        self.taken = 0

    def __call__(self, cell: dict) -> None:
        status = queue_status(self.storage, self.queue_name)
        done, total = status["n_done"], status["n_cells"]
        eta = ""
        if self.taken:
            per_cell = (time.perf_counter() - self.started) / self.taken
            eta = f", ETA {format_duration(per_cell * (total - done))}"
        self.taken += 1
        self.say(f"cell {done + 1}/{total}: {cell['cell_key']}{eta}")


MOST_PACKED_WORKERS = 8  # the most runs bench_packing.py measures at once on one GPU


def packed_workers(free_bytes: int, run_bytes: int, cpus: int) -> int:
    """How many runs fit on one GPU at once: 90 % of its free memory over one run's, at most one per CPU
    core (each process feeds the GPU from one) and MOST_PACKED_WORKERS; at least 1."""
    return max(1, min(int(0.9 * free_bytes) // max(run_bytes, 1), cpus, MOST_PACKED_WORKERS))


def resolve_workers(workers: int | str, base: TrainConfig, models, device: str) -> int:
    """``workers``, or for "auto" the runs packed onto the GPU at once (``packed_workers`` with the
    largest model's ``runs.device_bytes``). Elsewhere "auto" is 1: on a CPU one run already keeps every
    core busy with torch's threads (two at once measured 1.02x the images/s of one on 2 cores)."""
    if workers != "auto":
        return workers
    if torch.device(check_device(device)).type != "cuda":
        return 1
    free_bytes, _ = torch.cuda.mem_get_info()
    run_bytes = max(device_bytes(dataclasses.replace(base, model=model)) for model in models)
    return packed_workers(free_bytes, run_bytes, os.cpu_count() or 1)
# ---------------------------------------------------------------- seeds where they are needed


@dataclass(frozen=True)
class TopUp:
    """Seeds where they are needed: an internal pilot (Wittes and Brittain 1990; Kieser and Friede 2003).

    After a grid's first seeds, each cell gets the seeds it needs in all (`stats.seeds_for_effect`) to
    detect a difference of ``min_effect`` macro-F1 from its baseline with power ``power`` at Holm's
    strictest level in its family, at most ``seeds_max``; the baseline gets the most any of its cells
    needs. The decision reads the seed variances and the test-image variance only, never a difference,
    so looking at the first seeds does not raise the false-positive rate.
    """

    seeds_max: int = config.TOP_UP_SEEDS_MAX
    min_effect: float = config.TOP_UP_MIN_EFFECT
    power: float = 0.8

    def __post_init__(self) -> None:
        config.require(self.seeds_max >= 2, f"seeds_max must be at least 2, got {self.seeds_max}")
        config.require(0.0 < self.min_effect < 1.0, f"min_effect must lie in (0, 1) macro-F1, got {self.min_effect}")
        config.require(0.0 < self.power < 1.0, f"power must lie in (0, 1), got {self.power}")


def family_seed_counts(y_true, baseline_preds, cells: dict, top_up: TopUp, alpha: float = 0.05) -> tuple[int, dict]:
    """Seeds in all that the baseline and each cell of one family need (`TopUp`), from the first seeds'
    predictions (one array per seed, every group with at least 2): (baseline seeds, {cell: seeds}).

    Only variances are read: the seed variance of each group's macro-F1 and the test-image variance of
    each difference (`stats.compare_family`'s ``test_se``); the differences themselves are not.
    """
    test_var = np.array([v["test_se"] ** 2 for v in compare_family(y_true, baseline_preds, cells).values()])
    base = np.array([metric_value(y_true, p) for p in baseline_preds])
    values = [np.array([metric_value(y_true, p) for p in preds]) for preds in cells.values()]
    options = dict(min_effect=top_up.min_effect, family_size=len(cells), alpha=alpha, power=top_up.power,
                   seeds_max=top_up.seeds_max, test_var=test_var)
    var_cells, n_cells = np.array([v.var(ddof=1) for v in values]), np.array([v.size for v in values])
    # The baseline grows with each cell, then every cell is planned against the largest baseline.
    grown = seeds_needed(var_cells, n_cells, base.var(ddof=1), base.size, **options)
    base_seeds = max(int(grown.max()), base.size)
    needs = seeds_needed(var_cells, n_cells, base.var(ddof=1), base.size, baseline_seeds=base_seeds, **options)
    return base_seeds, dict(zip(cells, needs.tolist(), strict=True))


def seed_sequence(first_seeds, count: int) -> list[int]:
    """The first seeds, then the next integers above them, ``count`` in all (a grid's top-up seeds)."""
    seeds = list(dict.fromkeys(first_seeds))
    following = itertools.count(max(seeds) + 1)
    return seeds + [next(following) for _ in range(count - len(seeds))]


def top_up_configs(reports_: list[dict], seeds, top_up: TopUp, quiet: bool = False) -> list[TrainConfig]:
    """The extra runs one model's family needs after its first seeds (`family_seed_counts`); none when it
    has no baseline or no augmented cell."""
    cells: dict[tuple, list[dict]] = {}
    for report in reports_:
        cells.setdefault((report["config"]["stage"], report["config"]["p_aug"]), []).append(report)
    base = cells.pop(("none", 0.0), None)
    if base is None or not cells:
        return []
    y_true = same_test_labels(pd.Series(reports_))
    base_seeds, needs = family_seed_counts(y_true, _seed_predictions(base),
                                           {key: _seed_predictions(group) for key, group in cells.items()}, top_up)
    sequence = seed_sequence(seeds, top_up.seeds_max)
    plan = [(base, base_seeds)] + [(cells[key], n) for key, n in needs.items()]
    configs = [dataclasses.replace(TrainConfig(**group[0]["config"]), seed=seed)
               for group, n in plan for seed in sequence[len(group):n]]
    counts = ", ".join(f"{run_label(group[0])} {n}" for group, n in plan)
    model = config.MODEL_DISPLAY_NAMES[reports_[0]["config"]["model"]]
    announcer(quiet)(f"seed top-up of {model}: {len(configs)} more run(s) to detect {top_up.min_effect:+g} macro-F1 "
                     f"with power {top_up.power:g} (cap {top_up.seeds_max} seeds); seeds per cell: {counts}")
    return configs


def _seed_predictions(group: list[dict]) -> list[list[int]]:
    return [parse_digits(r["test_predictions"]) for r in group]


# ---------------------------------------------------------------- declared plans


def declare_plan(first: list[dict], family: list[dict], seeds, top_up: TopUp | None, queue_name: str) -> dict:
    """The declaration of one model's family by the grid that ran it: its cells (stage, p_aug), first
    seeds, top-up settings and every run id (``family``: the first seeds' reports and the top-up's).

    Its id hashes the first seeds' run ids (settings, stages, data) and the top-up settings: running
    the same grid again declares the same plan, and any other grid another one.
    """
    top = None if top_up is None else dataclasses.asdict(top_up)
    identity = {"runs": sorted(r["run_id"] for r in first), "top_up": top}
    plan_id = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return {"id": plan_id, "queue": queue_name, "model": first[0]["config"]["model"],
            "cells": sorted({(r["config"]["stage"], r["config"]["p_aug"]) for r in first}),
            "first_seeds": sorted(set(seeds)),
            "top_up": None if top is None else top | {"added": len(family) - len(first)},
            "run_ids": sorted(r["run_id"] for r in family)}


def record_plan(plan: dict, family: list[dict], storage: str, queue_name: str) -> None:
    """Write the plan to its queue and into each of its runs' reports (rewritten atomically; a run
    shared with other plans keeps theirs)."""
    declare_queue_plan(storage, queue_name, plan)
    plan = json.loads(json.dumps(plan))  # as a report stores it: tuples become lists
    for report in family:
        plans = [p for p in report_plans(report) if p["id"] != plan["id"]] + [plan]
        if plans != report_plans(report):
            report[PLANS_FIELD] = plans
            atomic_write_json(report_path(report["run_id"]), report)


# ---------------------------------------------------------------- the grid


def grid(models=("simplecnn",), stages=config.STAGES[1:], p_augs=config.P_AUG_GRID, seeds=(42,), *,
         base: TrainConfig | None = None, storage: str | None = None, queue_name: str | None = None,
         workers: int | str = 1, device: str = "auto", severities=DEFAULT_SEVERITIES,
         quiet: bool = False, heartbeat: float = 30.0, top_up: TopUp | None = TopUp()) -> list[dict]:
    """Run a models x stages x p_augs x seeds grid through the queue; returns the reports.

    Each model's cells form one family, declared by this plan: after the first ``seeds``, ``top_up``
    adds seeds where the seed spread needs them (`TopUp`; None keeps the given seeds), then the plan with
    every run id is recorded on the queue and in each of its runs' reports (`declare_plan`), and tables
    test its cells against each other only. The queue is ``queue_name``, by default ``<dataset>-grid``.
    ``workers > 1`` starts that many worker processes on this machine; more workers on other machines can
    join with ``python experiments.py worker --storage URL --study NAME``. The workers share this machine's
    device (several runs packed onto one GPU); ``workers="auto"`` picks their number (``resolve_workers``).
    Each run's results are the same however many workers run the grid.
    """
    base = base or config.preset_config("original")
    workers = resolve_workers(workers, base, models, device)
    config.require(isinstance(workers, int) and workers >= 1, f"workers must be 'auto' or at least 1, got {workers}")
    config.require(workers == 1 or not str(storage or "").startswith("sqlite"),
                   f"SQLite serves one worker only (several crashed and ran cells twice), got {workers} workers: "
                   "use the default journal file (no --storage) or a postgresql+psycopg2:// URL, or one worker")
    queue_name = config.check_name("queue name", queue_name or grid_queue_name(base.dataset))
    queue = dict(storage=storage or default_storage(), queue_name=queue_name,
                 workers=workers, device=device, severities=severities, heartbeat=heartbeat, quiet=quiet)
    if top_up is not None and len(set(seeds)) < 2:
        announcer(quiet)("no seed top-up: it plans from the spread of at least 2 first seeds per cell")
        top_up = None
    first = _work_through(grid_configs(models, stages, p_augs, seeds, base), **queue)
    by_model = {model: [r for r in first if r["config"]["model"] == model] for model in dict.fromkeys(models)}
    extra = [cfg for group in by_model.values() for cfg in top_up_configs(group, seeds, top_up, quiet)
             ] if top_up is not None else []
    added = _work_through(extra, **queue) if extra else []
    done = []
    for group in by_model.values():
        family = group + [r for r in added if r["config"]["model"] == group[0]["config"]["model"]]
        record_plan(declare_plan(group, family, seeds, top_up, queue["queue_name"]), family, queue["storage"],
                    queue["queue_name"])
        done += family
    return done


def _work_through(configs: list[TrainConfig], *, storage: str, queue_name: str, workers: int, device: str,
                  severities, heartbeat: float, quiet: bool) -> list[dict]:
    """Enqueue these configurations, work on the queue until they are done, and return their reports."""
    enqueue_grid(configs, storage, queue_name, severities)
    if workers <= 1:
        worker(storage, queue_name, device=device, quiet=quiet, heartbeat=heartbeat)
    else:
        prepare_data(configs[0])  # generate / cache the data once, before the workers race for it
        _run_worker_processes(workers, storage, queue_name, device, heartbeat)
    return _collect_reports(configs)


def _run_worker_processes(workers: int, storage: str, queue_name: str, device: str, heartbeat: float) -> None:
    command = [sys.executable, str(config.ROOT / "experiments.py"), "worker", "--storage", storage,
               "--study", queue_name, "--device", device, "--heartbeat", str(heartbeat)]
    env = dict(os.environ)
    if torch.device(check_device(device)).type == "cpu":  # the cores shared out, not oversubscribed
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    processes = [subprocess.Popen(command, env=env) for _ in range(workers)]
    try:
        codes = [process.wait() for process in processes]
    except BaseException:  # interrupted: stop the workers too (each queues its running cell again)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
        raise
    if any(codes):
        print(f"warning: worker exit codes {codes}; unfinished cells stay queued", file=sys.stderr)


def _collect_reports(configs: list[TrainConfig]) -> list[dict]:
    found = {run_id(cfg): finished_report_path(cfg) for cfg in configs}
    missing = [key for key, path in found.items() if path is None]
    if missing:
        raise QueueError(f"{len(missing)} cell(s) did not finish: {missing[:5]}...; see the queue's "
                           "failed trials (python experiments.py status) and run a worker again")
    return [read_report(path) for path in found.values()]


# ---------------------------------------------------------------- Optuna tuning

TUNE_SPACE = {"lr": (1e-4, 5e-3), "weight_decay": (1e-6, 1e-3), "p_aug": (0.0, 1.0),
              "scheduler": config.SCHEDULERS}


def suggest_config(trial: optuna.Trial, base: TrainConfig, epochs: int) -> TrainConfig:
    """A trial's configuration from the original study's search space (FACTS.md, part 5)."""
    return dataclasses.replace(
        base, epochs=epochs,
        lr=trial.suggest_float("lr", *TUNE_SPACE["lr"], log=True),
        weight_decay=trial.suggest_float("weight_decay", *TUNE_SPACE["weight_decay"], log=True),
        p_aug=trial.suggest_float("p_aug", *TUNE_SPACE["p_aug"]),
        scheduler=trial.suggest_categorical("scheduler", list(TUNE_SPACE["scheduler"])),
    )


def tune(n_trials: int = 40, *, base: TrainConfig | None = None, epochs: int = 3, storage: str | None = None,
         queue_name: str | None = None, device: str = "auto", seed: int = 42,
         quiet: bool = False) -> optuna.Study:
    """TPE over lr, weight decay, p_aug and scheduler with a median pruner; resumable.

    ``n_trials`` is the total wanted in the study: a resumed study only runs the rest.
    A diverging trial (non-finite loss) is recorded as failed with its reason and the study
    goes on. Returns the Optuna study; figures go to reports/figures/.
    """
    config.require(n_trials >= 1, f"n_trials must be at least 1, got {n_trials}")
    config.require(epochs >= 1, f"a trial needs at least 1 epoch, got {epochs}")
    base = base or config.preset_config("original", model="resnet18", stage="stage1_basic")
    device = check_device(device)
    tuning = create_tuning_study(queue_name or f"{base.dataset}-{TUNE_QUEUE_NAME}", storage or default_storage(), seed)
    finished = [t for t in tuning.trials if t.state.is_finished()]
    remaining = max(0, n_trials - len(finished))
    if remaining:
        tuning.optimize(_objective(base, epochs, device, quiet), n_trials=remaining, catch=(DivergenceError,))
    save_tuning_figures(tuning, base.dataset)
    return tuning


def _objective(base: TrainConfig, epochs: int, device: str, quiet: bool) -> Callable[[optuna.Trial], float]:
    """Best validation macro-F1 of a trial's run; reported every epoch so the pruner can stop it."""
    def objective(trial: optuna.Trial) -> float:
        cfg = suggest_config(trial, base, epochs)

        def report_epoch(epoch: int, record: dict) -> None:
            trial.report(record["val_f1_macro"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            trained = train_model(cfg, device, quiet=quiet, on_epoch_end=report_epoch)
        except DivergenceError as err:
            trial.set_user_attr("failure_reason", str(err))
            raise
        trial.set_user_attr("history", trained.fit_result["history"])
        return trained.fit_result["best_val_f1_macro"]

    return objective


def tuning_line(tuning: optuna.Study, base: TrainConfig) -> str:
    """The best trial in one line, saying so when its validation macro-F1 is at chance."""
    best = tuning.best_trial
    text = f"best trial {best.number}: validation macro-F1 {best.value:.4f} with {best.params}"
    chance = chance_band(prepare_data(base).val_y.numpy())
    if best.value <= chance:
        text += f" -- AT CHANCE (a random or constant predictor reaches {chance:.3f}): tune with a larger budget"
    return text


def best_tuned_config(tuning: optuna.Study, base: TrainConfig, epochs: int) -> TrainConfig:
    """The final model's configuration: the best trial's parameters, trained for ``epochs``."""
    params = tuning.best_trial.params
    return dataclasses.replace(base, epochs=epochs, lr=params["lr"], weight_decay=params["weight_decay"],
                               p_aug=round(params["p_aug"], 2), scheduler=params["scheduler"])


# ---------------------------------------------------------------- distillation


def best_run_id(model: str = "resnet18", dataset: str | None = None) -> str:
    """The finished run of ``model`` (trained alone) with the highest VALIDATION macro-F1: a teacher
    chosen on the test set would carry the test set's luck into the distillation comparison."""
    frame = load_reports()
    runs_ = frame[(frame["model"] == model) & frame["teacher"].isna()] if not frame.empty else frame
    if dataset is not None and not runs_.empty:
        runs_ = runs_[runs_["dataset"] == dataset]
    if runs_.empty:
        raise ConfigError(f"no finished {model} run to use as teacher; train one first (e.g. the grid)")
    return max(runs_["report"], key=best_val_f1)["run_id"]


# Seeds of each arm of a comparison (distillation, presets): the fewest with which a verdict can be read.
COMPARISON_SEEDS = config.COMPARISON_SEEDS


def distill(teacher: str = "best", student: str = "simplecnn", T: float = 4.0, alpha: float = 0.7, *,
            seeds=None, epochs: int | None = None, dataset: str | None = None, preset: str | None = None,
            n_train: int | None = None, device: str = "auto", quiet: bool = False,
            severities=DEFAULT_SEVERITIES) -> dict:
    """Train ``student`` from a frozen teacher (same augmented batch), and the same student alone, each
    with every one of ``seeds`` (default: COMPARISON_SEEDS seeds from the teacher's).

    The students start from the teacher's settings (``preset`` replaces its optimizer settings,
    ``n_train`` and ``epochs`` its budget); they are tested on the teacher's test images, so that the
    three can be compared. Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE.
    Writes reports/distillation.json with teacher, distilled student and student alone (macro-F1 over
    seeds with its interval, parameters, inference images/s, checkpoint size) and ``difference``: the
    seed-aware comparison of distilled student and student alone (`stats.compare_groups`), "no verdict"
    with one seed.
    """
    teacher_id = best_run_id("resnet18", dataset) if teacher == "best" else config.check_name("teacher run id", teacher)
    if not report_path(teacher_id).exists():
        raise ConfigError(f"teacher run {teacher_id!r} not found in {config.RUNS_DIR}; name a finished run's id "
                          "or use --teacher best")
    load_teacher(teacher_id, "cpu")  # a damaged or replaced teacher model fails here, before any training
    teacher_report = read_report(report_path(teacher_id))
    teacher_cfg = TrainConfig(**teacher_report["config"])
    seeds = list(dict.fromkeys(seeds)) if seeds else seed_sequence((teacher_cfg.seed,), COMPARISON_SEEDS)
    settings = {**config.PRESETS[preset], "preset": preset} if preset else {}
    student_cfg = dataclasses.replace(teacher_cfg, **settings, model=student, teacher=teacher_id, kd_temperature=T,
                                      kd_alpha=alpha, epochs=epochs or teacher_cfg.epochs,
                                      n_train=n_train or teacher_cfg.n_train)

    def train(cfg: TrainConfig) -> list[dict]:
        return [run(dataclasses.replace(cfg, seed=seed), device=device, quiet=quiet, severities=severities)
                for seed in seeds]

    alone = train(dataclasses.replace(student_cfg, teacher=None))
    table = {"dataset": teacher_cfg.dataset, "teacher": teacher_id, "T": T, "alpha": alpha, "seeds": seeds,
             "note": None, "difference": None}
    teacher_val, alone_val = best_val_f1(teacher_report), float(np.mean([best_val_f1(r) for r in alone]))
    if teacher_val <= alone_val:  # nothing to transfer: say so rather than train a pointless student
        table["note"] = (f"distillation skipped: the teacher's validation macro-F1 ({teacher_val:.3f}) does not "
                         f"beat the student trained alone ({alone_val:.3f}, mean over seeds)")
        groups = {"teacher": [teacher_report], "student alone": alone}
    else:
        distilled = train(student_cfg)
        groups = {"teacher": [teacher_report], "distilled student": distilled, "student alone": alone}
        table["difference"] = compared(alone, distilled, "distilled student - student alone")
    table["rows"] = [seeds_row(name, group) for name, group in groups.items()]
    atomic_write_json(config.REPORTS_DIR / "distillation.json", table)
    return table


def seeds_row(name: str, group: list[dict]) -> dict:
    """One arm of a comparison table (``reports.comparison_row`` of its first seed): macro-F1 as the mean
    over its seeds with their Student-t interval (one seed: its test-image bootstrap interval), and its
    seeds' run ids."""
    row = comparison_row(name, group[0]) | {"n_seeds": len(group), "run_ids": [r["run_id"] for r in group]}
    if len(group) > 1:
        summary = seed_summary([r["test"]["f1_macro"] for r in group])
        row |= {"f1_macro": summary["mean"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"]}
    return row


def compared(group_a: list[dict], group_b: list[dict], of: str) -> dict:
    """The seed-aware comparison of two groups of runs on the same test images (`stats.compare_groups`,
    b - a), with its conclusion in words: "no verdict" when a group has one seed."""
    y_true = same_test_labels(pd.Series(group_a + group_b))
    verdict = compare_groups(y_true, _seed_predictions(group_a), _seed_predictions(group_b))
    if verdict["reason"]:
        conclusion = f"no verdict: {verdict['reason']}"
    elif verdict["significant"]:
        conclusion = "significantly higher" if verdict["diff"] > 0 else "significantly lower"
    else:
        conclusion = "no significant difference"
    return {"of": of, "diff": verdict["diff"], "low": verdict["low"], "high": verdict["high"],
            "p_value": verdict["p_value"], "significant": verdict["significant"], "note": verdict["reason"],
            "method": verdict["method"], "conclusion": conclusion}


# ---------------------------------------------------------------- presets side by side


def compare_presets(presets=("original", "strong"), *, seeds=tuple(range(COMPARISON_SEEDS)), dataset: str = "synthetic",
                    device: str = "auto", quiet: bool = False, **sizes) -> dict:
    """Train each preset with the same data, sizes and seeds; the seed-aware comparison on the same
    test images says whether the last preset beats the first ("no verdict" with one seed). Written to
    reports/presets.json."""
    reports_ = {name: [run(config.preset_config(name, dataset=dataset, seed=seed, **sizes), device=device, quiet=quiet)
                       for seed in seeds] for name in presets}
    rows = []
    for name in presets:
        summary = seed_summary([r["test"]["f1_macro"] for r in reports_[name]])
        rows.append({"preset": name, "f1_macro": format_estimate(summary["mean"], summary["ci_low"],
                                                                 summary["ci_high"]),
                     "per_seed": [r["test"]["f1_macro"] for r in reports_[name]],
                     "run_ids": [r["run_id"] for r in reports_[name]]})
    table = {"dataset": dataset, "sizes": sizes, "seeds": list(seeds), "rows": rows,
             "difference": compared(reports_[presets[0]], reports_[presets[-1]], f"{presets[-1]} - {presets[0]}")}
    atomic_write_json(config.REPORTS_DIR / "presets.json", table)
    return table


# ---------------------------------------------------------------- the whole study


@dataclass(frozen=True)
class StudyPlan:
    """Sizes of each part of the study; ``study_plan`` gives the full and the quick one."""

    simple_stages: tuple[str, ...]
    simple_p_augs: tuple[float, ...]
    seeds: tuple[int, ...]
    extra_stages: tuple[str, ...]  # no-flip variants and learned policies, at p_aug = 1
    resnet_stages: tuple[str, ...]
    resnet_p_augs: tuple[float, ...]
    simple_epochs: int
    resnet_epochs: int
    tune_trials: int
    tune_epochs: int
    final_epochs: int
    n_train: int | None
    n_test: int | None
    resnet_n_train: int | None
    severities: tuple[int, ...]
    # The model of the second grid, the tuning and the teacher; None leaves those parts out (they need a GPU).
    large_model: str | None = "resnet18"
    batch_size: int = 384
    preset: str = "original"  # the settings every run starts from (config.PRESETS)
    top_up: TopUp | None = TopUp()  # seeds added where the first seeds spread widely (None: none added)


# The quick plan's seed cap: two first seeds per cell, then at most a third where their spread needs it
# (at 1,000 test images every cell does), so the demo trains 9 runs at most, as with three fixed seeds.
QUICK_SEEDS_MAX = config.QUICK_SEEDS_MAX


def study_plan(quick: bool) -> StudyPlan:
    if not quick:  # the original study's sizes (FACTS.md), with three seeds per cell
        return StudyPlan(
            simple_stages=config.STAGES[1:], simple_p_augs=config.P_AUG_GRID, seeds=(42, 43, 44),
            extra_stages=config.NOFLIP_STAGES + config.POLICY_STAGES,
            resnet_stages=config.STAGES[1:], resnet_p_augs=config.P_AUG_GRID,
            simple_epochs=15, resnet_epochs=5, tune_trials=40, tune_epochs=3, final_epochs=15,
            n_train=None, n_test=None, resnet_n_train=None, severities=DEFAULT_SEVERITIES,
        )
    # Quick: minutes on a 2-core CPU, with numbers that mean something: the one-cycle "strong" preset
    # takes SimpleCNN well past chance in 5 epochs of 2,700 images (validation macro-F1 about 0.95
    # without augmentation), and the seed top-up gives each compared cell a third seed where its first
    # two spread too widely to detect +0.02 (in practice every cell). Augmented cells learn more
    # slowly and are flagged "still improving". ResNet18Cifar cannot learn in such a budget on a CPU, so
    # its grid, the tuning, the final model and the distillation are left to the full study.
    return StudyPlan(
        simple_stages=("stage1_basic", "stage5_occlusion"), simple_p_augs=(0.0, 0.5),
        seeds=(0, 1), extra_stages=(), resnet_stages=(), resnet_p_augs=(),
        simple_epochs=5, resnet_epochs=0, tune_trials=0, tune_epochs=0, final_epochs=0,
        n_train=3000, n_test=1000, resnet_n_train=None, severities=(2,), large_model=None, batch_size=128,
        preset="strong", top_up=TopUp(seeds_max=QUICK_SEEDS_MAX),
    )


def study_configs(dataset: str, plan: StudyPlan) -> tuple[TrainConfig, TrainConfig | None]:
    """Base configurations of the study's two models (the plan's preset and sizes); the second is
    None when the plan leaves the large model out."""
    simple = config.preset_config(plan.preset, dataset=dataset, epochs=plan.simple_epochs,
                                  n_train=plan.n_train, n_test=plan.n_test, batch_size=plan.batch_size)
    if plan.large_model is None:
        return simple, None
    large = dataclasses.replace(simple, model=plan.large_model, epochs=plan.resnet_epochs,
                                n_train=plan.resnet_n_train)
    return simple, large


def study_queue(dataset: str, quick: bool, part: str) -> str:
    """Name of a study part's queue; quick and full studies never share one (a worker runs every
    waiting cell of its queue, so mixing them would train the other plan's leftovers)."""
    return f"{dataset}-{'quick' if quick else 'full'}-{part}"


def _large_model_parts(dataset: str, quick: bool, plan: StudyPlan, resnet: TrainConfig, common: dict) -> None:
    """The large model's grid, its tuning, the final tuned model and its distillation into SimpleCNN."""
    on_step = common.pop("on_step")
    on_step(f"{plan.large_model} grid")
    grid((plan.large_model,), plan.resnet_stages, plan.resnet_p_augs, plan.seeds[:1], base=resnet,
         queue_name=study_queue(dataset, quick, f"{plan.large_model}-grid"), **common)
    on_step("Optuna tuning of ResNet18Cifar")
    tuning_base = dataclasses.replace(resnet, stage="stage1_basic")
    tuning = tune(plan.tune_trials, base=tuning_base, epochs=plan.tune_epochs, storage=common["storage"],
                  queue_name=study_queue(dataset, quick, TUNE_QUEUE_NAME), device=common["device"],
                  quiet=common["quiet"])
    on_step("final ResNet18Cifar")
    final = run(best_tuned_config(tuning, tuning_base, plan.final_epochs), device=common["device"],
                quiet=common["quiet"], severities=plan.severities)
    on_step("distillation into SimpleCNN")
    distill(final["run_id"], "simplecnn", epochs=plan.final_epochs, device=common["device"], quiet=common["quiet"],
            severities=plan.severities)


def print_step(title: str) -> None:
    """The default ``on_step`` of ``run_study``: one header line per part."""
    print(f"== {title}", flush=True)


def run_study(dataset: str = "synthetic", quick: bool = False, *, device: str = "auto", storage: str | None = None,
              workers: int | str = 1, quiet: bool = False, heartbeat: float = 30.0, plan: StudyPlan | None = None,
              on_step: Callable[[str], None] = print_step) -> str:
    """What the original notebook did, in order and resumably; returns the summary Markdown.

    ``plan`` replaces ``study_plan(quick)``; ``on_step(title)`` is called as each part starts.
    Killed and started again, it loads every finished run, resumes the interrupted one from
    its last epoch, and retries a cell left RUNNING once 4 heartbeats have passed.
    """
    plan = plan or study_plan(quick)
    simple, resnet = study_configs(dataset, plan)
    common = dict(storage=storage, device=device, workers=workers, severities=plan.severities, quiet=quiet,
                  heartbeat=heartbeat, top_up=plan.top_up)
    on_step("SimpleCNN stage x p_aug grid")
    grid(("simplecnn",), plan.simple_stages, plan.simple_p_augs, plan.seeds, base=simple,
         queue_name=study_queue(dataset, quick, "simplecnn-grid"), **common)
    if plan.extra_stages:
        on_step("no-flip variants and learned policies")
        # With p_aug 0: the no-augmentation baseline (the grid's runs, reused) belongs to this plan too.
        grid(("simplecnn",), plan.extra_stages, (0.0, 1.0), plan.seeds, base=simple,
             queue_name=study_queue(dataset, quick, "simplecnn-extra"), **common)
    if plan.large_model is None:
        on_step("ResNet18Cifar grid, tuning, final model and distillation: left out of this plan (they need a "
                "GPU-sized budget to learn; run the full study on a GPU)")
    else:
        _large_model_parts(dataset, quick, plan, resnet, {**common, "on_step": on_step})
    on_step("figures and summary")
    frame = load_reports()
    frame = frame[frame["dataset"] == dataset]
    paths = figures(frame)
    markdown, csv_path = write_summary(frame)
    print(f"{len(paths)} figures in {config.FIGURES_DIR}; summary in {csv_path}")
    return markdown
