"""Every GPU measurement of the fast path in one run, on a bare GPU machine, in under 8 minutes.

    python3 benchmarks/gpu_check.py [--dry] [--steps NAME ...] [--limit NAME=SECONDS ...]
                                    [--out DIR] [--wheels DIR] [--budget SECONDS] [--list]

It needs only the repository and a Python with torch and torchvision. The Python packages missing on
a GPU machine (optuna and what it brings: benchmarks/wheels.txt) travel as wheels in the git-ignored
folder .whl (``make gpu-wheels``); when the import preflight finds a module missing, the wheels are
installed to a temporary folder put on PYTHONPATH (all at once, else one by one: what can be installed
is), and the preflight runs again. A step whose modules still cannot be imported is skipped, its summary
entry saying which module and why; the other steps run. Every benchmark writes its JSON as each figure
is measured, and a figure that fails (a compiler error, a CUDA error) is recorded in it with its error
text, so a step stopped at its limit still returns what it measured. Then the steps of
STEPS run one by one, each in its own process group under its own time limit: a step that fails or
times out is recorded as such, its log kept, and the next step runs. After every step the run so far
is packed into OUT/gpu_check.tar.gz (summary.json, each step's log, and under <step>/ the JSON files
the step wrote to benchmarks/results/, named as written there) and OUT/summary.json is rewritten, so a
run cut short still returns what finished. OUT is --out, else $OUT, else benchmarks/results/gpu_check.

--dry proves the plumbing on a CPU in 2-3 minutes on a quiet 2-core CPU (its limits allow for a busy
one): CUDA hidden, tiny sizes, the steps that need CUDA (or that have no small size) skipped, every step
run in a scratch copy of the repository so that the committed results stay as they are. Its figures
are plumbing only, not results.

Exit status: 0 when every step that ran passed, 1 when one failed or timed out or was skipped for a
module it cannot import, 2 when the preflight failed (torch, torchvision or numpy missing, or no CUDA
device without --dry: then no step runs). To keep the results: ``tar xzf gpu_check.tar.gz`` and copy the JSON files
of gpu_check/<step>/ into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atomic_io import atomic_write_bytes, atomic_write_json  # noqa: E402  (standard library only)


@dataclass(frozen=True)
class Step:
    """``python3 *command`` from the repository root, stopped after ``limit_s`` seconds; ``dry_command``
    with ``dry_limit_s`` is the same on the CPU with tiny sizes (--dry), None where there is none.
    ``{json}`` in a command stands for a JSON file the step may write besides benchmarks/results/."""

    name: str
    limit_s: int
    command: tuple[str, ...]
    dry_limit_s: int = 0
    dry_command: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ()  # modules the step imports (project modules bring their packages)


SELF, AUGMENT, PACKING = "benchmarks/gpu_check.py", "benchmarks/bench_augment.py", "benchmarks/bench_packing.py"
TRAINING, STUDY = "benchmarks/bench_training.py", "benchmarks/study_time.py"
PYTEST_CUDA = ("-m", "pytest", "-q", "-k", "cuda and not compiled")
CUDA_TEST_FILES = ("tests/test_fast_path.py", "tests/test_training.py", "tests/test_augmentations.py")

# The steps, in order. Each GPU limit is at least 1.5x the step's estimated H200 time (from the committed
# CPU figures and assumed H200 rates; est. in seconds below), and the limits sum to 465 s, so that with the
# preflight the whole check fits in 8 minutes even when every step runs to its limit. The least
# predictable (compilation) goes last.
#   env               torch, CUDA and the GPU (nvidia-smi), package versions                   est.  5
#   augment           per-sample torchvision (256 images: enough for a ratio) vs BatchAugment  est. 18
#   training          original pipeline vs fast path, SimpleCNN and ResNet18Cifar, stage 5: images/s,
#                     host syncs per step (and launches per step where bench_training.py reports them)
#                                                                                              est. 33
#   memory            SVHN train + extra (604,388 uint8 images) resident, ResNet18Cifar at batch 1024
#                                                                                              est. 23
#   tests             the CUDA tests (the compiled one aside: training_compile measures torch.compile)
#                                                                                              est. 25
#   packing           k = 1, 2, 4, 8 runs at once on the GPU (worker processes): aggregate images/s
#                                                                                              est. 45
#   study             full-study prediction for SVHN sizes (packed with packing's best k), and a
#                     scaled-down study run against its prediction                             est. 55
#   training_compile  the fast path under torch.compile (compilation included), beside the fast path
#                                                                                              est. 85
STEPS = (
    #    name       GPU limit, command                                 dry limit, dry command (CPU, tiny sizes)
    Step("env", 20, (SELF, "--environment", "{json}"), 60, (SELF, "--environment", "{json}")),
    Step("augment", 30, (AUGMENT, "--device", "cuda", "--n", "1024", "--n-per-sample", "256"),
         120, (AUGMENT, "--device", "cpu", "--n", "64", "--batch-size", "32"), needs=("bench_augment",)),
    Step("training", 50, (TRAINING, "--device", "cuda"),
         180, (TRAINING, "--quick", "--device", "cpu", "--models", "simplecnn", "--no-layout"),
         needs=("bench_training",)),
    Step("memory", 35, (TRAINING, "--memory"), needs=("bench_training",)),
    Step("tests", 45, (*PYTEST_CUDA, *CUDA_TEST_FILES), 120, (*PYTEST_CUDA, CUDA_TEST_FILES[0]),
         needs=("pytest", "runs")),
    Step("packing", 70, (PACKING, "--device", "cuda"), 180, (PACKING, "--device", "cpu", "--quick", "--models",
                                                              "simplecnn"),
         needs=("bench_packing",)),
    Step("study", 85, (STUDY, "--device", "cuda", "--sizes", "svhn", "--validate",  # minutes on a CPU
                       "--n-train", "3000", "--n-test", "1000", "--resnet-n-train", "3000"),
         needs=("study_time", "pipeline")),
    Step("training_compile", 130, (TRAINING, "--device", "cuda", "--compile"),  # --compile acts on CUDA only
         needs=("bench_training",)),
)

BUDGET_S = {False: 480, True: 600}  # the whole run, preflight included (key: --dry)
PACKING_RESERVE_S = 5  # kept back from the last step for the final summary and archive
MIN_STEP_S = 5  # no step starts with less of the budget left
KILL_GRACE_S = 3  # between SIGTERM and SIGKILL of a timed-out step's process group
PREFLIGHT_LIMIT_S, INSTALL_LIMIT_S = 90, 120
ARCHIVE, SUMMARY = "gpu_check.tar.gz", "summary.json"
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "sklearn", "pandas", "matplotlib", "seaborn", "PIL",
            "tqdm", "optuna", "sqlalchemy", "pytest")
RESULTS = Path("benchmarks") / "results"
# Leaves of a step's JSON worth a line in the summary (matched against their dotted path).
FIGURE_PATH = re.compile(r"images_per_s|ratio|batched_|per_sample|syncs|launch|ops_per_step|memory_allocated_gb"
                         r"|dataset_gb|total_s$|measured\.seconds$|relative_error|passed$")
SCRATCH_IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl", ".gl", "data", "models", "reports", "results",
                                        "__pycache__", ".*_cache", "*.ipynb")
PREFLIGHT_MARK = "PREFLIGHT "
CORE_PACKAGES = ("torch", "torchvision", "numpy")  # every step needs them: without one, no step runs
# Run as ``python -c PREFLIGHT_CODE MODULE...``: imports each module, prints one JSON line.
PREFLIGHT_CODE = f"""
import importlib, json, sys, traceback
sys.path[:0] = [".", "benchmarks"]
errors = {{}}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        errors[name] = None
    except BaseException as err:  # a module may raise anything while it is imported
        traceback.print_exc()
        errors[name] = f"{{type(err).__name__}}: {{err}}"
