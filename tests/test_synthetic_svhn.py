"""The offline synthetic SVHN: SVHN's file layout, determinism, class shares, reuse and regeneration."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import config
import data_loading
import synthetic_svhn
from synthetic_svhn import make_synthetic_svhn

N_TRAIN, N_TEST = 300, 100


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, make_synthetic_svhn(root, n_train=N_TRAIN, n_test=N_TEST, seed=0)


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    data_loading.clear_cache()
    yield
    data_loading.clear_cache()


def mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_files_have_svhn_exact_layout(made):
    root, folder = made
    assert folder == root / "synthetic"
    for name, n in (("train_32x32.mat", N_TRAIN), ("test_32x32.mat", N_TEST)):
        mat = scipy.io.loadmat(folder / name)
        assert mat["X"].dtype == np.uint8 and mat["X"].shape == (32, 32, 3, n)
        assert mat["y"].dtype == np.float64 and mat["y"].shape == (n, 1)
        assert set(np.unique(mat["y"])) == set(range(1, 11))  # 10 stands for the digit 0
    params = json.loads((folder / "params.json").read_text())
    assert params["generator_version"] == synthetic_svhn.GENERATOR_VERSION
    assert (params["n_train"], params["n_test"], params["seed"]) == (N_TRAIN, N_TEST, 0)


def test_class_shares_follow_svhn_train(made):
    _, folder = made
    y = scipy.io.loadmat(folder / "train_32x32.mat")["y"].ravel().astype(int)
    counts = np.bincount(np.where(y == 10, 0, y), minlength=10)
    shares = np.asarray(config.SVHN_TRAIN_CLASS_COUNTS) / sum(config.SVHN_TRAIN_CLASS_COUNTS)
    assert np.all(np.abs(counts - shares * N_TRAIN) < 1)


def test_deterministic_for_a_seed_and_different_across_seeds(made, tmp_path):
    _, folder = made
    again = make_synthetic_svhn(tmp_path / "a", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    other = make_synthetic_svhn(tmp_path / "b", n_train=N_TRAIN, n_test=N_TEST, seed=1)
    x0 = scipy.io.loadmat(folder / "train_32x32.mat")["X"]
    x1 = scipy.io.loadmat(other / "train_32x32.mat")["X"]
    assert np.mean(x0 != x1) > 0.5


def test_test_split_does_not_depend_on_n_train(made, tmp_path):
    _, folder = made
    other = make_synthetic_svhn(tmp_path, n_train=50, n_test=N_TEST, seed=0)
    assert (other / "test_32x32.mat").read_bytes() == (folder / "test_32x32.mat").read_bytes()


def test_images_look_varied(made):
    images, labels = data_loading.load_split("synthetic", "train", root=made[0])
    x = images.double() / 255  # (N, 3, 32, 32)
    contrast = x.mean(dim=1).flatten(1).std(dim=1)
    assert torch.all(contrast > 0.02), "every image shows some structure"
    # Both polarities: centre brighter than the border in some images, darker in others.
    centre = x[:, :, 10:22, 12:20].mean(dim=(1, 2, 3))
    border = torch.cat([x[:, :, :, :3], x[:, :, :, -3:]], dim=3).mean(dim=(1, 2, 3))
    brighter = (centre > border).double().mean()
    assert 0.15 < brighter < 0.85
    assert len({tuple(img.flatten(1).mean(1).round(decimals=2).tolist()) for img in x}) > 0.9 * len(x)


def test_reused_when_unchanged_and_regenerated_when_parameters_change(tmp_path):
    folder = make_synthetic_svhn(tmp_path, n_train=60, n_test=30, seed=2)
    before = mtimes(folder)
    make_synthetic_svhn(tmp_path, n_train=60, n_test=30, seed=2)
    assert mtimes(folder) == before
    make_synthetic_svhn(tmp_path, n_train=80, n_test=30, seed=2)
    assert scipy.io.loadmat(folder / "train_32x32.mat")["X"].shape[3] == 80
    assert json.loads((folder / "params.json").read_text())["n_train"] == 80
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]


def test_interrupted_generation_is_redone(tmp_path):
    folder = make_synthetic_svhn(tmp_path, n_train=40, n_test=20, seed=0)
    (folder / "params.json").unlink()  # as if the run stopped before recording its parameters
    before = mtimes(folder)
    make_synthetic_svhn(tmp_path, n_train=40, n_test=20, seed=0)
    assert mtimes(folder)["train_32x32.mat"] != before["train_32x32.mat"]


def test_load_split_reads_the_mat_through_the_svhn_reader(made, monkeypatch):
    root, folder = made
    read = []
    real_loadmat = scipy.io.loadmat

    def spy(path, *args, **kwargs):
        read.append(str(path))
        return real_loadmat(path, *args, **kwargs)

    monkeypatch.setattr(scipy.io, "loadmat", spy)
    for cache in folder.glob("*.pt"):
        cache.unlink()
    images, labels = data_loading.load_split("synthetic", "test", root=root)
    assert read == [str(folder / "test_32x32.mat")]
    mat = real_loadmat(folder / "test_32x32.mat")
    assert torch.equal(images, torch.from_numpy(mat["X"].transpose(3, 2, 0, 1).copy()))
    y = mat["y"].ravel().astype(np.int64)
    assert torch.equal(labels, torch.from_numpy(np.where(y == 10, 0, y)))


def test_load_split_uses_existing_files_and_generates_missing_ones(made, tmp_path, monkeypatch):
    root, folder = made
    before = mtimes(folder)
    images, _ = data_loading.load_split("synthetic", "train", root=root)
    assert len(images) == N_TRAIN  # files of any size made by this generator are used as they are
    assert {k: v for k, v in mtimes(folder).items() if k in before} == before
    monkeypatch.setattr(config, "SYNTHETIC_N_TRAIN", 70)
    monkeypatch.setattr(config, "SYNTHETIC_N_TEST", 20)
    images, labels = data_loading.load_split("synthetic", "test", root=tmp_path)
    assert len(images) == 20 and images.dtype == torch.uint8 and labels.max() <= 9


def test_stale_generator_version_is_regenerated(tmp_path, monkeypatch):
    folder = make_synthetic_svhn(tmp_path, n_train=40, n_test=20, seed=0)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "generator_version": 0}))
    monkeypatch.setattr(config, "SYNTHETIC_N_TRAIN", 30)
    monkeypatch.setattr(config, "SYNTHETIC_N_TEST", 10)
    images, _ = data_loading.load_split("synthetic", "train", root=tmp_path)
    assert len(images) == 30


def test_glyph_bank_has_enough_distinct_faces():
    bank = synthetic_svhn.glyph_bank()
    assert len(bank) >= synthetic_svhn.MIN_FONTS
    for weights in bank:
        digits = weights[0]
        assert len({d.tobytes() for d in digits}) == 10 and all(d.max() > 0.5 for d in digits)
        assert weights[2][8].sum() > weights[0][8].sum()  # the bold variant carries more ink


def test_batched_jpeg_equals_coding_each_image_alone():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    quality = np.array([40, 95, 40, 60] * 3)
    reference = []
    for image, q in zip(images, quality, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(q), subsampling=0)
        reference.append(np.asarray(Image.open(buffer)))
    coded = synthetic_svhn._jpeg(images, quality)
    assert np.array_equal(coded, np.stack(reference)) and not np.array_equal(coded, images)


def test_command_line(tmp_path, capsys):
    synthetic_svhn.main(["--n-train", "25", "--n-test", "15", "--seed", "4", "--root", str(tmp_path)])
    params = json.loads((tmp_path / "synthetic" / "params.json").read_text())
    assert (params["n_train"], params["n_test"], params["seed"]) == (25, 15, 4)
    assert "synthetic" in capsys.readouterr().out
