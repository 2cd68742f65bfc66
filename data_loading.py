"""SVHN and synthetic SVHN on disk and in memory: reading, caching, splitting, batching.

Images travel as uint8 tensors (N, 3, 32, 32) and labels as int64 (N,) in 0..9. Each .mat's
tensors are cached beside it (``<file>.mat.pt``) with a CRC-32 checked on every read and the
split's ``data_fingerprint`` (sizes and a SHA-256 of the images and labels), which run ids use
to tell one version of the data from another.
Two ways to batch them:

- ``DeviceLoader``: the whole split resident on the training device; each epoch one
  permutation from the loader's own ``torch.Generator``; normalization (or a batched
  augmentation) on whole batches. No per-sample Python.
- ``get_dataloaders_with_custom_train_transform``: torch DataLoaders handing PIL images to
  per-sample torchvision transforms, as the original study did.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.utils import download_url

import config
from atomic_io import atomic_torch_save
from augment_ops import normalize_batch, to_unit_float
from synthetic_svhn import SPLIT_FILES as SYNTHETIC_FILES
from synthetic_svhn import ensure_synthetic_svhn, make_synthetic_svhn

__all__ = [
    "CacheWarning",
    "DatasetError",
    "DeviceLoader",
    "RunData",
    "SPLIT_SEED",
    "SVHN_FILES",
    "clear_cache",
    "compute_channel_stats",
    "data_fingerprint",
    "get_dataloaders_with_custom_train_transform",
    "load_split",
    "per_sample_loaders",
    "prepare_data",
    "make_synthetic_svhn",
    "read_svhn_mat",
    "set_seed",
    "split_data",
    "split_indices",
    "stratified_subset",
    "train_val_split",
]

# (url, file name, md5) per split, as in torchvision 0.29.1 `torchvision.datasets.SVHN.split_list`.
SVHN_FILES = {
    "train": (
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        "train_32x32.mat",
        "e26dedcc434d2e4c54c9b2d4a06d8373",
    ),
    "test": (
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
        "test_32x32.mat",
        "eb5a983be6a315427106f1b164d9cef3",
    ),
    "extra": (
        "http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
        "extra_32x32.mat",
        "a93ce644f1a588dc4d68dda5feec44a7",
    ),
}
RAW_SUBDIR = "raw"
# Bump when the cache layout changes, so old caches are ignored.
CACHE_VERSION = 2


class DatasetError(ValueError):
    """A data file is missing, unreadable or not in SVHN's layout; the message says what to do."""


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- reading .mat files

_REPLACE_IT = "replace it with an intact copy"


def _invalid(path: Path, problem: str, remedy: str) -> DatasetError:
    return DatasetError(f"{path} is not a usable SVHN .mat file: {problem}; {remedy}.")


def _unreadable(path: Path, exc: OSError) -> DatasetError:
    return DatasetError(f"{path} cannot be read ({exc.strerror or exc}); check that it is a file you may read.")


def _short(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 200 characters: enough to act on, no wall of text."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _loadmat(path: Path, remedy: str) -> dict[str, np.ndarray]:
    """X and y of a MATLAB file, or a DatasetError that says whether it is a MATLAB file at all."""
    try:
        with open(path, "rb") as file:
            header = file.read(128)  # MATLAB 5 files open with a text header "MATLAB 5.0 MAT-file ..."
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if header.startswith(b"MATLAB 7.3"):  # HDF5 inside: scipy.io reads MATLAB formats up to v7 only
        raise _invalid(path, "it is a MATLAB v7.3 (HDF5) file, which scipy cannot read",
                       "save it again in the v7 format (in MATLAB: save(name, 'X', 'y', '-v7'))")
    try:
        return scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, OSError...) on bad bytes
        problem = f"scipy cannot read it ({_short(exc)}), so it is probably truncated"
    if not header:
        problem = "it is empty"
    elif not header.startswith(b"MATLAB"):
        problem = f"it is not a MATLAB file (it starts with {header[:12]!r})"
    raise _invalid(path, problem, remedy)  # raised outside the except block: no chained traceback


