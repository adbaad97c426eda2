"""Decision thresholds of finished runs refitted every way, without training: the TNR and TPR of each.

    python benchmarks/bench_thresholds.py current=/tmp/runs older=/tmp/older_runs --name bench_thresholds

Each `LABEL=DIR` is a `bench_quality.py --out` folder (`<config>/seed<S>/` run folders). From every
run it reads `calibration.pt` (the reference normals' left-out final scores that the thresholds
are fitted on, `reference_final`, and `threshold_percentile`), `scores.csv` (every test clip's
final score and label) and `.hydra/config.yaml`, from which it rebuilds the data module to learn
each reference normal's section and domain: the held-out split, or every training clip where the
run cross-fitted, exactly as the run chose them. Then it fits the thresholds of every way in
`WAYS` with `asd.calibration.fit_thresholds` on the normals `asd.calibration.threshold_normals`
keeps, the calibrate stage's own functions (with the run's `threshold_fence`), and counts what
they decide on the test clips. The final scores do not
change, so neither does the ranking: only the decisions.

Per label and configuration: the mean TNR (the share of test normals passed, against the aim
`threshold_percentile`), the mean |TNR - aim|, the mean TPR and the lowest TNR of any run, and
every run's values in the JSON. Writes benchmarks/results/<name>.{json,md}. Needs the runs' data
(the synthetic cache is rebuilt from its seed; the MIMII sample under ../shared/data).
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py, also when loaded by path
from timing import write_tables  # noqa: E402

from asd.calibration import fit_thresholds, threshold_normals  # noqa: E402
from asd.choices import FUSION_CANDIDATES  # noqa: E402
from asd.run.calibrate import reference_normals  # noqa: E402
from asd.run.job import split_datamodule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: name -> (threshold model, threshold_shrinkage, threshold_min_domain); min_domain 1 fits every normal,
#: as runs did before 2026-12-06; the default since is "normal, min_domain 3"
WAYS = {
    "normal": ("normal", 0.0, 1),
    "gamma": ("gamma", 0.0, 1),
    "normal, shrinkage 2": ("normal", 2.0, 1),
    "gamma, shrinkage 2": ("gamma", 2.0, 1),
    "normal, min_domain 3": ("normal", 0.0, 3),
}


def rates(final: np.ndarray, anomalous: np.ndarray, section: np.ndarray, thresholds: np.ndarray) -> dict:
    """TNR and TPR of `final` > its section's threshold, over the test clips."""
    flagged = final > thresholds[section]
    return {"tnr": float(1.0 - flagged[~anomalous].mean()), "tpr": float(flagged[anomalous].mean())}


def refit(
    reference_final: np.ndarray,
    reference_section: np.ndarray,
    reference_domain: np.ndarray,
    num_sections: int,
    final: np.ndarray,
    anomalous: np.ndarray,
    section: np.ndarray,
    percentile: float,
    fence: float | None,
    small_out: bool = True,
) -> dict[str, dict]:
    """Every way's thresholds from the reference normals, and the TNR/TPR they give the test clips.
    `small_out`: whether `threshold_min_domain` applies to the run, as in
    `asd.run.calibrate.threshold_rows`: cross-fitted reference normals and a fused `final`."""
    out = {}
    for way, (model, shrinkage, min_domain) in WAYS.items():
        rows = threshold_normals(reference_section, reference_domain, min_domain if small_out else 1)
        thresholds, _ = fit_thresholds(
            reference_final[rows],
            torch.as_tensor(reference_section[rows]),
            num_sections,
            percentile,
            fence,
            shrinkage,
            model,
        )
        out[way] = rates(final, anomalous, section, thresholds.numpy())
    return out


def reference_sections(cfg: DictConfig) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], bool]:
    """Each reference normal's section and domain ids, the (machine, section) keys in id order, and
    whether the normals were cross-fitted, of one run."""
    dm = split_datamodule(cfg)
    normals, _ = reference_normals(dm, warn=False)
    section, domain = np.asarray(normals.labels["section"]), np.asarray(normals.labels["domain"])
    return section, domain, list(dm.section_keys), bool(dm.crossfit_folds)


