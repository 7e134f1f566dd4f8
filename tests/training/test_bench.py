"""`byol-ray bench`: the code the benchmark times computes the right things, and it is training's code.

Nothing here asserts a speed (speed lives in the benchmark's own output); every check is about what the
measured code paths produce: the JSON's figures and their ratios, the fused EMA against the loop, and that
the benchmark's data, batches and loop figure come from the training loop's own functions.
"""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
from conftest import SMALL_MODEL, folder_cfg
from mlflow.tracking import MlflowClient

from byol_ray.cli.bench import main as bench_main
from byol_ray.config import load_config
from byol_ray.core.ema import ema_loop_
from byol_ray.core.engine import cpu_bf16_supported
from byol_ray.core.model import unwrap
from byol_ray.training import bench as bench_module
from byol_ray.training import loop
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
        "--epoch-steps",
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
    assert "training loop, steady state (train_one_epoch, 2 epochs of 1 steps)" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {
        "setup",
        "byol_step",
        "loop_epoch",
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
    assert res["setup"]["data_on"] == "cpu" and not res["setup"]["synthetic"]
    # The main config's run.precision=auto, as the replica resolved it on this CPU.
    assert res["setup"]["precision"] == ("bf16" if cpu_bf16_supported() else "fp32")
    step, bare = res["byol_step"], res["bare_fwd_bwd"]
    for sec in (step, bare):
        assert sec["step_ms"] > 0
        assert sec["images_per_s"] == pytest.approx(16 / (sec["step_ms"] / 1e3), rel=1e-9)
    assert res["byol_over_bare"] == pytest.approx(bare["step_ms"] / step["step_ms"], rel=1e-9)
    # One loop epoch of --epoch-steps steps after every that many repetitions: 2 repetitions, 2 epochs.
    lp = res["loop_epoch"]
    assert lp["epochs"] == 2 and lp["steps_per_epoch"] == 1 and lp["images_per_s"] > 0
    assert lp["step_ms"] == pytest.approx(16e3 / lp["images_per_s"], rel=1e-9)
    assert lp["over_step"] == pytest.approx(lp["images_per_s"] / step["images_per_s"], rel=1e-9)
    assert lp["over_step_mean"] == pytest.approx(lp["images_per_s"] / step["mean_images_per_s"], rel=1e-9)
    assert step["mean_images_per_s"] > 0
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
    assert runs[0].data.metrics["loop_epoch/over_step"] == pytest.approx(lp["over_step"])
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
    assert bench_main(["--epoch-steps", "0"]) == 2
    assert "--epoch-steps" in capsys.readouterr().err
    assert bench_main(["--config", "experiments/fmnist.yaml", "model.width=7"]) == 2
    assert "model.width" in capsys.readouterr().err


def test_stream_bench_measures_the_loader(image_folder, tmp_path):
    res = run_bench(folder_cfg(image_folder, tmp_path, "data.num_workers=1"), repeats=2, warmup=1)
    assert res["input_pipeline"]["kind"] == "stream" and res["input_pipeline"]["images_per_s"] > 0
    assert res["setup"]["data_on"] == "stream"
    assert res["byol_step"]["images_per_s"] > 0
    # The loop's epochs read their batches through the loader: 36 images of batch 8 make 4-step epochs.
    assert res["loop_epoch"]["images_per_s"] > 0 and res["loop_epoch"]["steps_per_epoch"] == 4


# ---- the benchmark runs training's own code ----------------------------------------------------------
def test_bench_data_goes_through_the_loops_loader_and_placement(tmp_path, fmnist_root, monkeypatch):
    """The dataset and --synthetic images both reach the bench through the loop's in-memory path, so the
    bench keeps them where training would (loop.keeps_on_device decides, as it does for a training run)."""
    decided = []
    real = loop.keeps_on_device

    def spy(images, device):
        decided.append((tuple(images.shape), device))
        return real(images, device)

    monkeypatch.setattr(loop, "keeps_on_device", spy)
    cfg = fmnist_cfg(fmnist_root, tmp_path)
    b = Bench(cfg, repeats=1, warmup=0)
    assert decided == [((256, 1, 28, 28), b.device)]
    assert isinstance(b.data, loop.TrainData) and b.data.stream is None
    ref = loop.load_train_data(cfg, b.device)
    torch.testing.assert_close(b.data.images, ref.images, rtol=0, atol=0)
    assert b.data.images.device == ref.images.device and b.data.inputs == ref.inputs
    assert b.trainer.steps_per_epoch == loop.steps_per_epoch(cfg, 256) == 16

    decided.clear()
    s = Bench(
        fmnist_cfg("/nonexistent", tmp_path, "optim.time_budget_minutes=1", "eval.final=true"),
        repeats=1,
        warmup=0,
        synthetic=48,
    )
    assert decided == [((48, 3, 28, 28), s.device)]
    assert isinstance(s.data, loop.TrainData) and len(s.data) == 48
    # No dataset on disk: the budget's plan counts the synthetic images only, and reads no test split.
    assert len(s.data.test_split()) == 0
    assert s.budget_plan(0.01) is not None


def test_keeps_on_device_puts_the_split_on_a_gpu_only_where_it_fits_easily(monkeypatch):
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)  # 160 bytes
    assert not loop.keeps_on_device(images, torch.device("cpu"))
    for memory, fits in ((8 * 160, True), (8 * 160 - 1, False)):
        gpu = types.SimpleNamespace(total_memory=memory)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, gpu=gpu: gpu)
        assert loop.keeps_on_device(images, torch.device("cuda", 0)) is fits


