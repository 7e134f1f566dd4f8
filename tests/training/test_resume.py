"""Checkpoints: a bit-exact round trip, an interrupted run that resumes with identical losses and
weights, and the refusal to resume under an incompatible config."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from byol_ray.config import Config, ConfigError
from byol_ray.core.engine import InputSpec, Pretrainer
from byol_ray.core.state import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    check_compatible,
    load_state,
    resumable_checkpoint,
    save_state,
)
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession


def tiny_cfg(**over) -> Config:
    d = {
        "data": {"train_subset": 384, "test_subset": 128},
        "model": {"width": 8, "projector_hidden": 64, "projector_out": 32, "predictor_hidden": 64},
        "optim": {"epochs": 3, "batch_size": 64, "steps_per_epoch": 3, "warmup_epochs": 1},
        "eval": {"baselines": False, "knn_k": 10, "linear_epochs": 5},
        "run": {"torch_threads": 1, "log_every": 100, "checkpoint_every": 1},
        "tracking": {"enabled": False},
    }
    return Config.from_dict(d).replace(over) if over else Config.from_dict(d)


def make_trainer(cfg: Config) -> Pretrainer:
    return Pretrainer(cfg, InputSpec(1, 10, (0.3,), (0.35,)), steps_per_epoch=4, device=torch.device("cpu"))


def fake_batch(seed: int, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return [(images, labels)]


def tensors(obj, prefix=""):
    """Every tensor in a nested state dict, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = tiny_cfg(**{"data.image_size": 16})
    tr = make_trainer(cfg)
    tr.start_epoch(0)
    for s in range(2):
        tr.train_step(fake_batch(s))
    assert tr.step == 2
    state = TrainState(
        trainer=tr.state_dict(),
        epoch=1,
        in_channels=1,
        config=cfg.to_dict(),
        rng=torch.get_rng_state(),
        mlflow_run_id="abc",
        world_size=3,
    )
    save_state(tmp_path / "ck", state)
    assert not (tmp_path / "ck" / (STATE_FILE + ".tmp")).exists()
    loaded = load_state(tmp_path / "ck")
    assert isinstance(loaded, TrainState) and loaded.config == cfg.to_dict()
    assert (loaded.epoch, loaded.in_channels, loaded.mlflow_run_id, loaded.restarts) == (1, 1, "abc", 0)
    assert loaded.world_size == 3
    assert torch.equal(loaded.rng, state.rng)
    assert Config.from_dict(loaded.config) == cfg

    fresh = make_trainer(cfg)  # same seed (it drives the augmentation), empty optimiser state ...
    with torch.no_grad():  # ... and different weights
        for p in list(fresh.online.parameters()) + list(fresh.target.parameters()):
            p.add_(0.5)
    assert fresh.step == 0 and not fresh.optimizer.state
    assert not torch.equal(next(fresh.online.parameters()), next(tr.online.parameters()))
    fresh.load_state_dict(loaded.trainer)
    assert fresh.step == 2
    original = dict(tensors(tr.state_dict()))
    restored = dict(tensors(fresh.state_dict()))
    assert original.keys() == restored.keys()
    assert any("momentum_buffer" in k for k in original) and any(k.startswith("/probe_optimizer") for k in original)
    for k, v in original.items():
        assert v.dtype == restored[k].dtype and torch.equal(v, restored[k]), k
    # Loading copies into the live tensors the EMA holds: the target it updates is the loaded one.
    assert all(a is b for a, b in zip(fresh.ema.target, fresh.target.parameters()))

    # Both continue identically.
    tr.start_epoch(1)
    fresh.start_epoch(1)
    a, b = tr.train_step(fake_batch(7)), fresh.train_step(fake_batch(7))
    assert torch.equal(a, b)  # every statistic: loss, probe loss and accuracy, representation std
    for (n, p), q in zip(tr.target.named_parameters(), fresh.target.parameters()):
        assert torch.equal(p, q), n


