"""Ray Tune sweeps on a real local Ray runtime with a real SQLite MLflow store: parent and child runs, the
report read back from MLflow, collapse stopped early and marked, an interrupted sweep resumed without
rerunning finished trials; and the sweep files' validation, without Ray (the report's table logic:
tests/tracking/test_report.py)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO, write_sweep

from byol_ray.config import apply_gpu_recipe
from byol_ray.distributed.sweep import noted_interrupts
from byol_ray.sweep_spec import SweepError, load_sweep, presets
from byol_ray.tracking.sweeps import stopped_on_purpose

# Without a predictor and with tau = 0 (the target is the online network), plain SGD at a high lr
# collapses within 3 epochs here: measured repr std 0.59, 0.14, 0.055, 0.044 (healthy runs stay ~0.8).
COLLAPSING = {
    "model.use_predictor": False,
    "optim.tau_base": 0.0,
    "optim.tau_schedule": "constant",
    "optim.optimizer": "sgd",
    "optim.base_lr": 2.0,
}


def children(tmp_path: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    return runs[runs["tags.byol_ray.role"] == "trial"]


# ---- sweep files -----------------------------------------------------------------------------------
def test_presets_load_with_every_paper_row(fmnist_root):
    assert {"tau", "batch", "transforms", "predictor"} <= set(presets())
    tau = load_sweep("tau")
    assert [v.name for v in tau.variants] == ["cosine", "tau=0", "tau=0.9", "tau=0.99", "tau=0.999", "tau=1"]
    assert len(tau.seeds) >= 3
    cfg = tau.trial_config("tau=0.999", 2, ["optim.epochs=1"])
    assert (cfg.optim.tau_base, cfg.optim.tau_schedule, cfg.run.seed, cfg.optim.epochs) == (0.999, "constant", 2, 1)
    assert Path(cfg.run.output_dir).is_absolute()
    tr = load_sweep("transforms")
    assert len(tr.variants) == 13  # baseline + the paper's 12 rows
    assert tr.trial_config("crop only", 0, []).augment.ops == ["crop"]
    sym = tr.trial_config("symmetric", 0, [])
    assert (sym.augment.view1.blur_prob, sym.augment.view2.blur_prob) == (0.5, 0.5)
    assert tr.trial_config("remove blur in T'", 0, []).augment.view1.blur_prob == 1.0
    batch = load_sweep("batch")
    acc = batch.trial_config("1024 (4 x 256 accumulated)", 0, [])
    assert (acc.optim.batch_size, acc.optim.accumulate_steps) == (1024, 4)
    # Every preset fixes its trials' steps in the file (the measured budget), the batch preset in images.
    assert (batch.hold, batch.steps, tau.hold, tau.steps) == ("images", 2000, "steps", 2000)
    assert {load_sweep(p).steps for p in ("transforms", "predictor")} == {2000}
    # The variant beats a command-line override of the key it is an ablation of.
    assert tau.trial_config("tau=0", 0, ["optim.tau_base=0.5"]).optim.tau_base == 0.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("variants"), "has no variants: key"),
        (lambda s: s.update(seeds=0), "seeds must be a count >= 1"),
        (lambda s: s.update(baseline="nope"), "baseline 'nope' is not one of the variants"),
        (lambda s: s.update(colour="red"), "unknown key 'colour'"),
        (lambda s: s["variants"].append({"name": "a"}), "appear twice"),
        (lambda s: s["variants"][1].update(set={"optim.tau": 0.1}), "variant 'b': unknown config key optim.tau"),
        (lambda s: s["variants"][1].update(set={"augment.ops": ["crop", "mixup"]}), "unknown value 'mixup'"),
        (lambda s: s["variants"][1].update(paper="high"), "paper must be a number"),
        (lambda s: s.update(base_config="missing.yaml"), "base_config 'missing.yaml' does not exist"),
        (lambda s: s.update(asha={"enabled": True, "grace": 1}), "unknown key 'grace'"),
        (lambda s: s.update(steps=0), "steps must be a whole number of optimiser steps >= 1"),
        (lambda s: s.update(steps="many"), "steps must be a whole number"),
        (lambda s: s.update(hold="epochs"), "hold 'epochs' must be steps"),
    ],
)
def test_bad_sweep_files_fail_with_the_key_named(tmp_path, fmnist_root, mutate, message):
    path = write_sweep(
        tmp_path, [{"name": "a"}, {"name": "b", "set": {"optim.tau_base": 0.9}}], fmnist_root=fmnist_root
    )
    spec = yaml.safe_load(path.read_text())
    mutate(spec)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_sweep(str(path))


def test_a_sweeps_layers_win_over_the_base_configs_gpu_recipe(tmp_path, fmnist_root):
    path = write_sweep(
        tmp_path,
        [{"name": "a"}, {"name": "b", "set": {"optim.tau_base": 0.5}}],
        fmnist_root=fmnist_root,
        overrides={"model.width": 8},
    )
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["on_gpu"] = {
        "optim.tau_base": 0.99,  # the variant's key
        "model.width": 64,  # the sweep's overrides
        "optim.epochs": 9,  # the command line's
        "run.seed": 7,  # the seed layer's
        "run.precision": "bf16",  # in no layer: the recipe's value holds
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = load_sweep(str(path), ["optim.epochs=2"])
    cfg = spec.trial_config("b", 3, ["optim.epochs=2"])
    gpu = apply_gpu_recipe(cfg, "cuda")
    assert (gpu.optim.tau_base, gpu.model.width, gpu.optim.epochs, gpu.run.seed) == (0.5, 8, 2, 3)
    assert (gpu.run.precision, gpu.run.device) == ("bf16", "cuda")
    baseline = apply_gpu_recipe(spec.trial_config("a", 0, ["optim.epochs=2"]), "cuda")
    assert baseline.optim.tau_base == 0.99  # a key no layer of this trial sets keeps the recipe's value


def test_unknown_preset_and_broken_yaml(tmp_path):
    with pytest.raises(SweepError, match="unknown sweep preset 'tua'.*tau"):
        load_sweep("tua")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvariants: [a, {b\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(str(bad))


# ---- real Ray Tune + Ray Train + MLflow -----------------------------------------------------------------
@pytest.mark.ray
def test_tiny_sweep_logs_parent_children_report_and_stops_collapse(tmp_path, fmnist_root, capsys):
    import ray

    from byol_ray.distributed.sweep import run_sweep

    path = write_sweep(
        tmp_path,
        [{"name": "byol", "paper": 72.5}, {"name": "collapse", "set": COLLAPSING, "paper": 0.2}],
        fmnist_root=fmnist_root,
    )
    spec = load_sweep(str(path))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_sweep(spec, ["eval.collapse_std=0.1"])
    finally:
        ray.shutdown()
    assert "= 2 trials, 2 at a time; MLflow" in capsys.readouterr().out  # 1-CPU workers on 2 CPUs, no GPU

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    (parent,) = runs[runs["tags.byol_ray.role"] == "sweep"].itertuples()
    assert parent.status == "FINISHED"
    kids = children(tmp_path)
    assert len(kids) == 2
    assert set(kids["tags.mlflow.parentRunId"]) == {parent.run_id}
    assert set(kids["tags.byol_ray.variant"]) == {"byol", "collapse"}
    assert set(kids["status"]) == {"FINISHED"}
    byol = kids[kids["tags.byol_ray.variant"] == "byol"].iloc[0]
    dead = kids[kids["tags.byol_ray.variant"] == "collapse"].iloc[0]
    assert byol["tags.collapsed"] == "false" and dead["tags.collapsed"] == "true"
    assert byol["params.optim.tau_schedule"] == "cosine" and dead["params.model.use_predictor"] == "False"
    client = mlflow.MlflowClient()
    # Stopped early: fewer epochs than configured, and evaluated at the point it stopped.
    assert len(client.get_metric_history(byol.run_id, "loss")) == 4
    dead_epochs = len(client.get_metric_history(dead.run_id, "loss"))
    assert dead_epochs < 4
    assert client.get_metric_history(dead.run_id, "collapsed")[-1].value == 1.0
    assert dead["metrics.repr_std"] < 0.1 < byol["metrics.repr_std"]
    assert not math.isnan(dead["metrics.eval/byol/linear_top1"])

    # The report reads the same numbers back from MLflow, and is logged to the parent run.
    t = report["table"].set_index("variant")
    assert t.loc["byol", "linear_mean"] == pytest.approx(byol["metrics.eval/byol/linear_top1"])
    assert t.loc["collapse", "knn_mean"] == pytest.approx(dead["metrics.eval/byol/knn_top1"])
    assert t.loc["collapse", "collapsed"] == 1 and t.loc["byol", "collapsed"] == 0
    assert t.loc["collapse", "delta"] == pytest.approx(t.loc["collapse", "linear_mean"] - t.loc["byol", "linear_mean"])
    artifacts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"sweep.json", "tiny_table.md", "tiny_table.csv", "tiny_table.png"} <= artifacts
    csv = pd.read_csv(report["files"]["csv"]).set_index("variant")
    assert csv.loc["byol", "linear_mean"] == pytest.approx(t.loc["byol", "linear_mean"])


@pytest.mark.ray
def test_a_budgeted_sweep_plans_once_for_all_trials_and_scores_the_seed_once(tmp_path, fmnist_root):
    """One warm-up fixes every trial's steps: a trial whose steps then run slower (1 s each, debug.step_delay_s)
    still trains all of them, where a trial planning for itself would re-plan to fewer; the untrained encoder
    of the seed is scored once, not once per trial, and is the one a trial of that seed starts from."""
    import ray

    from byol_ray.distributed.sweep import run_sweep
    from byol_ray.training.standalone import score_untrained

    variants = [{"name": "a"}, {"name": "slowed", "set": {"debug.step_delay_s": 1.0}}]
    spec = load_sweep(str(write_sweep(tmp_path, variants, fmnist_root=fmnist_root)))
    overrides = ["optim.time_budget_minutes=0.25"]  # 15 s: the slowed trial's 16 steps alone take 16 s
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_sweep(spec, overrides)
    finally:
        ray.shutdown()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    parent = runs[runs["tags.byol_ray.role"] == "sweep"].iloc[0]
    # The warm-up's plan: capped by optim.epochs (4 x 4 steps) on any machine that fits the budget at all.
    assert (parent["params.sweep.steps"], parent["params.sweep.steps_source"]) == ("16", "warmup")
    assert parent["params.sweep.hold"] == "steps" and float(parent["params.sweep.warmup_images_per_s"]) > 0
    kids = children(tmp_path)
    assert set(kids["status"]) == {"FINISHED"} and len(kids) == 2
    assert list(kids["params.plan.total_steps"]) == ["16", "16"]
    assert list(kids["metrics.trained_steps"]) == [16.0, 16.0]
    assert list(kids["params.optim.time_budget_minutes"]) == ["0.0", "0.0"]
    client = mlflow.MlflowClient()
    for metric in ("linear_top1", "knn_top1"):
        (logged,) = client.get_metric_history(parent["run_id"], f"untrained/seed_0/{metric}")  # once
        assert logged.value == score_untrained(spec.trial_config("a", 0, overrides).to_dict())[metric]


@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, fmnist_root):
    """SIGINT (Ctrl-C) while the second of two trials trains; the same command then finishes it."""
    path = write_sweep(tmp_path, [{"name": "a"}], seeds=2, fmnist_root=fmnist_root)
    cmd = [
        sys.executable,
        "-m",
        "byol_ray.cli",
        "sweep",
        str(path),
        "--max-concurrent",
        "1",
        "optim.epochs=6",
        "run.num_workers=1",
        "run.cpus_per_worker=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        first_done = pd.DataFrame()
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            # Read the store only once the sweep has made it: MLflow creates a SQLite store's tables in
            # several migrations, and a second process opening it meanwhile can break them.
            if "[sweep] new sweep" not in (tmp_path / "first.log").read_text():
                continue
            try:
                kids = children(tmp_path)
            except Exception:  # the store is being created
                continue
            first_done = kids[kids["status"] == "FINISHED"] if len(kids) else kids
            if len(first_done) >= 1 and (kids["status"] == "RUNNING").any():
                break
        assert len(first_done) >= 1, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = {r.run_id: r.end_time for r in first_done.itertuples()}
    # Stopped during its last trial, the sweep still knows it was interrupted (Tune returns as if done).
    assert "[sweep] interrupted with 1 of 2 trials done" in (tmp_path / "first.log").read_text()
    kids = children(tmp_path)
    assert len(kids) < 2 or (kids["status"] != "FINISHED").any(), "the sweep was not interrupted"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    kids = children(tmp_path)
    assert len(kids) == 2, (kids[["tags.byol_ray.run_name", "status"]], second.stdout[-6000:])
    assert kids["tags.byol_ray.run_name"].is_unique  # one MLflow run per trial: the interrupted one continued
    assert set(kids["status"]) == {"FINISHED"}
    for run_id, end in done_before.items():  # finished trials were not touched again
        assert kids.set_index("run_id").loc[run_id, "end_time"] == end
    client = mlflow.MlflowClient()
    for r in kids.itertuples():
        assert sorted({m.step for m in client.get_metric_history(r.run_id, "loss")}) == [1, 2, 3, 4, 5, 6]
    assert set(kids["metrics.trained_steps"]) == {24.0}  # the sweep's plan: 6 epochs of 4 steps
    assert "resuming sweep 'tiny'" in second.stdout
    # The plan and the untrained scores of the first attempt are read back, not made again.
    assert "[sweep] plan kept from the parent run: 24 steps" in second.stdout
    assert "untrained encoder already scored for seed(s) [0, 1]" in second.stdout
    parent = mlflow.search_runs(experiment_names=["byol-ray"], filter_string="tags.byol_ray.role = 'sweep'")
    parent_id = parent.iloc[0]["run_id"]
    for seed in range(2):
        assert len(client.get_metric_history(parent_id, f"untrained/seed_{seed}/knn_top1")) == 1


def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Python runs a signal's handler in the main thread between bytecodes, soon after the signal."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_ctrl_c_during_fit_is_noted_and_handed_to_tune_as_sigusr1():
    sigint, sigusr1 = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)
    env_before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    tune_saw: list[int] = []
    with noted_interrupts() as interrupted:
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # Tune leaves SIGINT to the sweep
        signal.signal(signal.SIGUSR1, lambda signum, frame: tune_saw.append(signum))  # as Tune's fit() does
        signal.raise_signal(signal.SIGINT)
        assert _wait_for(lambda: tune_saw == [signal.SIGUSR1])
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            signal.raise_signal(signal.SIGINT)
            _wait_for(lambda: False, 2.0)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGUSR1)) == (sigint, sigusr1)
    assert os.environ.get("TUNE_DISABLE_SIGINT_HANDLER") == env_before


def test_a_ctrl_c_before_tune_listens_stops_at_once():
    with pytest.raises(KeyboardInterrupt), noted_interrupts() as interrupted:
        signal.raise_signal(signal.SIGINT)  # SIGUSR1 is not Tune's yet: handing it on would end the process
        _wait_for(lambda: False, 2.0)
    assert not interrupted.is_set()


def test_a_trial_stopped_by_tune_is_told_apart_from_a_failure():
    # What a trial's driver records when Tune stops it (ASHA, Ctrl-C), as seen in real ASHA sweeps here.
    assert stopped_on_purpose("SystemExit: 1")
    assert stopped_on_purpose(
        "ActorDiedError: The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: TrainController\nThe actor is dead because its worker process has died. "
        "Worker exit type: INTENDED_USER_EXIT"
    )
    assert not stopped_on_purpose("ActorDiedError: ... Worker exit type: SYSTEM_ERROR")
    assert not stopped_on_purpose("ReplicaMismatch: replicas diverged after step 4")
