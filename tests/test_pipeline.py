"""End-to-end `train(cfg)` runs on the real composed config, shrunk by `debug=default`."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from asd.calibration import Calibration, fit_thresholds, threshold_normals
from asd.data.index import index_dataset, parse_path
from asd.ensemble import is_reference
from asd.errors import AsdError
from asd.evaluation import evaluate
from asd.run import FINAL_CKPT, FinishedRun, train
from asd.run.calibrate import reference_normals
from asd.run.job import prepare
from asd.run.predict import context_of, infer, member_scores
from asd.run.stages import LISTED_LATER, stored_anomalies

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
STAGES = ["fit", "crossfit", "backends", "calibrate", "predict", "report"]  # debug=default cross-fits


def config(run_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(CONF, version_base="1.3"):
        # quoted: a path may hold commas, which Hydra's override grammar reads as a sweep
        return compose("train", overrides=["debug=default", f"run_dir='{run_dir}'", *overrides])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def context_of_rows(rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """The context ids calibration reads, from scores.csv rows (sections numbered in sorted order)."""
    pairs = sorted({(r["machine"], r["section"]) for r in rows})
    section = torch.tensor([pairs.index((r["machine"], r["section"])) for r in rows])
    domain = torch.tensor([("source", "target").index(r["domain"]) for r in rows])
    return {"machine": torch.zeros_like(section), "section": section, "domain": domain}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One finished debug run of every implemented member plus the reference."""
    return train(config(tmp_path_factory.mktemp("run") / "my run, v2", "branch=all"))


def test_run_folder_is_complete(run):
    for rel in (
        ".hydra/config.yaml",
        FINAL_CKPT,
        "checkpoints/last.ckpt",
        "crossfit.pt",
        "backends.pt",
        "calibration.pt",
        "scores.csv",
        "metrics.csv",
        "summary.md",
        "errors.csv",
        "embeddings.npz",
        "attention_weights.csv",
        "stages.json",
        "logs/version_0/metrics.csv",
    ):
        assert (run / rel).is_file(), rel
    subs = sorted(p.name for p in (run / "submission").iterdir())
    assert subs == [
        f"{k}_{m}_section_00_test.csv"
        for k in ("anomaly_score", "decision_result")
        for m in ("rotor", "valve")
    ]
    plots = {p.name.split("_")[0] for p in (run / "plots").iterdir()}
    # b6's masks and b7's prior samples beside the shared kinds; loss curves and t-SNE of embeddings
    assert plots == {"roc", "hist", "heatmap", "attention", "pseudo", "b6", "b7", "loss", "tsne"}
    assert list(json.loads((run / "stages.json").read_text())) == STAGES


def test_scores_have_one_row_per_test_clip_and_every_column(run):
    rows = read_csv(run / "scores.csv")
    root = Path(rows[0]["path"]).parents[2]
    test = index_dataset(root).select(split="test")
    assert sorted(r["path"] for r in rows) == sorted(c.path for c in test)
    for col in (
        "b2",
        "dcase_ae_mse",
        "dcase_ae_mahalanobis",
        "stats_mahalanobis",
        "stats_knn",
        "stats_temporal",
        "zmean",
        "zmin",
        "zweighted",
        "attention",
        "meta",
        "final",
        "decision",
    ):
        assert col in rows[0]
        assert all(np.isfinite(float(r[col])) for r in rows)
    assert {r["decision"] for r in rows} <= {"0", "1"}
    # final=auto (the default) chose one of the fusions, and the summary says which and why
    summary = (run / "summary.md").read_text()
    chosen = summary.split("- final score: `")[1].split("`")[0]
    assert chosen in ("meta", "attention", "zweighted", "zmean", "zmax", "zmin")
    assert all(r["final"] == r[chosen] for r in rows)
    assert f"final=auto chose {chosen}: " in summary
    # two cross-fitted normals per target group: too thin for meta and attention; one weight per member is not
    assert chosen == "zweighted" and "fewer than fusion.select.min_normals=5" in summary
    reason = summary.split("final=auto chose ")[1].splitlines()[0]
    assert "zweighted fitted out of fold" in reason and "meta 0." not in reason
    # zweighted is the members' z-scores under the weights the summary lists; the fused reference
    # enters as the cross-fitted copies' mean of it (scores.csv reports the run's own reference)
    cal = Calibration.load(run / "calibration.pt")
    assert "zweighted member weights" in summary and sum(cal.weights.values()) == pytest.approx(1.0)
    raw = {m: np.array([float(r[m]) for r in rows]) for m in cal.members}
    finished = FinishedRun(run)
    dataset = finished.dataset([parse_path(r["path"]) for r in rows])
    each = [
        infer(lambda b, e=e: member_scores(e, b), dataset, torch.device("cpu"), 8) for e in finished.copies
    ]
    raw["stats_temporal"] = np.mean([e["stats_temporal"] for e in each], axis=0)
    z = cal.normalise(raw, context_of_rows(rows))
    w = np.array([cal.weights[m] for m in cal.members])
    got = [float(r["zweighted"]) for r in rows]
    np.testing.assert_allclose(got, z.double().numpy() @ w, rtol=1e-5, atol=1e-6)