def test_resumable_checkpoint_passes_over_torn_ones_and_says_which(tmp_path):
    cfg = tiny_cfg()
    names = [
        "checkpoint_2026-01-01_00-00-01.000000",
        "checkpoint_2026-01-01_00-00-02.000000",
        "checkpoint_2026-01-01_00-00-03.000000",
    ]
    for epoch, name in enumerate(names, 1):
        save_state(
            tmp_path / name,
            TrainState(trainer={}, epoch=epoch, in_channels=1, config=cfg.to_dict(), rng=torch.get_rng_state()),
        )
    assert resumable_checkpoint(tmp_path / "none") is None
    state, skipped = resumable_checkpoint(tmp_path)
    assert state.epoch == 3 and skipped == []
    # Ray never registered the newest one: `newest` leaves it out.
    assert resumable_checkpoint(tmp_path, newest=names[1])[0].epoch == 2
    torn = tmp_path / names[2] / STATE_FILE
    torn.write_bytes(torn.read_bytes()[:500])
    shutil.rmtree(tmp_path / names[1])  # a folder deleted by hand is simply not there
    state, skipped = resumable_checkpoint(tmp_path)
    assert state.epoch == 1 and [p.name for p, _ in skipped] == [names[2]]
    (tmp_path / names[0] / STATE_FILE).unlink()  # a folder without its state file
    with pytest.raises(CheckpointError, match=f"none of its 2 checkpoint.*{names[2]}.*new run.name"):
        resumable_checkpoint(tmp_path)


def test_load_state_refuses_pickled_objects(tmp_path):
    (tmp_path / "ck").mkdir()
    torch.save({"evil": _Opaque()}, tmp_path / "ck" / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_state(tmp_path / "ck")
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "nothing-here")


class _Opaque:
    pass


def _run(cfg: Config, directory, keep: int = 3) -> tuple[LocalSession, dict]:
    session = LocalSession(directory, keep=keep)
    return session, pretrain(cfg, session)


def test_resumed_run_continues_exactly(tmp_path, fmnist_root, capsys):
    cfg = tiny_cfg(**{"data.root": fmnist_root})
    full, out_full = _run(cfg, tmp_path / "A")
    assert [r["epoch"] for r in full.reports] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == [
        "checkpoint_000001",
        "checkpoint_000002",
        "checkpoint_000003",
    ]

    # An interrupted run: only the epoch-1 checkpoint survived.
    (tmp_path / "B").mkdir()
    shutil.copytree(tmp_path / "A" / "checkpoint_000001", tmp_path / "B" / "checkpoint_000001")
    resumed, out_res = _run(cfg, tmp_path / "B")
    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    assert [r["step"] for r in resumed.reports] == [6, 9]
    assert all(r["restarts"] == 1 for r in resumed.reports)
    for a, b in zip(full.reports[1:], resumed.reports):
        assert a["loss"] == b["loss"], (a["epoch"], a["loss"], b["loss"])
        assert a["repr_std"] == b["repr_std"]
        assert a["probe_loss"] == b["probe_loss"]
        assert a["target_checksum"] == b["target_checksum"]
    ta, tb = out_full["trainer"], out_res["trainer"]
    assert ta.step == tb.step == 9
    for name, module in (("online", "online"), ("target", "target")):
        sa, sb = getattr(ta, module).state_dict(), getattr(tb, module).state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"
    assert out_full["eval_rows"][0].linear_top1 == out_res["eval_rows"][0].linear_top1

    # The epochs actually trained: the epoch-1 and final weights differ.
    ep1 = load_state(tmp_path / "A" / "checkpoint_000001").trainer["online"]
    assert any(not torch.equal(ep1[k], v) for k, v in ta.online.state_dict().items() if v.is_floating_point())

    # The same checkpoint as a two-worker group would have written it, resumed by one worker (an elastic
    # group that lost a node): one line says so, and the run goes on as before, with the workers metric.
    (tmp_path / "C").mkdir()
    two = load_state(tmp_path / "A" / "checkpoint_000001")
    assert two.world_size == 1  # a group records its size in its checkpoints
    two.world_size = 2
    save_state(tmp_path / "C" / "checkpoint_000001", two)
    capsys.readouterr()
    shrunk, _ = _run(cfg, tmp_path / "C")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[elastic]")]
    assert said == ["[elastic] group resized 2 -> 1 worker(s) at epoch 2 (step 3); per-worker batch 32 -> 64"]
    assert [r["workers"] for r in shrunk.reports] == [1, 1]
    assert [(r["loss"], r["target_checksum"]) for r in shrunk.reports] == [
        (r["loss"], r["target_checksum"]) for r in resumed.reports
    ]
    assert load_state(tmp_path / "C" / "checkpoint_000003").world_size == 1

    # A finished run resumed again trains nothing more.
    again = LocalSession(tmp_path / "A", keep=3)
    pretrain(cfg, again)
    assert again.reports == []


