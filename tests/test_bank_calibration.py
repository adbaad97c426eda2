"""Backend calibration (left-out standardisation of each source/target model) and error-profile scores."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from asd.branches.transformer_ae import TransformerAEBranch
from asd.branches.vae import VAEBranch
from asd.errors import AsdError
from asd.features import LogMel
from asd.scoring import KnnBackend, MahalanobisBackend, bank_calibration


def two_domain_data(seed: int = 0, n_source: int = 12, n_target: int = 4, dim: int = 5):
    """One section: a tight source cloud and a sparse target cloud shifted by 3."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n_source, dim, generator=g, dtype=torch.float64)
    target = 3.0 + 2.0 * torch.randn(n_target, dim, generator=g, dtype=torch.float64)
    feats = torch.cat([source, target])
    section = torch.zeros(len(feats), dtype=torch.long)
    domain = torch.tensor([0] * n_source + [1] * n_target)
    return feats, section, domain


@pytest.mark.parametrize("k", [1, 2])
def test_knn_calibration_is_the_banks_left_out_distances(k):
    feats, section, domain = two_domain_data()
    knn = KnnBackend(k=k, normalize=False, calibrate=True).fit(feats, section, domain)
    state = knn._fitted.state
    x = feats.numpy()
    for g, rows in enumerate([range(12), range(12, 16)]):
        bank = x[list(rows)]
        d = cdist(bank, bank)
        np.fill_diagonal(d, np.inf)
        left_out = np.sort(d, axis=1)[:, :k].mean(axis=1)  # each clip against the others of its bank
        assert float(state["loc"][g]) == pytest.approx(left_out.mean(), rel=1e-5)
        assert float(state["scale"][g]) == pytest.approx(left_out.std(ddof=1), rel=1e-5)
    query = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    raw = [
        np.sort(cdist(query.numpy(), x[list(r)]), axis=1)[:, :k].mean(axis=1)
        for r in (range(12), range(12, 16))
    ]
    want = np.minimum(*[(r - float(state["loc"][g])) / float(state["scale"][g]) for g, r in enumerate(raw)])
    got = knn.score(query, torch.zeros(6, dtype=torch.long)).numpy()
    assert np.allclose(got, want, rtol=1e-5)


def test_calibration_puts_a_sparse_target_bank_on_the_source_scale():
    """Uncalibrated, target normals score far above source normals; calibrated, both sit near 0."""
    feats, section, domain = two_domain_data(n_source=60, n_target=6, dim=4)
    test_feats, test_section, test_domain = two_domain_data(seed=7, n_source=30, n_target=30, dim=4)
    for backend, calibrated in (
        (KnnBackend(k=1, normalize=False), False),
        (KnnBackend(k=1, normalize=False, calibrate=True), True),
        (MahalanobisBackend(covariance="pooled"), False),
        (MahalanobisBackend(covariance="pooled", calibrate=True), True),
    ):
        s = backend.fit(feats, section, domain).score(test_feats, test_section)
        gap = float(s[test_domain == 1].median() - s[test_domain == 0].median())
        spread = float(s[test_domain == 0].std())
        assert (abs(gap) < 2 * spread) == calibrated, (backend, gap, spread)


def test_mahalanobis_calibration_refits_without_each_clip():
    feats, section, domain = two_domain_data(n_source=8, n_target=3)
    maha = MahalanobisBackend(calibrate=True, covariance="pooled", folds=20).fit(feats, section, domain)
    left_out = {0: [], 1: []}
    for i in range(len(feats)):
        keep = torch.arange(len(feats)) != i
        refit = MahalanobisBackend(covariance="pooled").fit(feats[keep], section[keep], domain[keep])
        g = int(domain[i])
        st = refit._fitted.state
        z = (feats[i].float() - st["mean"][g]) @ st["whiten"][g].T
        left_out[g].append(float(z.norm()))
    state = maha._fitted.state
    for g in (0, 1):
        assert float(state["loc"][g]) == pytest.approx(np.mean(left_out[g]), rel=1e-4)
        assert float(state["scale"][g]) == pytest.approx(np.std(left_out[g], ddof=1), rel=1e-4)