def test_with_enough_normals_the_learned_fusions_are_judged_out_of_fold(run, tmp_path):
    other = tmp_path / "other"
    cfg = copy_for_rerun(run, other)
    cfg.fusion.select.min_normals = 1
    train(cfg)
    summary = (other / "summary.md").read_text()
    reason = summary.split("final=auto chose ")[1].splitlines()[0]
    assert "meta/attention/zweighted fitted out of fold" in reason
    for name in ("meta", "attention", "zweighted"):
        assert f"{name} 0." in reason or f"{name} 1." in reason


def test_metrics_equal_a_recomputation_from_scores(run):
    rows = read_csv(run / "scores.csv")
    test = index_dataset(Path(rows[0]["path"]).parents[2]).select(split="test")
    by_path = {c.path: c for c in test}
    clips = [by_path[r["path"]] for r in rows]
    metrics = read_csv(run / "metrics.csv")
    for method in ("b2", "dcase_ae_mse", "zmean", "attention", "meta"):
        expected = evaluate(clips, [float(r[method]) for r in rows], year=2023)
        official = [m for m in metrics if m["method"] == method and m["machine"] == "all"]
        assert float(official[0]["official"]) == pytest.approx(expected.official, abs=1e-12)
        for row in expected.rows:
            got = next(m for m in metrics if m["method"] == method and m["machine"] == row["machine"])
            assert float(got["auc_source"]) == pytest.approx(row["auc_source"], abs=1e-12)
            assert float(got["pauc"]) == pytest.approx(row["pauc"], abs=1e-12)
    summary = (run / "summary.md").read_text()
    for method in ("zmean", "zmin", "attention", "meta", "dcase_ae_mse", "b2"):
        assert f"| {method} |" in summary
    assert "## AUC per machine/section/domain" in summary and "## attention weights" in summary


def test_submission_scores_equal_final_scores(run):
    rows = {r["file"]: float(r["final"]) for r in read_csv(run / "scores.csv") if r["machine"] == "valve"}
    with open(run / "submission" / "anomaly_score_valve_section_00_test.csv") as f:
        sub = {name: float(v) for name, v in csv.reader(f)}
    assert sub == pytest.approx(rows)


def test_finished_stages_are_skipped_and_logged(run, caplog):
    before = {p: p.stat().st_mtime_ns for p in (run / "scores.csv", run / "metrics.csv", run / FINAL_CKPT)}
    cfg = compose_from(run)
    with caplog.at_level("INFO", logger="asd.run"):
        assert train(cfg) == run
    for stage in STAGES:
        assert f"stage {stage}: skipped" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in before} == before


def compose_from(run: Path) -> DictConfig:
    from omegaconf import OmegaConf

    return OmegaConf.load(run / ".hydra" / "config.yaml")


def copy_for_rerun(run: Path, other: Path) -> DictConfig:
    """`other`: a copy of the finished `run`; its config, pointed at the copy, with plots off (the
    re-runs check files and logs, not pictures, and drawing them took about 5 s of each re-run)."""
    shutil.copytree(run, other)
    cfg = compose_from(other)
    cfg.run_dir, cfg.plots = str(other), False
    return cfg


def score_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "score.py"), *args], capture_output=True, text=True
    )


def test_score_tool_reproduces_the_runs_scores_exactly(run, tmp_path):
    rows = read_csv(run / "scores.csv")
    folders = list(dict.fromkeys(str(Path(r["path"]).parent) for r in rows))  # rotor/test, valve/test
    listing = tmp_path / "inputs, a list.txt"
    listing.write_text("\n".join(folders[1:]) + "\n")
    out = tmp_path / "scored, v2.csv"
    res = score_tool(f"run={run}", f"inputs={folders[0]}", f"inputs=@{listing}", f"out={out}")
    assert res.returncode == 0, res.stderr
    scored = read_csv(out)
    assert [r["file"] for r in scored] == [r["path"] for r in rows]
    for mine, theirs in zip(scored, rows, strict=True):
        for col in theirs:
            if col not in ("file", "path", "domain", "label"):
                assert mine[col] == theirs[col], col  # the same text: the same float


def test_score_tool_takes_paths_with_commas_and_names_without_a_convention(run, tmp_path):
    rows = read_csv(run / "scores.csv")
    folder = tmp_path / "line 3, valve A"
    folder.mkdir()
    shutil.copy(rows[0]["path"], folder / "rec 1, mic A.wav")
    out = tmp_path / "out.csv"
    res = score_tool(
        f"run={run}", f"inputs={folder}", f"machine={rows[0]['machine']}", "section=0", f"out={out}"
    )
    assert res.returncode == 0, res.stderr
    (got,) = read_csv(out)
    assert got["file"] == str(folder / "rec 1, mic A.wav") and got["decision"] in ("0", "1")
    assert float(got["b2"]) == pytest.approx(float(rows[0]["b2"]), rel=1e-5)
    res = score_tool(f"run={run}", f"inputs={folder}")
    assert (
        res.returncode == 2 and "add machine=NAME section=XX" in res.stderr and "Traceback" not in res.stderr
    )
    for bad in ("batch_size=0", "batch_size=abc"):
        res = score_tool(f"run={run}", f"inputs={folder}", "machine=rotor", "section=00", bad)
        assert res.returncode == 2 and "batch_size=" in res.stderr and "Traceback" not in res.stderr


