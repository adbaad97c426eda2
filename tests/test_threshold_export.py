"""Gamma thresholds, decisions, submission/ground-truth CSVs and plots."""

from __future__ import annotations

import logging
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.stats

from asd.data.table import Clip
from asd.errors import AsdError
from asd.evaluation import (
    clip_far_out,
    decide,
    evaluate,
    evaluate_submission,
    fit_gamma_threshold,
    plot_histograms,
    plot_roc,
    read_ground_truth,
    read_submission,
    submission_year,
    write_submission,
)
from asd.evaluation.export import align

# --- thresholds ---------------------------------------------------------------------------------


def test_gamma_threshold_matches_scipy_on_a_gamma_sample(caplog):
    sample = scipy.stats.gamma.rvs(2.0, loc=1.0, scale=1.5, size=400, random_state=np.random.default_rng(0))
    with caplog.at_level(logging.WARNING):
        threshold = fit_gamma_threshold(sample, percentile=0.9)
    shape, loc, scale = scipy.stats.gamma.fit(sample)
    assert threshold == scipy.stats.gamma.ppf(0.9, shape, loc=loc, scale=scale)
    # and it estimates the true 90th percentile of gamma(2, loc 1, scale 1.5) = 6.83...
    assert threshold == pytest.approx(scipy.stats.gamma.ppf(0.9, 2.0, loc=1.0, scale=1.5), rel=0.1)
    assert caplog.text == ""
    assert fit_gamma_threshold(sample, 0.5) < threshold


@pytest.mark.parametrize(
    ("scores", "expected", "why"),
    [
        ([2.0, 2.0, 2.0, 2.0], 2.0, "all 4 scores equal"),
        ([5.0], 5.0, "only 1 scores"),
        ([1.0, 3.0], 1.0 + 0.9 * 2.0, "only 2 scores"),  # linear interpolation between the two
    ],
)
def test_gamma_threshold_fallbacks(caplog, scores, expected, why):
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.threshold"):
        threshold = fit_gamma_threshold(scores)
    assert threshold == pytest.approx(expected, abs=1e-12)
    assert why in caplog.text and "empirical" in caplog.text


def test_gamma_threshold_fits_shifted_scores_such_as_z_scores(caplog):
    # The free location handles negative scores: shifting the data shifts the threshold.
    sample = scipy.stats.gamma.rvs(3.0, loc=0.0, scale=1.0, size=400, random_state=np.random.default_rng(1))
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.threshold"):
        shifted = fit_gamma_threshold(sample - 5.0)
    assert caplog.text == ""
    shape, loc, scale = scipy.stats.gamma.fit(sample - 5.0)
    assert shifted == scipy.stats.gamma.ppf(0.9, shape, loc=loc, scale=scale)
    assert shifted == pytest.approx(fit_gamma_threshold(sample) - 5.0, abs=0.05)


def test_gamma_threshold_falls_back_when_the_fit_fails_or_is_absurd(monkeypatch, caplog):
    scores = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]  # 0.9 quantile: 10.0

    def broken(data):
        raise RuntimeError("optimizer did not converge")

    monkeypatch.setattr(scipy.stats.gamma, "fit", broken)
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.threshold"):
        assert fit_gamma_threshold(scores) == pytest.approx(10.0)
    assert "gamma fit failed (RuntimeError: optimizer did not converge)" in caplog.text

    caplog.clear()
    monkeypatch.setattr(scipy.stats.gamma, "fit", lambda data: (1.0, 500.0, 1.0))  # far above the scores
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.threshold"):
        assert fit_gamma_threshold(scores) == pytest.approx(10.0)
    assert "far outside the scores" in caplog.text

    caplog.clear()
    monkeypatch.setattr(scipy.stats.gamma, "fit", lambda data: (float("nan"), 0.0, 1.0))
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.threshold"):
        assert math.isfinite(fit_gamma_threshold(scores))
    assert "shape=nan" in caplog.text


@pytest.mark.parametrize("percentile", [0.0, 1.0, 90, -0.1])
def test_gamma_threshold_rejects_bad_percentile(percentile):
    with pytest.raises(AsdError, match="percentile"):
        fit_gamma_threshold([1.0, 2.0, 3.0], percentile=percentile)


def test_gamma_threshold_rejects_empty_and_non_finite():
    with pytest.raises(AsdError, match="no scores"):
        fit_gamma_threshold([])
    with pytest.raises(AsdError, match="1 scores are NaN or infinite .first at position 2"):
        fit_gamma_threshold([1.0, 2.0, float("inf")])


