"""Loops, metrics and the distillation loss, checked against scikit-learn, torch's own functions and
re-runs of the same training; tiny models and data so the file runs in seconds on a CPU."""

import copy
import csv
import dataclasses
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from torch import nn

import config
import training
from augmentations import BatchAugment
from data_loading import DeviceLoader
from model import SimpleCNN
from training import (
    DivergenceError,
    build_optimizer,
    build_scheduler,
    compute_metrics,
    eval_epoch,
    evaluate,
    fit,
    kd_loss,
    predict,
    train_epoch,
)

LABELS = list(range(10))
TIMING_KEYS = {"seconds", "train_seconds", "train_images_per_s"}


# --- helpers ---------------------------------------------------------------------------------


class TinyLoader:
    """In-memory batches with a shuffle generator and state_dict, like the project's DeviceLoader."""

    def __init__(self, x, y, batch_size, seed=0, shuffle=True):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def learnable_data(n=96, seed=0, noise=0.5):
    """Each class is a fixed random image template plus noise: (n, 3, 32, 32) float, (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.arange(n) % 10
    x = templates[y] + noise * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def tiny_net(seed=0):
    """A small conv net with BN (buffers) and dropout (draws from the global RNG)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10),
    )


def tiny_cfg(**overrides):
    fields = dict(epochs=3, batch_size=16, lr=1e-2, optimizer="adam", scheduler="none")
    return config.TrainConfig(**{**fields, **overrides})


def loaders(n=64, batch_size=16, seed=0):
    x, y = learnable_data(n, seed=seed)
    xv, yv = learnable_data(32, seed=seed)
    return TinyLoader(x, y, batch_size, seed=seed), TinyLoader(xv, yv, 32, shuffle=False)


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


class Crash(Exception):
    pass


def crash_after_epoch(last):
    """An on_epoch_end that raises Crash after epoch ``last``, as a killed run stops."""

    def stop(epoch, record):
        if epoch == last:
            raise Crash

    return stop


# --- compute_metrics vs scikit-learn -------------------------------------------------------------


def sklearn_metrics(y_true, y_pred):
    ref = {"accuracy": accuracy_score(y_true, y_pred)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=LABELS, average=average, zero_division=0
        )
        ref |= {f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=None, zero_division=0)
    ref |= {"precision_per_class": p, "recall_per_class": r, "f1_per_class": f, "support": s}
    ref["confusion_matrix"] = sk_confusion_matrix(y_true, y_pred, labels=LABELS)
    return ref


def assert_matches_sklearn(y_true, y_pred, ours):
    ref = sklearn_metrics(np.asarray(y_true), np.asarray(y_pred))
    assert set(ours) == set(ref)
    for key, expected in ref.items():
        np.testing.assert_allclose(np.asarray(ours[key], dtype=float), np.asarray(expected, dtype=float),
                                   rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("seed", range(5))
def test_compute_metrics_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    # Skewed class shares, so weighted and macro averages differ.
    y_true = rng.choice(10, size=n, p=np.arange(1, 11) / 55)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 10, size=n))
    ours = compute_metrics(torch.from_numpy(y_true) if seed % 2 else y_true, y_pred)
    assert_matches_sklearn(y_true, y_pred, ours)


EDGE_CASES = {
    "class never predicted": ([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 4, 4, 4, 5, 6, 7, 8, 9]),
    "class absent from y_true": ([0, 0, 1, 1, 2, 2], [0, 9, 1, 1, 2, 0]),
    "all correct": (list(range(10)) * 3, list(range(10)) * 3),
    "single class, all correct": ([4] * 7, [4] * 7),
    "single class, all wrong": ([4] * 7, [2] * 7),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_compute_metrics_matches_sklearn_on_edge_cases(case):
    y_true, y_pred = EDGE_CASES[case]
    assert_matches_sklearn(y_true, y_pred, compute_metrics(y_true, y_pred))


def test_compute_metrics_is_json_ready_plain_python():
    metrics = compute_metrics(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 2, 2, 2]))
    json.dumps(metrics)
    assert type(metrics["accuracy"]) is float
    assert all(type(n) is int for n in metrics["support"])
    assert all(type(n) is int for row in metrics["confusion_matrix"] for n in row)


