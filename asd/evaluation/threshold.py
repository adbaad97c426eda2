"""Decision thresholds from normal scores: a normal prediction bound (the default) or a gamma fit.

`normal_bound` (`threshold=normal`) is the one-sided prediction bound of a normal model whose mean
and spread are estimated from the same few scores: mean + t(percentile, df) x s x sqrt(1 + 1/n),
with s the sample std (n - 1) and t Student's quantile. For independent normal scores a new one
falls below it with probability `percentile` on average over the samples, however few there are;
the t quantile and the sqrt(1 + 1/n) are what five scores leave unknown about the mean and the
spread. A quantile of a distribution fitted to the same five scores takes them as known, and
lands low: on the synthetic data, gamma thresholds from 5 held-out normals per section flagged
21-25 % of the test normals for an aim of 10 % (docs/results.md, "Thresholds that say what they
promise"). The calibrate stage's scores are left-out z-scores, which already carry part of that
uncertainty, so in theory the bound passes more than its share there (about 0.97 for 0.9 from 5
ideal normals); what it passes on real runs is measured, not promised.
`pooled_spread` gives a section of one score the within-section spread of the others, as `s` with
its degrees of freedom.

`fit_gamma_threshold` (`threshold=gamma`, the DCASE baselines' way) fits shape, location and scale
with `scipy.stats.gamma.fit` (all three free, like the baselines) and returns the fitted
distribution's `percentile` quantile. The free location lets the same model describe shifted
scores such as z-scores, which may be negative.
Where the fit cannot apply, the threshold falls back to the empirical quantile
`np.quantile(scores, percentile)` (linear interpolation) and a warning says why:

- fewer than 3 scores (a 3-parameter fit needs more),
- constant scores (zero spread; the threshold is that value, so every such score is normal),
- the fit raises, returns non-finite parameters, or a quantile outside
  [min(scores), max(scores) + (max(scores) - min(scores))], i.e. a fit that does not describe
  the scores.

`clip_far_out` is the guard `asd.calibration.fit_thresholds` applies first (`threshold_fence`, 3 by
default): scores above Tukey's far-out fence Q3 + k x IQR are set to the fence. A gamma fit has
no defence against one huge score: on a first-shot machine one of ten left-out normals scored
4,691 where the rest lay within [-2, 1.1], and the fitted 0.9 quantile, 2,201, flagged no test
clip at all. Sections of fewer than 8 scores are fitted as they are (docs/results.md,
"Thresholds that one left-out score cannot break").

`midpoint_threshold` is the alternative when the user has labelled anomalous validation clips
(`threshold=midpoint`): halfway between the mean score of normal and of anomalous validation
clips, `(mean(normal) + mean(anomalous)) / 2`.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from asd.errors import AsdError
from asd.evaluation.metrics import finite_scores

logger = logging.getLogger(__name__)

MIN_FIT_SCORES = 3
MIN_FENCE_SCORES = 8

#: the ways `threshold_percentile` is turned into a threshold from normals' scores alone
THRESHOLD_MODELS = ("normal", "gamma")


def _gamma_quantile(s: np.ndarray, percentile: float) -> tuple[float | None, str]:
    """The fitted gamma's quantile, or None and the reason it does not apply."""
    if s.size < MIN_FIT_SCORES:
        return None, f"only {s.size} scores (a gamma fit needs at least {MIN_FIT_SCORES})"
    low, high = float(s.min()), float(s.max())
    if low == high:
        return None, f"all {s.size} scores equal {low!r}"
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            shape, loc, scale = scipy.stats.gamma.fit(s)
            q = float(scipy.stats.gamma.ppf(percentile, shape, loc=loc, scale=scale))
    except Exception as e:  # scipy's optimisers raise many types; any failure means "no fit"
        return None, f"gamma fit failed ({type(e).__name__}: {e})"
    if not all(math.isfinite(v) for v in (shape, loc, scale, q)) or shape <= 0 or scale <= 0:
        return None, f"gamma fit gave shape={shape}, loc={loc}, scale={scale}, quantile={q}"
    if not low <= q <= high + (high - low):
        return None, f"gamma quantile {q!r} lies far outside the scores [{low!r}, {high!r}]"
    return q, ""


def clip_far_out(scores: ArrayLike, fence: float) -> tuple[np.ndarray, int]:
    """Scores above Q3 + `fence` x IQR (quartiles by linear interpolation) set to that bound, and
    how many were. Fewer than `MIN_FENCE_SCORES` come back as they are: the quartiles of 5 scores are
    single scores, and on the synthetic data's 5-clip sections the fence clipped a section's
    largest score in 9 of 12 runs and put thresholds below 0 (docs/results.md)."""
    if not (math.isfinite(fence) and fence >= 0):
        raise AsdError(f"threshold_fence={fence}: give a number >= 0 (3 is Tukey's far-out fence) or null")
    s = finite_scores(scores, "clip_far_out", flatten=True)
    if s.size < MIN_FENCE_SCORES:
        return s, 0
    q1, q3 = np.percentile(s, [25, 75])
    bound = q3 + fence * (q3 - q1)
    return np.minimum(s, bound), int((s > bound).sum())


