"""The CPU worker's runtime set-up: freed memory stays in the process, so a step's tensors do not
page-fault again every step (training/cpu_runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import REPO

from byol_ray.config import Config
from byol_ray.training.cpu_runtime import configure_cpu

# A training step's pattern: several MB of temporaries allocated, first touched, freed together; the
# minor page faults of 20 such steps (the allocator setting is per process, hence one process per case).
STEPS = """
import resource, sys, torch
from byol_ray.training.cpu_runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    ts = [torch.empty(262144 * (1 + i % 3)).fill_(1.0) for i in range(8)]
    del ts
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


def test_freed_memory_is_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    # glibc's default gives the freed top of the heap back and faults it in again: thousands of faults
    # for 20 steps of ~40 MB first touched; kept, the same pages are reused.
    assert kept * 3 < default, (kept, default)
    assert kept < 2000, kept


def test_configure_cpu_sets_the_threads():
    before = torch.get_num_threads()
    try:
        configure_cpu(Config.from_dict({"run": {"cpus_per_worker": 2, "torch_threads": 0}}))
        assert torch.get_num_threads() == 2
        configure_cpu(Config.from_dict({"run": {"cpus_per_worker": 2, "torch_threads": 1}}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
