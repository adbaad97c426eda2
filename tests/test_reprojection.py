"""b6, dual-subspace re-projection: shapes, code-space injection, the stage switch, freezing, config."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_same_in_both_memory_formats, quick_trainer
from hydra import compose, initialize_config_dir
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from asd.branches.reprojection import (
    ReprojectionBranch,
    focal_loss,
    inject_codes,
    plot_reprojections,
    pool_scores,
)
from asd.config import validate
from asd.ensemble import Ensemble
from asd.errors import AsdError
from asd.features import LogMel
from asd.run.build import build_member

SR, T = 16000, 8000  # 0.5 s clips -> 1 + 8000 // 256 = 32 frames
CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny(**kw) -> ReprojectionBranch:
    sizes = dict(channels=(8,), code_dim=8, codebook_size=16, stage1_steps=3, predictor_channels=8)
    sizes.update(kw)
    return ReprojectionBranch(LogMel(n_fft=512, hop_length=256, n_mels=32), **sizes)


def tones(n: int, seed: int = 0, samples: int = T) -> dict[str, torch.Tensor]:
    """A 500 Hz tone in noise at a random level per clip (-20..0 dB): content a code grid can predict."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    level = 10 ** (torch.rand(n, 1, generator=g) - 1.0)
    wave = level * (torch.randn(n, samples, generator=g) + 3 * torch.sin(2 * math.pi * 500 * t))
    zeros = torch.zeros(n, dtype=torch.long)
    return {
        "wave": wave.float(),
        "section": zeros,
        "domain": zeros,
        "machine": zeros,
        "attribute": zeros,
        "is_target": zeros.bool(),
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


def steps(member: ReprojectionBranch, batch: dict, n: int) -> None:
    """n plain optimizer steps of the member's own optimizer (manual optimisation, as the ensemble)."""
    opt = member.configure_optimizers()
    member.train()
    for _ in range(n):
        loss = member.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_shapes_any_clip_length_and_finite_scores():
    torch.manual_seed(0)
    m = tiny()
    steps(m, tones(4), 5)  # both stages
    m.eval()
    for samples in (T, 5555):  # 32 frames (a multiple of the cell size 2) and 22 frames
        b = tones(3, samples=samples)
        frames = 1 + samples // 256
        assert m.loss(b).shape == ()
        assert m.embed(b).shape == (3, m.embed_dim) == (3, 8)
        score = m.score(b)
        assert score.shape == (3,) and torch.isfinite(score).all()
        assert all(t.shape == (3, 32, frames) for t in m.maps(b))
        assert all(t.shape == (3, 32, frames) for t in m.error_map(b))


def test_injection_changes_quantised_features_only_inside_the_mask():
    torch.manual_seed(0)
    m = tiny()
    steps(m, tones(4), 2)
    x = m.stats.normalise(m.spectrogram(tones(4)))
    _, codes = m.quantise(x)  # (4, 16, 16)
    for strategy in ("perlin", "band", "both"):
        m.strategy, m.empty_mask_prob = strategy, 0.0
        mask = m.draw_masks(tuple(x.shape[-2:]), 4, np.random.default_rng(0))
        assert mask.shape == codes.shape and mask.flatten(1).any(dim=1).all()  # no empty mask
        before = m.codebook.lookup(codes)
        after = m.codebook.lookup(
            inject_codes(codes, mask, m.codebook_size, torch.Generator().manual_seed(1))
        )
        inside = mask[:, None].expand_as(before)  # (B, D, h, w)
        assert torch.equal(after[~inside], before[~inside])
        assert (after != before).any(dim=1)[mask].all()  # every masked cell has another vector


def test_band_masks_cover_every_frame_of_their_bins():
    m = tiny(strategy="band", empty_mask_prob=0.0)
    mask = m.draw_masks((32, 32), 3, np.random.default_rng(0))  # (3, 16, 16)
    rows = mask.any(dim=2)  # (3, 16)
    assert torch.equal(mask, rows[:, :, None].expand_as(mask))


def test_empty_mask_probability_one_changes_nothing():
    torch.manual_seed(0)
    m = tiny(empty_mask_prob=1.0)
    steps(m, tones(4), 2)
    x = m.stats.normalise(m.spectrogram(tones(4)))
    mask = m.draw_masks(tuple(x.shape[-2:]), 4, np.random.default_rng(0))
    assert not mask.any()
    _, codes = m.quantise(x)
    assert torch.equal(inject_codes(codes, mask, m.codebook_size), codes)
    m.eval()
    injected, clean = m.reproject(x, mask), m.reproject(x)
    assert torch.equal(injected.x_g, clean.x_g) and torch.equal(injected.logits, clean.logits)
    assert not injected.mask.any()


def test_mask_predictor_learns_an_obvious_injected_anomaly():
    torch.manual_seed(0)
    adam = functools.partial(torch.optim.Adam, lr=1e-2)
    m = tiny(stage1_steps=60, strategy="band", empty_mask_prob=0.0, predictor_channels=16, optimizer=adam)
    train, test = tones(16, seed=0), tones(8, seed=1)

    def focal_and_auc() -> tuple[float, float]:
        m.eval()
        with torch.no_grad():
            x = m.stats.normalise(m.spectrogram(test))
            mask = m.draw_masks(tuple(x.shape[-2:]), 8, np.random.default_rng(5))
            r = m.reproject(x, mask, torch.Generator().manual_seed(5))
        m.train()
        auc = roc_auc_score(r.mask.flatten().numpy(), r.logits.flatten().numpy())
        return float(focal_loss(r.logits, r.mask, 2.0)), auc

    opt = m.configure_optimizers()
    for i in range(160):
        if i == 60:
            start, _ = focal_and_auc()
        loss = m.loss(train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end, auc = focal_and_auc()
    assert end < 0.3 * start
    assert auc > 0.95


@pytest.mark.parametrize("ema", [True, False])
def test_stage_switch_and_idle_parameters_do_not_move(ema):
    torch.manual_seed(0)
    m = tiny(ema=ema, stage1_steps=3, optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.1))
    stage1 = {n: p for n, p in m.named_parameters() if n.split(".")[0] in ("encoder", "codebook", "decoder")}
    stage2 = {
        n: p for n, p in m.named_parameters() if n.split(".")[0] not in ("encoder", "codebook", "decoder")
    }
    assert any(n.startswith("codebook") for n in stage1) != ema  # a learned codebook is a parameter
    batch, opt = tones(4), m.configure_optimizers()
    snap2 = {n: p.detach().clone() for n, p in stage2.items()}
    for i in range(6):
        assert m.stage == (1 if i < 3 else 2) and int(m.steps) == i
        if i == 3:  # the switch: stage 1 moved, stage 2 did not (weight decay and all)
            assert all(torch.equal(p, snap2[n]) for n, p in stage2.items())
            snap1 = {
                k: v.clone() for k, v in m.state_dict().items() if k.split(".")[0] in ("stats", "codebook")
            }
            snap1.update({n: p.detach().clone() for n, p in stage1.items()})
        loss = m.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in m.parameters())  # DDP needs a gradient for every parameter
        opt.step()
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snap1.items())  # bit-identical through stage 2
    assert not all(torch.equal(p, snap2[n]) for n, p in stage2.items())
    # the step count is state: a restored member continues in stage 2
    fresh = tiny(ema=ema, stage1_steps=3)
    fresh.load_state_dict(state)
    assert int(fresh.steps) == 6 and fresh.stage == 2
    # eval-mode losses count nothing
    m.eval()
    m.loss(batch)
    assert int(m.steps) == 6


