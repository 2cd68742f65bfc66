"""benchmarks/gpu_check.py: its step table, its preflight and, in its dry mode on the CPU, its plumbing
(per-step limits, a timed-out step that the next steps survive, one archive with every step's outcome)."""

from __future__ import annotations

import importlib
import json
import os
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


def run_driver(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def read_archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / gpu_check.ARCHIVE) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def test_gpu_steps_fit_twice_in_the_device_time_and_name_scripts_that_exist():
    assert sum(step.limit_s for step in gpu_check.STEPS) <= 330
    for step in gpu_check.STEPS:
        for command in filter(None, (step.command, step.dry_command)):
            scripts = [arg for arg in command if arg.endswith(".py")]
            assert scripts and all((ROOT / script).is_file() for script in scripts), (step.name, command)


@pytest.mark.parametrize("script", ["bench_augment", "bench_training", "study_time"])
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


def test_dry_run_keeps_going_after_a_timeout_and_packs_every_step(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "augment_cpu.json"
    committed_before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "out"
    # Generous limits for the steps that must pass (the machine may be busy); 3 s stops training mid-way.
    done = run_driver("--dry", "--out", str(out), "--budget", "900", "--limit", "training=3",
                      *(f"--limit={name}=300" for name in ("env", "augment", "tests")))
    assert done.returncode == 1, done.stdout + done.stderr  # 1: a step timed out
    files = read_archive(out)
    summary = json.loads(files["gpu_check/summary.json"])
    assert json.loads((out / gpu_check.SUMMARY).read_text()) == summary
    statuses = {step["name"]: step["status"] for step in summary["steps"]}
    assert statuses == {"env": "ok", "augment": "ok", "training": "timeout", "training_compile": "skipped",
                        "memory": "skipped", "study": "skipped", "tests": "ok"}
    assert summary["preflight"]["ok"] and summary["preflight"]["cuda"] is False
    assert summary["check"].startswith("dry")
    steps = {step["name"]: step for step in summary["steps"]}
    assert steps["training"]["exit_code"] is None and steps["training"]["limit_s"] == 3
    assert "stopped after its limit" in files["gpu_check/training.log"].decode()
    # The JSON each step wrote is in the archive under its step, and summarised.
    assert json.loads(files["gpu_check/env/env.json"])["cuda_available"] is False
    augment = json.loads(files["gpu_check/augment/augment_cpu.json"])
    assert augment["n_images"] == 64
    assert steps["augment"]["files"]["augment_cpu.json"]["stages.stage5_occlusion.batched_cpu"] > 0
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
    broken = tmp_path / "broken" / "optuna"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('optuna is broken on this machine')\n")
    wheel = write_wheel(tmp_path / "wheels", "probe_package")
    out = tmp_path / "out"
    done = run_driver("--dry", "--out", str(out), "--wheels", str(wheel.parent),
                      env={"PYTHONPATH": str(broken.parent)})
    assert done.returncode == 2
    assert "cannot import" in done.stderr and "optuna: ImportError: optuna is broken on this machine" in done.stderr
    assert "after installing 1 wheel(s)" in done.stderr and "make gpu-wheels" in done.stderr
    files = read_archive(out)
    summary = json.loads(files["gpu_check/summary.json"])
    assert summary["preflight"]["wheels_installed"] == [wheel.name]
    assert "optuna" in summary["preflight"]["failed_imports"]
    assert {step["status"] for step in summary["steps"]} == {"skipped"}
    assert "optuna is broken on this machine" in files["gpu_check/preflight.log"].decode()
