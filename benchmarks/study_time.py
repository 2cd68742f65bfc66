"""How long the whole study takes on this machine: a prediction from measured costs, and its check.

The model of cost walks the study's run list exactly as ``pipeline.run_study`` builds it (the grids
through ``pipeline.grid_configs``, then the tuning trials, the final run, the two distillation
runs and the figures) and prices every run from measured rates, nothing assumed:

- training: ``epochs * n_train`` images at the fast path's step rate (no augmentation), plus the
  augmentation at ``BatchAugment``'s measured batched rate for the run's stage, the learned policies
  included (share of images: p_aug on the CPU, which augments only the chosen samples; all of them
  on an accelerator, which augments the whole batch and then picks), plus the frozen teacher's
  forward pass;
- validation every epoch, and per finished run the test pass, the robustness passes (5 kinds x
  severities, each corrupted on the CPU first) and the inference-throughput passes, at the
  evaluation rate;
- fixed costs, timed on their own: a checkpoint per epoch, model set-up, saving the model and the
  report, the work queue's bookkeeping per grid cell, Optuna's per trial, the bootstrap interval
  per run, the paired comparisons per grid cell, and each figure; once per process the device's
  start-up and, per model, the extra seconds of its first epoch and first evaluation (autotuning).

Tuning trials are priced without pruning (an upper bound for 40 trials; the median pruner starts
after 5). The tuned p_aug is unknown in advance: its expectation (0.5) is used.

``--validate`` checks the model: it predicts a scaled-down study (one epoch per run, few images,
a few stages), runs that study for real (``pipeline.run_study`` with ``pipeline.run_study_plan``
replaced, in a subprocess whose report, model and data folders are temporary) and compares
measured with predicted seconds, per part and in total (it passes within 20 %).

    python benchmarks/study_time.py [--device cpu|cuda|mps] [--sizes svhn|synthetic] [--validate]
                                    [--n-train N --n-test N --resnet-n-train N] [--threads N]

Results: benchmarks/results/study_time_<device-tag>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import config  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


CLOCKS = {"wall": "perf_counter", "cpu": "process_time"}  # --clock: time's function


def clock_name() -> str:
    from bench_training import CLOCK

    return next(name for name, function in CLOCKS.items() if CLOCK["now"].__name__ == function)


def clock() -> float:
    """The clock of every measurement here: bench_training's (``--clock``: wall or CPU seconds)."""
    from bench_training import CLOCK

    return CLOCK["now"]()
# Split sizes (train split, test split) of the datasets the study runs on.
SIZES = {
    "svhn": {"train": 73_257, "test": 26_032},
    "synthetic": {"train": config.SYNTHETIC_N_TRAIN, "test": config.SYNTHETIC_N_TEST},
}
# The steps of pipeline.run_study, in its order; the first three go through the work queue.
PARTS = ("simple_grid", "extra", "large_grid", "tuning", "final", "distillation", "figures")
GRID_PARTS = PARTS[:3]
EXPECTED_TUNED_P_AUG = 0.5  # the tuned p_aug ~ U(0, 1) (pipeline.TUNE_SPACE): its mean
INFERENCE_IMAGES = 8192  # runs.inference_throughput's default n_images (a warm-up and a timed pass)
TOLERANCE = 0.2  # --validate passes when |measured - predicted| <= 20 % of the measured time


# ----------------------------------------------------------------------------- the run list


@dataclass(frozen=True)
class Job:
    """One unit of the study: a finished run (report) or an Optuna trial (fit only)."""

    part: str
    cfg: config.TrainConfig
    report: bool
    severities: tuple[int, ...]
    teacher_model: str | None = None


def grid_seeds(plan) -> tuple[int, ...]:
    """The seeds a SimpleCNN grid cell can reach: the plan's first seeds, then the seed top-up's cap, which
    the study reaches where the first seeds spread widely (at most: the top-up decides cell by cell)."""
    from pipeline import seed_sequence

    if plan.top_up is None or len(set(plan.seeds)) < 2:  # one first seed: nothing to plan from, no top-up
        return tuple(plan.seeds)
    return tuple(seed_sequence(plan.seeds, max(plan.top_up.seeds_max, len(set(plan.seeds)))))


