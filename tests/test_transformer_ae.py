"""b2, the patch Transformer autoencoder: shapes, patching, normalisation, masking, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import quick_trainer
from torch.utils.data import DataLoader

from asd.branches.transformer_ae import TransformerAEBranch, sincos_2d
from asd.errors import AsdError
from asd.features import BinStats, LogMel

SR, T = 16000, 8000  # 0.5 s clips -> 1 + 8000 // 512 = 16 frames


def tiny(**kw) -> TransformerAEBranch:
    # 20 mel bins x 16 frames in 8 x 3 patches: both axes need padding (3 x 6 = 18 patches)
    sizes = dict(patch_freq=8, patch_time=3, dim=16, depth=1, decoder_depth=1, heads=2, dropout=0.0)
    sizes.update(kw)
    return TransformerAEBranch(LogMel(n_mels=20), T, **sizes)


def sines(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300 + 700 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, T, generator=g)
    return {"wave": wave.float()}


def test_shapes_and_padding():
    torch.manual_seed(0)
    m = tiny().eval()
    assert (m.n_mels, m.num_frames, m.num_patches) == (20, 16, 18)
    b = sines(3)
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == (3, 16)
    assert m.score(b).shape == (3,)
    spec, recon, err = m.error_map(b)
    assert spec.shape == recon.shape == err.shape == (3, 20, 16)


def test_patchify_layout_and_round_trip():
    m = tiny()
    x = torch.arange(2 * 20 * 16, dtype=torch.float32).reshape(2, 20, 16)
    patches = m._patchify(x)
    assert patches.shape == (2, 18, 24)
    # patch 0: bins 0..7, frames 0..2, bin-major; patch 1 is the next frames of the same bins
    assert torch.equal(patches[:, 0], x[:, :8, :3].reshape(2, 24))
    assert torch.equal(patches[:, 1], x[:, :8, 3:6].reshape(2, 24))
    # the last patch holds bins 16..19 x frame 15 and zero padding elsewhere
    last = patches[0, -1].reshape(8, 3)
    assert torch.equal(last[:4, :1], x[0, 16:20, 15:16])
    assert torch.equal(last[4:], torch.zeros(4, 3)) and torch.equal(last[:, 1:], torch.zeros(8, 2))
    assert torch.equal(m._unpatchify(patches), x)


def test_sincos_positions():
    pos = sincos_2d(3, 5, 8)  # quarter = 2, omega = (1, 1/100)
    assert pos.shape == (15, 8)
    assert torch.allclose(pos[0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    f, t = 2, 3  # token 2 * 5 + 3
    want = [math.sin(f), math.sin(f / 100), math.cos(f), math.cos(f / 100)]
    want += [math.sin(t), math.sin(t / 100), math.cos(t), math.cos(t / 100)]
    assert torch.allclose(pos[13], torch.tensor(want), atol=1e-6)


def test_bin_stats_match_numpy_over_all_frames():
    s = BinStats(4)
    x = torch.randn(2, 4, 7)
    assert torch.equal(s.normalise(x), x)  # identity before any update
    a, b = torch.randn(3, 4, 5) * 3 + 1, torch.randn(2, 4, 9) - 2
    s.update(a)
    s.update(b)
    frames = np.concatenate([a.permute(1, 0, 2).reshape(4, -1), b.permute(1, 0, 2).reshape(4, -1)], axis=1)
    mean, std = frames.mean(axis=1), frames.std(axis=1)
    assert int(s.count) == 3 * 5 + 2 * 9
    assert np.allclose(s.mean.numpy(), mean, atol=1e-5)
    want = (x.numpy() - mean[:, None]) / std[:, None]
    assert np.allclose(s.normalise(x).numpy(), want, atol=1e-4)
    assert torch.allclose(s.denormalise(s.normalise(x)), x, atol=1e-5)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_loss_reaches_every_parameter(mask_ratio):
    torch.manual_seed(0)
    m = tiny(mask_ratio=mask_ratio).train()
    loss = m.loss(sines(4))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert (m.mask_token is not None) == (mask_ratio > 0)


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny().train()
    b = sines(4)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_masking_only_in_train_mode():
    torch.manual_seed(0)
    m = tiny(mask_ratio=0.5)
    seen = []
    m.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    b = sines(2)
    m.train()
    m.loss(b)
    m.embed(b)  # embeddings and scores never mask, whatever the mode
    m.eval()
    m.loss(b)
    m.score(b)
    assert seen == [9, 18, 18, 18]  # round(18 * 0.5) visible patches, then all of them


def test_eval_is_deterministic_and_frozen():
    torch.manual_seed(0)
    m = tiny(dropout=0.3, mask_ratio=0.5)
    b = sines(3)
    m.train()
    m.loss(b)  # moves the normalisation statistics
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.embed(b), m.embed(b))
    assert torch.equal(m.loss(b), m.loss(b))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # eval loss has no masking: it is the mean of the per-clip scores (equal-size clips)
    assert torch.allclose(m.loss(b), m.score(b).mean(), atol=1e-6)


def test_error_map_is_consistent_with_score():
    torch.manual_seed(0)
    m = tiny()
    m.train()
    m.loss(sines(4))  # fit the normalisation so input units differ from normalised units
    m.eval()
    b = sines(2, seed=1)
    spec, recon, err = m.error_map(b)
    assert torch.allclose(spec, m.frontend(b["wave"]))
    assert torch.allclose(err, (m.stats.normalise(spec) - m.stats.normalise(recon)) ** 2, atol=1e-4)
    assert torch.allclose(err.mean(dim=(1, 2)), m.score(b), atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny(mask_ratio=0.25)
    batches = [{"wave": w} for w in sines(8)["wave"]]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(batches, batch_size=4))
    assert int(m.stats.count) == 2 * 4 * 16
    m.eval()
    b = sines(3, seed=2)
    path = tmp_path / "b2.pt"
    torch.save(m.state_dict(), path)

    fresh = tiny(mask_ratio=0.25).eval()
    assert not torch.allclose(fresh.score(b), m.score(b))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.score(b), m.score(b))
    assert torch.equal(fresh.embed(b), m.embed(b))


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    m = tiny(mask_ratio=0.5)
    b = sines(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score = m.score(b)
    loss.backward()
    assert torch.isfinite(loss) and score.dtype == torch.float32
    assert torch.allclose(score, m.score(b), rtol=0.1)


def test_wrong_clip_length_is_a_clear_error():
    m = tiny()
    with pytest.raises(AsdError, match="data.audio.duration"):
        m.score({"wave": torch.zeros(2, T + 512)})


# Types and ranges of the config keys are the schema's (tests/test_config.py); these need several.
@pytest.mark.parametrize("kw", [{"dim": 18}, {"heads": 3, "dim": 16}])
def test_bad_sizes_are_clear_errors(kw):
    with pytest.raises(AsdError, match="branches.b2.dim"):
        tiny(**kw)


def test_clips_of_unknown_length_are_a_clear_error():
    with pytest.raises(AsdError, match="data.audio.duration"):
        TransformerAEBranch(LogMel(n_mels=20), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast():
    torch.manual_seed(0)
    m = tiny(mask_ratio=0.5).cuda()
    b = {"wave": sines(2)["wave"].cuda()}
    with torch.autocast("cuda", dtype=torch.float16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score, err = m.score(b), m.error_map(b)[2]
    loss.backward()
    assert torch.isfinite(loss) and score.device.type == "cuda" and torch.isfinite(score).all()
    assert torch.allclose(err.mean(dim=(1, 2)), score)
    assert torch.allclose(score, m.score(b), rtol=0.1)
