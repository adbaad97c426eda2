"""`final=auto`: folds, the criterion, the choice, and out-of-fold fitting of the learned fusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_FUSION_CFG
from omegaconf import OmegaConf

from asd.calibration import Calibration
from asd.errors import AsdError
from asd.evaluation.metrics import auc_pauc, hmean
from asd.fusion import select
from asd.fusion import stage as fusion_stage
from asd.run.calibrate import choose_final

CFG = TINY_FUSION_CFG


def test_folds_are_balanced_and_seeded():
    f = select.fold_of(10, 4, seed=3)
    assert sorted(np.bincount(f).tolist()) == [2, 2, 3, 3]
    np.testing.assert_array_equal(f, select.fold_of(10, 4, seed=3))
    assert not np.array_equal(f, select.fold_of(10, 4, seed=4))


def test_criterion_is_the_hmean_of_every_sections_auc_and_pauc():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1] * 2)
    section = np.repeat([0, 1], 6)
    scores = rng.normal(size=12) + y
    want = hmean([*auc_pauc(y[:6], scores[:6]), *auc_pauc(y[6:], scores[6:])])
    assert select.criterion(scores, y, section) == pytest.approx(want, abs=1e-15)
    with pytest.raises(AsdError, match="no section has both"):
        select.criterion(scores[:3], y[:3], section[:3])


def test_the_auc_measure_leaves_out_the_pauc_that_one_top_normal_decides():
    """Ten normals: the pAUC (FPR <= 0.1) rests on the highest normal alone. One normal above
    every pseudo-anomaly sets the pAUC at its floor, 9/19 (McClish: no area below FPR 0.1), and
    pulls the official criterion down; the AUC counts it as one normal in ten."""
    y = np.array([0] * 10 + [1] * 10)
    section = np.zeros(20, dtype=np.int64)
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 9.0] + [1.0 + i / 10 for i in range(10)])
    auc, pauc = auc_pauc(y, scores)
    # 90 of 100 pairs ranked right; (1 + (0 - 0.005) / (0.1 - 0.005)) / 2 with no anomaly above it
    assert auc == pytest.approx(0.9) and pauc == pytest.approx(9 / 19)
    assert select.criterion(scores, y, section, measure="auc") == pytest.approx(0.9)
    assert select.criterion(scores, y, section) == pytest.approx(2 / (1 / 0.9 + 19 / 9))  # 0.621
    two = np.repeat([0, 1], 10)  # two sections: the harmonic mean of their AUCs
    y2, s2 = np.tile([0] * 5 + [1] * 5, 2), np.concatenate([np.arange(10.0), [0, 1, 2, 3, 9, 4, 5, 6, 7, 8]])
    want = hmean([auc_pauc(y2[:10], s2[:10])[0], auc_pauc(y2[10:], s2[10:])[0]])
    assert select.criterion(s2, y2, two, measure="auc") == pytest.approx(want, abs=1e-15)
    rows = torch.tensor(np.stack([scores, -scores], axis=1))
    crit, weights, _ = select.member_weights(rows, y, section, power=2.0, measure="auc")
    np.testing.assert_allclose(crit, [0.9, 0.1])
    np.testing.assert_allclose(weights, [0.4**2, 0.0])
    with pytest.raises(AsdError, match="fusion.weighted.measure='pauc': expected one of"):
        select.criterion(scores, y, section, measure="pauc")


def test_the_label_free_fusion_decides_when_the_learned_one_separates_worse():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    section = np.zeros(8, dtype=np.int64)
    good = np.array([0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 1.3])
    worse = np.array([0.0, 1.15, 0.2, 0.3, 1.0, 0.1, 1.2, 1.3])
    best, table = select.select({"meta": worse, "attention": worse, "zmean": good}, y, section)
    assert best == "zmean" and table["zmean"] > table["meta"]
    # a tie goes to the candidate listed first
    assert select.select({"meta": good, "zmean": good}, y, section)[0] == "meta"
    assert select.select({"zmean": good, "meta": good}, y, section)[0] == "zmean"


def test_learned_fusions_never_score_a_row_they_were_fitted_on(monkeypatch):
    n, copies, m = 8, 2, 3
    gen = torch.Generator().manual_seed(0)
    normal_z = torch.randn(n, m, generator=gen)
    source = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(copies)])
    z = torch.cat([normal_z, normal_z[source[n:]] + 3.0])
    z[:, 0] = torch.arange(len(z), dtype=torch.float32)  # a row's identity in column 0
    y = torch.cat([torch.zeros(n), torch.ones(n * copies)])
    fitted_on = record_fits(monkeypatch)
    plan = select.source_plan(n, source, folds=4, seed=0)
    scored = select.cross_fitted_learned(z, z[:n].clone(), context_of(len(z)), y, plan, **FIT)
    assert len(fitted_on) == 4 and all(np.isfinite(v).all() and v.shape == (len(z),) for v in scored.values())
    fold = select.fold_of(n, 4, seed=0)[source.numpy()]
    for f, rows in enumerate(fitted_on):
        held = set(np.flatnonzero(fold == f).tolist())
        assert held and not (held & rows)  # a clip and its pseudo-anomalies are held out together
        assert rows | held == set(range(len(z)))
    with pytest.raises(AsdError, match="2 or more normals"):
        select.source_plan(1, torch.zeros(3, dtype=torch.long), folds=4, seed=0)


def test_the_kind_split_judges_each_pseudo_anomaly_by_a_fit_that_never_saw_its_kind_or_its_source(
    monkeypatch,
):
    n, copies, m, kinds = 12, 4, 3, 4
    gen = torch.Generator().manual_seed(1)
    normal_z = torch.randn(n, m, generator=gen)
    source = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(copies)])
    kind = torch.cat([torch.full((n,), -1), torch.arange(n * copies) % kinds])
    z = torch.cat([normal_z, normal_z[source[n:]] + 3.0])
    z[:, 0] = torch.arange(len(z), dtype=torch.float32)  # a row's identity in column 0
    y = torch.cat([torch.zeros(n), torch.ones(n * copies)])
    fitted_on = record_fits(monkeypatch)
    plan = select.kind_plan(n, source, kind, folds=4, seed=0)
    assert len(plan) == 4
    scored = select.cross_fitted_learned(z, z[:n].clone(), context_of(len(z)), y, plan, **FIT)
    held = torch.stack([h for _, h in plan])
    assert (held.sum(dim=0) <= 1).all() and held[:, :n].any(dim=0).all()  # each row once; every normal
    judged = held.any(dim=0).numpy()
    assert 0 < judged[n:].sum() < n * copies  # only the pseudo-anomalies of the kinds left out
    assert all(np.isfinite(v[judged]).all() and np.isnan(v[~judged]).all() for v in scored.values())
    for (_, scored_rows), rows in zip(plan, fitted_on, strict=True):
        for r in np.flatnonzero(scored_rows.numpy()):
            assert int(r) not in rows  # the judged row itself is out of the fit
            same_source = set(np.flatnonzero(source.numpy() == int(source[r])).tolist())
            assert not (same_source & rows)  # and so is everything made from its source clip
            if r >= n:  # and every pseudo-anomaly of its kind
                assert not (set(np.flatnonzero(kind.numpy() == int(kind[r])).tolist()) & rows)
    one_kind = torch.cat([kind[:n], torch.zeros(n * copies, dtype=torch.long)])
    assert select.kind_plan(n, source, one_kind, 4, 0) is None  # nothing to leave out


FIT = {"members": ["a", "b", "c"], "num_machines": 1, "num_sections": 1, "cfg": CFG}


def context_of(n: int) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(n, dtype=torch.long)
    return {"machine": zeros, "section": zeros, "domain": zeros}


def record_fits(monkeypatch) -> list[set[int]]:
    """The rows (column 0 holds each row's id) of every fusion fit, in order."""
    fitted_on: list[set[int]] = []
    real_fit = fusion_stage.fit_fusion

    def recording_fit(zz, *args, **kwargs):
        fitted_on.append({int(v) for v in zz[:, 0].tolist()})
        return real_fit(zz, *args, **kwargs)

    monkeypatch.setattr(select, "fit_fusion", recording_fit)
    return fitted_on


def test_a_members_weight_is_its_criterion_above_chance_to_the_power():
    w = select.criterion_weights(np.array([0.7, 0.5, 0.4, 0.6]), power=2.0)
    np.testing.assert_allclose(w, [0.04, 0.0, 0.0, 0.01], rtol=1e-12)
    linear = select.criterion_weights(np.array([0.7, 0.6]), power=1.0)
    np.testing.assert_allclose(linear, [0.2, 0.1], rtol=1e-12)
    # no member better than chance: equal weights, zweighted is zmean
    np.testing.assert_array_equal(select.criterion_weights(np.array([0.5, 0.3]), power=2.0), [1.0, 1.0])


def test_the_references_share_is_raised_to_the_floor_and_the_members_keep_their_proportions():
    reference = np.array([False, False, True, False])
    w = np.array([0.3, 0.1, 0.2, 0.4])  # sum 1.0; the reference holds 0.2
    anchored = select.anchored_weights(w, reference, share=0.8)
    np.testing.assert_allclose(anchored, [0.075, 0.025, 0.8, 0.1], rtol=1e-12)  # members: 0.2 x w / 0.8
    # the scale of the weights is kept (zweighted divides by their sum anyway)
    np.testing.assert_allclose(select.anchored_weights(2 * w, reference, 0.8), 2 * anchored, rtol=1e-12)
    # a floor, not a target: a reference above it, no fused reference, or no share change nothing
    np.testing.assert_array_equal(select.anchored_weights(w, reference, share=0.1), w)
    np.testing.assert_array_equal(select.anchored_weights(w, np.zeros(4, dtype=bool), 0.8), w)
    np.testing.assert_array_equal(select.anchored_weights(w, reference, None), w)
    # two references share the floor in their own proportions, or equally where neither has weight
    two = np.array([True, True, False])
    np.testing.assert_allclose(select.anchored_weights(np.array([0.1, 0.3, 0.6]), two, 0.8), [0.2, 0.6, 0.2])
    np.testing.assert_allclose(
        select.anchored_weights(np.array([0.0, 0.0, 1.0]), two, 0.5), [0.25, 0.25, 0.5]
    )


def test_member_weights_and_their_cross_fitted_scores_keep_the_references_floor():
    rng = np.random.default_rng(3)
    rows, y = separated_rows(rng)
    section = np.zeros(len(y), dtype=np.int64)
    reference = np.array([False, False, True])
    plain = select.member_weights(rows, y, section, power=2.0)[1]
    criteria, weights, _ = select.member_weights(rows, y, section, 2.0, reference=reference, share=0.9)
    np.testing.assert_allclose(weights, select.anchored_weights(plain, reference, 0.9), rtol=1e-12)
    assert weights[2] / weights.sum() == pytest.approx(0.9)
    source = torch.arange(len(y)) % (len(y) // 2)  # each pseudo-anomaly made from one normal
    plan = select.source_plan(len(y) // 2, source, folds=3, seed=0)
    scored = select.cross_fitted_weighted(
        torch.as_tensor(rows), y, section, plan, 2.0, reference=reference, share=0.9
    )
    for train, held in plan:
        t, h = train.numpy(), held.numpy()
        w = select.member_weights(rows[t], y[t], section[t], 2.0, reference=reference, share=0.9)[1]
        np.testing.assert_allclose(scored[h], rows[h] @ (w / w.sum()), rtol=1e-12)


def separated_rows(rng: np.random.Generator, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Normals then as many pseudo-anomalies; columns: a, a near-copy of a, and b, where a and b
    each shift the anomalies by 1.5 standard deviations with independent noise."""
    y = np.r_[np.zeros(n), np.ones(n)].astype(np.int64)
    a = rng.normal(size=2 * n) + 1.5 * y
    b = rng.normal(size=2 * n) + 1.5 * y
    return np.c_[a, a + 0.01 * rng.normal(size=2 * n), b], y


def test_the_discriminant_gives_members_that_repeat_each_other_one_weight_between_them():
    shares = {"criterion": [], "discriminant": []}
    for seed in range(5):
        rows, y = separated_rows(np.random.default_rng(seed), n=200)
        section = np.zeros(len(y), dtype=np.int64)
        for rule, share in shares.items():
            criteria, w, note = select.member_weights(rows, y, section, power=2.0, rule=rule)
            assert note == ""
            share.append(w[:2].sum() / w.sum())  # what a and its copy take together
        np.testing.assert_allclose(criteria, select.member_criteria(torch.as_tensor(rows), y, section))
    # each member alone: three near-equal criteria, so a and its copy take about two thirds
    assert np.mean(shares["criterion"]) == pytest.approx(2 / 3, abs=0.05)
    # together: the copy adds nothing, so a and its copy share what b alone gets
    assert np.mean(shares["discriminant"]) == pytest.approx(1 / 2, abs=0.06)


def test_the_discriminant_gives_a_reversed_member_no_weight_and_falls_back_to_equal_weights():
    rows, y = separated_rows(np.random.default_rng(1))
    reversed_ = rows * np.array([1.0, -1.0, 1.0])  # the second member scores anomalies lower
    w, note = select.discriminant_weights(reversed_, y)
    assert w[1] == 0.0 and w[0] > 0 and w[2] > 0 and note == ""
    w, note = select.discriminant_weights(-rows, y)  # no member points the right way
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    assert "no member's discriminant coefficient is positive" in note
    w, note = select.discriminant_weights(rows[59:], y[59:])  # one normal row
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    assert note == "1 normal and 60 pseudo-anomalous rows: equal weights"


def test_an_unknown_weight_rule_fails_naming_the_key():
    rows, y = separated_rows(np.random.default_rng(2), n=5)
    with pytest.raises(AsdError, match="fusion.weighted.rule='lda': expected one of"):
        select.member_weights(rows, y, np.zeros(len(y), dtype=np.int64), power=2.0, rule="lda")


def test_member_criteria_judge_each_column_alone():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    section = np.zeros(8, dtype=np.int64)
    separates = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 1.3]
    reversed_ = separates[::-1]
    mixed = [0.0, 1.15, 0.2, 0.3, 1.0, 0.1, 1.2, 1.3]
    rows = torch.tensor([separates, reversed_, mixed], dtype=torch.float64).T
    crit = select.member_criteria(rows, y, section)
    assert crit[0] == 1.0 and crit[1] == pytest.approx(0.0, abs=1e-15)  # hmean clamps at machine epsilon
    assert crit[2] == pytest.approx(select.criterion(np.array(mixed), y, section), abs=1e-15)


def test_zweighted_is_judged_with_weights_from_the_other_folds_only():
    """Member 0 separates the pseudo-anomalies of fold 0's clips only, member 1 none of them. Fold 0's
    rows are scored with weights from the other folds, where member 0 is at chance: they get member 1's
    column. Weights from every row would have favoured member 0 and scored them otherwise."""
    n, copies = 8, 2
    source = torch.cat([torch.arange(n), torch.arange(n).repeat_interleave(copies)])
    y = np.r_[np.zeros(n), np.ones(n * copies)].astype(np.int64)
    section = np.zeros(len(y), dtype=np.int64)
    plan = select.source_plan(n, source, folds=2, seed=0)
    fold0 = plan[0][1].numpy()  # the rows fold 0's fit scores
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(len(y), 2, generator=gen, dtype=torch.float64)
    rows[fold0 & (y == 1), 0] += 10.0  # member 0: fold 0's pseudo-anomalies stand out
    scored = select.cross_fitted_weighted(rows, y, section, plan, power=2.0)
    assert np.isfinite(scored).all()
    by_discriminant = select.cross_fitted_weighted(rows, y, section, plan, power=2.0, rule="discriminant")
    for train, held in plan:
        t, h = train.numpy(), held.numpy()
        weights = select.discriminant_weights(rows[train].numpy(), y[t])[0]
        np.testing.assert_allclose(by_discriminant[h], rows[held].numpy() @ weights, rtol=1e-12)
    for train, held in plan:
        t, h = train.numpy(), held.numpy()
        weights = select.criterion_weights(select.member_criteria(rows[train], y[t], section[t]), 2.0)
        np.testing.assert_allclose(scored[h], rows[held].numpy() @ (weights / weights.sum()), rtol=1e-12)
    everything = select.criterion_weights(select.member_criteria(rows, y, section), 2.0)
    assert everything[0] > everything[1]  # in-sample, member 0 looks like the better one
    own = rows[fold0].numpy() @ (everything / everything.sum())
    assert not np.allclose(scored[fold0], own)


def test_one_reference_normal_leaves_zweighted_out_instead_of_failing():
    cal = Calibration(members=["a", "b"], normalizers={}, reference_scores={}, normalised_on="held-out")
    cfg = OmegaConf.create(
        {
            "fusion": {
                "seed": 0,
                "weighted": {"power": 2.0},
                "select": {
                    "candidates": ["meta", "attention", "zweighted", "zmean"],
                    "folds": 4,
                    "min_normals": 5,
                    "split": "source",
                },
            }
        }
    )
    z = torch.tensor([[0.0, 0.1], [3.0, 2.0], [2.0, 1.0], [4.0, 0.5], [1.0, 3.0]])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    zeros = torch.zeros(5, dtype=torch.long)
    ctx = {"machine": zeros, "section": zeros, "domain": zeros}
    choose_final(cal, cfg, z, z[:1], ctx, y, zeros, dm=None)
    assert cal.final == "zmean" and list(cal.selection) == ["zmean"]
    assert "zweighted was not a candidate: 1 reference normal" in cal.reason
