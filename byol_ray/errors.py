"""User-facing errors: one paragraph naming the problem and the fix, exit code 2, no traceback.

A leaf: it imports nothing of the package. Every domain error (`ConfigError`, `DataError`,
`TrackingError`, `SweepError`, ...) subclasses `UserError`, so a command catches exactly one type.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class UserError(RuntimeError):
    """Something the user can fix (input, environment); printed without a traceback."""


def run_cli(fn: Callable[[], int], debug: bool = False) -> int:
    """Run a command; user errors become a clear message and exit code 2."""
    try:
        return fn()
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"byol-ray: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("byol-ray: interrupted", file=sys.stderr)
        return 130
