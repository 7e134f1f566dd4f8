"""Pieces of a run done once, outside any run: the warm-up's plan and the untrained encoder's score.

A sweep does both once instead of in every trial (``distributed/sweep_plan.py`` runs them as Ray tasks):
the plan through the loop's own `make_plan` (so the same warm-up, the same re-measuring of a suspect
one), and the score of the very encoder a run of that seed starts from (``eval.encoders.untrained_encoder``
draws it with the same seed, in the same order, as ``core.engine.Pretrainer``) with the run's evaluator.
Both take and return plain data, so they can travel to a Ray task.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import Config
from ..eval.encoders import untrained_encoder
from .loop import build_trainer, evaluate_on_run_data, load_train_data, make_plan, training_device


def measure_plan(config: dict[str, Any]) -> dict[str, Any]:
    """The plan a fresh run of this config would make for itself (its `StepPlan` as a dict): one process
    with the config's global batch, the warm-up included when the config has a time budget."""
    t_start = time.perf_counter()  # as in `pretrain`: the budget counts the data and the model too
    cfg = Config.from_dict(config)
    device = training_device(cfg)
    data = load_train_data(cfg, device)
    trainer = build_trainer(cfg, data)
    return make_plan(cfg, trainer, data, 0, 1, t_start).to_dict()


def score_untrained(config: dict[str, Any]) -> dict[str, float]:
    """Linear probe and kNN top-1 (the config's `eval` protocol, on its data) of the encoder a run of this
    config starts from, before its first step."""
    cfg = Config.from_dict(config)
    data = load_train_data(cfg, training_device(cfg))
    encoder = untrained_encoder(cfg, data.inputs.channels, cfg.run.seed, data.device)
    (row,) = evaluate_on_run_data(cfg, data, {"untrained encoder": encoder})
    return {"linear_top1": row.linear_top1, "knn_top1": row.knn_top1}
