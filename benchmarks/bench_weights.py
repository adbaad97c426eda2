"""`zweighted`'s weight rules on the same runs: each member's own criterion vs the members weighed together.

    python benchmarks/bench_weights.py run --configs first-shot --seeds 43 44 --out runs/bw
    python benchmarks/bench_weights.py table runs/bw/first-shot/seed* --name bench_weights_first_shot

`run` trains each (configuration, seed) like `bench_quality.py` (same overrides and run folders, one
`train.py` at a time) in a process that records, beside the run's own files, what a run does not
write: the calibrate stage's rows (`weights_rows.pt`: the normals' left-out z-scores and the
pseudo-anomalies' z-scores each member's weight is fitted on, their labels and sections; taken
from `asd.run.calibrate.weigh_members`) and the test clips' z-scores the predict stage fuses,
with their context ids (`weights_test.pt`, from `Calibration.combine`). The run itself is
unchanged: its scores are the default run's.

`table` then fuses every run's test z-scores with the weights of each rule, fitted on that run's
rows, and scores them with the run's labels (`asd.evaluation.evaluate`, the official DCASE score of
the year its `summary.md` names, with the `fusion.weighted.power` of its `.hydra/config.yaml`):

  criterion      `fusion.weighted.rule=criterion`: (criterion - 0.5) ** power per member, without a
                 floor on the references' share (`fusion.weighted.reference_share=null`)
  discriminant   `fusion.weighted.rule=discriminant`: the shrunk linear discriminant of all members
  zmean          equal weights
  criterion, reference_share=S   the criterion's weights with the fused references given at least S
                 of them (`--shares`, 0.8 by default: the default since 2026-12-06)

beside `final` and each fused column alone, and the mean correlation of each pair of fused columns
over the test clips. Writes benchmarks/results/<name>.{json,md} (or under `--results`).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
RULES = ("criterion", "discriminant", "zmean")


def train_recording(overrides: list[str]) -> None:
    """`python train.py overrides`, recording the calibrate stage's rows and the fused test z-scores."""
    import torch

    import asd.run.calibrate as calibrate
    from asd.calibration import Calibration

    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))
    weigh, combine = calibrate.weigh_members, Calibration.combine

    def weigh_members(calibration, rows, y, section, cfg):
        weigh(calibration, rows, y, section, cfg)
        saved = {"rows": rows, "y": y, "section": section, "members": list(calibration.members)}
        torch.save(saved, run_dir / "weights_rows.pt")

    def combine_recording(self, raw, context):
        out = combine(self, raw, context)
        z = self.normalise({k: v for k, v in raw.items() if k != "index"}, context)
        ids = {k: v.clone() for k, v in context.items()}
        torch.save({"z": z, "members": list(self.members), "context": ids}, run_dir / "weights_test.pt")
        return out

    calibrate.weigh_members = weigh_members
    Calibration.combine = combine_recording
    sys.argv = ["train.py", *overrides]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def run(configs: list[str], seeds: list[int], out: Path, extra: list[str]) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_quality import CONFIGS, MIMII, config_overrides, prepare_mimii_pooled

    for name in configs:
        if name not in CONFIGS or name == "digits":
            raise SystemExit(f"--configs {name}: expected audio configurations of bench_quality.py")
        if name == "mimii-pooled":
            if not MIMII.is_dir():
                print(f"{name}: {MIMII} is absent, skipped")
                continue
            prepare_mimii_pooled(MIMII, out / name / "data")
        for seed in seeds:
            overrides = config_overrides(name, seed, out, extra)
            if name == "mimii-pooled":  # the fused reference, as bench_quality's --extra 'reference=[stats]'
                overrides.insert(2, "reference=[stats]")
            cmd = ["flock", "/tmp/torch.lock", sys.executable, __file__, "_train", *overrides]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            print(f"{name} seed {seed}: exit {proc.returncode}", flush=True)
            if proc.returncode:
                print(proc.stderr[-2000:], flush=True)


def official(clips: list, scores, year: int) -> float:
    """The official score of `year` for one column over a run's test clips."""
    from asd.evaluation import evaluate

    return evaluate(clips, scores, year=year).official


