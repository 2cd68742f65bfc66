"""Training throughput: the original study's pipeline against the fast path, side by side.

For each model (SimpleCNN, ResNet18Cifar) and device (CPU, and CUDA or MPS when present), on the same
images, batch size and augmentation (``stage5_occlusion`` at p_aug = 1), in one run:

- original: a small re-creation of the original study's loop: PIL images through the per-sample
  torchvision Compose (``ProbTransform(eval, build_stage_transform(stage), p_aug)``), a DataLoader
  with 2 workers, float32 NCHW model, plain ``torch.optim.Adam``, and a ``loss.item()`` every step;
- fast: ``DeviceLoader`` (uint8 images resident on the device; it normalizes every batch) +
  ``BatchAugment`` + ``training.train_epoch`` (bf16 autocast on CUDA, channels_last, the fused optimizer of
  ``training.build_optimizer``, no host read inside the step);
- fast + torch.compile (with ``--compile``, CUDA only; the model and the augmentation's apply, as
  ``TrainConfig(compile=True)`` does): its warm-up epoch holds the compilation. Then only the fast path and
  its compiled form are measured (the original pipeline and the syncs are the run without --compile's), and
  torch's recompile limit is an error, not a silent fallback to eager code.

Every pipeline trains one untimed warm-up epoch, then ``repeats`` timed epochs, the pipelines
interleaved in alternating order (the machine may be shared: load changes hit all alike); the
device is synchronized before each clock read; images/s is the median over the timed epochs, the
ratio is fast / original. ``--layout`` (on by default on the CPU) times float32 training steps with
NCHW against channels_last, interleaved: the evidence for ``training.CPU_CHANNELS_LAST``.
Results: benchmarks/results/training_<device-tag>.json (``cpu`` when no GPU was measured;
training_<device-tag>-compile.json with --compile), rewritten (atomically) after every row, so a run
stopped half-way keeps its rows; a row that fails (a compiler or CUDA error) holds its error text and the
next row runs.

On the CPU each row also counts, per training step of the fast path (SimpleCNN or ResNet18Cifar, without
augmentation and with stage 5 on each of ``BatchAugment``'s two paths: the CPU path, and the accelerator
path that CUDA and MPS take, forced on the CPU), and of its loader alone (augmentation and
normalization): aten ops (``bench_augment.AtenCounter``, a TorchDispatchMode: on an accelerator each is
about one kernel launch, views apart; the CPU runs no autocast, so CUDA adds the model's casts) and the
calls that would make the host wait for an accelerator or copy Python data to it
(``augment_ops.count_host_syncs``, a TorchFunctionMode). After a warm-up epoch (cached constants),
epochs of k and 2k steps are counted and differenced, so the epoch's own calls (its one read of the
loss and accuracy at the end) cancel out. On CUDA each row counts the synchronizing calls per training
step (torch's sync debug mode).

``--memory`` runs only the memory check: SVHN train + extra (604,388 images) resident on the GPU as
uint8 and ResNet18Cifar trained on it at batch 1024 (``torch.cuda.max_memory_allocated``; results in
memory_<device-tag>.json).

    python benchmarks/bench_training.py [--quick] [--device cpu|cuda|mps|all] [--models simplecnn resnet18]
                                        [--compile] [--layout | --no-layout] [--memory] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_augment import AtenCounter, device_tag  # noqa: E402  (same folder, on sys.path as a script)
from torch.utils.data import DataLoader  # noqa: E402

import config  # noqa: E402
import training  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402
from augment_ops import count_host_syncs  # noqa: E402
from augmentations import BatchAugment, ProbTransform, build_stage_transform, get_eval_transform  # noqa: E402
from data_loading import DeviceLoader, TensorImageDataset  # noqa: E402
from model import build_model  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
STAGE = "stage5_occlusion"
P_AUG = 1.0
ORIGINAL_WORKERS = 2  # the original study's DataLoader workers
SVHN_TRAIN_EXTRA = 73_257 + 531_131  # images of SVHN's train and extra splits


@dataclass(frozen=True)
class Size:
    """Batch size and batches per epoch of one model on one device, for each pipeline."""

    batch_size: int
    original_batches: int
    fast_batches: int
    repeats: int  # timed epochs after the warm-up epoch


# ResNet18Cifar trains at tens of images/s on a 2-core CPU: there it gets a smaller batch, few batches.
SIZES = {
    ("cpu", "simplecnn", True): Size(384, 3, 3, 3),
    ("cpu", "resnet18", True): Size(64, 2, 2, 3),
    ("cpu", "simplecnn", False): Size(384, 8, 8, 3),
    ("cpu", "resnet18", False): Size(128, 4, 4, 3),
    ("cuda", "simplecnn", False): Size(384, 10, 100, 2),
    ("cuda", "resnet18", False): Size(384, 10, 50, 2),
    ("mps", "simplecnn", False): Size(384, 10, 50, 2),
    ("mps", "resnet18", False): Size(256, 5, 20, 2),
}
COUNT_STEPS = 3  # per-step counts: epochs of COUNT_STEPS and 2 * COUNT_STEPS steps (below CHECK_EVERY)
COUNT_BATCH = 32  # per-step counts hardly depend on the batch size


def size_for(device: str, model: str, quick: bool) -> Size:
    return SIZES.get((device, model, quick if device == "cpu" else False))


# ----------------------------------------------------------------------------- machine and data


def environment(devices: list[str]) -> dict:
    """What qualifies the numbers: date, versions, devices, threads, the machine's load."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": training.device_label("cpu"),
        "cpu_threads": torch.get_num_threads(),
        "devices": {device: training.device_label(device) for device in devices},
        "load_average_1min": os.getloadavg()[0],
    }


