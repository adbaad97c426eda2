"""MAML meta-learner: inner SGD step by hand, second-order meta-gradients, vmap vs loop, tasks, adaptation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from asd.errors import AsdError
from asd.fusion import MAML, MetaClassifier, Tasks, make_tasks, meta_features


def classifier(in_dim: int = 4, hidden: int = 8, seed: int = 0) -> MetaClassifier:
    torch.manual_seed(seed)
    return MetaClassifier(in_dim, hidden=hidden)


def sign_tasks(tasks: int = 8, per_class: int = 20, seed: int = 0):
    """Tasks that disagree: normals sit at feature 0 = -s, anomalies at +s, with s = +1 / -1 alternating.

    No single classifier separates every task; one adapted on a task's own clips can.
    """
    gen = torch.Generator().manual_seed(seed)
    xs, ys, groups = [], [], []
    for t in range(tasks):
        sign = 1.0 if t % 2 == 0 else -1.0
        y = torch.cat([torch.zeros(per_class), torch.ones(per_class)])
        x = 0.5 * torch.randn(2 * per_class, 4, generator=gen)
        x[:, 0] += sign * (2 * y - 1)
        xs.append(x)
        ys.append(y)
        groups.append(torch.full((2 * per_class,), t))
    return torch.cat(xs), torch.cat(ys), torch.cat(groups)


def hand_loss(model: MetaClassifier, params: list[torch.Tensor], x, y, w) -> torch.Tensor:
    """The weighted BCE through the model's ordinary forward, with `params` swapped in by hand."""
    logits = torch.func.functional_call(
        model, dict(zip(dict(model.named_parameters()), params, strict=True)), x
    )
    return (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() / w.sum()


def one_task(seed: int = 0) -> Tasks:
    x, y, group = sign_tasks(tasks=3, per_class=6, seed=seed)
    return make_tasks(x, y, group, 0.5, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- features and classifier


def test_meta_features_layout_and_one_hots():
    gen = torch.Generator().manual_seed(0)
    z, weights = torch.randn(5, 2, generator=gen), torch.rand(5, 2, generator=gen)
    fused = torch.randn(5, generator=gen)
    machine, domain = torch.tensor([0, 2, 1, 2, 0]), torch.tensor([0, 1, 2, 0, 1])
    x = meta_features(z, weights, fused, machine, domain, num_machines=3)
    assert x.shape == (5, 2 * 2 + 1 + 3 + 3) and x.dtype == torch.float32
    assert torch.equal(x[:, :2], z) and torch.equal(x[:, 2:4], weights) and torch.equal(x[:, 4], fused)
    assert torch.equal(x[:, 5:8], torch.eye(3)[domain])
    assert torch.equal(x[:, 8:], torch.eye(3)[machine])


def test_meta_features_rejects_bad_input():
    z, ids = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    with pytest.raises(AsdError, match=r"`machine` ids \[3\] are outside 0..2"):
        meta_features(z, z, z[:, 0], torch.tensor([0, 1, 3, 0]), ids, num_machines=3)
    with pytest.raises(AsdError, match="`weights` has 3 rows but `z` has 4"):
        meta_features(z, z[:3], z[:, 0], ids, ids, num_machines=1)
    with pytest.raises(AsdError, match=r"`fused` must be a float tensor of shape \(4,\)"):
        meta_features(z, z, z, ids, ids, num_machines=1)


def test_classifier_gives_one_logit_per_row_and_checks_width():
    model = classifier(in_dim=6)
    assert model(torch.randn(7, 6)).shape == (7,)
    with pytest.raises(AsdError, match="features have 5 columns but it takes 6"):
        model(torch.randn(7, 5))


# ---------------------------------------------------------------- inner loop


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_step_equals_a_hand_written_sgd_step(first_order):
    model = classifier()
    maml = MAML(model, inner_lr=0.3, first_order=first_order)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 4, generator=gen), (torch.rand(12, generator=gen) > 0.5).float()
    w = torch.rand(12, generator=gen)
    params = list(model.parameters())
    logits = model(x)  # the ordinary forward, no functional_call
    loss = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() / w.sum()
    grads = torch.autograd.grad(loss, params)
    expected = [p - 0.3 * g for p, g in zip(params, grads, strict=True)]
    got = maml.inner_step(maml.params(), x, y, w)
    assert list(got) == [name for name, _ in model.named_parameters()]
    for g, e in zip(got.values(), expected, strict=True):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(maml.loss(maml.params(), x, y, w), loss)


def test_adapt_lowers_the_support_loss_and_is_repeated_inner_steps():
    model = classifier()
    maml = MAML(model, inner_lr=1.0, inner_steps=4)
    x, y, _ = sign_tasks(tasks=1, per_class=10)
    w = torch.ones(20)
    params = {k: v.detach() for k, v in maml.params().items()}
    adapted = maml.adapt(params, x, y, w)
    by_hand, losses = params, [float(maml.loss(params, x, y, w))]
    for _ in range(4):
        by_hand = maml.inner_step(by_hand, x, y, w)
        losses.append(float(maml.loss(by_hand, x, y, w)))
    for k in params:
        torch.testing.assert_close(adapted[k], by_hand[k])
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))  # every step lowers it
    assert losses[-1] < losses[0] - 0.1
    unchanged = maml.adapt(params, x, y, w, steps=0)
    assert all(unchanged[k] is params[k] for k in params)


