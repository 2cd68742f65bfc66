"""Reading SVHN's .mat layout, the tensor cache, splits, channel statistics and both loaders."""

from __future__ import annotations

import io
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms
from torchvision.datasets import SVHN

import config
import data_loading
from data_loading import (
    DatasetError,
    DeviceLoader,
    compute_channel_stats,
    get_dataloaders_with_custom_train_transform,
    load_split,
    split_data,
    stratified_subset,
    train_val_split,
)

# A bright pixel at a known place of image 0: any wrong axis order moves it.
ROW, COL, CHANNEL = 5, 20, 1


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    data_loading.clear_cache()
    yield
    data_loading.clear_cache()


def svhn_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X uint8 (32, 32, 3, n) and y float64 (n, 1) in 1..10, as in SVHN's files."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (32, 32, 3, n), dtype=np.uint8)
    x[ROW, COL, CHANNEL, 0] = 255
    y = rng.integers(1, 11, (n, 1)).astype(np.float64)
    y[0, 0] = 10  # the digit 0
    return x, y


def write_mat(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": x, "y": y})
    return path


def raw_path(root: Path, split: str = "train") -> Path:
    return root / "raw" / f"{split}_32x32.mat"


def torchvision_reference(root: Path, split: str, monkeypatch) -> SVHN:
    """torchvision's own reader of the same file (its md5 check switched off for test files)."""
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    return SVHN(str(root / "raw"), split=split, download=False)


def test_reads_svhn_layout_like_torchvision(tmp_path, monkeypatch):
    x, y = svhn_arrays(40)
    write_mat(raw_path(tmp_path), x, y)
    images, labels = load_split("svhn", "train", root=tmp_path, download=False)
    reference = torchvision_reference(tmp_path, "train", monkeypatch)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 32, 32)
    assert labels.dtype == torch.int64
    assert torch.equal(images, torch.from_numpy(reference.data))
    assert torch.equal(labels, torch.from_numpy(reference.labels.astype(np.int64)))
    assert images[0, CHANNEL, ROW, COL] == 255 and images[0, CHANNEL, COL, ROW] != 255
    assert labels[0] == 0 and labels.min() >= 0 and labels.max() <= 9
    # As PIL sees it (H, W, C): the same pixel.
    assert images[0].permute(1, 2, 0)[ROW, COL, CHANNEL] == 255


def test_cache_written_and_reused_without_reading_the_mat(tmp_path, monkeypatch):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(30))
    first = load_split("svhn", "train", root=tmp_path, download=False)
    assert path.with_name(path.name + ".pt").exists()
    data_loading.clear_cache()

    def no_mat_reads(*args, **kwargs):
        raise AssertionError("the .mat was read although its cache is current")

    monkeypatch.setattr(scipy.io, "loadmat", no_mat_reads)
    second = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    blob = torch.load(path.with_name(path.name + ".pt"), weights_only=True)
    assert torch.equal(blob["images"], first[0])
    # The stored checksum is zlib's CRC-32 of the image bytes, then the label bytes.
    assert blob["checksum"] == zlib.crc32(first[1].numpy().tobytes(), zlib.crc32(first[0].numpy().tobytes()))


def test_returned_tensors_do_not_share_the_in_process_cache(tmp_path):
    write_mat(raw_path(tmp_path), *svhn_arrays(10))
    images, labels = load_split("svhn", "train", root=tmp_path, download=False)
    kept = images.clone()
    images.zero_()
    labels.fill_(7)
    again, again_labels = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(again, kept) and not torch.all(again_labels == 7)


def test_cache_invalidated_when_the_mat_changes(tmp_path):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(20, seed=0))
    old, _ = load_split("svhn", "train", root=tmp_path, download=False)
    old_mtime = path.stat().st_mtime_ns
    x, y = svhn_arrays(20, seed=1)
    write_mat(path, x, y)
    os.utime(path, ns=(old_mtime + 10**9, old_mtime + 10**9))
    new, new_labels = load_split("svhn", "train", root=tmp_path, download=False)
    assert not torch.equal(new, old)
    assert torch.equal(new, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    data_loading.clear_cache()  # the rewritten disk cache holds the new content too
    cached, _ = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(cached, new)


def cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".pt")


def test_source_change_rebuilds_the_cache_without_a_warning(tmp_path):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(20, seed=0))
    load_split("svhn", "train", root=tmp_path, download=False)
    x, y = svhn_arrays(25, seed=1)
    write_mat(path, x, y)
    data_loading.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, _ = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))


