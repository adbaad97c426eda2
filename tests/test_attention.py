"""Attention fusion: convex weights, zmean at start, fitting a toy problem, group means, errors, plot."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from asd.errors import AsdError
from asd.fusion import AttentionFusion, fit_attention, group_weights, plot_attention_weights
from asd.fusion.attention import balanced_weights
from asd.scoring import fuse


def context(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (machine, section, domain) ids: 2 machines x 2 sections each (global section ids 0..3)."""
    machine = torch.randint(0, 2, (n,), generator=gen)
    section = machine * 2 + torch.randint(0, 2, (n,), generator=gen)
    domain = torch.randint(0, 2, (n,), generator=gen)
    return machine, section, domain


def toy_problem(n: int = 200, seed: int = 0):
    """Member 0 sees the anomalies (z shifted by 3), member 1 is pure noise for both classes."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * n, 2, generator=gen)
    z[n:, 0] += 3.0
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    return (z, *context(2 * n, gen), y)


def head_with_random_last_layer(m: int, seed: int = 0) -> AttentionFusion:
    """A head whose weights are far from uniform, as after training."""
    torch.manual_seed(seed)
    head = AttentionFusion(num_members=m, num_machines=2, num_sections=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.mlp[-1].weight.copy_(3 * torch.randn(head.mlp[-1].weight.shape, generator=gen))
        head.mlp[-1].bias.copy_(torch.randn(m, generator=gen))
    return head


def test_weights_are_convex_and_fused_is_their_weighted_sum():
    head = head_with_random_last_layer(m=5)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(64, 5, generator=gen) * torch.tensor([1.0, 10.0, 100.0, 1000.0, 0.1])
    machine, section, domain = context(64, gen)
    domain[:8] = 2  # unknown domain too
    with torch.no_grad():
        fused, weights = head(z, machine, section, domain)
    assert fused.shape == (64,) and weights.shape == (64, 5)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(fused, (weights * z).sum(dim=1))
    assert float((weights - 0.2).abs().max()) > 0.1  # the check above ran on non-uniform weights


def test_untrained_head_is_the_zmean_fusion():
    torch.manual_seed(0)
    head = AttentionFusion(num_members=3, num_machines=2, num_sections=4)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(32, 3, generator=gen) * 5
    fused, weights = head(z, *context(32, gen))
    assert torch.equal(weights, torch.full((32, 3), 1 / 3))
    torch.testing.assert_close(fused, fuse(z, "zmean"))
    torch.testing.assert_close(head.logit(fused), fused)  # scale 1, bias 0 at start


def test_unknown_domain_takes_the_mean_of_the_source_and_target_contexts():
    head = head_with_random_last_layer(m=3)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(10, 3, generator=gen)
    machine, section, _ = context(10, gen)
    averaged = copy.deepcopy(head)
    with torch.no_grad():
        averaged.domain_emb.weight[:] = head.domain_emb.weight.mean(dim=0)
    unknown = head(z, machine, section, torch.full((10,), 2))
    source_of_averaged = averaged(z, machine, section, torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(unknown, source_of_averaged)
    source = head(z, machine, section, torch.zeros(10, dtype=torch.long))
    assert not torch.allclose(unknown[1], source[1])  # the domain does change the weights


def test_balanced_weights_give_each_class_half():
    w = balanced_weights(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(w, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    torch.testing.assert_close(balanced_weights(torch.zeros(4)), torch.full((4,), 0.25))


def test_fit_attention_learns_to_trust_the_informative_member():
    z, machine, section, domain, y = toy_problem()
    torch.manual_seed(0)
    head = AttentionFusion(num_members=2, num_machines=2, num_sections=4)
    losses = fit_attention(head, z, machine, section, domain, y, epochs=200)
    assert len(losses) == 200 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    fused, weights = head(z, machine, section, domain)
    mean = weights.mean(dim=0)
    assert mean[0] > 0.65 > 0.35 > mean[1]
    # on the anomalies, where member 0 carries the signal, it gets nearly all the weight
    assert weights[y == 1, 0].mean() > 0.85
    auc_fused = roc_auc_score(y.numpy(), fused.detach().numpy())
    auc_zmean = roc_auc_score(y.numpy(), fuse(z, "zmean").numpy())
    assert auc_fused > auc_zmean + 0.02


def test_fit_attention_is_deterministic_and_leaves_the_global_rng_alone():
    z, machine, section, domain, y = toy_problem(n=50, seed=1)
    torch.manual_seed(0)
    first = AttentionFusion(num_members=2, num_machines=2, num_sections=4)
    second = copy.deepcopy(first)
    state = torch.get_rng_state()
    losses_a = fit_attention(first, z, machine, section, domain, y, epochs=30, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    losses_b = fit_attention(second, z, machine, section, domain, y, epochs=30, seed=5)
    assert losses_a == losses_b
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_fit_attention_uses_class_balanced_bce():
    """With 3 normals and 1 anomaly the first loss is the balanced BCE of the untrained logits, by hand."""
    z = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-1.0, -3.0], [4.0, 2.0]])
    y = torch.tensor([0.0, 0.0, 0.0, 1.0])
    ids = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    head = AttentionFusion(num_members=2, num_machines=1, num_sections=1)
    losses = fit_attention(head, z, ids, ids, ids, y, epochs=1)
    logits = z.mean(dim=1)  # untrained: zmean, scale 1, bias 0
    normal_bce = torch.nn.functional.softplus(logits[:3]).mean()  # -log(1 - sigmoid(l))
    anomaly_bce = torch.nn.functional.softplus(-logits[3])  # -log sigmoid(l)
    assert losses[0] == pytest.approx(float(0.5 * normal_bce + 0.5 * anomaly_bce), rel=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "z": a["z"][:, :1]}, "1 member columns but the model was built for 2"),
        (lambda a: {**a, "y": a["y"][:-1]}, "`y` has 19 labels but there are 20 rows"),
        (lambda a: {**a, "machine": a["machine"][:-1]}, "`machine` has 19 entries"),
        (lambda a: {k: v[:0] for k, v in a.items()}, "no clips to fit on"),
        (lambda a: {**a, "y": torch.zeros(20)}, "only normal clips"),
        (lambda a: {**a, "y": torch.ones(20)}, "only anomalies"),
        (lambda a: {**a, "y": torch.full((20,), 0.5)}, r"`y` has values \[0.5\]"),
        (
            lambda a: {**a, "z": a["z"].index_fill(0, torch.tensor([3]), float("nan"))},
            r"NaN/inf values in rows \[3\]",
        ),
        (lambda a: {**a, "machine": a["machine"] + 5}, r"`machine` ids \[5, 6\] are outside 0..1"),
        (lambda a: {**a, "section": a["section"].float()}, "`section` must be an integer tensor"),
        (lambda a: {**a, "domain": a["domain"] + 3}, "use 0 source, 1 target, 2 unknown"),
    ],
)
def test_fit_attention_rejects_bad_input(change, message):
    z, machine, section, domain, y = toy_problem(n=10)
    args = change({"z": z, "machine": machine, "section": section, "domain": domain, "y": y})
    head = AttentionFusion(num_members=2, num_machines=2, num_sections=4)
    with pytest.raises(AsdError, match=message):
        fit_attention(head, args["z"], args["machine"], args["section"], args["domain"], args["y"], epochs=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "`epochs`=0"),
        ({"lr": -1.0}, "`lr`=-1.0"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_fit_attention_rejects_bad_settings(kwargs, message):
    z, machine, section, domain, y = toy_problem(n=10)
    head = AttentionFusion(num_members=2, num_machines=2, num_sections=4)
    with pytest.raises(AsdError, match=message):
        fit_attention(head, z, machine, section, domain, y, **kwargs)


def test_head_rejects_bad_sizes():
    with pytest.raises(AsdError, match="`num_members`=0"):
        AttentionFusion(num_members=0, num_machines=1, num_sections=1)


def test_group_weights_are_the_mean_weights_of_each_group():
    head = head_with_random_last_layer(m=3)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(40, 3, generator=gen)
    machine, section, domain = context(40, gen)
    domain[:5] = 2
    keys, means = group_weights(head, z, machine, section, domain)
    _, weights = head(z, machine, section, domain)
    triples = sorted(
        {(m, s, d) for m, s, d in zip(machine.tolist(), section.tolist(), domain.tolist(), strict=True)}
    )
    assert keys.dtype == torch.long and keys.tolist() == [list(t) for t in triples]
    assert means.shape == (len(triples), 3) and not means.requires_grad
    for key, mean in zip(keys, means, strict=True):
        rows = (machine == key[0]) & (section == key[1]) & (domain == key[2])
        torch.testing.assert_close(mean, weights[rows].mean(dim=0).detach())
    torch.testing.assert_close(means.sum(dim=1), torch.ones(len(triples)))


def test_plot_attention_weights_writes_a_png(tmp_path):
    weights = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    path = plot_attention_weights(
        ["fan s00 source", "fan s00 target"], weights, ["b1", "b2", "b3"], tmp_path / "plots" / "att.png"
    )
    assert path == tmp_path / "plots" / "att.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_attention_weights_rejects_mismatched_labels(tmp_path):
    with pytest.raises(AsdError, match="2 labels and 2 members"):
        plot_attention_weights(["a", "b"], np.ones((2, 3)), ["b1", "b2"], tmp_path / "x.png")
