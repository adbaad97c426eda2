"""Index a folder of DCASE Task 2 (2020-2025) or MIMII recordings into a `ClipTable`.

Everything comes from file and folder names; no audio is opened. The machine type is
always the folder above the split folder (`train/`, `test/`, `source_test/`, ...) or,
for MIMII, above `id_XX/`, so a dataset root, a `dev_data/raw/` folder and a single
machine folder all index the same way.

Rules that names alone cannot settle, decided here once:

- Attributes in a DCASE 2022+ name (`..._0000_vel_6_loc_A.wav`) are paired left to
  right as key, value (`{"vel": "6", "loc": "A"}`); a lone trailing token goes under
  the key `tag`; `noAttribute` alone means no attributes. An empty token (double or
  trailing underscore) or a repeated key is an error, never a guess.
- When `attributes_XX.csv` names a clip, its attributes *replace* those parsed from the
  name: the CSV is the official metadata and tells keys from values that contain `_`.
- DCASE 2024/2025 `supplemental/section_XX_{source,target}_supplemental_<rest>.wav`
  clips are kept as train normals carrying the attribute `{"supplemental": "<rest>"}`,
  so a model can use or exclude them with `ClipTable.select(where=...)`.
- DCASE 2021 eval clips in `source_test/` or `target_test/` take the domain of their
  folder; in `test/` their domain is "none".
- With `year=None`, a machine folder that has `source_test/` or `target_test/` is read
  as DCASE 2021 (all its section-named clips, `train/` included), others as 2022+.

One file: every year's naming rules in one place, so a name is judged by all of them at once
and a file that fits none gets one error listing the conventions.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from collections import defaultdict
from pathlib import Path

from asd.data.table import Clip, ClipTable
from asd.errors import AsdError

log = logging.getLogger(__name__)

CONVENTIONS = (
    "  DCASE 2020:      <machine>/{train,test}/{normal,anomaly}_id_XX_NNNNNNNN.wav"
    " (eval: <machine>/test/id_XX_NNNNNNNN.wav)\n"
    "  DCASE 2021:      <machine>/{train,test,source_test,target_test}/"
    "section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN[_<attrs>].wav"
    " (eval: section_XX_NNNN.wav in a test folder)\n"
    "  DCASE 2022-2025: <machine>/{train,test}/"
    "section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN_<attrs>.wav"
    " (eval: <machine>/test/section_XX_NNNN.wav;"
    " 2024+: <machine>/supplemental/section_XX_{source,target}_supplemental_<rest>.wav)\n"
    "  MIMII:           <machine>/id_XX/{normal,abnormal}/NNNNNNNN.wav"
)

YEARS = (2020, 2021, 2022, 2023, 2024, 2025)

_TEST_FOLDERS = ("test", "source_test", "target_test")
_R2020 = re.compile(r"(normal|anomaly)_id_([0-9]{2})_[0-9]+", re.ASCII)
_R2020_EVAL = re.compile(r"id_([0-9]{2})_[0-9]+", re.ASCII)
_RSECTION = re.compile(
    r"section_([0-9]{2})_(source|target)_(train|test)_(normal|anomaly)_[0-9]+(?:_(.*))?", re.ASCII | re.DOTALL
)
_RSECTION_EVAL = re.compile(r"section_([0-9]{2})_[0-9]+", re.ASCII)
_RSUPPLEMENTAL = re.compile(r"section_([0-9]{2})_(source|target)_supplemental_(.+)", re.ASCII | re.DOTALL)
_RMIMII = re.compile(r"[0-9]+", re.ASCII)
_RMIMII_ID = re.compile(r"id_([0-9]{2})", re.ASCII)
_RCSV = re.compile(r"attributes_[0-9]{2}\.csv", re.ASCII)


def _no_convention(path: Path, reason: str) -> AsdError:
    return AsdError(
        f"{path}: {reason}. Accepted naming conventions:\n{CONVENTIONS}\n"
        "Rename the file or move it into the right folder."
    )


def _wrong_year(path: Path, found: str, year: int | None) -> AsdError:
    return AsdError(
        f"{path}: this is {found}, but year={year} was asked for; "
        "leave year unset to read each file by its own convention, or pass the year the data is from"
    )


def _check_year(year: int | None) -> None:
    if year is not None and (isinstance(year, bool) or year not in YEARS):
        raise AsdError(f"year={year!r} is not a DCASE Task 2 year; use one of {YEARS} or leave it unset")


def parse_attributes(text: str) -> dict[str, str]:
    """Attributes from the tail of a DCASE 2022+ name: `vel_6_loc_A` -> `{"vel": "6", "loc": "A"}`.

    Tokens pair left to right; a lone trailing token goes under `tag`. Raises `ValueError`
    (turned into `AsdError` by `parse_path`) on an empty token or a repeated key.
    """
    if text == "noAttribute":
        return {}
    tokens = text.split("_")
    if "" in tokens:
        raise ValueError(f"empty attribute token in {text!r} (double or trailing underscore)")
    pairs = [(tokens[i], tokens[i + 1]) for i in range(0, len(tokens) - 1, 2)]
    if len(tokens) % 2:
        pairs.append(("tag", tokens[-1]))
    attributes: dict[str, str] = {}
    for key, value in pairs:
        if key in attributes:
            raise ValueError(f"attribute key {key!r} appears twice in {text!r}")
        attributes[key] = value
    return attributes


def _machine(path: Path, machine_dir: Path) -> str:
    if not machine_dir.name:
        raise _no_convention(path, "there is no machine folder above its split folder")
    return machine_dir.name


def parse_path(path: str | Path, year: int | None = None) -> Clip:
    """The clip a WAV path describes, from its file name and parent folders.

    `year` (2020..2025) forces that year's conventions; a file that contradicts it is an
    error. With `year=None` a section-named clip is DCASE 2021 when its folder is
    `source_test/` or `target_test/`, else DCASE 2022+ (`index_dataset` then makes a
    whole machine folder consistent). Any path that fits no convention raises `AsdError`.
    """
    _check_year(year)
    if not isinstance(path, str | os.PathLike) or not isinstance(os.fspath(path), str):
        raise AsdError(f"parse_path expects a file path as str or Path, got {type(path).__name__}")
    p = Path(os.path.abspath(path))
    name = p.name
    if not name.lower().endswith(".wav"):
        raise _no_convention(p, "only .wav files are clips")
    stem, folder = name[:-4], p.parent.name

    if m := _RSECTION.fullmatch(stem):
        section, domain, split, label, tail = m.groups()
        try:
            attributes = parse_attributes(tail) if tail is not None else {}
        except ValueError as e:
            raise _no_convention(p, str(e)) from None
        layout = _section_layout(p, folder, year)
        if split == "train" and folder != "train":
            raise _no_convention(
                p, f"the name says split 'train' but the file is in '{folder}/', not 'train/'"
            )
        if split == "test":
            if folder not in _TEST_FOLDERS:
                raise _no_convention(
                    p, f"the name says split 'test' but the file is in '{folder}/', not 'test/'"
                )
            if folder != "test" and not folder.startswith(domain):
                raise _no_convention(p, f"the name says domain '{domain}' but the file is in '{folder}/'")
        machine = _machine(p, p.parent.parent)
        return Clip(str(p), machine, section, domain, split, label, attributes, layout)

    if m := _RSECTION_EVAL.fullmatch(stem):
        if folder not in _TEST_FOLDERS:
            raise _no_convention(
                p, f"an unlabelled eval name belongs in test/, but the file is in '{folder}/'"
            )
        layout = _section_layout(p, folder, year)
        domain = folder.removesuffix("_test") if folder != "test" else "none"
        machine = _machine(p, p.parent.parent)
        return Clip(str(p), machine, m.group(1), domain, "test", "unknown", {}, layout)

    if m := _RSUPPLEMENTAL.fullmatch(stem):
        if year not in (None, 2024, 2025):
            raise _wrong_year(p, "a supplemental clip (DCASE 2024/2025 only)", year)
        if folder != "supplemental":
            raise _no_convention(
                p, f"a supplemental clip belongs in supplemental/, but the file is in '{folder}/'"
            )
        section, domain, rest = m.groups()
        machine = _machine(p, p.parent.parent)
        return Clip(str(p), machine, section, domain, "train", "normal", {"supplemental": rest}, "dcase2022")

    if m := _R2020.fullmatch(stem) or _R2020_EVAL.fullmatch(stem):
        if year not in (None, 2020):
            raise _wrong_year(p, "a DCASE 2020 name", year)
        labelled = m.re is _R2020
        if folder not in (("train", "test") if labelled else ("test",)):
            where = "train/ or test/" if labelled else "test/ (an unlabelled eval name)"
            raise _no_convention(p, f"a DCASE 2020 clip belongs in {where}, but the file is in '{folder}/'")
        label = m.group(1) if labelled else "unknown"
        section = m.group(2) if labelled else m.group(1)
        machine = _machine(p, p.parent.parent)
        return Clip(str(p), machine, section, "none", folder, label, {}, "dcase2020")

    if _RMIMII.fullmatch(stem) and folder in ("normal", "abnormal"):
        if not (m := _RMIMII_ID.fullmatch(p.parent.parent.name)):
            raise _no_convention(p, f"a MIMII clip's folder above '{folder}/' must be id_XX")
        if year is not None:
            raise _wrong_year(p, "a MIMII clip", year)
        machine = _machine(p, p.parent.parent.parent)
        label = "normal" if folder == "normal" else "anomaly"
        return Clip(str(p), machine, m.group(1), "none", "test", label, {}, "mimii")

    raise _no_convention(p, "the file name fits no convention")


def _section_layout(path: Path, folder: str, year: int | None) -> str:
    """`dcase2021` or `dcase2022` for a section-named clip, checked against a forced year."""
    if year == 2020:
        raise _wrong_year(path, "a DCASE 2021+ name", year)
    if folder in ("source_test", "target_test"):
        if year is not None and year != 2021:
            raise _wrong_year(path, f"a DCASE 2021 clip (in '{folder}/')", year)
        return "dcase2021"
    return "dcase2021" if year == 2021 else "dcase2022"


def index_dataset(
    root: str | Path,
    year: int | None = None,
    machines: list[str] | None = None,
    mimii_train_normals: int | None = None,
    seed: int = 0,
) -> ClipTable:
    """Every `*.wav` under `root` as a clip, sorted by path, with attribute CSVs merged.

    Args:
        root: a dataset root, a folder like `dev_data/raw/`, or one machine folder.
        year: force one DCASE year's conventions (see `parse_path`).
        machines: keep only these machine types; naming one that is absent is an error.
        mimii_train_normals: move this many normal clips per MIMII (machine, id) to the
            train split (seeded shuffle of the sorted list); an id with no more normals than
            that gives them all to training (with a warning: its test set has no normal clip).
        seed: seed of that shuffle.
    """
    _check_year(year)
    if not isinstance(root, str | os.PathLike) or not isinstance(os.fspath(root), str):
        raise AsdError(f"dataset root must be a folder path as str or Path, got {type(root).__name__}")
    top = Path(os.path.abspath(root))
    if not top.exists():
        raise AsdError(f"dataset root {top} does not exist; pass the folder that holds the machine folders")
    if not top.is_dir():
        raise AsdError(f"dataset root {top} is not a folder; pass the folder that holds the machine folders")
    if machines is not None and (isinstance(machines, str) or not machines):
        raise AsdError(f"machines={machines!r}: give a non-empty list of machine types, or leave it unset")
    if mimii_train_normals is not None and (
        isinstance(mimii_train_normals, bool)
        or not isinstance(mimii_train_normals, int)
        or mimii_train_normals < 0
    ):
        raise AsdError(f"mimii_train_normals={mimii_train_normals!r}: give a count >= 0, or leave it unset")

    wavs, csvs = _walk(top)
    if not wavs:
        raise AsdError(f"no .wav files under {top}. Expected one of these layouts:\n{CONVENTIONS}")
    clips = [parse_path(w, year) for w in wavs]
    if year is None:
        _harmonise_2021(clips)
    _check_duplicates(clips)

    if machines is not None:
        found = sorted({c.machine for c in clips})
        missing = [m for m in machines if m not in found]
        if missing:
            raise AsdError(f"machines {missing} are not under {top}; found: {found}")
        clips = [c for c in clips if c.machine in machines]

    _merge_attribute_csvs(clips, csvs)
    if mimii_train_normals is not None:
        _split_mimii(clips, mimii_train_normals, seed, top)
    clips.sort(key=lambda c: c.path)
    table = ClipTable(clips)
    log.info("indexed %d clips of %s under %s", len(table), table.machines(), top)
    return table


def _walk(top: Path) -> tuple[list[str], list[Path]]:
    """Sorted paths of all WAV files and attribute CSVs under `top`, following links once."""

    def fail(error: OSError) -> None:
        raise AsdError(
            f"cannot read folder {error.filename}: {error.strerror}; fix its permissions"
        ) from None

    wavs: list[str] = []
    csvs: list[Path] = []
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(top, onerror=fail, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            log.warning("skipped %s: it is the same folder as %s, already indexed", folder, seen[real])
            dirs.clear()
            continue
        seen[real] = folder
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(".wav"):
                wavs.append(os.path.join(folder, f))
            elif _RCSV.fullmatch(f):
                csvs.append(Path(folder, f))
    return wavs, csvs


def _harmonise_2021(clips: list[Clip]) -> None:
    """Read every section-named clip of a machine folder with `source_test/` as DCASE 2021."""
    dirs_2021 = {Path(c.path).parent.parent for c in clips if c.layout == "dcase2021"}
    for c in clips:
        if c.layout == "dcase2022" and Path(c.path).parent.parent in dirs_2021:
            c.layout = "dcase2021"


def _check_duplicates(clips: list[Clip]) -> None:
    """Two files with one identity mean two copies of a dataset under one root."""
    first: dict[tuple[str, ...], str] = {}
    for c in clips:
        key = (c.machine, c.section, c.domain, c.split, c.label, c.name)
        if key in first:
            raise AsdError(
                f"{c.path} and {first[key]} are the same clip (machine {c.machine}, section {c.section}, "
                f"{c.domain}, {c.split}, {c.label}); the root holds two copies of a dataset or SNR level - "
                "index one of them (pass its folder as root)"
            )
        first[key] = c.path


def _read_attribute_csv(path: Path) -> dict[tuple[str | None, str], dict[str, str]]:
    """Rows of an `attributes_XX.csv`, keyed by (split folder or None, file basename)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AsdError(f"cannot read attribute file {path}: {e}; it must be a UTF-8 CSV") from None
    if not rows:
        raise AsdError(f"attribute file {path} is empty; expected the header file_name,d1p,d1v,...")
    header = [h.strip() for h in rows[0]]
    expected = ["file_name"] + [f"d{i}{k}" for i in range(1, len(header) // 2 + 1) for k in "pv"]
    if header != expected:
        raise AsdError(
            f"attribute file {path}: header {rows[0]} is not file_name,d1p,d1v,d2p,d2v,...; "
            "fix the first line"
        )
    out: dict[tuple[str | None, str], dict[str, str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise AsdError(
                f"attribute file {path}, line {line}: {len(row)} cells but the header has {len(header)}"
            )
        row = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        parts = [s for s in re.split(r"[\\/]", row[0]) if s]
        if not parts or not parts[-1].lower().endswith(".wav"):
            raise AsdError(
                f"attribute file {path}, line {line}: file_name {row[0]!r} is not a .wav file name"
            )
        attributes: dict[str, str] = {}
        for i in range(1, len(row), 2):
            key, value = row[i], row[i + 1]
            if key in ("", "noAttribute"):
                if value:
                    raise AsdError(
                        f"attribute file {path}, line {line}: value {value!r} in column "
                        f"{header[i + 1]} has no attribute name in {header[i]}"
                    )
                continue
            if key in attributes:
                raise AsdError(f"attribute file {path}, line {line}: attribute {key!r} appears twice")
            attributes[key] = value
        where = parts[-2] if len(parts) >= 2 else None
        key = (where, parts[-1])
        if key in out and out[key] != attributes:
            raise AsdError(
                f"attribute file {path}, line {line}: {row[0]} is listed twice with different values"
            )
        out[key] = attributes
    return out


def _merge_attribute_csvs(clips: list[Clip], csvs: list[Path]) -> None:
    """Give each clip the attributes its machine folder's CSVs list for it (the CSV wins)."""
    # machine folder -> file name -> clips with that name (in train/, test/, ...)
    by_dir: dict[Path, dict[str, list[Clip]]] = defaultdict(lambda: defaultdict(list))
    for c in clips:
        p = Path(c.path)
        machine_dir = p.parent.parent.parent if c.layout == "mimii" else p.parent.parent
        by_dir[machine_dir][p.name].append(c)
    for path in csvs:
        if path.parent not in by_dir:
            log.warning("ignored %s: no indexed clips in its folder %s", path, path.parent)
            continue
        members = by_dir[path.parent]
        unmatched = []
        for (where, name), attributes in _read_attribute_csv(path).items():
            hits = [c for c in members.get(name, []) if where in (None, Path(c.path).parent.name)]
            for c in hits:
                c.attributes = dict(attributes)
            if not hits:
                unmatched.append(name if where is None else f"{where}/{name}")
        if unmatched:
            log.warning("%s: %d rows name no indexed clip, e.g. %s", path, len(unmatched), unmatched[0])


def _split_mimii(clips: list[Clip], n_train: int, seed: int, top: Path) -> None:
    """Move `n_train` normal clips of every MIMII (machine, id) to the train split."""
    groups: dict[tuple[str, str], list[Clip]] = defaultdict(list)
    for c in clips:
        if c.layout == "mimii" and c.is_normal:
            groups[(c.machine, c.section)].append(c)
    if not groups:
        raise AsdError(
            f"mimii_train_normals is set, but there are no MIMII normal clips under {top}; leave it unset"
        )
    used_up = []
    for (machine, section), normals in sorted(groups.items()):
        if len(normals) <= n_train:
            used_up.append(f"{machine} id_{section} ({len(normals)})")
        normals.sort(key=lambda c: c.path)
        random.Random(seed).shuffle(normals)
        for c in normals[:n_train]:
            c.split = "train"
    if used_up:
        # Small samples (a few clips per id) can still train and score; their test sets then hold
        # no normal clip, so AUCs of those ids cannot be computed: say so rather than refuse.
        log.warning(
            "mimii_train_normals=%d takes every normal clip of %s for training: their test sets have no "
            "normal clip, so no AUC can be computed for them",
            n_train,
            ", ".join(used_up),
        )