def test_stage_one_is_fixed_when_trained_alone_by_lightning():
    torch.manual_seed(0)
    m = tiny(stage1_steps=2)
    loader = DataLoader([tones(4, seed=i) for i in range(2)], batch_size=None)
    quick_trainer(2).fit(m, loader)
    snap = {k: v.clone() for k, v in m.state_dict().items() if k.split(".")[0] in ("encoder", "decoder")}
    quick_trainer(3).fit(m, loader)  # a fresh trainer: stage 2 only
    assert m.stage == 2 and int(m.steps) == 5
    assert all(torch.equal(m.state_dict()[k], v) for k, v in snap.items())


def test_frozen_in_the_ensemble_its_whole_state_dict_is_bit_identical():
    torch.manual_seed(0)
    ensemble = Ensemble({"b6": tiny(stage1_steps=1), "other": tiny(stage1_steps=1)}, frozen=["b6"])
    before, before_other = (copy.deepcopy(dict(ensemble.members[n].state_dict())) for n in ("b6", "other"))
    quick_trainer(3).fit(ensemble, DataLoader([tones(4, seed=i) for i in range(3)], batch_size=None))
    after, after_other = ensemble.members["b6"].state_dict(), ensemble.members["other"].state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert int(after_other["steps"]) == 3
    assert not all(torch.equal(v, after_other[k]) for k, v in before_other.items())


