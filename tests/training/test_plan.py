"""The time budget (optim.time_budget_minutes): steps planned from a measured warm-up, schedules that end
when the budget does, and a plan that a resumed run keeps bit for bit."""

from __future__ import annotations

import time

import pytest
import torch

from byol_ray.config import Config
from byol_ray.core.ema import tau_at
from byol_ray.core.schedules import schedule_position, warmup_cosine
from byol_ray.training.loop import pretrain
from byol_ray.training.plan import (
    REPLAN_TOLERANCE,
    WARNING_TAG,
    StepPlan,
    budget_steps,
    checked_plan,
    epochs_plan,
    replan,
    short_of_training,
    training_share,
)
from byol_ray.training.session import LocalSession


def cfg_of(fmnist_root: str, **over) -> Config:
    d = {
        "data": {"root": fmnist_root, "train_subset": 2048, "test_subset": 256},
        "model": {"width": 8, "projector_hidden": 64, "projector_out": 32, "predictor_hidden": 64},
        "optim": {"epochs": 1000, "batch_size": 32, "warmup_epochs": 0.5, "time_budget_minutes": 0.25},
        "eval": {"final": False, "knn_k": 10, "linear_epochs": 5},
        "run": {"torch_threads": 1, "log_every": 1000, "checkpoint_every": 1},
        "tracking": {"enabled": False},
    }
    return Config.from_dict(d).replace(over)


def test_budget_arithmetic():
    cfg = Config().replace(
        {"optim.time_budget_minutes": 1.0, "optim.epochs": 100, "eval.final": True, "eval.knn_every": 0}
    )
    # 60 s - 4 s already spent - 6 s evaluation = 50 s at 0.1 s a step.
    p = budget_steps(cfg, 30, step_s=0.1, eval_s=6.0, knn_s=2.0, elapsed_s=4.0)
    assert (p.total_steps, p.epochs, p.reserve_s) == (500, 17, 6.0)
    assert [p.steps_in_epoch(e) for e in (0, 15, 16, 17)] == [30, 30, 20, 0]
    assert p.images_per_s == pytest.approx(cfg.optim.batch_size / 0.1)
    # kNN monitors every 5 epochs come out of the budget too: 3 of them at 2 s (the plan settles on 17
    # epochs, 3 monitors) -> (60 - 4 - 6 - 6) / 0.1 = 440 steps.
    p = budget_steps(cfg.replace({"eval.knn_every": 5}), 30, 0.1, 6.0, 2.0, 4.0)
    assert (p.total_steps, p.epochs, p.reserve_s) == (440, 15, 12.0)
    # optim.epochs caps a generous budget; no final evaluation keeps nothing back.
    p = budget_steps(cfg.replace({"optim.epochs": 3, "eval.final": False}), 30, 0.1, 6.0, 2.0, 4.0)
    assert (p.total_steps, p.epochs, p.reserve_s) == (90, 3, 0.0)
    assert epochs_plan(cfg, 30) == StepPlan(3000, 30)


