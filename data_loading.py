"""SVHN and synthetic SVHN on disk and in memory: reading, caching, splitting, batching.

Images travel as uint8 tensors (N, 3, 32, 32) and labels as int64 (N,) in 0..9.
Two ways to batch them:

- ``DeviceLoader``: the whole split resident on the training device; each epoch one
  permutation from the loader's own ``torch.Generator``; normalization (or a batched
  augmentation) on whole batches. No per-sample Python.
- ``get_dataloaders_with_custom_train_transform``: torch DataLoaders handing PIL images to
  per-sample torchvision transforms, as the original study did.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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
from synthetic_svhn import SUBDIR as SYNTHETIC_SUBDIR
from synthetic_svhn import ensure_synthetic_svhn, make_synthetic_svhn

__all__ = [
    "DatasetError",
    "DeviceLoader",
    "SVHN_FILES",
    "clear_cache",
    "compute_channel_stats",
    "get_dataloaders_with_custom_train_transform",
    "load_split",
    "make_synthetic_svhn",
    "read_svhn_mat",
    "set_seed",
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
CACHE_VERSION = 1


class DatasetError(ValueError):
    """A data file is missing, unreadable or not in SVHN's layout; the message says what to do."""


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- reading .mat files


def _invalid(path: Path, problem: str) -> DatasetError:
    return DatasetError(
        f"{path} is not an SVHN .mat file: {problem}. Delete it and download it again "
        "(or regenerate it, for the synthetic data)."
    )


