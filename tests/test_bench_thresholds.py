"""benchmarks/bench_thresholds.py: every way of fitting thresholds, refitted on a run's reference scores."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_thresholds.py"
_spec = importlib.util.spec_from_file_location("bench_thresholds", SCRIPT)
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)


def test_every_way_counts_its_decisions_on_the_test_clips_by_hand():
    """Reference normals 1..5 of one section: the normal bound is 5.6556 (by hand in test_calibration).
    Test normals 0, 5, 6 and anomalies 7, 2: one normal and one anomaly above it."""
    out = bt.refit(
        reference_final=np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        reference_section=np.zeros(5, dtype=np.int64),
        reference_domain=np.zeros(5, dtype=np.int64),
        num_sections=1,
        final=np.array([0.0, 5.0, 6.0, 7.0, 2.0]),
        anomalous=np.array([False, False, False, True, True]),
        section=np.zeros(5, dtype=np.int64),
        percentile=0.9,
        fence=3.0,
    )
    assert set(out) == set(bt.WAYS)
    assert out["normal"] == {"tnr": pytest.approx(2 / 3), "tpr": 0.5}
    # one section: the pooled threshold is its own, so shrinking towards it changes nothing
    assert out["normal, shrinkage 2"] == out["normal"]
    assert out["gamma, shrinkage 2"] == out["gamma"]
    # one domain: min_domain has nothing to leave out
    assert out["normal, min_domain 3"] == out["normal"]


def test_min_domain_fits_the_section_without_its_target_pair_where_the_run_cross_fitted():
    """Source normals 1..5 and a target pair at 40 and 50: every normal sets a bound far above the
    test clips; min_domain 3 fits the bound of 1..5 (5.6556, by hand in test_calibration), which
    passes the normal at 5 and flags the anomalies at 7 and 9 and the normal at 6."""
    args = dict(
        reference_final=np.array([1.0, 2.0, 40.0, 3.0, 4.0, 50.0, 5.0]),
        reference_section=np.zeros(7, dtype=np.int64),
        reference_domain=np.array([0, 0, 1, 0, 0, 1, 0]),
        num_sections=1,
        final=np.array([0.0, 5.0, 6.0, 7.0, 9.0]),
        anomalous=np.array([False, False, False, True, True]),
        section=np.zeros(5, dtype=np.int64),
        percentile=0.9,
        fence=None,
    )
    out = bt.refit(**args)
    assert out["normal"] == {"tnr": 1.0, "tpr": 0.0}
    assert out["normal, min_domain 3"] == {"tnr": pytest.approx(2 / 3), "tpr": 1.0}
    held_out = bt.refit(**{**args, "small_out": False})  # a held-out split (or a raw final) keeps all
    assert held_out["normal, min_domain 3"] == held_out["normal"] == out["normal"]


def test_rates_use_each_clips_own_section_threshold():
    r = bt.rates(
        np.array([1.0, 1.0, 3.0, 3.0]),
        np.array([False, False, True, True]),
        np.array([0, 1, 0, 1]),
        np.array([0.5, 2.0]),
    )
    assert r == {"tnr": 0.5, "tpr": 1.0}  # section 0's normal at 1 > 0.5 is flagged, section 1's is not


def test_the_summary_gives_each_ways_mean_distance_from_the_aim_and_its_lowest_tnr():
    runs = [
        {"percentile": 0.9, "ways": {w: {"tnr": 0.8, "tpr": 0.5} for w in bt.WAYS}},
        {"percentile": 0.9, "ways": {w: {"tnr": 0.95, "tpr": 0.3} for w in bt.WAYS}},
    ]
    s = bt.summarise(runs)["normal"]
    assert s == {
        "tnr_mean": pytest.approx(0.875),
        "tnr_error": pytest.approx(0.075),
        "tpr_mean": pytest.approx(0.4),
        "tnr_min": 0.8,
    }


def test_a_folder_without_runs_is_one_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), f"empty={tmp_path}", "--results", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert f"no run folders with a calibration.pt under {tmp_path}/<config>/seed*/" in done.stderr
    assert "Traceback" not in done.stderr
