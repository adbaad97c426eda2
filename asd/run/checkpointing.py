"""Checkpoints during the fit: `checkpoints/last.ckpt`, from which `resume=true` continues exactly.

An interrupted fit (kill -9, Ctrl-C, SIGTERM, a crash) resumes from the last checkpoint and ends
with the weights, and so the `scores.csv`, of the run that was never interrupted (on CPU, with the
same seed). The choices, and why:

- Epoch ends only. The checkpoint is written at the end of every `checkpoint.every_n_epochs`-th
  epoch, at the first epoch end `checkpoint.every_minutes` after the previous one, and when the fit
  ends. Lightning resumes a mid-epoch checkpoint with a fresh pass over a loader that cannot skip
  what it already gave (it warns so): the rest of that epoch would see other batches, and the
  resumed run would not be the uninterrupted one. A resumable sampler belongs to the data module
  (`asd.data`); at an epoch end the loader needs nothing but its generator's state. The price: an
  interruption loses the epoch in progress.
- The random state. Lightning's checkpoint holds the weights, optimizers, schedulers and loop
  progress; this one also holds torch's, numpy's and Python's global generators (dropout, the
  diffusion member's noise, masking and mixup draw from torch's) and the training loader's
  generator (the shuffle of every later epoch). They go back at the start of the first resumed
  epoch, where the uninterrupted run had them, and that epoch's batch iterator is made again from
  them. Generators of their own seeded per clip (the diffusion member's scoring noise, the
  pseudo-anomalies, the fusions) need nothing.
- Our callback, not `ModelCheckpoint`: in Lightning 2.6 `ModelCheckpoint(save_last=True,
  save_top_k=0)` writes `last.ckpt` only when training ends, it ignores `train_time_interval` under
  manual optimisation (the ensemble's), and its step and time cadences save mid-epoch.
- Atomic writes: Lightning's `TorchCheckpointIO` writes to the system's temp folder and moves the
  file into place, a copy and not a rename when that folder is on another file system, so a kill
  during the copy leaves a truncated `last.ckpt`. `AtomicCheckpointIO` writes beside the target,
  syncs it to disk and renames it over the old one: `last.ckpt` is the previous checkpoint or the
  new one, never half of one.
- Interruptions: Lightning answers Ctrl-C by tearing down and exiting, and SIGTERM with an
  exception after the current batch. The fit stage turns both into one `Interrupted` error that
  names the checkpoint and the command that resumes; the partial epoch is not saved, since it could
  not resume exactly.
- Identity: the checkpoint carries the run's signature and the fit's settings (hold-out, seed), and
  `resumable` refuses one of another configuration, or one that cannot be read, before training.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from asd.errors import AsdError
from asd.fileio import write_atomic

log = logging.getLogger(__name__)

LAST_CKPT = "checkpoints/last.ckpt"
#: the checkpoint's entry for what Lightning does not keep: identity and random state
KEY = "asd_resume"


class Interrupted(AsdError):
    """The fit was stopped (Ctrl-C, SIGTERM); the message says how to continue it."""


# ---------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes a temporary file beside the target, syncs it and renames it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty file

        write_atomic(path, write)


class ResumeCheckpoint(Callback):
    """Write `path` at epoch ends on a cadence and when the fit ends; restore the random state on resume."""

    def __init__(
        self,
        path: str | Path,
        identity: dict[str, Any] | None = None,
        every_n_epochs: int = 1,
        every_minutes: float | None = None,
    ):
        """Args:
        path: the checkpoint, rewritten in place.
        identity: what a resumed fit must share with this one (signature hash, hold-out, seed).
        every_n_epochs: save at the end of every this many epochs; 0 not by count.
        every_minutes: save at the first epoch end this many minutes after the previous save; None not
            by time. With both off, only the end of the fit is saved.
        """
        self.path = Path(path)
        self.identity = identity or {}
        self.every_n_epochs = every_n_epochs
        self.every_minutes = every_minutes
        self.saved_step = -1  # the global step of the last save (or of the restored checkpoint)
        self.saved_at = time.monotonic()
        self.restored: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # temporaries of writes killed midway
            for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.saved_at = time.monotonic()

    def due(self, trainer: L.Trainer) -> bool:
        epochs = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        minutes = (
            self.every_minutes is not None and time.monotonic() - self.saved_at >= 60 * self.every_minutes
        )
        # clocks differ across ranks: rank 0 decides, or the ranks would wait for each other forever
        return bool(trainer.strategy.broadcast(epochs or minutes))

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # optimizers, loops and all
        self.saved_step, self.saved_at = trainer.global_step, time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the step test: Lightning replays the end hooks of the epoch it resumes at when max_steps is set
        if trainer.global_step != self.saved_step and self.due(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.saved_step:
            self.save(trainer)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        loader = trainer.train_dataloader
        generator = getattr(loader, "generator", None)  # a DataLoader's, when the data module gave one
        checkpoint[KEY] = {
            "identity": self.identity,
            "rng": random_state(),
            "loader_generator": generator.get_state() if generator is not None else None,
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.saved_step = checkpoint["global_step"]
        self.restored = checkpoint.get(KEY)
        if self.restored is None:
            log.warning(
                "%s holds no random state (an older asd wrote it): the resumed fit is not exact", self.path
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.restored is None:
            return
        state, self.restored = self.restored, None
        set_random_state(state["rng"])
        generator = getattr(trainer.train_dataloader, "generator", None)
        if generator is not None and state["loader_generator"] is not None:
            generator.set_state(state["loader_generator"])
        if trainer.fit_loop.is_resuming:
            # Lightning made this epoch's batch iterator in `setup_data`, before this hook, from the
            # loader's fresh generator, and will reuse it; the uninterrupted run made it here, after
            # the epoch started. Make it again from the restored generator (no public API does this).
            iter(trainer.fit_loop._data_fetcher)


# ---------------------------------------------------------------------- random state
def random_state() -> dict[str, Any]:
    """The global generators' states, as tensors and plain numbers (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "gauss": (has_gauss, gauss)},
        "python": {"version": version, "words": list(words), "gauss": gauss_next},
    }


