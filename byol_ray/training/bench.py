"""Where a BYOL training step's time goes, measured on the real code paths (``byol-ray bench``).

The benchmark sets up exactly as a training worker does (``training/loop.py``): the same device and
process settings (`loop.training_device`), the train split from `loop.load_train_data` (in memory, on the
GPU only when training would put it there; or streamed), the replica from `loop.build_trainer`, and the
batches the loop cuts for each step (`loop.epoch_batches`). ``--synthetic N`` builds its random images into
the same in-memory split (`loop.in_memory_train_data`). For the config's backbone, image size, batch
(``optim.batch_size``, on one device) and device, every figure is the median of ``--repeats`` timed
repetitions after ``--warmup`` untimed ones (the loop's: of its epochs), all in one process:

- ``byol_step``: one call of ``engine.Pretrainer.train_step`` (both views, online and target passes,
  backward, LARS, online probe, EMA) on the loop's next batch, the device drained before and after; in
  source images per second. The time budget's planner measures steps the same way;
- ``loop_epoch``: the training loop itself: ``loop.train_one_epoch`` on the same replica, in epochs of
  ``--epoch-steps`` steps (one warm-up epoch, then one after every ``--epoch-steps`` repetitions); the
  median of the images/s each epoch reports itself (its wall time over its images, as training logs it);
  ``over_step`` is that over the step's median throughput, ``over_step_mean`` over the steps' mean one (a
  stall of the machine counts in an epoch's wall time and in the mean, not in the median). Around the same
  ``train_step`` the loop adds the epoch's permutation, the batch cut per step, a progress read every
  ``run.log_every`` steps and one read of the epoch's statistics. On a CPU all of these are small against a
  step, so the two figures agree up to the machine's noise. On a GPU the loop's steps queue behind each
  other where the step figure drains the device after each one, and the per-epoch part weighs more against
  short steps; training's epochs are longer than the benchmark's and spread that part thinner;
- ``bare_fwd_bwd``: only the online and target forward passes on both (ready-made) views plus the
  backward, same networks and batch; ``byol_over_bare`` is the step's throughput over it (1 = no overhead).
  The step and the bare pass alternate within each repetition, and one loop epoch follows every
  ``--epoch-steps`` repetitions: the speed of a shared or virtual machine drifts from one stretch of seconds
  to the next, so only figures taken in the same stretch can be compared, and a training run's own speed
  (minutes long) can sit well away from a figure taken in a few seconds here;
- ``phases_ms``: the same work split into augmentation, forward (online + target + loss), backward,
  optimiser and EMA, each timed on its own; ``other`` is the step minus their sum (probe, bookkeeping);
- ``flops``: FLOPs of one bare pass counted by ``torch.utils.flop_counter``, the FLOP/s the bare pass and
  the step achieve, and the dense matmul FLOP/s of the same device and dtype measured in the same run;
- ``ema``: the fused multi-tensor update against the per-tensor Python loop (``ema.ema_loop_``);
- ``augmentation``: the batched on-device ``TwoViews`` against the per-image torchvision pipeline with the
  same parameters (``augment.reference_view_transform``, both views), in source images per second;
- ``input_pipeline``: read, decode, crop and augment alone, as training feeds the step (in-memory:
  the loop's batches cut from the uint8 tensor; ``data.stream``: the DataLoader of ``pipeline.py``),
  against the step;
- ``budget_plan``: with ``optim.time_budget_minutes``, the plan the loop's planner makes at the step's time;
- ``dispatch``: aten ops dispatched and host syncs per training step and per augmentation call
  (``dispatch_counts``): deterministic counts, the same on any machine.

No timing is asserted anywhere in the tests; they check that these code paths compute the right things.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..core.ema import ema_loop_
from ..core.model import unwrap
from ..core.sync import DispatchCounter
from ..data.augment import TwoViews, reference_view_transform
from ..data.readers import ImageData
from .loop import (
    TrainData,
    build_trainer,
    embed_seconds,
    epoch_batches,
    epoch_permutation,
    in_memory_train_data,
    load_train_data,
    plan_for,
    train_one_epoch,
    training_device,
)
from .plan import StepPlan

PER_IMAGE_CAP = 64  # images per repetition of the (slow) per-image pipeline
EPOCH_STEPS = 5  # steps per timed epoch of the training loop (--epoch-steps)


# ---- timing -------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` calls after `warmup` calls, the device drained each time."""
    return statistics.median(sample_seconds(fn, repeats, warmup, device))


