"""The run folder's tables: `scores.csv`, `errors.csv`, `embeddings.npz`, `metrics.csv`,
`attention_weights.csv`, `summary.md`.

Every CSV goes through the `csv` module (a path or name with a comma or a quote stays one field)
and is written atomically. Floats are written with `repr` (the shortest text that reads back as
the same float), so `read_scores` returns exactly what was written.

`scores.csv` is what the predict stage decides with (and `tools/score.py` reproduces): every
score column, `final` and the 0/1 `decision`. `errors.csv` is the per-clip error file of the
autoencoder studies: the raw, un-normalised scores only (members, references, label-free and
learned fusions, final), with the clip's row `index` and a 0/1 `is_anomaly` column, no decision.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from asd.calibration import LEARNED, percentile_note
from asd.choices import FUSIONS, WEIGHTED
from asd.data.table import ClipTable
from asd.ensemble import is_reference
from asd.errors import AsdError
from asd.evaluation import evaluate
from asd.evaluation.metrics import TABLE_KEYS
from asd.fileio import write_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: each clip's identity columns in `scores.csv`, before its scores
SCORE_META = ("file", "machine", "section", "domain", "label", "path")
#: `errors.csv`'s identity columns: the clip's row in the test table, then `scores.csv`'s, then 0/1
ERROR_META = ("index", *SCORE_META, "is_anomaly")


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    write_text_atomic(path, csv_text(header, rows))


def fmt(v: Any) -> str:
    """A cell: floats as `repr` (exact round trip), NaN as empty, anything else as text."""
    if isinstance(v, float | np.floating):
        return "" if np.isnan(v) else repr(float(v))
    return str(v)


def score_names(columns: dict[str, np.ndarray]) -> list[str]:
    """Score columns in file order: members, fusions, then `final` and `decision` last."""
    return [k for k in columns if k not in ("final", "decision")] + ["final", "decision"]


def score_cells(columns: dict[str, np.ndarray], names: list[str], i: int) -> list[str]:
    return [str(int(columns[n][i])) if n == "decision" else repr(float(columns[n][i])) for n in names]


def write_scores(path: Path, table: ClipTable, columns: dict[str, np.ndarray]) -> None:
    """One row per clip: its identity, every member, every fusion, final, decision."""
    names = score_names(columns)
    rows = (
        [c.name, c.machine, c.section, c.domain, c.label, c.path, *score_cells(columns, names, i)]
        for i, c in enumerate(table)
    )
    write_csv(path, [*SCORE_META, *names], rows)


def write_errors(path: Path, table: ClipTable, columns: dict[str, np.ndarray]) -> None:
    """`errors.csv`: one row per test clip, its raw score per member and method (no decision)."""
    names = [n for n in score_names(columns) if n != "decision"]
    rows = (
        [
            i,
            c.name,
            c.machine,
            c.section,
            c.domain,
            c.label,
            c.path,
            "" if c.label == "unknown" else int(c.label == "anomaly"),
            *score_cells(columns, names, i),
        ]
        for i, c in enumerate(table)
    )
    write_csv(path, [*ERROR_META, *names], rows)


def write_embeddings(path: Path, table: ClipTable, embeddings: dict[str, np.ndarray]) -> None:
    """`embeddings.npz`: per member its test embeddings (N, D) float32, and per clip `index`,
    `machine`, `section`, `domain`, `label`, `filename` (string arrays: it loads without pickle)."""
    arrays = {name: np.asarray(z, dtype=np.float32) for name, z in embeddings.items() if name != "index"}
    clips = list(table)
    arrays.update(
        index=np.arange(len(clips), dtype=np.int64),
        machine=np.array([c.machine for c in clips], dtype=str),
        section=np.array([c.section for c in clips], dtype=str),
        domain=np.array([c.domain for c in clips], dtype=str),
        label=np.array([c.label for c in clips], dtype=str),
        filename=np.array([c.name for c in clips], dtype=str),
    )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add `.npz` to a name
            np.savez(f, **arrays)

    write_atomic(path, write)


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """The score columns of a `scores.csv` (identity columns left out)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            names = [n for n in reader.fieldnames or [] if n not in SCORE_META]
        return {n: np.array([float(r[n]) for r in rows]) for n in names}
    except (OSError, ValueError, TypeError) as e:
        raise AsdError(f"{path}: not a readable scores file ({e}); delete it to score again") from e