def test_replan_arithmetic_and_schedules_continuous_through_it():
    cfg = Config().replace(
        {"optim.time_budget_minutes": 1.0, "optim.epochs": 100, "eval.final": True, "eval.knn_every": 0}
    )
    plan = budget_steps(cfg, 30, step_s=0.1, eval_s=6.0, knn_s=2.0, elapsed_s=4.0)  # 500 steps, as above
    # On time after 5 epochs (4 s + 150 x 0.1 s): no re-plan, and none for noise within the tolerance.
    assert replan(cfg, plan, 150, elapsed_s=19.0, step_s=0.1) is None
    assert replan(cfg, plan, 150, elapsed_s=19.0, step_s=0.1 * (1 + REPLAN_TOLERANCE / 2)) is None
    # Slowed down: 29 s spent, (60 - 29 - 6) / 0.25 = 100 steps left -> 250 in all.
    slow = replan(cfg, plan, 150, elapsed_s=29.0, step_s=0.25)
    assert (slow.total_steps, slow.epochs, slow.schedule_steps, slow.knots) == (250, 9, 500, ((150, 150.0),))
    assert slow.breakpoints() == ((0, 0.0), (150, 150.0), (250, 500.0))
    # A second re-plan starts from where the first left the schedules: step 200 is position 150 + 50 x 3.5.
    again = replan(cfg, slow, 200, elapsed_s=44.0, step_s=0.125)  # (60 - 44 - 6) / 0.125 = 80 left -> 280
    assert again.knots == ((150, 150.0), (200, 325.0)) and again.total_steps == 280
    # Faster than planned: more steps, up to optim.epochs; never fewer than one step left.
    assert replan(cfg, plan, 150, elapsed_s=10.0, step_s=0.001).total_steps == 100 * 30
    assert replan(cfg, plan, 150, elapsed_s=70.0, step_s=0.1).total_steps == 151

    # The schedules through a re-plan: continuous at the knot, monotone, and at their ends on the new
    # last step (lr 0, tau 1); a plan never re-planned maps every step to itself.
    bp = slow.breakpoints()
    assert [schedule_position(k, plan.breakpoints()) for k in (0, 7, 499, 500)] == [0, 7, 499, 500]
    lrs = [warmup_cosine(schedule_position(k, bp), 500, 15, 1.0) for k in range(251)]
    taus = [tau_at(schedule_position(k, bp), 500, 0.95) for k in range(251)]
    assert lrs[149] == pytest.approx(warmup_cosine(149, 500, 15, 1.0))  # unchanged before the knot
    assert abs(lrs[151] - lrs[150]) < abs(lrs[150] - lrs[149]) * 4  # no jump, a steeper slope
    assert all(a >= b for a, b in zip(lrs[15:], lrs[16:])) and all(a <= b for a, b in zip(taus, taus[1:]))
    assert lrs[250] == 0.0 and taus[250] == 1.0 and lrs[249] > 0.0


def test_a_budgeted_run_on_a_machine_that_slows_down_replans_and_still_ends_on_time(tmp_path, fmnist_root):
    """Every step after the warm-up sleeps 50 ms: the plan made from the warm-up no longer fits, so the run
    re-plans after its epochs, ends on time with lr 0 and tau 1, and its checkpoint keeps the re-planned
    schedule."""
    cfg = cfg_of(fmnist_root, **{"optim.steps_per_epoch": 16, "debug.step_delay_s": 0.05})
    session = LocalSession(tmp_path / "run", keep=1)
    t0 = time.perf_counter()
    out = pretrain(cfg, session)
    wall = time.perf_counter() - t0
    plan, trainer = out["plan"], out["trainer"]
    budget = cfg.optim.time_budget_minutes * 60
    assert plan.knots and plan.total_steps < plan.schedule_steps  # fewer steps than the warm-up promised
    assert trainer.step == plan.total_steps and trainer.lr() == 0.0 and trainer.tau() == 1.0
    assert StepPlan(**session.latest_state().plan) == plan
    # Without re-planning the same run took 34 s here (22 s with 20 ms delays, too close to tell apart).
    assert 0.6 * budget < wall < 1.3 * budget + 2, (wall, budget)


def test_a_budgeted_run_plans_from_its_measured_rate_and_ends_on_time(tmp_path, fmnist_root):
    cfg = cfg_of(fmnist_root)
    t0 = time.perf_counter()
    out = pretrain(cfg, LocalSession(tmp_path / "run", keep=1))
    wall = time.perf_counter() - t0
    plan, trainer = out["plan"], out["trainer"]
    budget = cfg.optim.time_budget_minutes * 60
    # The plan came from the warm-up: its rate times the training part of the budget is its step count.
    assert plan.budget_s == budget and plan.images_per_s > 0 and 0 < plan.elapsed_s < budget
    # (Re-plans after each epoch keep it on time on a machine whose speed changes: the first plan is the
    # schedules' length.)
    expected = int((budget - plan.elapsed_s) * plan.images_per_s / cfg.optim.batch_size)
    assert abs((plan.schedule_steps or plan.total_steps) - expected) <= 1
    assert plan.total_steps < cfg.optim.epochs * plan.steps_per_epoch  # the budget, not the epochs, decided
    # It ran exactly the planned steps, the last epoch part-way, and the schedules ended with them.
    assert trainer.step == plan.total_steps
    assert trainer.lr() == 0.0 and trainer.tau() == 1.0
    assert out["train"]["lr"] == 0.0 and out["train"]["tau"] == 1.0 and out["train"]["step"] == plan.total_steps
    # On time: a timing on a shared 2-core machine, so with room either way.
    assert 0.6 * budget < wall < 1.3 * budget + 2, (wall, budget)


