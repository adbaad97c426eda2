"""Attention fusion: context-dependent weights over member z-scores, trained on normals vs pseudo-anomalies.

A small MLP reads a clip's member z-scores together with learned embeddings of its machine,
section and domain, and outputs softmax weights over the members; the fused score is the
weighted sum of the z-scores. The last layer starts at zero, so an untrained head weighs every
member equally and its fused score is the label-free "zmean" fusion. A positive scale and a bias
turn the fused score into a logit for the BCE of normal clips (0) against pseudo-anomalies (1).

Domain ids are 0 source, 1 target, 2 unknown. Training clips are always source or target, so
the unknown domain has no embedding of its own: it uses the mean of the source and target ones,
the context of a clip that could be either, rather than a vector no training clip ever moved.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from asd.errors import AsdError
from asd.scoring import _check_domain, _check_finite, _check_ids

log = logging.getLogger(__name__)

NUM_DOMAINS = 3  # 0 source, 1 target, 2 unknown


def squash(z: Tensor) -> Tensor:
    """sign(z) log(1 + |z|): close to z near 0, logarithmic for the huge z-scores of clear anomalies."""
    return torch.sign(z) * torch.log1p(z.abs())


def balanced_weights(y: Tensor) -> Tensor:
    """Sample weights (N,) summing to 1 that give every class present in y (N,) the same total weight."""
    y = y if y.is_floating_point() else y.float()
    anomalies = y == 1
    n_anomalies = anomalies.sum()
    n_normals = y.numel() - n_anomalies
    n_classes = (n_anomalies > 0).to(y.dtype) + (n_normals > 0).to(y.dtype)
    per_class = torch.where(anomalies, n_anomalies, n_normals).to(y.dtype)  # (N,) size of each row's class
    return 1.0 / (n_classes * per_class)


def _check_positive_int(value: object, name: str, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AsdError(f"{where}: `{name}`={value!r}; set it to an integer >= {minimum}")
    return value


def _check_positive_float(value: object, name: str, where: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise AsdError(f"{where}: `{name}`={value!r}; set it to a finite number {bound}")
    return float(value)


def _check_scores(z: Tensor, name: str, where: str, columns: int | None = None) -> None:
    """`z` must be a finite float (N, M) tensor, with `columns` columns when given."""
    if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise AsdError(f"{where}: `{name}` must be a float tensor of shape (N, M), got {got}")
    if columns is not None and z.shape[1] != columns:
        raise AsdError(
            f"{where}: `{name}` has {z.shape[1]} member columns but the model was built for {columns}; "
            "pass the scores of the members it was built with"
        )
    _check_finite(z, name, where)


def _check_range(ids: Tensor, name: str, size: int, where: str, setting: str) -> None:
    """Ids must lie in 0..size-1: an embedding or one-hot of that size has a row for each."""
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        values = sorted(set(ids[bad].tolist()))[:10]
        raise AsdError(
            f"{where}: `{name}` ids {values} are outside 0..{size - 1}; "
            f"build it with `{setting}` larger than the largest {name} id"
        )


def _check_labels(y: Tensor, n: int, where: str, like: Tensor) -> Tensor:
    """y (N,) of 0.0 (normal) / 1.0 (anomaly), returned in `like`'s dtype and device."""
    if not isinstance(y, Tensor) or y.dim() != 1 or y.dtype == torch.bool:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
        raise AsdError(f"{where}: `y` must be a numeric tensor of shape (N,), got {got}")
    if y.shape[0] != n:
        raise AsdError(f"{where}: `y` has {y.shape[0]} labels but there are {n} rows; pass one per clip")
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        values = sorted(set(y[bad].tolist()))[:10]
        raise AsdError(f"{where}: `y` has values {values}; use 0.0 for normal clips and 1.0 for anomalies")
    return y.to(device=like.device, dtype=like.dtype)


def _check_both_classes(y: Tensor, where: str) -> None:
    n_anomalies = int((y == 1).sum())
    if n_anomalies == 0 or n_anomalies == y.numel():
        only = "anomalies (1)" if n_anomalies else "normal clips (0)"
        raise AsdError(
            f"{where}: `y` holds only {only}; the fit needs normal clips (0) and pseudo-anomalies (1), "
            "so make pseudo-anomalies of the held-out normals and pass both"
        )


