"""DCASE submission CSVs (write and read), the organisers' ground-truth CSVs, and scoring a submission.

Submission files hold rows `filename,value` (file basename, no header), one file per group:

- 2020: `anomaly_score_<machine>_id_<XX>.csv`, `decision_result_<machine>_id_<XX>.csv`
- 2021: `anomaly_score_<machine>_section_<XX>_<source|target>_test.csv` (one file per domain, as
  the 2021 evaluator reads them), `decision_result_...` likewise
- 2022-2025: `anomaly_score_<machine>_section_<XX>_test.csv`, `decision_result_..._test.csv`

Scores are written with `repr(float)` (shortest round-tripping text), so reading gives the
exact same floats. Ground truth comes either from a labelled dataset folder (`asd.data.index`)
or from the organisers' evaluator layouts:

- 2020: `eval_data_list.csv`: a line with only a machine type, then rows
  `<eval name>,<labelled name>,<0|1>`; scores may use either name.
- 2021: `ground_truth_data/ground_truth_<machine>_section_<XX>_<source|target>_test.csv`
  rows `filename,<0|1>`.
- 2022+: `ground_truth_data/ground_truth_<machine>_section_<XX>_test.csv` rows `filename,<0|1>`
  and `ground_truth_domain/` files of the same names with rows `filename,<0 source|1 target>`;
  optional `ground_truth_attributes/` files (2023+) with rows `<eval name>,<labelled stem>` let
  scores use the labelled names.

One file: the writers and readers of each year's CSV layouts must agree byte for byte; they
are kept side by side so a change to one shows the other.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.evaluation.metrics import YEARS, Evaluation, evaluate, write_text_atomic

logger = logging.getLogger(__name__)

KINDS = ("anomaly_score", "decision_result")
_ID = re.compile(r"^(?P<kind>anomaly_score|decision_result)_(?P<machine>.+)_id_(?P<section>\d{2})\.csv$")
_SECTION = re.compile(
    r"^(?P<kind>anomaly_score|decision_result)_(?P<machine>.+)_section_(?P<section>\d{2})"
    r"(?:_(?P<domain>source|target))?_test\.csv$"
)
_TRUTH = re.compile(
    r"^ground_truth_(?P<machine>.+)_section_(?P<section>\d{2})(?:_(?P<domain>source|target))?_test\.csv$"
)
_ID_IN_NAME = re.compile(r"id_(\d{2})")
_SHOW = 5


def submission_name(kind: str, machine: str, section: str, year: int, domain: str | None = None) -> str:
    """The official file name of one submission CSV."""
    if year == 2020:
        return f"{kind}_{machine}_id_{section}.csv"
    if year == 2021:
        return f"{kind}_{machine}_section_{section}_{domain}_test.csv"
    return f"{kind}_{machine}_section_{section}_test.csv"


def _listing(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def write_submission(
    clips: Sequence[Clip] | ClipTable,
    scores: ArrayLike,
    decisions: ArrayLike | None,
    out_dir: str | Path,
    year: int,
) -> list[Path]:
    """Write the year's `anomaly_score_*` CSVs (and `decision_result_*` with decisions); return the paths."""
    if year not in YEARS:
        raise AsdError(f"year={year}: expected one of {YEARS}")
    clips = list(clips)
    s = np.asarray(scores, dtype=float)
    if s.shape != (len(clips),):
        raise AsdError(f"got scores of shape {s.shape} for {len(clips)} clips; give one score per clip")
    d = None if decisions is None else np.asarray(decisions)
    if d is not None and d.shape != (len(clips),):
        raise AsdError(f"got decisions of shape {d.shape} for {len(clips)} clips; give one 0/1 per clip")
    groups: dict[tuple[str, str, str | None], list[int]] = {}
    for i, c in enumerate(clips):
        if c.split != "test":
            raise AsdError(f"{c.path}: submission files list test clips only, this one is split={c.split!r}")
        if not math.isfinite(s[i]):
            raise AsdError(f"{c.path}: score {s[i]} is not finite; every submitted clip needs a finite score")
        if d is not None and d[i] not in (0, 1):
            raise AsdError(f"{c.path}: decision {d[i].item()!r} is not 0 or 1")
        if year == 2021 and c.domain not in ("source", "target"):
            raise AsdError(
                f"{c.path}: 2021 submissions are split by domain, but this clip's domain is "
                f"{c.domain!r}; index the clips with their domains or write another year's layout"
            )
        groups.setdefault((c.machine, c.section, c.domain if year == 2021 else None), []).append(i)
    files: dict[str, str] = {}  # file name -> text; everything is checked before anything is written
    for (machine, section, domain), idx in groups.items():
        idx = sorted(idx, key=lambda i: clips[i].name)
        names = [clips[i].name for i in idx]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AsdError(
                f"{machine} section {section}: file names {_listing(dup)} occur more than once; "
                "submission rows are keyed by file name, so give each clip once"
            )
        kinds = [("anomaly_score", [repr(float(s[i])) for i in idx])]
        if d is not None:
            kinds.append(("decision_result", [str(int(d[i])) for i in idx]))
        for kind, values in kinds:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(zip(names, values, strict=True))
            files[submission_name(kind, machine, section, year, domain)] = buf.getvalue()
    out_dir = Path(out_dir)
    written = [write_text_atomic(out_dir / name, text) for name, text in sorted(files.items())]
    logger.info("wrote %d submission files to %s", len(written), out_dir)
    return written