def read_run(run_dir: Path) -> dict:
    """Every way's TNR/TPR of one run, and its aim."""
    state = torch.load(run_dir / "calibration.pt", map_location="cpu", weights_only=True)
    reference_final = np.asarray(state["reference_final"], dtype=np.float64)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    ref_section, ref_domain, keys, crossfit = reference_sections(cfg)
    if len(ref_section) != len(reference_final):
        raise ValueError(
            f"{run_dir}: {len(reference_final)} reference scores in calibration.pt but the rebuilt data "
            f"module names {len(ref_section)} reference normals"
        )
    ids = {key: i for i, key in enumerate(keys)}
    with open(run_dir / "scores.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in ("normal", "anomaly")]
    percentile = float(state["threshold_percentile"])
    ways = refit(
        reference_final,
        ref_section,
        ref_domain,
        len(keys),
        np.array([float(r["final"]) for r in rows]),
        np.array([r["label"] == "anomaly" for r in rows]),
        np.array([ids[(r["machine"], r["section"])] for r in rows]),
        percentile,
        cfg.get("threshold_fence", None),
        crossfit and state["final"] in FUSION_CANDIDATES,
    )
    return {"percentile": percentile, "ways": ways}


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per way: mean TNR, mean |TNR - aim|, mean TPR, lowest TNR."""
    out = {}
    for way in WAYS:
        tnr = [r["ways"][way]["tnr"] for r in runs]
        out[way] = {
            "tnr_mean": statistics.fmean(tnr),
            "tnr_error": statistics.fmean(abs(t - r["percentile"]) for t, r in zip(tnr, runs, strict=True)),
            "tpr_mean": statistics.fmean(r["ways"][way]["tpr"] for r in runs),
            "tnr_min": min(tnr),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DIR: a bench_quality.py --out folder and its name")
    parser.add_argument("--name", default="bench_thresholds", help="result files' name")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where <name>.{json,md} go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the data modules' set-up lines are not the result

    table: dict[str, dict[str, list[dict]]] = {}  # config -> label -> runs
    for given in args.runs:
        label, sep, folder = given.rpartition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"error: {given!r}: expected LABEL=DIR, e.g. current=/tmp/runs")
        found = sorted(p for p in Path(folder).glob("*/seed*") if (p / "calibration.pt").is_file())
        if not found:
            raise SystemExit(f"error: no run folders with a calibration.pt under {folder}/<config>/seed*/")
        for run_dir in found:
            run = {"run": str(run_dir), **read_run(run_dir)}
            table.setdefault(run_dir.parent.name, {}).setdefault(label, []).append(run)
    lines = [f"# Decision thresholds refitted every way ({', '.join(args.runs)})", ""]
    summary: dict[str, dict[str, dict]] = {}
    for config, labels in table.items():
        for label, runs in labels.items():
            s = summary.setdefault(config, {})[label] = summarise(runs)
            aims = sorted({r["percentile"] for r in runs})
            lines += [
                f"## {config}, {label} ({len(runs)} runs; TNR aim {', '.join(f'{a:g}' for a in aims)})",
                "",
                "| thresholds | TNR mean | mean abs(TNR - aim) | TPR mean | lowest TNR |",
                "| --- | --- | --- | --- | --- |",
            ]
            for way, v in s.items():
                lines.append(
                    f"| {way} | {v['tnr_mean']:.3f} | {v['tnr_error']:.3f} | {v['tpr_mean']:.3f} "
                    f"| {v['tnr_min']:.2f} |"
                )
            lines.append("")
    ways = {k: list(v) for k, v in WAYS.items()}
    result = {"runs": args.runs, "ways": ways, "table": table, "summary": summary}
    write_tables(args.results, args.name, result, lines)


if __name__ == "__main__":
    main()
