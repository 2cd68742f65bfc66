"""Shared fixtures: every test writes under tmp paths, never into the repository's folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs one worker per core: one thread each (also in the processes a test starts) keeps two
    # workers from fighting over the same cores.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import config  # noqa: E402

# A small synthetic SVHN shared by the tests that train (generated once per test session).
TINY_TRAIN = 1500
TINY_TEST = 400


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from data_loading import make_synthetic_svhn

    root = tmp_path_factory.mktemp("data")
    make_synthetic_svhn(root, n_train=TINY_TRAIN, n_test=TINY_TEST, seed=0)
    return root


@pytest.fixture
def project_dirs(tmp_path, tiny_data_dir, monkeypatch) -> Path:
    """Point config's data, models and reports paths at a fresh tmp tree (data shared)."""
    reports = tmp_path / "reports"
    monkeypatch.setattr(config, "DATA_DIR", tiny_data_dir)
    monkeypatch.setattr(config, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(config, "REPORTS_DIR", reports)
    monkeypatch.setattr(config, "RUNS_DIR", reports / "runs")
    monkeypatch.setattr(config, "FIGURES_DIR", reports / "figures")
    for name, path in (("DATA", tiny_data_dir), ("MODELS", tmp_path / "models"), ("REPORTS", reports)):
        monkeypatch.setenv(f"SVHN_AUG_{name}_DIR", str(path))
    return tmp_path