def study_jobs(plan, dataset: str = "synthetic") -> list[Job]:
    """Every run the study trains for ``plan``, in the order of ``pipeline.run_study``; the SimpleCNN grids
    with every seed the top-up may add (`grid_seeds`), so the prediction is an upper bound for them."""
    from pipeline import grid_configs, study_configs

    simple, large = study_configs(dataset, plan)  # the plan's preset, sizes and batch size
    seeds = grid_seeds(plan)
    grids = [
        ("simple_grid", grid_configs(("simplecnn",), plan.simple_stages, plan.simple_p_augs, seeds, simple)),
        ("extra", grid_configs(("simplecnn",), plan.extra_stages, (1.0,), seeds, simple)),
    ]
    if large is not None:
        grids.append(("large_grid", grid_configs((plan.large_model,), plan.resnet_stages, plan.resnet_p_augs,
                                                 plan.seeds[:1], large)))
    jobs, seen = [], set()
    for part, configs in grids:
        for cfg in configs:
            key = json.dumps(cfg.identity(), sort_keys=True)
            if key not in seen:  # a finished run is loaded, not retrained
                seen.add(key)
                jobs.append(Job(part, cfg, True, plan.severities))
    if large is None:
        return jobs
    tuned = dataclasses.replace(large, stage="stage1_basic", p_aug=EXPECTED_TUNED_P_AUG)
    jobs += [Job("tuning", dataclasses.replace(tuned, epochs=plan.tune_epochs), False, ())] * plan.tune_trials
    final = dataclasses.replace(tuned, epochs=plan.final_epochs)
    student = dataclasses.replace(final, model="simplecnn")
    jobs += [Job("final", final, True, plan.severities),
             Job("distillation", student, True, plan.severities, teacher_model=plan.large_model),
             Job("distillation", student, True, plan.severities)]
    return jobs


def split_sizes(cfg: config.TrainConfig, sizes: dict) -> tuple[int, int, int]:
    """(train, validation, test) images of a run: the subsample, then the validation share out of it."""
    pool = sizes["train"] if cfg.n_train is None else min(cfg.n_train, sizes["train"])
    n_val = round(pool * cfg.val_fraction)
    n_test = sizes["test"] if cfg.n_test is None else min(cfg.n_test, sizes["test"])
    return pool - n_val, n_val, n_test


def augment_share(cfg: config.TrainConfig, throughputs: dict) -> float:
    """Share of the training images that go through the stage's augmentation (see the docstring)."""
    if cfg.stage == "none" or cfg.p_aug == 0.0:
        return 0.0
    if throughputs["device_type"] == "cpu":
        return cfg.p_aug
    return 1.0


# ----------------------------------------------------------------------------- the model of cost


def batch_key(batch_size: int, eval_batch_size: int) -> str:
    return f"{batch_size}/{eval_batch_size}"


def batch_rates(throughputs: dict, batch_size: int, eval_batch_size: int) -> dict:
    """The rates measured at a run's training and evaluation batch sizes (see ``measure_rates``)."""
    return {**throughputs, **throughputs["by_batch"][batch_key(batch_size, eval_batch_size)]}


def job_seconds(job: Job, throughputs: dict, sizes: dict) -> dict[str, float]:
    """Predicted seconds of one job, per component; the corruption of the test images is left to
    ``corruption_seconds`` (made once per process and reused by every run)."""
    cfg = job.cfg
    t = batch_rates(throughputs, cfg.batch_size, cfg.eval_batch_size)
    n_train, n_val, n_test = split_sizes(cfg, sizes)
    trained = cfg.epochs * n_train
    cost = {
        "train": trained / t["train"][cfg.model],
        "augment": trained * augment_share(cfg, t) / t["augment"][cfg.stage] if cfg.stage != "none" else 0.0,
        "teacher": trained / t["forward"][job.teacher_model] if job.teacher_model else 0.0,
        "validation": cfg.epochs * n_val / t["eval"][cfg.model],
        "setup": t["setup_s"][cfg.model],
    }
    if not job.report:
        cost["fixed"] = t["trial_s"]
        return cost
    from augmentations import CORRUPTION_KINDS

    passes = 1 + len(CORRUPTION_KINDS) * len(job.severities)  # the test set and its corrupted copies
    cost.update({
        "checkpoints": cfg.epochs * t["checkpoint_s"][cfg.model],
        "test_and_robustness": (n_test * passes + 2 * min(INFERENCE_IMAGES, n_test)) / t["eval"][cfg.model],
        "bootstrap": n_test * t["bootstrap_s_per_image"],
        "fixed": (t["save_s"][cfg.model] + t["report_s"]
                  + (t["queue_cell_s"] if job.part in GRID_PARTS else 0.0)),
    })
    return cost


