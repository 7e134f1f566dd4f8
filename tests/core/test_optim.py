"""LARS: the paper's exclusions (biases and BatchNorm get neither weight decay nor the trust ratio) and
one step's numerics against a hand-computed reference.
"""

from __future__ import annotations

import math

import torch
from conftest import gen
from torch import nn

from byol_ray.config import ModelConfig
from byol_ray.core.model import OnlineNetwork
from byol_ray.core.optim import LARS, param_groups


# ---- LARS ---------------------------------------------------------------------------------------
def test_lars_exclusions_by_name():
    online = OnlineNetwork(ModelConfig(width=8, projector_hidden=32, projector_out=16, predictor_hidden=24), 1)
    groups = param_groups(online, 1.5e-6)
    regular, excluded = groups
    assert (regular["weight_decay"], regular["lars_adapt"]) == (1.5e-6, True)
    assert (excluded["weight_decay"], excluded["lars_adapt"]) == (0.0, False)
    ids_regular = {id(p) for p in regular["params"]}
    ids_excluded = {id(p) for p in excluded["params"]}
    want_regular, want_excluded = set(), set()
    for mname, m in online.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            want_regular.add(f"{mname}.weight")
            if m.bias is not None:
                want_excluded.add(f"{mname}.bias")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            want_excluded |= {f"{mname}.weight", f"{mname}.bias"}
    named = dict(online.named_parameters())
    assert want_regular | want_excluded == set(named)
    assert {n for n in named if id(named[n]) in ids_regular} == want_regular
    assert {n for n in named if id(named[n]) in ids_excluded} == want_excluded
    # ResNet-18: 1 stem + 8 blocks x 2 + 3 downsample convs, 2 projector + 2 predictor Linears.
    assert len(regular["params"]) == 20 + 4
    # One BatchNorm per conv, one in each head; plus the 4 Linear biases.
    assert len(excluded["params"]) == (20 + 2) * 2 + 4
    assert all(p.ndim == 1 for p in excluded["params"]) and all(p.ndim >= 2 for p in regular["params"])


def test_lars_step_numerics():
    lr, mom, wd, eta = 0.1, 0.9, 0.01, 0.001
    g0 = gen(11)
    w0 = torch.randn(4, 3, generator=g0, dtype=torch.float64)
    b0 = torch.randn(4, generator=g0, dtype=torch.float64)
    grads = [
        (torch.randn(4, 3, generator=g0, dtype=torch.float64), torch.randn(4, generator=g0, dtype=torch.float64))
        for _ in range(2)
    ]
    w = nn.Parameter(w0.clone())
    b = nn.Parameter(b0.clone())
    opt = LARS(
        [
            {"params": [w], "weight_decay": wd, "lars_adapt": True},
            {"params": [b], "weight_decay": 0.0, "lars_adapt": False},
        ],
        lr=lr,
        momentum=mom,
        trust_coefficient=eta,
    )

    def norm(t: torch.Tensor) -> float:
        return math.sqrt(sum(x * x for x in t.flatten().tolist()))

    # Hand-computed reference, step by step.
    rw, rb = w0.clone(), b0.clone()
    buf_w = torch.zeros_like(rw)
    buf_b = torch.zeros_like(rb)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        gd = gw + wd * rw
        trust = eta * norm(rw) / norm(gd)
        buf_w = mom * buf_w + trust * gd
        rw = rw - lr * buf_w
        buf_b = mom * buf_b + gb  # bias: plain SGD momentum, no decay, no trust ratio
        rb = rb - lr * buf_b
        torch.testing.assert_close(w.detach(), rw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), rb, rtol=1e-12, atol=1e-14)
    # The trust ratio really shrinks the weight update (||w||/||g|| ~ 1, eta = 1e-3) but not the bias's.
    assert norm(w.detach() - w0) < 1e-2 * norm(b.detach() - b0)