def test_adapt_without_weights_balances_the_classes():
    maml = MAML(classifier(), inner_steps=2)
    x, y, _ = sign_tasks(tasks=1, per_class=10)
    x, y = x[:13], y[:13]  # 10 normals, 3 anomalies
    w = torch.where(y == 1, 1 / 3, 1 / 10)
    params = {k: v.detach() for k, v in maml.params().items()}
    default, explicit = maml.adapt(params, x, y), maml.adapt(params, x, y, w)
    for k in params:
        torch.testing.assert_close(default[k], explicit[k])


# ---------------------------------------------------------------- outer loss


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_give_the_same_outer_loss_and_gradient(first_order):
    model = classifier()
    tasks = one_task()
    results = []
    for use_vmap in (True, False):
        maml = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, use_vmap=use_vmap)
        loss = maml.outer_loss(tasks)
        results.append((loss, torch.autograd.grad(loss, list(maml.params().values()))))
    (loss_v, grads_v), (loss_l, grads_l) = results
    torch.testing.assert_close(loss_v, loss_l)
    for a, b in zip(grads_v, grads_l, strict=True):
        torch.testing.assert_close(a, b)


def hand_meta_gradient(model: MetaClassifier, tasks: Tasks, lr: float, steps: int, second_order: bool):
    """MAML meta-gradient by torch.autograd.grad; create_graph keeps the inner gradients differentiable."""
    params = list(model.parameters())
    total = 0.0
    for k in range(tasks.num_tasks):
        fast = params
        for _ in range(steps):
            inner = hand_loss(model, fast, tasks.support_x[k], tasks.support_y[k], tasks.support_w[k])
            grads = torch.autograd.grad(inner, fast, create_graph=second_order)
            fast = [p - lr * g for p, g in zip(fast, grads, strict=True)]
        total = total + hand_loss(model, fast, tasks.query_x[k], tasks.query_y[k], tasks.query_w[k])
    return torch.autograd.grad(total / tasks.num_tasks, params)


