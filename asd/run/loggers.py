"""The wandb logger, offline unless the user has configured an API key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(
    save_dir: str,
    name: str,
    project: str = "asd",
    entity: str | None = None,
    tags: list[str] | None = None,
    mode: str | None = None,
) -> Any:
    """Lightning's WandbLogger; `mode` None means online with a key and offline without one."""
    from pytorch_lightning.loggers import WandbLogger

    mode = mode or ("online" if has_wandb_key() else "offline")
    return WandbLogger(
        project=project,
        entity=entity,
        tags=list(tags or []),
        save_dir=save_dir,
        offline=mode == "offline",
        name=name,
    )
