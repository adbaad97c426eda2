"""The entry points' malloc setting (`asd.allocator`): freed memory reused against glibc's defaults.

    python benchmarks/bench_allocator.py                # CPU, ~2 min on 2 cores
    python benchmarks/bench_allocator.py --rounds 5 --clips 32

The setting is process-wide, so each measurement is a fresh process: `--rounds` pairs of
children, ASD_MALLOC=system then ASD_MALLOC=reuse (the default), on the first-shot synthetic valve
with the default members and references (`first_shot` of benchmarks/bench_frontend.py). Each child
times `asd.run.predict.member_scores` of `--clips` clips of 10 s (a fresh copy of the batch every
call, so no memo from the call before; `--repeats` calls after one warm-up) and one training
forward + backward of every member (`Ensemble.losses`), and counts the minor page faults of the
scoring calls (getrusage). Reported per setting: the best and the median scoring call, clips/s,
the training pass, page faults per call and peak RSS; per round the ratio system / reuse (the two
children of a round run one after the other, so a burst of load from other processes hits both);
and the largest difference between the two settings' scores (an allocator moves no number).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: system / reuse per round, of these measurements
RATIOS = {
    "scoring_ratio_best": "scoring_best_ms",
    "scoring_ratio_median": "scoring_median_ms",
    "training_ratio_best": "training_pass_best_ms",
}
sys.path.insert(0, str(REPO / "benchmarks"))


def child(clips: int, repeats: int, scores_out: Path) -> dict:
    """One process's measurements under the ASD_MALLOC it was started with."""
    from asd.allocator import allocator_choice, reuse_freed_memory

    reused = reuse_freed_memory()
    import torch
    from bench_frontend import first_shot, training_pass

    from asd.run.predict import member_scores

    _, ensemble, batch = first_shot(clips)
    n = len(batch["wave"])

    def fresh() -> dict:
        return {k: v.clone() for k, v in batch.items()}

    ensemble.eval()
    times = []
    with torch.no_grad():
        scores = member_scores(ensemble, fresh())  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            start = time.perf_counter()
            member_scores(ensemble, fresh())
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    torch.save({k: v.cpu() for k, v in scores.items()}, scores_out)
    ensemble.train()
    training_pass(ensemble, fresh())  # warm-up
    train_times = []
    for _ in range(max(2, repeats // 3)):
        start = time.perf_counter()
        training_pass(ensemble, fresh())
        train_times.append(time.perf_counter() - start)
    return {
        "allocator": allocator_choice(),
        "reuses_freed_memory": reused,
        "clips": n,
        "scoring_best_ms": 1000 * min(times),
        "scoring_median_ms": 1000 * statistics.median(times),
        "scoring_clips_per_s_best": n / min(times),
        "scoring_clips_per_s_median": n / statistics.median(times),
        "page_faults_per_scoring_call": faults / repeats,
        "training_pass_best_ms": 1000 * min(train_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(setting: str, args, scores_out: Path) -> dict:
    env = {**os.environ, "ASD_MALLOC": setting}
    cmd = [sys.executable, __file__, "--child", str(scores_out), "--clips", str(args.clips)]
    res = subprocess.run([*cmd, "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"ASD_MALLOC={setting} child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_allocator")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.clips, args.repeats, args.child)))
        return

    import torch
    from timing import environment, write_tables

    work = Path(f"/tmp/bench_allocator_{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        pair = {s: run_child(s, args, work / f"{s}_{r}.pt") for s in ("system", "reuse")}
        for ratio, key in RATIOS.items():
            pair[ratio] = pair["system"][key] / pair["reuse"][key]
        a, b = torch.load(work / f"system_{r}.pt"), torch.load(work / f"reuse_{r}.pt")
        pair["largest_score_difference"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        rounds.append(pair)
        print(f"round {r}: system/reuse scoring {pair['scoring_ratio_best']:.2f}x (best), "
              f"{pair['scoring_ratio_median']:.2f}x (median)", flush=True)  # fmt: skip
    env = environment(torch.device("cpu"))
    result = {"what": __doc__.splitlines()[0], **env, "rounds": rounds}
    lines = [
        f"# {result['what']}",
        "",
        f"{rounds[0]['reuse']['clips']} clips of 10 s per scoring call, {args.repeats} calls per process; "
        f"{env['torch_threads']} torch threads; load average {env['load_average_1min']:.2f} at the end.",
        "",
        "| round | ASD_MALLOC | scoring best (ms) | median (ms) | clips/s (median) | page faults per call "
        "| training pass (ms) | peak RSS (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, pair in enumerate(rounds):
        for s in ("system", "reuse"):
            m = pair[s]
            lines.append(
                f"| {r} | {s} | {m['scoring_best_ms']:.0f} | {m['scoring_median_ms']:.0f} | "
                f"{m['scoring_clips_per_s_median']:.1f} | {m['page_faults_per_scoring_call']:.0f} | "
                f"{m['training_pass_best_ms']:.0f} | {m['peak_rss_mb']:.0f} |"
            )
    lines += [
        "",
        "| round | system / reuse, scoring best | median | training pass | largest score difference |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r} | {p['scoring_ratio_best']:.2f}x | {p['scoring_ratio_median']:.2f}x | "
            f"{p['training_ratio_best']:.2f}x | {p['largest_score_difference']:.3g} |"
            for r, p in enumerate(rounds)
        ),
        "",
    ]
    write_tables(args.out.parent, args.out.name, result, lines)


if __name__ == "__main__":
    main()
