"""Where asd keeps generated data and caches (override with the ASD_CACHE environment variable)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$ASD_CACHE`, else `~/.cache/asd`."""
    env = os.environ.get("ASD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "asd"
