"""deploy/kuberay (the RayJob manifests) checked offline: against KubeRay's own RayJob schema, and against
what this project needs of a cluster made for one run.

Nothing here talks to Kubernetes. The `v1` openAPIV3Schema of KubeRay v1.7.0's CRD (deploy/kuberay/schema/,
verbatim) validates each manifest with jsonschema. Kubernetes' structural schemas never say
`additionalProperties: false`, so a misspelt field passes jsonschema (and the API server drops it without a
word): each manifest is also walked against the schema, and any field it does not define fails, except under
`x-kubernetes-preserve-unknown-fields`. The schema's CEL rules (`x-kubernetes-validations`) are not evaluated.

Then the project's rules: the entrypoint's command, flags and `section.key` overrides exist (conftest's
helpers, which check the docs' commands too) and its config loads as the real one; the worker group that can host a
training worker spans exactly the entrypoint's elastic range (times the sweep's trials at once); checkpoints,
the run's folder and the data are on volumes every pod mounts; MLflow is a server; the cluster is removed
after the job; the runtime env is one Ray knows; the image's Ray is the Ray this project pins. Each rule is
shown to bite on a broken copy of a manifest.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from conftest import REPO, command_flags, command_problems, config_keys, key_problems
from ray.runtime_env import RuntimeEnv

from byol_ray.config import Config, load_config
from byol_ray.errors import UserError
from byol_ray.sweep_spec import load_sweep

KUBERAY = REPO / "deploy" / "kuberay"
MANIFESTS = ["rayjob.yaml", "rayjob-sweep.yaml"]
CRD = KUBERAY / "schema" / "ray.io_rayjobs.yaml"
CRD_BLOB = "c7d3f081af8cf08c256a8c33a0c3b6ea28b816a0"  # the git blob of KubeRay v1.7.0's file (schema/README.md)
DOCKERFILE = KUBERAY / "Dockerfile"
IMAGE_ROOT = "/opt/byol-ray"  # where the Dockerfile puts the repository in the image
# A resource's own metadata is ObjectMeta, which the API server checks itself: the CRD says only `type: object`.
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB of YAML
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def manifest(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


# ---- the RayJob schema ----------------------------------------------------------------------------
def where(path: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "<root>"


def unknown_fields(doc: Any, node: dict, path: list[str | int]) -> list[str]:
    """Fields of `doc` that the structural schema `node` does not define."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(doc, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        bad = []
        for key, value in doc.items():
            if key in props:
                bad += unknown_fields(value, props[key], [*path, key])
            elif isinstance(extra, dict):
                bad += unknown_fields(value, extra, [*path, key])
            elif extra is not True:
                bad.append(f"{where([*path, key])}: not a field of the schema")
        return bad
    if isinstance(doc, list) and "items" in node:
        return [p for i, item in enumerate(doc) for p in unknown_fields(item, node["items"], [*path, i])]
    return []


def schema_problems(doc: dict, schema: dict) -> list[str]:
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(doc), key=lambda e: where(list(e.absolute_path)))
    bad = [f"{where(list(e.absolute_path))}: {e.message}" for e in errors]
    bad += unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema, [])
    return bad + [f"metadata.{k}: not a field of ObjectMeta" for k in doc.get("metadata", {}) if k not in OBJECT_META]


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_manifest_fits_kuberays_rayjob_schema(name, schema):
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert schema_problems(doc, schema) == []


def test_the_schema_is_kuberays_own_file():
    data = CRD.read_bytes()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == CRD_BLOB
    readme = (KUBERAY / "schema" / "README.md").read_text()
    assert "v1.7.0" in readme and CRD_BLOB in readme and hashlib.sha256(data).hexdigest() in readme


def test_the_schema_check_bites(schema):
    doc = manifest("rayjob.yaml")
    doc["metadata"]["label"] = {"a": "b"}
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    gpu = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpu["minReplicas"] = "two"
    container = gpu["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    assert schema_problems(doc, schema) == [
        "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: 'two' is not of type 'integer'",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMount: not a field of the schema",
        "spec.shutdownAfterJobFinish: not a field of the schema",
        "metadata.label: not a field of ObjectMeta",
    ]