def read_svhn_mat(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and validate one SVHN-format .mat: images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..9."""
    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, OSError...) on bad bytes
        raise _invalid(path, f"cannot be read ({type(exc).__name__}: {exc}); it may be truncated") from exc
    if "X" not in mat or "y" not in mat:
        raise _invalid(path, f"expected variables X and y, found {sorted(k for k in mat if k[0] != '_')}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise _invalid(path, f"X must be uint8 of shape (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1)
    if y.size != x.shape[3]:
        raise _invalid(path, f"y holds {y.size} labels for {x.shape[3]} images")
    valid = np.issubdtype(y.dtype, np.number) and (
        y.size == 0 or (np.all(y == np.round(y)) and y.min() >= 1 and y.max() <= 10)
    )
    if not valid:
        raise _invalid(path, "labels must be integers 1..10 (10 stands for the digit 0)")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    # MATLAB stores X as (H, W, C, N); torchvision's SVHN uses transpose(3, 2, 0, 1) -> (N, C, H, W).
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _fingerprint(path: Path) -> dict[str, int]:
    """Size, modification time and inode identify a version of the source without hashing it
    (an atomic rewrite gets a new inode even within one tick of the file system's clock)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _cache_path(path: Path) -> Path:
    return path.with_name(path.name + ".pt")


def _read_cache(cache: Path, fingerprint: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not cache.exists():
        return None
    try:
        blob = torch.load(cache, weights_only=True)
        images, labels = blob["images"], blob["labels"]
        ok = blob["version"] == CACHE_VERSION and blob["source"] == fingerprint
    except Exception:  # an unreadable cache only costs a re-read of the source
        return None
    if not ok or images.dtype != torch.uint8 or labels.dtype != torch.int64 or len(images) != len(labels):
        return None
    return images, labels


def _write_cache(cache: Path, images: torch.Tensor, labels: torch.Tensor, fingerprint: dict) -> None:
    blob = {"version": CACHE_VERSION, "source": fingerprint, "images": images, "labels": labels}
    try:
        atomic_torch_save(blob, cache)
    except OSError:  # a read-only data folder still loads, just without the speed-up next time
        pass


# Tensors already loaded in this process: resolved path -> (fingerprint, images, labels).
_MEMORY: dict[Path, tuple[dict[str, int], torch.Tensor, torch.Tensor]] = {}


def clear_cache() -> None:
    """Forget the splits held in memory (the on-disk .pt caches stay)."""
    _MEMORY.clear()


def _load_mat_cached(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The .mat's tensors via the in-process cache, then the .pt cache, then the .mat itself.

    Returns clones: callers may edit them in place without corrupting the cache (a clone of
    SVHN train, 225 MB, takes a fraction of a second).
    """
    key = path.resolve()
    fingerprint = _fingerprint(path)
    held = _MEMORY.get(key)
    if held is None or held[0] != fingerprint:
        cache = _cache_path(path)
        loaded = _read_cache(cache, fingerprint)
        if loaded is None:
            loaded = read_svhn_mat(path)
            _write_cache(cache, *loaded, fingerprint)
        held = (fingerprint, *loaded)
        _MEMORY[key] = held
    return held[1].clone(), held[2].clone()


def _missing_svhn(path: Path, split: str, reason: str) -> DatasetError:
    url, _, md5 = SVHN_FILES[split]
    return DatasetError(
        f"SVHN {split} split not found: expected {path} ({reason}). Download {url} (md5 {md5}) "
        f"into {path.parent}, or call load_split('svhn', {split!r}, download=True) with internet "
        "access; for offline work use dataset 'synthetic'."
    )


def _svhn_file(split: str, root: Path, download: bool) -> Path:
    url, filename, md5 = SVHN_FILES[split]
    folder = root / RAW_SUBDIR
    path = folder / filename
    if path.exists():
        return path
    if not download:
        raise _missing_svhn(path, split, "download=False")
    try:
        download_url(url, str(folder), filename=filename, md5=md5)
    except Exception as exc:  # URLError, HTTPError, RuntimeError on a bad md5, OSError...
        raise _missing_svhn(path, split, f"download failed: {type(exc).__name__}: {exc}") from exc
    if not path.exists():
        raise _missing_svhn(path, split, "download produced no file")
    return path


def _synthetic_file(split: str, root: Path) -> Path:
    if split not in SYNTHETIC_FILES:
        raise DatasetError(
            f"the synthetic dataset has no {split!r} split; choose one of {tuple(SYNTHETIC_FILES)}"
        )
    ensure_synthetic_svhn(root)  # generates them with the default sizes unless current files exist
    return root / SYNTHETIC_SUBDIR / SYNTHETIC_FILES[split]


def load_split(
    dataset: str, split: str, root: str | Path | None = None, download: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (images uint8 (N, 3, 32, 32), labels int64 (N,) in 0..9).

    SVHN is read from ``<root or DATA_DIR>/raw/<split>_32x32.mat`` (downloaded if missing and
    ``download``); synthetic SVHN from ``<root or DATA_DIR>/synthetic/``, generated with the
    default sizes if missing or made by an older generator (files of any size written by
    ``make_synthetic_svhn`` are used as they are). The first read saves ``<file>.pt`` beside
    the .mat, reused while the .mat's size, mtime and inode are unchanged. Returned tensors are
    the caller's own (cloned from the in-process cache).
    """
    if dataset not in config.DATASETS:
        raise config.ConfigError(f"unknown dataset {dataset!r}; choose one of {config.DATASETS}")
    if split not in config.SPLITS:
        raise config.ConfigError(f"unknown split {split!r}; choose one of {config.SPLITS}")
    root = Path(config.DATA_DIR if root is None else root)
    path = _svhn_file(split, root, download) if dataset == "svhn" else _synthetic_file(split, root)
    return _load_mat_cached(path)


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
        self.generator = torch.Generator(device=self.device).manual_seed(_derived_seed(seed, 0))
        self.aug_generator = torch.Generator(device=self.device).manual_seed(_derived_seed(seed, 1))

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


# ----------------------------------------------------------------------------- per-sample torch path


class TensorImageDataset(Dataset):
    """Samples ``indices`` of uint8 images (N, 3, H, W), handed to ``transform`` as PIL images."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, transform: Callable | None
    ) -> None:
        # The full tensors are kept and indexed lazily, so no copy of the split is made.
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        image = Image.fromarray(self.images[j].permute(1, 2, 0).numpy())  # (H, W, 3) uint8
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[j])


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

    The stratified validation split (``split_indices``) uses ``eval_transform``; ``n_train``
    first subsamples the train split (stratified), ``n_test`` the test split. Shuffling (and the
    workers' seeds) come from a generator seeded with ``seed``.
    """
    images, labels = load_split(dataset, "train", root)
    test_images, test_labels = load_split(dataset, "test", root)
    train_idx, val_idx = split_indices(labels, val_fraction, seed, n_train)
    test_idx = torch.arange(len(test_labels))
    if n_test is not None and n_test < len(test_labels):
        test_idx = stratified_subset(test_labels, n_test, seed)
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    train = DataLoader(
        TensorImageDataset(images, labels, train_idx, train_transform),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )
    val = DataLoader(TensorImageDataset(images, labels, val_idx, eval_transform), shuffle=False, **common)
    test = DataLoader(
        TensorImageDataset(test_images, test_labels, test_idx, eval_transform), shuffle=False, **common
    )
    return train, val, test
