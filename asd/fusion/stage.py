"""The learned fusions' fitting: the attention head and the meta-learner, applied to any split.

Inputs are the members' z-scores (already normalised per machine/section/domain) of held-out normal
training clips and of pseudo-anomalies made from them, with each clip's context. Nothing here
ever sees a test label: `fit_fusion` takes training clips only, and `apply_fusion` reads scores and
context, never labels. The result is a `FusionState` whose `state_dict()` is plain tensors, lists
and numbers, so it rides in the run's `calibration.pt` and loads with `weights_only=True`.

Every rank of a DDP run calls `fit_fusion` on the same gathered inputs with the same seed, so all
ranks hold the same fusion without communicating (it is a few thousand numbers, fitted on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asd.errors import AsdError
from asd.fusion.attention import NUM_DOMAINS, AttentionFusion, fit_attention, group_weights
from asd.fusion.meta import MAML, MetaClassifier, meta_features

log = logging.getLogger(__name__)


@dataclass
class FusionState:
    """A fitted attention head and meta-learner: what `apply_fusion` needs, and what they learned from."""

    #: the fused members, in the column order of the z-scores
    members: list[str]
    num_machines: int
    attention_args: dict[str, int]
    attention: dict[str, Tensor]
    meta_args: dict[str, Any]
    meta_init: dict[str, Tensor]
    #: group id (`group_ids`) -> that group's adapted meta-parameters
    adapted: dict[int, dict[str, Tensor]]
    #: training losses per epoch/meta-step: `attention`, `meta`
    history: dict[str, list[float]]
    #: mean attention weights on the training clips: keys (G, 3) machine/section/domain, weights (G, M)
    group_keys: Tensor
    group_weights: Tensor
    #: how many training rows of each class (`normal`, `pseudo_anomaly`) and of each anomaly kind
    counts: dict[str, int]
    kinds: dict[str, int] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FusionState:
        return cls(**state)


def group_ids(section: Tensor, domain: Tensor) -> Tensor:
    """One id per (machine, section, domain): sections are global ids, so they imply the machine."""
    return section.long() * NUM_DOMAINS + domain.long()


def attention_head(state: FusionState) -> AttentionFusion:
    """The fitted attention head of a fusion state, in eval mode."""
    head = AttentionFusion(**state.attention_args)
    head.load_state_dict(state.attention)
    return head.eval()


def _maml(state: FusionState) -> MAML:
    args = state.meta_args
    model = MetaClassifier(args["in_dim"], hidden=args["hidden"])
    model.load_state_dict(state.meta_init)
    return MAML(
        model,
        inner_lr=args["inner_lr"],
        inner_steps=args["inner_steps"],
        first_order=args["first_order"],
        use_vmap=args["vmap"],
    )


def _features(
    head: AttentionFusion, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor, num_machines: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention fused score (N,), weights (N, M) and the meta-learner's features (N, D)."""
    with torch.no_grad():
        fused, weights = head(z, machine, section, domain)
    return fused, weights, meta_features(z, weights, fused, machine, domain, num_machines)


def fit_fusion(
    z: Tensor,
    machine: Tensor,
    section: Tensor,
    domain: Tensor,
    y: Tensor,
    *,
    members: list[str],
    num_machines: int,
    num_sections: int,
    cfg: dict[str, Any],
) -> FusionState:
    """Train attention (BCE) then MAML (tasks = groups) on training clips; adapt every group.

    Args:
        z: (N, M) float z-scores of held-out normals and pseudo-anomalies.
        machine, section, domain: (N,) long context of each row (a pseudo-anomaly has its source's).
        y: (N,) 1.0 for a pseudo-anomaly, 0.0 for a normal clip.
        cfg: the `fusion` config node as a plain dict (`attention`, `meta`, `seed`).
    """
    z = z.double().float()  # float32 everywhere: tiny models, CPU
    n, m = z.shape
    if m != len(members):
        raise AsdError(f"internal: {m} score columns for members {members}")
    att, meta = cfg["attention"], cfg["meta"]
    seed = int(cfg.get("seed", 0))
    attention_args = {
        "num_members": m,
        "num_machines": num_machines,
        "num_sections": num_sections,
        "hidden": int(att["hidden"]),
        "context_dim": int(att["context_dim"]),
    }
    torch.manual_seed(seed)  # initial weights; every rank starts from the same ones
    head = AttentionFusion(**attention_args)
    att_losses = fit_attention(
        head,
        z,
        machine,
        section,
        domain,
        y,
        epochs=int(att["epochs"]),
        lr=float(att["lr"]),
        weight_decay=float(att["weight_decay"]),
        seed=seed,
    )
    head.eval()
    _, _, x = _features(head, z, machine, section, domain, num_machines)
    groups = group_ids(section, domain)

    torch.manual_seed(seed)
    model = MetaClassifier(x.shape[1], hidden=int(meta["hidden"]))
    maml = MAML(
        model,
        inner_lr=float(meta["inner_lr"]),
        inner_steps=int(meta["inner_steps"]),
        first_order=bool(meta["first_order"]),
        use_vmap=bool(meta["vmap"]),
    )
    meta_losses = maml.meta_fit(
        x,
        y,
        groups,
        meta_steps=int(meta["meta_steps"]),
        meta_lr=float(meta["meta_lr"]),
        support_fraction=float(meta["support_fraction"]),
        seed=seed,
    )
    adapted = maml.adapt_groups(x, y, groups, steps=int(meta["test_steps"]))
    keys, weights = group_weights(head, z, machine, section, domain)
    return FusionState(
        members=list(members),
        num_machines=num_machines,
        attention_args=attention_args,
        attention={k: v.detach().clone() for k, v in head.state_dict().items()},
        meta_args={
            "in_dim": int(x.shape[1]),
            "hidden": int(meta["hidden"]),
            "inner_lr": float(meta["inner_lr"]),
            "inner_steps": int(meta["inner_steps"]),
            "test_steps": int(meta["test_steps"]),
            "first_order": bool(meta["first_order"]),
            "vmap": bool(meta["vmap"]),
        },
        meta_init={k: v.detach().clone() for k, v in model.state_dict().items()},
        adapted={int(g): {k: v.detach().clone() for k, v in p.items()} for g, p in adapted.items()},
        history={"attention": [float(v) for v in att_losses], "meta": [float(v) for v in meta_losses]},
        group_keys=keys,
        group_weights=weights.detach().clone(),
        counts={"normal": int((y == 0).sum()), "pseudo_anomaly": int((y == 1).sum())},
    )