def _variables_problem(path: Path) -> str:
    try:
        found = [name for name, _, _ in scipy.io.whosmat(path)]
    except Exception:  # the variables were just read, so this only fails on a file changed meanwhile
        found = []
    expected = "X (images, uint8 32x32x3xN) and y (N labels)"
    if not found:
        return f"it holds no variables (it may be truncated) but SVHN's layout needs {expected}"
    return f"it holds the variables {', '.join(found)} but SVHN's layout needs {expected}"


def read_svhn_mat(path: str | Path, remedy: str = _REPLACE_IT) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate one SVHN-format .mat: images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..9.

    A file that is missing, not a MATLAB file, truncated or not in SVHN's layout raises a
    DatasetError of one sentence that names the file, the problem and ``remedy`` (what to do).
    """
    path = Path(path)
    mat = _loadmat(path, remedy)
    if "X" not in mat or "y" not in mat:
        raise _invalid(path, _variables_problem(path), remedy)
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _invalid(path, f"X must be uint8 of shape (32, 32, 3, N), got {x.dtype} {x.shape}", remedy)
    y = y.reshape(-1)
    if y.size != x.shape[3]:
        raise _invalid(path, f"y holds {y.size} labels for {x.shape[3]} images", remedy)
    problem = _labels_problem(y)
    if problem is not None:
        raise _invalid(path, f"labels must be integers 1..10 (10 stands for the digit 0), but {problem}", remedy)
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    # MATLAB stores X as (H, W, C, N); torchvision's SVHN uses transpose(3, 2, 0, 1) -> (N, C, H, W).
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _labels_problem(y: np.ndarray) -> str | None:
    """What is wrong with a .mat's labels y (N,), naming a few bad values, or None."""
    if not np.issubdtype(y.dtype, np.number):
        return f"y holds {y.dtype} values"
    bad = np.unique(y[~(np.isfinite(y) & (y == np.round(y)) & (y >= 1) & (y <= 10))])
    if bad.size == 0:
        return None
    shown = ", ".join(f"{v:g}" for v in bad[:5].astype(float)) + (", ..." if bad.size > 5 else "")
    count = int(np.isin(y, bad).sum())
    return f"{count} label(s) are {shown}"


def class_counts_problem(labels: torch.Tensor, what: str) -> str | None:
    """Which digits ``labels`` (N,) lacks entirely, with the per-class counts, or None: a 10-class
    macro-F1 over a split missing a class would be scored without a word."""
    counts = torch.bincount(labels, minlength=config.NUM_CLASSES).tolist()
    missing = [digit for digit, n in enumerate(counts) if n == 0]
    if not missing:
        return None
    return (f"{what} holds no image of digit(s) {', '.join(map(str, missing))} (images per digit 0-9: "
            f"{counts}), so its 10-class metrics would be wrong")


# ----------------------------------------------------------------------------- fingerprints and the tensor cache

# The source's content sample: this many blocks spread evenly over the file, head and tail included.
_SOURCE_SAMPLES = 64
_SOURCE_BLOCK = 16 * 1024


class CacheWarning(UserWarning):
    """A tensor cache failed its checks (unreadable, bad checksum, labels out of range...) and is rebuilt."""


class _Split(NamedTuple):
    source: dict[str, int | str]  # the .mat's version, from _source_fingerprint
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,) in 0..9
    fingerprint: str  # from _content_fingerprint


