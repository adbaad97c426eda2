"""benchmarks/bench_plateau.py: validation curves read from run logs, the plateau measure (no training)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plateau.py"
_spec = importlib.util.spec_from_file_location("bench_plateau", SCRIPT)
bp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)


def write_log(run_dir: Path, version: int, rows: list[dict]) -> None:
    path = run_dir / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = ["epoch", "step", "train/b2/loss", "val/b2/loss", "val/b4/loss", "val/stats/loss"]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_the_late_share_is_the_drop_left_for_the_last_30_percent_of_the_epochs():
    # 10 epochs: the first 7 reach 2.0 from 10.0, the last 3 reach 1.0: 1/9 of the drop came late
    curve = [10.0, 6.0, 4.0, 3.0, 2.5, 2.2, 2.0, 1.8, 1.5, 1.0]
    found = bp.plateau(curve)
    assert found == {"epochs": 10, "drop": 9.0, "late": pytest.approx(1.0 / 9.0), "best": 9}
    assert bp.plateau([5.0, 4.0, 3.0, 3.5, 3.6]) == {"epochs": 5, "drop": 2.0, "late": 0.0, "best": 2}
    assert bp.plateau([1.0, 1.0, 1.0]) is None  # nothing trained
    assert bp.plateau([2.0, 1.0]) is None  # too short to say


def test_curves_are_read_per_member_across_log_versions_training_rows_skipped(tmp_path):
    run = tmp_path / "synthetic-default" / "seed0"
    write_log(run, 0, [{"epoch": 0, "step": 3, "train/b2/loss": 9.0}, {"epoch": 0, "val/b2/loss": 4.0}])
    write_log(
        run, 1, [{"epoch": 1, "val/b2/loss": 3.0, "val/b4/loss": 1.0}, {"epoch": 2, "val/b2/loss": 2.5}]
    )
    assert bp.val_curves(run) == {"b2": [4.0, 3.0, 2.5], "b4": [1.0]}


def test_the_script_writes_its_table(tmp_path):
    rows = [
        {"epoch": e, "val/b2/loss": 10.0 / (e + 1), "val/b4/loss": 5.0 - 0.1 * e, "val/stats/loss": 0.0}
        for e in range(10)
    ]
    write_log(tmp_path / "runs" / "first-shot" / "seed0", 0, rows)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "runs"), "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "| b2 | 10 | 1/1 |" in out.stdout  # 1/x: most of the drop is early
    assert "| b4 | 10 | 0/1 |" in out.stdout  # a straight line never flattens
    assert "| stats |" not in out.stdout
    assert (tmp_path / "results" / "bench_plateau.md").read_text() in out.stdout
