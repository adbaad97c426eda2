"""The run folder's pictures and the wandb dashboard.

`plots/`: ROC curves and score histograms of the final score, a histogram of every method's
scores by label (`hist_<method>.png`, the decision threshold drawn for the final method),
heatmaps of the members that draw error maps, the attention weights per group, one example of
each pseudo-anomaly kind the fusions were trained on, every member's training and validation
loss (`loss_curves.png`) and a t-SNE of each member's test embeddings (`tsne_<member>.png`).
`publish_to_wandb` sends the tables, official scores, pictures and `summary.md` to the run's
wandb logger.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asd.anomalies import PseudoAnomalyDataset
from asd.calibration import Calibration
from asd.data.datamodule import AsdDataModule
from asd.ensemble import Ensemble
from asd.fusion.attention import group_weights, plot_attention_weights
from asd.fusion.stage import attention_head, weights_table
from asd.run.predict import context_of

log = logging.getLogger(__name__)


def attention_rows(
    calibration: Calibration, dm: AsdDataModule, columns: dict[str, np.ndarray], names: list[str]
) -> tuple[list[dict], list[dict], np.ndarray]:
    """Mean attention weights per (machine, section, domain): on the fusion's training clips and on
    the test clips (rows for `attention_weights.csv`), and the test weights (G, M) for the plot."""
    state = calibration.fusion
    train_rows = weights_table(state, state.group_keys, state.group_weights, names)
    context = context_of(dm.datasets["test"])
    z = calibration.normalise(columns, context)
    keys, weights = group_weights(
        attention_head(state), z.float(), context["machine"], context["section"], context["domain"]
    )
    test_rows = weights_table(state, keys, weights, names)
    rows = [{"clips": "train", **r} for r in train_rows] + [{"clips": "test", **r} for r in test_rows]
    return rows, test_rows, weights.numpy()


def plot_attention(test_rows: list[dict], weights: np.ndarray, members: list[str], plots: Path) -> None:
    plot_attention_weights([r["group"] for r in test_rows], weights, members, plots / "attention_weights.png")


def plot_fusion_training(plots: Path, dm: AsdDataModule, fake: PseudoAnomalyDataset) -> None:
    """What the fusion learned from: one held-out clip and a pseudo-anomaly of every enabled kind."""
    from asd.anomalies import plot_injections

    base = fake.base
    wave = np.asarray(base.waves[0], dtype=np.float32)
    section = int(base.labels["section"][0])
    pool = dm.datasets["fit"]
    others = np.flatnonzero(pool.labels["section"].numpy() != section)
    outlier = np.asarray(pool.waves[int(others[0])], dtype=np.float32) if len(others) else None
    rng = np.random.default_rng(0)
    shown = [k for k in fake.generator.config.kinds if k != "outlier" or outlier is not None]
    injections = [fake.generator(wave, rng, outlier=outlier, kind=k) for k in shown]
    if dm.modality == "image":
        from asd.image_anomalies import plot_image_injections

        plot_image_injections(wave, injections, fake.generator.layout, plots / "pseudo_anomalies.png")
        return
    config = fake.generator.config
    plot_injections(
        wave,
        injections,
        plots / "pseudo_anomalies.png",
        config.sample_rate,
        n_fft=config.n_fft,
        hop=config.hop,
    )


def write_plots(
    plots: Path,
    ensemble: Ensemble,
    dm: AsdDataModule,
    columns: dict[str, np.ndarray],
    heatmaps: dict[str, Any],
    device: torch.device,
    thresholds: dict[str, dict[tuple[str, str], float]] | None = None,
) -> None:
    """ROC curves and histograms of the final score, histograms of every method (`thresholds`: the
    methods that have a decision threshold, per section), heatmaps as the `heatmaps` node says."""
    from asd.evaluation.heatmaps import plot_error_maps
    from asd.evaluation.plots import plot_histograms, plot_method_histograms, plot_roc

    test = list(dm.tables["test"])
    thresholds = thresholds or {}
    final = next((m for m in thresholds if m in columns), None)
    plot_roc(test, columns["final"], plots)
    plot_histograms(test, columns["final"], plots, threshold=thresholds.get(final))
    methods = {k: v for k, v in columns.items() if k not in ("final", "decision")}
    plot_method_histograms(test, methods, plots, thresholds)
    indices, split, cmap = (
        heatmaps.get("indices"),
        heatmaps.get("split", "test"),
        heatmaps.get("cmap", "magma"),
    )
    num_heatmaps = len(indices) if indices else int(heatmaps.get("count", 4))
    for name, member in ensemble.members.items():
        if member.has_error_map and num_heatmaps > 0:
            plot_error_maps(member, name, dm, plots, num_heatmaps, device, indices, split, cmap)
        if num_heatmaps > 0:  # a member's own pictures: plots/b6_reprojection_*.png, plots/b7_vae_*.png
            member.draw(name, dm, plots, num_heatmaps, device)


def plot_training_curves(run_dir: Path, plots: Path) -> Path | None:
    """`plots/loss_curves.png`: every member's training and validation loss, from the CSV log."""
    from asd.evaluation.plots import plot_member_losses

    logs = run_dir / "logs"
    if not list(logs.glob("version_*/metrics.csv")):
        log.info("no CSV training log under %s (logger=csv writes one): no loss curves drawn", logs)
        return None
    return plot_member_losses(logs, plots / "loss_curves.png")


