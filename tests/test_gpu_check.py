"""benchmarks/gpu_check.py: its step table, its preflight and, in its dry mode on the CPU, its plumbing
(per-step limits, a timed-out step that the next steps survive, one archive with every step's outcome)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/ is a folder of scripts)

DRIVER = ROOT / "benchmarks" / "gpu_check.py"


def run_driver(*args: str, env: dict | None = None, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(DRIVER), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=900)


def python312() -> str | None:
    """A Python 3.12 with torch here ($GPU_CHECK_PYTHON312, else python3.12 on PATH), the GPU machine's
    version; None when there is none."""
    candidate = os.environ.get("GPU_CHECK_PYTHON312") or shutil.which("python3.12")
    if not candidate:
        return None
    probe = subprocess.run([candidate, "-c", "import sys, torch; assert sys.version_info[:2] == (3, 12)"],
                           capture_output=True)
    return candidate if probe.returncode == 0 else None


def read_archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / gpu_check.ARCHIVE) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


ESTIMATED_H200_S = {"env": 5, "augment": 18, "training": 33, "memory": 23, "tests": 25, "packing": 45,
                    "study": 55, "training_compile": 85}  # the step table's estimates


def test_gpu_steps_allow_half_again_their_estimate_fit_in_8_minutes_and_name_scripts_that_exist():
    assert {step.name for step in gpu_check.STEPS} == set(ESTIMATED_H200_S)
    assert all(step.limit_s >= 1.5 * ESTIMATED_H200_S[step.name] for step in gpu_check.STEPS)
    assert sum(step.limit_s for step in gpu_check.STEPS) + gpu_check.PACKING_RESERVE_S <= gpu_check.BUDGET_S[False]
    assert gpu_check.BUDGET_S[False] <= 8 * 60
    assert len({json_name(step) for step in gpu_check.STEPS if json_name(step)}) == len(
        [step for step in gpu_check.STEPS if json_name(step)])  # each step its own result file
    for step in gpu_check.STEPS:
        for command in filter(None, (step.command, step.dry_command)):
            scripts = [arg for arg in command if arg.endswith(".py")]
            assert scripts and all((ROOT / script).is_file() for script in scripts), (step.name, command)


def json_name(step) -> str | None:
    """The result file a GPU step writes to benchmarks/results/ (its name's pattern)."""
    script, flags = step.command[0], set(step.command)
    names = {"benchmarks/bench_augment.py": "augment", "benchmarks/study_time.py": "study_time",
             "benchmarks/bench_packing.py": "packing"}
    if script == "benchmarks/bench_training.py":
        return "memory" if "--memory" in flags else "training-compile" if "--compile" in flags else "training"
    return names.get(script)


@pytest.mark.parametrize("script", ["bench_augment", "bench_training", "study_time", "bench_packing"])
def test_every_flag_of_the_step_table_is_one_the_script_accepts(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    usage = capsys.readouterr().out
    commands = [command for step in gpu_check.STEPS for command in (step.command, step.dry_command)
                if command and f"benchmarks/{script}.py" in command]
    assert commands
    for command in commands:
        for flag in (arg for arg in command if arg.startswith("--")):
            assert flag in usage, f"{script}.py has no {flag} (step table of benchmarks/gpu_check.py)"


def test_figures_flatten_a_report_by_row_names_and_leave_raw_passes_out():
    report = {"rows": [{"model": "simplecnn", "device": "cuda", "fast": {"images_per_s": 9.0, "epoch_s": [1, 2]},
                        "ratio": 3.0, "host_syncs_per_step": {"none": 0.0}}],
              "stages": {"none": {"batched_cuda": 5.0, "passes": {"per_sample": [1.0, 2.0]}}},
              "load_average_1min": 0.5}
    assert gpu_check.figures(report) == {"rows.simplecnn-cuda.fast.images_per_s": 9.0,
                                         "rows.simplecnn-cuda.ratio": 3.0,
                                         "rows.simplecnn-cuda.host_syncs_per_step.none": 0.0,
                                         "stages.none.batched_cuda": 5.0}


def test_two_versions_of_one_wheel_are_caught_before_pip_runs():
    wheels = [Path(name) for name in ("optuna-5.0.0-py3-none-any.whl", "Mako-1.4.3-py3-none-any.whl",
                                      "mako-1.4.2-py3-none-any.whl", "SQLAlchemy-2.1.9-cp312-cp312-x.whl")]
    assert gpu_check.duplicate_wheels(wheels) == ["mako"]


def test_an_error_row_prints_its_error_instead_of_a_figure(capsys):
    import bench_training

    bench_training.print_row({"model": "resnet18", "device": "cuda", "batch_size": 384,
                              "fast": {"images_per_s": 3e4},
                              "fast_compiled": {"error": "BackendCompilerFailed: no C compiler\nmore"}})
    bench_training.print_row({"model": "simplecnn", "device": "cuda", "error": "RuntimeError: CUDA error"})
    out = capsys.readouterr().out
    assert "30,000" in out and "BackendCompilerFailed: no C compiler" in out and "CUDA error" in out


def test_a_step_is_skipped_only_for_a_module_it_needs():
    failed = {"optuna": "ModuleNotFoundError: No module named 'optuna'",
              "pipeline": "ModuleNotFoundError: No module named 'optuna'"}
    steps = {step.name: step for step in gpu_check.STEPS}
    assert "pipeline" in gpu_check.missing_needs(steps["study"], failed)
    assert gpu_check.missing_needs(steps["training"], failed) is None


def test_without_cuda_only_the_dry_run_may_go_on():
    report = {"imports": {"torch": None, "optuna": None}, "torch": "2.11.0", "cuda": False, "device": None}
    problem = gpu_check.preflight_problem(report, dry=False, wheels_dir=Path(".whl"), installed=[])
    assert "torch 2.11.0 sees no CUDA device" in problem and "--dry" in problem
    assert gpu_check.preflight_problem(report, dry=True, wheels_dir=Path(".whl"), installed=[]) is None


@pytest.mark.parametrize("limit", ["nosuchstep=5", "training=0", "training=soon"])
def test_a_bad_limit_is_refused_with_the_step_names(limit, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry", "--limit", limit])
    assert "training_compile" in capsys.readouterr().err


@pytest.mark.parametrize("interpreter", ["this", "3.12"])
def test_dry_run_keeps_going_after_a_timeout_and_a_missing_module_and_packs_every_step(interpreter, tmp_path):
    python = sys.executable if interpreter == "this" else python312()
    if python is None:
        pytest.skip("no Python 3.12 with torch here (set GPU_CHECK_PYTHON312)")
    committed = ROOT / "benchmarks" / "results" / "augment_cpu.json"
    committed_before = committed.read_bytes() if committed.exists() else None
    # optuna broken (as missing on the GPU machine): the steps that import it are skipped, the rest run;
    # a carried wheel is installed all the same.
    broken = tmp_path / "broken" / "optuna"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('optuna is broken on this machine')\n")
    wheel = write_wheel(tmp_path / "wheels", "probe_package")
    out = tmp_path / "out"
    # Generous limits for the steps that must pass (the machine may be busy); 3 s stops training mid-way.
    done = run_driver("--dry", "--out", str(out), "--budget", "900", "--limit", "training=3",
                      "--wheels", str(wheel.parent),
                      *(f"--limit={name}=300" for name in ("env", "augment", "tests", "packing")),
                      env={"PYTHONPATH": str(broken.parent)}, python=python)
    assert done.returncode == 1, done.stdout + done.stderr  # 1: a step timed out, one could not run
    files = read_archive(out)
    summary = json.loads(files["gpu_check/summary.json"])
    assert json.loads((out / gpu_check.SUMMARY).read_text()) == summary
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert statuses == {"env": "ok", "augment": "ok", "training": "timeout", "training_compile": "skipped",
                        "memory": "skipped", "study": "skipped", "tests": "ok", "packing": "ok"}
    assert summary["preflight"]["ok"] and summary["preflight"]["cuda"] is False
    assert summary["preflight"]["wheels_installed"] == [wheel.name]
    assert "optuna is broken" in summary["preflight"]["failed_imports"]["optuna"]
    steps = {step["name"]: step for step in summary["steps"]}
    assert "cannot import" in steps["study"]["reason"] and "pipeline" in steps["study"]["reason"]
    assert "The steps that need those modules are skipped" in done.stdout
    assert summary["check"].startswith("dry")
    assert steps["training"]["exit_code"] is None and steps["training"]["limit_s"] == 3
    assert "stopped after its limit" in files["gpu_check/training.log"].decode()
    # The JSON each step wrote is in the archive under its step, and summarised.
    assert json.loads(files["gpu_check/env/env.json"])["cuda_available"] is False
    augment = json.loads(files["gpu_check/augment/augment_cpu.json"])
    assert augment["n_images"] == 64
    assert steps["augment"]["files"]["augment_cpu.json"]["stages.stage5_occlusion.batched_cpu"] > 0
    assert json.loads(files["gpu_check/packing/packing_cpu.json"])["best_k"]["simplecnn"] in (1, 2)
    assert "passed" in files["gpu_check/tests.log"].decode() or "skipped" in files["gpu_check/tests.log"].decode()
    # The dry run worked in a scratch copy: the committed CPU results are untouched.
    assert (committed.read_bytes() if committed.exists() else None) == committed_before


def write_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding one empty package ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    members = {f"{name}/__init__.py": "",
               f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members[f"{info}/RECORD"] = "".join(f"{member},,\n" for member in [*members, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in members.items():
            wheel.writestr(member, text)
    return path


def test_preflight_installs_the_wheels_then_says_what_still_fails_and_runs_nothing(tmp_path):
    broken = tmp_path / "broken" / "torchvision"  # a package every step needs
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('torchvision is broken on this machine')\n")
    wheel = write_wheel(tmp_path / "wheels", "probe_package")
    out = tmp_path / "out"
    done = run_driver("--dry", "--out", str(out), "--wheels", str(wheel.parent),
                      env={"PYTHONPATH": str(broken.parent)})
    assert done.returncode == 2
    assert "cannot import" in done.stderr
    assert "torchvision: ImportError: torchvision is broken on this machine" in done.stderr
    assert "after installing 1 wheel(s)" in done.stderr and "make gpu-wheels" in done.stderr
    files = read_archive(out)
    summary = json.loads(files["gpu_check/summary.json"])
    assert summary["preflight"]["wheels_installed"] == [wheel.name]
    assert "torchvision" in summary["preflight"]["failed_imports"]
    assert {step["status"] for step in summary["steps"]} == {"skipped"}
    assert "torchvision is broken on this machine" in files["gpu_check/preflight.log"].decode()