info = {{"imports": errors}}
if errors.get("torch") is None:
    import torch
    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, cuda=cuda, device=torch.cuda.get_device_name(0) if cuda else None)
print({PREFLIGHT_MARK!r} + json.dumps(info))
"""


# ----------------------------------------------------------------------------- running one process


def stop_group(proc: subprocess.Popen) -> None:
    """End a step's whole process group (DataLoader workers, study children): TERM, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: list[str], cwd: Path, env: dict, limit_s: float, log_path: Path) -> int | None:
    """Run ``command`` with its output in ``log_path``; its exit status, None when it hit ``limit_s``."""
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        # Its own process group (to stop it whole), in our session (so that it ends with ours).
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            log.write(f"\n[stopped after its limit of {limit_s:.0f} s]\n".encode())
            return None
        except BaseException:  # Ctrl-C or SIGTERM of the driver: the step goes too
            stop_group(proc)
            raise
        try:  # leftovers of a finished step (a worker that outlived its parent) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code


def log_tail(log_path: Path, lines: int = 20) -> list[str]:
    return log_path.read_text(errors="replace").splitlines()[-lines:] if log_path.exists() else []


# ----------------------------------------------------------------------------- preflight and wheels


def import_report(env: dict, cwd: Path, log_path: Path) -> dict:
    """Import every package and project module in a fresh interpreter: {"imports": {name: error or None},
    "torch", "cuda", "device"}; {"error": ...} when the interpreter gave no report."""
    modules = [*PACKAGES, *sorted(path.stem for path in (*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")))]
    offset = log_path.stat().st_size if log_path.exists() else 0  # the log holds every preflight pass
    code = run_logged([sys.executable, "-c", PREFLIGHT_CODE, *modules], cwd, env, PREFLIGHT_LIMIT_S, log_path)
    with open(log_path, "rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(PREFLIGHT_MARK)]
    if not lines:
        status = f"exit {code}" if code is not None else f"no answer within {PREFLIGHT_LIMIT_S} s"
        return {"error": f"the import check itself failed ({status}); see preflight.log"}
    return json.loads(lines[-1][len(PREFLIGHT_MARK):])


def duplicate_wheels(wheels: list[Path]) -> list[str]:
    """Distributions present in more than one version (pip would refuse the whole install)."""
    names = [re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower() for wheel in wheels]
    return sorted({name for name in names if names.count(name) > 1})


def install_wheels(wheels: list[Path], site: Path, env: dict, log_path: Path) -> tuple[list[str], str | None]:
    """pip-install the carried wheels into ``site`` (no index, no dependencies): all at once, else one by
    one, so that what can be installed is. (the wheels installed, an error message or None)."""
    if duplicates := duplicate_wheels(wheels):
        return [], (f"several versions of {', '.join(duplicates)} among the wheels: refill the folder with "
                    "make gpu-wheels")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site)]
    if run_logged([*command, *map(str, wheels)], ROOT, env, INSTALL_LIMIT_S, log_path) == 0:
        return [wheel.name for wheel in wheels], None
    installed = [wheel.name for wheel in wheels
                 if run_logged([*command, str(wheel)], ROOT, env, INSTALL_LIMIT_S, log_path) == 0]
    return installed, f"pip installed {len(installed)} of {len(wheels)} wheel(s); see preflight.log"


def with_site(env: dict, site: Path) -> dict:
    """``env`` with ``site`` first on PYTHONPATH."""
    paths = [str(site), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def missing_modules_note(failing: dict, wheels_dir: Path, installed: list[str]) -> str:
    """What cannot be imported, and what to do about it."""
    lines = [f"cannot import {len(failing)} module(s) with {sys.executable}:"]
    lines += [f"  {name}: {error}" for name, error in failing.items()]
    if installed:
        lines.append(f"even after installing {len(installed)} wheel(s) from {wheels_dir}.")
    else:
        lines.append(f"No wheels installed from {wheels_dir}.")
    lines.append("A package missing on this machine travels as a wheel: list it (and what it needs) in "
                 "benchmarks/wheels.txt, run `make gpu-wheels` where pip reaches PyPI, and name .whl in "
                 "the run's carry list. A project module's traceback is in preflight.log.")
    return "\n".join(lines)


def preflight_problem(report: dict, dry: bool, wheels_dir: Path, installed: list[str]) -> str | None:
    """What stops the whole run, in words that say what to do; None when nothing does. A module that only
    some steps need does not stop it: those steps are skipped (``missing_needs``)."""
    if "error" in report:
        return report["error"]
    failing = {name: error for name, error in report["imports"].items() if error and name in CORE_PACKAGES}
    if failing:
        return missing_modules_note(failing, wheels_dir, installed)
    if not dry and not report.get("cuda"):
        return (f"torch {report.get('torch')} sees no CUDA device: this check needs an NVIDIA GPU "
                "(on a CPU, --dry checks the plumbing)")
    return None


def preflight(env: dict, cwd: Path, dry: bool, wheels_dir: Path, site: Path, log_path: Path) -> tuple[dict, dict]:
    """Import check, carried wheels installed when something is missing, check again.

    Returns (the summary's preflight entry, the environment the steps run with)."""
    report = import_report(env, cwd, log_path)
    installed, install_error = [], None
    missing = "error" in report or any(report["imports"].values())
    wheels = sorted(wheels_dir.glob("*.whl"))
    if missing and wheels:
        installed, install_error = install_wheels(wheels, site, env, log_path)
        if installed:
            env = with_site(env, site)
            report = import_report(env, cwd, log_path)
    problem = preflight_problem(report, dry, wheels_dir, installed)
    failing = {name: error for name, error in report.get("imports", {}).items() if error}
    entry = {"ok": problem is None, "problem": problem, "python": sys.executable, "wheels_installed": installed,
             "install_error": install_error, **{key: report.get(key) for key in ("torch", "cuda", "device")},
             "failed_imports": failing,
             "note": missing_modules_note(failing, wheels_dir, installed) if failing else None}
    return entry, env


def missing_needs(step: Step, failed_imports: dict) -> str | None:
    """Why ``step`` cannot run here (a module it needs fails to import), None when it can."""
    missing = [f"{name} ({failed_imports[name]})" for name in step.needs if failed_imports.get(name)]
    return f"cannot import {', '.join(missing)}; see preflight.log" if missing else None


# ----------------------------------------------------------------------------- results of a step


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """JSON files of ``folder``: name -> (mtime in ns, size)."""
    return {path.name: (path.stat().st_mtime_ns, path.stat().st_size) for path in folder.glob("*.json")}


def collect_results(folder: Path, before: dict, dest: Path) -> None:
    """Copy the JSON files of ``folder`` that are new or changed since ``before`` into ``dest``."""
    for name, stamp in snapshot(folder).items():
        if before.get(name) != stamp:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, dest / name)


def item_label(item, index: int) -> str:
    """A list item's name in a figure's path: its model/device/name fields, else its index."""
    if isinstance(item, dict):
        label = "-".join(str(item[key]) for key in ("model", "device", "name") if key in item)
        if label:
            return label
    return str(index)


def figures(data, prefix: str = "") -> dict:
    """The numbers of a benchmark's JSON worth a glance (FIGURE_PATH), flattened to dotted paths.
    Lists of plain numbers (every timed pass) are left to the JSON file."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list) and any(isinstance(item, (dict, list)) for item in data):
        items = [(item_label(item, i), item) for i, item in enumerate(data)]
    else:
        return {}
    found = {}
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            found.update(figures(value, path))
        elif isinstance(value, (int, float)) and FIGURE_PATH.search(path):
            found[path] = value
    return found


def step_files(step_dir: Path) -> dict[str, dict]:
    """{file name: its figures} for the JSON files a step left."""
    result = {}
    for path in sorted(step_dir.glob("*.json")) if step_dir.is_dir() else []:
        try:
            result[path.name] = figures(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            result[path.name] = {"unreadable": f"{type(err).__name__}: {err}"}
    return result


# ----------------------------------------------------------------------------- the run


@dataclass
class CheckRun:
    """One run's state: where it works, where it reports, its summary and its clock."""

    work: Path  # packed as gpu_check/ in the archive
    out: Path
    root: Path  # where the steps run: the repository, or its scratch copy under --dry
    env: dict  # the steps' environment
    summary: dict
    start: float  # time.monotonic() at the start
    budget_s: float

    def seconds_left(self) -> float:
        return self.start + self.budget_s - time.monotonic()

    def save(self) -> None:
        """Write the summary and pack everything so far (each file atomically: a cut leaves the last one)."""
        self.summary["elapsed_s"] = round(time.monotonic() - self.start, 1)
        atomic_write_json(self.work / SUMMARY, self.summary)
        atomic_write_json(self.out / SUMMARY, self.summary)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(self.work, arcname=self.work.name)
        atomic_write_bytes(self.out / ARCHIVE, buffer.getvalue())


def step_command(step: Step, dry: bool, json_path: Path) -> list[str]:
    arguments = step.dry_command if dry else step.command
    return [sys.executable, *(str(json_path) if arg == "{json}" else arg for arg in arguments)]


def run_step(run: CheckRun, step: Step, limit_s: float, dry: bool) -> dict:
    """Run one step, keep its log and JSON files; its summary entry."""
    step_dir, log_path = run.work / step.name, run.work / f"{step.name}.log"
    command = step_command(step, dry, step_dir / f"{step.name}.json")
    step_dir.mkdir()
    before = snapshot(run.root / RESULTS)
    began = time.monotonic()
    code = run_logged(command, run.root, run.env, limit_s, log_path)
    seconds = round(time.monotonic() - began, 1)
    collect_results(run.root / RESULTS, before, step_dir)
    status = "timeout" if code is None else "ok" if code == 0 else "failed"
    entry = {"name": step.name, "status": status, "exit_code": code, "seconds": seconds,
             "limit_s": round(limit_s, 1), "command": shlex.join(command[1:]), "files": step_files(step_dir)}
    if status != "ok":
        entry["log_tail"] = log_tail(log_path)
    return entry


def step_limit(step: Step, dry: bool, overrides: dict[str, float]) -> float:
    return overrides.get(step.name, step.dry_limit_s if dry else step.limit_s)


def run_steps(run: CheckRun, steps: list[Step], dry: bool, overrides: dict[str, float]) -> None:
    """Each step in turn under its limit (cut to the budget left); the summary and archive after each."""
    for index, step in enumerate(steps):
        time_left = run.seconds_left() - PACKING_RESERVE_S
        missing = missing_needs(step, run.summary["preflight"]["failed_imports"])
        if missing:
            entry = {"name": step.name, "status": "skipped", "reason": missing}
        elif dry and step.dry_command is None:
            entry = {"name": step.name, "status": "skipped", "reason": "no dry form: it needs CUDA or minutes"}
        elif time_left < MIN_STEP_S:
            entry = {"name": step.name, "status": "skipped", "reason": "no time left in the run's budget"}
        else:
            entry = run_step(run, step, min(step_limit(step, dry, overrides), time_left), dry)
        run.summary["steps"][index] = entry
        run.save()
        print_entry(entry)


def print_entry(entry: dict) -> None:
    if entry["status"] == "skipped":
        print(f"== {entry['name']}: skipped ({entry['reason']})", flush=True)
        return
    code = "" if entry["exit_code"] is None else f", exit {entry['exit_code']}"
    print(f"== {entry['name']}: {entry['status']}{code} after {entry['seconds']} s (limit {entry['limit_s']} s)",
          flush=True)
    for line in entry.get("log_tail", []):
        print(f"   {line}")
    for name, found in entry.get("files", {}).items():
        if found:
                print(f"   {name}: " + ", ".join(f"{path} {value:.4g}" if isinstance(value, float)
                                           else f"{path} {value}" for path, value in found.items()))


# ----------------------------------------------------------------------------- environment step


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv"], capture_output=True, text=True, timeout=10)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"not available ({type(err).__name__}: {err})"


def describe_environment() -> dict:
    """Python, torch, CUDA, the GPU and the packages the steps use."""
    import torch

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": sys.version,
            "executable": sys.executable, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "packages": {name: package_version(name) for name in ("torchvision", "numpy", "optuna", "sqlalchemy",
                                                                  "alembic", "pytest", "triton")},
            "nvidia_smi": nvidia_smi()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count, "total_memory_gb": props.total_memory / 1e9,
                       "cudnn": torch.backends.cudnn.version()}
    return info


# ----------------------------------------------------------------------------- command line


def parse_limit(text: str) -> tuple[str, float]:
    """NAME=SECONDS of --limit."""
    name, _, seconds = text.partition("=")
    names = [step.name for step in STEPS]
    try:
        value = float(seconds)
    except ValueError:
        value = 0.0
    if name not in names or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SECONDS with NAME one of {', '.join(names)} "
                                         "and SECONDS > 0")
    return name, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, short limits: the plumbing only")
    parser.add_argument("--steps", nargs="+", choices=[step.name for step in STEPS],
                        help="run only these steps (default: all, in the table's order)")
    parser.add_argument("--limit", type=parse_limit, action="append", default=[], metavar="NAME=SECONDS",
                        help="another time limit for one step (repeatable)")
    parser.add_argument("--out", type=Path, help="where the archive and summary.json go "
                                                 "(default: $OUT, else benchmarks/results/gpu_check)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default: .whl)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 350, --dry 600)")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--environment", type=Path, metavar="JSON", help=argparse.SUPPRESS)  # the env step
    return parser.parse_args(argv)


