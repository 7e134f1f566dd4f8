"""`byol-ray eval`: subsets, the linear protocol, fine-tuning vs frozen evaluation, transfer data, MLflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from byol_ray.cli import eval as eval_cli
from byol_ray.config import Config, DataConfig
from byol_ray.core.model import build_encoder
from byol_ray.core.state import load_state
from byol_ray.data.readers import ImageData, load_split
from byol_ray.data.transfer import adapt, load_digits_splits
from byol_ray.errors import UserError
from byol_ray.eval import encoders as encoder_source
from byol_ray.eval.finetune import FinetuneOptions, balanced_subset, finetune, finetune_and_score
from byol_ray.eval.linear import PAPER_WEIGHT_DECAYS, FeatureSplit, linear_eval, regularised_linear_eval
from byol_ray.eval.scoring import extract_features

TINY_MODEL = {"width": 8, "projector_hidden": 64, "predictor_hidden": 64, "projector_out": 32}


# ---- subsets --------------------------------------------------------------------------------------
def test_balanced_subset_is_balanced_seeded_and_can_exclude():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (5000,), generator=g)  # unequal class sizes
    idx = balanced_subset(labels, 0.02, seed=7)
    counts = torch.bincount(labels[idx], minlength=5)
    assert counts.tolist() == [20] * 5  # round(0.02 * 5000 / 5) of every class
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels, 0.02, seed=7))  # deterministic per seed
    assert not torch.equal(idx, balanced_subset(labels, 0.02, seed=8))
    held = balanced_subset(labels, 0.05, seed=8, exclude=idx)
    assert not set(held.tolist()) & set(idx.tolist())
    assert torch.bincount(labels[held], minlength=5).tolist() == [50] * 5
    with pytest.raises(UserError, match="only"):
        balanced_subset(labels[:30], 1.0, seed=0)  # 6 per class needed, fewer available in some class


# ---- the linear protocol on features of known quality ---------------------------------------------
def _label_features(n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.nn.functional.one_hot(y, 10).float() + noise * torch.randn(n, 10, generator=g)
    return x, y


def test_linear_eval_of_labels_plus_noise_scores_the_bayes_rate():
    # Features = one-hot label + isotropic Gaussian noise: the best possible classifier is the argmax of
    # the features (equal priors), so a correct linear protocol scores what argmax scores, up to noise.
    xtr, ytr = _label_features(4000, 0.6, seed=0)
    xte, yte = _label_features(4000, 0.6, seed=1)
    bayes = 100.0 * (xte.argmax(1) == yte).float().mean().item()
    out = linear_eval(FeatureSplit(xtr, ytr, xte, yte), lrs=(0.01, 0.1), epochs=10, seed=0, log=lambda s: None)
    assert 40 < bayes < 90  # the noise level makes the problem neither trivial nor hopeless
    assert abs(out["top1"] - bayes) < 2.5
    assert out["top5"] >= out["top1"]
    assert set(out["val_top1"]) == {0.01, 0.1} and out["lr"] in (0.01, 0.1)
    # Pure noise features: chance level.
    noise = linear_eval(
        FeatureSplit(torch.randn(4000, 10), ytr, torch.randn(4000, 10), yte), lrs=(0.1,), epochs=5, log=lambda s: None
    )
    assert noise["top1"] < 15


def test_regularised_protocol_scores_the_bayes_rate_and_picks_its_penalty_on_held_out_data():
    # The paper's transfer protocol on the same known features: near the Bayes rate with the grid, and
    # the choice is the grid value with the best held-out score (not the test score, not the first one).
    xtr, ytr = _label_features(2000, 0.6, seed=0)
    xte, yte = _label_features(2000, 0.6, seed=1)
    bayes = 100.0 * (xte.argmax(1) == yte).float().mean().item()
    out = regularised_linear_eval(FeatureSplit(xtr, ytr, xte, yte), seed=0, log=lambda s: None)
    assert abs(out["top1"] - bayes) < 2.5 and out["top5"] >= out["top1"]
    assert sorted(out["val_top1"]) == sorted(PAPER_WEIGHT_DECAYS) and len(PAPER_WEIGHT_DECAYS) == 45
    assert PAPER_WEIGHT_DECAYS[0] == pytest.approx(1e-6) and PAPER_WEIGHT_DECAYS[-1] == pytest.approx(1e5)
    best = max(out["val_top1"].values())
    assert out["val_top1"][out["weight_decay"]] == best
    # Ties go to the stronger penalty.
    assert out["weight_decay"] == max(w for w, v in out["val_top1"].items() if v == best)
    # The penalty is applied: at 1e5 the weights are ~0, every class gets the same logit, one class is
    # predicted for every image, and the score falls to that class's share (chance).
    crushed = regularised_linear_eval(FeatureSplit(xtr, ytr, xte, yte), weight_decays=(1e5,), log=lambda s: None)
    assert crushed["top1"] < 15 and out["val_top1"][PAPER_WEIGHT_DECAYS[-1]] < 15


def test_each_split_scores_its_own_seeded_untrained_encoder():
    cfg = Config.from_dict({"model": TINY_MODEL})
    a, b, c = (encoder_source.untrained_encoder(cfg, 1, s, "cpu") for s in (3, 3, 4))
    wa, wb, wc = (m.state_dict()["conv1.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# ---- fine-tuning changes the encoder, frozen evaluation does not ----------------------------------
def test_finetuning_changes_the_encoder_and_linear_evaluation_does_not(fmnist_root):
    data = load_split(DataConfig(root=fmnist_root, train_subset=256), "train")
    torch.manual_seed(0)
    enc = build_encoder(Config.from_dict({"model": TINY_MODEL}).model, 1)
    before = copy.deepcopy(enc.state_dict())
    mean, std = [0.29], [0.35]

    feats = extract_features(enc, data.images, 28, mean, std, 128)
    linear_eval(
        FeatureSplit(feats[:200], data.labels[:200], feats[200:], data.labels[200:]),
        lrs=(0.1,),
        epochs=2,
        log=lambda s: None,
    )
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # BN buffers included

    # finetune_and_score fine-tunes copies: the encoder passed in (BYOL's, reused per fraction) is intact.
    r = finetune_and_score(
        lambda: copy.deepcopy(enc),
        data.images[:200],
        data.labels[:200],
        data.images[200:],
        data.labels[200:],
        10,
        28,
        mean,
        std,
        lrs=[0.05],
        steps=3,
        options=FinetuneOptions(batch_size=32),
        log=lambda s: None,
    )
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    tuned = r["model"][0].state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], tuned[k])]
    assert "conv1.weight" in changed and any("running_mean" in k for k in changed)

    model = finetune(
        enc,
        10,
        data.images[:64],
        data.labels[:64],
        28,
        mean,
        std,
        lr=0.05,
        steps=2,
        options=FinetuneOptions(batch_size=32),
        log=lambda s: None,
    )
    assert model[0] is enc and not torch.equal(before["conv1.weight"], enc.conv1.weight)


# ---- transfer data --------------------------------------------------------------------------------
def test_digits_and_channel_resolution_adaptation():
    train, test = load_digits_splits(seed=0)
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.3 * 1797) < 2
    assert train.images.shape[1:] == (1, 8, 8) and train.images.max() == 255
    assert torch.equal(torch.bincount(train.labels) > 120, torch.ones(10, dtype=torch.bool))  # stratified
    assert torch.equal(load_digits_splits(seed=0)[1].labels, test.labels)

    up, notes = adapt(train, channels=1, size=28)
    assert up.images.shape[1:] == (1, 28, 28) and up.images.dtype == torch.uint8
    assert len(notes) == 1 and "8x8" in notes[0] and "28x28" in notes[0]
    rgb, notes = adapt(train, channels=3, size=8)
    assert rgb.images.shape[1:] == (3, 8, 8) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    assert "repeated" in notes[0]
    colour = ImageData(
        torch.stack([torch.full((4, 4), 200), torch.zeros(4, 4), torch.zeros(4, 4)])
        .to(torch.uint8)[None]
        .repeat(2, 1, 1, 1)
        .contiguous(),
        torch.zeros(2, dtype=torch.int64),
        ["a"],
        "toy/train",
    )
    grey, notes = adapt(colour, channels=1, size=4)
    assert grey.images.shape[1] == 1 and int(grey.images[0, 0, 0, 0]) == round(200 * 0.2989)
    assert "averaged" in notes[0]


# ---- the command, its MLflow child run --------------------------------------------------------------
def _pretrained_checkpoint(tmp_path: Path, fmnist_root: str, monkeypatch) -> tuple[Path, str, str]:
    """A real (tiny) pretraining: an MLflow run and the loop's checkpoint under ray_results/<name>."""
    from byol_ray.tracking.tracker import Tracker
    from byol_ray.training.loop import pretrain
    from byol_ray.training.session import LocalSession

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = Config.from_dict(
        {
            "data": {"root": fmnist_root, "train_subset": 1000, "test_subset": 200},
            "model": TINY_MODEL,
            "optim": {"epochs": 1, "batch_size": 64, "steps_per_epoch": 2, "warmup_epochs": 0},
            "eval": {"final": False},
            "run": {"name": "tiny", "output_dir": str(tmp_path), "cpus_per_worker": 1},
            "tracking": {"tracking_uri": uri, "experiment": "eval-test"},
        }
    )
    parent = Tracker.start(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    parent.log_artifact(tmp_path / "config.json")
    run_dir = tmp_path / "ray_results" / "tiny"
    pretrain(cfg, LocalSession(run_dir), parent, parent.run_id)
    parent.end()
    return run_dir, uri, parent.run_id


def _child_runs(uri: str, parent: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("eval-test")
    return client, client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.mark.ray
def test_semi_on_ray_logs_a_child_run_with_recorded_subsets(tmp_path, fmnist_root, monkeypatch):
    run_dir, uri, parent = _pretrained_checkpoint(tmp_path, fmnist_root, monkeypatch)
    rc = eval_cli.main(
        [
            "semi",
            "--encoder",
            str(run_dir),
            "--tracking-uri",
            uri,
            "--ray",
            "--cpus",
            "1",
            "--fractions",
            "0.02,0.04",
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--seed",
            "3",
            "--test-subset",
            "100",
        ]
    )
    assert rc == 0
    client, runs = _child_runs(uri, parent)
    assert len(runs) == 1
    run = runs[0]
    p = run.data.params
    assert p["evaluation.protocol"] == "semi" and p["evaluation.subset_seed"] == "3"
    assert p["evaluation.encoder_kind"] == "checkpoint" and p["evaluation.subset_size.2pct"] == "20"
    assert run.data.tags["byol_ray.run_name"] != "tiny"  # train.py must not resume it as the pretraining run
    assert "byol/2pct_labels_top_1" in run.data.metrics and "delta/4pct_labels_top_1" in run.data.metrics
    art = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_semi.md", "eval_semi.csv", "subsets.json"} <= art
    recorded = json.loads(Path(client.download_artifacts(run.info.run_id, "subsets.json")).read_text())
    train = load_split(DataConfig(root=fmnist_root, train_subset=1000), "train")
    assert recorded["subsets"]["0.02"] == balanced_subset(train.labels, 0.02, 3).tolist()
    md = (tmp_path / "tiny" / "eval_semi" / "eval_semi.md").read_text()
    assert "| BYOL - untrained encoder |" in md and "2% labels top-1" in md


def test_transfer_from_an_mlflow_model_uri(tmp_path, fmnist_root, monkeypatch):
    from byol_ray.tracking.tracker import Tracker

    run_dir, uri, parent = _pretrained_checkpoint(tmp_path, fmnist_root, monkeypatch)
    state = load_state(sorted(run_dir.glob("checkpoint_*"))[-1])
    encoder, channels = encoder_source.load_encoder(encoder_source.resolve_encoder(str(run_dir), uri))
    Tracker(uri, parent).log_model(encoder, "encoder", input_example=torch.zeros(2, 1, 28, 28).numpy())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    ref = encoder_source.resolve_encoder(f"runs:/{parent}/encoder", uri, str(tmp_path))
    assert ref.kind == "mlflow" and ref.parent_run_id == parent and ref.config == state.config
    loaded, ch = encoder_source.load_encoder(ref)
    assert ch == channels == 1
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())

    rc = eval_cli.main(
        [
            "transfer",
            "--encoder",
            f"runs:/{parent}/encoder",
            "--tracking-uri",
            uri,
            "--output-dir",
            str(tmp_path),
            "--dataset",
            "digits",
            "--weight-decays",
            "1e-4,1e-2",
            "--train-subset",
            "300",
            "--test-subset",
            "200",
            "--splits",
            "2",
        ]
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert rc == 0
    _, runs = _child_runs(uri, parent)
    assert len(runs) == 1 and runs[0].data.params["evaluation.encoder_kind"] == "mlflow"
    assert "byol/digits_linear_top_1" in runs[0].data.metrics
    md = (tmp_path / "tiny" / "eval_transfer" / "eval_transfer.md").read_text()
    assert "resized" in md and "digits linear top-1" in md
    # Two seeded splits, each scored (a penalty chosen per split and encoder), the table holding their mean.
    assert "mean of 2 seeded train/test splits (seeds 0..1, each with an untrained encoder of the same seed)" in md
    assert "L-BFGS" in md and "penalty picked from 2 values 0.0001..0.01" in md
    params = runs[0].data.params
    assert {k for k in params if k.endswith("digits.split1")} == {
        "evaluation.weight_decay.byol.digits.split1",
        "evaluation.weight_decay.untrained_encoder.digits.split1",
    }
    assert params["evaluation.weight_decay.byol.digits.split1"] in ("0.0001", "0.01")
    assert params["evaluation.solver"] == "lbfgs" and float(params["evaluation.paired_diff_stderr.digits"]) >= 0


def test_bad_encoder_is_a_clear_error(tmp_path, capsys):
    rc = eval_cli.main(["linear", "--encoder", str(tmp_path / "nope"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2 and "no state.pt" in err and "Traceback" not in err
