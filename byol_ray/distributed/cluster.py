"""The Ray cluster, in one place: checking an address, connecting, what a worker needs, whether the
cluster can ever hold the worker group, asking an autoscaler for it, and running one remote task.

Ray never fails a request that cannot be met: it waits forever ("Attempting to start training worker
group..."). Everything here fails in seconds instead, with a paragraph that says what to change.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Any

import ray

from ..config import Config
from ..errors import UserError


class ResourceError(UserError):
    pass


_FIX_ADDRESS = (
    "Start the cluster (`ray start --head`), fix the address (host:port of the head, 6379 by "
    "default; ray://host:10001 for Ray Client), or leave run.address empty and unset RAY_ADDRESS to "
    "start a local Ray."
)


def ray_target(address: str) -> tuple[str, str]:
    """(the address `ray.init` will connect to, where that address comes from); ('', '') when it will start
    a local Ray. Ray's own order: run.address, else $RAY_ADDRESS, else the cluster the last `ray start` on
    this machine recorded in Ray's temp folder, else a new local Ray."""
    if address == "local":
        return "", ""
    if address and address != "auto":
        return address, f"run.address={address!r}"
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return env, f"RAY_ADDRESS={env!r} (from the environment)"
    from ray._private.utils import read_ray_address  # where `ray start` records its cluster

    recorded = read_ray_address()
    if recorded:
        return recorded, f"{recorded!r}, the cluster of the last `ray start` on this machine"
    return ("auto", "run.address='auto'") if address == "auto" else ("", "")


def check_ray_address(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when `address` does not answer: ray.init retries an unreachable address for many
    minutes. ("auto" needs no check: it finds a cluster or fails at once.)"""
    if address in ("", "auto"):
        return
    if address.startswith(("http://", "https://")):
        raise UserError(
            f"{source} is a Ray dashboard (job API) address: `ray job` commands use it, but a driver "
            f"connects to the cluster itself. {_FIX_ADDRESS}"
        )
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{source} is not host:port. {_FIX_ADDRESS}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"the Ray cluster at {source} does not answer ({e}). {_FIX_ADDRESS}") from None


def check_address(address: str) -> bool:
    """Fail in seconds when the cluster `ray.init(address)` would join does not answer; returns whether
    it would start a local Ray instead."""
    target, source = ray_target(address)
    if target:
        check_ray_address(target, source)
    return not target


def connect(address: str = "") -> bool:
    """ray.init unless already connected; returns whether this call connected (so the caller shuts down)."""
    if ray.is_initialized():
        return False
    # Ray starts its workers at nice 15 while its own daemons (GCS, raylet, dashboard) and the driver run at
    # 0, so on a 2-core machine each of their bursts preempts training. A local Ray started here runs its
    # workers at normal priority (as Ray's job manager does for job drivers); a user's own setting wins, and
    # a running cluster keeps the niceness it was started with.
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address or None, log_to_driver=True)
    except ConnectionError as e:
        raise UserError(
            f"cannot connect to the Ray cluster at {address!r} ({e}). Start one with `ray start --head`, or "
            f"leave the address empty to start a local Ray."
        ) from None
    quiet_ray_console()
    return True


VERBOSE_ENV = "BYOL_RAY_VERBOSE"  # "1" (what --debug sets): Ray's whole log on the console

# Lines of Ray's own that look like failures and are not: Ray Train's preemption watcher is an actor whose
# constructor arguments sit in the object store, which Ray's core worker reports at level E on every start.
_RAY_NOISE = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*constructor arguments in the object"
    ),
)


def verbose_ray() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_ray_console() -> None:
    """Drop `_RAY_NOISE` from the worker output Ray prints on this driver's console (unless BYOL_RAY_VERBOSE
    is set). Ray offers no filter for it, so its printing handler is wrapped; best effort where that moves."""
    if verbose_ray():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handler = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)
    if handler is None or getattr(handler, "byol_quiet", False):
        return

    def filtered(data: dict[str, Any]) -> None:
        lines = [ln for ln in data.get("lines", []) if not any(p.search(ln) for p in _RAY_NOISE)]
        if lines:
            handler({**data, "lines": lines})

    filtered.byol_quiet = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def worker_resources(cfg: Config) -> dict[str, float]:
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.device == "cuda" or cfg.run.gpus_per_worker > 0:
        resources["GPU"] = cfg.run.gpus_per_worker or 1.0
    return resources


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def this_machine() -> list[dict[str, float]]:
    """The one node a local Ray would start with: the CPUs Ray counts here (cgroup limits included) and
    the GPUs CUDA sees."""
    import torch
    from ray._private.utils import get_num_cpus

    return [{"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}]


def workers_per_gpu(gpus_per_worker: float) -> int:
    """How many workers asking `gpus_per_worker` (a fraction below 1) one GPU holds: floor(1 / fraction)."""
    return int(1 / gpus_per_worker + 1e-9)


def _fit(have: float, need: float) -> int:
    return int(have / need + 1e-9)  # a division, not //: 1.0 // 0.1 is 9.0 in floating point


def _node_capacities(cfg: Config, nodes: list[dict[str, float]]) -> list[tuple[float, float, int]]:
    """(CPUs, GPUs, workers that fit) for each node; a worker cannot span nodes, and a worker with a
    fraction of a GPU cannot span GPUs (Ray gives each fraction from one GPU)."""
    need_gpu = worker_resources(cfg).get("GPU", 0.0)
    out = []
    for res in nodes:
        cpu, gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
        by_cpu = _fit(cpu, cfg.run.cpus_per_worker)
        if not need_gpu:
            by_gpu = by_cpu
        elif need_gpu < 1:
            by_gpu = _fit(gpu, 1.0) * workers_per_gpu(need_gpu)
        else:
            by_gpu = _fit(gpu, need_gpu)
        out.append((cpu, gpu, min(by_cpu, by_gpu)))
    return out


def worker_capacity(cfg: Config, nodes: list[dict[str, float]] | None = None) -> int:
    """How many of this config's workers the cluster (`nodes`; default: the connected cluster's live
    nodes) holds at once."""
    return sum(fit for _, _, fit in _node_capacities(cfg, live_nodes() if nodes is None else nodes))


def check_resources(cfg: Config, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail in seconds when the cluster (`nodes`; default: the connected cluster's live nodes) can never
    hold the worker group (Ray would wait forever); an elastic group needs room for its min only."""
    r = cfg.run
    need_gpu = worker_resources(cfg).get("GPU", 0.0)
    local = nodes is not None
    caps = _node_capacities(cfg, live_nodes() if nodes is None else nodes)
    fit = sum(f for _, _, f in caps)
    if fit < r.min_workers:
        total_cpu = sum(c for c, _, _ in caps)
        total_gpu = sum(g for _, g, _ in caps)
        where = (
            "this machine (for the local Ray this run would start)"
            if local
            else f"the Ray cluster's {len(caps)} node(s)"
        )
        raise ResourceError(
            f"the Ray cluster cannot hold {r.min_workers} worker(s)"
            + (f" (the min of run.num_workers {r.describe_workers()})" if r.elastic else "")
            + f" x {r.cpus_per_worker:g} CPU"
            + (f" + {need_gpu:g} GPU" if need_gpu else "")
            + f": {where} {'has' if local else 'have'} {total_cpu:g} CPUs and {total_gpu:g} GPUs in all, room for "
            f"{fit} such worker(s). Lower run.num_workers / run.cpus_per_worker / run.gpus_per_worker, or "
            f"add nodes (for a local cluster: ray start --head --num-cpus N, then run.address=127.0.0.1:6379)."
        )


