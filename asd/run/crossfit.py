"""Cross-fitting: a score for every training normal from members that never trained on it.

A held-out split fits score normalisation, the fusions and the thresholds on the few clips the
members did not learn from: 10 % of each (machine, section, domain) group, which on a first-shot
machine of 8 source + 2 target clips is one clip of each domain, while the members lose those
clips. With cross-fitting (`crossfit.folds` = k, on for runs of at most `crossfit.max_clips`
training clips) nothing is held out: the run's members train on every training normal, and k more
copies of the ensemble are trained, each on every training normal but one fold. Each copy fits its
scoring backends on its own training clips and scores the fold it left out and that fold's
pseudo-anomalies, so the calibrate stage sees out-of-fold scores of every training normal (and of
pseudo-anomalies made from them) instead of scores of the hold-out. A test clip's fused columns
are then the mean of the copies' scores (`load_copies`, `asd.run.predict.predict`): the scale
the calibration was fitted on (docs/architecture.md, "Cross-fitting").

Folds are drawn per (machine, section, domain) group, round robin over a seeded order that
continues from group to group, so every fold holds clips of most groups and a group of 2 target
clips lands in 2 folds. The copies train like the run's fit (same members, budget and
trainer settings; seeds `seed + 1 .. seed + k`), without logger or checkpoints; references the
fusions do not read are left out of them. Measured in docs/results.md ("Cross-fitting").
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from copy import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from asd.anomalies import PseudoAnomalyDataset
from asd.data.datamodule import AsdDataModule, ClipDataset, join_rows
from asd.data.table import ClipTable
from asd.ensemble import Ensemble
from asd.errors import AsdError
from asd.members import REFERENCES
from asd.run.build import (
    build_ensemble,
    build_trainer,
    data_facts,
    fused_members,
    hardware,
    plain,
    resolve_trainer,
    with_budget,
)

log = logging.getLogger(__name__)


def crossfit_folds(cfg: DictConfig, train: ClipTable) -> tuple[int, str]:
    """(k, why): the folds this run cross-fits its training clips `train` with (0: a held-out
    split instead), and the reason."""
    node = plain(cfg.get("crossfit")) or {}
    folds, most, n = int(node.get("folds", 0)), node.get("max_clips"), len(train)
    if folds < 2:
        return 0, "crossfit.folds=0"
    if most is not None and n > int(most):
        return 0, f"{n} training clips > crossfit.max_clips={most}: a held-out split instead"
    strategy = resolve_trainer(plain(cfg.trainer), *hardware()).strategy
    if strategy != "auto":
        return 0, f"trainer strategy {strategy}: the copies train in one process (a held-out split instead)"
    if n < folds:
        return 0, f"{n} training clips, fewer than crossfit.folds={folds}: a held-out split instead"
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for c in train:
        counts[(c.machine, c.section)] += 1
    lone = sorted(f"{m}/section_{s}" for (m, s), k in counts.items() if k < 2)
    if lone:
        # the copy that leaves such a clip out has nothing of its section to score with
        return 0, f"{', '.join(lone)} hold a single training clip: a held-out split instead"
    return folds, f"{folds} folds of the {n} training normals"


def training_clips(dm: AsdDataModule) -> ClipTable:
    """Every training clip of a set-up data module, held out or not."""
    return ClipTable([*dm.tables["fit"], *dm.tables["val"]])


def assign_folds(table: ClipTable, folds: int, seed: int) -> np.ndarray:
    """(N,) fold id of every clip: per (machine, section, domain) group, round robin over a seeded
    order, the count continuing from one group to the next so folds stay the same size."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, c in enumerate(table):
        groups[(c.machine, c.section, c.domain)].append(i)
    rng = np.random.default_rng(seed)
    out = np.full(len(table), -1, dtype=np.int64)
    turn = 0
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda i: table[i].path)
        for i in rng.permutation(len(rows)):
            out[rows[i]] = turn % folds
            turn += 1
    return out


def subset(dataset: ClipDataset, rows: np.ndarray) -> ClipDataset:
    """The clips `rows` of a ClipDataset (their cached features too), indexed 0..len-1."""
    return join_rows([(dataset, [int(r) for r in rows])])


