"""Score new recordings with a finished run: anomaly scores and decisions per file.

    python tools/score.py run=RUN inputs=FILE_OR_DIR [inputs=FILE_OR_DIR ...] [out=CSV]
                          [machine=NAME section=XX] [domain=source|target] [batch_size=N] [hop=SECONDS]

`inputs=` may be given several times; `inputs=@LIST.txt` reads one file or folder per line
(paths may hold commas, spaces or `=`). Folders are searched for .wav files. Files named by a
DCASE or MIMII convention carry their machine, section and domain; other names (a plant's own
recordings) need `machine=` and `section=`. Prints one CSV row per file (file, machine, section,
every member, every fusion, final, decision, window_start, windows) and writes it to `out=`.
Scores go through the same path as the run's own test clips, with the run's batch size unless
`batch_size=` says otherwise, so the run's test files score exactly as in its scores.csv.

A file longer than the run's clips (`data.audio.duration`) is not cut: it is scored in windows of
that length every `hop=` seconds (default: the window's length; the last window ends at the end
of the file). Its row is its most anomalous window, the one with the highest final score, so the
file's score is the maximum over its windows; `window_start` says where that window begins
(seconds) and `windows` how many there were. A shorter file is padded as the run's clips were.
Both are said once on stderr, with counts.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# only what reading the arguments needs: a bad argument or --help is answered before torch loads (6-8 s)
from asd.allocator import reuse_freed_memory
from asd.data.index import parse_path
from asd.data.table import DOMAIN_IDS, Clip
from asd.errors import AsdError, disk_fault
from asd.fileio import write_text_atomic

if TYPE_CHECKING:
    import numpy as np

    from asd.data.audio import AudioConfig
    from asd.run import FinishedRun

KEYS = ("run", "inputs", "out", "machine", "section", "domain", "batch_size", "hop")

log = logging.getLogger("score")


def parse_args(argv: list[str]) -> dict[str, list[str]]:
    args: dict[str, list[str]] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise AsdError(f"argument {a!r}: expected key=value with key one of {KEYS} (see --help)")
        if key != "inputs" and key in args:
            raise AsdError(f"{key}= given twice; only inputs= may repeat")
        args.setdefault(key, []).append(value)
    for need in ("run", "inputs"):
        if need not in args:
            raise AsdError(f"missing {need}=...; usage: python tools/score.py run=RUN inputs=FILE_OR_DIR")
    return args


def list_inputs(specs: list[str]) -> list[Path]:
    """The .wav files the `inputs=` values name: files, folders, or @lists of either."""
    files: list[Path] = []
    for spec in specs:
        if spec.startswith("@"):
            listing = Path(spec[1:]).expanduser()
            if not listing.is_file():
                raise AsdError(f"inputs={spec}: no such list file")
            entries = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            if not entries:
                raise AsdError(f"inputs={spec}: the list names no file")
            files.extend(list_inputs(entries))
            continue
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() == ".wav")
            if not found:
                raise AsdError(f"inputs={p}: the folder holds no .wav files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise AsdError(f"inputs={p}: no such file or folder")
    return files


def identify(path: Path, args: dict[str, str]) -> Clip:
    """The clip a file is: from its name, else from the machine=/section= arguments."""
    domain = args.get("domain")
    if domain is not None and domain not in DOMAIN_IDS:
        raise AsdError(f"domain={domain!r}: expected one of {list(DOMAIN_IDS)}")
    if "machine" in args or "section" in args:
        if not ("machine" in args and "section" in args):
            raise AsdError("give both machine= and section= (or neither, for DCASE/MIMII-named files)")
        return Clip(
            str(path.resolve()),
            args["machine"],
            args["section"].zfill(2),
            domain or "none",
            "test",
            "unknown",
        )
    try:
        clip = parse_path(path)
    except AsdError as e:
        raise AsdError(
            f"{path}: its name says nothing of machine and section; add machine=NAME section=XX. ({e})"
        ) from None
    return dataclasses.replace(clip, domain=domain) if domain else clip


def batch_size_of(args: dict[str, str]) -> int | None:
    if "batch_size" not in args:
        return None
    value = args["batch_size"]
    if not value.isdigit() or int(value) < 1:
        raise AsdError(f"batch_size={value!r}: expected a whole number of clips >= 1")
    return int(value)


def hop_of(args: dict[str, str], audio: AudioConfig) -> int | None:
    """The windows' step in samples: `hop=` seconds, else the window's length; None without windows."""
    n = audio.num_samples
    if n is None:
        if "hop" in args:
            raise AsdError("hop= needs a run with a clip length (data.audio.duration); this one has none")
        return None  # the run kept each clip's own length: a file is scored whole
    if "hop" not in args:
        return n
    try:
        hop = float(args["hop"])
    except ValueError:
        hop = float("nan")
    if not 0 < hop <= audio.duration:
        raise AsdError(
            f"hop={args['hop']!r}: expected seconds in (0, {audio.duration:g}], the run's clip length; "
            "a longer step would leave parts of a file unscored"
        )
    return max(1, round(hop * audio.sample_rate))


class Windows:
    """The windows' waves, as a part of a WaveStore: each file decoded whole, once, when first asked for.

    Windows of one file are consecutive and read in order, so one decoded file is kept at a time.
    """

    def __init__(self, paths: list[str], items: list[tuple[int, int]], audio: AudioConfig):
        import numpy as np

        self.paths, self.items, self.audio = paths, items, audio  # items: (file index, start sample)
        self.whole = dataclasses.replace(audio, duration=None, window=None, window_hop=None)
        self.loaded, self.wave = -1, np.zeros(0, np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        from asd.data.audio import fit_length, load_audio

        f, start = self.items[i]
        if f != self.loaded:
            self.loaded, self.wave = f, load_audio(self.paths[f], self.whole)  # (T_file,)
        n = self.audio.num_samples or len(self.wave)
        return fit_length(self.wave[start : start + n], self.audio)  # (n,): a short file is padded


def score_windows(
    run: FinishedRun, files: list[Path], clips: list[Clip], hop: int | None, batch_size: int | None
) -> tuple[dict[str, np.ndarray], list[int], list[int]]:
    """Every column of each file's most anomalous window (highest `final`), that window's start in
    samples, and each file's number of windows."""
    import numpy as np
    import torch

    from asd.data.audio import length_changes, own_length
    from asd.data.datamodule import ClipDataset, WaveStore
    from asd.data.windows import window_starts, windowing_of
    from asd.run.predict import predict

    n = run.audio.num_samples
    lengths = [own_length(f, run.audio) for f in files]
    starts = [window_starts(t, n, hop) for t in lengths]
    items = [(f, start) for f, s in enumerate(starts) for start in s]
    labelled = run.dataset([clips[f] for f, _ in items])
    waves = WaveStore([Windows([str(f) for f in files], items, run.audio)])
    dataset = ClipDataset(labelled.table, waves, labelled.labels)
    device, batch_size = torch.device("cpu"), batch_size or run.batch_size
    columns = predict(
        run.ensemble,
        run.calibration,
        dataset,
        device,
        batch_size,
        what="inputs",
        windowing=windowing_of(run.audio),
        copies=run.copies,
    )
    counts = [len(s) for s in starts]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)  # each file's first window
    best = [int(o + np.argmax(columns["final"][o : o + k])) for o, k in zip(first, counts, strict=True)]
    long = sum(n is not None and t > n for t in lengths)
    if long:
        log.warning(
            "%d file(s) longer than the run's %g s clips were scored in windows of %g s every %g s (hop=); "
            "each row is the file's most anomalous window, the one with the highest final score (the "
            "file's score is the maximum over its windows), and window_start says where it begins",
            long,
            run.audio.duration,
            run.audio.duration,
            hop / run.audio.sample_rate,
        )
    padded = length_changes([t for t in lengths if n is not None and t < n], run.audio)
    if padded:
        log.warning("%s, as the run's own clips were (its data.audio.pad)", padded)
    return {k: v[best] for k, v in columns.items()}, [items[i][1] for i in best], counts


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        reuse_freed_memory()  # ASD_MALLOC: freed tensors stay in the process for the next batch
        parsed = parse_args(argv)
        args = {k: v[0] for k, v in parsed.items() if k != "inputs"}
        batch_size = batch_size_of(args)
        from asd.run import FinishedRun  # torch, Lightning and the members: after the arguments are read
        from asd.run.report import csv_text, score_cells, score_names

        run = FinishedRun(args["run"])
        hop = hop_of(args, run.audio)
        files = list_inputs(parsed["inputs"])
        clips = [identify(f, args) for f in files]
        columns, starts, counts = score_windows(run, files, clips, hop, batch_size)
        names = score_names(columns)
        sr = run.audio.sample_rate
        rows = (
            [
                str(f),
                c.machine,
                c.section,
                *score_cells(columns, names, i),
                f"{starts[i] / sr:.3f}",
                counts[i],
            ]
            for i, (f, c) in enumerate(zip(files, clips, strict=True))
        )
        text = csv_text(["file", "machine", "section", *names, "window_start", "windows"], rows)
        if "out" in args:
            out = Path(args["out"]).expanduser()
            try:
                write_text_atomic(out, text)
            except OSError as e:
                fault = disk_fault(e, out.parent, "pass out= a file on another disk")
                if fault is None:
                    raise
                raise fault from e
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
