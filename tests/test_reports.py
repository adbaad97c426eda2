"""The run folder's reports: decision metrics, the midpoint threshold, errors.csv, embeddings and
their t-SNE maps, loss curves, per-method histograms, heatmap settings (issue 15)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import precision_recall_fscore_support

from asd.calibration import Calibration, fit_midpoint_thresholds, threshold_normals
from asd.config import validate
from asd.data.synthetic import SyntheticConfig, generate
from asd.data.table import Clip
from asd.errors import AsdError
from asd.evaluation import clip_far_out
from asd.evaluation.heatmaps import check_cmap, heatmap_rows
from asd.evaluation.metrics import decision_counts, decision_rates, decision_table
from asd.evaluation.plots import plot_member_losses, plot_tsne, read_member_losses
from asd.evaluation.threshold import midpoint_threshold
from asd.run import train
from asd.run.calibrate import reference_normals
from asd.run.job import prepare
from asd.run.predict import context_of

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")


def config(run_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=["debug=default", f"run_dir='{run_dir}'", *overrides])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- decision metrics, by hand
def test_decision_rates_match_hand_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])  # 3 anomalies, 5 normals
    d = np.array([1, 1, 0, 1, 0, 0, 0, 0])  # tp 2, fn 1, fp 1, tn 4
    counts = decision_counts(y, d)
    assert counts == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    rates = decision_rates(**counts)
    assert rates["tpr"] == pytest.approx(2 / 3)
    assert rates["tnr"] == pytest.approx(4 / 5)
    assert rates["precision"] == pytest.approx(2 / 3)
    assert rates["f1"] == pytest.approx(2 / 3)
    p, r, f, _ = precision_recall_fscore_support(y, d, average="binary", zero_division=0)
    assert (rates["precision"], rates["tpr"], rates["f1"]) == pytest.approx((p, r, f))


def test_decision_rates_over_no_clips_are_zero():
    # normals only, nothing flagged: TPR and precision have no denominator -> 0 (zero_division=0)
    rates = decision_rates(**decision_counts([0, 0, 0], [0, 0, 0]))
    assert rates == {"tpr": 0.0, "tnr": 1.0, "precision": 0.0, "f1": 0.0}
    p, r, f, _ = precision_recall_fscore_support([0, 0, 0], [0, 0, 0], average="binary", zero_division=0)
    assert (p, r, f) == (0.0, 0.0, 0.0)
    # anomalies only, all flagged: TNR has no denominator -> 0
    assert decision_rates(**decision_counts([1, 1], [1, 1])) == {
        "tpr": 1.0,
        "tnr": 0.0,
        "precision": 1.0,
        "f1": 1.0,
    }


def test_decision_table_per_machine_section_domain_and_overall():
    def clip(i: int, domain: str, label: str) -> Clip:
        return Clip(f"/d/fan/test/c{i}.wav", "fan", "00", domain, "test", label)

    clips = [
        clip(0, "source", "anomaly"),
        clip(1, "source", "normal"),
        clip(2, "source", "normal"),
        clip(3, "target", "anomaly"),
        clip(4, "target", "normal"),
    ]
    rows = decision_table(clips, [1, 1, 0, 0, 0])
    by = {(r["machine"], r["section"], r["domain"]): r for r in rows}
    assert list(by) == [("fan", "00", "all"), ("fan", "00", "source"), ("fan", "00", "target"), ("all",) * 3]
    src, tgt, every = by[("fan", "00", "source")], by[("fan", "00", "target")], by[("all",) * 3]
    assert (src["tp"], src["fp"], src["tn"], src["fn"]) == (1, 1, 1, 0)
    assert (src["tpr"], src["tnr"], src["precision"]) == (1.0, 0.5, 0.5)
    assert src["f1"] == pytest.approx(2 / 3)
    # target: its one anomaly missed and nothing flagged: TPR 0, precision 0/0 -> 0
    assert (tgt["tp"], tgt["fp"], tgt["tn"], tgt["fn"]) == (0, 0, 1, 1)
    assert (tgt["tpr"], tgt["tnr"], tgt["precision"], tgt["f1"]) == (0.0, 1.0, 0.0, 0.0)
    assert (every["tp"], every["fp"], every["tn"], every["fn"]) == (1, 1, 2, 1)
    assert every["tpr"] == 0.5 and every["tnr"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------- the midpoint threshold, by hand
def test_midpoint_threshold_is_halfway_between_the_means():
    assert midpoint_threshold([1.0, 2.0, 3.0], [7.0, 9.0]) == 5.0  # (2 + 8) / 2
    with pytest.raises(AsdError, match="at least one of each"):
        midpoint_threshold([1.0], [])


def test_midpoint_thresholds_per_section_and_the_fallback_where_no_anomaly():
    fallback = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    normal = np.array([0.0, 2.0, 4.0, 1.0, 1.0])
    normal_section = torch.tensor([0, 0, 1, 1, 2])
    anomalous = np.array([6.0, 8.0, 5.0])
    anomalous_section = torch.tensor([0, 0, 1])
    t, kept, clipped = fit_midpoint_thresholds(fallback, normal, normal_section, anomalous, anomalous_section)
    assert t.tolist() == [(1.0 + 7.0) / 2, (2.5 + 5.0) / 2, 30.0]
    assert kept == [2] and clipped == 0
    assert fallback.tolist() == [10.0, 20.0, 30.0]  # the fallback thresholds are not changed in place


def test_midpoint_takes_the_normals_mean_after_the_far_out_fence():
    """8 normals, one far out: Q1 1.75, Q3 5.25, fence 3 -> 15.75; mean (21 + 15.75) / 8; anomalies 20."""
    fallback = torch.tensor([10.0], dtype=torch.float64)
    normal = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0])
    section = torch.zeros(8, dtype=torch.long)
    args = (fallback, normal, section, np.array([20.0]), torch.tensor([0]))
    plain, _, none = fit_midpoint_thresholds(*args)
    fenced, _, clipped = fit_midpoint_thresholds(*args, fence=3.0)
    assert none == 0 and plain.tolist() == [(121.0 / 8 + 20.0) / 2]  # 17.6: above 7 of 8 normals by 11+
    assert clipped == 1 and fenced.tolist() == [((21.0 + 15.75) / 8 + 20.0) / 2]


def test_a_calibration_written_before_these_fields_still_loads(tmp_path):
    cal = Calibration(members=["b2"], normalizers={"b2": {}}, reference_scores={}, normalised_on="held-out")
    state = cal.state_dict()
    del state["reference_final"], state["threshold_note"]
    torch.save(state, tmp_path / "calibration.pt")
    loaded = Calibration.load(tmp_path / "calibration.pt")
    assert loaded.reference_final is None and loaded.threshold_note == ""


# ---------------------------------------------------------------------- config checks, before training
def test_midpoint_without_validation_anomalies_refuses_before_training(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(AsdError) as e:
        train(config(run_dir, "threshold=midpoint"))
    message = str(e.value)
    assert "threshold=midpoint" in message and "validation_anomalies" in message
    assert "threshold=normal" in message  # the fix
    assert not (run_dir / "stages.json").exists()  # nothing ran


def test_unknown_cmap_is_refused_listing_valid_ones(tmp_path):
    with pytest.raises(AsdError) as e:
        validate(config(tmp_path, "heatmaps.cmap=not_a_cmap"))
    assert "heatmaps.cmap='not_a_cmap'" in str(e.value) and "'magma'" in str(e.value)
    with pytest.raises(AsdError, match="heatmaps.cmap='nope'.*viridis"):
        check_cmap("nope")
    assert check_cmap("viridis") == "viridis"
    validate(config(tmp_path, "heatmaps.cmap=viridis", "heatmaps.indices=[0,2]", "heatmaps.split=train"))


def test_num_heatmaps_of_an_older_run_folder_still_sets_the_count(tmp_path, caplog):
    from asd.run.stages import heatmap_settings

    old = OmegaConf.create({"num_heatmaps": 2, "plots": True})
    with caplog.at_level("WARNING", logger="asd.run"):
        assert heatmap_settings(old) == {"count": 2, "indices": None, "split": "test", "cmap": "magma"}
    assert "num_heatmaps is deprecated" in caplog.text
    new = OmegaConf.create({"heatmaps": {"count": 1, "indices": [3], "split": "train", "cmap": "gray"}})
    assert heatmap_settings(new) == {"count": 1, "indices": [3], "split": "train", "cmap": "gray"}


def test_heatmap_indices_are_checked_against_the_split():
    labels = ["normal", "anomaly", "normal"]
    assert heatmap_rows(labels, 4, [2, 0, 2]) == [2, 0]
    assert heatmap_rows(labels, 2) == [0, 1]  # half anomalous
    with pytest.raises(AsdError, match=r"heatmaps.indices=\[5\].*3 clips"):
        heatmap_rows(labels, 2, [5])


# ---------------------------------------------------------------------- plots from hand-made inputs
def test_member_losses_are_read_per_split_from_every_version(tmp_path):
    logs = tmp_path / "logs"
    for version, rows in (
        (0, [("0", "0", "2.0", ""), ("0", "1", "1.5", ""), ("0", "1", "", "1.8")]),
        (1, [("1", "2", "1.0", ""), ("1", "3", "", "1.2")]),  # a resumed fit: version_1
    ):
        (logs / f"version_{version}").mkdir(parents=True)
        with open(logs / f"version_{version}" / "metrics.csv", "w", newline="") as f:
            csv.writer(f).writerows([("epoch", "step", "train/b2/loss", "val/b2/loss"), *rows])
    train_curves, val_curves = read_member_losses(logs)
    assert train_curves["b2"][0].tolist() == [0, 1, 2] and train_curves["b2"][1].tolist() == [2.0, 1.5, 1.0]
    assert val_curves["b2"][0].tolist() == [1, 3] and val_curves["b2"][1].tolist() == [1.8, 1.2]
    assert plot_member_losses(logs, tmp_path / "loss_curves.png").stat().st_size > 0
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_loss_curve.py"), str(logs), "--members"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == tmp_path / "loss_curves.png"


def test_tsne_subsamples_with_a_fixed_seed(tmp_path, caplog):
    z = np.random.default_rng(0).normal(size=(40, 5))
    groups = {"label": ["normal", "anomaly"] * 20}
    with caplog.at_level("INFO", logger="asd.evaluation.plots"):
        out = plot_tsne(z, groups, tmp_path / "tsne.png", "b9", max_points=12)
    assert out.stat().st_size > 0 and "a fixed-seed subsample of 12 of 40 clips" in caplog.text
    with pytest.raises(AsdError, match="it needs at least 3"):
        plot_tsne(z[:2], {"label": ["normal", "anomaly"]}, tmp_path / "none.png", "b9")


# ---------------------------------------------------------------------- one tiny run
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished debug run: b2 (error maps, an embedding), b3 (an embedding), b4 (none), a reference."""
    out = tmp_path_factory.mktemp("reports") / "run"
    cfg = config(
        out, "branch=[b2,b3,b4]", "reference=[dcase_ae]", "heatmaps.cmap=viridis", "heatmaps.indices=[1]"
    )
    return train(cfg)


