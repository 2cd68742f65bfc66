"""How long the three notebooks take in quick mode: wall-clock and CPU seconds of each, in the order a new
user runs them (eda, baseline, augmentation stages), on the synthetic data, in fresh model and report folders.

CPU seconds are the kernel's (user + system, all its threads): on a shared machine the wall-clock time
grows with the load, the CPU time much less, so both are reported.

    python benchmarks/bench_notebooks.py [--keep DIR] [--label TEXT]

Results: benchmarks/results/notebooks_quick_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402
import psutil  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from atomic_io import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "notebooks_quick_cpu.json"
NOTEBOOKS = ("eda.ipynb", "baseline_model.ipynb", "augmentation_stages.ipynb")
QUICK_PARAMETERS = 'DATASET = "synthetic"\nQUICK = True\nDEVICE = "cpu"\n'


def kernel_cpu_seconds(client: NotebookClient) -> float:
    """User + system CPU seconds of the kernel process and its children so far."""
    process = psutil.Process(client.km.provisioner.pid)
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def run_notebook(name: str) -> dict:
    """Execute one notebook with the quick parameters injected after its parameters cell."""
    nb = nbformat.read(ROOT / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(QUICK_PARAMETERS))
    client = NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    started = time.perf_counter()
    with client.setup_kernel():
        cpu = 0.0
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
            cpu = kernel_cpu_seconds(client)  # read before the kernel shuts down
    return {"notebook": name, "wall_s": round(time.perf_counter() - started, 1), "kernel_cpu_s": round(cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="folder for the models and reports (default: a temporary one)")
    parser.add_argument("--label", default="", help="what was measured (e.g. the commit), stored with the result")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        for key in ("MODELS", "REPORTS"):
            os.environ[f"SVHN_AUG_{key}_DIR"] = str(out / key.lower())  # the kernels inherit the environment
        os.environ["MPLBACKEND"] = "Agg"
        load_before = os.getloadavg()[0]
        results = []
        for name in NOTEBOOKS:
            results.append(run_notebook(name))
            print(f"{name}: {results[-1]['wall_s']:.0f} s wall, {results[-1]['kernel_cpu_s']:.0f} s CPU", flush=True)
    total = {"wall_s": round(sum(r["wall_s"] for r in results), 1),
             "kernel_cpu_s": round(sum(r["kernel_cpu_s"] for r in results), 1)}
    print(f"all three: {total['wall_s']:.0f} s wall, {total['kernel_cpu_s']:.0f} s CPU "
          f"(load average before: {load_before:.2f} on {os.cpu_count()} cores)")
    atomic_write_json(RESULTS, {"label": args.label, "notebooks": results, "total": total,
                                "load_average_before": load_before, "cpu_count": os.cpu_count(),
                                "machine": platform.processor() or platform.machine()})


if __name__ == "__main__":
    main()
