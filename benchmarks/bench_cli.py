"""How fast the command line answers: ``--help``, every subcommand's ``--help`` and usage errors.

Each command runs as a user runs it (``python experiments.py ...``, a fresh process) ``--repeats`` times;
the median wall time is reported, with the median CPU time of the process (user + system), which a
machine shared with other processes disturbs less. The subcommands are read from the main ``--help``,
so ``--root`` can point at another checkout (e.g. an earlier version, to measure before and after).
Results go to benchmarks/results/cli_<label>.json.

    python benchmarks/bench_cli.py [--repeats 5] [--root PATH] [--label NAME]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write_json  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# Usage errors: refused by the parser, or by the configuration's own checks before any work.
USAGE_ERRORS = (["run", "--bogus"], ["grid", "--stages", "nope"], ["run", "--p-aug", "1.5"], ["runs"])


def timed(command: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status) of one run of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, env={**os.environ, "MPLBACKEND": "Agg"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def subcommands(root: Path) -> list[str]:
    """The subcommands the main --help lists ("{run,grid,...}")."""
    text = subprocess.run([sys.executable, "experiments.py", "--help"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    return re.search(r"\{([a-z,]+)\}", text).group(1).split(",")


def measure(root: Path, repeats: int) -> list[dict]:
    argvs = [["--help"]] + [[name, "--help"] for name in subcommands(root)]
    argvs += [argv for argv in USAGE_ERRORS if argv[0] in subcommands(root)]
    rows = []
    for argv in argvs:
        passes = [timed([sys.executable, "experiments.py", *argv], root) for _ in range(repeats)]
        rows.append({"command": " ".join(argv), "exit_status": passes[0][2],
                     "median_wall_s": statistics.median(p[0] for p in passes),
                     "median_cpu_s": statistics.median(p[1] for p in passes),
                     "wall_s": [p[0] for p in passes], "cpu_s": [p[1] for p in passes]})
        print(f"{rows[-1]['command']:<32} exit {rows[-1]['exit_status']}  wall {rows[-1]['median_wall_s']:6.2f} s  "
              f"cpu {rows[-1]['median_cpu_s']:6.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: 5)")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose experiments.py runs (default: this)")
    parser.add_argument("--label", default="current", help="results file suffix (default: current)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = measure(args.root.resolve(), args.repeats)
    worst = max(rows, key=lambda row: row["median_wall_s"])
    print(f"slowest: {worst['command']} ({worst['median_wall_s']:.2f} s wall median); "
          f"1-minute load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} "
          "CPU(s): a busy machine slows every line")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.root, capture_output=True, text=True)
    atomic_write_json(RESULTS_DIR / f"cli_{args.label}.json", {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "root": str(args.root),
        "git_commit": git.stdout.strip() or None, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "load_average_1min": [load_before[0], os.getloadavg()[0]], "repeats": args.repeats, "commands": rows,
    })


if __name__ == "__main__":
    main()
