"""`train(cfg)`: set the run up, then run its stages in order (see `asd.run.stages`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as L
from omegaconf import DictConfig, OmegaConf

from asd.config import validate
from asd.fileio import write_text_atomic
from asd.run.build import (
    build_datamodule,
    build_ensemble,
    check_final,
    data_facts,
    resolve_run_dir,
    signature,
)
from asd.run.calibrate import anomaly_settings
from asd.run.distributed import barrier, is_rank_zero
from asd.run.stages import RunState, StageLog, is_wandb, make_stages

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> RunState:
    """Check the config, seed, make the run folder, index the data, build the ensemble."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = resolve_run_dir(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        # the settings this run now holds, resolved (the run folder's name and time included), so
        # `tools/score.py` reads exactly what ran; it replaces the unresolved copy Hydra writes
        write_text_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    facts = data_facts(dm)
    ensemble = build_ensemble(cfg, facts)
    check_final(ensemble, cfg)
    anomaly_settings(cfg, dm.audio.sample_rate)  # a typo fails now, not after training
    return RunState(cfg=cfg, run_dir=run_dir, dm=dm, ensemble=ensemble, signature=signature(cfg, facts))


def train(cfg: DictConfig) -> Path:
    """Run (or finish) the whole job described by `cfg`; return the run folder."""
    run = prepare(cfg)
    stages = make_stages()
    order = [s.name for s in stages]
    record = StageLog(run.run_dir)
    redo = False  # once a stage is redone, every later one is too
    for stage in stages:
        why = stage.skip_reason(run)
        if why:
            log.warning("stage %s: skipped: %s", stage.name, why)
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
        stage.compute(run)
        if is_rank_zero():
            stage.write(run)
            record.mark(stage.name, settings)
        barrier()
    if run.trainer is not None and is_wandb(run.trainer.logger) and is_rank_zero():
        import wandb

        wandb.finish()  # flush now, so the run folder stays the last line printed
    return run.run_dir