def test_errors_csv_has_one_row_per_test_clip_with_every_raw_score(run):
    scores = read_csv(run / "scores.csv")
    errors = read_csv(run / "errors.csv")
    assert len(errors) == len(scores) == 24  # 2 machines x 2 domains x (3 normal + 3 anomalous)
    assert [int(r["index"]) for r in errors] == list(range(len(scores)))
    assert "decision" not in errors[0]
    for col in ("b2", "b3", "b4", "dcase_ae_mse", "zmean", "final"):
        assert [r[col] for r in errors] == [r[col] for r in scores], col  # the same raw numbers
    assert [r["is_anomaly"] for r in errors] == [str(int(r["label"] == "anomaly")) for r in scores]


def test_embeddings_npz_has_one_row_per_test_clip(run):
    scores = read_csv(run / "scores.csv")
    with np.load(run / "embeddings.npz") as npz:
        z = {k: npz[k] for k in npz.files}
    assert "b4" not in z  # embed_dim 0
    for member, width in (("b2", 16), ("b3", None), ("dcase_ae", 4)):
        assert z[member].ndim == 2 and z[member].shape[0] == len(scores), member
        assert width is None or z[member].shape[1] == width
        assert np.isfinite(z[member]).all()
    assert z["index"].tolist() == list(range(len(scores)))
    for key in ("machine", "section", "domain", "label"):
        assert z[key].tolist() == [r[key] for r in scores], key


