"""Rank handling for DDP runs, in one place: who speaks, who writes, how whole splits are gathered.

Every rank computes its shard of a split; whole-split results are gathered on every rank
(`gather_by_index`), so each rank holds the same numbers and fits the same state. Only rank 0
writes files and logs (`quiet_other_ranks`). Without an initialised process group every helper
is the single-process identity.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from asd.errors import AsdError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    return not distributed() or dist.get_rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def sync_from_rank_zero(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers.

    DDP broadcasts buffers only at the start of each forward, so after the last training step
    every rank holds its own BatchNorm/normalisation statistics; inference must use one model.
    """
    if distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def quiet_other_ranks() -> None:
    """One copy of every message: rank 0 speaks for all."""
    if not is_rank_zero():
        logging.getLogger("asd").setLevel(logging.ERROR)


def gather_by_index(local: dict[str, np.ndarray], expected: int, what: str) -> dict[str, np.ndarray]:
    """Every rank's rows of a split, in clip order, each clip once.

    `local["index"]` is each row's clip index. A distributed sampler pads the last shard with
    repeats of the first clips, so duplicates are dropped; a missing clip is an internal error.
    """
    if distributed():
        gathered: list[dict[str, np.ndarray]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        local = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in local}
    if not local:
        return {}
    index, first = np.unique(local["index"], return_index=True)
    if len(index) != expected:
        raise AsdError(f"internal: inference over {what} returned {len(index)} of {expected} clips")
    return {k: v[first] for k, v in local.items()}
