"""The training-free reference: log-mel statistics with Mahalanobis and kNN against training normals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from asd.branches.logmel_stats import LogMelStatsReference, modulation_statistics, speed_perturb
from asd.ensemble import Ensemble, is_reference
from asd.errors import AsdError
from asd.features import LogMel
from asd.members import select_references

SR, T = 16000, 8000


def clips(n: int, seed: int = 0, freq: float = 500.0, n_target: int = 0) -> dict[str, torch.Tensor]:
    """Sines near `freq` in light noise; the last `n_target` clips are target domain."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    f = freq + 20 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * f * t) + 0.01 * torch.randn(n, T, generator=g)
    domain = torch.zeros(n, dtype=torch.long)
    if n_target:
        domain[n - n_target :] = 1
    return {"wave": wave.float(), "section": torch.zeros(n, dtype=torch.long), "domain": domain}


def fitted(**kw) -> tuple[LogMelStatsReference, dict[str, torch.Tensor]]:
    m = LogMelStatsReference(LogMel(n_mels=16), **kw).eval()
    train = clips(24, n_target=4)
    m.fit_backend(m.backend_features(train), {"section": train["section"], "domain": train["domain"]})
    return m, train


def test_features_are_the_mean_and_std_of_each_mel_bin():
    m = LogMelStatsReference(LogMel(n_mels=16), stats="mean_std")
    b = clips(3)
    spec = m.frontend(b["wave"])
    feats = m.backend_features(b)
    assert feats.shape == (3, 32)
    torch.testing.assert_close(feats[:, :16], spec.mean(dim=2))
    torch.testing.assert_close(feats[:, 16:], spec.std(dim=2))
    assert LogMelStatsReference(LogMel(n_mels=16)).backend_features(b).shape == (3, 16)


def test_a_training_clip_is_its_own_nearest_neighbour_and_a_shifted_tone_scores_higher():
    m, train = fitted()
    own = m.scores({k: v[:4] for k, v in train.items()})
    assert torch.allclose(own["knn"], torch.zeros(4), atol=1e-3)
    normal = m.scores(clips(8, seed=5))
    odd = m.scores(clips(8, seed=5, freq=900.0))
    for name in ("mahalanobis", "knn"):
        assert odd[name].min() > normal[name].max(), name
    assert torch.equal(m.score(clips(8, seed=5)), normal["mahalanobis"])


def test_scoring_before_fitting_is_one_clear_error():
    with pytest.raises(AsdError, match="fit_backend must run"):
        LogMelStatsReference(LogMel(n_mels=16)).scores(clips(2))


def test_it_never_trains_and_its_fitted_state_moves_with_backend_state():
    m, _ = fitted()
    assert not any(True for _ in m.parameters())
    ens = Ensemble({"stats": m})
    assert ens.trainable == []
    other = LogMelStatsReference(LogMel(n_mels=16)).eval()
    other.load_backend_state(m.backend_state())
    b = clips(5, seed=9)
    for name, s in m.scores(b).items():
        np.testing.assert_array_equal(other.scores(b)[name].numpy(), s.numpy())


def test_reference_selection():
    assert select_references(True) == ["dcase_ae", "stats"]
    assert select_references(False) == []
    assert select_references("stats") == ["stats"]
    with pytest.raises(AsdError, match="reference=\\['ae'\\]"):
        select_references(["ae"])
    assert is_reference("stats_knn") and is_reference("dcase_ae_mse") and not is_reference("b3")


def wobbling(b: dict[str, torch.Tensor], depth: float = 0.3, rate: float = 4.0) -> dict[str, torch.Tensor]:
    """The clips with their level swinging by +-`depth` at `rate` Hz: a changed rhythm, hardly a
    changed long-term spectrum (a loose mount, an imbalance)."""
    t = torch.arange(T) / SR
    return {**b, "wave": b["wave"] * (1 + depth * torch.sin(2 * math.pi * rate * t))}


def test_temporal_features_are_each_bands_peak_over_its_median_and_its_mean_frame_change():
    m = LogMelStatsReference(LogMel(n_mels=16), calibrate=True, temporal=True, bands=4)
    b = clips(3)
    spec = m.frontend(b["wave"])
    feats = m.backend_features(b)
    assert feats.shape == (3, 16 + 4 + 4)
    band = spec.reshape(3, 4, 4, -1).mean(dim=2)  # 16 mels -> 4 bands of 4 adjacent bins
    torch.testing.assert_close(feats[:, :16], spec.mean(dim=2))
    torch.testing.assert_close(feats[:, 16:20], band.amax(dim=2) - band.median(dim=2).values)
    torch.testing.assert_close(feats[:, 20:], (band[:, :, 1:] - band[:, :, :-1]).abs().mean(dim=2))


