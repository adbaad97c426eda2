"""train.py in processes of its own: the run folder printed last, a clean error, and a two-process
DDP run (in its own file so that pytest-xdist runs these beside the in-process runs of
test_pipeline.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import REPO, config, read_csv

from asd.data.index import index_dataset
from asd.run import FINAL_CKPT, train


def test_train_py_prints_the_run_folder_last_and_errors_cleanly(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "debug=default",
        "branch=b2",
        "reference=false",
        "plots=false",
    ]
    res = subprocess.run([*cmd, f"run_dir={tmp_path / 'r'}"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == str((tmp_path / "r").resolve())
    res = subprocess.run([*cmd, "branch=b9"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2
    assert "error: unknown branch ['b9']" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("windows", [[], ["data.audio.window=0.4", "steps=6", "data.batches_per_epoch=2"]])
def test_two_process_ddp_matches_a_single_process_run_of_the_same_checkpoint(tmp_path, windows):
    # 9 source + 2 target training clips of one machine: the fit split is odd, so the distributed
    # sampler pads a duplicate that the gathering must remove. With windows, the random crops are
    # sharded by Lightning's sampler wrapper and every clip's windows gathered back to one row.
    # DDP runs hold out (the cross-fitted copies train in one process): so does the single run here
    data = [
        "data.synthetic.machines=[rotor]",
        "data.synthetic.source_train=9",
        "plots=false",
        "crossfit.folds=0",
        *windows,
    ]
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "debug=default",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        f"run_dir={ddp}",
        *data,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = read_csv(ddp / "scores.csv")
    test = index_dataset(Path(rows[0]["path"]).parents[2]).select(split="test")
    assert len(rows) == len({r["path"] for r in rows}) == len(test)

    # the same checkpoint, scored and evaluated again by one process
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copy(ddp / FINAL_CKPT, single / FINAL_CKPT)
    (single / "stages.json").write_text('{"fit": true}')
    train(config(single, *data))
    one = {r["path"]: r for r in read_csv(single / "scores.csv")}
    for r in rows:
        for col in ("b2", "dcase_ae_mse", "dcase_ae_mahalanobis", "final"):
            # float32 sums over differently composed batches: agreement to ~1e-5, not bit-identity
            assert float(r[col]) == pytest.approx(float(one[r["path"]][col]), rel=1e-4, abs=1e-5)
        assert r["decision"] == one[r["path"]]["decision"]
    official = {
        (m["method"]): float(m["official"]) for m in read_csv(ddp / "metrics.csv") if m["machine"] == "all"
    }
    again = {
        (m["method"]): float(m["official"]) for m in read_csv(single / "metrics.csv") if m["machine"] == "all"
    }
    assert official == pytest.approx(again, abs=1e-9)
