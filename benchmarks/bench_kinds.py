"""Which anomaly kinds each method hears, on finished runs over the built-in synthetic data (no training).

    python benchmarks/bench_kinds.py RUN_DIR [RUN_DIR ...] [--methods b2 stats_temporal final]
        [--name bench_kinds]

The synthetic generator writes `anomaly_kinds.csv` beside its clips: the kind of every test
anomaly (a bearing tone, clicks, a leak...; `asd.data.synthetic.ANOMALY_KINDS`). For each run
folder's `scores.csv` and each method (every score column the run reports unless `--methods`),
each kind's AUC: that kind's anomalies against the normals of the same machine, section and
domain, averaged over those groups (`bench_statistics.kind_aucs`, the measure of the clip
statistics' per-kind tables, so the two read alike); and the run's official score. A kind is
heard when its AUC is well above 0.5; the official score of a method is bounded by the kinds it
does not hear. Run folders of one configuration over several seeds give the spread: prints mean ±
sample std over the runs and writes `benchmarks/results/<name>.{md,json}`.

With the default 10 test clips per class, each group holds 2 anomalies of a kind, so a single
run's per-kind AUC moves by tenths; runs with `data.synthetic.test_per_class=100` (20 per kind
and group) are the ones to read.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_statistics import kind_aucs  # noqa: E402
from bench_zscores import read_scores  # noqa: E402
from timing import write_tables  # noqa: E402

from asd.data.synthetic import KINDS_FILE  # noqa: E402
from asd.errors import AsdError  # noqa: E402
from asd.evaluation import evaluate  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: columns of scores.csv that are not a method's score
NOT_SCORES = ("file", "machine", "section", "domain", "label", "path", "decision")


def kinds_of(run_dir: Path, paths: list[str]) -> np.ndarray:
    """The anomaly kind of every test clip ("none" for normals), from the `anomaly_kinds.csv` of the
    synthetic dataset the clips were read from (its root holds `<machine>/test/<file>`)."""
    table: dict[str, str] = {}
    for root in sorted({str(Path(p).parents[2]) for p in paths}):
        kinds_file = Path(root) / KINDS_FILE
        if not kinds_file.is_file():
            raise AsdError(
                f"{run_dir}: no {KINDS_FILE} in {root}, the folder its test clips were read from; per-kind "
                "AUCs need runs on the built-in synthetic data (data=synthetic), whose dataset is still there"
            )
        with open(kinds_file, newline="") as f:
            table.update({str(Path(root) / r["file_name"]): r["kind"] for r in csv.DictReader(f)})
    missing = [p for p in paths if p not in table]
    if missing:
        raise AsdError(
            f"{run_dir}: {len(missing)} test clip(s) not in their dataset's {KINDS_FILE}, e.g. {missing[0]}; "
            "the dataset was regenerated since the run: run it again"
        )
    return np.array([table[p] for p in paths])


def run_measures(run_dir: Path, methods: list[str] | None) -> dict:
    """Per method: the official score and each kind's AUC, for one run folder."""
    if not (run_dir / "scores.csv").is_file():
        raise AsdError(f"{run_dir}: no scores.csv; give finished run folders (train.py's run_dir)")
    clips, rows = read_scores(run_dir)
    if not rows:
        raise AsdError(f"{run_dir / 'scores.csv'}: no scored clips")
    columns = [c for c in rows[0] if c not in NOT_SCORES]
    methods = methods or columns
    missing = [m for m in methods if m not in columns]
    if missing:
        raise AsdError(f"{run_dir / 'scores.csv'}: no column {missing}; it has {columns}")
    kinds = kinds_of(run_dir, [c.path for c in clips])
    y = np.array([int(c.label == "anomaly") for c in clips])
    if (kinds[y == 1] == "none").any() or (kinds[y == 0] != "none").any():
        raise AsdError(f"{run_dir}: the labels in scores.csv disagree with {KINDS_FILE}; run it again")
    groups = sorted({(c.machine, c.section, c.domain) for c in clips})
    group = np.array([groups.index((c.machine, c.section, c.domain)) for c in clips])
    out = {}
    for m in methods:
        x = np.array([float(r[m]) for r in rows])
        out[m] = {"official": evaluate(clips, x).official, "kinds": kind_aucs(x, kinds, y, group)}
    return out


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def table(runs: list[dict]) -> str:
    methods = list(runs[0]["measures"])
    kinds = sorted({k for r in runs for m in r["measures"].values() for k in m["kinds"]})
    lines = [
        "| method | official | " + " | ".join(kinds) + " |",
        "| --- | --- | " + " | ".join("---" for _ in kinds) + " |",
    ]
    for m in methods:
        cells = [mean_std([r["measures"][m]["official"] for r in runs])]
        for k in kinds:
            values = [r["measures"][m]["kinds"][k] for r in runs if k in r["measures"][m]["kinds"]]
            cells.append(mean_std(values) if values else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders on synthetic data")
    parser.add_argument("--methods", nargs="+", help="score columns (default: every one the runs report)")
    parser.add_argument("--name", default="bench_kinds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = [{"run": str(run), "measures": run_measures(run, args.methods)} for run in args.runs]
    methods = [list(r["measures"]) for r in runs]
    if any(m != methods[0] for m in methods):
        raise AsdError("the runs report different score columns; give --methods that all of them have")
    text = (
        f"# Official score and AUC per anomaly kind ({len(runs)} runs)\n\n"
        "Each kind's anomalies against the normals of their machine, section and domain, averaged over "
        "those groups; official: DCASE 2023 score. Mean ± sample std over runs.\n\n"
        f"{table(runs)}\n"
    )
    result = {"runs": runs}
    write_tables(args.results, args.name, result, [text])
    return result


if __name__ == "__main__":
    try:
        main()
    except AsdError as e:
        sys.exit(f"error: {e}")
