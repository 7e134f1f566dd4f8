"""Bad input wherever a user types something, through the real `byol-ray` CLI in a subprocess: each case
ends with exit code 2 and one paragraph naming the problem and the fix, no Python traceback (unless
--debug), no Ray session started (except where finding the problem needs the cluster: then no worker is
requested), and no MLflow run left RUNNING."""

from __future__ import annotations

import gzip
import http.server
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import REPO, cluster_pids, kill_cluster

from byol_ray.config import load_config
from byol_ray.core.state import TrainState, save_state
from byol_ray.tracking.server import free_port

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Case:
    id: str
    argv: list[str]  # after `byol-ray`; {tmp} is the case's folder
    phrases: list[str]  # the problem and the fix, as the message must name them
    setup: Callable[[Path], None] | None = None
    train_defaults: bool = True  # append output dir and tracking store overrides to `train`
    starts_ray: bool = False  # finding the problem needs the cluster (its resources)
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of the test's environment
    # A bound on how long refusing takes, where the defect was a hang (a dead Ray address: 150 s and more of
    # Ray's retries). Measured on the shared 2-core machine: 11-15 s, Python's imports included; the bound
    # leaves room for a loaded machine and still catches the hang.
    within_s: float = 0


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


def corrupt_fmnist(tmp: Path) -> None:
    """A copy of Fashion-MNIST whose train images file is cut short (an interrupted download)."""
    d = tmp / "fmnist"
    d.mkdir()
    for f in FMNIST.iterdir():
        shutil.copy(f, d / f.name)
    raw = gzip.decompress((FMNIST / "train-images-idx3-ubyte.gz").read_bytes())
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))


def checkpoint_of_other_config(tmp: Path) -> None:
    """A run `old` whose checkpoint was made with model.width=8; the case resumes it with width 16."""
    other = load_config(None, ["model.width=8", "run.name=old", f"run.output_dir={tmp / 'out'}"])
    save_state(
        tmp / "out" / "ray_results" / "old" / "checkpoint_2026-01-01_00-00-00.000000",
        TrainState(trainer={}, epoch=1, in_channels=1, config=other.to_dict(), rng=torch.get_rng_state()),
    )