def rewrite_in_place_keeping_times(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Overwrite the file's bytes through the same inode, then put its old atime and mtime back."""
    before = path.stat()
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x, "y": y})
    assert len(buffer.getvalue()) == before.st_size
    with open(path, "r+b") as file:
        file.write(buffer.getvalue())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


@pytest.mark.parametrize("forget_memory", [False, True])
def test_mat_rewritten_in_place_with_its_old_mtime_is_not_served_stale(tmp_path, forget_memory):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(20, seed=0))
    old, _ = load_split("svhn", "train", root=tmp_path, download=False)
    x, y = svhn_arrays(20, seed=1)
    rewrite_in_place_keeping_times(path, x, y)
    if forget_memory:  # a new process: only the .pt cache is left
        data_loading.clear_cache()
    new, new_labels = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(new, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert torch.equal(new_labels, torch.from_numpy(y.reshape(-1).astype(np.int64) % 10))


def zero_bytes_inside_the_images(cache: Path, images: torch.Tensor, count: int) -> None:
    """Zero ``count`` bytes of the stored image data (found by its first bytes), as a bad disk would."""
    data = bytearray(cache.read_bytes())
    start = data.find(images.numpy().tobytes()[:64])
    assert start >= 0 and images.numel() > count + 1000
    data[start + 1000 : start + 1000 + count] = bytes(count)
    cache.write_bytes(bytes(data))


def test_cache_with_zeroed_bytes_warns_and_is_rebuilt(tmp_path):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(30))
    images, labels = load_split("svhn", "train", root=tmp_path, download=False)
    zero_bytes_inside_the_images(cache_path(path), images, 5000)
    data_loading.clear_cache()
    with pytest.warns(data_loading.CacheWarning, match="checksum") as record:
        again, again_labels = load_split("svhn", "train", root=tmp_path, download=False)
    assert str(cache_path(path)) in str(record[0].message) and str(path) in str(record[0].message)
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    data_loading.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache passes its checks
        assert torch.equal(load_split("svhn", "train", root=tmp_path, download=False)[0], images)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda blob: blob["labels"].__setitem__(3, 99), "labels run from 0 to 99, outside 0..9"),
        (lambda blob: blob["labels"].__setitem__(3, -1), "outside 0..9"),
        (lambda blob: blob["labels"].__setitem__(3, (blob["labels"][3] + 1) % 10), "checksum"),
        (lambda blob: blob["images"].__setitem__((0, 0, 0, 0), 7), "checksum"),
        (lambda blob: blob.__setitem__("labels", blob["labels"].int()), "not int64"),
        (lambda blob: blob.__setitem__("images", blob["images"][:, :1]), "not uint8 \\(N, 3, 32, 32\\)"),
        (lambda blob: blob.pop("checksum"), "checksum"),
        (lambda blob: blob.pop("fingerprint"), "fingerprint is missing"),
    ],
)
def test_cache_with_edited_contents_warns_and_is_rebuilt(tmp_path, edit, problem):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(30))
    images, labels = load_split("svhn", "train", root=tmp_path, download=False)
    fingerprint = data_loading.data_fingerprint("svhn", "train", root=tmp_path, download=False)
    blob = torch.load(cache_path(path), weights_only=True)
    edit(blob)
    torch.save(blob, cache_path(path))
    data_loading.clear_cache()
    with pytest.warns(data_loading.CacheWarning, match=problem):
        again, again_labels = load_split("svhn", "train", root=tmp_path, download=False)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    assert data_loading.data_fingerprint("svhn", "train", root=tmp_path, download=False) == fingerprint


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"not a zip file"])
def test_unreadable_cache_warns_and_is_rebuilt(tmp_path, damage):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(30))
    images, _ = load_split("svhn", "train", root=tmp_path, download=False)
    cache_path(path).write_bytes(damage(cache_path(path).read_bytes()))
    data_loading.clear_cache()
    with pytest.warns(data_loading.CacheWarning, match="cannot be read"):
        assert torch.equal(load_split("svhn", "train", root=tmp_path, download=False)[0], images)
    assert torch.load(cache_path(path), weights_only=True)["version"] == data_loading.CACHE_VERSION


# ----------------------------------------------------------------------------- data fingerprints


def fingerprint_of(root: Path, dataset: str = "svhn", split: str = "train") -> str:
    return data_loading.data_fingerprint(dataset, split, root=root, download=False)


