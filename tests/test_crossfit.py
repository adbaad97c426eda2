"""Cross-fitting (`asd.run.crossfit`): folds, when it is on, and a run calibrated on out-of-fold scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from asd.config import validate
from asd.data.index import index_dataset, parse_path
from asd.errors import AsdError
from asd.run import FinishedRun, train
from asd.run.crossfit import assign_folds, crossfit_folds, fold_config
from asd.run.predict import context_of, infer, member_scores

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(run_dir: Path, *overrides: str):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=["debug=default", f"run_dir='{run_dir}'", *overrides])


def test_folds_spread_every_group_and_stay_the_same_size(tiny_root):
    train_table = index_dataset(tiny_root).select(split="train")  # 2 machines x (8 source + 2 target)
    fold = assign_folds(train_table, 5, seed=0)
    assert sorted(set(fold.tolist())) == [0, 1, 2, 3, 4]
    assert np.bincount(fold).tolist() == [4, 4, 4, 4, 4]
    for machine in ("rotor", "valve"):
        target = [
            f for c, f in zip(train_table, fold, strict=True) if c.machine == machine and c.domain == "target"
        ]
        source = [
            f for c, f in zip(train_table, fold, strict=True) if c.machine == machine and c.domain == "source"
        ]
        assert len(set(target)) == 2  # a group of 2 lands in 2 folds
        assert np.bincount(source, minlength=5).max() - np.bincount(source, minlength=5).min() <= 1
    assert np.array_equal(fold, assign_folds(train_table, 5, seed=0))
    assert not np.array_equal(fold, assign_folds(train_table, 5, seed=1))


def test_cross_fitting_is_on_for_small_runs_only(tiny_root, tmp_path):
    train_table = index_dataset(tiny_root).select(split="train")  # 20 clips
    cfg = config(tmp_path)
    assert crossfit_folds(cfg, train_table)[0] == 2  # debug=default: 2 folds
    folds, why = crossfit_folds(config(tmp_path, "crossfit.max_clips=5"), train_table)
    assert folds == 0 and "20 training clips > crossfit.max_clips=5" in why
    assert crossfit_folds(config(tmp_path, "crossfit.folds=25"), train_table)[0] == 0  # more folds than clips
    assert crossfit_folds(config(tmp_path, "crossfit.folds=0"), train_table) == (0, "crossfit.folds=0")
    assert crossfit_folds(config(tmp_path, "crossfit.max_clips=null"), train_table)[0] == 2
    folds, why = crossfit_folds(config(tmp_path, "trainer.strategy=ddp"), train_table)
    assert folds == 0 and "trainer strategy ddp" in why
    # a section of one clip: the copy that leaves it out could not score that section
    lone = train_table.select(where=lambda c: c.machine == "valve" or c.path == train_table[0].path)
    folds, why = crossfit_folds(cfg, lone)
    assert folds == 0 and f"{train_table[0].machine}/section_00 hold a single training clip" in why


def test_a_copy_leaves_out_the_references_the_fusions_do_not_read(tmp_path):
    cfg = config(tmp_path, "freeze=[b2,stats]", "ckpt.stats=/x.ckpt", "ckpt.b2=/y.ckpt")
    copy = fold_config(cfg, ["b2", "b3"])
    assert copy.reference is False and list(copy.freeze) == ["b2"] and dict(copy.ckpt) == {"b2": "/y.ckpt"}
    assert list(fold_config(cfg, ["b2", "stats_knn"]).reference) == ["stats"]


def test_one_fold_is_refused_naming_the_key(tmp_path):
    with pytest.raises(AsdError, match=r"crossfit\.folds"):
        validate(config(tmp_path, "crossfit.folds=1"))


def test_a_run_calibrates_on_out_of_fold_scores_of_every_training_clip(tmp_path, caplog):
    run_dir = tmp_path / "r"
    # stats_knn without calibration: a training clip scored against a bank that holds it is 0
    overrides = (
        "branch=b2",
        "reference=[stats]",
        "fusion.references=[stats_knn]",
        "branches.stats.calibrate=false",
        "branches.stats.temporal=false",  # its max of three distances needs them calibrated
        "plots=false",
        "crossfit.folds=3",
    )
    with caplog.at_level("INFO"):
        train(config(run_dir, *overrides))
    assert "data: 20 training clips, none held out (cross-fitted, 3 folds)" in caplog.text
    assert list(json.loads((run_dir / "stages.json").read_text()))[:3] == ["fit", "crossfit", "backends"]
    crossfit = torch.load(run_dir / "crossfit.pt", weights_only=True)
    backends = torch.load(run_dir / "backends.pt", weights_only=True)
    assert crossfit["fold"].bincount().tolist() == [7, 7, 6]
    for column in ("b2", "stats_knn"):
        assert torch.equal(backends["reference_scores"][column], crossfit["reference_scores"][column])
        assert crossfit["reference_scores"][column].shape == (20,)
        assert torch.isfinite(crossfit["fake_scores"][column]).all()
    # out of fold: no training clip is its own nearest neighbour
    assert (crossfit["reference_scores"]["stats_knn"] > 1e-3).all()
    summary = (run_dir / "summary.md").read_text()
    assert "cross-fitted (3 folds)" in summary
    assert "out-of-fold scores of 40 pseudo-anomalies of 20 cross-fitted (3 folds) normals" in caplog.text

    # test clips: a fused member's column is the mean of the copies' scores (the scale calibration
    # saw); a fused reference's column is reported as the run's own reference computes it, while the
    # fusions read its copies' mean; tools/score.py reproduces them
    rows = list(csv.DictReader(open(run_dir / "scores.csv", newline="")))
    finished = FinishedRun(run_dir)
    assert len(finished.copies) == 3
    dataset = finished.dataset([parse_path(r["path"]) for r in rows])
    each = [
        infer(lambda b, e=e: member_scores(e, b), dataset, torch.device("cpu"), 8) for e in finished.copies
    ]
    own = infer(lambda b: member_scores(finished.ensemble, b), dataset, torch.device("cpu"), 8)
    bagged = {column: np.mean([e[column] for e in each], axis=0) for column in ("b2", "stats_knn")}
    for column in bagged:
        assert not np.allclose(bagged[column], own[column], rtol=1e-3)  # the copies are not the run
    np.testing.assert_allclose([float(r["b2"]) for r in rows], bagged["b2"], rtol=1e-5, atol=1e-6)
    for column in ("stats_knn", "stats_mahalanobis"):
        np.testing.assert_allclose([float(r[column]) for r in rows], own[column], rtol=1e-5, atol=1e-6)
    fused = finished.calibration.combine({**own, **bagged}, context_of(dataset))
    np.testing.assert_allclose([float(r["zmean"]) for r in rows], fused["zmean"], rtol=1e-5, atol=1e-6)
    again = finished.score([parse_path(r["path"]) for r in rows])
    np.testing.assert_allclose(again["final"], [float(r["final"]) for r in rows], rtol=1e-5, atol=1e-6)

    caplog.clear()
    with caplog.at_level("INFO"):
        train(config(run_dir, *overrides))  # finished: restored from crossfit.pt, not trained again
    assert "stage crossfit: skipped (finished earlier" in caplog.text
    assert "crossfit: fold" not in caplog.text


def test_a_large_run_holds_out_instead_and_says_why(tmp_path, caplog):
    run_dir = tmp_path / "r"
    with caplog.at_level("INFO"):
        train(config(run_dir, "branch=b2", "reference=false", "plots=false", "crossfit.max_clips=5"))
    assert "stage crossfit: skipped: off (20 training clips > crossfit.max_clips=5" in caplog.text
    assert "crossfit" not in json.loads((run_dir / "stages.json").read_text())
    assert not (run_dir / "crossfit.pt").exists()


def test_copies_keep_no_weights_of_frozen_members_and_still_load(tmp_path):
    run_dir = tmp_path / "r"
    train(config(run_dir, "branch=[b2,b3]", "freeze=b3", "reference=false", "plots=false"))
    crossfit = torch.load(run_dir / "crossfit.pt", weights_only=True)
    keys = [k for c in crossfit["copies"] for k in c["state_dict"]]
    assert any(k.startswith("members.b2.") for k in keys)
    assert not any(k.startswith("members.b3.") for k in keys)  # b3 is the run's own, unchanged
    finished = FinishedRun(run_dir)
    own = finished.ensemble.members["b3"].state_dict()
    for copy in finished.copies:
        theirs = copy.members["b3"].state_dict()
        assert theirs.keys() == own.keys()
        assert all(torch.equal(v, own[k]) for k, v in theirs.items() if torch.is_tensor(v))