def corruption_seconds(job: Job, throughputs: dict, sizes: dict, made: set) -> float:
    """Seconds to corrupt the test images for ``job`` in a process that already made the copies in
    ``made`` ((n_test, kind, severity), updated): ``RunData`` caches them per process, so each is made once."""
    from augmentations import CORRUPTION_KINDS

    if not job.report:
        return 0.0
    n_test = split_sizes(job.cfg, sizes)[2]
    seconds = 0.0
    for kind in CORRUPTION_KINDS:
        for severity in job.severities:
            if (n_test, kind, severity) not in made:
                made.add((n_test, kind, severity))
                seconds += n_test / throughputs["corrupt"][kind][str(severity)]
    return seconds


def comparisons(plan, jobs: list[Job]) -> list[int]:
    """Prediction arrays in each paired comparison of a grid cell with its family's no-augmentation
    baseline (``reports.summarize``): baseline seeds + cell seeds."""
    arrays = []
    for grid_parts, seeds in ((("simple_grid", "extra"), len(grid_seeds(plan))), (("large_grid",), 1)):
        cells = {(job.cfg.stage, job.cfg.p_aug) for job in jobs if job.part in grid_parts}
        if ("none", 0.0) in cells:  # a family without a baseline compares nothing
            arrays += [2 * seeds] * (len(cells) - 1)
    return arrays


def summary_figures(jobs: list[Job]) -> int:
    """Figures of the summary step: per model 2 heatmaps + 3 of the best cell, and the distillation one."""
    return 5 * len({job.cfg.model for job in jobs if job.part in GRID_PARTS}) + any(
        job.part == "distillation" for job in jobs)


def summary_seconds(plan, jobs: list[Job], throughputs: dict, sizes: dict) -> dict[str, float]:
    """The last step: every comparison twice (figures and summary table both summarize), the figures."""
    n_test = split_sizes(jobs[0].cfg, sizes)[2]
    per_image = throughputs["compare_s_per_image"]
    one_pass = sum(per_image["fixed"] + per_image["per_array"] * arrays for arrays in comparisons(plan, jobs))
    return {"compare": 2 * n_test * one_pass, "figures": summary_figures(jobs) * throughputs["figure_s"]}


def predict_study_seconds(plan, throughputs: dict, sizes: dict, packing: dict | None = None,
                          dataset: str = "synthetic") -> dict:
    """Predicted seconds of ``pipeline.run_study`` under ``plan`` on the measured device (in the clock the
    rates were measured with), one worker, or with ``packing``.

    ``throughputs``: the measured rates and fixed costs (``measure_rates`` and ``measure_plan_costs``
    merged into one dict); ``sizes``: the dataset's split sizes {"train", "test"}; ``packing``: per model
    {"k", "speedup"} (``bench_packing.py``'s best k): each grid part then runs in k worker processes
    sharing the device, its runs ``speedup`` times faster together, and each worker process corrupts the
    test images and warms up once, alongside the others. Returns {"total_s", "parts": seconds per step of
    the study, "components": seconds per kind of work, "runs", "trials"}.
    """
    jobs = study_jobs(plan, dataset)
    parts = dict.fromkeys(PARTS, 0.0)
    components: dict[str, float] = {"first_use": throughputs["startup_s"]}
    parts[jobs[0].part] += throughputs["startup_s"]
    # What each process did once: the models it used (autotuning, kernel caches), the corrupted copies it
    # made. One process runs everything, unless a grid part is packed into worker processes of its own.
    processes: dict[str, dict[str, set]] = {}
    for job in jobs:
        packed = packing.get(job.cfg.model) if packing and job.part in GRID_PARTS else None
        process = processes.setdefault(job.part if packed else "main", {"models": set(), "made": set()})
        cost = job_seconds(job, throughputs, sizes)
        if packed:
            cost = {name: seconds / packed["speedup"] for name, seconds in cost.items()}
        cost["corrupt"] = corruption_seconds(job, throughputs, sizes, process["made"])
        if job.cfg.model not in process["models"]:
            process["models"].add(job.cfg.model)
            cost["first_use"] = batch_rates(throughputs, job.cfg.batch_size,
                                            job.cfg.eval_batch_size)["first_use_s"][job.cfg.model]
        for name, seconds in cost.items():
            parts[job.part] += seconds
            components[name] = components.get(name, 0.0) + seconds
    summary = summary_seconds(plan, jobs, throughputs, sizes)
    tuning_figures = throughputs["tuning_figures_s"] if any(job.part == "tuning" for job in jobs) else 0.0
    parts["tuning"] += tuning_figures
    parts["figures"] += summary["compare"] + summary["figures"]
    components["compare"] = summary["compare"]
    components["figures"] = summary["figures"] + tuning_figures
    return {"total_s": sum(parts.values()), "parts": parts, "components": components,
            "runs": sum(job.report for job in jobs), "trials": sum(not job.report for job in jobs)}


