"""One live owner per run.name: the claim a driver takes before it opens its run (distributed/ownership.py).

The claims here are made by real processes: a live one is refused naming its owner, a dead one on this
machine is taken over at once with one line, a claim from another machine holds until its heartbeat is
older than the lease, and drivers racing for one run get exactly one winner. The end-to-end case, two
real `byol-ray train` runs of one name started at once, is the last test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_cluster, tiny_train

from byol_ray.config import load_config
from byol_ray.distributed.ownership import CLAIM_FILE, TTL_ENV, Owner, RunOwnedError, claim_run, machine, process_start


def cfg_for(out: Path, name: str = "twin"):
    return load_config(None, [f"run.output_dir={out}", f"run.name={name}", "tracking.enabled=false"])


def write_claim(out: Path, name: str, **fields) -> Owner:
    boot, ns = machine()
    now = time.time()
    owner = Owner("elsewhere", boot, ns, 1, process_start(1), now, now, "t-other", "run-of-the-other")
    for k, v in fields.items():
        setattr(owner, k, v)
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / CLAIM_FILE).write_text(json.dumps(owner.__dict__))
    return owner


def test_a_live_process_on_this_machine_is_refused_whatever_its_heartbeat(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # A heartbeat long past the lease: a live pid on this machine still owns the run.
        write_claim(tmp_path, "twin", host="here", pid=sleeper.pid, pid_start=process_start(sleeper.pid), heartbeat=0.0)
        with pytest.raises(RunOwnedError) as info, claim_run(cfg_for(tmp_path), ""):
            pass
        text = str(info.value)
        for part in ("run.name='twin'", f"pid {sleeper.pid}", "host here", "MLflow run run-of-the-other", "started "):
            assert part in text, text
        assert "started nothing" in text and "run.name=twin-2" in text
        assert json.loads((tmp_path / "twin" / CLAIM_FILE).read_text())["token"] == "t-other", "the claim changed"
    finally:
        sleeper.kill()
        sleeper.wait()
    # Now its process is gone: taken over at once, said in one line.
    with claim_run(cfg_for(tmp_path), "") as claim:
        assert json.loads((tmp_path / "twin" / CLAIM_FILE).read_text())["token"] == claim.owner.token
    said = [ln for ln in capsys.readouterr().out.splitlines() if "taking over" in ln]
    assert len(said) == 1 and f"pid {sleeper.pid}" in said[0] and "its process" in said[0] and "is gone" in said[0]
    assert not (tmp_path / "twin" / CLAIM_FILE).exists(), "the claim outlived its owner's exit"


def test_a_reused_pid_does_not_keep_a_claim(tmp_path, capsys):
    # pid 1 lives, but its start time is not the claim's: the claim's process is gone.
    write_claim(tmp_path, "twin", pid=1, pid_start="7")
    with claim_run(cfg_for(tmp_path), ""):
        pass
    assert "now belongs to another process" in capsys.readouterr().out


def test_a_claim_from_another_machine_holds_for_its_lease(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(TTL_ENV, "30")
    # Another boot id: its pid means nothing here, only its heartbeat counts.
    write_claim(tmp_path, "twin", boot_id="another-boot", pid=999999, heartbeat=time.time() - 20)
    with pytest.raises(RunOwnedError, match="last heartbeat 2[0-9] s ago"), claim_run(cfg_for(tmp_path), ""):
        pass
    write_claim(tmp_path, "twin", boot_id="another-boot", pid=999999, heartbeat=time.time() - 31)
    with claim_run(cfg_for(tmp_path), ""):
        pass
    assert "past the 30 s lease" in capsys.readouterr().out


def test_the_owner_renews_its_heartbeat_and_removes_its_claim(tmp_path, monkeypatch):
    monkeypatch.setenv(TTL_ENV, "1.2")  # a beat every 0.2 s
    with claim_run(cfg_for(tmp_path), "") as claim:
        claim.opened("the-run-id")
        first = json.loads((tmp_path / "twin" / CLAIM_FILE).read_text())
        time.sleep(1.0)
        later = json.loads((tmp_path / "twin" / CLAIM_FILE).read_text())
        assert later["heartbeat"] > first["heartbeat"] and later["mlflow_run_id"] == "the-run-id"
        assert later["pid"] == os.getpid() and later["pid_start"] == process_start(os.getpid())
    assert not (tmp_path / "twin" / CLAIM_FILE).exists()


def test_on_a_tracking_server_the_claim_on_the_mlflow_run_holds_across_output_folders(tmp_path, capsys):
    """Two drivers that share only a tracking server (each its own output folder, say on two machines):
    the claim the first put on the MLflow run refuses the second while its heartbeat is fresh; a stale
    one, or one whose process is gone on this machine, is not a live owner."""
    from byol_ray.tracking.server import MlflowServer
    from byol_ray.tracking.tracker import OWNER_HEARTBEAT_TAG, OWNER_TAG, Tracker

    server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts")).start()
    try:
        opts = [f"tracking.tracking_uri={server.url}", "run.name=shared"]
        second = load_config(None, [f"run.output_dir={tmp_path / 'b'}", *opts])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        first = subprocess.Popen(
            [sys.executable, "-c", FIRST_DRIVER, str(tmp_path / "a"), server.url],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert first.stdout is not None and first.stdin is not None
        run_id = first.stdout.readline().strip()
        try:
            with pytest.raises(RunOwnedError) as info, claim_run(second, server.url):
                pass
            assert "MLflow run's owner tags" in str(info.value) and f"MLflow run {run_id}" in str(info.value)
            assert f"pid {first.pid}" in str(info.value)
        finally:
            first.stdin.close()
            first.wait(timeout=60)
        tracker = Tracker(server.url, run_id)
        # The claim of a driver on another machine whose heartbeat lapsed.
        boot, ns = machine()
        remote = Owner(
            "far", "another-boot", ns, 4242, "1", time.time() - 500, time.time() - 61, "t-far", tracker.run_id
        )
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        tracker.set_tags({OWNER_TAG: json.dumps(remote.__dict__), OWNER_HEARTBEAT_TAG: str(remote.heartbeat)})
        with claim_run(second, server.url):
            pass
        # Fresh, but its process is gone on this machine: a pid here decides.
        gone = subprocess.Popen(["true"])
        gone.wait()
        local = Owner("here", boot, ns, gone.pid, "1", time.time(), time.time(), "t-gone", tracker.run_id)
        tracker.set_tags({OWNER_TAG: json.dumps(local.__dict__), OWNER_HEARTBEAT_TAG: str(local.heartbeat)})
        with claim_run(second, server.url):
            pass
        remote.heartbeat = time.time()
        tracker.set_tags({OWNER_TAG: json.dumps(remote.__dict__), OWNER_HEARTBEAT_TAG: str(remote.heartbeat)})
        with pytest.raises(RunOwnedError, match="host far, pid 4242"), claim_run(second, server.url):
            pass
    finally:
        server.stop()


# A driver that owns run `shared` and its MLflow run on a tracking server until its stdin closes.
FIRST_DRIVER = """
import sys
from byol_ray.config import load_config
from byol_ray.distributed.ownership import claim_run
from byol_ray.tracking.tracker import Tracker
cfg = load_config(None, [f"run.output_dir={sys.argv[1]}", f"tracking.tracking_uri={sys.argv[2]}", "run.name=shared"])
with claim_run(cfg, sys.argv[2]) as claim:
    tracker = Tracker.start(cfg, tags={"byol_ray.run_name": "shared"})
    claim.opened(tracker.run_id, tracker)
    print(tracker.run_id, flush=True)
    sys.stdin.read()
