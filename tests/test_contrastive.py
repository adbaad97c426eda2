"""b3: both objectives by hand, balancing, mixup, one-class views, both inputs, kNN scores, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import quick_trainer
from torch.utils.data import DataLoader

from asd.branches.auxiliary import (
    SPEED,
    VIEWS,
    SubclusterAdaCos,
    change_speed,
    mixup,
    one_hot,
    self_supervised_views,
)
from asd.branches.contrastive import (
    ContrastiveBranch,
    ResNetEncoder,
    SpectrumEncoder,
    balance_weights,
    positive_pairs,
    supcon_loss,
)
from asd.errors import AsdError
from asd.features import LogMel, LogSpectrum
from asd.scoring import KnnBackend, MahalanobisBackend

SR, T = 16000, 4000  # 0.25 s clips -> 1 + 4000 // 128 = 32 frames of 16 mel bins
N_SECTIONS, N_ATTRIBUTES = 3, 6


def tiny(**kw) -> ContrastiveBranch:
    sizes = dict(num_sections=N_SECTIONS, num_attributes=N_ATTRIBUTES, channels=(4, 8), emb_dim=8)
    sizes.update(kw)
    return ContrastiveBranch(LogMel(n_mels=16, n_fft=256, hop_length=128), **sizes)


def clips(section: list[int], domain: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of sines whose pitch follows the section (and domain); attribute = 2 * section + domain."""
    n = len(section)
    sec = torch.tensor(section)
    dom = torch.tensor(domain) if domain is not None else torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T) / SR
    freq = 300.0 * (1 + sec[:, None]) + 80.0 * dom[:, None] + 20 * torch.rand(n, 1, generator=g)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.02 * torch.randn(n, T, generator=g)
    return {
        "wave": wave.float(),
        "section": sec,
        "domain": dom,
        "machine": torch.zeros(n, dtype=torch.long),
        "attribute": 2 * sec + dom,
        "is_target": dom == 1,
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


SECTIONS = [0, 0, 0, 1, 1, 1, 2, 2]
DOMAINS = [0, 0, 1, 0, 0, 1, 0, 0]


def train_steps(m: ContrastiveBranch, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    m.train()
    losses = []
    for _ in range(steps):
        loss = m.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fitted(score_mode: str = "knn", **kw) -> tuple[ContrastiveBranch, dict[str, torch.Tensor]]:
    """A briefly trained member with its backend fitted on a training batch (returned too)."""
    torch.manual_seed(0)
    m = tiny(score_mode=score_mode, **kw)
    train_batch = clips(SECTIONS, DOMAINS)
    train_steps(m, train_batch, 3)
    m.eval()
    with torch.no_grad():
        m.fit_backend(m.backend_features(train_batch), {k: train_batch[k] for k in ("section", "domain")})
    return m, train_batch


def test_shapes():
    torch.manual_seed(0)
    m = tiny().eval()
    b = clips([0, 1, 2])
    assert m.embed_dim == 8 and m.needs_backend
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == m.backend_features(b).shape == (3, 8)
    assert m.embed(b).dtype == torch.float32
    m.fit_backend(m.backend_features(b), {"section": b["section"], "domain": b["domain"]})
    assert m.score(b).shape == (3,)


def test_encoder_keeps_the_frequency_axis():
    # 16 bins: stem -> 8, stage 1 (full resolution) -> 8, stage 2 -> 4, stage 3 -> 2
    e = ResNetEncoder(16, channels=(4, 8, 12), blocks=2, emb_dim=5)
    assert e.out_bins == 2 and e.proj.in_features == 12 * 2
    assert e(torch.randn(3, 16, 7)).shape == (3, 5)
    assert (
        sum(isinstance(x, torch.nn.Conv2d) for x in e.modules()) == 1 + 3 * 2 * 2 + 2
    )  # stem, blocks, shortcuts
    assert ResNetEncoder(15, channels=(4, 8)).out_bins == 4  # ceil(15 / 2) = 8 -> 8 -> 4


def test_supcon_loss_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    # clips 0, 2, 3 are one class, clip 1 is alone (no positive: not an anchor)
    label = torch.tensor([0, 1, 0, 0])
    pos = label[:, None] == label[None, :]
    t = 0.5
    e = math.exp

    def nll(numerator: float, others: list[float]) -> float:
        return -math.log(e(numerator / t) / sum(e(s / t) for s in others))

    # dot products: z0.z1 = 0, z0.z2 = 0.6, z0.z3 = -1, z1.z2 = 0.8, z1.z3 = 0, z2.z3 = -0.6
    l0 = (nll(0.6, [0, 0.6, -1]) + nll(-1, [0, 0.6, -1])) / 2
    l2 = (nll(0.6, [0.6, 0.8, -0.6]) + nll(-0.6, [0.6, 0.8, -0.6])) / 2
    l3 = (nll(-1, [-1, 0, -0.6]) + nll(-0.6, [-1, 0, -0.6])) / 2
    got = supcon_loss(z, pos, temperature=t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx((l0 + l2 + l3) / 3, rel=1e-6)
    w = torch.tensor([1.0, 7.0, 2.0, 0.5])  # the weight of the anchor without positives does not count
    assert supcon_loss(z, pos, w, temperature=t).item() == pytest.approx(
        (1.0 * l0 + 2.0 * l2 + 0.5 * l3) / 3.5, rel=1e-6
    )


def test_supcon_loss_without_positives_is_zero_and_keeps_the_graph():
    z = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = supcon_loss(z, torch.zeros(3, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None and torch.equal(z.grad, torch.zeros(3, 4))
    one = F.normalize(torch.randn(1, 4), dim=1).requires_grad_()  # a batch of one: no NaN
    supcon_loss(one, torch.ones(1, 1, dtype=torch.bool)).backward()
    assert torch.isfinite(one.grad).all()


def test_positive_pairs_by_section_and_attribute():
    section = torch.tensor([0, 0, 0, 1, 1])
    attribute = torch.tensor([0, 1, -1, 2, 2])  # clip 2's attributes were not seen in training
    by_section = positive_pairs(section)
    want = torch.tensor(
        [
            [0, 1, 1, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(by_section, want)
    want[0, 1] = want[1, 0] = False  # same section, different known attributes: negatives
    assert torch.equal(positive_pairs(section, attribute), want)


def test_balance_weights_equalise_section_domain_groups():
    section = torch.tensor([0, 0, 0, 0, 1, 1])
    domain = torch.tensor([0, 0, 0, 1, 0, 1])
    # groups (0, src) x3, (0, tgt), (1, src), (1, tgt): raw 1/3 x3, 1, 1, 1 -> sum 4, scaled by 6 / 4
    assert torch.allclose(balance_weights(section, domain), torch.tensor([0.5, 0.5, 0.5, 1.5, 1.5, 1.5]))
    assert torch.equal(balance_weights(section, domain, 0.0), torch.ones(6))
    raw = torch.tensor([3**-0.5] * 3 + [1.0] * 3)
    assert torch.allclose(balance_weights(section, domain, 0.5), raw * 6 / raw.sum())


class FixedEmbedding(torch.nn.Module):
    """Stands in for the encoder: the embeddings written by hand, whatever the spectrogram."""

    def __init__(self, z: list[list[float]]):
        super().__init__()
        self.z = torch.nn.Parameter(torch.tensor(z))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.z


def test_target_clips_get_their_weight_in_the_loss():
    """Four clips of section 0: three source and one target; the target anchor weighs as much as the three."""
    torch.manual_seed(0)
    z = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])  # unit rows; the last one is target
    b = clips([0, 0, 0, 0], [0, 0, 0, 1])

    def loss(balance: float) -> float:
        m = tiny(positives="section", head_weight=0.7, emb_dim=2, balance=balance).eval()
        m.encoder = FixedEmbedding(z.tolist())
        m.head.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [-1, 0], [0, -1], [0.8, 0.6]])
        return m.loss(b).item()

    t, s = 0.1, 16.0  # the default temperature and head scale
    sim = z @ z.T / t
    con = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        log_den = np.log(np.exp(sim[i, others]).sum())
        con.append(-np.mean([sim[i, j] - log_den for j in others]))  # every other clip is a positive
    head = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8], [-1, 0], [0, -1], [0.8, 0.6]])
    logits = s * z @ head.T
    labels = b["attribute"].numpy()  # 0, 0, 0, 1
    assert labels.tolist() == [0, 0, 0, 1]
    ce = [np.log(np.exp(logits[i]).sum()) - logits[i, labels[i]] for i in range(4)]
    w = np.array([1 / 3, 1 / 3, 1 / 3, 1.0])
    want = (w @ con) / w.sum() + 0.7 * (w @ ce) / w.sum()
    flat = np.mean(con) + 0.7 * np.mean(ce)
    assert loss(1.0) == pytest.approx(want, rel=1e-5)
    assert loss(0.0) == pytest.approx(flat, rel=1e-5)
    assert abs(want - flat) > 0.1  # the weighting matters on this batch


def test_head_leaves_out_unknown_attributes():
    torch.manual_seed(0)
    m = tiny(head_weight=1.0).eval()
    b = clips([0, 0, 1, 1])
    b["attribute"] = torch.tensor([-1, -1, -1, -1])
    only_contrastive = tiny(head_weight=0.0).eval()
    only_contrastive.load_state_dict({k: v for k, v in m.state_dict().items() if k != "head"})
    # every clip unknown: the head adds nothing, positives fall back to the section
    assert m.loss(b).item() == pytest.approx(only_contrastive.loss(b).item(), rel=1e-6)
    assert only_contrastive.head is None


@pytest.mark.parametrize("kw", [{}, {"positives": "section", "classify": "section"}])
def test_loss_reaches_every_parameter(kw):
    torch.manual_seed(0)
    m = tiny(**kw).train()
    loss = m.loss(clips(SECTIONS, DOMAINS))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny()
    losses = train_steps(m, clips(SECTIONS, DOMAINS), 10)
    assert losses[-1] < 0.5 * losses[0]


def test_eval_is_deterministic_and_frozen():
    m, _ = fitted()
    b = clips([0, 1, 2, 1], [0, 0, 0, 1], seed=3)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.embed(b), m.embed(b))
    assert torch.equal(m.loss(b), m.loss(b))
    after = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_knn_score_by_hand():
    m, train = fitted("knn", k=2)
    b = clips([0, 1, 2], [0, 1, 0], seed=5)
    with torch.no_grad():
        bank = F.normalize(m.embed(train), dim=1).double()
        q = F.normalize(m.embed(b), dim=1).double()
    want = []
    for i in range(3):
        best = math.inf
        for d in (0, 1):
            rows = (train["section"] == b["section"][i]) & (train["domain"] == d)
            if rows.any():
                dist = (1 - bank[rows] @ q[i]).sort().values[:2]  # a 1-clip target bank: its only clip
                best = min(best, dist.mean().item())
        want.append(best)
    assert torch.allclose(m.score(b).double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    # a training normal scores ~0 with k=1 whichever its domain
    m1, train1 = fitted("knn", k=1)
    assert torch.allclose(m1.score(train1), torch.zeros(8), atol=1e-5)


def test_centre_score_by_hand():
    m, train = fitted("centre")
    b = clips([0, 1, 2], [1, 0, 0], seed=6)
    with torch.no_grad():
        unit = F.normalize(m.embed(train), dim=1).double()
        q = F.normalize(m.embed(b), dim=1).double()
    want = []
    for i in range(3):
        dists = []
        for d in (0, 1):
            rows = (train["section"] == b["section"][i]) & (train["domain"] == d)
            if rows.any():
                centre = unit[rows].mean(dim=0)
                dists.append(1 - (q[i] @ centre / centre.norm()).item())
        want.append(min(dists))
    assert torch.allclose(m.score(b).double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)


def test_mahalanobis_score_is_the_backend_on_unit_embeddings():
    m, train = fitted("mahalanobis")
    assert isinstance(m.backend, MahalanobisBackend) and m.backend.calibrate
    assert m.backend.covariance == "pooled" and m.backend.per_domain
    b = clips([0, 1, 2, 1], [0, 1, 0, 0], seed=5)
    with torch.no_grad():
        ref = MahalanobisBackend(per_domain=True, covariance="pooled", calibrate=True)
        ref.fit(F.normalize(m.embed(train), dim=1), train["section"], train["domain"])
        want = ref.score(F.normalize(m.embed(b), dim=1), b["section"])
        # only the embedding's direction counts: scaling the encoder's output moves nothing
        before = m.score(b)
        m.encoder.proj.weight.mul_(7.0)
        m.encoder.proj.bias.mul_(7.0)
        assert torch.allclose(m.score(b), before, atol=1e-4)
    assert torch.allclose(before, want, atol=1e-5)


def test_mahalanobis_score_ranks_a_clip_of_another_section_first():
    m, train = fitted("mahalanobis")
    normal = clips([1, 1, 1, 1], seed=11)
    odd = clips([2], seed=12)  # section 2's pitch, labelled section 1
    odd["section"] = torch.tensor([1])
    with torch.no_grad():
        assert m.score(odd).item() > m.score(normal).max().item()


def test_mahalanobis_checkpoint_round_trip(tmp_path):
    m, _ = fitted("mahalanobis")
    torch.save(m.state_dict(), tmp_path / "b3.pt")
    fresh = tiny(score_mode="mahalanobis").eval()
    fresh.load_state_dict(torch.load(tmp_path / "b3.pt", weights_only=True))
    b = clips([2, 0, 1], seed=7)
    assert fresh.backend.fitted and torch.equal(fresh.score(b), m.score(b))


def test_score_mode_errors_name_the_key():
    with pytest.raises(AsdError, match=r"branches\.b3\.score_mode"):
        tiny(score_mode="cosine")
    with pytest.raises(AsdError, match=r"knn_density.*score_mode=knn.*set branches\.b3\.knn_density=false"):
        tiny(score_mode="mahalanobis", knn_density=True)
    with pytest.raises(AsdError, match=r"knn_calibrate.*score_mode=knn.*branches\.b3\.knn_calibrate=false"):
        tiny(score_mode="mahalanobis", knn_calibrate=True)


def test_score_needs_fit_backend():
    m = tiny().eval()
    with pytest.raises(AsdError, match="fit_backend"):
        m.score(clips([0]))


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny()
    data = clips(SECTIONS, DOMAINS)
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(SECTIONS))]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(rows, batch_size=4))
    assert int(m.stats.count) == 2 * 4 * 32
    m.eval()
    with torch.no_grad():
        m.fit_backend(m.backend_features(data), {"section": data["section"], "domain": data["domain"]})
    b = clips([2, 0, 1], seed=7)
    path = tmp_path / "b3.pt"
    torch.save(m.state_dict(), path)

    fresh = tiny().eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.backend.fitted
    assert torch.equal(fresh.score(b), m.score(b))
    assert torch.equal(fresh.embed(b), m.embed(b))


