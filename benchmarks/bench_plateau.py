"""Do the members' validation losses reach a plateau? Read from finished runs' logs, over seeds.

    python benchmarks/bench_quality.py --configs synthetic-default --out /tmp/bq   # the runs
    python benchmarks/bench_plateau.py /tmp/bq                                       # this report
    python benchmarks/bench_plateau.py /tmp/bq --name bench_plateau_60_epochs

For every run folder `<runs>/<config>/seed<S>` (the layout `bench_quality.py --out` writes) it
reads `logs/version_*/metrics.csv`, each member's `val/<member>/loss` per epoch, and reports:

  drop      the validation loss's total improvement, first epoch minus the lowest
  late      the share of that drop still made in the last 30 % of the epochs: the lowest loss of
            the first 70 % minus the overall lowest, over the drop (0 = nothing left to gain,
            a loss that rose in the end counts 0)
  best      the epoch of the lowest loss (the last epoch: still improving)

A member counts as on a plateau in a run when `late` is below `--late` (default 0.1: less than a
tenth of its improvement came in the last 30 % of training). Per configuration and member: how
many runs plateaued, and the mean `late`. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when loaded by path
from timing import write_tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LATE_SHARE = 0.3  # the last 30 % of the epochs
VAL = re.compile(r"^val/(\w+)/loss$")


def val_curves(run_dir: Path) -> dict[str, list[float]]:
    """member -> validation loss per epoch, in epoch order, from every `logs/version_*/metrics.csv`."""
    per_epoch: dict[str, dict[int, float]] = {}
    for metrics in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    found = VAL.match(key or "")
                    if found and value not in ("", None):
                        per_epoch.setdefault(found.group(1), {})[int(row["epoch"])] = float(value)
    return {m: [v for _, v in sorted(by_epoch.items())] for m, by_epoch in per_epoch.items()}


def plateau(losses: list[float]) -> dict[str, float | int] | None:
    """`drop`, `late` and `best` of one validation curve; None with fewer than 3 epochs or a constant
    loss (a member with nothing to train, such as the training-free `stats`)."""
    if len(losses) < 3 or not all(math.isfinite(v) for v in losses) or len(set(losses)) == 1:
        return None
    cut = max(1, math.ceil(len(losses) * (1 - LATE_SHARE)))
    lowest = min(losses)
    drop = losses[0] - lowest
    late = (min(losses[:cut]) - lowest) / drop if drop > 0 else 0.0
    return {"epochs": len(losses), "drop": drop, "late": late, "best": losses.index(lowest)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", type=Path, help="a bench_quality.py --out folder: <config>/seed<S>/ run folders"
    )
    parser.add_argument("--late", type=float, default=0.1, help="largest late share that counts as a plateau")
    parser.add_argument("--name", default="bench_plateau", help="result files' name")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where <name>.{json,md} go")
    args = parser.parse_args()

    table: dict[str, dict[str, list[dict]]] = {}
    for run_dir in sorted(args.runs.glob("*/seed*")):
        if not run_dir.is_dir():
            continue
        for member, losses in val_curves(run_dir).items():
            found = plateau(losses)
            if found is not None:
                found["seed"] = run_dir.name
                table.setdefault(run_dir.parent.name, {}).setdefault(member, []).append(found)
    if not table:
        raise SystemExit(f"error: no validation curves under {args.runs}/<config>/seed*/logs/")

    rule = (
        f"less than {args.late:.0%} of its validation-loss drop came in its last {LATE_SHARE:.0%} of epochs"
    )
    lines = [
        f"# Validation-loss plateaus ({args.runs})",
        "",
        f"A run counts as on a plateau when {rule}.",
        "",
    ]
    summary = {}
    for config, members in table.items():
        lines += [
            f"## {config}",
            "",
            "| member | epochs | plateaued runs | mean late share | best epoch per seed |",
            "| --- | --- | --- | --- | --- |",
        ]
        for member, runs in members.items():
            flat = sum(r["late"] < args.late for r in runs)
            mean_late = statistics.fmean(r["late"] for r in runs)
            summary.setdefault(config, {})[member] = {
                "plateaued": flat,
                "runs": len(runs),
                "mean_late": mean_late,
            }
            best = ", ".join(f"{r['best']}" for r in runs)
            lines.append(
                f"| {member} | {runs[0]['epochs']} | {flat}/{len(runs)} | {mean_late:.2f} | {best} |"
            )
        lines.append("")
    result = {"runs": str(args.runs), "late_threshold": args.late, "late_share": LATE_SHARE, "table": table}
    result["summary"] = summary
    write_tables(args.results, args.name, result, lines)


if __name__ == "__main__":
    main()
