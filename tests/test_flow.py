"""b5, the RealNVP flow: inputs, standardisation, online PCA, likelihoods, checkpoints, errors."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import quick_trainer
from scipy import stats
from torch.utils.data import DataLoader

from asd.branches.flow import FlowBranch, RunningMoments, coupling_masks
from asd.errors import AsdError
from asd.features import LogMel

SR, T = 16000, 4000  # 0.25 s clips -> 1 + 4000 // 512 = 8 frames


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: intra-op threads only add overhead, a lot of it on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_stats(**kw) -> FlowBranch:
    sizes = dict(hidden=16, layers=2, blocks=1)
    sizes.update(kw)
    return FlowBranch(LogMel(n_mels=8), **sizes)  # 16 features: 8 means + 8 stds


def tiny_z(dim: int = 12, **kw) -> FlowBranch:
    sizes = dict(hidden=16, layers=2, blocks=1)
    sizes.update(kw)
    return FlowBranch(None, input_dim=dim, **sizes)


def sines(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300 + 3000 * torch.rand(n, 1, generator=g)
    amp = 0.1 + 0.5 * torch.rand(n, 1, generator=g)
    wave = amp * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(n, T, generator=g)
    return {
        "wave": wave.float(),
        "section": torch.arange(n) % 3,
        "domain": torch.zeros(n, dtype=torch.long),
        "machine": torch.zeros(n, dtype=torch.long),
        "attribute": torch.zeros(n, dtype=torch.long),
        "is_target": torch.zeros(n, dtype=torch.bool),
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


def zbatch(n: int, dim: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    z = torch.randn(n, dim, generator=g) @ mix * torch.linspace(0.5, 4.0, dim) + 3.0  # correlated, scaled
    return {**sines(n, seed), "wave": torch.zeros(n, 64), "z": z}


def train(m: FlowBranch, batches: list[dict[str, torch.Tensor]], steps: int, lr: float = 3e-3) -> list[float]:
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        loss = m.loss(batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_shapes_and_modes():
    torch.manual_seed(0)
    m = tiny_stats().eval()
    assert (m.input_dim, m.feature_dim, m.flow_dim, m.embed_dim, m.needs_backend) == (None, 16, 16, 0, False)
    b = sines(3)
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == (3, 0)
    assert m.backend_features(b).shape == (3, 0)
    assert m.score(b).shape == (3,) and m.score(b).dtype == torch.float32
    mz = tiny_z(12, pca_dim=4).eval()
    assert (mz.input_dim, mz.feature_dim, mz.flow_dim) == (12, 12, 4)
    bz = zbatch(5)
    assert mz.score(bz).shape == (5,) and mz.embed(bz).shape == (5, 0)


def test_stats_features_are_mean_and_std_over_time():
    m = tiny_stats()
    b = sines(2)
    spec = LogMel(n_mels=8)(b["wave"]).numpy().astype(np.float64)  # (2, 8, 8)
    want = np.concatenate([spec.mean(axis=2), spec.std(axis=2)], axis=1)
    assert np.allclose(m.features(b).numpy(), want, rtol=1e-5, atol=1e-4)
    # a batch's z is ignored when the member was built for the statistics
    assert torch.equal(m.features({**b, "z": torch.zeros(2, 5)}), m.features(b))


def test_running_moments_match_numpy():
    a, b = torch.randn(5, 3) * 2 + 1, torch.randn(9, 3) - 4
    full, diag = RunningMoments(3, full_cov=True), RunningMoments(3)
    for s in (full, diag):
        s.update(a)
        s.update(b)
    rows = np.concatenate([a.numpy(), b.numpy()]).astype(np.float64)
    assert int(full.count) == int(diag.count) == 14
    assert np.allclose(full.mean.numpy(), rows.mean(axis=0)) and np.allclose(diag.mean, full.mean)
    assert np.allclose(full.cov.numpy(), np.cov(rows.T, bias=True))
    assert np.allclose(diag.cov.numpy(), rows.var(axis=0))
    assert np.allclose(full.std(1e-3).numpy(), rows.std(axis=0))


def test_running_moments_momentum_by_hand():
    s = RunningMoments(1, momentum=0.5)
    for values in ([0.0, 2.0], [4.0], [10.0, 10.0, 10.0, 10.0]):
        s.update(torch.tensor(values)[:, None])
    # weights: 1 (first batch), max(0.5, 1/3) = 0.5, max(0.5, 4/7) = 4/7
    mean1, var1 = 1.0, 1.0
    mean2 = 0.5 * mean1 + 0.5 * 4.0
    var2 = 0.5 * var1 + 0.5 * 0.0 + 0.25 * (4.0 - mean1) ** 2
    w = 4 / 7
    mean3 = (1 - w) * mean2 + w * 10.0
    var3 = (1 - w) * var2 + w * (1 - w) * (10.0 - mean2) ** 2
    assert math.isclose(float(s.mean), mean3) and math.isclose(float(s.var), var3)


def test_coupling_masks_are_deterministic_complementary_halves():
    masks = coupling_masks(7, 4)
    assert [int(m.sum()) for m in masks] == [3, 4, 3, 4]
    assert torch.equal(masks[0] + masks[1], torch.ones(7, dtype=torch.long))
    assert torch.equal(masks[2] + masks[3], torch.ones(7, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(masks, coupling_masks(7, 4), strict=True))
    # with two features the halves must alternate: a repeated mask wastes a layer
    assert [m.tolist() for m in coupling_masks(2, 4)] == [[1, 0], [0, 1], [1, 0], [0, 1]]


@pytest.mark.parametrize("mode", ["stats", "z_pca_conditional"])
def test_loss_reaches_every_parameter(mode):
    torch.manual_seed(0)
    if mode == "stats":
        m, b = tiny_stats(blocks=2, dropout=0.1), sines(6)
    else:
        m, b = tiny_z(12, pca_dim=6, conditional=True, num_sections=3, layers=3), zbatch(6)
    loss = m.train().loss(b)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny_stats()
    losses = train(m, [sines(16)], steps=40, lr=1e-2)
    assert losses[-1] < losses[0] - 0.5


def test_eval_is_deterministic_and_frozen():
    torch.manual_seed(0)
    m = tiny_z(12, pca_dim=4, dropout=0.3)
    b = zbatch(8)
    m.train()
    m.loss(b)  # moves moments and basis
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.loss(b), m.loss(b))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_log_prob_is_nflows_plus_standardisation_log_det():
    torch.manual_seed(0)
    m = tiny_z(6, layers=4)
    b = zbatch(32, dim=6)
    train(m, [b], steps=5)
    m.eval()
    x = b["z"]
    mean, var = x.double().mean(0), x.double().var(0, unbiased=False)
    assert torch.allclose(m.moments.mean, mean) and torch.allclose(m.moments.var, var)
    std = var.sqrt()
    s = ((x.double() - mean) / std).float()
    want = m.flow.log_prob(s) - std.log().sum()
    assert torch.allclose(m.log_prob(b), want.float(), atol=1e-4)
    assert torch.allclose(m.score(b), -m.log_prob(b))


def test_pca_log_prob_is_a_density_over_the_whole_input():
    torch.manual_seed(0)
    m = tiny_z(8, pca_dim=3)
    b = zbatch(40, dim=8)
    train(m, [b], steps=4)
    m.eval()
    w, pc_std, rv = m.basis, m.pc_std, float(m.residual_var)
    assert torch.allclose(w.T @ w, torch.eye(3, dtype=torch.float64), atol=1e-10)
    # complete the basis, then compute the density coordinate by coordinate, independently
    q = torch.linalg.qr(torch.cat([w, torch.randn(8, 5, dtype=torch.float64)], dim=1))[0]
    perp = q[:, 3:]  # (8, 5) orthonormal complement
    std = m.moments.std(m.min_std)
    s = (b["z"].double() - m.moments.mean) / std
    flow_part = m.flow.log_prob(((s @ w) / pc_std).float()).double() - pc_std.log().sum()
    resid = stats.norm.logpdf((s @ perp).numpy(), scale=math.sqrt(rv)).sum(axis=1)
    want = flow_part + torch.from_numpy(resid) - std.log().sum()
    assert torch.allclose(m.log_prob(b).double(), want, atol=1e-3)


def test_online_pca_finds_the_principal_subspace():
    g = torch.Generator().manual_seed(0)
    dim, k = 10, 3
    rot = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    scales = torch.tensor([5.0, 4.0, 3.0] + [0.5] * 7)

    def draw(n):
        return (torch.randn(n, dim, generator=g) * scales) @ rot.T

    m = tiny_z(dim, pca_dim=k).train()
    for _ in range(30):
        m.loss({"z": draw(64)})
    x = draw(4000).double()
    s = (x - x.mean(0)) / x.std(0)
    top = torch.linalg.eigh(torch.cov(s.T))[1][:, -k:]  # (dim, k) true principal directions
    # the subspaces agree: the projection matrices are close
    assert torch.allclose(m.basis @ m.basis.T, top @ top.T, atol=0.1)


def test_flow_fits_a_2d_gaussian():
    g = torch.Generator().manual_seed(0)
    cov = np.array([[1.0, 0.9], [0.9, 1.0]]) * np.array([[4.0, 2.0], [2.0, 1.0]])
    chol = torch.linalg.cholesky(torch.tensor(cov, dtype=torch.float32))
    mean = torch.tensor([2.0, -1.0])

    def draw(n):
        return torch.randn(n, 2, generator=g) @ chol.T + mean

    torch.manual_seed(0)
    m = tiny_z(2, hidden=32, layers=4)
    train(m, [{"z": draw(256)} for _ in range(8)], steps=300)
    m.eval()
    test = draw(4000)
    with torch.no_grad():
        flow_ll = m.log_prob({"z": test}).double().mean().item()
    true_ll = stats.multivariate_normal(mean.numpy(), cov).logpdf(test.numpy()).mean()
    assert abs(flow_ll - true_ll) < 0.1  # true mean log-likelihood is about -2.28 nats


def test_outliers_score_higher_than_inliers_on_a_banana():
    g = torch.Generator().manual_seed(1)

    def draw(n):  # x2 = x1^2 + noise: the inside of the curve is empty
        x1 = torch.randn(n, generator=g)
        return torch.stack([x1, x1**2 + 0.2 * torch.randn(n, generator=g)], dim=1)

    torch.manual_seed(0)
    m = tiny_z(2, hidden=32, layers=4)
    train(m, [{"z": draw(256)} for _ in range(8)], steps=300)
    m.eval()
    inliers = draw(400)
    outliers = torch.tensor([[0.0, 1.5], [0.0, 2.5], [1.0, -0.5], [-1.0, 2.0], [0.5, 1.6]])
    with torch.no_grad():
        s_in, s_out = m.score({"z": inliers}), m.score({"z": outliers})
    assert s_out.min() > torch.quantile(s_in, 0.99)
    # a Gaussian fitted to the same data would not flag them: the flow learnt the curve
    train_z = draw(4000).double().numpy()
    gauss = stats.multivariate_normal(train_z.mean(axis=0), np.cov(train_z.T))
    assert -gauss.logpdf(outliers.numpy()).max() < np.quantile(-gauss.logpdf(inliers.numpy()), 0.9)


def test_conditional_score_depends_on_the_section():
    torch.manual_seed(0)
    m = tiny_z(4, conditional=True, num_sections=2)
    z = torch.randn(128, 4)
    sec = (z[:, 0] > 0).long()  # section 1 lives at positive first coordinate
    train(m, [{"z": z, "section": sec}], steps=150, lr=1e-2)
    m.eval()
    probe = {"z": torch.tensor([[1.5, 0.0, 0.0, 0.0]])}
    own = m.score({**probe, "section": torch.tensor([1])})
    other = m.score({**probe, "section": torch.tensor([0])})
    assert other > own + 1.0
    with pytest.raises(AsdError, match="num_sections"):
        m.score({**probe, "section": torch.tensor([2])})
    with pytest.raises(AsdError, match="section"):
        m.score(probe)


def test_selective_score_is_the_min_over_domain_densities_without_the_clips_domain():
    """Source near 0, a few target clips at +3 on the first axis: a target normal scores as normal."""
    torch.manual_seed(0)
    m = tiny_z(4, selective=True)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(128, 4, generator=g)
    domain = torch.zeros(128, dtype=torch.long)
    z[:16, 0] += 3.0
    domain[:16] = 1
    train(m, [{"z": z, "domain": domain}], steps=200, lr=1e-2)
    m.eval()
    probe = {"z": torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 6.0, 0.0]])}
    source, target = -m.log_prob(probe, domain=0), -m.log_prob(probe, domain=1)
    assert torch.equal(m.score(probe), torch.minimum(source, target))  # no domain needed to score
    assert target[0] + 1.0 < source[0]  # the target clip is likely under the target density
    assert m.score(probe)[2] > m.score(probe)[0] + 1.0  # an outlier of both stays anomalous
    with pytest.raises(AsdError, match="domain"):
        m.train()
        m.loss(probe)


def test_constant_features_are_floored_and_all_constant_is_an_error():
    torch.manual_seed(0)
    m = tiny_z(4)
    z = torch.randn(32, 4)
    z[:, 2] = 7.0  # a dead unit
    train(m, [{"z": z}], steps=5)
    m.eval()
    normal = m.score({"z": z[:4]})
    moved = z[:4].clone()
    moved[:, 2] = 7.5
    shifted = m.score({"z": moved})
    assert torch.isfinite(normal).all() and torch.isfinite(shifted).all()
    assert (shifted > normal + 100).all()  # 0.5 off a constant is 500 floored stds: very anomalous

    silent = tiny_stats().train()
    with pytest.raises(AsdError, match="constant.*silent"):
        silent.loss({"wave": torch.zeros(4, T)})
    frozen = tiny_z(3).eval()  # eval never updates, so never judges
    assert torch.isfinite(frozen.score({"z": torch.full((2, 3), 5.0)})).all()


def test_extreme_and_non_finite_inputs():
    torch.manual_seed(0)
    m = tiny_z(4, pca_dim=2)
    train(m, [{"z": torch.randn(32, 4)}], steps=3)
    m.eval()
    huge = m.score({"z": torch.full((2, 4), 1e30)})
    assert torch.isfinite(huge).all() and (huge > m.score({"z": torch.zeros(2, 4)})).all()
    bad = torch.zeros(2, 4)
    bad[1, 3] = float("nan")
    with pytest.raises(AsdError, match="non-finite"):
        m.score({"z": bad})


def test_z_missing_or_of_another_width_is_a_clear_error():
    m = tiny_z(12)
    with pytest.raises(AsdError, match="no 'z'.*input_dim: null"):
        m.loss({"wave": torch.zeros(2, T)})
    with pytest.raises(AsdError, match=r"\(2, 10\).*branches.b5.input_dim=12"):
        m.score({"z": torch.zeros(2, 10)})
    with pytest.raises(AsdError, match="input_dim=12"):
        m.score({"z": torch.zeros(2, 3, 4)})


def test_too_short_clip_is_a_clear_error():
    with pytest.raises(AsdError, match="data.audio.duration"):
        tiny_stats().score({"wave": torch.zeros(2, 100)})  # one frame


# Types and ranges of the config keys are the schema's (tests/test_config.py); these need the data's facts.
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"pca_dim": 12}, "branches.b5.pca_dim"),
        ({"input_dim": 1}, "input_dim=1"),
        ({"conditional": True}, "num_sections"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, match):
    args = {"input_dim": 12, **kw}
    with pytest.raises(AsdError, match=match):
        FlowBranch(None, **args)


def test_no_input_is_a_clear_error():
    with pytest.raises(AsdError, match="input_dim.*frontend"):
        FlowBranch(None)


@pytest.mark.parametrize("mode", ["stats", "z_pca_conditional"])
def test_checkpoint_round_trip(tmp_path, mode):
    torch.manual_seed(0)

    def build():
        if mode == "stats":
            return tiny_stats(conditional=True, num_sections=3)
        return tiny_z(12, pca_dim=4, conditional=True, num_sections=3, momentum=0.2)

    m = build()
    data = sines(8) if mode == "stats" else zbatch(8)
    rows = [{k: v[i] for k, v in data.items()} for i in range(8)]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(rows, batch_size=4))
    assert int(m.moments.count) == 8
    m.fit_backend(
        m.backend_features(data), {k: data[k] for k in ("section", "domain", "machine", "attribute")}
    )
    m.eval()
    b = sines(3, seed=2) if mode == "stats" else zbatch(3, seed=2)
    path = tmp_path / "b5.pt"
    torch.save(m.state_dict(), path)

    fresh = build().eval()
    assert not torch.allclose(fresh.score(b), m.score(b))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.score(b), m.score(b))


@pytest.mark.parametrize("mode", ["stats", "z_pca"])
def test_bf16_autocast_forward(mode):
    torch.manual_seed(0)
    m, b = (tiny_stats(), sines(4)) if mode == "stats" else (tiny_z(12, pca_dim=4), zbatch(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.train().loss(b)
        score = m.eval().score(b)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(score).all() and score.dtype == torch.float32
    assert torch.allclose(score, m.score(b))  # the flow and the front end never run in bf16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moments_on_rank(rank: int, port: int, rows: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        s = RunningMoments(3, full_cov=True)
        s.update(rows[:5] if rank == 0 else rows[5:])  # unequal shards
        out[rank] = (int(s.count), s.mean.clone(), s.cov.clone())
    finally:
        dist.destroy_process_group()


def test_moments_are_summed_over_ranks():
    rows = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with mp.Manager() as manager:
        out = manager.dict()
        # fork: the children need not import the test module again
        mp.start_processes(
            _moments_on_rank, args=(_free_port(), rows, out), nprocs=2, join=True, start_method="fork"
        )
        results = dict(out)
    want = rows.double().numpy()
    for rank in (0, 1):
        count, mean, cov = results[rank]
        assert count == 12
        assert np.allclose(mean.numpy(), want.mean(axis=0))
        assert np.allclose(cov.numpy(), np.cov(want.T, bias=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_autocast():
    torch.manual_seed(0)
    m = tiny_z(12, pca_dim=4, conditional=True, num_sections=3).cuda()
    b = {k: v.cuda() for k, v in zbatch(8).items()}
    with torch.autocast("cuda", dtype=torch.float16):
        loss = m.train().loss(b)
        score = m.eval().score(b)
    loss.backward()
    assert torch.isfinite(loss) and score.device.type == "cuda" and score.dtype == torch.float32
    assert torch.isfinite(score).all()
    assert torch.allclose(score, m.score(b))


def test_check_ids_names_section_ids_outside_the_flows_sections():
    """What the run calls on each batch's CPU copy (the member's own step checks only CPU ids)."""
    m = tiny_z(4, conditional=True, num_sections=2)
    good = {"z": torch.randn(3, 4), "section": torch.tensor([0, 1, 1])}
    m.check_ids(good)
    with pytest.raises(AsdError, match="num_sections must count"):
        m.check_ids({**good, "section": torch.tensor([0, 2, 1])})


def test_the_degenerate_input_check_stops_once_the_inputs_have_varied(monkeypatch):
    """`is_degenerate` reads device values (a host sync): it runs until two different clips were seen."""
    m = tiny_z(12)
    calls = []
    real = type(m.moments).is_degenerate
    monkeypatch.setattr(type(m.moments), "is_degenerate", lambda self: calls.append(1) or real(self))
    train(m, [zbatch(16, seed=s) for s in range(3)], steps=6)
    assert len(calls) == 1
    constant = tiny_z(12)
    with pytest.raises(AsdError, match="zero variance"):
        train(constant, [{**zbatch(16), "z": torch.ones(16, 12)}], steps=2)
