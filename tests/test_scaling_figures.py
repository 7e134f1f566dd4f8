"""experiments/scaling_figures.py, the source of docs/scaling.md's all-reduce volumes and paper-scale table:
its counts against torchvision's own ResNet-50 and the paper's head sizes, and its arithmetic exactly."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torchvision
from conftest import REPO
from torch import nn

spec = importlib.util.spec_from_file_location("scaling_figures", REPO / "experiments" / "scaling_figures.py")
assert spec is not None and spec.loader is not None
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def mlp_numbers(d_in: int, hidden: int, d_out: int) -> int:
    """The paper's head, Linear -> BatchNorm -> ReLU -> Linear: weights, biases, BatchNorm's scale and shift."""
    return d_in * hidden + hidden + 2 * hidden + hidden * d_out + d_out


def test_resnet50_sends_its_online_gradients_bn_buffers_and_probe():
    trainer = figures.build_replica(figures.paper_config("resnet50"))
    counts = figures.synchronised(trainer)
    reference = torchvision.models.resnet50()  # 1000-class fc, which the encoder replaces by its features
    encoder = sum(p.numel() for p in reference.parameters()) - (2048 * 1000 + 1000)
    assert counts["gradients"] == encoder + mlp_numbers(2048, 4096, 256) + mlp_numbers(256, 4096, 256)
    bn_features = sum(m.num_features for m in trainer.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert counts["bn_buffers"] == 2 * bn_features  # running mean and variance; the int step counter is not sent
    assert counts["probe_gradients"] == 2048 * 1000 + 1000
    assert counts == {"gradients": 35_067_456, "bn_buffers": 69_504, "probe_gradients": 2_049_000}  # docs/scaling.md


def test_ring_allreduce_volume():
    assert [figures.ring_bytes_per_worker(1000, n) for n in (1, 2, 4, 8)] == [0, 1000, 1500, 1750]


def test_paper_run_arithmetic():
    args = argparse.Namespace(gpu_img_s=4096.0, network_gbit=8.0, storage_gb_s=1.0, usd_per_gpu_hour=2.0)
    run = figures.paper_run(10**9, {"bytes": 10**9, "save_s": 1.0, "load_s": 0.0}, 2, args)
    steps = 1_281_167 // 4096 * 300  # 93,600
    # compute 4096 / (2 x 4096) = 0.5 s, all-reduce 1 GB at 1 GB/s = 1 s, checkpoint 1 s + 1 GB at 1 GB/s = 2 s
    assert run["compute_ms"] == 500 and run["allreduce_ms"] == 1000 and run["checkpoint_s"] == 2
    assert run["wall_h"] == pytest.approx((steps * 1.5 + 300 * 2) / 3600, rel=1e-12)
    assert run["wall_h_full_overlap"] == pytest.approx((steps * 1.0 + 300 * 2) / 3600, rel=1e-12)
    assert run["gpu_hours"] == pytest.approx(2 * run["wall_h"], rel=1e-12)
    assert run["usd"] == pytest.approx(2 * run["gpu_hours"], rel=1e-12)
