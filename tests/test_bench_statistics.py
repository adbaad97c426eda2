"""benchmarks/bench_statistics.py: clip statistics, the supervised linear model, per-kind AUCs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_statistics.py"
_spec = importlib.util.spec_from_file_location("bench_statistics", SCRIPT)
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_statistics"] = bs
_spec.loader.exec_module(bs)


def test_kind_aucs_rank_each_kind_against_its_own_groups_normals():
    # group 0: normals 0.1 0.2, a click at 0.3 (AUC 1) and a tone at 0.15 (AUC 0.5)
    # group 1: normals 0.5 0.6, a click at 0.4 (AUC 0)
    scores = np.array([0.1, 0.2, 0.3, 0.15, 0.5, 0.6, 0.4])
    y = np.array([0, 0, 1, 1, 0, 0, 1])
    kinds = np.array(["none", "none", "clicks", "tone", "none", "none", "clicks"])
    group = np.array([0, 0, 0, 0, 1, 1, 1])
    assert bs.kind_aucs(scores, kinds, y, group) == {"clicks": 0.5, "tone": 0.5}


def test_the_supervised_model_scores_every_clip_out_of_fold():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 3)) + 3.0 * y[:, None]  # separable: held-out rows still rank right
    domain = np.tile([0, 1], 20)
    out = bs.supervised(x, y, np.zeros(40, dtype=int), domain, seed=0)
    assert out.shape == (40,) and out[y == 1].min() > out[y == 0].max()
    # pure noise in 200 dims: a model scoring its own training rows would separate them (AUC near 1);
    # out of fold it cannot
    noise = rng.normal(size=(40, 200))
    labels = rng.permutation(y)
    held_out = bs.supervised(noise, labels, np.zeros(40, dtype=int), domain, seed=0)
    assert roc_auc_score(labels, held_out) < 0.8


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_tiny_run_writes_one_row_per_method_and_seed(tmp_path):
    result = bs.main(["--seeds", "3", "--test-per-class", "5", "--name", "tiny", "--results", str(tmp_path)])
    official = result["runs"][0]["official"]
    assert set(official) == set(bs.METHODS) and all(0.0 <= v <= 1.0 for v in official.values())
    assert result["runs"][0]["test_clips"] == 80  # 2 machines x 2 sections x 2 domains x 2 labels x 5
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["seeds"] == [3] and saved["runs"][0]["official"] == pytest.approx(official)
    text = (tmp_path / "tiny.md").read_text()
    assert "| supervised linear |" in text and "AUC per anomaly kind" in text