def print_steps() -> None:
    print(f"{'step':<17} {'limit':>5}  command (python3 ARGS)  |  --dry: limit, command")
    for step in STEPS:
        dry = f"{step.dry_limit_s} s, {shlex.join(step.dry_command)}" if step.dry_command else "skipped"
        print(f"{step.name:<17} {step.limit_s:>4}s  {shlex.join(step.command)}  |  {dry}")
    print(f"sum of GPU limits: {sum(step.limit_s for step in STEPS)} s")


def base_environment(dry: bool) -> dict:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
    return env


def start_run(args: argparse.Namespace, base: Path, steps: list[Step]) -> CheckRun:
    """The run's folders and first summary (every step pending); under --dry a scratch copy to run in."""
    work = base / "gpu_check"
    work.mkdir()
    root = shutil.copytree(ROOT, base / "repository", ignore=SCRATCH_IGNORE) if args.dry else ROOT
    out = args.out or Path(os.environ.get("OUT") or ROOT / RESULTS / "gpu_check")
    summary = {"check": "dry: CPU, tiny sizes; plumbing only, not results" if args.dry else "gpu",
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
               "preflight": None, "steps": [{"name": step.name, "status": "pending"} for step in steps]}
    budget = args.budget or BUDGET_S[args.dry]
    return CheckRun(work, out, root, base_environment(args.dry), summary, time.monotonic(), budget)


