"""A launch-free step: the training step never makes the host wait for the device, the loop reads its
statistics only at log points and at the end of an epoch, checksums take one read, and the captured
(CUDA graph) protocol trains like the eager step.

Syncs are counted with `core.sync.DispatchCounter`, a TorchDispatchMode, on CPU: the same calls that
would drain a GPU's queue (.item(), bool(tensor), nonzero, a copy to the host) dispatch the same ops here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from byol_ray.config import Config
from byol_ray.core.ema import EMA
from byol_ray.core.engine import STEP_STATS, InputSpec, Pretrainer
from byol_ray.core.optim import LARS
from byol_ray.core.sync import DispatchCounter, to_host
from byol_ray.training.loop import TrainData, train_one_epoch
from byol_ray.training.plan import epochs_plan
from byol_ray.training.replicas import check_replicas


def small_cfg(**over) -> Config:
    d = {
        "data": {"image_size": 16},
        "model": {"width": 8, "projector_hidden": 32, "predictor_hidden": 32, "projector_out": 16},
        "optim": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5},
        "run": {"torch_threads": 1, "log_every": 4},
        "tracking": {"enabled": False},
    }
    cfg = Config.from_dict(d)
    return cfg.replace(over) if over else cfg


def make_trainer(cfg: Config, channels: int = 1, steps_per_epoch: int = 8) -> Pretrainer:
    mean, std = (0.3,) * channels, (0.35,) * channels
    return Pretrainer(
        cfg, InputSpec(channels, 10, mean, std), steps_per_epoch=steps_per_epoch, device=torch.device("cpu")
    )


def batches(n: int, batch: int = 16, channels: int = 1, seed: int = 0, unlabelled: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, channels, 20, 20), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (batch,), generator=g)
        if unlabelled:
            labels[::2] = -1  # STL-10's unlabeled images mixed in
        out.append([(images, labels)])
    return out


# ---- the counter itself -------------------------------------------------------------------------
def test_the_counter_sees_every_kind_of_host_sync():
    x = torch.arange(6.0)
    with DispatchCounter() as c:
        y = x * 2 + 1
    assert c.ops == 2 and c.syncs == 0
    for read in (
        lambda: y.sum().item(),
        lambda: bool(y[0] > 0),
        lambda: y[y > 3],
        lambda: torch.nonzero(y),
        lambda: to_host(y),
        lambda: float(y.max()),
        lambda: y[[0, 2]],
        lambda: y * torch.tensor([2.0]),
    ):  # tensors from Python data
        with DispatchCounter() as c:
            read()
        assert c.syncs == 1, c.sync_by_op
    with DispatchCounter() as c:
        assert to_host(torch.stack([y.sum(), y.mean()])) == [36.0, 6.0]
    assert c.syncs == 1
    with DispatchCounter() as c:  # a cast on the CPU (what autocast does) is no read
        y.to(torch.bfloat16)
        y.to("cpu", torch.bfloat16)
    assert c.ops >= 1 and c.syncs == 0, c.sync_by_op


# ---- the step -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "channels, accumulate, unlabelled, precision", [(1, 1, False, "fp32"), (3, 2, True, "fp32"), (1, 1, False, "auto")]
)
def test_train_steps_between_log_points_make_no_host_sync(channels, accumulate, unlabelled, precision):
    # "auto" is bf16 autocast on a CPU with native bf16: its casts stay on the CPU and read nothing back.
    cfg = small_cfg(**{"optim.accumulate_steps": accumulate, "optim.grad_clip": 1.0, "run.precision": precision})
    tr = make_trainer(cfg, channels)
    tr.start_epoch(0)
    steps = [
        [(x[i::accumulate], y[i::accumulate]) for x, y in micro for i in range(accumulate)]
        for micro in batches(4, channels=channels, unlabelled=unlabelled)
    ]
    tr.train_step(steps[0])  # optimiser state and the views' constants are made on the first step
    with DispatchCounter() as c:
        for micro in steps[1:]:
            stats = tr.train_step(micro)
    assert c.syncs == 0, c.sync_by_op
    assert c.ops > 100  # the counter did see the step
    assert stats.shape == (len(STEP_STATS),) and stats.dtype == torch.float64
    loss, probe_loss, correct, count, repr_std = to_host(stats)
    assert 0 < loss < 8 and probe_loss > 0 and 0 <= correct <= count and repr_std > 0
    assert count == (8 if unlabelled else 16)  # unlabelled images are masked out of the probe
    # stat_sums holds the four steps; take_stats hands them over and starts again.
    sums = to_host(tr.take_stats())
    assert sums[3] == 4 * count and sums[0] > loss
    assert to_host(tr.take_stats()) == [0.0] * len(STEP_STATS)


def test_the_loop_reads_the_device_only_at_log_points_and_epoch_end(tmp_path):
    cfg = small_cfg(**{"run.log_every": 3, "optim.steps_per_epoch": 7})
    tr = make_trainer(cfg, steps_per_epoch=7)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (112, 1, 20, 20), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (112,), generator=g)
    data = TrainData(cfg, split=range(112), inputs=None, device=torch.device("cpu"), images=images, labels=labels)
    plan = epochs_plan(cfg, 7)
    train_one_epoch(cfg, tr, data, 0, 0, 1, plan)  # optimiser state exists from here on
    with DispatchCounter() as c:
        metrics = train_one_epoch(cfg, tr, data, 1, 0, 1, plan)
    # Log lines after steps 3 and 6 and at the last step 7, one read each, and the epoch's one read.
    assert c.syncs == 4, c.sync_by_op
    assert metrics["step"] == 14 and 0 < metrics["loss"] < 8 and 0 <= metrics["online_probe_acc"] <= 100
    assert metrics["repr_std"] > 0


def test_checksums_are_read_with_one_sync():
    tr = make_trainer(small_cfg())
    with DispatchCounter() as c:
        sums = tr.checksums()
    assert c.syncs == 1
    n = len(list(tr.online.parameters())) + len(list(tr.online.buffers()))
    n += len(list(tr.target.parameters())) + len(list(tr.target.buffers()))
    assert len(sums) == n
    first = next(tr.target.parameters())
    assert sums["target." + next(iter(dict(tr.target.named_parameters())))] == first.double().sum().item()
    with DispatchCounter() as c:
        out = check_replicas(tr, 0, 1)
    assert c.syncs == 1 and out["replicas_in_sync"] == 1.0
    assert out["target_checksum"] == pytest.approx(sum(v for k, v in sums.items() if k.startswith("target.")))


# ---- the captured protocol ----------------------------------------------------------------------
def test_the_captured_protocol_trains_like_the_eager_step():
    """What a GPU records as one CUDA graph, run eagerly on CPU: warm-up steps, then 'replays' that read
    static input buffers, lr and tau as device tensors. Same views (same generator stream), the same
    losses and weights within float32 rounding (LARS's lr multiply is not fused with the add there)."""
    cfg = small_cfg()
    eager, captured = make_trainer(cfg), make_trainer(cfg)
    captured.capture_steps()
    for tr in (eager, captured):
        tr.start_epoch(0)
    losses = {"eager": [], "captured": []}
    steps = batches(6)
    for micro in steps:
        for name, tr in (("eager", eager), ("captured", captured)):
            losses[name].append(to_host(tr.train_step(micro))[0])
    cs = captured.captured
    assert cs.graph is not None and cs.eager_calls == cs.warmup == 3
    # The replays read new batches from the static buffers: every step's loss differs.
    assert len(set(losses["captured"])) == len(steps)
    assert losses["captured"] == pytest.approx(losses["eager"], rel=1e-4)
    for (n, a), b in zip(eager.online.named_parameters(), captured.online.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    for (n, a), b in zip(eager.target.named_parameters(), captured.target.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=n)
    assert torch.equal(eager.generator.get_state(), captured.generator.get_state())
    with DispatchCounter() as c:
        captured.train_step(steps[0])
    assert c.syncs == 0, c.sync_by_op


def test_loading_a_state_records_the_captured_step_again():
    """Loading a checkpoint (or the time budget's warm-up restoring its snapshot) replaces the optimiser's
    state tensors: a graph recorded before would update the old ones, so the step is recorded anew."""
    tr = make_trainer(small_cfg())
    tr.capture_steps()
    tr.start_epoch(0)
    for micro in batches(5):
        tr.train_step(micro)
    assert tr.captured.graph is not None
    tr.load_state_dict(copy.deepcopy(tr.state_dict()))
    assert tr.captured.graph is None and tr.captured.eager_calls == 0
    expected = tr.lr()
    tr.train_step(batches(1)[0])
    # Every group reads the one lr tensor the step writes (not the saved copy the load put there).
    lrs = {id(g["lr"]) for g in tr.optimizer.param_groups}
    assert len(lrs) == 1 and tr.optimizer.param_groups[0]["lr"].item() == pytest.approx(expected)


def test_lars_with_a_device_lr_tensor_equals_a_python_lr():
    def run(lr):
        g = torch.Generator().manual_seed(3)
        w = nn.Parameter(torch.randn(5, 4, generator=g))
        b = nn.Parameter(torch.randn(5, generator=g))
        z = nn.Parameter(torch.zeros(3, 3))  # a zero weight: trust ratio 1, not 0/0
        opt = LARS(
            [
                {"params": [w, z], "weight_decay": 0.01, "lars_adapt": True},
                {"params": [b], "weight_decay": 0.0, "lars_adapt": False},
            ],
            lr=lr,
        )
        for _ in range(3):
            w.grad, b.grad, z.grad = torch.randn(5, 4, generator=g), torch.randn(5, generator=g), torch.zeros(3, 3)
            opt.step()
        return w.detach(), b.detach(), z.detach()

    for a, b in zip(run(0.3), run(torch.tensor(0.3))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(a).all()


def test_ema_with_a_float64_tau_tensor_is_bit_exact():
    online = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    online(torch.randn(8, 4))
    a, b = copy.deepcopy(online), copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.3)
    for tau in (0.95, 0.996, 0.3):
        EMA(online, a).update(tau)
        EMA(online, b).update(torch.tensor(tau, dtype=torch.float64))
        for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), n
