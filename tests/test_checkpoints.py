"""Checkpoints: what fit saves after each epoch, how a run resumes from it, and what a damaged one does."""

import pytest
import torch

import checkpoints
import config
from augmentations import BatchAugment
from data_loading import DeviceLoader
from tests.test_training import Crash, crash_after_epoch, loaders, tiny_cfg, tiny_net, without_timing
from training import build_optimizer, fit

# --- resuming a run ------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["onecycle", "none"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, scheduler):
    cfg = tiny_cfg(epochs=3, scheduler=scheduler)

    net = tiny_net(seed=0)
    full = fit(net, *loaders(), cfg, "cpu")
    full_state = net.state_dict()

    def crash_after_first_epoch(epoch, record):
        if epoch == 1:
            raise Crash

    path = tmp_path / "run.pt"
    with pytest.raises(Crash):
        fit(tiny_net(seed=0), *loaders(), cfg, "cpu", checkpoint_path=path,
            on_epoch_end=crash_after_first_epoch)
    assert path.exists()

    # A fresh process: a differently initialised model, fresh loaders, another global RNG state.
    resumed_net = tiny_net(seed=7)
    resumed = fit(resumed_net, *loaders(), cfg, "cpu", checkpoint_path=path)
    assert resumed["resumed_from_epoch"] == 1
    assert without_timing(resumed["history"]) == without_timing(full["history"])
    assert resumed["best_epoch"] == full["best_epoch"]
    resumed_state = resumed_net.state_dict()
    assert all(torch.equal(resumed_state[k], full_state[k]) for k in full_state)


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    path = tmp_path / "run.pt"
    fit(tiny_net(), *loaders(), tiny_cfg(epochs=1), "cpu", checkpoint_path=path)
    with pytest.raises(config.ConfigError, match="lr"):
        fit(tiny_net(), *loaders(), tiny_cfg(epochs=1, lr=0.5), "cpu", checkpoint_path=path)


def test_finished_checkpoint_skips_training_and_restores_best_weights(tmp_path):
    path = tmp_path / "run.pt"
    cfg = tiny_cfg(epochs=2)
    net = tiny_net()
    first = fit(net, *loaders(), cfg, "cpu", checkpoint_path=path)
    again_net = tiny_net(seed=5)
    again = fit(again_net, *loaders(), cfg, "cpu", checkpoint_path=path)
    assert again["history"] == first["history"] and again["resumed_from_epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again_net.state_dict().values(),
                                                 strict=True))


def test_checkpoint_saves_and_restores_the_mps_generator(monkeypatch, tmp_path):
    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": saved_state.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": restored.append(state))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    net, cfg = tiny_net(), tiny_cfg()
    optimizer = build_optimizer(net, cfg)
    state = checkpoints.RunState(epoch=1, best_state=checkpoints.cpu_state(net), best_epoch=1, best_f1=0.5)
    path = checkpoints.save_checkpoint(tmp_path / "run.ckpt", cfg, net, optimizer, None, state, ([], []),
                                       torch.device("mps"))
    loaded = checkpoints.load_checkpoint(path, cfg, tiny_net(seed=1), build_optimizer(net, cfg), None, ([], []),
                                         device="mps")
    assert (loaded.epoch, loaded.best_epoch, loaded.best_f1) == (1, 1, 0.5)
    assert len(restored) == 1 and torch.equal(restored[0], saved_state)


# --- moving between devices ---------------------------------------------------------------------


