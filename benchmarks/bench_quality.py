"""Detection quality: the official DCASE score of every method a run reports, over seeds and configurations.

    python benchmarks/bench_quality.py                           # 4 configs x seeds 0 1 2, ~30 min on 2 cores
    python benchmarks/bench_quality.py --configs synthetic-default --seeds 0 1 2 3 4
    python benchmarks/bench_quality.py --out runs/bq --extra fusion.seed=1   # --extra: appended to every run

Each (configuration, seed) is one `python train.py` in its own run folder, `<out>/<config>/seed<S>`,
launched under `flock /tmp/torch.lock` so that it waits for any other torch job on the machine;
the runs are serial. Re-running with the same `--out` reuses finished runs (train.py skips the
stages it has done). Configurations:

  synthetic-default   the default synthetic data (difficulty 0.5)
  synthetic-hard      difficulty 0.7: subtler anomalies (0 = obvious ... 1 = subtle); e.g. a rotor's
                      bearing tone at -27 instead of -21 dB re the clip, a spectral tilt of 4.2 instead
                      of 5.9 dB, clicks at 0.4 instead of 0.6 of the normal peak
  first-shot          one machine (valve), one section, 8 source + 2 target training clips of 10 s
  mimii-pooled        ../shared/data/mimii_0db pooled across units per machine type (docs/results.md),
                      prepared under <out>; skipped when that folder is absent
  digits              pictures (data=images): scikit-learn's bundled digits, one digit normal and the
                      others anomalies, 32 x 32 (tools/make_digits.py): seed S makes digit S % 10 the
                      normal one (split seed S // 10), so seeds 0..9 are the one-class protocol over
                      every digit; only when named in --configs

On synthetic data the seed sets both `seed` and `data.synthetic.seed`, so seeds are different
datasets as well as different training runs; on MIMII the data is fixed and only training varies.
From each run it reads `metrics.csv` (the `machine == all` rows: every method's official score)
and `summary.md` (which columns are members and references, and which method is `final`), and
times `train.py` with GNU time (the wait for the lock excluded). A run that fails is recorded with
its `error:` line and the benchmark goes on. Writes benchmarks/results/bench_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MIMII = REPO.parent / "shared" / "data" / "mimii_0db"
LOCK = "/tmp/torch.lock"
GNU_TIME = "/usr/bin/time"
# Column names as asd writes them, copied rather than imported: this process never loads torch.
FUSIONS = ("zmean", "zmin", "zmax")  # asd.scoring.FUSIONS
LEARNED = ("attention", "meta", "zweighted")  # asd.calibration.LEARNED, asd.scoring.WEIGHTED
REFERENCE_PREFIXES = ("dcase_ae", "stats")  # asd.ensemble.REFERENCES, when a summary does not list them
# the simplest reference, in order of preference (a training-free mean-log-mel Mahalanobis first)
SIMPLE_REFERENCES = ("stats_mahalanobis", "dcase_ae_mahalanobis")
CONFIGS: dict[str, list[str]] = {
    "synthetic-default": [],
    "synthetic-hard": ["data.synthetic.difficulty=0.7"],
    "first-shot": [
        "data.synthetic.machines=[valve]",
        "data.synthetic.sections=1",
        "data.synthetic.source_train=8",
        "data.synthetic.target_train=2",
        "data.synthetic.duration=10.0",
        "data.audio.duration=10.0",
    ],
    "mimii-pooled": ["experiment=dcase2020", "reference=false"],  # + data.root=<the prepared folder>
    "digits": ["data=images", "data.image.size=[32,32]"],  # + data.root=<tools/make_digits.py --seed S>
}
SYNTHETIC = ("synthetic-default", "synthetic-hard", "first-shot")
#: what runs without --configs (the audio configurations)
DEFAULT_CONFIGS = ("synthetic-default", "synthetic-hard", "first-shot", "mimii-pooled")
CODE = ("asd", "conf", "train.py")  # what a run's scores depend on, for `code_fingerprint`


@dataclass
class Run:
    """One train.py run: what it was given, how long it took, and every method's official score."""

    config: str
    seed: int
    overrides: list[str]
    run_dir: str
    returncode: int | None = None
    wall_s: float | None = None  # train.py alone (GNU time), the wait for the lock excluded
    wall_with_wait_s: float | None = None
    peak_rss_mb: float | None = None
    scores: dict[str, float | None] = field(default_factory=dict)  # method -> official (None: NaN)
    final: str | None = None  # the method `final` stands for
    final_why: str | None = None  # the summary's reason, when final=auto chose it
    members: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    error: str | None = None
    code: str | None = None  # `code_fingerprint()` at launch