def test_far_out_scores_are_set_to_tukeys_fence_by_hand():
    # 8 scores, quartiles by linear interpolation: Q1 = 1.75, Q3 = 5.25, IQR = 3.5;
    # fence 3: 5.25 + 10.5 = 15.75
    scores = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0]
    clipped, n = clip_far_out(scores, 3.0)
    np.testing.assert_allclose(clipped, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 15.75])
    assert n == 1
    # fence 1.5: 5.25 + 5.25 = 10.5; a score on the fence stays
    clipped, n = clip_far_out([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.5], 1.5)
    np.testing.assert_allclose(clipped, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.5])
    assert n == 0
    # below 8 scores the quartiles are single scores: unchanged
    clipped, n = clip_far_out(scores[1:], 3.0)
    np.testing.assert_allclose(clipped, scores[1:])
    assert n == 0


@pytest.mark.parametrize("fence", [-1.0, float("nan"), float("inf")])
def test_far_out_fence_must_be_a_finite_non_negative_number(fence):
    with pytest.raises(AsdError, match="threshold_fence"):
        clip_far_out([1.0, 2.0, 3.0, 4.0], fence)


def test_decide():
    decisions = decide([1.0, 2.0, 3.0, -1.0], 2.0)
    np.testing.assert_array_equal(decisions, [0, 0, 1, 0])  # strictly above the threshold
    assert decisions.dtype.kind == "i"
    with pytest.raises(AsdError, match="threshold=nan"):
        decide([1.0], float("nan"))
    with pytest.raises(AsdError, match="NaN or infinite"):
        decide([1.0, float("nan")], 0.5)


# --- submission CSVs ----------------------------------------------------------------------------

SCORES = [0.1 + 0.2, 1e-300, -3.5, 1 / 3, 12345.678901234567, 2.0, 7.0, 0.5]


def clips_2023() -> list[Clip]:
    rows = [
        ("fan", "00", "source", "normal"),
        ("fan", "00", "target", "anomaly"),
        ("fan", "00", "source", "anomaly"),
        ("fan", "00", "target", "normal"),
        ("ToyCar", "01", "source", "normal"),
        ("ToyCar", "01", "source", "anomaly"),
        ("ToyCar", "01", "target", "normal"),
        ("ToyCar", "01", "target", "anomaly"),
    ]
    return [
        Clip(f"/d/{m}/test/section_{s}_{d}_test_{lab}_{i:04d}_vel_6.wav", m, s, d, "test", lab)
        for i, (m, s, d, lab) in enumerate(rows)
    ]


def test_write_read_round_trip_2023(tmp_path):
    clips = clips_2023()
    decisions = [0, 1, 1, 0, 0, 1, 1, 0]
    paths = write_submission(clips, SCORES, decisions, tmp_path, year=2023)
    assert sorted(p.name for p in paths) == sorted(p.name for p in tmp_path.iterdir())  # no temp files left
    assert {p.name for p in paths} == {
        "anomaly_score_fan_section_00_test.csv",
        "decision_result_fan_section_00_test.csv",
        "anomaly_score_ToyCar_section_01_test.csv",
        "decision_result_ToyCar_section_01_test.csv",
    }
    # rows sorted by file name, no header, full precision
    text = (tmp_path / "anomaly_score_fan_section_00_test.csv").read_text()
    assert text.splitlines()[:2] == [
        "section_00_source_test_anomaly_0002_vel_6.wav,-3.5",
        "section_00_source_test_normal_0000_vel_6.wav,0.30000000000000004",
    ]
    assert (tmp_path / "decision_result_fan_section_00_test.csv").read_text().splitlines()[:2] == [
        "section_00_source_test_anomaly_0002_vel_6.wav,1",
        "section_00_source_test_normal_0000_vel_6.wav,0",
    ]
    scores = read_submission(tmp_path)
    assert scores == {
        ("fan", "00"): {c.name: v for c, v in zip(clips[:4], SCORES[:4], strict=True)},
        ("ToyCar", "01"): {c.name: v for c, v in zip(clips[4:], SCORES[4:], strict=True)},
    }  # exact float equality
    assert read_submission(tmp_path, kind="decision_result")[("fan", "00")][clips[1].name] == 1.0
    assert submission_year(tmp_path) == 2023


