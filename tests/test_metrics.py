"""Official DCASE metrics against hand-computed values.

pAUC shortcut used in the comments: with at most 10 normals the first normal on the ROC
moves FPR from 0 to >= 0.1, so (without a tie at the top normal) the partial area up to
FPR 0.1 is 0.1 * t, t = share of anomalies scored above every normal, and McClish gives
0.5 * (1 + (0.1 t - 0.005) / 0.095) = (9 + 10 t) / 19.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import sys
from fractions import Fraction as Fr

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.evaluation import Evaluation, auc_pauc, evaluate, hmean, official_score

EPS = sys.float_info.epsilon


def pauc_of_top_share(t: Fr) -> float:
    """(9 + 10 t) / 19, the McClish pAUC when a share t of anomalies beats every normal (<= 10 normals)."""
    return float((9 + 10 * t) / 19)


# --- auc_pauc -----------------------------------------------------------------------------------


def test_auc_pauc_hand_example_without_ties():
    # normals 0.1 0.2 0.3 0.6, anomalies 0.5 0.7
    # AUC: 0.5 beats 3 normals, 0.7 beats 4 -> 7 of 8 pairs
    # pAUC: only 0.7 is above every normal -> t = 1/2 -> 14/19
    auc, pauc = auc_pauc([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.5, 0.7])
    assert auc == pytest.approx(7 / 8, abs=1e-15)
    assert pauc == pytest.approx(14 / 19, abs=1e-15)


def test_auc_pauc_hand_example_with_ties():
    # normals 1 2 3 3, anomalies 3 4
    # AUC: 4 beats all 4; 3 beats 1 and 2 and ties two 3s (1/2 each) -> (4 + 2 + 1) / 8 = 7/8
    # ROC: (0, 1/2) after 4, then the tied 3s move to (1/2, 1) along a straight line;
    # TPR at FPR 0.1 = 1/2 + 0.1 = 0.6; area = 0.1 * (0.5 + 0.6) / 2 = 0.055;
    # McClish: 0.5 * (1 + (0.055 - 0.005) / 0.095) = 29/38
    auc, pauc = auc_pauc([0, 0, 0, 0, 1, 1], [1, 2, 3, 3, 3, 4])
    assert auc == pytest.approx(7 / 8, abs=1e-15)
    assert pauc == pytest.approx(29 / 38, abs=1e-15)


def test_auc_pauc_extremes_and_all_tied():
    assert auc_pauc([0, 0, 1, 1], [1, 2, 3, 4]) == (1.0, 1.0)
    # reversed ranking: AUC 0, partial area 0 -> McClish 0.5 * (1 - 0.005 / 0.095) = 9/19
    auc, pauc = auc_pauc([0, 0, 1, 1], [4, 3, 2, 1])
    assert auc == 0.0
    assert pauc == pytest.approx(9 / 19, abs=1e-15)
    # all scores equal: every pair ties -> AUC 1/2; ROC is the diagonal, area 0.005 -> pAUC 1/2
    assert auc_pauc([0, 1, 0, 1], [5, 5, 5, 5]) == pytest.approx((0.5, 0.5), abs=1e-15)


def test_auc_pauc_other_max_fpr_and_booleans():
    # normals 1 2 3 4, anomalies 2.5 5 with max_fpr 0.5: ROC (0, .5) (.5, .5) (.5, 1) (1, 1)
    # area up to FPR 0.5 = 0.25; McClish: 0.5 * (1 + (0.25 - 0.125) / (0.5 - 0.125)) = 2/3
    auc, pauc = auc_pauc(
        np.array([False, False, False, False, True, True]), [1, 2, 3, 4, 2.5, 5], max_fpr=0.5
    )
    assert auc == pytest.approx(6 / 8, abs=1e-15)  # 2.5 beats 1, 2; 5 beats all 4
    assert pauc == pytest.approx(2 / 3, abs=1e-15)


def reference_auc(y: list[int], s: list[float]) -> float:
    """AUC by counting (anomaly, normal) pairs, ties one half."""
    pos = [v for v, t in zip(s, y, strict=True) if t == 1]
    neg = [v for v, t in zip(s, y, strict=True) if t == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def reference_pauc(y: list[int], s: list[float], p: float) -> float:
    """McClish pAUC from the ROC points at every distinct threshold, interpolated at FPR p."""
    n_pos, n_neg = sum(y), len(y) - sum(y)
    points = [(0.0, 0.0)]
    for t in sorted(set(s), reverse=True):
        tp = sum(1 for v, c in zip(s, y, strict=True) if v >= t and c == 1)
        fp = sum(1 for v, c in zip(s, y, strict=True) if v >= t and c == 0)
        points.append((fp / n_neg, tp / n_pos))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= p:
            break
        if x1 > p:
            y1, x1 = y0 + (y1 - y0) * (p - x0) / (x1 - x0), p
        area += (x1 - x0) * (y0 + y1) / 2
    return 0.5 * (1 + (area - p * p / 2) / (p - p * p / 2))


@settings(max_examples=60, deadline=None)
@given(
    normals=st.lists(st.integers(0, 6), min_size=1, max_size=15),
    anomalies=st.lists(st.integers(0, 6), min_size=1, max_size=15),
    max_fpr=st.sampled_from([0.1, 0.25, 1.0]),
)
def test_auc_pauc_match_pair_counting_and_roc_integration(normals, anomalies, max_fpr):
    y = [0] * len(normals) + [1] * len(anomalies)
    s = [float(v) for v in normals + anomalies]  # small integers: many ties
    auc, pauc = auc_pauc(y, s, max_fpr=max_fpr)
    assert auc == pytest.approx(reference_auc(y, s), abs=1e-12)
    assert pauc == pytest.approx(reference_pauc(y, s, max_fpr), abs=1e-12)


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 0, 0], [1, 2, 3], "both normal and anomalous.*3 normal and 0 anomalous"),
        ([1, 1], [1, 2], "0 normal and 2 anomalous"),
        ([0, 1], [1], "2 labels but 1 scores"),
        ([0, 2], [1, 2], "0 \\(normal\\) or 1 \\(anomaly\\)"),
        ([0, 1], [1, float("nan")], "NaN or infinite"),
        ([0, 1], [1, float("inf")], "NaN or infinite"),
        ([[0, 1]], [[1, 2]], "one-dimensional"),
    ],
)
def test_auc_pauc_errors(y, s, match):
    with pytest.raises(AsdError, match=match):
        auc_pauc(y, s)


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5])
def test_auc_pauc_rejects_bad_max_fpr(max_fpr):
    with pytest.raises(AsdError, match="max_fpr"):
        auc_pauc([0, 1], [0, 1], max_fpr=max_fpr)


# --- hmean --------------------------------------------------------------------------------------


def test_hmean_values_and_clamping():
    assert hmean([0.5, 1.0]) == pytest.approx(2 / (2 + 1), abs=1e-15)
    assert hmean([0.25, 0.5, 1.0]) == pytest.approx(3 / (4 + 2 + 1), abs=1e-15)
    # a zero is clamped at machine epsilon: 2 / (1/eps + 1) - tiny, finite, positive
    value = hmean([0.0, 1.0])
    assert value == pytest.approx(2 / (1 / EPS + 1), rel=1e-12)
    assert 0 < value < 1e-15
    assert hmean([-0.5, 1.0]) == pytest.approx(2 / (1 / EPS + 1), rel=1e-12)


def test_hmean_errors():
    with pytest.raises(AsdError, match="no values"):
        hmean([])
    with pytest.raises(AsdError, match="NaN"):
        hmean([0.5, float("nan")])


# --- evaluate: a constructed two-machine example ------------------------------------------------

# (machine, section, domain, label, score)
EXAMPLE = [
    ("fan", "00", "source", "normal", 1.0),
    ("fan", "00", "source", "normal", 4.0),
    ("fan", "00", "source", "anomaly", 3.0),
    ("fan", "00", "source", "anomaly", 6.0),
    ("fan", "00", "target", "normal", 2.0),
    ("fan", "00", "target", "normal", 5.0),
    ("fan", "00", "target", "anomaly", 7.0),
    ("pump", "01", "source", "normal", 1.0),
    ("pump", "01", "source", "normal", 2.0),
    ("pump", "01", "source", "anomaly", 3.0),
    ("pump", "01", "target", "normal", 4.0),
    ("pump", "01", "target", "anomaly", 2.5),
    ("pump", "01", "target", "anomaly", 5.0),
]


def make_clips(rows, domainless: bool = False, split: str = "test") -> tuple[list[Clip], list[float]]:
    clips = [
        Clip(
            path=f"/data/{m}/test/{'id' if domainless else 'section'}_{sec}_{d}_{lab}_{i:04d}.wav",
            machine=m,
            section=sec,
            domain="none" if domainless else d,
            split=split,
            label=lab,
        )
        for i, (m, sec, d, lab, _) in enumerate(rows)
    ]
    return clips, [r[4] for r in rows]


def test_evaluate_2023_hand_computed():
    clips, scores = make_clips(EXAMPLE)
    result = evaluate(ClipTable(clips), scores, year=2023)
    fan, pump = result.rows
    # fan 00: source normals {1, 4}, target normals {2, 5}, anomalies {3, 6 (source), 7 (target)}
    # auc_source: {1, 4} vs {3, 6, 7}: 3 beats 1 only, 6 and 7 beat both -> 5/6
    # auc_target: {2, 5} vs {3, 6, 7}: 3 beats 2 only -> 5/6
    # pauc over all: 7 and 6 above every normal (max 5), 3 not -> t = 2/3 -> 47/57
    # pauc_source (source clips only): {1, 4} vs {3, 6}: t = 1/2 -> 14/19; pauc_target {2, 5} vs {7}: 1
    assert (fan["machine"], fan["section"]) == ("fan", "00")
    assert fan["auc_source"] == pytest.approx(5 / 6, abs=1e-15)
    assert fan["auc_target"] == pytest.approx(5 / 6, abs=1e-15)
    assert fan["pauc"] == pytest.approx(pauc_of_top_share(Fr(2, 3)), abs=1e-15)
    assert fan["pauc_source"] == pytest.approx(14 / 19, abs=1e-15)
    assert fan["pauc_target"] == pytest.approx(1.0, abs=1e-15)
    # AUC over all: 3 beats 1, 2; 6 and 7 beat all four -> 10/12
    assert fan["auc"] == pytest.approx(10 / 12, abs=1e-15)
    assert (
        fan["n_normal_source"],
        fan["n_anomaly_source"],
        fan["n_normal_target"],
        fan["n_anomaly_target"],
    ) == (
        2,
        2,
        2,
        1,
    )
    # pump 01: source normals {1, 2}, target normal {4}, anomalies {3 (source), 2.5, 5 (target)}
    # auc_source: {1, 2} vs {3, 2.5, 5}: all 6 pairs -> 1; auc_target: {4} vs {3, 2.5, 5}: 1/3
    # pauc over all: only 5 above the top normal 4 -> t = 1/3 -> 37/57
    # pauc_source {1, 2} vs {3}: 1; pauc_target {4} vs {2.5, 5}: t = 1/2 -> 14/19
    assert pump["auc_source"] == 1.0
    assert pump["auc_target"] == pytest.approx(1 / 3, abs=1e-15)
    assert pump["pauc"] == pytest.approx(pauc_of_top_share(Fr(1, 3)), abs=1e-15)
    assert pump["pauc_source"] == 1.0
    assert pump["pauc_target"] == pytest.approx(14 / 19, abs=1e-15)
    # official: one harmonic mean over {auc_source, auc_target, pauc} of every machine and section
    expected = 6 / (Fr(6, 5) + 1 + Fr(6, 5) + 3 + Fr(57, 47) + Fr(57, 37))
    assert result.official == pytest.approx(float(expected), abs=1e-14)
    assert result.year == 2023


@pytest.mark.parametrize("year", [2022, 2024, 2025])
def test_evaluate_2022_to_2025_share_the_2023_definition(year):
    clips, scores = make_clips(EXAMPLE)
    assert evaluate(clips, scores, year=year).official == pytest.approx(
        evaluate(clips, scores, year=2023).official, abs=0
    )


def test_evaluate_2021_hand_computed():
    clips, scores = make_clips(EXAMPLE)
    result = evaluate(clips, scores, year=2021)
    fan, pump = result.rows
    # 2021 uses each domain's own normals and anomalies
    # fan source {1, 4} vs {3, 6}: 3 of 4 pairs, pAUC t = 1/2 -> 14/19; fan target {2, 5} vs {7}: 1, 1
    assert (fan["auc_source"], fan["pauc_source"]) == pytest.approx((3 / 4, 14 / 19), abs=1e-15)
    assert (fan["auc_target"], fan["pauc_target"]) == (1.0, 1.0)
    # pump source {1, 2} vs {3}: 1, 1; pump target {4} vs {2.5, 5}: 1/2, t = 1/2 -> 14/19
    assert (pump["auc_source"], pump["pauc_source"]) == (1.0, 1.0)
    assert (pump["auc_target"], pump["pauc_target"]) == pytest.approx((1 / 2, 14 / 19), abs=1e-15)
    expected = 8 / (Fr(4, 3) + 1 + Fr(19, 14) + 1 + 1 + 1 + 2 + Fr(19, 14))
    assert result.official == pytest.approx(float(expected), abs=1e-14)


def test_evaluate_2020_hand_computed():
    clips, scores = make_clips(EXAMPLE, domainless=True)
    result = evaluate(clips, scores, year=2020)
    fan, pump = result.rows
    # fan id 00: normals {1, 2, 4, 5}, anomalies {3, 6, 7}: AUC 10/12, pAUC t = 2/3 -> 47/57
    # pump id 01: normals {1, 2, 4}, anomalies {2.5, 3, 5}: AUC (2 + 2 + 3)/9 = 7/9, pAUC t = 1/3 -> 37/57
    assert (fan["auc"], fan["pauc"]) == pytest.approx((5 / 6, 47 / 57), abs=1e-15)
    assert (pump["auc"], pump["pauc"]) == pytest.approx((7 / 9, 37 / 57), abs=1e-15)
    assert all(math.isnan(fan[k]) for k in ("auc_source", "auc_target", "pauc_source", "pauc_target"))
    # official 2020: arithmetic mean of every AUC and pAUC
    expected = (Fr(5, 6) + Fr(47, 57) + Fr(7, 9) + Fr(37, 57)) / 4
    assert result.official == pytest.approx(float(expected), abs=1e-14)


def test_evaluate_matches_an_evaluator_style_reference_on_random_data():
    rng = np.random.default_rng(3)
    clips, scores = [], []
    for machine, sections in (("ToyCar", ("00", "01", "02")), ("valve", ("00",))):
        for section in sections:
            for domain in ("source", "target"):
                for label in ("normal", "anomaly"):
                    for i in range(int(rng.integers(3, 9))):
                        clips.append(
                            Clip(
                                f"/d/{machine}/test/section_{section}_{domain}_test_{label}_{i:04d}.wav",
                                machine,
                                section,
                                domain,
                                "test",
                                label,
                            )
                        )
                        scores.append(float(rng.integers(0, 12)) + (label == "anomaly"))
    result = evaluate(clips, scores, year=2023)
    # the evaluators' selection: (domain == d) | anomaly for AUC (d), all clips for pAUC
    y = np.array([c.label == "anomaly" for c in clips], dtype=int)
    s = np.array(scores)
    values = {"auc_source": [], "auc_target": [], "pauc": []}
    for row in result.rows:
        sec = np.array([(c.machine, c.section) == (row["machine"], row["section"]) for c in clips])
        for d in ("source", "target"):
            m = sec & ((np.array([c.domain for c in clips]) == d) | (y == 1))
            values[f"auc_{d}"].append(roc_auc_score(y[m], s[m]))
            assert row[f"auc_{d}"] == values[f"auc_{d}"][-1]
        values["pauc"].append(roc_auc_score(y[sec], s[sec], max_fpr=0.1))
        assert row["pauc"] == values["pauc"][-1]
    flat = values["auc_source"] + values["auc_target"] + values["pauc"]
    assert result.official == pytest.approx(len(flat) / sum(1 / v for v in flat), rel=1e-14)
    assert len(result.rows) == 4
    # one harmonic mean over all values, not per machine first (they differ: 3 sections vs 1)
    per_machine = [m["score"] for m in result.machine_summary()]
    assert abs(result.official - 2 / sum(1 / v for v in per_machine)) > 1e-4


def test_evaluate_decisions_precision_recall_f1():
    clips, scores = make_clips(EXAMPLE)
    decisions = [int(v > 3.5) for v in scores]
    fan, pump = evaluate(clips, scores, year=2023, decisions=decisions).rows
    # fan source: decided 4 (normal) and 6 (anomaly) -> tp 1, fp 1, fn 1 (3): p = r = F1 = 1/2
    assert (fan["precision_source"], fan["recall_source"], fan["f1_source"]) == pytest.approx((0.5, 0.5, 0.5))
    # fan target: decided 5 (normal) and 7 (anomaly) -> tp 1, fp 1, fn 0: p 1/2, r 1, F1 2/3
    assert (fan["precision_target"], fan["recall_target"], fan["f1_target"]) == pytest.approx(
        (0.5, 1.0, 2 / 3)
    )
    # fan all: tp 2, fp 2, fn 1: p 1/2, r 2/3, F1 = 2 (1/2)(2/3) / (7/6) = 4/7
    assert (fan["precision"], fan["recall"], fan["f1"]) == pytest.approx((0.5, 2 / 3, 4 / 7))
    # pump source: nothing decided anomalous -> tp 0: precision 0 / max(0, eps) = 0, recall 0, F1 0
    assert (pump["precision_source"], pump["recall_source"], pump["f1_source"]) == (0.0, 0.0, 0.0)
    assert (pump["precision_target"], pump["recall_target"], pump["f1_target"]) == pytest.approx(
        (0.5, 0.5, 0.5)
    )


def test_zero_auc_gives_a_tiny_finite_official_score():
    # one section ranked perfectly backwards: auc_source = auc_target = 0, pauc = 9/19
    rows = [
        ("m", "00", "source", "normal", 9.0),
        ("m", "00", "target", "normal", 8.0),
        ("m", "00", "source", "anomaly", 1.0),
        ("m", "00", "target", "anomaly", 2.0),
    ]
    clips, scores = make_clips(rows)
    result = evaluate(clips, scores, year=2023)
    assert result.rows[0]["auc_source"] == 0.0
    assert result.official == pytest.approx(3 / (2 / EPS + 19 / 9), rel=1e-12)
    assert 0 < result.official < 1e-15


def test_train_clips_are_skipped_with_a_warning(caplog):
    clips, scores = make_clips(EXAMPLE)
    train, _ = make_clips(EXAMPLE[:3], split="train")
    with caplog.at_level(logging.WARNING, logger="asd.evaluation.metrics"):
        result = evaluate(clips + train, scores + [100.0, 100.0, 100.0], year=2023)
    assert result.official == evaluate(clips, scores, year=2023).official
    assert "ignoring 3 train-split clips" in caplog.text


def test_evaluate_errors():
    clips, scores = make_clips(EXAMPLE)
    with pytest.raises(AsdError, match="13 clips"):
        evaluate(clips, scores[:-1])
    bad = list(scores)
    bad[4] = float("nan")
    with pytest.raises(
        AsdError, match="1 scores are NaN or infinite, first for /data/fan/test/section_00_target_normal_0004"
    ):
        evaluate(clips, bad)
    unknown = clips[:-1] + [
        Clip("/data/x/test/section_00_0001.wav", "pump", "01", "target", "test", "unknown")
    ]
    with pytest.raises(AsdError, match="ground truth.*1 test clips.*section_00_0001.wav"):
        evaluate(unknown, scores)
    domainless, _ = make_clips(EXAMPLE, domainless=True)
    with pytest.raises(AsdError, match="domain .source/target. of every test clip.*13 have none"):
        evaluate(domainless, scores, year=2021)
    with pytest.raises(AsdError, match="year=2019"):
        evaluate(clips, scores, year=2019)
    with pytest.raises(AsdError, match="not 0 or 1"):
        evaluate(clips, scores, decisions=[2] * len(clips))
    with pytest.raises(AsdError, match="appears twice"):
        evaluate(clips + clips[:1], scores + scores[:1])
    train, _ = make_clips(EXAMPLE, split="train")
    with pytest.raises(AsdError, match="no test-split clips"):
        evaluate(train, scores)


def test_one_class_error_names_the_group():
    # pump target has no normals left: 2022+ auc_target needs target normals
    rows = [r for r in EXAMPLE if not (r[0] == "pump" and r[2] == "target" and r[3] == "normal")]
    clips, scores = make_clips(rows)
    with pytest.raises(AsdError, match="pump section 01 \\(target normals\\).*0 normal and 3 anomalous"):
        evaluate(clips, scores, year=2023)
    # 2021 needs anomalies in each domain
    rows = [r for r in EXAMPLE if not (r[0] == "fan" and r[2] == "target" and r[3] == "anomaly")]
    clips, scores = make_clips(rows)
    with pytest.raises(AsdError, match="fan section 00 \\(target domain\\).*2 normal and 0 anomalous"):
        evaluate(clips, scores, year=2021)
    # ... but 2022+ does not: the target AUC uses the source anomalies, only pauc_target is undefined
    row = evaluate(clips, scores, year=2023).rows[0]
    assert row["auc_target"] == pytest.approx(3 / 4)  # {2, 5} vs {3, 6}: 3 beats 2, 6 beats both
    assert math.isnan(row["pauc_target"])


def test_machine_summary_official_score_and_tables(tmp_path):
    clips, scores = make_clips(EXAMPLE)
    result = evaluate(clips, scores, year=2023)
    fan, pump = result.machine_summary()
    assert fan["machine"] == "fan" and fan["n_sections"] == 1
    # one section per machine: the harmonic mean of one value is the value itself
    assert fan["auc_source"] == pytest.approx(5 / 6, abs=1e-15)
    assert pump["score"] == pytest.approx(float(3 / (1 + 3 + Fr(57, 37))), abs=1e-14)
    assert official_score(result.rows, 2023) == result.official

    path = tmp_path / "metrics.csv"
    result.to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["machine"] for r in rows] == ["fan", "pump"]
    assert float(rows[1]["auc_target"]) == result.rows[1]["auc_target"]  # full precision
    assert float(rows[0]["pauc"]) == result.rows[0]["pauc"]
    assert rows[0]["n_anomaly_target"] == "1"

    md = result.to_markdown()
    assert "| fan | 00 | 0.8333 | 0.8333 | 0.8246 | 0.7368 | 1.0000 |" in md
    assert f"Official score (DCASE 2023): {result.official:.4f}" in md


def test_machine_summary_2020_is_arithmetic_over_ids():
    rows = [
        {"machine": "fan", "section": "00", "auc": 0.5, "pauc": 0.25},
        {"machine": "fan", "section": "02", "auc": 1.0, "pauc": 0.75},
    ]
    (fan,) = Evaluation(2020, rows, official=0.625).machine_summary()
    assert (fan["auc"], fan["pauc"], fan["score"]) == (0.75, 0.5, 0.625)
    assert "| fan | 00 | 0.5000 | 0.2500 |" in Evaluation(2020, rows, 0.625).to_markdown()
