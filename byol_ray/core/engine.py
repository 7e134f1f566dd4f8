"""One BYOL replica: online and target networks, optimiser, EMA, augmentation and the training step.

It knows nothing of Ray or MLflow. Distributed data parallelism enters only through ``torch.distributed``
(DDP for the online network, a few small all-reduces): the same object trains in-process, in one Ray
Train worker or in many.

The step never makes the host wait for the device: its statistics (loss, online probe loss and accuracy,
representation std) are device tensors, added up in `stat_sums`; the loop reads them (``sync.to_host``)
only when it logs and at the end of an epoch. With ``run.compile=true run.compile_mode=graph|step`` on a
GPU the whole step is recorded once as a CUDA graph and replayed (`capture.CapturedStep`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.augment import TwoViews
from ..seeding import epoch_seed
from .capture import CapturedStep
from .ema import EMA, tau_at
from .loss import byol_loss
from .model import OnlineNetwork, ResNetEncoder, make_target, memory_format, two_view_forward, unwrap
from .optim import build_optimizer, peak_lr, set_lr
from .schedules import schedule_position, warmup_cosine
from .sync import to_host

# What one step's statistics tensor holds, in order: means over micro-batches of the loss, the probe's
# loss and the representation std; sums of the probe's correct answers and of its labelled images.
STEP_STATS = ("loss", "probe_loss", "probe_correct", "probe_count", "repr_std")


@dataclass(frozen=True)
class InputSpec:
    """What a replica needs to know of its training images: channels, classes (for the online probe) and
    the per-channel mean/std the views are normalised with."""

    channels: int
    n_classes: int
    mean: Sequence[float]
    std: Sequence[float]


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX), rather than emulating it."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool | None = None) -> str:
    """The precision a replica on `device` computes in: run.precision, with "auto" made concrete as bf16 where
    the device runs it natively (CUDA GPUs with bf16, CPUs with AVX-512 BF16 or AMX) and fp32 elsewhere.
    `cpu_bf16` stands for the CPU's capability (default: this CPU's)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if (cpu_bf16_supported() if cpu_bf16 is None else cpu_bf16) else "fp32"


