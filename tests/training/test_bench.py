"""`byol-ray bench`: the code the benchmark times computes the right things.

Nothing here asserts a speed (speed lives in the benchmark's own output); every check is about what the
measured code paths produce: the JSON's figures and their ratios and the fused EMA against the loop.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SMALL_MODEL, folder_cfg
from mlflow.tracking import MlflowClient

from byol_ray.cli.bench import main as bench_main
from byol_ray.config import load_config
from byol_ray.core.ema import ema_loop_
from byol_ray.core.engine import cpu_bf16_supported
from byol_ray.core.model import unwrap
from byol_ray.training.bench import Bench, flat_metrics, run_bench


def fmnist_cfg(root, tmp_path, *extra):
    return load_config(
        "experiments/fmnist.yaml",
        SMALL_MODEL
        + [
            f"data.root={root}",
            "data.train_subset=256",
            "optim.batch_size=16",
            "eval.final=false",
            f"run.output_dir={tmp_path}",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *extra,
        ],
    )


# ---- the benchmark's figures --------------------------------------------------------------------
def test_bench_json_has_the_documented_figures_and_logs_to_mlflow(tmp_path, fmnist_root, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "bench.json"
    cfg = fmnist_cfg(fmnist_root, tmp_path)
    argv = [
        "--config",
        "experiments/fmnist.yaml",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
        "--mlflow",
        *SMALL_MODEL,
        f"data.root={fmnist_root}",
        "data.train_subset=256",
        "optim.batch_size=16",
        f"run.output_dir={tmp_path}",
        f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
        "optim.time_budget_minutes=0.25",
        "data.test_subset=128",
    ]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "BYOL training step" in printed and "of bare fwd+bwd" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {
        "setup",
        "byol_step",
        "phases_ms",
        "bare_fwd_bwd",
        "byol_over_bare",
        "flops",
        "ema",
        "augmentation",
        "input_pipeline",
        "dispatch",
        "repeats",
        "warmup",
    }
    assert res["setup"]["backbone"] == "resnet10" and res["setup"]["batch_size"] == 16
    assert res["setup"]["width"] == 8 and res["setup"]["device"] == "cpu"
    # The main config's run.precision=auto, as the replica resolved it on this CPU.
    assert res["setup"]["precision"] == ("bf16" if cpu_bf16_supported() else "fp32")
    step, bare = res["byol_step"], res["bare_fwd_bwd"]
    for sec in (step, bare):
        assert sec["step_ms"] > 0
        assert sec["images_per_s"] == pytest.approx(16 / (sec["step_ms"] / 1e3), rel=1e-9)
    assert res["byol_over_bare"] == pytest.approx(bare["step_ms"] / step["step_ms"], rel=1e-9)
    ph = res["phases_ms"]
    assert set(ph) == {"augmentation", "forward", "backward", "optimizer", "ema", "other"}
    assert all(ph[k] > 0 for k in ph if k != "other")
    assert sum(ph.values()) == pytest.approx(step["step_ms"], rel=1e-9)  # "other" is the remainder
    f = res["flops"]
    assert f["per_step"] > 0 and f["matmul_flop_s"] > 0
    assert f["achieved_flop_s_bare"] == pytest.approx(f["per_step"] / (bare["step_ms"] / 1e3), rel=1e-9)
    assert f["bare_over_matmul"] == pytest.approx(f["achieved_flop_s_bare"] / f["matmul_flop_s"], rel=1e-9)
    e, a, p = res["ema"], res["augmentation"], res["input_pipeline"]
    assert e["speedup"] == pytest.approx(e["loop_ms"] / e["fused_ms"], rel=1e-9) and e["fused_ms"] > 0
    assert a["speedup"] == pytest.approx(a["batched_images_per_s"] / a["per_image_images_per_s"], rel=1e-9)
    assert p["kind"] == "in_memory"
    assert p["over_step"] == pytest.approx(p["images_per_s"] / step["images_per_s"], rel=1e-9)
    # The budget's plan, from the training loop's own planner at the measured step time: the steps fill
    # the 15 s less the evaluation it keeps back (256 train + 128 test images, two encoders), up to the
    # config's 50 epochs of 16 steps. The params round the reserve to 0.1 s, so the steps recomputed here
    # may differ by up to 0.05 s worth of steps, plus one for the truncation.
    plan = res["budget_plan"]
    assert plan["plan.warmup_images_per_s"] == pytest.approx(step["images_per_s"], rel=1e-3)
    train_s = 15 - plan["plan.eval_reserve_s"]
    assert 0 < plan["plan.eval_reserve_s"] < 15
    step_s = step["step_ms"] / 1e3
    assert abs(plan["plan.total_steps"] - min(int(train_s / step_s), 50 * 16)) <= 1 + 0.05 / step_s
    assert plan["plan.epochs"] == -(-plan["plan.total_steps"] // 16) and plan["steps_per_epoch"] == 16
    d = res["dispatch"]
    assert d["step_syncs"] == 0 and d["augmentation_syncs"] == 0  # the step and the views never sync
    assert 0 < d["augmentation_ops"] <= 300 < d["step_ops"]
    assert "dispatched ops / host syncs per training step" in printed

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["byol_ray.kind"] == "bench"
    assert runs[0].data.metrics["byol_over_bare"] == pytest.approx(res["byol_over_bare"])
    assert runs[0].data.metrics["ema/speedup"] == pytest.approx(e["speedup"])
    assert runs[0].info.status == "FINISHED"
    assert set(flat_metrics(res)) >= {
        "byol_step/images_per_s",
        "flops/per_step",
        "augmentation/speedup",
        "dispatch/step_ops",
        "dispatch/step_syncs",
    }


def test_flop_count_matches_a_hand_count_for_a_linear_pair(tmp_path, fmnist_root):
    """The counted FLOPs are those of the step's own forward and backward: adding work adds FLOPs in
    proportion (twice the batch, twice the FLOPs), and the bare pass leaves no gradients behind."""
    b16 = Bench(fmnist_cfg(fmnist_root, tmp_path), repeats=1, warmup=0)
    b32 = Bench(fmnist_cfg(fmnist_root, tmp_path, "optim.batch_size=32"), repeats=1, warmup=0)
    f16, f32 = b16.step_flops(), b32.step_flops()
    assert f32 == pytest.approx(2 * f16, rel=0.02)
    assert all(p.grad is None for p in b16.trainer.online.parameters())


def test_bench_fused_ema_equals_the_loop_on_the_real_networks(tmp_path, fmnist_root):
    b = Bench(fmnist_cfg(fmnist_root, tmp_path), repeats=1, warmup=0)
    tr = b.trainer
    b.byol_step_fn()()  # one real step: online and target now differ
    online = unwrap(tr.online).branch
    ref = copy.deepcopy(tr.target)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.01)
    tr.ema.update(0.9)
    ema_loop_(ref, online, 0.9)
    for (n, x), (_, y) in zip(tr.target.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=2.5e-7, atol=1e-7, msg=n)  # within 2 float32 ulps
    assert not torch.equal(next(tr.target.parameters()), next(online.parameters()))


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert bench_main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert bench_main(["--config", "experiments/fmnist.yaml", "model.width=7"]) == 2
    assert "model.width" in capsys.readouterr().err


def test_stream_bench_measures_the_loader(image_folder, tmp_path):
    res = run_bench(folder_cfg(image_folder, tmp_path, "data.num_workers=1"), repeats=2, warmup=1)
    assert res["input_pipeline"]["kind"] == "stream" and res["input_pipeline"]["images_per_s"] > 0
    assert res["byol_step"]["images_per_s"] > 0
