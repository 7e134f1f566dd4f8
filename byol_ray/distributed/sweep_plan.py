"""What a sweep decides once for all its trials: their number of optimiser steps, and the untrained
encoder's score for each seed.

Trials that each planned their own steps from their own warm-up trained different amounts of work, and
one warm-up taken while the machine was briefly shared planned a trial of a single step. So the sweep
fixes the steps once, stores them in its parent run (`STEPS_PARAM`, how they were decided in
`SOURCE_PARAM`), and every trial trains exactly its share of that figure (``optim.total_steps``): rows then
differ only by their variant, and a trial stays reproducible for its seed. The figure is the sweep
file's `steps:` (source ``file``), or the plan of one run of the baseline variant made by the loop's own
`make_plan` in one Ray task with one worker's resources: from its warm-up when the trials have a time
budget (``warmup``), else from `optim.epochs` (``epochs``). A resumed sweep reads the figure back and never
measures again. `hold` says what every variant keeps equal: the steps, or the images (a variant's steps =
the baseline's steps x the baseline's batch / its own batch).

The untrained encoder is the same for every trial of a seed (the trials draw it first, from the run
seed): it is scored once per seed, in a Ray task each, with the trials' evaluation, and logged to the parent
run as `untrained/seed_<s>/linear_top1` and `.../knn_top1`; a resumed sweep scores only the seeds missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from ..config import Config, apply_gpu_recipe
from ..sweep_spec import SweepSpec
from ..tracking.sweeps import parent_record
from ..tracking.tracker import Tracker
from ..training.loop import log
from ..training.plan import WARNING_TAG, StepPlan
from ..training.standalone import measure_plan, score_untrained
from .cluster import training_device, worker_resources

STEPS_PARAM = "sweep.steps"  # the baseline variant's optimiser steps
SOURCE_PARAM = "sweep.steps_source"  # file | warmup | epochs
HOLD_PARAM = "sweep.hold"  # steps | images
IMAGES_PARAM = "sweep.images"  # the images every trial trains on, with hold: images
RATE_PARAM = "sweep.warmup_images_per_s"  # the warm-up's speed (source warmup)
BUDGET_PARAM = "sweep.budget_minutes"  # the trials' time budget the warm-up planned for (source warmup)


@dataclass(frozen=True)
class SweepPlan:
    steps: int  # the baseline variant's optimiser steps
    source: str  # "file", "warmup" or "epochs"
    hold: str  # "steps" or "images"
    batch: int  # the baseline variant's global batch
    images_per_s: float = 0.0  # measured by the warm-up
    budget_minutes: float = 0.0
    warning: str = ""  # the warm-up's plan warning (training/plan.py checked_plan)

    def steps_for(self, cfg: Config) -> int:
        """A trial's optimiser steps: the figure itself, or the same images at the trial's batch size."""
        if self.hold == "images":
            return max(1, round(self.steps * self.batch / cfg.optim.batch_size))
        return self.steps

    def trial_config(self, cfg: Config) -> Config:
        """The trial's config: exactly its steps, planned here rather than by the trial."""
        return cfg.replace({"optim.total_steps": self.steps_for(cfg), "optim.time_budget_minutes": 0.0})

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {STEPS_PARAM: self.steps, SOURCE_PARAM: self.source, HOLD_PARAM: self.hold}
        if self.hold == "images":
            p[IMAGES_PARAM] = self.steps * self.batch
        if self.source == "warmup":
            p[RATE_PARAM] = round(self.images_per_s, 1)
            p[BUDGET_PARAM] = self.budget_minutes
        return p

    def describe(self) -> str:
        how = {
            "file": "the sweep file's steps:",
            "warmup": f"one warm-up, {self.images_per_s:,.0f} img/s, for a {self.budget_minutes:g} min budget",
            "epochs": "the baseline's optim.epochs",
        }[self.source]
        held = (
            f"every variant trains {self.steps * self.batch:,} images (steps x {self.batch} / its batch)"
            if self.hold == "images"
            else "every variant trains these steps"
        )
        return f"{self.steps} steps for the baseline, from {how}; {held}"


