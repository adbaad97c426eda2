"""MAML meta-learner: a small classifier over the fused features, adapted per (machine, section, domain).

A task is one group (machine, section, domain). Each meta step splits every task's rows (normal
training clips and pseudo-anomalies) into a support and a query set, adapts the classifier's
parameters with a few plain SGD steps on the support loss (`torch.func.grad` on a
`functional_call`), and trains the initial parameters on the query loss after adaptation. The
inner gradients are taken on the meta-parameters themselves, so the outer backward goes through
them: second-order MAML. With `first_order` the inner gradients are constants for the outer loss
(FOMAML). Tasks are padded to one size with weight-0 rows so `torch.func.vmap` can batch them.

At test time every group adapts on all of its training rows, which is where a target domain's
few clips change the classifier.

DDP: meta-training is small and runs on CPU. The pipeline calls `meta_fit` on every rank with the
same gathered inputs and seed, so every rank ends with the same parameters and nothing is
communicated. The outer loss is an ordinary tensor, so a DDP-wrapped classifier works too:
its forward is bypassed by `functional_call`, so DDP's own gradient hooks never fire and
`meta_fit` averages the meta-gradients over ranks itself.

One file: the classifier, task sampling, the inner loop and its vmap form are one algorithm
(MAML); the tests compare the vmap and loop forms within it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel

from asd.errors import AsdError
from asd.fusion.attention import (
    NUM_DOMAINS,
    _check_labels,
    _check_positive_float,
    _check_positive_int,
    _check_range,
    _check_scores,
    balanced_weights,
    squash,
)
from asd.scoring import _check_domain, _check_finite, _check_ids

log = logging.getLogger(__name__)


def meta_features(
    z: Tensor, weights: Tensor, fused: Tensor, machine: Tensor, domain: Tensor, num_machines: int
) -> Tensor:
    """(B, 2M + 1 + 3 + num_machines): z, attention weights, fused score, one-hot domain, one-hot machine."""
    where = "meta_features"
    _check_positive_int(num_machines, "num_machines", where)
    _check_scores(z, "z", where)
    n, m = z.shape
    _check_scores(weights, "weights", where, m)
    if weights.shape[0] != n:
        raise AsdError(f"{where}: `weights` has {weights.shape[0]} rows but `z` has {n}; pass one per clip")
    if not isinstance(fused, Tensor) or fused.shape != (n,) or not fused.is_floating_point():
        got = tuple(fused.shape) if isinstance(fused, Tensor) else type(fused).__name__
        raise AsdError(f"{where}: `fused` must be a float tensor of shape ({n},), got {got}")
    _check_finite(fused, "fused", where)
    machine = _check_ids(machine, "machine", n, where, z.device)
    domain = _check_ids(domain, "domain", n, where, z.device)
    _check_range(machine, "machine", num_machines, where, "num_machines")
    _check_domain(domain, where)
    parts = [
        z,
        weights.to(z),
        fused.to(z)[:, None],  # (B,) -> (B, 1)
        F.one_hot(domain, NUM_DOMAINS).to(z.dtype),  # (B, 3)
        F.one_hot(machine, num_machines).to(z.dtype),  # (B, num_machines)
    ]
    return torch.cat(parts, dim=1)


class MetaClassifier(nn.Module):
    """Features (B, D) -> anomaly logits (B,) through two small tanh layers."""

    def __init__(self, in_dim: int, hidden: int = 16):
        super().__init__()
        self.in_dim = _check_positive_int(in_dim, "in_dim", "MetaClassifier")
        _check_positive_int(hidden, "hidden", "MetaClassifier")
        # tanh, not ReLU: smooth, so second-order MAML gets curvature terms everywhere
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, D) -> (B,) logits, higher = more anomalous."""
        if x.shape[-1] != self.in_dim:
            raise AsdError(
                f"MetaClassifier: features have {x.shape[-1]} columns but it takes {self.in_dim}; "
                "build it with in_dim = meta_features(...).shape[1]"
            )
        # squashed inputs: a pseudo-anomaly's z of 1000 would saturate every unit and make the inner
        # SGD steps explode
        return self.net(squash(x)).squeeze(-1)  # (B, 1) -> (B,)