class _Reindexed(Dataset):
    """Items `rows` of a dataset of batch dicts, with `index` 0..len-1 (what `infer` gathers by)."""

    def __init__(self, dataset: Dataset, rows: np.ndarray):
        self.dataset, self.rows = dataset, [int(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        item = dict(self.dataset[self.rows[j]])
        item["index"] = torch.tensor(j, dtype=torch.long)
        return item


@contextmanager
def _quiet(
    names: tuple[str, ...] = ("asd.branches", "asd.run.build", "asd.run.stages", "asd.data"),
) -> Iterator[None]:
    """Info lines of building and training a copy (the run's own fit said them once): warnings only."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def fold_config(cfg: DictConfig, columns: list[str]) -> DictConfig:
    """The run's settings for a fold's copy: only the references the fused `columns` come from
    (`freeze` and `ckpt` no longer name the others), no model summary."""
    refs = [r for r in REFERENCES if any(c.startswith(f"{r}_") for c in columns)]
    dropped = set(REFERENCES) - set(refs)
    out = OmegaConf.merge(cfg, {"reference": refs or False, "trainer": {"enable_model_summary": False}})
    freeze = plain(cfg.get("freeze")) or []
    freeze = [freeze] if isinstance(freeze, str) else list(freeze)
    out.freeze = [n for n in freeze if n not in dropped]
    out.ckpt = {k: v for k, v in (plain(cfg.get("ckpt")) or {}).items() if k not in dropped and v is not None}
    return out


def cross_fit(
    cfg: DictConfig,
    dm: AsdDataModule,
    columns: list[str],
    fake: PseudoAnomalyDataset | None,
    device: torch.device,
    folds: int,
    run_dir: Path,
    own: Ensemble,
) -> dict[str, Any]:
    """Train `folds` copies of the ensemble, each without one fold; the out-of-fold raw scores.

    `columns` are the fused score columns; `own` the run's ensemble, whose frozen members every
    copy shares (`share_frozen`); `fake` the pseudo-anomalies of `dm`'s training clips
    (copy j of clip i is item i * copies + j) or None without fusions. Returns the `crossfit.pt`
    content: `reference_scores` (column -> (N,) of every training clip of `dm.datasets["fit"]`),
    `fake_scores` (column -> (N * copies,), or None), `fold` (N,), `folds`, and `copies` (each
    copy's weights and fitted backend states, for `load_copies`).
    """
    from asd.run.calibrate import fit_member_backends, run_infer
    from asd.run.predict import member_scores

    train = dm.datasets["fit"]
    fold = assign_folds(train.table, folds, int(cfg.seed))
    facts = data_facts(dm)
    scores = {c: np.full(len(train), np.nan, dtype=np.float32) for c in columns}
    fake_scores = None
    if fake is not None:
        fake_scores = {c: np.full(len(fake), np.nan, dtype=np.float32) for c in columns}
        fake_clip = np.arange(len(fake)) // fake.copies
    base = fold_config(cfg, columns)
    copies: list[dict[str, Any]] = []
    for f in range(folds):
        start = time.perf_counter()
        held = np.flatnonzero(fold == f)
        kept = np.flatnonzero(fold != f)
        if not len(held):
            continue
        L.seed_everything(int(cfg.seed) + 1 + f, workers=True, verbose=False)
        fold_dm = copy(dm)  # the same loaders and settings over other splits (setup is done)
        # no validation, like the run's own fit (nothing held out)
        fold_dm.datasets = {**dm.datasets, "fit": subset(train, kept), "val": subset(train, held[:0])}
        fold_dm.tables = {**dm.tables, "fit": fold_dm.datasets["fit"].table, "val": ClipTable([])}
        with _quiet():
            ensemble = share_frozen(build_ensemble(base, facts), own)
            fold_dm.check_batch = ensemble.check_ids
            if ensemble.trainable:
                trainer = build_trainer(with_budget(base, fold_dm), run_dir, logger=False, checkpoints=False)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                    warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
                    trainer.fit(ensemble, datamodule=fold_dm)
        ensemble.to(device).eval()
        fit_member_backends(ensemble, fold_dm, fold_dm.datasets["fit"], device)

        def score(dataset: Dataset, what: str, e=ensemble, dm=fold_dm, f=f) -> dict[str, np.ndarray]:
            name = f"fold {f + 1}/{folds} {what}"
            return run_infer(lambda b: member_scores(e, b), dm, dataset, device, name, check=e.check_ids)

        raw = score(subset(train, held), "left-out normals")
        for c in columns:
            scores[c][held] = raw[c]
        copies.append(
            {
                # frozen members are the run's own (`share_frozen`): not kept k times
                "state_dict": {
                    k: v.detach().cpu() if torch.is_tensor(v) else v
                    for k, v in ensemble.state_dict().items()
                    if not _frozen_key(k, ensemble.frozen)
                },
                "backends": {n: m.backend_state() for n, m in ensemble.members.items() if m.needs_backend},
            }
        )
        if fake is not None:
            rows = np.flatnonzero(np.isin(fake_clip, held))
            raw = score(_Reindexed(fake, rows), "pseudo-anomalies")
            for c in columns:
                fake_scores[c][rows] = raw[c]
        log.info(
            "crossfit: fold %d/%d: trained on %d clips, scored %d left out%s: done in %.1f s",
            f + 1,
            folds,
            len(kept),
            len(held),
            f" and {len(rows)} pseudo-anomalies" if fake is not None else "",
            time.perf_counter() - start,
        )
        del ensemble, fold_dm
        gc.collect()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if any(np.isnan(v).any() for v in scores.values()):
        raise AsdError("internal: cross-fitting left a training clip without an out-of-fold score")
    return {
        "reference_scores": {c: torch.from_numpy(v) for c, v in scores.items()},
        "fake_scores": None
        if fake_scores is None
        else {c: torch.from_numpy(v) for c, v in fake_scores.items()},
        "fold": torch.from_numpy(fold),
        "folds": folds,
        "copies": copies,
    }


def _frozen_key(key: str, frozen: list[str]) -> bool:
    """Whether an ensemble state key belongs to a frozen member."""
    return any(key.startswith(f"members.{n}.") for n in frozen)


def share_frozen(copy: Ensemble, own: Ensemble) -> Ensemble:
    """`copy` with the weights of `own`'s frozen members (a frozen member built from scratch is a
    random draw: every copy must score with the run's)."""
    for name in copy.frozen:
        copy.members[name].load_state_dict(own.members[name].state_dict())
    return copy


def load_copies(
    cfg: DictConfig, facts: dict[str, Any], crossfit: dict[str, Any], columns: list[str], own: Ensemble
) -> list[Ensemble]:
    """The k trained copies of a cross-fitted run (weights and fitted backends), in eval mode.

    A test clip's fused columns are the mean of their scores (`asd.run.predict.predict`): the
    calibration was fitted on scores of such copies, each of a clip it never trained on, so a
    test clip is scored on that scale and not on the run's own members', which trained on every
    clip and would score an unseen normal lower than the calibration expects.
    """
    out = []
    with _quiet():
        for copy_state in crossfit["copies"]:
            ensemble = share_frozen(build_ensemble(fold_config(cfg, columns), facts), own)
            missing, unexpected = ensemble.load_state_dict(copy_state["state_dict"], strict=False)
            if unexpected or any(not _frozen_key(k, ensemble.frozen) for k in missing):
                raise AsdError("crossfit.pt does not belong to these members; delete it to cross-fit again")
            for name, state in copy_state["backends"].items():
                ensemble.members[name].load_backend_state(state)
            out.append(ensemble.eval())
    return out


def run_copies(run: Any) -> list[Ensemble]:
    """A cross-fitted run's copies, built once and kept on the run (`asd.run.stages.RunState`, not
    imported: it imports this module); none without cross-fitting."""
    if run.crossfit is None:
        return []
    if run.copies is None:
        run.copies = load_copies(
            run.cfg, data_facts(run.dm), run.crossfit, fused_members(run.ensemble), run.ensemble
        )
    return run.copies