def test_write_read_round_trip_2020_and_2021(tmp_path):
    c2020 = [
        Clip(f"/d/fan/test/{lab}_id_{s}_{i:08d}.wav", "fan", s, "none", "test", lab, layout="dcase2020")
        for i, (s, lab) in enumerate(
            [("00", "normal"), ("00", "anomaly"), ("02", "normal"), ("02", "anomaly")]
        )
    ]
    out = tmp_path / "2020"
    paths = write_submission(c2020, SCORES[:4], None, out, year=2020)
    assert sorted(p.name for p in paths) == ["anomaly_score_fan_id_00.csv", "anomaly_score_fan_id_02.csv"]
    assert read_submission(out) == {
        ("fan", "00"): {c2020[0].name: SCORES[0], c2020[1].name: SCORES[1]},
        ("fan", "02"): {c2020[2].name: SCORES[2], c2020[3].name: SCORES[3]},
    }
    assert submission_year(out) == 2020

    out = tmp_path / "2021"
    paths = write_submission(clips_2023(), SCORES, None, out, year=2021)
    assert "anomaly_score_fan_section_00_source_test.csv" in {p.name for p in paths}
    assert len(paths) == 4  # two sections x two domains
    back = read_submission(out)
    assert back[("fan", "00")] == {c.name: v for c, v in zip(clips_2023()[:4], SCORES[:4], strict=True)}
    assert submission_year(out) == 2021


def test_write_submission_errors(tmp_path):
    clips = clips_2023()
    with pytest.raises(AsdError, match="split='train'"):
        write_submission([Clip("/d/a.wav", "fan", "00", split="train")], [1.0], None, tmp_path, 2023)
    with pytest.raises(AsdError, match="section_00_target_test_anomaly_0001_vel_6.wav: score nan"):
        write_submission(clips, [1.0, float("nan")] + SCORES[2:], None, tmp_path, 2023)
    with pytest.raises(AsdError, match="decision 2"):
        write_submission(clips, SCORES, [2] * 8, tmp_path, 2023)
    with pytest.raises(AsdError, match="domain is 'none'"):
        write_submission(
            [Clip("/d/fan/test/id_00_0.wav", "fan", "00", split="test")], [1.0], None, tmp_path, 2021
        )
    with pytest.raises(AsdError, match="occur more than once"):
        write_submission(clips + clips[:1], SCORES + [1.0], None, tmp_path, 2023)
    with pytest.raises(AsdError, match="scores of shape"):
        write_submission(clips, SCORES[:3], None, tmp_path, 2023)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("a.wav,0.5\nb.wav,0.5,1\n", "line 2: expected 'filename,value'"),
        ("a.wav,0.5\n\nb.wav,abc\n", "line 3: 'abc' is not a number"),
        ("a.wav,nan\n", "line 1: value 'nan' is not finite"),
        ("a.wav,0.5\na.wav,0.7\n", "line 2: a.wav already has a value"),
        (",0.5\n", "line 1: expected"),
    ],
)
def test_read_submission_malformed_rows(tmp_path, content, match):
    path = tmp_path / "anomaly_score_fan_section_00_test.csv"
    path.write_text(content)
    with pytest.raises(AsdError, match=match) as info:
        read_submission(tmp_path)
    assert str(path) in str(info.value)


def test_read_submission_folder_errors(tmp_path):
    with pytest.raises(AsdError, match="not a folder"):
        read_submission(tmp_path / "missing")
    with pytest.raises(AsdError, match="no anomaly_score_.*csv files"):
        read_submission(tmp_path)
    (tmp_path / "anomaly_score_DCASE2023T2fan_section_00_test_seed13711_Eval.csv").write_text("a.wav,1\n")
    with pytest.raises(AsdError, match="unrecognised name"):
        read_submission(tmp_path)


def test_submission_year_rejects_mixed_styles(tmp_path):
    (tmp_path / "anomaly_score_fan_id_00.csv").write_text("a.wav,1\n")
    (tmp_path / "anomaly_score_fan_section_00_test.csv").write_text("b.wav,1\n")
    with pytest.raises(AsdError, match="mixes file naming styles"):
        submission_year(tmp_path)
    (tmp_path / "decision_result_fan_section_00_test.csv").write_text("b.wav,0.5\n")
    with pytest.raises(AsdError, match="decision '0.5' is not 0 or 1"):
        read_submission(tmp_path, kind="decision_result")


