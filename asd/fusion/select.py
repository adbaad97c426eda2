"""Choosing the final score without test labels (`final=auto`): cross-fitted normals vs pseudo-anomalies.

A learned fusion is judged on clips it was not fitted on. The reference normals (and the
pseudo-anomalies made from each) are split into `folds` by source clip; for each fold the
attention head and the meta-learner are fitted on the other folds and score this one. The
normals are scored with left-out z-scores (statistics without the clip itself), the
pseudo-anomalies with the z-scores the fusion sees. Label-free fusions and single members need no
fitting on these clips, so their scores are used as they are. With `fusion.select.split=kind`
each fit also leaves out a group of pseudo-anomaly kinds and is judged only on those (`kind_plan`),
so no learned fusion is judged on a kind of anomaly it was fitted on; every candidate is judged on
the same rows (docs/results.md: no measurable gain on the digits).

`zweighted` is fitted on these rows too, with one number per member: by default each member's own
criterion below (`member_criteria`), made a weight by `criterion_weights`; with
`fusion.weighted.rule=discriminant` all members together (`discriminant_weights`); the fused
reference columns then hold at least `fusion.weighted.reference_share` of the weight
(`anchored_weights`). It is judged like the learned fusions, with weights from the other folds
(`cross_fitted_weighted`), and stays a candidate where a group has too few normals for meta and
attention.

Each candidate's criterion is the official-score rule applied to this labelled set: per section,
the AUC and the pAUC (FPR <= 0.1) of its normals against its pseudo-anomalies, then the harmonic
mean of all of them. The candidate with the highest criterion decides; a tie goes to the one
listed first in `fusion.select.candidates` (the learned fusions first by default). Candidates are
fusions only: the final score is always an ensemble's. It is a proxy: pseudo-anomalies are not
the machine's real faults, so the run's summary prints the whole table beside the choice.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import Tensor

from asd.choices import CRITERION_MEASURES, FUSIONS, WEIGHT_RULES, WEIGHTED
from asd.errors import AsdError
from asd.evaluation.metrics import auc_pauc, hmean
from asd.fusion.stage import apply_fusion, fit_fusion
from asd.scoring import fuse, fuse_weighted

log = logging.getLogger(__name__)

LEARNED = ("meta", "attention")


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """A fold id (0..folds-1) for each of n source clips, balanced, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % folds
    return out


#: one fit of a cross-fitting plan: the rows it is fitted on and the rows it scores, (N,) bool each
Fit = tuple[Tensor, Tensor]


def source_plan(n_normal: int, source: Tensor, folds: int, seed: int) -> list[Fit]:
    """`fusion.select.split=source`: `folds` fits, each leaving out one fold of the normals and every
    row made from them, and scoring those rows (every row is scored once)."""
    folds = min(folds, n_normal)
    if folds < 2:
        raise AsdError(f"cross-fitting the learned fusions needs 2 or more normals, found {n_normal}")
    fold = torch.as_tensor(fold_of(n_normal, folds, seed))[source]  # (N,) the source clip's fold
    return [(fold != f, fold == f) for f in range(folds)]


def kind_plan(n_normal: int, source: Tensor, kind: Tensor, folds: int, seed: int) -> list[Fit] | None:
    """`fusion.select.split=kind`: fit g also leaves out every pseudo-anomaly of kind group g, and
    scores fold g's normals and only those of fold g's pseudo-anomalies whose kind is in group g. A
    learned fusion is so judged only on anomaly kinds it never saw, as it will be on a machine's real
    faults (the label-free fusions are judged on the same rows). `kind` (N,): each row's kind id, -1
    for normals and unchanged copies. None with fewer than 2 kinds: nothing to leave out."""
    present = sorted(int(k) for k in torch.unique(kind[n_normal:]) if int(k) >= 0)
    fits = min(folds, len(present), n_normal)
    if fits < 2:
        return None
    group = torch.full((int(kind.max()) + 2,), -1, dtype=torch.long)  # kind id + 1 -> its group
    for i, k in enumerate(present):
        group[k + 1] = i % fits
    fold = torch.as_tensor(fold_of(n_normal, fits, seed))[source]  # (N,) the source clip's fold
    kind_group = group[kind + 1]  # (N,) -1 for normals and unchanged copies
    is_normal = torch.arange(len(kind)) < n_normal
    return [
        ((fold != g) & (kind_group != g), (fold == g) & (is_normal | (kind_group == g))) for g in range(fits)
    ]