def baseline_config(spec: SweepSpec, seed: int, cli_overrides: list[str]) -> Config:
    """The config the baseline variant's trial of `seed` would run, before the sweep's plan."""
    return spec.trial_config(spec.baseline, seed, cli_overrides)


def sweep_plan(spec: SweepSpec, cli_overrides: list[str], tracker: Tracker) -> SweepPlan:
    """The sweep's plan: read back from its parent run (a resumed sweep), or decided now and stored there."""
    base = baseline_config(spec, spec.seeds[0], cli_overrides)
    params, _ = parent_record(tracker)
    if STEPS_PARAM in params:
        plan = SweepPlan(
            steps=int(params[STEPS_PARAM]),
            source=params[SOURCE_PARAM],
            hold=params.get(HOLD_PARAM, spec.hold),
            batch=base.optim.batch_size,
            images_per_s=float(params.get(RATE_PARAM, 0.0)),
            budget_minutes=float(params.get(BUDGET_PARAM, 0.0)),
        )
        log(f"[sweep] plan kept from the parent run: {plan.describe()}")
        return plan
    if spec.steps:
        plan = SweepPlan(spec.steps, "file", spec.hold, base.optim.batch_size)
    else:
        if base.optim.time_budget_minutes:
            log(f"[sweep] measuring one warm-up of {spec.baseline!r} for the steps every trial will train")
        step_plan = StepPlan(**ray.get(_task(base).remote(measure_plan, as_run(base).to_dict())))
        plan = SweepPlan(
            step_plan.total_steps,
            "warmup" if step_plan.budget_s else "epochs",
            spec.hold,
            base.optim.batch_size,
            step_plan.images_per_s,
            base.optim.time_budget_minutes,
            step_plan.warning,
        )
    tracker.log_params(plan.params())
    if plan.warning:
        tracker.set_tags({WARNING_TAG: plan.warning})
    log(f"[sweep] plan: {plan.describe()}")
    return plan


def max_epochs(trials: list[Config]) -> int:
    """An upper bound on the epochs any trial reports (each epoch takes at least one of its steps)."""
    return max(c.optim.total_steps for c in trials)


def score_untrained_seeds(spec: SweepSpec, cli_overrides: list[str], tracker: Tracker) -> dict[int, dict[str, float]]:
    """Score every seed's untrained encoder not yet in the parent run, one Ray task per seed (Ray runs as
    many at once as the cluster holds), and log each to the parent run as soon as it is done."""
    _, metrics = parent_record(tracker)
    todo = [s for s in spec.seeds if untrained_key(s, "linear_top1") not in metrics]
    done = sorted(set(spec.seeds) - set(todo))
    if done:
        log(f"[sweep] untrained encoder already scored for seed(s) {done}")
    base = baseline_config(spec, spec.seeds[0], cli_overrides)
    if not todo or base.data.stream:
        if todo:
            log("[sweep] untrained encoder not scored: a streamed folder (data.stream) is not held in memory")
        return {}
    log(f"[sweep] scoring the untrained encoder of seed(s) {todo}, each once for all its trials")
    refs = {
        _task(base).remote(score_untrained, as_run(baseline_config(spec, s, cli_overrides)).to_dict()): s for s in todo
    }
    scores: dict[int, dict[str, float]] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        seed = refs[ready[0]]
        scores[seed] = ray.get(ready[0])
        tracker.log_metrics({untrained_key(seed, k): v for k, v in scores[seed].items()}, step=0)
        log(
            f"[sweep] untrained encoder, seed {seed}: linear top-1 {scores[seed]['linear_top1']:.2f}, "
            f"kNN {scores[seed]['knn_top1']:.2f}"
        )
    return scores


def as_run(cfg: Config) -> Config:
    """The config as a trial's workers run it: with its GPU recipe when they train on GPUs."""
    return apply_gpu_recipe(cfg, training_device(cfg))


def untrained_key(seed: int, metric: str) -> str:
    return f"untrained/seed_{seed}/{metric}"


def _task(cfg: Config):
    """A Ray task with one worker's resources of this config (what every trial's worker gets)."""
    res = worker_resources(cfg)

    def call(fn, arg):
        return fn(arg)

    return ray.remote(num_cpus=res["CPU"], num_gpus=res.get("GPU", 0.0), max_retries=0)(call)