def test_compute_metrics_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="0..9"):
        compute_metrics([0, 1, 10], [0, 1, 2])
    with pytest.raises(ValueError):
        compute_metrics([0, 1], [0, 1, 2])


# --- kd_loss ------------------------------------------------------------------------------------


def reference_kd(s, t, y, T, alpha, label_smoothing=0.0):
    # KL(p_t || p_s) summed over classes, averaged over the batch, from the probabilities directly.
    p_t = torch.softmax(t / T, dim=1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, dim=1))).sum(dim=1).mean()
    return alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(s, y, label_smoothing=label_smoothing)


@pytest.mark.parametrize("T,alpha", [(4.0, 0.7), (1.0, 0.5), (2.5, 0.3)])
def test_kd_loss_matches_direct_formula(T, alpha):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    ours = kd_loss(s.float(), t, y, T=T, alpha=alpha)
    torch.testing.assert_close(ours, reference_kd(s, t.double(), y, T, alpha).float())


def test_kd_loss_alpha_edges_and_temperature_scaling():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    # alpha = 0: plain cross-entropy (with its label smoothing).
    torch.testing.assert_close(kd_loss(s, t, y, alpha=0.0, label_smoothing=0.1),
                               F.cross_entropy(s, y, label_smoothing=0.1))
    # alpha = 1: T^2 times torch's batchmean KL of the softened distributions.
    for T in (1.0, 2.0, 4.0):
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean")
        torch.testing.assert_close(kd_loss(s, t, y, T=T, alpha=1.0), T**2 * kl)
    # The same logits for student and teacher: no distillation term left.
    torch.testing.assert_close(kd_loss(s, s, y, alpha=1.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_kd_loss_gradient_reaches_only_the_student():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    kd_loss(s, t.detach(), torch.tensor([0, 1, 2, 3])).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# --- optimizers and schedules -----------------------------------------------------------------


def test_all_optimizers_build_with_the_config_settings():
    net = tiny_net()
    adam = build_optimizer(net, tiny_cfg(optimizer="adam", lr=3e-3, weight_decay=1e-4))
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["lr"] == 3e-3 and adam.defaults["weight_decay"] == 1e-4
    adamw = build_optimizer(net, tiny_cfg(optimizer="adamw", weight_decay=5e-2))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 5e-2
    sgd_cfg = tiny_cfg(optimizer="sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-4)
    sgd = build_optimizer(net, sgd_cfg)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.8
    assert sgd.defaults["weight_decay"] == 5e-4
    n_params = len(list(net.parameters()))
    assert all(len(opt.param_groups[0]["params"]) == n_params for opt in (adam, adamw, sgd))
    with pytest.raises(config.ConfigError, match="momentum"):
        build_optimizer(net, tiny_cfg(optimizer="sgd", momentum=0.0, nesterov=True))


@pytest.mark.parametrize("name", ["onecycle", "cosine"])
def test_schedulers_step_the_lr_every_batch(name):
    cfg = tiny_cfg(scheduler=name, epochs=2, lr=0.1, optimizer="sgd")
    train_loader, _ = loaders(n=80)  # 5 batches
    net = tiny_net()
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))

    # The same torch scheduler class on a dummy optimizer, stepped by hand once per batch.
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    if name == "onecycle":
        ref = torch.optim.lr_scheduler.OneCycleLR(dummy, max_lr=0.1, total_steps=10)
    else:
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, T_max=10)
    start_lr = optimizer.param_groups[0]["lr"]
    assert start_lr == pytest.approx(ref.get_last_lr()[0])
    for _ in range(len(train_loader)):
        dummy.step()  # no gradients: moves nothing, keeps torch's call order
        ref.step()
    train_epoch(net, train_loader, optimizer, "cpu", scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ref.get_last_lr()[0])
    assert optimizer.param_groups[0]["lr"] != pytest.approx(start_lr)