def test_score_pools():
    prob = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.0, 0.0, 0.0, 0.4]])[:, None]  # (2, 1, 4)
    assert torch.allclose(pool_scores(prob, "mean", 0.5), torch.tensor([0.375, 0.1]))
    assert torch.allclose(pool_scores(prob, "max", 0.5), torch.tensor([0.9, 0.4]))
    assert torch.allclose(pool_scores(prob, "topk", 0.5), torch.tensor([0.6, 0.2]))  # the top 2 of 4


def test_error_scores_rank_a_changed_spectrum_above_the_training_normals(caplog):
    torch.manual_seed(0)
    m = tiny(score_mode="mahalanobis")
    assert m.needs_backend and m.calibrated and not tiny().needs_backend  # "mask" fits nothing
    train = tones(16, seed=0)
    steps(m, train, 6)  # 3 steps of each stage
    m.eval()
    with pytest.raises(AsdError, match="needs fit_backend"):
        m.score(train)
    with torch.no_grad():
        m.fit_backend(m.backend_features(train), {k: train[k] for k in ("section", "domain")})
        normal, odd = tones(8, seed=1), tones(8, seed=2)
        t = torch.arange(T) / SR
        odd["wave"] = odd["wave"] + odd["wave"].std(dim=1, keepdim=True) * torch.sin(2 * math.pi * 3000 * t)
        scores = m.score({k: torch.cat([normal[k], odd[k]]) for k in normal})
        # the score is the error profile's distance: input - x_s averaged over frames, per mel bin
        x = m.stats.normalise(m.spectrogram(normal))
        profile = (m.spectrogram(normal) - m.stats.denormalise(m.reproject(x).x_s)).mean(dim=2)
        assert torch.allclose(m.backend_features(normal), profile, atol=1e-5)
        assert torch.allclose(scores[:8], m.backend.score(profile, normal["section"]), atol=1e-5)
        mse = tiny(score_mode="mse")
        mse.load_state_dict(m.state_dict(), strict=False)
        assert torch.allclose(mse.eval().score(normal), (m.reproject(x).x_s - x).pow(2).mean(dim=(1, 2)))
    assert scores[8:].min() > scores[:8].max()  # a 3 kHz tone the normals never had
    assert "ended in stage 1" not in caplog.text


