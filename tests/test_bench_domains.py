"""benchmarks/bench_domains.py: within-domain AUCs, the domains' shift, and the aligned oracle."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asd.errors import AsdError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_domains.py"
_spec = importlib.util.spec_from_file_location("bench_domains", SCRIPT)
bd = importlib.util.module_from_spec(_spec)
sys.modules["bench_domains"] = bd
_spec.loader.exec_module(bd)

HEADER = ["file", "machine", "section", "domain", "label", "path", "m", "final"]


def write_run(folder: Path, values: dict[tuple[str, str], list[float]]) -> Path:
    """A run folder whose scores.csv holds one section, column m = the given values per (domain, label)."""
    folder.mkdir(parents=True)
    with open(folder / "scores.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(HEADER)
        for (domain, label), scores in values.items():
            for i, v in enumerate(scores):
                name = f"section_00_{domain}_test_{label}_{i:04d}.wav"
                out.writerow([name, "fan", "00", domain, label, f"/data/{name}", v, v])
    return folder


# source normals 0 1, source anomalies 2 3, target normals 4 5, target anomalies 6 7
SHIFTED = {
    ("source", "normal"): [0.0, 1.0],
    ("source", "anomaly"): [2.0, 3.0],
    ("target", "normal"): [4.0, 5.0],
    ("target", "anomaly"): [6.0, 7.0],
}


def test_a_method_perfect_within_each_domain_loses_only_between_them(tmp_path):
    run = write_run(tmp_path / "run", SHIFTED)
    m = bd.run_measures(run, ["m"])["m"]
    # within each domain every anomaly is above every normal; every target normal is above
    # every source normal
    assert (m["source"], m["target"], m["shift"]) == (1.0, 1.0, 1.0)
    # official (2023): source normals {0, 1} vs all anomalies: AUC 1; target normals {4, 5} vs
    # anomalies {2, 3, 6, 7}: 4 of 8 pairs ranked right, AUC 0.5; pAUC (max_fpr 0.1) over the section:
    # the highest normal (5) lies below two anomalies and above two, so the ROC is at TPR 0.5 from
    # FPR 0 to 0.1 (area 0.05), and sklearn's standardised partial AUC is
    # 0.5 * (1 + (0.05 - 0.1 ** 2 / 2) / (0.1 - 0.1 ** 2 / 2)) = 0.7368...
    pauc = 0.5 * (1 + (0.5 * 0.1 - 0.1**2 / 2) / (0.1 - 0.1**2 / 2))
    assert m["official"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / pauc))
    # aligned: target scores moved by median(source normals) - median(target normals) = -4, so
    # target normals {0, 1} and anomalies {2, 3}: every anomaly above every normal, official 1
    assert m["aligned"] == pytest.approx(1.0)


def test_a_method_on_one_scale_gains_nothing_from_alignment(tmp_path):
    one_scale = {
        ("source", "normal"): [0.0, 2.0],
        ("source", "anomaly"): [1.0, 3.0],
        ("target", "normal"): [0.0, 2.0],
        ("target", "anomaly"): [3.0, 1.0],
    }
    m = bd.run_measures(write_run(tmp_path / "run", one_scale), ["m"])["m"]
    assert m["shift"] == 0.5 and m["source"] == m["target"] == 0.75
    assert m["aligned"] == pytest.approx(m["official"])


def test_the_script_writes_mean_and_spread_over_runs(tmp_path):
    a = write_run(tmp_path / "a", SHIFTED)
    flipped = {k: [-v for v in vals] for k, vals in SHIFTED.items()}  # every AUC turns to 0
    b = write_run(tmp_path / "b", flipped)
    result = bd.main([str(a), str(b), "--methods", "m", "final", "--results", str(tmp_path / "out")])
    assert [r["measures"]["m"]["source"] for r in result["runs"]] == [1.0, 0.0]
    text = (tmp_path / "out" / "bench_domains.md").read_text()
    # mean 0.5, sample std of {1, 0} = 0.707
    assert "| m | 0.500 ± 0.707 | 0.500 ± 0.707 | 0.500 ± 0.707 |" in text
    assert json.loads((tmp_path / "out" / "bench_domains.json").read_text())["methods"] == ["m", "final"]


def test_bad_inputs_name_the_folder_and_the_fix(tmp_path):
    run = write_run(tmp_path / "run", SHIFTED)
    with pytest.raises(AsdError, match="no column \\['b9'\\]"):
        bd.run_measures(run, ["b9"])
    with pytest.raises(AsdError, match="no scored clips"):
        bd.run_measures(write_run(tmp_path / "empty", {}), ["m"])
    one_domain = write_run(tmp_path / "one", {k: v for k, v in SHIFTED.items() if k[0] == "source"})
    with pytest.raises(AsdError, match="fan/00 lacks normals or anomalies of a domain"):
        bd.run_measures(one_domain, ["m"])
    # from the command line: one line naming the folder, no traceback
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nowhere"), "--results", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'nowhere'}: no scores.csv; give finished run folders (train.py's run_dir)"
    )
