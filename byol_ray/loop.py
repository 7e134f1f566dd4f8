"""The per-worker pretraining loop: a plain function of (config, session, tracker).

It runs unchanged in-process (``LocalSession``) or as a Ray Train worker (``RaySession``); Ray and MLflow
stay outside it. Each epoch it reports metrics and, every ``run.checkpoint_every`` epochs, a checkpoint;
it resumes from the session's latest checkpoint exactly (epoch boundaries, all randomness re-seeded from
the epoch number).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Protocol

import torch
import torch.distributed as dist

from .checkpoint import check_compatible
from .config import Config
from .data import ImageData, channel_stats, load_split
from .engine import Pretrainer, distributed, epoch_seed
from .evaluate import EvalRow, evaluate_encoders, knn_accuracy, extract_features
from .model import build_encoder


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int

    def latest_state(self) -> dict[str, Any] | None: ...
    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None: ...


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


def log(msg: str) -> None:
    # Not print(): Ray Train patches print in workers to also go through logging, which shows each line
    # twice on the driver once anything wraps sys.stdout.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible to this worker")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def steps_per_epoch(cfg: Config, n_images: int) -> int:
    steps = n_images // cfg.optim.batch_size  # drop_last: BatchNorm and equal shards need full batches
    if cfg.optim.steps_per_epoch:
        steps = min(steps, cfg.optim.steps_per_epoch)
    if steps < 1:
        raise ValueError(
            f"optim.batch_size={cfg.optim.batch_size} is larger than the {n_images} training images; "
            "lower the batch size or use more data"
        )
    return steps


def epoch_permutation(cfg: Config, n_images: int, epoch: int) -> torch.Tensor:
    """Depends only on (seed, epoch): the same on every worker and after a resume."""
    g = torch.Generator().manual_seed(epoch_seed(cfg.run.seed, 0, epoch, "shuffle"))
    return torch.randperm(n_images, generator=g)


def worker_batches(cfg: Config, perm: torch.Tensor, step: int, rank: int, world: int) -> list[torch.Tensor]:
    """This worker's micro-batch indices for one optimiser step: a disjoint 1/world share of the global
    batch, split into `accumulate_steps` micro-batches."""
    b = cfg.optim.batch_size
    per_worker = b // world
    mine = perm[step * b + rank * per_worker : step * b + (rank + 1) * per_worker]
    return list(mine.chunk(cfg.optim.accumulate_steps))


def pretrain(cfg: Config, session: Session, tracker: Tracker | None = None, run_id: str = "") -> dict[str, Any]:
    """Train, report every epoch, evaluate at the end. Returns the final metrics (and eval rows on rank 0)."""
    rank, world = session.rank, session.world_size
    device = pick_device(cfg, session.local_rank)
    threads = cfg.run.torch_threads or max(1, int(cfg.run.cpus_per_worker))
    if device.type == "cpu":
        torch.set_num_threads(threads)

    stream = None
    if cfg.data.stream:  # too big for memory: decode and crop in DataLoader workers (pipeline.py)
        from .pipeline import FolderStream

        train = stream = FolderStream(cfg, "train", device)
        mean, std = stream.mean, stream.std
    else:
        train = load_split(cfg.data, "train")
        mean, std = channel_stats(train.images)
    spe = steps_per_epoch(cfg, len(train))
    n_classes = len(train.classes)
    trainer = Pretrainer(cfg, train.channels, n_classes, mean, std, device, spe, rank, world)
    if stream is not None:
        trainer.views = stream.device_views(trainer.views)
    else:
        # The permutation is drawn each epoch from the whole train split; keep it in memory as one tensor
        # (on the GPU when it fits easily: batches are then cut there, with no host copy per step).
        images, labels = train.images, train.labels
        if device.type == "cuda" and images.numel() <= torch.cuda.get_device_properties(device).total_memory // 8:
            images, labels = images.to(device), labels.to(device)

    start_epoch, restarts = 0, 0
    state = session.latest_state()
    if state is not None:
        check_compatible(state, cfg)
        trainer.load_state_dict({k: _to(v, device) for k, v in state["trainer"].items()})
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch = int(state["epoch"])
        restarts = int(state.get("restarts", 0)) + 1
        run_id = run_id or state.get("mlflow_run_id", "")
        if state.get("collapsed"):
            start_epoch = cfg.optim.epochs  # it stopped for good: nothing left to train
        if rank == 0:
            log(f"[resume] from epoch {start_epoch} (step {trainer.step}), restart #{restarts}")

    if rank == 0:
        log(f"[train] {len(train)} images, {spe} steps/epoch x {cfg.optim.epochs} epochs, global batch "
            f"{cfg.optim.batch_size} on {world} worker(s), device {device}, encoder {cfg.model.backbone} "
            f"(stem {cfg.model.stem}, width {cfg.model.width}, dim {trainer.encoder.out_dim})")
    per_step_images = cfg.optim.batch_size
    last_metrics: dict[str, Any] = {}
    result_rows: list[EvalRow] = []
    for epoch in range(start_epoch, cfg.optim.epochs):
        trainer.start_epoch(epoch)
        t0 = time.perf_counter()
        perm = epoch_permutation(cfg, len(train), epoch)
        plan = [worker_batches(cfg, perm, s, rank, world) for s in range(spe)]
        streamed = stream.micro_batches(epoch, plan) if stream is not None else None
        sums = torch.zeros(5, dtype=torch.float64)  # loss, probe_loss, probe_correct, probe_count, repr_std
        for s in range(spe):
            _maybe_crash(cfg, rank, trainer.step)
            micro = next(streamed) if streamed is not None else [(images[i], labels[i]) for i in plan[s]]
            st = trainer.train_step(micro)
            sums += torch.tensor([st.loss, st.probe_loss, st.probe_correct, st.probe_count, st.repr_std],
                                 dtype=torch.float64)
            if rank == 0 and ((s + 1) % cfg.run.log_every == 0 or s + 1 == spe):
                rate = (s + 1) * per_step_images / (time.perf_counter() - t0)
                log(f"[train] epoch {epoch + 1}/{cfg.optim.epochs} step {s + 1}/{spe} loss {st.loss:.4f} "
                    f"lr {trainer.lr():.4f} tau {trainer.tau():.5f} {rate:.0f} img/s")
        elapsed = time.perf_counter() - t0
        if distributed():
            dist.all_reduce(sums)
            sums[[0, 1, 4]] /= world
        metrics = {
            "epoch": epoch + 1,
            "step": trainer.step,
            "loss": sums[0].item() / spe,
            "probe_loss": sums[1].item() / spe,
            "online_probe_acc": 100.0 * sums[2].item() / max(1.0, sums[3].item()),
            "repr_std": sums[4].item() / spe,
            "lr": trainer.lr(),
            "tau": trainer.tau(),
            "images_per_s": spe * per_step_images / elapsed,
            "epoch_seconds": elapsed,
            "restarts": restarts,
        }
        if cfg.debug.perturb_target_rank == rank and epoch == start_epoch:
            with torch.no_grad():
                next(trainer.target.parameters()).add_(1e-3)
        metrics.update(check_replicas(trainer, rank, world))
        # repr_std is all-reduced above, so every rank takes the same decision.
        collapsed = bool(cfg.eval.collapse_std) and metrics["repr_std"] < cfg.eval.collapse_std
        metrics["collapsed"] = float(collapsed)
        last = epoch + 1 == cfg.optim.epochs or collapsed
        # The final evaluation scores kNN anyway; its number is logged as the last epoch's knn_acc.
        knn_due = cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0 and not (last and cfg.eval.final)
        if knn_due and rank == 0:
            metrics["knn_acc"] = knn_monitor(cfg, trainer, train, mean, std, device)
        rows: list[EvalRow] = []
        if last and rank == 0 and cfg.eval.final:
            # Evaluated before the last report so the scores travel with the final checkpoint's metrics.
            rows = final_evaluation(cfg, trainer, train, mean, std, device)
            metrics.update(eval_metrics(rows))
            metrics["knn_acc"] = rows[0].knn_top1
        if rank == 0:
            log(f"[epoch {epoch + 1}] loss {metrics['loss']:.4f} probe acc {metrics['online_probe_acc']:.1f}% "
                f"repr std {metrics['repr_std']:.3f} {metrics['images_per_s']:.0f} img/s"
                + (f" kNN {metrics['knn_acc']:.2f}%" if "knn_acc" in metrics else ""))
            if tracker is not None:
                tracker.log_metrics({k: float(v) for k, v in metrics.items() if k not in ("epoch", "eval_rows")},
                                    step=epoch + 1)
        state_out = None
        if rank == 0 and ((epoch + 1) % cfg.run.checkpoint_every == 0 or last):
            state_out = {
                "trainer": trainer.state_dict(),
                "epoch": epoch + 1,
                "in_channels": train.channels,
                "config": cfg.to_dict(),
                "rng": {"torch": torch.get_rng_state()},
                "restarts": restarts,
                "mlflow_run_id": run_id,
                "collapsed": collapsed,
            }
        session.report(metrics, state_out)
        last_metrics = metrics
        result_rows = rows
        if collapsed:
            if rank == 0:
                log(f"[collapse] representation std {metrics['repr_std']:.4f} < eval.collapse_std="
                    f"{cfg.eval.collapse_std:g} after epoch {epoch + 1}: stopped early and marked collapsed")
            break

    return {"train": last_metrics, "trainer": trainer, "eval_rows": result_rows}


def eval_metrics(rows: list[EvalRow]) -> dict[str, Any]:
    """Flat `eval/<key>/<metric>` numbers plus the rows as JSON (Ray metrics are flat values)."""
    import json

    out: dict[str, Any] = {"eval_rows": [json.dumps(r.__dict__) for r in rows]}
    for r in rows:
        key = EVAL_KEYS.get(r.name, r.name.replace(" ", "_"))
        out[f"eval/{key}/linear_top1"] = r.linear_top1
        out[f"eval/{key}/linear_top5"] = r.linear_top5
        out[f"eval/{key}/knn_top1"] = r.knn_top1
    return out


def _to(v: Any, device: torch.device) -> Any:
    """Move a loaded state (nested dicts of tensors) to the device; optimiser state follows its params."""
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.to(device)
    return v


def _maybe_crash(cfg: Config, rank: int, step: int) -> None:
    """Fault injection: kill this worker process once at the configured step (marker file = done)."""
    if cfg.debug.crash_rank != rank or cfg.debug.crash_at_step != step:
        return
    marker = cfg.output_dir / f".crashed_{cfg.run.name}_{rank}_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    # Ray Train V2 collects reports when it polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # 2 s): a checkpoint reported less than one poll before a crash is on disk but not yet registered, so
    # the restart would begin one checkpoint earlier. Wait that window out: the test is of resuming.
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    log(f"[debug] rank {rank} kills its own process (pid {os.getpid()}) at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


class ReplicaMismatch(RuntimeError):
    pass


def check_replicas(trainer: Pretrainer, rank: int, world: int) -> dict[str, float]:
    """Compare per-tensor checksums of online and target networks across workers; raise on mismatch.

    Returns the metrics logged every epoch: each rank's target checksum (so the agreement is visible in
    MLflow, not only asserted) and whether all replicas agree.
    """
    sums = trainer.checksums()
    names = list(sums)
    vec = torch.tensor([sums[n] for n in names], dtype=torch.float64)
    is_target = torch.tensor([n.startswith("target.") for n in names])
    gathered = [vec]
    if world > 1 and distributed():
        gathered = [torch.zeros_like(vec) for _ in range(world)]
        dist.all_gather(gathered, vec)
    out = {f"target_checksum_rank{r}": g[is_target].sum().item() for r, g in enumerate(gathered)}
    out["target_checksum"] = out["target_checksum_rank0"]
    bad = sorted({names[i] for g in gathered[1:] for i in torch.nonzero(g != gathered[0]).flatten().tolist()})
    if bad:
        ranks = [r for r in range(1, world) if not torch.equal(gathered[r], gathered[0])]
        raise ReplicaMismatch(
            f"replicas diverged after step {trainer.step}: rank(s) {ranks} differ from rank 0 in "
            f"{len(bad)} tensor(s): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}"
        )
    out["replicas_in_sync"] = 1.0
    return out


def knn_monitor(cfg: Config, trainer: Pretrainer, train: ImageData, mean, std, device) -> float:
    test = load_split(cfg.data, "test")
    size = cfg.data.image_size
    ftr = extract_features(trainer.encoder, train.images, size, mean, std, cfg.eval.batch_size, device)
    fte = extract_features(trainer.encoder, test.images, size, mean, std, cfg.eval.batch_size, device)
    return knn_accuracy(ftr, train.labels, fte, test.labels, cfg.eval.knn_k, cfg.eval.knn_temperature)


# Table row name -> metric key in MLflow (eval/<key>/linear_top1 ...).
EVAL_KEYS = {"BYOL (online encoder)": "byol", "untrained encoder": "untrained_encoder", "raw pixels": "raw_pixels"}


def final_evaluation(cfg: Config, trainer: Pretrainer, train: ImageData, mean, std, device) -> list[EvalRow]:
    """BYOL's online encoder against the baselines (an untrained encoder, raw pixels), same evaluator."""
    test = load_split(cfg.data, "test")
    encoders: dict[str, torch.nn.Module | None] = {"BYOL (online encoder)": trainer.encoder}
    if cfg.eval.baselines:
        torch.manual_seed(cfg.run.seed)
        encoders["untrained encoder"] = build_encoder(cfg.model, train.channels).to(device)
        encoders["raw pixels"] = None
    log(f"[eval] linear probe and kNN (k={cfg.eval.knn_k}) on {len(train.images)} train / "
        f"{len(test.images)} test images")
    return evaluate_encoders(encoders, train.images, train.labels, test.images, test.labels,
                             cfg.data.image_size, mean, std, cfg.eval, device, log)
