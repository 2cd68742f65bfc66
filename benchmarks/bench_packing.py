"""Several runs packed onto one device: aggregate training images/s of k runs at once, k = 1, 2, 4, 8.

The study's runs are many and small (a 141k-parameter SimpleCNN at batch 384 cannot fill a large GPU), so
``study`` and ``grid`` can run k worker processes that share the device (``--workers``). This measures
what that buys: for each k, k processes each train the fast path (``bench_training.fast_pipeline``:
DeviceLoader + BatchAugment with stage 5 at p_aug 1 + ``training.train_epoch``) of each model. Every
process sets up and trains a warm-up epoch, then waits at a barrier (a file the parent creates once all
are ready), so that the timed epochs run together; the aggregate rate is every process's images over the
span from the first start to the last end. Each process also reports its peak device memory (CUDA), the
size ``--workers auto`` plans with. On the CPU each process gets cores // k torch threads.

    python benchmarks/bench_packing.py [--device cuda|cpu] [--ks 1 2 4 8] [--models simplecnn resnet18]
                                       [--quick] [--out FILE]

Results: benchmarks/results/packing_<device-tag>.json, rewritten (atomically) after every k, so a run stopped
half-way keeps what it measured; a k that fails (out of memory, a CUDA error) holds its error text and the
next k runs. ``speedup`` is the aggregate rate over k = 1's; ``best_k`` the k with the highest aggregate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_augment import device_tag  # noqa: E402  (same folder, on sys.path as a script)
from bench_training import STAGE, Size, environment, fast_pipeline, make_images, time_epoch  # noqa: E402

import config  # noqa: E402
from atomic_io import atomic_write_json  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# (batch size, timed batches) per model: about half a second of a lone run on an H200 (assumed rates).
STEPS = {False: {"simplecnn": (384, 200), "resnet18": (384, 40)},
         True: {"simplecnn": (64, 4), "resnet18": (32, 2)}}  # --quick: tiny, for the CPU
READY, RESULT = "PACKING-READY ", "PACKING-RESULT "
CHILD_LIMIT_S = 120  # a process that neither gets ready nor finishes by then is stopped


# ----------------------------------------------------------------------------- one packed process


def child(models: list[str], device: str, quick: bool, barrier: Path, threads: int) -> None:
    """One of the k processes: per model, set up and warm up, say READY, wait for the barrier file
    ``<barrier>-<model>``, train one timed epoch, print its RESULT line."""
    torch.set_num_threads(threads)
    for name in models:
        batch_size, batches = STEPS[quick][name]
        images, labels = make_images(batch_size * batches)
        n, run_epoch = fast_pipeline(name, images, labels, Size(batch_size, 0, batches, 0), device)
        time_epoch(run_epoch, device)  # warm-up: cuDNN autotuning, cached constants
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(READY + name, flush=True)
        go = Path(f"{barrier}-{name}")
        while not go.exists():
            time.sleep(0.005)
        start = time.time()  # wall clock: comparable across processes
        time_epoch(run_epoch, device)
        end = time.time()
        memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
        print(RESULT + json.dumps({"model": name, "images": n, "start": start, "end": end,
                                   "max_memory_allocated_gb": None if memory is None else memory / 1e9}),
              flush=True)


# ----------------------------------------------------------------------------- the parent


def read_line(process: subprocess.Popen, mark: str) -> str:
    """The next line of ``process`` that starts with ``mark`` (without it); RuntimeError when it ends first."""
    for line in process.stdout:
        if line.startswith(mark):
            return line[len(mark):].strip()
    raise RuntimeError(f"a packed process ended (exit {process.wait()}) before its {mark.strip()} line")


def measure_k(k: int, models: list[str], device: str, quick: bool, folder: Path) -> dict[str, dict]:
    """Aggregate images/s of k processes at once, per model."""
    barrier = folder / f"go-{k}"
    threads = max(1, (os.cpu_count() or 1) // k) if device == "cpu" else 1
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(barrier), "--device", device,
               "--threads", str(threads), "--models", *models, *(["--quick"] if quick else [])]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(k)]
    try:
        rows = {}
        for name in models:
            for process in processes:
                read_line(process, READY)
            Path(f"{barrier}-{name}").touch()
            results = [json.loads(read_line(process, RESULT)) for process in processes]
            span = max(r["end"] for r in results) - min(r["start"] for r in results)
            memory = [r["max_memory_allocated_gb"] for r in results if r["max_memory_allocated_gb"] is not None]
            rows[name] = {"k": k, "images": sum(r["images"] for r in results), "seconds": span,
                          "images_per_s": sum(r["images"] for r in results) / span,
                          "per_run_images_per_s": [r["images"] / (r["end"] - r["start"]) for r in results],
                          "max_memory_allocated_gb_per_run": max(memory) if memory else None}
        for process in processes:
            process.wait(timeout=CHILD_LIMIT_S)
        return rows
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def add_speedups(report: dict) -> None:
    """Per model: speedup of each k over k = 1, and the best k."""
    for name, by_k in report["models"].items():
        rates = {k: row["images_per_s"] for k, row in by_k.items() if "images_per_s" in row}
        if "1" in rates:
            for k, rate in rates.items():
                by_k[k]["speedup"] = rate / rates["1"]
        if rates:
            report["best_k"][name] = int(max(rates, key=rates.get))


def run(ks: list[int], models: list[str], device: str, quick: bool, paths: tuple[Path, ...]) -> dict:
    report = {**environment([device]), "stage": STAGE, "p_aug": 1.0, "quick": quick, "unit": "images per second",
              "steps": {name: dict(zip(("batch_size", "batches"), STEPS[quick][name], strict=True))
                        for name in models},
              "models": {name: {} for name in models}, "best_k": {}}
    print(f"{'model':<10} {'k':>3} {'aggregate images/s':>19} {'speedup':>8} {'GB per run':>11}")
    with tempfile.TemporaryDirectory(prefix="packing_") as folder:
        for k in ks:
            try:
                rows = measure_k(k, models, device, quick, Path(folder))
            except Exception as err:  # noqa: BLE001 - out of memory or a CUDA error is a result too
                rows = {name: {"k": k, "error": f"{type(err).__name__}: {err}"[:2000]} for name in models}
            for name, row in rows.items():
                report["models"][name][str(k)] = row
            add_speedups(report)
            for name in rows:
                print_row(name, report["models"][name][str(k)])
            for path in paths:
                atomic_write_json(path, report)
    return report


def print_row(name: str, row: dict) -> None:
    if "error" in row:
        print(f"{name:<10} {row['k']:>3} failed: {row['error'].splitlines()[0]}", flush=True)
        return
    memory = row["max_memory_allocated_gb_per_run"]
    print(f"{name:<10} {row['k']:>3} {row['images_per_s']:>19,.0f} {row.get('speedup', float('nan')):>7.2f}x "
          f"{'-' if memory is None else f'{memory:.2f}':>11}", flush=True)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--ks", nargs="+", type=int, help="runs at once (default: 1 2 4 8; --quick: 1 2)")
    parser.add_argument("--models", nargs="+", choices=config.MODELS, default=list(config.MODELS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU)")
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.child:
        return child(args.models, args.device, args.quick, args.child, args.threads)
    ks = args.ks or ([1, 2] if args.quick else [1, 2, 4, 8])
    path = RESULTS_DIR / f"packing_{device_tag([args.device])}.json"
    run(ks, args.models, args.device, args.quick, (path, *filter(None, [args.out])))
    print(f"wrote {path.relative_to(ROOT)}")
    return None


if __name__ == "__main__":
    main()
