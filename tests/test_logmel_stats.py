"""The training-free reference: log-mel statistics with Mahalanobis and kNN against training normals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asd.branches.logmel_stats import LogMelStatsReference
from asd.ensemble import Ensemble, is_reference, select_references
from asd.errors import AsdError
from asd.features import LogMel

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
