"""User-facing errors: one paragraph naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import sys
import traceback
from typing import Callable


class UserError(RuntimeError):
    """Something the user can fix (input, environment); printed without a traceback."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .sweep_spec import SweepError
    from .tracking import TrackingError

    return (UserError, ConfigError, DataError, TrackingError, SweepError)


def run_cli(fn: Callable[[], int], debug: bool = False) -> int:
    """Run a command; known user errors become a clear message and exit code 2."""
    try:
        return fn()
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        print(f"byol-ray: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("byol-ray: interrupted", file=sys.stderr)
        return 130
