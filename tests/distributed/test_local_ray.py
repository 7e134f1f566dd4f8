"""A local Ray started by byol-ray runs its workers at normal priority: Ray's default of nice 15 left the
training workers behind every burst of Ray's own daemons on a 2-core machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NICENESS_OF_A_WORKER = """
import os, sys
import ray
if sys.argv[1] == "byol":
    from byol_ray.distributed.cluster import connect
    connect("")
else:
    ray.init(include_dashboard=False)
print("niceness", ray.get(ray.remote(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


@pytest.mark.ray
def test_a_local_ray_runs_its_workers_at_normal_priority(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_worker_niceness", "RAY_ADDRESS")}

    def niceness(how: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", NICENESS_OF_A_WORKER, how],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("niceness")]
        assert line, out.stderr[-2000:]
        return int(line[0].split()[1])

    assert niceness("byol") == os.nice(0)
    assert niceness("plain") == 15  # Ray's own default, which connect() overrides