def test_no_scheduler_for_none():
    net = tiny_net()
    assert build_scheduler(build_optimizer(net, tiny_cfg()), tiny_cfg(), 5) is None


def test_fit_records_the_scheduled_lr_of_each_epoch():
    cfg = tiny_cfg(scheduler="cosine", epochs=3, lr=0.05)
    train_loader, val_loader = loaders(n=48)  # 3 batches an epoch, 9 steps in all
    result = fit(tiny_net(), train_loader, val_loader, cfg, "cpu")
    expected = [0.05 * (1 + math.cos(math.pi * step / 9)) / 2 for step in (0, 3, 6)]
    assert [r["lr"] for r in result["history"]] == pytest.approx(expected)


# --- loops ------------------------------------------------------------------------------------


def test_fit_learns_a_learnable_problem_with_simplecnn():
    torch.manual_seed(0)
    net = SimpleCNN()
    train_loader, val_loader = loaders(n=96, batch_size=32)
    result = fit(net, train_loader, val_loader, tiny_cfg(epochs=5, lr=3e-3), "cpu")
    history = result["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert max(r["val_accuracy"] for r in history) > 0.3  # chance is 0.1
    assert result["best_val_f1_macro"] == max(r["val_f1_macro"] for r in history)
    assert result["seconds_per_epoch"] == [r["seconds"] for r in history]
    assert all(r["train_images_per_s"] > 0 for r in history)


def test_train_epoch_reports_images_and_summed_statistics():
    x, y = learnable_data(40)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]  # 16, 16, 8 images
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # train-mode BN uses batch statistics, as inside the loop
        logits = [net.train()(bx) for bx, _ in batches]
    logits, labels = torch.cat(logits), y[:40]  # (40, 10), (40,)
    expected_loss = F.cross_entropy(logits, labels, reduction="sum")
    expected_correct = (logits.argmax(1) == labels).sum()

    class Frozen(torch.optim.SGD):  # never moves the weights, so every batch's loss is known in advance
        def step(self, closure=None):
            return None

    stats = train_epoch(net, batches, Frozen(net.parameters(), lr=0.1), "cpu")
    assert stats["images"] == 40 and stats["seconds"] > 0
    assert stats["loss"] == pytest.approx(expected_loss.item() / 40, rel=1e-6)
    assert stats["accuracy"] == pytest.approx(expected_correct.item() / 40)


def test_progress_bar_shows_the_epoch_and_the_running_loss(capsys):
    x, y = learnable_data(4)
    batches = [(x, y)] * training.CHECK_EVERY  # reaches the periodic check that updates the bar
    net = tiny_net()
    train_epoch(net, batches, build_optimizer(net, tiny_cfg()), "cpu", epoch=3, progress=True)
    err = capsys.readouterr().err
    assert "epoch 3" in err and "loss=" in err
    train_epoch(net, batches[:2], build_optimizer(net, tiny_cfg()), "cpu", progress=False)
    assert capsys.readouterr().err == ""


def test_eval_epoch_and_evaluate_match_direct_computation():
    x, y = learnable_data(50)
    loader = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 50, 20)]
    net = tiny_net()
    net.train()
    with torch.no_grad():
        logits = net.eval()(x)
    net.train()
    result = eval_epoch(net, loader, "cpu", label_smoothing=0.1)
    assert net.training  # the caller's mode is restored
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)
    assert torch.equal(result["y_true"], y) and torch.equal(result["y_pred"], logits.argmax(1))
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())

    y_true, y_pred, out = predict(net, loader, "cpu")
    torch.testing.assert_close(out, logits)
    metrics = evaluate(net, loader, "cpu")
    assert torch.equal(metrics.pop("predictions"), y_pred) and torch.equal(metrics.pop("targets"), y_true)
    assert metrics.pop("loss") == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert metrics == compute_metrics(y_true, y_pred)


