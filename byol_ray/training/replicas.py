"""Every worker's replica must be identical: checked once per epoch, not assumed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.engine import Pretrainer, distributed


class ReplicaMismatch(RuntimeError):
    pass


def check_replicas(trainer: Pretrainer, rank: int, world: int) -> dict[str, float]:
    """Compare per-tensor checksums of online and target networks across workers; raise on mismatch.

    Returns the metrics logged every epoch: each rank's target checksum (so the agreement is visible in
    MLflow, not only asserted) and whether all replicas agree.
    """
    sums = trainer.checksums()
    names = list(sums)
    vec = torch.tensor([sums[n] for n in names], dtype=torch.float64)
    is_target = torch.tensor([n.startswith("target.") for n in names])
    gathered = [vec]
    if world > 1 and distributed():
        gathered = [torch.zeros_like(vec) for _ in range(world)]
        dist.all_gather(gathered, vec)
    out = {f"target_checksum_rank{r}": g[is_target].sum().item() for r, g in enumerate(gathered)}
    out["target_checksum"] = out["target_checksum_rank0"]
    bad = sorted({names[i] for g in gathered[1:] for i in torch.nonzero(g != gathered[0]).flatten().tolist()})
    if bad:
        ranks = [r for r in range(1, world) if not torch.equal(gathered[r], gathered[0])]
        raise ReplicaMismatch(
            f"replicas diverged after step {trainer.step}: rank(s) {ranks} differ from rank 0 in "
            f"{len(bad)} tensor(s): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}"
        )
    out["replicas_in_sync"] = 1.0
    return out
