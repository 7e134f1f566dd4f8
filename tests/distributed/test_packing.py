"""Sweep trials packed onto GPUs: how many trials the sweep runs at once for a cluster's CPUs, GPUs and
memory (without Ray), and on a real local Ray that advertises one GPU, four quarter-GPU trials at once
with the fifth waiting for one of them to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_sweep

from byol_ray.config import Config, apply_gpu_recipe, load_config
from byol_ray.distributed.sweep import TRIAL_DRIVER_RESOURCES, describe_devices, max_concurrent_trials
from byol_ray.sweep_spec import load_sweep

GIB = 2**30


def workers_cfg(*overrides: str) -> Config:
    """A trial's config as its workers get it on GPUs (the recipe applied: run.device=cuda)."""
    return apply_gpu_recipe(load_config(None, ["run.num_workers=1", "run.cpus_per_worker=2", *overrides]), "cuda")


@pytest.mark.parametrize(
    "gpus, nodes, expected",
    [
        (0.25, [{"CPU": 16, "GPU": 1, "memory": 64 * GIB}], 4),  # floor(1 / 0.25) per GPU
        (0.25, [{"CPU": 4, "GPU": 1, "memory": 64 * GIB}], 2),  # 2 CPUs each: the CPUs bound it
        (0.25, [{"CPU": 64, "GPU": 8, "memory": 64 * GIB}] * 2, 64),  # 4 per GPU, 16 GPUs
        (0.1, [{"CPU": 64, "GPU": 1, "memory": 64 * GIB}], 10),  # 1.0 // 0.1 would say 9
        (0.3, [{"CPU": 64, "GPU": 1, "memory": 64 * GIB}], 3),
        (0.4, [{"CPU": 64, "GPU": 2, "memory": 64 * GIB}], 4),  # 2 per GPU; a fraction never spans two GPUs
        (0.25, [{"CPU": 64, "GPU": 1, "memory": 3 * TRIAL_DRIVER_RESOURCES["memory"]}], 3),  # the drivers' memory
        (1.0, [{"CPU": 64, "GPU": 2, "memory": 64 * GIB}], 2),  # whole GPUs: one trial each
        (0.25, [{"CPU": 1, "GPU": 1, "memory": 64 * GIB}], 1),  # nothing fits: still one at a time
        (0.25, [{"CPU": 16, "GPU": 0, "memory": 64 * GIB}, {"CPU": 4, "GPU": 1, "memory": 64 * GIB}], 2),
    ],
)
def test_trials_at_once_for_the_clusters_gpus_cpus_and_memory(gpus, nodes, expected):
    assert max_concurrent_trials(workers_cfg(f"run.gpus_per_worker={gpus}"), nodes) == expected


def test_trials_at_once_on_cpus_and_with_two_workers_each():
    cpu = load_config(None, ["run.num_workers=2", "run.cpus_per_worker=1"])
    assert max_concurrent_trials(cpu, [{"CPU": 8, "memory": 64 * GIB}]) == 4
    two_gpus = workers_cfg("run.num_workers=2", "run.cpus_per_worker=1", "run.gpus_per_worker=1")
    assert max_concurrent_trials(two_gpus, [{"CPU": 64, "GPU": 8, "memory": 64 * GIB}]) == 4


def test_the_start_line_says_how_trials_share_the_gpus():
    nodes = [{"CPU": 64, "GPU": 8, "memory": 64 * GIB}] * 2
    quarter = workers_cfg("run.gpus_per_worker=0.25")
    assert describe_devices(quarter, "cuda", nodes) == (
        "4 trials per GPU (run.gpus_per_worker=0.25) on 16 GPU(s), GPU recipe (on_gpu) applied"
    )
    whole = workers_cfg("run.num_workers=2", "run.cpus_per_worker=1")  # gpus_per_worker=0: one GPU each
    assert describe_devices(whole, "cuda", nodes) == "2 GPU(s) per trial on 16 GPU(s), GPU recipe (on_gpu) applied"
    assert describe_devices(load_config(None, []), "cpu", nodes) == ""


