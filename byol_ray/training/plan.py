"""How many optimiser steps a run takes: a fixed number of epochs, or as many as fit a time budget.

CPUs differ several-fold in speed for this workload (AVX2-only vs AVX-512 machines), so a number of epochs
cannot promise a wall time. With ``optim.time_budget_minutes`` the run measures itself instead: rank 0 times
a warm-up of `WARMUP_STEPS` real training steps (on a snapshot of the replica that is then restored, so
the run itself is exactly what it would have been without them) and one batch of the frozen-feature
evaluation, and the plan fixes the total number of steps so that the cosine lr and tau schedules end
exactly when the budget does, after keeping back the time the end-of-run evaluation (and any kNN
monitor) will take. ``optim.epochs`` stays an upper limit: the smaller of the two wins.

The plan is stored in every checkpoint and logged to MLflow; a resumed run keeps it, so it follows the
same schedule bit for bit. A shared or throttled machine does not keep the speed its warm-up measured, so
a run that made its own plan re-plans after each epoch from the epoch's own speed and the wall time left
(`replan`): its remaining steps are stretched or squeezed over the rest of the schedules, which stay
continuous and still end (lr 0, tau 1) at the new last step. Re-plans within `REPLAN_TOLERANCE` are not
made, a resumed run re-plans no more (it keeps its checkpoint's plan), and neither does a run given a
plan to repeat.

A warm-up taken while the machine was briefly busy plans far too few steps. So a plan that leaves less
than `LOW_TRAINING_SHARE` of the budget for training is reported loudly and measured once more
(`checked_plan`); when the second measurement does no better, the run goes on with the better of the two
and the plan carries a `warning`, which the run's MLflow tag `plan_warning` shows.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ..config import Config
from ..core.engine import Pretrainer, distributed
from ..core.schedules import schedule_position

WARMUP_STEPS = 24  # timed steps; the first `UNTIMED_STEPS` more warm caches and the allocator
UNTIMED_STEPS = 8
# The end-of-run evaluation embeds the train and test splits with two encoders (BYOL, untrained), then
# fits the L-BFGS probe and kNN on the features (raw pixels too). Only the embedding is timed in the
# warm-up; this factor covers the fits on top of it.
EVAL_OVERHEAD = 2.0
# A re-plan moves the end of the schedules only when the steps that fit the time left differ from those
# planned by more than this fraction (epoch-to-epoch noise should not reshape the schedule).
REPLAN_TOLERANCE = 0.03
# Below this share of its budget spent training, a plan is suspect: measured again before it is kept.
LOW_TRAINING_SHARE = 0.5
WARNING_TAG = "plan_warning"


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    steps_per_epoch: int
    budget_s: float = 0.0  # 0 = no budget: optim.epochs full epochs
    images_per_s: float = 0.0  # measured during the warm-up
    reserve_s: float = 0.0  # kept back for the evaluation
    elapsed_s: float = 0.0  # spent before the first real step (data, model, warm-up)
    # Re-plans (`replan`): (step, schedule position) where each took effect, and the schedules' length
    # (the first plan's total_steps; 0 = total_steps, never re-planned).
    knots: tuple[tuple[int, float], ...] = ()
    schedule_steps: int = 0
    warning: str = ""  # set when even a second warm-up left under LOW_TRAINING_SHARE of the budget to train

    def __post_init__(self):  # a checkpoint may hand the knots back as lists
        object.__setattr__(self, "knots", tuple((int(s), float(p)) for s, p in self.knots))

    def breakpoints(self) -> tuple[tuple[int, float], ...]:
        """(step, schedule position) from the first step to the last (core.schedules.schedule_position)."""
        return ((0, 0.0), *self.knots, (self.total_steps, float(self.schedule_steps or self.total_steps)))

    def replanned(self, step: int, total_steps: int) -> StepPlan:
        """This plan with its schedules' remainder, from `step` on, spread over `total_steps` in all."""
        here = schedule_position(step, self.breakpoints())
        return replace(
            self,
            total_steps=total_steps,
            knots=(*self.knots, (step, here)),
            schedule_steps=self.schedule_steps or self.total_steps,
        )

    @property
    def epochs(self) -> int:
        """Epochs started; the last one may stop part-way."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def params(self) -> dict[str, Any]:
        """What MLflow records of the plan."""
        return {
            "plan.total_steps": self.total_steps,
            "plan.epochs": self.epochs,
            "plan.budget_minutes": self.budget_s / 60,
            "plan.warmup_images_per_s": round(self.images_per_s, 1),
            "plan.eval_reserve_s": round(self.reserve_s, 1),
        }


def epochs_plan(cfg: Config, steps_per_epoch: int) -> StepPlan:
    return StepPlan(cfg.optim.epochs * steps_per_epoch, steps_per_epoch)


def budget_steps(
    cfg: Config, steps_per_epoch: int, step_s: float, eval_s: float, knn_s: float, elapsed_s: float
) -> StepPlan:
    """The plan for measured costs: seconds per step, per final evaluation and per kNN monitor."""
    o = cfg.optim
    budget = o.time_budget_minutes * 60.0
    cap = o.epochs * steps_per_epoch
    reserve = eval_s if cfg.eval.final else 0.0
    steps = cap
    for _ in range(3):  # the kNN monitors depend on the epochs, which depend on the steps: settle it
        epochs = math.ceil(steps / steps_per_epoch)
        knn = knn_s * (epochs // cfg.eval.knn_every if cfg.eval.knn_every else 0)
        steps = min(cap, max(1, int((budget - elapsed_s - reserve - knn) / step_s)))
    epochs = math.ceil(steps / steps_per_epoch)
    knn = knn_s * (epochs // cfg.eval.knn_every if cfg.eval.knn_every else 0)
    return StepPlan(steps, steps_per_epoch, budget, o.batch_size / step_s, reserve + knn, elapsed_s)


def training_share(plan: StepPlan, cfg: Config) -> float:
    """The share of a budgeted plan's wall time that trains (1.0 without a budget)."""
    if not plan.budget_s:
        return 1.0
    return plan.total_steps * cfg.optim.batch_size / plan.images_per_s / plan.budget_s


