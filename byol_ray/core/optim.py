"""LARS (with the paper's exclusions), the alternatives, and the peak learning rate (the schedule is
`schedules.warmup_cosine`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import OptimConfig


def is_excluded(name: str, param: nn.Parameter) -> bool:
    """Biases and BatchNorm parameters (every 1-d tensor) get neither weight decay nor LARS adaptation."""
    return param.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    regular: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (excluded if is_excluded(name, p) else regular).append(p)
    return [
        {"params": regular, "weight_decay": weight_decay, "lars_adapt": True},
        {"params": excluded, "weight_decay": 0.0, "lars_adapt": False},
    ]


class LARS(torch.optim.Optimizer):
    """LARS as in the BYOL/SimCLR code: per-tensor trust ratio eta*||w||/||g + wd*w||, then SGD momentum.

    update = lr * (momentum buffer), buffer = momentum * buffer + trust * (g + wd * w). Groups with
    ``lars_adapt=False`` (biases, BatchNorm) skip both weight decay (set to 0 by ``param_groups``) and
    the trust ratio. Every update is a multi-tensor (foreach) op and the trust ratios are computed on one
    stacked vector of norms, so a step costs a fixed number of kernels however many tensors there are.
    A group's lr may be a Python number or a 0-dim device tensor (a captured step reads it on the device).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars_adapt=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # A list here, a tuple once a foreach op has replaced it: the two kinds that foreach ops take.
            grads: list[torch.Tensor] | tuple[torch.Tensor, ...] = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars_adapt"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                eta = group["trust_coefficient"]
                trust = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, 1.0)
                grads = torch._foreach_mul(grads, trust.unbind(0))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
            else:
                torch._foreach_add_(params, bufs, alpha=-lr)
        return loss


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    lr = peak_lr(cfg)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def peak_lr(cfg: OptimConfig) -> float:
    """The paper's linear scaling rule: lr = base_lr * batch_size / 256."""
    return cfg.base_lr * cfg.batch_size / 256.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
