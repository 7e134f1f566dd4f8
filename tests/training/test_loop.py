"""A short real pretraining run on Fashion-MNIST through the per-worker loop, in-process."""

from __future__ import annotations

import pytest

from byol_ray.config import Config
from byol_ray.training.loop import eval_rows_from_metrics, pretrain
from byol_ray.training.session import LocalSession


# ---- a short real pretraining run ---------------------------------------------------------------
def _fmnist_cfg(root: str, **model) -> Config:
    return Config.from_dict(
        {
            "data": {"root": root, "train_subset": 2048, "test_subset": 1000},
            "model": {"width": 8, "projector_hidden": 256, "predictor_hidden": 256, **model},
            "optim": {"epochs": 4, "batch_size": 128, "steps_per_epoch": 8, "warmup_epochs": 1, "base_lr": 0.5},
            "eval": {"baselines": False, "knn_k": 20, "linear_epochs": 30},
            "run": {"torch_threads": 1, "log_every": 100, "seed": 0},
            "tracking": {"enabled": False},
        }
    )


def test_short_pretraining_on_fashion_mnist(tmp_path, fmnist_root):
    cfg = _fmnist_cfg(fmnist_root)
    session = LocalSession(tmp_path / "byol", keep=1)
    out = pretrain(cfg, session)
    reports = session.reports
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert reports[-1]["step"] == 32
    losses = [r["loss"] for r in reports]
    # Random predictions against random targets start near 2 + 2 (cos ~ 0 in each direction).
    assert 3.0 < losses[0] < 4.5
    assert losses[-1] < 0.75 * losses[0], losses
    stds = [r["repr_std"] for r in reports]
    assert min(stds) > 0.4, stds  # not collapsed (a collapsed output gives 0)
    assert reports[-1]["tau"] == pytest.approx(1.0)  # the cosine schedule ends at 1
    assert reports[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The end-of-run evaluation scored the online encoder well above chance (10 classes).
    (row,) = out["eval_rows"]
    assert row.feature_dim == 64
    assert row.linear_top1 > 30 and row.knn_top1 > 30
    assert reports[-1]["eval/byol/linear_top1"] == row.linear_top1
    # Reports are flat numbers and strings, what Tune's loggers take (a list would be drawn as a histogram);
    # the rows travel as one JSON string and read back whole.
    assert all(isinstance(v, (int, float, str)) for r in reports for v in r.values()), reports[-1]
    assert eval_rows_from_metrics(reports[-1]) == out["eval_rows"]

    # Without the predictor and with tau = 0 (target = online), the representation collapses quickly.
    cfg0 = _fmnist_cfg(fmnist_root, use_predictor=False).replace(
        {"optim.tau_base": 0.0, "optim.tau_schedule": "constant"}
    )
    s0 = LocalSession(tmp_path / "collapse", keep=1)
    pretrain(cfg0, s0)
    std0 = s0.reports[-1]["repr_std"]
    assert std0 < 0.6 * stds[-1], (std0, stds[-1])
    assert s0.reports[-1]["loss"] < 0.5 * losses[-1]  # the trivial solution is easy to regress
