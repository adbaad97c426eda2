"""Where each method's official score is lost: inside a domain, or between the domains (no training).

    python benchmarks/bench_domains.py RUN_DIR [RUN_DIR ...] [--methods b4 stats_mahalanobis final]
        [--name bench_domains]

The official DCASE score of 2022-2025 ranks each domain's normals against every anomaly of the
section, both domains' anomalies together. A method loses there in two ways: it does not tell a
domain's normals from that domain's anomalies, or it puts the two domains on different scales
(target normals above source anomalies, target anomalies below source normals). For each run
folder's `scores.csv` and each method, per machine/section and then averaged:

- `source`, `target`: AUC of the domain's normals against the same domain's anomalies (within);
- `shift`: AUC of the target normals against the source normals (0.5: the two domains' normals on
  one scale; above 0.5 the target normals score higher, below it lower);
- `official`: the run's official score of the method (`asd.evaluation.evaluate`, DCASE 2023);
- `aligned`: the official score after every section's target-domain scores are moved by the
  difference of its source and target normals' medians. It reads the test labels, so it is not a
  method: it bounds what any per-domain offset, however it were estimated, could add.

Prints a table of mean ± sample std over the runs and writes `benchmarks/results/<name>.{md,json}`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_zscores import read_scores  # noqa: E402
from timing import write_tables  # noqa: E402

from asd.errors import AsdError  # noqa: E402
from asd.evaluation import evaluate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MEASURES = ("source", "target", "shift", "official", "aligned")
#: the methods of the table when --methods is not given: the best members, the reference, the fusions
DEFAULT_METHODS = ("b2", "b4", "stats_mahalanobis", "zmean", "zweighted", "final")


def auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """AUC of `positives` scoring above `negatives` (ties count half), sklearn's."""
    y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    return float(roc_auc_score(y, np.r_[negatives, positives]))


def run_measures(run_dir: Path, methods: list[str]) -> dict[str, dict[str, float]]:
    """Every measure of every method in one run folder."""
    clips, rows = read_scores(run_dir)
    if not rows:
        raise AsdError(
            f"{run_dir / 'scores.csv'}: no scored clips (a run without test clips has nothing to rank)"
        )
    missing = [m for m in methods if m not in rows[0]]
    if missing:
        raise AsdError(f"{run_dir / 'scores.csv'}: no column {missing}; it has {list(rows[0])[6:]}")
    machine_section = np.array([f"{c.machine}/{c.section}" for c in clips])
    anomaly = np.array([c.label == "anomaly" for c in clips])
    target = np.array([c.domain == "target" for c in clips])
    out = {}
    for method in methods:
        x = np.array([float(r[method]) for r in rows])
        aligned = x.copy()
        per_section = []
        for key in sorted(set(machine_section)):
            mine = machine_section == key
            sn, tn = mine & ~target & ~anomaly, mine & target & ~anomaly
            sa, ta = mine & ~target & anomaly, mine & target & anomaly
            if not (sn.any() and tn.any() and sa.any() and ta.any()):
                raise AsdError(
                    f"{run_dir}: {key} lacks normals or anomalies of a domain; this benchmark needs both "
                    "domains' normals and anomalies in every section"
                )
            per_section.append((auc(x[sn], x[sa]), auc(x[tn], x[ta]), auc(x[sn], x[tn])))
            aligned[mine & target] += np.median(x[sn]) - np.median(x[tn])
        source, target_auc, shift = np.mean(per_section, axis=0)
        out[method] = {
            "source": float(source),
            "target": float(target_auc),
            "shift": float(shift),
            "official": evaluate(clips, x).official,
            "aligned": evaluate(clips, aligned).official,
        }
    return out


def table(runs: list[dict], methods: list[str]) -> str:
    lines = [
        "| method | " + " | ".join(MEASURES) + " |",
        "| --- | " + " | ".join("---" for _ in MEASURES) + " |",
    ]
    for m in methods:
        cells = []
        for k in MEASURES:
            values = [r["measures"][m][k] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (each with scores.csv)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--name", default="bench_domains")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "scores.csv").is_file():
            raise AsdError(f"{run}: no scores.csv; give finished run folders (train.py's run_dir)")
    runs = [{"run": str(run), "measures": run_measures(run, args.methods)} for run in args.runs]
    text = (
        f"# Within-domain and cross-domain ranking ({len(runs)} runs)\n\n"
        "source/target: AUC within the domain; shift: AUC of target normals over source normals; "
        "official: DCASE 2023 score; aligned: official after moving each section's target scores by "
        "the normals' median difference (an oracle: reads test labels). Mean ± sample std over runs.\n\n"
        f"{table(runs, args.methods)}\n"
    )
    result = {"methods": args.methods, "runs": runs}
    write_tables(args.results, args.name, result, [text])
    return result


if __name__ == "__main__":
    try:
        main()
    except AsdError as e:
        sys.exit(f"error: {e}")
