"""When to draw progress bars."""

from __future__ import annotations

import os
import sys


def show_progress() -> bool:
    """Progress bars only for a person at a terminal: not under CI, not into a file or pipe."""
    return sys.stderr.isatty() and not os.environ.get("CI")
