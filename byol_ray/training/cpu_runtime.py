"""How a CPU worker process is set up to train: its torch threads, and freed memory kept in the process.

Threads: ``run.torch_threads``, else ``run.cpus_per_worker``.

Memory:
PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks above a threshold (128 KiB
at first) with mmap and gives freed memory at the top of the heap back to the OS; the next tensor of that
size then page-faults on every 4 KiB page it first touches. A training step allocates and frees the same
large tensors every step (activations, views, gradients), so on a CPU part of every step is the kernel
zeroing pages. Keeping freed memory in the process removes those faults (tests/training/test_cpu_runtime.py
counts them). PyTorch's own CPU tuning guide makes the same point by recommending jemalloc or tcmalloc.

Only glibc is configured; elsewhere (musl, macOS) this does nothing. Memory freed during a run stays
reserved by the process, which is reused by the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

from ..config import Config

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit: larger blocks are still mmapped
_done = False


def configure_cpu(cfg: Config) -> None:
    """Threads and allocator for a process that trains (or benchmarks) on the CPU."""
    torch.set_num_threads(cfg.run.torch_threads or max(1, int(cfg.run.cpus_per_worker)))
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and never trim it (glibc mallopt); once per process.
    Returns whether glibc accepted the settings."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Trimming off (the threshold at its maximum).
    _done = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
    return _done