def test_a_budgeted_run_killed_and_resumed_matches_the_same_plan_uninterrupted(tmp_path, fmnist_root):
    cfg = cfg_of(fmnist_root, **{"optim.time_budget_minutes": 0.2, "optim.steps_per_epoch": 8})

    class Killed(RuntimeError):
        pass

    class DiesAfterEpoch1(LocalSession):
        def report(self, metrics, state=None):
            super().report(metrics, state)
            if metrics["epoch"] == 1:
                raise Killed

    with pytest.raises(Killed):
        pretrain(cfg, DiesAfterEpoch1(tmp_path / "killed", keep=2))
    session = LocalSession(tmp_path / "killed", keep=2)
    plan = StepPlan(**session.latest_state().plan)
    assert plan.budget_s and plan.epochs > 1
    # The rerun keeps the stored plan even under another budget, and does not measure again.
    resumed = pretrain(cfg.replace({"optim.time_budget_minutes": 5.0}), session)
    assert resumed["plan"] == plan and resumed["trainer"].step == plan.total_steps
    reference = pretrain(cfg, LocalSession(tmp_path / "reference", keep=1), plan=plan)
    a, b = resumed["trainer"].state_dict(), reference["trainer"].state_dict()
    for part in ("online", "target"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_a_plan_that_leaves_under_half_the_budget_to_train_is_measured_again_and_flagged():
    cfg = Config().replace(
        {"optim.time_budget_minutes": 1.0, "optim.epochs": 100, "eval.final": True, "eval.knn_every": 0}
    )

    def plan_of(step_s: float, eval_s: float, elapsed_s: float) -> StepPlan:
        return budget_steps(cfg, 30, step_s, eval_s, 0.0, elapsed_s)

    def run(*costs: tuple[float, float, float]) -> tuple[StepPlan, int, str]:
        """checked_plan over measurements that return `costs` in turn: (plan, measurements made, console)."""
        calls, lines = iter(costs), []
        made = [0]

        def measure() -> tuple[float, float, float]:
            made[0] += 1
            return next(calls)

        return checked_plan(cfg, measure, plan_of, lines.append), made[0], "\n".join(lines)

    # 60 s - 4 s set-up - 6 s evaluation = 50 s of training at 0.1 s a step: measured once, no word.
    plan, made, console = run((0.1, 6.0, 4.0))
    assert (plan.total_steps, made, console, plan.warning) == (500, 1, "", "")
    # A warm-up on a busy machine: 40 s kept for evaluation leaves 16 s (27%) to train -> loud, measured again;
    # the second (6 s evaluation, at 5 s spent) plans (60 - 5 - 6) / 0.1 = 490 steps, and is kept.
    plan, made, console = run((0.1, 40.0, 4.0), (0.1, 6.0, 5.0))
    assert (plan.total_steps, made, plan.warning) == (490, 2, "")
    assert "WARNING" in console and "27%" in console and "measuring the warm-up once more" in console
    assert training_share(plan, cfg) == pytest.approx(49.0 / 60.0)
    # Both slow: the better of the two, each planned at the 8 s now spent. First: (60 - 8 - 40) / 0.5 = 24
    # steps; second: (60 - 8 - 30) / 1.0 = 22 steps -> the first, 24 steps = 12 s (20%), flagged.
    plan, made, console = run((0.5, 40.0, 4.0), (1.0, 30.0, 8.0))
    assert (plan.total_steps, made) == (24, 2)
    assert plan.warning.startswith("trains 20% of its 1 min budget (24 steps")
    assert console.count("WARNING") == 2 and "tagged plan_warning" in console
    # The warning travels with the plan (checkpoints and MLflow): the run's tag.
    assert StepPlan(**plan.to_dict()) == plan and WARNING_TAG == "plan_warning"
    # optim.epochs capping the steps is no warning, however little of the budget it trains.
    one_epoch = cfg.replace({"optim.epochs": 1})
    capped = budget_steps(one_epoch, 30, 0.1, 6.0, 0.0, 4.0)
    assert capped.total_steps == 30 and training_share(capped, one_epoch) == pytest.approx(0.05)
    assert not short_of_training(capped, one_epoch)