# ---------------------------------------------------------------------- reading a run folder
def read_official(path: Path) -> dict[str, float]:
    """Every method's official score from a run's `metrics.csv` (its `machine == all` rows), in file order."""
    with path.open(newline="") as f:
        return {
            row["method"]: float(row["official"]) if row["official"] else math.nan
            for row in csv.DictReader(f)
            if row["machine"] == "all"
        }


def read_summary(path: Path) -> dict[str, str | list[str] | None]:
    """From `summary.md`: the final method (and why, when chosen automatically), the fused members and
    the references, as the run states them."""
    found: dict[str, str | list[str] | None] = {"final": None, "why": None, "members": [], "references": []}
    for line in path.read_text().splitlines():
        if line.startswith("- final="):  # how an automatic choice was made (final=auto)
            found["why"] = line[2:]
        elif line.startswith("- final score:"):
            name = re.search(r"`([^`]+)`", line)
            found["final"] = name.group(1) if name else None
        elif line.startswith("- members (fused):"):
            found["members"] = _names(line.split(":", 1)[1])
        elif line.startswith("- reference, reported beside"):
            found["references"] = _names(line.split(":", 1)[1])
    return found


def _names(text: str) -> list[str]:
    """`b1, b2` -> ['b1', 'b2']; `none (reference=false)` -> []."""
    return [n.strip() for n in text.split(",") if n.strip() and not n.strip().startswith("none")]


def error_line(stderr: str) -> str:
    """The `error:` line train.py prints for an AsdError, else the last line of stderr (a traceback's)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output on stderr"])[-1]


def read_gnu_time(text: str) -> tuple[float, float] | None:
    """(wall seconds, peak RSS MB) from `time -f '%e %M'` output; a failed command adds a line before it."""
    for line in reversed(text.strip().splitlines()):
        parts = line.split()
        if len(parts) == 2:
            try:
                return float(parts[0]), float(parts[1]) / 1024
            except ValueError:
                continue
    return None


# ---------------------------------------------------------------------- aggregation
@dataclass
class Stats:
    """Mean, sample standard deviation (n - 1; None for one value), min and max of one method's scores."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float