def test_score_tool_refuses_another_configuration_and_unfinished_runs(run, tmp_path):
    folder = Path(read_csv(run / "scores.csv")[0]["path"]).parent
    other = tmp_path / "other"
    shutil.copytree(run, other)
    cfg_path = other / ".hydra" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("dim: 16", "dim: 32", 1))
    res = score_tool(f"run={other}", f"inputs={folder}")
    assert res.returncode == 2 and "another configuration" in res.stderr
    assert "dim: 16 there, 32 now" in res.stderr  # the refusal names what changed
    res = score_tool(f"run={tmp_path}", f"inputs={folder}")
    assert res.returncode == 2 and "not a finished asd run" in res.stderr


def test_changing_final_recalibrates_without_retraining(run, tmp_path, caplog):
    other = tmp_path / "other"
    cfg = copy_for_rerun(run, other)
    cfg.final = "zmean"
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage fit: skipped" in caplog.text and "stage backends: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    if Path("/proc/self/status").exists():  # each stage that ran says where memory stood
        for stage in ("calibrate", "predict"):
            assert re.search(
                rf"stage {stage}: done in [0-9.]+ s; memory: peak RSS [0-9.]+ GiB so far, [0-9.]+ GiB anon",
                caplog.text,
            )
    rows = read_csv(other / "scores.csv")
    assert all(r["final"] == r["zmean"] for r in rows)
    # the learned fusions are the same models: same scores as the first run's
    first = {r["path"]: r for r in read_csv(run / "scores.csv")}
    for r in rows:
        assert float(r["meta"]) == pytest.approx(float(first[r["path"]]["meta"]), abs=1e-6)


def test_the_reference_is_fused_by_default_and_stays_reported_as_its_own(run, tmp_path, caplog):
    # fusion.references=auto (the default) fused stats_temporal beside the members in `run`
    fused = Calibration.load(run / "calibration.pt")
    assert fused.members[-1] == "stats_temporal" and "stats_temporal" in fused.reference_scores
    assert "stats_mahalanobis" not in fused.members
    summary = (run / "summary.md").read_text()
    assert (
        "- reference columns fused beside the members as well (fusion.references): stats_temporal" in summary
    )
    assert "- reference, reported beside: " in summary
    other = tmp_path / "other"
    cfg = copy_for_rerun(run, other)
    cfg.fusion.references = []
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage fit: skipped" in caplog.text
    # the copies that score the reference normals out of fold no longer need the column
    assert "stage crossfit: its settings changed since the last run" in caplog.text
    assert Calibration.load(other / "calibration.pt").members == fused.members[:-1]
    assert "- reference, reported beside and never fused: " in (other / "summary.md").read_text()
    first = {r["path"]: r for r in read_csv(run / "scores.csv")}
    rows = read_csv(other / "scores.csv")
    assert any(float(r["zmean"]) != pytest.approx(float(first[r["path"]]["zmean"])) for r in rows)
    # the reported column is the run's own reference, fused or not (the fusions read the
    # cross-fitted copies' mean, the scale their calibration saw)
    assert all(np.isfinite(float(r["stats_temporal"])) for r in rows)
    for r in rows:
        assert r["stats_temporal"] == first[r["path"]]["stats_temporal"]


def rerun_copy(run: Path, other: Path, caplog, key: str, value) -> Path:
    """`other`: a copy of the finished `run`, run again by `train` with one key set (logs at INFO)."""
    cfg = copy_for_rerun(run, other)
    OmegaConf.update(cfg, key, value)
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    return other


def test_the_discriminant_weight_rule_recalibrates_and_the_summary_says_so(run, tmp_path, caplog):
    first = Calibration.load(run / "calibration.pt")
    assert first.weights_rule == "criterion" and first.weights_note == ""
    assert "weighted by each one's criterion" in (run / "summary.md").read_text()
    # the default rule is not in the calibrate stage's settings: they equal what runs made before the
    # key existed stored, so such a run folder is not calibrated again; the references' share is,
    # since runs made before it existed had none (they are calibrated again)
    stored = json.loads((run / "stages.json").read_text())["calibrate"]["fusion"]
    assert stored["weighted"] == {"power": 2.0, "reference_share": 0.8}
    # nor are the edit strengths the config lists at their defaults (asd.run.stages.stored_anomalies)
    assert set(stored["anomalies"]) == {"copies", "kinds", "p_none"}
    other = rerun_copy(run, tmp_path / "discriminant", caplog, "fusion.weighted.rule", "discriminant")
    assert "stage fit: skipped" in caplog.text and "stage crossfit: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    cal = Calibration.load(other / "calibration.pt")
    assert cal.weights_rule == "discriminant" and sum(cal.weights.values()) == pytest.approx(1.0)
    assert cal.weights != first.weights and cal.member_criteria == first.member_criteria
    weighted = json.loads((other / "stages.json").read_text())["calibrate"]["fusion"]["weighted"]
    assert weighted == {"power": 2.0, "rule": "discriminant", "reference_share": 0.8}
    summary = (other / "summary.md").read_text()
    assert "by the shrunk linear discriminant of all members, fusion.weighted.rule=discriminant" in summary
    assert "zweighted member weights (fusion.weighted.rule=discriminant, measure=official;" in summary