@pytest.mark.parametrize("use_vmap", [True, False])
def test_second_order_meta_gradient_matches_autograd_and_differs_from_first_order(use_vmap):
    model = classifier()
    tasks = one_task(seed=2)
    grads = {}
    for first_order in (False, True):
        maml = MAML(model, inner_lr=1.0, inner_steps=2, first_order=first_order, use_vmap=use_vmap)
        grads[first_order] = torch.autograd.grad(maml.outer_loss(tasks), list(maml.params().values()))
    for got, want in zip(grads[False], hand_meta_gradient(model, tasks, 1.0, 2, True), strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(grads[True], hand_meta_gradient(model, tasks, 1.0, 2, False), strict=True):
        torch.testing.assert_close(got, want)
    # the Hessian terms are large here (two steps of size 1 on a tanh net), not rounding
    second, first = (
        torch.cat([g.flatten() for g in grads[False]]),
        torch.cat([g.flatten() for g in grads[True]]),
    )
    assert float((second - first).norm()) > 0.1 * float(first.norm())


def test_padding_rows_change_neither_the_loss_nor_its_gradient():
    model = classifier()
    maml = MAML(model, inner_lr=0.5, inner_steps=2)
    tasks = one_task(seed=3)

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        """5 more rows per task: (K, L, ...) -> (K, L + 5, ...)."""
        return torch.cat([t, torch.full((t.shape[0], 5, *t.shape[2:]), value)], dim=1)

    # extra rows of weight 0 holding large features: they must not count
    padded = Tasks(
        pad(tasks.support_x, 100.0),
        pad(tasks.support_y, 1.0),
        pad(tasks.support_w, 0.0),
        pad(tasks.query_x, 100.0),
        pad(tasks.query_y, 1.0),
        pad(tasks.query_w, 0.0),
    )
    plain, more = maml.outer_loss(tasks), maml.outer_loss(padded)
    torch.testing.assert_close(plain, more)
    params = list(maml.params().values())
    for a, b in zip(torch.autograd.grad(plain, params), torch.autograd.grad(more, params), strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- tasks


def test_make_tasks_splits_balances_and_pads():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float32)
    group = torch.tensor([5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 9, 9, 9])  # group 9 has no anomaly
    x = torch.arange(13, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i: rows are traceable
    tasks = make_tasks(x, y, group, 0.5, torch.Generator().manual_seed(0))
    assert tasks.groups.tolist() == [2, 5] and tasks.num_tasks == 2
    assert tasks.support_x.shape[::2] == (2, 3) and tasks.query_x.shape[::2] == (2, 3)
    for k, rows in enumerate(([7, 8, 9], [0, 1, 2, 3, 4, 5, 6])):
        s_rows = tasks.support_x[k, tasks.support_w[k] > 0, 0].long().tolist()
        q_rows = tasks.query_x[k, tasks.query_w[k] > 0, 0].long().tolist()
        assert set(s_rows) | set(q_rows) == set(rows)
        assert torch.equal(tasks.support_y[k], y[tasks.support_x[k, :, 0].long()])
        for part_w, part_y in (
            (tasks.support_w[k], tasks.support_y[k]),
            (tasks.query_w[k], tasks.query_y[k]),
        ):
            torch.testing.assert_close(part_w[(part_w > 0) & (part_y == 0)].sum(), torch.tensor(0.5))
            torch.testing.assert_close(part_w[(part_w > 0) & (part_y == 1)].sum(), torch.tensor(0.5))
    # group 2's single anomaly (row 9) is in its support and its query; its normals are split 1 + 1
    assert 9 in tasks.support_x[0, tasks.support_w[0] > 0, 0].tolist()
    assert 9 in tasks.query_x[0, tasks.query_w[0] > 0, 0].tolist()
    # group 5: 4 normals -> 2 + 2, 3 anomalies -> 2 + 1 (round(1.5) = 2); disjoint halves
    s5 = set(tasks.support_x[1, tasks.support_w[1] > 0, 0].long().tolist())
    q5 = set(tasks.query_x[1, tasks.query_w[1] > 0, 0].long().tolist())
    assert len(s5) == 4 and len(q5) == 3 and not s5 & q5


def test_make_tasks_is_reproducible_for_a_generator_seed():
    x, y, group = sign_tasks(tasks=4, per_class=8)
    a, b, c = (make_tasks(x, y, group, 0.5, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_w, b.query_w)
    assert not torch.equal(a.support_x, c.support_x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, True])
def test_make_tasks_rejects_bad_support_fraction(fraction):
    x, y, group = sign_tasks(tasks=2, per_class=3)
    with pytest.raises(AsdError, match="support_fraction"):
        make_tasks(x, y, group, fraction, torch.Generator())


# ---------------------------------------------------------------- meta-training and test time


def test_meta_fit_is_deterministic_learns_and_adaptation_solves_disagreeing_tasks():
    x, y, group = sign_tasks(tasks=8, per_class=20, seed=0)
    model = classifier(seed=0)
    twin = copy.deepcopy(model)
    maml = MAML(model, inner_lr=0.5, inner_steps=3)
    state = torch.get_rng_state()
    losses = maml.meta_fit(x, y, group, meta_steps=150, meta_lr=1e-2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(losses) == 150 and sum(losses[-20:]) / 20 < 0.4 * sum(losses[:20]) / 20
    again = MAML(twin, inner_lr=0.5, inner_steps=3).meta_fit(
        x, y, group, meta_steps=150, meta_lr=1e-2, seed=3
    )
    assert again == losses
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())

    # fresh clips of the same tasks: adapt on one sample, score another
    fit_x, fit_y, fit_group = sign_tasks(tasks=8, per_class=20, seed=1)
    test_x, test_y, test_group = sign_tasks(tasks=8, per_class=20, seed=2)
    adapted = maml.adapt_groups(fit_x, fit_y, fit_group)
    init = {k: v.detach() for k, v in maml.params().items()}
    ones = torch.ones(40)
    loss_adapted = sum(
        float(maml.loss(adapted[t], test_x[test_group == t], test_y[test_group == t], ones)) for t in range(8)
    )
    loss_init = sum(
        float(maml.loss(init, test_x[test_group == t], test_y[test_group == t], ones)) for t in range(8)
    )
    assert loss_adapted < 0.5 * loss_init


def test_meta_fit_seed_changes_the_splits():
    x, y, group = sign_tasks(tasks=4, per_class=6)
    a = MAML(classifier()).meta_fit(x, y, group, meta_steps=3, seed=0)
    b = MAML(classifier()).meta_fit(x, y, group, meta_steps=3, seed=1)
    assert a != b


def test_meta_fit_leaves_out_one_class_groups_and_says_so(caplog):
    x, y, group = sign_tasks(tasks=3, per_class=4)
    keep = ~((group == 1) & (y == 1))  # group 1 keeps its normals only
    with caplog.at_level("INFO", logger="asd.fusion.meta"):
        losses = MAML(classifier()).meta_fit(x[keep], y[keep], group[keep], meta_steps=2)
    assert len(losses) == 2
    assert "groups [1] hold one class only" in caplog.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y, g: (x, torch.zeros_like(y), g), "none of the 3 groups holds both"),
        (
            lambda x, y, g: (x.index_fill(0, torch.tensor([2]), float("inf")), y, g),
            r"NaN/inf values in rows \[2\]",
        ),
        (lambda x, y, g: (x, y[:-1], g), "`y` has 23 labels but there are 24 rows"),
        (lambda x, y, g: (x, y, g.float()), "`group` must be an integer tensor"),
        (lambda x, y, g: (x[:, :3], y, g), "features have 3 columns but it takes 4"),
    ],
)
def test_meta_fit_rejects_bad_input(change, message):
    x, y, group = change(*sign_tasks(tasks=3, per_class=4))
    with pytest.raises(AsdError, match=message):
        MAML(classifier()).meta_fit(x, y, group, meta_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_lr": 0.0}, "`inner_lr`=0.0"),
        ({"inner_steps": -1}, "`inner_steps`=-1"),
        ({"inner_steps": 1.5}, "inner"),
    ],
)
def test_maml_rejects_bad_settings(kwargs, message):
    with pytest.raises(AsdError, match=message):
        MAML(classifier(), **kwargs)


