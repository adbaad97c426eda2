"""Scoring backends, score normalisation and fusion: hand-computed values and independent references."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, mahalanobis
from sklearn.covariance import LedoitWolf
from torch import nn

from asd.errors import AsdError
from asd.scoring import (
    FUSIONS,
    GroupNormalizer,
    KnnBackend,
    MahalanobisBackend,
    fuse,
    fuse_weighted,
    ledoit_wolf,
)


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- kNN


@pytest.fixture
def cosine_knn_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Section 0: source bank {e1, e2}, target bank {2 e3}."""
    feats = t([[1, 0, 0], [0, 1, 0], [0, 0, 2]])
    return feats, ids(0, 0, 0), ids(0, 0, 1)


def test_knn_cosine_k1_by_hand(cosine_knn_data):
    knn = KnnBackend(k=1).fit(*cosine_knn_data)
    query = t([[3, 4, 0], [0, 0, -1], [0, 1, 3]])
    got = knn.score(query, ids(0, 0, 0))
    # [3,4,0]: cos 0.8 to e2 -> 0.2 (target: cos 0 -> 1); [0,0,-1]: source 1, target 2;
    # [0,1,3]: source 1 - 1/sqrt(10), target 1 - 3/sqrt(10) wins the min
    expected = torch.tensor([0.2, 1.0, 1 - 3 / math.sqrt(10)])
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_knn_cosine_k2_uses_whole_small_bank(cosine_knn_data):
    knn = KnnBackend(k=2).fit(*cosine_knn_data)
    got = knn.score(t([[3, 4, 0], [0, 0, -1]]), ids(0, 0))
    # source mean of (0.2, 0.4) = 0.3; the 1-clip target bank gives 1 and 2
    torch.testing.assert_close(got, torch.tensor([0.3, 1.0]), atol=1e-6, rtol=0)


def test_knn_euclidean_by_hand_and_sections_kept_apart():
    feats = t([[0, 0], [3, 0], [0, 5], [100, 100]])
    knn1 = KnnBackend(k=1, normalize=False).fit(feats, ids(0, 0, 0, 1), ids(0, 0, 0, 0))
    knn2 = KnnBackend(k=2, normalize=False).fit(feats, ids(0, 0, 0, 1), ids(0, 0, 0, 0))
    query = t([[0, 4], [0, 4]])
    # section 0: distances 4, 5, 1; section 1: only (100, 100)
    torch.testing.assert_close(knn1.score(query, ids(0, 1)), torch.tensor([1.0, math.hypot(100, 96)]))
    torch.testing.assert_close(knn2.score(query, ids(0, 1)), torch.tensor([2.5, math.hypot(100, 96)]))


def test_knn_unknown_domain_joins_source_bank():
    feats = t([[1, 0], [0, 1], [-1, 0]])
    knn = KnnBackend(k=2).fit(feats, ids(0, 0, 0), ids(0, 2, 1))
    # source bank {[1,0], [0,1]}: mean(0, 1) = 0.5; target {[-1,0]}: 2. Were [0,1] a target clip: 0.
    torch.testing.assert_close(knn.score(t([[1, 0]]), ids(0)), torch.tensor([0.5]))


