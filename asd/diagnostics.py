"""Training diagnostics: per-step member losses and gradient norms, frozen-member checks, loss curves."""

from __future__ import annotations

import copy
import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from asd.errors import AsdError  # noqa: E402
from asd.fileio import write_text_atomic  # noqa: E402

log = logging.getLogger(__name__)


class StepRecorder(L.Callback):
    """Collects `Ensemble.last_step` after every training step."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.record = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.last_step:
            self.rows.append(
                {"step": trainer.global_step, "epoch": trainer.current_epoch, **pl_module.last_step}
            )

    def write(self, path: Path) -> None:
        if not self.rows:
            raise AsdError("no training step was recorded (empty training split?)")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(path, buf.getvalue())


def state_snapshot(module: torch.nn.Module) -> dict:
    """A deep copy of the whole state (parameters, buffers, extra states)."""
    return copy.deepcopy(dict(module.state_dict()))


def changed_entries(before: dict, after: dict) -> list[str]:
    """State keys whose values are not bit-identical (dtype included), recursing into extra-state dicts."""

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    keys = sorted(set(before) | set(after))
    return [k for k in keys if k not in before or k not in after or not same(before[k], after[k])]


@dataclass
class FreezeReport:
    member: str
    csv: Path
    png: Path
    steps: int
    moved: list[str]

    @property
    def identical(self) -> bool:
        return not self.moved


def debug_freeze(cfg: DictConfig, member: str, out_dir: Path) -> FreezeReport:
    """Train the ensemble with `member` frozen, record every step, check the member did not move."""
    from asd.run.build import build_datamodule, build_ensemble, build_trainer, data_facts

    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    ensemble = build_ensemble(cfg, data_facts(dm))
    if member not in ensemble.members:
        raise AsdError(f"--freeze {member}: not a member of this ensemble; members: {list(ensemble.members)}")
    before = state_snapshot(ensemble.members[member])
    recorder = StepRecorder()
    trainer = build_trainer(
        cfg, Path(cfg.run_dir), logger=False, extra_callbacks=[recorder], checkpoints=False
    )
    trainer.fit(ensemble, datamodule=dm)
    moved = changed_entries(before, state_snapshot(ensemble.members[member]))
    frozen_grads = [r[f"{member}/grad_norm"] for r in recorder.rows]
    if any(g != 0.0 for g in frozen_grads):
        moved.append("gradient (non-zero grad norm)")
    csv_path = out_dir / f"debug_freeze_{member}.csv"
    recorder.write(csv_path)
    png = plot_loss_curves(csv_path, out_dir / f"debug_freeze_{member}.png", title=f"{member} frozen")
    return FreezeReport(member, csv_path, png, len(recorder.rows), moved)


# ---------------------------------------------------------------------- curves
def read_curves(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Steps, losses and gradient norms per member from a debug_freeze CSV or a Lightning CSV log.

    Lightning's `metrics.csv` writes train and validation metrics on separate rows; rows where
    a column is empty become NaN and are skipped when drawn.
    """
    if not path.is_file():
        raise AsdError(f"{path}: no such file; give a debug_freeze CSV or a run's logs/version_N/metrics.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise AsdError(f"{path}: no rows")

    def column(name: str) -> np.ndarray:
        return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])

    losses, norms = {}, {}
    for name in rows[0]:
        parts = name.split("/")
        if parts[0] == "train" and len(parts) == 3:  # Lightning: train/<member>/<what>
            parts = parts[1:]
        if len(parts) != 2:
            continue
        target = {"loss": losses, "grad_norm": norms}.get(parts[1])
        if target is not None:
            target[parts[0]] = column(name)
    if not losses and not norms:
        raise AsdError(
            f"{path}: no '<member>/loss' or 'train/<member>/loss' columns: not a debug_freeze or training log"
        )
    steps = column("step") if "step" in rows[0] else np.arange(len(rows), dtype=float)
    return steps, losses, norms


def plot_loss_curves(path: Path, out: Path | None = None, title: str = "") -> Path:
    """Two panels: losses and gradient norms, one line per member, log scale where values span decades."""
    steps, losses, norms = read_curves(path)
    out = out or path.with_suffix(".png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, curves, what in ((axes[0], losses, "loss"), (axes[1], norms, "gradient norm")):
        positive = []
        for name, values in sorted(curves.items()):
            keep = ~np.isnan(values)
            if keep.any():
                ax.plot(steps[keep], values[keep], label=name, marker="." if keep.sum() < 30 else None)
                positive.append(values[keep])
        allv = np.concatenate(positive) if positive else np.array([])
        if allv.size and (allv > 0).all() and allv.max() / allv.min() > 10:
            ax.set_yscale("log")  # members' losses differ by orders of magnitude
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.set_title(what)
        if curves:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
