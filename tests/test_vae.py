"""b7, the convolutional VAE: shapes at any length, closed gates, every loss trains, KL, freezing, config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_same_in_both_memory_formats, quick_trainer
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from asd.branches.dcase_ae import DcaseAEBranch
from asd.branches.vae import RECONS, SKIPS, Skip, VAEBranch, gaussian_kl
from asd.config import validate
from asd.ensemble import Ensemble
from asd.errors import AsdError
from asd.features import LogMel
from asd.members import BRANCHES, select_branches
from asd.run.build import build_datamodule, build_ensemble, data_facts

CONF = Path(__file__).resolve().parents[1] / "conf"
SR = 16000


def tiny(**kw) -> VAEBranch:
    # 20 mel bins: not a multiple of the total stride 4, so the mel axis is padded too
    sizes = dict(channels=[4, 8], latent_channels=3)
    sizes.update(kw)
    return VAEBranch(LogMel(n_fft=256, hop_length=128, n_mels=20), **sizes)


def sines(n: int, samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    freq = 300 + 700 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, samples, generator=g)
    return {
        "wave": wave.float(),
        "section": torch.zeros(n, dtype=torch.long),
        "domain": torch.zeros(n, dtype=torch.long),
        "machine": torch.zeros(n, dtype=torch.long),
        "attribute": torch.zeros(n, dtype=torch.long),
        "is_target": torch.zeros(n, dtype=torch.bool),
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("samples", [1000, 2000, 3329])  # 8, 16 and 27 frames: odd and ragged lengths
def test_shapes_at_any_length(skip, samples):
    torch.manual_seed(0)
    m = tiny(skip=skip).eval()
    b = sines(3, samples)
    frames = 1 + samples // 128
    assert m.embed_dim == 3 and m.embed(b).shape == (3, 3)
    assert m.score(b).shape == (3,) and torch.isfinite(m.score(b)).all()
    spec, recon, err = m.error_map(b)
    assert spec.shape == recon.shape == err.shape == (3, 20, frames)
    assert torch.allclose(err.mean(dim=(1, 2)), m.score(b))
    assert m.sample(2, frames).shape == (2, 20, frames)
    m.train()
    assert m.loss(b).shape == ()


def test_gated_skip_with_the_gate_closed_equals_no_skip():
    torch.manual_seed(0)
    gated = tiny(skip="gated", channels=[4, 8, 8])
    closed = 0
    for module in gated.modules():
        if isinstance(module, Skip):
            module.logit.data.fill_(-math.inf)
            assert torch.equal(module.gate(), torch.zeros(module.logit.shape))
            closed += 1
    assert closed == 2  # one per level above the bottleneck
    plain = tiny(skip="none", channels=[4, 8, 8])
    missing, unexpected = plain.load_state_dict(gated.state_dict(), strict=False)
    assert missing == [] and unexpected and all(k.endswith(".logit") for k in unexpected)
    b = sines(3, 2000)
    gated.eval()
    plain.eval()
    with torch.no_grad():
        for a, c in zip(gated.error_map(b), plain.error_map(b), strict=True):
            assert torch.equal(a, c)
        assert torch.equal(gated.score(b), plain.score(b))
    # and an open gate does change the output: the test above can fail
    for module in gated.modules():
        if isinstance(module, Skip):
            module.logit.data.fill_(0.0)
    with torch.no_grad():
        assert not torch.equal(gated.error_map(b)[1], plain.error_map(b)[1])


@pytest.mark.parametrize("recon", RECONS)
def test_each_reconstruction_loss_falls_under_adam(recon):
    torch.manual_seed(0)
    weights = {"mse": 1.0, "fft": 0.5, "logfft": 0.5, "ssim": 0.5}
    m = tiny(recon=recon, recon_weights=weights, kl_weight=0.0).train()
    b = sines(4, 2000)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


def test_recon_weights_are_used_by_hybrid_only():
    torch.manual_seed(0)
    m = tiny(recon="hybrid", recon_weights={"mse": 1.0, "ssim": 2.0})
    x = torch.randn(2, 20, 16)
    r = x + 0.3 * torch.randn(2, 20, 16)
    mse = torch.nn.functional.mse_loss(r, x)
    ssim = tiny(recon="ssim").recon_loss(x, r)
    assert torch.allclose(m.recon_loss(x, r), mse + 2.0 * ssim)
    assert torch.allclose(tiny(recon="mse", recon_weights={"ssim": 5.0}).recon_loss(x, r), mse)
    assert torch.allclose(tiny(recon="ssim").recon_loss(x, x), torch.tensor(0.0), atol=1e-5)


def test_kl_is_the_closed_form_and_non_negative():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 3, 5, 2), torch.randn(4, 3, 5, 2)
    p = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    q = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    want = torch.distributions.kl_divergence(p, q).flatten(1).sum(dim=1)
    assert torch.allclose(gaussian_kl(mu, logvar), want, atol=1e-4)
    assert torch.equal(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))
    assert (gaussian_kl(mu, logvar) >= 0).all()
    # the model's own posterior on a batch: KL >= 0, and score_kl adds exactly score_kl * KL per bin
    m = tiny().eval()
    b = sines(3, 2000)
    x = m.stats.normalise(m.spectrogram(b))
    mu, logvar, _ = m.net.encode(m._pad(x))
    kl = m.kl_per_clip(mu, logvar, x.shape[1] * x.shape[2])
    assert (kl >= 0).all() and (kl > 0).any()
    with_kl = tiny(score_kl=2.0).eval()
    with_kl.load_state_dict(m.state_dict())
    assert torch.allclose(with_kl.score(b), m.score(b) + 2.0 * kl)


def test_eval_is_deterministic_and_train_samples():
    torch.manual_seed(0)
    m = tiny().eval()
    b = sines(2, 2000)
    assert torch.equal(m.score(b), m.score(b))
    m.train()
    x = m.stats.normalise(m.spectrogram(b))
    assert not torch.equal(m._forward(x)[0], m._forward(x)[0])  # posterior samples


def test_mahalanobis_score_needs_the_backend_then_scores():
    torch.manual_seed(0)
    m = tiny(score_mode="mahalanobis").eval()
    assert m.needs_backend
    b = sines(6, 2000)
    with pytest.raises(AsdError, match="needs fit_backend"):
        m.score(b)
    m.fit_backend(m.backend_features(b), {k: b[k] for k in ("section", "domain")})
    assert m.backend_features(b).shape == (6, 20)
    s = m.score(sines(3, 2000, seed=1))
    assert s.shape == (3,) and torch.isfinite(s).all()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"skip": "unet"}, "b7: skip='unet' is unknown"),
        ({"recon": "l1"}, "b7: recon='l1' is unknown"),
        ({"recon": "hybrid", "recon_weights": {"mse": 0.0}}, "recon=hybrid needs a positive weight"),
        ({"recon_weights": {"psnr": 1.0}}, r"unknown terms \['psnr'\]"),
        ({"channels": []}, "channels=\\[\\] gives no encoder"),
    ],
)
def test_bad_arguments_fail_naming_the_key(kw, message):
    with pytest.raises(AsdError, match=message):
        tiny(**kw)


def test_frozen_through_the_ensemble_state_dict_is_bit_identical():
    torch.manual_seed(0)
    members = {
        "b7": tiny(),
        "dcase_ae": DcaseAEBranch(LogMel(n_fft=256, hop_length=128, n_mels=16), hidden=16, bottleneck=4),
    }
    ensemble = Ensemble(members, frozen=["b7"])
    before = copy.deepcopy(dict(ensemble.members["b7"].state_dict()))
    other = copy.deepcopy(dict(ensemble.members["dcase_ae"].state_dict()))
    assert any(k.endswith("running_mean") for k in before)  # batch-norm buffers exist
    batches = [sines(4, 2000, seed=i) for i in range(4)]
    quick_trainer(4).fit(ensemble, DataLoader(batches, batch_size=None))
    after = ensemble.members["b7"].state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"frozen b7: {k} moved"
    assert any(not torch.equal(v, ensemble.members["dcase_ae"].state_dict()[k]) for k, v in other.items())


def test_b7_is_a_member_and_builds_from_the_real_config(tmp_path):
    assert "b7" in BRANCHES and "b7" in select_branches("all")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["debug=default", "branch=b7", "reference=false", f"run_dir={tmp_path}"]
        )
    validate(cfg)
    assert cfg.branches.b7.frontend.n_mels == 128
    dm = build_datamodule(cfg)
    dm.setup()
    ensemble = build_ensemble(cfg, data_facts(dm))
    member = ensemble.members["b7"]
    assert list(ensemble.members) == ["b7"] and isinstance(member, VAEBranch)
    assert member.embed_dim == cfg.branches.b7.latent_channels
    batch = next(iter(dm.train_dataloader()))
    assert torch.isfinite(member.loss(batch))


@pytest.mark.parametrize("skip", SKIPS)
def test_channels_last_decoder_gives_the_nchw_results(skip, monkeypatch):
    """b7's decoder takes channels-last input by default (2x faster on the CPU): the same loss,
    gradients and scores as NCHW up to floating-point order, and its last convolution still sees
    channels last after every kind of skip connection."""
    torch.manual_seed(0)
    assert_same_in_both_memory_formats(monkeypatch, tiny(skip=skip), sines(4, 3329), lambda m: m.net.out)