def test_fit_restores_the_weights_of_the_best_validation_epoch(monkeypatch):
    scripted_f1 = iter([0.2, 0.9, 0.5])
    real = training.compute_metrics

    def scripted(y_true, y_pred, num_classes=10):
        return {**real(y_true, y_pred, num_classes), "f1_macro": next(scripted_f1)}

    monkeypatch.setattr(training, "compute_metrics", scripted)
    net = tiny_net()
    snapshots = {}
    train_loader, val_loader = loaders()

    def snapshot(epoch, record):
        snapshots[epoch] = copy.deepcopy(net.state_dict())

    result = fit(net, train_loader, val_loader, tiny_cfg(epochs=3), "cpu", on_epoch_end=snapshot)
    assert result["best_epoch"] == 2 and result["best_val_f1_macro"] == 0.9
    assert [r["val_f1_macro"] for r in result["history"]] == [0.2, 0.9, 0.5]
    final = net.state_dict()
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)


# --- divergence -------------------------------------------------------------------------------


class NaNLoader:
    """Tiny batches; the batch at ``nan_step`` (1-based) of iteration ``nan_epoch`` holds a NaN."""

    def __init__(self, n_batches, nan_step, nan_epoch=1):
        self.n_batches, self.nan_step, self.nan_epoch = n_batches, nan_step, nan_epoch
        self.iterations, self.consumed = 0, 0
        self.x, self.y = learnable_data(4)

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        self.iterations += 1
        for step in range(1, self.n_batches + 1):
            self.consumed += 1
            x = self.x.clone()
            if self.iterations == self.nan_epoch and step == self.nan_step:
                x[0, 0, 0, 0] = float("nan")
            yield x, self.y


def test_injected_nan_raises_divergence_naming_epoch_and_step():
    net = tiny_net()
    with pytest.raises(DivergenceError) as info:
        train_epoch(net, NaNLoader(5, nan_step=3), build_optimizer(net, tiny_cfg()), "cpu", epoch=4)
    err = info.value
    assert (err.epoch, err.step) == (4, 3) and math.isnan(err.value)
    assert "epoch 4" in str(err) and "step 3" in str(err) and "lower learning rate" in str(err)
    # It survives pickling (worker processes hand errors back that way).
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.epoch, clone.step, str(clone)) == (4, 3, str(err))


def test_divergence_stops_at_the_next_periodic_check():
    net = tiny_net()
    loader = NaNLoader(3 * training.CHECK_EVERY, nan_step=7)
    with pytest.raises(DivergenceError) as info:
        train_epoch(net, loader, build_optimizer(net, tiny_cfg()), "cpu")
    assert info.value.step == 7
    assert loader.consumed == training.CHECK_EVERY


def test_fit_names_the_epoch_where_the_loss_diverged():
    val_x, val_y = learnable_data(8)
    with pytest.raises(DivergenceError) as info:
        fit(tiny_net(), NaNLoader(4, nan_step=2, nan_epoch=2), [(val_x, val_y)], tiny_cfg(), "cpu")
    assert (info.value.epoch, info.value.step) == (2, 2)


def test_huge_learning_rate_diverges():
    with pytest.raises(DivergenceError, match=r"epoch \d+ at step \d+"):
        fit(tiny_net(), *loaders(), tiny_cfg(optimizer="sgd", lr=1e6, epochs=5), "cpu")


# --- distillation -----------------------------------------------------------------------------


def test_fit_distils_from_a_frozen_teacher():
    teacher = tiny_net(seed=3)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    student = tiny_net(seed=4)
    cfg = tiny_cfg(epochs=2, kd_alpha=0.7, kd_temperature=4.0)
    result = fit(student, *loaders(), cfg, "cpu", teacher=teacher)
    assert len(result["history"]) == 2 and all(math.isfinite(r["train_loss"]) for r in result["history"])
    assert not teacher.training  # frozen in eval mode: BN running stats untouched
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distillation_with_alpha_zero_is_plain_cross_entropy_training():
    # Without dropout the two runs see identical batches, so their losses must agree exactly.
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))

    batches = list(TinyLoader(*learnable_data(48), 16))
    plain_net, kd_net = net(), net()
    plain = train_epoch(plain_net, batches, build_optimizer(plain_net, tiny_cfg()), "cpu")
    kd = train_epoch(kd_net, batches, build_optimizer(kd_net, tiny_cfg()), "cpu",
                     teacher=tiny_net(seed=9), kd_alpha=0.0)
    assert kd["loss"] == plain["loss"]
    other_net = net()
    alpha_one = train_epoch(other_net, batches, build_optimizer(other_net, tiny_cfg()), "cpu",
                            teacher=tiny_net(seed=9), kd_alpha=1.0)
    assert alpha_one["loss"] != plain["loss"]