@dataclass
class Tasks:
    """Padded task batch; padding rows have weight 0 and change neither the losses nor their gradients.

    support_x (K, S, D), support_y (K, S), support_w (K, S); query_x (K, Q, D), query_y (K, Q),
    query_w (K, Q); groups (K,) the group id of each task. Within the support and within the query
    each class of a task weighs the same in total.
    """

    support_x: Tensor
    support_y: Tensor
    support_w: Tensor
    query_x: Tensor
    query_y: Tensor
    query_w: Tensor
    groups: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


def _check_data(
    where: str, x: Tensor, y: Tensor, group: Tensor, like: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, D) finite, y (N,) 0/1 and group (N,) integer ids, on `like`'s device and in its dtype."""
    _check_scores(x, "x", where)
    x = x if like is None else x.to(like)
    y = _check_labels(y, x.shape[0], where, like=x)
    group = _check_ids(group, "group", x.shape[0], where, x.device)
    return x, y, group


def _task_rows(y: Tensor, group: Tensor) -> tuple[dict[int, tuple[Tensor, Tensor]], list[int]]:
    """{group: (normal rows, anomaly rows)} of groups holding both classes (on CPU), and the other groups."""
    y, group = y.cpu(), group.cpu()
    rows, skipped = {}, []
    for g in torch.unique(group).tolist():
        normal = torch.nonzero((group == g) & (y == 0)).flatten()
        anomaly = torch.nonzero((group == g) & (y == 1)).flatten()
        if len(normal) and len(anomaly):
            rows[int(g)] = (normal, anomaly)
        else:
            skipped.append(int(g))
    return rows, skipped