def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is visible to this worker")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Pretrainer:
    """One data-parallel replica: online and target networks, LARS, EMA, views and the online probe."""

    def __init__(
        self,
        cfg: Config,
        inputs: InputSpec,
        *,
        steps_per_epoch: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch
        n = steps_per_epoch * cfg.optim.epochs  # optim.epochs full epochs unless a time budget plans fewer
        self.set_schedule(((0, 0.0), (n, float(n))))
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
        self.peak_lr = peak_lr(cfg.optim)
        self.step = 0

        # Same seed on every rank: identical initial weights even before DDP's broadcast.
        torch.manual_seed(cfg.run.seed)
        net = OnlineNetwork(cfg.model, inputs.channels).to(device)
        self.memory_format = memory_format(cfg.model.channels_last, net, device)
        net = net.to(memory_format=self.memory_format)
        if device.type == "cuda" and world_size > 1 and cfg.model.sync_batchnorm:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # converts the layers in place, returns `net`
        # The online network itself; `self.online`, what the step calls, is DDP around it on several workers.
        self.net = net
        online: nn.Module = net
        if world_size > 1:
            # No per-forward buffer broadcast: BatchNorm buffers are averaged explicitly after each step.
            online = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
            )
        self.online = online
        # The target starts as a copy of the (DDP-broadcast) online weights.
        self.target = make_target(net).to(device)
        if cfg.run.precision == "bf16" and device.type == "cpu" and not cpu_bf16_supported():
            raise ConfigError(
                "run.precision: bf16 on this worker's CPU would be emulated (no AVX-512 BF16 or AMX "
                "instructions) and slower than fp32; set run.precision=fp32 (or auto)"
            )
        self.precision = resolve_precision(cfg.run.precision, device)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[self.precision]
        mode = cfg.run.compile_mode if cfg.run.compile else ""
        if mode in ("networks", "step"):
            # In place (nn.Module.compile): parameter names, state dicts, DDP and the EMA's tensor lists
            # are those of the uncompiled modules.
            net.compile()
            self.target.compile()
        # The whole step as one CUDA graph: one replica per process and a CUDA device (a CPU run has no
        # graphs to record; it trains eagerly, as without the option).
        capture = mode in ("graph", "step") and device.type == "cuda" and world_size == 1
        self.ema = EMA(net.branch, self.target, cfg.model.target_bn)
        # Every float buffer of the online network (encoder, projector and predictor BatchNorm).
        self._online_fbufs = [b for b in net.buffers() if b.is_floating_point()]
        self.optimizer = build_optimizer(net, cfg.optim)
        # Online linear probe on detached representations (eval.online_probe): a cheap accuracy monitor,
        # trained with its own optimiser and its gradients averaged over workers so it is identical on
        # every rank. The fused Adam keeps its step count in a tensor next to the parameters and never
        # reads it back (the foreach one calls .item() on it every step).
        self.probe = self.probe_opt = None
        if cfg.eval.online_probe:
            self.probe = nn.Linear(net.encoder.out_dim, inputs.n_classes).to(device)
            self.probe_opt = torch.optim.Adam(self.probe.parameters(), lr=1e-3, fused=True)
        self.view_side = cfg.augment.view_size or cfg.data.image_size  # the training views' side in pixels
        self.views = TwoViews(cfg.augment, self.view_side, inputs.mean, inputs.std)
        self.generator = torch.Generator(device=device)
        # Running sums of every step's STEP_STATS since the last `take_stats` (float64, on the device).
        self.stat_sums = torch.zeros(len(STEP_STATS), dtype=torch.float64, device=device)
        self.captured: CapturedStep | None = None
        if capture:
            self.capture_steps()

    # ---- schedules ------------------------------------------------------------------------------
    def set_schedule(self, breakpoints: Sequence[tuple[int, float]]) -> None:
        """The run's length and how its steps map onto the lr and tau schedules: `breakpoints`
        (core.schedules.schedule_position) from (0, 0) to (last step, schedule length). A run that was
        not re-planned has (0, 0), (n, n): step k is position k and the schedules end at step n."""
        self.breakpoints = tuple(breakpoints)
        self.total_steps = self.breakpoints[-1][0]
        self.schedule_steps = self.breakpoints[-1][1]

    def position(self) -> float:
        """This step's position on the lr and tau schedules (the step itself unless re-planned)."""
        return schedule_position(self.step, self.breakpoints)

    def lr(self) -> float:
        return warmup_cosine(self.position(), self.schedule_steps, self.warmup_steps, self.peak_lr)

    def tau(self) -> float:
        o = self.cfg.optim
        return tau_at(self.position(), self.schedule_steps, o.tau_base, o.tau_schedule)

    def start_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.cfg.run.seed, self.rank, epoch, "augment"))

    # ---- the step -------------------------------------------------------------------------------
    def capture_steps(self) -> None:
        """From now on run the step through `CapturedStep` (a CUDA graph on a GPU; elsewhere the same
        static-buffer protocol, eagerly). lr and tau become device tensors the step reads, written before
        each replay."""
        self._lr_t = torch.zeros((), device=self.device)
        self._tau_t = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr_t
        if self.probe_opt is not None and self.device.type == "cuda":
            for g in self.probe_opt.param_groups:
                g["capturable"] = True  # Adam refuses to be recorded otherwise
        self.captured = CapturedStep(lambda micro: self._step(micro, self._tau_t), self.device, self.generator)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimiser step over this worker's micro-batches (gradient accumulation), then one EMA step.

        Returns this step's STEP_STATS as a device tensor (also added to `stat_sums`) without reading it:
        nothing here waits for the device.
        """
        self.online.train()
        self.target.train()
        lr, tau = self.lr(), self.tau()
        if self.captured is not None:
            self._lr_t.fill_(lr)
            self._tau_t.fill_(tau)
            stats = self.captured(micro_batches)
        else:
            set_lr(self.optimizer, lr)
            stats = self._step(micro_batches, tau)
        self.step += 1
        return stats

    def _step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], tau: float | torch.Tensor) -> torch.Tensor:
        """The device work of a step: a pure function of the batch, the parameters and the generator
        (what `CapturedStep` records), with lr read from the optimiser's groups."""
        n_micro = len(micro_batches)
        parts = []
        for i, (images, labels) in enumerate(micro_batches):
            # Each micro-batch's mean loss, weighted by its share of the global batch: DDP averages the
            # workers' gradients, so dividing by B / (its images x workers) makes the step's gradient the
            # global batch's mean even when the shares differ by an image (an elastic group of a size that
            # does not divide the batch, or accumulation steps that do not). Equal shares: exactly n_micro.
            share = self.cfg.optim.batch_size / (images.shape[0] * self.world_size)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            v1, v2 = self.make_views(images)
            # All-reduce gradients only on the last micro-batch of the step.
            if i < n_micro - 1 and isinstance(self.online, nn.parallel.DistributedDataParallel):
                ctx: contextlib.AbstractContextManager = self.online.no_sync()
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                y1, z1, loss = self.forward_loss(v1, v2)
                (loss / share).backward()
            probe_loss, correct, count = self._probe_backward(y1.detach(), labels, share)
            parts.append(
                torch.stack(
                    [loss.detach() / share, probe_loss / share, correct, count, representation_std(z1) / share]
                ).double()
            )
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._probe_step()
        self._sync_online_buffers()
        self.ema.update(tau)
        stats = parts[0] if n_micro == 1 else torch.stack(parts).sum(0)
        self.stat_sums += stats
        return stats

    def make_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of a batch (from this replica's generator) in the networks' memory format: one
        batch of 2B through the augmentation, one channels-last copy, two contiguous halves."""
        v1, v2 = self.views.both(images, self.generator).contiguous(memory_format=self.memory_format).chunk(2)
        return v1, v2

    def take_stats(self) -> torch.Tensor:
        """The STEP_STATS sums since the last call (a device tensor), and start new sums."""
        sums = self.stat_sums.clone()
        self.stat_sums.zero_()
        return sums

    def autocast(self):
        """bf16 autocast for the forward passes (run.precision, GPUs and bf16-capable CPUs); nothing in fp32.
        A CUDA graph cannot keep autocast's cache of cast weights between replays, so a captured step has none."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=self.captured is None)

    def forward_loss(self, v1: torch.Tensor, v2: torch.Tensor):
        """Online network on both views, target network on both views (no grad), the BYOL loss.
        Returns (representation of view 1, projection of view 1, loss); the loss is computed in fp32."""
        with self.autocast():
            y1, _, z1, _, q1, q2 = self.online(v1, v2)
            with torch.no_grad():
                _, _, t1, t2 = two_view_forward(self.target, v1, v2, self.cfg.model.separate_view_forward)
        # .float() returns the tensor itself in fp32, so the fp32 path is unchanged.
        loss = byol_loss(q1.float(), q2.float(), t1.float(), t2.float())
        return y1.float(), z1, loss

    def _probe_backward(self, feats: torch.Tensor, labels: torch.Tensor, share: float):
        """The online probe's loss on this micro-batch's labelled images (label -1 = unlabelled, as in
        STL-10's unlabeled split) and its backward; (loss, correct, labelled) as device scalars. The
        unlabelled images are masked out rather than dropped, so shapes never depend on the labels."""
        if self.probe is None:
            zero = feats.new_zeros(())
            return zero, zero, zero
        keep = labels >= 0
        logits = self.probe(feats)
        count = keep.sum()
        losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        loss = torch.where(keep, losses, 0.0).sum() / count.clamp(min=1)
        (loss / share).backward()
        correct = ((logits.argmax(1) == labels) & keep).sum()
        return loss.detach(), correct.float(), count.float()

    def _probe_step(self) -> None:
        if self.probe is None or self.probe_opt is None:  # both or neither (eval.online_probe)
            return
        grads = [p.grad for p in self.probe.parameters() if p.grad is not None]
        if not grads:
            return
        allreduce_mean_(grads)
        self.probe_opt.step()
        self.probe_opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _sync_online_buffers(self) -> None:
        """Average the online BatchNorm running statistics over workers (each rank saw its own shard), so
        the EMA of them, and hence the target, is identical everywhere. One small all-reduce per step."""
        allreduce_mean_(self._online_fbufs)

    # ---- state ----------------------------------------------------------------------------------
    @property
    def encoder(self) -> ResNetEncoder:
        return self.net.encoder

    def state_dict(self) -> dict:
        out = {
            "online": unwrap(self.online).state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
        }
        if self.probe is not None and self.probe_opt is not None:
            out.update(probe=self.probe.state_dict(), probe_optimizer=self.probe_opt.state_dict())
        return out

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.online).load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.probe is not None and self.probe_opt is not None:
            self.probe.load_state_dict(state["probe"])
            self.probe_opt.load_state_dict(state["probe_optimizer"])
        self.step = int(state["step"])
        if self.captured is not None:
            # The optimisers now hold new state tensors (and the lr tensor of the saved groups), which a
            # recorded graph would not see: record the step again, after new warm-up steps.
            self.capture_steps()

    @torch.no_grad()
    def checksum_vector(self) -> tuple[list[str], torch.Tensor]:
        """Names and float64 sums (a device tensor) of every tensor of the online and target networks:
        compared across workers once per epoch."""
        names, sums = [], []
        for prefix, module in (("online", unwrap(self.online)), ("target", self.target)):
            for name, t in list(module.named_parameters()) + list(module.named_buffers()):
                names.append(f"{prefix}.{name}")
                sums.append(t.detach().double().sum())
        return names, torch.stack(sums)

    def checksums(self) -> dict[str, float]:
        """`checksum_vector` as a dict, read with one host sync."""
        names, vec = self.checksum_vector()
        return dict(zip(names, to_host(vec)))


@torch.no_grad()
def allreduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over workers in place with one all-reduce of their concatenation."""
    if not distributed() or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def representation_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised outputs, times sqrt(dim): ~1 when spread out, 0 when
    collapsed to a point (the collapse monitor of the paper's discussion and of SimSiam). A device scalar."""
    zn = F.normalize(z.detach().float(), dim=1)
    return zn.std(dim=0).mean() * zn.shape[1] ** 0.5