"""


CONTENDER = """
import sys, time
from byol_ray.config import load_config
from byol_ray.distributed.ownership import RunOwnedError, claim_run
cfg = load_config(None, [f"run.output_dir={sys.argv[1]}", "run.name=twin", "tracking.enabled=false"])
while time.time() < float(sys.argv[2]):
    pass
try:
    with claim_run(cfg, ""):
        print("won", flush=True)
        time.sleep(3)
except RunOwnedError:
    print("refused", flush=True)
"""


def test_drivers_racing_for_one_run_get_one_winner(tmp_path):
    start = time.time() + 4  # every contender imported and spinning by then
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, str(tmp_path), str(start)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["refused", "refused", "refused", "won"]


@pytest.mark.ray
def test_two_runs_of_one_name_started_at_once_train_once(tmp_path, fmnist_root):
    """Two real `byol-ray train` of one run.name at once: one trains, the other is refused in seconds
    naming the owner, and the MLflow run holds one loss point per epoch."""
    import mlflow

    out = tmp_path / "out"
    cmd = tiny_train(
        f"data.root={fmnist_root}",
        "run.num_workers=1",
        "eval.baselines=false",
        "tracking.log_model=false",
        f"run.output_dir={out}",
        "run.name=twin",
    )
    ray_tmp = tempfile.mkdtemp(prefix="row", dir="/tmp")  # this test's local Ray, ended by its processes
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        t0 = time.monotonic()
        ended: dict[int, tuple[int, str, float]] = {}
        while len(ended) < 2:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = (p.returncode, p.stdout.read() if p.stdout else "", time.monotonic() - t0)
            assert time.monotonic() - t0 < 600
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        kill_cluster(ray_tmp)
    codes = sorted(rc for rc, _, _ in ended.values())
    assert codes == [0, 2], [o[-2000:] for _, o, _ in ended.values()]
    (won,) = [o for rc, o, _ in ended.values() if rc == 0]
    ((refused, refused_after),) = [(o, s) for rc, o, s in ended.values() if rc == 2]
    assert "byol-ray: error: run.name='twin'" in refused and "is being trained by another driver" in refused
    assert "Traceback" not in refused and "[train]" not in refused and "Started a local Ray" not in refused
    owner_pid = next(p.pid for i, p in enumerate(procs) if ended[i][0] == 0)
    assert f"pid {owner_pid}" in refused, refused
    assert refused_after < 60, f"refusing took {refused_after:.0f} s"
    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["byol-ray"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["run_id"] in won
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    assert [m.step for m in client.get_metric_history(runs.iloc[0]["run_id"], "loss")] == [1, 2, 3]
    assert not (out / "twin" / CLAIM_FILE).exists()
