"""ROC curves and score histograms per (machine, section), drawn off-screen with matplotlib's Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects on a `FigureCanvasAgg`, never through
pyplot, so nothing opens a window, touches the global backend or stays alive after saving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import roc_curve

from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.evaluation.metrics import _auc_pauc, finite_scores, labelled_test_clips

logger = logging.getLogger(__name__)

Thresholds = float | dict[tuple[str, str], float] | None


def _groups(clips: Sequence[Clip]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(clips):
        out.setdefault((c.machine, c.section), []).append(i)
    return dict(sorted(out.items()))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output, no display
    fig.savefig(path, dpi=100)
    return path


def plot_roc(
    clips: Sequence[Clip] | ClipTable,
    scores: ArrayLike,
    out_dir: str | Path,
    title_prefix: str = "",
    max_fpr: float = 0.1,
) -> list[Path]:
    """`roc_<machine>_section_<XX>.png` per section: all clips, and each domain's normals vs all anomalies."""
    kept, s, _ = labelled_test_clips(clips, scores)
    out_dir = Path(out_dir)
    written = []
    for (machine, section), idx in _groups(kept).items():
        y = np.array([0 if kept[i].is_normal else 1 for i in idx])
        v = s[idx]
        dom = np.array([kept[i].domain for i in idx])
        curves = [("all clips", np.ones_like(y, dtype=bool))]
        # the 2022+ domain-wise AUC: this domain's normals against every anomaly
        curves += [
            (f"{d} normals", (dom == d) | (y == 1))
            for d in ("source", "target")
            if np.any((dom == d) & (y == 0))
        ]
        fig = Figure(figsize=(5.0, 5.0))
        ax = fig.subplots()
        ax.axvspan(0.0, max_fpr, color="0.85", label=f"pAUC region (FPR <= {max_fpr:g})")
        for name, m in curves:
            auc, pauc = _auc_pauc(y[m], v[m], max_fpr, f"{machine} section {section} ({name})")
            fpr, tpr, _ = roc_curve(y[m], v[m])
            ax.plot(fpr, tpr, label=f"{name}: AUC {auc:.3f}, pAUC {pauc:.3f}")
        ax.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.01),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{title_prefix}{machine} section {section}",
        )
        ax.legend(loc="lower right", fontsize=8)
        written.append(_save(fig, out_dir / f"roc_{machine}_section_{section}.png"))
    logger.info("wrote %d ROC plots to %s", len(written), out_dir)
    return written


def plot_histograms(
    clips: Sequence[Clip] | ClipTable,
    scores: ArrayLike,
    out_dir: str | Path,
    threshold: Thresholds = None,
) -> list[Path]:
    """`hist_<machine>_section_<XX>.png` per section: scores by label, with the decision threshold line.

    `threshold` is one value for every section or a dict (machine, section) -> value. Clips of
    any split and label are drawn (unlabelled clips as "unknown"), so monitoring data works too.
    """
    clips = list(clips)
    s = finite_scores(scores, "plot_histograms")
    if s.size != len(clips):
        raise AsdError(f"got {s.size} scores for {len(clips)} clips; give exactly one score per clip")
    out_dir = Path(out_dir)
    written = []
    for (machine, section), idx in _groups(clips).items():
        v = s[idx]
        labels = np.array([clips[i].label for i in idx])
        edges = np.histogram_bin_edges(v, bins=min(40, max(5, len(idx) // 4)))
        fig = Figure(figsize=(6.0, 4.0))
        ax = fig.subplots()
        for label, color in (("normal", "tab:blue"), ("anomaly", "tab:red"), ("unknown", "tab:gray")):
            m = labels == label
            if m.any():
                ax.hist(v[m], bins=edges, alpha=0.5, color=color, label=f"{label} ({int(m.sum())})")
        t = threshold.get((machine, section)) if isinstance(threshold, dict) else threshold
        if isinstance(threshold, dict) and t is None:
            raise AsdError(
                f"threshold dict has no entry for ({machine!r}, {section!r}); give one per section"
            )
        if t is not None:
            ax.axvline(float(t), color="black", linestyle="--", label=f"threshold {float(t):.4g}")
        ax.set(xlabel="anomaly score", ylabel="clips", title=f"{machine} section {section}")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"hist_{machine}_section_{section}.png"))
    logger.info("wrote %d histograms to %s", len(written), out_dir)
    return written
