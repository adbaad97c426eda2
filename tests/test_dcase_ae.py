"""The DCASE baseline autoencoder: architecture, frame stacking, MSE and selective Mahalanobis scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import quick_trainer
from torch.utils.data import DataLoader

from asd.branches.dcase_ae import DcaseAEBranch
from asd.errors import AsdError
from asd.features import LogMel

SR, T = 16000, 8000  # 0.5 s clips -> 16 frames -> 12 vectors of 5 frames


def tiny(**kw) -> DcaseAEBranch:
    return DcaseAEBranch(LogMel(n_mels=16), hidden=16, bottleneck=4, **kw)


def clips(n: int, seed: int = 0, section: int = 0, n_target: int = 0) -> dict[str, torch.Tensor]:
    """Sines of random frequency in light noise; the last `n_target` clips are target domain."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 400 + 400 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, T, generator=g)
    domain = torch.zeros(n, dtype=torch.long)
    domain[n - n_target :] = 1 if n_target else 0
    return {"wave": wave.float(), "section": torch.full((n,), section), "domain": domain}


def test_baseline_architecture_at_full_size():
    m = DcaseAEBranch(LogMel())
    linears = [(x.in_features, x.out_features) for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert linears == [(640, 128)] + [(128, 128)] * 3 + [(128, 8), (8, 128)] + [(128, 128)] * 3 + [(128, 640)]
    norms = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm1d)]
    assert len(norms) == 9 and all(x.momentum == 0.01 and x.eps == 1e-3 for x in norms)
    # weights + biases of the Linear layers, plus the BatchNorm scales and shifts, by hand
    linear_params = 640 * 128 + 128 + 3 * (128 * 128 + 128) + 128 * 8 + 8
    linear_params += 8 * 128 + 128 + 3 * (128 * 128 + 128) + 128 * 640 + 640
    assert sum(p.numel() for p in m.parameters()) == linear_params + 8 * 2 * 128 + 2 * 8


def test_vectors_stack_consecutive_frames_frame_major():
    m = tiny()
    b = clips(2)
    spec = m.frontend(b["wave"])  # (2, 16, 16)
    vec = m.vectors(b)
    assert vec.shape == (2, 12, 80)
    for v in (0, 7, 11):
        want = torch.cat([spec[:, :, v + k] for k in range(5)], dim=1)  # (2, 80)
        assert torch.equal(vec[:, v], want)


def test_shapes():
    torch.manual_seed(0)
    m = tiny().eval()
    b = clips(3)
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == (3, 4)
    assert m.score(b).shape == (3,)
    assert m.backend_features(b).shape == (3, 80)
    assert set(m.scores(b)) == {"mse"}


def test_mse_score_and_error_vector_by_hand():
    torch.manual_seed(0)
    m = tiny().eval()
    b = clips(3)
    x = m.vectors(b)  # (3, 12, 80)
    recon = m.decoder(m.encoder(x.reshape(36, 80))).reshape(3, 12, 80)
    assert torch.allclose(m.score(b), ((x - recon) ** 2).mean(dim=(1, 2)), rtol=1e-5)
    assert torch.allclose(m.backend_features(b), (x - recon).mean(dim=1), atol=1e-4)
    assert torch.allclose(m.loss(b), ((x - recon) ** 2).mean(), rtol=1e-5)


def test_loss_reaches_every_parameter_and_adam_lowers_it():
    torch.manual_seed(0)
    m = tiny().train()
    b = clips(4)
    loss = m.loss(b)
    assert torch.isfinite(loss)
    loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()] == []
    # the output layer has to learn dB levels far from 0, hence the large learning rate
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    first = loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = m.loss(b)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_eval_is_deterministic_and_leaves_state_alone():
    torch.manual_seed(0)
    m = tiny()
    b = clips(3)
    m.train()
    m.loss(b)  # moves the BatchNorm statistics
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.embed(b), m.embed(b))
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_mahalanobis_needs_fit_backend_first():
    m = tiny(score_mode="mahalanobis").eval()
    assert m.needs_backend and tiny().needs_backend  # both modes report the Mahalanobis score
    with pytest.raises(AsdError, match="fit_backend"):
        m.score(clips(2))


