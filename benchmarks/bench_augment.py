"""Throughput of the augmentation stages: the original per-sample path vs BatchAugment.

For each base stage (none .. stage5_occlusion) and each learned policy (AutoAugment SVHN,
RandAugment, TrivialAugmentWide), in one run and on the same images:
(a) per-sample: PIL images through the torchvision Compose of ``build_stage_transform``, one image
    at a time in this process (what each DataLoader worker of the original study did), measured with
    torch's default thread count and with one thread (DataLoader workers run single-threaded; tiny
    per-image tensor ops are often faster so); ratios use the faster of the two;
(b) batched: ``BatchAugment(stage, p_aug=1)`` on uint8 batches already on the device (CPU, and CUDA
    when present), parameters sampled and applied per batch; on the CPU also with one thread (on a
    machine shared with other processes one thread often wins); ratios use the faster;
(c) per batch of the accelerator path (forced on the CPU), sampling + apply + normalization: aten ops
    (a TorchDispatchMode; about the kernel launches a GPU would see, views included and excluded) and
    host syncs (``augment_ops.count_host_syncs``; the goal is 0).
Images per second are printed as a table with the batched/per-sample ratio and written to
benchmarks/results/augment_<device-tag>.json (with a -threads<N> suffix when --threads is given), rewritten
(atomically) after every stage, so a run stopped half-way keeps the stages it measured; a stage that fails
(a CUDA error) is recorded with its error text and the next one runs.

    python benchmarks/bench_augment.py [--batch-size 1024] [--n 4096] [--n-per-sample 1024]
                                       [--device cpu|cuda|all] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import augmentations  # noqa: E402
import config  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402
from augment_ops import count_host_syncs, normalize_batch  # noqa: E402
from training import device_label, synchronize  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# Passes per measurement; the fastest is reported (timeit's convention: on a shared machine the
# fastest pass is the one least disturbed by other processes). Every pass is kept in the JSON.
REPEATS = 3


def make_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, 32, 32): low-frequency colour fields, like photos."""
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return fine.mul(255).round().to(torch.uint8)


def per_sample_pass(transform, pil_images: list, threads: int) -> float:
    """Images/s of one pass of a torchvision per-sample transform, image by image, on ``threads`` threads."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        for image in pil_images:
            transform(image)
        return len(pil_images) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(default_threads)


def batched_pass(augment, generator, images: torch.Tensor, batch_size: int, threads: int | None = None) -> float:
    """Images/s of one pass of BatchAugment over ``images`` (already on the device), batch by batch."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    try:
        synchronize(images.device)
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            augment(images[i:i + batch_size], generator)
        synchronize(images.device)
        return len(images) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(default_threads)


class AtenCounter(TorchDispatchMode):
    """Counts aten ops inside the block (forward, backward and optimizer alike): on an accelerator about
    one kernel launch each, views apart (``views`` of them launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))


def accelerator_path_costs(stage: str, images: torch.Tensor, batch_size: int) -> dict[str, int]:
    """Aten ops and host syncs of one batch on the accelerator path, forced on the CPU: sampling, apply and
    the loader's normalization (after a warm-up batch, which makes the cached constants)."""
    augment = augmentations.BatchAugment(stage, 1.0, accelerator_path=True)
    batch, generator = images[:batch_size].cpu(), torch.Generator().manual_seed(0)

    def one_batch():
        return normalize_batch(augment(batch, generator), config.SVHN_MEAN, config.SVHN_STD, inplace=True)

    one_batch()
    counter = AtenCounter()
    with counter:
        one_batch()
    with count_host_syncs() as syncs:
        one_batch()
    return {"aten_ops_per_batch": counter.ops, "aten_ops_per_batch_without_views": counter.ops - counter.views,
            "host_syncs_per_batch": syncs.total}


def measure_stage(stage: str, pil_images: list, on_device: dict, batch_size: int) -> dict[str, list[float]]:
    """Images/s of every pass of each path; the passes of the paths alternate, so a disturbance by other
    processes hits them alike."""
    transform = augmentations.build_stage_transform(stage)
    augment = augmentations.BatchAugment(stage, 1.0)
    generators = {device: torch.Generator(device=device).manual_seed(0) for device in on_device}
    for image in pil_images[:32]:  # warm-up
        transform(image)
    for device, images in on_device.items():
        augment(images[:batch_size], generators[device])
    passes: dict[str, list[float]] = {"per_sample": [], "per_sample_1thread": []}
    for _ in range(REPEATS):
        passes["per_sample"].append(per_sample_pass(transform, pil_images, torch.get_num_threads()))
        passes["per_sample_1thread"].append(per_sample_pass(transform, pil_images, 1))
        for device, images in on_device.items():
            rate = batched_pass(augment, generators[device], images, batch_size)
            passes.setdefault(f"batched_{device}", []).append(rate)
            if device == "cpu":
                rate = batched_pass(augment, generators[device], images, batch_size, threads=1)
                passes.setdefault("batched_cpu_1thread", []).append(rate)
    return passes


