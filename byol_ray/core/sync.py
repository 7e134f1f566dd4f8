"""Host syncs and dispatched ops: how the step's numbers reach Python, and how that is counted.

On a GPU every read of a device value by the host (``.item()``, ``bool(t)``, ``t.tolist()``, a device ->
CPU copy, an op whose output size depends on values such as ``nonzero``) waits for the device to finish
everything queued before it; the CPU then cannot run ahead and launch the next kernels while the GPU
works. The training step therefore reads nothing: its statistics stay device tensors, and the loop reads
them through `to_host` only at log points and at the end of an epoch.

`DispatchCounter` counts what a piece of code dispatches with a `TorchDispatchMode`, on any device, CPU
included: every aten op (an eager GPU kernel launch is roughly one op), and the ones that sync. The
benchmark reports both per training step and per augmentation call, and the tests bound them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device (on CPU they are the same calls, so they count the same).
SYNC_OPS = frozenset(
    {
        "aten.lift_fresh",  # a tensor from Python data (torch.tensor, x[:, [0, 1]]): a copy from pageable host
        # memory, which waits for the device queue (and cannot be recorded in a CUDA graph)
        "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t)
        "aten.is_nonzero",  # `if t:`
        "aten.nonzero",  # boolean-mask indexing, torch.where(cond) with one argument
        "aten.masked_select",
        "aten.equal",  # torch.equal returns a Python bool
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.repeat_interleave.Tensor",  # without output_size its length is a device value
    }
)


def to_host(t: torch.Tensor) -> Any:
    """The values of a device tensor as Python numbers (a number for a 0-dim tensor), with ONE host sync:
    a copy to the CPU, made even for CPU tensors so that `DispatchCounter` sees every read on every
    device."""
    return t.detach().to("cpu", copy=True).tolist()


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside ``with DispatchCounter() as c:``; ``c.ops`` is the total,
    ``c.syncs`` the host syncs (SYNC_OPS, boolean-mask indexing, copies between the host's pageable memory
    and a device, `to_host` reads),
    ``c.by_op`` a Counter by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.sync_by_op: Counter[str] = Counter()

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        self.by_op[name] += 1
        if (
            name in SYNC_OPS
            or str(func).replace("::", ".") in SYNC_OPS
            or _copies_to_host(name, args, kwargs)
            or _masks(name, args)
        ):
            self.sync_by_op[name] += 1
        return func(*args, **kwargs)


def _masks(name: str, args: tuple) -> bool:
    """Indexing with a boolean mask (x[mask], x[mask] = v): its size is the mask's count, a device value
    (the CPU kernel hides the nonzero inside, the GPU one syncs for it)."""
    if name not in ("aten.index", "aten.index_put", "aten.index_put_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _copies_to_host(name: str, args: tuple, kwargs: dict[str, Any]) -> bool:
    """A copy whose destination is the CPU (from a device, or requested explicitly by `to_host`), or a
    copy from pageable host memory to a device (it waits for the device's queue first)."""
    if name == "aten._to_copy":
        device = kwargs.get("device")
        if device is None:
            return False
        if torch.device(device).type == "cpu":
            # A cast that stays on the CPU (autocast's bf16 copies name device=cpu) reads nothing back; a
            # copy from a device, or an explicit copy to the host (`to_host`), does.
            src = args[0]
            return src.device.type != "cpu" or kwargs.get("dtype") in (None, src.dtype)
        return args[0].device.type == "cpu" and not args[0].is_pinned()
    if name == "aten.copy_" and len(args) >= 2:
        dst, src = args[0], args[1]
        return isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu"
    return False
