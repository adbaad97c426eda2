"""benchmarks/bench_kinds.py: AUC per anomaly kind of every method, from finished runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asd.errors import AsdError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kinds.py"
_spec = importlib.util.spec_from_file_location("bench_kinds", SCRIPT)
bk = importlib.util.module_from_spec(_spec)
sys.modules["bench_kinds"] = bk
_spec.loader.exec_module(bk)

# (domain, label, kind, score of m): source normals 0 1, target normals 5 6; clicks above every
# normal of their domain, tilt between them
CLIPS = [
    ("source", "normal", "none", 0.0),
    ("source", "normal", "none", 1.0),
    ("source", "anomaly", "clicks", 2.0),
    ("source", "anomaly", "tilt", 0.5),
    ("target", "normal", "none", 5.0),
    ("target", "normal", "none", 6.0),
    ("target", "anomaly", "clicks", 7.0),
    ("target", "anomaly", "tilt", 5.5),
]


def write_run(tmp_path: Path, clips=CLIPS, kinds_file: bool = True) -> Path:
    """A synthetic dataset's anomaly_kinds.csv (the clips themselves are not read) and a run folder
    whose scores.csv scores them: column m as given, final = -m."""
    data, run = tmp_path / "data", tmp_path / "run"
    run.mkdir(parents=True)
    (data / "fan" / "test").mkdir(parents=True)
    names = [f"section_00_{d}_test_{label}_{i:04d}.wav" for i, (d, label, _, _) in enumerate(clips)]
    if kinds_file:
        with open(data / "anomaly_kinds.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["file_name", "label", "kind"])
            out.writerows([f"fan/test/{n}", c[1], c[2]] for n, c in zip(names, clips, strict=True))
    with open(run / "scores.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", "machine", "section", "domain", "label", "path", "m", "final", "decision"])
        for n, (d, label, _, v) in zip(names, clips, strict=True):
            out.writerow([n, "fan", "00", d, label, str(data / "fan" / "test" / n), v, -v, 0])
    return run


def test_each_kind_is_ranked_against_its_own_domains_normals(tmp_path):
    m = bk.run_measures(write_run(tmp_path), None)
    assert list(m) == ["m", "final"]  # every score column, not the decision
    # clicks: above both normals in each domain, AUC 1; tilt: between them in each, 1 of 2 pairs
    assert m["m"]["kinds"] == {"clicks": 1.0, "tilt": 0.5}
    assert m["final"]["kinds"] == {"clicks": 0.0, "tilt": 0.5}
    # official (2023): source normals {0, 1} against all anomalies {2, .5, 7, 5.5}: 7 of 8 pairs;
    # target normals {5, 6} against them: 3 of 8; pAUC over the section: the highest normal (6)
    # is above three of four anomalies, so TPR 0.25 up to FPR 0.25
    pauc = 0.5 * (1 + (0.25 * 0.1 - 0.1**2 / 2) / (0.1 - 0.1**2 / 2))
    assert m["m"]["official"] == pytest.approx(3 / (1 / (7 / 8) + 1 / (3 / 8) + 1 / pauc))


def test_the_script_writes_mean_and_spread_over_runs(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", [(d, label, k, -v if k == "clicks" else v) for d, label, k, v in CLIPS])
    out = tmp_path / "results"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), "--methods", "m", "--name", "t", "--results", str(out)],
        check=True,
        capture_output=True,
    )
    result = json.loads((out / "t.json").read_text())
    assert [r["measures"]["m"]["kinds"]["clicks"] for r in result["runs"]] == [1.0, 0.0]
    assert "| m | " in (out / "t.md").read_text()
    assert "0.50 ± 0.71 | 0.50 ± 0.00 |" in (out / "t.md").read_text()  # clicks, then tilt


def test_runs_off_the_synthetic_data_get_one_clear_error(tmp_path):
    run = write_run(tmp_path, kinds_file=False)
    with pytest.raises(AsdError, match="no anomaly_kinds.csv in .*data=synthetic"):
        bk.run_measures(run, None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(run)], capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    with pytest.raises(AsdError, match=r"no column \['b9'\]"):
        bk.run_measures(write_run(tmp_path / "other"), ["b9"])
