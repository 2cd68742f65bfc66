"""A training step on the accelerator path never makes the host wait: counted on the CPU.

Each test trains SimpleCNN with ``training.train_epoch`` (forward, loss, backward, the optimizer and
schedule ``fit`` builds, the on-device loss and accuracy sums) on batches of a ``DeviceLoader`` whose
``BatchAugment`` is forced onto the accelerator path (the one CUDA takes), under
``augment_ops.count_host_syncs``: it records every call that would make the host wait for an
accelerator (``.item()``, ``.tolist()``, ``bool()`` of a tensor, ``nonzero``, boolean-mask indexing ...)
and every tensor built from Python data (a blocking host-to-device copy on an accelerator).

What is attributed to the steps: an epoch has a few calls of its own (``train_epoch``'s one read of
the loss and accuracy sums at its end, the set-up of those sums), and the first epoch makes the
cached constants (channel statistics, sampling grids, policy tables), once per device. So after a
warm-up epoch, an epoch of SHORT steps and one of LONG steps are counted and their events compared:
anything done per step shows up (LONG - SHORT) times more often in the longer epoch; the epoch's own
calls cancel out. Both lengths stay below ``training.CHECK_EVERY``, the mid-epoch look at the sums
(a non-blocking copy on CUDA, a plain read on the CPU).

Nothing is filtered out. The optimizers of ``training.build_optimizer`` are torch's fused ones on
CPU and CUDA, whose step counters live on the parameters' device and are never read on the host, so
the counter sees no optimizer call. (torch's foreach and for-loop optimizers, used on MPS, keep the
step counter as a CPU scalar and call ``.item()`` on it every step: a read of host memory that never
waits for the device, which the counter would report. Were ``build_optimizer`` to pick them here, the
events would have to be filtered to tensors that live on the accelerator, the model's and loader's.)
"""

from collections import Counter

import pytest
import torch

import config
import training
from augment_ops import count_host_syncs
from augmentations import BatchAugment
from data_loading import DeviceLoader
from model import build_model

BATCHED_STAGES = [stage for stage in config.ALL_STAGES if stage != "none"]
BATCH = 8
SHORT, LONG = 1, 2  # steps of the two counted epochs
assert LONG < training.CHECK_EVERY


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images (LONG * BATCH, 3, 32, 32) and labels."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (LONG * BATCH, *config.IMAGE_SHAPE), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, config.NUM_CLASSES, (LONG * BATCH,), generator=gen)


def epoch_events(data, stage: str, steps: int, model, optimizer, scheduler, teacher=None) -> Counter:
    """The events ``count_host_syncs`` records during one training epoch of ``steps`` batches."""
    images, labels = data
    n = steps * BATCH
    augment = BatchAugment(stage, 0.5, config.SVHN_MEAN, config.SVHN_STD, accelerator_path=True)
    loader = DeviceLoader(images[:n], labels[:n], BATCH, config.SVHN_MEAN, config.SVHN_STD, device="cpu",
                          augment=augment, seed=steps)
    with count_host_syncs() as count:
        training.train_epoch(model, loader, optimizer, "cpu", scheduler=scheduler, teacher=teacher,
                             label_smoothing=0.1)
    return Counter(count.events)


def per_step_events(data, stage: str, cfg: config.TrainConfig, teacher=None) -> Counter:
    """Events per training step (those of a LONG-step epoch beyond a SHORT-step one), after a warm-up."""
    torch.manual_seed(0)
    model = build_model("simplecnn")
    training.prepare_model(model, "cpu")  # as fit does, before the optimizer is built
    optimizer = training.build_optimizer(model, cfg)
    scheduler = training.build_scheduler(optimizer, cfg, steps_per_epoch=SHORT + 2 * LONG)
    epoch_events(data, stage, SHORT, model, optimizer, scheduler, teacher)  # warm-up: cached constants
    short = epoch_events(data, stage, SHORT, model, optimizer, scheduler, teacher)
    long = epoch_events(data, stage, LONG, model, optimizer, scheduler, teacher)
    # Both ways: an event only in the short epoch would mean a count that does not grow with the steps.
    return (long - short) + (short - long)


@pytest.mark.parametrize("stage", BATCHED_STAGES)
def test_training_step_has_no_host_syncs(data, stage):
    extra = per_step_events(data, stage, config.preset_config("original", model="simplecnn"))
    assert not extra, f"{stage}: per-step host syncs or host-data tensors: {dict(extra)}"


@pytest.mark.parametrize(("optimizer", "scheduler"), [("adam", "none"), ("adamw", "onecycle"), ("sgd", "cosine")])
def test_every_optimizer_and_schedule_step_is_sync_free(data, optimizer, scheduler):
    cfg = config.preset_config("original", model="simplecnn", optimizer=optimizer, scheduler=scheduler,
                               momentum=0.9)
    extra = per_step_events(data, "stage5_occlusion", cfg)
    assert not extra, f"{optimizer} + {scheduler}: per-step host syncs or host-data tensors: {dict(extra)}"


def test_distillation_step_is_sync_free(data):
    torch.manual_seed(1)
    teacher = build_model("simplecnn")
    extra = per_step_events(data, "randaugment", config.preset_config("original", model="simplecnn"), teacher)
    assert not extra, f"distillation: per-step host syncs or host-data tensors: {dict(extra)}"