def test_bf16_autocast_forward():
    m, _ = fitted()
    b = clips(SECTIONS, DOMAINS, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score = m.score(b)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(score).all() and score.dtype == torch.float32


def test_bad_labels_are_clear_errors():
    m = tiny()
    b = clips([0, 1])
    b["attribute"] = torch.tensor([0, N_ATTRIBUTES])
    with pytest.raises(AsdError, match="num_attributes"):
        m.loss(b)
    del b["domain"]
    with pytest.raises(AsdError, match="'domain'"):
        m.loss(b)


def test_attribute_classes_need_their_count():
    """Types and ranges of the config keys are the schema's (tests/test_config.py)."""
    with pytest.raises(AsdError, match="num_attributes"):
        tiny(num_attributes=None)
    assert tiny().num_classes == N_ATTRIBUTES
    assert tiny(num_attributes=None, classify="section").num_classes == N_SECTIONS


def test_frontend_without_n_mels_is_a_clear_error():
    with pytest.raises(AsdError, match="n_mels"):
        ContrastiveBranch(torch.nn.Identity(), num_sections=2, classify="section")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("score_mode", ["knn", "centre"])
def test_cuda_fp16_autocast(score_mode):
    m, train = fitted(score_mode)
    m = m.cuda()
    b = {k: v.cuda() for k, v in clips(SECTIONS, DOMAINS, seed=9).items()}
    with torch.autocast("cuda", dtype=torch.float16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score = m.score(b)
    loss.backward()
    assert torch.isfinite(loss) and score.device.type == "cuda" and torch.isfinite(score).all()
    assert torch.allclose(score, m.score(b), atol=0.02)


# -- the sub-cluster AdaCos recipe: two input branches, mixup, one-class views, density kNN --------------


def recipe(**kw) -> ContrastiveBranch:
    """A tiny b3 of the from-scratch recipe: sub-cluster AdaCos, mixup, log-mel + full spectrum."""
    sizes = dict(
        objective="subcluster_adacos",
        spectrum="multires",
        num_samples=T,
        subclusters=3,
        mixup=0.5,
        spectrum_channels=(4, 8),
        classify="section",
        knn_density=True,
    )
    sizes.update(kw)
    return tiny(**sizes)


def test_full_spectrum_front_end_and_encoder_shapes():
    spec = LogSpectrum(num_samples=100)
    assert spec.n_bins == 51 and spec(torch.randn(3, 100)).shape == (3, 51)
    assert spec(torch.randn(2, 60)).shape == spec(torch.randn(2, 140)).shape == (2, 51)  # padded, cut
    # the power is divided by num_samples: a unit sine of bin 5 puts N/4 * 4 / N = 1 (0 dB) in bin 5
    wave = torch.cos(2 * math.pi * 5 * torch.arange(100) / 100)
    assert spec(wave)[0, 5].item() == pytest.approx(10 * math.log10(100 / 4), abs=1e-3)
    enc = SpectrumEncoder(channels=(4, 8, 12), emb_dim=5, positions=6)
    for n_bins in (51, 2001, 16001):
        assert enc(torch.randn(2, n_bins)).shape == (2, 5)
    assert enc.proj.in_features == 12 * 6


def test_recipe_shapes_concatenate_both_branches():
    torch.manual_seed(0)
    m = recipe().eval()
    b = clips([0, 1, 2])
    assert m.embed_dim == 16 and m.num_classes == N_SECTIONS and m.adacos.centres.shape == (3, 3, 16)
    assert m.head is None and m.spectrum_stats.mean.shape == (T // 2 + 1,)
    z = m.embed(b)
    assert z.shape == m.backend_features(b).shape == (3, 16) and z.dtype == torch.float32
    mel_half = F.normalize(m.encoder(m.stats.normalise(m.spectrogram(b))), dim=1)
    assert torch.allclose(z[:, :8], mel_half) and torch.allclose(z[:, 8:].norm(dim=1), torch.ones(3))
    assert m.loss(b).shape == ()
    m.fit_backend(m.backend_features(b), {"section": b["section"], "domain": b["domain"]})
    assert m.score(b).shape == (3,)
    assert tiny().embed_dim == 8 and tiny().spectrum_encoder is None and tiny().adacos is None


def test_subcluster_logits_pick_the_nearest_centre():
    head = SubclusterAdaCos(num_classes=2, dim=2, subclusters=2)
    head.centres.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]]))
    z = torch.tensor([[0.0, 3.0], [-0.6, -0.8]])  # sub-cluster 1 of class 0; between class 1's two
    cos = head.cosines(z)
    assert torch.allclose(cos, torch.tensor([[[0.0, 1.0], [0.0, -1.0]], [[-0.6, -0.8], [0.6, 0.8]]]))
    s = 2.0
    want = torch.tensor(
        [
            [math.log(math.exp(0) + math.exp(s)), math.log(math.exp(0) + math.exp(-s))],
            [math.log(math.exp(-1.2) + math.exp(-1.6)), math.log(math.exp(1.2) + math.exp(1.6))],
        ]
    )
    assert torch.allclose(head.class_logits(cos, s), want)
    # at a large scale the log-sum-exp is the max: the nearest centre of each class decides
    assert torch.allclose(head.class_logits(cos, 200.0) / 200.0, cos.max(dim=2).values, atol=0.01)
    # loss: weighted cross-entropy against the targets, at the fixed scale in eval mode
    head.eval()
    head.scale.fill_(s)
    target, weight = torch.tensor([[1.0, 0.0], [0.25, 0.75]]), torch.tensor([1.0, 3.0])
    log_p = torch.log_softmax(want, dim=1)
    ce = -(target * log_p).sum(dim=1)
    assert head(z, target, weight).item() == pytest.approx(((weight * ce).sum() / 4).item(), rel=1e-6)
    assert float(head.scale) == s  # eval mode never moves the scale


