"""What the speed copies cost the backends stage: the `stats` reference's features of training clips.

With `branches.stats.speeds` (on by default since 2026-12-06) the backends stage computes, for
each training clip, its own features and those of one resampled copy per factor (log-mel, time
statistics and the short-hop modulation of each). This script times `backend_features` of the
default `stats` node with and without the copies, on random 10 s clips at 16 kHz in batches as
the stage reads them; the two take turns and each keeps its fastest round (`timing.best_times`).
It prints clips/s and the ratio, and what the copies add to the backends stage per 1,000
training clips. Test clips are never copied, so scoring does not change.

    python benchmarks/bench_copies.py                  # ~30 s on 2 cores
    python benchmarks/bench_copies.py --clips 128 --batch 32

Writes `benchmarks/results/<name>.{json,md}` (default name bench_copies).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_statistics import reference_settings  # noqa: E402
from timing import best_times, environment, write_tables  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def features_of_all(ref: torch.nn.Module, wave: torch.Tensor, batch: int) -> int:
    """`backend_features` of every clip of `wave` (N, T), `batch` clips at a time; the row width."""
    width = 0
    with torch.inference_mode():
        for i in range(0, len(wave), batch):
            width = ref.backend_features({"wave": wave[i : i + batch]}).shape[1]
    return width


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=64, help="random clips timed per round")
    p.add_argument("--batch", type=int, default=16, help="clips per backend_features call")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each side keeps its fastest")
    p.add_argument("--name", default="bench_copies", help="result name under benchmarks/results/")
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    node = reference_settings()
    if not node.speeds:
        raise SystemExit("conf/branches/default.yaml sets no branches.stats.speeds: nothing to compare")
    sr = int(node.frontend.sample_rate)
    wave = 0.1 * torch.randn(args.clips, round(args.seconds * sr), generator=torch.Generator().manual_seed(0))
    plain = instantiate(node, speeds=[]).eval()
    copies = instantiate(node).eval()
    features_of_all(plain, wave[: args.batch], args.batch)  # warm-up: filters, FFT plans
    features_of_all(copies, wave[: args.batch], args.batch)
    (t_plain, t_copies), (w_plain, w_copies) = best_times(
        [lambda: features_of_all(plain, wave, args.batch), lambda: features_of_all(copies, wave, args.batch)],
        args.rounds,
    )
    rate_plain, rate_copies = args.clips / t_plain, args.clips / t_copies
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench_copies.py", *given]),
        "environment": environment(torch.device("cpu")),
        "speeds": list(node.speeds),
        "clips": args.clips,
        "batch": args.batch,
        "seconds": args.seconds,
        "feature_width": {"without": w_plain, "with": w_copies},
        "clips_per_s": {"without": rate_plain, "with": rate_copies},
        "ratio_without_over_with": rate_plain / rate_copies,
        "added_s_per_1000_training_clips": 1000 / rate_copies - 1000 / rate_plain,
    }
    lines = [
        f"# Speed copies in the backends stage ({result['date']})",
        "",
        f"`{result['command']}`; {args.clips} random clips of {args.seconds:g} s at {sr} Hz, "
        f"batches of {args.batch}, fastest of {args.rounds} rounds; copies at {list(node.speeds)}",
        "",
        "| `stats` backend features | clips/s | values per clip |",
        "| --- | --- | --- |",
        f"| without copies (`branches.stats.speeds=[]`) | {rate_plain:.1f} | {w_plain} |",
        f"| with the default copies | {rate_copies:.1f} | {w_copies} |",
        "",
        f"Without / with: {result['ratio_without_over_with']:.2f}x; the copies add "
        f"{result['added_s_per_1000_training_clips']:.1f} s to the backends stage per 1,000 training clips "
        "(once per run; test clips are not copied).",
        "",
    ]
    write_tables(args.results, args.name, result, lines)
    return result


if __name__ == "__main__":
    main()
