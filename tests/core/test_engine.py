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
