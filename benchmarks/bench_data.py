"""Data throughput: WAV decode + cache + LogMel against a plain numpy/scipy pipeline.

Generates a synthetic dataset in a temporary folder and measures clips/s for
  cold   - AudioCache with an empty cache folder (decode every WAV, write the cache) + LogMel
  warm   - the same clips again from the cache (memory-mapped .npy) + LogMel
  numpy  - per clip: soundfile.read + numpy rfft of centred Hann frames + numpy mel matrix + log10
and, through the training loader (ClipDataset + a shuffling DataLoader, batches of --train-batch,
the log-mel a member's front end hands out per batch):
  epoch, audio cache     - waves from the warm audio cache, LogMel computed per batch (no feature cache)
  epoch, feature cache   - features from the warm feature cache (FeatureCache), served by LogMel.prime;
                           the second epoch; again with rows read through the map, not with pread
                           (WaveStore(pread=False)); how much the resident pages of mapped files grew
                           over each two epochs, and one row's read time with pread, through a kept
                           map and through a map unmapped after each row
  first pass             - cold audio cache + building the feature cache, against cold cache + LogMel
Each pipeline reports the best of --repeats runs (every run starts from a new, empty cache).
The WAVs were just written, so the OS page cache holds them in every pass: "cold" means asd's
cache is empty, not the disk. Results go to benchmarks/results/bench_data.json.

    python benchmarks/bench_data.py --clips 300
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from timing import write_result  # benchmarks/timing.py, beside this script
from transformers.audio_utils import mel_filter_bank

from asd.data.audio import AudioConfig
from asd.data.cache import AudioCache, FeatureCache, RowReader, unmap_rows
from asd.data.datamodule import ClipDataset, WaveStore
from asd.data.synthetic import SyntheticConfig, generate
from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.features import LogMel, feature_key

RESULTS = Path(__file__).resolve().parent / "results" / "bench_data.json"
SR, N_FFT, HOP, N_MELS = 16000, 1024, 512, 128


def make_dataset(root: Path, clips: int, duration: float) -> list[str]:
    """At least `clips` synthetic WAVs under `root`; returns the first `clips` paths (sorted)."""
    sections, machines = 2, 2
    per_section = max(1, -(-clips // (sections * machines)) - 4)  # 4 test clips per section come on top
    cfg = SyntheticConfig(
        sections=sections, source_train=per_section, target_train=0, test_per_class=1, duration=duration
    )
    generate(root, cfg)
    paths = sorted(str(p) for p in root.rglob("*.wav"))
    return paths[:clips]


def logmel_all(fe: LogMel, waves: np.ndarray, batch: int) -> torch.Tensor:
    """(N, T) -> (N, n_mels, frames) in batches, as a DataLoader would feed a branch."""
    with torch.inference_mode():
        return torch.cat(
            [fe(torch.from_numpy(np.array(waves[i : i + batch]))) for i in range(0, len(waves), batch)]
        )


def numpy_logmel(path: str, mel: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The plain pipeline for one clip: (n_mels, frames) float32."""
    wave, _ = sf.read(path, dtype="float32")  # (T,)
    padded = np.pad(wave, N_FFT // 2)  # centre, zero padding
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (frames, N_FFT)
    spec = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, F)
    return (10.0 * np.log10(mel @ spec.T + sys.float_info.epsilon)).astype(np.float32)  # (n_mels, frames)


def loader_epoch(fe: LogMel, dataset: ClipDataset, batch: int) -> int:
    """One shuffled training epoch over `dataset`: the log-mel of every batch as a member gets it
    (served from the batch's cached features when it has them, else computed); returns the clips."""
    key = feature_key(fe)
    seen = 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for b in loader:
            if key in b:
                fe.prime(b["wave"], b[key])
            seen += len(fe(b["wave"]))
    return seen