def short_of_training(plan: StepPlan, cfg: Config) -> bool:
    """A budgeted plan that trains under LOW_TRAINING_SHARE of its budget though optim.epochs did not cap it."""
    capped = plan.total_steps >= cfg.optim.epochs * plan.steps_per_epoch
    return bool(plan.budget_s) and not capped and training_share(plan, cfg) < LOW_TRAINING_SHARE


Costs = tuple[float, float, float]  # seconds per step, seconds of one encoder's embedding, seconds elapsed


def checked_plan(
    cfg: Config,
    measure: Callable[[], Costs],
    plan_of: Callable[[float, float, float], StepPlan],
    log: Callable[[str], None],
) -> StepPlan:
    """The plan for the costs `measure` returns (`plan_of`); measured a second time when it leaves under
    LOW_TRAINING_SHARE of the budget to train. Then the better of the two measurements (the one that plans
    more steps at the time now spent) is kept; if even that trains too little, the plan carries a `warning`."""
    first = measure()
    plan = plan_of(*first)
    if not short_of_training(plan, cfg):
        return plan
    log(warning_block(plan, cfg, "measuring the warm-up once more before committing to a plan"))
    second = measure()
    # max() keeps the first of equals: the second measurement, the more recent one.
    plan = max((plan_of(*second), plan_of(first[0], first[1], second[2])), key=lambda p: p.total_steps)
    if not short_of_training(plan, cfg):
        log(f"[plan] the second warm-up measured {plan.images_per_s:,.0f} img/s: {plan.total_steps} steps, kept")
        return plan
    warning = (
        f"trains {training_share(plan, cfg):.0%} of its {plan.budget_s / 60:g} min budget ({plan.total_steps} "
        f"steps at {plan.images_per_s:,.0f} img/s, the better of two warm-ups)"
    )
    plan = replace(plan, warning=warning)
    log(warning_block(plan, cfg, f"going on with the better warm-up; the MLflow run is tagged {WARNING_TAG}"))
    return plan


def warning_block(plan: StepPlan, cfg: Config, action: str) -> str:
    """A plan that trains too little of its budget, as a block that stands out on the console."""
    bar = "!" * 100
    train_s = plan.total_steps * cfg.optim.batch_size / plan.images_per_s
    return "\n".join(
        [
            bar,
            f"[plan] WARNING: the warm-up measured {plan.images_per_s:,.0f} img/s, which leaves {train_s:.0f} s of "
            f"the {plan.budget_s:.0f} s budget ({training_share(plan, cfg):.0%}) for training: "
            f"{plan.total_steps} steps, after {plan.elapsed_s:.0f} s of set-up and {plan.reserve_s:.0f} s kept "
            f"for evaluation.",
            "[plan] A machine busy with other work during the warm-up does this; so does a budget too small "
            "for this model and data.",
            f"[plan] {action}.",
            bar,
        ]
    )