def test_a_fit_that_ends_in_stage_one_draws_x_s_with_the_stage_one_decoder(caplog):
    torch.manual_seed(0)
    m = tiny(stage1_steps=3, score_mode="mahalanobis")
    batch = tones(4)
    steps(m, batch, 3)  # stage 1 only: the object decoder is still its random start
    m.eval()
    with torch.no_grad():
        x = m.stats.normalise(m.spectrogram(batch))
        drawn = m.decoder(m.codebook.lookup(m.quantise(x)[1], detach=True))
        assert torch.equal(m.reproject(x).x_s, m._crop(drawn, x))
        m.fit_backend(m.backend_features(batch), {k: batch[k] for k in ("section", "domain")})
    assert "b6: the fit ended in stage 1 (3 training steps, stage1_steps=3)" in caplog.text
    steps(m, batch, 1)  # the first stage-2 step copies the decoder; x_s is the object decoder's from now on
    m.eval()
    with torch.no_grad():
        m.object_decoder[0].weight.add_(1.0)
        assert not torch.equal(m.reproject(x).x_s, m._crop(drawn, x))


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_smaller_above():
    logits, target = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(focal_loss(logits, target, 0.0), ce)
    assert focal_loss(logits, target, 2.0) < ce


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"strategy": "blobs"}, "strategy"),
        ({"score_pool": "median"}, "score_pool"),
        ({"score_mode": "l1"}, "score_mode"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, key):
    with pytest.raises(AsdError, match=f"branches.b6.{key}"):
        tiny(**kw)


def test_plot_writes_one_png_per_clip(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    steps(m, tones(4), 4)
    m.eval()
    batch = tones(3)
    items = [{k: v[i] for k, v in batch.items()} for i in range(3)]
    labels = ["normal", "anomaly", "normal"]
    clips = [
        SimpleNamespace(name=f"clip_{i}.wav", label=lab, domain="source") for i, lab in enumerate(labels)
    ]
    dm = SimpleNamespace(tables={"test": clips}, datasets={"test": items}, windowing=None)
    paths = plot_reprojections(m, "b6", dm, tmp_path, 2, torch.device("cpu"))
    assert [p.name for p in paths] == ["b6_reprojection_clip_0.png", "b6_reprojection_clip_1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_branch_b6_composes_validates_and_builds_from_the_real_config(tmp_path):
    for extra in ([], ["debug=default"]):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=["branch=b6", *extra, f"run_dir={tmp_path}"])
        validate(cfg)
        member = build_member("b6", cfg, {"num_samples": 16000, "sample_rate": 16000})
        assert isinstance(member, ReprojectionBranch)
        assert member.stage1_steps == cfg.branches.b6.stage1_steps
        assert member.score_mode == cfg.branches.b6.score_mode == "temporal" and member.needs_backend
        clips = tones(4, samples=16000)
        member.eval().fit_backend(
            member.backend_features(clips), {"section": clips["section"], "domain": clips["domain"]}
        )
        assert member.score(tones(2, samples=16000)).shape == (2,)


def test_channels_last_mask_predictor_gives_the_nchw_results(monkeypatch):
    """b6's mask predictor takes channels-last input by default (faster on the CPU): the same stage-2
    loss, gradients and scores as NCHW up to floating-point order."""
    torch.manual_seed(0)
    start = tiny()
    start.steps.fill_(start.stage1_steps + 1)  # stage 2: the predictor trains
    assert_same_in_both_memory_formats(monkeypatch, start, tones(4), lambda m: m.predictor[0])


def test_error_scores_skip_x_g_and_the_mask_predictor():
    """b6's error scores read x_s alone: `error_map` gives the full pass's x_s without running the
    general decoder's x_g or the mask predictor (most of its scoring time)."""
    torch.manual_seed(0)
    m, b = tiny(score_mode="mahalanobis").eval(), tones(3)
    calls = []
    m.predictor.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        full = m.reproject(m.stats.normalise(m.spectrogram(b)))
        assert len(calls) == 1 and full.x_g is not None and full.logits is not None
        spec, x_s, err = m.error_map(b)
    assert len(calls) == 1  # not called again
    torch.testing.assert_close(x_s, m.stats.denormalise(full.x_s), rtol=0, atol=0)
    torch.testing.assert_close(err, (full.x_s.float() - full.x).pow(2), rtol=0, atol=0)