def resident_file_mb() -> float:
    """This process's resident pages of mapped files (RssFile, Linux), MB; 0 where /proc has none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    return next(
        (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssFile:")), 0.0
    )


def row_read_us(waves: np.ndarray) -> dict[str, float]:
    """Microseconds per row of `waves` (a cache file's map; its pages in the page cache), every row
    in a shuffled order: with pread, through a map kept (a first pass maps them), and through the
    map with each row unmapped after its copy. Leaves the map unmapped."""
    order = np.random.default_rng(0).permutation(len(waves))
    reader = RowReader(waves)

    def kept() -> None:
        for i in order:
            np.array(waves[i])

    def unmapped() -> None:
        for i in order:
            np.array(waves[i])
            unmap_rows(waves, int(i), int(i) + 1)

    def pread() -> None:
        for i in order:
            reader.read(int(i))

    out = {}
    for how, fn in (("pread", pread), ("map kept", kept), ("map, unmapped per row", unmapped)):
        fn()  # warm: the page cache, and for `kept` the map
        out[how] = timed(fn)[1] / len(order) * 1e6
    unmap_rows(waves, 0, len(waves))
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(clips: int, duration: float, batch: int, repeats: int, train_batch: int = 16) -> dict:
    """Measure the three pipelines on `clips` synthetic clips of `duration` seconds, best of `repeats`."""
    fe = LogMel(sample_rate=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS)
    mel = mel_filter_bank(N_FFT // 2 + 1, N_MELS, 0.0, SR / 2, SR, norm="slaney", mel_scale="slaney").T
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    best: dict[str, tuple[float, float]] = {}  # pipeline -> (seconds to get the waves, seconds of features)
    grown = {"rows read with pread": 0.0, "rows read through the map": 0.0}  # resident file MB, most
    rows_us: dict[str, float] = {}  # how a row is read -> best microseconds per row

    def keep(name: str, load_s: float, feat_s: float) -> None:
        if name not in best or load_s + feat_s < sum(best[name]):
            best[name] = (load_s, feat_s)

    with tempfile.TemporaryDirectory(prefix="asd-bench-") as tmp:
        paths, gen_s = timed(lambda: make_dataset(Path(tmp) / "synthetic", clips, duration))
        for r in range(repeats):
            cache = AudioCache(Path(tmp) / f"cache{r}", AudioConfig(sample_rate=SR))  # empty: a cold start
            cold, cold_load_s = timed(lambda cache=cache: cache.load(paths, "bench"))
            feats_cold, cold_feat_s = timed(lambda cold=cold: logmel_all(fe, cold.waves, batch))
            warm, warm_load_s = timed(lambda cache=cache: cache.load(paths, "bench"))
            feats_warm, warm_feat_s = timed(lambda warm=warm: logmel_all(fe, warm.waves, batch))
            ref, numpy_s = timed(lambda: [numpy_logmel(p, mel, window) for p in paths])
            feats, build_s = timed(lambda warm=warm: FeatureCache(fe).load(warm.waves))
            if not np.allclose(feats, feats_warm.numpy(), rtol=0, atol=1e-4):
                raise RuntimeError("the feature cache differs from LogMel computed per batch")
            table = ClipTable([Clip(path=p, machine="m", section="00") for p in warm.paths])
            labels = {"index": torch.arange(len(table))}
            plain = ClipDataset(table, WaveStore([warm.waves]), labels)
            cached, mapped = (
                ClipDataset(
                    table,
                    WaveStore([warm.waves], pread=pread),
                    labels,
                    {feature_key(fe): WaveStore([feats], pread=pread)},
                )
                for pread in (True, False)
            )
            _, plain_s = timed(lambda plain=plain: loader_epoch(fe, plain, train_batch))
            for touched in (cold.waves, warm.waves, feats):  # mapped whole by the passes above
                unmap_rows(touched, 0, len(touched))
            # two epochs each, the second timed (the first reads the files into the page cache);
            # the growth of mapped files' resident pages over both
            before = resident_file_mb()
            loader_epoch(fe, cached, train_batch)
            _, cached_s = timed(lambda cached=cached: loader_epoch(fe, cached, train_batch))
            grown["rows read with pread"] = max(grown["rows read with pread"], resident_file_mb() - before)
            before = resident_file_mb()
            loader_epoch(fe, mapped, train_batch)
            _, mapped_s = timed(lambda mapped=mapped: loader_epoch(fe, mapped, train_batch))
            grown["rows read through the map"] = max(
                grown["rows read through the map"], resident_file_mb() - before
            )
            for how, us in row_read_us(warm.waves).items():
                rows_us[how] = min(rows_us.get(how, float("inf")), us)
            if cold.hit or not warm.hit or len(warm.paths) != len(paths):
                raise RuntimeError(f"expected a cache miss then a hit on {len(paths)} clips, got {cold.hit=}")
            if not torch.equal(feats_cold, feats_warm):
                raise RuntimeError("features from the cold and the warm cache differ")
            keep("cold cache + LogMel", cold_load_s, cold_feat_s)
            keep("warm cache + LogMel", warm_load_s, warm_feat_s)
            keep("numpy/scipy per clip", 0.0, numpy_s)
            keep("first pass: cold cache + feature cache", cold_load_s, build_s)
            keep("epoch, audio cache + LogMel per batch", 0.0, plain_s)
            keep("epoch, feature cache", 0.0, cached_s)
            keep("epoch, feature cache, rows read through the map", 0.0, mapped_s)
            del cached, mapped, feats, warm, cold, plain  # close this repeat's maps

    # both pipelines compute the same features, so their speeds are comparable
    diff = float(max(np.abs(feats_warm[i].numpy() - ref[i]).max() for i in range(0, len(paths), 17)))
    n = len(paths)
    numpy_s = sum(best["numpy/scipy per clip"])
    base = n / numpy_s
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "clips": n,
        "duration_s": duration,
        "batch": batch,
        "train_batch": train_batch,
        "repeats": repeats,
        "generate_s": round(gen_s, 2),
        "max_abs_diff_db": diff,
        "resident_file_growth_mb": {k: round(v, 1) for k, v in grown.items()},
        "row_read_us": {k: round(v, 1) for k, v in rows_us.items()},
        "pipelines": {
            name: {
                "seconds": round(load + feat, 3),
                "load_s": round(load, 3),
                "features_s": round(feat, 3),
                "clips_per_s": round(n / (load + feat), 1),
                "vs_numpy": round(n / (load + feat) / base, 2),
            }
            for name, (load, feat) in best.items()
        },
    }


def markdown(res: dict) -> str:
    """One line for a results table."""
    cells = ", ".join(
        f"{k} {v['clips_per_s']:.0f}/s ({v['vs_numpy']:.1f}x)" for k, v in res["pipelines"].items()
    )
    return (
        f"| {res['date'][:10]} | {res['clips']} x {res['duration_s']:g} s | {res['cpu_count']} CPU, "
        f"torch {res['torch']} | {cells} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300, help="number of synthetic clips (default 300)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per clip (default 10, as DCASE)"
    )
    parser.add_argument("--batch", type=int, default=32, help="LogMel batch size (default 32)")
    parser.add_argument("--train-batch", type=int, default=16, help="training loader batch (default 16)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="report the best of this many runs (default 3)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = parser.parse_args(argv)
    try:
        for key in ("clips", "batch", "repeats", "train_batch"):
            if getattr(args, key) < 1:
                raise AsdError(f"--{key}={getattr(args, key)} must be at least 1")
        res = run(args.clips, args.duration, args.batch, args.repeats, args.train_batch)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["markdown"] = markdown(res)
    print(f"{res['clips']} clips x {res['duration_s']:g} s, {res['cpu_count']} CPUs, torch {res['torch']}")
    print(f"{'pipeline':<40}{'load s':>8}{'features s':>12}{'total s':>9}{'clips/s':>9}{'vs numpy':>10}")
    for name, r in res["pipelines"].items():
        print(
            f"{name:<40}{r['load_s']:>8.2f}{r['features_s']:>12.2f}{r['seconds']:>9.2f}"
            f"{r['clips_per_s']:>9.1f}{r['vs_numpy']:>9.2f}x"
        )
    print("(numpy/scipy reads and computes per clip: its load is inside its features time)")
    print(f"LogMel vs numpy features: max |diff| {res['max_abs_diff_db']:.2e} dB")
    for name, mb in res["resident_file_growth_mb"].items():
        print(f"two epochs, {name}: resident pages of mapped files grew by {mb:.0f} MB")
    cells = ", ".join(f"{how} {us:.0f} us" for how, us in res["row_read_us"].items())
    print(f"one row of the audio cache ({res['duration_s']:g} s), best per row: {cells}")
    print(res["markdown"])
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