# --- ground truth -------------------------------------------------------------------------------


def write_truth_2023(root, with_attributes: bool = False) -> None:
    """fan section 00 of the official 2022+ layout: 4 clips, labels and domains."""
    (root / "ground_truth_data").mkdir(parents=True)
    (root / "ground_truth_domain").mkdir()
    (root / "ground_truth_data" / "ground_truth_fan_section_00_test.csv").write_text(
        "section_00_0000.wav,0\nsection_00_0001.wav,1\nsection_00_0002.wav,0\nsection_00_0003.wav,1\n"
    )
    (root / "ground_truth_domain" / "ground_truth_fan_section_00_test.csv").write_text(
        "section_00_0000.wav,0\nsection_00_0001.wav,0\nsection_00_0002.wav,1\nsection_00_0003.wav,1\n"
    )
    if with_attributes:
        (root / "ground_truth_attributes").mkdir()
        (root / "ground_truth_attributes" / "ground_truth_fan_section_00_test.csv").write_text(
            "section_00_0000.wav,section_00_source_test_normal_0007_a_1\n"
        )


def test_read_ground_truth_2023_layout(tmp_path):
    write_truth_2023(tmp_path, with_attributes=True)
    clips, aliases = read_ground_truth(tmp_path)
    assert [(c.name, c.domain, c.label) for c in clips] == [
        ("section_00_0000.wav", "source", "normal"),
        ("section_00_0001.wav", "source", "anomaly"),
        ("section_00_0002.wav", "target", "normal"),
        ("section_00_0003.wav", "target", "anomaly"),
    ]
    assert {(c.machine, c.section, c.split) for c in clips} == {("fan", "00", "test")}
    assert aliases == {("fan", "00", "section_00_source_test_normal_0007_a_1.wav"): "section_00_0000.wav"}
    # pointing at ground_truth_data/ itself finds the sibling domain folder
    assert read_ground_truth(tmp_path / "ground_truth_data")[0] == clips


def test_read_ground_truth_2021_and_2020_layouts(tmp_path):
    gt = tmp_path / "gt2021" / "ground_truth_data"
    gt.mkdir(parents=True)
    (gt / "ground_truth_valve_section_03_source_test.csv").write_text("section_03_source_test_0000.wav,1\n")
    (gt / "ground_truth_valve_section_03_target_test.csv").write_text("section_03_target_test_0000.wav,0\n")
    clips, _ = read_ground_truth(tmp_path / "gt2021")
    assert [(c.section, c.domain, c.label) for c in clips] == [
        ("03", "source", "anomaly"),
        ("03", "target", "normal"),
    ]

    (tmp_path / "eval_data_list.csv").write_text(
        "ToyCar\nid_05_00000000.wav,anomaly_id_05_00000000.wav,1\nid_05_00000001.wav,normal_id_05_00000001.wav,0\n"
        "fan\nid_01_00000000.wav,normal_id_01_00000000.wav,0\n"
    )
    clips, aliases = read_ground_truth(tmp_path)
    assert [(c.machine, c.section, c.domain, c.label) for c in clips] == [
        ("ToyCar", "05", "none", "anomaly"),
        ("ToyCar", "05", "none", "normal"),
        ("fan", "01", "none", "normal"),
    ]
    assert aliases[("fan", "01", "normal_id_01_00000000.wav")] == "id_01_00000000.wav"


def test_read_ground_truth_errors(tmp_path):
    with pytest.raises(AsdError, match="no eval_data_list.csv, ground_truth_data/"):
        read_ground_truth(tmp_path)
    write_truth_2023(tmp_path)
    (tmp_path / "ground_truth_domain" / "ground_truth_fan_section_00_test.csv").write_text(
        "section_00_0000.wav,0\n"
    )
    with pytest.raises(AsdError, match="lists other files than"):
        read_ground_truth(tmp_path)
    (tmp_path / "ground_truth_domain" / "ground_truth_fan_section_00_test.csv").unlink()
    with pytest.raises(AsdError, match="no domain file"):
        read_ground_truth(tmp_path)
    (tmp_path / "ground_truth_data" / "ground_truth_fan_section_00_test.csv").write_text("a.wav,0\nb.wav,2\n")
    with pytest.raises(
        AsdError, match="ground_truth_fan_section_00_test.csv, line 2: label '2' must be 0 or 1"
    ):
        read_ground_truth(tmp_path)


