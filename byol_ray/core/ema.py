"""The target network's exponential moving average and the paper's cosine tau schedule."""

from __future__ import annotations

import torch
from torch import nn

from .schedules import cosine_decay


def tau_at(step: float, total_steps: float, tau_base: float, schedule: str = "cosine") -> float:
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1 at k = K."""
    if schedule == "constant" or total_steps <= 0:
        return tau_base
    return 1.0 - (1.0 - tau_base) * cosine_decay(step, total_steps)


class EMA:
    """xi <- tau * xi + (1 - tau) * theta over all parameters at once (multi-tensor foreach ops).

    The parameter lists are gathered once; one update is one multi-tensor lerp however many tensors there
    are. BatchNorm running statistics of the target follow the same average ("ema") or are copied
    ("copy"); the pretraining forward pass of the target uses batch statistics either way, so this only
    decides what a user gets when evaluating the target network itself. ``num_batches_tracked`` is copied.
    """

    def __init__(self, online: nn.Module, target: nn.Module, bn_mode: str = "ema"):
        online_params = dict(online.named_parameters())
        target_params = dict(target.named_parameters())
        if online_params.keys() != target_params.keys():
            raise ValueError("online and target networks have different parameters")
        self.names = list(target_params)
        # Tensors (not list[Parameter]): the foreach ops and _ema_ take lists of tensors.
        self.online: list[torch.Tensor] = [online_params[n] for n in self.names]
        self.target: list[torch.Tensor] = [target_params[n] for n in self.names]
        ob, tb = dict(online.named_buffers()), dict(target.named_buffers())
        float_bufs = [n for n in tb if tb[n].is_floating_point()]
        self.online_fbuf = [ob[n] for n in float_bufs]
        self.target_fbuf = [tb[n] for n in float_bufs]
        self.online_ibuf = [ob[n] for n in tb if not tb[n].is_floating_point()]
        self.target_ibuf = [tb[n] for n in tb if not tb[n].is_floating_point()]
        self.bn_mode = bn_mode

    @torch.no_grad()
    def update(self, tau: float | torch.Tensor) -> None:
        """One EMA step. tau is a Python number, or a 0-dim float64 device tensor (a captured step reads
        it on the device): 1 - tau is then computed in float64 and rounded once, like the number, so both
        give the same lerp and the same target, bit for bit."""
        _ema_(self.target, self.online, tau)
        if self.bn_mode == "ema":
            _ema_(self.target_fbuf, self.online_fbuf, tau)
        else:
            torch._foreach_copy_(self.target_fbuf, self.online_fbuf)
        if self.target_ibuf:
            torch._foreach_copy_(self.target_ibuf, self.online_ibuf)


def _ema_(target: list[torch.Tensor], online: list[torch.Tensor], tau: float | torch.Tensor) -> None:
    if not target:
        return
    if isinstance(tau, torch.Tensor):
        weight = (1.0 - tau).to(target[0].dtype)
        torch._foreach_lerp_(target, online, [weight] * len(target))
        return
    # xi + (1 - tau) (theta - xi) = tau xi + (1 - tau) theta, in one pass over the tensors: one read of
    # each and one write, and on CPU one multi-tensor kernel where mul-then-add took two slower ones.
    # Exact at the ends: tau = 1 keeps xi, tau = 0 gives theta (torch.lerp computes
    # end - (end - start)(1 - w) for w >= 0.5).
    torch._foreach_lerp_(target, online, 1.0 - tau)


@torch.no_grad()
def ema_loop_(target: nn.Module, online: nn.Module, tau: float, bn_mode: str = "ema") -> None:
    """The textbook per-tensor update, xi.mul_(tau).add_(theta, alpha=1 - tau) one tensor at a time, over
    the same tensors as `EMA.update` (parameters, float buffers averaged or copied, integer buffers
    copied): the reference the fused update is tested and benchmarked against. Equal to it within 2
    float32 ulps (lerp rounds once, mul-then-add twice)."""
    for xi, theta in zip(target.parameters(), online.parameters()):
        xi.mul_(tau).add_(theta, alpha=1.0 - tau)
    for xb, ob in zip(target.buffers(), online.buffers()):
        if xb.is_floating_point() and bn_mode == "ema":
            xb.mul_(tau).add_(ob, alpha=1.0 - tau)
        else:
            xb.copy_(ob)