def test_plots_of_a_run(run):
    plots = run / "plots"
    assert {p.name for p in plots.glob("tsne_*.png")} == {"tsne_b2.png", "tsne_b3.png", "tsne_dcase_ae.png"}
    assert (plots / "loss_curves.png").stat().st_size > 0
    methods = [
        k for k in read_csv(run / "scores.csv")[0] if k not in ("file", "machine", "section", "domain")
    ]
    methods = [m for m in methods if m not in ("label", "path", "final", "decision")]
    assert {p.name for p in plots.glob("hist_*.png")} >= {f"hist_{m}.png" for m in methods}
    # heatmaps.indices=[1]: one heatmap of each member that draws them (b2, b4), of test clip 1
    clip = Path(read_csv(run / "scores.csv")[1]["file"]).stem
    assert sorted(p.name for p in plots.glob("heatmap_*.png")) == [
        f"heatmap_{m}_{clip}.png" for m in ("b2", "b4")
    ]


def test_decision_metrics_in_metrics_csv_and_summary(run):
    scores = read_csv(run / "scores.csv")
    summary = (run / "summary.md").read_text()
    final = summary.split("- final score: `")[1].split("`")[0]
    metrics = [r for r in read_csv(run / "metrics.csv") if r["method"] == final]
    y = np.array([int(r["label"] == "anomaly") for r in scores])
    d = np.array([int(r["decision"]) for r in scores])
    overall = next(r for r in metrics if r["machine"] == "all")
    expected = decision_rates(**decision_counts(y, d))
    for key in ("tpr", "tnr", "precision", "f1"):
        assert float(overall[key]) == pytest.approx(expected[key]), key
    for m in ("rotor", "valve"):
        row = next(r for r in metrics if r["machine"] == m)
        sel = np.array([r["machine"] == m for r in scores])
        want = decision_counts(y[sel], d[sel])
        assert {k: int(row[k]) for k in want} == want
        assert float(row["tpr"]) == pytest.approx(decision_rates(**want)["tpr"])
        src = sel & np.array([r["domain"] == "source" for r in scores])
        assert float(row["tnr_source"]) == pytest.approx(
            decision_rates(**decision_counts(y[src], d[src]))["tnr"]
        )
    assert f"## decisions of `{final}` at its thresholds" in summary
    assert "| all | all | all |" in summary and "| rotor | 00 | source |" in summary


