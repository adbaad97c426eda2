"""The wandb dashboard as code: one saved workspace with the panels the README lists.

`dashboard_panels` says what the dashboard shows, as plain data: each member's training loss and
gradient norm, the AMP loss scale and skipped steps, each method's official score, the metrics
and attention-weight tables, and the pictures (ROC curves, histograms, heatmaps, attention
weights, pseudo-anomalies). `build_workspace` turns it into a `wandb-workspaces` Workspace (the
maintained API for saved W&B views; `pip install -e ".[dashboard]"`), which
`tools/wandb_dashboard.py --entity E --project P` pushes. Every key is one that a run logs
(`asd.ensemble`, `asd.run.stages`, `asd.run.publish`); a test checks them against the files of
a real offline run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from asd.calibration import LEARNED
from asd.choices import FUSIONS, WEIGHTED
from asd.members import BRANCHES

#: the members with a training loss: the branches and the DCASE baseline autoencoder (`stats`
#: is training-free)
TRAINED = (*BRANCHES, "dcase_ae")
#: the references' score columns (`asd.branches.dcase_ae`, `asd.branches.logmel_stats`)
REFERENCE_COLUMNS = (
    "dcase_ae_mse",
    "dcase_ae_mahalanobis",
    "stats_mahalanobis",
    "stats_knn",
    "stats_temporal",
)
#: every method with an official score, in the order the bar chart lists them
METHODS = (*LEARNED, WEIGHTED, *FUSIONS, *BRANCHES, *REFERENCE_COLUMNS)
#: the pictures `publish_to_wandb` logs; roc, hist and heatmap hold one image per group or clip
MEDIA = ("plots/roc", "plots/hist", "plots/heatmap", "plots/attention_weights", "plots/pseudo_anomalies")
TABLES = ("test/metrics", "test/attention_weights")


@dataclass(frozen=True)
class Panel:
    """One panel: where it sits, what it draws (line, bar, table, media) and the keys it reads."""

    section: str
    kind: str
    title: str
    keys: tuple[str, ...]


def dashboard_panels(
    members: Sequence[str] = TRAINED, methods: Sequence[str] = METHODS, amp: bool = True
) -> list[Panel]:
    """The dashboard's panels for runs of these members and methods (`amp`: with the AMP panels)."""
    panels = [Panel("training", "line", "total loss", ("train/loss",))]
    for m in members:
        panels.append(Panel("training", "line", f"{m} loss", (f"train/{m}/loss",)))
        panels.append(Panel("training", "line", f"{m} gradient norm", (f"train/{m}/grad_norm",)))
    if amp:
        panels.append(Panel("training", "line", "AMP loss scale", ("train/amp/scale",)))
        panels.append(Panel("training", "line", "AMP skipped steps", ("train/amp/skipped_steps",)))
    panels.append(
        Panel("scores", "bar", "official score per method", tuple(f"test/{m}/official" for m in methods))
    )
    panels += [Panel("tables", "table", key, (key,)) for key in TABLES]
    panels += [Panel("plots", "media", key.removeprefix("plots/"), (key,)) for key in MEDIA]
    return panels


def build_workspace(entity: str, project: str, panels: Sequence[Panel], name: str = "asd") -> Any:
    """The `wandb_workspaces` Workspace of `panels`, one section per panel section; built, not pushed."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def make(p: Panel) -> Any:
        if p.kind == "line":
            return wr.LinePlot(title=p.title, y=list(p.keys))
        if p.kind == "bar":
            return wr.BarPlot(title=p.title, metrics=list(p.keys), orientation="h")
        if p.kind == "table":
            return wr.WeavePanelSummaryTable(table_name=p.keys[0])
        if p.kind == "media":
            return wr.MediaBrowser(title=p.title, media_keys=list(p.keys))
        raise ValueError(f"panel {p.title!r}: unknown kind {p.kind!r}")

    sections = list(dict.fromkeys(p.section for p in panels))
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(name=s, panels=[make(p) for p in panels if p.section == s], is_open=True)
            for s in sections
        ],
    )


def workspace_keys(workspace: Any) -> set[str]:
    """Every metric, table and media key the workspace's panels read."""
    keys: set[str] = set()
    for section in workspace.sections:
        for panel in section.panels:
            keys.update(getattr(panel, "y", None) or [])
            keys.update(getattr(panel, "metrics", None) or [])
            keys.update(getattr(panel, "media_keys", None) or [])
            if getattr(panel, "table_name", None):
                keys.add(panel.table_name)
    return keys
