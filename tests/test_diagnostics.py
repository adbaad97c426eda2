import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asd.diagnostics import changed_entries, plot_loss_curves, read_curves, state_snapshot
from asd.errors import AsdError
from asd.run.progress import show_progress

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_debug_freeze_records_every_step_and_proves_the_member_fixed(tmp_path):
    args = ("--freeze", "b2", "--epochs", "2", "debug=default", "branch=b2")
    res = run(str(REPO / "debug_freeze.py"), *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "b2 stayed frozen" in res.stdout
    path = tmp_path / "logs" / "debug_freeze_b2.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "step",
        "epoch",
        "b2/loss",
        "b2/grad_norm",
        "dcase_ae/loss",
        "dcase_ae/grad_norm",
        "stats/loss",  # the training-free reference: recorded like every member, always 0
        "stats/grad_norm",
    ]
    assert len(rows) == 4  # 2 epochs x 2 batches of the debug data
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["b2/grad_norm"]) == 0.0 for r in rows)
    assert all(float(r["dcase_ae/grad_norm"]) > 0.0 for r in rows)
    assert len({r["b2/loss"] for r in rows}) > 1  # the frozen member's loss is still recorded per batch
    assert (tmp_path / "logs" / "debug_freeze_b2.png").stat().st_size > 0


def test_debug_freeze_bad_member_is_one_clear_error(tmp_path):
    res = run(str(REPO / "debug_freeze.py"), "--freeze", "b9", cwd=tmp_path)
    assert res.returncode == 2 and "unknown member" in res.stderr and "Traceback" not in res.stderr


def test_changed_entries_sees_parameters_buffers_and_extra_state():
    bn = torch.nn.BatchNorm1d(3)
    before = state_snapshot(bn)
    assert changed_entries(before, state_snapshot(bn)) == []
    bn.train()
    bn(torch.randn(8, 3))  # moves running statistics only
    assert changed_entries(before, state_snapshot(bn)) == [
        "num_batches_tracked",
        "running_mean",
        "running_var",
    ]
    assert changed_entries({"x": {"a": torch.ones(1)}}, {"x": {"a": torch.zeros(1)}}) == ["x"]
    assert changed_entries({"x": torch.ones(1)}, {"x": torch.ones(1, dtype=torch.float64)}) == ["x"]


def test_plot_loss_curve_reads_a_lightning_log(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,step,train/b2/loss,train/b2/grad_norm,val/b2/loss\n"
        "0,0,2.0,0.5,\n0,1,1.0,,\n0,1,,,1.5\n0,2,0.1,0.2,\n"
    )
    steps, losses, norms = read_curves(log)
    assert list(losses) == ["b2"] and list(norms) == ["b2"]
    assert steps.tolist() == [0, 1, 1, 2]
    res = run(
        str(REPO / "tools" / "plot_loss_curve.py"), str(log), "--out", str(tmp_path / "c.png"), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.png").stat().st_size > 0
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(AsdError, match="no '<member>/loss'"):
        plot_loss_curves(bad)
    res = run(str(REPO / "tools" / "plot_loss_curve.py"), str(tmp_path / "none.csv"), cwd=tmp_path)
    assert res.returncode == 2 and "no such file" in res.stderr


def test_progress_bars_are_quiet_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not show_progress()
