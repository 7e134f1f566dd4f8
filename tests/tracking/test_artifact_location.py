"""Where a store's artifacts go: beside a SQLite store, whatever directory a run is started from, and a
warning with the way out for an experiment made earlier in a folder that vanishes (real SQLite stores)."""

from __future__ import annotations

import mlflow
import pytest

from byol_ray.config import load_config
from byol_ray.tracking.tracker import Tracker
from byol_ray.tracking.uri import artifacts_at_risk

RAY_COPY = "/tmp/ray/session_2026-01-01_00-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_ab12/mlruns/1"


def test_artifacts_go_beside_the_sqlite_store_not_into_the_working_directory(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as under `ray job submit`: a working dir that is not the output dir
    out = tmp_path / "out"
    cfg = load_config(None, [f"run.output_dir={out}", "run.name=a"])
    tracker = Tracker.start(cfg)
    (tmp_path / "note.txt").write_text("kept")
    tracker.log_artifact(tmp_path / "note.txt")
    exp = mlflow.tracking.MlflowClient(tracker.uri).get_experiment_by_name("byol-ray")
    assert exp.artifact_location == str(out / "mlartifacts")
    assert (out / "mlartifacts" / tracker.run_id / "artifacts" / "note.txt").read_text() == "kept"
    assert list(elsewhere.iterdir()) == []  # no ./mlruns
    assert "warning" not in capsys.readouterr().err


def test_an_experiment_in_a_vanishing_folder_gets_a_warning_with_the_way_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    uri = f"sqlite:///{out}/mlflow.db"
    # Made by an earlier version from inside a Ray job: MLflow's ./mlruns of Ray's copy of the working dir.
    mlflow.tracking.MlflowClient(uri).create_experiment("byol-ray", artifact_location=RAY_COPY)
    cfg = load_config(None, [f"run.output_dir={out}", "run.name=a"])
    Tracker.start(cfg)
    Tracker.start(cfg.replace({"run.name": "b"}))
    err = capsys.readouterr().err
    assert err.count("byol-ray: warning:") == 1  # once per process, not once per run
    warning = err[err.index("byol-ray: warning:") :].strip()
    assert "\n" not in warning  # one paragraph
    for phrase in [
        f"keeps its artifacts in {RAY_COPY}",
        "Ray's temporary copy",
        "tracking.experiment=byol-ray-2",
        f"its artifacts will go to {out / 'mlartifacts'}",
        f"UPDATE experiments SET artifact_location='{out / 'mlartifacts'}' WHERE name='byol-ray'",
    ]:
        assert phrase in warning, phrase
    # The way out works: a new experiment's artifacts go beside the store, without a warning.
    tracker = Tracker.start(cfg.replace({"tracking.experiment": "byol-ray-2", "run.name": "c"}))
    assert mlflow.tracking.MlflowClient(uri).get_run(tracker.run_id).info.artifact_uri.startswith(f"{out}/mlartifacts/")
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "location, store, at_risk",
    [
        (RAY_COPY, "/data/mlflow.db", "Ray's temporary copy"),
        (f"file://{RAY_COPY}", "/data/mlflow.db", "Ray's temporary copy"),
        ("/tmp/mlruns/1", "/data/mlflow.db", "a temporary folder"),
        ("mlruns/1", "/data/mlflow.db", "a relative folder"),
        ("/tmp/t/mlartifacts", "/tmp/t/mlflow.db", ""),  # inside the store's own folder: lives with it
        ("/data/mlartifacts", "/data/mlflow.db", ""),
        ("mlflow-artifacts:/1", "/data/mlflow.db", ""),  # a tracking server's
        ("s3://bucket/mlflow/1", "/data/mlflow.db", ""),
    ],
)
def test_which_artifact_locations_are_at_risk(location, store, at_risk):
    why = artifacts_at_risk(location, f"sqlite:///{store}")
    assert (at_risk in why) if at_risk else why == "", why
