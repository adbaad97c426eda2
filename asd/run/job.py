"""`train(cfg)`: set the run up, then run its stages in order (see `asd.run.stages`).

One process at a time runs in a run folder: `run_lock` holds `run.lock` there for the whole run
(train.py takes it before Hydra writes into the folder) and refuses a second process, naming the
one that holds it. A write that fails on a full, read-only or forbidden disk ends in one AsdError
that names the file (`asd.errors.disk_fault`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as L
from omegaconf import DictConfig, OmegaConf

from asd.config import validate
from asd.data.datamodule import AsdDataModule
from asd.errors import AsdError, disk_fault
from asd.features import logmel_frontends
from asd.fileio import write_text_atomic
from asd.members import check_members, is_image_data
from asd.run.build import (
    build_datamodule,
    build_ensemble,
    check_final,
    data_facts,
    resolve_run_dir,
    signature,
)
from asd.run.calibrate import anomaly_generator
from asd.run.crossfit import crossfit_folds, training_clips
from asd.run.distributed import barrier, is_rank_zero
from asd.run.stages import RunState, StageLog, is_wandb, make_stages

log = logging.getLogger(__name__)

LOCK = "run.lock"
#: run folders whose lock this process holds, and the lock file's descriptor
_held: dict[Path, int] = {}


def launches_the_run() -> bool:
    """Whether this process is the run's rank 0, not a DDP rank that Lightning or torchrun started."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold `<run_dir>/run.lock` for the block; an AsdError naming the holder when another process has it.

    `fcntl.flock` on an open descriptor: the kernel releases it when the process ends, however it
    ends, so a killed run leaves no stale lock. Re-entrant within a process; the other DDP ranks
    work in their launcher's folder under its lock.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or not launches_the_run():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "its pid not written yet"
        os.close(fd)
        raise AsdError(
            f"run folder {run_dir} is in use by another train.py ({holder}); wait until it ends, or pass "
            "another run_dir="
        ) from None
    me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{me}\n".encode(), 0)
    _held[run_dir] = fd
    try:
        yield
    finally:
        del _held[run_dir]
        os.close(fd)


@contextmanager
def disk_faults(run_dir: Path) -> Iterator[None]:
    """A write failing on a full, read-only or forbidden disk ends in one AsdError naming the file."""
    try:
        yield
    except AsdError:
        raise
    except Exception as e:
        fault = disk_fault(e, run_dir, "pass another run_dir=")
        if fault is None:
            raise
        raise fault from e


def split_datamodule(cfg: DictConfig) -> AsdDataModule:
    """The run's data module, set up and split as the run trains on it: a held-out split, or every
    training clip when it cross-fits (`crossfit_folds`; when off, the crossfit stage says why)."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    folds, _ = crossfit_folds(cfg, training_clips(dm))
    if folds:
        dm.merge_holdout(folds)
    return dm


def prepare(cfg: DictConfig) -> RunState:
    """Seed, make the run folder, index the data, build the ensemble."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = resolve_run_dir(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        # the settings this run now holds, resolved (the run folder's name and time included), so
        # `tools/score.py` reads exactly what ran; it replaces the unresolved copy Hydra writes
        write_text_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("threshold") == "midpoint" and is_image_data(cfg):
        raise AsdError(
            "threshold=midpoint with data=images: labelled anomalous validation pictures are not read yet "
            "(validation_anomalies takes WAV files); use threshold=normal (the default) or threshold=gamma"
        )
    dm = split_datamodule(cfg)
    facts = data_facts(dm)
    ensemble = build_ensemble(cfg, facts)
    dm.cache_features(logmel_frontends(ensemble.members.values()))  # each clip's log-mel, computed once
    dm.check_batch = ensemble.check_ids  # class ids checked before a batch moves to the device
    check_final(ensemble, cfg)
    anomaly_generator(cfg, dm)  # a typo fails now, not after training
    return RunState(cfg=cfg, run_dir=run_dir, dm=dm, ensemble=ensemble, signature=signature(cfg, facts))


def memory_note() -> str:
    """The memory so far, for a stage's log line (Linux /proc/self/status; elsewhere "").

    As "; memory: peak RSS 2.50 GiB so far, 2.33 GiB anonymous now". Logged when a stage ends, so a
    run's log shows in which stage the peak was reached and what stayed; the peak counts resident
    pages of mapped files, anonymous memory is what has to fit. This process only: DataLoader
    workers (`data.num_workers`) have their own.
    """
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return ""
    kb = {
        k: int(v.split()[0])
        for k, _, v in (line.partition(":") for line in lines)
        if k in ("VmHWM", "RssAnon")
    }
    if len(kb) < 2:
        return ""
    peak, anonymous = kb["VmHWM"] / 2**20, kb["RssAnon"] / 2**20
    return f"; memory: peak RSS {peak:.2f} GiB so far, {anonymous:.2f} GiB anonymous now"


def train(cfg: DictConfig) -> Path:
    """Run (or finish) the whole job described by `cfg`; return the run folder."""
    start = time.perf_counter()
    validate(cfg)
    check_members(cfg)
    run_dir = resolve_run_dir(cfg).resolve()
    with disk_faults(run_dir), run_lock(run_dir):
        run = prepare(cfg)
        log.info(
            "prepare: settings checked, data generated/indexed/decoded, members built: done in %.1f s%s",
            time.perf_counter() - start,
            memory_note(),
        )
        return run_stages(run)


def run_stages(run: RunState) -> Path:
    """Each stage in order: skipped when finished with the same settings, else computed and written."""
    stages = make_stages()
    order = [s.name for s in stages]
    record = StageLog(run.run_dir)
    redo = False  # once a stage is redone, every later one is too
    for stage in stages:
        why = stage.skip_reason(run)
        if why:
            (log.info if stage.optional else log.warning)("stage %s: skipped: %s", stage.name, why)
            continue
        settings = stage.settings(run)
        status = "todo" if redo else record.status(stage, settings, run)
        if status == "finished":
            log.info("stage %s: skipped (finished earlier in %s)", stage.name, run.run_dir)
            stage.load(run)
            continue
        if status == "changed":
            log.info(
                "stage %s: its settings changed since the last run: redoing it and what follows", stage.name
            )
        redo = True
        record.forget_from(stage.name, order)
        start = time.perf_counter()
        stage.compute(run)
        if is_rank_zero():
            stage.write(run)
            record.mark(stage.name, settings)
        barrier()
        log.info("stage %s: done in %.1f s%s", stage.name, time.perf_counter() - start, memory_note())
    if run.trainer is not None and is_wandb(run.trainer.logger) and is_rank_zero():
        import wandb

        wandb.finish()  # flush now, so the run folder stays the last line printed
    return run.run_dir