def test_bench_steps_take_the_loops_batches_epoch_after_epoch(tmp_path, fmnist_root):
    """Micro-batches (optim.accumulate_steps) and order as loop.epoch_batches gives them to train_one_epoch,
    into the next epoch's permutation once an epoch is used up."""
    cfg = fmnist_cfg(fmnist_root, tmp_path, "optim.accumulate_steps=2")
    b = Bench(cfg, repeats=1, warmup=0)
    spe = b.trainer.steps_per_epoch
    want = list(loop.epoch_batches(cfg, b.data, 0, spe, 0, 1)) + list(loop.epoch_batches(cfg, b.data, 1, spe, 0, 1))
    got = [b.images, b.labels]  # the fixed batch is the first step's, its micro-batches joined
    torch.testing.assert_close(got[0], torch.cat([x for x, _ in want[0]]), rtol=0, atol=0)
    for i, step in enumerate(want[1:], start=1):
        micro = b.next_batch()
        assert len(micro) == 2 and all(len(x) == 8 for x, _ in micro), i
        for (x, y), (wx, wy) in zip(micro, step):
            assert torch.equal(x, wx) and torch.equal(y, wy), i
    assert b.epoch == 1


def test_the_loop_figure_is_the_loops_own_train_one_epoch(tmp_path, fmnist_root, monkeypatch):
    """The bench reports the images/s that train_one_epoch itself returns, for epochs of --epoch-steps real
    steps of the bench's own trainer, one after every --epoch-steps repetitions (one warm-up epoch first)."""
    calls = []
    marks = iter([111.0, 333.0, 222.0])

    def spy(cfg, trainer, data, epoch, rank, world, plan):
        metrics = loop.train_one_epoch(cfg, trainer, data, epoch, rank, world, plan)
        calls.append((trainer, data, epoch, plan.steps_in_epoch(epoch), metrics["step"]))
        return {**metrics, "images_per_s": next(marks)}

    monkeypatch.setattr(bench_module, "train_one_epoch", spy)
    b = Bench(fmnist_cfg(fmnist_root, tmp_path), repeats=3, warmup=1, epoch_steps=2)
    steps, bares, loops = b.step_bare_loop()
    assert loops == [333.0, 222.0]  # the warm-up epoch's figure is dropped
    assert [(c[0], c[1], c[2], c[3]) for c in calls] == [(b.trainer, b.data, e, 2) for e in range(3)]
    # Real steps of the same replica: the warm-up epoch, 1 warm-up step, then the timed steps and epochs.
    assert [c[4] for c in calls] == [2, 7, 10]
    assert b.trainer.step == 1 + 3 + 3 * 2 and len(steps) == len(bares) == 3
    assert len(loops) == math.ceil(3 / 2)