def _sample_offsets(size: int) -> Sequence[int]:
    if size <= _SOURCE_SAMPLES * _SOURCE_BLOCK:
        return range(0, size, _SOURCE_BLOCK)  # small files are read whole
    last = size - _SOURCE_BLOCK
    return [i * last // (_SOURCE_SAMPLES - 1) for i in range(_SOURCE_SAMPLES)]


def _source_fingerprint(path: Path) -> dict[str, int | str]:
    """One version of the source without reading all of it (1 MiB of SVHN train's 225 MB, about a millisecond).

    Size, mtime and inode change on a copy or an atomic rewrite; ctime changes on every write and on
    every utime, so a file rewritten in place with its old mtime restored is seen too; the hash of
    sampled blocks covers a rewrite within one tick of the file system's clock and file systems
    whose ctime means little. Hashing the whole .mat would cost about 75 ms per load for SVHN train.
    """
    with open(path, "rb") as file:
        stat = os.fstat(file.fileno())
        digest = hashlib.blake2b(digest_size=16)
        for offset in _sample_offsets(stat.st_size):
            file.seek(offset)
            digest.update(file.read(_SOURCE_BLOCK))
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "sample": digest.hexdigest(),
    }


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view, for a contiguous tensor)."""
    return tensor.contiguous().numpy().reshape(-1).view(np.uint8)


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> int:
    """CRC-32 of the tensors' bytes, checked on every cache read: about 4 GB/s, the fastest in the
    standard library (blake2b runs at 0.8 GB/s), so about 55 ms for SVHN train."""
    return zlib.crc32(_raw_bytes(labels), zlib.crc32(_raw_bytes(images)))


def _content_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """``<N>-<SHA-256 of shapes, images and labels, 32 hex digits>``: computed once, when the cache is built."""
    digest = hashlib.sha256(repr((tuple(images.shape), tuple(labels.shape))).encode())
    digest.update(_raw_bytes(images))
    digest.update(_raw_bytes(labels))
    return f"{len(images)}-{digest.hexdigest()[:32]}"


def _cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".pt")


def _cache_problem(blob: dict) -> str | None:
    """What is wrong with a current cache's contents, or None when they pass every check."""
    images, labels = blob.get("images"), blob.get("labels")
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return "its images or labels are missing"
    if not isinstance(blob.get("fingerprint"), str):
        return "its fingerprint is missing"
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
        return f"its images are {images.dtype} {tuple(images.shape)}, not uint8 (N, 3, 32, 32)"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),):
        return f"its labels are {labels.dtype} {tuple(labels.shape)}, not int64 ({len(images)},)"
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        return f"its labels run from {int(labels.min())} to {int(labels.max())}, outside 0..9"
    if _checksum(images, labels) != blob.get("checksum"):
        return "its checksum does not match its images and labels"
    return None


def _read_cache(cache: Path, source: dict[str, int | str], mat: Path) -> _Split | None:
    """The cached split when it was made from this version of ``mat`` and is intact, else None
    (with a CacheWarning when the cache is damaged; an old layout or a changed source is quietly replaced)."""
    if not cache.exists():
        return None
    try:
        blob = torch.load(cache, weights_only=True)
        if blob["version"] != CACHE_VERSION or blob["source"] != source:
            return None
        problem = _cache_problem(blob)
    except Exception as exc:  # torch, zip and pickle errors, a missing key, a blob that is not a dict
        problem = f"it cannot be read: {_short(exc)}"
    if problem is not None:
        # stacklevel 5: the caller of load_split or data_fingerprint.
        warnings.warn(f"tensor cache {cache} is damaged ({problem}); rebuilding it from {mat}", CacheWarning, 5)
        return None
    return _Split(source, blob["images"], blob["labels"], blob["fingerprint"])


def _write_cache(cache: Path, split: _Split) -> None:
    blob = {
        "version": CACHE_VERSION,
        "source": split.source,
        "images": split.images,
        "labels": split.labels,
        "checksum": _checksum(split.images, split.labels),
        "fingerprint": split.fingerprint,
    }
    try:
        atomic_torch_save(blob, cache)
    except OSError:  # a read-only data folder still loads, just without the speed-up next time
        pass


# Splits already loaded in this process: resolved .mat path -> _Split.
_MEMORY: dict[Path, _Split] = {}


def clear_cache() -> None:
    """Forget the splits held in memory (the on-disk .pt caches stay)."""
    _MEMORY.clear()


def _load_mat_cached(path: Path, remedy: str) -> _Split:
    """The .mat's split via the in-process cache, then the .pt cache, then the .mat itself."""
    try:
        source = _source_fingerprint(path)
    except OSError as exc:
        raise _unreadable(path, exc) from None
    key = path.resolve()
    held = _MEMORY.get(key)
    if held is not None and held.source == source:
        return held
    cache = _cache_path(path)
    split = _read_cache(cache, source, path)
    if split is None:
        images, labels = read_svhn_mat(path, remedy)
        split = _Split(source, images, labels, _content_fingerprint(images, labels))
        _write_cache(cache, split)
    _MEMORY[key] = split
    return split


# ----------------------------------------------------------------------------- locating a split


def _missing_svhn(path: Path, split: str, reason: str) -> DatasetError:
    url, _, md5 = SVHN_FILES[split]
    return DatasetError(
        f"SVHN {split} split not found at {path} ({reason}): download {url} (md5 {md5}) into "
        f"{path.parent}, or use the offline dataset 'synthetic'."
    )