def set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], *n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))


# ---------------------------------------------------------------------- resuming
def resumable(path: Path, identity: dict[str, Any]) -> Path | None:
    """`path` when a fit can resume from it; None (with a warning) when there is none.

    A checkpoint that cannot be read, or that another configuration wrote, is one AsdError.
    """
    if not path.exists():
        log.warning("resume=true but %s does not exist: training from the start", path)
        return None
    try:  # mmap: reads the structure, not every tensor
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        raise AsdError(
            f"{path}: not a readable checkpoint ({str(e).splitlines()[0]}); delete it to train from the "
            "start, or run without resume=true"
        ) from None
    theirs = ckpt.get(KEY, {}).get("identity") if isinstance(ckpt, dict) else None
    if theirs is not None and _differences(theirs, identity):
        raise AsdError(
            f"{path} was written by a fit with other {', '.join(_differences(theirs, identity))}: "
            "resume it with the overrides it was started with, or use a new run_dir"
        )
    log.info("stage fit: resuming from %s (%s)", path, describe(ckpt))
    return path


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    return [k for k in ours if theirs.get(k) != ours[k]]


def describe(ckpt: dict[str, Any]) -> str:
    """Where a Lightning checkpoint stands: "the end of epoch 3 (step 40)"."""
    done = ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
    return f"the end of epoch {done - 1} (step {ckpt['global_step']})" if done else "no finished epoch"


def interrupted_message(path: Path, run_dir: Path, why: str) -> str:
    """What the user reads after an interruption: which checkpoint is kept, and how to continue."""
    try:
        where = describe(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        kept = f"{path} holds {where}"
    except Exception:  # none yet: the command below starts over
        kept = f"no checkpoint was written yet ({path})"
    return f"training interrupted ({why}); {kept}. Continue with: {resume_command(run_dir)}"


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: this one's overrides, the run folder, resume=true."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        pass
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("run_dir", "resume")]
    folder = str(run_dir) if re.fullmatch(r"[\w/.:@%+-]+", str(run_dir)) else f"'{run_dir}'"
    args = ["python", "train.py", *kept, f"run_dir={folder}", "resume=true"]
    return " ".join(_shell(a) for a in args)


def _shell(arg: str) -> str:
    """`arg` quoted for a POSIX shell, in the README's style ("k='v, w'") where that suffices."""
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    return f'"{arg}"' if not re.search(r'["$`\\!]', arg) else shlex.quote(arg)


class _DropInterruptNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in str(record.msg)


@contextmanager
def own_interrupt_message() -> Iterator[None]:
    """Silence Lightning's Ctrl-C notice: the fit stage says what happened, and what to do."""
    # the logger Lightning's rank_zero_info writes to: the last of these two modules imported
    names = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
    loggers = [logging.getLogger(n) for n in names]
    quiet = _DropInterruptNotice()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)