def cross_fitted_learned(
    z: Tensor,
    normal_loo: Tensor,
    context: dict[str, Tensor],
    y: Tensor,
    plan: list[Fit],
    *,
    members: list[str],
    num_machines: int,
    num_sections: int,
    cfg: dict[str, Any],
) -> dict[str, np.ndarray]:
    """`attention` and `meta` scores of the rows each fit of `plan` scores, from a fit on its other
    rows (NaN for rows no fit scores).

    Args:
        z: (N, M) z-scores the fusions train on: the normals' rows first, then their pseudo-anomalies.
        normal_loo: (n_normal, M) the normals' left-out z-scores, what a normal is scored with.
        context: `machine`, `section`, `domain` (N,) of every row.
        y: (N,) 0 normal, 1 pseudo-anomaly.
        plan: `source_plan` or `kind_plan`.
    """
    query = z.clone()
    query[: len(normal_loo)] = normal_loo
    out = {m: np.full(len(z), np.nan) for m in LEARNED}
    quiet = logging.getLogger("asd.fusion")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # k fits would repeat the full fit's progress lines
    try:
        for train, held in plan:
            state = fit_fusion(
                z[train],
                *(context[k][train] for k in ("machine", "section", "domain")),
                y[train],
                members=members,
                num_machines=num_machines,
                num_sections=num_sections,
                cfg=cfg,
            )
            scored = apply_fusion(
                state, query[held], *(context[k][held] for k in ("machine", "section", "domain"))
            )
            for m in LEARNED:
                out[m][held.numpy()] = scored[m].double().numpy()
    finally:
        quiet.setLevel(level)
    return out


def criterion(scores: np.ndarray, y: np.ndarray, section: np.ndarray, measure: str = "official") -> float:
    """Harmonic mean of every section's AUC and pAUC (max FPR 0.1), normals vs pseudo-anomalies;
    `measure="auc"`: of the AUCs alone (`fusion.weighted.measure`)."""
    if measure not in CRITERION_MEASURES:
        raise AsdError(
            f"fusion.weighted.measure={measure!r}: expected one of {', '.join(map(repr, CRITERION_MEASURES))}"
        )
    values = []
    for s in np.unique(section):
        rows = section == s
        if len(np.unique(y[rows])) == 2:
            auc, pauc = auc_pauc(y[rows], scores[rows])
            values.extend([auc, pauc] if measure == "official" else [auc])
    if not values:
        raise AsdError("no section has both normals and pseudo-anomalies to judge the final score on")
    return hmean(values)


def member_criteria(
    rows: Tensor, y: np.ndarray, section: np.ndarray, measure: str = "official"
) -> np.ndarray:
    """`criterion` of each member's own column of `rows` (N, M): how well it alone separates the
    normals (left-out z-scores) from the pseudo-anomalies, (M,) float64."""
    scores = rows.double().numpy()
    return np.array([criterion(scores[:, m], y, section, measure) for m in range(scores.shape[1])])


def criterion_weights(criteria: np.ndarray, power: float) -> np.ndarray:
    """`zweighted`'s member weights (M,): (criterion - 0.5) ** power where a member separates
    better than chance, 0 where it does not; equal weights when none does (then `zweighted` is
    `zmean`). A member at chance on pseudo-anomalies was near chance on real faults too
    (docs/results.md, "Weighting the members"), and `zmean` lets it dilute the rest."""
    w = np.clip(np.asarray(criteria, dtype=np.float64) - 0.5, 0.0, None) ** float(power)
    return w if w.sum() > 0 else np.ones_like(w)


def discriminant_weights(rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str]:
    """`zweighted`'s member weights under `fusion.weighted.rule=discriminant` (M,), and a note
    (empty, or why the weights are equal).

    The weights are the linear discriminant of the normals' and the pseudo-anomalies' z-scores
    (scikit-learn's `LinearDiscriminantAnalysis`, least squares with Ledoit-Wolf shrinkage of the
    within-class covariance), negative coefficients set to 0, scaled to sum to 1. Unlike one
    criterion per member, it weighs the members together: a member that repeats another adds
    little the other does not already carry, so the two get about one weight between them (in
    some recorded runs the repeating group got none at all). On a few clips the reconstruction
    members' errors are the log-mel minus a near-constant reconstruction, so b2, b6 and b7 repeat
    the clip statistics' column (`stats_mahalanobis` with their error profile, a correlation of
    0.98-1.00; `stats_temporal` with the default `score_mode=temporal`; docs/results.md, "Members
    that repeat each other"). Equal weights (`zweighted` is then `zmean`) where a class has fewer
    than 2 rows or no member gets a positive coefficient.
    """
    rows, y = np.asarray(rows, dtype=np.float64), np.asarray(y)
    equal = np.ones(rows.shape[1])
    counts = [int((y == c).sum()) for c in (0, 1)]
    if min(counts) < 2:
        return equal, f"{counts[0]} normal and {counts[1]} pseudo-anomalous rows: equal weights"
    coef = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(rows, y).coef_[0]
    if not np.isfinite(coef).all():
        return equal, "the discriminant's coefficients are not finite: equal weights"
    w = np.clip(coef, 0.0, None)
    if w.sum() <= 0:
        return equal, "no member's discriminant coefficient is positive: equal weights"
    return w / w.sum(), ""


