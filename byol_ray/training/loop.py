"""The per-worker pretraining loop: a plain function of (config, session, tracker).

It runs unchanged in-process (``LocalSession``) or as a Ray Train worker (``distributed.session``); Ray and
MLflow stay outside it. Read top to bottom like torchvision's reference ``train.py``: `pretrain` sets up
(data, replica, resume), then each epoch is `train_one_epoch` followed by `end_of_epoch` (replica check,
collapse check, kNN monitor, final evaluation, report and checkpoint). It resumes from the session's
latest checkpoint exactly (epoch boundaries, all randomness re-seeded from the epoch number).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from ..core.engine import InputSpec, Pretrainer, distributed, pick_device
from ..core.state import TrainState, check_compatible
from ..core.sync import to_host
from ..data.readers import ImageData, channel_stats, load_split
from ..data.transfer import adapt
from ..errors import UserError
from ..eval.encoders import untrained_encoder
from ..eval.scoring import EvalRow, evaluate_encoders, extract_features, knn_accuracy
from ..seeding import epoch_seed
from .cpu_runtime import configure_cpu
from .plan import (
    EVAL_OVERHEAD,
    UNTIMED_STEPS,
    WARMUP_STEPS,
    WARNING_TAG,
    StepPlan,
    agree,
    budget_steps,
    checked_plan,
    describe,
    describe_replan,
    epochs_plan,
    measure_embed_seconds,
    measure_step_seconds,
    replan,
)
from .replicas import check_replicas
from .session import Session

# Table row name -> metric key in MLflow (eval/<key>/linear_top1 ...).
EVAL_KEYS = {"BYOL (online encoder)": "byol", "untrained encoder": "untrained_encoder", "raw pixels": "raw_pixels"}


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


def log(msg: str) -> None:
    # Not print(): Ray Train patches print in workers to also go through logging, which shows each line
    # twice on the driver once anything wraps sys.stdout.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """The train split as the epochs consume it: one uint8 tensor in memory, or a streamed folder."""

    cfg: Config
    split: Any  # ImageData, or pipeline.FolderStream (data.stream)
    inputs: InputSpec
    device: torch.device
    stream: Any = None
    images: torch.Tensor | None = None  # the in-memory split, on the device when it fits easily there
    labels: torch.Tensor | None = None
    _test: ImageData | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.split)

    def in_memory_batch(self, micro: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One step's (images, labels) micro-batches of the in-memory split, from their index tensors."""
        assert self.images is not None and self.labels is not None, "a streamed split is not in memory"
        return [(self.images[idx], self.labels[idx]) for idx in micro]

    def test_split(self) -> ImageData:
        """The test split, read from disk once (kNN epochs and the final evaluation share it)."""
        if self._test is None:
            self._test = adapt_channels(self.cfg, load_split(self.cfg.data, "test"))
        return self._test


def adapt_channels(cfg: Config, data: ImageData) -> ImageData:
    """The images with the encoder's input channels (model.in_channels; 0 keeps the data's own)."""
    if not cfg.model.in_channels or cfg.model.in_channels == data.channels:
        return data
    return adapt(data, cfg.model.in_channels, data.images.shape[-1])[0]


# Makes the streamed split when another runtime feeds it (Ray Data, distributed/ingest.py).
StreamFactory = Callable[[Config, torch.device], Any]


def load_train_data(cfg: Config, device: torch.device, stream_factory: StreamFactory | None = None) -> TrainData:
    if cfg.data.stream:  # too big for memory: decode and crop in DataLoader workers (data/pipeline.py)
        from ..data.pipeline import FolderStream

        if cfg.data.loader == "ray_data":
            if stream_factory is None:
                raise UserError(
                    "data.loader=ray_data is fed by Ray Data inside Ray Train workers; this run has none (it "
                    "runs in-process). Use data.loader=dataloader here, or train with `byol-ray train`."
                )
            stream = stream_factory(cfg, device)
        else:
            stream = FolderStream(cfg, "train", device)
        spec = InputSpec(stream.channels, len(stream.classes), stream.mean, stream.std)
        return TrainData(cfg, stream, spec, device, stream=stream)
    return in_memory_train_data(cfg, load_split(cfg.data, "train"), device)