def test_adapt_groups_gives_one_detached_dict_per_group_and_scores():
    x, y, group = sign_tasks(tasks=3, per_class=5)
    group = group * 10  # any ids
    keep = ~((group == 10) & (y == 1))  # a group with normals only still adapts
    x, y, group = x[keep], y[keep], group[keep]
    maml = MAML(classifier(), inner_lr=0.3, inner_steps=2)
    adapted = maml.adapt_groups(x, y, group, steps=4)
    assert sorted(adapted) == [0, 10, 20]
    init = {k: v.detach() for k, v in maml.params().items()}
    for g, params in adapted.items():
        assert list(params) == list(init) and not any(p.requires_grad for p in params.values())
        rows = group == g
        expected = maml.adapt(init, x[rows], y[rows], steps=4)  # default weights: classes balanced
        for k in init:
            torch.testing.assert_close(params[k], expected[k])
    assert not torch.equal(adapted[10]["net.0.weight"], init["net.0.weight"])
    scores = maml.score(adapted[0], x[:7])
    assert scores.shape == (7,) and not scores.requires_grad
    torch.testing.assert_close(scores, torch.func.functional_call(maml.model, adapted[0], (x[:7],)))


def test_meta_fit_under_ddp_matches_the_plain_model(tmp_path):
    """A DDP-wrapped classifier meta-trains like the plain one (one-process gloo group)."""
    x, y, group = sign_tasks(tasks=3, per_class=4)
    plain = classifier()
    wrapped_inner = copy.deepcopy(plain)
    expected = MAML(plain).meta_fit(x, y, group, meta_steps=5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        maml = MAML(DistributedDataParallel(wrapped_inner))
        assert maml.module is wrapped_inner and "net.0.weight" in maml.params()
        got = maml.meta_fit(x, y, group, meta_steps=5)
    finally:
        dist.destroy_process_group()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for a, b in zip(plain.parameters(), wrapped_inner.parameters(), strict=True):
        torch.testing.assert_close(a, b)
