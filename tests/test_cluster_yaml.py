"""cluster.yaml (the AWS cluster-launcher config) checked offline: Ray's own JSON schema and config checks,
the properties docs/operations.md relies on, and the shell commands it runs on the nodes.

Nothing here talks to AWS. Of Ray's `ray up` pipeline (ray.autoscaler._private.commands._bootstrap_config)
these run: `prepare_config` (merges the AWS defaults.yaml from the wheel, merges setup commands, checks the
docker section, fills per-type min/max workers), `check_legacy_fields` and `validate_config` (the schema plus
the head-type / min-workers / cluster_synced_files checks). Skipped because they call AWS APIs:
`AWSNodeProvider.fillout_available_node_types_resources` (DescribeInstanceTypes; cluster.yaml gives
`resources` explicitly, so it is not needed) and `bootstrap_aws` (IAM, key pair, subnets, security groups).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
GPU_INSTANCE_FAMILIES = re.compile(r"^(g\d|p\d|inf\d|trn\d|dl\d|f\d)", re.I)


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture
def config(raw) -> dict:
    """A fresh deep copy per test, so tests may mutate it."""
    return copy.deepcopy(raw)


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"Ray's cluster schema is missing from the installed wheel: {path}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it after Ray's offline preparation step."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _gpu_types(cfg: dict) -> dict[str, dict]:
    head = cfg["head_node_type"]
    return {
        name: t
        for name, t in cfg["available_node_types"].items()
        if name != head and t.get("resources", {}).get("GPU", 0) >= 1
    }


def _spot_gpu_types(cfg: dict) -> dict[str, dict]:
    return {
        name: t
        for name, t in _gpu_types(cfg).items()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    }


def _all_commands(cfg: dict) -> list[str]:
    cmds = [c for k in COMMAND_KEYS for c in cfg.get(k, [])]
    for t in cfg["available_node_types"].values():
        cmds += t.get("initialization_commands", []) + t.get("worker_setup_commands", [])
    return cmds


def _head_ray_start(cfg: dict) -> list[str]:
    for cmd in cfg["head_start_ray_commands"]:
        for part in re.split(r"[;&|]+", cmd):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"] and "--head" in argv:
                return argv
    raise AssertionError("no `ray start --head` in head_start_ray_commands")


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ---- Ray's own schema and checks --------------------------------------------------------------------
def test_validates_against_rays_schema(config, schema):
    jsonschema.validate(config, schema)


def test_rays_offline_config_checks_pass(config, prepared):
    from ray.autoscaler._private.util import check_legacy_fields, validate_config

    check_legacy_fields(config)
    validate_config(prepared)  # schema + head_node_type + sum(min_workers) <= max_workers + synced files
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["max_workers"] == 0
    # Setup commands were merged as `ray up` merges them: the common ones first, on both sides.
    n = len(config["setup_commands"])
    assert prepared["head_setup_commands"][:n] == config["setup_commands"]
    assert prepared["worker_setup_commands"][:n] == config["setup_commands"]


@pytest.mark.parametrize("where", ["top", "node_type", "docker", "auth"])
def test_misspelled_key_fails_validation(config, schema, where):
    from ray.autoscaler._private.util import validate_config

    if where == "top":
        config["max_workerz"] = config.pop("max_workers")
    elif where == "node_type":
        worker = next(iter(_gpu_types(config).values()))
        worker["min_workerz"] = worker.pop("min_workers")
    elif where == "docker":
        config["docker"]["pull_before_runn"] = config["docker"].pop("pull_before_run")
    else:
        config["auth"]["ssh_usr"] = config["auth"].pop("ssh_user")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties|additionalProperties"):
        jsonschema.validate(config, schema)
    # Ray's own entry point rejects it too (on the config as `ray up` prepares it).
    from ray.autoscaler._private.util import prepare_config

    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_rays_checks_catch_semantic_mistakes(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad_head = copy.deepcopy(config)
    bad_head["head_node_type"] = "head_typo"
    with pytest.raises((ValueError, KeyError)):
        validate_config(prepare_config(bad_head))

    too_many_min = copy.deepcopy(config)
    next(iter(_spot_gpu_types(too_many_min).values()))["min_workers"] = too_many_min["max_workers"] + 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(too_many_min))

    no_node_config = copy.deepcopy(config)
    del next(iter(_gpu_types(no_node_config).values()))["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(prepare_config(no_node_config))

    no_container = copy.deepcopy(config)
    del no_container["docker"]["container_name"]
    with pytest.raises(AssertionError, match="container"):
        prepare_config(no_container)


# ---- the shape docs/operations.md relies on -----------------------------------------------------------
def test_head_is_a_cpu_node(config):
    head = config["available_node_types"][config["head_node_type"]]
    node_config = head["node_config"]
    assert node_config.get("InstanceType"), "head needs an instance type in node_config"
    assert not GPU_INSTANCE_FAMILIES.match(node_config["InstanceType"]), node_config["InstanceType"]
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in node_config, "the head (MLflow DB, driver) must not be spot"


def test_autoscaling_spot_gpu_workers(config):
    spot = _spot_gpu_types(config)
    assert spot, "no GPU worker type with InstanceMarketOptions.MarketType=spot"
    for name, t in spot.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert t["max_workers"] >= 1, name
        assert GPU_INSTANCE_FAMILIES.match(t["node_config"]["InstanceType"]), name
        assert "IamInstanceProfile" in t["node_config"], f"{name} writes checkpoints to S3: needs a profile"
    assert config["max_workers"] >= max(t["max_workers"] for t in spot.values()) >= 1
    for name, t in _gpu_types(config).items():
        assert t.get("min_workers", 0) == 0, f"{name}: GPU nodes must not run idle"


def test_imagenet_experiment_fits_the_gpu_workers(config):
    """experiments/imagenet_resnet50.yaml's worker group fits the spot type, one worker per node; the
    overrides docs/operations.md passes are accepted by the project's own config loader."""
    from byol_ray.config import load_config

    cfg = load_config(
        REPO / "experiments" / "imagenet_resnet50.yaml",
        [
            "run.storage_path=s3://my-bucket/byol-ray/ray_results",
            "tracking.tracking_uri=http://10.0.1.23:5000",
        ],
    )
    spot = next(iter(_spot_gpu_types(config).values()))
    assert cfg.run.cpus_per_worker <= spot["resources"]["CPU"]
    assert max(cfg.run.gpus_per_worker, 1.0) <= spot["resources"]["GPU"]
    assert cfg.run.num_workers <= min(spot["max_workers"], config["max_workers"])
    assert cfg.run.max_failures >= 1, "spot preemptions need FailureConfig(max_failures >= 1)"


