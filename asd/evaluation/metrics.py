"""Official DCASE Task 2 metrics (2020-2025): AUC, pAUC, harmonic means and the official score.

Every AUC is sklearn's `roc_auc_score` (anomaly = positive class, ties count one half) and every
pAUC is `roc_auc_score(..., max_fpr=0.1)`, i.e. sklearn's McClish-standardised partial AUC
`0.5 * (1 + (A - 0.5 * p**2) / (p - 0.5 * p**2))` with `A` the area under the ROC curve for
FPR in [0, p]; a detector that ranks every anomaly below every normal gets 9/19, not 0. Harmonic
means clamp every value below at `sys.float_info.epsilon` first, so a zero AUC gives a tiny but
finite score. Only test clips count; every test clip needs a known label.

Per (machine, section) row, by year (`n_*` counts, `auc`/`pauc` over all of the section's clips
and, with decisions, `precision`/`recall`/`f1` are reported for every year):

- 2020 (`id_XX` = section): `auc`, `pauc` over the ID's test clips (domain ignored).
  Official score = arithmetic mean of all `auc` and `pauc` values over machines and IDs.
- 2021: per domain d in {source, target}, `auc_d` and `pauc_d` over d's normals and d's
  anomalies only. Official score = harmonic mean of all `auc_source`, `auc_target`,
  `pauc_source`, `pauc_target` values over machines and sections at once. `auc`/`pauc` over
  both domains are for information only.
- 2022-2025: `auc_d` = AUC of d's normals against ALL anomalies of the section (both
  domains); `pauc` over all clips of the section. Official score = harmonic mean of all
  `auc_source`, `auc_target` and `pauc` values over machines and sections at once - not
  per machine first: the organisers' evaluators (Kota-Dohi/dcase2022_evaluator,
  nttcslab/dcase2023_task2_evaluator, nttcslab/dcase2024_task2_evaluator) concatenate the
  source-AUC, target-AUC and pAUC columns of every machine and section and take one
  `scipy.stats.hmean` over that list. `pauc_source`/`pauc_target` (pAUC over that domain's
  normals and anomalies only, as the 2022-2024 baselines report them) are for information.

Decisions (1 = anomaly) give `precision`, `recall` and `f1` per domain over that domain's clips
(2021+, as the evaluators compute them) and over the whole section, with the evaluators'
guards: `tp / max(tp + fp, eps)`, `tp / max(tp + fn, eps)`, `2pr / max(p + r, eps)`. The same
counts give `tpr` (= recall) and `tnr` per section and domain; `decision_rates` is the one
formula for all four. A rate whose denominator is 0 is 0 (sklearn's `zero_division=0`; the
evaluators' eps guards give exactly that, since the numerator is then 0 too), so the counts
`tp`, `fp`, `tn`, `fn` go beside the rates: a 0 over no clips can be told from a real 0.
`decision_table` gives the rates per machine/section/domain and over every test clip.

One file: every official rule (per year) and the decision metrics at a threshold are computed
here once, so every table, CSV and tool reports the same numbers.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, roc_auc_score

from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.fileio import write_text_atomic

logger = logging.getLogger(__name__)

EPS = sys.float_info.epsilon
YEARS = (2020, 2021, 2022, 2023, 2024, 2025)

# the values each year's official score is a mean of
OFFICIAL_KEYS = {
    2020: ("auc", "pauc"),
    2021: ("auc_source", "auc_target", "pauc_source", "pauc_target"),
    **{y: ("auc_source", "auc_target", "pauc") for y in YEARS[2:]},
}
# the metric columns a year's tables show
TABLE_KEYS = {
    2020: ("auc", "pauc"),
    2021: ("auc_source", "auc_target", "pauc_source", "pauc_target"),
    **{y: ("auc_source", "auc_target", "pauc", "pauc_source", "pauc_target") for y in YEARS[2:]},
}
DECISION_KEYS = {
    2020: ("precision", "recall", "f1"),
    **{
        y: (
            "precision_source",
            "precision_target",
            "recall_source",
            "recall_target",
            "f1_source",
            "f1_target",
        )
        for y in YEARS[1:]
    },
}
TITLES = {
    "auc": "AUC",
    "pauc": "pAUC",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    **{f"{k}_{d}": f"{t} ({d})" for k, t in (("auc", "AUC"), ("pauc", "pAUC")) for d in ("source", "target")},
    **{
        f"{k}_{d}": f"{t} ({d})"
        for k, t in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
        for d in ("source", "target")
    },
}
NAN = float("nan")


def _as_labels(y_true: ArrayLike, what: str) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise AsdError(f"{what}: labels must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(int)
    if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
        raise AsdError(f"{what}: labels must be 0 (normal) or 1 (anomaly), got {sorted(set(y.tolist()))[:5]}")
    return y.astype(int)


def finite_scores(y_score: ArrayLike, what: str, flatten: bool = False) -> np.ndarray:
    """Scores as a 1-D float array (`flatten`: of any shape), or an AsdError naming `what`."""
    try:
        s = np.asarray(y_score, dtype=float)
    except (TypeError, ValueError) as e:
        raise AsdError(f"{what}: scores must be numbers ({e})") from None
    if flatten:
        s = s.ravel()
    if s.ndim != 1:
        raise AsdError(f"{what}: scores must be one-dimensional, got shape {s.shape}")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise AsdError(
            f"{what}: {bad.size} scores are NaN or infinite (first at position {bad[0]}); "
            "fix the scoring step so every clip gets a finite score"
        )
    return s


def _check_max_fpr(max_fpr: float) -> float:
    if not 0.0 < max_fpr <= 1.0:
        raise AsdError(f"max_fpr={max_fpr}: must lie in (0, 1]; the DCASE value is 0.1")
    return float(max_fpr)


def _auc_pauc(y: np.ndarray, s: np.ndarray, max_fpr: float, what: str) -> tuple[float, float]:
    n_anomaly = int(y.sum())
    n_normal = y.size - n_anomaly
    if n_anomaly == 0 or n_normal == 0:
        raise AsdError(
            f"{what}: AUC needs both normal and anomalous clips, found {n_normal} normal and "
            f"{n_anomaly} anomalous; evaluate on a test set with both labels in every group"
        )
    return float(roc_auc_score(y, s)), float(roc_auc_score(y, s, max_fpr=max_fpr))


def auc_pauc(y_true: ArrayLike, y_score: ArrayLike, max_fpr: float = 0.1) -> tuple[float, float]:
    """AUC and McClish-standardised pAUC (FPR up to `max_fpr`) of scores; `y_true` 1 = anomaly."""
    y = _as_labels(y_true, "auc_pauc")
    s = finite_scores(y_score, "auc_pauc")
    if y.size != s.size:
        raise AsdError(f"auc_pauc: {y.size} labels but {s.size} scores; give one score per label")
    return _auc_pauc(y, s, _check_max_fpr(max_fpr), "auc_pauc")


def hmean(values: ArrayLike) -> float:
    """Harmonic mean of values clamped below at machine epsilon, as the official evaluators."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise AsdError("hmean: no values to average")
    if np.isnan(v).any():
        raise AsdError(f"hmean: {int(np.isnan(v).sum())} of {v.size} values are NaN")
    return float(scipy.stats.hmean(np.maximum(v, EPS)))


