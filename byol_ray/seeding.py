"""Seeds derived from the run seed: the one place every epoch's randomness comes from (a leaf module)."""

from __future__ import annotations

import hashlib


def epoch_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """A seed per (run seed, rank, epoch, stream), so every epoch's randomness is reproducible from the
    epoch number alone: a run resumed from an epoch checkpoint replays exactly what it would have done."""
    h = hashlib.sha256(f"{seed}/{rank}/{epoch}/{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