def _svhn_file(split: str, root: Path, download: bool) -> tuple[Path, str]:
    """The split's .mat (downloaded if missing and allowed) and what to do when it is damaged."""
    url, filename, md5 = SVHN_FILES[split]
    folder = root / RAW_SUBDIR
    path = folder / filename
    remedy = f"delete it to have it downloaded again, or download {url} (md5 {md5}) by hand"
    if path.exists():
        return path, remedy
    if not download:
        raise _missing_svhn(path, split, "download=False")
    try:
        download_url(url, str(folder), filename=filename, md5=md5)
    except Exception as exc:  # URLError, HTTPError, RuntimeError on a bad md5, OSError...
        path.unlink(missing_ok=True)  # a partial or corrupt download: it was not there before
        reason = f"download failed: {_short(exc)}"
    else:
        reason = None if path.exists() else "download produced no file"
    if reason is not None:
        raise _missing_svhn(path, split, reason)  # outside the except block: no chained traceback
    return path, remedy


def _synthetic_file(split: str, root: Path) -> tuple[Path, str]:
    """The synthetic split's .mat (generated if missing) and what to do when it is damaged."""
    if split not in SYNTHETIC_FILES:
        raise DatasetError(
            f"the synthetic dataset has no {split!r} split; choose one of {tuple(SYNTHETIC_FILES)}"
        )
    folder = ensure_synthetic_svhn(root)  # generates both with the default sizes unless current files exist
    remedy = f"regenerate the synthetic data with `python synthetic_svhn.py --root {root}` (sizes and seed as needed)"
    return folder / SYNTHETIC_FILES[split], remedy


def _held_split(dataset: str, split: str, root: str | Path | None, download: bool) -> _Split:
    if dataset not in config.DATASETS:
        raise config.ConfigError(f"unknown dataset {dataset!r}; choose one of {config.DATASETS}")
    if split not in config.SPLITS:
        raise config.ConfigError(f"unknown split {split!r}; choose one of {config.SPLITS}")
    root = Path(config.DATA_DIR if root is None else root)
    path, remedy = _svhn_file(split, root, download) if dataset == "svhn" else _synthetic_file(split, root)
    return _load_mat_cached(path, remedy)


def load_split(
    dataset: str, split: str, root: str | Path | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..9).

    SVHN is read from ``<root or DATA_DIR>/raw/<split>_32x32.mat`` (downloaded if missing and
    ``download``); synthetic SVHN from ``<root or DATA_DIR>/synthetic/``, generated with the
    default sizes if missing or made by an older generator (files of any size written by
    ``make_synthetic_svhn`` are used as they are). The first read saves ``<file>.pt`` beside
    the .mat with a checksum of its tensors; it is reused while the .mat's size, mtime, ctime,
    inode and a sample of its bytes are unchanged, and a cache that fails its checks is rebuilt
    from the .mat with a ``CacheWarning``. Returned tensors are the caller's own (cloned from the
    in-process cache, which costs about 50 ms for SVHN train).
    """
    held = _held_split(dataset, split, root, download)
    return held.images.clone(), held.labels.clone()


def data_fingerprint(dataset: str, split: str, root: str | Path | None = None, download: bool = True) -> str:
    """The identity of the split ``load_split`` returns: ``<N>-<32 hex digits of a SHA-256 of its images
    and labels>``. Computed once when the tensor cache is built and kept in it; later calls in a process
    cost a stat and a 1 MiB read. Regenerated or replaced data gets another fingerprint."""
    return _held_split(dataset, split, root, download).fingerprint


# ----------------------------------------------------------------------------- statistics and splits


def compute_channel_stats(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 images (N, 3, H, W), in [0, 1] units.

    Sums are accumulated exactly in int64 over chunks, so memory stays small and the
    result does not depend on the chunking.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    total = torch.zeros(images.shape[1], dtype=torch.int64)
    total_sq = torch.zeros(images.shape[1], dtype=torch.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.int64)  # (b, C, H, W)
        total += block.sum(dim=(0, 2, 3))
        total_sq += (block * block).sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total.double() / count
    var = (total_sq.double() / count - mean * mean).clamp_min(0)
    mean, std = mean / 255, var.sqrt() / 255
    return tuple(mean.tolist()), tuple(std.tolist())


def _as_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)


def _grouped_by_class(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices shuffled, then grouped by class (stable), and each index's rank within its class."""
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[labels[order]]
    return order, rank