class AttentionFusion(nn.Module):
    """Softmax weights over members from their z-scores and the clip's (machine, section, domain)."""

    def __init__(
        self, num_members: int, num_machines: int, num_sections: int, hidden: int = 16, context_dim: int = 4
    ):
        super().__init__()
        where = "AttentionFusion"
        for name, value in (
            ("num_members", num_members),
            ("num_machines", num_machines),
            ("num_sections", num_sections),
            ("hidden", hidden),
            ("context_dim", context_dim),
        ):
            _check_positive_int(value, name, where)
        self.num_members, self.num_machines, self.num_sections = num_members, num_machines, num_sections
        self.machine_emb = nn.Embedding(num_machines, context_dim)
        self.section_emb = nn.Embedding(num_sections, context_dim)
        self.domain_emb = nn.Embedding(2, context_dim)  # source, target; unknown = their mean
        self.mlp = nn.Sequential(
            nn.Linear(num_members + 3 * context_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_members)
        )
        # zero member logits: uniform weights, so the untrained head is the zmean fusion
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        # softplus(log(e - 1)) = 1: the BCE logit starts as the fused score itself
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.e - 1)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, M), context ids (B,) -> fused (B,) = sum_m w_m z_m, weights (B, M) with rows summing to 1."""
        z, machine, section, domain = self.check_inputs("AttentionFusion", z, machine, section, domain)
        return self._fuse(z, machine, section, domain)

    def logit(self, fused: Tensor) -> Tensor:
        """BCE logit a * fused + b, a = softplus(raw_scale) > 0: a higher fused score stays more anomalous."""
        return F.softplus(self.raw_scale) * fused + self.bias

    def check_inputs(
        self, where: str, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Validated inputs on the head's device: z in its dtype, ids as long."""
        _check_scores(z, "z", where, self.num_members)
        ref = self.raw_scale
        n = z.shape[0]
        machine = _check_ids(machine, "machine", n, where, ref.device)
        section = _check_ids(section, "section", n, where, ref.device)
        domain = _check_ids(domain, "domain", n, where, ref.device)
        _check_range(machine, "machine", self.num_machines, where, "num_machines")
        _check_range(section, "section", self.num_sections, where, "num_sections")
        _check_domain(domain, where)
        return z.to(device=ref.device, dtype=ref.dtype), machine, section, domain

    def _fuse(self, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor) -> tuple[Tensor, Tensor]:
        source_target = self.domain_emb.weight  # (2, C)
        table = torch.cat([source_target, source_target.mean(dim=0, keepdim=True)])  # (3, C)
        context = torch.cat(
            [self.machine_emb(machine), self.section_emb(section), table[domain]], dim=1
        )  # (B, 3C)
        # the MLP sees squashed scores: an anomaly's z of 1000 must not saturate it, the sum uses raw z
        member_logits = self.mlp(torch.cat([squash(z), context], dim=1))  # (B, M)
        weights = torch.softmax(member_logits, dim=1)
        return (weights * z).sum(dim=1), weights


def fit_attention(
    head: AttentionFusion,
    z: Tensor,
    machine: Tensor,
    section: Tensor,
    domain: Tensor,
    y: Tensor,
    *,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> list[float]:
    """Train `head` by class-balanced BCE of normals (y=0) vs pseudo-anomalies (y=1); the loss per epoch.

    Full-batch Adam draws no random numbers, so the result depends only on the head's initial
    weights and the data; `seed` seeds a forked RNG (the caller's global RNG state is restored
    afterwards) so that stays true should the head ever gain a stochastic layer.
    """
    where = "fit_attention"
    _check_positive_int(epochs, "epochs", where)
    _check_positive_float(lr, "lr", where)
    _check_positive_float(weight_decay, "weight_decay", where, allow_zero=True)
    z, machine, section, domain = head.check_inputs(where, z, machine, section, domain)
    if z.shape[0] == 0:
        raise AsdError(
            f"{where}: no clips to fit on; pass the z-scores of held-out normals and pseudo-anomalies"
        )
    y = _check_labels(y, z.shape[0], where, like=z)
    _check_both_classes(y, where)
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise AsdError(
            f"{where}: every parameter of the head is frozen; call head.requires_grad_(True) first"
        )
    w = balanced_weights(y)  # normals and anomalies weigh 1/2 each in total
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    was_training = head.training
    head.train()
    losses: list[float] = []
    devices = [z.device] if z.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            fused, _ = head._fuse(z, machine, section, domain)
            bce = F.binary_cross_entropy_with_logits(head.logit(fused), y, reduction="none")  # (N,)
            loss = (w * bce).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise AsdError(f"{where}: the loss became {losses[-1]} at epoch {epoch}; lower `lr`")
    optimizer.zero_grad(set_to_none=True)
    head.train(was_training)
    log.info(
        "attention fusion: class-balanced BCE %.4f -> %.4f over %d epochs (%d normals, %d pseudo-anomalies)",
        losses[0],
        losses[-1],
        epochs,
        int((y == 0).sum()),
        int((y == 1).sum()),
    )
    return losses


def group_weights(
    head: AttentionFusion, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean attention weights per (machine, section, domain) present: keys (G, 3) long, weights (G, M)."""
    z, machine, section, domain = head.check_inputs("group_weights", z, machine, section, domain)
    with torch.no_grad():
        _, weights = head._fuse(z, machine, section, domain)  # (N, M)
    triples = torch.stack([machine, section, domain], dim=1)  # (N, 3)
    keys, inverse, counts = torch.unique(triples, dim=0, return_inverse=True, return_counts=True)
    sums = weights.new_zeros(keys.shape[0], weights.shape[1]).index_add_(0, inverse, weights)  # (G, M)
    return keys, sums / counts[:, None].to(sums.dtype)


def plot_attention_weights(labels: list[str], weights: np.ndarray, members: list[str], path: Path) -> Path:
    """Heatmap of weights (G, M), a row per label and a column per member, values written in the cells."""
    where = "plot_attention_weights"
    values = np.asarray(weights, dtype=float)
    if values.ndim != 2 or values.shape != (len(labels), len(members)):
        raise AsdError(
            f"{where}: `weights` has shape {values.shape} but there are {len(labels)} labels and "
            f"{len(members)} members; pass one row per label and one column per member"
        )
    if values.size == 0:
        raise AsdError(f"{where}: nothing to plot; pass the weights of at least one group and member")
    if not np.isfinite(values).all():
        raise AsdError(f"{where}: `weights` has NaN/inf values; plot the output of group_weights()")
    rows, cols = values.shape
    fig = Figure(figsize=(max(4.0, 1.1 * cols + 3.0), max(2.5, 0.32 * rows + 1.5)))
    ax = fig.add_subplot()
    # a fixed 0..1 colour scale (weights are convex), so plots of different runs compare by eye
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(cols), labels=members)
    ax.set_yticks(range(rows), labels=labels)
    for i in range(rows):
        for j in range(cols):
            color = "black" if values[i, j] > 0.5 else "white"  # readable on viridis' dark and light ends
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("member")
    ax.set_title("mean attention weight per group")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output, no display, no pyplot state
    fig.savefig(path, dpi=100)
    return path