def test_align_names_missing_and_extra_files():
    clips = [
        Clip(f"/d/fan/test/section_00_{i:04d}.wav", "fan", "00", "source", "test", "normal") for i in range(7)
    ]
    submission = {("fan", "00"): {c.name: 1.0 for c in clips[:1]}}
    with pytest.raises(AsdError, match="6 ground-truth clips have no value.*section_00_0005.wav and 1 more"):
        align(clips, submission)
    submission = {("fan", "00"): {c.name: 1.0 for c in clips}, ("fan", "01"): {"x.wav": 2.0}}
    with pytest.raises(
        AsdError, match="1 values in the submission have no ground truth: fan section 01 x.wav"
    ):
        align(clips, submission)
    aliases = {("fan", "00", "labelled.wav"): clips[0].name}
    submission = {("fan", "00"): {"labelled.wav": 3.0, **{c.name: 1.0 for c in clips[1:]}}}
    assert align(clips, submission, aliases)[0] == 3.0


def test_evaluate_submission_against_official_ground_truth(tmp_path):
    write_truth_2023(tmp_path / "gt", with_attributes=True)
    sub = tmp_path / "sub"
    sub.mkdir()
    # clip 0 scored under its labelled name
    # normals 0.2 (source), 0.6 (target); anomalies 0.5 (source), 0.9 (target)
    (sub / "anomaly_score_fan_section_00_test.csv").write_text(
        "section_00_source_test_normal_0007_a_1.wav,0.2\nsection_00_0001.wav,0.5\n"
        "section_00_0002.wav,0.6\nsection_00_0003.wav,0.9\n"
    )
    result = evaluate_submission(sub, tmp_path / "gt")
    row = result.rows[0]
    # auc_source: {0.2} vs {0.5, 0.9} -> 1; auc_target: {0.6} vs {0.5, 0.9} -> 1/2; pauc: t = 1/2 -> 14/19
    assert (row["auc_source"], row["auc_target"]) == (1.0, 0.5)
    assert row["pauc"] == pytest.approx(14 / 19, abs=1e-15)
    assert result.official == pytest.approx(3 / (1 + 2 + 19 / 14), abs=1e-14)
    (sub / "decision_result_fan_section_00_test.csv").write_text("section_00_0001.wav,1\n")
    with pytest.raises(AsdError, match="3 ground-truth clips have no value in .*decision_result files"):
        evaluate_submission(sub, tmp_path / "gt")


# --- plots --------------------------------------------------------------------------------------


def test_plots_are_written_and_closed(tmp_path):
    clips = clips_2023()
    before = plt.get_fignums()
    paths = plot_roc(clips, SCORES, tmp_path, title_prefix="run 1: ")
    assert sorted(p.name for p in paths) == ["roc_ToyCar_section_01.png", "roc_fan_section_00.png"]
    hist = plot_histograms(clips, SCORES, tmp_path, threshold={("fan", "00"): 0.4, ("ToyCar", "01"): 3.0})
    assert sorted(p.name for p in hist) == ["hist_ToyCar_section_01.png", "hist_fan_section_00.png"]
    hist += plot_histograms(
        clips + [Clip("/d/fan/test/section_00_0009.wav", "fan", "00", split="test", label="unknown")],
        SCORES + [1.0],
        tmp_path / "monitor",
        threshold=1.0,
    )
    for p in paths + hist:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert plt.get_fignums() == before  # nothing registered with pyplot


def test_plot_errors(tmp_path):
    clips = clips_2023()
    with pytest.raises(AsdError, match="no entry for \\('ToyCar', '01'\\)"):
        plot_histograms(clips, SCORES, tmp_path, threshold={("fan", "00"): 0.4})
    one_class = [c for c in clips if c.machine == "fan" and c.label == "normal"]
    with pytest.raises(AsdError, match="fan section 00 \\(all clips\\): AUC needs both"):
        plot_roc(one_class, [0.1, 0.2], tmp_path)
    with pytest.raises(AsdError, match="got 2 scores for 8 clips"):
        plot_histograms(clips, [1.0, 2.0], tmp_path)


def test_evaluate_accepts_written_and_read_back_scores(tmp_path):
    clips = clips_2023()
    write_submission(clips, SCORES, None, tmp_path, 2023)
    back = read_submission(tmp_path)
    scores = [back[(c.machine, c.section)][c.name] for c in clips]
    assert evaluate(clips, scores).official == evaluate(clips, SCORES).official
