"""Spectrogram heatmaps of reconstruction members: input | reconstruction | error."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger(__name__)


def pick_clips(labels: list[str], n: int) -> list[int]:
    """Up to n clip rows, half normal and half anomalous (first ones in table order)."""
    normal = [i for i, lab in enumerate(labels) if lab != "anomaly"]
    anomaly = [i for i, lab in enumerate(labels) if lab == "anomaly"]
    half = max(1, n // 2)
    picked = anomaly[:half] + normal[: n - min(half, len(anomaly))]
    return sorted(picked[:n])


def plot_error_maps(member, name: str, dm, out_dir: Path, n: int, device: torch.device) -> list[Path]:
    """One figure per chosen test clip; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = dm.tables["test"]
    dataset = dm.datasets["test"]
    rows = pick_clips([c.label for c in table], n)
    if not rows:
        return []
    batch = {k: torch.stack([dataset[i][k] for i in rows]).to(device) for k in dataset[0]}
    with torch.no_grad():
        spec, recon, err = (
            t.float().cpu().numpy() for t in member.error_map(batch)
        )  # each (B, mels, frames)
    paths = []
    for j, i in enumerate(rows):
        clip = table[i]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
        lo, hi = np.percentile(spec[j], [1, 99])
        for ax, img, title, kw in (
            (axes[0], spec[j], "input", {"vmin": lo, "vmax": hi}),
            (axes[1], recon[j], "reconstruction", {"vmin": lo, "vmax": hi}),
            (axes[2], err[j], "squared error", {"cmap": "magma"}),
        ):
            im = ax.imshow(img, origin="lower", aspect="auto", **kw)
            ax.set_title(title)
            ax.set_xlabel("frame")
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[0].set_ylabel("mel bin")
        fig.suptitle(f"{name}: {clip.name} ({clip.label}, {clip.domain})")
        fig.tight_layout()
        path = out_dir / f"heatmap_{name}_{Path(clip.name).stem}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