def test_stages_store_an_edit_strength_only_where_it_differs_from_the_default():
    given = {
        "copies": 8,
        "kinds": ["tone"],
        "level_db": [-25, -5],
        "gain_db": [6, 12],
        "hum_db": [-30.0, -12.0],
    }
    assert stored_anomalies(given) == {"copies": 8, "kinds": ["tone"], "level_db": [-25, -5]}
    assert stored_anomalies(None) is None
    # every strength the config lists is one of them, at the value the config gives it
    conf = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "fusion" / "default.yaml").anomalies)
    listed = {k: tuple(v) for k, v in conf.items() if k not in ("copies", "kinds", "p_none")}
    assert listed == LISTED_LATER


def test_the_auc_measure_recalibrates_and_the_summary_says_so(run, tmp_path, caplog):
    first = Calibration.load(run / "calibration.pt")
    assert first.weights_measure == "official"
    other = rerun_copy(run, tmp_path / "auc", caplog, "fusion.weighted.measure", "auc")
    assert "stage backends: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    cal = Calibration.load(other / "calibration.pt")
    assert cal.weights_measure == "auc" and cal.member_criteria != first.member_criteria
    weighted = json.loads((other / "stages.json").read_text())["calibrate"]["fusion"]["weighted"]
    assert weighted == {"power": 2.0, "measure": "auc", "reference_share": 0.8}
    assert "measure=auc; in brackets its AUC alone of each member" in (other / "summary.md").read_text()


def test_the_references_share_recalibrates_and_the_summary_says_so(run, tmp_path, caplog):
    first = Calibration.load(run / "calibration.pt")
    fused = [m for m in first.members if is_reference(m)]
    assert fused, "the tiny run fuses a reference column (fusion.references=auto)"
    other = rerun_copy(run, tmp_path / "anchored", caplog, "fusion.weighted.reference_share", 0.95)
    assert "stage backends: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    cal = Calibration.load(other / "calibration.pt")
    assert cal.member_criteria == first.member_criteria  # the same rows judge each member
    held = sum(first.weights[m] for m in fused)
    assert sum(cal.weights[m] for m in fused) == pytest.approx(max(0.95, held))
    members = [m for m in first.members if m not in fused]
    kept = [first.weights[m] / cal.weights[m] for m in members if first.weights[m] > 0]
    np.testing.assert_allclose(kept, kept[0])  # the members keep their proportions
    weighted = json.loads((other / "stages.json").read_text())["calibrate"]["fusion"]["weighted"]
    assert weighted["reference_share"] == 0.95
    summary = (other / "summary.md").read_text()
    assert f"{', '.join(fused)} held at least 0.95 of the weight (fusion.weighted.reference_share)" in summary


def recalibrated(run: Path, other: Path, caplog, same_final: bool = True, **settings) -> Calibration:
    """`run` copied to `other` and re-run with `settings`: only calibrate and after are redone, and
    with `same_final` every final score stays what it was (only the decisions may move). Returns
    the new calibration."""
    cfg = copy_for_rerun(run, other)
    for key, value in settings.items():
        cfg[key] = value
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage fit: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    before = {r["path"]: r for r in read_csv(run / "scores.csv")}
    for r in read_csv(other / "scores.csv") if same_final else ():
        assert r["final"] == before[r["path"]]["final"]
    return Calibration.load(other / "calibration.pt")


def test_threshold_shrinkage_moves_only_the_thresholds_and_the_summary_says_so(run, tmp_path, caplog):
    assert "threshold_shrinkage" not in json.loads((run / "stages.json").read_text())["calibrate"]
    pulled = recalibrated(run, tmp_path / "pulled", caplog, threshold_shrinkage=2.0)
    assert (
        "as if 2 more clips showed it (threshold_shrinkage)"
        in (tmp_path / "pulled" / "summary.md").read_text()
    )
    first = Calibration.load(run / "calibration.pt")
    assert first.weights == pulled.weights and not torch.equal(first.thresholds, pulled.thresholds)


def test_small_domains_set_no_threshold_by_default_and_min_domain_1_refits_only_the_thresholds(
    run, tmp_path, caplog
):
    """debug=default cross-fits 8 source and 2 target clips a section: the 2 targets' left-out scores
    are left out of the threshold fit, and threshold_min_domain=1 puts them back (nothing else moves)."""
    first = Calibration.load(run / "calibration.pt")
    assert json.loads((run / "stages.json").read_text())["calibrate"]["threshold_min_domain"] == 3
    cfg = config(run)
    normals, _ = reference_normals(prepare(cfg).dm, warn=False)
    context = context_of(normals)
    rows = threshold_normals(context["section"], context["domain"], 3)
    assert (context["domain"][~torch.as_tensor(rows)] == 1).all() and int((~rows).sum()) == 4  # 2 sections
    final, sections = first.reference_final.numpy(), len(first.thresholds)
    want, _ = fit_thresholds(final[rows], context["section"][rows], sections, 0.9, cfg.threshold_fence)
    assert torch.equal(first.thresholds, want)
    summary = (run / "summary.md").read_text()
    assert "the 4 left-out scores of domains with fewer than 3 of their section's normals" in summary
    assert "rotor/section_00 target, valve/section_00 target) set no threshold" in summary
    other = tmp_path / "all normals"
    every = recalibrated(run, other, caplog, threshold_min_domain=1)
    assert "threshold_min_domain" not in json.loads((other / "stages.json").read_text())["calibrate"]
    want, _ = fit_thresholds(final, context["section"], sections, 0.9, cfg.threshold_fence)
    assert torch.equal(every.thresholds, want)
    assert not torch.equal(every.thresholds, first.thresholds)
    assert torch.equal(every.reference_final, first.reference_final)
    assert "threshold_min_domain" not in (other / "summary.md").read_text()


