"""Where a BYOL training step's time goes, measured on the real code paths (``byol-ray bench``).

For the config's backbone, image size, batch (``optim.batch_size``, on one device) and device, every figure
is the median of ``--repeats`` timed repetitions after ``--warmup`` untimed ones, all in one process:

- ``byol_step``: ``engine.Pretrainer.train_step`` itself (batch cut from the dataset tensor, both views,
  online and target passes, backward, LARS, online probe, EMA), in source images per second;
- ``phases_ms``: the same work split into augmentation, forward (online + target + loss), backward,
  optimiser and EMA, each timed on its own; ``other`` is the step minus their sum (probe, bookkeeping);
- ``bare_fwd_bwd``: only the online and target forward passes on both (ready-made) views plus the
  backward, same networks and batch; ``byol_over_bare`` is the step's throughput over it (1 = no overhead).
  The step and the bare pass alternate within each repetition, so a busy spell on a shared machine
  slows both alike;
- ``flops``: FLOPs of one bare pass counted by ``torch.utils.flop_counter``, the FLOP/s the bare pass and
  the step achieve, and the dense matmul FLOP/s of the same device and dtype measured in the same run;
- ``ema``: the fused multi-tensor update against the per-tensor Python loop (``ema.ema_loop_``);
- ``augmentation``: the batched on-device ``TwoViews`` against the per-image torchvision pipeline with the
  same parameters (``augment.reference_view_transform``, both views), in source images per second;
- ``input_pipeline``: read, decode, crop and augment alone, as training would feed the step (in-memory:
  batches cut from the uint8 tensor; ``data.stream``: the DataLoader of ``pipeline.py``), against the step;
- ``dispatch``: aten ops dispatched and host syncs per training step and per augmentation call
  (``dispatch_counts``): deterministic counts, the same on any machine.

No timing is asserted anywhere in the tests; they check that these code paths compute the right things.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..core.ema import ema_loop_
from ..core.engine import InputSpec, Pretrainer, pick_device
from ..core.model import unwrap
from ..core.sync import DispatchCounter
from ..data.augment import TwoViews, reference_view_transform
from ..data.readers import channel_stats, load_split
from ..errors import UserError
from ..eval.scoring import extract_features
from .cpu_runtime import configure_cpu
from .plan import EVAL_OVERHEAD, budget_steps, measure_embed_seconds

PER_IMAGE_CAP = 64  # images per repetition of the (slow) per-image pipeline


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
    fns: list[Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> list[list[float]]:
    """Per function, its times over `repeats` rounds; each round calls every function once in turn, so
    on a shared machine a busy spell slows all of them alike and their ratio stays meaningful."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t0)
    return times