def finished_run(tmp: Path) -> None:
    """A run `done` that FINISHED in the case's store, as `byol-ray train run.name=done` leaves it."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = c.create_experiment("byol-ray", artifact_location=str(tmp / "mlartifacts"))
    run = c.create_run(exp, tags={"byol_ray.run_name": "done"}, run_name="done")
    c.set_terminated(run.info.run_id, "FINISHED")


def corrupt_store(tmp: Path) -> None:
    """The store overwritten with random bytes (a disk error, a bad copy)."""
    (tmp / "mlflow.db").write_bytes(os.urandom(8192))


def foreign_store(tmp: Path) -> None:
    """An SQLite file of some other program where the MLflow store should be."""
    with sqlite3.connect(tmp / "mlflow.db") as con:
        con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")


# A store folder that takes no new file: a read-only one for a normal user; root writes anywhere but in
# sysfs, whose folders hold only the kernel's files.
UNWRITABLE = "/sys/kernel" if os.geteuid() == 0 else "{tmp}/read-only"


def read_only_folder(tmp: Path) -> None:
    (tmp / "read-only").mkdir()
    (tmp / "read-only").chmod(0o555)


class _Errors(http.server.BaseHTTPRequestHandler):
    """A tracking server's host that answers every request with an error, as a proxy in front of a
    crashed MLflow server does."""

    def do_GET(self):
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"upstream connect error or disconnect/reset before headers")

    def log_message(self, *args):
        pass


ERRORS_PORT = free_port()


def server_answering_errors(tmp: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", ERRORS_PORT), _Errors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server_answering_errors.server = server  # type: ignore[attr-defined]


CASES = [
    Case("negative-epochs", ["train", "optim.epochs=-1"], ["optim.epochs", "must be >= 1"]),
    Case("zero-epochs", ["train", "optim.epochs=0"], ["optim.epochs", "must be >= 1", "trains and evaluates nothing"]),
    Case("int-not-a-number", ["train", "optim.batch_size=abc"], ["optim.batch_size", "expected an integer"]),
    Case("bool-not-a-bool", ["train", "tracking.enabled=maybe"], ["tracking.enabled", "expected true or false"]),
    Case("nan-learning-rate", ["train", "optim.base_lr=nan"], ["optim.base_lr", "finite number"]),
    Case("probability-out-of-range", ["train", "augment.view1.blur_prob=1.5"], ["blur_prob", "[0, 1]"]),
    Case("unknown-key", ["train", "optim.epoch=3"], ["unknown config key optim.epoch"]),
    Case("unknown-section", ["train", "bogus.key=1"], ["unknown config key bogus"]),
    Case("unknown-choice", ["train", "model.backbone=resnet9"], ["model.backbone", "choose one of", "resnet18"]),
    Case("override-without-equals", ["train", "optim.epochs"], ["section.key=value"]),
    Case(
        "micro-batch-below-2",
        ["train", "optim.batch_size=12", "optim.accumulate_steps=2", "run.num_workers=[2,4]"],
        ["optim.batch_size", "at least 2 images", "at size(s) 4 of run.num_workers [2, 4]"],
    ),
    Case(
        "missing-config-file", ["train", "--config", "{tmp}/nope.yaml"], ["does not exist", "experiments/fmnist.yaml"]
    ),
    Case(
        "config-not-yaml",
        ["train", "--config", "{tmp}/bad.yaml"],
        ["not valid YAML"],
        write("bad.yaml", "optim: [1,\n"),
    ),
    Case(
        "tab-in-config",
        ["train", "--config", "{tmp}/tab.yaml"],
        ["tab.yaml is not valid YAML at line 2, column 1", "replace the tab with spaces"],
        write("tab.yaml", "optim:\n\tepochs: 3\n"),
    ),
    Case(
        "empty-config-file",
        ["train", "--config", "{tmp}/empty.yaml"],
        ["empty.yaml is empty", "leave --config out"],
        write("empty.yaml", "# to do\n"),
    ),
    Case(
        "config-not-a-mapping",
        ["train", "--config", "{tmp}/list.yaml"],
        ["must hold a mapping"],
        write("list.yaml", "- optim\n- model\n"),
    ),
    Case(
        "unknown-key-in-file",
        ["train", "--config", "{tmp}/k.yaml"],
        ["unknown config key optim.epoch"],
        write("k.yaml", "optim:\n  epoch: 3\n"),
    ),
    Case("missing-data-dir", ["train", "data.root={tmp}/no-such-dir"], ["data.root does not exist", "Fix"]),
    Case(
        "corrupt-idx-file", ["train", "data.root={tmp}/fmnist"], ["train-images-idx3-ubyte.gz", "Fix"], corrupt_fmnist
    ),
    Case(
        "unreachable-ray",
        ["train", "run.address=127.0.0.1:1"],
        ["run.address='127.0.0.1:1' does not answer", "ray start --head"],
        within_s=60,
    ),
    Case(
        "unreachable-RAY_ADDRESS",
        ["train"],
        ["RAY_ADDRESS='127.0.0.1:1' (from the environment) does not answer", "unset RAY_ADDRESS"],
        env={"RAY_ADDRESS": "127.0.0.1:1"},
        within_s=60,
    ),
    Case(
        "RAY_ADDRESS-of-the-dashboard",
        ["train"],
        ["RAY_ADDRESS='http://127.0.0.1:8265'", "dashboard (job API)"],
        env={"RAY_ADDRESS": "http://127.0.0.1:8265"},
    ),
    Case("ray-address-not-host-port", ["train", "run.address=my-head"], ["not host:port", "run.address"]),
    Case(
        "unreachable-mlflow",
        ["train", "tracking.tracking_uri=http://127.0.0.1:1"],
        ["tracking server http://127.0.0.1:1 is unreachable", "byol-ray mlflow-server"],
    ),
    Case(
        "mlflow-store-not-a-database",
        ["train"],
        ["mlflow.db is not a readable SQLite database", "file is not a database", "Move it aside"],
        corrupt_store,
    ),
    Case(
        "mlflow-store-of-another-program",
        ["train"],
        ["mlflow.db is an SQLite database of something else", "tables invoices", "tracking.tracking_uri"],
        foreign_store,
    ),
    Case(
        "mlflow-store-folder-unwritable",
        ["train", f"tracking.tracking_uri=sqlite:///{UNWRITABLE}/mlflow.db"],
        ["mlflow.db cannot be written", "does not take new files", "Make the folder writable"],
        None if os.geteuid() == 0 else read_only_folder,
    ),
    Case(
        "mlflow-server-answering-errors",
        ["train", f"tracking.tracking_uri=http://127.0.0.1:{ERRORS_PORT}"],
        [
            "answers with errors (HTTP 503 from /health",
            "upstream connect error",
            "restart it",
            "tracking.enabled=false",
        ],
        server_answering_errors,
    ),
    Case(
        "impossible-resources",
        ["train", "run.num_workers=64", "run.cpus_per_worker=1", "optim.batch_size=256"],
        ["cannot hold 64 worker(s)", "this machine", "Lower run.num_workers"],
    ),
    Case(
        "impossible-gpus", ["train", "run.gpus_per_worker=64"], ["cannot hold 1 worker(s)", "+ 64 GPU", "this machine"]
    ),
    Case(
        "too-few-images-for-a-batch",
        ["train", "data.train_subset=10", "optim.batch_size=64"],
        ["optim.batch_size=64 is larger than the 10 training images (data.train_subset=10)", "Lower optim.batch_size"],
    ),
    Case(
        "rerun-of-a-finished-run",
        ["train", "run.name=done"],
        ["run.name='done' already finished: MLflow run ", "nothing was started", "run.name=done-2"],
        finished_run,
    ),
    Case(
        "checkpoint-of-another-config",
        ["train", "run.name=old", "model.width=16"],
        ["different config", "model.width: checkpoint 8 vs config 16", "new run with a different run.name"],
        checkpoint_of_other_config,
    ),
    Case(
        "eval-missing-encoder", ["eval", "linear", "--encoder", "{tmp}/no-such-run"], ["--encoder", "Pass a checkpoint"]
    ),
    # The stub checkpoint has a config but no weights: a check made after loading the encoder would fail
    # with a KeyError traceback instead, so these also show the check comes before any work (and Ray).
    Case(
        "eval-unreachable-mlflow",
        ["eval", "semi", "--ray", "--encoder", "{tmp}/out/ray_results/old", "--tracking-uri", "http://127.0.0.1:1"],
        ["tracking server http://127.0.0.1:1 is unreachable", "byol-ray mlflow-server"],
        checkpoint_of_other_config,
    ),
    Case(
        "eval-unknown-transfer-dataset",
        ["eval", "transfer", "--ray", "--encoder", "{tmp}/out/ray_results/old", "--dataset", "imagenet21k"],
        ["unknown transfer dataset 'imagenet21k'", "digits"],
        checkpoint_of_other_config,
    ),
    Case(
        "eval-unreachable-RAY_ADDRESS",
        ["eval", "semi", "--ray", "--no-mlflow", "--encoder", "{tmp}/out/ray_results/old"],
        ["RAY_ADDRESS='127.0.0.1:1' (from the environment) does not answer"],
        checkpoint_of_other_config,
        env={"RAY_ADDRESS": "127.0.0.1:1"},
        within_s=60,
    ),
    Case("sweep-unknown-preset", ["sweep", "no-such-preset"], ["unknown sweep preset", "tau"]),
    Case("report-without-a-store", ["report", "tau"], ["there is no MLflow store at", "run.output_dir="]),
    Case(
        "sweep-malformed-file",
        ["sweep", "{tmp}/sweep.yaml"],
        ["sweep.yaml is not valid YAML", "Fix the syntax"],
        write("sweep.yaml", "variants: [\n"),
    ),
    Case("mlflow-server-bad-port", ["mlflow-server", "--port", "70000"], ["not a TCP port", "1-65535"]),
    Case("unknown-command", ["frobnicate"], ["unknown command 'frobnicate'", "Use one of: train", "--help"]),
]


@pytest.fixture
def ray_tmp():
    """The case's Ray temp root: short (Ray's unix socket paths must fit in 107 bytes), checked afterwards
    for a session, and for processes left behind."""
    d = Path(tempfile.mkdtemp(prefix="rbi", dir="/tmp"))
    yield d
    kill_cluster(str(d))
    shutil.rmtree(d, ignore_errors=True)


def run_cli(case: Case, tmp: Path, ray_tmp: Path, debug: bool = False) -> subprocess.CompletedProcess:
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if argv[0] == "train" and case.train_defaults:
        # Case overrides come last and win (tracking_uri for the unreachable-MLflow case).
        argv[1:1] = [f"run.output_dir={tmp / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db"]
    if debug:
        argv.insert(1, "--debug")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), **case.env}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "byol_ray.cli", *argv], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


def runs(tmp: Path) -> list[tuple[str, str]]:
    """(run id, status) of every run in the case's store."""
    db = tmp / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return sorted(con.execute("SELECT run_uuid, status FROM runs"))
        except sqlite3.DatabaseError:  # no tables (MLflow never created a run), or no database at all
            return []


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.ray] if c.starts_ray else []) for c in CASES]
)
def test_bad_input_fails_with_one_clear_paragraph(case: Case, tmp_path: Path, ray_tmp: Path):
    if case.id == "corrupt-idx-file" and not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    if case.setup:
        case.setup(tmp_path)
    before = runs(tmp_path)
    store = (tmp_path / "mlflow.db").read_bytes() if (tmp_path / "mlflow.db").is_file() else None
    t0 = time.monotonic()
    try:
        proc = run_cli(case, tmp_path, ray_tmp)
    finally:
        if hasattr(case.setup, "server"):
            case.setup.server.shutdown()  # type: ignore[union-attr]
            case.setup.server.server_close()  # type: ignore[union-attr]
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "byol-ray: error: " in proc.stderr, out[-3000:]
    message = proc.stderr[proc.stderr.index("byol-ray: error: ") :].strip()
    paragraph = message.split("\n\n")[0]
    assert paragraph == message, message  # one paragraph: no blank line
    for phrase in case.phrases:
        assert phrase in paragraph, f"{phrase!r} not in: {paragraph}"
    if not case.starts_ray:
        assert not any(ray_tmp.iterdir()), f"a Ray session was started: {list(ray_tmp.iterdir())}"
    assert cluster_pids(str(ray_tmp)) == [], "the local Ray outlived the command"
    if store is not None:
        assert (tmp_path / "mlflow.db").read_bytes() == store, "the store was changed"
    assert runs(tmp_path) == before, "a run was created or changed"
    assert not (tmp_path / "outputs").exists(), "a default output folder (or MLflow store) was created"
    if case.within_s:
        assert seconds < case.within_s, f"took {seconds:.0f} s to refuse"


def test_debug_shows_the_traceback(tmp_path: Path, ray_tmp: Path):
    case = next(c for c in CASES if c.id == "unknown-key")
    proc = run_cli(case, tmp_path, ray_tmp, debug=True)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr
    assert "byol-ray: error: unknown config key optim.epoch" in proc.stderr
