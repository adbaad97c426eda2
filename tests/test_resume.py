"""Resuming a fit that was really interrupted: SIGKILL, Ctrl-C, a damaged checkpoint (asd.run.checkpointing).

The interrupted runs are real `train.py` processes, stopped by a signal while they train; the
resumed run must end with the very `scores.csv` of a run that was never interrupted.
"""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from asd.config import validate
from asd.errors import AsdError
from asd.run import train
from asd.run.checkpointing import KEY, LAST_CKPT, AtomicCheckpointIO, ResumeCheckpoint, describe

REPO = Path(__file__).resolve().parents[1]
#: one member, 2 batches an epoch (~0.05 s): 100 epochs leave seconds to interrupt the fit in the middle
EPOCHS = 100
ARGS = ["debug=default", "branch=b2", "reference=false", "plots=false", f"trainer.max_epochs={EPOCHS}"]


def train_py(run_dir: Path, *extra: str) -> list[str]:
    # quoted: a path may hold commas, which Hydra's override grammar reads as a sweep
    return [sys.executable, str(REPO / "train.py"), *ARGS, f"run_dir='{run_dir}'", *extra]


def run_to_the_end(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def with_ctrl_c() -> None:
    """In the child: Ctrl-C as a terminal delivers it, also when the tests themselves run in the
    background (a shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(cmd: list[str], run_dir: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start `cmd`, send `sig` once its fit has written a checkpoint, and wait for it to end."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=with_ctrl_c
    )
    deadline = time.monotonic() + 300
    while not (run_dir / LAST_CKPT).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint before the run ended: {proc.communicate()[1][-3000:]}")
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    # a real interruption: the fit had not finished (no final weights, no finished stage)
    ended = (run_dir / "checkpoints" / "final.ckpt").exists()
    assert not ended, f"the fit ended before the signal:\n{out[-2000:]}\n{err[-2000:]}"
    stages = run_dir / "stages.json"
    assert not stages.exists() or "fit" not in json.loads(stages.read_text())
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def finished_epochs(ckpt: Path) -> int:
    loops = torch.load(ckpt, map_location="cpu", weights_only=True)["loops"]
    return loops["fit_loop"]["epoch_progress"]["current"]["processed"]


def logged_epochs(metrics: Path) -> set[int]:
    with open(metrics, newline="") as f:
        return {int(r["epoch"]) for r in csv.DictReader(f) if r["epoch"]}


def test_a_killed_fit_resumes_to_the_scores_of_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_to_the_end(train_py(whole))

    res = interrupt(train_py(killed), killed, signal.SIGKILL)
    assert res.returncode == -signal.SIGKILL
    done = finished_epochs(killed / LAST_CKPT)
    assert 1 <= done < EPOCHS

    run_to_the_end(train_py(killed, "resume=true"))
    # the resumed attempt trained only the epochs the checkpoint lacked (its own log: version_1)
    assert logged_epochs(killed / "logs" / "version_1" / "metrics.csv") == set(range(done, EPOCHS))
    assert (killed / "scores.csv").read_bytes() == (whole / "scores.csv").read_bytes()
    assert not list((killed / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize(("sig", "why"), [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, sig, why):
    run_dir = tmp_path / "my run, v2"
    # more epochs than the signal can miss on a busy machine: the fit is stopped after its first one
    long = f"trainer.max_epochs={20 * EPOCHS}"
    res = interrupt(train_py(run_dir, long), run_dir, sig)
    assert res.returncode == 2
    output = res.stdout + res.stderr
    assert "Traceback" not in output and "Detected KeyboardInterrupt" not in output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    ckpt = torch.load(run_dir / LAST_CKPT, map_location="cpu", weights_only=True)
    assert ckpt[KEY]["rng"]["torch"].dtype == torch.uint8  # the random state resume restores
    message, command = errors[0].split(" Continue with: ")
    assert message == f"error: training interrupted ({why}); {run_dir / LAST_CKPT} holds {describe(ckpt)}."
    assert shlex.split(command) == ["python", "train.py", *ARGS, long, f"run_dir='{run_dir}'", "resume=true"]


def config(run_dir: Path, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*ARGS[:4], "trainer.max_epochs=2", f"run_dir={run_dir}", *overrides]
        )


def test_a_damaged_or_foreign_checkpoint_is_one_clear_error(tmp_path):
    run_dir = tmp_path / "r"
    train(config(run_dir))
    (run_dir / "stages.json").unlink()  # the fit is to be done again, from the checkpoint
    last = run_dir / LAST_CKPT
    whole = last.read_bytes()

    with pytest.raises(AsdError, match="written by a fit with other split"):
        train(config(run_dir, "resume=true", "data.val_fraction=0.3"))
    with pytest.raises(AsdError, match="written by a fit with other signature"):
        train(config(run_dir, "resume=true", "branches.b2.dim=8"))

    last.write_bytes(whole[: len(whole) // 2])  # what a non-atomic write killed midway leaves
    with pytest.raises(AsdError, match=r"last\.ckpt: not a readable checkpoint .*delete it"):
        train(config(run_dir, "resume=true"))


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    class FullDisk:
        def __reduce__(self):
            raise OSError("no space left on device")

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises(OSError, match="no space"):  # fails after the tensor is written
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.ones(10_000), "x": FullDisk()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_cadence_by_epochs_and_by_minutes():
    def due(callback: ResumeCheckpoint, epoch: int) -> bool:
        return callback.due(SimpleNamespace(current_epoch=epoch, strategy=SimpleNamespace(broadcast=bool)))

    every_2 = ResumeCheckpoint("last.ckpt", every_n_epochs=2)
    assert [due(every_2, e) for e in range(5)] == [False, True, False, True, False]
    timed = ResumeCheckpoint("last.ckpt", every_n_epochs=0, every_minutes=1.5)
    timed.saved_at = time.monotonic() - 80
    assert not due(timed, 0)
    timed.saved_at = time.monotonic() - 100
    assert due(timed, 0)
    only_the_end = ResumeCheckpoint("last.ckpt", every_n_epochs=0)
    assert not any(due(only_the_end, e) for e in range(5))


def test_the_cadence_keys_are_checked(tmp_path):
    with pytest.raises(AsdError) as e:
        validate(config(tmp_path, "checkpoint.every_n_epochs=-1", "checkpoint.every_minutes=0"))
    assert "checkpoint.every_n_epochs=-1: expected an integer >= 0" in str(e.value)
    assert "checkpoint.every_minutes=0: expected a number > 0 or null" in str(e.value)


def test_ctrl_c_after_the_fit_keeps_the_finished_stages_and_says_how_to_continue(tmp_path):
    run_dir = tmp_path / "r"
    # an attention head trained for very long: the calibrate stage is still running when the signal comes
    cmd = [*train_py(run_dir, "trainer.max_epochs=1", "fusion.attention.epochs=10000000")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=with_ctrl_c
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "pseudo-anomalies of" in line and "stage calibrate:" in line:
            break
    else:
        pytest.fail("the run ended before its calibrate stage:\n" + "".join(seen[-40:]))
    time.sleep(1.0)  # into the attention head's training
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: interrupted (Ctrl-C); the stages finished before it are kept in {run_dir / 'stages.json'}: "
        "run the same command again to continue with the first unfinished one"
    ]
    done = json.loads((run_dir / "stages.json").read_text())
    assert {"fit", "backends"} <= set(done) and "calibrate" not in done