def stats(values: Sequence[float]) -> Stats | None:
    """Stats of the finite values, None when there are none."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    std = statistics.stdev(xs) if len(xs) > 1 else None
    return Stats(len(xs), statistics.fmean(xs), std, min(xs), max(xs))


def role(method: str, members: set[str], references: set[str]) -> str:
    if method == "final":
        return "final"
    if method in FUSIONS:
        return "label-free fusion"
    if method in LEARNED:
        return "learned fusion"
    if method in references or (not references and method.startswith(REFERENCE_PREFIXES)):
        return "reference"
    if method in members or not members:
        return "member"
    return "other"


def method_values(runs: Sequence[Run]) -> dict[str, dict[int, float]]:
    """method -> {seed: official} over the runs that finished; `final` is the value of the method it names."""
    table: dict[str, dict[int, float]] = {}
    for run in runs:
        for method, value in run.scores.items():
            table.setdefault(method, {})[run.seed] = math.nan if value is None else value
    for run in runs:
        if run.final in run.scores:
            value = run.scores[run.final]
            table.setdefault("final", {})[run.seed] = math.nan if value is None else value
    return table


def roles_of(runs: Sequence[Run]) -> dict[str, str]:
    members = {m for r in runs for m in r.members}
    references = {m for r in runs for m in r.references}
    return {m: role(m, members, references) for m in method_values(runs)}


def best(values: dict[str, dict[int, float]], roles: dict[str, str], kind: str) -> str | None:
    """The method of that role with the highest mean."""
    means = {m: s.mean for m, v in values.items() if roles.get(m) == kind and (s := stats(list(v.values())))}
    return max(means, key=means.__getitem__) if means else None


def simplest_reference(values: dict[str, dict[int, float]]) -> str | None:
    return next((m for m in SIMPLE_REFERENCES if m in values), None)


def compare(values: dict[str, dict[int, float]], a: str, b: str) -> dict:
    """a against b over the seeds both have: mean difference, and whether it lies within one sample
    standard deviation of the per-seed (paired) differences, i.e. inside the seed-to-seed noise."""
    seeds = sorted(set(values[a]) & set(values[b]))
    diffs = [values[a][s] - values[b][s] for s in seeds]
    d = stats(diffs)
    if d is None:
        return {"a": a, "b": b, "seeds": seeds, "diffs": diffs, "mean_diff": None}
    return {
        "a": a,
        "b": b,
        "seeds": seeds,
        "diffs": diffs,
        "mean_diff": d.mean,
        "std_diff": d.std,
        "a_ge_b": d.mean >= 0,
        "within_one_std": None if d.std is None else abs(d.mean) <= d.std,
        "seeds_a_ge_b": sum(x >= 0 for x in diffs),
    }


def aggregate(runs: Sequence[Run]) -> dict:
    """Everything the tables show for one configuration: per-method stats, roles, bests, comparisons."""
    done = [r for r in runs if r.scores]
    values = method_values(done)
    roles = roles_of(done)
    summary = {m: asdict(s) if (s := stats(list(v.values()))) else None for m, v in values.items()}
    best_member, best_reference = best(values, roles, "member"), best(values, roles, "reference")
    simple = simplest_reference(values)
    comparisons = [compare(values, "final", b) for b in (best_member, simple) if b and "final" in values]
    return {
        "values": {m: {str(s): _none_if_nan(v) for s, v in vs.items()} for m, vs in values.items()},
        "stats": summary,
        "roles": roles,
        "final_methods": dict(Counter(r.final for r in done if r.final).most_common()),  # method -> seeds
        "best_member": best_member,
        "best_reference": best_reference,
        "simplest_reference": simple,
        "comparisons": comparisons,
    }


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


# ---------------------------------------------------------------------- tables
def _f(v: float | None, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:+.4f}" if sign else f"{v:.4f}"


def config_markdown(name: str, runs: Sequence[Run], agg: dict, note: str = "") -> str:
    """One configuration's table: rows = methods, columns = mean, std, min, max and each seed's score."""
    seeds = [r.seed for r in runs]
    lines = [f"### {name}", ""]
    if runs:
        given = [o for o in runs[0].overrides[:-3] if not o.startswith("data.synthetic.seed=")]
        data_seed = " data.synthetic.seed=S" if name in SYNTHETIC else ""
        lines.append(f"overrides: `{' '.join(given) or '(none)'}` + `seed=S{data_seed} run_dir=...`")
    if note:
        lines.append(note)
    failed = [r for r in runs if not r.scores]
    for r in failed:
        lines.append(f"- seed {r.seed} failed (exit {r.returncode}): `{r.error}`")
    codes = {r.code for r in runs}
    if len(codes) > 1:
        lines.append(
            "- **the code changed between seeds** (fingerprint at launch: "
            + ", ".join(f"seed {r.seed} `{r.code}`" for r in runs)
            + "): the spread mixes code versions"
        )
    elif codes != {None}:
        lines.append(f"- code fingerprint at launch: `{codes.pop()}`, the same for every seed")
    walls = [r.wall_s for r in runs if r.wall_s is not None]
    if walls:
        rss = [r.peak_rss_mb for r in runs if r.peak_rss_mb is not None]
        lines.append(
            f"- wall time per run (train.py alone): mean {statistics.fmean(walls):.0f} s, "
            f"{min(walls):.0f}-{max(walls):.0f} s" + (f"; peak RSS up to {max(rss):.0f} MB" if rss else "")
        )
    if not agg["stats"]:
        return "\n".join([*lines, "", "no run of this configuration finished: no scores", ""])
    marks = {agg["best_member"]: "best member", agg["best_reference"]: "best reference"}
    if agg["final_methods"]:
        counts = agg["final_methods"]
        marks["final"] = "final = " + ", ".join(
            f"`{m}`" + (f" in {k} of {len(runs)} seeds" if len(counts) > 1 else "") for m, k in counts.items()
        )
    lines += [
        "",
        "| method | role | mean | std | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(seeds),
    ]
    for method, st in agg["stats"].items():
        label = f"**{method}** ({marks[method]})" if method in marks else method
        per_seed = [_f(agg["values"][method].get(str(r.seed))) if r.scores else "failed" for r in runs]
        if st is None:
            cells = ["n/a"] * 4
        else:
            cells = [_f(st["mean"]), _f(st["std"]), _f(st["min"]), _f(st["max"])]
        lines.append(f"| {label} | {agg['roles'][method]} | " + " | ".join(cells + per_seed) + " |")
    lines += ["", *comparison_lines(agg), ""]
    return "\n".join(lines)


def comparison_lines(agg: dict) -> list[str]:
    """Whether final's mean is at least the best member's and the simplest reference's, and whether
    the difference is inside the noise (one sample std of the per-seed differences)."""
    out = []
    if "final" not in agg["stats"]:
        return ["- no `final` score in these runs"]
    simple = agg["simplest_reference"]
    if simple is None:
        out.append("- no simple reference in these runs (neither stats_mahalanobis nor dcase_ae_mahalanobis)")
    elif simple != SIMPLE_REFERENCES[0]:
        out.append(
            f"- these runs have no `{SIMPLE_REFERENCES[0]}`; `{simple}` stands in as the simple reference"
        )
    for c in agg["comparisons"]:
        what = "best member" if c["b"] == agg["best_member"] else "simplest reference"
        if c["mean_diff"] is None:
            out.append(f"- final vs {what} `{c['b']}`: no seed has both")
            continue
        verdict = ">=" if c["a_ge_b"] else "<"
        if c["within_one_std"] is None:
            noise = "one seed: no spread to judge noise by"
        elif c["within_one_std"]:
            noise = f"within one std ({_f(c['std_diff'])}) of the per-seed differences: noise"
        else:
            noise = f"more than one std ({_f(c['std_diff'])}) of the per-seed differences"
        out.append(
            f"- final mean {verdict} {what} `{c['b']}` mean: difference {_f(c['mean_diff'], sign=True)}, "
            f"{noise}; final >= it in {c['seeds_a_ge_b']} of {len(c['seeds'])} seeds"
        )
    return out


def overview_markdown(aggs: dict[str, dict]) -> str:
    """Mean ± sample std of every method (rows) in every configuration (columns)."""
    names = list(aggs)
    methods = list(dict.fromkeys(m for a in aggs.values() for m in a["stats"] if m != "final"))
    methods.append("final")
    lines = [
        "| method | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for method in methods:
        cells = []
        for name in names:
            st = aggs[name]["stats"].get(method)
            cells.append("" if st is None else f"{_f(st['mean'])} ± {_f(st['std'])}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- running
def prepare_mimii_pooled(src: Path, dst: Path) -> Path:
    """The pooled cross-unit MIMII sample of docs/results.md in the DCASE 2020 layout, under `dst`.

    Per machine type, the normals of the first half of its IDs train; the other IDs' normals and
    every abnormal clip test; all of a type's IDs are named id_00.
    """
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for mdir in sorted(p for p in src.iterdir() if p.is_dir()):
        ids = sorted(p.name for p in mdir.iterdir() if p.is_dir())
        n = {"train": 0, "test": 0}
        for i in ids:
            for folder, label in (("normal", "normal"), ("abnormal", "anomaly")):
                for f in sorted((mdir / i / folder).glob("*.wav")):
                    split = "train" if i in ids[: len(ids) // 2] and label == "normal" else "test"
                    out = tmp / mdir.name / split / f"{label}_id_00_{n[split]:08d}.wav"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, out)
                    n[split] += 1
    tmp.rename(dst)
    return dst


def config_overrides(name: str, seed: int, out: Path, extra: list[str]) -> list[str]:
    """train.py's overrides for one run; the last three are always plots, seed and run_dir."""
    base = list(CONFIGS[name])
    if name in SYNTHETIC:
        base.append(f"data.synthetic.seed={seed}")
    elif name == "digits":
        base.append(f"data.root={out / name / f'data{seed}'}")
    else:
        base.append(f"data.root={out / name / 'data'}")
    return [*base, *extra, "plots=false", f"seed={seed}", f"run_dir={out / name / f'seed{seed}'}"]


