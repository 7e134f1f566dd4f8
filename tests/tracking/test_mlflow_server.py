"""A real MLflow tracking server (`byol-ray mlflow-server`, database backend, served artifacts): training
over HTTP through Ray Train and reading the run back, no secret reaching MLflow, and the server going away
in the middle of a run without a metric being lost."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, TINY

from byol_ray.config import load_config
from byol_ray.tracking.server import MlflowServer, free_port, healthy, port_in_use
from byol_ray.tracking.tracker import Tracker, deliver_undelivered, undelivered_path, worker_tracker

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4f9d1c",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-8e2b7a",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-3c5e0f",
}
URI_PASSWORD = "uri-pw-77d3e1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; tests that stop it start it again on the same port and store."""
    d = tmp_path_factory.mktemp("mlflow_server")
    s = MlflowServer(f"sqlite:///{d}/mlflow.db", str(d / "artifacts"), log_path=d / "server.log").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ray_local():
    """Local Ray whose processes (driver and workers) see secrets in their environment, as on a cloud
    machine; none of them may reach MLflow."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def new_run(uri: str, name: str) -> str:
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("byol-ray") or client.get_experiment(client.create_experiment("byol-ray"))
    return client.create_run(exp.experiment_id, run_name=name).info.run_id


def steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, key))


def test_cli_serves_on_localhost_and_stops_with_its_workers(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "byol_ray.cli",
            "mlflow-server",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/m.db",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = ""
        while "[mlflow-server]" not in banner:  # printed once /health answers, after MLflow's own lines
            line = proc.stdout.readline()
            assert line, "byol-ray mlflow-server ended before it was ready"
            banner = line
        assert f"http://127.0.0.1:{port}" in banner, banner
        assert healthy(f"http://127.0.0.1:{port}")
        # Bound to loopback only: this host's other addresses do not answer on the port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outward interface
                outward = s.getsockname()[0]
            except OSError:
                outward = "127.0.0.1"
        if not outward.startswith("127."):
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((outward, port)) != 0, f"the server answers on {outward}"
        assert Path(tmp_path / "m.db").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not port_in_use("127.0.0.1", port), "the server's workers outlived `byol-ray mlflow-server`"


def test_metrics_queued_while_the_server_is_down_are_delivered_or_reported(server, tmp_path, monkeypatch):
    run_id = new_run(server.url, "spool")
    spool = tmp_path / "undelivered_metrics.jsonl"
    driver = Tracker(server.url, run_id)
    t = Tracker(server.url, run_id, spool=spool)
    t.log_metrics({"loss": 1.0}, step=1)
    assert not spool.exists()
    server.stop()
    try:
        t.log_metrics({"loss": 0.9}, step=2)  # returns (one short try), queued on disk
        t.log_metrics({"loss": 0.8}, step=3)
        assert [json.loads(line)["step"] for line in spool.read_text().splitlines()] == [2, 3]
        # The driver's end-of-run delivery reports what it still cannot send, and keeps it. (Its client is
        # patient, retrying for minutes; without retries the report is immediate.)
        with monkeypatch.context() as mp:
            mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            report = deliver_undelivered(driver, spool)
        assert "2 of 2 metric values could not be sent" in report and str(spool) in report
        assert len(spool.read_text().splitlines()) == 2
        del t  # a worker that dies here loses nothing: its successor reads the queue back
    finally:
        server.start()
    t2 = Tracker(server.url, run_id, spool=spool)
    assert len(t2.pending) == 2
    t2.log_metrics({"loss": 0.7}, step=4)
    values = {m.step: m.value for m in mlflow.tracking.MlflowClient(server.url).get_metric_history(run_id, "loss")}
    assert values == {1: 1.0, 2: 0.9, 3: 0.8, 4: 0.7}
    assert not spool.exists()
    # And the driver's delivery, with the server back.
    Path(spool).write_text(json.dumps({"run_id": run_id, "key": "lr", "value": 0.1, "timestamp": 1, "step": 7}) + "\n")
    assert "delivered 1 metric values" in deliver_undelivered(driver, spool)
    assert steps(server.url, run_id, "lr") == [7] and not spool.exists()


def test_system_metrics_stop_at_an_outage_and_start_again_when_the_server_is_back(server, tmp_path):
    """The rank-0 writer's system-metrics sampler (MLflow's own) meets a server that goes away: its thread
    ends instead of retrying for minutes, queued metrics stay queued, and the first flush that gets through
    starts it again, continuing the run's system/* steps."""
    from byol_ray.config import TrackingConfig

    key = "system/cpu_utilization_percentage"
    run_id = new_run(server.url, "system-metrics")
    client = mlflow.tracking.MlflowClient(server.url)

    def wait_until(cond, what: str, limit_s: float = 120) -> None:
        deadline = time.monotonic() + limit_s
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    cfg = TrackingConfig(system_metrics_interval_s=0.5)
    with worker_tracker(server.url, run_id, tmp_path / "undelivered_metrics.jsonl", cfg) as t:
        sampler = t.system_metrics
        wait_until(lambda: len(client.get_metric_history(run_id, key)) >= 2, "no system metrics sampled")
        server.stop()
        try:
            wait_until(lambda: not sampler.running, "the sampler kept retrying a server that is down")
            t.log_metrics({"loss": 1.0}, step=1)  # one short try; queued
            assert len(t.pending) == 1 and not sampler.running
        finally:
            server.start()
        before = client.get_metric_history(run_id, key)
        t.log_metrics({"loss": 0.9}, step=2)  # gets through: the queue is sent, the sampler starts again
        assert not t.pending and sampler.running
        wait_until(lambda: len(client.get_metric_history(run_id, key)) > len(before), "the sampler did not resume")
    assert t.system_metrics is None  # stopped with the block
    after = sorted(m.step for m in client.get_metric_history(run_id, key))
    assert after == sorted(set(after)), "a restarted sampler logged a step twice"
    assert max(after) > max(m.step for m in before)
    assert steps(server.url, run_id) == [1, 2]


