"""One replica's step: gradient accumulation (one optimiser and one EMA step), bf16 autocast on CPUs."""

from __future__ import annotations

import pytest
import torch

from byol_ray.config import Config


def test_gradient_accumulation_takes_one_optimizer_and_one_ema_step():
    """Two micro-batches make one step: the target moves once, tau*xi + (1-tau)*theta_after."""
    from byol_ray.core.engine import InputSpec, Pretrainer

    cfg = Config.from_dict(
        {
            "model": {"width": 8, "projector_hidden": 32, "predictor_hidden": 32, "projector_out": 16},
            "optim": {"batch_size": 16, "accumulate_steps": 2, "tau_base": 0.9, "epochs": 10},
        }
    )
    p = Pretrainer(cfg, InputSpec(1, 10, (0.5,), (0.25,)), steps_per_epoch=5, device=torch.device("cpu"))
    p.start_epoch(0)
    before = {k: v.clone() for k, v in p.target.state_dict().items()}
    tau = p.tau()
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    p.train_step([(images[:8], labels[:8]), (images[8:], labels[8:])])
    assert p.step == 1
    online = dict(p.online.branch.named_parameters())
    for name, xi in p.target.named_parameters():
        expected = tau * before[name].double() + (1 - tau) * online[name].detach().double()
        torch.testing.assert_close(xi.double(), expected, rtol=1e-6, atol=1e-7)


def test_bf16_on_cpu_autocasts_the_forward_where_the_cpu_has_it_and_is_refused_elsewhere():
    from byol_ray.config import ConfigError
    from byol_ray.core.engine import InputSpec, Pretrainer, cpu_bf16_supported

    cfg = Config.from_dict(
        {
            "model": {"width": 8, "projector_hidden": 32, "predictor_hidden": 32},
            "run": {"device": "cpu", "precision": "bf16"},
        }
    )
    spec = InputSpec(1, 10, (0.5,), (0.25,))
    if not cpu_bf16_supported():
        with pytest.raises(ConfigError, match="run.precision"):
            Pretrainer(cfg, spec, steps_per_epoch=5, device=torch.device("cpu"))
        return
    p = Pretrainer(cfg, spec, steps_per_epoch=5, device=torch.device("cpu"))
    x = torch.rand(4, 1, 28, 28)
    with p.autocast():
        y = p.encoder(x)
    assert y.dtype == torch.bfloat16
    y1, z1, loss = p.forward_loss(x, x)
    assert loss.dtype == torch.float32 and next(p.online.parameters()).dtype == torch.float32
    fp32 = Pretrainer(cfg.replace({"run.precision": "fp32"}), spec, steps_per_epoch=5, device=torch.device("cpu"))
    with fp32.autocast():
        assert fp32.encoder(x).dtype == torch.float32


def test_auto_precision_is_bf16_exactly_where_the_device_runs_it_natively():
    from byol_ray.core.engine import InputSpec, Pretrainer, cpu_bf16_supported, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cpu_bf16=True) == "bf16"
    assert resolve_precision("auto", cpu, cpu_bf16=False) == "fp32"  # an AVX2 laptop: no emulated bf16
    for explicit in ("fp32", "bf16"):
        assert resolve_precision(explicit, cpu, cpu_bf16=False) == explicit
    cfg = Config.from_dict(
        {
            "model": {"width": 8, "projector_hidden": 32, "predictor_hidden": 32},
            "run": {"device": "cpu", "precision": "auto"},
        }
    )
    p = Pretrainer(cfg, InputSpec(1, 10, (0.5,), (0.25,)), steps_per_epoch=5, device=cpu)
    native = cpu_bf16_supported()
    assert p.precision == ("bf16" if native else "fp32")
    with p.autocast():
        assert p.encoder(torch.rand(2, 1, 28, 28)).dtype == (torch.bfloat16 if native else torch.float32)


def test_micro_batches_of_unequal_size_are_weighted_by_their_images():
    """10 images in 3 micro-batches (4, 3, 3): the step's gradient is sum_i (m_i / B) grad L_i, the batch
    mean of the per-image losses, not the plain mean of the micro-batches' means. The same divisor
    B / (m_i x workers) weights the unequal shares of an elastic group, where DDP averages over workers."""
    from byol_ray.core.engine import InputSpec, Pretrainer
    from byol_ray.training.loop import worker_batches

    cfg = Config.from_dict(
        {
            "model": {"width": 8, "projector_hidden": 32, "predictor_hidden": 32, "projector_out": 16},
            "optim": {"batch_size": 10, "accumulate_steps": 3, "epochs": 10},
        }
    )
    p = Pretrainer(cfg, InputSpec(1, 10, (0.5,), (0.25,)), steps_per_epoch=5, device=torch.device("cpu"))
    p.start_epoch(0)
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    micro = [(images[i], labels[i]) for i in worker_batches(cfg, torch.arange(10), 0, 0, 1)]
    assert [len(m[0]) for m in micro] == [4, 3, 3]
    params = [q for q in p.online.parameters() if q.requires_grad]

    rng = p.generator.get_state()
    per_micro = []
    for x, _ in micro:
        v1, v2 = p.make_views(x)
        _, _, loss = p.forward_loss(v1, v2)
        per_micro.append(torch.autograd.grad(loss, params, allow_unused=True))
    p.generator.set_state(rng)

    seen: dict[int, torch.Tensor] = {}
    hooks = [q.register_post_accumulate_grad_hook(lambda q: seen.__setitem__(id(q), q.grad.clone())) for q in params]
    p.train_step(micro)
    for h in hooks:
        h.remove()
    checked = 0
    for j, q in enumerate(params):
        parts = [g[j] for g in per_micro]
        if parts[0] is None:
            continue
        weighted = sum(len(m[0]) / 10 * g for m, g in zip(micro, parts))
        torch.testing.assert_close(seen[id(q)], weighted, rtol=1e-3, atol=1e-5)
        plain = sum(parts) / 3
        checked += int(not torch.allclose(weighted, plain, rtol=1e-3, atol=1e-5))
    assert checked > len(params) // 2  # equal weights would give another gradient: the weighting is tested


def test_worker_shares_partition_the_global_batch_one_image_apart():
    from byol_ray.training.loop import share_sizes, worker_share

    for b in (4096, 10, 7):
        for world in range(1, 9):
            shares = [worker_share(b, r, world) for r in range(world)]
            assert [o for o, _ in shares] == [sum(s for _, s in shares[:r]) for r in range(world)]
            assert sum(s for _, s in shares) == b and max(s for _, s in shares) - min(s for _, s in shares) <= 1
    assert worker_share(4096, 0, 3) == (0, 1366) and worker_share(4096, 2, 3) == (2731, 1365)
    assert share_sizes(4096, 3) == "1366/1365" and share_sizes(128, 2) == "64"