def train_val_split(
    labels: torch.Tensor | np.ndarray | Sequence[int], val_fraction: float = 0.1, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split into sorted (train_idx, val_idx): each class gives round(count * val_fraction).

    Uses its own generator, so the split depends on ``seed`` only.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    labels = _as_labels(labels)
    order, rank = _grouped_by_class(labels, torch.Generator().manual_seed(seed))
    counts = torch.bincount(labels)
    n_val = torch.round(counts.double() * val_fraction).long()
    is_val = rank < n_val[labels[order]]
    return order[~is_val].sort().values, order[is_val].sort().values


def stratified_subset(labels: torch.Tensor | np.ndarray | Sequence[int], n: int, seed: int) -> torch.Tensor:
    """Sorted indices of n samples whose class shares match ``labels`` (largest-remainder quotas)."""
    labels = _as_labels(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f"subset size must lie in 1..{len(labels)}, got {n}")
    counts = torch.bincount(labels).double()
    exact = counts * n / len(labels)
    quota = exact.floor().long()
    remainder_order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[remainder_order[: n - int(quota.sum())]] += 1
    order, rank = _grouped_by_class(labels, torch.Generator().manual_seed(seed))
    return order[rank < quota[labels[order]]].sort().values


def split_indices(
    labels: torch.Tensor, val_fraction: float, seed: int, n_train: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx) into a train split: a stratified subset of n_train images first (when
    n_train is given and smaller than the split), then the stratified validation split out of it."""
    pool = torch.arange(len(labels))
    if n_train is not None and n_train < len(labels):
        pool = stratified_subset(labels, n_train, seed)
    train, val = train_val_split(labels[pool], val_fraction, seed)
    return pool[train], pool[val]


# ----------------------------------------------------------------------------- on-device batches


def _derived_seed(seed: int, stream: int) -> int:
    """A seed for an independent stream derived from (seed, stream)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0])


