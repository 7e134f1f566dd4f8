"""The target's EMA, xi <- tau*xi + (1-tau)*theta, against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import gen, tiny_model_cfg
from torch import nn

from byol_ray.core.ema import EMA, ema_loop_
from byol_ray.core.model import OnlineNetwork, make_target


# ---- EMA ----------------------------------------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))


def _pair():
    """An online net with trained-looking BN statistics and a target that differs from it everywhere."""
    torch.manual_seed(0)
    online, target = _net(), _net()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=gen(9)))
    online.train()
    for s in range(3):
        online(torch.randn(8, 5, generator=gen(s)) * 2 + 1)
    target(torch.randn(8, 5, generator=gen(7)))
    assert not torch.equal(online[1].running_mean, target[1].running_mean)
    assert online[1].num_batches_tracked.item() == 3 and target[1].num_batches_tracked.item() == 1
    return online, target


def _f64(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("tau", [0.9, 0.996, 0.37])
@pytest.mark.parametrize("bn_mode", ["ema", "copy"])
def test_ema_update_matches_float64_reference(tau, bn_mode):
    online, target = _pair()
    xi, theta = _f64(target), _f64(online)
    EMA(online, target, bn_mode).update(tau)
    after = target.state_dict()
    param_names = {n for n, _ in target.named_parameters()}
    checked = set()
    for name, t in after.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(t, online.state_dict()[name]), name  # copied
            assert t.dtype == torch.int64
        elif name in param_names or bn_mode == "ema":
            want = tau * xi[name] + (1 - tau) * theta[name]
            torch.testing.assert_close(t.double(), want, rtol=1e-6, atol=1e-7, msg=name)
        else:  # copy mode: running_mean / running_var copied
            assert name.endswith(("running_mean", "running_var"))
            assert torch.equal(t, online.state_dict()[name]), name
        checked.add(name)
    assert checked == set(after) and any("running_var" in n for n in checked)
    # The online network is never modified by the update.
    for k, v in online.state_dict().items():
        assert torch.equal(v.double(), theta[k]), k


def test_fused_ema_equals_the_python_loop():
    online, target = _pair()
    ref = copy.deepcopy(target)
    EMA(online, target, "ema").update(0.93)
    ema_loop_(ref, online, 0.93)
    for (n, a), (_, b) in zip(target.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-7, msg=n)  # within 2 float32 ulps


def test_ema_tau_extremes():
    online, target = _pair()
    before = copy.deepcopy(target.state_dict())
    EMA(online, target, "ema").update(1.0)
    for k, v in target.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, before[k]), k
    EMA(online, target, "ema").update(0.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, online.state_dict()[k]), k


def test_ema_on_the_byol_pair_and_mismatch():
    online = OnlineNetwork(tiny_model_cfg(), 1)
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.1)
    xi, theta = _f64(target), _f64(online.branch)
    EMA(online.branch, target).update(0.5)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.double(), 0.5 * xi[n] + 0.5 * theta[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        EMA(online, target)  # the online network has a predictor the target lacks