def device_loaders():
    """DeviceLoaders with their own generators (batch order, augmentation draws), as runs build them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(48) % 10
    train = DeviceLoader(x, y, 16, config.SVHN_MEAN, config.SVHN_STD, augment=BatchAugment("stage1_basic", 0.5),
                         seed=3)
    return train, DeviceLoader(x[:16], y[:16], 16, config.SVHN_MEAN, config.SVHN_STD, shuffle=False)


def rewrite_as_written_on_cuda(path, record_device=True):
    """The checkpoint as a CUDA machine would have written it: generator states of CUDA's kind (seed and
    offset, 16 bytes, where a CPU generator's state is 5,056) and CUDA's global generator."""
    ckpt = torch.load(path, weights_only=True)
    philox = torch.arange(16, dtype=torch.uint8)
    ckpt["loader_states"] = {name: {key: philox.clone() for key in state}
                             for name, state in ckpt["loader_states"].items()}
    ckpt["rng"]["cuda"] = [philox.clone()]
    if record_device:
        ckpt["device"] = "cuda"
    else:  # a checkpoint of format 1, which did not record its device
        del ckpt["device"]
    torch.save(ckpt, path)
    return ckpt


def test_a_cuda_generator_state_cannot_be_restored_on_the_cpu():
    # What the device change below models: without re-seeding, resuming fails.
    train, _ = device_loaders()
    with pytest.raises(RuntimeError):
        train.load_state_dict({"generator": torch.arange(16, dtype=torch.uint8),
                               "aug_generator": torch.arange(16, dtype=torch.uint8)})


@pytest.mark.parametrize("record_device", [True, False], ids=["format2", "format1"])
def test_a_checkpoint_from_another_device_resumes_reseeded_deterministically(tmp_path, record_device):
    cfg = tiny_cfg(epochs=3)
    path = tmp_path / "run.pt"
    with pytest.raises(Crash):
        fit(tiny_net(seed=0), *device_loaders(), cfg, "cpu", checkpoint_path=path, quiet=True,
            on_epoch_end=crash_after_epoch(1))
    assert torch.load(path, weights_only=True)["device"] == "cpu"
    saved = rewrite_as_written_on_cuda(path, record_device)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    results, states = [], []
    for checkpoint in (path, copy):  # two resumptions on the CPU, each in a fresh "process"
        net = tiny_net(seed=9)
        torch.manual_seed(123)  # the global RNG a fresh process happens to have
        with pytest.warns(RuntimeWarning, match="resumes on cpu") as caught:
            results.append(fit(net, *device_loaders(), cfg, "cpu", checkpoint_path=checkpoint, quiet=True))
        assert any(("written on cuda" if record_device else "written on another device") in str(w.message)
                   and "re-seeded" in str(w.message) for w in caught)
        states.append(net.state_dict())
        assert torch.load(checkpoint, weights_only=True)["device"] == "cpu"  # saved again where it ran
    first, second = results
    assert first["resumed_from_epoch"] == 1 and [r["epoch"] for r in first["history"]] == [1, 2, 3]
    assert without_timing(first["history"][:1]) == without_timing(saved["history"])  # epoch 1 restored
    assert without_timing(first["history"]) == without_timing(second["history"])  # re-seeded alike
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_a_checkpoint_of_the_same_device_restores_the_generators_exactly(tmp_path):
    path = tmp_path / "run.pt"
    train, val = device_loaders()
    fit(tiny_net(), train, val, tiny_cfg(epochs=1), "cpu", checkpoint_path=path, quiet=True)
    resumed_train, resumed_val = device_loaders()
    checkpoints.load_checkpoint(path, tiny_cfg(epochs=1), tiny_net(), build_optimizer(tiny_net(), tiny_cfg()),
                                None, (resumed_train, resumed_val))
    assert all(torch.equal(a, b) for a, b in zip(train.state_dict().values(), resumed_train.state_dict().values(),
                                                 strict=True))


# --- damaged checkpoints --------------------------------------------------------------------------


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fit(tiny_net(), *loaders(), tiny_cfg(epochs=3), "cpu", quiet=True, checkpoint_path=path,
            on_epoch_end=crash_after_epoch(2))
    latest = torch.load(path, weights_only=True)
    previous = torch.load(checkpoints.previous_checkpoint_path(path), weights_only=True)
    assert (latest["epoch"], previous["epoch"]) == (2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", "run.ckpt.prev"]
    checkpoints.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.99])
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, keep):
    cfg = tiny_cfg(epochs=3)
    full_net = tiny_net()
    full = fit(full_net, *loaders(), cfg, "cpu", quiet=True)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True, checkpoint_path=path,
            on_epoch_end=crash_after_epoch(2))
    truncate(path, keep)
    resumed_net = tiny_net(seed=7)
    with pytest.warns(RuntimeWarning, match="cannot be read") as caught:
        resumed = fit(resumed_net, *loaders(), cfg, "cpu", quiet=True, checkpoint_path=path)
    assert any("previous checkpoint" in str(w.message) for w in caught)
    assert resumed["resumed_from_epoch"] == 1  # epoch 2 is trained again
    assert without_timing(resumed["history"]) == without_timing(full["history"])
    assert all(torch.equal(a, b) for a, b in zip(resumed_net.state_dict().values(),
                                                 full_net.state_dict().values(), strict=True))


def test_a_run_with_no_readable_checkpoint_restarts_with_a_warning(tmp_path):
    cfg = tiny_cfg(epochs=2)
    full = fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True, checkpoint_path=path,
            on_epoch_end=crash_after_epoch(2))
    truncate(path)
    truncate(checkpoints.previous_checkpoint_path(path), keep=0.1)
    with pytest.warns(RuntimeWarning, match="restarts from its first epoch"):
        again = fit(tiny_net(), *loaders(), cfg, "cpu", quiet=True, checkpoint_path=path)
    assert again["resumed_from_epoch"] == 0
    assert without_timing(again["history"]) == without_timing(full["history"])
    assert torch.load(path, weights_only=True)["epoch"] == 2  # the damaged files were replaced


def test_a_crash_between_the_two_renames_resumes_from_the_previous_checkpoint(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fit(tiny_net(), *loaders(), tiny_cfg(epochs=3), "cpu", quiet=True, checkpoint_path=path,
            on_epoch_end=crash_after_epoch(2))
    path.unlink()  # the latest was moved to .prev and the new one not yet renamed into place
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        resumed = fit(tiny_net(), *loaders(), tiny_cfg(epochs=3), "cpu", quiet=True, checkpoint_path=path)
    assert resumed["resumed_from_epoch"] == 1
