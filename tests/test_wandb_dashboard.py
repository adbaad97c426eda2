"""wandb: the resolved config, one wandb run per run folder (resumed by id), and the saved dashboard.

One real offline run (b2 and the references, `16-mixed` on CPU so the AMP keys are written) is
read back from its `.wandb` file; nothing reaches the network.
"""

from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from asd.run import train
from asd.run.dashboard import METHODS, build_workspace, dashboard_panels, workspace_keys
from asd.run.loggers import RUN_ID_FILE, wandb_logger, wandb_run_id

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(run_dir: Path, *overrides: str):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=["debug=default", f"run_dir='{run_dir}'", *overrides])


def offline_runs(run_dir: Path) -> list[Path]:
    """The run folder's offline wandb runs, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def records(path: Path, last_key: str = "test/metrics") -> bytes:
    """An offline run's records, once wandb's service process has written `last_key` (it finishes
    writing shortly after `wandb.finish()` returns)."""
    deadline = time.monotonic() + 30
    while not logged(data := path.read_bytes(), last_key) and time.monotonic() < deadline:
        time.sleep(0.5)
    return data


def logged(data: bytes, key: str) -> bool:
    """Whether the history holds exactly `key`: a HistoryItem's length-prefixed `nested_key`, followed by
    its value (0x82 0x01: `value_json`) or a sub-key (0x12: a table's or an image's fields)."""
    k = key.encode()
    return re.search(re.escape(b"\x12" + bytes([len(k)]) + k) + rb"[\x12\x82]", data) is not None


def config_value(data: bytes, key: str) -> str | None:
    """The JSON of a top-level config item (a ConfigItem: length-prefixed key, then `value_json`)."""
    k = key.encode()
    found = re.search(re.escape(bytes([len(k)]) + k + b"\x82\x01") + rb"(.)", data, re.S)
    if found is None:
        return None
    start = found.end()
    return data[start : start + found.group(1)[0]].decode()


@pytest.fixture(scope="module")
def run(tmp_path_factory, monkeypatch_module) -> Path:
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    overrides = ("branch=b2", "logger=wandb", "grad_norm_every=1", "trainer.precision=16-mixed")
    return train(config(tmp_path_factory.mktemp("wandb") / "r", *overrides))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_run_records_its_resolved_config(run):
    (path,) = offline_runs(run)
    data = records(path)
    assert config_value(data, "branch") == '"b2"'
    assert config_value(data, "freeze") == "[]"
    assert config_value(data, "final") == '"auto"'
    assert config_value(data, "experiment") == '"default"'
    hardware = config_value(data, "hardware")
    assert '"accelerator":"cpu"' in hardware and '"precision":"16-mixed"' in hardware
    assert wandb_run_id(run) in path.name
    # the trainer choice, in the summary too
    summary = (run / "summary.md").read_text()
    assert "- trained with accelerator=cpu devices=1 strategy=auto precision=16-mixed" in summary


def test_dashboard_panels_read_keys_that_a_real_run_writes(run):
    pytest.importorskip("wandb_workspaces", reason="the dashboard extra: pip install -e '.[dashboard]'")
    data = records(offline_runs(run)[0])
    methods = sorted({r["method"] for r in read_csv(run / "metrics.csv")})
    assert set(methods) <= set(METHODS)
    panels = dashboard_panels(members=["b2", "dcase_ae"], methods=methods, amp=True)
    workspace = build_workspace("an-entity", "asd", panels)  # built, never pushed
    keys = workspace_keys(workspace)
    assert keys == {k for p in panels for k in p.keys}  # every panel made it into the workspace
    assert [s.name for s in workspace.sections] == ["training", "scores", "tables", "plots"]
    assert {"train/b2/grad_norm", "train/amp/skipped_steps", "test/metrics", "plots/roc"} <= keys
    assert [k for k in sorted(keys) if not logged(data, k)] == []
    assert not logged(data, "train/b2/grad") and not logged(data, "plots/ro")  # exact keys only
    # the dashboard that tools/wandb_dashboard.py pushes holds all of them
    assert keys <= workspace_keys(build_workspace("an-entity", "asd", dashboard_panels()))


def test_redoing_only_the_later_stages_publishes_to_the_same_wandb_run(run, tmp_path, caplog):
    again = tmp_path / "again"
    shutil.copytree(run, again)
    run_id = wandb_run_id(again)
    overrides = ("branch=b2", "logger=wandb", "grad_norm_every=1", "trainer.precision=16-mixed")
    with caplog.at_level("INFO", logger="asd.run"):
        train(config(again, *overrides, "final=zmean"))
    assert "stage fit: skipped" in caplog.text and "stage calibrate: its settings changed" in caplog.text
    first, second = offline_runs(again)
    assert run_id in first.name and run_id in second.name  # `wandb sync` sends both to one run
    data = records(second)
    assert logged(data, "test/zmean/official") and logged(data, "plots/roc")
    assert config_value(data, "final") == '"zmean"'


def test_a_new_fit_starts_a_new_wandb_run_and_a_resumed_one_continues_it(tmp_path):
    first = wandb_logger(str(tmp_path), "r", mode="offline")
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first.version == wandb_run_id(tmp_path)
    assert wandb_logger(str(tmp_path), "r", mode="offline", resume=True).version == first.version
    fresh = wandb_logger(str(tmp_path), "r", mode="offline")
    assert fresh.version != first.version and wandb_run_id(tmp_path) == fresh.version
    assert wandb_logger(str(tmp_path / "elsewhere"), "r", mode="offline", resume=True).version