def make_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random uint8 images (N, 3, 32, 32) (low-frequency colour fields) and labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    fine = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.randint(0, config.NUM_CLASSES, (n,), generator=gen)
    return fine.mul(255).round().to(torch.uint8), labels


CLOCK = {"now": time.perf_counter}  # the clock of time_epoch (set_clock)


def set_clock(clock) -> None:
    """The clock ``time_epoch`` reads: time.perf_counter (wall, the default) or time.process_time (this
    process's CPU seconds, all its threads: steadier than the wall on a machine shared with others)."""
    CLOCK["now"] = clock


def time_epoch(run_epoch, device: str) -> float:
    """Seconds of one ``run_epoch()``, between two device synchronizations."""
    training.synchronize(device)
    start = CLOCK["now"]()
    run_epoch()
    training.synchronize(device)
    return CLOCK["now"]() - start


def interleaved(pipelines: dict[str, tuple[int, object]], repeats: int, device: str) -> dict[str, dict]:
    """Warm up every pipeline with one epoch, then time ``repeats`` epochs of each, interleaved and in
    alternating order, so that a shared machine's changing load falls on all of them alike.

    ``pipelines``: name -> (images per epoch, run_epoch). Returns name -> {images_per_epoch,
    warmup_s, epoch_s, images_per_s (median)}.
    """
    results = {name: {"images_per_epoch": n, "warmup_s": time_epoch(run_epoch, device), "epoch_s": []}
               for name, (n, run_epoch) in pipelines.items()}
    names = list(pipelines)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            results[name]["epoch_s"].append(time_epoch(pipelines[name][1], device))
    for result in results.values():
        result["images_per_s"] = result["images_per_epoch"] / statistics.median(result["epoch_s"])
    return results


# ----------------------------------------------------------------------------- the two pipelines


def original_loader(images, labels, batch_size: int, stage: str = STAGE, p_aug: float = P_AUG,
                    workers: int = ORIGINAL_WORKERS) -> DataLoader:
    """The original study's train loader: per-sample PIL transforms in DataLoader workers."""
    eval_t = get_eval_transform(config.SVHN_MEAN, config.SVHN_STD)
    train_t = ProbTransform(eval_t, build_stage_transform(stage, config.SVHN_MEAN, config.SVHN_STD), p_aug)
    dataset = TensorImageDataset(images, labels, train_t)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(0))