def test_a_raw_final_score_keeps_every_normal_for_its_thresholds_and_says_so(run, tmp_path, caplog):
    """final=b2 is the member's raw score, whose domains need not share a scale: no group is left out."""
    other = tmp_path / "raw"
    raw = recalibrated(run, other, caplog, same_final=False, final="b2")
    cfg = config(other)
    normals, _ = reference_normals(prepare(cfg).dm, warn=False)
    section = context_of(normals)["section"]
    final, sections = raw.reference_final.numpy(), len(raw.thresholds)
    want, _ = fit_thresholds(final, section, sections, 0.9, cfg.threshold_fence)
    assert raw.final == "b2" and torch.equal(raw.thresholds, want)
    assert "threshold_min_domain=3 unused: final=b2 is a raw score" in (other / "summary.md").read_text()


def test_thresholds_are_normal_prediction_bounds_by_default_and_gamma_refits_only_the_thresholds(
    run, tmp_path, caplog
):
    first = Calibration.load(run / "calibration.pt")
    assert json.loads((run / "stages.json").read_text())["calibrate"]["threshold"] == "normal"
    summary = (run / "summary.md").read_text()
    assert "decisions: normal prediction bound at 0.9 (mean + t x std x sqrt(1 + 1/n))" in summary
    assert "per machine/section (threshold=normal)" in summary
    other = tmp_path / "gamma"
    cfg = copy_for_rerun(run, other)
    cfg.threshold = "gamma"
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage fit: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    gamma = Calibration.load(other / "calibration.pt")
    normals, _ = reference_normals(prepare(cfg).dm, warn=False)  # the run's own, and their sections
    context = context_of(normals)
    rows = threshold_normals(context["section"], context["domain"], cfg.threshold_min_domain)
    section = context["section"][rows]
    final, sections, fence = first.reference_final.numpy()[rows], len(first.thresholds), cfg.threshold_fence
    bound, _ = fit_thresholds(final, section, sections, 0.9, fence, 0.0, "normal")
    want, _ = fit_thresholds(final, section, sections, 0.9, fence, 0.0, "gamma")
    assert torch.equal(first.thresholds, bound)
    assert torch.equal(gamma.thresholds, want) and not torch.equal(gamma.thresholds, first.thresholds)
    assert torch.equal(gamma.reference_final, first.reference_final)  # the same scores, other thresholds
    summary = (other / "summary.md").read_text()
    assert "decisions: gamma threshold at the 0.9 percentile of " in summary
    assert "per machine/section (threshold=gamma)" in summary