# ----------------------------------------------------------------------------- measuring the costs


@dataclass(frozen=True)
class Measure:
    """How much work each rate is measured on (more on a GPU, where a pass takes milliseconds)."""

    train_batches: dict
    eval_images: dict
    augment_images: int
    corrupt_images: int
    stat_images: int
    repeats: int


MEASURE = {
    "cpu": Measure({"simplecnn": 3, "resnet18": 1}, {"simplecnn": 4096, "resnet18": 768},
                   1024, 1000, 5000, 2),
    "cuda": Measure({"simplecnn": 100, "resnet18": 30}, {"simplecnn": 65536, "resnet18": 16384},
                    16384, 5000, 26032, 3),
}
MEASURE["mps"] = MEASURE["cuda"]  # an Apple GPU: passes of milliseconds too


def _timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(seconds of a first call, median seconds of ``repeats`` more), the device synchronized around each."""
    from bench_training import time_epoch

    first = time_epoch(fn, device)
    return first, statistics.median(time_epoch(fn, device) for _ in range(repeats))


def _median_seconds(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    return _timed(fn, device, repeats)[1]


def _stage_rates(stages, device: str, batch_size: int, m: Measure) -> dict[str, float]:
    """BatchAugment at p_aug = 1 on uint8 batches already on the device: images/s per stage (every stage,
    the learned policies included, runs batched)."""
    from bench_training import make_images

    from augmentations import BatchAugment

    images = make_images(m.augment_images)[0].to(device)
    rates = {}
    for stage in stages:
        augment = BatchAugment(stage, 1.0, config.SVHN_MEAN, config.SVHN_STD)
        gen = torch.Generator(device=device).manual_seed(0)

        def one_pass(augment=augment, gen=gen):
            for i in range(0, len(images), batch_size):
                augment(images[i:i + batch_size], generator=gen)

        rates[stage] = len(images) / _median_seconds(one_pass, device, m.repeats)
    return rates


def _model_rates(models, device: str, batch_size: int, eval_batch_size: int, m: Measure) -> dict:
    """Training step (fast path, no augmentation), evaluation and teacher-forward images/s, and the extra
    seconds of a model's first epoch and first evaluation (cuDNN autotuning, kernel caches) in a process."""
    from bench_training import Size, fast_pipeline, interleaved, make_images

    from model import build_model

    rates = {"train": {}, "eval": {}, "forward": {}, "first_use_s": {}}
    for name in models:
        batches = m.train_batches[name]
        images, labels = make_images(max(batches * batch_size, m.eval_images[name]))
        size = Size(batch_size, 0, batches, m.repeats)
        pipeline = fast_pipeline(name, images, labels, size, device, stage="none")
        train = interleaved({"train": pipeline}, m.repeats, device)["train"]
        rates["train"][name] = train["images_per_s"]
        model = build_model(name).to(device)
        first, median = _predict_seconds(model, images, labels, eval_batch_size, m.eval_images[name], device,
                                         m.repeats)
        rates["eval"][name] = m.eval_images[name] / median
        rates["first_use_s"][name] = (max(train["warmup_s"] - statistics.median(train["epoch_s"]), 0.0)
                                      + max(first - median, 0.0))
        _, median = _predict_seconds(model, images, labels, batch_size, batches * batch_size, device,
                                     m.repeats)
        rates["forward"][name] = batches * batch_size / median
    return rates


def _predict_seconds(model, images, labels, batch_size: int, n: int, device: str, repeats: int):
    """(first, median) seconds of ``training.predict`` over n images in batches of ``batch_size``."""
    import training
    from data_loading import DeviceLoader

    loader = DeviceLoader(images[:n], labels[:n], batch_size, config.SVHN_MEAN, config.SVHN_STD,
                          device=device, shuffle=False)
    return _timed(lambda: training.predict(model, loader, device), device, repeats)


def _startup_seconds(device: str) -> float:
    """A process's first device operation (CUDA context and cuDNN handles, the MPS device); nothing on the CPU."""
    if torch.device(device).type == "cpu":
        return 0.0
    import training

    start = clock()
    torch.nn.functional.conv2d(torch.zeros(1, 3, 8, 8, device=device), torch.zeros(4, 3, 3, 3, device=device))
    training.synchronize(device)
    return clock() - start