def one_run(run_dir: Path, shares: list[float]) -> dict:
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from asd.data.table import Clip
    from asd.ensemble import is_reference
    from asd.fusion import select

    saved = torch.load(run_dir / "weights_rows.pt", weights_only=False)
    test_z = torch.load(run_dir / "weights_test.pt", weights_only=False)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    power = float(cfg.fusion.weighted.power)
    named = re.search(r"official score convention: DCASE (\d{4})", (run_dir / "summary.md").read_text())
    if named is None:
        raise SystemExit(f"{run_dir}/summary.md names no official score convention: is the run finished?")
    year = int(named.group(1))
    with open(run_dir / "scores.csv", newline="") as f:
        test = list(csv.DictReader(f))
    clips = [
        Clip(r["path"], r["machine"], r["section"], r["domain"], split="test", label=r["label"]) for r in test
    ]
    members = saved["members"]
    rows = saved["rows"].double().numpy()
    y, section = saved["y"].numpy().astype(np.int64), saved["section"].numpy()
    z = test_z["z"].double().numpy()
    if test_z["members"] != members or len(z) != len(test):
        raise SystemExit(f"{run_dir}: the recorded test z-scores do not match scores.csv")
    out: dict = {"run": str(run_dir), "year": year, "official": {}, "weights": {}}
    for rule in RULES:
        if rule == "zmean":
            w = np.ones(len(members)) / len(members)
        else:
            w = select.member_weights(rows, y, section, power, rule)[1]
            w = w / w.sum()
        out["weights"][rule] = dict(zip(members, w.round(4).tolist(), strict=True))
        out["official"][rule] = official(clips, z @ w, year)
    reference = np.array([is_reference(m) for m in members])
    for share in shares:
        w = select.member_weights(rows, y, section, power, reference=reference, share=share)[1]
        w, rule = w / w.sum(), f"criterion, reference_share={share:g}"
        out["weights"][rule] = dict(zip(members, w.round(4).tolist(), strict=True))
        out["official"][rule] = official(clips, z @ w, year)
    out["official"]["final (the run's)"] = official(clips, np.array([float(r["final"]) for r in test]), year)
    for i, m in enumerate(members):
        out["official"][f"{m} (fused z)"] = official(clips, z[:, i], year)
    out["correlation"] = np.corrcoef(z.T).round(3).tolist()
    out["members"] = members
    return out


def table(runs: list[Path], name: str, shares: list[float], results_dir: Path = RESULTS) -> None:
    import numpy as np

    results = [one_run(r, shares) for r in runs]
    years = {r["year"] for r in results}
    if len(years) != 1:
        raise SystemExit(f"the runs score under different official years {sorted(years)}: one table per year")
    year = years.pop()
    methods = list(results[0]["official"])
    heads = [Path(r["run"]).name for r in results]
    lines = [
        f"# {name}: zweighted's weight rules on the same runs (official DCASE {year})",
        "",
        f"runs: {', '.join(r['run'] for r in results)}",
        "",
        "| method | " + " | ".join(heads) + " | mean ± std |",
        "| --- | " + " | ".join("---" for _ in heads) + " | --- |",
    ]
    for m in methods:
        v = [r["official"][m] for r in results]
        spread = statistics.stdev(v) if len(v) > 1 else 0.0
        cells = " | ".join(f"{x:.3f}" for x in v)
        lines.append(f"| {m} | {cells} | {np.mean(v):.3f} ± {spread:.3f} |")
    higher = sum(r["official"]["discriminant"] > r["official"]["criterion"] for r in results)
    lower = sum(r["official"]["discriminant"] < r["official"]["criterion"] for r in results)
    n = len(results)
    lines += ["", f"discriminant against criterion: higher in {higher}, lower in {lower} of {n} runs"]
    for share in shares:
        rule = f"criterion, reference_share={share:g}"
        diff = [r["official"][rule] - r["official"]["criterion"] for r in results]
        spread = statistics.stdev(diff) if n > 1 else 0.0
        lines.append(
            f"{rule} against criterion: {np.mean(diff):+.4f} ± {spread:.4f}, higher in "
            f"{sum(d > 0 for d in diff)}, lower in {sum(d < 0 for d in diff)} of {n} runs"
        )
    lines.append("")
    members = results[0]["members"]
    corr = np.mean([r["correlation"] for r in results], axis=0)
    lines += ["mean correlation of the fused columns over the test clips:", ""]
    lines.append("| | " + " | ".join(members) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in members) + " |")
    for i, m in enumerate(members):
        lines.append(f"| {m} | " + " | ".join(f"{c:.2f}" for c in corr[i]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(text)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_dir / name}.{{md,json}}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        sys.path.insert(0, str(REPO))
        train_recording(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and record (bench_quality.py's configurations)")
    r.add_argument("--configs", nargs="+", default=["first-shot"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--extra", nargs="*", default=[])
    t = sub.add_parser("table", help="every rule on recorded runs")
    t.add_argument("runs", type=Path, nargs="+")
    t.add_argument("--name", default="bench_weights")
    t.add_argument(
        "--shares", type=float, nargs="*", default=[0.8], help="fusion.weighted.reference_share values"
    )
    t.add_argument("--results", type=Path, default=RESULTS, help="where <name>.{md,json} go")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.configs, args.seeds, args.out.resolve(), args.extra)
    else:
        sys.path.insert(0, str(REPO))
        table(args.runs, args.name, args.shares, args.results)


if __name__ == "__main__":
    main()
