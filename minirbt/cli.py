"""Small helpers shared by the command-line scripts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from minirbt.textio import CorpusError


def default_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``; user mistakes end with one clear line, not a traceback."""
    try:
        code = main()
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no partial output was kept", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
