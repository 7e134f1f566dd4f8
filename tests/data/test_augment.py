"""Tests for byol_ray.data.augment: per-view probabilities, exact op results, crop boxes, reproducibility,
ablation ops, 1-channel no-ops, additive brightness, the eval transform and the torchvision reference."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from byol_ray.config import AUG_OPS, AugmentConfig, ViewConfig
from byol_ray.data.augment import (
    JITTER_OPS,
    LUMA,
    TwoViews,
    ViewTransform,
    blur_band,
    blur_kernel_size,
    eval_transform,
    gaussian_blur,
    matrix_blur,
    noop_ops,
    reference_view_transform,
    resample,
)

T = AugmentConfig().view1
T2 = AugmentConfig().view2
ALL = list(AUG_OPS)
BICUBIC = v2.InterpolationMode.BICUBIC
QUIET = ViewConfig(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The machine's 2 cores are shared; small ops on 2 contended threads mostly wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vt(view: ViewConfig, ops=ALL, out: int = 16, channels: int = 3) -> ViewTransform:
    return ViewTransform(view, ops, out, [0.0] * channels, [1.0] * channels)


def assert_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> None:
    if p in (0.0, 1.0):
        assert count == round(n * p), (count, n, p)
        return
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= sigmas * sd, f"{count}/{n} fired, expected p={p} (+-{sigmas} sd)"


def plain_params(B: int, H: int, W: int) -> dict[str, torch.Tensor]:
    """Parameters under which every op is the identity; tests switch on one op at a time."""
    off = torch.zeros(B, dtype=torch.bool)
    return {
        "crop_box": torch.tensor([0.0, 0.0, H, W]).repeat(B, 1),
        "flip": off.clone(),
        "jitter": off.clone(),
        "brightness": torch.zeros(B),
        "contrast": torch.ones(B),
        "saturation": torch.ones(B),
        "hue": torch.zeros(B),
        "jitter_order": torch.arange(4).repeat(B, 1),
        "grayscale": off.clone(),
        "blur": off.clone(),
        "blur_sigma": torch.ones(B),
        "solarize": off.clone(),
    }


def test_plain_params_has_the_keys_sample_params_draws():
    drawn = vt(T).sample_params(2, 3, (16, 16), gen(), "cpu")
    assert set(plain_params(2, 16, 16)) <= set(drawn)
    assert drawn["crop_box"].shape == (2, 4) and drawn["jitter_order"].shape == (2, 4)


def test_noop_ops_and_kernel_size():
    assert sorted(noop_ops(1)) == ["grayscale", "hue", "saturation"]
    assert noop_ops(3) == []
    # The authors' rule: radius = int(0.1 * side) // 2, side 2r + 1, at least 3.
    assert [blur_kernel_size(s, 0.1) for s in (224, 96, 32, 28, 16)] == [23, 9, 3, 3, 3]


def test_unknown_op_and_bad_mean_are_rejected():
    with pytest.raises(ValueError, match="unknown augmentation op"):
        vt(T, ops=["crop", "cutout"])
    with pytest.raises(ValueError, match="mean/std"):
        ViewTransform(T, ["crop"], 16, [0.5] * 3, [0.5] * 3)(torch.rand(2, 1, 16, 16), gen())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        vt(T)(torch.rand(2, 4, 16, 16), gen())


# ---- probabilities -------------------------------------------------------------------------------
EXPECTED = {
    "view1": {"flip": 0.5, "jitter": 0.8, "grayscale": 0.2, "blur": 1.0, "solarize": 0.0},
    "view2": {"flip": 0.5, "jitter": 0.8, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2},
}


@pytest.mark.parametrize("name", ["view1", "view2"])
def test_view_probabilities_from_params(name):
    n = 20000
    p = vt(getattr(AugmentConfig(), name)).sample_params(n, 3, (16, 16), gen(1), "cpu")
    for op, prob in EXPECTED[name].items():
        assert_binomial(int(p[op].sum()), n, prob)
    # Each image's jitter order is a permutation, and every op leads equally often.
    order = p["jitter_order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for op in range(4):
        assert_binomial(int((order[:, 0] == op).sum()), n, 0.25)
    # Ops fire independently of each other within an image.
    flags = torch.stack([p[op].float() for op in ("flip", "jitter", "grayscale", "blur", "solarize")], 1)
    flags = flags[:, flags.std(0) > 0]
    corr = torch.corrcoef(flags.T)
    off_diag = corr - torch.eye(corr.shape[0])
    assert off_diag.abs().max() < 5 / math.sqrt(n)


def _fired_from_output(op: str, view: ViewConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fired per image judged from the output, fired per image according to sample_params)."""
    size = 16
    if op == "flip":
        x = torch.rand(1, 3, size, size).expand(n, -1, -1, -1)
    elif op == "solarize":
        x = torch.full((n, 3, size, size), 0.75)
    elif op == "blur":
        x = torch.zeros(n, 3, size, size)
        x[:, :, size // 2, size // 2] = 1.0
    else:  # a saturated colour: grayscale and every jitter op move it
        x = torch.tensor([0.7, 0.3, 0.2]).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()
    if op == "blur":
        # sigma 0.1 leaves an impulse unchanged to float precision, so only visible sigmas here.
        view = dataclasses.replace(view, blur_sigma=(0.5, 2.0))
    t = vt(view, ops=[op])
    y = t(x, gen(2))
    params = t.sample_params(n, 3, (size, size), gen(2), "cpu")
    if op == "flip":
        fired = (y - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
        assert torch.all(fired | ((y - x).abs().amax(dim=(1, 2, 3)) < 1e-6))
    elif op == "solarize":
        fired = (y - 0.25).abs().amax(dim=(1, 2, 3)) < 1e-6
    elif op == "grayscale":
        fired = (y - y[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6
    else:
        fired = (y - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    return fired, params[op]


@pytest.mark.parametrize("name", ["view1", "view2"])
@pytest.mark.parametrize("op", ["flip", "jitter", "grayscale", "blur", "solarize"])
def test_view_probabilities_from_outputs(name, op):
    n = 2000
    fired, drawn = _fired_from_output(op, getattr(AugmentConfig(), name), n)
    assert torch.equal(fired, drawn)
    assert_binomial(int(fired.sum()), n, EXPECTED[name][op])


# ---- each op, exactly -----------------------------------------------------------------------------
def test_flip_equals_torch_flip_on_a_full_image_crop():
    x = torch.rand(6, 3, 16, 16)
    p = plain_params(6, 16, 16)
    p["flip"][::2] = True
    y = vt(QUIET).apply(x, p)
    torch.testing.assert_close(y[::2], x[::2].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1::2], x[1::2], atol=1e-5, rtol=0)


def test_full_crop_with_unit_scale_and_ratio_is_the_identity():
    x = torch.rand(8, 3, 16, 16)
    t = vt(dataclasses.replace(QUIET, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)), ops=["crop"])
    torch.testing.assert_close(t(x, gen()), x, atol=1e-5, rtol=0)


def test_crop_samples_the_box_like_torchvision_resized_crop():
    boxes = [(2, 3, 8, 12), (0, 5, 16, 4), (5, 1, 6, 9)]
    # Each box's content is edge-padded out to the image border, so the pixels our resample reads outside
    # the box equal the edge replication torchvision's crop-then-resize sees.
    inner = [torch.rand(3, h, w) for _, _, h, w in boxes]
    x = torch.stack(
        [
            torch.nn.functional.pad(c[None], (left, 16 - left - w, top, 16 - top - h), mode="replicate")[0]
            for c, (top, left, h, w) in zip(inner, boxes)
        ]
    )
    p = plain_params(3, 16, 16)
    p["crop_box"] = torch.tensor(boxes, dtype=torch.float32)
    y = vt(QUIET, out=12).apply(x, p)
    for i, (top, left, h, w) in enumerate(boxes):
        # antialias=False: torchvision's antialiased bicubic uses another cubic (a = -0.5).
        ref = TF.resized_crop(x[i], top, left, h, w, [12, 12], interpolation=BICUBIC, antialias=False)
        torch.testing.assert_close(y[i], ref.clamp(0, 1), atol=1e-5, rtol=0)


def test_solarize_matches_the_formula():
    x = torch.rand(6, 3, 16, 16)
    p = plain_params(6, 16, 16)
    p["solarize"][1::2] = True
    y = vt(QUIET, ops=["solarize"]).apply(x, p)
    torch.testing.assert_close(y[1::2], torch.where(x[1::2] >= 0.5, 1 - x[1::2], x[1::2]), atol=1e-6, rtol=0)
    assert torch.equal(y[::2], x[::2])


def test_solarize_at_the_threshold_and_its_neighbours():
    """x >= t flips exactly at t, and the float-only form keeps 1 - x and x exact next to it."""
    view = dataclasses.replace(QUIET, solarize_threshold=0.3)
    t = torch.tensor(0.3)  # the threshold as the views hold it (float32)
    below, above = torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(1.0))
    values = torch.stack([torch.tensor(0.0), below, t, above, torch.tensor(0.5), torch.tensor(1.0)])
    x = values.view(1, 1, 1, 6).expand(2, 1, 6, 6).contiguous()
    p = plain_params(2, 6, 6)
    p["solarize"][0] = True
    y = vt(view, ops=["solarize"], out=6, channels=1).apply(x, p)
    assert torch.equal(y[0], torch.where(x[0] >= t, 1 - x[0], x[0]))
    assert torch.equal(y[0, 0, 0, :4], torch.stack([torch.tensor(0.0), below, 1 - t, 1 - above]))
    assert torch.equal(y[1], x[1])


def test_matrix_blur_equals_the_reflect_padded_convolution():
    """The two blurs (matrices for small views, grouped convolutions above MATRIX_BLUR_MAX_SIDE) agree on
    1 and 3 channels, kernels of several sizes, and pass an impulse kernel's image through exactly."""
    g = gen(5)
    for channels, side, size in ((1, 20, 3), (3, 12, 5), (3, 9, 7)):
        x = torch.rand(6, channels, side, side, generator=g)
        kern = torch.rand(6, size, generator=g)
        kern = (kern + kern.flip(1)) / (kern + kern.flip(1)).sum(1, keepdim=True)  # symmetric, sums to 1
        kern[0] = 0.0
        kern[0, size // 2] = 1.0
        y = matrix_blur(x, kern, blur_band(side, size))
        torch.testing.assert_close(y, gaussian_blur(x, kern), atol=1e-6, rtol=0)
        assert torch.equal(y[0], x[0])
    with pytest.raises(ValueError, match="too large"):
        blur_band(3, 7)


def test_blur_of_an_impulse_is_the_normalised_gaussian_kernel():
    size, sigma = 21, 1.3
    view = dataclasses.replace(QUIET, blur_kernel_frac=0.35)  # int(0.35 * 21) = 7 -> kernel 7
    t = vt(view, ops=["blur"], out=size, channels=1)
    assert t.blur_size == 7
    x = torch.zeros(2, 1, size, size)
    x[:, :, 10, 10] = 1.0
    p = plain_params(2, size, size)
    p["blur"][0] = True
    p["blur_sigma"][0] = sigma
    y = t.apply(x, p)
    pos = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-(pos**2) / (2 * sigma**2))
    k = k / k.sum()
    expected = torch.zeros(size, size, dtype=torch.float64)
    expected[7:14, 7:14] = torch.outer(k, k)
    torch.testing.assert_close(y[0, 0].double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(y[1], x[1])  # not selected: passed through exactly


def test_grayscale_uses_the_luma_weights():
    x = torch.rand(2, 3, 8, 8)
    p = plain_params(2, 8, 8)
    p["grayscale"][0] = True
    y = vt(QUIET, ops=["grayscale"], out=8).apply(x, p)
    luma = LUMA[0] * x[0, 0] + LUMA[1] * x[0, 1] + LUMA[2] * x[0, 2]
    torch.testing.assert_close(y[0], luma.expand(3, 8, 8), atol=1e-6, rtol=0)
    assert torch.equal(y[1], x[1])


def jitter_only(x: torch.Tensor, op: str, value: float) -> torch.Tensor:
    """The batched jitter with one op active (the others at strength 0) at the given factor or delta."""
    B, _, H, W = x.shape
    view = dataclasses.replace(QUIET, **{name: 0.5 if name == op else 0.0 for name in JITTER_OPS})
    p = plain_params(B, H, W)
    p["jitter"][:] = True
    p[op] = torch.full((B,), value)
    return vt(view, ops=["jitter"], out=H, channels=x.shape[1]).apply(x, p)


def test_jitter_ops_match_torchvision_functionals():
    x = torch.rand(4, 3, 12, 12)
    # Pure colours, greys and ties between channels: every branch of RGB -> HSV.
    x[0, :, :2, :2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[0, :, 2:4, :2] = torch.tensor([0.3, 0.3, 0.3]).view(3, 1, 1)
    x[0, :, 4:6, :2] = torch.tensor([0.6, 0.6, 0.1]).view(3, 1, 1)
    x[0, :, 6:8, :2] = torch.tensor([0.2, 0.7, 0.7]).view(3, 1, 1)
    for d in (-0.5, -0.1, 0.05, 0.3, 0.5):
        torch.testing.assert_close(jitter_only(x, "hue", d), TF.adjust_hue(x, d), atol=1e-5, rtol=0)
    for f in (0.0, 0.7, 1.3):
        torch.testing.assert_close(jitter_only(x, "saturation", f), TF.adjust_saturation(x, f), atol=1e-6, rtol=0)
        torch.testing.assert_close(jitter_only(x, "contrast", f), TF.adjust_contrast(x, f), atol=1e-6, rtol=0)
    g = x[:, :1]  # 1 channel: contrast against the image's own mean
    torch.testing.assert_close(jitter_only(g, "contrast", 0.6), TF.adjust_contrast(g, 0.6), atol=1e-6, rtol=0)


def test_jitter_follows_each_images_own_order():
    view = dataclasses.replace(QUIET, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)
    x = torch.rand(1, 3, 8, 8).expand(2, -1, -1, -1)
    p = plain_params(2, 8, 8)
    p["jitter"][:] = True
    p["brightness"][:] = 0.3
    p["contrast"][:] = 1.4
    b, c = JITTER_OPS.index("brightness"), JITTER_OPS.index("contrast")
    p["jitter_order"] = torch.tensor([[b, c, 2, 3], [c, b, 2, 3]])
    y = vt(view, ops=["jitter"], out=8).apply(x, p)

    def contrast(z):
        m = (LUMA[0] * z[0] + LUMA[1] * z[1] + LUMA[2] * z[2]).mean()
        return (1.4 * z + (1 - 1.4) * m).clamp(0, 1)

    def bright(z):
        return (z + 0.3).clamp(0, 1)

    torch.testing.assert_close(y[0], contrast(bright(x[0])), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1], bright(contrast(x[1])), atol=1e-6, rtol=0)
    assert (y[0] - y[1]).abs().max() > 1e-3


# ---- crop boxes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("in_size,out", [((28, 28), 20), ((20, 24), 16)])
def test_crop_tables_hold_exactly_the_computed_matrices(monkeypatch, in_size, out):
    """Small inputs read the crop's matrices from tables of every box; they are the matrices the general
    path computes for the same boxes and flips, bit for bit, and the views agree."""
    H, W = in_size
    n = 64
    tabled = TwoViews(AugmentConfig(), out, [0.5], [0.25], ops=["crop", "flip"])
    p = tabled.batched.sample_params(n, 1, in_size, gen(8), "cpu")
    assert 0 < int(p["flip"].sum()) < 2 * n
    x = torch.rand(n, 1, H, W, generator=gen(9))
    with_tables = tabled.batched.apply(x, p, shared=True)
    c = tabled.batched._constants(n, 1, in_size, "cpu")
    assert c.tables is not None
    ry, rx = resample.table_matrices(p["crop_box"], p["flip"], c, 2)

    monkeypatch.setattr(resample, "RESAMPLE_TABLE_FLOATS", 0)
    computed = TwoViews(AugmentConfig(), out, [0.5], [0.25], ops=["crop", "flip"])
    without = computed.batched.apply(x, p, shared=True)
    c2 = computed.batched._constants(n, 1, in_size, "cpu")
    assert c2.tables is None
    mats = resample.resample_matrices(p["crop_box"], p["flip"], c2, c2.resample.zero_(), 2, in_size)
    assert torch.equal(ry, mats[0, ..., :H].transpose(0, 1))
    assert torch.equal(rx, mats[1, ..., :W].reshape(n, 2 * out, W))
    torch.testing.assert_close(with_tables, without, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ops,channels", [(ALL, 3), (ALL, 1), (["flip", "jitter", "blur"], 3)])
def test_views_read_a_shared_batch_as_if_copied_per_view(ops, channels):
    """apply(shared=True) on B images equals apply on the batch repeated once per view, with and
    without the crop (whose matmuls read the shared batch in place)."""
    two = TwoViews(AugmentConfig(), 12, [0.5] * channels, [0.25] * channels, ops=ops)
    x = torch.rand(10, channels, 16, 16, generator=gen(6))
    p = two.batched.sample_params(10, channels, (16, 16), gen(7), "cpu")
    shared = two.batched.apply(x, p, shared=True)
    torch.testing.assert_close(shared, two.batched.apply(x.repeat(2, 1, 1, 1), p), atol=1e-6, rtol=0)
    assert shared.shape == (20, channels, 12, 12)


def test_crop_boxes_bounds_distribution_and_independence():
    n, H, W = 20000, 32, 32
    p = vt(T).sample_params(n, 3, (H, W), gen(3), "cpu")
    scale, log_r = p["crop_scale"], p["crop_log_ratio"]
    assert scale.min() >= 0.08 - 1e-6 and scale.max() <= 1.0 + 1e-6
    assert log_r.min() >= math.log(3 / 4) - 1e-6 and log_r.max() <= math.log(4 / 3) + 1e-6
    top, left, h, w = p["crop_box"].unbind(1)
    assert torch.equal(p["crop_box"], p["crop_box"].round())
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    frac = h * w / (H * W)
    assert frac.min() >= 0.06 and (frac - scale).abs().mean() < 0.02  # whole-pixel rounding only

    # Same distribution as torchvision's RandomResizedCrop.get_params (first valid of 10 tries).
    torch.manual_seed(0)
    img = torch.zeros(1, H, W)
    tv = torch.tensor([v2.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    tv_frac = (tv[:, 2] * tv[:, 3] / (H * W)).float()
    tv_logr = torch.log(tv[:, 3].float() / tv[:, 2].float())
    for ours, theirs in ((frac, tv_frac), (torch.log(w / h), tv_logr)):
        se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 5 * se

    # Images draw independently: neighbours in a batch are uncorrelated and boxes differ.
    for v in (scale, log_r, top, left):
        r = torch.corrcoef(torch.stack([v[0::2], v[1::2]]))[0, 1]
        assert abs(r) < 5 / math.sqrt(n // 2)
    assert len({tuple(b) for b in p["crop_box"][:64].tolist()}) > 48


def test_crop_falls_back_to_torchvisions_centre_crop():
    view = dataclasses.replace(T, crop_scale=(0.9, 1.0), crop_ratio=(4.0, 5.0))  # never fits a square
    p = vt(view).sample_params(50, 3, (16, 16), gen(), "cpu")
    i, j, h, w = v2.RandomResizedCrop.get_params(torch.zeros(1, 16, 16), [0.9, 1.0], [4.0, 5.0])
    assert torch.equal(p["crop_box"], torch.tensor([[i, j, h, w]], dtype=torch.float32).expand(50, 4))


def test_without_crop_the_image_is_only_resized():
    x = torch.rand(3, 3, 20, 20)
    t = vt(T, ops=["flip"], out=16)
    p = t.sample_params(3, 3, (20, 20), gen(), "cpu")
    p["flip"][:] = False
    assert torch.equal(p["crop_box"], torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(3, 4))
    expected = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(t.apply(x, p), expected, atol=1e-6, rtol=0)


# ---- reproducibility -----------------------------------------------------------------------------
def test_same_seed_same_views_and_resumable_generator():
    two = TwoViews(AugmentConfig(), 16, [0.5] * 3, [0.25] * 3)
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    a1, a2 = two(x, gen(7))
    b1, b2 = two(x, gen(7))
    c1, c2 = two(x, gen(8))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    assert not torch.equal(a1, a2)  # the two views draw independently
    assert a1.shape == (16, 3, 16, 16) and a1.dtype == torch.float32

    g = gen(9)
    two(x, g)
    state = g.get_state()
    first = two(x, g)
    g2 = torch.Generator()
    g2.set_state(state)
    second = two(x, g2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_uint8_and_float_inputs_agree():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    t = ViewTransform(T2, ALL, 12, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    torch.testing.assert_close(t(x, gen(4)), t(x.float() / 255, gen(4)), atol=1e-5, rtol=0)


# ---- ablation ops --------------------------------------------------------------------------------
def test_unlisted_blur_never_fires():
    always = dataclasses.replace(T, blur_prob=1.0)
    ops = [o for o in ALL if o != "blur"]
    t = vt(always, ops=ops)
    assert not t.sample_params(2000, 3, (16, 16), gen(), "cpu")["blur"].any()
    x = torch.rand(64, 3, 16, 16)
    torch.testing.assert_close(t(x, gen(5)), vt(dataclasses.replace(T, blur_prob=0.0))(x, gen(5)), atol=1e-6, rtol=0)


def test_crop_only_applies_nothing_else():
    loud = dataclasses.replace(T, flip_prob=1.0, jitter_prob=1.0, grayscale_prob=1.0, blur_prob=1.0, solarize_prob=1.0)
    t = vt(loud, ops=["crop"])
    p = t.sample_params(500, 3, (16, 16), gen(), "cpu")
    for op in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert not p[op].any(), op
    x = torch.rand(64, 3, 16, 16)
    y = t(x, gen(6))
    torch.testing.assert_close(y, vt(QUIET)(x, gen(6)), atol=1e-6, rtol=0)
    assert not torch.allclose(y, vt(loud)(x, gen(6)), atol=1e-3)


# ---- 1 channel, brightness -----------------------------------------------------------------------
def test_one_channel_ignores_saturation_hue_and_grayscale():
    mute = dataclasses.replace(T, saturation=0.0, hue=0.0, grayscale_prob=0.0)
    x1 = torch.rand(200, 1, 16, 16)
    assert torch.equal(vt(T, channels=1)(x1, gen(3)), vt(mute, channels=1)(x1, gen(3)))
    x3 = x1.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    assert not torch.allclose(vt(T)(x3, gen(3)), vt(mute)(x3, gen(3)))  # the same test sees them on RGB
    assert set(noop_ops(1)) == {"saturation", "hue", "grayscale"}


def test_brightness_is_additive():
    view = dataclasses.replace(QUIET, jitter_prob=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    n = 500
    x = 0.45 + 0.1 * torch.rand(n, 3, 16, 16)  # far enough from 0 and 1 that nothing clamps
    t = vt(view, ops=["jitter"])
    diff = t(x, gen(11)) - x
    delta = diff.mean(dim=(1, 2, 3))
    assert (diff - delta.view(-1, 1, 1, 1)).abs().max() < 1e-6  # one constant per image
    assert delta.abs().max() <= 0.4 + 1e-6
    torch.testing.assert_close(delta, t.sample_params(n, 3, (16, 16), gen(11), "cpu")["brightness"], atol=1e-6, rtol=0)
    assert abs(delta.std() - 0.8 / math.sqrt(12)) < 0.03 and abs(delta.mean()) < 0.05


# ---- evaluation transform ------------------------------------------------------------------------
def test_eval_transform_is_deterministic_resize_centre_crop_normalise():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    y = eval_transform(x, 16, mean, std)
    assert y.shape == (4, 3, 16, 16) and y.dtype == torch.float32
    assert torch.equal(y, eval_transform(x, 16, mean, std))
    ref = TF.center_crop(TF.resize(x.float() / 255, [16], antialias=True), [16, 16]).clamp(0, 1)
    ref = TF.normalize(ref, mean, std)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)

    same = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    z = eval_transform(same, 16, mean, std)
    back = z * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(back, same.float() / 255, atol=1e-6, rtol=0)
    white = eval_transform(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), 16, mean, std)
    torch.testing.assert_close(white[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


# ---- against the per-image torchvision pipeline --------------------------------------------------
@pytest.mark.parametrize("name", ["view1", "view2"])
def test_batched_views_match_the_torchvision_reference_in_distribution(name):
    # Brightness off: torchvision's is multiplicative, ours additive, by design.
    view = dataclasses.replace(getattr(AugmentConfig(), name), brightness=0.0)
    n, size = 600, 16
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([j * 255 // (size - 1), i * 255 // (size - 1), ((i // 2 + j // 2) % 2) * 200 + 30])
    img = img.to(torch.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    torch.manual_seed(0)
    ref = reference_view_transform(view, ALL, size, mean, std)
    theirs = torch.stack([ref(img) for _ in range(n)])
    ours = ViewTransform(view, ALL, size, mean, std)(img.expand(n, -1, -1, -1), gen(12))
    assert ours.shape == theirs.shape
    for stat in (
        lambda y: y.mean(dim=(2, 3)),  # per-channel brightness: colour ops, grayscale, solarize
        lambda y: y.std(dim=(2, 3)),  # per-channel contrast: crop scale, blur, jitter
        lambda y: (y[..., :, 1:] - y[..., :, :-1]).abs().mean(dim=(2, 3)),  # edges: crop, blur
    ):
        a, b = stat(ours), stat(theirs)
        se = torch.sqrt(a.var(0) / n + b.var(0) / n)
        assert ((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-3).all(), (a.mean(0), b.mean(0), se)


# ---- device --------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_for_the_same_params():
    t = vt(T2)
    x = torch.rand(32, 3, 16, 16)
    p = t.sample_params(32, 3, (16, 16), gen(), "cpu")
    p["jitter"][:] = True
    p["blur"][:] = True
    cpu = t.apply(x, p)
    cuda = t.apply(x.cuda(), {k: v.cuda() for k, v in p.items()})
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    v1, v2_ = TwoViews(AugmentConfig(), 16, [0.5] * 3, [0.25] * 3)(x.cuda(), g)
    assert v1.is_cuda and v2_.shape == (32, 3, 16, 16)


# ---- batched augmentation: per-image independence -----------------------------------------------
def test_batched_augmentation_draws_each_images_parameters_independently():
    vt = ViewTransform(AugmentConfig().view1, AugmentConfig().ops, 32, (0.5,) * 3, (0.25,) * 3)
    B = 4096
    p = vt.sample_params(B, 3, (64, 64), torch.Generator().manual_seed(0), "cpu")
    scale = p["crop_scale"]
    # Neighbouring images do not share draws: lag-1 correlation ~ 0 (|r| < 4 / sqrt(B) ~ 0.06).
    for name in ("crop_scale", "brightness", "contrast", "blur_sigma"):
        x = p[name].float()
        r = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
        assert abs(r) < 0.06, (name, r)
    # Different ops of one image are independent too: P(flip and jitter) = P(flip) P(jitter).
    flip, jit = p["flip"].float(), p["jitter"].float()
    assert (flip * jit).mean().item() == pytest.approx(flip.mean().item() * jit.mean().item(), abs=0.02)
    assert scale.unique().numel() > B * 0.99
    # The same image B times gives B different views.
    img = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    v1, v2 = TwoViews(AugmentConfig(), 32, (0.5,) * 3, (0.25,) * 3)(img, torch.Generator().manual_seed(1))
    flat = v1.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min().item() > 0
    assert not torch.equal(v1, v2)


# ---- launch-free: a fixed, small number of ops, no host sync ------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_dispatch_few_ops_whatever_the_batch_and_never_sync(channels):
    """One TwoViews call (both views, every op of the paper's T and T') is at most 300 dispatched ops
    (one eager GPU kernel launch each, roughly) at batch 8 and at batch 512, the same number at both, and
    none of them makes the host wait for the device."""
    from byol_ray.core.sync import DispatchCounter

    two = TwoViews(AugmentConfig(), 32, [0.5] * channels, [0.25] * channels)
    counts = []
    for batch in (8, 512):
        x = torch.randint(0, 256, (batch, channels, 40, 36), dtype=torch.uint8)
        g = gen(batch)
        two(x, g)  # constants are built on the first call of a shape
        with DispatchCounter() as c:
            v1, v2 = two(x, g)
        assert v1.shape == v2.shape == (batch, channels, 32, 32)
        assert c.syncs == 0, c.sync_by_op
        assert c.ops <= 300, c.by_op.most_common(10)
        counts.append(c.ops)
    assert counts[0] == counts[1]


def test_jitter_applies_each_images_own_order_of_all_four_ops():
    """Against a per-image reference that applies torchvision's functionals (and the additive brightness)
    one after the other in the image's drawn order, clamping after each: all 24 orders, jitter on and off."""
    n = 96
    view = dataclasses.replace(QUIET, jitter_prob=0.75)
    t = vt(view, ops=["jitter"], out=12)
    g = gen(21)
    x = torch.rand(n, 3, 12, 12)
    p = t.sample_params(n, 3, (12, 12), g, "cpu")
    p["jitter_order"] = torch.tensor([list(o) for o in itertools.permutations(range(4))] * (n // 24))
    y = t.apply(x, p)
    ops = {
        "brightness": lambda z, v: (z + v).clamp(0, 1),
        "contrast": lambda z, v: TF.adjust_contrast(z, v),
        "saturation": lambda z, v: TF.adjust_saturation(z, v),
        "hue": lambda z, v: TF.adjust_hue(z, v),
    }
    assert 0 < int(p["jitter"].sum()) < n
    for i in range(n):
        ref = x[i]
        if p["jitter"][i]:
            for k in p["jitter_order"][i].tolist():
                name = JITTER_OPS[k]
                ref = ops[name](ref, float(p[name][i]))
        torch.testing.assert_close(y[i], ref, atol=2e-5, rtol=0, msg=f"image {i}")


def test_views_with_different_blur_kernels_blur_each_with_its_own():
    """Both views run as one batch: a view with a smaller blur kernel than the other gets exactly its own
    (zero weight on the extra taps), as when it runs alone."""
    v1 = dataclasses.replace(T, blur_prob=1.0, blur_kernel_frac=0.1)  # 32 px -> 3 taps
    v2 = dataclasses.replace(T2, blur_prob=1.0, blur_kernel_frac=0.3)  # 32 px -> 9 taps
    two = TwoViews(AugmentConfig(view1=v1, view2=v2), 32, [0.5] * 3, [0.25] * 3)
    assert two.batched.blur_sizes == [3, 9]
    x = torch.rand(6, 3, 32, 32)
    p = two.batched.sample_params(6, 3, (32, 32), gen(4), "cpu")
    both = two.batched.apply(x.repeat(2, 1, 1, 1), p)
    for i, view in enumerate((v1, v2)):
        alone = ViewTransform(view, ALL, 32, [0.5] * 3, [0.25] * 3)
        own = {k: v[6 * i : 6 * (i + 1)] for k, v in p.items()}
        torch.testing.assert_close(both[6 * i : 6 * (i + 1)], alone.apply(x, own), atol=1e-5, rtol=0)
