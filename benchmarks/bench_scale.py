"""The default pipeline end to end as the data grows: time per stage, peak RSS, cache disk, scoring rate.

    python benchmarks/bench_scale.py                # 1k 3k 6k training clips: hours on 2 cores
    python benchmarks/bench_scale.py --clips 250 500 1000 --extra trainer.max_epochs=1

For each count N in `--clips`: the built-in synthetic generator writes N training clips of
`--duration` s (default 10) over two machines and as many sections as N / 200 (each section 5
target clips, the rest source) plus `--test-per-class` test clips per class, domain and section,
into a fresh `ASD_CACHE` under `--out`; then one `python train.py` (the default members and
settings, `plots=false`, plus `--extra`) under `flock /tmp/torch.lock`, timed with GNU time.

Reported per N: wall time of `prepare` (settings, generation, indexing, decoding) and of each
stage (from train.py's "done in" log lines), peak RSS (GNU time; it counts resident pages of
mapped files, which the kernel can drop: the cache files' pages until 2026-12-05, when rows came
to be read with pread and the builders to unmap what they wrote) and peak anonymous memory
(sampled from /proc twice a second over the process tree: what has to fit in RAM), disk used by the
synthetic WAVs, by the decoded-audio cache and by the feature cache beside it, and the predict
stage's test clips per second.
Growth: each stage's seconds per training clip at N over the same at the smallest N (1.0 =
linear; within 0.8-1.2 counts as linear). Writes benchmarks/results/bench_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LOCK = "/tmp/torch.lock"
GNU_TIME = "/usr/bin/time"
STAGE_LINE = re.compile(r"\] - (?:stage )?(\w+): (?:.*: )?done in ([0-9.]+) s")
MACHINES = ("rotor", "valve")
TARGET_PER_SECTION = 5


def layout(clips: int) -> dict[str, int]:
    """Sections per machine and source clips per section for about `clips` training clips."""
    sections = max(1, round(clips / 200))
    per_section = max(TARGET_PER_SECTION + 1, clips // (len(MACHINES) * sections))
    return {"sections": sections, "source_train": per_section - TARGET_PER_SECTION}


def overrides(clips: int, duration: float, test_per_class: int, run_dir: Path, extra: list[str]) -> list[str]:
    shape = layout(clips)
    return [
        f"data.synthetic.machines=[{','.join(MACHINES)}]",
        f"data.synthetic.sections={shape['sections']}",
        f"data.synthetic.source_train={shape['source_train']}",
        f"data.synthetic.target_train={TARGET_PER_SECTION}",
        f"data.synthetic.test_per_class={test_per_class}",
        f"data.synthetic.duration={duration}",
        f"data.audio.duration={duration}",
        *extra,
        "plots=false",
        f"run_dir={run_dir}",
    ]


def disk_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file()) if path.exists() else 0


def stage_times(log_text: str) -> dict[str, float]:
    """Seconds of `prepare` and of each stage, from train.py's "done in" log lines."""
    return {m.group(1): float(m.group(2)) for m in STAGE_LINE.finditer(log_text)}


def tree_memory(pid: int) -> tuple[int, int]:
    """(resident, anonymous resident) kB of a process and all its descendants, from /proc.

    Resident memory counts the pages of mapped files the process holds (libraries; the cache files
    before they were read with pread); those belong to the page cache and the kernel drops them
    under pressure. Anonymous memory is what has to fit in RAM.
    """
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    rss = anon = 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon += int(line.split()[1])
    return rss, anon