def _split(rows: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random (support, query) split of one class's rows; a single row goes to both."""
    n = rows.numel()
    if n == 1:
        return rows, rows
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    k = min(max(round(fraction * n), 1), n - 1)  # both sides keep at least one row
    return rows[order[:k]], rows[order[k:]]


def _pad(sets: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per task (normal rows, anomaly rows) -> row index (K, L), balanced weights (K, L), 0 = padding."""
    width = max(len(a) + len(b) for a, b in sets)
    index = torch.zeros(len(sets), width, dtype=torch.long)
    weight = torch.zeros(len(sets), width)
    for k, (normal, anomaly) in enumerate(sets):
        n, a = len(normal), len(anomaly)
        index[k, : n + a] = torch.cat([normal, anomaly])
        weight[k, :n] = 0.5 / n
        weight[k, n : n + a] = 0.5 / a
    return index, weight


def _build_tasks(
    x: Tensor, y: Tensor, rows: dict[int, tuple[Tensor, Tensor]], fraction: float, generator: torch.Generator
) -> Tasks:
    support, query = [], []
    for normal, anomaly in rows.values():
        normal_s, normal_q = _split(normal, fraction, generator)
        anomaly_s, anomaly_q = _split(anomaly, fraction, generator)
        support.append((normal_s, anomaly_s))
        query.append((normal_q, anomaly_q))
    s_index, s_weight = (t.to(x.device) for t in _pad(support))  # (K, S)
    q_index, q_weight = (t.to(x.device) for t in _pad(query))  # (K, Q)
    return Tasks(
        support_x=x[s_index],  # (K, S, D); padding repeats row 0 at weight 0
        support_y=y[s_index],
        support_w=s_weight.to(x.dtype),
        query_x=x[q_index],  # (K, Q, D)
        query_y=y[q_index],
        query_w=q_weight.to(x.dtype),
        groups=torch.tensor(list(rows), dtype=torch.long, device=x.device),
    )


def _check_fraction(support_fraction: float, where: str) -> float:
    ok = isinstance(support_fraction, (int, float)) and not isinstance(support_fraction, bool)
    if not ok or not 0 < support_fraction < 1:
        raise AsdError(
            f"{where}: `support_fraction`={support_fraction!r}; set it strictly between 0 and 1 "
            "(the share of each task's clips in its support set)"
        )
    return float(support_fraction)


def _no_tasks(where: str, skipped: list[int]) -> AsdError:
    return AsdError(
        f"{where}: none of the {len(skipped)} groups holds both normal clips (y=0) and pseudo-anomalies "
        "(y=1); make pseudo-anomalies from each group's normal training clips"
    )


def make_tasks(
    x: Tensor, y: Tensor, group: Tensor, support_fraction: float, generator: torch.Generator
) -> Tasks:
    """A fresh random support/query split of every group holding both classes, padded into one batch.

    Args:
        x: (N, D) features; y: (N,) 0.0 normal / 1.0 anomaly; group: (N,) task id per row.
        support_fraction: share of each class of a task in its support; the rest is its query. A
            class with a single row puts it in both.
        generator: the only source of randomness, so equal generator states give equal splits.
    """
    where = "make_tasks"
    fraction = _check_fraction(support_fraction, where)
    x, y, group = _check_data(where, x, y, group)
    rows, skipped = _task_rows(y, group)
    if not rows:
        raise _no_tasks(where, skipped)
    return _build_tasks(x, y, rows, fraction, generator)


class MAML:
    """Model-agnostic meta-learning of a classifier's initial parameters with torch.func."""

    def __init__(
        self,
        model: MetaClassifier,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        first_order: bool = False,
        use_vmap: bool = True,
    ):
        where = "MAML"
        if not isinstance(model, nn.Module):
            raise AsdError(
                f"{where}: `model` must be an nn.Module (a MetaClassifier), got {type(model).__name__}"
            )
        self.model = model
        # functional calls go to the wrapped module: DDP's forward would expect its own backward
        self.module = model.module if isinstance(model, DistributedDataParallel) else model
        self.inner_lr = _check_positive_float(inner_lr, "inner_lr", where)
        self.inner_steps = _check_positive_int(inner_steps, "inner_steps", where, minimum=0)
        self.first_order = bool(first_order)
        self.use_vmap = bool(use_vmap)

    def params(self) -> dict[str, Tensor]:
        """The meta-parameters: the model's own Parameters by name."""
        return dict(self.module.named_parameters())

    def loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """sum(w * BCE-with-logits) / sum(w) of the model under `params`; x (B, D), y (B,), w (B,)."""
        logits = functional_call(self.module, params, (x,))  # (B,)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (w * bce).sum() / w.sum().clamp_min(1e-12)  # all-padding: 0, not NaN

    def inner_step(self, params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> dict[str, Tensor]:
        """One plain SGD step p - inner_lr * dloss/dp; differentiable w.r.t. `params` unless first_order."""
        if self.first_order:
            # FOMAML: the step's gradient is a constant for the outer loss, so take it off the graph
            grads = grad(self.loss)({k: p.detach() for k, p in params.items()}, x, y, w)
        else:
            # on tensors that require grad, torch.func.grad's result is itself differentiable: the
            # outer backward then reaches the Hessian-vector terms of second-order MAML
            grads = grad(self.loss)(params, x, y, w)
        return {k: p - self.inner_lr * grads[k] for k, p in params.items()}

    def adapt(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        w: Tensor | None = None,
        steps: int | None = None,
    ) -> dict[str, Tensor]:
        """`steps` (default inner_steps) SGD steps on (x, y); w=None weighs both classes equally in total."""
        steps = self.inner_steps if steps is None else _check_positive_int(steps, "steps", "MAML.adapt", 0)
        if w is None:
            w = balanced_weights(y)
        adapted = dict(params)
        for _ in range(steps):
            adapted = self.inner_step(adapted, x, y, w)
        return adapted

    def _task_loss(
        self,
        params: dict[str, Tensor],
        sx: Tensor,
        sy: Tensor,
        sw: Tensor,
        qx: Tensor,
        qy: Tensor,
        qw: Tensor,
    ) -> Tensor:
        """Query loss of one task after adapting on its support."""
        return self.loss(self.adapt(params, sx, sy, sw), qx, qy, qw)

    def outer_loss(self, tasks: Tasks) -> Tensor:
        """Mean over tasks of the query loss after adapting the meta-parameters on the support."""
        if tasks.num_tasks == 0:
            raise AsdError("MAML.outer_loss: the task batch is empty; build it with make_tasks()")
        params = self.params()
        batch = (
            tasks.support_x,
            tasks.support_y,
            tasks.support_w,
            tasks.query_x,
            tasks.query_y,
            tasks.query_w,
        )
        if self.use_vmap:
            # params are shared by all tasks (in_dims None); every task tensor is batched on dim 0
            losses = vmap(self._task_loss, in_dims=(None, 0, 0, 0, 0, 0, 0))(params, *batch)  # (K,)
        else:
            losses = torch.stack(
                [self._task_loss(params, *(t[k] for t in batch)) for k in range(tasks.num_tasks)]
            )
        return losses.mean()

    def meta_fit(
        self,
        x: Tensor,
        y: Tensor,
        group: Tensor,
        *,
        meta_steps: int = 200,
        meta_lr: float = 3e-3,
        support_fraction: float = 0.5,
        seed: int = 0,
    ) -> list[float]:
        """Meta-train the initial parameters with Adam on the outer loss; the outer loss per step.

        Args:
            x: (N, D) features (`meta_features`); y: (N,) 0.0 normal / 1.0 pseudo-anomaly;
                group: (N,) task id per row, e.g. one per (machine, section, domain).
            support_fraction: share of each class of a task drawn into its support at every step.
            seed: seeds the support/query splits (a private generator; the global RNG is untouched),
                so equal seeds and inputs give equal results, on every DDP rank alike.

        Groups with a single class cannot form a task and are left out of meta-training (logged);
        `adapt_groups` still adapts them.
        """
        where = "MAML.meta_fit"
        _check_positive_int(meta_steps, "meta_steps", where, minimum=0)
        _check_positive_float(meta_lr, "meta_lr", where)
        fraction = _check_fraction(support_fraction, where)
        params = self.params()
        x, y, group = _check_data(where, x, y, group, like=next(iter(params.values())))
        rows, skipped = _task_rows(y, group)
        if not rows:
            raise _no_tasks(where, skipped)
        if skipped:
            log.info("meta-learner: groups %s hold one class only and are left out of meta-training", skipped)
        trainable = [p for p in params.values() if p.requires_grad]
        if not trainable:
            raise AsdError(
                f"{where}: every parameter of the model is frozen; call model.requires_grad_(True)"
            )
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(trainable, lr=meta_lr)
        losses: list[float] = []
        for step in range(meta_steps):
            tasks = _build_tasks(x, y, rows, fraction, generator)
            loss = self.outer_loss(tasks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._average_grads_over_ranks(trainable)
            optimizer.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise AsdError(
                    f"{where}: the outer loss is {losses[-1]} at step {step}; lower `meta_lr` or `inner_lr`"
                )
        optimizer.zero_grad(set_to_none=True)
        if losses:
            log.info(
                "meta-learner: outer loss %.4f -> %.4f over %d steps on %d tasks (%s order)",
                losses[0],
                losses[-1],
                meta_steps,
                len(rows),
                "first" if self.first_order else "second",
            )
        return losses

    def _average_grads_over_ranks(self, params: list[Tensor]) -> None:
        """Mean meta-gradient over DDP ranks when the model is DDP-wrapped (its own hooks never fire here)."""
        if not isinstance(self.model, DistributedDataParallel) or not dist.is_initialized():
            return
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    def adapt_groups(
        self, x: Tensor, y: Tensor, group: Tensor, steps: int | None = None
    ) -> dict[int, dict[str, Tensor]]:
        """Test-time adaptation: {group: detached params adapted on all its rows, classes balanced}."""
        where = "MAML.adapt_groups"
        if steps is not None:
            _check_positive_int(steps, "steps", where, minimum=0)
        init = {k: v.detach() for k, v in self.params().items()}  # no graph: nothing is meta-trained here
        x, y, group = _check_data(where, x, y, group, like=next(iter(init.values())))
        out = {}
        for g in torch.unique(group).tolist():
            rows = group == g
            adapted = self.adapt(init, x[rows], y[rows], balanced_weights(y[rows]), steps)
            out[int(g)] = {k: v.detach() for k, v in adapted.items()}
        return out

    def score(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits (B,) of x (B, D) under `params`, higher = more anomalous; no graph is built."""
        _check_scores(x, "x", "MAML.score")
        ref = next(iter(params.values()))
        with torch.no_grad():
            return functional_call(self.module, params, (x.to(device=ref.device, dtype=ref.dtype),))
