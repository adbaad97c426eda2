"""The run's pictures, drawn off-screen with matplotlib's Agg canvas: ROC curves and score histograms
per (machine, section), histograms of every method's scores by label with its threshold, the
members' training and validation loss curves, and t-SNE maps of their test embeddings.

Figures are built as `matplotlib.figure.Figure` objects on a `FigureCanvasAgg`, never through
pyplot, so nothing opens a window, touches the global backend or stays alive after saving.
"""

from __future__ import annotations

import csv
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
        fig = Figure(figsize=(6.0, 4.0))
        _histogram(
            fig.subplots(), s[idx], [clips[i].label for i in idx], _threshold_of(threshold, machine, section)
        )
        fig.axes[0].set_title(f"{machine} section {section}")
        written.append(_save(fig, out_dir / f"hist_{machine}_section_{section}.png"))
    logger.info("wrote %d histograms to %s", len(written), out_dir)
    return written


def _threshold_of(threshold: Thresholds, machine: str, section: str) -> float | None:
    t = threshold.get((machine, section)) if isinstance(threshold, dict) else threshold
    if isinstance(threshold, dict) and t is None:
        raise AsdError(f"threshold dict has no entry for ({machine!r}, {section!r}); give one per section")
    return t


def _histogram(ax, v: np.ndarray, labels: Sequence[str], t: float | None) -> None:
    """Scores by label (normal, anomaly, unknown) on shared bins, and the threshold as a dashed line."""
    labels = np.asarray(labels)
    edges = np.histogram_bin_edges(v, bins=min(40, max(5, len(v) // 4)))
    for label, color in (("normal", "tab:blue"), ("anomaly", "tab:red"), ("unknown", "tab:gray")):
        m = labels == label
        if m.any():
            ax.hist(v[m], bins=edges, alpha=0.5, color=color, label=f"{label} ({int(m.sum())})")
    if t is not None:
        ax.axvline(float(t), color="black", linestyle="--", label=f"threshold {float(t):.4g}")
    ax.set(xlabel="anomaly score", ylabel="clips")
    ax.legend(fontsize=8)


def plot_method_histograms(
    clips: Sequence[Clip] | ClipTable,
    columns: dict[str, np.ndarray],
    out_dir: str | Path,
    thresholds: dict[str, Thresholds] | None = None,
) -> list[Path]:
    """`hist_<method>.png` per score column: one panel per (machine, section), scores by label.

    `thresholds[method]` (one value or a dict per section) draws that method's decision threshold;
    a method without one gets no line.
    """
    clips, thresholds = list(clips), thresholds or {}
    groups = _groups(clips)
    out_dir = Path(out_dir)
    written = []
    for method, scores in columns.items():
        s = finite_scores(scores, f"plot_method_histograms ({method})")
        if s.size != len(clips):
            raise AsdError(
                f"{method}: {s.size} scores for {len(clips)} clips; give exactly one score per clip"
            )
        fig = Figure(figsize=(5.0 * len(groups), 3.8))
        for ax, ((machine, section), idx) in zip(
            fig.subplots(1, len(groups), squeeze=False)[0], groups.items(), strict=True
        ):
            t = _threshold_of(thresholds.get(method), machine, section)
            _histogram(ax, s[idx], [clips[i].label for i in idx], t)
            ax.set_title(f"{method}: {machine} section {section}", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"hist_{method}.png"))
    logger.info("wrote %d per-method histograms to %s", len(written), out_dir)
    return written


def read_member_losses(
    path: Path,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per member, (steps, values) of `train/<member>/loss` and of `val/<member>/loss` from Lightning's
    CSV log(s): empty cells (the other split's rows) are left out."""
    rows = []
    for csv_path in [path] if path.is_file() else _version_logs(path):
        with open(csv_path, newline="") as f:
            rows += list(csv.DictReader(f))
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "val": {}}
    for name in dict.fromkeys(k for r in rows for k in r):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in curves and parts[2] == "loss":
            kept = [r for r in rows if r.get(name) not in (None, "")]
            steps = np.array([float(r["step"]) for r in kept])
            curves[parts[0]][parts[1]] = steps, np.array([float(r[name]) for r in kept])
    return curves["train"], curves["val"]


def _version_logs(logs: Path) -> list[Path]:
    """`logs/version_N/metrics.csv` in N's order: a resumed fit writes a new version."""
    found = [p for p in logs.glob("version_*/metrics.csv") if p.parent.name.split("_")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.parent.name.split("_")[1]))


def plot_member_losses(log_path: Path, out: Path) -> Path | None:
    """One panel per member: its training loss per logged step and its validation loss per epoch.

    `log_path` is a run's `logs/` folder (every `version_N/metrics.csv` in order) or one CSV.
    Returns None (and says so) when the log holds no member losses.
    """
    train, val = read_member_losses(log_path)
    members = sorted(set(train) | set(val))
    if not members:
        logger.info("no member losses in %s: no loss curves drawn", log_path)
        return None
    cols = min(3, len(members))
    rows = -(-len(members) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, member in zip(axes, members, strict=False):  # the last row may have spare panels
        for split, curves, style in (("train", train, "-"), ("val", val, "o-")):
            if member in curves:
                steps, values = curves[member]
                ax.plot(steps, values, style, markersize=3, label=f"{split} ({len(values)})")
        ax.set(title=member, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(members) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, out)


def plot_tsne(
    embeddings: np.ndarray,
    groups: dict[str, Sequence[str]],
    out: Path,
    title: str = "",
    max_points: int = 2000,
    seed: int = 0,
) -> Path:
    """A 2-D t-SNE of embeddings (N, D), one panel per grouping (section, domain, label) coloured by it.

    At most `max_points` rows (a fixed-seed subsample), perplexity min(30, (N - 1) / 3) so it
    stays below N, and a fixed `random_state`: the same embeddings draw the same picture.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n < 3:
        raise AsdError(f"t-SNE of {title or 'embeddings'}: {n} clips; it needs at least 3")
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
        logger.info("t-SNE of %s: a fixed-seed subsample of %d of %d clips", title, max_points, n)
    perplexity = min(30.0, (len(keep) - 1) / 3.0)
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x[keep])  # (n, 2)
    fig = Figure(figsize=(4.5 * len(groups), 4.2))
    panels = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (what, values) in zip(panels, groups.items(), strict=True):
        values = np.asarray(values)[keep]
        for value in sorted(set(values.tolist())):
            m = values == value
            ax.scatter(xy[m, 0], xy[m, 1], s=10, alpha=0.7, label=f"{value} ({int(m.sum())})")
        ax.set(title=f"by {what}", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=1.5)
    fig.suptitle(f"{title}: t-SNE of {len(keep)} test clips (perplexity {perplexity:.3g})")
    fig.tight_layout()
    return _save(fig, out)
