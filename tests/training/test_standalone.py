"""What a sweep does once for all its trials: the untrained encoder's score is the score of the very encoder a
run of that seed starts from, and the plan is the one a run of the config would make for itself."""

from __future__ import annotations

import copy

import torch

from byol_ray.config import Config
from byol_ray.eval.encoders import untrained_encoder
from byol_ray.training.loop import build_trainer, evaluate_on_run_data, load_train_data, pretrain
from byol_ray.training.session import LocalSession
from byol_ray.training.standalone import measure_plan, score_untrained


def cfg_of(fmnist_root: str, seed: int, **over) -> Config:
    d = {
        "data": {"root": fmnist_root, "train_subset": 512, "test_subset": 256},
        "model": {"width": 8, "projector_hidden": 64, "projector_out": 32, "predictor_hidden": 64},
        "optim": {"epochs": 2, "batch_size": 64, "steps_per_epoch": 3, "warmup_epochs": 0},
        "eval": {"knn_k": 20, "linear_epochs": 5, "baselines": False},
        "run": {"seed": seed, "torch_threads": 1, "log_every": 1000},
        "tracking": {"enabled": False},
    }
    return Config.from_dict(d).replace(over)


def test_the_untrained_score_is_the_score_of_the_encoder_a_run_of_that_seed_starts_from(fmnist_root):
    cfg = cfg_of(fmnist_root, seed=3)
    cpu = torch.device("cpu")
    data = load_train_data(cfg, cpu)
    start = build_trainer(cfg, data).net.encoder  # the run's online encoder before its first step
    twin = untrained_encoder(cfg, data.inputs.channels, 3, cpu)
    theirs, ours = start.state_dict(), twin.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)  # weights and BatchNorm buffers, bit for bit
    other = untrained_encoder(cfg, data.inputs.channels, 4, cpu).state_dict()
    assert not torch.equal(other["conv1.weight"], ours["conv1.weight"])  # the seed decides it

    # The score is that encoder's, with the run's evaluator on the run's data.
    start = copy.deepcopy(start).to(memory_format=torch.contiguous_format)
    (row,) = evaluate_on_run_data(cfg, data, {"start": start}, lambda _line: None)
    assert score_untrained(cfg.to_dict()) == {"linear_top1": row.linear_top1, "knn_top1": row.knn_top1}
    assert 10.0 < row.knn_top1 < 100.0  # a real score: above chance on 10 classes even untrained


def test_the_plan_measured_once_is_the_plan_a_run_makes_and_total_steps_fixes_it(tmp_path, fmnist_root):
    cfg = cfg_of(fmnist_root, seed=0)
    assert measure_plan(cfg.to_dict())["total_steps"] == 6  # 2 epochs of 3 steps
    # With a time budget: a warm-up's plan, capped here by optim.epochs.
    budgeted = measure_plan(cfg.replace({"optim.time_budget_minutes": 5.0}).to_dict())
    assert (budgeted["total_steps"], budgeted["budget_s"]) == (6, 300.0) and budgeted["images_per_s"] > 0
    # optim.total_steps: exactly that many steps, the last epoch part-way, no warm-up and no re-plan.
    fixed = cfg.replace({"optim.total_steps": 7})
    out = pretrain(fixed, LocalSession(tmp_path / "run", keep=1))
    assert (out["plan"].total_steps, out["plan"].epochs, out["plan"].budget_s) == (7, 3, 0.0)
    assert out["trainer"].step == 7 and out["train"]["trained_steps"] == 7
    assert out["trainer"].lr() == 0.0 and out["trainer"].tau() == 1.0  # the schedules end with the 7th step