def parse_submission_name(name: str) -> dict[str, str | None] | None:
    """`kind`, `machine`, `section`, `domain` (None unless 2021) and `style` of a submission file name."""
    for style, pattern in (("id", _ID), ("section", _SECTION)):
        m = pattern.match(name)
        if m:
            out = {"domain": None, **m.groupdict()}
            out["style"] = "section_domain" if out["domain"] else style
            return out
    return None


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV rows of a file with their 1-based line numbers."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise AsdError(f"{path}: cannot read ({e})") from None
    return [
        (n, row)
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1)
        if any(f.strip() for f in row)
    ]


def _two_fields(path: Path, n: int, row: list[str], what: str) -> tuple[str, str]:
    if len(row) != 2 or not row[0].strip():
        raise AsdError(f"{path}, line {n}: expected 'filename,{what}', got {','.join(row)!r}")
    return row[0].strip(), row[1].strip()


def submission_files(directory: str | Path, kind: str = "anomaly_score") -> dict[Path, dict[str, str | None]]:
    """The `kind` CSVs of a submission folder with their parsed names; unknown names are an error."""
    if kind not in KINDS:
        raise AsdError(f"kind={kind!r}: expected one of {KINDS}")
    directory = Path(directory)
    if not directory.is_dir():
        raise AsdError(f"{directory}: not a folder; give the folder holding the {kind}_*.csv files")
    files = {}
    for path in sorted(directory.glob(f"{kind}_*.csv")):
        parsed = parse_submission_name(path.name)
        if parsed is None:
            raise AsdError(
                f"{path}: unrecognised name; expected {kind}_<machine>_section_<XX>_test.csv, "
                f"{kind}_<machine>_section_<XX>_<source|target>_test.csv or {kind}_<machine>_id_<XX>.csv"
            )
        files[path] = parsed
    return files


def read_submission(
    directory: str | Path, kind: str = "anomaly_score"
) -> dict[tuple[str, str], dict[str, float]]:
    """(machine, section) -> {filename: value} from a folder of submission CSVs (any year's naming)."""
    files = submission_files(directory, kind)
    if not files:
        raise AsdError(f"{directory}: no {kind}_*.csv files; point at the folder that holds the submission")
    out: dict[tuple[str, str], dict[str, float]] = {}
    origin: dict[tuple[str, str, str], Path] = {}  # where each (machine, section, file) was first listed
    for path, parsed in files.items():
        key = (parsed["machine"], parsed["section"])
        values = out.setdefault(key, {})
        for n, row in _rows(path):
            name, text = _two_fields(path, n, row, "value")
            try:
                value = float(text)
            except ValueError:
                raise AsdError(f"{path}, line {n}: {text!r} is not a number") from None
            if not math.isfinite(value):
                raise AsdError(f"{path}, line {n}: value {text!r} is not finite")
            if kind == "decision_result" and value not in (0.0, 1.0):
                raise AsdError(f"{path}, line {n}: decision {text!r} is not 0 or 1")
            if name in values:
                raise AsdError(
                    f"{path}, line {n}: {name} already has a value (in {origin[(*key, name)]}); "
                    "list each file once"
                )
            values[name] = value
            origin[(*key, name)] = path
    return out


