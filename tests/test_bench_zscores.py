"""benchmarks/bench_zscores.py: runs it cannot read are one line naming the folder, not a traceback."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zscores.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False)


def test_a_folder_without_scores_and_a_run_of_two_sections_are_each_one_clear_error(tmp_path):
    empty = tmp_path / "not, a run"
    empty.mkdir()
    res = run(str(empty), "--name", str(tmp_path / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"error: {empty}: no scores.csv; give run folders that train.py finished"
    two = tmp_path / "two"
    two.mkdir()
    with open(two / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "machine", "section", "domain", "label"])
        w.writerow(["a.wav", "fan", "00", "source", "normal"])
        w.writerow(["b.wav", "fan", "01", "source", "anomaly"])
    res = run(str(two), "--name", str(tmp_path / "out"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "2 machine/sections; this benchmark reads one-section runs" in res.stderr
    assert not (tmp_path / "out.md").exists()