def sample_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    return interleaved_seconds([fn], repeats, warmup, device)[0]


def interleaved_seconds(
    fns: list[Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    after_round: Callable[[int], Any] | None = None,
) -> list[list[float]]:
    """Per function, its times over `repeats` rounds; each round calls every function once in turn, so
    on a shared machine a busy spell slows all of them alike and their ratio stays meaningful.
    `after_round(i)` runs after timed round i, outside the times (a measurement that times itself)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats):
        for fn, out in zip(fns, times):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t0)
        if after_round is not None:
            after_round(i)
    return times


# ---- the benchmark ------------------------------------------------------------------------------
class Bench:
    """One trainer on the training loop's data; each method measures one figure."""

    def __init__(self, cfg: Config, repeats: int, warmup: int, synthetic: int = 0, epoch_steps: int = EPOCH_STEPS):
        self.cfg, self.repeats, self.warmup = cfg, repeats, warmup
        self.device = training_device(cfg)
        self.synthetic = bool(synthetic)
        self.data = (
            synthetic_train_data(cfg, synthetic, self.device) if synthetic else load_train_data(cfg, self.device)
        )
        self.trainer = build_trainer(cfg, self.data)
        self.batch = cfg.optim.batch_size
        self.mean, self.std = self.data.inputs.mean, self.data.inputs.std
        # No longer than a training epoch: past it, the loop's batches would run off the permutation's end.
        self.epoch_steps = max(1, min(epoch_steps, self.trainer.steps_per_epoch))
        self.loop_epochs_run = 0
        # The step's batches: the loop's epochs one after another (`next_batch`).
        self.epoch, self.steps_left = -1, 0
        self._steps: Iterator[list[tuple[torch.Tensor, torch.Tensor]]] = iter(())
        self._fed: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        if self.data.stream is not None:
            # Streamed steps run on batches the loader already made (kept in memory), so the step is timed
            # without waiting on decode; the loop epoch and the input pipeline figure include the loader.
            first = min(2, self.trainer.steps_per_epoch)
            self._fed = list(epoch_batches(cfg, self.data, 0, first, 0, 1))
            self._fed_at = -1
        # One fixed batch for the passes that must see the same input every time.
        self.images, self.labels = whole(self.next_batch())
        self.views = self.make_views(self.images.to(self.device, non_blocking=True))

    # -- helpers --
    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next step's micro-batches as the loop makes them (`loop.epoch_batches`), epoch after epoch;
        at the end of an epoch the next one's permutation is drawn here, as the loop draws it."""
        if self._fed is not None:
            self._fed_at += 1
            return self._fed[self._fed_at % len(self._fed)]
        if self.steps_left == 0:
            self.epoch += 1
            self.steps_left = self.trainer.steps_per_epoch
            self._steps = epoch_batches(self.cfg, self.data, self.epoch, self.steps_left, 0, 1)
        self.steps_left -= 1
        return next(self._steps)

    def source_images(self, images: torch.Tensor) -> torch.Tensor:
        """Whole source images [B, C, H, W] of a batch (a streamed batch holds each view's crop)."""
        return images[:, 0] if self.data.stream is not None else images

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.make_views(images)

    def time(self, fn: Callable[[], Any], repeats: int | None = None) -> float:
        return median_seconds(fn, repeats or self.repeats, self.warmup, self.device)

    def forward_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """The step's own forward: online and target networks on both views, the BYOL loss."""
        return self.trainer.forward_loss(v1, v2)[2]

    def clear_grads(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)

    # -- figures --
    def byol_step_fn(self) -> Callable[[], None]:
        """One real training step on the loop's next batch."""
        tr = self.trainer

        def step():
            tr.train_step(self.next_batch())

        return step

    def bare_fwd_bwd_fn(self) -> Callable[[], None]:
        """Only the forward passes on fixed, ready-made views and the backward (train_step puts both
        networks in train mode before every step, so the bare pass runs them in the same mode)."""
        tr = self.trainer
        v1, v2 = self.views

        def fwd_bwd():
            tr.online.train()
            tr.target.train()
            self.forward_loss(v1, v2).backward()
            self.clear_grads()

        return fwd_bwd

    def loop_epoch(self) -> float:
        """One epoch of the training loop's own `train_one_epoch`, `epoch_steps` steps long: the images/s it
        reports itself."""
        plan = StepPlan(total_steps=self.epoch_steps * (self.loop_epochs_run + 1), steps_per_epoch=self.epoch_steps)
        # Its progress lines would land in the middle of the benchmark's output.
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = train_one_epoch(self.cfg, self.trainer, self.data, self.loop_epochs_run, 0, 1, plan)
        self.loop_epochs_run += 1
        return float(metrics["images_per_s"])

    def step_bare_loop(self) -> tuple[list[float], list[float], list[float]]:
        """Seconds of each BYOL step and bare fwd+bwd, alternating within each repetition, and the loop's
        images/s of one epoch after every `epoch_steps` repetitions: all three share the machine's
        stretches of speed, so their ratios hold where their absolute values drift."""
        loops: list[float] = []

        def loop_epoch_after(i: int) -> None:
            if (i + 1) % self.epoch_steps == 0 or i + 1 == self.repeats:
                loops.append(self.loop_epoch())

        if self.warmup:
            self.loop_epoch()
        step, bare = interleaved_seconds(
            [self.byol_step_fn(), self.bare_fwd_bwd_fn()], self.repeats, self.warmup, self.device, loop_epoch_after
        )
        return step, bare, loops

    def phases(self) -> dict[str, float]:
        """Median seconds of each phase of the step, each timed on its own in one loop."""
        tr = self.trainer
        tr.online.train()
        tr.target.train()
        parts: dict[str, list[float]] = {k: [] for k in ("augmentation", "forward", "backward", "optimizer", "ema")}
        for i in range(self.warmup + self.repeats):
            images = whole(self.next_batch())[0]
            marks = [self._mark()]
            v1, v2 = self.make_views(images.to(self.device, non_blocking=True))
            marks.append(self._mark())
            loss = self.forward_loss(v1, v2)
            marks.append(self._mark())
            loss.backward()
            marks.append(self._mark())
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            marks.append(self._mark())
            tr.ema.update(tr.tau())
            marks.append(self._mark())
            if i >= self.warmup:
                for k, a, b in zip(parts, marks, marks[1:]):
                    parts[k].append(b - a)
        return {k: statistics.median(v) for k, v in parts.items()}

    def _mark(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def step_flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        v1, v2 = self.views
        counter = FlopCounterMode(display=False)
        # Counted eagerly: the same ops, without tracing a compiled graph under the counting mode.
        eager = torch.compiler.set_stance("force_eager") if self.cfg.run.compile else contextlib.nullcontext()
        with eager, counter:
            self.forward_loss(v1, v2).backward()
        self.clear_grads()
        return int(counter.get_total_flops())

    def matmul_flop_s(self) -> float:
        """Dense square matmul FLOP/s in the dtype the networks compute in."""
        n = 8192 if self.device.type == "cuda" else 1024
        dtype = torch.bfloat16 if self.trainer.precision == "bf16" else torch.float32
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(n, n, device=self.device, dtype=torch.float32, generator=g).to(dtype)
        b = torch.randn(n, n, device=self.device, dtype=torch.float32, generator=g).to(dtype)
        return 2 * n**3 / self.time(lambda: a @ b)

    def ema(self) -> tuple[float, float]:
        """(fused, loop) seconds per EMA update, each averaged over 10 updates per repetition."""
        tr = self.trainer
        online = unwrap(tr.online).branch
        assert isinstance(online, torch.nn.Module)  # a submodule (attribute access types it Tensor | Module)
        tau = tr.tau()

        def fused():
            for _ in range(10):
                tr.ema.update(tau)

        def loop():
            for _ in range(10):
                ema_loop_(tr.target, online, tau)

        return self.time(fused) / 10, self.time(loop) / 10

    def augmentation(self) -> tuple[float, float]:
        """(batched, per-image) source images per second, two views each."""
        a = self.cfg.augment
        size = self.trainer.view_side  # the views training makes (augment.view_size)
        images = self.source_images(self.images)
        dev = images.to(self.device)
        batched = self.batch / self.time(lambda: self.plain_views(dev, self.trainer.generator))
        ref1 = reference_view_transform(a.view1, a.ops, size, self.mean, self.std)
        ref2 = reference_view_transform(a.view2, a.ops, size, self.mean, self.std)
        few = images[:PER_IMAGE_CAP].cpu()

        def per_image():
            torch.stack([ref1(x) for x in few]), torch.stack([ref2(x) for x in few])

        per = len(few) / self.time(per_image, repeats=min(self.repeats, 5))
        return batched, per

    @property
    def plain_views(self):
        if not hasattr(self, "_plain_views"):
            self._plain_views = TwoViews(self.cfg.augment, self.trainer.view_side, self.mean, self.std)
        return self._plain_views

    def budget_plan(self, step_s: float) -> dict[str, Any] | None:
        """What `optim.time_budget_minutes` buys at the measured step time: the training loop's own planner
        and estimate of the evaluation's embedding time (loop.plan_for, loop.embed_seconds), as if the run
        started now. None without a budget."""
        cfg = self.cfg
        if not cfg.optim.time_budget_minutes:
            return None
        embed_s = embed_seconds(cfg, self.trainer, self.data)
        plan = plan_for(cfg, self.trainer.steps_per_epoch, step_s, embed_s, 0.0)
        return {**plan.params(), "steps_per_epoch": plan.steps_per_epoch}

    def input_pipeline(self) -> float:
        """Source images per second that the input path alone delivers, ready for the networks."""
        if self.data.stream is not None:
            return self.stream_images_per_s()

        def feed():
            images = whole(self.next_batch())[0]
            self.make_views(images.to(self.device, non_blocking=True))

        return self.batch / self.time(feed)

    def stream_images_per_s(self) -> float:
        """The streamed loader's rate: decode and crop in its workers, the rest of the views here."""
        warm = min(self.warmup, 2)
        n_batches = max(2, self.repeats)
        epoch = self.loop_epochs_run  # an epoch the loader has not served yet
        perm = epoch_permutation(self.cfg, len(self.data), epoch)
        full = [[mb] for mb in perm.split(self.batch) if len(mb) == self.batch]
        plan = (full * (1 + (warm + n_batches) // len(full)))[: warm + n_batches]
        assert self.data.stream is not None
        it = self.data.stream.micro_batches(epoch, plan)
        for _ in range(warm):  # workers started, prefetch queue filled
            next(it)
        seen = 0
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            ((images, _),) = next(it)
            self.make_views(images.to(self.device, non_blocking=True))
            seen += len(images)
        synchronize(self.device)
        return seen / (time.perf_counter() - t0)


def whole(micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's micro-batches (optim.accumulate_steps) as one batch of images and labels."""
    if len(micro) == 1:
        return micro[0]
    return torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])


def synthetic_train_data(cfg: Config, n: int, device: torch.device, n_classes: int = 10) -> TrainData:
    """`n` random uint8 images of the config's size (a GPU machine without datasets), held and placed as
    training holds an in-memory split. They have no test split: a budget's plan keeps back the
    evaluation of these images only."""
    channels = cfg.model.in_channels or 3
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(cfg.run.seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    classes = [str(i) for i in range(n_classes)]
    data = in_memory_train_data(cfg, ImageData(images, labels, classes, "synthetic/train"), device)
    no_test = ImageData(images[:0], labels[:0], classes, "synthetic/test")
    return dataclasses.replace(data, _test=no_test)


# ---- dispatched ops and host syncs -----------------------------------------------------------------
def dispatch_counts(b: Bench) -> dict[str, int]:
    """Aten ops dispatched (about one eager GPU kernel launch each) and host syncs of one training step
    as the loop runs it (its batch cut included) and of one augmentation call (both views), counted with
    `sync.DispatchCounter` on any device after the timed runs. The counted step is never the first of an
    epoch, which also draws the epoch's permutation. Compiled networks are counted as their eager ops; a
    step replayed from a CUDA graph (run.compile_mode=graph|step) dispatches only its input copies."""
    step = b.byol_step_fn()
    step()
    if b._fed is None and b.steps_left == 0:
        step()
    eager = torch.compiler.set_stance("force_eager") if b.cfg.run.compile else contextlib.nullcontext()
    with eager, DispatchCounter() as in_step:
        step()
    images = b.source_images(b.images).to(b.device)
    b.plain_views(images, b.trainer.generator)
    with DispatchCounter() as in_views:
        b.plain_views(images, b.trainer.generator)
    return {
        "step_ops": in_step.ops,
        "step_syncs": in_step.syncs,
        "augmentation_ops": in_views.ops,
        "augmentation_syncs": in_views.syncs,
    }


# ---- running and reporting ----------------------------------------------------------------------
def run_bench(
    cfg: Config, repeats: int = 20, warmup: int = 5, synthetic: int = 0, epoch_steps: int = EPOCH_STEPS
) -> dict[str, Any]:
    b = Bench(cfg, repeats, warmup, synthetic, epoch_steps)
    B = b.batch
    steps, bares, loops = b.step_bare_loop()
    step, bare = statistics.median(steps), statistics.median(bares)
    phases = b.phases()
    flops = b.step_flops()
    matmul = b.matmul_flop_s()
    ema_fused, ema_loop = b.ema()
    aug_batched, aug_per_image = b.augmentation()
    pipe = b.input_pipeline()
    plan = b.budget_plan(step)
    dispatch = dispatch_counts(b)
    step_ips = B / step
    step_mean_ips = B * len(steps) / sum(steps)
    loop_ips = statistics.median(loops)
    phases_ms = {k: 1e3 * v for k, v in phases.items()}
    phases_ms["other"] = 1e3 * step - sum(phases_ms.values())
    return {
        "setup": setup_info(cfg, b),
        "repeats": repeats,
        "warmup": warmup,
        "byol_step": {"images_per_s": step_ips, "step_ms": 1e3 * step, "mean_images_per_s": step_mean_ips},
        "loop_epoch": {
            "images_per_s": loop_ips,
            "step_ms": 1e3 * B / loop_ips,
            "over_step": loop_ips / step_ips,
            "over_step_mean": loop_ips / step_mean_ips,
            "steps_per_epoch": b.epoch_steps,
            "epochs": len(loops),
        },
        "phases_ms": phases_ms,
        "bare_fwd_bwd": {"images_per_s": B / bare, "step_ms": 1e3 * bare},
        "byol_over_bare": bare / step,
        "flops": {
            "per_step": flops,
            "achieved_flop_s_bare": flops / bare,
            "achieved_flop_s_byol": flops / step,
            "matmul_flop_s": matmul,
            "bare_over_matmul": flops / bare / matmul,
        },
        "ema": {"fused_ms": 1e3 * ema_fused, "loop_ms": 1e3 * ema_loop, "speedup": ema_loop / ema_fused},
        "augmentation": {
            "batched_images_per_s": aug_batched,
            "per_image_images_per_s": aug_per_image,
            "speedup": aug_batched / aug_per_image,
        },
        "input_pipeline": {"kind": data_kind(b), "images_per_s": pipe, "over_step": pipe / step_ips},
        **({"budget_plan": plan} if plan else {}),
        "dispatch": dispatch,
    }


def data_kind(b: Bench) -> str:
    return "stream" if b.data.stream is not None else "in_memory"


def setup_info(cfg: Config, b: Bench) -> dict[str, Any]:
    dev = b.device
    return {
        "backbone": cfg.model.backbone,
        "stem": cfg.model.stem,
        "width": cfg.model.width,
        "image_size": cfg.data.image_size,
        "batch_size": b.batch,
        "dataset": cfg.data.dataset,
        "synthetic": b.synthetic,
        "device": str(dev),
        # Where the train split lives: training's own choice (loop.keeps_on_device), or streamed.
        "data_on": "stream" if b.data.images is None else str(b.data.images.device),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "precision": b.trainer.precision,
        "compile": cfg.run.compile,
        "compile_mode": cfg.run.compile_mode if cfg.run.compile else "",
        "channels_last": b.trainer.memory_format == torch.channels_last,  # as used (core.model.memory_format)
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def flat_metrics(res: dict[str, Any]) -> dict[str, float]:
    """Numeric figures as `section/key` (MLflow metric names)."""
    out: dict[str, float] = {}
    for k, v in res.items():
        if isinstance(v, dict) and k != "setup":
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{k}/{kk}"] = float(vv)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def table(res: dict[str, Any]) -> str:
    s, f = res["setup"], res["flops"]
    ph = res["phases_ms"]
    step_ms = res["byol_step"]["step_ms"]
    lp = res["loop_epoch"]
    lines = [
        f"{s['backbone']} (stem {s['stem']}, width {s['width']}) at {s['image_size']} px, batch {s['batch_size']}, "
        f"{s['device']} ({s['device_name']}, {s['torch_threads']} threads), {s['precision']}, "
        f"compile {s['compile_mode'] or 'off'}, data {dataset_words(s)}; median of {res['repeats']} after "
        f"{res['warmup']} warm-up",
        "",
        "| figure | value | ratio |",
        "|---|---:|---:|",
        f"| BYOL training step | {res['byol_step']['images_per_s']:,.0f} img/s ({step_ms:.1f} ms); mean of the "
        f"steps {res['byol_step']['mean_images_per_s']:,.0f} img/s | {res['byol_over_bare']:.3f} of bare fwd+bwd |",
        f"| training loop, steady state (train_one_epoch, {lp['epochs']} epochs of {lp['steps_per_epoch']} steps) | "
        f"{lp['images_per_s']:,.0f} img/s ({lp['step_ms']:.1f} ms a step) | {lp['over_step']:.3f} of the step, "
        f"{lp['over_step_mean']:.3f} of its mean |",
        f"| bare forward+backward (online + target, both views) | {res['bare_fwd_bwd']['images_per_s']:,.0f} img/s "
        f"({res['bare_fwd_bwd']['step_ms']:.1f} ms) | 1 |",
    ]
    for k in ("augmentation", "forward", "backward", "optimizer", "ema", "other"):
        lines.append(f"| step phase: {k} | {ph[k]:.2f} ms | {ph[k] / step_ms:.1%} of the step |")
    lines += [
        f"| FLOPs per step (fwd+bwd, flop_counter) | {f['per_step'] / 1e9:.2f} GFLOP | |",
        f"| achieved FLOP/s, bare / BYOL step | {f['achieved_flop_s_bare'] / 1e9:,.1f} / "
        f"{f['achieved_flop_s_byol'] / 1e9:,.1f} GFLOP/s | {f['bare_over_matmul']:.3f} of matmul |",
        f"| dense matmul, same device and dtype | {f['matmul_flop_s'] / 1e9:,.1f} GFLOP/s | |",
        f"| EMA update, fused / per-tensor loop | {res['ema']['fused_ms']:.3f} / {res['ema']['loop_ms']:.3f} ms | "
        f"{res['ema']['speedup']:.1f}x |",
        f"| augmentation, batched / per-image torchvision | {res['augmentation']['batched_images_per_s']:,.0f} / "
        f"{res['augmentation']['per_image_images_per_s']:,.0f} img/s | {res['augmentation']['speedup']:.1f}x |",
        f"| input pipeline alone ({res['input_pipeline']['kind']}) | "
        f"{res['input_pipeline']['images_per_s']:,.0f} img/s | {res['input_pipeline']['over_step']:.1f}x the step |",
    ]
    if "budget_plan" in res:
        p = res["budget_plan"]
        lines.append(
            f"| optim.time_budget_minutes={p['plan.budget_minutes']:g} plans | {p['plan.total_steps']:,} steps "
            f"({p['plan.epochs']} epochs of {p['steps_per_epoch']}), {p['plan.eval_reserve_s']:.0f} s kept for "
            f"evaluation | |"
        )
    d = res["dispatch"]
    lines += [
        f"| dispatched ops / host syncs per training step | {d['step_ops']:,} / {d['step_syncs']} | |",
        f"| dispatched ops / host syncs per augmentation call (both views) | {d['augmentation_ops']:,} / "
        f"{d['augmentation_syncs']} | |",
    ]
    lines += [
        "",
        "The step is one train_step, timed alone with the device drained around it, its median over the "
        "repetitions; the loop is training's own epoch, timed whole by train_one_epoch (its batch cuts, progress "
        "reads and end-of-epoch read included; on a GPU its steps queue without a drain). They alternate in this "
        "run, so their ratio holds while the machine's speed drifts. A stall (another process taking the cores) "
        "counts in the loop's figure and in the steps' mean, not in their median.",
    ]
    return "\n".join(lines)


def dataset_words(s: dict[str, Any]) -> str:
    what = "synthetic" if s["synthetic"] else s["dataset"]
    return f"{what} streamed" if s["data_on"] == "stream" else f"{what} in memory on {s['data_on']}"
