"""The networks: encoders against torchvision's own ResNets, widths and stems, the MLP heads, the
target copy and the per-view forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import gen, tiny_model_cfg
from torch import nn

from byol_ray.core.model import OnlineNetwork, ResNetEncoder, make_target, mlp, two_view_forward


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
