"""distributed.cluster's resource check on node lists handed to it (no Ray runtime): a fixed group needs
room for all its workers, an elastic one only for its min, since Ray starts it with what fits."""

from __future__ import annotations

import pytest

from byol_ray.config import load_config
from byol_ray.distributed.cluster import ResourceError, check_resources

TWO_NODES = [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.5, "GPU": 0.0}]  # one 1-CPU worker fits on each


def cfg(workers: str):
    return load_config(None, ["optim.batch_size=240", "run.cpus_per_worker=1", f"run.num_workers={workers}"])


def test_an_elastic_group_needs_room_for_its_min_only():
    check_resources(cfg("[2,4]"), TWO_NODES)
    check_resources(cfg("[1,4]"), TWO_NODES)
    check_resources(cfg("2"), TWO_NODES)
    with pytest.raises(ResourceError) as ei:
        check_resources(cfg("[3,4]"), TWO_NODES)
    said = str(ei.value)
    assert "cannot hold 3 worker(s) (the min of run.num_workers [3, 4]) x 1 CPU" in said, said
    assert "2.5 CPUs" in said and "room for 2 such worker(s)" in said, said
    with pytest.raises(ResourceError, match=r"cannot hold 4 worker\(s\) x 1 CPU"):
        check_resources(cfg("4"), TWO_NODES)