def submission_year(directory: str | Path) -> int:
    """The year a submission folder's names imply: 2020 for `id_XX`, 2021 for per-domain files, else 2023."""
    styles = {p["style"] for p in submission_files(directory).values()}
    if len(styles) > 1:
        raise AsdError(
            f"{directory}: mixes file naming styles {sorted(styles)}; keep one year's files per folder"
        )
    return {"id": 2020, "section_domain": 2021}.get(styles.pop() if styles else "section", 2023)


def _read_labels(path: Path, what: str) -> dict[str, int]:
    """filename -> 0/1 from a ground-truth CSV."""
    out: dict[str, int] = {}
    for n, row in _rows(path):
        name, text = _two_fields(path, n, row, what)
        if text not in ("0", "1"):
            raise AsdError(f"{path}, line {n}: {what} {text!r} must be 0 or 1")
        if name in out:
            raise AsdError(f"{path}, line {n}: {name} listed twice")
        out[name] = int(text)
    return out


def _read_eval_data_list(path: Path) -> tuple[list[Clip], dict[tuple[str, str, str], str]]:
    """Clips and labelled-name aliases from the 2020 `eval_data_list.csv`."""
    clips, aliases = [], {}
    machine = None
    for n, row in _rows(path):
        fields = [f.strip() for f in row]
        if len(fields) == 1:
            machine = fields[0]
            continue
        if len(fields) != 3 or machine is None:
            raise AsdError(
                f"{path}, line {n}: expected a machine-type line, then rows 'filename,labelled name,0|1'"
            )
        ids = _ID_IN_NAME.findall(fields[0])
        if fields[2] not in ("0", "1") or not ids:
            raise AsdError(
                f"{path}, line {n}: expected 'id_XX_....wav,<labelled name>,<0|1>', got {','.join(row)!r}"
            )
        label = "anomaly" if fields[2] == "1" else "normal"
        clips.append(
            Clip(
                path=fields[0],
                machine=machine,
                section=ids[0],
                domain="none",
                split="test",
                label=label,
                layout="dcase2020",
            )
        )
        aliases[(machine, ids[0], fields[1])] = fields[0]
    return clips, aliases


def _read_truth_folder(
    data_dir: Path, domain_dir: Path | None, attr_dir: Path | None
) -> tuple[list[Clip], dict[tuple[str, str, str], str]]:
    """Clips and labelled-name aliases from the 2021-2025 ground-truth folders."""
    clips, aliases = [], {}
    files = sorted(data_dir.glob("ground_truth_*.csv"))
    if not files:
        raise AsdError(f"{data_dir}: no ground_truth_*.csv files")
    for path in files:
        m = _TRUTH.match(path.name)
        if m is None:
            raise AsdError(
                f"{path}: unrecognised name; expected ground_truth_<machine>_section_<XX>_test.csv "
                "or ground_truth_<machine>_section_<XX>_<source|target>_test.csv"
            )
        machine, section, domain = m["machine"], m["section"], m["domain"]
        labels = _read_labels(path, "label")
        if domain is None:
            domain_path = None if domain_dir is None else domain_dir / path.name
            if domain_path is None or not domain_path.is_file():
                raise AsdError(
                    f"{path}: no domain file {domain_path or 'ground_truth_domain/' + path.name}; "
                    "2022+ ground truth needs ground_truth_domain/ beside ground_truth_data/"
                )
            domains = _read_labels(domain_path, "domain")
            if set(domains) != set(labels):
                diff = sorted(set(domains) ^ set(labels))
                raise AsdError(
                    f"{domain_path}: lists other files than {path} ({_listing(diff)}); "
                    "use the matching ground-truth files"
                )
        else:
            domains = dict.fromkeys(labels, 0 if domain == "source" else 1)
        for name, label in labels.items():
            clips.append(
                Clip(
                    path=name,
                    machine=machine,
                    section=section,
                    domain="target" if domains[name] else "source",
                    split="test",
                    label="anomaly" if label else "normal",
                    layout="dcase2021" if domain else "dcase2022",
                )
            )
        attr_path = None if attr_dir is None else attr_dir / path.name
        if attr_path is not None and attr_path.is_file():
            for n, row in _rows(attr_path):
                eval_name, stem = _two_fields(attr_path, n, row, "labelled name")
                aliases[(machine, section, stem if stem.endswith(".wav") else f"{stem}.wav")] = eval_name
    return clips, aliases


