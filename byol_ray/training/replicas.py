"""Every worker's replica must be identical: checked once per epoch, not assumed."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..core.engine import Pretrainer, distributed
from ..core.sync import to_host


class ReplicaMismatch(RuntimeError):
    pass


def check_replicas(trainer: Pretrainer, rank: int, world: int) -> dict[str, float]:
    """Compare per-tensor checksums of online and target networks across workers; raise on mismatch.

    Returns the metrics logged every epoch: each rank's target checksum (so the agreement is visible in
    MLflow, not only asserted) and whether all replicas agree.
    """
    names, vec = trainer.checksum_vector()
    gathered = [vec]
    if world > 1 and distributed():
        gathered = [torch.zeros_like(vec) for _ in range(world)]
        dist.all_gather(gathered, vec)
    # Every rank's checksums reach the host together: one sync per epoch, not one per tensor.
    rows = to_host(torch.stack(gathered))
    is_target = [n.startswith("target.") for n in names]
    out = {f"target_checksum_rank{r}": math.fsum(v for v, t in zip(row, is_target) if t) for r, row in enumerate(rows)}
    out["target_checksum"] = out["target_checksum_rank0"]
    bad = sorted({names[i] for row in rows[1:] for i, (a, b) in enumerate(zip(row, rows[0])) if a != b})
    if bad:
        ranks = [r for r in range(1, world) if rows[r] != rows[0]]
        raise ReplicaMismatch(
            f"replicas diverged after step {trainer.step}: rank(s) {ranks} differ from rank 0 in "
            f"{len(bad)} tensor(s): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}"
        )
    out["replicas_in_sync"] = 1.0
    return out