# ---------------------------------------------------------------------- threshold=midpoint on the run
@pytest.fixture(scope="module")
def other_anomalies(tmp_path_factory) -> Path:
    """Labelled anomalous clips apart from the run's test set: the same synthetic machines, seed 1."""
    tiny = SyntheticConfig(sections=1, source_train=2, target_train=1, test_per_class=2, duration=1.0, seed=1)
    return generate(tmp_path_factory.mktemp("validation") / "data", tiny)


def midpoint_copy(run: Path, dst: Path, anomalies: str | list[str]) -> DictConfig:
    shutil.copytree(run, dst)
    cfg = OmegaConf.load(dst / ".hydra" / "config.yaml")
    cfg.run_dir = str(dst)
    cfg.threshold, cfg.validation_anomalies = "midpoint", anomalies
    return cfg


def test_midpoint_threshold_on_labelled_anomalies_with_the_percentile_threshold_where_none(
    run, other_anomalies, tmp_path, caplog
):
    rotor = sorted(str(p) for p in (other_anomalies / "rotor" / "test").glob("*_anomaly_*.wav"))
    cfg = midpoint_copy(run, tmp_path / "mid", rotor)
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage fit: skipped" in caplog.text  # no retraining
    bound = Calibration.load(run / "calibration.pt")  # threshold=normal, the default
    mid = Calibration.load(tmp_path / "mid" / "calibration.pt")
    # sections in the order of the run's class map: rotor, then valve; valve has no anomalies listed
    assert mid.thresholds[1] == bound.thresholds[1]
    assert mid.thresholds[0] != bound.thresholds[0]
    # the rotor threshold lies halfway between the normals' mean and the listed anomalies' mean final score
    from asd.data.index import parse_path
    from asd.run.finished import FinishedRun

    finished = FinishedRun(tmp_path / "mid")
    anomaly_mean = finished.score([parse_path(p) for p in rotor])["final"].mean()
    normal_mean = 2 * float(mid.thresholds[0]) - anomaly_mean
    # the normal side: rotor's left-out final scores without its 2 target clips (threshold_min_domain),
    # after the far-out fence, as the percentile fit uses them
    normals, _ = reference_normals(prepare(cfg).dm, warn=False)
    context = context_of(normals)
    rows = threshold_normals(context["section"], context["domain"], 3)
    rotor_rows = rows & (context["section"] == 0).numpy()
    assert int(rotor_rows.sum()) == 8 and not rows[(context["domain"] == 1).numpy()].any()
    fenced, _ = clip_far_out(mid.reference_final.numpy()[rotor_rows], cfg.threshold_fence)
    assert normal_mean == pytest.approx(fenced.mean(), abs=1e-5)
    summary = (tmp_path / "mid" / "summary.md").read_text()
    assert "midpoint thresholds (threshold=midpoint)" in summary
    assert "(rotor/section_00 target, valve/section_00 target) set no threshold" in summary
    assert summary.count("set no threshold") == 1  # said once, not again in valve's kept note
    assert "valve/section_00 had no labelled anomalies and kept the normal prediction bound at 0.9" in summary
    assert "valve/section_00 have no labelled anomalous validation clips" in caplog.text


def test_a_validation_anomaly_that_is_a_test_clip_is_refused(run, tmp_path):
    test_clip = next(r["path"] for r in read_csv(run / "scores.csv") if r["label"] == "anomaly")
    with pytest.raises(AsdError, match="is the test clip .*never see test clips"):
        train(midpoint_copy(run, tmp_path / "same", [test_clip]))
    # a copy of a test clip elsewhere (the same bytes) is refused too
    copy = tmp_path / "copies" / "rotor" / "test" / Path(test_clip).name
    copy.parent.mkdir(parents=True)
    shutil.copy(test_clip, copy)
    with pytest.raises(AsdError, match="is the test clip"):
        train(midpoint_copy(run, tmp_path / "copied", str(tmp_path / "copies")))