def decision_counts(y_true: ArrayLike, decisions: ArrayLike) -> dict[str, int]:
    """`tp`, `fp`, `tn`, `fn` of 0/1 decisions against 0/1 labels (1 = anomaly, the positive class)."""
    y, d = np.asarray(y_true, dtype=int), np.asarray(decisions, dtype=int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, d, labels=[0, 1]).ravel())
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def decision_rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """TPR (recall), TNR, precision and F1 from counts; a rate over no clips is 0 (zero_division=0)."""

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else 0.0

    precision, tpr = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "tpr": tpr,
        "tnr": ratio(tn, tn + fp),
        "precision": precision,
        "f1": ratio(2.0 * precision * tpr, precision + tpr),
    }


def _prf(y: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 of decisions `d` against labels `y` (the evaluators' values)."""
    rates = decision_rates(**decision_counts(y, d))
    return rates["precision"], rates["tpr"], rates["f1"]


def decision_table(clips: Sequence[Clip] | ClipTable, decisions: ArrayLike) -> list[dict]:
    """Counts and rates of the decisions per (machine, section, domain), per (machine, section) with
    domain "all", and over every labelled test clip ("all", "all", "all"), in that order."""
    clips = list(clips)
    kept, _, d = labelled_test_clips(clips, np.zeros(len(clips)), decisions)
    y = np.array([0 if c.is_normal else 1 for c in kept])
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, c in enumerate(kept):
        groups.setdefault((c.machine, c.section, c.domain), []).append(i)
        groups.setdefault((c.machine, c.section, "all"), []).append(i)
    groups[("all", "all", "all")] = list(range(len(kept)))
    rows = []
    for (machine, section, domain), idx in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        counts = decision_counts(y[idx], d[idx])
        rows.append(
            {"machine": machine, "section": section, "domain": domain, **counts, **decision_rates(**counts)}
        )
    return rows


def labelled_test_clips(
    clips: Sequence[Clip] | ClipTable, scores: ArrayLike, decisions: ArrayLike | None = None
) -> tuple[list[Clip], np.ndarray, np.ndarray | None]:
    """Validate clips/scores/decisions and keep the labelled test clips (train clips are skipped, logged)."""
    clips = list(clips)
    try:
        s = np.asarray(scores, dtype=float)
    except (TypeError, ValueError) as e:
        raise AsdError(f"scores must be numbers ({e})") from None
    if s.shape != (len(clips),):
        raise AsdError(f"got {s.size} scores for {len(clips)} clips; give exactly one score per clip")
    bad = [c.path for c, v in zip(clips, s, strict=True) if not math.isfinite(v)]
    if bad:
        raise AsdError(f"{len(bad)} scores are NaN or infinite, first for {bad[0]}")
    d = None
    if decisions is not None:
        d = np.asarray(decisions)
        if d.shape != (len(clips),):
            raise AsdError(f"got decisions of shape {d.shape} for {len(clips)} clips; give one 0/1 per clip")
        wrong = [c.path for c, v in zip(clips, d.tolist(), strict=True) if v not in (0, 1)]
        if wrong:
            raise AsdError(f"{len(wrong)} decisions are not 0 or 1, first for {wrong[0]}")
        d = d.astype(int)
    keep = [i for i, c in enumerate(clips) if c.split == "test"]
    if len(keep) < len(clips):
        logger.warning("ignoring %d train-split clips: only test clips are evaluated", len(clips) - len(keep))
    if not keep:
        raise AsdError("no test-split clips to evaluate; pass the test clips of a labelled dataset")
    unknown = [clips[i].path for i in keep if clips[i].label == "unknown"]
    if unknown:
        raise AsdError(
            f"evaluation needs ground truth, but {len(unknown)} test clips have label 'unknown' "
            f"(first: {unknown[0]}); give labelled clips or the official ground-truth CSVs"
        )
    seen: dict[tuple[str, str, str], str] = {}
    for i in keep:
        c = clips[i]
        key = (c.machine, c.section, c.name)
        if key in seen:
            raise AsdError(
                f"clip {c.name} of {c.machine} section {c.section} appears twice "
                f"({seen[key]} and {c.path}); give each clip once"
            )
        seen[key] = c.path
    return [clips[i] for i in keep], s[keep], None if d is None else d[keep]


def _check_year(year: int) -> int:
    if year not in YEARS:
        raise AsdError(f"year={year}: expected one of {YEARS}")
    return int(year)


def _section_row(
    machine: str,
    section: str,
    clips: list[Clip],
    s: np.ndarray,
    d: np.ndarray | None,
    year: int,
    max_fpr: float,
) -> dict:
    """All metrics of one (machine, section) for `year`."""
    what = f"{machine} section {section}"
    y = np.array([0 if c.is_normal else 1 for c in clips])
    dom = np.array([c.domain for c in clips])
    src, tgt = dom == "source", dom == "target"
    row: dict = {"machine": machine, "section": section}
    row["auc"], row["pauc"] = _auc_pauc(y, s, max_fpr, what)
    row.update(auc_source=NAN, auc_target=NAN, pauc_source=NAN, pauc_target=NAN)
    if year >= 2021:
        for name, m in (("source", src), ("target", tgt)):
            if year == 2021:
                # official: this domain's normals against this domain's anomalies
                row[f"auc_{name}"], row[f"pauc_{name}"] = _auc_pauc(
                    y[m], s[m], max_fpr, f"{what} ({name} domain)"
                )
                continue
            # official: this domain's normals against every anomaly of the section
            both = m | (y == 1)
            row[f"auc_{name}"] = _auc_pauc(y[both], s[both], max_fpr, f"{what} ({name} normals)")[0]
            # informative only: a domain without anomalies of its own has no domain-wise pAUC
            if 0 < y[m].sum() < m.sum():
                row[f"pauc_{name}"] = _auc_pauc(y[m], s[m], max_fpr, what)[1]
            else:
                logger.info("%s: no %s-domain anomalies, pauc_%s left NaN", what, name, name)
    row.update(
        n_normal=int(np.sum(y == 0)),
        n_anomaly=int(np.sum(y == 1)),
        n_normal_source=int(np.sum(src & (y == 0))),
        n_anomaly_source=int(np.sum(src & (y == 1))),
        n_normal_target=int(np.sum(tgt & (y == 0))),
        n_anomaly_target=int(np.sum(tgt & (y == 1))),
    )
    if d is not None:
        row["precision"], row["recall"], row["f1"] = _prf(y, d)
        for name, m in (("source", src), ("target", tgt)):
            p, r, f = _prf(y[m], d[m]) if year >= 2021 else (NAN, NAN, NAN)
            row[f"precision_{name}"], row[f"recall_{name}"], row[f"f1_{name}"] = p, r, f
        # TPR/TNR beside them (recall is the TPR), per section and, where domains exist, per domain
        row.update(_tpr_tnr(y, d, ""))
        for name, m in (("source", src), ("target", tgt)):
            none = {f"tpr_{name}": NAN, f"tnr_{name}": NAN}
            row.update(_tpr_tnr(y[m], d[m], f"_{name}") if year >= 2021 else none)
    return row


def _tpr_tnr(y: np.ndarray, d: np.ndarray, suffix: str) -> dict[str, float]:
    rates = decision_rates(**decision_counts(y, d))
    return {f"tpr{suffix}": rates["tpr"], f"tnr{suffix}": rates["tnr"]}


def official_score(rows: Sequence[dict], year: int) -> float:
    """The year's official score of per-section rows (see the module docstring)."""
    values = [r[k] for k in OFFICIAL_KEYS[_check_year(year)] for r in rows]
    if not values:
        raise AsdError("official_score: no rows to average")
    return float(np.mean(values)) if year == 2020 else hmean(values)


def evaluate(
    clips: Sequence[Clip] | ClipTable,
    scores: ArrayLike,
    year: int = 2023,
    decisions: ArrayLike | None = None,
    max_fpr: float = 0.1,
) -> Evaluation:
    """Per-section metrics and the official score of `year` for the labelled test clips."""
    year, max_fpr = _check_year(year), _check_max_fpr(max_fpr)
    kept, s, d = labelled_test_clips(clips, scores, decisions)
    if year >= 2021:
        no_domain = [c.path for c in kept if c.domain == "none"]
        if no_domain:
            raise AsdError(
                f"DCASE {year} metrics need the domain (source/target) of every test clip, but "
                f"{len(no_domain)} have none (first: {no_domain[0]}); use year=2020 for "
                "domain-less data or give the domain ground truth"
            )
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(kept):
        groups.setdefault((c.machine, c.section), []).append(i)
    rows = []
    for (machine, section), idx in sorted(groups.items()):
        rows.append(
            _section_row(
                machine, section, [kept[i] for i in idx], s[idx], None if d is None else d[idx], year, max_fpr
            )
        )
    return Evaluation(year=year, rows=rows, official=official_score(rows, year))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


@dataclass
class Evaluation:
    """Per-(machine, section) metric rows and the official score of one DCASE year."""

    year: int
    rows: list[dict]
    official: float

    def _metric_keys(self) -> list[str]:
        keys = list(TABLE_KEYS[self.year])
        if self.rows and "precision" in self.rows[0]:
            keys += DECISION_KEYS[self.year]
        return keys

    def to_csv(self, path: str | Path) -> None:
        """One row per (machine, section), every metric at full precision (`nan` where undefined)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        columns = list(self.rows[0]) if self.rows else ["machine", "section"]
        writer.writerow(columns)
        for row in self.rows:
            writer.writerow([repr(row[k]) if isinstance(row[k], float) else row[k] for k in columns])
        write_text_atomic(path, buf.getvalue())

    def machine_summary(self) -> list[dict]:
        """Per machine: its sections' metrics averaged the year's way, and the official formula as `score`."""
        by_machine: dict[str, list[dict]] = {}
        for row in self.rows:
            by_machine.setdefault(row["machine"], []).append(row)
        out = []
        for machine, rows in sorted(by_machine.items()):
            summary: dict = {"machine": machine, "n_sections": len(rows)}
            for key in self._metric_keys():
                values = [r[key] for r in rows]
                summary[key] = float(np.mean(values)) if self.year == 2020 else hmean(values)
            summary["score"] = official_score(rows, self.year)
            out.append(summary)
        return out

    def to_markdown(self) -> str:
        """Per-section and per-machine tables plus the official score, 4 decimals."""
        keys = self._metric_keys()
        unit = "id" if self.year == 2020 else "section"
        mean = "arithmetic" if self.year == 2020 else "harmonic"
        sections = _markdown_table(
            ["machine", unit] + [TITLES[k] for k in keys],
            [[r["machine"], r["section"]] + [_fmt(r[k]) for k in keys] for r in self.rows],
        )
        machines = _markdown_table(
            ["machine", f"{unit}s"] + [TITLES[k] for k in keys] + ["score"],
            [
                [m["machine"], str(m["n_sections"])] + [_fmt(m[k]) for k in keys] + [_fmt(m["score"])]
                for m in self.machine_summary()
            ],
        )
        return (
            f"## DCASE {self.year} Task 2 metrics per {unit}\n\n{sections}\n\n"
            f"## Per machine ({mean} mean over {unit}s)\n\n{machines}\n\n"
            f"Official score (DCASE {self.year}): {self.official:.4f}\n"
        )