@pytest.mark.ray
def test_training_over_http_is_read_back_and_holds_no_secret(server, ray_local, tmp_path, monkeypatch):
    from byol_ray.distributed.driver import run_training

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]
    uri = server.url.replace("http://", f"http://byol:{URI_PASSWORD}@")
    cfg = load_config(
        None,
        TINY
        + [
            "optim.epochs=2",
            f"run.output_dir={tmp_path}",
            "run.name=http",
            f"tracking.tracking_uri={uri}",
            "tracking.log_model=false",
        ],
    )
    out = run_training(cfg)
    mlflow.set_tracking_uri(server.url)
    runs = mlflow.search_runs(experiment_names=["byol-ray"], filter_string="tags.`byol_ray.run_name` = 'http'")
    assert len(runs) == 1 and runs.iloc[0]["run_id"] == out["run_id"]
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["params.optim.epochs"] == "2" and run["params.run.num_workers"] == "2"
    assert steps(server.url, out["run_id"]) == [1, 2]
    assert run["metrics.eval/byol/linear_top1"] > 10
    # Artifacts went through the server (--serve-artifacts) into its artifacts destination.
    client = mlflow.tracking.MlflowClient(server.url)
    names = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"config.json", "eval_table.md", "eval_table.csv"} <= names
    stored = "".join(
        p.read_text(errors="replace") for p in Path(server.artifacts_destination).rglob("*") if p.is_file()
    )
    assert '"tracking_uri"' in stored  # the config is there ...
    # ... and no secret is, in params, tags, artifacts or the local config copy.
    params_tags = json.dumps({**client.get_run(out["run_id"]).data.params, **client.get_run(out["run_id"]).data.tags})
    local = "".join(p.read_text(errors="replace") for p in (tmp_path / "http").rglob("*") if p.is_file())
    for secret in [*SECRETS.values(), URI_PASSWORD]:
        assert secret not in params_tags and secret not in stored and secret not in local, secret
    assert run["params.tracking.tracking_uri"] == server.url.replace("http://", "http://byol:***@")