def run_one(clips: int, args: argparse.Namespace) -> dict:
    where = args.out / f"n{clips}"
    cache, run_dir = where / "cache", where / "run"
    where.mkdir(parents=True, exist_ok=True)
    cmd = overrides(clips, args.duration, args.test_per_class, run_dir, args.extra)
    time_file = where / "time.txt"
    env = {**os.environ, "ASD_CACHE": str(cache), "WANDB_MODE": "offline"}
    full = ["flock", LOCK, GNU_TIME, "-f", "%e %M", "-o", str(time_file), sys.executable, "train.py", *cmd]
    print(f"N={clips}: python train.py {' '.join(cmd)}", flush=True)
    out, err = where / "train.out", where / "train.err"
    peak_rss = peak_anon = 0
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(full, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
        while proc.poll() is None:  # sampled twice a second: a shorter peak can be missed
            rss, anon = tree_memory(proc.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(0.5)
    row: dict = {"clips": clips, "overrides": cmd, "returncode": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (err.read_text().strip().splitlines() or ["no output"])[-1]
        return row
    wall, rss_kb = time_file.read_text().split()[-2:]
    times = stage_times((run_dir / "train.log").read_text())
    tested = len((run_dir / "scores.csv").read_text().splitlines()) - 1
    synthetic = cache / "synthetic"
    row.update(
        {
            "train_clips": training_clips(run_dir),
            "test_clips": tested,
            "wall_s": float(wall),
            "peak_rss_mb": float(rss_kb) / 1024,
            "peak_rss_sampled_mb": peak_rss / 1024,
            "peak_anonymous_mb": peak_anon / 1024,
            "stages_s": times,
            "disk_synthetic_mb": disk_bytes(synthetic) / 2**20,
            "disk_audio_cache_mb": (
                disk_bytes(cache) - disk_bytes(synthetic) - disk_bytes(cache, "*.features.*")
            )
            / 2**20,
            "disk_feature_cache_mb": disk_bytes(cache, "*.features.*") / 2**20,
            "scoring_clips_per_s": tested / times["predict"] if times.get("predict") else None,
        }
    )
    return row


def training_clips(run_dir: Path) -> int:
    """Training normals the run indexed (held-out ones included), from its log's data line."""
    found = re.search(r"data: (\d+) fit, (\d+) val, \d+ test clips", (run_dir / "train.log").read_text())
    return int(found.group(1)) + int(found.group(2)) if found else -1


def growth(rows: list[dict]) -> dict:
    """Each stage's seconds per clip at every N over the same at the smallest N (1.0 = linear)."""
    done = [r for r in rows if r.get("returncode") == 0]
    if len(done) < 2:
        return {}
    base = done[0]
    out = {}
    for stage in base["stages_s"]:
        per_clip0 = base["stages_s"][stage] / base["train_clips"]
        out[stage] = {
            str(r["train_clips"]): (r["stages_s"].get(stage, float("nan")) / r["train_clips"]) / per_clip0
            if per_clip0
            else None
            for r in done[1:]
        }
    return out


def markdown(result: dict) -> str:
    rows = [r for r in result["runs"] if r.get("returncode") == 0]
    stages = list(rows[0]["stages_s"]) if rows else []
    lines = [
        f"# bench_scale ({result['date']})",
        "",
        f"`python benchmarks/bench_scale.py {' '.join(result['argv'])}`; {result['duration']} s clips, "
        f"extra overrides: {result['extra'] or 'none'}",
        "",
        "| N clips | " + " | ".join(f"{s} s" for s in stages) + " | wall s | peak RSS MB | peak anonymous MB "
        "| synthetic WAV MB | audio cache MB | feature cache MB | scoring clips/s |",
        "| --- " * (len(stages) + 8) + "|",
    ]
    for r in rows:
        cells = [f"{r['stages_s'].get(s, float('nan')):.1f}" for s in stages]
        rate = f"{r['scoring_clips_per_s']:.1f}" if r["scoring_clips_per_s"] else "n/a"
        cells += [
            f"{r['wall_s']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_anonymous_mb']:.0f}",
            f"{r['disk_synthetic_mb']:.0f}",
            f"{r['disk_audio_cache_mb']:.0f}",
            f"{r.get('disk_feature_cache_mb', 0.0):.0f}",
            rate,
        ]
        lines.append(f"| {r['train_clips']} | " + " | ".join(cells) + " |")
    for r in result["runs"]:
        if r.get("returncode") != 0:
            lines.append(f"\nN={r['clips']} failed: {r.get('error')}")
    if result["growth"]:
        lines += ["", "Seconds per clip relative to the smallest N (1.0 = linear):", ""]
        ns = list(next(iter(result["growth"].values())))
        lines += ["| stage | " + " | ".join(f"N={n}" for n in ns) + " |", "| --- " * (len(ns) + 1) + "|"]
        for stage, by_n in result["growth"].items():
            lines.append(
                f"| {stage} | " + " | ".join(f"{v:.2f}" if v else "n/a" for v in by_n.values()) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[1000, 3000, 6000], help="training clips")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per clip")
    parser.add_argument("--test-per-class", type=int, default=5, help="test clips per class, domain, section")
    parser.add_argument("--out", type=Path, default=Path("/tmp/asd_bench_scale"))
    parser.add_argument("--extra", nargs="*", default=[], help="train.py overrides added to every run")
    parser.add_argument("--name", default="bench_scale", help="result files' name under benchmarks/results")
    args = parser.parse_args()
    if not Path(GNU_TIME).exists():
        sys.exit(f"error: {GNU_TIME} (GNU time) is needed for the peak RSS; install the `time` package")
    runs = []
    for clips in sorted(args.clips):
        start = time.perf_counter()
        runs.append(run_one(clips, args))
        print(
            json.dumps(runs[-1], indent=1),
            f"\n({time.perf_counter() - start:.0f} s with the wait)",
            flush=True,
        )
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "duration": args.duration,
        "extra": args.extra,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "growth": growth(runs),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {RESULTS / args.name}.{{json,md}}")


if __name__ == "__main__":
    main()