def in_memory_train_data(cfg: Config, split: ImageData, device: torch.device) -> TrainData:
    """A train split held in memory, placed where the epochs cut their batches from it. The benchmark's
    synthetic images come through here too, so it times the placement training chooses."""
    train = adapt_channels(cfg, split)
    mean, std = channel_stats(train.images)
    images, labels = train.images, train.labels
    # The permutation is drawn each epoch from the whole train split; keep it in memory as one tensor
    # (on the GPU when it fits easily: batches are then cut there, with no host copy per step).
    if keeps_on_device(images, device):
        images, labels = images.to(device), labels.to(device)
    return TrainData(
        cfg, train, InputSpec(train.channels, len(train.classes), mean, std), device, images=images, labels=labels
    )


def keeps_on_device(images: torch.Tensor, device: torch.device) -> bool:
    """Whether the in-memory split goes to the device: a GPU, when it takes at most 1/8 of its memory."""
    return device.type == "cuda" and images.numel() <= torch.cuda.get_device_properties(device).total_memory // 8


def training_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """The device this worker trains on; on a CPU, the process set up to train (threads, allocator)."""
    device = pick_device(cfg, local_rank)
    if device.type == "cpu":
        configure_cpu(cfg)
    return device


def build_trainer(cfg: Config, data: TrainData, rank: int = 0, world: int = 1) -> Pretrainer:
    """The replica that trains on `data`: one epoch is a full pass over it (or optim.steps_per_epoch), and
    streamed batches arrive already cropped, so its views skip the crop."""
    spe = steps_per_epoch(cfg, len(data))
    trainer = Pretrainer(cfg, data.inputs, steps_per_epoch=spe, device=data.device, rank=rank, world_size=world)
    if data.stream is not None:
        trainer.views = data.stream.device_views(trainer.views)
    return trainer


def steps_per_epoch(cfg: Config, n_images: int) -> int:
    steps = n_images // cfg.optim.batch_size  # drop_last: BatchNorm and equal shards need full batches
    if cfg.optim.steps_per_epoch:
        steps = min(steps, cfg.optim.steps_per_epoch)
    if steps < 1:
        subset = f" (data.train_subset={cfg.data.train_subset})" if cfg.data.train_subset else ""
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} is larger than the {n_images} training images{subset}, so an "
            f"epoch would hold no step (the last incomplete batch is dropped). Lower optim.batch_size to at most "
            f"{n_images}, or use more images (raise or remove data.train_subset)."
        )
    return steps


def epoch_permutation(cfg: Config, n_images: int, epoch: int) -> torch.Tensor:
    """Depends only on (seed, epoch): the same on every worker and after a resume."""
    return seeded_permutation(cfg.run.seed, n_images, epoch)