def test_copies_join_the_models_and_leave_with_their_clip():
    feats, section, domain = two_domain_data(n_source=10, n_target=4, dim=3)
    query = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1.0
    zeros = torch.zeros(8, dtype=torch.long)
    plain = MahalanobisBackend(shrinkage=0.1, covariance="pooled", calibrate=True, folds=20)
    plain.fit(feats, section, domain)
    # exact duplicates change no mean and no (maximum-likelihood) covariance: with each left out
    # together with its clip, every model and every calibration is the same as without them
    twins = MahalanobisBackend(shrinkage=0.1, covariance="pooled", calibrate=True, folds=20)
    twins.fit(feats, section, domain, copies=feats[:, None].repeat(1, 2, 1))
    torch.testing.assert_close(twins.score(query, zeros), plain.score(query, zeros))
    # real copies: each domain keeps its real clips' mean, and the copies' deviations from it join
    # the pooled covariance beside the clips' own
    copies = feats[:, None] + 0.3 * torch.randn(14, 2, 3, dtype=torch.float64, generator=torch.Generator())
    copies[:, :, 0] += 2.0  # copies displaced along one direction: a mean that took them in would move
    with_copies = MahalanobisBackend(shrinkage=0.1, covariance="pooled").fit(
        feats, section, domain, copies=copies
    )
    state, before = with_copies._fitted.state, plain._fitted.state
    torch.testing.assert_close(state["mean"], before["mean"])
    means = {d: feats[domain == d].mean(dim=0) for d in (0, 1)}
    deviations = torch.cat(
        [torch.cat([feats[domain == d], copies[domain == d].reshape(-1, 3)]) - means[d] for d in (0, 1)]
    )
    cov = deviations - deviations.mean(dim=0)
    cov = (
        0.9 * cov.T @ cov / len(cov)
        + 0.1 * torch.eye(3, dtype=torch.float64) * torch.trace(cov.T @ cov / len(cov)) / 3
    )
    whiten = torch.linalg.inv(torch.linalg.cholesky(cov))
    torch.testing.assert_close(state["whiten"][0], whiten.float(), rtol=1e-4, atol=1e-5)
    # the displaced direction is now part of normal variation: a query moved along it is nearer
    moved = query.clone()
    moved[:, 0] += 2.0
    without = MahalanobisBackend(shrinkage=0.1, covariance="pooled").fit(feats, section, domain)
    assert (with_copies.score(moved, zeros) < without.score(moved, zeros)).all()
    with pytest.raises(
        AsdError, match=r"`copies` is \(14, 3\); expected a float tensor \(N, R, D\) = \(14, R, 3\)"
    ):
        plain.fit(feats, section, domain, copies=feats)
    with pytest.raises(AsdError, match="`copies` is list"):
        plain.fit(feats, section, domain, copies=[feats])
    broken = copies.clone()
    broken[3, 1, 0] = math.nan
    with pytest.raises(AsdError, match=r"`copies` has NaN/inf values in \(clip, copy\) \[\[3, 1\]\]"):
        plain.fit(feats, section, domain, copies=broken)


def test_copies_change_nothing_where_a_section_has_one_clip(caplog):
    # the MIMII sample's case: one training clip per section; such a section borrows the other
    # sections' spread of real clips, and its mean is its clip, so its copies have nothing to join
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 6, generator=g, dtype=torch.float64)
    section, domain = torch.arange(4), torch.zeros(4, dtype=torch.long)
    copies = feats[:, None] + torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    query = torch.randn(10, 6, generator=g, dtype=torch.float64)
    ids = torch.arange(10) % 4
    plain = MahalanobisBackend(covariance="pooled").fit(feats, section, domain)
    with caplog.at_level(logging.INFO, logger="asd.scoring"):
        with_copies = MahalanobisBackend(covariance="pooled").fit(feats, section, domain, copies=copies)
    torch.testing.assert_close(with_copies.score(query, ids), plain.score(query, ids))
    assert "the augmented copies change nothing in sections [0, 1, 2, 3]" in caplog.text


def test_pooled_covariance_shares_the_within_domain_spread():
    feats, section, domain = two_domain_data(n_source=30, n_target=5, dim=3)
    maha = MahalanobisBackend(shrinkage=0.0, covariance="pooled").fit(feats, section, domain)
    x = feats.numpy()
    dev = np.concatenate([x[:30] - x[:30].mean(0), x[30:] - x[30:].mean(0)])
    cov = dev.T @ dev / len(dev)
    query = x[:2] + 0.5
    inv = np.linalg.inv(cov)
    want = [min(math.sqrt((q - m) @ inv @ (q - m)) for m in (x[:30].mean(0), x[30:].mean(0))) for q in query]
    got = maha.score(torch.from_numpy(query), torch.zeros(2, dtype=torch.long)).numpy()
    assert np.allclose(got, want, rtol=1e-4)