def test_a_calibration_written_before_threshold_notes_is_reported_as_the_gamma_thresholds_it_holds(
    run, tmp_path, caplog
):
    """Files of runs made before threshold=normal hold gamma thresholds and no note; the report says so."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    cal = Calibration.load(old / "calibration.pt")
    cal.threshold_note = ""
    cal.save(old / "calibration.pt")
    stages = json.loads((old / "stages.json").read_text())
    del stages["report"]  # redo the report alone
    (old / "stages.json").write_text(json.dumps(stages))
    cfg = compose_from(old)
    cfg.run_dir, cfg.plots = str(old), False
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    assert "stage calibrate: skipped" in caplog.text
    assert "decisions: gamma threshold at the 0.9 percentile of " in (old / "summary.md").read_text()


def test_domain_statistics_are_shrunk_by_default_and_a_refit_needs_no_training(run, tmp_path, caplog):
    # the default run pulls each domain's z-statistics towards its section's (shrinkage 2) and says so
    # and bends every z-score into (-5, 5) before fusion (z_limit 5)
    assert Calibration.load(run / "calibration.pt").shrinkage == 2.0
    assert Calibration.load(run / "calibration.pt").z_limit == 5.0
    summary = (run / "summary.md").read_text()
    assert "as if 2 more clips showed them (fusion.normalisation.shrinkage)" in summary
    assert "every z-score softly limited to ±5 before fusion: 5 tanh(z / 5)" in summary
    other = tmp_path / "own_statistics"
    cfg = copy_for_rerun(run, other)
    cfg.fusion.normalisation.shrinkage = 0
    cfg.fusion.normalisation.z_limit = None
    with caplog.at_level("INFO", logger="asd.run"):
        train(cfg)
    # only the calibrate stage and what follows it change: no member or copy trains again
    assert "stage fit: skipped" in caplog.text and "stage crossfit: skipped" in caplog.text
    assert "stage calibrate: its settings changed since the last run" in caplog.text
    assert Calibration.load(other / "calibration.pt").shrinkage == 0.0
    assert Calibration.load(other / "calibration.pt").z_limit is None
    summary = (other / "summary.md").read_text()
    assert "each domain's own statistics (fusion.normalisation.shrinkage=0)" in summary
    assert "softly limited" not in summary
    first = {r["path"]: r for r in read_csv(run / "scores.csv")}
    rows = read_csv(other / "scores.csv")
    assert any(float(r["zmean"]) != pytest.approx(float(first[r["path"]]["zmean"])) for r in rows)
    for r in rows:  # the members' own columns are the same numbers
        assert r["b2"] == first[r["path"]]["b2"]


def test_references_auto_fuses_the_members_alone_where_no_reference_is_built(tmp_path, caplog):
    with caplog.at_level("INFO", logger="asd.run"):
        state = prepare(config(tmp_path / "r", "branch=[b2]", "reference=false", "plots=false"))
    assert state.ensemble.fused_references == ()
    assert (
        "fusion.references=auto: this run builds no stats_temporal or stats_mahalanobis (reference=False)"
        in caplog.text
    )
    state = prepare(config(tmp_path / "s", "branch=[b2]", "reference=[stats]", "plots=false"))
    assert state.ensemble.fused_references == ("stats_temporal",)
    # without the time statistics, the mean log-mel's column is the one fused
    no_time = ("branch=[b2]", "reference=[stats]", "branches.stats.temporal=false", "plots=false")
    state = prepare(config(tmp_path / "t", *no_time))
    assert state.ensemble.fused_references == ("stats_mahalanobis",)


def test_a_run_with_speed_copies_fits_the_reference_on_them_end_to_end(tmp_path):
    common = ("branch=[b2]", "reference=[stats]", "plots=false")
    speeds = "branches.stats.speeds=[0.9,1.1]"
    copies = read_csv(train(config(tmp_path / "c", *common, speeds)) / "scores.csv")
    without = read_csv(train(config(tmp_path / "p", *common, "branches.stats.speeds=[]")) / "scores.csv")
    plain = {r["path"]: r for r in without}
    assert copies and all(math.isfinite(float(r["stats_temporal"])) for r in copies)
    # the copies reach the Mahalanobis models and not the kNN bank; the trained member is untouched
    assert all(r["stats_knn"] == plain[r["path"]]["stats_knn"] for r in copies)
    assert all(r["b2"] == plain[r["path"]]["b2"] for r in copies)
    assert any(r["stats_mahalanobis"] != plain[r["path"]]["stats_mahalanobis"] for r in copies)


def test_the_run_checks_each_batchs_ids_on_the_cpu_before_it_moves(tmp_path):
    state = prepare(config(tmp_path / "r", "branch=[b5]", "reference=false", "plots=false"))
    batch = next(iter(state.dm.train_dataloader()))
    assert state.dm.on_before_batch_transfer(batch, 0) is batch
    with pytest.raises(AsdError, match="b5: section ids"):
        state.dm.on_before_batch_transfer({**batch, "section": batch["section"] + 99}, 0)


def test_label_free_fusion_only(tmp_path):
    run = train(config(tmp_path / "r", "branch=[b2,b3]", "fusion.enabled=false", "final=zmin", "plots=false"))
    rows = read_csv(run / "scores.csv")
    assert "attention" not in rows[0] and "meta" not in rows[0]
    assert all(r["final"] == r["zmin"] for r in rows)
    assert not (run / "attention_weights.csv").exists()


def relabelled_copy(src: Path, dst: Path, seed: int = 0) -> dict[str, str]:
    """A copy of a DCASE 2022+ folder whose test labels are shuffled; returns new path -> old path."""
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    mapping = {}
    for folder in sorted(dst.glob("*/test")):
        files = sorted(folder.glob("*.wav"))
        labels = [("anomaly" if "_anomaly_" in f.name else "normal") for f in files]
        shuffled = list(rng.permutation(labels))
        assert shuffled != labels
        for k, (f, label) in enumerate(zip(files, shuffled, strict=True)):
            parts = f.name.split("_")  # section, XX, domain, test, label, NNNN, attributes...
            parts[4], parts[5] = label, f"{k:04d}"
            new = f.with_name("_".join(parts))
            f.rename(new)
            mapping[str(new)] = str(src / f.relative_to(dst))
    return mapping


def test_permuting_the_test_labels_leaves_every_score_unchanged(run, tiny_root, tmp_path):
    """No test label reaches any score: members, normalisation, attention, meta, decisions."""
    first = {}
    for case, root in (("original", tiny_root), ("permuted", tmp_path / "my data, v2")):
        mapping = relabelled_copy(tiny_root, root) if case == "permuted" else None
        out = tmp_path / case
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(run / FINAL_CKPT, out / FINAL_CKPT)
        (out / "stages.json").write_text('{"fit": true}')
        train(config(out, "branch=all", f"data.root='{root}'", "data.name=tiny", "plots=false"))
        rows = read_csv(out / "scores.csv")
        if case == "original":
            first = {r["path"]: r for r in rows}
            continue
        changed = 0
        for r in rows:
            before = first[mapping[r["path"]]]
            changed += r["label"] != before["label"]
            for col in before:
                if col in ("machine", "section", "domain", "decision"):
                    assert r[col] == before[col], col
                elif col not in ("file", "path", "label"):
                    # the relabelled files sort into other batches, so sums run in another order:
                    # agreement to float32 rounding (a leaked label would move scores by far more)
                    assert float(r[col]) == pytest.approx(float(before[col]), rel=1e-6, abs=1e-7), col
        assert changed > 0


def test_reference_only_and_member_only_runs(tmp_path):
    run = train(config(tmp_path / "b2", "branch=b2", "reference=false", "plots=false"))
    header = read_csv(run / "scores.csv")[0].keys()
    assert "b2" in header and "dcase_ae_mse" not in header
    run = train(config(tmp_path / "frozen", "branch=b2", "freeze=b2", "plots=false"))
    assert (run / "metrics.csv").is_file()


def test_frozen_member_restored_from_a_checkpoint_does_not_move(run, tmp_path):
    cfg = config(tmp_path / "r", "branch=b2", "freeze=b2", f"ckpt.b2='{run / FINAL_CKPT}'", "plots=false")
    out = train(cfg)
    before = torch.load(run / FINAL_CKPT, weights_only=True)["state_dict"]
    after = torch.load(out / FINAL_CKPT, weights_only=True)["state_dict"]
    b2 = [k for k in before if k.startswith("members.b2.")]

    def same(a, b) -> bool:  # tensors, and the extra states (dicts of tensors) of scoring backends
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b)

    assert b2 and all(same(before[k], after[k]) for k in b2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("branch=b9", r"unknown branch \['b9'\]"),
        ("branch=b2 freeze=b3", r"freeze=\['b3'\] names members that are not selected"),
        ("final=best", "final='best': expected auto or one of"),
        ("final=meta fusion.enabled=false", "final=meta needs the pseudo-anomalies it is fitted on"),
        ("final=zweighted fusion.enabled=false", "final=zweighted needs the pseudo-anomalies"),
        ("fusion.anomalies.kinds=[tone,whistle]", "fusion.anomalies.kinds"),
        ("fusion.anomalies.copies=0", "fusion.anomalies.copies=0"),
        ("ckpt.b2=/nonexistent.ckpt", "no such file"),
        ("data.on_bad_file=ignore", "data.on_bad_file"),
        (
            "fusion.references=[stats_mahalanobis] reference=false",
            "fusion.references=.*none: reference=false",
        ),
        ("fusion.references=[stats_median]", "not a score column of this run's references"),
        ("logger._target_=paper.Logger", "logger._target_='paper.Logger' cannot be imported"),
    ],
)
def test_config_errors_are_one_clear_message(tmp_path, override, message):
    with pytest.raises(AsdError, match=message):
        train(config(tmp_path / "r", *override.split()))


def test_bf16_mixed_precision_on_cpu(tmp_path):
    run = train(config(tmp_path / "r", "trainer.precision=bf16-mixed", "plots=false"))
    assert all(np.isfinite(float(r["final"])) for r in read_csv(run / "scores.csv"))


def dcase2020_copy(src: Path, dst: Path) -> Path:
    """The tiny synthetic dataset renamed to the DCASE 2020 convention (machine ids, no domains)."""
    for machine in ("rotor", "valve"):
        for i, f in enumerate(sorted((src / machine / "train").glob("*.wav"))):
            (dst / machine / "train").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / machine / "train" / f"normal_id_00_{i:08d}.wav")
        for i, f in enumerate(sorted((src / machine / "test").glob("*.wav"))):
            (dst / machine / "test").mkdir(parents=True, exist_ok=True)
            label = "anomaly" if "_anomaly_" in f.name else "normal"
            shutil.copy(f, dst / machine / "test" / f"{label}_id_00_{i:08d}.wav")
    return dst


def test_dcase2020_folder(tiny_root, tmp_path):
    root = dcase2020_copy(tiny_root, tmp_path / "dcase2020")
    run = train(
        config(
            tmp_path / "r", "experiment=dcase2020", f"data.root={root}", "data.num_workers=0", "plots=false"
        )
    )
    assert sorted(p.name for p in (run / "submission").glob("anomaly_score_*")) == [
        "anomaly_score_rotor_id_00.csv",
        "anomaly_score_valve_id_00.csv",
    ]
    metrics = read_csv(run / "metrics.csv")
    zmean = [m for m in metrics if m["method"] == "zmean"]
    per_id = [float(m["auc"]) for m in zmean if m["machine"] != "all"] + [
        float(m["pauc"]) for m in zmean if m["machine"] != "all"
    ]
    # the 2020 official score is the arithmetic mean of every AUC and pAUC
    assert float(zmean[-1]["official"]) == pytest.approx(np.mean(per_id), abs=1e-12)
    assert "DCASE 2020" in (run / "summary.md").read_text()


def test_dcase2023_folder(tiny_root, tmp_path):
    run = train(
        config(
            tmp_path / "r",
            "experiment=dcase2023",
            f"data.root={tiny_root}",
            "data.num_workers=0",
            "plots=false",
        )
    )
    assert "DCASE 2023" in (run / "summary.md").read_text()
    assert len(read_csv(run / "scores.csv")) == len(index_dataset(tiny_root).select(split="test"))


def test_real_mimii_files_train_and_score(tmp_path):
    mimii = REPO.parent / "shared" / "data" / "mimii_0db"
    if not mimii.is_dir():
        pytest.skip(f"optional real recordings not present at {mimii}")
    # one normal clip per machine id: all of them train, the abnormal ones are scored, no AUC exists
    run = train(
        config(
            tmp_path / "r",
            "experiment=mimii",
            f"data.root={mimii}",
            "data.mimii_train_normals=1",
            "reference=false",
            "data.num_workers=0",
            "plots=false",
        )
    )
    rows = read_csv(run / "scores.csv")
    assert len(rows) == 15 and {r["label"] for r in rows} == {"anomaly"}
    assert all(np.isfinite(float(r["final"])) for r in rows)
    assert len(list((run / "submission").glob("anomaly_score_*_id_*.csv"))) == 15
    assert not (run / "metrics.csv").exists()


def test_wandb_logger_writes_an_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = train(config(tmp_path / "r", "branch=b2", "logger=wandb", "grad_norm_every=1"))
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    # wandb's service process finishes writing shortly after finish() returns: wait for it
    deadline = time.monotonic() + 30
    while b"test/metrics" not in (records := offline[0].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    # the dashboard: curves per member and fusion, the metrics table, plots, the summary
    for key in (
        "train/b2/loss",
        "train/b2/grad_norm",
        "train/dcase_ae/loss",
        "test/zmean/official",
        "test/meta/official",
        "test/metrics",
        "test/attention_weights",
        "plots/attention_weights",
        "plots/roc/roc_rotor_section_00",
        "plots/hist/hist_valve_section_00",
        "plots/heatmap/heatmap_b2",
        "summary",
    ):
        assert key.encode() in records, key
    media = offline[0].parent / "files" / "media"
    assert list(media.glob("images/plots/roc/*.png")) and list(media.glob("table/test/metrics*.json"))


@pytest.mark.parametrize("member", ["b1", "b2", "b3", "b4", "b5"])
def test_every_member_trains_and_scores_alone(tmp_path, member):
    run = train(config(tmp_path / "r", f"branch={member}", "reference=false", "plots=false"))
    rows = read_csv(run / "scores.csv")
    assert set(rows[0]) >= {member, "zmean", "final"}
    assert all(np.isfinite(float(r[member])) for r in rows)
    # one fused member: every label-free fusion is that member's z-score
    assert all(r["zmean"] == r["zmin"] == r["zmax"] for r in rows)
    summary = (run / "summary.md").read_text()
    chosen = summary.split("- final score: `")[1].split("`")[0]
    assert all(r["final"] == r[chosen] for r in rows)


def test_a_section_too_small_to_hold_out_a_clip_lends_its_training_clips(tiny_root, tmp_path, caplog):
    from asd.data.datamodule import AsdDataModule
    from asd.run.calibrate import reference_normals

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    rotor = sorted((root / "rotor" / "train").glob("*.wav"))
    for f in rotor[1:]:  # rotor keeps a single training clip: nothing of it can be held out
        f.unlink()
    dm = AsdDataModule(root=root, year=2023, audio={"duration": 1.0}, batch_size=4)
    dm.setup()
    with caplog.at_level("WARNING", logger="asd.run"):
        normals, kind = reference_normals(dm)
    assert "rotor/section_00 hold out fewer than 2 training clips" in caplog.text
    assert kind == "held-out (and some training)"
    names = [c.name for c in normals.table]
    assert rotor[0].name in names and len(names) == len(dm.tables["val"]) + 1
    assert normals.labels["index"].tolist() == list(range(len(names)))
    item = normals[len(names) - 1]
    assert item["section"] == dm.section_keys.index(("rotor", "00"))
    assert torch.equal(item["wave"], torch.from_numpy(dm.datasets["fit"].waves[0]))


def test_a_changed_hold_out_retrains_instead_of_scoring_clips_the_members_saw(tmp_path, caplog):
    run_dir = tmp_path / "r"
    overrides = ("branch=b2", "reference=false", "plots=false", "fusion.enabled=false")
    train(config(run_dir, *overrides))
    with caplog.at_level("INFO", logger="asd.run"):
        train(config(run_dir, *overrides, "data.val_fraction=0.3"))
    assert "stage fit: its settings changed since the last run" in caplog.text
    assert json.loads((run_dir / "stages.json").read_text())["fit"]["split"]["val_fraction"] == 0.3


def test_test_clips_of_a_section_without_training_clips_fail_before_training(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for f in (root / "rotor" / "train").glob("*.wav"):
        f.unlink()
    with pytest.raises(AsdError, match="rotor/section_00: test clips but no training clips"):
        train(config(tmp_path / "r", f"data.root='{root}'", "data.name=tiny"))


def test_first_shot_one_machine_one_id_ten_clips_runs_with_the_default_config(tiny_root, tmp_path, caplog):
    """The most common real start: one machine, one ID, no attributes or domains, 10 normal clips."""
    root = tmp_path / "first-shot"
    for split in ("train", "test"):
        for i, f in enumerate(sorted((tiny_root / "rotor" / split).glob("*.wav"))):
            label = "anomaly" if "_anomaly_" in f.name else "normal"
            (root / "fan" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "fan" / split / f"{label}_id_00_{i:08d}.wav")
    assert len(list((root / "fan" / "train").iterdir())) == 10
    with caplog.at_level("INFO"):
        run = train(config(tmp_path / "r", "experiment=dcase2020", f"data.root='{root}'", "plots=false"))
    assert "self-supervised" in caplog.text  # the classifying members say which objective they use
    rows = read_csv(run / "scores.csv")
    assert all(np.isfinite(float(r["final"])) for r in rows)
    metrics = read_csv(run / "metrics.csv")
    assert {m["method"] for m in metrics} >= {"b1", "b2", "b3", "b4", "b5", "stats_mahalanobis", "zmean"}
