"""`Calibration` on synthetic score matrices: z-scores, fusions, decisions, state, left-out statistics."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import TINY_FUSION_CFG
from omegaconf import OmegaConf

from asd.calibration import Calibration, fit_normalizers, fit_thresholds, left_out_z, threshold_normals
from asd.errors import AsdError
from asd.evaluation import fit_gamma_threshold, normal_bound
from asd.fusion.stage import fit_fusion
from asd.run.calibrate import threshold_rows
from asd.scoring import GroupNormalizer

FUSION_CFG = TINY_FUSION_CFG


def normals(n: int = 6, seed: int = 0):
    """Raw scores of two members on n normals in each of 2 sections x 2 domains, and their context."""
    rng = np.random.default_rng(seed)
    section = torch.arange(2).repeat_interleave(2 * n)
    domain = torch.tensor([0, 1]).repeat_interleave(n).repeat(2)
    context = {"machine": torch.zeros_like(section), "section": section, "domain": domain}
    raw = {
        "a": rng.normal(10.0, 2.0, len(section)) + 5.0 * section.numpy(),
        "b": rng.gamma(2.0, 1.0, len(section)),
    }
    return raw, context


def calibrated(final: str = "zmean", fusion: bool = False) -> tuple[Calibration, dict, dict]:
    raw, context = normals()
    cal = Calibration(
        members=["a", "b"],
        normalizers=fit_normalizers(raw, ["a", "b"], context),
        reference_scores={k: torch.as_tensor(v) for k, v in raw.items()},
        normalised_on="held-out",
        final=final,
    )
    if fusion:
        z = cal.normalise(raw, context)
        fakes = z + 3.0
        y = torch.cat([torch.zeros(len(z)), torch.ones(len(z))])
        ctx = {k: torch.cat([v, v]) for k, v in context.items()}
        cal.fusion = fit_fusion(
            torch.cat([z, fakes]),
            ctx["machine"],
            ctx["section"],
            ctx["domain"],
            y,
            members=["a", "b"],
            num_machines=1,
            num_sections=2,
            cfg=FUSION_CFG,
        )
    cal.thresholds = torch.tensor([0.5, -0.25], dtype=torch.float64)
    return cal, raw, context


def test_z_scores_are_the_groups_mean_and_sample_std():
    cal, raw, context = calibrated()
    z = cal.normalise(raw, context).numpy()
    for s in (0, 1):
        for d in (0, 1):
            rows = ((context["section"] == s) & (context["domain"] == d)).numpy()
            for j, m in enumerate(("a", "b")):
                x = raw[m][rows]
                np.testing.assert_allclose(z[rows, j], (x - x.mean()) / x.std(ddof=1), rtol=1e-12)


def test_combine_gives_every_fusion_and_passes_other_columns_on():
    cal, raw, context = calibrated(final="zmax")
    extra = np.arange(len(raw["a"]), dtype=np.float64)  # e.g. the reference's column: reported, not fused
    cols = cal.combine({**raw, "ref_mse": extra}, context)
    z = cal.normalise(raw, context).numpy()
    np.testing.assert_allclose(cols["zmean"], z.mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(cols["zmin"], z.min(axis=1))
    np.testing.assert_array_equal(cols["zmax"], z.max(axis=1))
    np.testing.assert_array_equal(cols["final"], cols["zmax"])
    np.testing.assert_array_equal(cols["ref_mse"], extra)
    assert "meta" not in cols and "attention" not in cols


def test_a_member_can_be_final():
    cal, raw, context = calibrated(final="b")
    np.testing.assert_array_equal(cal.combine(raw, context)["final"], raw["b"])


def test_decide_uses_each_clips_section_threshold_strictly():
    cal, _, _ = calibrated()
    final = np.array([0.5, 0.51, -0.25, -0.2, 0.0])
    section = torch.tensor([0, 0, 1, 1, 0])
    np.testing.assert_array_equal(cal.decide(final, section), [0, 1, 0, 1, 0])
    assert cal.decide(final, section).dtype == np.int64
    cal.thresholds = torch.tensor([float("nan"), 0.0], dtype=torch.float64)
    with pytest.raises(AsdError, match="not finite"):
        cal.decide(final, section)
    cal.thresholds = None
    with pytest.raises(AsdError, match="no thresholds"):
        cal.decide(final, section)


def test_state_survives_a_weights_only_round_trip_with_its_fusion():
    cal, raw, context = calibrated(final="meta", fusion=True)
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    buf.seek(0)
    again = Calibration(members=[], normalizers={}, reference_scores={}, normalised_on="")
    again.load_state_dict(torch.load(buf, weights_only=True))
    a, b = cal.combine(raw, context), again.combine(raw, context)
    assert a.keys() == b.keys() >= {"meta", "attention", "final"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(
        cal.decide(a["final"], context["section"]), again.decide(b["final"], context["section"])
    )


def test_a_foreign_or_damaged_file_is_one_clear_error(tmp_path):
    with pytest.raises(AsdError, match="not a calibration state"):
        Calibration.from_state_dict({"members": ["a"]})
    bad = tmp_path / "calibration.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AsdError, match="calibration.pt: not a readable asd calibration"):
        Calibration.load(bad)
    cal, _, _ = calibrated()
    cal.save(bad)
    torch.save({"something": 1}, bad)
    with pytest.raises(AsdError, match="delete it to recalibrate"):
        Calibration.load(bad)


def test_left_out_z_never_uses_the_clips_own_score():
    cal, raw, context = calibrated()
    loo = left_out_z(cal, context).numpy()
    for i in (0, 7, 13):
        s, d = int(context["section"][i]), int(context["domain"][i])
        same = ((context["section"] == s) & (context["domain"] == d)).numpy()
        same[i] = False
        for j, m in enumerate(("a", "b")):
            others = raw[m][same]
            assert loo[i, j] == pytest.approx((raw[m][i] - others.mean()) / others.std(ddof=1), rel=1e-12)
    # moving one clip's score far away changes its own left-out z only through its own value
    moved = {k: v.copy() for k, v in raw.items()}
    moved["a"][0] += 100.0
    cal2 = Calibration(
        ["a", "b"],
        fit_normalizers(moved, ["a", "b"], context),
        {k: torch.as_tensor(v) for k, v in moved.items()},
        "held-out",
    )
    same = ((context["section"] == 0) & (context["domain"] == 0)).numpy()
    same[0] = False
    others = raw["a"][same]
    assert left_out_z(cal2, context)[0, 0] == pytest.approx(
        (moved["a"][0] - others.mean()) / others.std(ddof=1)
    )


def test_thresholds_are_per_section_gamma_quantiles_with_a_pooled_one_for_empty_sections():
    rng = np.random.default_rng(1)
    final = rng.gamma(3.0, 1.0, 40)
    section = torch.tensor([0] * 20 + [2] * 20)
    t, clipped = fit_thresholds(final, section, num_sections=3, percentile=0.9, model="gamma")
    t = t.numpy()
    assert t[0] == fit_gamma_threshold(final[:20], 0.9)
    assert t[2] == fit_gamma_threshold(final[20:], 0.9)
    assert t[1] == fit_gamma_threshold(final, 0.9)
    assert clipped == 0


def test_threshold_shrinkage_pulls_each_sections_threshold_towards_the_pooled_one_by_its_count():
    rng = np.random.default_rng(2)
    final = rng.gamma(3.0, 1.0, 15)
    section = torch.tensor([0] * 5 + [2] * 10)
    own, _ = fit_thresholds(final, section, num_sections=3, percentile=0.9, model="gamma")
    pulled, _ = fit_thresholds(final, section, num_sections=3, percentile=0.9, shrinkage=2.0, model="gamma")
    pooled = fit_gamma_threshold(final, 0.9)
    # 5 clips of section 0 and 2 more showing the pooled threshold; 10 of section 2 and 2 more
    assert pulled[0] == pytest.approx((5 * fit_gamma_threshold(final[:5], 0.9) + 2 * pooled) / 7, rel=1e-12)
    assert pulled[2] == pytest.approx((10 * fit_gamma_threshold(final[5:], 0.9) + 2 * pooled) / 12, rel=1e-12)
    assert pulled[1] == own[1] == pooled  # a section without normals takes the pooled one either way
    assert abs(pulled[0] - pooled) < abs(own[0] - pooled)


def test_one_far_out_left_out_score_no_longer_lifts_its_sections_threshold_past_every_clip():
    """The first-shot failure (docs/results.md): one of ten left-out normals at 4,691, the rest in
    [-2, 1.1]. The plain gamma fit puts the threshold above every other score; the fence does not,
    and leaves a section without far-out scores exactly as it was."""
    first_shot = np.array([-0.11, -0.34, 4691.28, -0.51, -0.50, 1.08, -1.97, 0.55, 0.12, 0.54])
    rng = np.random.default_rng(3)
    calm = rng.normal(0.0, 1.0, 10)
    final = np.concatenate([first_shot, calm])
    section = torch.tensor([0] * 10 + [1] * 10)
    plain, none = fit_thresholds(final, section, num_sections=2, percentile=0.9, model="gamma")
    fenced, clipped = fit_thresholds(final, section, num_sections=2, percentile=0.9, fence=3.0, model="gamma")
    assert none == 0 and clipped == 1
    assert plain[0] > 100.0  # no normal-looking test clip could ever be flagged
    q1, q3 = np.percentile(first_shot, [25, 75])
    bounded = np.minimum(first_shot, q3 + 3.0 * (q3 - q1))
    assert fenced[0] == fit_gamma_threshold(bounded, 0.9) < 5.0
    assert fenced[1] == plain[1] == fit_gamma_threshold(calm, 0.9)


def test_normal_thresholds_are_prediction_bounds_by_hand_with_borrowed_and_pooled_spread():
    """threshold=normal: mean + t(0.9, df) s sqrt(1 + 1/n). Section 0 holds 1..5 (mean 3, s = sqrt(2.5),
    t(0.9, 4) = 1.5332 from a t table): 3 + 1.5332 x 1.5811 x 1.0954 = 5.6556. Section 1 holds 10, 14
    (mean 12, s = sqrt(8)); section 3 one score, 7, which borrows the pooled within-section spread
    sqrt((10 + 8) / (4 + 1)) with 5 df (t(0.9, 5) = 1.4759); section 2 none: the bound of all 8 scores."""
    final = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 14.0, 7.0])
    section = torch.tensor([0] * 5 + [1] * 2 + [3])
    t, clipped = fit_thresholds(final, section, num_sections=4, percentile=0.9)
    assert clipped == 0
    assert t[0] == pytest.approx(3.0 + 1.5332 * 2.5**0.5 * 1.2**0.5, abs=2e-4)
    assert t[1] == pytest.approx(12.0 + 3.0777 * 8**0.5 * 1.5**0.5, abs=2e-4)  # t(0.9, 1) = 3.0777
    assert t[3] == pytest.approx(7.0 + 1.4759 * 3.6**0.5 * 2**0.5, abs=2e-4)
    everything = 5.75 + 1.4149 * final.std(ddof=1) * (1 + 1 / 8) ** 0.5  # t(0.9, 7) = 1.4149
    assert t[2] == pytest.approx(everything, abs=2e-4)


def test_sections_of_one_score_each_borrow_the_spread_of_all_scores_and_one_score_is_its_own(caplog):
    final = np.array([0.0, 2.0])
    t, _ = fit_thresholds(final, torch.tensor([0, 1]), num_sections=2, percentile=0.9)
    spread = 2.0**0.5  # the two scores' std, 1 df: t(0.9, 1) = 3.0777
    assert t.tolist() == pytest.approx([3.0777 * spread * 2**0.5, 2.0 + 3.0777 * spread * 2**0.5], abs=2e-4)
    with caplog.at_level("WARNING", logger="asd.evaluation.threshold"):
        alone, _ = fit_thresholds(np.array([1.5]), torch.tensor([0]), num_sections=1, percentile=0.9)
    assert alone.tolist() == [1.5]  # nothing describes a spread: the score itself
    assert "one score and no spread to borrow" in caplog.text


def test_a_constant_section_lends_no_spread_of_zero_to_a_section_of_one_score():
    """Sections 0 (1, 1, 1) and 1 (5): the within-section spread is 0, which would make 5 its own
    threshold; the spread of all four scores (std 2, 3 df: t(0.9, 3) = 1.6377) is borrowed instead."""
    t, _ = fit_thresholds(np.array([1.0, 1.0, 1.0, 5.0]), torch.tensor([0, 0, 0, 1]), 2, 0.9)
    assert t[0] == 1.0  # constant scores: their value, so every such score is normal
    assert t[1] == pytest.approx(5.0 + 1.6377 * 2.0 * 2**0.5, abs=2e-4)


def test_normal_thresholds_are_fitted_after_the_far_out_fence():
    """Ten left-out scores, one far out (the first-shot case): the bound is that of the fenced scores."""
    scores = np.array([-0.11, -0.34, 4691.28, -0.51, -0.50, 1.08, -1.97, 0.55, 0.12, 0.54])
    plain, none = fit_thresholds(scores, torch.zeros(10, dtype=torch.long), 1, 0.9)
    fenced, clipped = fit_thresholds(scores, torch.zeros(10, dtype=torch.long), 1, 0.9, fence=3.0)
    assert none == 0 and clipped == 1 and plain[0] > 1000.0
    q1, q3 = np.percentile(scores, [25, 75])
    assert fenced[0] == normal_bound(np.minimum(scores, q3 + 3.0 * (q3 - q1)), 0.9) < 5.0


def test_small_domain_groups_are_left_out_of_the_threshold_fit_only_where_their_section_can_spare_them():
    """Section 0: 8 source and 2 target (the first-shot case): the targets go. Section 1: 4 source
    and 1 target: the target goes. Section 2: 2 and 2, the rest too small: all stay. Section 3:
    3 clips of unknown domain: they stay. Section 4: 2 target clips alone: they stay. Section 5:
    1 source, 1 target and 2 of unknown domain: without both small groups only 2 would be left,
    so all stay. Section 6: 1 source beside 3 of unknown domain: the source clip goes."""
    section = torch.tensor([0] * 10 + [1] * 5 + [2] * 4 + [3] * 3 + [4] * 2 + [5] * 4 + [6] * 4)
    domain = torch.tensor(
        [0] * 8 + [1] * 2 + [0] * 4 + [1] + [0, 0, 1, 1] + [2] * 3 + [1, 1] + [0, 1, 2, 2] + [0, 2, 2, 2]
    )
    keep = threshold_normals(section, domain, 3)
    assert keep.dtype == bool and keep.shape == (32,)
    assert np.flatnonzero(~keep).tolist() == [8, 9, 14, 28]
    assert threshold_normals(section, domain, 1).all()
    assert np.flatnonzero(~threshold_normals(section, domain, 2)).tolist() == [14, 24, 25, 28]  # 1 clip < 2
    assert threshold_normals(section.numpy(), domain.numpy(), 3).tolist() == keep.tolist()
    assert threshold_normals(section, domain, 11).all()  # no section keeps 11 without its small groups


def test_only_cross_fitted_runs_leave_small_domains_out_and_a_raw_final_never_does():
    """The first-shot layout (8 source, 2 target): cross-fitted with a fused final, the pair goes and
    the note names it; held out (the note says why), or with a member's raw score as final, every
    normal stays."""
    cfg = OmegaConf.create({"threshold_min_domain": 3})
    context = {"section": torch.zeros(10, dtype=torch.long), "domain": torch.tensor([0] * 8 + [1] * 2)}
    crossfit = SimpleNamespace(crossfit_folds=5, section_keys=[("valve", "00")])
    rows, note = threshold_rows(cfg, context, crossfit, "zweighted")
    assert rows.tolist() == [True] * 8 + [False] * 2
    assert note.startswith("; the 2 left-out scores of domains with fewer than 3")
    assert "(valve/section_00 target) set no threshold" in note
    held_out = SimpleNamespace(crossfit_folds=0, section_keys=[("valve", "00")])
    rows, note = threshold_rows(cfg, context, held_out, "zweighted")
    assert rows.all() and "no small domain was left out (threshold_min_domain=3 applies to cross" in note
    three = {"section": torch.zeros(6, dtype=torch.long), "domain": torch.tensor([0] * 3 + [1] * 3)}
    assert threshold_rows(cfg, three, held_out, "zweighted")[1] == ""  # no small group: nothing to say
    rows, note = threshold_rows(cfg, context, crossfit, "b2")
    assert rows.all() and "threshold_min_domain=3 unused: final=b2 is a raw score" in note
    every = OmegaConf.create({"threshold_min_domain": 1})
    assert threshold_rows(every, context, crossfit, "zweighted")[0].all()


def test_a_left_out_target_pair_far_above_its_test_clips_no_longer_lifts_the_first_shot_threshold():
    """A first-shot section's left-out final scores (seed 79 of the first-shot benchmark, rounded):
    its two target clips, scored by copies that saw one target clip, sit far above the rest; without
    them the bound is that of the 8 fenced source scores, computed by hand."""
    final = np.array([-0.20, 0.61, -0.23, -0.81, -0.24, -0.14, -0.28, 1.48, -0.30, 1.74])
    domain = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 0, 1])
    section = torch.zeros(10, dtype=torch.long)
    keep = threshold_normals(section, domain, 3)
    every, _ = fit_thresholds(final, section, 1, 0.9, fence=3.0)
    kept, _ = fit_thresholds(final[keep], section[keep], 1, 0.9, fence=3.0)
    q1, q3 = np.percentile(final[keep], [25, 75])
    src = np.minimum(final[keep], q3 + 3.0 * (q3 - q1))  # the fence holds 0.61 back to 0.115
    assert src.max() == pytest.approx(0.115)
    by_hand = src.mean() + scipy.stats.t.ppf(0.9, 7) * src.std(ddof=1) * (1 + 1 / 8) ** 0.5
    assert kept[0].item() == pytest.approx(by_hand, rel=1e-12)
    assert kept[0] < 0.2 < 1.0 < every[0]


def test_threshold_shrinkage_pulls_normal_bounds_towards_the_bound_of_all_scores():
    final = np.array([0.0, 1.0, 2.0, 10.0, 12.0, 14.0, 16.0])
    section = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    own, pulled = (fit_thresholds(final, section, 2, 0.9, shrinkage=k)[0].tolist() for k in (0.0, 2.0))
    pooled = normal_bound(final, 0.9)
    assert pulled[0] == pytest.approx((3 * own[0] + 2 * pooled) / 5, rel=1e-12)
    assert pulled[1] == pytest.approx((4 * own[1] + 2 * pooled) / 6, rel=1e-12)
    assert own[0] == pytest.approx(1.0 + 1.8856 * 1.0 * (4 / 3) ** 0.5, abs=2e-4)  # t(0.9, 2) = 1.8856


def test_thresholds_refuse_a_non_finite_score_by_their_own_name():
    with pytest.raises(AsdError, match="fit_thresholds"):
        fit_thresholds(np.array([0.0, np.nan, 1.0]), torch.zeros(3, dtype=torch.long), 1, 0.9)


def test_the_normal_bound_passes_its_share_of_new_normals_from_five_scores_where_a_fitted_gamma_does_not():
    """From 5 independent normal scores the fitted gamma's 0.9 quantile passes about 73 % of new normals
    on average, the prediction bound 90 % (exactly, on average, for independent normal scores; the
    pipeline's left-out z-scores are not quite that, docs/results.md)."""
    rng = np.random.default_rng(0)
    fives = rng.normal(size=(2000, 5))
    bounds = [fit_thresholds(f, torch.zeros(5, dtype=torch.long), 1, 0.9)[0][0].item() for f in fives]
    assert float(np.mean(scipy.stats.norm.cdf(bounds))) == pytest.approx(0.9, abs=0.01)
    gammas = [fit_gamma_threshold(f, 0.9) for f in fives[:100]]
    assert float(np.mean(scipy.stats.norm.cdf(gammas))) < 0.82


def test_an_unknown_threshold_model_is_refused_by_name():
    with pytest.raises(AsdError, match="threshold model 'weibull': choose from \\['normal', 'gamma'\\]"):
        fit_thresholds(np.ones(3), torch.zeros(3, dtype=torch.long), 1, 0.9, model="weibull")


def test_a_kept_member_uses_its_raw_scores_as_z_scores_everywhere(tmp_path):
    """`keep`: a calibrated backend's scores go into the fusions unchanged, also left out, also reloaded."""
    raw, context = normals()
    cal = Calibration(
        members=["a", "b"],
        normalizers=fit_normalizers(raw, ["a", "b"], context, keep=["a"]),
        reference_scores={k: torch.as_tensor(v) for k, v in raw.items()},
        normalised_on="held-out",
    )
    assert cal.normalizers["a"] == {} and cal.normalizers["b"]
    z = cal.normalise(raw, context)
    assert torch.equal(z[:, 0], torch.as_tensor(raw["a"]))
    assert abs(float(z[:, 1].mean())) < 1e-9  # b is z-scored as before
    loo = left_out_z(cal, context)
    assert torch.equal(loo[:, 0], torch.as_tensor(raw["a"]))  # nothing was fitted on a clip's own score
    assert not torch.allclose(loo[:, 1], z[:, 1])
    cal.thresholds = torch.zeros(2, dtype=torch.float64)
    cal.save(tmp_path / "calibration.pt")
    again = Calibration.load(tmp_path / "calibration.pt")
    assert torch.equal(again.normalise(raw, context), z)


def test_a_member_with_constant_reference_scores_is_left_unnormalised_with_a_warning(caplog):
    raw, context = normals()
    raw = {**raw, "b": np.zeros_like(raw["b"])}  # in-sample distances of one-clip banks
    with caplog.at_level("WARNING", logger="asd.calibration"):
        states = fit_normalizers(raw, ["a", "b"], context)
    assert states["b"] == {} and states["a"]
    assert "score normalisation of b" in caplog.text and "all equal" in caplog.text


def _left_out_z_by_refits(cal: Calibration, context: dict) -> torch.Tensor:
    """The definition `left_out_z` computes in closed form: one `fit` per clip without it."""
    raw = {m: torch.as_tensor(v) for m, v in cal.reference_scores.items()}
    out = cal.normalise({m: v.numpy() for m, v in raw.items()}, context)
    n = len(context["section"])
    for i in range(n):
        keep = torch.arange(n) != i
        if not (context["section"][keep] == context["section"][i]).any():
            continue
        for j, member in enumerate(cal.members):
            if not cal.normalizers[member]:
                continue
            try:
                norm = GroupNormalizer(cal.shrinkage).fit(
                    raw[member][keep], context["section"][keep], context["domain"][keep], warn=False
                )
            except AsdError:
                continue
            out[i, j] = norm.transform(
                raw[member][i : i + 1], context["section"][i : i + 1], context["domain"][i : i + 1]
            )[0]
    return out


@pytest.mark.parametrize("shrinkage", [0.0, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_left_out_z_in_closed_form_equals_one_refit_per_clip(seed, shrinkage):
    """Every fallback `fit` has: lone clips in a group and a section, unknown domains, constant groups."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    section = torch.as_tensor(rng.integers(0, 4, n))
    domain = torch.as_tensor(rng.choice([0, 0, 0, 1, 2], n))
    raw = {m: rng.normal(rng.normal(0, 3), rng.uniform(0.1, 5), n) for m in ("a", "b", "c")}
    raw["b"][(section == 1).numpy()] = 2.5  # a constant section
    raw["c"][(section == 2).numpy() & (domain == 0).numpy()] = -1.0  # a constant group
    context = {"section": section, "domain": domain, "machine": torch.zeros(n, dtype=torch.long)}
    cal = Calibration(
        ["a", "b", "c"],
        fit_normalizers(raw, ["a", "b", "c"], context, shrinkage=shrinkage),
        {k: torch.as_tensor(v) for k, v in raw.items()},
        "held-out",
        shrinkage=shrinkage,
    )
    expected = _left_out_z_by_refits(cal, context)
    got = left_out_z(cal, context)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_zweighted_is_the_weighted_mean_of_the_z_scores_and_survives_a_round_trip():
    cal, raw, context = calibrated(final="zweighted")
    cal.member_criteria, cal.weights = {"a": 0.8, "b": 0.6}, {"a": 0.9, "b": 0.1}
    z = cal.normalise(raw, context).double().numpy()
    cols = cal.combine(raw, context)
    np.testing.assert_allclose(cols["zweighted"], 0.9 * z[:, 0] + 0.1 * z[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(cols["final"], cols["zweighted"])
    buf = io.BytesIO()
    torch.save(cal.state_dict(), buf)
    buf.seek(0)
    again = Calibration.from_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(again.combine(raw, context)["zweighted"], cols["zweighted"])
    # equal weights are zmean; without weights (a run before zweighted, or fusion.enabled=false) no column
    cal.weights = {"a": 1.0, "b": 1.0}
    np.testing.assert_allclose(cal.combine(raw, context)["zweighted"], z.mean(axis=1), rtol=1e-6)
    cal.weights, cal.final = {}, "zmean"
    assert "zweighted" not in cal.combine(raw, context)


def test_a_calibration_written_before_zweighted_still_loads():
    cal, raw, context = calibrated()
    state = cal.state_dict()
    del state["weights"], state["member_criteria"]
    again = Calibration.from_state_dict(state)
    assert again.weights == {} and again.member_criteria == {}
    np.testing.assert_array_equal(again.combine(raw, context)["zmean"], cal.combine(raw, context)["zmean"])


def test_z_limit_bends_every_z_score_into_its_range_and_keeps_each_members_order():
    cal, raw, context = calibrated()
    plain = cal.normalise(raw, context)
    far = {k: v.copy() for k, v in raw.items()}
    far["a"][3] += 40.0  # one clip far above its group: z of tens without the limit
    far["b"][5] -= 30.0
    unlimited = cal.normalise(far, context)
    assert unlimited[3, 0] > 30 and unlimited[5, 1] < -10
    cal.z_limit = 5.0
    limited = cal.normalise(far, context)
    np.testing.assert_allclose(limited.numpy(), 5.0 * np.tanh(unlimited.numpy() / 5.0), rtol=1e-6)
    assert limited.abs().max() < 5.0
    assert 4.99 < limited[3, 0] < 5.0 and -5.0 < limited[5, 1] < -4.5
    # strictly increasing: each member ranks its clips as before
    for j in range(2):
        np.testing.assert_array_equal(np.argsort(limited[:, j].numpy()), np.argsort(unlimited[:, j].numpy()))
    # small z-scores barely move: |z| <= 1 within 1.4 %
    small = plain.abs() <= 1
    assert torch.allclose(cal.normalise(raw, context)[small], plain[small], rtol=0.014)
    # one far-out member no longer decides the mean: the clip's zmean is at most the limit
    assert cal.combine(far, context)["zmean"][3] < 5.0 / 2 + 1.0


def test_z_limit_applies_to_the_left_out_z_scores_and_survives_a_round_trip():
    cal, raw, context = calibrated()
    far = {k: v.copy() for k, v in raw.items()}
    far["a"][0] += 1e4
    cal = Calibration(
        ["a", "b"],
        fit_normalizers(far, ["a", "b"], context),
        {k: torch.as_tensor(v) for k, v in far.items()},
        "held-out",
        z_limit=2.0,
    )
    loo = left_out_z(cal, context)
    same = ((context["section"] == 0) & (context["domain"] == 0)).numpy()
    same[0] = False
    others = raw["a"][same]
    unlimited = (far["a"][0] - others.mean()) / others.std(ddof=1)
    assert unlimited > 1000 and loo[0, 0] == pytest.approx(2.0 * np.tanh(unlimited / 2.0))
    assert loo.abs().max() <= 2.0  # |z| beyond ~19 L rounds to the limit itself
    buffer = io.BytesIO()
    torch.save(cal.state_dict(), buffer)
    buffer.seek(0)
    again = Calibration.from_state_dict(torch.load(buffer, weights_only=True))
    assert again.z_limit == 2.0
    torch.testing.assert_close(again.normalise(far, context), cal.normalise(far, context))


def test_a_calibration_written_before_z_limit_loads_without_a_limit():
    cal, raw, context = calibrated()
    state = cal.state_dict()
    del state["z_limit"]
    again = Calibration.from_state_dict(state)
    assert again.z_limit is None
    torch.testing.assert_close(again.normalise(raw, context), cal.normalise(raw, context))
