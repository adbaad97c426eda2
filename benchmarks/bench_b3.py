"""b3's official score, old objective against the from-scratch recipe and its ablations, over seeds.

Each (dataset, config, seed) is one `python train.py branch=b3 ...` run in its own run folder,
started while holding the shared torch lock (`flock` on /tmp/torch.lock, the lock every torch job
on the shared machine takes), so runs of other developers and this benchmark never overlap. The
score is the official score of method b3 over all sections (`metrics.csv`, machine=all); the
source and target AUCs are the means over sections. Wall time is the run's own (lock wait
excluded): data loading, training, backends, calibration, scoring and report.

Datasets:
  default      the built-in synthetic data as shipped (2 machines x 2 sections, 40 + 5 clips)
  first_shot   one machine, one section, 8 source + 2 target training clips (DCASE 2023's case)

Configs are overrides of `branches.b3` written out in full, so they do not depend on which one
the shipped config makes the default. `--epochs` sets `trainer.max_epochs` for every run (the
same budget for all configs). A run folder that already holds `metrics.csv` for the same
overrides is read, not rerun (train.py skips finished stages), so an interrupted benchmark resumes.

    python benchmarks/bench_b3.py                          # ~20 min on 2 shared cores
    python benchmarks/bench_b3.py --seeds 0 --datasets first_shot --configs old new
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import write_result  # benchmarks/timing.py, beside this script

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_b3.json"
LOCK = Path("/tmp/torch.lock")
BASE = ["branch=b3", "reference=false", "fusion.enabled=false", "final=b3", "plots=false"]

_OLD = {
    "objective": "supcon",
    "spectrum": "logmel",
    "mixup": 0.0,
    "self_supervised": "never",
    "knn_density": False,
}
_NEW = {
    "objective": "subcluster_adacos",
    "spectrum": "logmel",
    "mixup": 0.5,
    "self_supervised": "auto",
    "knn_density": True,
}
CONFIGS: dict[str, dict[str, object]] = {
    "old": _OLD,  # b3 before the recipe: SupCon + cosine classifier over sections, plain kNN
    "old+density": {**_OLD, "knn_density": True},
    "old+views": {**_OLD, "self_supervised": "auto"},  # SupCon with self-supervised classes on 1 class
    "new": _NEW,
    "new-mixup": {**_NEW, "mixup": 0.0},
    "new-density": {**_NEW, "knn_density": False},
    "new+multires": {**_NEW, "spectrum": "multires"},
}
DATASETS: dict[str, list[str]] = {
    "default": [],
    "first_shot": [
        "data.synthetic.machines=[valve]",
        "data.synthetic.sections=1",
        "data.synthetic.source_train=8",
        "data.synthetic.target_train=2",
    ],
}
DEFAULT_CONFIGS = {
    "default": ["old", "old+density", "new", "new-mixup", "new-density", "new+multires"],
    "first_shot": ["old", "old+views", "new", "new-density", "new+multires"],
}


def overrides(config: str) -> list[str]:
    """The `branches.b3.*` overrides of a config, as train.py reads them."""
    out = []
    for key, value in CONFIGS[config].items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out.append(f"branches.b3.{key}={text}")
    return out


def read_metrics(run_dir: Path) -> dict[str, float] | None:
    """Official score of b3 (all sections) and the mean source/target AUC over sections."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "b3"]
    overall = [r for r in rows if r["machine"] == "all"]
    sections = [r for r in rows if r["machine"] != "all"]
    if not overall or not sections:
        return None
    return {
        "official": float(overall[0]["official"]),
        "auc_source": statistics.mean(float(r["auc_source"]) for r in sections),
        "auc_target": statistics.mean(float(r["auc_target"]) for r in sections),
    }


def run_one(args: list[str], run_dir: Path, log_path: Path) -> tuple[dict[str, float], float]:
    """One train.py run under the torch lock; its metrics and wall seconds (lock wait excluded)."""
    done = run_dir / "bench_done.json"
    if done.exists() and json.loads(done.read_text())["args"] == args:
        cached = json.loads(done.read_text())
        return cached["metrics"], cached["wall_s"]
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what `flock /tmp/torch.lock` takes
        start = time.perf_counter()
        with log_path.open("w") as log:
            proc = subprocess.run(
                [sys.executable, str(REPO / "train.py"), *args],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wall = time.perf_counter() - start
    metrics = read_metrics(run_dir)
    if proc.returncode != 0 or metrics is None:
        raise SystemExit(f"bench_b3: run failed (exit {proc.returncode}); see {log_path}")
    done.write_text(json.dumps({"args": args, "metrics": metrics, "wall_s": wall}))
    return metrics, wall


def summary(values: list[float]) -> dict[str, object]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def row(dataset: str, config: str, r: dict[str, dict]) -> str:
    """One markdown table row: official mean ± std, per seed, mean AUCs and wall time."""
    seeds = " ".join(f"{v:.3f}" for v in r["official"]["per_seed"])
    official = f"{r['official']['mean']:.3f} ± {r['official']['std']:.3f}"
    aucs = f"{r['auc_source']['mean']:.3f} | {r['auc_target']['mean']:.3f}"
    return f"| {dataset} | {config} | {official} | {seeds} | {aucs} | {r['wall_s']['mean']:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="default: per dataset")
    parser.add_argument("--epochs", type=int, default=10, help="trainer.max_epochs of every run")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/bench_b3"), help="run folders")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()

    results: dict[str, dict[str, object]] = {}
    lines = []
    for dataset in opts.datasets:
        results[dataset] = {}
        for config in opts.configs or DEFAULT_CONFIGS[dataset]:
            per_seed: dict[str, list[float]] = {
                "official": [],
                "auc_source": [],
                "auc_target": [],
                "wall_s": [],
            }
            for seed in opts.seeds:
                run_dir = opts.runs / f"e{opts.epochs}" / dataset / config / f"s{seed}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                args = [
                    *BASE,
                    f"run_dir={run_dir}",
                    f"seed={seed}",
                    f"trainer.max_epochs={opts.epochs}",
                    *DATASETS[dataset],
                    *overrides(config),
                ]
                metrics, wall = run_one(args, run_dir, run_dir.parent / f"s{seed}.log")
                for key, value in metrics.items():
                    per_seed[key].append(value)
                per_seed["wall_s"].append(wall)
                score = metrics["official"]
                print(f"{dataset:11s} {config:13s} seed {seed}: official {score:.3f} ({wall:.0f} s)")
            results[dataset][config] = {key: summary(v) for key, v in per_seed.items()}
            lines.append(row(dataset, config, results[dataset][config]))

    table = "\n".join(
        [
            "| data | config | official mean ± std | per seed | AUC source | AUC target | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *lines,
        ]
    )
    print(table)
    write_result(
        opts.out,
        {
            "benchmark": "bench_b3",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "seeds": opts.seeds,
            "max_epochs": opts.epochs,
            "std": "sample standard deviation over seeds (n - 1)",
            "configs": {name: CONFIGS[name] for name in {c for d in results.values() for c in d}},
            "datasets": {name: DATASETS[name] for name in results},
            "results": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