def _corrupt_rates(severities, m: Measure) -> dict[str, dict[str, float]]:
    """augmentations.corrupt on the CPU: images/s per kind and severity."""
    from bench_training import make_images

    from augmentations import CORRUPTION_KINDS, corrupt

    images = make_images(m.corrupt_images)[0]
    rates = {}
    for kind in CORRUPTION_KINDS:
        rates[kind] = {}
        for severity in severities:
            start = clock()
            corrupt(images, kind, severity, seed=1234)
            rates[kind][str(severity)] = len(images) / (clock() - start)
    return rates


def _fixed_costs(models, device: str, m: Measure, tmp: Path) -> dict:
    """Seconds of the per-run and per-epoch bookkeeping: set-up, checkpoint, model save, report."""
    import checkpoints
    import runs
    import training
    from atomic_io import atomic_torch_save
    from model import build_model

    costs = {"setup_s": {}, "checkpoint_s": {}, "save_s": {}}
    cfg = config.preset_config("original")
    for name in models:
        start = clock()
        model = build_model(name).to(device)
        optimizer = training.build_optimizer(model, cfg)
        costs["setup_s"][name] = clock() - start
        model(torch.zeros(2, 3, 32, 32, device=device)).sum().backward()
        optimizer.step()  # the optimizer's state exists, as in every checkpoint after the first step
        state = checkpoints.RunState(epoch=1, best_state=checkpoints.cpu_state(model), best_epoch=1)
        costs["checkpoint_s"][name] = _median_seconds(
            lambda model=model, optimizer=optimizer, state=state: checkpoints.save_checkpoint(
                tmp / "run.ckpt", cfg, model, optimizer, None, state, ([], []), torch.device(device)),
            "cpu", m.repeats)
        costs["save_s"][name] = _median_seconds(
            lambda model=model: atomic_torch_save(model.state_dict(), tmp / "run.pt"), "cpu", m.repeats)
    report = {"test_labels": "0" * m.stat_images, "test_predictions": "0" * m.stat_images,
              "history": [{"epoch": e, "val_f1_macro": 0.5} for e in range(15)]}
    costs["report_s"] = _median_seconds(
        lambda: (runs.git_commit(), atomic_write_json(tmp / "report.json", report)),
        "cpu", m.repeats)
    return costs


def _statistics_costs(m: Measure) -> dict:
    """Bootstrap interval per test image; a paired comparison per test image (fixed + per array)."""
    import numpy as np

    from stats import bootstrap_ci, compare_groups

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, m.stat_images)

    preds = [np.where(rng.random(m.stat_images) < 0.9, y_true, rng.integers(0, 10, m.stat_images))
             for _ in range(6)]  # 90 % right, like a trained model
    one = _median_seconds(lambda: bootstrap_ci(y_true, preds[0], seed=42), "cpu", 1)
    two = _median_seconds(lambda: compare_groups(y_true, preds[:1], preds[1:2]), "cpu", 1)
    six = _median_seconds(lambda: compare_groups(y_true, preds[:3], preds[3:]), "cpu", 1)
    per_array = max(six - two, 0.0) / 4
    return {"bootstrap_s_per_image": one / m.stat_images,
            "compare_s_per_image": {"fixed": max(two - 2 * per_array, 0.0) / m.stat_images,
                                    "per_array": per_array / m.stat_images}}


def _figure_seconds(tmp: Path) -> float:
    """Mean seconds to draw and save a heatmap, a confusion matrix and learning curves."""
    import matplotlib.pyplot as plt
    import pandas as pd

    import visualization as viz

    table = pd.DataFrame([[0.9 - 0.01 * (i + j) for j in range(5)] for i in range(5)],
                         index=list(config.STAGES[1:]), columns=list(config.P_AUG_GRID))
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "train_accuracy": 0.5,
                "val_accuracy": 0.5, "val_f1_macro": 0.5} for e in range(1, 16)]
    makers = [lambda: viz.plot_heatmap(table, dataset="synthetic"),
              lambda: viz.plot_confusion_matrix([[10 * (i == j) + 1 for j in range(10)] for i in range(10)],
                                                dataset="synthetic"),
              lambda: viz.plot_learning_curves(history, dataset="synthetic")]
    start = clock()
    for make in makers:
        viz.save_figure(make(), tmp / "figure.png")
    plt.close("all")
    return (clock() - start) / len(makers)