def test_fingerprint_follows_content_not_location(tmp_path):
    x, y = svhn_arrays(20, seed=0)
    write_mat(raw_path(tmp_path / "a"), x, y)
    write_mat(raw_path(tmp_path / "b"), x, y)
    first = fingerprint_of(tmp_path / "a")
    assert first.startswith("20-") and first == fingerprint_of(tmp_path / "b")
    changed_pixel = x.copy()
    changed_pixel[0, 0, 0, 5] ^= 1
    write_mat(raw_path(tmp_path / "c"), changed_pixel, y)
    changed_label = y.copy()
    changed_label[4, 0] = changed_label[4, 0] % 10 + 1
    write_mat(raw_path(tmp_path / "d"), x, changed_label)
    write_mat(raw_path(tmp_path / "e"), *svhn_arrays(21, seed=0))
    others = {fingerprint_of(tmp_path / name) for name in "cde"}
    assert len(others) == 3 and first not in others


def test_fingerprint_kept_with_the_cache_and_cheap_to_repeat(tmp_path, monkeypatch):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(20))
    first = fingerprint_of(tmp_path)
    data_loading.clear_cache()

    def no_mat_reads(*args, **kwargs):
        raise AssertionError("the .mat was read although its cache is current")

    monkeypatch.setattr(scipy.io, "loadmat", no_mat_reads)
    assert fingerprint_of(tmp_path) == first  # from the .pt cache
    monkeypatch.setattr(torch, "load", no_mat_reads)
    assert fingerprint_of(tmp_path) == first  # from memory: neither file is loaded again
    monkeypatch.undo()
    write_mat(path, *svhn_arrays(20, seed=5))  # a replaced file
    assert fingerprint_of(tmp_path) != first


def test_fingerprint_of_regenerated_synthetic_data(tmp_path):
    data_loading.make_synthetic_svhn(tmp_path / "a", n_train=30, n_test=20, seed=0)
    data_loading.make_synthetic_svhn(tmp_path / "b", n_train=30, n_test=20, seed=1)
    data_loading.make_synthetic_svhn(tmp_path / "c", n_train=40, n_test=20, seed=0)
    train = [fingerprint_of(tmp_path / name, "synthetic") for name in "abc"]
    assert len(set(train)) == 3 and train[0].startswith("30-") and train[2].startswith("40-")
    # The test split is drawn from its own stream: unchanged by n_train.
    assert fingerprint_of(tmp_path / "a", "synthetic", "test") == fingerprint_of(tmp_path / "c", "synthetic", "test")
    data_loading.make_synthetic_svhn(tmp_path / "a", n_train=30, n_test=20, seed=2)  # regenerated in place
    assert fingerprint_of(tmp_path / "a", "synthetic") not in train


# ----------------------------------------------------------------------------- errors: one sentence with the fix


def assert_one_sentence(error: BaseException, *parts: str) -> None:
    """One line, naming every part, and no chained exception to print above it."""
    message = str(error)
    assert "\n" not in message and message.endswith(".")
    for part in parts:
        assert part in message
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)

@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda data: data[: len(data) // 2], "probably truncated"),
        (lambda data: data[:300], "probably truncated"),
        (lambda data: b"\x00not a mat file" * 50, "not a MATLAB file"),
        (lambda data: b"", "it is empty"),
        (lambda data: data[:128], "holds no variables"),  # the header alone
    ],
)
def test_malformed_mat_raises_one_sentence_and_leaves_no_cache(tmp_path, damage, problem):
    path = write_mat(raw_path(tmp_path), *svhn_arrays(50))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetError, match=problem) as info:
        load_split("svhn", "train", root=tmp_path, download=False)
    url = SVHN.split_list["train"][0]
    assert_one_sentence(info.value, str(path), f"delete it to have it downloaded again, or download {url}")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_other_variable_names_are_listed_with_the_expected_ones(tmp_path):
    path = raw_path(tmp_path)
    path.parent.mkdir(parents=True)
    scipy.io.savemat(path, {"images": np.zeros((32, 32, 3, 4), np.uint8), "labels": np.ones((4, 1))})
    with pytest.raises(DatasetError) as info:
        load_split("svhn", "train", root=tmp_path, download=False)
    assert_one_sentence(info.value, str(path), "holds the variables images, labels", "needs X (images", "y (N labels)")
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(DatasetError, match="holds the variables X but"):
        load_split("svhn", "train", root=tmp_path, download=False)


