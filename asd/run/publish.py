"""The run folder's pictures and the wandb dashboard.

`plots/`: ROC curves and score histograms of the final score, heatmaps of the members that draw
error maps, the attention weights per group, and one example of each pseudo-anomaly kind the
fusions were trained on. `publish_to_wandb` sends the tables, official scores, pictures and
`summary.md` to the run's wandb logger.
"""

from __future__ import annotations

import html
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
    num_heatmaps: int,
    device: torch.device,
) -> None:
    from asd.evaluation.heatmaps import plot_error_maps
    from asd.evaluation.plots import plot_histograms, plot_roc

    test = list(dm.tables["test"])
    plot_roc(test, columns["final"], plots)
    plot_histograms(test, columns["final"], plots)
    for name, member in ensemble.members.items():
        if member.has_error_map and num_heatmaps > 0:
            plot_error_maps(member, name, dm, plots, num_heatmaps, device)


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
    for kind in ("roc", "hist", "heatmap"):
        for png in sorted((run_dir / "plots").glob(f"{kind}_*.png")):
            payload[f"plots/{kind}/{png.stem}"] = wandb.Image(str(png))
    summary = (run_dir / "summary.md").read_text()
    payload["summary"] = wandb.Html(f"<pre>{html.escape(summary)}</pre>")
    logger.experiment.log(payload)
    logger.experiment.summary["summary_md"] = summary


def _wandb_value(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else float(v)
    return v