def request_worker_group(cfg: Config) -> None:
    """On an autoscaling cluster: ask for the whole worker group (an elastic one at its max) up front, so
    GPU nodes start now."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[worker_resources(cfg)] * cfg.run.max_workers)


def training_device(cfg: Config) -> str:
    """ "cuda" when the workers will train on GPUs: run.device=cuda, or auto on a cluster that has GPUs."""
    if cfg.run.device != "auto":
        return cfg.run.device
    connect(cfg.run.address)
    return "cuda" if any(r.get("GPU", 0) > 0 for r in live_nodes()) else "cpu"


def reserve_worker_group(cfg: Config) -> None:
    """Connected to the cluster: make sure the worker group will start (ask an autoscaler, or check)."""
    connect(cfg.run.address)
    if cfg.run.autoscaling:
        request_worker_group(cfg)
    else:
        check_resources(cfg)


def run_remote(fn: Callable[[Any], Any], arg: Any, address: str, cpus: float, gpus: float) -> Any:
    """`fn(arg)` as one Ray task with these resources, checked against the cluster first (Ray would wait)."""
    if not ray.is_initialized():
        check_address(address)
    started = connect(address)
    try:
        if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in live_nodes()):
            raise ResourceError(
                f"no node of the Ray cluster has {cpus:g} CPUs"
                + (f" and {gpus:g} GPUs" if gpus else "")
                + " free for the task. Lower --cpus/--gpus or add a node."
            )
        return ray.get(ray.remote(num_cpus=cpus, num_gpus=gpus)(fn).remote(arg))
    finally:
        if started:
            ray.shutdown()