def anchored_weights(weights: np.ndarray, reference: np.ndarray | None, share: float | None) -> np.ndarray:
    """`weights` (M,) with the fused reference columns' (`reference`, a boolean mask) total raised to
    at least `share` of the sum (`fusion.weighted.reference_share`), the members' scaled down to the
    rest in their own proportions; unchanged where `share` or `reference` is None, no reference is
    fused, or the references hold that share already. References without weight of their own share it equally.

    Why a floor: the weights come from pseudo-anomalies, which the reconstruction members (b2, b6,
    b7) hear better than real faults, so they get as much weight as the reference though they are
    far weaker on test clips. The reference has no trained parameters to overfit the few training
    clips, and in every configuration measured the fusion lost to it alone, each added member
    lowering the score (docs/results.md, "The reference's share of `zweighted`").
    """
    w = np.asarray(weights, dtype=np.float64)
    if share is None or reference is None or not np.any(reference):
        return w
    reference = np.asarray(reference, dtype=bool)
    total = w.sum()
    held = w[reference].sum()
    if held >= share * total:
        return w
    out = np.empty_like(w)  # the members hold more than 1 - share > 0 of it here, so `rest` > 0
    out[reference] = share * (w[reference] / held if held > 0 else 1.0 / reference.sum())
    out[~reference] = (1.0 - share) * w[~reference] / (total - held)
    return out * total


def member_weights(
    rows: Tensor | np.ndarray,
    y: np.ndarray,
    section: np.ndarray,
    power: float,
    rule: str = "criterion",
    measure: str = "official",
    reference: np.ndarray | None = None,
    share: float | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(criteria (M,), weights (M,), note): each member's `member_criteria` (by `measure`) and the
    `zweighted` weights `rule` makes (`criterion_weights` of the criteria, or `discriminant_weights`),
    with the reference columns (mask `reference`) given at least `share` of them (`anchored_weights`)."""
    if rule not in WEIGHT_RULES:
        raise AsdError(f"fusion.weighted.rule={rule!r}: expected one of {', '.join(map(repr, WEIGHT_RULES))}")
    rows = torch.as_tensor(rows)
    criteria = member_criteria(rows, y, section, measure)
    if rule == "criterion":
        weights, note = criterion_weights(criteria, power), ""
    else:
        weights, note = discriminant_weights(rows.double().numpy(), y)
    return criteria, anchored_weights(weights, reference, share), note


def cross_fitted_weighted(
    rows: Tensor,
    y: np.ndarray,
    section: np.ndarray,
    plan: list[Fit],
    power: float,
    rule: str = "criterion",
    measure: str = "official",
    reference: np.ndarray | None = None,
    share: float | None = None,
) -> np.ndarray:
    """`zweighted` scores of the rows each fit of `plan` scores, with weights from that fit's other
    rows only (NaN for rows no fit scores): it is judged like the learned fusions, never on the rows
    its weights came from. `rows` (N, M): normals' left-out z-scores, then the pseudo-anomalies'.
    `reference` and `share` as in `member_weights`."""
    out = np.full(len(rows), np.nan)
    for train, held in plan:
        t = train.numpy()
        if len(np.unique(y[t])) < 2:  # a fit without both kinds of rows cannot weigh: equal weights
            weights = anchored_weights(np.ones(rows.shape[1]), reference, share)
        else:
            weights = member_weights(rows[train], y[t], section[t], power, rule, measure, reference, share)[1]
        out[held.numpy()] = fuse_weighted(rows[held].double(), torch.as_tensor(weights)).numpy()
    return out


def select(
    candidates: dict[str, np.ndarray], y: np.ndarray, section: np.ndarray
) -> tuple[str, dict[str, float]]:
    """The best candidate by `criterion` (ties: the first listed) and every candidate's criterion."""
    table = {name: criterion(s, y, section) for name, s in candidates.items()}
    best = max(table, key=lambda name: (table[name], -list(table).index(name)))
    return best, table


def candidate_scores(
    names: list[str], z: Tensor, normal_loo: Tensor, learned: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every candidate fusion's scores of all rows (normals: left-out; pseudo-anomalies: as fused).
    `learned` holds the cross-fitted ones (`cross_fitted_learned`, `cross_fitted_weighted`)."""
    rows = torch.cat([normal_loo, z[len(normal_loo) :]])  # (N, M)
    out = {}
    for name in names:
        if name in LEARNED or name == WEIGHTED:
            out[name] = learned[name]
        elif name in FUSIONS:
            out[name] = fuse(rows, name).double().numpy()
        else:
            raise AsdError(
                f"fusion.select.candidates: {name!r} is not one of {[*LEARNED, WEIGHTED, *FUSIONS]}"
            )
    return out