@pytest.mark.ray
def test_server_outage_mid_run_loses_no_metric(server, ray_local, tmp_path):
    """Stop the server once the driver has set the run up (before any epoch's metrics), restart it after
    two epochs were queued: every epoch's metrics end up in MLflow, and the run finishes."""
    from byol_ray.distributed.driver import run_training

    cfg = load_config(
        None,
        TINY
        + [
            "optim.epochs=5",
            f"run.output_dir={tmp_path}",
            "run.name=outage",
            f"tracking.tracking_uri={server.url}",
            "tracking.log_model=false",
        ],
    )
    spool = undelivered_path(cfg)
    result: dict = {}

    def train() -> None:
        try:
            result["out"] = run_training(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    client = mlflow.tracking.MlflowClient(server.url)
    deadline = time.monotonic() + 300

    def wait_for(cond, what: str) -> None:
        while not cond():
            assert thread.is_alive() and time.monotonic() < deadline, f"training ended before {what}: {result}"
            time.sleep(0.1)

    def run_set_up() -> bool:
        # The driver's last call before Ray Train starts the workers is the config artifact.
        exp = client.get_experiment_by_name("byol-ray")
        runs = client.search_runs([exp.experiment_id], "tags.`byol_ray.run_name` = 'outage'") if exp else []
        return bool(runs) and "config.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}

    wait_for(run_set_up, "the run was set up")
    server.stop()
    queued: set[int] = set()

    def two_epochs_queued() -> bool:
        if spool.exists():
            queued.update(json.loads(line)["step"] for line in spool.read_text().splitlines() if line.strip())
        return len(queued) >= 2

    try:
        wait_for(two_epochs_queued, "two epochs were queued")
    finally:
        server.start()
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    run_id = result["out"]["run_id"]
    assert {1, 2} <= queued
    assert steps(server.url, run_id) == [1, 2, 3, 4, 5]
    assert steps(server.url, run_id, "target_checksum_rank1") == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool.exists()  # everything delivered, nothing left to report


def test_server_down_as_the_run_ends_loses_nothing_and_a_rerun_logs_it(
    server, ray_local, tmp_path, monkeypatch, capsys
):
    """The server goes away after the last epoch, as the driver starts logging the run's final results:
    the command fails with one clear paragraph (fast: the driver's marking calls make one short try), the
    run stays unfinished, and rerunning the same command once the server is back logs the results from
    the final checkpoint without training again."""
    from byol_ray.distributed import driver, results
    from byol_ray.tracking.uri import TrackingError

    cfg = load_config(
        None,
        TINY
        + [
            f"run.output_dir={tmp_path}",
            "run.name=late",
            f"tracking.tracking_uri={server.url}",
            "tracking.log_model=false",
        ],
    )
    real_deliver = results.deliver_undelivered

    def server_gone(tracker, path):
        server.stop()
        return real_deliver(tracker, path)

    monkeypatch.setattr(results, "deliver_undelivered", server_gone)
    # The final calls keep MLflow's retries in real runs (minutes); one try keeps the test short.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        with pytest.raises(TrackingError) as err:
            driver.run_training(cfg)
    finally:
        server.start()
    msg = str(err.value)
    assert "training finished and its final checkpoint is saved" in msg and "rerun the same command" in msg
    assert "eval_table.md" in msg
    client = mlflow.tracking.MlflowClient(server.url)
    run = client.search_runs(
        [client.get_experiment_by_name("byol-ray").experiment_id], "tags.`byol_ray.run_name` = 'late'"
    )[0]
    assert run.info.status == "RUNNING" and run.info.run_id in msg
    assert "eval_table.md" not in {a.path for a in client.list_artifacts(run.info.run_id)}

    monkeypatch.setattr(results, "deliver_undelivered", real_deliver)
    out = driver.run_training(cfg)
    assert out["run_id"] == run.info.run_id
    assert f"[driver] resuming MLflow run {run.info.run_id}" in capsys.readouterr().out
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    # The three epochs of the first command, once each: the rerun restored the final checkpoint and
    # trained nothing (retraining would have logged steps 1-3 again).
    assert steps(server.url, run.info.run_id) == [1, 2, 3]
    assert {"eval_table.md", "eval_table.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert after.data.metrics["eval/byol/linear_top1"] > 10


def test_safe_defaults():
    """Checkpoints load without pickle; what we start listens on localhost unless told otherwise."""
    import inspect
    import re

    import ray

    from byol_ray.cli.mlflow_server import build_parser

    package = REPO / "byol_ray"
    loads = [
        (p.name, line)
        for p in package.rglob("*.py")
        for line in p.read_text().splitlines()
        if re.search(r"\btorch\.load\(", line)
    ]
    assert loads and all("weights_only=True" in line for _, line in loads), loads
    assert build_parser().parse_args([]).host == "127.0.0.1"
    # The driver's local Ray (ray.init without an address) keeps the dashboard on Ray's default host.
    assert inspect.signature(ray.init).parameters["dashboard_host"].default == "127.0.0.1"
    assert all("dashboard_host" not in p.read_text() or "127.0.0.1" in p.read_text() for p in package.rglob("*.py"))