def check(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the running step is stopped too
    steps = [step for step in STEPS if not args.steps or step.name in args.steps]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run = start_run(args, Path(tmp), steps)
        entry, run.env = preflight(run.env, run.root, args.dry, args.wheels, Path(tmp) / "site",
                                   run.work / "preflight.log")
        run.summary["preflight"] = entry
        if not entry["ok"]:
            for step_entry in run.summary["steps"]:
                step_entry.update(status="skipped", reason="the preflight failed")
            run.save()
            print(f"preflight failed: {entry['problem']}", file=sys.stderr)
            return 2
        print(f"preflight: torch {entry['torch']}, device {entry['device'] or 'cpu'}, "
              f"{len(entry['wheels_installed'])} wheel(s) installed", flush=True)
        if entry["note"]:
            print(f"preflight: {entry['note']}\nThe steps that need those modules are skipped.", flush=True)
        run.save()
        run_steps(run, steps, args.dry, dict(args.limit))
    statuses = [entry["status"] for entry in run.summary["steps"]]
    print(f"== done in {run.summary['elapsed_s']} s: {run.out / ARCHIVE}, {run.out / SUMMARY}")
    missing = any(entry["status"] == "skipped" and "cannot import" in entry["reason"]
                  for entry in run.summary["steps"])
    return 1 if {"failed", "timeout"} & set(statuses) or missing else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.environment:
        atomic_write_json(args.environment, describe_environment())
        return 0
    if args.list:
        print_steps()
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