def run_one(name: str, seed: int, out: Path, extra: list[str]) -> Run:
    """One train.py under the lock; its scores, or its error line when it fails."""
    overrides = config_overrides(name, seed, out, extra)
    run_dir = out / name / f"seed{seed}"
    run = Run(name, seed, overrides, str(run_dir), code=code_fingerprint())
    time_file = out / name / f"seed{seed}.time"
    time_file.parent.mkdir(parents=True, exist_ok=True)
    timer = [GNU_TIME, "-f", "%e %M", "-o", str(time_file)] if Path(GNU_TIME).exists() else []
    cmd = ["flock", LOCK, *timer, sys.executable, "train.py", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    run.wall_with_wait_s = time.perf_counter() - start
    (out / name / f"seed{seed}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    run.returncode = proc.returncode
    if timer and time_file.exists() and (timed := read_gnu_time(time_file.read_text())):
        run.wall_s, run.peak_rss_mb = timed
    metrics, summary = run_dir / "metrics.csv", run_dir / "summary.md"
    if proc.returncode != 0 or not metrics.exists() or not summary.exists():
        run.error = error_line(proc.stderr) if proc.returncode != 0 else "no metrics.csv/summary.md written"
        return run
    run.scores = {m: (None if math.isnan(v) else v) for m, v in read_official(metrics).items()}
    said = read_summary(summary)
    run.final, run.final_why = said["final"], said["why"]
    run.members, run.references = said["members"], said["references"]
    return run


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.rstrip("\n")


def in_git_checkout() -> bool:
    """Whether REPO is a git work tree (a copied snapshot of the code is not)."""
    return _git("rev-parse", "--is-inside-work-tree") == "true"


def git_state() -> dict:
    """The commit, and whether (and where) the working tree differs from it; no commit outside git."""
    if not in_git_checkout():
        return {"commit": None, "dirty": None, "dirty_files": [], "diff_sha1": None}
    dirty = _git("status", "--porcelain")
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(dirty),
        "dirty_files": dirty.splitlines(),
        "diff_sha1": hashlib.sha1(_git("diff", "HEAD").encode()).hexdigest() if dirty else None,
    }


def code_fingerprint() -> str:
    """12 hex digits naming the code train.py runs: HEAD, the diff of `CODE` and its untracked files.

    Others may edit the tree during a long benchmark; equal fingerprints mean runs ran the same code
    (as it was at launch). Outside a git checkout it hashes every file of `CODE` itself."""
    if not in_git_checkout():
        h = hashlib.sha1()
        for root in CODE:
            paths = [REPO / root] if (REPO / root).is_file() else sorted((REPO / root).rglob("*"))
            for path in paths:
                if path.is_file() and "__pycache__" not in path.parts:
                    h.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
        return h.hexdigest()[:12]
    h = hashlib.sha1(_git("rev-parse", "HEAD").encode())
    h.update(_git("diff", "HEAD", "--", *CODE).encode())
    for path in _git("ls-files", "--others", "--exclude-standard", "--", *CODE).splitlines():
        h.update(path.encode() + (REPO / path).read_bytes())
    return h.hexdigest()[:12]


def machine_info() -> dict:
    """`timing.environment` as a train.py process sees it, computed in a subprocess under the lock
    (this process never imports torch, so it can run beside other work)."""
    code = (
        "import json, sys, torch; sys.path.insert(0, 'benchmarks'); from timing import environment; "
        "print(json.dumps(environment(torch.device('cpu'))))"
    )
    proc = subprocess.run(
        ["flock", LOCK, sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True
    )
    info = json.loads(proc.stdout) if proc.returncode == 0 else {"error": error_line(proc.stderr)}
    return {**info, "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS))
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the run folders (default: a temp dir)"
    )
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides appended to every run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where bench_quality.{json,md} go")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_quality_"))).resolve()
    print(f"run folders under {out}", flush=True)
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    git_start = git_state()

    runs: dict[str, list[Run]] = {}
    notes: dict[str, str] = {}
    for name in args.configs:
        if name == "mimii-pooled":
            if not MIMII.is_dir():
                notes[name] = f"skipped: {MIMII} is absent"
                print(f"{name}: {notes[name]}", flush=True)
                runs[name] = []
                continue
            prepare_mimii_pooled(MIMII, out / name / "data")
            notes[name] = "data fixed (the 30-clip sample pooled across units); the seed varies training only"
        elif name == "digits":
            for seed in args.seeds:
                data = out / name / f"data{seed}"
                if not data.is_dir():
                    make = [sys.executable, "tools/make_digits.py", "--out", str(data)]
                    make += ["--normal", str(seed % 10), "--seed", str(seed // 10)]
                    subprocess.run(make, cwd=REPO, check=True, capture_output=True)
            notes[name] = (
                "normal digit = seed % 10, 32 x 32: the spread is over digits (how hard each is), not noise"
            )
        else:
            notes[name] = "data seed = training seed: each seed is a different dataset and training run"
        runs[name] = []
        for seed in args.seeds:
            run = run_one(name, seed, out, args.extra)
            runs[name].append(run)
            status = f"final ({run.final}) {_f(run.scores.get(run.final))}" if run.scores else run.error
            wall = "?" if run.wall_s is None else f"{run.wall_s:.0f}"
            print(f"{name} seed {seed}: {wall} s, {status}", flush=True)

    aggs = {name: aggregate(rs) for name, rs in runs.items()}
    total = time.perf_counter() - t0
    git_end = git_state()
    changed = git_end != git_start  # others may edit the tree during a long benchmark
    if git_start["commit"] is None:
        tree = "not a git checkout (the code fingerprints below name the code)"
    else:
        tree = f"commit {git_start['commit']}" + (" (dirty tree)" if git_start["dirty"] else "")
    if changed:
        tree += ", and the tree changed while the benchmark ran (see the json)"
    header = [
        "# Detection quality (benchmarks/bench_quality.py)",
        "",
        f"Official DCASE score of every method; std = sample standard deviation (n - 1) over seeds; "
        f"seeds {' '.join(map(str, args.seeds))}; extra overrides: `{' '.join(args.extra) or 'none'}`; "
        f"{tree}; total wall time {total / 60:.1f} min.",
        "",
        overview_markdown({n: a for n, a in aggs.items() if a["stats"]}),
        "",
    ]
    sections = [
        config_markdown(name, runs[name], aggs[name], notes.get(name, ""))
        if runs[name]
        else f"### {name}\n\n{notes.get(name, '')}\n"
        for name in runs
    ]
    text = "\n".join(header + sections)
    print("\n" + text, flush=True)
    result = {
        "what": "official DCASE score of every method a train.py run reports, over seeds and configurations",
        "started": started,
        "total_wall_s": total,
        "seeds": args.seeds,
        "extra": args.extra,
        "out": str(out),
        "std": "sample (n - 1)",
        "noise": "within one std = |mean paired difference| <= sample std of the per-seed differences",
        "git": git_start,
        "git_at_end": git_end if changed else "unchanged",
        "machine": machine_info(),
        "configs": {
            name: {"note": notes.get(name, ""), "runs": [asdict(r) for r in runs[name]], **aggs[name]}
            for name in runs
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_quality.md").write_text(text)
    (args.results / "bench_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results / 'bench_quality.md'} and {args.results / 'bench_quality.json'}")


if __name__ == "__main__":
    main()