def test_the_temporal_score_hears_a_rhythm_the_mean_spectrum_barely_moves_for():
    m = LogMelStatsReference(
        LogMel(n_mels=32), calibrate=True, temporal=True, bands=8, covariance="pooled"
    ).eval()
    train = clips(30)
    m.fit_backend(m.backend_features(train), {"section": train["section"], "domain": train["domain"]})
    assert m.score_kinds == ("mahalanobis", "knn", "temporal")
    normal, odd = m.scores(clips(12, seed=7)), m.scores(wobbling(clips(12, seed=7)))
    assert set(normal) == {"mahalanobis", "knn", "temporal"}
    y = np.r_[np.zeros(12), np.ones(12)]
    auc = {k: roc_auc_score(y, np.r_[normal[k].numpy(), odd[k].numpy()]) for k in normal}
    assert auc["temporal"] > 0.95 and auc["mahalanobis"] < 0.8, auc
    # the max of three calibrated scores: never below the mean log-mel's own calibrated score
    assert (odd["temporal"] >= odd["mahalanobis"]).all() and (
        normal["temporal"] >= normal["mahalanobis"]
    ).all()


def test_temporal_needs_calibration_and_enough_frames_and_bands_each_one_clear_error():
    with pytest.raises(AsdError, match="branches.stats.calibrate=true"):
        LogMelStatsReference(LogMel(n_mels=16), temporal=True)
    with pytest.raises(AsdError, match="bands=0"):
        LogMelStatsReference(LogMel(n_mels=16), calibrate=True, temporal=True, bands=0)
    m = LogMelStatsReference(LogMel(n_mels=16), calibrate=True, temporal=True, bands=32)
    with pytest.raises(AsdError, match="bands=32"):
        m.backend_features(clips(2))
    short = LogMelStatsReference(LogMel(n_mels=16, hop_length=512), calibrate=True, temporal=True, bands=4)
    with pytest.raises(AsdError, match="1 frame"):
        short.backend_features({"wave": torch.randn(2, 256)})


def fine(n_mels: int = 4) -> LogMel:
    """A short-hop log-mel of a few broad bands: the modulation front end's shape at test size."""
    return LogMel(n_fft=256, hop_length=64, n_mels=n_mels)


def test_modulation_features_are_each_bands_std_around_its_moving_average_beside_the_change():
    m = LogMelStatsReference(LogMel(n_mels=16), calibrate=True, temporal=True, bands=4, modulation=fine())
    b = clips(3)
    feats = m.backend_features(b)
    assert m.modulation_bands == 4 and feats.shape == (3, 16 + 4 + 4 + 4)
    short = fine()(b["wave"])  # (3, 4, frames)
    frames = short.shape[2]
    trend = torch.stack(  # each frame's centred mean over 9 frames, fewer at the ends
        [short[:, :, max(0, t - 4) : t + 5].mean(dim=2) for t in range(frames)], dim=2
    )
    torch.testing.assert_close(feats[:, 24:], (short - trend).std(dim=2))
    torch.testing.assert_close(modulation_statistics(short, 9, "x", "y"), feats[:, 24:])
    plain = LogMelStatsReference(LogMel(n_mels=16), calibrate=True, temporal=True, bands=4)
    torch.testing.assert_close(feats[:, :24], plain.backend_features(b))  # the rest as it was
    # the change model reads the change and the modulation together; no fourth model, no new column
    parts = m._parts(feats)
    assert parts["change"].shape == (3, 8) and set(m.backend) == set(plain.backend)
    torch.testing.assert_close(parts["change"], feats[:, 20:])
    with pytest.raises(AsdError, match="needs the clips' waves"):
        m.features_of(m.frontend(b["wave"]))


