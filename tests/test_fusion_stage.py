"""The pipeline's fusion stage: fit, save/load, apply; unknown domains; left-out threshold scores."""

from __future__ import annotations

import io

import pytest
import torch

from asd.fusion.stage import FusionState, apply_fusion, fit_fusion, group_ids, held_out_meta_scores

CFG = {
    "seed": 0,
    "attention": {"hidden": 8, "context_dim": 2, "epochs": 20, "lr": 0.01, "weight_decay": 0.0},
    "meta": {
        "hidden": 8,
        "inner_lr": 0.1,
        "inner_steps": 2,
        "test_steps": 2,
        "first_order": False,
        "vmap": True,
        "meta_steps": 5,
        "meta_lr": 3e-3,
        "support_fraction": 0.5,
    },
}


def toy(n_normal: int = 3, copies: int = 2, sections: int = 2):
    """Normals of every (section, domain) and `copies` pseudo-anomalies per normal (shifted scores)."""
    gen = torch.Generator().manual_seed(0)
    section = torch.arange(sections).repeat_interleave(2 * n_normal)
    domain = torch.tensor([0, 1]).repeat_interleave(n_normal).repeat(sections)
    normal_z = torch.randn(len(section), 3, generator=gen)
    source = torch.arange(len(section)).repeat_interleave(copies)
    fake_z = normal_z[source] + 2.0 + torch.rand(len(source), 3, generator=gen)
    z = torch.cat([normal_z, fake_z])
    section, domain = torch.cat([section, section[source]]), torch.cat([domain, domain[source]])
    machine = torch.zeros_like(section)
    y = torch.cat([torch.zeros(len(normal_z)), torch.ones(len(fake_z))])
    rows_source = torch.cat([torch.arange(len(normal_z)), source])
    return z, machine, section, domain, y, rows_source


def fitted(z, machine, section, domain, y):
    return fit_fusion(
        z, machine, section, domain, y, members=["a", "b", "c"], num_machines=1, num_sections=2, cfg=CFG
    )


def test_state_survives_a_weights_only_round_trip_and_scores_the_same():
    z, machine, section, domain, y, _ = toy()
    state = fitted(z, machine, section, domain, y)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = FusionState.from_state_dict(torch.load(buf, weights_only=True))
    a, b = apply_fusion(state, z, machine, section, domain), apply_fusion(loaded, z, machine, section, domain)
    for key in ("attention", "meta", "weights"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert sorted(state.adapted) == sorted(set(group_ids(section, domain).tolist()))
    torch.testing.assert_close(a["weights"].sum(1), torch.ones(len(z)))


def test_fitting_is_deterministic():
    z, machine, section, domain, y, _ = toy()
    one = apply_fusion(fitted(z, machine, section, domain, y), z, machine, section, domain)
    two = apply_fusion(fitted(z, machine, section, domain, y), z, machine, section, domain)
    torch.testing.assert_close(one["meta"], two["meta"], rtol=0, atol=0)


def test_unknown_domain_scores_the_mean_of_the_source_and_target_classifiers():
    z, machine, section, domain, y, _ = toy()
    state = fitted(z, machine, section, domain, y)
    q = z[:4]
    m, s = machine[:4], section[:4]
    as_source = apply_fusion(state, q, m, s, torch.zeros_like(s))["meta"]
    as_target = apply_fusion(state, q, m, s, torch.ones_like(s))["meta"]
    unknown = apply_fusion(state, q, m, s, torch.full_like(s, 2))["meta"]
    torch.testing.assert_close(unknown, (as_source + as_target) / 2)
    assert not torch.allclose(as_source, as_target)


def test_a_group_without_training_clips_uses_the_initialisation_and_says_so(caplog):
    z, machine, section, domain, y, _ = toy()
    keep = section == 0
    state = fit_fusion(
        z[keep],
        machine[keep],
        section[keep],
        domain[keep],
        y[keep],
        members=["a", "b", "c"],
        num_machines=1,
        num_sections=2,
        cfg=CFG,
    )
    with caplog.at_level("WARNING", logger="asd.fusion.stage"):
        out = apply_fusion(state, z[:2], machine[:2], torch.ones(2, dtype=torch.long), domain[:2])
    assert torch.isfinite(out["meta"]).all()
    assert "no training clips of section id 1" in caplog.text


def test_left_out_scores_ignore_the_clip_and_its_own_pseudo_anomalies():
    z, machine, section, domain, y, source = toy()
    state = fitted(z, machine, section, domain, y)
    before = held_out_meta_scores(state, z, machine, section, domain, y, source)
    assert before.shape == (int((y == 0).sum()),)
    # move clip 0's pseudo-anomalies far away: its left-out score must not notice, another clip's may
    moved = z.clone()
    moved[(source == 0) & (y == 1)] += 5.0
    after = held_out_meta_scores(state, moved, machine, section, domain, y, source)
    assert float(after[0]) == pytest.approx(float(before[0]), abs=1e-6)
    assert not torch.allclose(after[1:], before[1:])


def test_data_without_domains_uses_its_own_adapted_groups(caplog):
    z, machine, section, domain, y, _ = toy()
    unknown = torch.full_like(domain, 2)  # MIMII and DCASE 2020 clips carry no domain
    state = fitted(z, machine, section, unknown, y)
    assert sorted(state.adapted) == [2, 5]
    with caplog.at_level("WARNING", logger="asd.fusion.stage"):
        out = apply_fusion(state, z, machine, section, unknown)
    assert "no training clips" not in caplog.text and torch.isfinite(out["meta"]).all()