def test_adaptive_scale_formula_by_hand():
    assert SubclusterAdaCos.initial_scale(64) == pytest.approx(math.sqrt(2) * math.log(63))
    head = SubclusterAdaCos(num_classes=4, dim=8, subclusters=16)
    assert float(head.scale) == pytest.approx(math.sqrt(2) * math.log(63))
    cos = torch.tensor(
        [
            [[0.9, 0.1], [0.2, -0.3], [0.0, 0.4]],
            [[0.5, 0.6], [0.3, 0.95], [-0.2, 0.1]],
            [[0.1, 0.2], [0.3, 0.4], [0.7, 0.2]],
        ]
    )  # (B=3, C=3, K=2)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
    s = 3.0
    e = math.exp
    b_avg = (
        (e(s * 0.2) + e(-s * 0.3) + e(0) + e(s * 0.4))
        + (e(s * 0.5) + e(s * 0.6) + 0.5 * (e(s * 0.3) + e(s * 0.95)) + 0.5 * (e(-s * 0.2) + e(s * 0.1)))
        + (e(s * 0.1) + e(s * 0.2) + e(s * 0.3) + e(s * 0.4))
    ) / 3
    own = [0.9, 0.5 * 0.95 + 0.5 * 0.1, 0.7]  # target-weighted cosine to each class's nearest centre
    theta_med = sorted(math.acos(c) for c in own)[1]
    want = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    assert SubclusterAdaCos.adaptive_scale(cos, target, s).item() == pytest.approx(want, rel=1e-5)
    # a batch where the other classes are far (B_avg <= 1) keeps the scale
    far = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]]])
    assert SubclusterAdaCos.adaptive_scale(far, torch.tensor([[1.0, 0.0]]), s).item() == s