class DeviceLoader:
    """Batches from a split held on ``device`` as uint8; yields (x float32 (B, 3, H, W), y int64 (B,)).

    Each epoch draws one permutation from ``self.generator``; each batch is
    ``augment(batch_uint8, generator=self.aug_generator)`` (float in [0, 1] units, e.g. a
    ``BatchAugment`` with the same mean and std; a new tensor, normalized in place) or, without
    augmentation, x / 255; then always ``normalize_batch`` with ``mean``, ``std``: the loader is
    the one place where batches are normalized.
    ``state_dict`` taken between epochs lets a resumed run reproduce the following epochs exactly.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        augment: Callable[..., torch.Tensor] | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 images (N, C, H, W) and N labels, got {images.dtype} "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()  # (N, C, H, W) uint8
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        self.batch_size = batch_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = torch.Generator(device=self.device)
        self.aug_generator = torch.Generator(device=self.device)
        self.reseed(seed)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Drawn here, not lazily, so the generator state right after iter() is well defined.
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator, device=self.device)
        else:
            order = torch.arange(self.num_samples, device=self.device)
        return self._batches(order)

    def _batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]  # (B, C, H, W) uint8
            x = to_unit_float(x) if self.augment is None else self.augment(x, generator=self.aug_generator)
            yield normalize_batch(x, self.mean, self.std, inplace=True).contiguous(), self.labels[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "aug_generator": self.aug_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.aug_generator.set_state(state["aug_generator"])

    def reseed(self, seed: int) -> None:
        """Both generators from ``seed`` (batch order: stream 0, augmentation: stream 1), as at construction."""
        self.generator.manual_seed(_derived_seed(seed, 0))
        self.aug_generator.manual_seed(_derived_seed(seed, 1))


# ----------------------------------------------------------------------------- a run's data

# Subsets and the validation split use a fixed seed, so runs with different seeds differ only in
# initialisation, batch order and augmentation draws, and every run of a dataset is tested on the
# same images.
SPLIT_SEED = 0


@dataclass
class RunData:
    """Train / validation / test tensors of one dataset configuration (uint8 on the CPU)."""

    train_x: torch.Tensor  # (N_train, 3, 32, 32) uint8
    train_y: torch.Tensor  # (N_train,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, float, float]  # channel statistics of train_x, in [0, 1] units
    std: tuple[float, float, float]
    # Corrupted test copies (kind, severity) -> uint8 (N, 3, 32, 32): made once per process, reused by every run.
    corrupted: dict = field(default_factory=dict)


def split_data(
    dataset: str,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    val_fraction: float = 0.1,
    seed: int = SPLIT_SEED,
    root: str | Path | None = None,
    missing_class: str = "error",
) -> RunData:
    """Load a dataset and split it: a stratified subset of ``n_train`` train images (all when None),
    a stratified validation share out of it, and a stratified subset of ``n_test`` test images.

    A part without a single image of some digit is a DatasetError (``missing_class="error"``) or a
    warning with the per-class counts (``"warn"``, for data a user brings)."""
    images, labels = load_split(dataset, "train", root)
    train_idx, val_idx = split_indices(labels, val_fraction, seed, n_train)
    test_x, test_y = load_split(dataset, "test", root)
    if n_test is not None and n_test < len(test_y):
        keep = stratified_subset(test_y, n_test, seed)
        test_x, test_y = test_x[keep], test_y[keep]
    for part, part_labels in (("train", labels[train_idx]), ("validation", labels[val_idx]), ("test", test_y)):
        problem = class_counts_problem(part_labels, f"the {part} part of {dataset}")
        if problem is not None and missing_class == "error":
            raise DatasetError(f"{problem}: use data with every digit in each split")
        if problem is not None:
            warnings.warn(problem, stacklevel=2)
    mean, std = compute_channel_stats(images[train_idx])
    return RunData(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
                   test_x, test_y, tuple(mean), tuple(std))


_RUN_DATA: dict[tuple, RunData] = {}


def prepare_data(cfg: config.TrainConfig) -> RunData:
    """The split a configuration asks for (``split_data`` with SPLIT_SEED), cached per process."""
    key = (cfg.dataset, cfg.n_train, cfg.n_test, cfg.val_fraction, str(config.DATA_DIR))
    if key not in _RUN_DATA:
        _RUN_DATA[key] = split_data(cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test,
                                    val_fraction=cfg.val_fraction)
    return _RUN_DATA[key]


# ----------------------------------------------------------------------------- per-sample torch path


class TensorImageDataset(Dataset):
    """uint8 images (N, 3, H, W) handed to ``transform`` one at a time as PIL images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())  # (H, W, 3) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])


def per_sample_loaders(
    data: RunData,
    train_transform: Callable,
    eval_transform: Callable,
    *,
    batch_size: int = 384,
    eval_batch_size: int | None = None,
    num_workers: int = 2,
    seed: int = 42,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) DataLoaders over per-sample transforms, built from a run's split tensors.

    ``seed`` drives the train order and the workers' seeds (hence their augmentation draws)."""
    common = dict(num_workers=num_workers, persistent_workers=num_workers > 0,
                  pin_memory=torch.cuda.is_available())
    eval_common = dict(common, batch_size=eval_batch_size or batch_size, shuffle=False)
    train = DataLoader(TensorImageDataset(data.train_x, data.train_y, train_transform), batch_size=batch_size,
                       shuffle=True, generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(TensorImageDataset(data.val_x, data.val_y, eval_transform), **eval_common)
    test = DataLoader(TensorImageDataset(data.test_x, data.test_y, eval_transform), **eval_common)
    return train, val, test


def get_dataloaders_with_custom_train_transform(
    train_transform: Callable,
    eval_transform: Callable,
    dataset: str = "svhn",
    *,
    batch_size: int = 384,
    val_fraction: float = 0.1,
    seed: int = 42,
    num_workers: int = 2,
    root: str | Path | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) DataLoaders over per-sample transforms, as in the original study.

    The split is ``split_data`` with ``seed``; shuffling and the workers' seeds also come from ``seed``.
    """
    data = split_data(dataset, n_train=n_train, n_test=n_test, val_fraction=val_fraction, seed=seed, root=root,
                      missing_class="warn")
    return per_sample_loaders(data, train_transform, eval_transform, batch_size=batch_size,
                              num_workers=num_workers, seed=seed)
