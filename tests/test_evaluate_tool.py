"""tools/evaluate.py end to end: empty WAV datasets (the indexer reads names only) and score CSVs."""

from __future__ import annotations

import csv
import subprocess
import sys
from fractions import Fraction as Fr
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "evaluate.py"

# (machine, section, domain, label, score) - the two-machine example of test_metrics.py
EXAMPLE = [
    ("fan", "00", "source", "normal", 1.0),
    ("fan", "00", "source", "normal", 4.0),
    ("fan", "00", "source", "anomaly", 3.0),
    ("fan", "00", "source", "anomaly", 6.0),
    ("fan", "00", "target", "normal", 2.0),
    ("fan", "00", "target", "normal", 5.0),
    ("fan", "00", "target", "anomaly", 7.0),
    ("pump", "01", "source", "normal", 1.0),
    ("pump", "01", "source", "normal", 2.0),
    ("pump", "01", "source", "anomaly", 3.0),
    ("pump", "01", "target", "normal", 4.0),
    ("pump", "01", "target", "anomaly", 2.5),
    ("pump", "01", "target", "anomaly", 5.0),
]
# 2023: hmean of auc_source (fan 5/6, pump 1), auc_target (5/6, 1/3), pauc (47/57, 37/57), see test_metrics.py
OFFICIAL_2023 = 6 / (Fr(6, 5) + 1 + Fr(6, 5) + 3 + Fr(57, 47) + Fr(57, 37))
# 2020 (domains ignored): mean of AUC and pAUC of fan (5/6, 47/57) and pump (7/9, 37/57)
OFFICIAL_2020 = (Fr(5, 6) + Fr(47, 57) + Fr(7, 9) + Fr(37, 57)) / 4


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)


def write_rows(path: Path, rows: list[tuple[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name},{value!r}\n" for name, value in rows))


def make_dataset_2023(root: Path, scores_dir: Path) -> None:
    """Empty WAVs in the DCASE 2022+ layout (plus a train clip) and one score CSV per section."""
    per_file: dict[Path, list[tuple[str, float]]] = {}
    for i, (machine, section, domain, label, score) in enumerate(EXAMPLE):
        name = f"section_{section}_{domain}_test_{label}_{i:04d}_vel_6.wav"
        (root / machine / "test").mkdir(parents=True, exist_ok=True)
        (root / machine / "test" / name).touch()
        per_file.setdefault(scores_dir / f"anomaly_score_{machine}_section_{section}_test.csv", []).append(
            (name, score)
        )
    (root / "fan" / "train").mkdir()
    (root / "fan" / "train" / "section_00_source_train_normal_0000_vel_6.wav").touch()  # needs no score
    for path, rows in per_file.items():
        write_rows(path, rows)


def test_tool_on_a_2023_dataset_writes_tables(tmp_path):
    make_dataset_2023(tmp_path / "data", tmp_path / "scores")
    out = tmp_path / "out"
    proc = run_tool(
        "--scores", str(tmp_path / "scores"), "--truth", str(tmp_path / "data"), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"official score: {float(OFFICIAL_2023):.4f}" == "official score: 0.6555"
    assert "| fan | 00 | 0.8333 | 0.8333 | 0.8246 | 0.7368 | 1.0000 |" in proc.stdout
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["machine"], r["section"]) for r in rows] == [("fan", "00"), ("pump", "01")]
    assert float(rows[1]["auc_target"]) == pytest.approx(1 / 3, abs=1e-15)
    assert "Official score (DCASE 2023): 0.6555" in (out / "metrics.md").read_text()


def test_tool_on_a_2020_dataset_infers_the_year(tmp_path):
    data, scores = tmp_path / "data", tmp_path / "scores"
    per_file: dict[Path, list[tuple[str, float]]] = {}
    for i, (machine, section, _, label, score) in enumerate(EXAMPLE):
        name = f"{label}_id_{section}_{i:08d}.wav"
        (data / machine / "test").mkdir(parents=True, exist_ok=True)
        (data / machine / "test" / name).touch()
        per_file.setdefault(scores / f"anomaly_score_{machine}_id_{section}.csv", []).append((name, score))
    for path, rows in per_file.items():
        write_rows(path, rows)
    proc = run_tool("--scores", str(scores), "--truth", str(data))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"official score: {float(OFFICIAL_2020):.4f}"
    assert "| machine | id | AUC | pAUC |" in proc.stdout


def test_tool_reports_unscored_clips_with_exit_code_2(tmp_path):
    make_dataset_2023(tmp_path / "data", tmp_path / "scores")
    (tmp_path / "data" / "pump" / "test" / "section_01_target_test_normal_0099_vel_6.wav").touch()
    proc = run_tool("--scores", str(tmp_path / "scores"), "--truth", str(tmp_path / "data"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: 1 ground-truth clips have no value in")
    assert "pump section 01 section_01_target_test_normal_0099_vel_6.wav" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def load_main():
    """The tool's `main`, imported from its file (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_tool_with_official_ground_truth_csvs(tmp_path, capsys):
    main = load_main()
    gt = tmp_path / "gt"
    for sub in ("ground_truth_data", "ground_truth_domain"):
        (gt / sub).mkdir(parents=True)
    scores = tmp_path / "scores"
    by_section: dict[tuple[str, str], list[tuple[str, str, str, float]]] = {}
    for i, (machine, section, domain, label, score) in enumerate(EXAMPLE):
        by_section.setdefault((machine, section), []).append(
            (f"section_{section}_{i:04d}.wav", domain, label, score)
        )
    for (machine, section), clips in by_section.items():
        name = f"ground_truth_{machine}_section_{section}_test.csv"
        (gt / "ground_truth_data" / name).write_text(
            "".join(f"{n},{int(lab == 'anomaly')}\n" for n, _, lab, _ in clips)
        )
        (gt / "ground_truth_domain" / name).write_text(
            "".join(f"{n},{int(d == 'target')}\n" for n, d, _, _ in clips)
        )
        write_rows(
            scores / f"anomaly_score_{machine}_section_{section}_test.csv", [(n, s) for n, _, _, s in clips]
        )
    assert main(["--scores", str(scores), "--truth", str(gt)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "official score: 0.6555"
    # 2021 definitions on the same files: hmean of 3/4, 14/19, 1, 1 (fan) and 1, 1, 1/2, 14/19 (pump)
    official_2021 = 8 / (Fr(4, 3) + 1 + Fr(19, 14) + 1 + 1 + 1 + 2 + Fr(19, 14))
    assert main(["--scores", str(scores), "--truth", str(gt), "--year", "2021"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"official score: {float(official_2021):.4f}"

    (scores / "anomaly_score_fan_section_00_test.csv").write_text("section_00_0000.wav,oops\n")
    assert main(["--scores", str(scores), "--truth", str(gt)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "anomaly_score_fan_section_00_test.csv, line 1: 'oops' is not a number" in err
    )


def test_tool_errors_for_missing_folders(tmp_path, capsys):
    main = load_main()
    (tmp_path / "scores").mkdir()
    assert main(["--scores", str(tmp_path / "scores"), "--truth", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such ground-truth folder or file" in capsys.readouterr().err
    assert main(["--scores", str(tmp_path / "scores"), "--truth", str(tmp_path)]) == 2
    assert "no anomaly_score_*.csv files" in capsys.readouterr().err