def apply_fusion(
    state: FusionState, z: Tensor, machine: Tensor, section: Tensor, domain: Tensor
) -> dict[str, Tensor]:
    """Scores of the learned fusions for any clips: `attention` (N,), `meta` (N,), `weights` (N, M).

    Each clip is scored by its group's adapted meta-parameters. A clip of unknown domain (2: an
    evaluation file or a new recording whose name does not say) in a section trained with source
    and target clips gets the mean of that section's source- and target-adapted scores, each
    computed as if the clip were of that domain (no classifier there learned what "unknown"
    means). Data without domains (MIMII, DCASE 2020) train groups of domain 2 and use them. A
    group without any training clips uses the meta-learned initialisation, and a warning names it.
    """
    z = z.float()
    head = attention_head(state)
    fused, weights, _ = _features(head, z, machine, section, domain, state.num_machines)
    maml = _maml(state)
    init = {k: v.detach() for k, v in maml.params().items()}
    adapted = state.adapted
    groups = group_ids(section, domain)
    meta = torch.zeros(len(z), dtype=torch.float32)
    missing = []
    for g in torch.unique(groups).tolist():
        rows = groups == g
        s, d = divmod(int(g), NUM_DOMAINS)
        if g in adapted:
            ways = [(d, adapted[g])]
        elif d == 2 and any(s * NUM_DOMAINS + k in adapted for k in (0, 1)):
            ways = [(k, adapted[s * NUM_DOMAINS + k]) for k in (0, 1) if s * NUM_DOMAINS + k in adapted]
        else:
            missing.append(g)
            ways = [(d, init)]
        for as_domain, params in ways:
            _, _, x = _features(
                head,
                z[rows],
                machine[rows],
                section[rows],
                torch.full_like(domain[rows], as_domain),
                state.num_machines,
            )
            meta[rows] += maml.score(params, x).float() / len(ways)
    if missing:
        names = ", ".join(f"section id {g // NUM_DOMAINS} domain {g % NUM_DOMAINS}" for g in missing)
        log.warning("meta-learner: no training clips of %s: scored without adaptation", names)
    return {"attention": fused.detach(), "meta": meta, "weights": weights.detach()}


def held_out_meta_scores(
    state: FusionState,
    z: Tensor,
    machine: Tensor,
    section: Tensor,
    domain: Tensor,
    y: Tensor,
    source: Tensor,
    query_z: Tensor | None = None,
) -> Tensor:
    """Meta scores of the training normals, each from an adaptation that left it out.

    The adapted classifiers saw every training normal of their group, so their scores of those
    clips are optimistic; a decision threshold fitted on them would flag too many test normals.
    Here each normal clip i is scored after adapting on its group minus clip i and minus the
    pseudo-anomalies made from it (`source` (N,) is the normal row each row came from). A group
    left with one class only still adapts on it; one left empty uses the initialisation.
    `query_z` (normals, M), when given, are the z-scores the left-out clips are scored with
    (z-scores normalised without the clip itself; `z` keeps the ones the fusion trained on).
    """
    head = attention_head(state)
    _, _, x = _features(head, z.float(), machine, section, domain, state.num_machines)
    normals = torch.nonzero(y == 0).flatten()
    query = x.clone()
    if query_z is not None:
        n = normals
        query[n] = _features(head, query_z.float(), machine[n], section[n], domain[n], state.num_machines)[2]
    maml = _maml(state)
    init = {k: v.detach() for k, v in maml.params().items()}
    steps = state.meta_args["test_steps"]
    groups = group_ids(section, domain)
    out = torch.empty(len(normals), dtype=torch.float32)
    for j, i in enumerate(normals.tolist()):
        keep = (groups == groups[i]) & (source != i) & (torch.arange(len(y)) != i)
        if keep.any():
            params = maml.adapt(init, x[keep], y[keep], steps=steps)  # classes weigh equally
        else:
            params = init
        out[j] = maml.score({k: v.detach() for k, v in params.items()}, query[i : i + 1]).float()[0]
    return out


def weights_table(state: FusionState, keys: Tensor, weights: Tensor, names: list[str]) -> list[dict]:
    """Rows `{group, member: weight...}` for CSV/markdown; `names` are '<machine>/section_<XX>' per id."""
    domains = ("source", "target", "unknown")
    rows = []
    for (machine, section, domain), w in zip(keys.tolist(), weights.tolist(), strict=True):
        del machine  # the section name carries it
        row = {"group": f"{names[section]} {domains[domain]}"}
        row.update({m: float(v) for m, v in zip(state.members, w, strict=True)})
        rows.append(row)
    return rows


def summarise_kinds(kinds: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    """How many pseudo-anomalies of each kind (-1 = none, a normal copy) were made."""
    out: dict[str, int] = {}
    for k in kinds.tolist():
        name = "none" if k < 0 else names[k]
        out[name] = out.get(name, 0) + 1
    return out
