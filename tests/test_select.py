"""`final=auto`: folds, the criterion, the choice, and out-of-fold fitting of the learned fusions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY_FUSION_CFG

from asd.errors import AsdError
from asd.evaluation.metrics import auc_pauc, hmean
from asd.fusion import select
from asd.fusion import stage as fusion_stage

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
    section = torch.zeros(len(z), dtype=torch.long)
    context = {"machine": section, "section": section, "domain": torch.zeros_like(section)}
    fitted_on: list[set[int]] = []
    real_fit = fusion_stage.fit_fusion

    def recording_fit(zz, *args, **kwargs):
        fitted_on.append({int(v) for v in zz[:, 0].tolist()})
        return real_fit(zz, *args, **kwargs)

    monkeypatch.setattr(select, "fit_fusion", recording_fit)
    scored = select.cross_fitted_learned(
        z,
        z[:n].clone(),
        context,
        y,
        source,
        members=["a", "b", "c"],
        num_machines=1,
        num_sections=1,
        cfg=CFG,
        folds=4,
    )
    assert len(fitted_on) == 4 and all(v.shape == (len(z),) for v in scored.values())
    fold = select.fold_of(n, 4, seed=0)[source.numpy()]
    for f, rows in enumerate(fitted_on):
        held = set(np.flatnonzero(fold == f).tolist())
        assert held and not (held & rows)  # a clip and its pseudo-anomalies are held out together
        assert rows | held == set(range(len(z)))