def test_the_unknown_field_walk_follows_maps_lists_and_preserved_subtrees():
    node = {
        "type": "object",
        "properties": {
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    doc = {"labels": {"any": "x"}, "items": [{"n": 1}, {"m": 2}], "free": {"any": {"thing": 1}}, "extra": 0}
    assert unknown_fields(doc, node, []) == [
        "items[1].m: not a field of the schema",
        "extra: not a field of the schema",
    ]


# ---- what the project needs of the RayJob ---------------------------------------------------------------
def option(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def quantity(value: Any) -> float:
    """A Kubernetes CPU or GPU quantity: 8, "8", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def entry_config(argv: list[str]) -> tuple[Config, tuple[int, int], int]:
    """The entrypoint's config as a worker gets it (a sweep's baseline trial), its elastic range of workers,
    and how many worker groups run at once (a sweep's --max-concurrent)."""
    overrides = [a for a in argv[2:] if re.match(r"[a-z]+\.[\w.]+=", a)]
    if argv[1] == "sweep":
        spec = load_sweep(argv[2], overrides)
        cfg = spec.trial_config(spec.baseline, 0, overrides)
        concurrency = int(option(argv, "--max-concurrent") or 0)
    else:
        config = option(argv, "--config") or ""
        if not config.startswith(IMAGE_ROOT + "/"):
            raise UserError(f"--config {config} is not a file of the repository in the image ({IMAGE_ROOT})")
        cfg = load_config(str(REPO / config.removeprefix(IMAGE_ROOT + "/")), overrides)
        concurrency = 1
    return cfg, (cfg.run.min_workers, cfg.run.max_workers), concurrency


def pods(spec: dict) -> dict[str, dict]:
    cluster = spec["rayClusterSpec"]
    out = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    return out | {f"group {g['groupName']}": g["template"]["spec"] for g in cluster["workerGroupSpecs"]}


def volume_problems(spec: dict, cfg: Config) -> list[str]:
    """The run's folder and checkpoints on a volume claim every pod mounts (checkpoints may be on a bucket
    instead), the data on a volume every pod mounts (the driver's preflight reads it on the head), MLflow on
    a tracking server."""
    bad = []
    needs = {"run.output_dir": (cfg.run.output_dir, True), "data.root": (cfg.data.root, False)}
    if "://" not in cfg.run.storage_path:
        needs["run.storage_path"] = (cfg.run.storage_path, True)
    elif not cfg.run.storage_path.startswith(("s3://", "gs://")):
        bad.append(f"run.storage_path={cfg.run.storage_path}: neither a bucket nor a shared volume")
    for pod, pod_spec in pods(spec).items():
        claims = {v["name"] for v in pod_spec.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m for c in pod_spec["containers"] for m in c.get("volumeMounts", [])]
        for key, (path, shared) in needs.items():
            held = [
                m for m in mounts if Path(path) == Path(m["mountPath"]) or Path(m["mountPath"]) in Path(path).parents
            ]
            if not held:
                bad.append(f"{key}={path}: on no volume of the {pod} pod")
            elif shared and held[-1]["name"] not in claims:
                bad.append(
                    f"{key}={path}: on volume {held[-1]['name']} of the {pod} pod, not a persistent volume claim"
                )
    if not cfg.tracking.tracking_uri.startswith(("http://", "https://")):
        bad.append(f"tracking.tracking_uri={cfg.tracking.tracking_uri!r}: not a tracking server, lost with the pods")
    return bad


def group_problems(spec: dict, cfg: Config, elastic: tuple[int, int], concurrency: int) -> list[str]:
    """The one worker group whose pods can hold a training worker spans the elastic range exactly."""
    if concurrency < 1:
        return ["byol-ray sweep without --max-concurrent: the trials at once, so the workers wanted, are not fixed"]
    cpus, gpus = cfg.run.cpus_per_worker, cfg.run.gpus_per_worker
    hosts = []
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = math.floor(quantity(limits.get("cpu", 0)) / cpus) if cpus else math.inf
        if gpus:
            per_pod = min(per_pod, math.floor(quantity(limits.get("nvidia.com/gpu", 0)) / gpus))
        if per_pod >= 1:
            hosts.append((group, int(per_pod)))
    if len(hosts) != 1:
        return [f"{len(hosts)} worker groups can hold a training worker ({cpus:g} CPUs, {gpus:g} GPUs); one must"]
    (group, per_pod), (lo, hi) = hosts[0], elastic
    held = (group["minReplicas"] * per_pod, group["maxReplicas"] * per_pod)
    want = (concurrency * lo, concurrency * hi)
    if held != want:
        return [
            f"group {group['groupName']}: {group['minReplicas']} to {group['maxReplicas']} pods of {per_pod} "
            f"worker(s) hold {held[0]} to {held[1]} workers, the entrypoint's {concurrency} x [{lo}, {hi}] need "
            f"{want[0]} to {want[1]}"
        ]
    return []


def project_problems(doc: dict) -> list[str]:
    spec = doc["spec"]
    bad = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        bad.append("spec.shutdownAfterJobFinishes: not true, the job's cluster would outlive it")
    if "ttlSecondsAfterFinished" not in spec:
        bad.append("spec.ttlSecondsAfterFinished: not set")
    env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
    if set(env) - RuntimeEnv.known_fields:
        bad.append(f"spec.runtimeEnvYAML: {sorted(set(env) - RuntimeEnv.known_fields)} are not runtime env fields")
    else:
        RuntimeEnv(**env)  # Ray's own check of the values (env_vars are strings, ...)
    entry = " ".join(spec["entrypoint"].split())
    argv = shlex.split(entry)
    if argv[:1] != ["byol-ray"]:
        return [*bad, f"entrypoint: {entry!r} is not a byol-ray command"]
    bad += command_problems([entry], command_flags(REPO / "byol_ray" / "cli"))
    bad += key_problems([entry], config_keys(), REPO / "byol_ray")
    try:
        cfg, elastic, concurrency = entry_config(argv)
    except UserError as e:
        return [*bad, f"entrypoint: {e}"]
    bad += group_problems(spec, cfg, elastic, concurrency)
    bad += volume_problems(spec, cfg)
    version = spec["rayClusterSpec"].get("rayVersion")
    if version != ray.__version__:
        bad.append(f"rayClusterSpec.rayVersion: {version}, but byol-ray runs Ray {ray.__version__}")
    return bad


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_manifest_fits_the_project(name):
    assert project_problems(manifest(name)) == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_runs_the_image_the_dockerfile_builds(name):
    images = {c["image"] for pod in pods(manifest(name)["spec"]).values() for c in pod["containers"]}
    assert len(images) == 1
    text = DOCKERFILE.read_text()
    assert f"-t {images.pop()} ." in text
    assert f"WORKDIR {IMAGE_ROOT}\n" in text
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", text, flags=re.M)


def test_the_elastic_ranges_are_the_ones_the_docs_show():
    ranges = {name: entry_config(shlex.split(manifest(name)["spec"]["entrypoint"]))[1:] for name in MANIFESTS}
    assert ranges == {"rayjob.yaml": ((2, 8), 1), "rayjob-sweep.yaml": ((1, 2), 4)}


def broken(name: str, edit: Callable[[dict], Any]) -> dict:
    doc = copy.deepcopy(manifest(name))
    edit(doc)
    return doc


def entry_edit(old: str, new: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        assert old in doc["spec"]["entrypoint"]
        doc["spec"]["entrypoint"] = doc["spec"]["entrypoint"].replace(old, new)

    return edit


def head_volume_to_empty_dir(doc: dict) -> None:
    volume = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]
    volume.pop("persistentVolumeClaim")
    volume["emptyDir"] = {}


def test_the_project_checks_bite():
    def gpu(doc):
        return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]

    cases = {
        "replicas": broken("rayjob.yaml", lambda d: gpu(d).update(maxReplicas=6)),
        "gpu limits": broken(
            "rayjob.yaml", lambda d: gpu(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="4")
        ),
        "override": broken("rayjob-sweep.yaml", entry_edit("run.torch_threads=0", "run.torch_thread=0")),
        "flag": broken("rayjob-sweep.yaml", entry_edit("--max-concurrent", "--max-concurent")),
        "value": broken("rayjob.yaml", entry_edit("data.loader=ray_data", "data.loader=ray")),
        "storage": broken("rayjob.yaml", entry_edit("run.storage_path=/shared/", "run.storage_path=/tmp/")),
        "emptydir": broken("rayjob-sweep.yaml", head_volume_to_empty_dir),
        "tracking": broken("rayjob.yaml", entry_edit("tracking.tracking_uri=http://mlflow:5000", "")),
        "lifetime": broken("rayjob.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
        "runtime env": broken("rayjob.yaml", lambda d: d["spec"].update(runtimeEnvYAML="env_var: {A: '1'}\n")),
        "ray version": broken("rayjob.yaml", lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.59.0")),
    }
    found = {case: project_problems(doc) for case, doc in cases.items()}
    assert found["replicas"] == [
        "group gpu: 2 to 6 pods of 1 worker(s) hold 2 to 6 workers, the entrypoint's 1 x [2, 8] need 2 to 8"
    ]
    assert found["gpu limits"] == ["0 worker groups can hold a training worker (8 CPUs, 1 GPUs); one must"]
    entry = " ".join(cases["override"]["spec"]["entrypoint"].split())
    assert found["override"][0] == f"`{entry}`: no config key run.torch_thread"
    assert found["override"][1].startswith("entrypoint: sweep 'tau' (")  # the sweep's own check, which names the file
    assert found["override"][1].endswith("variant 'cosine': unknown config key run.torch_thread")
    assert len(found["override"]) == 2
    assert found["flag"] == [
        f"`{' '.join(cases['flag']['spec']['entrypoint'].split())}`: byol-ray sweep has no --max-concurent",
        "byol-ray sweep without --max-concurrent: the trials at once, so the workers wanted, are not fixed",
    ]
    assert found["value"] == ["entrypoint: data.loader: unknown value 'ray'; choose one of dataloader, ray_data"]
    assert found["storage"] == [
        f"run.storage_path=/tmp/ray_results: on no volume of the {p} pod" for p in ("head", "group gpu", "group cpu")
    ]
    assert found["emptydir"] == [
        "run.output_dir=/shared/outputs: on volume shared of the head pod, not a persistent volume claim",
        "run.storage_path=/shared/ray_results: on volume shared of the head pod, not a persistent volume claim",
    ]
    assert found["tracking"] == ["tracking.tracking_uri='': not a tracking server, lost with the pods"]
    assert found["lifetime"] == ["spec.shutdownAfterJobFinishes: not true, the job's cluster would outlive it"]
    assert found["runtime env"] == ["spec.runtimeEnvYAML: ['env_var'] are not runtime env fields"]
    assert found["ray version"] == [f"rayClusterSpec.rayVersion: 2.59.0, but byol-ray runs Ray {ray.__version__}"]