def hissing(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Noise and a tone near 500 Hz, each clip at its own level (+-2 dB): a normal whose level
    varies more than a fast wobble changes its power (+2 % at depth 0.2)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    gain = 10 ** ((4 * torch.rand(n, 1, generator=g) - 2) / 20)
    tone = torch.sin(2 * math.pi * (500 + 20 * torch.rand(n, 1, generator=g)) * t)
    wave = gain * (0.3 * torch.randn(n, T, generator=g) + 0.5 * tone)
    zeros = torch.zeros(n, dtype=torch.long)
    return {"wave": wave.float(), "section": zeros, "domain": zeros}


def test_the_modulation_statistic_hears_a_fast_wobble_the_frame_change_misses():
    """A 31.25 Hz swing of the level (a shaft's rate): one period per 32 ms hop of the main log-mel,
    two per 64 ms window, so its frames all see the same; the 4 ms hop follows it."""
    kw = {"calibrate": True, "temporal": True, "bands": 8, "covariance": "pooled"}
    train, normal = hissing(30, seed=0), hissing(12, seed=7)
    odd = wobbling(hissing(12, seed=7), depth=0.2, rate=31.25)
    y = np.r_[np.zeros(12), np.ones(12)]
    auc = {}
    for name, modulation in (("with", fine()), ("without", None)):
        m = LogMelStatsReference(LogMel(n_mels=32), **kw, modulation=modulation).eval()
        m.fit_backend(m.backend_features(train), {"section": train["section"], "domain": train["domain"]})
        assert m.score_kinds == ("mahalanobis", "knn", "temporal")
        s = {
            k: np.r_[m.scores(normal)[k].numpy(), m.scores(odd)[k].numpy()]
            for k in ("mahalanobis", "temporal")
        }
        auc[name] = {k: roc_auc_score(y, v) for k, v in s.items()}
    assert auc["with"]["temporal"] > 0.95, auc
    assert auc["without"]["temporal"] < 0.8 and auc["with"]["mahalanobis"] < 0.7, auc


def test_modulation_is_unused_and_logged_without_temporal_and_needs_an_odd_smoothing(caplog):
    with caplog.at_level("INFO", logger="asd.branches.logmel_stats"):
        m = LogMelStatsReference(LogMel(n_mels=16), calibrate=True, modulation=fine())
    assert m.modulation is None and m.modulation_bands == 0 and "modulation unused" in caplog.text
    assert m.backend_features(clips(2)).shape == (2, 16)
    for bad in (2, 4, 1, True, 9.0):
        with pytest.raises(AsdError, match=f"modulation_smooth={bad!r}"):
            LogMelStatsReference(LogMel(n_mels=16), modulation_smooth=bad)
    with pytest.raises(AsdError, match="at least 2 frames; this clip gives 1"):
        modulation_statistics(torch.zeros(2, 4, 1), 9, "stats", "use longer clips")


def test_without_temporal_the_reference_scores_and_stores_as_before():
    m, _ = fitted()
    assert m.score_kinds == ("mahalanobis", "knn") and set(m.backend) == {"mahalanobis", "knn"}
    assert set(m.scores(clips(2, seed=3))) == {"mahalanobis", "knn"}


def test_speed_perturb_scales_every_frequency_and_keeps_the_level():
    t = torch.arange(16000) / SR  # 1 s
    tone = torch.sin(2 * math.pi * 1000.0 * t)[None]  # (1, T)
    for factor in (0.9, 1.05, 1.1):
        out = speed_perturb(tone, factor)
        assert out.shape == (1, round(16000 / factor))
        peak = torch.fft.rfft(out[0]).abs().argmax().item() * SR / out.shape[1]
        assert peak == pytest.approx(1000.0 * factor, abs=1.5)
        assert out[0, 500:-500].pow(2).mean().sqrt().item() == pytest.approx(math.sqrt(0.5), rel=1e-3)
    # faster: what would land above the Nyquist frequency is cut, not folded back below it
    high = speed_perturb(torch.sin(2 * math.pi * 7600.0 * t)[None], 1.1)
    assert high.pow(2).mean().sqrt() < 0.01  # folded back, it would be a tone of RMS 0.71 at 7640 Hz


def test_speed_copies_join_the_mahalanobis_models_and_leave_the_knn_bank_alone():
    kw = {"calibrate": True, "covariance": "pooled", "temporal": True, "bands": 4}
    m, train = fitted(**kw, speeds=[0.9, 1.1])
    feats = m.backend_features(train)
    assert feats.shape == (24, 3 * (16 + 4 + 4))  # the clip's features, then each copy's
    copy = m.features(dict(train, wave=speed_perturb(train["wave"], 0.9)))
    torch.testing.assert_close(feats[:, 24:48], copy)
    plain, _ = fitted(**kw)
    # every Mahalanobis model (the mean's, the peak's, the change's) holds the copies; the kNN bank does not
    for name in ("mahalanobis", "peak", "change"):
        with_copies, without = m.backend[name]._fitted.state, plain.backend[name]._fitted.state
        assert not torch.allclose(with_copies["whiten"], without["whiten"]), name
    b = clips(6, seed=4)
    torch.testing.assert_close(m.scores(b)["knn"], plain.scores(b)["knn"])
    # a tone moved by 10 %, as if the machine ran faster, is nearer to normal for the model that saw copies
    shifted = dict(b, wave=speed_perturb(b["wave"], 1.1))
    assert (m.scores(shifted)["mahalanobis"] < plain.scores(shifted)["mahalanobis"]).all()
    with pytest.raises(AsdError, match=r"with branches.stats.speeds=\[0.9, 1.1\] it needs"):
        m.fit_backend(feats[:, :-1], {"section": train["section"], "domain": train["domain"]})


def test_speeds_must_be_distinct_factors_in_range_other_than_one():
    for bad in ([1.0], [0.9, 0.9], [3.0], [True], 0.9, "0.9", [[0.9]]):
        with pytest.raises(AsdError, match="stats: speeds="):
            LogMelStatsReference(LogMel(n_mels=16), speeds=bad)