def reference_knn(bank, sec, dom, query, qsec, k, metric):
    """Brute force in float64 with scipy: min over the section's banks of the mean k-NN distance."""
    bank, query = bank.double().numpy(), query.double().numpy()
    bank_dom = (dom.numpy() == 1).astype(int)  # unknown (2) -> source
    out = np.full(len(query), np.inf)
    for i, s in enumerate(qsec.tolist()):
        for d in (0, 1):
            rows = bank[(sec.numpy() == s) & (bank_dom == d)]
            if len(rows):
                dist = np.sort(cdist(query[i : i + 1], rows, metric=metric)[0])
                out[i] = min(out[i], dist[: min(k, len(rows))].mean())
    return torch.from_numpy(out)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_matches_scipy_reference_and_chunking_changes_nothing(normalize, k):
    gen = torch.Generator().manual_seed(k)
    bank = torch.randn(60, 8, generator=gen)
    sec = torch.randint(0, 3, (60,), generator=gen)
    dom = torch.cat(
        [torch.zeros(45, dtype=torch.long), torch.full((5,), 2), torch.ones(10, dtype=torch.long)]
    )
    dom[torch.tensor([0, 1, 2])] = 1  # a few more target clips, so some target banks are smaller than k
    query = torch.randn(23, 8, generator=gen)
    qsec = torch.randint(0, 3, (23,), generator=gen)
    metric = "cosine" if normalize else "euclidean"
    expected = reference_knn(bank, sec, dom, query, qsec, k, metric)
    whole = KnnBackend(k=k, normalize=normalize).fit(bank, sec, dom).score(query, qsec)
    tiled = KnnBackend(k=k, normalize=normalize, chunk=4).fit(bank, sec, dom).score(query, qsec)
    torch.testing.assert_close(whole.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tiled, whole, atol=1e-7, rtol=0)


def test_knn_euclidean_exact_for_near_duplicates():
    """|q|^2 + |b|^2 - 2 q.b in float32 cancels catastrophically; the winners are recomputed in float64."""
    bank = torch.full((4, 64), 300.0) + torch.arange(4.0)[:, None]
    query = bank[2:3].clone()
    query[0, 5] += 0.01
    got = KnnBackend(k=1, normalize=False).fit(bank, ids(0, 0, 0, 0), ids(0, 0, 0, 0)).score(query, ids(0))
    exact = float(query[0, 5].double() - bank[2, 5].double())
    assert got.item() == pytest.approx(exact, rel=1e-6)


def test_knn_autocast_does_not_lower_precision():
    gen = torch.Generator().manual_seed(0)
    bank, query = torch.randn(40, 16, generator=gen), torch.randn(5, 16, generator=gen)
    knn = KnnBackend(k=2).fit(bank, torch.zeros(40, dtype=torch.long), torch.zeros(40, dtype=torch.long))
    plain = knn.score(query, torch.zeros(5, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = knn.score(query, torch.zeros(5, dtype=torch.long))
    assert torch.equal(plain, mixed)


def test_knn_empty_query_gives_empty_scores(cosine_knn_data):
    got = KnnBackend().fit(*cosine_knn_data).score(torch.zeros(0, 3), ids())
    assert got.shape == (0,)


# ---------------------------------------------------------------- Mahalanobis


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)  # well-conditioned correlations
    return (torch.randn(n, dim, generator=gen) @ mix + shift).float()


def scipy_distances(train: np.ndarray, query: np.ndarray, cov: np.ndarray, mean: np.ndarray | None = None):
    vi = np.linalg.inv(cov)
    mean = train.mean(axis=0) if mean is None else mean
    return np.array([mahalanobis(q, mean, vi) for q in query])


def test_mahalanobis_without_shrinkage_matches_scipy():
    train, query = gaussian(300, 5, seed=1), gaussian(20, 5, seed=2, shift=0.5)
    backend = MahalanobisBackend(shrinkage=0.0, per_domain=False)
    got = backend.fit(train, torch.zeros(300, dtype=torch.long), torch.zeros(300, dtype=torch.long))
    got = got.score(query, torch.zeros(20, dtype=torch.long))
    x = train.double().numpy()
    expected = scipy_distances(x, query.double().numpy(), np.cov(x, rowvar=False, bias=True))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_mahalanobis_full_shrinkage_is_scaled_euclidean():
    train, query = gaussian(100, 6, seed=3), gaussian(10, 6, seed=4)
    zeros = torch.zeros(100, dtype=torch.long)
    got = MahalanobisBackend(shrinkage=1.0).fit(train, zeros, zeros).score(query, zeros[:10])
    x = train.double()
    mu = torch.trace(torch.cov(x.T, correction=0)) / 6
    expected = (query.double() - x.mean(dim=0)).norm(dim=1) / mu.sqrt()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [7, 40, 400])
