"""Tests of tools/summarize_data.py, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "summarize_data.py"


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def make_tree(root: Path) -> None:
    names = [
        "fan/train/section_00_source_train_normal_0000_vel_6.wav",
        "fan/train/section_00_source_train_normal_0001_vel_6.wav",
        "fan/train/section_00_target_train_normal_0000_vel_8.wav",
        "fan/test/section_00_source_test_anomaly_0000_vel_6.wav",
        "fan/test/section_01_0000.wav",
        "pump/train/normal_id_02_00000000.wav",
    ]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_table(tmp_path):
    make_tree(tmp_path)
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "machine  section  domain  split  label    count",
        "-------  -------  ------  -----  -------  -----",
        "fan      00       source  test   anomaly      1",
        "fan      00       source  train  normal       2",
        "fan      00       target  train  normal       1",
        "fan      01       none    test   unknown      1",
        "pump     02       none    train  normal       1",
        "total: 6 clips",
    ]


def test_json_is_exact(tmp_path):
    make_tree(tmp_path)
    result = run(tmp_path, "--json", "--machines", "fan")
    assert result.returncode == 0, result.stderr
    group = dict.fromkeys(("machine", "section", "domain", "split", "label", "count"))
    rows = [
        ("fan", "00", "source", "test", "anomaly", 1),
        ("fan", "00", "source", "train", "normal", 2),
        ("fan", "00", "target", "train", "normal", 1),
        ("fan", "01", "none", "test", "unknown", 1),
    ]
    expected = {"clips": 5, "groups": [dict(zip(group, row, strict=True)) for row in rows]}
    assert json.loads(result.stdout) == expected
    assert result.stdout == json.dumps(expected) + "\n"


def test_mimii_train_normals_option(tmp_path):
    for i in range(3):
        for kind in ("normal", "abnormal"):
            (tmp_path / "valve/id_04" / kind).mkdir(parents=True, exist_ok=True)
            (tmp_path / "valve/id_04" / kind / f"{i:08d}.wav").write_bytes(b"")
    result = run(tmp_path, "--json", "--mimii-train-normals", "2", "--seed", "1")
    assert result.returncode == 0, result.stderr
    counts = {(g["split"], g["label"]): g["count"] for g in json.loads(result.stdout)["groups"]}
    assert counts == {("test", "anomaly"): 3, ("test", "normal"): 1, ("train", "normal"): 2}


def test_errors_exit_2_with_one_line_prefix(tmp_path):
    make_tree(tmp_path)
    for args, message in [
        ((tmp_path / "missing",), "does not exist"),
        ((tmp_path, "--machines", "valve"), "['valve'] are not under"),
        ((tmp_path, "--year", "2019"), "year=2019"),
        ((tmp_path, "--year", "2020"), "year=2020 was asked for"),
        ((tmp_path, "--mimii-train-normals", "1"), "no MIMII"),
    ]:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ")
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