def _optuna_costs(n_trials: int, tmp: Path) -> dict:
    """Per-trial bookkeeping of the tuning (journal storage, TPE, median pruner) and its figures."""
    import optuna

    import pipeline
    import reports
    from work_queue import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="cost", storage=open_storage(str(tmp / "optuna.journal")),
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=42),
                                pruner=optuna.pruners.MedianPruner(n_warmup_steps=1))
    base = config.preset_config("original", model="resnet18", stage="stage1_basic")

    def objective(trial):
        cfg = pipeline.suggest_config(trial, base, 3)
        for epoch in range(1, cfg.epochs + 1):
            trial.report(cfg.lr * epoch, epoch)
            trial.should_prune()  # asked after every epoch, as in pipeline.tune
        return cfg.lr

    start = clock()
    study.optimize(objective, n_trials=max(n_trials, 1))
    trial_s = (clock() - start) / max(n_trials, 1)
    start = clock()
    reports.save_tuning_figures(study, "synthetic", out_dir=tmp)
    return {"trial_s": trial_s, "tuning_figures_s": clock() - start}


def _queue_cell_seconds(n_cells: int, n_test: int, tmp: Path) -> float:
    """Work-queue bookkeeping per grid cell: enqueue, claim, heartbeat thread, store the report."""
    from work_queue import enqueue_cells, open_storage, run_worker

    storage = open_storage(str(tmp / "queue.journal"))
    cells = [{"cell_key": f"cell-{i}", "config": {"i": i}, "severities": [2]} for i in range(n_cells)]
    report = {"test_labels": "0" * n_test, "test_predictions": "0" * n_test}
    start = clock()
    enqueue_cells(storage, "cost", cells)
    run_worker(storage, "cost", lambda cell: report)
    return (clock() - start) / n_cells


def measure_rates(device: str, stages, severities, batch_sizes=((384, 2048),), models=config.MODELS) -> dict:
    """The rates and fixed costs of the study's work, measured now on ``device``; the model and augmentation
    rates at each (training, evaluation) batch size of ``batch_sizes``, under "by_batch"."""
    m = MEASURE[torch.device(device).type]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        return {
            "device_type": torch.device(device).type,
            "startup_s": _startup_seconds(device),  # first: nothing has touched the device yet
            "by_batch": {batch_key(batch_size, eval_batch_size): {
                **_model_rates(models, device, batch_size, eval_batch_size, m),
                "augment": _stage_rates(stages, device, batch_size, m)} for batch_size, eval_batch_size in batch_sizes},
            "corrupt": _corrupt_rates(severities, m),
            **_fixed_costs(config.MODELS, device, m, tmp),
            **_statistics_costs(m),
            "figure_s": _figure_seconds(tmp),
        }


def measure_plan_costs(plan, sizes: dict) -> dict:
    """The bookkeeping that grows with the plan: Optuna per trial and its figures, the queue per cell."""
    jobs = study_jobs(plan)
    n_test = split_sizes(jobs[0].cfg, sizes)[2]
    largest_grid = max(sum(job.part == part for job in jobs) for part in GRID_PARTS)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        return {**_optuna_costs(plan.tune_trials, tmp),
                "queue_cell_s": _queue_cell_seconds(max(largest_grid, 1), n_test, tmp)}


def plan_batch_sizes(*plans) -> list[tuple[int, int]]:
    """Every (training, evaluation) batch size the plans' runs use."""
    return sorted({(job.cfg.batch_size, job.cfg.eval_batch_size) for plan in plans for job in study_jobs(plan)})


def plan_stages(*plans) -> list[str]:
    """Every augmentation stage the plans train with."""
    return sorted({job.cfg.stage for plan in plans for job in study_jobs(plan) if job.cfg.stage != "none"})


# ----------------------------------------------------------------------------- checking the model


def scaled_plan(n_train: int | None = None, n_test: int | None = None, resnet_n_train: int | None = None):
    """A study small enough to run for real: one epoch per run, a few stages, two tuning trials; it
    keeps every kind of work (base stages and a learned policy, comparisons with a baseline in both
    grids, tuning, final run, distillation, figures)."""
    from pipeline import StudyPlan

    return StudyPlan(
        simple_stages=("stage1_basic", "stage5_occlusion"), simple_p_augs=(0.0, 1.0), seeds=(42,),
        extra_stages=("stage3_color_noflip", "trivialaugment"), resnet_stages=("stage1_basic",),
        resnet_p_augs=(0.0, 0.5), simple_epochs=1, resnet_epochs=1, tune_trials=2, tune_epochs=1,
        final_epochs=1, n_train=n_train, n_test=n_test, resnet_n_train=resnet_n_train, severities=(2,),
    )


