"""Encoders, MLP heads and the BYOL online/target pair.

The encoder is torchvision's ResNet (its own BasicBlock/Bottleneck and layer builder), with two knobs the
paper's ImageNet setting does not need: the stem (small images) and the base width. With
``stem="imagenet", width=64`` it is exactly torchvision's ``resnet18``/``resnet50`` minus the classifier.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torchvision
from torch import nn

from ..config import ModelConfig

_LAYERS = {
    # One BasicBlock per stage: ResNet-18's stages at half its depth (a small-data, small-CPU encoder).
    "resnet10": (torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]),
    "resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (torchvision.models.resnet.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(torchvision.models.ResNet):
    """torchvision ResNet with a configurable stem and base width, returning pooled features."""

    def __init__(self, backbone: str, in_channels: int = 3, stem: str = "imagenet", width: int = 64):
        block, layers = _LAYERS[backbone]
        self._width = width
        self._stage = 0
        super().__init__(block, layers)
        # The stem is rebuilt after torchvision's init; torchvision's own init scheme is reapplied below.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:  # small images: keep resolution in the first conv (the CIFAR variant of SimCLR/BYOL ports)
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            if stem == "small":
                self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.fc = nn.Identity()
        self.out_dim = 8 * width * block.expansion

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: D401 - torchvision hook
        # torchvision hard-codes planes 64/128/256/512 and an inplanes of 64; scale both by width/64.
        if self._stage == 0:
            self.inplanes = self._width
        self._stage += 1
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


# oneDNN (torch 2.14.1's CPU convolutions) corrupts the heap in the backward pass of a channels_last
# (NHWC) 1x1 convolution with stride > 1 and fewer than 8 input channels (one AVX2 register of fp32) on
# CPUs without AVX-512: glibc then aborts ("corrupted double-linked list", "free(): invalid next size").
# Measured with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU, 1 thread, 2 runs each: in_channels 1-7 crash
# every time, 8, 9, 10, 12, 16, 20 and 24 never; 3x3 and 2x2 strided convs, stride-1 1x1 convs and the
# contiguous format never do. In our ResNets that conv is the shortcut into layer2 of resnet18/34 at
# model.width=4 (the tests' width); resnet50's shortcuts have 4 x width inputs.
NHWC_MIN_STRIDED_1X1_CHANNELS = 8


def nhwc_unsafe_convs(module: nn.Module) -> list[str]:
    """The convolutions of `module` that channels_last would run into the oneDNN heap corruption above."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride != (1, 1)
        and m.in_channels < NHWC_MIN_STRIDED_1X1_CHANNELS
    ]


def memory_format(channels_last: bool, module: nn.Module, device: torch.device) -> torch.memory_format:
    """The activation layout to train `module` in: channels_last when asked for (model.channels_last), on
    CUDA always, on a CPU only where oneDNN handles every convolution of the module safely."""
    if channels_last and (device.type == "cuda" or not nhwc_unsafe_convs(module)):
        return torch.channels_last
    return torch.contiguous_format


def mlp(in_dim: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    """The paper's head: (Linear -> BatchNorm -> ReLU) x (layers-1) -> Linear. layers=1 is one Linear."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


def build_encoder(cfg: ModelConfig, in_channels: int) -> ResNetEncoder:
    return ResNetEncoder(cfg.backbone, in_channels=in_channels, stem=cfg.stem, width=cfg.width)


class Branch(nn.Module):
    """Encoder followed by projector: what the online and target networks share."""

    def __init__(self, encoder: ResNetEncoder, projector: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.encoder(x)
        return y, self.projector(y)


class OnlineNetwork(nn.Module):
    """encoder -> projector -> predictor; forward returns (representation, projection, prediction)."""

    def __init__(self, cfg: ModelConfig, in_channels: int):
        super().__init__()
        encoder = build_encoder(cfg, in_channels)
        projector = mlp(encoder.out_dim, cfg.projector_hidden, cfg.projector_out, cfg.projector_layers)
        self.branch = Branch(encoder, projector)
        self.separate_view_forward = cfg.separate_view_forward
        # Without a predictor (an ablation) q is the identity, so the loss compares projections directly.
        self.predictor = (
            mlp(cfg.projector_out, cfg.predictor_hidden, cfg.projector_out, cfg.predictor_layers)
            if cfg.use_predictor
            else nn.Identity()
        )

    @property
    def encoder(self) -> ResNetEncoder:
        return self.branch.encoder

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Both views in one call (one DDP forward per step): (y1, y2, z1, z2, q1, q2)."""
        y1, y2, z1, z2 = two_view_forward(self.branch, x1, x2, self.separate_view_forward)
        return y1, y2, z1, z2, self.predictor(z1), self.predictor(z2)


def two_view_forward(branch: nn.Module, x1: torch.Tensor, x2: torch.Tensor, separate: bool):
    """(y1, y2, z1, z2). Separate passes keep BatchNorm statistics per view, as in the paper; one
    concatenated pass launches half as many kernels but mixes the two views' statistics."""
    if separate:
        y1, z1 = branch(x1)
        y2, z2 = branch(x2)
        return y1, y2, z1, z2
    y, z = branch(torch.cat([x1, x2]))
    n = len(x1)
    return y[:n], y[n:], z[:n], z[n:]


def make_target(online: OnlineNetwork) -> Branch:
    """The target network: a frozen copy of the online encoder + projector (no predictor).

    Its BatchNorm layers get momentum 0: the target's forward pass (train mode, batch statistics, as in
    the authors' code) then leaves its running statistics alone, so they change only through the EMA
    and stay identical on every worker.
    """
    target = copy.deepcopy(online.branch)
    for p in target.parameters():
        p.requires_grad_(False)
    for m in target.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return target


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    # Both wrappers hold a Module there; nn.Module's __getattr__ is typed Tensor | Module.
    while True:
        if hasattr(model, "module"):
            model = cast(nn.Module, model.module)
        elif hasattr(model, "_orig_mod"):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model