def seeded_permutation(seed: int, n_images: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(epoch_seed(seed, 0, epoch, "shuffle"))
    return torch.randperm(n_images, generator=g)


def epoch_order(cfg: Config, data: TrainData, epoch: int) -> torch.Tensor:
    """The epoch's permutation on the device that holds the images: a batch is then cut there with no
    host-to-device copy of its indices (from pageable memory such a copy waits for the device)."""
    perm = epoch_permutation(cfg, len(data), epoch)
    return perm.to(data.images.device) if data.images is not None else perm


def worker_share(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, size) of this worker's share of a global batch: `world` disjoint shares that cover it, the
    first `batch_size % world` of them one image larger (the engine weights each by its size)."""
    base, extra = divmod(batch_size, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def worker_batches(cfg: Config, perm: torch.Tensor, step: int, rank: int, world: int) -> list[torch.Tensor]:
    """This worker's micro-batch indices for one optimiser step: its disjoint share of the global batch
    (`worker_share`), split into `accumulate_steps` micro-batches whose sizes differ by at most one."""
    b = cfg.optim.batch_size
    offset, size = worker_share(b, rank, world)
    mine = perm[step * b + offset : step * b + offset + size]
    return list(mine.tensor_split(cfg.optim.accumulate_steps))


def epoch_batches(
    cfg: Config, data: TrainData, epoch: int, steps: int, rank: int, world: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """This worker's micro-batches for each of the epoch's first `steps` optimiser steps, in order: cut from
    the in-memory split as each step asks for them, or streamed. The permutation is drawn now."""
    perm = epoch_order(cfg, data, epoch)
    batches = [worker_batches(cfg, perm, s, rank, world) for s in range(steps)]
    if data.stream is not None:
        return data.stream.micro_batches(epoch, batches)
    return (data.in_memory_batch(b) for b in batches)


# ---- the loop -----------------------------------------------------------------------------------
def pretrain(
    cfg: Config,
    session: Session,
    tracker: Tracker | None = None,
    run_id: str = "",
    plan: StepPlan | None = None,
    stream_factory: StreamFactory | None = None,
) -> dict[str, Any]:
    """Train, report every epoch, evaluate at the end. Returns the final metrics (and eval rows on rank 0).

    `plan` makes a fresh run follow a plan made elsewhere (another run's, to repeat its schedule) instead
    of its own; a resumed run always keeps the plan of its checkpoint. `stream_factory` feeds a streamed
    folder from outside the process (``data.loader=ray_data``)."""
    t_start = time.perf_counter()  # a time budget counts from here
    rank, world = session.rank, session.world_size
    device = training_device(cfg, session.local_rank)
    data = load_train_data(cfg, device, stream_factory)
    trainer = build_trainer(cfg, data, rank, world)
    spe = trainer.steps_per_epoch

    if rank == 0:
        log(
            f"[train] {len(data)} images, {spe} steps/epoch, global batch {cfg.optim.batch_size} on {world} "
            f"worker(s), device {device}, encoder {cfg.model.backbone} (stem {cfg.model.stem}, width "
            f"{cfg.model.width}, dim {trainer.encoder.out_dim}), precision {trainer.precision}"
        )
    start_epoch, restarts, run_id, resumed_plan, resized = resume(cfg, session, trainer, device, run_id)
    own_plan = resumed_plan is None and plan is None  # only a plan this run made is re-planned
    plan = resumed_plan or plan
    if plan is None:
        plan = make_plan(cfg, trainer, data, rank, world, t_start)
        if rank == 0 and tracker is not None:
            # run.precision may be "auto": record what the replicas computed in.
            tracker.log_params({**plan.params(), "precision_used": trainer.precision})
            if plan.warning:
                tracker.set_tags({WARNING_TAG: plan.warning})
    trainer.set_schedule(plan.breakpoints())
    if rank == 0:
        log(describe(plan, cfg))

    metrics: dict[str, Any] = {}
    rows: list[EvalRow] = []
    epoch = start_epoch
    while epoch < plan.epochs:  # a re-plan may add or remove epochs
        metrics = train_one_epoch(cfg, trainer, data, epoch, rank, world, plan)
        metrics["restarts"] = restarts
        if cfg.debug.perturb_target_rank == rank and epoch == start_epoch:
            with torch.no_grad():
                next(trainer.target.parameters()).add_(1e-3)
        if own_plan and epoch + 1 < plan.epochs:
            plan = replan_after_epoch(cfg, trainer, plan, epoch, metrics, rank, t_start, data.device)
        metrics["planned_steps"] = plan.total_steps
        rows, collapsed = end_of_epoch(cfg, trainer, data, epoch, metrics, session, tracker, run_id, restarts, plan)
        if resized and epoch == start_epoch:
            pause_point(cfg, rank, "resized")
        if collapsed:
            break
        epoch += 1
    return {"train": metrics, "trainer": trainer, "eval_rows": rows, "plan": plan}


def replan_after_epoch(
    cfg: Config,
    trainer: Pretrainer,
    plan: StepPlan,
    epoch: int,
    metrics: dict[str, Any],
    rank: int,
    t_start: float,
    device: torch.device,
) -> StepPlan:
    """The plan for the wall time left at the speed of the epoch just run (plan.replan), from rank 0's
    clock on every rank, so that all replicas keep the same schedule; before the epoch's checkpoint,
    which stores it."""
    step_s = metrics["epoch_seconds"] / plan.steps_in_epoch(epoch)
    elapsed, step_s = agree([time.perf_counter() - t_start, step_s], device)
    new = replan(cfg, plan, trainer.step, elapsed, step_s)
    if new is None:
        return plan
    trainer.set_schedule(new.breakpoints())
    if rank == 0:
        log(describe_replan(plan, new, epoch + 1, trainer.step, step_s, cfg, trainer.lr(), trainer.tau()))
    return new


def resume(
    cfg: Config, session: Session, trainer: Pretrainer, device: torch.device, run_id: str
) -> tuple[int, int, str, StepPlan | None, bool]:
    """Load the session's latest checkpoint into the replica: (first epoch to train, restarts, MLflow run,
    the run's plan: a resumed run keeps the schedule it started with, whether the group that wrote the
    checkpoint had another size)."""
    state = session.latest_state()
    if state is None:
        return 0, 0, run_id, None, False
    check_compatible(state, cfg)
    trainer.load_state_dict(_to(state.trainer, device))
    torch.set_rng_state(state.rng)
    plan = StepPlan(**state.plan) if state.plan else epochs_plan(cfg, trainer.steps_per_epoch)
    restarts = state.restarts + 1
    start_epoch = plan.epochs if state.collapsed else state.epoch  # a collapsed run stopped for good
    if session.rank == 0:
        log(f"[resume] from epoch {start_epoch} (step {trainer.step}) of the run's plan, restart #{restarts}")
    resized = bool(state.world_size) and state.world_size != session.world_size
    if resized:
        report_resize(cfg, trainer, session, state.world_size, start_epoch)
    return start_epoch, restarts, run_id or state.mlflow_run_id, plan, resized


def report_resize(cfg: Config, trainer: Pretrainer, session: Session, old: int, start_epoch: int) -> None:
    """An elastic group restarted at another size: the replicas loaded from the checkpoint are compared at
    once (not only at the epoch's end), and rank 0 says so in one line. Nothing else changes with the size:
    the global batch, the step count and hence the lr and tau schedules are those of the checkpoint."""
    new = session.world_size
    check_replicas(trainer, session.rank, new)
    if session.rank == 0:
        b = cfg.optim.batch_size
        log(
            f"[elastic] group resized {old} -> {new} worker(s) at epoch {start_epoch + 1} (step {trainer.step}); "
            f"per-worker batch {share_sizes(b, old)} -> {share_sizes(b, new)}"
        )


def share_sizes(batch_size: int, world: int) -> str:
    """The workers' shares of a global batch, as a resize line shows them: `64`, or `1366/1365` when they
    differ by an image."""
    sizes = sorted({worker_share(batch_size, r, world)[1] for r in range(world)}, reverse=True)
    return "/".join(map(str, sizes))


def make_plan(cfg: Config, trainer: Pretrainer, data: TrainData, rank: int, world: int, t_start: float) -> StepPlan:
    """`optim.total_steps`, `optim.epochs` full epochs, or with a time budget as many steps as fit (see
    plan.py): a warm-up that leaves too little of the budget to train is measured once more."""
    spe = trainer.steps_per_epoch
    if cfg.optim.total_steps:
        return StepPlan(cfg.optim.total_steps, spe)
    if not cfg.optim.time_budget_minutes:
        return epochs_plan(cfg, spe)
    perm = epoch_order(cfg, data, 0)
    steps = [worker_batches(cfg, perm, s % spe, rank, world) for s in range(UNTIMED_STEPS + WARMUP_STEPS)]
    if data.stream is not None:
        fed = list(data.stream.micro_batches(0, steps))
        batch: Callable[[int], list] = fed.__getitem__
    else:

        def batch(i: int) -> list:
            return data.in_memory_batch(steps[i])

    pause_point(cfg, rank, "warmup")

    def measure() -> tuple[float, float, float]:
        trainer.start_epoch(0)
        step_s = measure_step_seconds(trainer, batch)
        embed_s = embed_seconds(cfg, trainer, data) if rank == 0 else 0.0
        # Every rank gets rank 0's figures, so every rank takes the same decision to measure again.
        step_s, embed_s, elapsed = agree([step_s, embed_s, time.perf_counter() - t_start], data.device)
        return step_s, embed_s, elapsed

    return checked_plan(
        cfg, measure, lambda step_s, embed_s, elapsed: plan_for(cfg, spe, step_s, embed_s, elapsed), _rank0_log(rank)
    )


def _rank0_log(rank: int) -> Callable[[str], None]:
    return log if rank == 0 else (lambda _msg: None)


def embed_seconds(cfg: Config, trainer: Pretrainer, data: TrainData) -> float:
    """Seconds one encoder will take to embed the train and test splits at the end of the run (kNN monitors
    embed the same), timed on a sample; 0 when the run has no evaluation or streams its data."""
    if data.stream is not None or not (cfg.eval.final or cfg.eval.knn_every):
        return 0.0
    n = min(len(data), 4 * cfg.eval.batch_size)
    sample = data.split.images[:n]
    per_image = measure_embed_seconds(
        lambda: extract_features(
            trainer.encoder,
            sample,
            cfg.data.image_size,
            data.inputs.mean,
            data.inputs.std,
            cfg.eval.batch_size,
            data.device,
        ),
        n,
        data.device,
    )
    return per_image * (len(data) + len(data.test_split()))


def plan_for(cfg: Config, spe: int, step_s: float, embed_s: float, elapsed_s: float) -> StepPlan:
    """The budget's plan at these measured costs, keeping back the evaluation (two encoders with the
    baselines) and the kNN monitors."""
    encoders = 2 if cfg.eval.baselines else 1
    return budget_steps(cfg, spe, step_s, EVAL_OVERHEAD * encoders * embed_s, EVAL_OVERHEAD * embed_s, elapsed_s)


def train_one_epoch(
    cfg: Config, trainer: Pretrainer, data: TrainData, epoch: int, rank: int, world: int, plan: StepPlan
) -> dict[str, Any]:
    """One pass of optimiser steps (the plan's last epoch may stop part-way); returns the epoch's metrics
    averaged over steps and workers."""
    trainer.start_epoch(epoch)
    trainer.take_stats()  # the sums start at this epoch
    spe = plan.steps_in_epoch(epoch)
    t0 = time.perf_counter()
    steps = epoch_batches(cfg, data, epoch, spe, rank, world)
    for s in range(spe):
        _maybe_crash(cfg, rank, trainer.step)
        if s == spe // 2 and epoch == min(1, plan.epochs - 1):
            pause_point(cfg, rank, "mid_epoch")
        if cfg.debug.step_delay_s:
            time.sleep(cfg.debug.step_delay_s)
        stats = trainer.train_step(next(steps))  # a device tensor: read only here at log points (one sync each)
        if rank == 0 and ((s + 1) % cfg.run.log_every == 0 or s + 1 == spe):
            loss = to_host(stats[0])
            rate = (s + 1) * cfg.optim.batch_size / (time.perf_counter() - t0)
            log(
                f"[train] epoch {epoch + 1}/{plan.epochs} step {s + 1}/{spe} loss {loss:.4f} "
                f"lr {trainer.lr():.4f} tau {trainer.tau():.5f} {rate:.0f} img/s"
            )
    sums = trainer.take_stats()
    if distributed():
        dist.all_reduce(sums)
        sums[[0, 1, 4]] /= world
    loss, probe_loss, probe_correct, probe_count, repr_std = to_host(sums)  # the epoch's one read
    elapsed = time.perf_counter() - t0
    metrics = {"epoch": epoch + 1, "step": trainer.step, "loss": loss / spe}
    if trainer.probe is not None:
        metrics["probe_loss"] = probe_loss / spe
        metrics["online_probe_acc"] = 100.0 * probe_correct / max(1.0, probe_count)
    metrics.update(
        {
            "repr_std": repr_std / spe,
            "lr": trainer.lr(),
            "tau": trainer.tau(),
            "images_per_s": spe * cfg.optim.batch_size / elapsed,
            "workers": world,
            "epoch_seconds": elapsed,
        }
    )
    return metrics


def end_of_epoch(
    cfg: Config,
    trainer: Pretrainer,
    data: TrainData,
    epoch: int,
    metrics: dict[str, Any],
    session: Session,
    tracker: Tracker | None,
    run_id: str,
    restarts: int,
    plan: StepPlan,
) -> tuple[list[EvalRow], bool]:
    """Replica check, collapse check, kNN monitor, final evaluation, log, report and checkpoint.
    Returns (the final evaluation's rows, whether the run stopped on a collapse)."""
    rank = session.rank
    metrics.update(check_replicas(trainer, rank, session.world_size))
    # repr_std is all-reduced, so every rank takes the same decision.
    collapsed = bool(cfg.eval.collapse_std) and metrics["repr_std"] < cfg.eval.collapse_std
    metrics["collapsed"] = float(collapsed)
    last = epoch + 1 == plan.epochs or collapsed
    rows: list[EvalRow] = []
    if rank == 0:
        if last:
            metrics["trained_steps"] = trainer.step  # what a sweep's report holds against its plan
        if last and cfg.eval.final:
            # Evaluated before the last report so the scores travel with the final checkpoint's metrics;
            # its kNN number is logged as the last epoch's knn_acc.
            rows = final_evaluation(cfg, trainer, data)
            metrics.update(eval_metrics(rows))
            metrics["knn_acc"] = rows[0].knn_top1
        elif cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0:
            metrics["knn_acc"] = knn_monitor(cfg, trainer, data)
        log(
            f"[epoch {epoch + 1}] loss {metrics['loss']:.4f}"
            + (f" probe acc {metrics['online_probe_acc']:.1f}%" if "online_probe_acc" in metrics else "")
            + f" repr std {metrics['repr_std']:.3f} {metrics['images_per_s']:.0f} img/s"
            + (f" kNN {metrics['knn_acc']:.2f}%" if "knn_acc" in metrics else "")
        )
        if tracker is not None:
            tracker.log_metrics(
                {k: float(v) for k, v in metrics.items() if k not in ("epoch", "eval_rows")}, step=epoch + 1
            )
    state = None
    if rank == 0 and ((epoch + 1) % cfg.run.checkpoint_every == 0 or last):
        state = TrainState(
            trainer=trainer.state_dict(),
            epoch=epoch + 1,
            in_channels=data.inputs.channels,
            config=cfg.to_dict(),
            rng=torch.get_rng_state(),
            restarts=restarts,
            mlflow_run_id=run_id,
            collapsed=collapsed,
            plan=plan.to_dict(),
            world_size=session.world_size,
        )
    session.report(metrics, state)
    if collapsed and rank == 0:
        log(
            f"[collapse] representation std {metrics['repr_std']:.4f} < eval.collapse_std="
            f"{cfg.eval.collapse_std:g} after epoch {epoch + 1}: stopped early and marked collapsed"
        )
    return rows, collapsed


# ---- monitors and the final evaluation ----------------------------------------------------------
def knn_monitor(cfg: Config, trainer: Pretrainer, data: TrainData) -> float:
    test = data.test_split()
    size, mean, std = cfg.data.image_size, data.inputs.mean, data.inputs.std
    ftr = extract_features(trainer.encoder, data.split.images, size, mean, std, cfg.eval.batch_size, data.device)
    fte = extract_features(trainer.encoder, test.images, size, mean, std, cfg.eval.batch_size, data.device)
    return knn_accuracy(ftr, data.split.labels, fte, test.labels, cfg.eval.knn_k, cfg.eval.knn_temperature)


def final_evaluation(cfg: Config, trainer: Pretrainer, data: TrainData) -> list[EvalRow]:
    """BYOL's online encoder against the baselines (an untrained encoder, raw pixels), same evaluator."""
    pause_point(cfg, 0, "final_eval")
    test, train = data.test_split(), data.split
    encoders: dict[str, torch.nn.Module | None] = {"BYOL (online encoder)": trainer.encoder}
    if cfg.eval.baselines:
        encoders["untrained encoder"] = untrained_encoder(cfg, data.inputs.channels, cfg.run.seed, data.device)
        encoders["raw pixels"] = None
    log(
        f"[eval] linear probe and kNN (k={cfg.eval.knn_k}) on {len(train.images)} train / "
        f"{len(test.images)} test images"
    )
    return evaluate_on_run_data(cfg, data, encoders)


def evaluate_on_run_data(
    cfg: Config, data: TrainData, encoders: dict[str, torch.nn.Module | None], say: Callable[[str], None] = log
) -> list[EvalRow]:
    """The run's evaluator (cfg.eval: linear probe and kNN) of `encoders` on the run's own train and test
    splits, at its image size and normalisation."""
    test = data.test_split()
    return evaluate_encoders(
        encoders,
        data.split.images,
        data.split.labels,
        test.images,
        test.labels,
        cfg.data.image_size,
        data.inputs.mean,
        data.inputs.std,
        cfg.eval,
        data.device,
        say,
    )


def eval_metrics(rows: list[EvalRow]) -> dict[str, Any]:
    """Flat `eval/<key>/<metric>` numbers plus the rows as one JSON string: Ray metrics are flat values, and
    Tune's TensorBoard logger takes a list for a histogram and warns that it cannot draw one of strings."""
    out: dict[str, Any] = {"eval_rows": json.dumps([r.__dict__ for r in rows])}
    for r in rows:
        key = EVAL_KEYS.get(r.name, r.name.replace(" ", "_"))
        out[f"eval/{key}/linear_top1"] = r.linear_top1
        out[f"eval/{key}/linear_top5"] = r.linear_top5
        out[f"eval/{key}/knn_top1"] = r.knn_top1
    return out


def eval_rows_from_metrics(metrics: dict[str, Any]) -> list[EvalRow]:
    """The rows `eval_metrics` put in a report (none when the report has no evaluation)."""
    return [EvalRow(**r) for r in json.loads(metrics.get("eval_rows", "[]"))]


# ---- helpers ------------------------------------------------------------------------------------
def _to(v: Any, device: torch.device) -> Any:
    """Move a loaded state (nested dicts of tensors) to the device; optimiser state follows its params."""
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.to(device)
    return v


def pause_point(cfg: Config, rank: int, phase: str) -> None:
    """Fault injection: hold rank 0 once at `phase` (debug.pause_at) for debug.pause_s seconds, after writing
    a marker file that says the run got there, so that a test can kill the driver in that phase; a rerun
    finds the marker and goes through."""
    if phase not in cfg.debug.pause_at or rank != 0:
        return
    marker = cfg.output_dir / f".paused_{cfg.run.name}_{phase}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log(f"[debug] rank {rank} holds {cfg.debug.pause_s:g} s in phase {phase}")
    time.sleep(cfg.debug.pause_s)


def _maybe_crash(cfg: Config, rank: int, step: int) -> None:
    """Fault injection at the configured step: kill this worker process once (marker file = done), or
    raise a UserError every time."""
    if cfg.debug.crash_rank != rank or cfg.debug.crash_at_step != step:
        return
    if cfg.debug.crash_kind == "user_error":
        raise UserError(
            f"debug.crash_kind=user_error: rank {rank} raised this at step {step}, as an error in the "
            f"input would. Set debug.crash_rank=-1 to train normally."
        )
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
