"""What the tests share: fixtures (one torch thread, since the cores are shared; the local Fashion-MNIST
files; an image folder) and helpers the test modules import (`from conftest import ...`; pytest puts
tests/ on sys.path): small configs, sweep files, image folders, ending a test's own Ray cluster, and
the `byol-ray` flags and `section.key` overrides a document or a deploy manifest may show.

The tests mirror the package: tests/core, tests/data, tests/eval, tests/training, tests/distributed,
tests/tracking, tests/cli, and at the top the checks of the whole tree (architecture, docs, deploy files).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from byol_ray.cli import COMMANDS
from byol_ray.config import Config, ModelConfig, load_config
from byol_ray.tracking.server import free_port

REPO = Path(__file__).resolve().parents[1]
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fmnist_root() -> str:
    """The Fashion-MNIST IDX files (Debian's dataset-fashion-mnist); tests that need them skip without."""
    if not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed under {FMNIST_ROOT} (scripts/setup.sh installs it)")
    return str(FMNIST_ROOT)


@pytest.fixture(autouse=True)
def no_ambient_tracking_uri():
    """`mlflow.set_tracking_uri` (which tests call to read a store back) exports MLFLOW_TRACKING_URI, which
    the driver honours and `ray start` hands on to every job: without this, a test would write to the
    store of whichever test ran before it."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def image_folder(tmp_path):
    """A real ImageNet-style folder: 3 classes of PNGs (lossless) with different sizes and aspects."""
    return write_image_folder(tmp_path / "imgs")


# A config small enough for a 2-worker Ray Train run in seconds on 2 cores.
TINY = [
    "data.train_subset=512",
    "data.test_subset=256",
    "optim.batch_size=64",
    "optim.steps_per_epoch=3",
    "optim.epochs=3",
    "model.width=8",
    "model.projector_hidden=64",
    "model.predictor_hidden=64",
    "eval.linear_epochs=20",
    "eval.knn_k=20",
    "run.num_workers=2",
    "run.cpus_per_worker=1",
    "run.log_every=100",
    "run.max_failures=0",
]


def tiny_train(*overrides: str, python: str = sys.executable) -> list[str]:
    """The command line of a TINY `python -m byol_ray.train` run with `overrides` after TINY's (later wins)."""
    return [python, "-m", "byol_ray.train", *TINY, *overrides]


# A few seconds of training per trial; 1 worker x 1 CPU so two trials fit a 2-CPU runtime at once.
TINY_SWEEP_BASE = {
    "data": {"train_subset": 512, "test_subset": 256},
    "model": {"width": 4, "projector_hidden": 64, "predictor_hidden": 64},
    "optim": {"batch_size": 64, "steps_per_epoch": 4, "epochs": 4, "warmup_epochs": 0},
    "eval": {"linear_epochs": 20, "knn_k": 20, "baselines": False},
    "run": {"num_workers": 1, "cpus_per_worker": 1, "log_every": 100, "max_failures": 0},
    "tracking": {"log_model": False},
}


def write_sweep(tmp_path: Path, variants: list[dict], seeds=1, name="tiny", fmnist_root: str = "", **extra) -> Path:
    """A sweep file of `variants` over TINY_SWEEP_BASE, writing under tmp_path/out."""
    base = {
        **TINY_SWEEP_BASE,
        "data": {**TINY_SWEEP_BASE["data"], "root": fmnist_root},
        "run": {**TINY_SWEEP_BASE["run"], "output_dir": str(tmp_path / "out")},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": name,
        "ablation": "tiny test ablation",
        "base_config": "base.yaml",
        "seeds": seeds,
        "baseline": variants[0]["name"],
        "variants": variants,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cluster_pids(temp_dir: str) -> list[int]:
    """This cluster's processes: every Ray process carries its temp/session dir on its command line, or (the
    agents, which rename themselves `ray::...`) holds a log file open under it."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (d / "cmdline").read_bytes() or any(
                os.readlink(fd).startswith(temp_dir) for fd in (d / "fd").iterdir()
            ):
                pids.append(int(d.name))
        except OSError:
            pass  # ended meanwhile, or not ours to read
    return pids


def kill_cluster(temp_dir: str) -> None:
    """End this cluster's processes only (`ray stop` would end every Ray runtime on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in cluster_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while cluster_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


RAY_BIN = Path(sys.executable).parent


@dataclass
class TwoNodes:
    """Two real Ray nodes on this machine, one CPU each: a head (`ray start --head`) and a second node
    (`ray start --address`) that a test may take away and bring back, as a spot node comes and goes."""

    address: str
    env: dict[str, str]
    temp_dir: str
    second_port: int = 0  # the second node's raylet port: the one thing that names its processes
    started: list[int] = field(default_factory=list)

    def start_second(self) -> None:
        self.second_port = free_port()
        cmd = [str(RAY_BIN / "ray"), "start", f"--address={self.address}", "--num-cpus=1"]
        cmd += [f"--node-manager-port={self.second_port}", f"--dashboard-agent-listen-port={free_port()}"]
        _ray_start(cmd + ["--disable-usage-stats"], self.env)

    def stop_second(self) -> None:
        """SIGKILL the second node's raylet and everything it started (its workers, its agents), as a lost
        machine: the head learns of it only from missed health checks."""
        marker = f"--node_manager_port={self.second_port}".encode()
        raylets = [p for p in _pids() if marker in _cmdline(p) and b"raylet" in _cmdline(p)]
        assert raylets, f"no raylet of the second node (port {self.second_port})"
        doomed = set(raylets)
        while True:  # the raylet's descendants, collected before any of them is reparented
            more = {p for p in _pids() if _ppid(p) in doomed} - doomed
            if not more:
                break
            doomed |= more
        for pid in doomed:
            with _gone():
                os.kill(pid, signal.SIGKILL)


@contextmanager
def two_node_cluster(extra_env: dict[str, str] | None = None) -> Iterator[TwoNodes]:
    """A `TwoNodes` cluster for the length of the block; `extra_env` (Ray's own settings) reaches both nodes."""
    # Short path: Ray's unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    # Ray 2.60's head turns on token authentication (token in ~/.ray/auth_token); the second node and the
    # driver present the token only with RAY_AUTH_MODE=token.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "PATH": f"{RAY_BIN}:{os.environ['PATH']}"}
    env.update(extra_env or {})
    port = free_port()
    head = [str(RAY_BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}"]
    head += ["--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}"]
    head += [f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    try:
        _ray_start(head, env)
        nodes = TwoNodes(f"127.0.0.1:{port}", env, temp_dir)
        nodes.start_second()
        yield nodes
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def two_nodes() -> Iterator[TwoNodes]:
    with two_node_cluster() as nodes:
        yield nodes


def _ray_start(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@contextmanager
def _gone() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


# A small model for single-process tests of the step, the benchmark and the streamed input.
SMALL_MODEL = [
    "model.width=8",
    "model.projector_hidden=32",
    "model.predictor_hidden=32",
    "model.projector_out=16",
    "run.torch_threads=1",
]


def write_image_folder(root: Path) -> Path:
    """A real ImageNet-style folder: 3 classes of PNGs (lossless) with different sizes and aspects."""
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


def folder_cfg(root, tmp_path, *extra) -> Config:
    return load_config(
        None,
        SMALL_MODEL
        + [
            "data.dataset=folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.stream=true",
            "eval.final=false",
            "eval.knn_every=0",
            "optim.batch_size=8",
            "optim.epochs=1",
            "model.stem=small",
            f"run.output_dir={tmp_path}",
            "tracking.enabled=false",
            *extra,
        ],
    )


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(width=8, projector_hidden=32, projector_out=16, predictor_hidden=24)
    base.update(kw)
    return ModelConfig(**base)


def write_checkpoint(cfg: Config, directory: Path, channels: int = 1) -> Path:
    """A real checkpoint (`state.pt`) of a freshly initialised replica of `cfg`, as training writes one."""
    from byol_ray.core.engine import InputSpec, Pretrainer
    from byol_ray.core.state import TrainState, save_state

    torch.manual_seed(cfg.run.seed)
    trainer = Pretrainer(cfg, InputSpec(channels, 10, [0.5] * channels, [0.25] * channels), steps_per_epoch=1,
                         device=torch.device("cpu"))  # fmt: skip
    state = TrainState(trainer.state_dict(), 1, channels, cfg.to_dict(), torch.get_rng_state())
    save_state(directory, state)
    return directory


# ---- the commands and config keys a document or manifest shows (docs, deploy files) -----------------------
def command_flags(cli_dir: Path) -> dict[str, set[str]]:
    """Every `--flag` each `byol-ray` command's parser declares, read from its module's source."""
    flags = {}
    for command, (module, _) in COMMANDS.items():
        tree = ast.parse((cli_dir / f"{module.rpartition('.')[2]}.py").read_text())
        flags[command] = {"--help"} | {
            a.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"
            for a in n.args
            if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")
        }
    return flags


# `byol-ray train`, `python -m byol_ray.train` / `.bench`, `python -m byol_ray.cli <command>`
INVOCATION = re.compile(r"(?:\bbyol-ray|-m byol_ray\.cli)\s+([a-z][\w-]*)|-m byol_ray\.(train|bench)\b")


def command_problems(snips: list[str], flags: dict[str, set[str]]) -> list[str]:
    bad = []
    for s in snips:
        s = re.split(r"\s#\s", s)[0]  # a trailing shell comment
        calls = list(INVOCATION.finditer(s))
        for i, m in enumerate(calls):
            command = m.group(1) or m.group(2)
            if command not in flags:
                bad.append(f"`{s.strip()}`: no command byol-ray {command}")
                continue
            args = s[m.end() : calls[i + 1].start() if i + 1 < len(calls) else len(s)]
            args = re.split(r"[;|]|&&", args)[0]
            bad += [
                f"`{s.strip()}`: byol-ray {command} has no {f}"
                for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", args)
                if f not in flags[command]
            ]
    return bad


def config_keys() -> set[str]:
    """Every dotted config key and every prefix of one (`augment.view1` as well as its fields)."""
    keys = set()
    for leaf in Config().flat():
        parts = leaf.split(".")
        keys |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return keys


SECTIONS = ("data", "augment", "model", "optim", "eval", "run", "tracking", "debug")
OVERRIDE = re.compile(rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z0-9_.]*[a-z0-9_])=")
DOTTED = re.compile(rf"((?:{'|'.join(SECTIONS)})\.[a-z0-9_.]*[a-z0-9_])")


def key_problems(snips: list[str], keys: set[str], package: Path) -> list[str]:
    """`section.key=value` overrides, and code spans that are a bare `section.key`, naming no config
    key. A bare span naming a module or file (`eval.scoring.evaluate_encoders`, `model.py`) is left alone."""
    bad = []
    for s in snips:
        found = OVERRIDE.findall(s)
        bare = DOTTED.fullmatch(s.strip())
        if bare:
            first, second = bare.group(1).split(".")[:2]
            if second != "py" and not (package / first / f"{second}.py").exists():
                found.append(bare.group(1))
        bad += [f"`{s.strip()}`: no config key {k}" for k in found if k not in keys]
    return bad