def test_train_mode_updates_the_scale_from_the_batch():
    torch.manual_seed(0)
    head = SubclusterAdaCos(num_classes=3, dim=4, subclusters=2).train()
    z, target = torch.randn(5, 4), one_hot(torch.tensor([0, 1, 2, 1, 0]), 3)
    want = SubclusterAdaCos.adaptive_scale(head.cosines(z), target, head.scale.clone())
    head(z, target)
    assert float(head.scale) == pytest.approx(float(want))


def test_one_hot_leaves_unknown_classes_out():
    assert torch.equal(
        one_hot(torch.tensor([2, -1, 0]), 3), torch.tensor([[0, 0, 1.0], [0, 0, 0], [1.0, 0, 0]])
    )


def test_mixup_targets_sum_to_one_and_match_the_waves():
    torch.manual_seed(0)
    wave = torch.randn(6, 10)
    labels = torch.arange(6)
    target, weight = one_hot(labels, 6), torch.arange(1.0, 7.0)
    mixed, mixed_target, mixed_weight = mixup(wave, target, weight, prob=1.0, alpha=0.4)
    assert torch.allclose(mixed_target.sum(dim=1), torch.ones(6))
    for i in range(6):  # the target says which two clips were mixed and with which lam
        own = mixed_target[i, i].item()
        rest = [(j, mixed_target[i, j].item()) for j in range(6) if j != i and mixed_target[i, j] > 0]
        partner, other = rest[0] if rest else (i, 0.0)
        assert own + other == pytest.approx(1.0)
        assert torch.allclose(mixed[i], own * wave[i] + other * wave[partner], atol=1e-6)
        assert mixed_weight[i].item() == pytest.approx(
            own * weight[i].item() + other * weight[partner].item()
        )
    same, same_target, same_weight = mixup(wave, target, weight, prob=0.0, alpha=0.4)
    assert torch.equal(same, wave) and torch.equal(same_target, target) and torch.equal(same_weight, weight)