def read_ground_truth(root: str | Path) -> tuple[list[Clip], dict[tuple[str, str, str], str]]:
    """Labelled test clips (`path` = file name) from an official ground-truth layout, and name aliases.

    The aliases map (machine, section, labelled file name) to the evaluation file name, for
    scores written under the labelled names. Raises AsdError when `root` holds no known layout.
    """
    root = Path(root)
    if root.is_file() and root.suffix == ".csv":
        return _read_eval_data_list(root)
    if (root / "eval_data_list.csv").is_file():
        return _read_eval_data_list(root / "eval_data_list.csv")
    if (root / "ground_truth_data").is_dir():
        data_dir, base = root / "ground_truth_data", root
    elif any(root.glob("ground_truth_*.csv")):
        data_dir, base = root, root.parent
    else:
        raise AsdError(f"{root}: no eval_data_list.csv, ground_truth_data/ or ground_truth_*.csv files")
    domain_dir, attr_dir = base / "ground_truth_domain", base / "ground_truth_attributes"
    return _read_truth_folder(
        data_dir, domain_dir if domain_dir.is_dir() else None, attr_dir if attr_dir.is_dir() else None
    )


def is_ground_truth_layout(root: str | Path) -> bool:
    """Whether `root` is an official ground-truth layout rather than a dataset folder."""
    root = Path(root)
    if root.is_file():
        return root.suffix == ".csv"
    return (
        (root / "eval_data_list.csv").is_file()
        or (root / "ground_truth_data").is_dir()
        or any(root.glob("ground_truth_*.csv"))
    )


def align(
    clips: Sequence[Clip],
    submission: dict[tuple[str, str], dict[str, float]],
    aliases: dict[tuple[str, str, str], str] | None = None,
    source: str = "the submission",
) -> np.ndarray:
    """Scores (N,) of `clips` from a submission; every clip needs a value and every value a clip."""
    aliases = aliases or {}
    values: dict[tuple[str, str, str], float] = {}
    for (machine, section), rows in submission.items():
        for name, value in rows.items():
            key = (machine, section, name)
            key = (machine, section, aliases.get(key, name))
            if key in values:
                raise AsdError(
                    f"{source}: {machine} section {section} {key[2]} is scored twice "
                    "(under its evaluation and its labelled name); keep one"
                )
            values[key] = value
    wanted = [(c.machine, c.section, c.name) for c in clips]
    missing = [k for k in wanted if k not in values]
    extra = sorted(set(values) - set(wanted))
    if missing:
        raise AsdError(
            f"{len(missing)} ground-truth clips have no value in {source}: "
            f"{_listing([f'{m} section {s} {n}' for m, s, n in missing])}; score every test clip"
        )
    if extra:
        raise AsdError(
            f"{len(extra)} values in {source} have no ground truth: "
            f"{_listing([f'{m} section {s} {n}' for m, s, n in extra])}; "
            "check the machine, section and file names against the ground truth"
        )
    return np.array([values[k] for k in wanted], dtype=float)


def evaluate_submission(scores_dir: str | Path, truth: str | Path, year: int | None = None) -> Evaluation:
    """Official metrics of a submission folder against a dataset folder or official ground-truth CSVs."""
    truth = Path(truth)
    if not truth.exists():
        raise AsdError(f"{truth}: no such ground-truth folder or file")
    submission = read_submission(scores_dir)
    if is_ground_truth_layout(truth):
        clips, aliases = read_ground_truth(truth)
    else:
        from asd.data.index import index_dataset  # the dataset indexer is only needed for this branch

        # the indexer detects the layout itself unless the user named the year
        clips, aliases = list(index_dataset(truth, year=year).select(split="test")), {}
        if not clips:
            raise AsdError(f"{truth}: the dataset has no test clips to evaluate against")
    year = submission_year(scores_dir) if year is None else year
    scores = align(clips, submission, aliases, source=str(scores_dir))
    decisions = None
    if submission_files(scores_dir, "decision_result"):
        decisions = align(
            clips,
            read_submission(scores_dir, "decision_result"),
            aliases,
            source=f"{scores_dir} decision_result files",
        ).astype(int)
    return evaluate(clips, scores, year=year, decisions=decisions)