RESULT_MARK = "STUDY-TIME-RESULT "


def run_study_child(plan_fields: dict, device: str, threads: int | None) -> None:
    """In the subprocess: ``pipeline.run_study`` under ``plan``; prints the seconds of each step."""
    import pipeline

    if threads:
        torch.set_num_threads(threads)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in plan_fields.items()}  # JSON lists back
    plan = pipeline.StudyPlan(**fields)
    marks = []

    def on_step(title: str) -> None:
        marks.append(clock())
        pipeline.print_step(title)

    start = clock()
    pipeline.run_study("synthetic", device=device, plan=plan, on_step=on_step)
    end = clock()
    parts = [b - a for a, b in zip(marks, marks[1:] + [end], strict=True)]
    print(RESULT_MARK + json.dumps({"seconds": end - start, "before_first_step_s": marks[0] - start,
                                    "parts": dict(zip(PARTS, parts, strict=True))}), flush=True)


def run_scaled_study(plan, device: str, n_train: int, n_test: int, threads: int | None) -> dict:
    """Run ``plan`` for real in a subprocess whose data, report and model folders are temporary
    (set in its environment, so config reads them at import); returns its measured seconds."""
    from data_loading import load_split, make_synthetic_svhn

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        make_synthetic_svhn(tmp / "data", n_train=n_train, n_test=n_test, seed=0)
        for split in ("train", "test"):
            load_split("synthetic", split, root=tmp / "data")  # writes the .pt caches the study reads
        env = {**os.environ, "SVHN_AUG_DATA_DIR": str(tmp / "data"), "MPLBACKEND": "Agg",
               "SVHN_AUG_REPORTS_DIR": str(tmp / "reports"), "SVHN_AUG_MODELS_DIR": str(tmp / "models")}
        command = [sys.executable, str(Path(__file__).resolve()), "--device", device,
                   "--child", json.dumps(dataclasses.asdict(plan))]
        command += ["--threads", str(threads)] if threads else []
        command += ["--clock", clock_name()]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the scaled-down study failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def validate(plan, rates: dict, device: str, n_train: int, n_test: int, threads: int | None) -> dict:
    """Predict the scaled-down study, run it, compare: passes within TOLERANCE of the measured time."""
    sizes = {"train": n_train, "test": n_test}
    predicted = predict_study_seconds(plan, {**rates, **measure_plan_costs(plan, sizes)}, sizes)
    measured = run_scaled_study(plan, device, n_train, n_test, threads)
    error = (predicted["total_s"] - measured["seconds"]) / measured["seconds"]
    return {"plan": dataclasses.asdict(plan), "sizes": sizes, "predicted": predicted, "measured": measured,
            "relative_error": error, "tolerance": TOLERANCE, "passed": abs(error) <= TOLERANCE}


# ----------------------------------------------------------------------------- command line


def print_prediction(title: str, prediction: dict) -> None:
    total = prediction["total_s"]
    print(f"{title}: {total:,.0f} s = {total / 60:,.1f} min = {total / 3600:,.2f} h "
          f"({prediction['runs']} runs, {prediction['trials']} tuning trials)")
    print("  per step: " + ", ".join(f"{k} {v:,.0f} s" for k, v in prediction["parts"].items()))
    print("  per kind: " + ", ".join(f"{k} {v:,.0f} s" for k, v in
                                     sorted(prediction["components"].items(), key=lambda kv: -kv[1])))


def packing_speedups(path: Path | None) -> dict | None:
    """Per model {"k", "speedup"} at bench_packing.py's best k, from its JSON; None without one."""
    if path is None or not path.exists():
        return None
    packing = json.loads(path.read_text())
    return {model: {"k": k, "speedup": packing["models"][model][str(k)]["speedup"]}
            for model, k in packing.get("best_k", {}).items() if "speedup" in packing["models"][model][str(k)]}