def test_small_banks_borrow_their_sections_spread(caplog):
    left_out = [
        torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
        torch.tensor([5.0, 7.0], dtype=torch.float64),
    ]
    with caplog.at_level(logging.INFO, logger="asd.scoring"):
        loc, scale = bank_calibration(
            left_out, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([4, 2]), "kNN"
        )
    pooled = math.sqrt((5.0 + 2.0) / (3 + 1))  # squared deviations of each bank around its own mean
    assert loc.tolist() == pytest.approx([2.5, 6.0])
    assert scale.tolist() == pytest.approx([float(left_out[0].std()), pooled], rel=1e-6)
    assert "section 0 target (2 clips)" in caplog.text
    # a one-clip bank has no left-out score: its section's values
    loc, scale = bank_calibration(
        [left_out[0], torch.zeros(0, dtype=torch.float64)],
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
        torch.tensor([4, 1]),
        "kNN",
    )
    assert loc.tolist() == pytest.approx([2.5, 2.5])
    # a section with no bank of 2 clips keeps raw distances
    loc, scale = bank_calibration(
        [torch.zeros(0, dtype=torch.float64)], torch.tensor([3]), torch.tensor([0]), torch.tensor([1]), "kNN"
    )
    assert loc.tolist() == [0.0] and scale.tolist() == [1.0]


def test_calibrated_state_round_trips_and_a_mismatch_is_refused():
    feats, section, domain = two_domain_data()
    for make in (lambda c: KnnBackend(k=1, calibrate=c), lambda c: MahalanobisBackend(calibrate=c)):
        fitted = make(True).fit(feats, section, domain)
        fresh = make(True)
        fresh.load_state_dict(fitted.state_dict())
        q = feats[:3] + 0.1
        assert torch.equal(fresh.score(q, section[:3]), fitted.score(q, section[:3]))
        with pytest.raises(AsdError, match="calibrate"):
            make(False).load_state_dict(fitted.state_dict())


def test_mahalanobis_bad_settings_are_clear_errors():
    with pytest.raises(AsdError, match="covariance"):
        MahalanobisBackend(covariance="full")
    with pytest.raises(AsdError, match="folds"):
        MahalanobisBackend(folds=1)


# ---------------------------------------------------------------- error-profile scores of b2/b4

SR, T = 16000, 8000


def sines(n: int, seed: int = 0, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300 + shift + 700 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, T, generator=g)
    return {"wave": wave.float(), "section": torch.zeros(n, dtype=torch.long)}


def tiny_b2(**kw) -> TransformerAEBranch:
    sizes = dict(patch_freq=8, patch_time=3, dim=16, depth=1, decoder_depth=1, heads=2, dropout=0.0)
    return TransformerAEBranch(LogMel(n_mels=20), T, **sizes, **kw).eval()


def test_error_profile_mahalanobis_scores_the_profile_against_the_fitted_models():
    torch.manual_seed(0)
    m = tiny_b2(score_mode="mahalanobis")
    assert m.needs_backend and not tiny_b2().needs_backend
    train = sines(12)
    with pytest.raises(AsdError, match="fit_backend"):
        m.score(train)
    spec, recon, _ = m.error_map(train)
    profile = m.backend_features(train)
    assert torch.allclose(profile, (spec - recon).mean(dim=2))
    meta = {"section": train["section"], "domain": torch.tensor([0] * 9 + [1] * 3)}
    m.fit_backend(profile, meta)
    query = sines(3, seed=5)
    assert torch.allclose(m.score(query), m.backend.score(m.error_profile(query), query["section"]))
    fresh = tiny_b2(score_mode="mahalanobis")
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(query), m.score(query))


def test_error_profile_bad_mode_is_a_clear_error():
    with pytest.raises(AsdError, match="score_mode"):
        tiny_b2(score_mode="l1")


def test_members_say_whether_their_scores_are_calibrated():
    assert tiny_b2(score_mode="mahalanobis").calibrated
    assert not tiny_b2().calibrated  # mse: no backend at all


def hum(n: int, seed: int, bursts: bool = False) -> dict[str, torch.Tensor]:
    """Tones over a noise floor whose level varies by +-10 dB from clip to clip; with `bursts`, three
    short bursts of noise at random moments, a frame or two of the log-mel each: the floor's clip
    mean moves by less than the clips differ, its peak over time moves far more."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300 + 700 * torch.rand(n, 1, generator=g)
    floor = 0.02 * 10 ** (torch.rand(n, 1, generator=g) - 0.5)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + floor * torch.randn(n, T, generator=g)
    if bursts:
        for row in wave:
            for start in torch.randint(0, T - 100, (3,), generator=g).tolist():
                row[start : start + 100] += 0.3 * torch.randn(100, generator=g)
    return {"wave": wave.float(), "section": torch.zeros(n, dtype=torch.long)}


def profile_b2(mode: str) -> TransformerAEBranch:
    """A tiny b2 on 32 mel bins: as many as the temporal mode's bands."""
    torch.manual_seed(0)
    sizes = dict(patch_freq=8, patch_time=3, dim=16, depth=1, decoder_depth=1, heads=2, dropout=0.0)
    return TransformerAEBranch(LogMel(n_mels=32), T, **sizes, score_mode=mode).eval()


