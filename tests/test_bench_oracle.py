"""benchmarks/bench_oracle.py: the oracle's z-scores, the mix it searches, and runs it cannot read."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_oracle.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_oracle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_groups_normals_get_mean_0_and_std_1_from_their_own_statistics(bench):
    rng = np.random.default_rng(0)
    raw = np.c_[rng.normal(5, 2, 12), rng.normal(-3, 0.5, 12)]
    groups = np.array(["a/00/source"] * 6 + ["a/00/target"] * 6)
    normal = np.array([True] * 4 + [False] * 2 + [True] * 5 + [False])
    z = bench.oracle_z(raw, groups, normal, "run")
    for g in np.unique(groups):
        ref = z[(groups == g) & normal]
        assert np.allclose(ref.mean(axis=0), 0) and np.allclose(ref.std(axis=0, ddof=1), 1)
    # an anomaly is placed by its own group's normals: (x - their mean) / their std, by hand
    by_hand = (raw[5, 0] - raw[:4, 0].mean()) / raw[:4, 0].std(ddof=1)
    assert z[5, 0] == pytest.approx(by_hand)
    with pytest.raises(bench.AsdError, match="group a/00/target has 1 normal test clip"):
        bench.oracle_z(raw, groups, np.array([True] * 6 + [True] + [False] * 5), "run")


def test_the_mix_finds_the_members_where_they_carry_the_signal_and_the_reference_where_it_does(bench):
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(50), np.ones(50)]
    signal = labels * 2.0 + rng.normal(size=100)
    noise = rng.normal(size=(100, 2))

    def score(values):
        return roc_auc_score(labels, values)

    best, at = bench.best_mix(
        noise[:, 0], np.c_[signal, signal], np.array([0.0, 0.0]), (0.0, 0.5, 1.0), score
    )
    assert at == {"share": 0.0, "members": "equal"} and best == pytest.approx(score(signal))
    best, at = bench.best_mix(signal, noise, np.array([1.0, 3.0]), (0.0, 0.5, 1.0), score)
    assert at["share"] == 1.0 and best == pytest.approx(score(signal))


def test_a_folder_without_a_checkpoint_is_one_clear_error(tmp_path):
    run = tmp_path / "a, run"
    run.mkdir()
    with open(run / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "machine", "section", "domain", "label", "path", "final"])
        w.writerow(["a.wav", "fan", "00", "source", "normal", "a.wav", "0.1"])
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--results", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        == f"error: {run}: no calibration.pt; the run fused nothing, so there is no mix to bound"
    )
    assert not (tmp_path / "out").exists()
