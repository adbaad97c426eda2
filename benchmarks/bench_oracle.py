"""What the members could add to the fused reference at best, on finished runs (reads test labels).

    python benchmarks/bench_oracle.py RUN_DIR [RUN_DIR ...] [--shares 0 0.1 ... 1] [--name bench_oracle]

For each run folder (`scores.csv`, `calibration.pt`, and `checkpoints/final.ckpt` for the order of
its sections) and its fused columns (the members and references `calibration.pt` names), the
official DCASE score (`asd.evaluation.evaluate`) of:

- `final`: the run's own final score, as `scores.csv` has it;
- `run`: `zweighted` recomputed from the columns with the run's own normalisation and weights
  (`Calibration.normalise`, `calibration.weights`). It equals `final` where the run decided on
  `zweighted` and did not cross-fit: a check that the run is read as it was fused. A cross-fitted
  run fused its copies' mean of a reference column, while `scores.csv` reports the reference's own
  column, so there the two differ (`reproduces` says which);
- `reference`: the fused reference columns alone (their mean z-score), the run's normalisation;
- the **oracle**: every column z-scored per machine/section/domain with that group's *test
  normals'* own mean and sample std (softly limited as the run limits z-scores), which places
  every domain of every column as well as any normalisation could. `oracle reference` is the
  reference columns alone, `oracle members` the members alone with the run's weights among them,
  and `oracle best` the highest score over mixes `share * reference + (1 - share) * members` for
  each `--shares` value, the members weighed equally or with the run's weights: the share and the
  weighting that reached it are in the JSON.

`oracle best - oracle reference` bounds what the members can add to the reference, whatever their
weights and normalisation: the mix is chosen with the test labels. It is not a method. A column
that moves nothing inside a domain adds nothing here either.

Prints a table (mean ± sample std over the runs, and every run) and writes
`benchmarks/results/<name>.{md,json}`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_zscores import read_scores  # noqa: E402
from timing import write_tables  # noqa: E402

from asd.calibration import Calibration  # noqa: E402
from asd.data.table import DOMAIN_IDS  # noqa: E402
from asd.errors import AsdError  # noqa: E402
from asd.evaluation import evaluate  # noqa: E402
from asd.members import REFERENCES  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARES = tuple(round(0.1 * i, 1) for i in range(11))
MEASURES = ("final", "run", "reference", "oracle reference", "oracle members", "oracle best")


def oracle_z(raw: np.ndarray, groups: np.ndarray, normal: np.ndarray, where: str) -> np.ndarray:
    """(N, C) columns z-scored per group with the group's normal rows' mean and sample std."""
    z = np.empty_like(raw, dtype=np.float64)
    for g in np.unique(groups):
        mine = groups == g
        ref = raw[mine & normal]
        if ref.shape[0] < 2:
            raise AsdError(
                f"{where}: group {g} has {ref.shape[0]} normal test clip(s); the oracle needs 2 or more"
            )
        std = ref.std(axis=0, ddof=1)
        std[std == 0] = 1.0  # a column constant over a group's normals keeps its offset only
        z[mine] = (raw[mine] - ref.mean(axis=0)) / std
    return z


def weightings(weights: np.ndarray) -> dict[str, np.ndarray]:
    """The members' weightings the mix tries, each summing to 1: equal, and the run's own `weights`
    (M,) (any scale) unless they are all zero."""
    out = {"equal": np.full(weights.shape[0], 1.0 / weights.shape[0])}
    if weights.sum() > 0:
        out["run"] = weights / weights.sum()
    return out


def best_mix(
    reference: np.ndarray, members: np.ndarray, weights: np.ndarray, shares: tuple[float, ...], score
) -> tuple[float, dict]:
    """The highest `score` of share * reference + (1 - share) * members over shares and `weightings`.

    `reference` (N,), `members` (N, M) z-scores, `weights` (M,) the run's member weights (any scale;
    all zero counts as equal). Returns the best score and where it was reached.
    """
    best, where = -np.inf, {}
    for name, w in weightings(weights).items():
        mixed_members = members @ w
        for share in shares:
            value = score(share * reference + (1.0 - share) * mixed_members)
            if value > best:
                best, where = value, {"share": share, "members": name}
    return float(best), where


def section_order(run_dir: Path) -> list[tuple[str, str]]:
    """The run's (machine, section) pairs in the order of its section ids (its checkpoint's facts)."""
    path = run_dir / "checkpoints" / "final.ckpt"
    try:
        facts = torch.load(path, map_location="cpu", weights_only=True)["asd_signature"]["facts"]
        return [tuple(k) for k in facts["sections"]]
    except FileNotFoundError:
        raise AsdError(
            f"{run_dir}: no checkpoints/final.ckpt; give run folders that train.py finished"
        ) from None
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise AsdError(f"{path}: not a readable asd checkpoint ({e})") from e


def run_row(run_dir: Path, shares: tuple[float, ...]) -> dict:
    clips, rows = read_scores(run_dir)
    if not (run_dir / "calibration.pt").is_file():
        raise AsdError(f"{run_dir}: no calibration.pt; the run fused nothing, so there is no mix to bound")
    calibration = Calibration.load(run_dir / "calibration.pt")
    members = [m for m in calibration.members if not m.startswith(REFERENCES)]
    refs = [m for m in calibration.members if m.startswith(REFERENCES)]
    if not members or not refs:
        raise AsdError(
            f"{run_dir}: the run fused {calibration.members}; this benchmark needs members and a reference"
        )
    order = {key: i for i, key in enumerate(section_order(run_dir))}
    context = {
        "machine": torch.zeros(len(clips), dtype=torch.long),
        "section": torch.tensor([order[(c.machine, c.section)] for c in clips]),
        "domain": torch.tensor([DOMAIN_IDS[c.domain] for c in clips]),
    }
    columns = calibration.members
    raw = np.stack([[float(r[m]) for r in rows] for m in columns], axis=1)  # (N, C)
    z = calibration.normalise({m: raw[:, j] for j, m in enumerate(columns)}, context).double().numpy()
    weights = np.array([calibration.weights.get(m, 0.0) for m in columns])

    def score(values: np.ndarray) -> float:
        return evaluate(clips, values).official

    groups = np.array([f"{c.machine}/{c.section}/{c.domain}" for c in clips])
    normal = np.array([c.label == "normal" for c in clips])
    zo = oracle_z(raw, groups, normal, str(run_dir))
    zo = calibration.limit(torch.as_tensor(zo)).numpy()
    ref_cols = [columns.index(m) for m in refs]
    mem_cols = [columns.index(m) for m in members]
    final = score(np.array([float(r["final"]) for r in rows]))
    run = score(z @ weights / weights.sum()) if weights.sum() > 0 else float("nan")
    tried = weightings(weights[mem_cols])
    mem_w = tried.get("run", tried["equal"])
    best, where = best_mix(zo[:, ref_cols].mean(axis=1), zo[:, mem_cols], weights[mem_cols], shares, score)
    return {
        "final": final,
        "run": run,
        "reproduces": bool(abs(run - final) < 1e-9),
        "reference": score(z[:, ref_cols].mean(axis=1)),
        "oracle reference": score(zo[:, ref_cols].mean(axis=1)),
        "oracle members": score(zo[:, mem_cols] @ mem_w),
        "oracle best": best,
        "best at": where,
        "members": members,
        "references": refs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders")
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    parser.add_argument("--name", default="bench_oracle")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not all(0.0 <= s <= 1.0 for s in args.shares):
        raise AsdError(f"--shares {args.shares}: each share of the reference must lie in [0, 1]")
    rows = {str(run): run_row(run, tuple(args.shares)) for run in args.runs}
    head = "| run | " + " | ".join(MEASURES) + " | best at | reproduces |"
    lines = [head, "| --- |" + " --- |" * (len(MEASURES) + 2)]
    for run, row in rows.items():
        at = f"share {row['best at']['share']:g}, {row['best at']['members']}"
        cells = " | ".join(f"{row[k]:.3f}" for k in MEASURES)
        lines.append(f"| {run} | {cells} | {at} | {'yes' if row['reproduces'] else 'no'} |")
    summary = {}
    for k in (*MEASURES, "added"):
        values = [r["oracle best"] - r["oracle reference"] if k == "added" else r[k] for r in rows.values()]
        summary[k] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    cells = " | ".join(f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" for k in MEASURES)
    lines.append(f"| mean ± std | {cells} | | |")
    added = summary["added"]
    text = (
        f"# What the members could add at best ({len(rows)} runs; benchmarks/bench_oracle.py)\n\n"
        "Official DCASE score. `oracle`: every fused column z-scored per machine/section/domain with its "
        "test normals' mean and std (reads test labels); `oracle best`: the best mix of the reference and "
        "the members over the shares, chosen with the test labels.\n\n"
        + "\n".join(lines)
        + f"\n\noracle best - oracle reference: {added['mean']:+.4f} ± {added['std']:.4f}\n"
    )
    result = {"shares": args.shares, "runs": rows, "summary": summary}
    write_tables(args.results, args.name, result, [text])
    return result


if __name__ == "__main__":
    try:
        main()
    except AsdError as e:
        sys.exit(f"error: {e}")
