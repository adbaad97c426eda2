"""What the z-score normalisation does to each fused column, on finished runs (no training).

    python benchmarks/bench_zscores.py RUN_DIR [RUN_DIR ...] [--name bench_zscores_first_shot]

For each run folder (its `scores.csv` and `calibration.pt`) the official DCASE score of every
fused column raw (as `scores.csv` reports it) and z-scored as the run's fusions see it (one mean
and std per machine/section/domain, `Calibration.normalise`), and of `zmean` and `zweighted`
recomputed from two normalisations: the run's per-domain one, and one mean and std per section
over the reference normals of both domains ("pooled"; a calibrated backend's column is left as is
in both, as the run leaves it). The official metric ranks a domain's normals against every anomaly
of the section, so a per-domain shift fitted on 2 target clips moves the target clips against the
source ones; the pooled rule keeps the members' own cross-domain scale. Runs of one machine and
one section only: the reference normals' section is not stored in `calibration.pt`, and with one
section it is known. Prints a table and writes `benchmarks/results/<name>.{md,json}`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd.calibration import Calibration  # noqa: E402
from asd.data.table import DOMAIN_IDS, Clip  # noqa: E402
from asd.errors import AsdError  # noqa: E402
from asd.evaluation import evaluate  # noqa: E402
from asd.scoring import GroupNormalizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def read_scores(run_dir: Path) -> tuple[list[Clip], list[dict[str, str]]]:
    path = run_dir / "scores.csv"
    if not path.is_file():
        raise AsdError(f"{run_dir}: no scores.csv; give run folders that train.py finished")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    clips = [
        Clip(r["path"], r["machine"], r["section"], r["domain"], split="test", label=r["label"]) for r in rows
    ]
    return clips, rows


def pooled_z(calibration: Calibration, member: str, raw: np.ndarray) -> np.ndarray:
    """z-scores from one mean and sample std over every reference normal (one section): the run's
    `GroupNormalizer` fitted and applied with every clip counted as one domain."""
    if not calibration.normalizers[member]:  # a calibrated backend: its raw scores are z-scores
        return raw
    ref = calibration.reference_scores[member]
    norm = GroupNormalizer(calibration.shrinkage).fit(ref, *[torch.zeros(len(ref), dtype=torch.long)] * 2)
    one = torch.zeros(len(raw), dtype=torch.long)
    return norm.transform(torch.as_tensor(raw), one, one).double().numpy()


def run_row(run_dir: Path) -> dict[str, float]:
    clips, rows = read_scores(run_dir)
    sections = {(c.machine, c.section) for c in clips}
    if len(sections) != 1:
        raise AsdError(f"{run_dir}: {len(sections)} machine/sections; this benchmark reads one-section runs")
    calibration = Calibration.load(run_dir / "calibration.pt")
    context = {
        "machine": torch.zeros(len(clips), dtype=torch.long),
        "section": torch.zeros(len(clips), dtype=torch.long),
        "domain": torch.tensor([DOMAIN_IDS[c.domain] for c in clips]),
    }
    raw = {m: np.array([float(r[m]) for r in rows]) for m in calibration.members}
    per_domain = calibration.normalise(raw, context).double().numpy()
    pooled = np.stack([pooled_z(calibration, m, raw[m]) for m in calibration.members], axis=1)
    weights = np.array([calibration.weights.get(m, 0.0) for m in calibration.members])

    def official(scores: np.ndarray) -> float:
        return evaluate(clips, scores).official

    out = {"final": official(np.array([float(r["final"]) for r in rows]))}
    for j, m in enumerate(calibration.members):
        out[f"{m} raw"], out[f"{m} z"] = official(raw[m]), official(per_domain[:, j])
    for name, z in (("per-domain", per_domain), ("pooled", pooled)):
        out[f"zmean {name}"] = official(z.mean(axis=1))
        if weights.sum() > 0:
            out[f"zweighted {name}"] = official(z @ weights / weights.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders of one section each")
    parser.add_argument("--name", default="bench_zscores", help="results file name (no extension)")
    args = parser.parse_args()
    by_run = {str(r): run_row(r) for r in args.runs}
    columns = list(dict.fromkeys(k for row in by_run.values() for k in row))
    lines = ["| run | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for run, row in by_run.items():
        lines.append(f"| {run} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in columns) + " |")
    means = {k: float(np.mean([row[k] for row in by_run.values() if k in row])) for k in columns}
    stds = {k: float(np.std([row[k] for row in by_run.values() if k in row], ddof=1)) for k in columns}
    lines.append("| mean | " + " | ".join(f"{means[k]:.3f}" for k in columns) + " |")
    lines.append("| std | " + " | ".join(f"{stds[k]:.3f}" for k in columns) + " |")
    title = "# z-scores of finished runs (benchmarks/bench_zscores.py)"
    text = f"{title}\n\nofficial score; {len(by_run)} runs\n\n" + "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    record = {"runs": by_run, "mean": means, "std": stds}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {RESULTS / args.name}.md and .json")


if __name__ == "__main__":
    try:
        main()
    except AsdError as e:
        sys.exit(f"error: {e}")