def test_ledoit_wolf_matches_sklearn(n):
    x = gaussian(n, 12, seed=n)
    cov, shrinkage = ledoit_wolf(x)
    reference = LedoitWolf().fit(x.double().numpy())
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(cov.numpy(), reference.covariance_, rtol=1e-9, atol=1e-12)


def test_mahalanobis_auto_per_domain_is_min_over_domain_models():
    source, target = gaussian(200, 8, seed=5), gaussian(6, 8, seed=6, shift=3.0)  # 6 target clips < 8 dims
    unknown = gaussian(4, 8, seed=7)
    feats = torch.cat([source, target, unknown])
    domain = torch.cat([torch.zeros(200), torch.ones(6), torch.full((4,), 2)]).long()
    section = torch.zeros(210, dtype=torch.long)
    query = torch.cat([gaussian(5, 8, seed=8), gaussian(5, 8, seed=9, shift=3.0)])
    got = MahalanobisBackend("auto").fit(feats, section, domain).score(query, section[:10])
    src = torch.cat([source, unknown]).double().numpy()  # unknown clips join the source model
    tgt = target.double().numpy()
    q = query.double().numpy()
    per_model = [scipy_distances(x, q, LedoitWolf().fit(x).covariance_) for x in (src, tgt)]
    np.testing.assert_allclose(got.numpy(), np.minimum(*per_model), rtol=1e-5)
    assert (per_model[1][5:] < per_model[0][5:]).all()  # the shifted queries are scored by the target model


