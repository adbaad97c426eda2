"""Fusion stage at DCASE 2023 development-set scale, on CPU: how long the learned fusions take.

    python benchmarks/bench_fusion.py [--copies 8] [--repeats 3]

Random z-scores stand in for the members' scores (the members' own scoring of the pseudo-
anomalies is what `bench_train.py`'s real-time factor measures). Scale: 7 machines x 1 section,
990 source and 10 target training clips each, 10 % held out (99 + 1 per machine), `copies`
pseudo-anomalies per held-out clip, 5 members. Each step is timed beside its obvious
alternative: meta-training with `vmap` over tasks against a loop, the left-out threshold z-scores
in closed form against one normaliser refit per clip (and the largest difference between the
two), and left-out threshold scores against in-sample ones (what they cost for calibrated
thresholds). Writes
benchmarks/results/bench_fusion.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from timing import best_times, environment, write_result

from asd.calibration import Calibration, fit_normalizers, left_out_z
from asd.errors import AsdError
from asd.fusion.stage import apply_fusion, fit_fusion, held_out_meta_scores
from asd.scoring import GroupNormalizer

MACHINES, MEMBERS = 7, 5
CFG = {
    "seed": 0,
    "attention": {"hidden": 16, "context_dim": 4, "epochs": 300, "lr": 0.01, "weight_decay": 1e-4},
    "meta": {
        "hidden": 16,
        "inner_lr": 0.1,
        "inner_steps": 3,
        "test_steps": 3,
        "first_order": False,
        "vmap": True,
        "meta_steps": 200,
        "meta_lr": 3e-3,
        "support_fraction": 0.5,
    },
}


def left_out_z_by_refits(calibration: Calibration, context: dict) -> torch.Tensor:
    """`left_out_z` the obvious way: one `GroupNormalizer.fit` per clip and member."""
    out = calibration.normalise({m: v.numpy() for m, v in calibration.reference_scores.items()}, context)
    section, domain = context["section"], context["domain"]
    for i in range(len(section)):
        keep = torch.arange(len(section)) != i
        if not (section[keep] == section[i]).any():
            continue
        for j, member in enumerate(calibration.members):
            x = calibration.reference_scores[member]
            try:
                norm = GroupNormalizer(calibration.shrinkage).fit(
                    x[keep], section[keep], domain[keep], warn=False
                )
            except AsdError:
                continue
            out[i, j] = norm.transform(x[i : i + 1], section[i : i + 1], domain[i : i + 1])[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="pseudo-anomalies per held-out clip")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_fusion.json")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the one-target-clip groups' fallback warnings, 700 times

    gen = torch.Generator().manual_seed(0)
    section = torch.arange(MACHINES).repeat_interleave(100)  # (700,) 99 source + 1 target each
    domain = torch.tensor([0] * 99 + [1]).repeat(MACHINES)
    machine, n = section.clone(), len(section)
    raw = {f"m{j}": torch.rand(n, generator=gen).double().numpy() for j in range(MEMBERS)}
    meta = {"machine": machine, "section": section, "domain": domain}
    calibration = Calibration(
        members=list(raw),
        normalizers=fit_normalizers(raw, list(raw), meta),
        reference_scores={c: torch.as_tensor(v) for c, v in raw.items()},
        normalised_on="held-out",
    )
    source = torch.arange(n * args.copies) // args.copies
    z = torch.cat(
        [torch.randn(n, MEMBERS, generator=gen), torch.randn(n * args.copies, MEMBERS, generator=gen) + 2]
    )
    y = torch.cat([torch.zeros(n), torch.ones(n * args.copies)])
    ctx = [torch.cat([x, x[source]]) for x in (machine, section, domain)]
    rows_source = torch.cat([torch.arange(n), source])
    test = 200 * MACHINES  # the 2023 dev test set: 200 clips per machine
    q, q_ids = torch.randn(test, MEMBERS, generator=gen), torch.arange(test) % MACHINES

    state = fit_fusion(z, *ctx, y, members=list(raw), num_machines=MACHINES, num_sections=MACHINES, cfg=CFG)
    loo = left_out_z(calibration, meta)
    refits = left_out_z_by_refits(calibration, meta)
    largest_difference = float((loo - refits).abs().max())
    print(f"left-out z-scores, closed form vs refits: largest difference {largest_difference:.2e}")
    loop_cfg = {**CFG, "meta": {**CFG["meta"], "vmap": False}}
    sizes = {"members": list(raw), "num_machines": MACHINES, "num_sections": MACHINES}
    pairs = {  # what the fusion stage does vs the obvious alternative, timed in turns
        "fit attention + MAML + adapt groups: vmap vs loop over tasks": (
            lambda: fit_fusion(z, *ctx, y, **sizes, cfg=CFG),
            lambda: fit_fusion(z, *ctx, y, **sizes, cfg=loop_cfg),
        ),
        "threshold z-scores: left-out in closed form vs one refit per clip": (
            lambda: left_out_z(calibration, meta),
            lambda: left_out_z_by_refits(calibration, meta),
        ),
        "threshold z-scores: left-out vs in-sample": (
            lambda: left_out_z(calibration, meta),
            lambda: calibration.normalise(raw, meta),
        ),
        "threshold meta scores: left-out vs in-sample": (
            lambda: held_out_meta_scores(state, z, *ctx, y, rows_source, query_z=loo),
            lambda: apply_fusion(state, loo, machine, section, domain),
        ),
    }
    rows = []
    print(f"{'what':<66} {'ours s':>8} {'other s':>8} {'ratio':>7}")
    for name, (ours, other) in pairs.items():
        (t_ours, t_other), _ = best_times([ours, other], args.repeats)
        rows.append({"what": name, "ours_s": t_ours, "other_s": t_other, "ours_over_other": t_ours / t_other})
        print(f"{name:<66} {t_ours:>8.3f} {t_other:>8.3f} {t_ours / t_other:>7.1f}")
    (t_apply,), _ = best_times(
        [lambda: apply_fusion(state, q, q_ids, q_ids, torch.arange(test) % 2)], args.repeats
    )
    print(f"apply both learned fusions to {test} test clips: {t_apply:.3f} s")
    result = {
        "what": "fusion stage on CPU at DCASE 2023 dev scale (random z-scores; members' scoring excluded)",
        "held_out_clips": n,
        "pseudo_anomalies": n * args.copies,
        "tasks": len(state.adapted),
        **environment(torch.device("cpu")),
        "cases": rows,
        "left_out_closed_form_vs_refits_max_abs_diff": largest_difference,
        "apply_test_clips_s": t_apply,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
