"""The one plan a sweep fixes for all its trials: every trial's share of its one figure, what the parent run
records of it (the Ray sweeps themselves are in test_sweep.py)."""

from __future__ import annotations

from byol_ray.distributed.sweep_plan import SweepPlan, max_epochs, untrained_key
from byol_ray.sweep_spec import load_sweep


def test_every_trial_gets_its_share_of_the_one_stored_figure(fmnist_root):
    batch = load_sweep("batch")
    assert batch.hold == "images"
    plan = SweepPlan(steps=468, source="epochs", hold="images", batch=128)
    trials = {v.name: plan.trial_config(batch.trial_config(v.name, 1, [])) for v in batch.variants}
    # Equal images: 468 steps x 128 = 59,904 images at every batch size (the nearest whole step).
    steps = {name: c.optim.total_steps for name, c in trials.items()}
    assert steps == {"32": 1872, "64": 936, "128": 468, "256": 234, "1024 (4 x 256 accumulated)": 58}
    assert all(c.optim.time_budget_minutes == 0 and c.run.seed == 1 for c in trials.values())  # never re-planned
    assert max_epochs(list(trials.values())) == 1872
    assert plan.params() == {
        "sweep.steps": 468,
        "sweep.steps_source": "epochs",
        "sweep.hold": "images",
        "sweep.images": 59904,
    }
    # Equal steps: the figure itself for every variant; a warm-up's plan records its speed and budget.
    same = SweepPlan(steps=300, source="warmup", hold="steps", batch=128, images_per_s=717.04, budget_minutes=3.0)
    assert {same.trial_config(batch.trial_config(v.name, 0, [])).optim.total_steps for v in batch.variants} == {300}
    assert same.params() == {
        "sweep.steps": 300,
        "sweep.steps_source": "warmup",
        "sweep.hold": "steps",
        "sweep.warmup_images_per_s": 717.0,
        "sweep.budget_minutes": 3.0,
    }
    assert untrained_key(2, "knn_top1") == "untrained/seed_2/knn_top1"
