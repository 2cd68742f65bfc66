"""Checkpoints: what fit saves after each epoch, how a run resumes from it, and what a damaged one does."""

import pytest
import torch

import checkpoints
import config
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
    loaded = checkpoints.load_checkpoint(path, cfg, tiny_net(seed=1), build_optimizer(net, cfg), None, ([], []))
    assert (loaded.epoch, loaded.best_epoch, loaded.best_f1) == (1, 1, 0.5)
    assert len(restored) == 1 and torch.equal(restored[0], saved_state)


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
