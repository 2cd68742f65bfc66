"""Atomic writes: a failure mid-write leaves the previous file whole and no temp file behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

import atomic_io


def test_write_replaces_whole_file_with_normal_mode(tmp_path):
    path = atomic_io.atomic_write_json(tmp_path / "sub" / "report.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    atomic_io.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = atomic_io.atomic_write_text(tmp_path / "report.json", "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_torch_save_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = atomic_io.atomic_torch_save(state, tmp_path / "m.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