@torch.no_grad()
def test_selective_mahalanobis_matches_numpy_reference():
    torch.manual_seed(0)
    m = tiny(score_mode="mahalanobis", shrinkage=0.5).eval()
    train = clips(20, seed=1, n_target=6)
    feats = m.backend_features(train)
    m.fit_backend(feats, train)

    def model(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = rows.mean(axis=0)
        cov = (rows - mean).T @ (rows - mean) / len(rows)
        cov = 0.5 * cov + 0.5 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        return mean, np.linalg.inv(cov)

    f = feats.double().numpy()
    models = [model(f[:14]), model(f[14:])]  # source, target
    test = clips(5, seed=2)
    q = m.backend_features(test).double().numpy()
    want = np.min([np.sqrt(np.einsum("bi,ij,bj->b", q - mu, p, q - mu)) for mu, p in models], axis=0)
    got = m.score(test)
    assert got.shape == (5,)
    assert np.allclose(got.numpy(), want, rtol=1e-4)
    assert torch.allclose(m.scores(test)["mahalanobis"], got)


def test_far_clip_scores_higher_than_training_clips():
    torch.manual_seed(0)
    m = tiny(score_mode="mahalanobis").eval()
    train = clips(24, seed=3, n_target=8)
    m.fit_backend(m.backend_features(train), train)
    wave = 0.8 * torch.randn(1, T, generator=torch.Generator().manual_seed(4))
    noise = {"wave": wave, "section": torch.zeros(1, dtype=torch.long)}
    assert m.score(noise).item() > m.score(train).max().item()
    both = m.scores(noise)
    assert set(both) == {"mse", "mahalanobis"}


def test_checkpoint_round_trip_with_fitted_backend(tmp_path):
    torch.manual_seed(0)
    m = tiny(score_mode="mahalanobis")
    rows = clips(8, seed=5)
    batches = [{"wave": w} for w in rows["wave"]]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(batches, batch_size=4))
    m.eval()
    train = clips(16, seed=6, n_target=5)
    m.fit_backend(m.backend_features(train), train)
    path = tmp_path / "dcase_ae.pt"
    torch.save(m.state_dict(), path)

    fresh = tiny(score_mode="mahalanobis")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    test = clips(4, seed=7)
    want, got = m.scores(test), fresh.scores(test)
    assert set(got) == {"mse", "mahalanobis"}
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    m = tiny()
    train = clips(12, seed=8, n_target=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(train)
        m.eval()
        m.fit_backend(m.backend_features(train), train)
        got = m.scores(train)
    loss.backward()
    assert torch.isfinite(loss)
    assert got["mse"].dtype == got["mahalanobis"].dtype == torch.float32
    assert torch.allclose(got["mse"], m.scores(train)["mse"], rtol=0.05)


def test_bad_input_is_a_clear_error():
    """Types and ranges of the config keys are the schema's (tests/test_config.py)."""
    with pytest.raises(AsdError, match="n_mels"):
        DcaseAEBranch(torch.nn.Identity())
    m = tiny().eval()
    with pytest.raises(AsdError, match="n_frames"):
        m.score({"wave": torch.zeros(2, 1024)})  # 3 frames < 5
    train = clips(6)
    with pytest.raises(AsdError, match="domain"):
        m.fit_backend(m.backend_features(train), {"section": train["section"]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast_with_backend():
    torch.manual_seed(0)
    m = tiny().cuda()
    train = {k: v.cuda() for k, v in clips(12, seed=9, n_target=4).items()}
    with torch.autocast("cuda", dtype=torch.float16):
        m.train()
        loss = m.loss(train)
        m.eval()
        m.fit_backend(m.backend_features(train), train)
        got = m.scores(train)
    loss.backward()
    assert torch.isfinite(loss) and got["mahalanobis"].device.type == "cuda"
    assert torch.allclose(got["mse"], m.scores(train)["mse"], rtol=0.05)