# --- CUDA paths -------------------------------------------------------------------------------


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: bf16 autocast and channels_last run only on GPU"
)
def test_cuda_runs_bf16_autocast_on_channels_last():
    torch.manual_seed(0)
    net = SimpleCNN()
    dtypes = []
    net.classifier.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    # CPU batches, as a torch DataLoader hands them: fit moves them to the device.
    train_loader, val_loader = loaders(n=96, batch_size=32)
    cfg = tiny_cfg(epochs=2, lr=3e-3)
    result = fit(net, train_loader, val_loader, cfg, "cuda", teacher=tiny_net(seed=1))
    assert torch.bfloat16 in dtypes
    conv = net.features[0].weight
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    assert all(math.isfinite(r["train_loss"]) for r in result["history"])
    y_true, y_pred, logits = predict(net, val_loader, "cuda")
    assert logits.dtype == torch.float32 and logits.shape == (32, 10)
    metrics = evaluate(net, val_loader, "cuda")
    assert metrics["f1_macro"] == compute_metrics(y_true, y_pred)["f1_macro"]


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: torch.compile is exercised on GPU only"
)
def test_cuda_compiled_training_keeps_plain_state_dict_keys(tmp_path):
    torch.manual_seed(0)
    net = SimpleCNN()
    cfg = dataclasses.replace(tiny_cfg(epochs=1), compile=True)
    fit(net, *loaders(n=64, batch_size=32), cfg, "cuda", checkpoint_path=tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(saved["model"]) == set(SimpleCNN().state_dict())


# --- autocast around the model only -------------------------------------------------------------


class RecordingLoader:
    """Passes a loader's batches through and keeps a copy of each x it yielded."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.batches.append(x.clone())
            yield x, y


def augmenting_loader():
    """Stage 5 (warps, blur, erasing) on every image: bf16 autocast around it changes its values."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (48,), generator=gen)
    augment = BatchAugment("stage5_occlusion", 1.0, config.SVHN_MEAN, config.SVHN_STD)
    return DeviceLoader(images, labels, 16, config.SVHN_MEAN, config.SVHN_STD, augment=augment, seed=3)


@pytest.mark.parametrize("loop", ["predict", "eval_epoch", "train_epoch"])
def test_autocast_wraps_the_model_only_so_batches_stay_float32(monkeypatch, loop):
    # CPU bf16 autocast stands in for CUDA's: the loops must run the model in it, never the loader.
    monkeypatch.setitem(training.AUTOCAST_DTYPES, "cpu", torch.bfloat16)
    net = SimpleCNN()
    out_dtypes = []
    net.classifier.register_forward_hook(lambda module, inputs, output: out_dtypes.append(output.dtype))
    loader = RecordingLoader(augmenting_loader())
    if loop == "predict":
        logits = predict(net, loader, "cpu")[2]
        assert logits.dtype == torch.float32
    elif loop == "eval_epoch":
        assert math.isfinite(eval_epoch(net, loader, "cpu")["loss"])
    else:
        train_epoch(net, loader, build_optimizer(net, tiny_cfg()), "cpu")
    assert set(out_dtypes) == {torch.bfloat16}  # the model did run under autocast
    direct = [x for x, _ in augmenting_loader()]  # the same batches, iterated outside any autocast
    assert len(loader.batches) == len(direct) == 3
    for seen, expected in zip(loader.batches, direct, strict=True):
        assert seen.dtype == torch.float32
        assert torch.equal(seen, expected)


def test_autocast_is_bf16_on_cuda_and_float32_on_mps_and_cpu():
    assert training.autocast_dtype("cuda") == torch.bfloat16
    assert training.autocast_dtype("mps") is None and training.autocast_dtype("cpu") is None


# --- torch.compile sees one shape ----------------------------------------------------------------


class AfterFirstBatch:
    """Calls ``hook()`` when the second batch is asked for, i.e. once the first step has run."""

    def __init__(self, loader, hook):
        self.loader, self.hook, self.calls = loader, hook, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 1 and self.calls == 0:
                self.calls += 1
                self.hook()
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile with a backend that counts compiled graphs and runs them eagerly."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_compiled_training_never_recompiles_after_its_first_step(counting_compile):
    # 72 training images in batches of 16: the last batch of every epoch holds 8; validation has 40
    # images in batches of 32 (another partial batch).
    x, y = learnable_data(72)
    xv, yv = learnable_data(40, seed=1)
    after_warmup = []
    train = AfterFirstBatch(TinyLoader(x, y, 16), lambda: after_warmup.append(counting_compile.frame_count))
    cfg = dataclasses.replace(tiny_cfg(epochs=3), compile=True)
    result = fit(tiny_net(), train, TinyLoader(xv, yv, 32, shuffle=False), cfg, "cpu", quiet=True)
    assert len(result["history"]) == 3
    assert after_warmup[0] >= 1  # the model was compiled in the first step
    assert counting_compile.frame_count == after_warmup[0]  # and never again


def test_drop_partial_trains_on_full_batches_only():
    x, y = learnable_data(40)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]  # 16, 16, 8 images
    net = tiny_net()
    stats = train_epoch(net, batches, build_optimizer(net, tiny_cfg()), "cpu", drop_partial=True)
    assert stats["images"] == 32
    assert train_epoch(net, batches, build_optimizer(net, tiny_cfg()), "cpu")["images"] == 40