# ---------------------------------------------------------------------- metrics and summary
def evaluate_methods(
    test: ClipTable, columns: dict[str, np.ndarray], year: int, final: str = ""
) -> dict[str, Any]:
    """The official evaluation of every score column; the decisions go with the `final` method."""
    methods = [k for k in columns if k not in ("final", "decision")]
    return {
        m: evaluate(test, columns[m], year=year, decisions=columns["decision"] if m == final else None)
        for m in methods
    }


def why_not_evaluable(test: ClipTable) -> str:
    """Why the official metrics cannot be computed on these test clips ("" when they can)."""
    unknown = [c for c in test if c.label == "unknown"]
    if unknown:
        return f"{len(unknown)} test clips have no label (evaluation data, e.g. {unknown[0].name})"
    one_class = [
        f"{m}/section_{s}"
        for m in test.machines()
        for s in test.sections(m)
        if len({c.label for c in test.select(machine=m, section=s)}) < 2
    ]
    if one_class:
        return f"AUC needs normal and anomalous test clips, and {', '.join(one_class)} have one kind only"
    return ""


#: what `zweighted`'s weights came from under the default `fusion.weighted.rule=criterion` (`how_weighted`)
BY_CRITERION = "each one's criterion"


def write_metrics(
    run_dir: Path,
    results: dict[str, Any],
    cfg: DictConfig,
    notes: Sequence[str] = (),
    weights_rows: Sequence[dict] = (),
    final: str = "",
    decisions: Sequence[dict] = (),
    threshold_note: str = "",
    normals: str = "held-out",
    fused_references: Sequence[str] = (),
    shrinkage: float = 0.0,
    z_limit: float | None = None,
    weighted_by: str = BY_CRITERION,
) -> None:
    """Write `metrics.csv` (per method and machine/section, plus official scores) and `summary.md`.

    `decisions` (`decision_table` rows of the final method) add the counts `tp`, `fp`, `tn`,
    `fn` to the final method's section rows, and its rates over every clip to its `all` row.
    """
    by_section = {(d["machine"], d["section"]): d for d in decisions if d["domain"] == "all"}
    counts = ("tp", "fp", "tn", "fn")
    rows: list[dict[str, Any]] = []
    for method, ev in results.items():
        for r in ev.rows:
            d = by_section.get((r["machine"], r["section"])) if method == final else None
            rows.append({"method": method, **r, **({k: d[k] for k in counts} if d else {})})
        overall = by_section.get(("all", "all")) if method == final else None
        extra = {k: overall[k] for k in (*counts, "tpr", "tnr", "precision", "f1")} if overall else {}
        rows.append({"method": method, "machine": "all", "section": "all", "official": ev.official, **extra})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(run_dir / "metrics.csv", fields, ([fmt(r.get(k, "")) for k in fields] for r in rows))
    text = summary_markdown(
        results,
        cfg,
        notes,
        weights_rows,
        final,
        decisions,
        threshold_note,
        normals,
        fused_references,
        shrinkage,
        z_limit,
        weighted_by,
    )
    write_text_atomic(run_dir / "summary.md", text)


def write_attention_weights(path: Path, members: list[str], rows: list[dict]) -> None:
    """`attention_weights.csv`: mean weights per group, on the fusion's training and the test clips."""
    fields = ["clips", "group", *members]
    write_csv(path, fields, ([fmt(r[f]) for f in fields] for r in rows))


def how_weighted(rule: str = "criterion", note: str = "") -> str:
    """What `zweighted`'s weights came from (`Calibration.weights_rule`, `.weights_note`), for the summary."""
    if rule == "discriminant":
        return "the shrunk linear discriminant of all members, fusion.weighted.rule=discriminant" + (
            f"; {note}" if note else ""
        )
    return BY_CRITERION


