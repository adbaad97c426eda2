"""Ranking and decisions of finished runs, side by side: official score, TPR and TNR of `final`.

    python benchmarks/bench_quality.py --configs first-shot --out /tmp/cf                          # the runs
    python benchmarks/bench_quality.py --configs first-shot --out /tmp/ho --extra crossfit.folds=0
    python benchmarks/bench_decisions.py cross-fitted=/tmp/cf held-out=/tmp/ho --name bench_decisions

Each `LABEL=DIR` is a `bench_quality.py --out` folder (`<config>/seed<S>/` run folders). From every
run it reads `summary.md` (which method is `final`), `metrics.csv` (that method's official score
and the TPR/TNR of its decisions over every test clip) and `.hydra/config.yaml`
(`threshold_percentile`, the share of normals its thresholds are meant to pass). The official
score measures the ranking; TNR against `threshold_percentile` measures whether the thresholds
were set where they were meant to be (a threshold fitted on too few or on optimistic normal
scores lands far from it). Per label and configuration: every seed, the mean and sample std
(n - 1), and the mean distance |TNR - threshold_percentile|. With `--baseline LABEL`, each other
label's official score is also compared with that label's seed by seed (`paired`): the mean and
sample std of the differences over the seeds both hold, how many are higher, lower and equal, and
"noise" where the mean difference lies within one std of them (as bench_quality.py judges).
Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when loaded by path
from timing import write_tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def final_method(run_dir: Path) -> str:
    """The method the run's summary names as `final`."""
    for line in (run_dir / "summary.md").read_text().splitlines():
        if line.startswith("- final score: `"):
            return line.split("`")[1]
    raise ValueError(f"{run_dir / 'summary.md'}: no '- final score:' line")


def threshold_percentile(run_dir: Path) -> float:
    """`threshold_percentile` of the run's resolved config (a top-level key, one line)."""
    for line in (run_dir / ".hydra" / "config.yaml").read_text().splitlines():
        if line.startswith("threshold_percentile:"):
            return float(line.split(":", 1)[1])
    raise ValueError(f"{run_dir / '.hydra' / 'config.yaml'}: no threshold_percentile")


def read_run(run_dir: Path) -> dict[str, float | str]:
    """Official score of `final`, and TPR/TNR of its decisions over every test clip, of one run."""
    final = final_method(run_dir)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == final]
    overall = [r for r in rows if r["machine"] == "all" and r["section"] == "all"]
    decided = [r for r in overall if r["tnr"]]
    scored = [r for r in overall if r["official"]]
    if not decided or not scored:
        raise ValueError(f"{run_dir / 'metrics.csv'}: no overall row of {final} with official score and TNR")
    return {
        "final": final,
        "official": float(scored[0]["official"]),
        "tpr": float(decided[0]["tpr"]),
        "tnr": float(decided[0]["tnr"]),
        "percentile": threshold_percentile(run_dir),
    }


def summarise(runs: list[dict]) -> dict[str, float]:
    """Mean (and std for the official score) over seeds; the mean distance of TNR from its aim."""

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    official = [r["official"] for r in runs]
    return {
        "official_mean": statistics.fmean(official),
        "official_std": std(official),
        "tpr_mean": statistics.fmean(r["tpr"] for r in runs),
        "tnr_mean": statistics.fmean(r["tnr"] for r in runs),
        "tnr_error": statistics.fmean(abs(r["tnr"] - r["percentile"]) for r in runs),
    }


def paired(runs: list[dict], base: list[dict]) -> dict[str, float | int | str] | None:
    """`runs`' official scores minus `base`'s, seed by seed over the seeds both hold; None if none."""
    by_seed = {r["seed"]: r["official"] for r in base}
    diffs = [r["official"] - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {
        "n": len(diffs),
        "diff_mean": mean,
        "diff_std": std,
        "higher": sum(d > 0 for d in diffs),
        "lower": sum(d < 0 for d in diffs),
        "equal": sum(d == 0 for d in diffs),
        # one seed gives no spread to judge by
        "verdict": "noise" if len(diffs) < 2 or abs(mean) <= std else ("higher" if mean > 0 else "lower"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a bench_quality.py --out folder and its name")
    parser.add_argument("--name", default="bench_decisions", help="result files' name")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where <name>.{json,md} go")
    parser.add_argument("--baseline", help="a LABEL every other label is compared with, seed by seed")
    args = parser.parse_args()
    labels_given = [given.rpartition("=")[0] for given in args.runs]
    if args.baseline is not None and args.baseline not in labels_given:
        raise SystemExit(f"error: --baseline {args.baseline!r} is none of the labels {labels_given}")

    table: dict[str, dict[str, list[dict]]] = {}  # config -> label -> runs
    for given in args.runs:
        label, sep, folder = given.rpartition("=")  # a label may hold "=" (an override)
        if not sep or not label or not folder:
            raise SystemExit(f"error: {given!r}: expected LABEL=DIR, e.g. cross-fitted=/tmp/cf")
        found = sorted(
            (p for p in Path(folder).glob("*/seed*") if p.is_dir()),
            key=lambda p: (p.parent.name, int(p.name[4:]) if p.name[4:].isdigit() else -1, p.name),
        )  # seed2 before seed10
        if not found:
            raise SystemExit(f"error: no run folders under {folder}/<config>/seed*/")
        for run_dir in found:
            if not (run_dir / "metrics.csv").exists():
                continue  # a failed run: bench_quality.py reports it
            run = {"seed": run_dir.name, **read_run(run_dir)}
            table.setdefault(run_dir.parent.name, {}).setdefault(label, []).append(run)
    lines = [f"# Ranking and decisions of `final` ({', '.join(args.runs)})", ""]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    comparisons: dict[str, dict[str, dict]] = {}  # config -> label -> paired differences (--baseline)
    for config, labels in table.items():
        lines += [
            f"## {config}",
            "",
            "| runs | official per seed | official mean ± std | TPR mean | TNR mean | mean abs(TNR - aim) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, runs in labels.items():
            s = summary.setdefault(config, {})[label] = summarise(runs)
            seeds = " ".join(f"{r['official']:.3f}" for r in runs)
            lines.append(
                f"| {label} | {seeds} | {s['official_mean']:.3f} ± {s['official_std']:.3f} | "
                f"{s['tpr_mean']:.2f} | {s['tnr_mean']:.2f} | {s['tnr_error']:.2f} |"
            )
        aims = sorted({r["percentile"] for runs in labels.values() for r in runs})
        lines += ["", f"TNR aim (threshold_percentile): {', '.join(f'{a:g}' for a in aims)}", ""]
        if args.baseline in labels:
            rows = [
                (label, d)
                for label, runs in labels.items()
                if label != args.baseline and (d := paired(runs, labels[args.baseline])) is not None
            ]
            lines += [
                f"Official score minus `{args.baseline}`'s, seed by seed:",
                "",
                "| runs | seeds | mean ± std of the differences | higher / lower / equal | verdict |",
                "| --- | --- | --- | --- | --- |",
            ]
            for label, d in rows:
                comparisons.setdefault(config, {})[label] = d
                lines.append(
                    f"| {label} | {d['n']} | {d['diff_mean']:+.4f} ± {d['diff_std']:.4f} | "
                    f"{d['higher']} / {d['lower']} / {d['equal']} | {d['verdict']} |"
                )
            lines.append("")
    data = {"runs": args.runs, "table": table, "summary": summary}
    if args.baseline is not None:
        data |= {"baseline": args.baseline, "paired": comparisons}
    write_tables(args.results, args.name, data, lines)


if __name__ == "__main__":
    main()