def test_compiled_fit_schedules_only_the_steps_it_takes():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (72, 3, 32, 32), dtype=torch.uint8, generator=gen)
    loader = DeviceLoader(images, torch.arange(72) % 10, 16, config.SVHN_MEAN, config.SVHN_STD)
    assert training._steps_per_epoch(loader, drop_partial=True) == 4
    assert training._steps_per_epoch(loader, drop_partial=False) == len(loader) == 5


# --- devices: CUDA, MPS, CPU ---------------------------------------------------------------------


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert config.resolve_device("auto") == expected
    assert config.resolve_device("cpu") == "cpu"


def test_synchronize_waits_on_cuda_and_mps_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    training.synchronize("cpu")
    assert calls == []
    training.synchronize("mps")
    training.synchronize(torch.device("cuda", 1))
    assert calls == [("mps", None), ("cuda", torch.device("cuda", 1))]


def test_device_label_names_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU 80GB")
    assert training.device_label("cuda") == "Test GPU 80GB"
    assert training.device_label("mps") == "Apple MPS"
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        cpuinfo = ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    assert training.device_label("cpu") == (names[0] if names else training.device_label("cpu"))
    assert training.device_label("cpu")


# --- watching a run -----------------------------------------------------------------------------


def test_fit_prints_one_line_per_epoch_by_default(capsys):
    fit(tiny_net(), *loaders(), tiny_cfg(epochs=2), "cpu")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    for line in lines:
        assert "loss " in line and "val macro-F1 " in line and "img/s " in line and "ETA " in line
    assert lines[-1].endswith("ETA 0m00s")


@pytest.mark.parametrize("silence", [{"quiet": True}, {"progress": False}])
def test_quiet_fit_prints_nothing(capsys, silence):
    fit(tiny_net(), *loaders(), tiny_cfg(epochs=2), "cpu", **silence)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_epoch_line_formats_the_record():
    record = {"epoch": 3, "train_loss": 0.41234, "val_f1_macro": 0.87101, "train_images_per_s": 12345.6}
    assert (training.epoch_line(record, 15, 65.2)
            == "epoch 3/15  loss 0.4123  val macro-F1 0.8710  img/s 12,346  ETA 1m05s")
    assert training.epoch_line(record, 15, 3 * 3600 + 120).endswith("ETA 3h02m")


