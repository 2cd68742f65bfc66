"""The study built from runs: the stage x p_aug grid through the work queue, Optuna tuning,
distillation, presets side by side, and the study plan with the function that runs it all."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import pandas as pd

import config
from atomic_io import atomic_write_json
from config import DEFAULT_QUEUE_NAME, DEFAULT_SEVERITIES, TUNE_QUEUE_NAME, ConfigError, TrainConfig, grid_queue_name
from data_loading import prepare_data
from reports import (
    comparison_row,
    figures,
    load_reports,
    same_test_labels,
    save_tuning_figures,
    write_summary,
)
from runs import (
    announcer,
    best_val_f1,
    canonical_config,
    check_device,
    finished_report_path,
    load_teacher,
    parse_digits,
    read_report,
    report_path,
    run,
    run_id,
    train_model,
)
from stats import chance_band, compare_groups, format_estimate, seed_summary
from training import DivergenceError, format_duration
from work_queue import (
    QueueError,
    create_tuning_study,
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


def grid(models=("simplecnn",), stages=config.STAGES[1:], p_augs=config.P_AUG_GRID, seeds=(42,), *,
         base: TrainConfig | None = None, storage: str | None = None, queue_name: str | None = None,
         workers: int = 1, device: str = "auto", severities=DEFAULT_SEVERITIES,
         quiet: bool = False, heartbeat: float = 30.0) -> list[dict]:
    """Run a models x stages x p_augs x seeds grid through the queue; returns the reports.

    The queue is ``queue_name``, by default ``<dataset>-grid``. ``workers > 1`` starts that many worker
    processes on this machine; more workers on other machines can join with
    ``python experiments.py worker --storage URL --study NAME``.
    """
    config.require(workers >= 1, f"workers must be at least 1, got {workers}")
    base = base or config.preset_config("original")
    queue_name = queue_name or grid_queue_name(base.dataset)
    configs = grid_configs(models, stages, p_augs, seeds, base)
    storage = storage or default_storage()
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
    processes = [subprocess.Popen(command) for _ in range(workers)]
    codes = [process.wait() for process in processes]
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


def distill(teacher: str = "best", student: str = "simplecnn", T: float = 4.0, alpha: float = 0.7, *,
            epochs: int | None = None, dataset: str | None = None, preset: str | None = None,
            n_train: int | None = None, device: str = "auto", quiet: bool = False,
            severities=DEFAULT_SEVERITIES) -> dict:
    """Train ``student`` from a frozen teacher (same augmented batch), and the same student alone.

    The students start from the teacher's settings (``preset`` replaces its optimizer settings,
    ``n_train`` and ``epochs`` its budget); they are tested on the teacher's test images, so that the
    three can be compared. Loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE.
    Writes reports/distillation.json with teacher, distilled student and student alone: macro-F1 with
    CI, parameters, inference images/s and checkpoint size.
    """
    teacher_id = best_run_id("resnet18", dataset) if teacher == "best" else teacher
    if not report_path(teacher_id).exists():
        raise ConfigError(f"teacher run {teacher_id!r} not found in {config.RUNS_DIR}; name a finished run's id "
                          "or use --teacher best")
    load_teacher(teacher_id, "cpu")  # a damaged or replaced teacher model fails here, before any training
    teacher_report = read_report(report_path(teacher_id))
    teacher_cfg = TrainConfig(**teacher_report["config"])
    settings = {**config.PRESETS[preset], "preset": preset} if preset else {}
    student_cfg = dataclasses.replace(teacher_cfg, **settings, model=student, teacher=teacher_id, kd_temperature=T,
                                      kd_alpha=alpha, epochs=epochs or teacher_cfg.epochs,
                                      n_train=n_train or teacher_cfg.n_train, seed=teacher_cfg.seed)
    alone_cfg = dataclasses.replace(student_cfg, teacher=None)
    alone = run(alone_cfg, device=device, quiet=quiet, severities=severities)
    table = {"dataset": teacher_cfg.dataset, "teacher": teacher_id, "T": T, "alpha": alpha, "note": None}
    teacher_val, alone_val = best_val_f1(teacher_report), best_val_f1(alone)
    if teacher_val <= alone_val:  # nothing to transfer: say so rather than train a pointless student
        table["note"] = (f"distillation skipped: the teacher's validation macro-F1 ({teacher_val:.3f}) does not "
                         f"beat the student trained alone ({alone_val:.3f})")
        reports_ = {"teacher": teacher_report, "student alone": alone}
    else:
        distilled = run(student_cfg, device=device, quiet=quiet, severities=severities)
        reports_ = {"teacher": teacher_report, "distilled student": distilled, "student alone": alone}
    table["rows"] = [comparison_row(name, report) for name, report in reports_.items()]
    atomic_write_json(config.REPORTS_DIR / "distillation.json", table)
    return table


# ---------------------------------------------------------------- presets side by side


def compare_presets(presets=("original", "strong"), *, seeds=(0, 1), dataset: str = "synthetic",
                    device: str = "auto", quiet: bool = False, **sizes) -> dict:
    """Train each preset with the same data, sizes and seeds; the seed-aware comparison on the same
    test images says whether the last preset beats the first. Written to reports/presets.json."""
    reports_ = {name: [run(config.preset_config(name, dataset=dataset, seed=seed, **sizes), device=device, quiet=quiet)
                       for seed in seeds] for name in presets}
    everything = pd.Series([r for group in reports_.values() for r in group])
    y_true = same_test_labels(everything)

    def preds(name):
        return [parse_digits(r["test_predictions"]) for r in reports_[name]]

    verdict = compare_groups(y_true, preds(presets[0]), preds(presets[-1]))
    rows = []
    for name in presets:
        summary = seed_summary([r["test"]["f1_macro"] for r in reports_[name]])
        rows.append({"preset": name, "f1_macro": format_estimate(summary["mean"], summary["ci_low"],
                                                                 summary["ci_high"]),
                     "per_seed": [r["test"]["f1_macro"] for r in reports_[name]],
                     "run_ids": [r["run_id"] for r in reports_[name]]})
    table = {"dataset": dataset, "sizes": sizes, "seeds": list(seeds), "rows": rows,
             "difference": {"of": f"{presets[-1]} - {presets[0]}", "diff": verdict["diff"], "low": verdict["low"],
                            "high": verdict["high"], "p_value": verdict["p_value"],
                            "significant": verdict["significant"], "note": verdict["reason"],
                            "method": verdict["method"]}}
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
    # without augmentation), and every compared cell has three seeds. Augmented cells learn more
    # slowly and are flagged "still improving". ResNet18Cifar cannot learn in such a budget on a CPU, so
    # its grid, the tuning, the final model and the distillation are left to the full study.
    return StudyPlan(
        simple_stages=("stage1_basic", "stage5_occlusion"), simple_p_augs=(0.0, 0.5),
        seeds=(0, 1, 2), extra_stages=(), resnet_stages=(), resnet_p_augs=(),
        simple_epochs=5, resnet_epochs=0, tune_trials=0, tune_epochs=0, final_epochs=0,
        n_train=3000, n_test=1000, resnet_n_train=None, severities=(2,), large_model=None, batch_size=128,
        preset="strong",
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
              workers: int = 1, quiet: bool = False, heartbeat: float = 30.0, plan: StudyPlan | None = None,
              on_step: Callable[[str], None] = print_step) -> str:
    """What the original notebook did, in order and resumably; returns the summary Markdown.

    ``plan`` replaces ``study_plan(quick)``; ``on_step(title)`` is called as each part starts.
    Killed and started again, it loads every finished run, resumes the interrupted one from
    its last epoch, and retries a cell left RUNNING once 4 heartbeats have passed.
    """
    plan = plan or study_plan(quick)
    simple, resnet = study_configs(dataset, plan)
    common = dict(storage=storage, device=device, workers=workers, severities=plan.severities, quiet=quiet,
                  heartbeat=heartbeat)
    on_step("SimpleCNN stage x p_aug grid")
    grid(("simplecnn",), plan.simple_stages, plan.simple_p_augs, plan.seeds, base=simple,
         queue_name=study_queue(dataset, quick, "simplecnn-grid"), **common)
    if plan.extra_stages:
        on_step("no-flip variants and learned policies")
        grid(("simplecnn",), plan.extra_stages, (1.0,), plan.seeds, base=simple,
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