def test_mahalanobis_single_clip_domain_borrows_section_covariance(caplog):
    source, target = gaussian(50, 3, seed=10), gaussian(1, 3, seed=11, shift=2.0)
    feats, domain = torch.cat([source, target]), torch.cat([torch.zeros(50), torch.ones(1)]).long()
    section = torch.full((51,), 4, dtype=torch.long)
    query = gaussian(6, 3, seed=12, shift=1.0)
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        got = MahalanobisBackend(0.0).fit(feats, section, domain).score(query, section[:6])
    assert "section 4 target" in caplog.text
    x, q = feats.double().numpy(), query.double().numpy()
    pooled = np.cov(x, rowvar=False, bias=True)
    expected = np.minimum(
        scipy_distances(x[:50], q, np.cov(x[:50], rowvar=False, bias=True)),
        scipy_distances(x, q, pooled, mean=x[50]),
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_mahalanobis_two_clip_domain_borrows_section_covariance_with_ledoit_wolf(caplog):
    # Ledoit-Wolf estimates no shrinkage from two clips, so their own covariance is singular.
    source, target = gaussian(40, 4, seed=15), gaussian(2, 4, seed=16, shift=2.0)
    feats, domain = torch.cat([source, target]), torch.cat([torch.zeros(40), torch.ones(2)]).long()
    section = torch.zeros(42, dtype=torch.long)
    query = gaussian(5, 4, seed=17, shift=1.0)
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        got = MahalanobisBackend("auto").fit(feats, section, domain).score(query, section[:5])
    assert "section 0 target (2 clips)" in caplog.text
    x, q = feats.double().numpy(), query.double().numpy()
    expected = np.minimum(
        scipy_distances(x[:40], q, LedoitWolf().fit(x[:40]).covariance_),
        scipy_distances(x, q, LedoitWolf().fit(x).covariance_, mean=x[40:].mean(axis=0)),
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_mahalanobis_singular_covariance_without_shrinkage_is_a_clear_error():
    feats = gaussian(5, 10, seed=13)  # 5 clips in 10 dims: rank 4
    zeros = torch.zeros(5, dtype=torch.long)
    with pytest.raises(AsdError, match=r"section 0 source is singular.*shrinkage='auto'"):
        MahalanobisBackend(0.0).fit(feats, zeros, zeros)
    assert MahalanobisBackend("auto").fit(feats, zeros, zeros).score(feats, zeros).isfinite().all()


def test_mahalanobis_section_with_one_clip_borrows_the_other_sections_spread(caplog):
    feats = gaussian(7, 2, seed=14).double()
    section, domain = ids(0, 0, 0, 1, 1, 1, 9), ids(0, 0, 0, 0, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        maha = MahalanobisBackend(shrinkage=0.0, calibrate=True).fit(feats, section, domain)
    assert "sections [9] have too few training clips" in caplog.text
    x = feats.numpy()
    centred = np.concatenate([x[0:3] - x[0:3].mean(0), x[3:5] - x[3:5].mean(0), x[5:6] - x[5:6]])
    inv = np.linalg.inv(centred.T @ centred / len(centred))
    query = x[6:7] + 0.3
    got = maha.score(torch.from_numpy(query), ids(9))
    # the lone section keeps raw distances (no left-out scores to calibrate on)
    assert float(got[0]) == pytest.approx(mahalanobis(query[0], x[6], inv), rel=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        alone = MahalanobisBackend().fit(feats[:2], ids(0, 1), ids(0, 0))
    assert "no section has enough training clips" in caplog.text
    euclidean = math.sqrt(2.0)  # the clip moved by 1 in each of 2 dims
    assert float(alone.score(feats[:1] + 1.0, ids(0))[0]) == pytest.approx(euclidean, rel=1e-5)


def test_mahalanobis_section_of_two_clips_borrows_the_other_sections_spread_with_ledoit_wolf(caplog):
    # two clips give Ledoit-Wolf no shrinkage, a singular covariance: once a stopped run (a MIMII
    # unit with two training normals), now the section keeps its mean and borrows the spread
    feats = torch.cat([gaussian(6, 4, seed=20), gaussian(2, 4, seed=21, shift=3.0)])
    section, domain = ids(0, 0, 0, 0, 0, 0, 1, 1), ids(0, 0, 0, 0, 0, 0, 0, 0)
    query = gaussian(3, 4, seed=22, shift=3.0)
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        got = MahalanobisBackend("auto").fit(feats, section, domain).score(query, ids(1, 1, 1))
    assert "sections [1] have too few training clips" in caplog.text
    x, q = feats.double().numpy(), query.double().numpy()
    borrowed = LedoitWolf().fit(x[:6] - x[:6].mean(axis=0)).covariance_
    expected = scipy_distances(x[6:], q, borrowed, mean=x[6:].mean(axis=0))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------- normaliser


def test_normalizer_z_scores_are_standard_per_group():
    gen = torch.Generator().manual_seed(0)
    scores = torch.cat(
        [
            torch.randn(30, generator=gen) * 5 + 10,
            torch.randn(8, generator=gen) + 40,
            torch.randn(12, generator=gen) * 0.1 - 3,
            torch.randn(4, generator=gen) * 2,
        ]
    )
    section = torch.cat([torch.zeros(38), torch.ones(16)]).long()
    domain = torch.cat([torch.zeros(30), torch.ones(8), torch.zeros(12), torch.ones(4)]).long()
    norm = GroupNormalizer().fit(scores, section, domain)
    z = norm.transform(scores, section, domain)
    assert z.dtype == torch.float32 and z.shape == (54,)
    z = z.double()
    for s in (0, 1):
        for d in (0, 1):
            group = z[(section == s) & (domain == d)]
            assert group.mean().item() == pytest.approx(0, abs=1e-6)
            assert group.std().item() == pytest.approx(1, abs=1e-6)


def test_normalizer_fallbacks_and_unknown_domain(caplog):
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 5.0, 5.0, 5.0, 7.0, 9.0])
    section = ids(0, 0, 0, 0, 1, 1, 1, 2, 2)
    domain = ids(0, 0, 0, 1, 0, 0, 1, 0, 1)
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        norm = GroupNormalizer().fit(scores, section, domain)
    # section 0 target has 1 clip; section 1 is constant (std 0); section 2 has 1 clip per domain
    for text in (
        "section 0 target (1 clips) -> section",
        "section 1 (all domains, 3 clips) -> global",
        "section 1 source (2 clips) -> section",
        "section 2 source (1 clips) -> section",
    ):
        assert text in caplog.text
    assert "section 0 source" not in caplog.text
    s0 = torch.tensor([1.0, 2.0, 3.0, 10.0])
    glob, s2 = scores.double(), torch.tensor([7.0, 9.0]).double()
    query = torch.tensor([4.0, 4.0, 4.0, 4.0, 4.0])
    got = norm.transform(query, ids(0, 0, 0, 1, 2), ids(0, 1, 2, 0, 1))
    expected = torch.tensor(
        [
            (4 - 2) / 1.0,
            (4 - s0.mean()) / s0.std(),
            (4 - s0.mean()) / s0.std(),
            (4 - glob.mean()) / glob.std(),
            (4 - s2.mean()) / s2.std(),
        ]
    ).float()
    torch.testing.assert_close(got, expected)


def test_normalizer_errors():
    with pytest.raises(AsdError, match="constant or fewer than 2"):
        GroupNormalizer().fit(torch.full((5,), 3.0), ids(0, 0, 0, 1, 1), ids(0, 0, 1, 0, 1))
    with pytest.raises(AsdError, match="no clips to fit on"):
        GroupNormalizer().fit(torch.zeros(0), ids(), ids())
    with pytest.raises(AsdError, match=r"`scores` has 1 NaN/inf values in rows \[1\]"):
        GroupNormalizer().fit(torch.tensor([1.0, float("nan")]), ids(0, 0), ids(0, 0))
    norm = GroupNormalizer().fit(torch.tensor([1.0, 2.0]), ids(0, 0), ids(0, 0))
    with pytest.raises(AsdError, match=r"section id\(s\) \[3\] have no normalisation statistics"):
        norm.transform(torch.tensor([1.0]), ids(3), ids(0))
    with pytest.raises(AsdError, match=r"`domain` has values \[5\]"):
        norm.transform(torch.tensor([1.0]), ids(0), ids(5))
    with pytest.raises(AsdError, match="not fitted"):
        GroupNormalizer().transform(torch.tensor([1.0]), ids(0), ids(0))


# ---------------------------------------------------------------- fusion


def test_fuse_values():
    z = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(fuse(z, "zmean"), torch.tensor([2 / 3, 0.5]))
    torch.testing.assert_close(fuse(z, "zmin"), torch.tensor([-2.0, 0.5]))
    torch.testing.assert_close(fuse(z, "zmax"), torch.tensor([3.0, 0.5]))
    assert FUSIONS == ("zmean", "zmin", "zmax")


def test_fuse_errors():
    with pytest.raises(AsdError, match=r"unknown method 'median'; use one of \('zmean', 'zmin', 'zmax'\)"):
        fuse(torch.zeros(2, 2), "median")
    with pytest.raises(AsdError, match=r"shape \(B, M\)"):
        fuse(torch.zeros(4), "zmin")
    with pytest.raises(AsdError, match="NaN/inf"):
        fuse(torch.tensor([[0.0, float("inf")]]), "zmean")


def test_fuse_weighted_values_and_errors():
    z = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    torch.testing.assert_close(fuse_weighted(z, torch.tensor([3.0, 1.0, 0.0])), torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(fuse_weighted(z, torch.ones(3)), fuse(z, "zmean"))
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(AsdError, match="`weights` must be 3 finite values >= 0, not all 0"):
            fuse_weighted(z, torch.tensor(bad))
    with pytest.raises(AsdError, match="NaN/inf"):
        fuse_weighted(torch.tensor([[0.0, float("inf")]]), torch.ones(2))


# ---------------------------------------------------------------- state round trip


def fitted_backends() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A parent module (like a branch) holding all three fitted backends, plus query data."""
    feats = gaussian(80, 6, seed=20)
    section, domain = torch.arange(80) % 2, (torch.arange(80) >= 70).long()
    parent = nn.Module()
    parent.head = nn.Linear(6, 2)
    parent.knn = KnnBackend(k=3, chunk=16).fit(feats, section, domain)
    parent.maha = MahalanobisBackend().fit(feats, section, domain)
    parent.norm = GroupNormalizer().fit(feats[:, 0], section, domain)
    query = gaussian(9, 6, seed=21, shift=0.3)
    return parent, query, section[:9], domain[:9]


def outputs(parent: nn.Module, query, section, domain) -> list[torch.Tensor]:
    return [
        parent.knn.score(query, section),
        parent.maha.score(query, section),
        parent.norm.transform(query[:, 0], section, domain),
    ]


def fresh_parent() -> nn.Module:
    parent = nn.Module()
    parent.head = nn.Linear(6, 2)
    parent.knn, parent.maha, parent.norm = KnnBackend(k=3, chunk=16), MahalanobisBackend(), GroupNormalizer()
    return parent


def test_state_dict_round_trip_through_weights_only_load(tmp_path):
    parent, *data = fitted_backends()
    path = tmp_path / "backends.pt"
    torch.save(parent.state_dict(), path)
    fresh = fresh_parent()
    assert not fresh.knn.fitted and not fresh.maha.fitted and not fresh.norm.fitted
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for before, after in zip(outputs(parent, *data), outputs(fresh, *data), strict=True):
        assert torch.equal(before, after)


def test_half_precision_model_keeps_fitted_state_exact():
    parent, *data = fitted_backends()
    before = outputs(parent, *data)
    parent.half()  # e.g. a `16-true` Lightning precision plugin
    assert parent.head.weight.dtype == torch.float16
    for b, a in zip(before, outputs(parent, *data), strict=True):
        assert torch.equal(b, a)


def test_unfitted_state_loads_and_normalize_mismatch_is_refused():
    buffer = io.BytesIO()
    torch.save(KnnBackend().state_dict(), buffer)
    buffer.seek(0)
    knn = KnnBackend()
    knn.load_state_dict(torch.load(buffer, weights_only=True))
    assert not knn.fitted
    fitted = KnnBackend(normalize=True).fit(t([[1, 0]]), ids(0), ids(0))
    with pytest.raises(AsdError, match="normalize=True but this backend has normalize=False"):
        KnnBackend(normalize=False).load_state_dict(fitted.state_dict())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", [KnnBackend, MahalanobisBackend])
def test_backend_input_errors(backend):
    good = gaussian(10, 3, seed=30)
    zeros = torch.zeros(10, dtype=torch.long)
    with pytest.raises(AsdError, match="no clips to fit on"):
        backend().fit(torch.zeros(0, 3), ids(), ids())
    bad = good.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(AsdError, match=r"`feats` has 1 NaN/inf values in rows \[4\]"):
        backend().fit(bad, zeros, zeros)
    with pytest.raises(AsdError, match=r"`feats` must be a float tensor of shape \(N, D\)"):
        backend().fit(good[0], zeros, zeros)
    with pytest.raises(AsdError, match="`section` has 9 entries but there are 10 rows"):
        backend().fit(good, zeros[:9], zeros)
    with pytest.raises(AsdError, match="`section` must be an integer tensor"):
        backend().fit(good, zeros.float(), zeros)
    with pytest.raises(AsdError, match=r"`domain` has values \[3\]"):
        backend().fit(good, zeros, zeros + 3)
    with pytest.raises(AsdError, match="not fitted"):
        backend().score(good, zeros)
    fitted = backend().fit(good, zeros, zeros)
    query = good[:2].clone()
    query[1, 0] = float("inf")
    with pytest.raises(AsdError, match=r"NaN/inf values in rows \[1\]"):
        fitted.score(query, zeros[:2])
    with pytest.raises(
        AsdError, match=r"section id\(s\) \[7\] have no .* the training data given to fit\(\) has no"
    ):
        fitted.score(good[:2], ids(0, 7))
    with pytest.raises(AsdError, match="`feats` has 4 dims but"):
        fitted.score(torch.zeros(2, 4), zeros[:2])


def test_constructor_errors():
    with pytest.raises(AsdError, match="set `k` to a positive integer"):
        KnnBackend(k=0)
    with pytest.raises(AsdError, match="set `chunk` to a positive integer"):
        KnnBackend(chunk=0)
    with pytest.raises(AsdError, match=r"use 'auto' or a number in \[0, 1\]"):
        MahalanobisBackend(shrinkage=1.5)
    with pytest.raises(AsdError, match=r"use 'auto' or a number in \[0, 1\]"):
        MahalanobisBackend(shrinkage="lw")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_returns_on_query_device():
    parent, query, section, domain = fitted_backends()
    cpu = outputs(parent, query, section, domain)
    gpu = outputs(parent, query.cuda(), section.cuda(), domain.cuda())
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-6)
    knn = KnnBackend(k=2).fit(query.cuda(), section.cuda(), domain.cuda())  # fitted on the GPU
    torch.testing.assert_close(knn.score(query, section), knn.score(query.cuda(), section.cuda()).cpu())


def test_normaliser_fallbacks_are_kept_and_warned_only_when_asked(caplog):
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0])
    section = torch.tensor([0, 0, 0, 0])
    domain = torch.tensor([0, 0, 0, 1])  # one target clip: the target group borrows its section's
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        quiet = GroupNormalizer().fit(scores, section, domain, warn=False)
    assert quiet.fallbacks == ["section 0 target (1 clips) -> section"] and not caplog.text
    with caplog.at_level(logging.WARNING, logger="asd.scoring"):
        GroupNormalizer().fit(scores, section, domain)
    assert "section 0 target (1 clips) -> section" in caplog.text


def test_shrinkage_pulls_each_groups_mean_and_spread_towards_its_sections():
    from asd.scoring import GroupNormalizer

    source = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = torch.tensor([10.0])
    scores = torch.cat([source, target]).double()
    section = torch.zeros(5, dtype=torch.long)
    domain = torch.tensor([0, 0, 0, 0, 1])
    plain = GroupNormalizer().fit(scores, section, domain, warn=False)
    assert plain.fallbacks == ["section 0 target (1 clips) -> section"]
    k = 3.0
    shrunk = GroupNormalizer(shrinkage=k).fit(scores, section, domain, warn=False)
    assert shrunk.fallbacks == []
    # by hand: the section's mean is 20 / 5 = 4 and its variance 50 / 4 = 12.5 (squared deviations
    # 9 + 4 + 1 + 0 + 36); the source's own squared deviations are 2.25 + 0.25 + 0.25 + 2.25 = 5
    # target: mean (1 * 10 + 3 * 4) / 4 = 5.5, variance (0 + 3 * 12.5) / (0 + 3) = 12.5
    z = shrunk.transform(torch.tensor([12.0]).double(), torch.tensor([0]), torch.tensor([1]))
    assert float(z[0]) == pytest.approx((12.0 - 5.5) / 12.5**0.5)
    # source: mean (4 * 2.5 + 3 * 4) / 7 = 22 / 7, variance (5 + 3 * 12.5) / (3 + 3) = 42.5 / 6
    z = shrunk.transform(torch.tensor([5.0]).double(), torch.tensor([0]), torch.tensor([0]))
    assert float(z[0]) == pytest.approx((5.0 - 22 / 7) / (42.5 / 6) ** 0.5)