def compare(predicted: float, measured: float) -> dict:
    error = (predicted - measured) / measured
    return {"predicted_s": predicted, "measured_s": measured, "relative_error": error, "tolerance": TOLERANCE,
            "passed": abs(error) <= TOLERANCE}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--sizes", choices=tuple(SIZES), default="svhn", help="split sizes of the full study")
    parser.add_argument("--plan", choices=("full", "quick"), default="full",
                        help="the study predicted: the full one, or the quick one (experiments.py study --quick)")
    parser.add_argument("--validate", action="store_true", help="run a scaled-down study and compare")
    parser.add_argument("--n-train", type=int, default=1000, help="--validate: synthetic train images")
    parser.add_argument("--n-test", type=int, default=200, help="--validate: synthetic test images")
    parser.add_argument("--resnet-n-train", type=int, default=300,
                        help="--validate: train images of the ResNet runs")
    parser.add_argument("--compare-seconds", type=float, metavar="SECONDS",
                        help="measured seconds of the predicted study (in --clock's clock) to compare with")
    parser.add_argument("--packing", type=Path, help="bench_packing.py's JSON: the full study is also predicted "
                        "with its best k runs packed per grid (default: benchmarks/results/packing_<device>.json "
                        "when present)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall seconds, or this process's CPU seconds (steadier on a shared machine; "
                             "with --threads 1 they are the seconds of an unshared core)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import bench_training

    bench_training.set_clock(getattr(time, CLOCKS[args.clock]))
    device = config.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return run_study_child(json.loads(args.child), device, args.threads)
    return predict_and_check(args, device)


def run_validation(report: dict, small, rates: dict, device: str, args: argparse.Namespace, save) -> None:
    """--validate: the scaled-down study predicted, run, compared; into ``report`` (then ``save()``)."""
    try:
        result = validate(small, rates, device, args.n_train, args.n_test, args.threads)
    except Exception as err:  # noqa: BLE001 - the scaled-down study's failure is a result too
        report["validation"] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        save()
        raise
    report["validation"] = result
    print_prediction("scaled-down study, predicted", result["predicted"])
    measured = result["measured"]
    print(f"scaled-down study, measured: {measured['seconds']:,.1f} s; per step: "
          + ", ".join(f"{k} {v:,.1f} s" for k, v in measured["parts"].items()))
    print(f"relative error {result['relative_error']:+.1%} (tolerance {TOLERANCE:.0%}): "
          f"{'PASS' if result['passed'] else 'FAIL'}")
    save()


def predict_and_check(args: argparse.Namespace, device: str) -> dict:
    """Measure, predict, check; the JSON rewritten after every part, so a run cut short keeps what it has."""
    from bench_training import device_tag, environment

    from pipeline import study_plan

    plan = study_plan(quick=args.plan == "quick")
    small = scaled_plan(resnet_n_train=args.resnet_n_train)
    measured_plans = (plan, small) if args.validate else (plan,)
    path = RESULTS_DIR / f"study_time_{device_tag([device])}{'-quick' if args.plan == 'quick' else ''}.json"
    sizes = SIZES[args.sizes]
    report = {**environment([device]), "device": device, "clock": args.clock, "sizes": sizes,
              "dataset_sizes": args.sizes, "plan_name": args.plan, "plan": dataclasses.asdict(plan)}

    def save() -> None:
        report["load_average_1min_after"] = os.getloadavg()[0]
        for target in (path, *filter(None, [args.out])):
            atomic_write_json(target, report)

    print(f"measuring rates and fixed costs on {device} ({torch.get_num_threads()} CPU threads, {args.clock} "
          "clock) ...", flush=True)
    rates = measure_rates(device, plan_stages(*measured_plans),
                          sorted({severity for p in measured_plans for severity in p.severities}),
                          plan_batch_sizes(*measured_plans),
                          sorted({job.cfg.model for p in measured_plans for job in study_jobs(p)}))
    report["throughputs"] = rates
    save()
    report["plan_costs"] = measure_plan_costs(plan, sizes)
    costs = {**rates, **report["plan_costs"]}
    report["prediction"] = predict_study_seconds(plan, costs, sizes)
    print_prediction(f"{args.plan} study ({args.sizes} sizes) on {device}, one run at a time", report["prediction"])
    packing = packing_speedups(args.packing or RESULTS_DIR / f"packing_{device_tag([device])}.json")
    if packing:
        report["packing"] = packing
        report["prediction_packed"] = predict_study_seconds(plan, costs, sizes, packing)
        print_prediction(f"{args.plan} study, grids packed ({packing})", report["prediction_packed"])
    if args.compare_seconds:
        report["comparison"] = compare(report["prediction"]["total_s"], args.compare_seconds)
        print(f"measured {args.compare_seconds:,.1f} s: relative error {report['comparison']['relative_error']:+.1%} "
              f"(tolerance {TOLERANCE:.0%}): {'PASS' if report['comparison']['passed'] else 'FAIL'}")
    save()
    if args.validate:
        run_validation(report, small, rates, device, args, save)
    print(f"wrote {path.relative_to(ROOT)}")
    return report


if __name__ == "__main__":
    main()