def summary_markdown(
    results: dict[str, Any],
    cfg: DictConfig,
    notes: Sequence[str] = (),
    weights_rows: Sequence[dict] = (),
    final: str = "",
    decisions: Sequence[dict] = (),
    threshold_note: str = "",
    normals: str = "held-out",
    fused_references: Sequence[str] = (),
    shrinkage: float = 0.0,
    z_limit: float | None = None,
    weighted_by: str = BY_CRITERION,
) -> str:
    """The run's summary; `final` is the method that decided (`cfg.final` unless final=auto chose),
    `decisions` its `decision_table` rows, `threshold_note` how the thresholds were set,
    `normals` which normals calibrated (`Calibration.normalised_on`), `fused_references` the
    reference columns the fusions used beside the members (`fusion.references`, resolved),
    `shrinkage` the one the z-score statistics were fitted with (`Calibration.shrinkage`), `z_limit`
    the soft limit of the z-scores before fusion (`Calibration.z_limit`), `weighted_by` what
    `zweighted`'s weights came from (`how_weighted`)."""
    final = final or cfg.final
    year = next(iter(results.values())).year
    fusions = [m for m in results if m in FUSIONS or m in LEARNED or m == WEIGHTED]
    fused = [m for m in results if m not in fusions and not is_reference(m)]
    reference = [m for m in results if is_reference(m)]
    also = list(fused_references)
    learned = [m for m in LEARNED if m in results]
    lines = [
        f"# asd run summary ({cfg.data.name}, official score convention: DCASE {year})",
        "",
        f"- members (fused): {', '.join(fused)}",
        f"- reference, reported beside{'' if also else ' and never fused'}: "
        f"{', '.join(reference) or 'none (reference=false)'}",
        *(
            [f"- reference columns fused beside the members as well (fusion.references): {', '.join(also)}"]
            if also
            else []
        ),
        f"- label-free fusions of the members' z-scores: {', '.join(FUSIONS)}",
        f"- z-scores: per machine/section/domain, from {normals} normals' scores; "
        + (
            f"each domain's mean and variance pulled towards its section's as if {shrinkage:g} more clips "
            "showed them (fusion.normalisation.shrinkage)"
            if shrinkage
            else "each domain's own statistics (fusion.normalisation.shrinkage=0)"
        )
        + (
            f"; every z-score softly limited to ±{z_limit:g} before fusion: {z_limit:g} tanh(z / "
            f"{z_limit:g}) (fusion.normalisation.z_limit)"
            if z_limit is not None
            else ""
        ),
        f"- learned fusions ({normals} normals vs pseudo-anomalies, never test labels): "
        f"{', '.join(learned) or 'none (fusion.enabled=false)'}"
        + (f"; {WEIGHTED} (the members' z-scores weighted by {weighted_by})" * (WEIGHTED in results)),
        f"- final score: `{final}`"
        + (" (chosen by final=auto)" if cfg.final == "auto" else "")
        + "; decisions: "
        # a calibration.pt without a note was written before threshold=normal: gamma made its thresholds
        + (threshold_note or percentile_note(cfg.threshold_percentile, normals, model="gamma")),
        *(f"- {note}" for note in notes),
        "",
        "| method | official score |",
        "| --- | --- |",
    ]
    lines += [f"| {method} | {ev.official:.4f} |" for method, ev in results.items()]
    lines += ["", *comparison_table(results)]
    if decisions:
        lines += ["", *decision_lines(decisions, final)]
    if weights_rows:
        members = [k for k in weights_rows[0] if k != "group"]
        lines += [
            "",
            "## attention weights (mean over each group's test clips)",
            "",
            "| group | " + " | ".join(members) + " |",
            "| --- |" + " --- |" * len(members),
        ]
        lines += [
            f"| {r['group']} | " + " | ".join(f"{r[m]:.3f}" for m in members) + " |" for r in weights_rows
        ]
    for method, ev in results.items():
        lines += ["", f"## {method}", "", ev.to_markdown()]
    return "\n".join(lines) + "\n"


def comparison_table(results: dict[str, Any]) -> list[str]:
    """Every method's AUC per machine/section/domain side by side (pAUC in the per-method tables)."""
    first = next(iter(results.values()))
    keys = [k for k in TABLE_KEYS[first.year] if k.startswith("auc")]
    short = {"auc": "AUC", "auc_source": "source", "auc_target": "target"}
    heads = [f"{r['machine']}/{r['section']} {short[k]}" for r in first.rows for k in keys]
    lines = [
        "## AUC per machine/section/domain",
        "",
        "| method | " + " | ".join(heads) + " | official |",
        "| --- |" + " --- |" * (len(heads) + 1),
    ]
    for method, ev in results.items():
        values = [_fmt4(r[k]) for r in ev.rows for k in keys]
        lines.append(f"| {method} | " + " | ".join(values) + f" | {ev.official:.4f} |")
    return lines


def decision_lines(decisions: Sequence[dict], final: str) -> list[str]:
    """The final method's decisions per machine/section/domain and overall: counts and rates."""
    lines = [
        f"## decisions of `{final}` at its thresholds (rates over no clips are 0; see docs/evaluation.md)",
        "",
        "| machine | section | domain | TP | FP | TN | FN | TPR | TNR | precision | F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in decisions:
        cells = [d["machine"], d["section"], d["domain"], *(str(d[k]) for k in ("tp", "fp", "tn", "fn"))]
        cells += [f"{d[k]:.4f}" for k in ("tpr", "tnr", "precision", "f1")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt4(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.4f}"