# ---- the benchmark ------------------------------------------------------------------------------
class Bench:
    """One trainer and one data source; each method measures one figure."""

    def __init__(self, cfg: Config, repeats: int, warmup: int, synthetic: int = 0):
        self.cfg, self.repeats, self.warmup = cfg, repeats, warmup
        self.device = pick_device(cfg)
        if self.device.type == "cpu":
            configure_cpu(cfg)
        self.batch = cfg.optim.batch_size
        self.source = data_source(cfg, synthetic, self.device)
        self.mean, self.std = self.source.mean, self.source.std
        n = len(self.source)
        if n < self.batch:
            raise UserError(f"the benchmark needs at least optim.batch_size={self.batch} images, the data has {n}")
        inputs = InputSpec(self.source.channels, len(self.source.classes), self.mean, self.std)
        self.trainer = Pretrainer(cfg, inputs, steps_per_epoch=max(1, n // self.batch), device=self.device)
        self.source.attach(self.trainer)
        self._g = torch.Generator(device=self.source.images.device).manual_seed(cfg.run.seed)
        # One fixed batch for the passes that must see the same input every time.
        self.images, self.labels = self.source.batch(self.next_indices())
        v1, v2 = self.make_views(self.images.to(self.device, non_blocking=True))
        self.views = (v1, v2)

    # -- helpers --
    def next_indices(self) -> torch.Tensor:
        # Where the images are: indexing device images with CPU indices would copy them (and sync) per step.
        return torch.randint(len(self.source), (self.batch,), generator=self._g, device=self._g.device)

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
        """One real training step, the batch cut from the data as the loop does."""
        tr = self.trainer

        def step():
            images, labels = self.source.batch(self.next_indices())
            tr.train_step([(images, labels)])

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

    def step_and_bare(self) -> tuple[float, float]:
        """Median seconds of (BYOL step, bare fwd+bwd), measured interleaved."""
        step, bare = interleaved_seconds(
            [self.byol_step_fn(), self.bare_fwd_bwd_fn()], self.repeats, self.warmup, self.device
        )
        return statistics.median(step), statistics.median(bare)

    def phases(self) -> dict[str, float]:
        """Median seconds of each phase of the step, each timed on its own in one loop."""
        tr = self.trainer
        tr.online.train()
        tr.target.train()
        parts: dict[str, list[float]] = {k: [] for k in ("augmentation", "forward", "backward", "optimizer", "ema")}
        for i in range(self.warmup + self.repeats):
            images = self.source.batch(self.next_indices())[0]
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
        images = self.source.plain_images(self.images)
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
        """What `optim.time_budget_minutes` buys at the measured step time: the planner the training loop
        uses (training/plan.py), fed with this benchmark's step and embedding times. None without a budget."""
        cfg = self.cfg
        if not cfg.optim.time_budget_minutes:
            return None
        n = min(len(self.images), cfg.eval.batch_size)
        sample = self.source.plain_images(self.images[:n])
        per_image = measure_embed_seconds(
            lambda: extract_features(
                self.trainer.encoder, sample, cfg.data.image_size, self.mean, self.std, cfg.eval.batch_size, self.device
            ),
            n,
            self.device,
        )
        embed_s = per_image * self.source.eval_images()
        encoders = 2 if cfg.eval.baselines else 1
        plan = budget_steps(
            cfg, self.trainer.steps_per_epoch, step_s, EVAL_OVERHEAD * encoders * embed_s, EVAL_OVERHEAD * embed_s, 0.0
        )
        return {**plan.params(), "steps_per_epoch": plan.steps_per_epoch}

    def input_pipeline(self) -> float:
        """Source images per second that the input path alone delivers, ready for the networks."""
        return self.source.pipeline_images_per_s(self)


# ---- dispatched ops and host syncs -----------------------------------------------------------------
def dispatch_counts(b: Bench) -> dict[str, int]:
    """Aten ops dispatched (about one eager GPU kernel launch each) and host syncs of one training step
    as the loop runs it and of one augmentation call (both views), counted with `sync.DispatchCounter`
    on any device after the timed runs. Compiled networks are counted as their eager ops; a step
    replayed from a CUDA graph (run.compile_mode=graph|step) dispatches only its input copies."""
    step = b.byol_step_fn()
    step()
    eager = torch.compiler.set_stance("force_eager") if b.cfg.run.compile else contextlib.nullcontext()
    with eager, DispatchCounter() as in_step:
        step()
    images = b.source.plain_images(b.images).to(b.device)
    b.plain_views(images, b.trainer.generator)
    with DispatchCounter() as in_views:
        b.plain_views(images, b.trainer.generator)
    return {
        "step_ops": in_step.ops,
        "step_syncs": in_step.syncs,
        "augmentation_ops": in_views.ops,
        "augmentation_syncs": in_views.syncs,
    }


# ---- data sources -------------------------------------------------------------------------------
class InMemorySource:
    """The loop's in-memory path: one uint8 tensor, batches cut from it with one index op."""

    kind = "in_memory"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes
        self.test_count = 0  # set by data_source when the dataset has a test split
        self.channels = images.shape[1]
        self.mean, self.std = channel_stats(images)

    def __len__(self) -> int:
        return len(self.images)

    def attach(self, trainer) -> None:
        # On a GPU the loop keeps in-memory images there (load_train_data): batches are cut on the device,
        # with no host-to-device copy per step (from pageable memory such a copy waits for the device).
        if trainer.device.type == "cuda":
            self.images, self.labels = self.images.to(trainer.device), self.labels.to(trainer.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def plain_images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def eval_images(self) -> int:
        """Images the end-of-run evaluation embeds per encoder (train + test split)."""
        return len(self.images) + self.test_count

    def pipeline_images_per_s(self, b: Bench) -> float:
        def feed():
            images = self.images[b.next_indices()]
            b.make_views(images.to(b.device, non_blocking=True))

        return b.batch / b.time(feed)


class StreamSource:
    """``data.stream``: decode and crop in DataLoader workers (``data/pipeline.py``), the rest on the device."""

    kind = "stream"

    def __init__(self, cfg: Config, device: torch.device):
        from ..data.pipeline import FolderStream  # DataLoader machinery only when streaming

        self.cfg = cfg
        self.stream = FolderStream(cfg, "train", device)
        self.classes, self.channels = self.stream.classes, self.stream.channels
        self.mean, self.std = self.stream.mean, self.stream.std
        B = cfg.optim.batch_size
        if len(self.stream) < 2 * B:
            raise UserError(
                f"the streamed benchmark needs at least 2 x optim.batch_size={B} images, "
                f"{cfg.data.root} has {len(self.stream)}"
            )
        # Training steps use batches the loader made (kept in memory), so the step is timed without
        # waiting on decode; the loader's own rate is the input_pipeline figure.
        perm = torch.randperm(len(self.stream), generator=torch.Generator().manual_seed(cfg.run.seed))
        first = list(self.stream.micro_batches(0, [[mb] for mb in perm[: 2 * B].split(B)]))
        self.images = torch.cat([x for ((x, _),) in first])
        self.labels = torch.cat([y for ((_, y),) in first])

    def __len__(self) -> int:
        return len(self.images)

    def attach(self, trainer) -> None:
        trainer.views = self.stream.device_views(trainer.views)

    def eval_images(self) -> int:
        return 0  # streamed runs have no end-of-run evaluation (config validation)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def plain_images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[:, 0]  # the first view's crop: a [B, C, S, S] source image for the comparison

    def pipeline_images_per_s(self, b: Bench) -> float:
        warm = min(b.warmup, 2)
        n_batches = max(2, b.repeats)
        perm = torch.randperm(len(self.stream), generator=torch.Generator().manual_seed(self.cfg.run.seed + 1))
        full = [mb for mb in perm.split(b.batch) if len(mb) == b.batch]
        it = iter(self.stream.loader(1, (full * (1 + (warm + n_batches) // len(full)))[: warm + n_batches]))
        for _ in range(warm):  # workers started, prefetch queue filled
            next(it)
        seen = 0
        synchronize(b.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            try:
                images, _ = next(it)
            except StopIteration:
                break
            b.make_views(images.to(b.device, non_blocking=True))
            seen += len(images)
        synchronize(b.device)
        return seen / (time.perf_counter() - t0)


class SyntheticSource(InMemorySource):
    """Random uint8 images of the config's size (a GPU machine without datasets)."""

    def __init__(self, n: int, channels: int, size: int, n_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, n_classes, (n,), generator=g)
        super().__init__(images, labels, [str(i) for i in range(n_classes)])


def data_source(cfg: Config, synthetic: int, device: torch.device):
    if synthetic:
        channels = cfg.model.in_channels or 3
        return SyntheticSource(synthetic, channels, cfg.data.image_size, seed=cfg.run.seed)
    if cfg.data.stream:
        return StreamSource(cfg, device)
    train = load_split(cfg.data, "train")
    source = InMemorySource(train.images, train.labels, train.classes)
    if cfg.optim.time_budget_minutes:  # the budget's planner keeps back the evaluation of both splits
        source.test_count = len(load_split(cfg.data, "test"))
    return source


# ---- running and reporting ----------------------------------------------------------------------
def run_bench(cfg: Config, repeats: int = 20, warmup: int = 5, synthetic: int = 0) -> dict[str, Any]:
    b = Bench(cfg, repeats, warmup, synthetic)
    B = b.batch
    step, bare = b.step_and_bare()
    phases = b.phases()
    flops = b.step_flops()
    matmul = b.matmul_flop_s()
    ema_fused, ema_loop = b.ema()
    aug_batched, aug_per_image = b.augmentation()
    pipe = b.input_pipeline()
    plan = b.budget_plan(step)
    dispatch = dispatch_counts(b)
    step_ips = B / step
    phases_ms = {k: 1e3 * v for k, v in phases.items()}
    phases_ms["other"] = 1e3 * step - sum(phases_ms.values())
    return {
        "setup": setup_info(cfg, b),
        "repeats": repeats,
        "warmup": warmup,
        "byol_step": {"images_per_s": step_ips, "step_ms": 1e3 * step},
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
        "input_pipeline": {"kind": b.source.kind, "images_per_s": pipe, "over_step": pipe / step_ips},
        **({"budget_plan": plan} if plan else {}),
        "dispatch": dispatch,
    }


def setup_info(cfg: Config, b: Bench) -> dict[str, Any]:
    dev = b.device
    return {
        "backbone": cfg.model.backbone,
        "stem": cfg.model.stem,
        "width": cfg.model.width,
        "image_size": cfg.data.image_size,
        "batch_size": b.batch,
        "dataset": cfg.data.dataset,
        "synthetic": isinstance(b.source, SyntheticSource),
        "device": str(dev),
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
    lines = [
        f"{s['backbone']} (stem {s['stem']}, width {s['width']}) at {s['image_size']} px, batch {s['batch_size']}, "
        f"{s['device']} ({s['device_name']}, {s['torch_threads']} threads), {s['precision']}, "
        f"compile {s['compile_mode'] or 'off'}; median of {res['repeats']} after {res['warmup']} warm-up",
        "",
        "| figure | value | ratio |",
        "|---|---:|---:|",
        f"| BYOL training step | {res['byol_step']['images_per_s']:,.0f} img/s ({step_ms:.1f} ms) | "
        f"{res['byol_over_bare']:.3f} of bare fwd+bwd |",
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
    return "\n".join(lines)
