"""Score new recordings with a finished run: anomaly scores and decisions per file.

    python tools/score.py run=RUN inputs=FILE_OR_DIR[,FILE_OR_DIR...] [out=CSV]
                          [machine=NAME section=XX] [domain=source|target] [batch_size=N]

Files named by a DCASE or MIMII convention carry their machine and section; other names
(a plant's own recordings) need `machine=` and `section=`. Prints one CSV row per file
(file, machine, section, every member, every fusion, final, decision) and writes it to `out=`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from asd.data.audio import audio_config, load_audio
from asd.data.index import parse_path
from asd.data.table import DOMAIN_IDS
from asd.errors import AsdError
from asd.fileio import write_text_atomic
from asd.pipeline import Run

KEYS = ("run", "inputs", "out", "machine", "section", "domain", "batch_size")


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise AsdError(f"argument {a!r}: expected key=value with key one of {KEYS} (see --help)")
        args[key] = value
    for need in ("run", "inputs"):
        if need not in args:
            raise AsdError(f"missing {need}=...; usage: python tools/score.py run=RUN inputs=FILES_OR_DIR")
    return args


def list_inputs(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in spec.split(","):
        p = Path(part).expanduser()
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


def identify(path: Path, args: dict[str, str]) -> tuple[str, str, str]:
    """(machine, section, domain) of a file: from its name, else from the machine=/section= arguments."""
    if "machine" in args or "section" in args:
        if not ("machine" in args and "section" in args):
            raise AsdError("give both machine= and section= (or neither, for DCASE/MIMII-named files)")
        return args["machine"], args["section"].zfill(2), args.get("domain", "none")
    try:
        clip = parse_path(path)
    except AsdError as e:
        raise AsdError(
            f"{path}: its name says nothing of machine and section; add machine=NAME section=XX. ({e})"
        ) from None
    return clip.machine, clip.section, args.get("domain", clip.domain)


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv)
        run = Run(args["run"])
        audio = audio_config(**run.facts["audio"])
        files = list_inputs(args["inputs"])
        if args.get("domain", "none") not in DOMAIN_IDS:
            raise AsdError(f"domain={args['domain']!r}: expected one of {list(DOMAIN_IDS)}")
        ids = [identify(f, args) for f in files]
        sections = [run.section_id(m, s) for m, s, _ in ids]
        batch_size = int(args.get("batch_size", 16))
        columns: dict[str, list[float]] = {}
        for start in range(0, len(files), batch_size):
            chunk = slice(start, start + batch_size)
            waves = torch.from_numpy(np.stack([load_audio(f, audio) for f in files[chunk]]))
            cols = run.score(
                waves,
                torch.tensor(sections[chunk]),
                torch.tensor([DOMAIN_IDS[d] for _, _, d in ids[chunk]]),
            )
            for k, v in cols.items():
                columns.setdefault(k, []).extend(v.tolist())
    except AsdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [k for k in columns if k not in ("final", "decision")] + ["final", "decision"]
    lines = [",".join(["file", "machine", "section", *names])]
    for i, f in enumerate(files):
        values = [str(int(columns[n][i])) if n == "decision" else repr(columns[n][i]) for n in names]
        lines.append(",".join([str(f), ids[i][0], ids[i][1], *values]))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if "out" in args:
        write_text_atomic(Path(args["out"]).expanduser(), text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