def device_tag(devices: list[str]) -> str:
    """File-name tag: the CUDA device's name when one was measured, else 'cpu'."""
    name = device_label("cuda") if "cuda" in devices else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measure_row(stage: str, pil_images: list, images: torch.Tensor, on_device: dict, batch_size: int,
                devices: list[str]) -> dict:
    """Every figure of one stage (see the module's docstring)."""
    passes = measure_stage(stage, pil_images, on_device, batch_size)
    row = {key: max(rates) for key, rates in passes.items()}
    best_per_sample = max(row["per_sample"], row["per_sample_1thread"])
    for device in devices:
        best = max(row[f"batched_{device}"], row.get(f"batched_{device}_1thread", 0.0))
        row[f"ratio_{device}"] = best / best_per_sample
    row.update(accelerator_path_costs(stage, images, batch_size))
    row["passes"] = passes
    return row


def run(batch_size: int, n: int, n_per_sample: int, devices: list[str], path: Path | None = None) -> dict:
    """Measure every base stage and learned policy; returns the JSON-ready report, also written to ``path``
    after every stage."""
    load_before = os.getloadavg()
    images = make_images(n)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images[:n_per_sample]]
    on_device = {device: images.to(device) for device in devices}
    stages = {}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": device_label("cpu"),
        "cpu_threads": torch.get_num_threads(),
        "devices": {device: device_label(device) for device in devices},
        "batch_size": batch_size,
        "n_images": n,
        "n_images_per_sample_path": n_per_sample,
        "p_aug": 1.0,
        "unit": "images per second",
        "stages": stages,
    }
    for stage in config.STAGES + config.POLICY_STAGES:
        try:
            stages[stage] = measure_row(stage, pil_images, images, on_device, batch_size, devices)
        except Exception as err:  # noqa: BLE001 - a CUDA or compiler error is a result too
            stages[stage] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print_row(stage, stages[stage], devices)
        # The machine may be shared: 1-minute load averages around the run qualify the numbers.
        report["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
        if path is not None:
            atomic_write_json(path, report)
    return report


def print_header(devices: list[str]) -> None:
    cols = "".join(f" {'batched ' + d:>14}" + (f" {'1 thread':>9}" if d == "cpu" else "") + f" {'ratio':>7}"
                   for d in devices)
    print(f"{'stage':<20} {'per-sample':>11} {'1 thread':>9}{cols} {'aten ops':>9} {'syncs':>6}")


def print_row(stage: str, row: dict, devices: list[str]) -> None:
    if "error" in row:
        print(f"{stage:<20} failed: {row['error'].splitlines()[0]}", flush=True)
        return
    cols = "".join(f" {row[f'batched_{d}']:>14,.0f}" + (f" {row['batched_cpu_1thread']:>9,.0f}" if d == "cpu" else "")
                   + f" {row[f'ratio_{d}']:>6.1f}x" for d in devices)
    print(f"{stage:<20} {row['per_sample']:>11,.0f} {row['per_sample_1thread']:>9,.0f}{cols} "
          f"{row['aten_ops_per_batch']:>9} {row['host_syncs_per_batch']:>6}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=4096, help="images per measurement of the batched path")
    parser.add_argument("--n-per-sample", type=int, default=1024, help="images per measurement of the per-sample path")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="batched engine on the CPU, on CUDA, or both (all: CUDA only when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, "
          f"{args.n} images ({args.n_per_sample} per sample), p_aug 1.0; images/s, fastest of {REPEATS} passes; "
          "ratio = faster batched / faster per-sample; aten ops and host syncs per batch of the accelerator path "
          "(on the CPU)")
    print_header(devices)
    tag = device_tag(devices) + (f"-threads{args.threads}" if args.threads is not None else "")
    path = RESULTS_DIR / f"augment_{tag}.json"
    run(args.batch_size, args.n, min(args.n_per_sample, args.n), devices, path)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
