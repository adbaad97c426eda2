"""One path from audio to scores and decisions, used by the run's stages and by `tools/score.py`.

`infer` runs any function of a batch over a dataset of batch dicts, sharded across DDP ranks and
gathered back in clip order. `member_scores` is every member's score columns for one batch, and
`predict` puts them together with a `Calibration`: raw scores -> z-scores -> fusions -> final ->
decision. The predict stage calls `predict` on the test split; `tools/score.py` calls it on a
dataset of the files it is given, with the run's batch size, so the same clips in the same
batches give the same numbers. On a GPU, inference runs under autocast (bf16 where the GPU has it,
else fp16; `inference_autocast`), the members' outputs gathered as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from asd.calibration import CONTEXT, Calibration
from asd.data.datamodule import ClipDataset
from asd.data.windows import ClipWindows, Windowing, mean_over_windows
from asd.ensemble import Ensemble, is_reference
from asd.run.distributed import distributed, gather_by_index, is_rank_zero
from asd.run.progress import show_progress


def inference_autocast(device: torch.device) -> AbstractContextManager:
    """Mixed precision for inference on a GPU (bf16 where it computes in bf16, else fp16); none elsewhere."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def infer(
    fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    dataset: Dataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    what: str = "",
    windowing: Windowing | None = None,
    per_window: bool = False,
    check: Callable[[dict[str, Tensor]], None] | None = None,
) -> dict[str, np.ndarray]:
    """`fn` over a whole dataset of batch dicts: arrays keyed like its output, one row per clip in order.

    With `windowing`, `fn` sees every window of each clip (`asd.data.windows`) and a clip's row is
    the mean of its windows' rows; `per_window` keeps one row per window instead (clip-major).
    `check` sees each batch before it moves to `device` (`Ensemble.check_ids`).
    """
    if windowing is not None:
        rows = infer(fn, ClipWindows(dataset, windowing), device, batch_size, num_workers, what, check=check)
        return rows if per_window else mean_over_windows(rows, windowing.per_clip)
    from tqdm.auto import tqdm

    what = what or type(dataset).__name__
    sampler = DistributedSampler(dataset, shuffle=False) if distributed() else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    chunks: dict[str, list[np.ndarray]] = {}
    bar = tqdm(loader, desc=f"scoring {what}", leave=False, disable=not (show_progress() and is_rank_zero()))
    with torch.no_grad(), inference_autocast(device):
        for batch in bar:
            if check is not None:
                check(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = fn(batch)
            out["index"] = batch["index"]
            for k, v in out.items():
                chunks.setdefault(k, []).append(
                    v.detach().float().cpu().numpy() if k != "index" else v.cpu().numpy()
                )
    local = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}
    return gather_by_index(local, len(dataset), what)


def member_scores(ensemble: Ensemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every score column of every member for one batch: `bN`, or `bN_<kind>` for several."""
    out: dict[str, Tensor] = {}
    ensemble.prime(batch)
    batch = ensemble.with_flow_input(batch)
    for name, member in ensemble.members.items():
        for kind, s in member.scores(batch).items():
            out[f"{name}_{kind}" if kind else name] = s
    return out


def member_embeddings(ensemble: Ensemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each member's embedding (B, D) for one batch; members without one (embed_dim 0) are left out."""
    ensemble.prime(batch)
    return {name: m.embed(batch) for name, m in ensemble.members.items() if m.embed_dim > 0}


def context_of(dataset: ClipDataset) -> dict[str, Tensor]:
    """Each clip's context ids (never its label): what calibration and backends read."""
    return {k: dataset.labels[k].clone() for k in (*CONTEXT, "attribute")}


def predict(
    ensemble: Ensemble,
    calibration: Calibration,
    dataset: ClipDataset,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    what: str = "",
    windowing: Windowing | None = None,
    copies: Sequence[Ensemble] = (),
) -> dict[str, np.ndarray]:
    """Every column of every clip: raw member scores (over its windows), fusions, `final`, `decision`.

    `copies`: a cross-fitted run's k copies (`asd.run.crossfit.load_copies`); the fused columns
    (those the calibration reads) are then the mean of the copies' scores, the others the
    ensemble's own; a fused reference's own column is reported, its copies' mean only fused.
    """
    raw = infer(
        lambda b: member_scores(ensemble, b),
        dataset,
        device,
        batch_size,
        num_workers,
        what,
        windowing,
        check=ensemble.check_ids,
    )
    # a fused reference column is still reported as the run's own reference computes it, the same
    # column as in a run that does not fuse it; the fusions read the copies' mean
    own = (
        {c: raw[c] for c in calibration.members if is_reference(c) and c != calibration.final}
        if copies
        else {}
    )
    if copies:
        bagged = []
        for i, e in enumerate(copies):  # one copy on the device at a time
            e.to(device)
            bagged.append(
                infer(
                    lambda b, e=e: member_scores(e, b),
                    dataset,
                    device,
                    batch_size,
                    num_workers,
                    f"{what} (cross-fitted copy {i + 1}/{len(copies)})",
                    windowing,
                    check=e.check_ids,
                )
            )
            e.to("cpu")
        raw.update({c: np.mean([r[c] for r in bagged], axis=0) for c in calibration.members})
    context = context_of(dataset)
    columns = calibration.combine(raw, context)
    columns.update(own)
    columns["decision"] = calibration.decide(columns["final"], context["section"])
    return columns
