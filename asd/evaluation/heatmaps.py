"""Spectrogram heatmaps of reconstruction members: input | reconstruction | error.

Which clips: `heatmaps.indices` of `heatmaps.split` (test, or train = the fit split the members
trained on), else `heatmaps.count` of them, half anomalous; `heatmaps.cmap` colours the error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from asd.data.windows import member_view  # noqa: E402
from asd.errors import AsdError  # noqa: E402

log = logging.getLogger(__name__)


def member_batch(dm, part: str, rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Clips `rows` of split `part` as one batch, as the members see them: each clip's first window
    when the run has windows (`asd.data.windows.member_view`)."""
    dataset = member_view(dm.datasets[part], dm.windowing)
    return {k: torch.stack([dataset[i][k] for i in rows]).to(device) for k in dataset[0]}


def axes_of(dm) -> tuple[str, str, str]:
    """How a member's 2-D input is drawn: (imshow origin, x label, y label). Log-mel has low
    frequencies at the bottom; a picture (`data=images`) is drawn as it is, top row first."""
    if getattr(dm, "modality", "audio") == "image":  # a bare namespace in tests: audio
        return "upper", "column", "row (channels stacked)" if dm.layout.channels > 1 else "row"
    return "lower", "frame", "mel bin"


def pick_clips(labels: list[str], n: int) -> list[int]:
    """Up to n clip rows, half normal and half anomalous (first ones in table order)."""
    normal = [i for i, lab in enumerate(labels) if lab != "anomaly"]
    anomaly = [i for i, lab in enumerate(labels) if lab == "anomaly"]
    half = max(1, n // 2)
    picked = anomaly[:half] + normal[: n - min(half, len(anomaly))]
    return sorted(picked[:n])


def heatmap_rows(
    labels: list[str], n: int, indices: list[int] | None = None, split: str = "test"
) -> list[int]:
    """The clip rows to draw: `indices` (checked against the split's size), else `pick_clips(labels, n)`."""
    if indices is None:
        return pick_clips(labels, n)
    bad = [i for i in indices if not 0 <= i < len(labels)]
    if bad:
        raise AsdError(
            f"heatmaps.indices={list(indices)}: {bad} out of range; the {split} split holds "
            f"{len(labels)} clips (indices 0..{len(labels) - 1})"
        )
    return list(dict.fromkeys(indices))


def check_cmap(cmap: str) -> str:
    """A matplotlib colormap name, or an AsdError listing a few valid ones."""
    if cmap not in matplotlib.colormaps:
        few = ", ".join(["magma", "viridis", "inferno", "plasma", "gray", "coolwarm"])
        raise AsdError(f"heatmaps.cmap={cmap!r}: not a matplotlib colormap; use one such as {few}")
    return cmap


def plot_error_maps(
    member,
    name: str,
    dm,
    out_dir: Path,
    n: int,
    device: torch.device,
    indices: list[int] | None = None,
    split: str = "test",
    cmap: str = "magma",
) -> list[Path]:
    """One figure per chosen clip of `split` (test or train); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    part = "test" if split == "test" else "fit"  # `train`: the clips the members trained on
    table = dm.tables[part]
    rows = heatmap_rows([c.label for c in table], n, indices, split)
    check_cmap(cmap)
    if not rows:
        return []
    batch = member_batch(dm, part, rows, device)
    origin, xlabel, ylabel = axes_of(dm)
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
            (axes[2], err[j], "squared error", {"cmap": cmap}),
        ):
            im = ax.imshow(img, origin=origin, aspect="auto", **kw)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[0].set_ylabel(ylabel)
        fig.suptitle(f"{name}: {clip.name} ({clip.label}, {clip.domain})")
        fig.tight_layout()
        path = out_dir / f"heatmap_{name}_{Path(clip.name).stem}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_vae(member, name: str, dm, out_dir: Path, n: int, device: torch.device) -> list[Path]:
    """A VAE member's pictures: `<name>_vae_samples.png` (prior draws decoded) and `<name>_vae_recon.png`
    (input over reconstruction for up to n test clips), in the front end's units."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = dm.tables["test"]
    rows = pick_clips([c.label for c in table], max(1, n))
    batch = member_batch(dm, "test", rows, device)
    origin, xlabel, ylabel = axes_of(dm)
    with torch.no_grad():
        spec, recon, _ = (t.float().cpu().numpy() for t in member.error_map(batch))  # each (B, mels, frames)
        g = torch.Generator().manual_seed(0)
        samples = (
            member.sample(max(1, n), spec.shape[2], generator=g).float().cpu().numpy()
        )  # (n, mels, frames)
    lo, hi = np.percentile(spec, [1, 99])
    paths = [out_dir / f"{name}_vae_samples.png", out_dir / f"{name}_vae_recon.png"]
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.imshow(samples[j], origin=origin, aspect="auto", vmin=lo, vmax=hi)
        ax.set_title(f"prior sample {j}")
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel(ylabel)
    fig.suptitle(f"{name}: decoded from the prior (skips zero)")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=80)
    plt.close(fig)
    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 5.6), squeeze=False, sharey=True)
    for j, i in enumerate(rows):
        clip = table[i]
        for ax, img, what in ((axes[0, j], spec[j], "input"), (axes[1, j], recon[j], "reconstruction")):
            ax.imshow(img, origin=origin, aspect="auto", vmin=lo, vmax=hi)
            ax.set_title(f"{what}: {Path(clip.name).stem[:28]}\n({clip.label}, {clip.domain})", fontsize=8)
        axes[1, j].set_xlabel(xlabel)
    axes[0, 0].set_ylabel(ylabel)
    axes[1, 0].set_ylabel(ylabel)
    fig.suptitle(f"{name}: test clips and their reconstructions")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=80)
    plt.close(fig)
    return paths