def read_csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_csv_matches(rows, history):
    assert len(rows) == len(history)
    for row, record in zip(rows, history, strict=True):
        assert set(row) == set(record)
        assert int(row["epoch"]) == record["epoch"]
        for key, value in record.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key


def test_metrics_csv_holds_one_row_per_epoch_matching_the_history(tmp_path):
    path = tmp_path / "logs" / "metrics.csv"
    result = fit(tiny_net(), *loaders(), tiny_cfg(epochs=3), "cpu", quiet=True, metrics_csv=path)
    assert_csv_matches(read_csv_rows(path), result["history"])


def test_metrics_csv_of_a_resumed_run_holds_every_epoch(tmp_path):
    path, ckpt = tmp_path / "metrics.csv", tmp_path / "run.ckpt"
    cfg = tiny_cfg(epochs=3)
    with pytest.raises(Crash):
        fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True, checkpoint_path=ckpt, metrics_csv=path,
            on_epoch_end=crash_after_epoch(2))
    assert len(read_csv_rows(path)) == 2
    result = fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True, checkpoint_path=ckpt, metrics_csv=path)
    assert_csv_matches(read_csv_rows(path), result["history"])


class FakeSummaryWriter:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_record_when_installed(monkeypatch, tmp_path):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.instances.clear()
    result = fit(tiny_net(), *loaders(), tiny_cfg(epochs=2), "cpu", quiet=True, tensorboard_dir=tmp_path / "tb")
    (writer,) = FakeSummaryWriter.instances
    assert writer.closed and writer.log_dir == str(tmp_path / "tb")
    expected = [(key, value, record["epoch"]) for record in result["history"]
                for key, value in record.items() if key != "epoch"]
    assert writer.scalars == expected


def test_tensorboard_is_skipped_silently_when_missing(monkeypatch, tmp_path, recwarn):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    result = fit(tiny_net(), *loaders(), tiny_cfg(epochs=1), "cpu", quiet=True, tensorboard_dir=tmp_path / "tb")
    assert len(result["history"]) == 1 and len(recwarn) == 0
    assert not (tmp_path / "tb").exists()


def test_a_tensorboard_missing_a_dependency_warns_once_and_the_run_finishes(monkeypatch, tmp_path):
    broken = tmp_path / "site" / "tensorboard"  # installed, but what it imports is not
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import protobuf_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(RuntimeWarning, match="protobuf_that_is_not_installed") as caught:
        result = fit(tiny_net(), *loaders(), tiny_cfg(epochs=2), "cpu", quiet=True, tensorboard_dir=tmp_path / "tb")
    assert len(result["history"]) == 2
    assert sum("TensorBoard" in str(w.message) for w in caught) == 1


class BrokenSummaryWriter(FakeSummaryWriter):
    """A writer that fails at one point: on start, at the second scalar, or when closed."""

    fail_at = "start"

    def __init__(self, log_dir):
        if self.fail_at == "start":
            raise TypeError("Descriptors cannot be created directly (protobuf)")
        super().__init__(log_dir)

    def add_scalar(self, *args):
        if self.fail_at == "scalar" and self.scalars:
            raise OSError(28, "No space left on device")
        super().add_scalar(*args)

    def close(self):
        if self.fail_at == "close":
            raise RuntimeError("event file vanished")
        super().close()


@pytest.mark.parametrize("fail_at", ["start", "scalar", "close"])
def test_a_failing_tensorboard_warns_once_and_the_run_finishes(monkeypatch, tmp_path, fail_at):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = type("Writer", (BrokenSummaryWriter,), {"fail_at": fail_at})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with pytest.warns(RuntimeWarning, match="TensorBoard logging off for this run") as caught:
        result = fit(tiny_net(), *loaders(), tiny_cfg(epochs=3), "cpu", quiet=True,
                     metrics_csv=tmp_path / "m.csv", tensorboard_dir=tmp_path / "tb")
    assert len(result["history"]) == 3 and (tmp_path / "m.csv").read_text().count("\n") == 4
    assert sum("TensorBoard" in str(w.message) for w in caught) == 1
