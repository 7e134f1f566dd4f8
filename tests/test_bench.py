"""`byol-ray bench` and the streaming input path: the code the benchmark times computes the right things.

Nothing here asserts a speed (speed lives in the benchmark's own output); every check is about what the
measured code paths produce: the JSON's figures and their ratios, the fused EMA against the loop, the
independence of per-image augmentation draws, and the streamed folder reader against the in-memory one.
"""

from __future__ import annotations

import copy
import json
import shutil

from mlflow.tracking import MlflowClient
import numpy as np
import pytest
import torch
from PIL import Image

from byol_ray.augment import TwoViews, ViewTransform
from byol_ray.bench import Bench, flat_metrics, main as bench_main, run_bench
from byol_ray.config import AugmentConfig, ConfigError, load_config
from byol_ray.data import load_split
from byol_ray.ema import ema_loop_
from byol_ray.loop import pretrain
from byol_ray.model import unwrap
from byol_ray.pipeline import FolderImages, FolderStream, PrecroppedTwoViews
from byol_ray.session import LocalSession

TINY = ["model.width=8", "model.projector_hidden=32", "model.predictor_hidden=32", "model.projector_out=16",
        "run.torch_threads=1"]


def fmnist_cfg(root, tmp_path, *extra):
    return load_config("experiments/fmnist.yaml", TINY + [
        f"data.root={root}", "data.train_subset=256", "optim.batch_size=16", "eval.final=false",
        f"run.output_dir={tmp_path}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *extra])


@pytest.fixture
def image_folder(tmp_path):
    """A real ImageNet-style folder: 3 classes of PNGs (lossless) with different sizes and aspects."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (33, 47), (64, 64), (50, 36)]
    for split, n in (("train", 12), ("val", 3)):
        for c in ("ant", "bee", "cat"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def folder_cfg(root, tmp_path, *extra):
    return load_config(None, TINY + [
        "data.dataset=folder", f"data.root={root}", "data.image_size=16", "data.stream=true",
        "eval.final=false", "eval.knn_every=0", "optim.batch_size=8", "optim.epochs=1", "model.stem=small",
        f"run.output_dir={tmp_path}", "tracking.enabled=false", *extra])


# ---- the benchmark's figures --------------------------------------------------------------------
def test_bench_json_has_the_documented_figures_and_logs_to_mlflow(tmp_path, fmnist_root, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "bench.json"
    cfg = fmnist_cfg(fmnist_root, tmp_path)
    argv = ["--config", "experiments/fmnist.yaml", "--repeats", "2", "--warmup", "1", "--json", str(out), "--mlflow",
            *TINY, f"data.root={fmnist_root}", "data.train_subset=256", "optim.batch_size=16",
            f"run.output_dir={tmp_path}", f"tracking.tracking_uri={cfg.tracking.tracking_uri}"]
    assert bench_main(argv) == 0
    printed = capsys.readouterr().out
    assert "BYOL training step" in printed and "of bare fwd+bwd" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {"setup", "byol_step", "phases_ms", "bare_fwd_bwd", "byol_over_bare", "flops", "ema",
                        "augmentation", "input_pipeline", "repeats", "warmup"}
    assert res["setup"]["backbone"] == "resnet18" and res["setup"]["batch_size"] == 16
    assert res["setup"]["width"] == 8 and res["setup"]["device"] == "cpu" and res["setup"]["precision"] == "fp32"
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

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["byol_ray.kind"] == "bench"
    assert runs[0].data.metrics["byol_over_bare"] == pytest.approx(res["byol_over_bare"])
    assert runs[0].data.metrics["ema/speedup"] == pytest.approx(e["speedup"])
    assert runs[0].info.status == "FINISHED"
    assert set(flat_metrics(res)) >= {"byol_step/images_per_s", "flops/per_step", "augmentation/speedup"}


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
    assert bench_main(["--config", "experiments/fmnist.yaml", "run.precision=bf16", "run.device=cpu"]) == 2
    assert "run.precision" in capsys.readouterr().err


# ---- batched augmentation: per-image independence -----------------------------------------------
def test_batched_augmentation_draws_each_images_parameters_independently():
    vt = ViewTransform(AugmentConfig().view1, AugmentConfig().ops, 32, (0.5,) * 3, (0.25,) * 3)
    B = 4096
    p = vt.sample_params(B, 3, (64, 64), torch.Generator().manual_seed(0), "cpu")
    scale = p["crop_scale"]
    # Neighbouring images do not share draws: lag-1 correlation ~ 0 (|r| < 4 / sqrt(B) ~ 0.06).
    for name in ("crop_scale", "brightness", "contrast", "blur_sigma"):
        x = p[name].float()
        r = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
        assert abs(r) < 0.06, (name, r)
    # Different ops of one image are independent too: P(flip and jitter) = P(flip) P(jitter).
    flip, jit = p["flip"].float(), p["jitter"].float()
    assert (flip * jit).mean().item() == pytest.approx(flip.mean().item() * jit.mean().item(), abs=0.02)
    assert scale.unique().numel() > B * 0.99
    # The same image B times gives B different views.
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    v1, v2 = TwoViews(AugmentConfig(), 32, (0.5,) * 3, (0.25,) * 3)(img, torch.Generator().manual_seed(1))
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min().item() > 0
    assert not torch.equal(v1, v2)


# ---- streaming input ----------------------------------------------------------------------------
def test_stream_centre_mode_reads_the_same_pixels_as_the_in_memory_reader(image_folder, tmp_path):
    cfg = folder_cfg(image_folder, tmp_path, "data.stream=false", "data.num_workers=2")
    mem = load_split(cfg.data, "train")
    stream = FolderStream(cfg, "train", torch.device("cpu"), mode="centre")
    assert len(stream) == len(mem) == 36 and stream.classes == mem.classes == ["ant", "bee", "cat"]
    idx = torch.tensor([35, 0, 7, 18, 12, 3])
    (images, labels), = next(stream.micro_batches(0, [[idx]]))
    assert images.dtype == torch.uint8 and torch.equal(images, mem.images[idx])
    assert torch.equal(labels, mem.labels[idx])
    # The estimated normalisation covers the whole (small) split: the in-memory statistics.
    from byol_ray.data import channel_stats

    assert stream.mean == pytest.approx(channel_stats(mem.images)[0]) and stream.std == pytest.approx(channel_stats(mem.images)[1])


def test_stream_crops_are_reproducible_independent_and_worker_count_free(image_folder, tmp_path):
    cfg = folder_cfg(image_folder, tmp_path)
    ds = FolderStream(cfg, "train", torch.device("cpu")).dataset
    a, _ = ds[(0, 5)]
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, ds[(0, 5)][0])  # same (epoch, index): same crops
    assert not torch.equal(a, ds[(1, 5)][0])  # another epoch: new crops
    assert not torch.equal(a[0], a[1])  # the two views are cropped independently
    # Full-image "crops" are exactly PIL's bicubic resize of the whole image.
    full = AugmentConfig()
    full.view1.crop_scale = full.view2.crop_scale = (1.0, 1.0)
    im = Image.open(ds.paths[2]).convert("RGB")
    full.view1.crop_ratio = full.view2.crop_ratio = (im.width / im.height,) * 2
    whole = FolderImages(list(zip(ds.paths, ds.labels)), 16, full, 0)[(0, 2)][0]
    want = np.asarray(im.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert torch.equal(whole[0], torch.from_numpy(want.copy()))
    # Batches do not depend on how many worker processes decode them.
    idx = [torch.tensor([3, 1, 4, 15]), torch.tensor([9, 2, 6, 5])]
    got = {}
    for workers in (0, 2):
        s = FolderStream(folder_cfg(image_folder, tmp_path, f"data.num_workers={workers}"), "train", torch.device("cpu"))
        got[workers] = list(s.micro_batches(2, [[i] for i in idx]))
    for [(x0, y0)], [(x2, y2)] in zip(got[0], got[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_precropped_views_apply_the_rest_of_the_augmentation():
    aug = AugmentConfig()
    pv = PrecroppedTwoViews(aug, 16, (0.5,) * 3, (0.25,) * 3)
    assert "crop" not in pv.view1.ops and "blur" in pv.view1.ops
    x = torch.randint(0, 256, (8, 2, 3, 16, 16), dtype=torch.uint8)
    v1, v2 = pv(x, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == (8, 3, 16, 16) and v1.dtype == torch.float32
    with pytest.raises(ValueError, match="pre-cropped"):
        pv(x[:, 0], torch.Generator())


def test_streamed_pretraining_runs_and_resumes_exactly(image_folder, tmp_path):
    """The loop on a streamed folder: one epoch trains; a second run from its checkpoint replays epoch 2
    exactly as an uninterrupted 2-epoch run does (crops seeded by epoch and index)."""
    base = ["data.num_workers=1", "optim.steps_per_epoch=2", "optim.warmup_epochs=0"]
    cfg = folder_cfg(image_folder, tmp_path, *base, "optim.epochs=2")
    full = pretrain(cfg, LocalSession(tmp_path / "run"))
    assert full["train"]["step"] == 4 and np.isfinite(full["train"]["loss"])
    # As if it had crashed during epoch 2: only the epoch-1 checkpoint is left.
    shutil.rmtree(tmp_path / "run" / "checkpoint_000002")
    session = LocalSession(tmp_path / "run")
    resumed = pretrain(cfg, session)
    assert len(session.reports) == 1 and resumed["train"]["step"] == 4
    assert resumed["train"]["loss"] == full["train"]["loss"]
    for k, v in full["trainer"].state_dict()["online"].items():
        assert torch.equal(v, resumed["trainer"].state_dict()["online"][k]), k


def test_stream_bench_measures_the_loader(image_folder, tmp_path):
    res = run_bench(folder_cfg(image_folder, tmp_path, "data.num_workers=1"), repeats=2, warmup=1)
    assert res["input_pipeline"]["kind"] == "stream" and res["input_pipeline"]["images_per_s"] > 0
    assert res["byol_step"]["images_per_s"] > 0


# ---- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (["run.precision=bf16"], "run.precision"),  # device auto: not necessarily a GPU
    (["run.precision=fp16", "run.device=cuda"], "run.precision"),
    (["data.stream=true"], "data.stream"),  # fashion_mnist is in memory
    (["data.dataset=folder", "data.stream=true"], "data.stream"),  # final evaluation still on
])
def test_gpu_and_stream_options_are_validated(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)
    cfg = load_config(None, ["run.precision=bf16", "run.device=cuda", "run.compile=true"])
    assert cfg.run.precision == "bf16" and cfg.run.compile