def test_self_supervised_views_by_hand():
    wave = torch.arange(8.0)[None].repeat(2, 1)
    wave[1] *= -1
    views, ids = self_supervised_views(wave)
    assert views.shape == (len(VIEWS) * 2, 8) and ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(views[:2], wave) and torch.equal(views[2:4], wave.flip(-1))
    assert torch.allclose(views[4:6], change_speed(wave, SPEED))
    assert torch.allclose(views[6:], change_speed(wave, 1 / SPEED))
    # twice as fast: every other sample, wrapping around; half as fast: midpoints
    assert change_speed(wave[:1], 2.0).tolist() == [[0.0, 2.0, 4.0, 6.0, 0.0, 2.0, 4.0, 6.0]]
    assert change_speed(wave[:1], 0.5).tolist() == [[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]]


def test_one_class_builds_self_supervised_classes_and_learns(caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="asd.branches.contrastive"):
        m = recipe(num_sections=1, num_attributes=1, mixup=0.0)
    assert m.views == VIEWS and m.num_classes == len(VIEWS) and m.adacos.centres.shape[0] == len(VIEWS)
    assert "classify=section gives 1 class, so the classes are self-supervised" in caplog.text
    assert "original, reversed, faster, slower (4 in all)" in caplog.text
    assert "sub-cluster AdaCos" in caplog.text
    train = clips([0] * 6, [0, 0, 0, 0, 1, 1])
    m.eval()
    before = m.loss(train).item()
    train_steps(m, train, 12)
    m.eval()
    assert m.loss(train).item() < 0.5 * before
    # scoring embeds the untransformed clip: a batch's embedding does not depend on the views
    assert torch.equal(m.embed(train)[:2], m.embed({"wave": train["wave"][:2]}))


