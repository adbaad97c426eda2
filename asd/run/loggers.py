"""The wandb logger, offline unless the user has configured an API key.

A run folder holds one wandb run: its id is kept in `<run>/wandb_run_id`, and a later call in the
same folder that continues the work (a resumed fit; stages redone after a finished fit) logs to
that run again instead of starting another or logging nowhere.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from asd.fileio import write_text_atomic

#: the run folder's file that names its wandb run
RUN_ID_FILE = "wandb_run_id"


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
    run_config: dict[str, Any] | None = None,
    resume: bool = False,
) -> Any:
    """Lightning's WandbLogger; `mode` None means online with a key and offline without one.

    Args:
        run_config: the run's resolved config, recorded as the wandb run's config (runs filter by it).
        resume: log to the wandb run this folder recorded (a new one when it recorded none).
    """
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_only

    mode = mode or ("online" if has_wandb_key() else "offline")
    run_id = wandb_run_id(save_dir) if resume else None
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]
        if rank_zero_only.rank == 0:  # the DDP ranks that Lightning starts log nothing
            write_text_atomic(Path(save_dir) / RUN_ID_FILE, run_id + "\n")
    return WandbLogger(
        project=project,
        entity=entity,
        tags=list(tags or []),
        save_dir=save_dir,
        offline=mode == "offline",
        name=name,
        id=run_id,
        config=run_config,
    )


def wandb_run_id(run_dir: str | Path) -> str | None:
    """The id of the wandb run a run folder logged to, if it did."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    return path.read_text().strip() or None