@pytest.mark.parametrize(
    "override, field",
    [
        ({"model.width": 16}, "model.width"),
        ({"model.use_predictor": False}, "model.use_predictor"),
        ({"model.stem": "small"}, "model.stem"),
        ({"optim.epochs": 5}, "optim.epochs"),
        ({"optim.batch_size": 32}, "optim.batch_size"),
        ({"data.image_size": 32}, "data.image_size"),
        # These change the steps per epoch: the restored step count would no longer match the lr/tau
        # schedule (the run would end with lr > 0 and tau < 1, or past the schedule's end).
        ({"optim.steps_per_epoch": 5}, "optim.steps_per_epoch"),
        ({"data.train_subset": 128}, "data.train_subset"),
        # Another optimizer cannot load LARS's state (it failed with a bare KeyError mid-run).
        ({"optim.optimizer": "adamw"}, "optim.optimizer"),
    ],
)
def test_check_compatible_rejects_a_different_config(override, field):
    cfg = tiny_cfg()
    state = TrainState(trainer={}, epoch=1, in_channels=1, config=cfg.to_dict(), rng=torch.get_rng_state())
    check_compatible(state, cfg)  # the same config resumes
    # Run, evaluation and tracking settings may change between attempts.
    check_compatible(
        state,
        cfg.replace(
            {
                "run.log_every": 7,
                # The group size too: the state loads into any size of group (an elastic one resizes).
                "run.num_workers": [1, 2],
                "eval.knn_k": 3,
                "tracking.enabled": True,
            }
        ),
    )
    with pytest.raises(ConfigError) as ei:
        check_compatible(state, cfg.replace(override))
    assert field in str(ei.value), str(ei.value)


def test_pretrain_refuses_an_incompatible_checkpoint(tmp_path, fmnist_root):
    cfg = tiny_cfg(**{"data.root": fmnist_root})
    trainer_state = make_trainer(cfg.replace({"data.image_size": 28})).state_dict()
    other = cfg.replace({"model.width": 16})
    save_state(
        tmp_path / "checkpoint_000001",
        TrainState(trainer=trainer_state, epoch=1, in_channels=1, config=other.to_dict(), rng=torch.get_rng_state()),
    )
    with pytest.raises(ConfigError, match="model.width"):
        pretrain(cfg, LocalSession(tmp_path))


def test_model_in_channels_and_online_probe_switch_are_honoured(tmp_path, fmnist_root):
    # model.in_channels=3 pretrains a 3-channel encoder on 1-channel Fashion-MNIST (grey repeated), and
    # eval.online_probe=false trains no probe: no probe tensors in the checkpoint, no probe metrics.
    cfg = tiny_cfg(
        **{
            "data.root": fmnist_root,
            "model.in_channels": 3,
            "eval.online_probe": False,
            "optim.epochs": 1,
            "eval.final": True,
        }
    )
    session = LocalSession(tmp_path / "rgb", keep=1)
    out = pretrain(cfg, session)
    state = session.latest_state()
    assert state.in_channels == 3 and state.trainer["online"]["branch.encoder.conv1.weight"].shape[1] == 3
    assert "probe" not in state.trainer and out["trainer"].probe is None
    assert "online_probe_acc" not in session.reports[-1] and "probe_loss" not in session.reports[-1]
    assert out["eval_rows"][0].linear_top1 > 10  # the final evaluation ran on 3-channel test images
    with_probe = pretrain(
        tiny_cfg(**{"data.root": fmnist_root, "optim.epochs": 1, "eval.final": False}),
        LocalSession(tmp_path / "grey", keep=1),
    )
    assert with_probe["trainer"].probe is not None and "online_probe_acc" in with_probe["train"]