def test_no_credentials_in_file(text, config):
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"ASIA[0-9A-Z]{16}", text), "an AWS temporary access key id"
    for needle in (
        "aws_secret_access_key",
        "aws_session_token",
        "password=",
        "BEGIN RSA PRIVATE KEY",
        "BEGIN OPENSSH PRIVATE KEY",
    ):
        assert needle.lower() not in text.lower(), needle
    assert "aws_credentials" not in config["provider"], "use IAM instance profiles, not provider.aws_credentials"
    assert "ssh_private_key" not in config.get("auth", {}) or not Path(config["auth"]["ssh_private_key"]).is_absolute()


def test_mlflow_server_runs_on_the_head_only(config):
    head_cmds = config["head_setup_commands"] + config["head_start_ray_commands"]
    servers = [c for c in head_cmds if "byol-ray mlflow-server" in c]
    assert len(servers) == 1, servers
    assert not any("mlflow server" in c for c in head_cmds), "start it through byol-ray mlflow-server"
    argv = shlex.split(servers[0].split("byol-ray mlflow-server", 1)[1].split("&", 1)[0].split(">", 1)[0])
    # The command's own parser: an option it does not have fails here, not on the cluster's head.
    from byol_ray.cli.mlflow_server import build_parser

    args = build_parser().parse_args(argv)
    assert args.backend_store_uri == "sqlite:////home/ray/mlflow/mlflow.db"
    assert (args.host, args.port) == ("0.0.0.0", 5000)
    assert args.artifacts_destination.startswith("s3://")
    others = config["setup_commands"] + config["worker_setup_commands"] + config["worker_start_ray_commands"]
    assert not any("mlflow server" in c or "mlflow-server" in c for c in others)
    # The DB lives on the head's host disk (the container runs with --rm).
    assert any("/home/ray/mlflow" in o for o in config["docker"]["head_run_options"])


