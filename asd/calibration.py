"""`Calibration`: everything that turns raw member scores into fused scores and decisions.

A run's calibrate stage fits it once on normal training clips (never test clips) and writes it
to `calibration.pt`; the predict stage and `tools/score.py` load it and call `combine` and
`decide`, the one place where a decision is made. It holds:

- per member, z-score statistics per (machine, section, domain) (`asd.scoring.GroupNormalizer`),
  or none for a member whose scoring backend is calibrated: its scores already are z-scores of
  left-out training normals per source/target model, fitted on every training clip of the fit
  split instead of the few held-out ones;
- the raw scores of the normals those statistics came from, which a refit of the fusions reuses;
- the learned fusions (`asd.fusion.stage.FusionState`), when they are enabled;
- the final method and one decision threshold per section.

Its `state_dict()` is tensors, lists, numbers and strings only: it loads with `weights_only=True`.
The fitting helpers here work on score matrices alone (no model, no data), so they are tested on
synthetic numbers; docs/architecture.md shows where the calibrate stage calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asd.choices import FUSIONS, WEIGHTED
from asd.errors import AsdError
from asd.evaluation import (
    THRESHOLD_MODELS,
    clip_far_out,
    decide,
    fit_gamma_threshold,
    midpoint_threshold,
    normal_bound,
    pooled_spread,
)
from asd.evaluation.metrics import finite_scores
from asd.fileio import torch_save_atomic
from asd.fusion.stage import FusionState, apply_fusion
from asd.scoring import GroupNormalizer, fuse, fuse_weighted

log = logging.getLogger(__name__)

#: the learned fusions (asd.fusion), fitted on normals vs pseudo-anomalies
LEARNED = ("meta", "attention")
#: the context ids of a clip that calibration reads (never its label)
CONTEXT = ("machine", "section", "domain")

#: fields added after runs were written: a `calibration.pt` without them loads with their defaults
ADDED = frozenset(
    {"reference_final", "threshold_note", "member_criteria", "weights", "z_limit"}
    | {"weights_rule", "weights_note", "weights_measure"}
)

Scores = Mapping[str, np.ndarray]
Context = Mapping[str, Tensor]


def _default(f: Field) -> Any:
    """A dataclass field's default value, made fresh where it has a factory."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass
class Calibration:
    """Normalisers, reference scores, learned fusions, thresholds and the final method of one run."""

    #: the fused members, in the column order of the z-scores
    members: list[str]
    #: member -> `GroupNormalizer.state_dict()`; an empty dict: the raw score is the z-score
    normalizers: dict[str, dict[str, Any]]
    #: member -> raw scores (N,) of the normals the statistics were fitted on
    reference_scores: dict[str, Tensor]
    #: which normals those were ("held-out", "training", ...), for the summary
    normalised_on: str
    #: the column that decides: a learned fusion, a label-free one, or a member
    final: str = "zmean"
    threshold_percentile: float = 0.9
    #: (num_sections,) float64 decision threshold of each section on the final score
    thresholds: Tensor | None = None
    fusion: FusionState | None = None
    #: `final=auto`: each candidate's criterion on cross-fitted normals vs pseudo-anomalies
    #: (`asd.fusion.select`), and why `final` was chosen
    selection: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    #: the shrinkage the normalisers were fitted with (`GroupNormalizer`), for refits
    shrinkage: float = 0.0
    #: (N,) the reference normals' left-out final scores the thresholds are fitted on
    reference_final: Tensor | None = None
    #: how the thresholds were set (the model of `threshold`, far-out scores set to the fence first:
    #: `threshold_fence`, `threshold=midpoint`), for the summary; "" in files written before it was
    threshold_note: str = ""
    #: member -> how well it alone separates left-out normals from pseudo-anomalies
    #: (`asd.fusion.select.member_criteria`); empty without pseudo-anomalies
    member_criteria: dict[str, float] = field(default_factory=dict)
    #: member -> its weight in `zweighted` (`asd.fusion.select.member_weights`); empty: no such column
    weights: dict[str, float] = field(default_factory=dict)
    #: the `fusion.weighted.rule` the weights were made by, and why they fell back to equal ones ("" if not)
    weights_rule: str = "criterion"
    weights_note: str = ""
    #: the `fusion.weighted.measure` each member's criterion was (official: AUC and pAUC; auc: the AUC)
    weights_measure: str = "official"
    #: soft limit L of every z-score before fusion, z -> L tanh(z / L) (`limit`); None: off
    z_limit: float | None = None

    # ------------------------------------------------------------------ scoring
    def normalise(self, raw: Scores, context: Context) -> Tensor:
        """Raw member scores -> z-scores (N, members), in `members` order."""
        z = []
        for member in self.members:
            if not self.normalizers[member]:  # a calibrated backend's scores are z-scores already
                x = torch.as_tensor(raw[member])
                z.append(x.to(torch.promote_types(x.dtype, torch.float32)))  # as GroupNormalizer returns
                continue
            norm = GroupNormalizer()
            norm.load_state_dict(self.normalizers[member])
            z.append(norm.transform(torch.as_tensor(raw[member]), context["section"], context["domain"]))
        return self.limit(torch.stack(z, dim=1))

    def limit(self, z: Tensor) -> Tensor:
        """z-scores softly limited to (-L, L), L = `z_limit`: L tanh(z / L); unchanged when it is None.

        A member whose distances are measured against a few clips' tiny spread (a kNN bank of 4
        target clips, an embedding that barely varies) gives some clips z-scores in the hundreds,
        and one such column then decides every mean it enters. The limit keeps each member's own
        order (tanh is strictly increasing; in float64 only |z| beyond about 19 L rounds to L itself)
        and leaves |z| of 1 within 1.4 % at L = 5.
        """
        if self.z_limit is None:
            return z
        return self.z_limit * torch.tanh(z / self.z_limit)

    def combine(self, raw: Scores, context: Context) -> dict[str, np.ndarray]:
        """Raw member scores -> every column: the raw ones, label-free and learned fusions, `final`.

        `raw` may hold more columns than the fused members (the reference's); they are passed on.
        """
        cols = {k: np.asarray(v) for k, v in raw.items() if k != "index"}
        z = self.normalise(cols, context)  # (N, members)
        for method in FUSIONS:
            cols[method] = fuse(z, method).double().numpy()
        if self.weights:
            cols[WEIGHTED] = self.weighted(z).double().numpy()
        if self.fusion is not None:
            learned = apply_fusion(self.fusion, z, context["machine"], context["section"], context["domain"])
            for method in LEARNED:
                cols[method] = learned[method].double().numpy()
        if self.final not in cols:
            raise AsdError(f"calibration: final={self.final!r} is not among the columns {sorted(cols)}")
        cols["final"] = cols[self.final]
        return cols

    def weighted(self, z: Tensor) -> Tensor:
        """`zweighted` of z-scores (N, members) in `members` order."""
        return fuse_weighted(z, torch.tensor([self.weights[m] for m in self.members], dtype=torch.float64))

    def decide(self, final: np.ndarray, section: Tensor | np.ndarray) -> np.ndarray:
        """0/1 decisions (N,) int64: final score above its section's threshold."""
        if self.thresholds is None:
            raise AsdError("calibration: no thresholds fitted; run the calibrate stage first")
        return decide(final, self.thresholds.numpy()[np.asarray(section, dtype=np.int64)])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["fusion"] = self.fusion.state_dict() if self.fusion is not None else None
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Calibration:
        names = {f.name for f in fields(cls)}
        if isinstance(state, Mapping) and set(state) - names == set() and names - set(state) <= ADDED:
            state = {**{f.name: _default(f) for f in fields(cls) if f.name in ADDED}, **state}
        if not isinstance(state, Mapping) or set(state) != names:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise AsdError(f"not a calibration state: keys {got}, expected {sorted(names)}")
        values = dict(state)
        if values["fusion"] is not None:
            values["fusion"] = FusionState.from_state_dict(values["fusion"])
        return cls(**values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take every field from `state` (a `state_dict()`), checked as `from_state_dict` checks it."""
        loaded = Calibration.from_state_dict(state)
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))

    def save(self, path: Path) -> None:
        torch_save_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls.from_state_dict(state)
        except AsdError as e:
            raise AsdError(f"{path}: {e}; delete it to recalibrate") from None
        except Exception as e:  # torch raises many types for foreign or damaged files
            raise AsdError(f"{path}: not a readable asd calibration ({e}); delete it to recalibrate") from e


# ---------------------------------------------------------------------- fitting, on score matrices
def fit_normalizers(
    raw: Scores, members: list[str], context: Context, shrinkage: float = 0.0, keep: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per-member z-score statistics per (machine, section, domain); one warning for all fallbacks.

    Members in `keep` get no statistics (an empty state): their raw scores are used as z-scores.
    So does a member whose reference scores are all equal, with a warning: with one training clip
    per section and nothing held out, a bank scores its own clips 0, and there is no spread to
    normalise by.
    """
    states, fell_back = {}, {}
    for member in members:
        if member in keep:
            states[member] = {}
            continue
        try:
            norm = GroupNormalizer(shrinkage).fit(
                torch.as_tensor(raw[member]), context["section"], context["domain"], warn=False
            )
        except AsdError as e:
            if "constant or fewer than 2" not in str(e):
                raise
            log.warning(
                "score normalisation of %s: its %d reference normals' scores are all equal (training "
                "clips scored against banks that hold them?), so its raw scores enter the fusions "
                "unnormalised; hold out more normals (data.val_fraction) for a real normalisation",
                member,
                len(raw[member]),
            )
            states[member] = {}
            continue
        states[member] = norm.state_dict()
        if norm.fallbacks:
            fell_back.setdefault("; ".join(norm.fallbacks), []).append(member)
    for groups, cols in fell_back.items():
        log.warning(
            "score normalisation of %s: groups with < 2 clips or std ~ 0 fell back: %s",
            ", ".join(cols),
            groups,
        )
    return states


def left_out_z(calibration: Calibration, context: Context) -> Tensor:
    """z-scores (N, members) of the reference normals, each from statistics fitted without it.

    `GroupNormalizer.left_out` gives every clip's refit in closed form. A clip whose section holds
    no other clip, or whose refit does not exist (the others' scores are constant), keeps its
    ordinary z-score (nothing else describes it).
    """
    out = calibration.normalise({m: v.numpy() for m, v in calibration.reference_scores.items()}, context)
    for j, member in enumerate(calibration.members):
        if not calibration.normalizers[member]:  # nothing here was fitted on the clip
            continue
        z = GroupNormalizer(calibration.shrinkage).left_out(
            torch.as_tensor(calibration.reference_scores[member]), context["section"], context["domain"]
        )
        refit = z.isfinite()
        out[refit, j] = calibration.limit(z[refit]).to(out.dtype)
    return out


def percentile_note(percentile: float, normals: str, shrinkage: float = 0.0, model: str = "normal") -> str:
    """The summary's words for `fit_thresholds`' thresholds; `normals` names the normals (count, kind)."""
    pulled = (
        f", each pulled towards the pooled threshold as if {shrinkage:g} more clips showed it "
        "(threshold_shrinkage)"
    )
    how = (
        f"normal prediction bound at {percentile:g} (mean + t x std x sqrt(1 + 1/n))"
        if model == "normal"
        else f"gamma threshold at the {percentile:g} percentile"
    )
    return f"{how} of {normals} normals' left-out final scores per machine/section" + (
        pulled if shrinkage else ""
    )


def fence_note(clipped: int, fence: float, scores: str = "score") -> str:
    """The summary's words for what `threshold_fence` clipped before a threshold fit."""
    return f"{clipped} far-out {scores}(s) first set to Q3 + {fence:g} x IQR of its section (threshold_fence)"


def threshold_normals(
    section: Tensor | np.ndarray, domain: Tensor | np.ndarray, min_domain: int
) -> np.ndarray:
    """Which reference normals a section's threshold is fitted on (`threshold_min_domain`): (N,) bool.

    Source and target groups of fewer than `min_domain` normals are left out when the section keeps
    at least `min_domain` without them; their clips take that threshold. Their left-out z-scores
    come from fewer than `min_domain` - 1 other clips of the domain, scored (cross-fitted) by copies
    that saw as few: a first-shot target pair at 1.48 and 1.74, its test normals at -0.78."""
    section, domain = np.asarray(section, dtype=np.int64), np.asarray(domain, dtype=np.int64)
    keep = np.ones(section.shape, dtype=bool)
    for s in np.unique(section):
        in_section = section == s
        small = np.zeros_like(keep)
        for d in (0, 1):
            group = in_section & (domain == d)
            if 0 < int(group.sum()) < min_domain:
                small |= group
        if int((in_section & ~small).sum()) >= min_domain:  # what the section keeps can stand alone
            keep[small] = False
    return keep


def fit_thresholds(
    final: np.ndarray,
    section: Tensor,
    num_sections: int,
    percentile: float,
    fence: float | None = None,
    shrinkage: float = 0.0,
    model: str = "normal",
) -> tuple[Tensor, int]:
    """One threshold per section from normals' final scores; sections without any: the pooled one.

    `model` "normal" (`threshold=normal`): each section's normal prediction bound
    (`asd.evaluation.normal_bound`); a section of one score borrows the within-section spread of
    the others (`pooled_spread`), or of all scores together when no section has two that differ.
    That assumes the sections' scores share one scale, as every fusion's z-scores of their own
    section do; a `final` that is a member's raw score (`final=b2`) borrows another section's raw
    spread. "gamma": each section's fitted gamma quantile.

    With `fence`, each section's scores are first clipped to Q3 + fence x IQR (`clip_far_out`).
    With `shrinkage` k > 0 (`threshold_shrinkage`), a section of n normals gets
    (n t + k t_pooled) / (n + k) from its own threshold t and the pooled one, as if k more of its
    clips had shown the pooled threshold: the final scores are z-scores of their own section
    already, so the pooled threshold is on the same scale. Returns the thresholds (num_sections,)
    and how many of the sections' scores were clipped.
    """
    if model not in THRESHOLD_MODELS:
        raise AsdError(f"threshold model {model!r}: choose from {list(THRESHOLD_MODELS)}")
    final = finite_scores(final, "fit_thresholds", flatten=True).astype(np.float64)
    section = np.asarray(section, dtype=np.int64)

    def clip(scores: np.ndarray) -> tuple[np.ndarray, int]:
        return clip_far_out(scores, fence) if fence is not None else (scores, 0)

    clipped_all, _ = clip(final)
    own = {int(s): clip(final[section == s]) for s in np.unique(section)}
    if model == "gamma":
        pooled = fit_gamma_threshold(clipped_all, percentile)
        fitted = {s: fit_gamma_threshold(x, percentile) for s, (x, _) in own.items()}
    else:
        spread = pooled_spread([x for x, _ in own.values()])
        if spread is None or spread[0] == 0.0:  # no section of 2+ differing scores: all scores together
            spread = pooled_spread([clipped_all])
        pooled = normal_bound(clipped_all, percentile)
        fitted = {s: normal_bound(x, percentile, spread) for s, (x, _) in own.items()}
    thresholds = np.full(num_sections, pooled, dtype=np.float64)
    clipped = 0
    for s, (x, n) in own.items():
        t = fitted[s]
        if shrinkage:  # without it, the section's own threshold exactly (n t / n may round)
            t = (x.size * t + shrinkage * pooled) / (x.size + shrinkage)
        thresholds[s] = t
        clipped += n
    return torch.as_tensor(thresholds), clipped


def fit_midpoint_thresholds(
    fallback: Tensor,
    normal: np.ndarray,
    normal_section: Tensor,
    anomalous: np.ndarray,
    anomalous_section: Tensor,
    fence: float | None = None,
) -> tuple[Tensor, list[int], int]:
    """Per section, the midpoint between its normals' and its labelled anomalies' mean final score.

    A section without labelled anomalies (or without normals) keeps its `fallback` threshold (the
    calibrate stage's percentile one). With `fence`, a section's normals are first clipped to
    Q3 + fence x IQR (`clip_far_out`), as for the percentile fit: one far-out left-out score would
    otherwise carry the mean, and the midpoint, with it. Returns the thresholds (num_sections,), the
    sections that kept theirs, and how many normal scores were clipped.
    """
    thresholds = fallback.clone().double()
    normal, anomalous = np.asarray(normal, dtype=np.float64), np.asarray(anomalous, dtype=np.float64)
    normal_section = np.asarray(normal_section, dtype=np.int64)
    anomalous_section = np.asarray(anomalous_section, dtype=np.int64)
    kept, clipped = [], 0
    for s in range(len(thresholds)):
        n, a = normal[normal_section == s], anomalous[anomalous_section == s]
        if n.size and a.size:
            if fence is not None:
                n, c = clip_far_out(n, fence)
                clipped += c
            thresholds[s] = midpoint_threshold(n, a)
        else:
            kept.append(s)
    return thresholds, kept, clipped