def original_epoch(model, loader, optimizer, device: str) -> float:
    """One epoch of the original loop, as the study wrote it: a host read of the loss every step."""
    model.train()
    total = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def original_pipeline(name: str, images, labels, size: Size, device: str) -> tuple[int, object]:
    """(images per epoch, run_epoch) of the original pipeline: float32, NCHW, default Adam, 2 workers."""
    n = size.batch_size * size.original_batches
    loader = original_loader(images[:n], labels[:n], size.batch_size)
    torch.manual_seed(0)
    model = build_model(name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    return n, lambda: original_epoch(model, loader, optimizer, device)


def fast_loader(images, labels, batch_size: int, device: str, stage: str = STAGE, p_aug: float = P_AUG,
                accelerator_path: bool | None = None, compile_augment: bool = False) -> DeviceLoader:
    """The fast path's loader; ``accelerator_path`` as ``BatchAugment``'s (None: chosen by the device)."""
    augment = None if stage == "none" else BatchAugment(stage, p_aug, config.SVHN_MEAN, config.SVHN_STD,
                                                        accelerator_path=accelerator_path, compile=compile_augment)
    return DeviceLoader(images, labels, batch_size, config.SVHN_MEAN, config.SVHN_STD, device=device,
                        shuffle=True, augment=augment, seed=0)


def fast_pipeline(name: str, images, labels, size: Size, device: str, *, compile_model: bool = False,
                  stage: str = STAGE, batches: int | None = None) -> tuple[int, object]:
    """(images per epoch, run_epoch) of the fast path: DeviceLoader + BatchAugment + training.train_epoch."""
    n = size.batch_size * (batches or size.fast_batches)  # whole batches: one shape, one compilation
    loader = fast_loader(images[:n], labels[:n], size.batch_size, device, stage, compile_augment=compile_model)
    model, optimizer = fast_model(name, device, size.batch_size)
    train_model = torch.compile(model) if compile_model else model
    return n, lambda: training.train_epoch(train_model, loader, optimizer, device)


def fast_model(name: str, device: str, batch_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (seeded) and the optimizer ``fit`` would build for the original preset."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    training.prepare_model(model, device)  # as fit does, before the optimizer is built
    cfg = config.preset_config("original", model=name, batch_size=batch_size)
    return model, training.build_optimizer(model, cfg)


def measure_model(name: str, device: str, quick: bool, compile_model: bool) -> dict:
    """Original and fast (and compiled) images/s of one model on one device, with the ratios."""
    size = size_for(device, name, quick)
    n = size.batch_size * max(size.original_batches, size.fast_batches)
    images, labels = make_images(n)
    pipelines = {"fast": fast_pipeline(name, images, labels, size, device)}
    if not compile_model:
        pipelines["original"] = original_pipeline(name, images, labels, size, device)
    row = {"model": name, "device": device, "batch_size": size.batch_size, "stage": STAGE, "p_aug": P_AUG,
           **interleaved(pipelines, size.repeats, device)}
    if compile_model:
        try:  # measured, not assumed: a compiler failure (the recompile limit included) is a result too
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                compiled = fast_pipeline(name, images, labels, size, device, compile_model=True)
                row.update(interleaved({"fast_compiled": compiled}, size.repeats, device))
            row["compile_ratio"] = row["fast_compiled"]["images_per_s"] / row["fast"]["images_per_s"]
        except Exception as err:  # noqa: BLE001 - inductor raises many types
            row["fast_compiled"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        return row
    row["ratio"] = row["fast"]["images_per_s"] / row["original"]["images_per_s"]
    if device == "cuda":
        row["host_syncs_per_step"] = {stage: syncs_per_step(name, images, labels, size, device, stage)
                                      for stage in ("none", STAGE)}
    if device == "cpu":
        row["per_step_counts"] = {stage if path is None else f"{stage}-{path}_path": per_step_counts(name, stage, path)
                                  for stage, path in COUNTED}
    return row


def syncs_per_step(name: str, images, labels, size: Size, device: str, stage: str,
                   batches: int = 20) -> float:
    """Synchronizing CUDA calls per training step of the fast path (torch's sync debug mode), the
    epoch's final reads included: near 0 when the step never waits for the device."""
    _, run_epoch = fast_pipeline(name, images, labels, size, device, stage=stage, batches=batches)
    run_epoch()  # warm-up: cuDNN's autotuning may synchronize once per shape
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / batches


# ----------------------------------------------------------------------------- ops and syncs per step (CPU)


# (stage, BatchAugment path) of the per-step counts; path None: no augmentation.
COUNTED = (("none", None), (STAGE, "cpu"), (STAGE, "accelerator"))


def epoch_counts(run_epoch) -> tuple[AtenCounter, Counter]:
    """aten ops and the events of ``count_host_syncs`` ("sync: item", "host data: tensor" ...) of one call."""
    with AtenCounter() as ops, count_host_syncs() as syncs:
        run_epoch()
    return ops, Counter(syncs.events)


def per_step_counts(name: str, stage: str, path: str | None) -> dict:
    """aten ops and would-be host syncs per training step of the fast path on the CPU (model ``name``,
    ``BatchAugment`` on ``path``: "cpu", "accelerator" or None without augmentation), and of its loader
    alone: after a warm-up epoch, epochs of COUNT_STEPS and 2 * COUNT_STEPS steps, differenced."""
    images, labels = make_images(2 * COUNT_STEPS * COUNT_BATCH)
    model, optimizer = fast_model(name, "cpu", COUNT_BATCH)

    def run_epoch(steps: int, loader_only: bool) -> None:
        n = COUNT_BATCH * steps
        loader = fast_loader(images[:n], labels[:n], COUNT_BATCH, "cpu", stage,
                             accelerator_path=None if path is None else path == "accelerator")
        if loader_only:
            for _batch in loader:
                pass
        else:
            training.train_epoch(model, loader, optimizer, "cpu")

    run_epoch(1, False)  # warm-up: cached constants, the optimizer's state
    row = {"stage": stage, "path": path, "batch_size": COUNT_BATCH}
    for suffix, loader_only in (("", False), ("_loader", True)):
        (ops_k, events_k), (ops_2k, events_2k) = [epoch_counts(functools.partial(run_epoch, steps, loader_only))
                                                  for steps in (COUNT_STEPS, 2 * COUNT_STEPS)]
        per_step = {event: n / COUNT_STEPS for event, n in (events_2k - events_k).items()}
        row.update({
            f"aten_ops_per_step{suffix}": (ops_2k.ops - ops_k.ops) / COUNT_STEPS,
            f"aten_ops_per_step{suffix}_without_views": (ops_2k.ops - ops_2k.views - ops_k.ops + ops_k.views)
            / COUNT_STEPS,
            f"host_syncs_per_step{suffix}": sum(n for e, n in per_step.items() if e.startswith("sync")),
            f"host_data_per_step{suffix}": sum(n for e, n in per_step.items() if e.startswith("host data")),
            f"events_per_step{suffix}": per_step,
        })
    return row


# ----------------------------------------------------------------------------- device memory


def memory_check(device: str, n_images: int, batch_size: int, steps: int) -> dict:
    """SVHN train + extra resident on the device as uint8 (random images) and ResNet18Cifar trained on
    it at ``batch_size`` with stage 5 for ``steps`` batches: peak device memory and images/s."""
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (n_images, *config.IMAGE_SHAPE), dtype=torch.uint8, device=device,
                           generator=gen)  # (N, 3, 32, 32), made on the device: no host copy of 1.9 GB
    labels = torch.randint(0, config.NUM_CLASSES, (n_images,), device=device, generator=gen)
    loader = fast_loader(images, labels, batch_size, device)
    dataset_bytes = images.numel() * images.element_size() + labels.numel() * labels.element_size()
    torch.manual_seed(0)
    model = build_model("resnet18").to(device)
    optimizer = training.build_optimizer(model, config.preset_config("original", model="resnet18",
                                                                     batch_size=batch_size))
    training.train_epoch(model, itertools.islice(loader, 3), optimizer, device)  # warm-up
    seconds = time_epoch(
        lambda: training.train_epoch(model, itertools.islice(loader, steps), optimizer, device), device)
    return {"n_images": n_images, "batch_size": batch_size, "steps": steps, "model": "resnet18",
            "stage": STAGE, "dataset_gb": dataset_bytes / 1e9,
            "max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
            "max_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
            "device_total_gb": torch.cuda.get_device_properties(0).total_memory / 1e9,
            "images_per_s": steps * batch_size / seconds}


# ----------------------------------------------------------------------------- memory layout (CPU)


def layout_rates(name: str, batch_size: int, steps: int, repeats: int) -> dict:
    """float32 CPU training steps, NCHW against channels_last: medians over interleaved repeats."""
    images, labels = make_images(batch_size)
    x = ((images.float() / 255) - 0.45) / 0.2
    rates: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    setups = {}
    for layout in rates:
        torch.manual_seed(0)
        model = build_model(name)
        batch = x
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            batch = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
        setups[layout] = (model, optimizer, batch)
        layout_step(*setups[layout], labels)  # warm-up: oneDNN primitives, allocator
    for r in range(repeats):
        order = list(rates) if r % 2 == 0 else list(reversed(rates))  # alternate who goes first
        for layout in order:
            start = time.perf_counter()
            for _ in range(steps):
                layout_step(*setups[layout], labels)
            rates[layout].append(batch_size * steps / (time.perf_counter() - start))
    medians = {layout: statistics.median(values) for layout, values in rates.items()}
    return {"model": name, "batch_size": batch_size, "steps": steps, "rates": rates,
            "nchw_images_per_s": medians["nchw"], "channels_last_images_per_s": medians["channels_last"],
            "ratio": medians["channels_last"] / medians["nchw"]}


def layout_step(model, optimizer, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


LAYOUT_SIZES = {True: {"simplecnn": (384, 2, 6), "resnet18": (64, 1, 4)},
                False: {"simplecnn": (384, 4, 10), "resnet18": (128, 2, 6)}}


# ----------------------------------------------------------------------------- report


def rate(result: dict | None, width: int = 12) -> str:
    """An images/s figure of a row, or what stands in its place."""
    if result is None:
        return f"{'-':>{width}}"
    if "error" in result:
        return f"{'failed':>{width}}"
    return f"{result['images_per_s']:>{width},.0f}"


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['model']:<10} {row['device']:<5} failed: {row['error'].splitlines()[0]}", flush=True)
        return
    ratio = f"{row['ratio']:>7.1f}x" if "ratio" in row else f"{'-':>8}"
    line = (f"{row['model']:<10} {row['device']:<5} {row['batch_size']:>5} "
            f"{rate(row.get('original'))} {rate(row['fast'])} {ratio}")
    if "fast_compiled" in row:
        line += f" {rate(row['fast_compiled'])}"
        line += f" (compile {row['compile_ratio']:.2f}x)" if "compile_ratio" in row else (
            f" ({row['fast_compiled']['error'].splitlines()[0][:200]})")
    print(line, flush=True)
    for counts in row.get("per_step_counts", {}).values():
        what = "no augmentation" if counts["path"] is None else f"{counts['stage']}, {counts['path']} path"
        print(f"  per step, {what}: {counts['aten_ops_per_step']:.0f} aten ops "
              f"({counts['aten_ops_per_step_loader']:.0f} in the loader), "
              f"{counts['host_syncs_per_step']:g} host syncs + {counts['host_data_per_step']:g} host-data tensors "
              f"({counts['host_syncs_per_step_loader']:g} + {counts['host_data_per_step_loader']:g} in the loader)",
              flush=True)


def run(devices: list[str], models: list[str], quick: bool, compile_model: bool, layout: bool,
        paths: tuple[Path, ...] = ()) -> dict:
    """Every row; the report so far is written to ``paths`` after each row."""
    report = {**environment(devices), "quick": quick, "stage": STAGE, "p_aug": P_AUG, "compile": compile_model,
              "unit": "images per second", "original_workers": ORIGINAL_WORKERS, "rows": []}
    print(f"{'model':<10} {'dev':<5} {'batch':>5} {'original':>12} {'fast':>12} {'ratio':>8}"
          + (f" {'compiled':>12}" if compile_model else ""))
    for device in devices:
        for name in models:
            try:
                row = measure_model(name, device, quick, compile_model and device == "cuda")
            except Exception as err:  # noqa: BLE001 - a CUDA error is a result too; the next row runs
                row = {"model": name, "device": device, "error": f"{type(err).__name__}: {err}"[:2000]}
            report["rows"].append(row)
            print_row(row)
            for path in paths:
                atomic_write_json(path, report)
    if layout:
        report["layout"] = []
        for name in models:
            batch_size, steps, repeats = LAYOUT_SIZES[quick][name]
            result = layout_rates(name, batch_size, steps, repeats)
            report["layout"].append(result)
            print(f"CPU float32 {name}: NCHW {result['nchw_images_per_s']:,.0f}, channels_last "
                  f"{result['channels_last_images_per_s']:,.0f} images/s ({result['ratio']:.2f}x)",
                  flush=True)
    report["load_average_1min_after"] = os.getloadavg()[0]
    for path in paths:
        atomic_write_json(path, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images on the CPU (minutes on 2 cores)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps", "all"), default="all",
                        help="all: the CPU, and CUDA and MPS when present")
    parser.add_argument("--models", nargs="+", default=list(config.MODELS), choices=config.MODELS)
    parser.add_argument("--compile", action="store_true",
                        help="also the fast path under torch.compile (CUDA)")
    parser.add_argument("--layout", action=argparse.BooleanOptionalAction, default=None,
                        help="NCHW vs channels_last float32 steps on the CPU "
                             "(default: on when the CPU is measured)")
    parser.add_argument("--memory", action="store_true",
                        help="only the CUDA memory check: SVHN train+extra on the device, "
                             "ResNet18Cifar at batch 1024")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if (args.device == "cuda" or args.memory) and not available["cuda"]:
        parser.error("--device cuda / --memory: CUDA is not available")
    if args.device == "mps" and not available["mps"]:
        parser.error("--device mps: MPS is not available")
    if args.memory:
        return run_memory_check(args.out)
    devices = [args.device] if args.device != "all" else [d for d, present in available.items() if present]
    layout = "cpu" in devices if args.layout is None else args.layout
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {STAGE} at p_aug {P_AUG}; "
          "images/s (median of timed epochs after a warm-up epoch); ratio = fast / original")
    path = RESULTS_DIR / f"training_{device_tag(devices)}{'-compile' if args.compile else ''}.json"
    report = run(devices, args.models, args.quick, args.compile, layout, (path, *filter(None, [args.out])))
    print(f"wrote {path.relative_to(ROOT)}")
    return report


def run_memory_check(out: Path | None) -> dict:
    path = RESULTS_DIR / f"memory_{device_tag(['cuda'])}.json"
    try:
        report = {**environment(["cuda"]), **memory_check("cuda", SVHN_TRAIN_EXTRA, 1024, 60)}
    except Exception as err:  # noqa: BLE001 - out of memory or a CUDA error is a result too
        report = {**environment(["cuda"]), "error": f"{type(err).__name__}: {err}"[:2000]}
        for target in (path, *filter(None, [out])):
            atomic_write_json(target, report)
        raise
    print(f"{report['n_images']:,} uint8 images on the device ({report['dataset_gb']:.2f} GB), "
          f"ResNet18Cifar at batch {report['batch_size']}: max_memory_allocated "
          f"{report['max_memory_allocated_gb']:.2f} GB of {report['device_total_gb']:.0f} GB, "
          f"{report['images_per_s']:,.0f} images/s")
    atomic_write_json(path, report)
    if out:
        atomic_write_json(out, report)
    print(f"wrote {path.relative_to(ROOT)}")
    return report


if __name__ == "__main__":
    main()
