"""Score new recordings with a finished run: anomaly scores and decisions per file.

    python tools/score.py run=RUN inputs=FILE_OR_DIR [inputs=FILE_OR_DIR ...] [out=CSV]
                          [machine=NAME section=XX] [domain=source|target] [batch_size=N]

`inputs=` may be given several times; `inputs=@LIST.txt` reads one file or folder per line
(paths may hold commas, spaces or `=`). Folders are searched for .wav files. Files named by a
DCASE or MIMII convention carry their machine, section and domain; other names (a plant's own
recordings) need `machine=` and `section=`. Prints one CSV row per file (file, machine, section,
every member, every fusion, final, decision) and writes it to `out=`. Scores go through the
same path as the run's own test clips, with the run's batch size unless `batch_size=` says
otherwise, so the run's test files score exactly as in its scores.csv.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from asd.data.index import parse_path
from asd.data.table import DOMAIN_IDS, Clip
from asd.errors import AsdError
from asd.fileio import write_text_atomic
from asd.run import FinishedRun
from asd.run.report import csv_text, score_cells, score_names

KEYS = ("run", "inputs", "out", "machine", "section", "domain", "batch_size")


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


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        parsed = parse_args(argv)
        args = {k: v[0] for k, v in parsed.items() if k != "inputs"}
        batch_size = batch_size_of(args)
        run = FinishedRun(args["run"])
        files = list_inputs(parsed["inputs"])
        clips = [identify(f, args) for f in files]
        columns = run.score(clips, batch_size)
        names = score_names(columns)
        rows = (
            [str(f), c.machine, c.section, *score_cells(columns, names, i)]
            for i, (f, c) in enumerate(zip(files, clips, strict=True))
        )
        text = csv_text(["file", "machine", "section", *names], rows)
        if "out" in args:
            write_text_atomic(Path(args["out"]).expanduser(), text)
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
