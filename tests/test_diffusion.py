"""b4, the diffusion member: schedules, forward process, DDIM, the U-Net, scoring and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import quick_trainer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from asd.branches.diffusion import (
    DiffusionBranch,
    UNet1d,
    alpha_bar_schedule,
    ddim_sample,
    ddim_timesteps,
    q_sample,
)
from asd.errors import AsdError
from asd.features import LogMel

SR, T = 16000, 7168  # 1 + 7168 // 512 = 15 frames: padded to 16 inside a 3-level U-Net


def tiny(**kw) -> DiffusionBranch:
    # t_star_step = round(0.3 * 49) = 15, DDIM steps [15, 10, 5] (not the default t_star)
    sizes = dict(
        channels=(8, 16, 16),
        time_dim=8,
        norm_groups=4,
        timesteps=50,
        t_star=0.3,
        ddim_steps=3,
        noise_draws=2,
    )
    sizes.update(kw)
    return DiffusionBranch(LogMel(n_mels=16), T, **sizes)


def batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300 + 700 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, T, generator=g)
    return {
        "wave": wave.float(),
        "machine": torch.zeros(n, dtype=torch.long),
        "section": torch.arange(n) % 2,
        "attribute": torch.arange(n) % 2,
        "domain": torch.zeros(n, dtype=torch.long),
        "is_target": torch.zeros(n, dtype=torch.bool),
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


# -- the diffusion process ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("timesteps", [50, 1000])
def test_alpha_bar_is_decreasing_in_unit_interval(kind, timesteps):
    ab = alpha_bar_schedule(kind, timesteps)
    assert ab.shape == (timesteps,)
    assert bool((ab[1:] < ab[:-1]).all())
    assert 0 < float(ab[-1]) and float(ab[0]) <= 1


def test_alpha_bar_values():
    lin = alpha_bar_schedule("linear", 1000)
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert float(lin[0]) == pytest.approx(1 - 1e-4, abs=1e-12)
    assert float(lin[1]) == pytest.approx((1 - 1e-4) * (1 - beta1), abs=1e-12)
    # 50 steps: betas rescaled by 1000 / 50, so the first is 20 times larger
    assert float(alpha_bar_schedule("linear", 50)[0]) == pytest.approx(1 - 2e-3, abs=1e-12)

    def f(t: float, steps: int, s: float = 0.008) -> float:
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    cos = alpha_bar_schedule("cosine", 200)
    for t in (0, 10, 100, 198):  # alpha-bar after step t is f(t + 1) / f(0) while betas stay below the cap
        assert float(cos[t]) == pytest.approx(f(t + 1, 200) / f(0, 200), rel=1e-9)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(AsdError, match="branches.b4.schedule"):
        alpha_bar_schedule("quadratic", 10)


def test_q_sample_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    ab = alpha_bar_schedule("cosine", 100)
    t = torch.tensor([5, 40, 90])
    n = 200_000
    # per clip: x0 of variance 4 -> x_t variance 4 a + 1 - a;
    # a constant x0 = 3 -> mean 3 sqrt(a), variance 1 - a
    x0 = 2 * torch.randn(3, n, generator=g)
    xt = q_sample(x0, t, torch.randn(3, n, generator=g), ab)
    const = q_sample(torch.full((3, n), 3.0), t, torch.randn(3, n, generator=g), ab)
    a = ab[t].float()
    assert torch.allclose(xt.var(dim=1), 4 * a + 1 - a, rtol=0.02)
    assert torch.allclose(const.mean(dim=1), 3 * a.sqrt(), atol=0.01)
    assert torch.allclose(const.var(dim=1), 1 - a, rtol=0.02)


def test_ddim_timesteps():
    assert ddim_timesteps(60, 5) == [60, 48, 36, 24, 12]
    assert ddim_timesteps(30, 4) == [30, 22, 15, 8]  # 22.5 and 7.5 round half to even
    assert ddim_timesteps(7, 1) == [7]


def test_ddim_with_the_true_noise_recovers_x0():
    g = torch.Generator().manual_seed(1)
    ab = alpha_bar_schedule("linear", 100)
    x0, noise = torch.randn(4, 6, 10, generator=g), torch.randn(4, 6, 10, generator=g)
    steps = ddim_timesteps(60, 4)
    x_t = q_sample(x0, torch.full((4,), 60), noise, ab)
    seen = []

    def oracle(x, t):
        seen.append(t.tolist())
        return noise

    assert torch.allclose(ddim_sample(oracle, x_t, steps, ab), x0, atol=1e-5)
    assert seen == [[s] * 4 for s in steps]
    # a model that predicts no noise leaves x_t / sqrt(a_t) after one step: far from x0
    one = ddim_sample(lambda x, t: torch.zeros_like(x), x_t, [60], ab)
    assert torch.allclose(one, x_t / ab[60].float().sqrt())
    assert not torch.allclose(one, x0, atol=0.1)


# -- the denoiser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, frames", [((8,), 15), ((8, 16), 15), ((8, 16, 16), 15), ((8, 16, 16), 4)])
def test_unet_keeps_the_shape_of_ragged_inputs(channels, frames):
    net = UNet1d(16, channels, time_dim=8, groups=4, dropout=0.0)
    assert net.factor == 2 ** (len(channels) - 1)
    out = net(torch.randn(3, 16, frames), torch.tensor([0, 7, 49]))
    assert out.shape == (3, 16, frames)


# -- the member -----------------------------------------------------------------------------------


def test_shapes_and_contract():
    torch.manual_seed(0)
    m = tiny().eval()
    assert (m.n_mels, m.num_frames, m.t_star_step, m.ddim_steps) == (16, 15, 15, [15, 10, 5])
    assert m.embed_dim == 0 and m.needs_backend is False and m.name == "b4"
    b = batch(3)
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == (3, 0)
    assert m.backend_features(b).shape == (3, 0)
    assert m.score(b).shape == (3,)
    spec, recon, err = m.error_map(b)
    assert spec.shape == recon.shape == err.shape == (3, 16, 15)


def test_fit_backend_is_a_no_op():
    torch.manual_seed(0)
    m = tiny().eval()
    b = batch(3)
    before = m.score(b)
    meta = {k: b[k] for k in ("section", "domain", "machine", "attribute")}
    m.fit_backend(m.backend_features(b), meta)
    assert torch.equal(m.score(b), before)


def test_loss_reaches_every_parameter():
    torch.manual_seed(0)
    m = tiny(dropout=0.1).train()
    loss = m.loss(batch(4))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny(channels=(16, 32), time_dim=16)
    b = batch(4)
    m.train()
    with torch.no_grad():
        m.loss(b)  # fit the normalisation to this batch; more updates with it do not move it
    m.eval()
    before = m.loss(b).item()  # eval mode: the same seeded steps and noise every call
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(30):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert m.loss(b).item() < 0.8 * before


def test_eval_is_deterministic_and_leaves_state_alone():
    torch.manual_seed(0)
    m = tiny(dropout=0.3)
    b = batch(3)
    m.train()
    m.loss(b)  # moves the normalisation statistics
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = torch.random.get_rng_state()
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.loss(b), m.loss(b))
    assert all(torch.equal(a, b) for a, b in zip(m.error_map(b), m.error_map(b), strict=True))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)  # scoring and eval loss use their own generator


def test_score_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    m = tiny().eval()
    b = batch(4)
    alone = torch.cat([m.score({"wave": w[None]}) for w in b["wave"]])
    assert torch.allclose(m.score(b), alone, rtol=1e-4, atol=1e-6)
    # the same config and seed draw the same scoring noise in a fresh instance
    assert torch.equal(tiny().score_noise, m.score_noise)
    assert not torch.equal(tiny(seed=1).score_noise, m.score_noise)


def test_error_map_is_consistent_with_score():
    torch.manual_seed(0)
    m = tiny()
    m.train()
    m.loss(batch(4))  # fit the normalisation so input units differ from normalised units
    m.eval()
    b = batch(2, seed=1)
    spec, recon, err = m.error_map(b)
    assert torch.allclose(spec, m.frontend(b["wave"]))
    assert torch.allclose(err.mean(dim=(1, 2)), m.score(b), atol=1e-6)
    # with one draw the map is exactly the squared difference of the normalised spectrograms
    one = tiny(noise_draws=1)
    one.load_state_dict(m.state_dict())
    one.eval()
    spec, recon, err = one.error_map(b)
    assert torch.allclose(err, (one.stats.normalise(recon) - one.stats.normalise(spec)) ** 2, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    data = batch(8)
    rows = [{k: v[i] for k, v in data.items()} for i in range(8)]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(rows, batch_size=4))
    assert int(m.stats.count) == 2 * 4 * 15
    m.eval()
    feats = m.backend_features(data)
    m.fit_backend(feats, {k: data[k] for k in ("section", "domain", "machine", "attribute")})
    b = batch(3, seed=2)
    path = tmp_path / "b4.pt"
    torch.save(m.state_dict(), path)

    fresh = tiny().eval()
    assert not torch.allclose(fresh.score(b), m.score(b))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.score(b), m.score(b))
    assert all(torch.equal(a, c) for a, c in zip(fresh.error_map(b), m.error_map(b), strict=True))


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    m = tiny()
    b = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score = m.score(b)
        err = m.error_map(b)[2]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(score).all()
    assert score.dtype == err.dtype == torch.float32
    assert torch.allclose(score, m.score(b), rtol=0.1)


def test_hydra_list_of_channels_is_accepted():
    m = tiny(channels=OmegaConf.create({"c": [8, 16]}).c)
    assert m.channels == (8, 16) and m.denoiser.factor == 2


def test_wrong_clip_length_is_a_clear_error():
    m = tiny()
    with pytest.raises(AsdError, match="data.audio.duration"):
        m.score({"wave": torch.zeros(2, T + 512)})


# Types and ranges of the config keys are the schema's (tests/test_config.py); these need several.
@pytest.mark.parametrize(
    "kw, key",
    [
        ({"channels": (8, 10)}, "channels"),
        ({"channels": (8, 16), "norm_groups": 3}, "norm_groups"),
        ({"ddim_steps": 16}, "ddim_steps"),  # only 15 steps between t_star and x0
    ],
)
def test_bad_arguments_are_clear_errors(kw, key):
    with pytest.raises(AsdError, match=f"branches.b4.{key}"):
        tiny(**kw)


def test_clips_of_unknown_length_are_a_clear_error():
    with pytest.raises(AsdError, match="data.audio.duration"):
        DiffusionBranch(LogMel(n_mels=16), None)


def test_scores_are_float32_under_the_predict_stages_autocast():
    # the DDIM chain opts out of autocast: bf16 rounding moved b4's official score by 0.004 on a GPU
    torch.manual_seed(0)
    m = tiny().eval()
    b = batch(3)
    with torch.no_grad():
        plain = m.score(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = m.score(b)
    assert mixed.dtype == plain.dtype
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_matches_cpu():
    torch.manual_seed(0)
    m = tiny().eval()
    b = batch(2)
    cpu_score = m.score(b)
    m = m.cuda()
    gb = {"wave": b["wave"].cuda()}
    assert torch.allclose(m.score(gb).cpu(), cpu_score, rtol=1e-3)  # same seeded noise on every device
    with torch.autocast("cuda", dtype=torch.float16):
        m.train()
        loss = m.loss(gb)
        m.eval()
        score, err = m.score(gb), m.error_map(gb)[2]
    loss.backward()
    torch.testing.assert_close(score, m.score(gb))  # the DDIM chain ran in float32 under autocast
    assert torch.isfinite(loss) and score.device.type == "cuda" and torch.isfinite(score).all()
    assert torch.allclose(err.mean(dim=(1, 2)), score)