def record_and_wait(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker of one trial: records when it started and what Ray gave it, waits until four
    trials' workers have started (or 60 s, so that too few at once fails the test instead of hanging it),
    and records when it ended."""
    import ray

    log, name = Path(loop_config["log"]), loop_config["name"]
    ctx = ray.get_runtime_context()
    started = time.time()
    deadline = time.monotonic() + 60
    (log / f"{name}.start").write_text("")
    while len(list(log.glob("*.start"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    record = {
        "start": started,
        "end": time.time(),
        "resources": ctx.get_assigned_resources(),
        "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
        "device": loop_config["device"],
        "width": loop_config["width"],
    }
    (log / f"{name}.json").write_text(json.dumps(record))


def packed_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]], log: str, storage: str) -> None:
    """One trial as `sweep.trial_fn` starts it, down to its Ray Train worker group: the trial's config,
    its GPU recipe as `driver.run_training` applies it (`training_device`: the cluster has a GPU), and a
    worker group of `cluster.worker_resources` each, asked for as `driver._fit` asks. Only the workers'
    loop is `record_and_wait`, and the trainer is Ray Train's `DataParallelTrainer`, the base of the
    project's `TorchTrainer`: the same worker group and scheduling, without the torch process group that
    on GPU resources would be NCCL, which this CPU-only torch lacks (it could not train on CUDA here
    anyway), and without importing torch in every trial's processes."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from byol_ray.distributed.cluster import training_device, worker_resources

    cfg = Config.from_dict(trials[config["trial"]])
    cfg = apply_gpu_recipe(cfg, training_device(cfg))
    resources = worker_resources(cfg)
    DataParallelTrainer(
        record_and_wait,
        train_loop_config={"log": log, "name": cfg.run.name, "device": cfg.run.device, "width": cfg.model.width},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu="GPU" in resources, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(name=cfg.run.name, storage_path=storage),
    ).fit()


@pytest.mark.ray
def test_four_quarter_gpu_trials_share_one_gpu_and_the_fifth_waits(tmp_path, fmnist_root):
    """A real Tune run of five trials on a local Ray that advertises one GPU no process uses, with the
    sweep's own trial resources (`TRIAL_DRIVER_RESOURCES`) and concurrency (`max_concurrent_trials` of
    the config with the GPU recipe applied, as `run_sweep` computes it); each trial's Ray Train worker
    group holds a quarter of the GPU (`packed_trial` says why its workers wait instead of training).
    Overlap is read from the recorded start and end times, never from durations."""
    import ray
    from ray import cloudpickle, tune

    from byol_ray.distributed.cluster import training_device

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    path = write_sweep(tmp_path, [{"name": f"v{i}"} for i in range(5)], fmnist_root=fmnist_root)
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["on_gpu"] = {"model.width": 16}  # the recipe must reach the workers
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    cli = ["run.gpus_per_worker=0.25", "run.cpus_per_worker=0.5"]
    spec = load_sweep(str(path), cli)
    trials = {v.name: spec.trial_config(v.name, 0, cli).to_dict() for v in spec.variants}
    log = tmp_path / "log"
    log.mkdir()
    # 4 logical CPUs hold 8 half-CPU workers: the GPU, not the CPUs, bounds the trials at once.
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        first = Config.from_dict(trials["v0"])
        device = training_device(first)
        workers = apply_gpu_recipe(first, device)
        concurrency = max_concurrent_trials(workers)
        assert (device, concurrency) == ("cuda", 4)
        assert describe_devices(workers, device).startswith("4 trials per GPU (run.gpus_per_worker=0.25) on 1 GPU")
        trainable = tune.with_resources(
            tune.with_parameters(packed_trial, trials=trials, log=str(log), storage=str(tmp_path / "ray")),
            TRIAL_DRIVER_RESOURCES,
        )
        grid = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(trials))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="packing", storage_path=str(tmp_path / "tune"), verbose=0),
        ).fit()
    finally:
        ray.shutdown()

    assert grid.num_errors == 0 and grid.num_terminated == 5
    records = sorted((json.loads(p.read_text()) for p in log.glob("*.json")), key=lambda r: r["start"])
    assert len(records) == 5
    for r in records:
        assert r["resources"]["GPU"] == 0.25 and r["gpu_ids"] == ["0"]  # a quarter of the one GPU
        assert (r["device"], r["width"]) == ("cuda", 16)  # the GPU recipe applied
    four, fifth = records[:4], records[4]
    assert max(r["start"] for r in four) < min(r["end"] for r in four)  # the first four ran at once
    assert fifth["start"] >= min(r["end"] for r in four)  # the fifth started only after one of them ended
