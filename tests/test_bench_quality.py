"""benchmarks/bench_quality.py: reading run folders, per-method statistics, the tables (no training)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
bq = importlib.util.module_from_spec(_spec)
sys.modules["bench_quality"] = bq  # dataclasses look their module up while the file executes
_spec.loader.exec_module(bq)

SUMMARY = """# asd run summary (synthetic, official score convention: DCASE 2023)

- members (fused): b2, b3
- reference, reported beside and never fused: dcase_ae_mahalanobis, stats_mahalanobis
- label-free fusions of the members' z-scores: zmean, zmin, zmax
- learned fusions (held-out normals vs pseudo-anomalies, never test labels): meta, attention
- final score: `meta` (chosen by final=auto); decisions: gamma threshold at the 0.9 percentile ...
- final=auto chose meta: the highest hmean of ...

| method | official score |
"""


def make_run(seed: int, scores: dict[str, float], final: str = "meta") -> bq.Run:
    return bq.Run(
        config="c",
        seed=seed,
        overrides=["x=1", "plots=false", f"seed={seed}", "run_dir=r"],
        run_dir="r",
        returncode=0,
        wall_s=10.0 + seed,
        scores=scores,
        final=final,
        members=["b2", "b3"],
        references=["stats_mahalanobis"],
    )


def test_read_official_keeps_only_the_all_rows(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "method,machine,section,auc_source,official\n"
        "b2,valve,00,0.7,\n"
        "b2,all,all,,0.5\n"
        "meta,valve,00,0.9,\n"
        "meta,all,all,,0.625\n"
        "zmin,all,all,,\n"
    )
    got = bq.read_official(path)
    assert list(got) == ["b2", "meta", "zmin"]
    assert got["b2"] == 0.5 and got["meta"] == 0.625 and math.isnan(got["zmin"])


def test_read_summary_names_final_members_and_references(tmp_path: Path):
    path = tmp_path / "summary.md"
    path.write_text(SUMMARY)
    assert bq.read_summary(path) == {
        "final": "meta",
        "why": "final=auto chose meta: the highest hmean of ...",
        "members": ["b2", "b3"],
        "references": ["dcase_ae_mahalanobis", "stats_mahalanobis"],
    }
    path.write_text(SUMMARY.replace("dcase_ae_mahalanobis, stats_mahalanobis", "none (reference=false)"))
    assert bq.read_summary(path)["references"] == []


def test_error_line_prefers_the_error_line():
    assert bq.error_line("INFO x\nerror: b1 needs 2 sections\nmore\n") == "error: b1 needs 2 sections"
    assert bq.error_line("Traceback\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert bq.read_gnu_time("Command exited with non-zero status 2\n12.5 204800\n") == (12.5, 200.0)


def test_stats_hand_computed():
    s = bq.stats([0.5, 0.6, 0.7, math.nan])
    assert s.n == 3 and s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)  # sqrt(0.02 / 2)
    assert (s.min, s.max) == (0.5, 0.7)
    one = bq.stats([0.4])
    assert one.std is None and one.mean == 0.4
    assert bq.stats([math.nan]) is None


def test_aggregate_final_bests_and_comparisons():
    runs = [
        make_run(0, {"b2": 0.5, "b3": 0.6, "stats_mahalanobis": 0.7, "zmean": 0.55, "meta": 0.62}),
        make_run(1, {"b2": 0.6, "b3": 0.7, "stats_mahalanobis": 0.7, "zmean": 0.6, "meta": 0.66}),
        make_run(2, {"b2": 0.7, "b3": 0.8, "stats_mahalanobis": 0.7, "zmean": 0.65, "zmax": 0.9}, "zmax"),
    ]
    agg = bq.aggregate(runs)
    assert agg["values"]["final"] == {"0": 0.62, "1": 0.66, "2": 0.9}  # the method each run names
    assert agg["final_methods"] == {"meta": 2, "zmax": 1}
    assert agg["roles"] == {
        "b2": "member",
        "b3": "member",
        "stats_mahalanobis": "reference",
        "zmean": "label-free fusion",
        "meta": "learned fusion",
        "zmax": "label-free fusion",
        "final": "final",
    }
    assert agg["best_member"] == "b3" and agg["best_reference"] == "stats_mahalanobis"
    assert agg["stats"]["b3"]["mean"] == pytest.approx(0.7) and agg["stats"]["b3"]["std"] == pytest.approx(
        0.1
    )
    vs_member, vs_reference = agg["comparisons"]
    # final - b3 per seed: +0.02, -0.04, +0.10 -> mean +0.02667, sample std 0.0702: within noise
    assert "| **final** (final = `meta` in 2 of 3 seeds, `zmax` in 1 of 3 seeds) |" in bq.config_markdown(
        "c", runs, agg
    )
    assert vs_member["b"] == "b3" and vs_member["mean_diff"] == pytest.approx(0.08 / 3)
    assert vs_member["std_diff"] == pytest.approx(
        math.sqrt((0.02**2 + 0.04**2 + 0.10**2 - 3 * (0.08 / 3) ** 2) / 2)
    )
    assert vs_member["a_ge_b"] and vs_member["within_one_std"] and vs_member["seeds_a_ge_b"] == 2
    # final - stats_mahalanobis: -0.08, -0.04, +0.2
    assert vs_reference["b"] == "stats_mahalanobis" and vs_reference["mean_diff"] == pytest.approx(0.08 / 3)


def test_simplest_reference_falls_back_and_says_so():
    runs = [make_run(s, {"b2": 0.5, "dcase_ae_mahalanobis": 0.6, "meta": 0.7}) for s in (0, 1)]
    agg = bq.aggregate(runs)
    assert agg["simplest_reference"] == "dcase_ae_mahalanobis"
    assert any("`dcase_ae_mahalanobis` stands in" in line for line in bq.comparison_lines(agg))


def test_table_marks_best_and_final_and_lists_failures():
    runs = [
        make_run(0, {"b2": 0.5, "b3": 0.6, "stats_mahalanobis": 0.7, "meta": 0.65}),
        bq.Run(
            "c", 1, ["plots=false", "seed=1", "run_dir=r"], "r", returncode=2, error="error: too few clips"
        ),
    ]
    text = bq.config_markdown("c", runs, bq.aggregate(runs))
    assert "- seed 1 failed (exit 2): `error: too few clips`" in text
    assert "| **b3** (best member) | member | 0.6000 | n/a | 0.6000 | 0.6000 | 0.6000 | failed |" in text
    assert "| **stats_mahalanobis** (best reference) |" in text
    assert "| **final** (final = `meta`) | final | 0.6500 |" in text
    assert "one seed: no spread to judge noise by" in text


def test_a_configuration_with_no_finished_run():
    runs = [
        bq.Run("first-shot", 0, ["plots=false", "seed=0", "run_dir=r"], "r", returncode=2, error="error: x")
    ]
    text = bq.config_markdown("first-shot", runs, bq.aggregate(runs))
    assert "seed 0 failed (exit 2): `error: x`" in text and "no run of this configuration finished" in text


def test_table_says_when_the_code_changed_between_seeds():
    runs = [make_run(0, {"b2": 0.5, "meta": 0.6}), make_run(1, {"b2": 0.5, "meta": 0.6})]
    assert "the same for every seed" not in bq.config_markdown("c", runs, bq.aggregate(runs))  # unknown code
    runs[0].code, runs[1].code = "aaa", "aaa"
    assert "code fingerprint at launch: `aaa`, the same for every seed" in bq.config_markdown(
        "c", runs, bq.aggregate(runs)
    )
    runs[1].code = "bbb"
    text = bq.config_markdown("c", runs, bq.aggregate(runs))
    assert "**the code changed between seeds** (fingerprint at launch: seed 0 `aaa`, seed 1 `bbb`)" in text


def test_code_outside_a_git_checkout_is_named_by_its_files(tmp_path, monkeypatch):
    # a copied snapshot of the code (no .git): no commit is claimed, and the fingerprint still
    # follows the code, not the empty output of git
    for part in ("asd", "conf"):
        (tmp_path / part).mkdir()
    (tmp_path / "asd" / "a.py").write_text("x = 1\n")
    (tmp_path / "conf" / "train.yaml").write_text("seed: 0\n")
    (tmp_path / "train.py").write_text("print()\n")
    monkeypatch.setattr(bq, "REPO", tmp_path)
    assert not bq.in_git_checkout()
    assert bq.git_state() == {"commit": None, "dirty": None, "dirty_files": [], "diff_sha1": None}
    first = bq.code_fingerprint()
    assert first == bq.code_fingerprint() and len(first) == 12
    (tmp_path / "asd" / "a.py").write_text("x = 2\n")
    assert bq.code_fingerprint() != first
    (tmp_path / "asd" / "__pycache__").mkdir()
    changed = bq.code_fingerprint()
    (tmp_path / "asd" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert bq.code_fingerprint() == changed  # compiled files are not the code


def test_a_git_checkout_names_its_commit():
    if not bq.in_git_checkout():
        pytest.skip("the repository was copied without .git")
    assert bq.git_state()["commit"]