def test_self_supervised_always_and_never():
    assert recipe(self_supervised="always").num_classes == N_SECTIONS * len(VIEWS)
    assert recipe(self_supervised="auto").views == ()
    assert recipe(num_sections=1, self_supervised="never", mixup=0.0, objective="supcon").views == ()
    with pytest.raises(AsdError, match="at least 2"):  # AdaCos on one class and no views
        recipe(num_sections=1, self_supervised="never")
    # supcon also gets views on one class: positives share the view
    m = tiny(num_sections=1, num_attributes=1, positives="section", classify="section")
    assert m.views == VIEWS and m.num_classes == len(VIEWS) and m.head.shape == (len(VIEWS), 8)


def test_recipe_loss_reaches_every_parameter():
    torch.manual_seed(0)
    m = recipe().train()
    loss = m.loss(clips(SECTIONS, DOMAINS))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert not any(n.startswith("adacos") for n, _ in m.named_parameters())  # fixed centres


def test_recipe_cross_field_errors():
    with pytest.raises(AsdError, match="mixup"):
        tiny(mixup=0.5)  # supcon has no targets to mix
    with pytest.raises(AsdError, match="num_samples"):
        recipe(num_samples=None)
    with pytest.raises(AsdError, match="score_mode=knn"):
        recipe(score_mode="centre")
    with pytest.raises(AsdError, match="num_attributes"):
        recipe(classify="attribute", num_attributes=None)