def test_unreadable_path_raises_one_sentence(tmp_path):
    raw_path(tmp_path).mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(DatasetError, match="cannot be read") as info:
        load_split("svhn", "train", root=tmp_path, download=False)
    assert_one_sentence(info.value, str(raw_path(tmp_path)))


@pytest.mark.parametrize(
    "x_shape, labels, problem",
    [
        ((32, 32, 1, 8), None, "X must be uint8 of shape \\(32, 32, 3, N\\), got uint8 \\(32, 32, 1, 8\\)"),
        ((28, 28, 3, 8), None, "X must be uint8"),
        ((32, 32, 3), None, "X must be uint8"),
        ((32, 32, 3, 8), [11] + [1] * 7, "labels must be integers 1..10"),
        ((32, 32, 3, 8), [0] + [1] * 7, "labels must be integers 1..10"),
        ((32, 32, 3, 8), [1.5] + [1] * 7, "labels must be integers 1..10"),
        ((32, 32, 3, 8), [1] * 7, "7 labels for 8 images"),
    ],
)
def test_invalid_layout_raises(tmp_path, x_shape, labels, problem):
    x = np.zeros(x_shape, np.uint8)
    y = np.ones((x_shape[-1] if len(x_shape) == 4 else 8, 1)) if labels is None else np.array(labels)[:, None]
    path = write_mat(raw_path(tmp_path), x, y.astype(np.float64))
    with pytest.raises(DatasetError, match=problem) as info:
        load_split("svhn", "train", root=tmp_path, download=False)
    assert_one_sentence(info.value, str(path))
    assert not path.with_name(path.name + ".pt").exists()


def test_float_images_rejected(tmp_path):
    write_mat(raw_path(tmp_path), np.zeros((32, 32, 3, 4)), np.ones((4, 1)))
    with pytest.raises(DatasetError, match="got float64"):
        load_split("svhn", "train", root=tmp_path, download=False)


def test_damaged_synthetic_file_names_the_generator_command(tmp_path):
    data_loading.make_synthetic_svhn(tmp_path, n_train=30, n_test=20, seed=0)
    train = tmp_path / "synthetic" / "train_32x32.mat"
    train.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a MATLAB file") as info:
        load_split("synthetic", "train", root=tmp_path)
    assert_one_sentence(info.value, str(train), f"python synthetic_svhn.py --root {tmp_path}")


def test_missing_files_offline_name_path_and_url(tmp_path):
    url, filename, _ = SVHN.split_list["test"]
    with pytest.raises(DatasetError) as info:
        load_split("svhn", "test", root=tmp_path, download=False)
    assert_one_sentence(info.value, str(tmp_path / "raw" / filename), url, "'synthetic'")


def test_failed_download_is_one_sentence_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def offline(url, root, filename=None, md5=None):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"partial")
        try:
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        except ConnectionError as exc:  # a chain like urllib's
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\n" + "x" * 500) from exc

    monkeypatch.setattr(data_loading, "download_url", offline)
    url, filename, _ = SVHN.split_list["train"]
    with pytest.raises(DatasetError, match="download failed: OSError: <urlopen error") as info:
        load_split("svhn", "train", root=tmp_path)
    assert_one_sentence(info.value, str(tmp_path / "raw" / filename), url, "'synthetic'")
    assert "x" * 300 not in str(info.value)
    assert not (tmp_path / "raw" / filename).exists()