def plot_embeddings(path: Path, plots: Path, seed: int = 0) -> list[Path]:
    """`plots/tsne_<member>.png` for every member in `embeddings.npz`, by section, domain and label."""
    from asd.evaluation.plots import plot_tsne

    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = ("index", "machine", "section", "domain", "label", "filename")
    groups = {
        "section": [f"{m}/{s}" for m, s in zip(arrays["machine"], arrays["section"], strict=True)],
        "domain": arrays["domain"],
        "label": arrays["label"],
    }
    written = []
    for member in (k for k in arrays if k not in meta):
        if len(arrays[member]) < 3:
            log.info("t-SNE of %s: only %d test clips, none drawn", member, len(arrays[member]))
            continue
        written.append(plot_tsne(arrays[member], groups, plots / f"tsne_{member}.png", member, seed=seed))
    return written


def publish_to_wandb(
    logger: Any, run_dir: Path, results: dict[str, Any], weights_rows: list[dict] = ()
) -> None:
    """The dashboard: metrics table, official scores, ROC curves, histograms, heatmaps, attention
    weights, summary.md."""
    import wandb

    rows = [{"method": m, **r} for m, ev in results.items() for r in ev.rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = wandb.Table(columns=columns, data=[[_wandb_value(r.get(c)) for c in columns] for r in rows])
    payload: dict[str, Any] = {"test/metrics": table}
    payload.update({f"test/{m}/official": ev.official for m, ev in results.items()})
    if weights_rows:
        names = list(weights_rows[0])
        payload["test/attention_weights"] = wandb.Table(
            columns=names, data=[[r[n] for n in names] for r in weights_rows]
        )
    for png in [run_dir / "plots" / "attention_weights.png", run_dir / "plots" / "pseudo_anomalies.png"]:
        if png.exists():
            payload[f"plots/{png.stem}"] = wandb.Image(str(png))
    for kind in ("roc", "hist", "heatmap", "tsne", "loss"):
        for png in sorted((run_dir / "plots").glob(f"{kind}_*.png")):
            payload[f"plots/{kind}/{png.stem}"] = wandb.Image(str(png))
    for kind in ("roc", "hist", "heatmap"):  # each kind also under one key: a media panel of the saved
        pngs = sorted((run_dir / "plots").glob(f"{kind}_*.png"))  # dashboard (asd.run.dashboard) shows all
        if pngs:
            payload[f"plots/{kind}"] = [wandb.Image(str(png), caption=png.stem) for png in pngs]
    summary = (run_dir / "summary.md").read_text()
    payload["summary"] = wandb.Html(f"<pre>{html.escape(summary)}</pre>")
    logger.experiment.log(payload)
    logger.experiment.summary["summary_md"] = summary


def _wandb_value(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else float(v)
    return v