def test_recipe_eval_is_deterministic_and_frozen():
    torch.manual_seed(0)
    m = recipe()
    train = clips(SECTIONS, DOMAINS)
    train_steps(m, train, 3)
    m.eval()
    with torch.no_grad():
        m.fit_backend(m.backend_features(train), {k: train[k] for k in ("section", "domain")})
    b = clips([0, 1, 2, 1], [0, 0, 0, 1], seed=3)
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert torch.equal(m.score(b), m.score(b))
    assert torch.equal(m.embed(b), m.embed(b))
    assert torch.equal(m.loss(b), m.loss(b))  # no mixup and no scale update in eval mode
    after = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    fresh = recipe().eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.score(b), m.score(b))


def _cos_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1 - (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("chunk", [4096, 2])
def test_density_rescaled_knn_by_hand(chunk):
    s0, s1, s2, tg = [1.0, 0.0], [0.8, 0.6], [0.28, 0.96], [0.0, 1.0]
    # section 0: three source clips and one target clip; section 1: one of each; section 2: one clip
    bank = torch.tensor([s0, s1, s2, tg, [-1.0, 0.0], [-0.6, -0.8], [0.0, -1.0]], dtype=torch.float64)
    section = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    domain = torch.tensor([0, 0, 0, 1, 0, 1, 0])
    query = torch.tensor([[0.6, 0.8], [0.96, 0.28], [-0.8, -0.6], [0.6, -0.8]], dtype=torch.float64)
    qsec = torch.tensor([0, 0, 1, 2])
    knn = KnnBackend(k=1, density=True, chunk=chunk).fit(bank.float(), section, domain)

    d = [[_cos_dist(bank[i], bank[j]) for j in range(7)] for i in range(7)]
    # rho: distance to the nearest other *source* clip of the section; s2's nearest clip is the
    # target clip (0.04 away) but its rho is its distance to s1 (0.2)
    rho = [min(d[i][j] for j in range(3) if j != i) for i in range(4)]
    assert rho[2] == pytest.approx(d[2][1]) and d[2][3] < d[2][1]
    assert rho[3] == pytest.approx(d[3][2])  # the target clip's scale: how far the source lies
    rho += [d[4][5], d[5][4], 1.0]  # section 1 has one source clip: all its clips; section 2: rho = 1

    def want(q: torch.Tensor, rows: list[int], target: list[int]) -> float:
        return min(
            min(_cos_dist(q, bank[j]) / rho[j] for j in rows),
            min(_cos_dist(q, bank[j]) / rho[j] for j in target),
        )

    got = knn.score(query.float(), qsec).double()
    assert got[0].item() == pytest.approx(want(query[0], [0, 1, 2], [3]), rel=1e-4)
    assert got[1].item() == pytest.approx(want(query[1], [0, 1, 2], [3]), rel=1e-4)
    assert got[2].item() == pytest.approx(want(query[2], [4], [5]), rel=1e-4)
    assert got[3].item() == pytest.approx(_cos_dist(query[3], bank[6]), rel=1e-4)

    # k = 2: the mean of the two smallest rescaled distances per bank, rho from 2 source neighbours
    knn2 = KnnBackend(k=2, density=True, chunk=chunk).fit(bank[:4].float(), section[:4], domain[:4])
    rho2 = [sum(sorted(d[i][j] for j in range(3) if j != i)[:2]) / 2 for i in range(4)]
    q = query[0]
    src = sorted(_cos_dist(q, bank[j]) / rho2[j] for j in range(3))[:2]
    tgt = _cos_dist(q, bank[3]) / rho2[3]  # a 1-clip bank: its only clip
    assert knn2.score(query[:1].float(), qsec[:1]).item() == pytest.approx(min(sum(src) / 2, tgt), rel=1e-4)


def test_density_state_round_trip_and_mismatch():
    bank = torch.randn(10, 3)
    section, domain = torch.zeros(10, dtype=torch.long), torch.tensor([0] * 8 + [1] * 2)
    fitted = KnnBackend(k=2, density=True).fit(bank, section, domain)
    fresh = KnnBackend(k=2, density=True)
    fresh.load_state_dict(fitted.state_dict())
    query = torch.randn(4, 3)
    assert torch.equal(fresh.score(query, section[:4]), fitted.score(query, section[:4]))
    with pytest.raises(AsdError, match="density"):
        KnnBackend(k=2).load_state_dict(fitted.state_dict())
    with pytest.raises(AsdError, match="density"):
        KnnBackend(k=2, density=True).load_state_dict(KnnBackend(k=2).fit(bank, section, domain).state_dict())
    # density off scores exactly as before: the plain mean distance
    plain = KnnBackend(k=1).fit(bank, section, domain).score(bank[:3], section[:3])
    assert torch.allclose(plain, torch.zeros(3), atol=1e-6)


def test_recipe_bf16_autocast_forward():
    torch.manual_seed(0)
    m = recipe()
    train = clips(SECTIONS, DOMAINS)
    m.eval()
    with torch.no_grad():
        m.fit_backend(m.backend_features(train), {k: train[k] for k in ("section", "domain")})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(train)
        m.eval()
        score = m.score(clips(SECTIONS, DOMAINS, seed=8))
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert torch.isfinite(score).all() and score.dtype == torch.float32


@pytest.mark.parametrize("views", [False, True])
def test_check_ids_counts_the_objectives_classes_with_the_views(views):
    """With self-supervised views the classes are (id, view): the check counts them the same way."""
    m = tiny(classify="section", self_supervised="always" if views else "never")
    assert bool(m.views) == views
    ok = clips([0, N_SECTIONS - 1])
    m.check_ids(ok)
    with pytest.raises(AsdError, match="classes; build b3"):
        m.check_ids(clips([0, N_SECTIONS]))