def test_error_profile_temporal_adds_each_bands_peak_and_change_and_scores_the_largest_distance():
    from asd.branches.error_profile import PROFILE_BANDS, TemporalProfileBackend
    from asd.branches.logmel_stats import time_statistics

    m = profile_b2("temporal")
    assert m.needs_backend and m.calibrated and isinstance(m.backend, TemporalProfileBackend)
    train = sines(16)
    spec, recon, _ = m.error_map(train)
    error = spec - recon
    feats = m.backend_features(train)
    assert feats.shape == (16, 32 + 2 * PROFILE_BANDS)
    expected = torch.cat([error.mean(dim=2), time_statistics(error, PROFILE_BANDS, "b2", "")], dim=1)
    assert torch.allclose(feats, expected)
    with pytest.raises(AsdError, match="score_mode='temporal' needs fit_backend"):
        m.score(train)
    m.fit_backend(feats, {"section": train["section"], "domain": torch.tensor([0] * 12 + [1] * 4)})
    query = sines(4, seed=5)
    q, sec, parts = m.error_profile(query), query["section"], m.backend.parts
    three = torch.stack(
        [
            parts["profile"].score(q[:, :32], sec),
            parts["peak"].score(q[:, 32 : 32 + PROFILE_BANDS], sec),
            parts["change"].score(q[:, 32 + PROFILE_BANDS :], sec),
        ]
    )
    assert torch.allclose(m.score(query), three.amax(dim=0))
    fresh = profile_b2("temporal")
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(query), m.score(query))
    # the run's backends.pt path: the fitted backend alone, into a member with the same weights
    again = profile_b2("temporal")
    again.load_backend_state(m.backend_state())
    assert torch.equal(again.score(query), m.score(query))
    # the default front end's 128 mel bins: the profile, then 32 bands of peaks and of changes
    widths = [p.shape[1] for p in TemporalProfileBackend._split(torch.zeros(1, 128 + 64)).values()]
    assert widths == [128, 32, 32]


def test_error_profile_temporal_hears_bursts_the_profile_averages_away():
    train, normal, odd = hum(40, seed=0), hum(20, seed=7), hum(20, seed=8, bursts=True)
    meta = {"section": train["section"], "domain": torch.zeros(40, dtype=torch.long)}
    auc = {}
    for mode in ("mahalanobis", "temporal"):
        m = profile_b2(mode)
        m.fit_backend(m.backend_features(train), meta)
        scores = torch.cat([m.score(normal), m.score(odd)]).detach().numpy()
        auc[mode] = roc_auc_score([0] * 20 + [1] * 20, scores)
    assert auc["temporal"] > 0.95 and auc["temporal"] > auc["mahalanobis"] + 0.1, auc


def test_error_profile_temporal_uses_one_band_per_bin_on_small_maps_and_needs_two_frames():
    from asd.branches.error_profile import TemporalProfileBackend
    from asd.branches.logmel_stats import time_statistics

    torch.manual_seed(0)
    m = tiny_b2(score_mode="temporal")  # 20 mel bins, fewer than the 32 bands: one band per bin
    train = sines(12)
    feats = m.backend_features(train)
    error = m.error_map(train)[0] - m.error_map(train)[1]
    assert feats.shape == (12, 3 * 20)
    assert torch.allclose(feats[:, 20:], time_statistics(error, 20, "b2", ""))
    parts = TemporalProfileBackend._split(feats)
    assert [p.shape[1] for p in parts.values()] == [20, 20, 20]
    m.fit_backend(feats, {"section": train["section"], "domain": torch.zeros(12, dtype=torch.long)})
    assert m.score(sines(3, seed=4)).shape == (3,)
    # a clip of one frame (256 samples, hop 512) through a member that takes any length
    b7 = VAEBranch(LogMel(n_mels=32), channels=[8], latent_channels=4, score_mode="temporal").eval()
    one_frame = {"wave": torch.randn(2, 256), "section": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(
        AsdError, match=r"b7: temporal statistics need at least 2 frames.*branches.b7.score_mode=mahalanobis"
    ):
        b7.backend_features(one_frame)