def test_ports_5000_and_8265_are_not_opened(config, text):
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        lo, hi = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        assert not (lo <= 5000 <= hi or lo <= 8265 <= hi), f"inbound rule opens MLflow/dashboard: {rule}"
    assert re.search(r"never add an\s+#?\s*inbound rule for 5000", text, re.I), "the warning comment is gone"


def test_dashboard_bound_to_localhost(config):
    argv = _head_ray_start(config)
    assert _option(argv, "--dashboard-host") == "127.0.0.1"
    assert _option(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"


def test_package_and_pins_installed_on_every_node(prepared):
    pins = set(re.findall(r'"?(torch(?:vision)?==[\d.]+)"?', (REPO / "scripts" / "setup.sh").read_text()))
    assert pins == {"torch==2.14.1", "torchvision==0.29.1"}, "scripts/setup.sh pins moved: update cluster.yaml"
    for side in ("head_setup_commands", "worker_setup_commands"):
        pip_args = [shlex.split(c) for c in prepared[side] if c.lstrip().startswith("pip install")]
        flat = [a for argv in pip_args for a in argv]
        assert pins <= set(flat), f"{side}: torch pins missing"
        assert any(argv[i : i + 2] == ["-e", "~/byol-ray"] for argv in pip_args for i in range(len(argv))), side
        assert any(a.startswith("mlflow") for a in flat), side
    assert prepared["file_mounts"] == {"~/byol-ray": "."}
    assert (REPO / "pyproject.toml").is_file()
    assert prepared["docker"]["image"].startswith(("rayproject/ray:2.60.0-py311", "rayproject/ray-ml:2.60.0-py311"))


# ---- the shell the nodes run ----------------------------------------------------------------------------
def test_every_command_is_valid_bash(config):
    """Catches YAML eating a command (e.g. ` #` starting a comment in a plain scalar)."""
    for cmd in _all_commands(config):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd!r}: {r.stderr}"


def _run(cmds: list[str], home: Path, env: dict[str, str]) -> None:
    for cmd in cmds:
        r = subprocess.run(["bash", "-c", cmd], env={**env, "HOME": str(home)}, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd!r}: {r.stderr}"


def _env_lines(cmds: list[str]) -> list[str]:
    return [c for c in cmds if "~/.bashrc" in c]


def test_node_environment(config, tmp_path):
    """The ~/.bashrc lines give every node BYOL_STORAGE_PATH and MLFLOW_TRACKING_URI, idempotently."""
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    common = _env_lines(config["setup_commands"])
    for role, cmds, extra in (
        ("worker", common + _env_lines(config["worker_setup_commands"]), {"RAY_HEAD_IP": "10.0.1.23"}),
        ("head", common + _env_lines(config["head_setup_commands"]), {}),
    ):
        home = tmp_path / role
        home.mkdir()
        (home / ".bashrc").write_text("# the image's own lines\nexport KEEP=1\n")
        _run(cmds, home, {**base, **extra})
        _run(cmds, home, {**base, **extra})  # `ray up` reruns setup commands
        rc = (home / ".bashrc").read_text()
        assert rc.count("MLFLOW_TRACKING_URI=") == 1 and rc.count("BYOL_BUCKET=") == 1, rc
        assert "export KEEP=1" in rc
        out = subprocess.run(
            ["bash", "-c", ". ~/.bashrc; echo $BYOL_STORAGE_PATH; echo $MLFLOW_TRACKING_URI"],
            env={**base, "HOME": str(home)},
            capture_output=True,
            text=True,
            check=True,
        )
        storage, uri = out.stdout.split()
        assert storage == "s3://REPLACE_ME_BUCKET/byol-ray/ray_results"
        if role == "worker":
            assert uri == "http://10.0.1.23:5000"
        else:
            assert re.fullmatch(r"http://\d+\.\d+\.\d+\.\d+:5000", uri) and "127.0.0.1" not in uri, uri


def test_head_refuses_the_bucket_placeholder(config, tmp_path):
    guard = next(c for c in config["head_setup_commands"] if "REPLACE_ME_BUCKET" in c and "exit 1" in c)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    r = subprocess.run(
        ["bash", "-c", guard], env={**env, "BYOL_BUCKET": "REPLACE_ME_BUCKET"}, capture_output=True, text=True
    )
    assert r.returncode == 1 and "REPLACE_ME_BUCKET" in r.stderr
    r = subprocess.run(["bash", "-c", guard], env={**env, "BYOL_BUCKET": "my-team-byol"})
    assert r.returncode == 0