def replan(cfg: Config, plan: StepPlan, step: int, elapsed_s: float, step_s: float) -> StepPlan | None:
    """After an epoch of a budgeted run: the plan for the steps that fit the wall time left at the speed of
    the epoch just run (`step_s` seconds a step, `elapsed_s` since the run started), or None when the
    current plan is within REPLAN_TOLERANCE of it. optim.epochs still caps it, and at least one step is
    left, so the schedules still end on a step of their own."""
    left = plan.total_steps - step
    if not plan.budget_s or left <= 0:
        return None
    fits = (plan.budget_s - elapsed_s - plan.reserve_s) / step_s
    want = min(cfg.optim.epochs * plan.steps_per_epoch - step, max(1, int(fits)))
    if abs(want - left) <= REPLAN_TOLERANCE * left:
        return None
    return plan.replanned(step, step + want)


def measure_step_seconds(
    trainer: Pretrainer, batch: Callable[[int], list], steps: int = WARMUP_STEPS, untimed: int = UNTIMED_STEPS
) -> float:
    """Seconds per training step, timed on real steps of `trainer`, which is then put back exactly as it
    was (weights, optimiser and probe state, step counter, random generators)."""
    saved = copy.deepcopy(trainer.state_dict())
    cpu_rng, gen_rng = torch.get_rng_state(), trainer.generator.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for i in range(untimed):
            trainer.train_step(batch(i))
        times = []
        for i in range(steps):
            _sync(trainer.device)
            t0 = time.perf_counter()
            trainer.train_step(batch(untimed + i))
            _sync(trainer.device)
            times.append(time.perf_counter() - t0)
        # The median, not the mean: the warm-up runs right after start-up, when Ray's own processes still
        # take bursts of CPU. A burst inflates a few steps, enough to drag the mean far below the speed the
        # run then trains at, but not the typical step.
        return statistics.median(times)
    finally:
        trainer.load_state_dict(saved)
        torch.set_rng_state(cpu_rng)
        trainer.generator.set_state(gen_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def measure_embed_seconds(embed: Callable[[], Any], n_images: int, device: torch.device) -> float:
    """Seconds per image of the frozen-feature embedding (`embed` embeds `n_images` images)."""
    embed()  # warm
    _sync(device)
    t0 = time.perf_counter()
    embed()
    _sync(device)
    return (time.perf_counter() - t0) / n_images


def agree(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank (the plan must be the same everywhere: DDP steps in lockstep)."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return t.tolist()


def describe(plan: StepPlan, cfg: Config) -> str:
    """The plan as one log line, printed before training starts."""
    if cfg.optim.total_steps:
        return (
            f"[plan] {plan.total_steps} steps = {plan.total_steps / plan.steps_per_epoch:.2f} epochs of "
            f"{plan.steps_per_epoch} (optim.total_steps: a plan made before the run, such as its sweep's)"
        )
    if not plan.budget_s:
        return f"[plan] {plan.total_steps} steps = {cfg.optim.epochs} epochs of {plan.steps_per_epoch} (no time budget)"
    train_s = plan.total_steps * cfg.optim.batch_size / plan.images_per_s
    finish = _clock_in(train_s + plan.reserve_s)
    capped = " (capped by optim.epochs)" if plan.total_steps == cfg.optim.epochs * plan.steps_per_epoch else ""
    return (
        f"[plan] warm-up measured {plan.images_per_s:,.0f} img/s; budget {plan.budget_s / 60:g} min = "
        f"{plan.elapsed_s:.0f} s set-up + {train_s:.0f} s training + {plan.reserve_s:.0f} s evaluation -> "
        f"{plan.total_steps} steps = {plan.total_steps / plan.steps_per_epoch:.2f} epochs of "
        f"{plan.steps_per_epoch}{capped}; expected to finish at {finish}"
    )


def describe_replan(
    old: StepPlan, new: StepPlan, epoch: int, step: int, step_s: float, cfg: Config, lr: float, tau: float
) -> str:
    """A re-plan (`replan`) as one log line: the epoch's speed, the new step count and the finish time."""
    finish = _clock_in((new.total_steps - step) * step_s + new.reserve_s)
    return (
        f"[plan] re-planned after epoch {epoch}: {cfg.optim.batch_size / step_s:,.0f} img/s "
        f"(warm-up {old.images_per_s:,.0f}) -> {new.total_steps} steps = "
        f"{new.total_steps / new.steps_per_epoch:.2f} epochs (was {old.total_steps}); lr {lr:.4f} and tau "
        f"{tau:.5f} carry on; expected to finish at {finish}"
    )


def _clock_in(seconds: float) -> str:
    """The wall-clock time `seconds` from now, as HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
