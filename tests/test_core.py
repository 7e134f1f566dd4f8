"""The BYOL core: loss, EMA target, tau and lr schedules, LARS, the networks, a short real pretraining
run on Fashion-MNIST, and the evaluators.

Expected values are computed independently (plain arithmetic, float64 references, torchvision's own
ResNets), never copied from the code's output.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from byol_ray.config import Config, ModelConfig, OptimConfig
from byol_ray.core.ema import EMA, ema_loop_, tau_at
from byol_ray.core.loss import byol_loss, regression_loss
from byol_ray.core.model import OnlineNetwork, ResNetEncoder, make_target, mlp, two_view_forward
from byol_ray.core.optim import LARS, param_groups, peak_lr
from byol_ray.core.schedules import warmup_cosine
from byol_ray.eval.scoring import knn_accuracy, linear_probe, topk_accuracy
from byol_ray.training.loop import pretrain
from byol_ray.training.session import LocalSession


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(width=8, projector_hidden=32, projector_out=16, predictor_hidden=24)
    base.update(kw)
    return ModelConfig(**base)


# ---- loss ---------------------------------------------------------------------------------------
def _two_minus_two_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 2.0 - 2.0 * dot / (na * nb)


P = [[1.0, 2.0, 2.0], [0.5, -1.0, 3.0]]
Z = [[2.0, 0.0, 1.0], [-1.0, 4.0, 0.5]]


def test_regression_loss_hand_computed():
    expected = (_two_minus_two_cos(P[0], Z[0]) + _two_minus_two_cos(P[1], Z[1])) / 2
    # Row 0 by hand: cos = (2 + 0 + 2) / (3 * sqrt(5)).
    assert _two_minus_two_cos(P[0], Z[0]) == pytest.approx(2 - 8 / (3 * math.sqrt(5)), abs=1e-12)
    got = regression_loss(torch.tensor(P, dtype=torch.float64), torch.tensor(Z, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # It is also ||q/|q| - z/|z|||^2 (the paper's form), computed with plain arithmetic.
    sq = []
    for p, z in zip(P, Z):
        np_, nz = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in z))
        sq.append(sum((x / np_ - y / nz) ** 2 for x, y in zip(p, z)))
    assert got.item() == pytest.approx(sum(sq) / 2, abs=1e-12)


def test_byol_loss_is_the_sum_of_both_directions():
    g = gen(1)
    q1, q2, z1, z2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    expected = 0.0
    for q, z in ((q1, z2), (q2, z1)):  # view 1's prediction regresses view 2's target, and vice versa
        expected += sum(_two_minus_two_cos(a, b) for a, b in zip(q.tolist(), z.tolist())) / 5
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(expected, abs=1e-12)
    # The pairing matters: q1 matches z2 exactly and q2 opposes z1 -> 0 + 4.
    assert byol_loss(q1, -z1, z1, 3 * q1).item() == pytest.approx(4.0, abs=1e-9)
    assert byol_loss(q1, q2, q2, q1).item() == pytest.approx(
        regression_loss(q1, q1).item() + regression_loss(q2, q2).item(), abs=1e-12
    )


def test_loss_is_scale_invariant_and_bounded():
    p = torch.tensor(P, dtype=torch.float64)
    z = torch.tensor(Z, dtype=torch.float64)
    ref = regression_loss(p, z).item()
    assert regression_loss(7.5 * p, 0.01 * z).item() == pytest.approx(ref, abs=1e-12)
    assert regression_loss(p * torch.tensor([[3.0], [0.2]], dtype=torch.float64), z).item() == pytest.approx(
        ref, abs=1e-12
    )  # per-row scales too
    assert regression_loss(p, p * 4).item() == pytest.approx(0.0, abs=1e-12)  # identical directions
    assert regression_loss(p, -0.5 * p).item() == pytest.approx(4.0, abs=1e-12)  # opposite directions
    orth = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert regression_loss(*orth).item() == pytest.approx(2.0, abs=1e-7)


def test_no_gradient_into_the_target():
    p = torch.tensor([P[0]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([Z[0]], dtype=torch.float64, requires_grad=True)
    regression_loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None
    # d/dp (2 - 2 p.zh/|p|) = -2 (zh/|p| - (p.zh) p/|p|^3), zh = z/|z|, by hand.
    pv, zv = P[0], Z[0]
    npv, nzv = math.sqrt(sum(x * x for x in pv)), math.sqrt(sum(x * x for x in zv))
    zh = [y / nzv for y in zv]
    dot = sum(x * y for x, y in zip(pv, zh))
    grad = [-2 * (zh[i] / npv - dot * pv[i] / npv**3) for i in range(3)]
    assert p.grad[0].tolist() == pytest.approx(grad, abs=1e-12)

    q1 = torch.randn(4, 6, generator=gen(2), requires_grad=True)
    q2 = torch.randn(4, 6, generator=gen(3), requires_grad=True)
    t1 = torch.randn(4, 6, generator=gen(4), requires_grad=True)
    t2 = torch.randn(4, 6, generator=gen(5), requires_grad=True)
    byol_loss(q1, q2, t1, t2).backward()
    assert q1.grad is not None and q2.grad is not None
    assert t1.grad is None and t2.grad is None


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


# ---- tau schedule -------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [0.996, 0.99, 0.9, 0.0])
def test_tau_cosine_schedule(base):
    K = 1000
    assert tau_at(0, K, base) == pytest.approx(base, abs=1e-15)
    assert tau_at(K, K, base) == pytest.approx(1.0, abs=1e-15)
    assert tau_at(K // 2, K, base) == pytest.approx((1 + base) / 2, abs=1e-12)
    for k in (1, 137, 250, 999):
        assert tau_at(k, K, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2, abs=1e-15)
    taus = [tau_at(k, K, base) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(taus, taus[1:]))
    assert tau_at(K + 50, K, base) == pytest.approx(1.0)  # clamped after the end


def test_tau_constant_schedule():
    assert all(tau_at(k, 100, 0.97, "constant") == 0.97 for k in (0, 1, 50, 99, 100, 200))


# ---- lr schedule --------------------------------------------------------------------------------
def test_peak_lr_linear_scaling():
    assert peak_lr(OptimConfig(base_lr=0.2, batch_size=4096)) == pytest.approx(3.2)
    assert peak_lr(OptimConfig(base_lr=0.3, batch_size=128)) == pytest.approx(0.15)
    assert peak_lr(OptimConfig(base_lr=0.2, batch_size=256)) == pytest.approx(0.2)


def test_lr_warmup_then_cosine():
    T, W, peak = 100, 10, 2.0
    warm = [warmup_cosine(s, T, W, peak) for s in range(W)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(peak / W) for d in steps)  # linear
    assert 0 <= warm[0] <= peak / W + 1e-12  # starts at (or one step above) 0 ...
    assert peak * (W - 1) / W - 1e-12 <= warm[-1] <= peak + 1e-12  # ... and ends at (or one step below) peak
    for s in range(W, T + 1):
        p = (s - W) / (T - W)
        assert warmup_cosine(s, T, W, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert warmup_cosine(W, T, W, peak) == pytest.approx(peak)
    assert warmup_cosine(T, T, W, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(T + 5, T, W, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine((T + W) // 2, T, W, peak) == pytest.approx(peak / 2)
    # No warm-up: cosine from the first step.
    assert warmup_cosine(0, 50, 0, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(25, 50, 0, 1.0) == pytest.approx(0.5)


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


# ---- model --------------------------------------------------------------------------------------
def _shapes(m: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize(
    "backbone, ctor, dim",
    [("resnet18", torchvision.models.resnet18, 512), ("resnet50", torchvision.models.resnet50, 2048)],
)
def test_encoder_matches_torchvision(backbone, ctor, dim):
    enc = ResNetEncoder(backbone, in_channels=3, stem="imagenet", width=64)
    assert _shapes(enc) == _shapes(ctor())
    assert enc.out_dim == dim
    assert not any(k.startswith("fc.") for k in enc.state_dict())
    enc.eval()
    with torch.no_grad():
        assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, dim)


def test_resnet10_is_resnet18_with_one_block_per_stage():
    r10, r18 = ResNetEncoder("resnet10", 1, "small_pool", 32), ResNetEncoder("resnet18", 1, "small_pool", 32)
    s10, s18 = _shapes(r10), _shapes(r18)
    # Every stage keeps its first block (the one that changes width and stride) and drops the second.
    assert s10 == {k: v for k, v in s18.items() if not any(k.startswith(f"layer{i}.1.") for i in range(1, 5))}
    assert r10.out_dim == r18.out_dim == 256
    with torch.no_grad():
        assert r10.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 256)


def test_width_scales_channels():
    e64 = ResNetEncoder("resnet18", 1, "small_pool", 64)
    e32 = ResNetEncoder("resnet18", 1, "small_pool", 32)
    s64, s32 = _shapes(e64), _shapes(e32)
    assert s64.keys() == s32.keys()
    for k, shp in s64.items():
        if not shp:  # num_batches_tracked
            continue
        want = list(shp)
        want[0] //= 2
        if len(shp) == 4 and k != "conv1.weight":  # conv input channels halve too, except the image's
            want[1] //= 2
        assert list(s32[k]) == want, k
    assert s64["conv1.weight"] == (64, 1, 3, 3)
    assert (e64.out_dim, e32.out_dim) == (512, 256)


@pytest.mark.parametrize("stem, side", [("small", 28), ("small_pool", 14), ("imagenet", 7)])
def test_stem_feature_map_size(stem, side):
    enc = ResNetEncoder("resnet18", 1, stem, 8).eval()
    x = torch.randn(2, 1, 28, 28, generator=gen())
    with torch.no_grad():
        h = enc.maxpool(enc.relu(enc.bn1(enc.conv1(x))))
        assert h.shape == (2, 8, side, side)
        assert enc(x).shape == (2, 64)


def _linears(seq: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]


def test_projector_and_predictor_shapes():
    net = OnlineNetwork(tiny_model_cfg(), 1)
    proj, pred = net.branch.projector, net.predictor
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert _linears(proj) == [(64, 32), (32, 16)] and proj[1].num_features == 32
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert _linears(pred) == [(16, 24), (24, 16)]
    # The paper's sizes: Linear(d, 4096) -> BN -> ReLU -> Linear(4096, 256).
    assert _linears(mlp(512, 4096, 256)) == [(512, 4096), (4096, 256)]
    deep = OnlineNetwork(tiny_model_cfg(projector_layers=3, predictor_layers=1), 1)
    assert _linears(deep.branch.projector) == [(64, 32), (32, 32), (32, 16)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in deep.branch.projector) == 2
    assert [type(m) for m in deep.predictor] == [nn.Linear] and _linears(deep.predictor) == [(16, 16)]
    x = torch.randn(4, 1, 16, 16, generator=gen())
    y1, y2, z1, z2, q1, q2 = net(x, x.flip(-1))
    assert y1.shape == y2.shape == (4, 64)
    assert z1.shape == z2.shape == q1.shape == q2.shape == (4, 16)


def test_make_target():
    torch.manual_seed(0)
    online = OnlineNetwork(tiny_model_cfg(), 1)
    target = make_target(online)
    assert not hasattr(target, "predictor")
    assert not any(isinstance(m, nn.Linear) and m.out_features == 24 for m in target.modules())
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    ref = online.branch.state_dict()
    assert target.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in target.state_dict().items())
    bns = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.0 for m in bns)
    # Separate storage: changing the online weights leaves the target alone.
    with torch.no_grad():
        next(online.parameters()).add_(1.0)
    assert not torch.equal(next(online.parameters()), next(target.parameters()))
    # A train-mode forward leaves the target's running statistics untouched (the online's move).
    stats = {k: v.clone() for k, v in target.state_dict().items() if "running" in k}
    target.train()
    online.train()
    x = torch.randn(8, 1, 16, 16, generator=gen()) * 3 + 2
    with torch.no_grad():
        target(x)
        online.branch(x)
    for k, v in stats.items():
        assert torch.equal(target.state_dict()[k], v), k
    assert not torch.equal(online.branch.state_dict()["encoder.bn1.running_mean"], stats["encoder.bn1.running_mean"])


def test_no_predictor_is_identity():
    net = OnlineNetwork(tiny_model_cfg(use_predictor=False), 1)
    assert isinstance(net.predictor, nn.Identity)
    assert not any(n.startswith("predictor") for n, _ in net.named_parameters())
    x = torch.randn(4, 1, 16, 16, generator=gen())
    _, _, z1, z2, q1, q2 = net(x, -x)
    assert torch.equal(q1, z1) and torch.equal(q2, z2)


def test_separate_view_forward_changes_batchnorm_statistics():
    torch.manual_seed(0)
    sep = OnlineNetwork(tiny_model_cfg(separate_view_forward=True), 1)
    cat = OnlineNetwork(tiny_model_cfg(separate_view_forward=False), 1)
    cat.load_state_dict(sep.state_dict())
    x1 = torch.randn(6, 1, 16, 16, generator=gen(1))
    x2 = torch.randn(6, 1, 16, 16, generator=gen(2)) * 3 + 1  # different statistics from view 1
    with torch.no_grad():
        out_s = sep(x1, x2)
        out_c = cat(x1, x2)
        assert [o.shape for o in out_s] == [o.shape for o in out_c]
        assert not torch.allclose(out_s[2], out_c[2], atol=1e-4)  # z1 differs: BN saw other statistics
        # Separate passes see each view alone; the concatenated pass sees both.
        b = copy.deepcopy(sep.branch)
        torch.testing.assert_close(out_s[2], b(x1)[1])
        b = copy.deepcopy(sep.branch)
        torch.testing.assert_close(out_c[3], b(torch.cat([x1, x2]))[1][6:])
        # In eval mode (running statistics) both modes give the same outputs.
        sep.eval()
        cat.eval()
        cat.load_state_dict(sep.state_dict())
        for a, c in zip(sep(x1, x2), cat(x1, x2)):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        y1, y2, z1, z2 = two_view_forward(sep.branch, x1, x2, separate=False)
        assert y1.shape == y2.shape and z1.shape == z2.shape


# ---- a short real pretraining run ---------------------------------------------------------------
def _fmnist_cfg(root: str, **model) -> Config:
    return Config.from_dict(
        {
            "data": {"root": root, "train_subset": 2048, "test_subset": 1000},
            "model": {"width": 8, "projector_hidden": 256, "predictor_hidden": 256, **model},
            "optim": {"epochs": 4, "batch_size": 128, "steps_per_epoch": 8, "warmup_epochs": 1, "base_lr": 0.5},
            "eval": {"baselines": False, "knn_k": 20, "linear_epochs": 30},
            "run": {"torch_threads": 1, "log_every": 100, "seed": 0},
            "tracking": {"enabled": False},
        }
    )


def test_short_pretraining_on_fashion_mnist(tmp_path, fmnist_root):
    cfg = _fmnist_cfg(fmnist_root)
    session = LocalSession(tmp_path / "byol", keep=1)
    out = pretrain(cfg, session)
    reports = session.reports
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert reports[-1]["step"] == 32
    losses = [r["loss"] for r in reports]
    # Random predictions against random targets start near 2 + 2 (cos ~ 0 in each direction).
    assert 3.0 < losses[0] < 4.5
    assert losses[-1] < 0.75 * losses[0], losses
    stds = [r["repr_std"] for r in reports]
    assert min(stds) > 0.4, stds  # not collapsed (a collapsed output gives 0)
    assert reports[-1]["tau"] == pytest.approx(1.0)  # the cosine schedule ends at 1
    assert reports[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The end-of-run evaluation scored the online encoder well above chance (10 classes).
    (row,) = out["eval_rows"]
    assert row.feature_dim == 64
    assert row.linear_top1 > 30 and row.knn_top1 > 30
    assert reports[-1]["eval/byol/linear_top1"] == row.linear_top1

    # Without the predictor and with tau = 0 (target = online), the representation collapses quickly.
    cfg0 = _fmnist_cfg(fmnist_root, use_predictor=False).replace(
        {"optim.tau_base": 0.0, "optim.tau_schedule": "constant"}
    )
    s0 = LocalSession(tmp_path / "collapse", keep=1)
    pretrain(cfg0, s0)
    std0 = s0.reports[-1]["repr_std"]
    assert std0 < 0.6 * stds[-1], (std0, stds[-1])
    assert s0.reports[-1]["loss"] < 0.5 * losses[-1]  # the trivial solution is easy to regress


# ---- evaluation ---------------------------------------------------------------------------------
def test_linear_probe_separable_and_noise():
    g = gen(3)
    n_cls = 10
    ytr = torch.arange(400) % n_cls
    yte = torch.randperm(300, generator=g) % n_cls
    xtr = nn.functional.one_hot(ytr, n_cls).float() + 0.1 * torch.randn(400, n_cls, generator=g)
    xte = nn.functional.one_hot(yte, n_cls).float() + 0.1 * torch.randn(300, n_cls, generator=g)
    res = linear_probe(xtr, ytr, xte, yte, epochs=50)
    assert res["top1"] == pytest.approx(100.0)
    assert res["top5"] == pytest.approx(100.0)
    # Pure noise features: chance (10%) on held-out data, within a wide margin.
    ntr = torch.randn(400, 20, generator=g)
    nte = torch.randn(2000, 20, generator=g)
    ynte = torch.randint(0, n_cls, (2000,), generator=g)
    res = linear_probe(ntr, ytr, nte, ynte, epochs=50)
    assert res["top1"] < 16.0
    assert 35.0 < res["top5"] < 65.0  # top-5 of 10 classes: 50% by chance
    assert res["top5"] >= res["top1"]


def test_knn_accuracy_clusters_and_shuffled_labels():
    g = gen(4)
    n_cls, dim = 5, 16
    centers = torch.randn(n_cls, dim, generator=g) * 3
    ytr = torch.arange(500) % n_cls
    yte = torch.arange(200) % n_cls
    xtr = centers[ytr] + 0.1 * torch.randn(500, dim, generator=g)
    xte = centers[yte] + 0.1 * torch.randn(200, dim, generator=g)
    assert knn_accuracy(xtr, ytr, xte, yte, k=20, temperature=0.1) == pytest.approx(100.0)
    # Labels unrelated to the clusters: around chance (20%).
    ytr_rand = torch.randint(0, n_cls, (500,), generator=g)
    acc = knn_accuracy(xtr, ytr_rand, xte, yte, k=20, temperature=0.1, chunk=64)
    assert acc < 40.0
    # k larger than the train set is clamped, chunking does not change the result.
    assert knn_accuracy(xtr[:30], ytr[:30], xte, yte, k=500) == knn_accuracy(
        xtr[:30], ytr[:30], xte, yte, k=30, chunk=7
    )


def test_topk_accuracy_hand_made():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # label 0: top-1 hit
            [0.1, 0.3, 0.6],  # label 1: second -> top-2 hit
            [0.2, 0.7, 0.1],  # label 2: last -> miss even in top-2
            [0.0, 0.4, 0.5],  # label 2: top-1 hit
        ]
    )
    labels = torch.tensor([0, 1, 2, 2])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(50.0)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(75.0)
    assert topk_accuracy(logits, labels, 3) == pytest.approx(100.0)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(100.0)  # k clamped to the class count


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