def test_download_flow_passes_torchvision_url_and_md5(tmp_path, monkeypatch):
    calls = []
    x, y = svhn_arrays(12)

    def fake_download(url, root, filename=None, md5=None):
        calls.append((url, Path(root), filename, md5))
        write_mat(Path(root) / filename, x, y)

    monkeypatch.setattr(data_loading, "download_url", fake_download)
    images, labels = load_split("svhn", "extra", root=tmp_path)
    url, filename, md5 = SVHN.split_list["extra"]
    assert calls == [(url, tmp_path / "raw", filename, md5)]
    assert torch.equal(images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    load_split("svhn", "extra", root=tmp_path)  # present now: no second download
    assert len(calls) == 1


def test_file_table_matches_torchvision():
    assert {k: tuple(v) for k, v in SVHN.split_list.items()} == data_loading.SVHN_FILES


def test_unknown_names_and_synthetic_extra(tmp_path):
    with pytest.raises(config.ConfigError, match="svhn"):
        load_split("mnist", "train", root=tmp_path)
    with pytest.raises(config.ConfigError, match="extra"):
        load_split("svhn", "valid", root=tmp_path)
    with pytest.raises(DatasetError, match="no 'extra' split"):
        load_split("synthetic", "extra", root=tmp_path)


# ----------------------------------------------------------------------------- splits and statistics


def imbalanced_labels(seed: int = 0) -> torch.Tensor:
    counts = [53, 171, 120, 97, 80, 77, 64, 61, 58, 49]
    labels = torch.cat([torch.full((c,), d) for d, c in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_train_val_split_is_stratified_disjoint_covering_and_fixed():
    labels = imbalanced_labels()
    train, val = train_val_split(labels, 0.2, seed=3)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    expected = torch.bincount(labels).double() * 0.2
    assert torch.all((torch.bincount(labels[val], minlength=10) - expected).abs() <= 1)
    torch.manual_seed(123)  # the global generator must not matter
    again = train_val_split(labels, 0.2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, train_val_split(labels, 0.2, seed=4)[1])


def test_train_val_split_accepts_numpy_and_rejects_bad_fraction():
    labels = imbalanced_labels().numpy()
    train, val = train_val_split(labels, 0.1, seed=0)
    assert train.dtype == torch.int64 and len(train) + len(val) == len(labels)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(labels, 1.0)


def test_stratified_subset_keeps_shares():
    labels = imbalanced_labels()
    idx = stratified_subset(labels, 250, seed=1)
    assert len(idx) == 250 and len(set(idx.tolist())) == 250
    expected = torch.bincount(labels).double() * 250 / len(labels)
    assert torch.all((torch.bincount(labels[idx], minlength=10) - expected).abs() < 1)
    assert torch.equal(idx, stratified_subset(labels, 250, seed=1))
    assert not torch.equal(idx, stratified_subset(labels, 250, seed=2))
    with pytest.raises(ValueError):
        stratified_subset(labels, len(labels) + 1, seed=0)


def test_split_indices_subsample_then_split_inside_the_subsample():
    labels = imbalanced_labels()
    train, val = data_loading.split_indices(labels, 0.1, seed=5, n_train=300)
    pool = stratified_subset(labels, 300, seed=5)
    assert sorted(train.tolist() + val.tolist()) == pool.tolist()
    full_train, full_val = data_loading.split_indices(labels, 0.1, seed=5, n_train=None)
    assert len(full_train) + len(full_val) == len(labels)


def test_channel_stats_match_float64_reference():
    images = torch.randint(0, 256, (37, 3, 8, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 2] //= 3  # channels with different statistics
    mean, std = compute_channel_stats(images, chunk=5)
    ref = images.double() / 255
    assert np.allclose(mean, ref.mean(dim=(0, 2, 3)).numpy(), rtol=0, atol=1e-12)
    assert np.allclose(std, ref.std(dim=(0, 2, 3), correction=0).numpy(), rtol=0, atol=1e-10)
    assert all(isinstance(v, float) for v in mean + std)


# ----------------------------------------------------------------------------- DeviceLoader

MEAN, STD = (0.4377, 0.4438, 0.4728), (0.1977, 0.2007, 0.1966)


def loader_data(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def epoch_ids(loader: DeviceLoader) -> list[int]:
    """The labels of one epoch in order (tests use sample ids as labels)."""
    return torch.cat([y for _, y in loader]).tolist()


def test_device_loader_covers_each_sample_once_and_reshuffles():
    images, _ = loader_data()
    ids = torch.arange(len(images))  # labels = sample ids, to see the order
    loader = DeviceLoader(images, ids, 16, MEAN, STD, seed=7)
    assert len(loader) == 7 and loader.num_samples == 103
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert sorted(first) == list(range(103)) and sorted(second) == list(range(103))
    assert first != second
    assert first == epoch_ids(DeviceLoader(images, ids, 16, MEAN, STD, seed=7))
    assert first != epoch_ids(DeviceLoader(images, ids, 16, MEAN, STD, seed=8))


def test_device_loader_yields_matching_pairs_normalized_like_torchvision():
    images, labels = loader_data()
    ids = torch.arange(len(images))
    loader = DeviceLoader(images, ids, 32, MEAN, STD, seed=1)
    for x, y in loader:
        reference = TF.normalize(images[y].float() / 255, MEAN, STD)
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert torch.allclose(x, reference, atol=1e-6)


def test_device_loader_no_shuffle_and_drop_last():
    images, labels = loader_data()
    ids = torch.arange(len(images))
    loader = DeviceLoader(images, ids, 25, MEAN, STD, shuffle=False, drop_last=True)
    assert len(loader) == 4
    assert epoch_ids(loader) == list(range(100))
    assert all(len(y) == 25 for _, y in loader)


def test_device_loader_state_dict_reproduces_the_next_epoch():
    images, _ = loader_data()
    ids = torch.arange(len(images))
    calls = []

    def augment(batch, generator):
        assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 32, 32)
        noise = torch.rand(len(batch), generator=generator)
        calls.append(noise)
        return (batch.float() / 255 + noise.view(-1, 1, 1, 1)).contiguous()

    loader = DeviceLoader(images, ids, 20, MEAN, STD, seed=3, augment=augment)
    epoch_ids(loader)
    state = loader.state_dict()
    expected_ids = epoch_ids(loader)
    expected_noise = torch.cat(calls[-len(loader):])
    resumed = DeviceLoader(images, ids, 20, MEAN, STD, seed=99, augment=augment)
    resumed.load_state_dict(state)
    assert epoch_ids(resumed) == expected_ids
    assert torch.equal(torch.cat(calls[-len(loader):]), expected_noise)


def test_device_loader_order_and_augment_streams_are_separate_from_global_rng():
    images, _ = loader_data()
    ids = torch.arange(len(images))
    torch.manual_seed(0)
    a = epoch_ids(DeviceLoader(images, ids, 20, MEAN, STD, seed=5))
    torch.manual_seed(1)
    b = epoch_ids(DeviceLoader(images, ids, 20, MEAN, STD, seed=5))
    assert a == b
    loader = DeviceLoader(images, ids, 20, MEAN, STD, seed=5)
    assert not torch.equal(loader.generator.get_state(), loader.aug_generator.get_state())


# ----------------------------------------------------------------------------- torch DataLoader path


def test_torch_loaders_hand_pil_images_and_normalize_like_torchvision(tmp_path):
    x_train, y_train = svhn_arrays(120, seed=0)
    x_test, y_test = svhn_arrays(40, seed=1)
    write_mat(raw_path(tmp_path, "train"), x_train, y_train)
    write_mat(raw_path(tmp_path, "test"), x_test, y_test)
    eval_t = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    seen = []

    def train_t(image):
        seen.append((image.mode, image.size))
        return eval_t(image)

    train, val, test = get_dataloaders_with_custom_train_transform(
        train_t, eval_t, "svhn", batch_size=16, val_fraction=0.25, seed=0, num_workers=0, root=tmp_path
    )
    assert len(train.dataset) + len(val.dataset) == 120 and len(test.dataset) == 40
    # The loaders serve the very tensors of the run's split (one data path for both loaders).
    split = split_data("svhn", val_fraction=0.25, seed=0, root=tmp_path)
    val_x, val_y = next(iter(val))
    assert torch.allclose(val_x, TF.normalize(split.val_x[: len(val_y)].float() / 255, MEAN, STD), atol=1e-6)
    assert torch.equal(val_y, split.val_y[: len(val_y)])
    test_x, test_y = next(iter(test))
    test_images, test_labels = load_split("svhn", "test", root=tmp_path)
    assert test_x[0, CHANNEL, ROW, COL] == pytest.approx((1.0 - MEAN[CHANNEL]) / STD[CHANNEL])
    assert torch.equal(test_y, test_labels[: len(test_y)])
    train_ids = torch.cat([y for _, y in train])
    assert seen[0] == ("RGB", (32, 32)) and len(seen) == len(train.dataset)
    again = get_dataloaders_with_custom_train_transform(
        eval_t, eval_t, "svhn", batch_size=16, val_fraction=0.25, seed=0, num_workers=0, root=tmp_path
    )[0]
    assert torch.equal(torch.cat([y for _, y in again]), train_ids)  # seeded shuffle


def test_torch_loaders_subsets(tmp_path):
    write_mat(raw_path(tmp_path, "train"), *svhn_arrays(100, seed=0))
    write_mat(raw_path(tmp_path, "test"), *svhn_arrays(50, seed=1))
    eval_t = transforms.ToTensor()
    train, val, test = get_dataloaders_with_custom_train_transform(
        eval_t, eval_t, "svhn", batch_size=8, val_fraction=0.2, num_workers=0, root=tmp_path,
        n_train=60, n_test=20,
    )
    assert len(train.dataset) + len(val.dataset) == 60 and len(test.dataset) == 20
