"""Several runs packed onto one device: ``--workers`` processes give each run the results it gets alone,
and ``--workers auto`` sizes their number from the device's memory and the run's size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import config
import pipeline
import runs

# One cell x two seeds of a tiny SimpleCNN grid: about a second of training per run.
TINY = dict(dataset="synthetic", epochs=1, n_train=300, n_test=200, batch_size=64, eval_batch_size=128)


def comparable(report: dict) -> dict:
    """What a run learned and predicted (not when, nor how fast)."""
    history = [{k: v for k, v in h.items() if "seconds" not in k and "per_s" not in k} for h in report["history"]]
    return {"test": report["test"], "history": history, "robustness": report["robustness"],
            "predictions": report["test_predictions"]}


def test_two_workers_give_every_run_the_results_it_gets_alone(project_dirs, monkeypatch):
    # Both ways run with one torch thread per process (the grid shares 2 cores out this way), so the
    # CPU kernels sum in the same order.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = config.preset_config("original", **TINY)
    grid = dict(models=("simplecnn",), stages=("stage5_occlusion",), p_augs=(1.0,), seeds=(0, 1), base=base,
                severities=(2,), quiet=True, heartbeat=0.5)
    try:
        alone = pipeline.grid(**grid, storage=str(project_dirs / "one.journal"), queue_name="one", workers=1)
    finally:
        torch.set_num_threads(threads)
    for folder in (config.RUNS_DIR, config.MODELS_DIR):  # the packed grid trains every run again
        for path in folder.rglob("*"):
            if path.is_file():
                path.unlink()
    packed = pipeline.grid(**grid, storage=str(project_dirs / "two.journal"), queue_name="two", workers=2)
    assert len(alone) == 2
    assert {r["run_id"]: comparable(r) for r in packed} == {r["run_id"]: comparable(r) for r in alone}


def test_auto_workers_fit_the_free_memory_the_cores_and_the_measured_most():
    gb = 2**30
    assert pipeline.packed_workers(free_bytes=140 * gb, run_bytes=2 * gb, cpus=16) == 8  # the most measured
    assert pipeline.packed_workers(free_bytes=140 * gb, run_bytes=2 * gb, cpus=4) == 4  # a core each
    assert pipeline.packed_workers(free_bytes=10 * gb, run_bytes=3 * gb, cpus=16) == 3  # 90 % of 10 GB
    assert pipeline.packed_workers(free_bytes=1 * gb, run_bytes=3 * gb, cpus=16) == 1  # never none


def test_auto_workers_is_one_on_a_cpu():
    base = config.preset_config("original", **TINY)
    assert pipeline.resolve_workers("auto", base, ("simplecnn",), "cpu") == 1
    assert pipeline.resolve_workers(3, base, ("simplecnn",), "cpu") == 3


def test_a_run_s_device_memory_grows_with_its_model_batch_and_images():
    small = config.preset_config("original", **TINY)
    data_bytes = (300 + 200) * 3 * 32 * 32
    assert runs.device_bytes(small) > runs.CUDA_CONTEXT_BYTES + data_bytes
    assert runs.device_bytes(dataclasses.replace(small, batch_size=128)) > runs.device_bytes(small)
    resnet = config.preset_config("original", **{**TINY, "model": "resnet18"})
    # ResNet18Cifar: 11M parameters (weights, gradients, two Adam moments) and far larger activations.
    assert runs.device_bytes(resnet) - runs.device_bytes(small) > 4 * 4 * 11_000_000


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("3", 3)])
def test_workers_flag_takes_auto_or_a_count(text, expected):
    from cli_flags import workers_count

    assert workers_count(text) == expected
