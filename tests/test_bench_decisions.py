"""benchmarks/bench_decisions.py: official score and decisions of `final` from run folders (no training)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decisions.py"
_spec = importlib.util.spec_from_file_location("bench_decisions", SCRIPT)
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)

HEADER = "method,machine,section,auc,official,tpr,tnr"


def write_run(run_dir: Path, final: str, official: float, tpr: float, tnr: float, percentile=0.9) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"seed: 0\nthreshold_percentile: {percentile}\n")
    (run_dir / "summary.md").write_text(
        f"# asd run summary\n\n- final score: `{final}` (chosen by final=auto)\n"
    )
    rows = [
        HEADER,
        "b2,valve,00,0.7,,,",
        "b2,all,all,,0.61,,",  # another method: never read
        f"{final},valve,00,0.8,,,",
        f"{final},all,all,,{official},{tpr},{tnr}",
    ]
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_a_run_gives_its_final_methods_official_score_and_decision_rates(tmp_path):
    write_run(tmp_path / "r", "zmean", 0.7, 0.25, 0.85)
    assert bd.read_run(tmp_path / "r") == {
        "final": "zmean",
        "official": 0.7,
        "tpr": 0.25,
        "tnr": 0.85,
        "percentile": 0.9,
    }


def test_labels_are_compared_per_configuration_with_the_tnr_aim(tmp_path):
    # seeds 2 and 10: listed in seed order, not name order
    for seed, (official, tnr) in zip((2, 10), [(0.6, 1.0), (0.7, 0.8)], strict=True):
        write_run(tmp_path / "a" / "first-shot" / f"seed{seed}", "zmean", official, 0.1, tnr)
    write_run(tmp_path / "b" / "first-shot" / "seed0", "meta", 0.5, 0.6, 0.5)
    out = tmp_path / "results"
    res = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"one={tmp_path / 'a'}",
            f"two={tmp_path / 'b'}",
            "--results",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "bench_decisions.json").read_text())["summary"]["first-shot"]
    assert summary["one"]["official_mean"] == pytest.approx(0.65)
    assert summary["one"]["official_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary["one"]["tnr_error"] == pytest.approx(0.1)  # |1.0 - 0.9| and |0.8 - 0.9|
    assert summary["two"] == pytest.approx(
        {"official_mean": 0.5, "official_std": 0.0, "tpr_mean": 0.6, "tnr_mean": 0.5, "tnr_error": 0.4}
    )
    md = (out / "bench_decisions.md").read_text()
    assert "| one | 0.600 0.700 | 0.650 ± 0.071 | 0.10 | 0.90 | 0.10 |" in md


def test_a_baseline_compares_every_other_label_seed_by_seed(tmp_path):
    for label, scores in {"base": (0.60, 0.70, 0.80), "new": (0.62, 0.69, 0.83), "one": (0.9,)}.items():
        for seed, official in zip((1, 2, 3), scores, strict=False):
            write_run(tmp_path / label / "first-shot" / f"seed{seed}", "zmean", official, 0.1, 0.9)
    write_run(
        tmp_path / "new" / "first-shot" / "seed4", "zmean", 0.99, 0.1, 0.9
    )  # no baseline seed: left out
    out = tmp_path / "results"
    given = [f"{label}={tmp_path / label}" for label in ("base", "new", "one")]
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *given, "--baseline", "base", "--results", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    paired = json.loads((out / "bench_decisions.json").read_text())["paired"]["first-shot"]
    new = paired["new"]  # differences +0.02, -0.01, +0.03: mean 0.0133, std 0.0208
    assert (new["n"], new["higher"], new["lower"], new["equal"]) == (3, 2, 1, 0)
    assert new["diff_mean"] == pytest.approx(0.04 / 3) and new["diff_std"] == pytest.approx(
        0.0208167, rel=1e-5
    )
    assert new["verdict"] == "noise"  # the mean lies within one std of the differences
    assert paired["one"]["verdict"] == "noise" and paired["one"]["n"] == 1  # one seed: nothing to judge by
    assert (
        bd.paired(
            [{"seed": "a", "official": 0.7}, {"seed": "b", "official": 0.8}],
            [{"seed": "a", "official": 0.6}, {"seed": "b", "official": 0.69}],
        )["verdict"]
        == "higher"
    )
    md = (out / "bench_decisions.md").read_text()
    assert "| new | 3 | +0.0133 ± 0.0208 | 2 / 1 / 0 | noise |" in md
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *given, "--baseline", "old"], capture_output=True, text=True
    )
    assert res.returncode != 0 and "--baseline 'old' is none of the labels" in res.stderr


def test_a_bad_label_is_one_clear_error(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode != 0 and "expected LABEL=DIR" in res.stderr
