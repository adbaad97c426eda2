"""The run folder's tables: `scores.csv`, `metrics.csv`, `attention_weights.csv`, `summary.md`.

Every CSV goes through the `csv` module (a path or name with a comma or a quote stays one field)
and is written atomically. Floats are written with `repr` (the shortest text that reads back as
the same float), so `read_scores` returns exactly what was written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from asd.calibration import LEARNED
from asd.data.table import ClipTable
from asd.ensemble import is_reference
from asd.errors import AsdError
from asd.evaluation import evaluate
from asd.evaluation.metrics import TABLE_KEYS
from asd.fileio import write_text_atomic
from asd.scoring import FUSIONS

#: each clip's identity columns in `scores.csv`, before its scores
SCORE_META = ("file", "machine", "section", "domain", "label", "path")


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
def evaluate_methods(test: ClipTable, columns: dict[str, np.ndarray], year: int) -> dict[str, Any]:
    """The official evaluation of every score column; `final`'s decisions go with the final method."""
    methods = [k for k in columns if k not in ("final", "decision")]
    return {
        m: evaluate(test, columns[m], year=year, decisions=columns["decision"] if m == "final" else None)
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


def write_metrics(
    run_dir: Path,
    results: dict[str, Any],
    cfg: DictConfig,
    notes: Sequence[str] = (),
    weights_rows: Sequence[dict] = (),
    final: str = "",
) -> None:
    """Write `metrics.csv` (per method and machine/section, plus official scores) and `summary.md`."""
    rows: list[dict[str, Any]] = []
    for method, ev in results.items():
        rows.extend({"method": method, **r} for r in ev.rows)
        rows.append({"method": method, "machine": "all", "section": "all", "official": ev.official})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(run_dir / "metrics.csv", fields, ([fmt(r.get(k, "")) for k in fields] for r in rows))
    write_text_atomic(run_dir / "summary.md", summary_markdown(results, cfg, notes, weights_rows, final))


def write_attention_weights(path: Path, members: list[str], rows: list[dict]) -> None:
    """`attention_weights.csv`: mean weights per group, on the fusion's training and the test clips."""
    fields = ["clips", "group", *members]
    write_csv(path, fields, ([fmt(r[f]) for f in fields] for r in rows))


def summary_markdown(
    results: dict[str, Any],
    cfg: DictConfig,
    notes: Sequence[str] = (),
    weights_rows: Sequence[dict] = (),
    final: str = "",
) -> str:
    """The run's summary; `final` is the method that decided (`cfg.final` unless final=auto chose)."""
    final = final or cfg.final
    year = next(iter(results.values())).year
    fusions = [m for m in results if m in FUSIONS or m in LEARNED]
    fused = [m for m in results if m not in fusions and not is_reference(m)]
    reference = [m for m in results if is_reference(m)]
    learned = [m for m in LEARNED if m in results]
    lines = [
        f"# asd run summary ({cfg.data.name}, official score convention: DCASE {year})",
        "",
        f"- members (fused): {', '.join(fused)}",
        f"- reference, reported beside and never fused: {', '.join(reference) or 'none (reference=false)'}",
        f"- label-free fusions of the members' z-scores: {', '.join(FUSIONS)}",
        f"- learned fusions (held-out normals vs pseudo-anomalies, never test labels): "
        f"{', '.join(learned) or 'none (fusion.enabled=false)'}",
        f"- final score: `{final}`"
        + (" (chosen by final=auto)" if cfg.final == "auto" else "")
        + f"; decisions: gamma threshold at the {cfg.threshold_percentile:g} "
        "percentile of held-out normals' left-out final scores per machine/section",
        *(f"- {note}" for note in notes),
        "",
        "| method | official score |",
        "| --- | --- |",
    ]
    lines += [f"| {method} | {ev.official:.4f} |" for method, ev in results.items()]
    lines += ["", *comparison_table(results)]
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


def _fmt4(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.4f}"