def fit_gamma_threshold(scores: ArrayLike, percentile: float = 0.9) -> float:
    """`percentile` quantile of a gamma fitted to (normal) scores; empirical quantile where no fit applies."""
    if not 0.0 < percentile < 1.0:
        raise AsdError(f"percentile={percentile}: must lie strictly between 0 and 1 (the baselines use 0.9)")
    s = finite_scores(scores, "fit_gamma_threshold", flatten=True)
    if s.size == 0:
        raise AsdError("fit_gamma_threshold: no scores; fit the threshold on the scores of normal clips")
    q, why = _gamma_quantile(s, percentile)
    if q is not None:
        return q
    fallback = float(np.quantile(s, percentile))
    logger.warning(
        "gamma threshold: %s; using the empirical %g quantile %r instead", why, percentile, fallback
    )
    return fallback


def pooled_spread(groups: list[ArrayLike]) -> tuple[float, int] | None:
    """The pooled within-group std and its degrees of freedom, from every group of 2+ scores.

    sqrt(sum of squared deviations from each group's own mean / sum of (n - 1)); None when no group
    has 2 scores. Each group's mean is its own, so groups whose levels differ share only their spread.
    """
    squares, df = 0.0, 0
    for g in groups:
        x = finite_scores(g, "pooled_spread", flatten=True)
        if x.size >= 2:
            squares += float(((x - x.mean()) ** 2).sum())
            df += x.size - 1
    return (math.sqrt(squares / df), df) if df else None


def normal_bound(
    scores: ArrayLike, percentile: float = 0.9, spread: tuple[float, int] | None = None
) -> float:
    """One-sided normal prediction bound of `scores`: mean + t(percentile, df) x s x sqrt(1 + 1/n).

    s and df are the scores' sample std and n - 1; `spread` = (s, df) replaces them where the
    scores cannot give one (a single score; `pooled_spread` of the other sections). A single score
    without `spread` is its own threshold, with a warning; constant scores (s = 0) give their value,
    so every such score is normal.
    """
    if not 0.0 < percentile < 1.0:
        raise AsdError(f"percentile={percentile}: must lie strictly between 0 and 1 (the baselines use 0.9)")
    x = finite_scores(scores, "normal_bound", flatten=True)
    if x.size == 0:
        raise AsdError("normal_bound: no scores; fit the threshold on the scores of normal clips")
    if x.size >= 2:
        s, df = float(x.std(ddof=1)), x.size - 1
    elif spread is not None:
        s, df = spread
    else:
        logger.warning("normal threshold: one score and no spread to borrow; the threshold is that score")
        return float(x[0])
    return float(x.mean() + scipy.stats.t.ppf(percentile, df) * s * math.sqrt(1.0 + 1.0 / x.size))


def midpoint_threshold(normal: ArrayLike, anomalous: ArrayLike) -> float:
    """Halfway between the mean normal and the mean anomalous validation score."""
    n = finite_scores(normal, "midpoint_threshold (normal scores)", flatten=True)
    a = finite_scores(anomalous, "midpoint_threshold (anomalous scores)", flatten=True)
    if not n.size or not a.size:
        raise AsdError(
            f"midpoint_threshold: {n.size} normal and {a.size} anomalous scores; "
            "it needs at least one of each"
        )
    if a.mean() <= n.mean():
        logger.warning(
            "midpoint threshold: the anomalous validation clips score %.4g on average, not above the "
            "normals' %.4g; the threshold between them flags mostly normal-looking clips",
            a.mean(),
            n.mean(),
        )
    return float((n.mean() + a.mean()) / 2.0)


def decide(scores: ArrayLike, threshold: float | ArrayLike) -> np.ndarray:
    """Decisions (N,) int64: 1 = anomaly where the score is strictly above its threshold.

    `threshold` is one number, or one per score (each clip's section threshold).
    """
    t = np.asarray(threshold, dtype=np.float64)
    if not np.isfinite(t).all():
        bad = t if t.ndim == 0 else t[~np.isfinite(t)][0]
        raise AsdError(f"decide: threshold={float(bad)} is not finite; fit it on finite normal scores")
    s = finite_scores(scores, "decide", flatten=True)
    if t.ndim and t.shape != s.shape:
        raise AsdError(f"decide: {t.shape[0]} thresholds for {s.shape[0]} scores")
    return (s > t).astype(np.int64)
