"""The catalogue of bad inputs and faults (issue 12): each ends in one clear error, or says what it did.

Every case runs the real entry point (`train.py`, `tools/score.py`) in a subprocess, on real bad
files and real faults: a file system mounted full or read-only for the test, a process killed
mid-way, two processes at once. Each asserts the exit code, one `error:` line that names the
problem and the fix, no traceback, and that the finished run beside it is unchanged. One tiny
finished run serves the whole module. Cases tested elsewhere (schema values, commas in
`tools/score.py` paths, a section without training clips, a changed hold-out) are listed with
their tests in docs/bad_inputs.md, which is the catalogue in one table.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

from asd.data.audio import SKIP_HINT, audio_config
from asd.data.cache import AudioCache
from asd.data.datamodule import AsdDataModule
from asd.data.windows import window_starts
from asd.errors import AsdError, unwritable
from asd.run import train
from tests.conftest import kill_while_writing

REPO = Path(__file__).resolve().parents[1]
#: the tiny run every case starts from or lies beside: one member, no learned fusion, no plots
TINY_RUN = ("debug=default", "branch=b2", "reference=false", "plots=false", "fusion.enabled=false")
TRAIN = [sys.executable, str(REPO / "train.py"), *TINY_RUN]
SCORE = [sys.executable, str(REPO / "tools" / "score.py")]


# ---------------------------------------------------------------------- helpers
def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_error(res: subprocess.CompletedProcess, *phrases: str, code: int = 2) -> str:
    """The one error message of a failed run (its `error:` line and the indented lines under it),
    after checking the exit code, no traceback and `phrases`."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, res.stderr[-3000:]
    message = [lines[starts[0]]]
    for line in lines[starts[0] + 1 :]:
        if not line.startswith(" "):
            break
        message.append(line)
    text = "\n".join(message)
    if os.environ.get("ASD_SHOW_ERRORS"):
        print(f"\n{text}", file=sys.__stderr__)
    for phrase in phrases:
        assert phrase in text, text
    return text


def snapshot(folder: Path) -> dict[str, tuple[int, int, str] | None]:
    """Every folder and file under `folder`: files with size, modification time and content hash."""
    out: dict[str, tuple[int, int, str] | None] = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (
            (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else None
        )
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Finished:
    """The module's finished run, in its own folder among the cases' run folders."""

    def __init__(self, parent: Path):
        self.parent, self.dir = parent, parent / "done"
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*TINY_RUN, f"run_dir='{self.dir}'"])
        train(cfg)
        self.before = snapshot(self.dir)

    def assert_unchanged(self) -> None:
        assert snapshot(self.dir) == self.before


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Finished:
    return Finished(tmp_path_factory.mktemp("runs"))


def read_only_copy(src: Path, where: Path, mount: Callable[[Path, str], None]) -> Path:
    """A copy of `src` in `where`, on a file system that refuses writes, even root's."""
    if os.geteuid() == 0:  # root writes through permissions: only a read-only mount stops it
        mount(where, "size=16m")
        shutil.copytree(src, where / src.name)
        res = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot remount {where} read-only ({res.stderr.strip()})")
    else:
        shutil.copytree(src, where / src.name)
        for p in [where, *where.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    assert unwritable(where / src.name), f"{where} is writable after all"
    return where / src.name


# ---------------------------------------------------------------------- the command line (no torch)
def test_unquoted_non_ascii_path_says_quote_it(finished):
    res = run([*TRAIN, "data.root=/data/données"], finished.parent)
    one_error(res, "'data.root=/data/données'", "holds 'é'", "quote it: data.root='/data/données'")
    finished.assert_unchanged()


def test_unquoted_path_with_a_comma_says_quote_it(finished):
    res = run([*TRAIN, "data.root=/data/line 3, valve"], finished.parent)
    one_error(res, "several runs (a sweep)", "data.root='/data/line 3, valve'")
    finished.assert_unchanged()


def test_unknown_key_is_hydras_own_message(finished):
    res = run([*TRAIN, "data.batchsize=4"], finished.parent)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Could not override 'data.batchsize'" in res.stderr and "+data.batchsize=4" in res.stderr
    finished.assert_unchanged()


def test_new_run_folder_on_a_read_only_file_system(finished, tmp_path, mount):
    ro = read_only_copy(finished.dir, tmp_path / "ro", mount).parent
    res = run([*TRAIN, f"run_dir='{ro / 'new'}'"], finished.parent)
    one_error(res, f"run folder {ro / 'new'} cannot be written", "read-only file system", "pass run_dir=")
    finished.assert_unchanged()


def test_rerunning_a_finished_run_on_a_read_only_file_system(finished, tmp_path, mount):
    copy = read_only_copy(finished.dir, tmp_path / "ro", mount)
    before = snapshot(copy)
    res = run([*TRAIN, f"run_dir='{copy}'"], finished.parent)
    one_error(res, f"{copy} is on a read-only file system", "copy this one", "run_dir= the copy", "score.py")
    assert snapshot(copy) == before
    finished.assert_unchanged()


def test_run_folder_on_a_full_disk_is_refused_before_hydra_writes(finished, tmp_path, mount):
    small = tmp_path / "small"
    mount(small, "size=64k")
    res = run([*TRAIN, f"run_dir='{small / 'new'}'"], finished.parent)
    one_error(res, f"the disk holding {small} is full", "KiB free", "pass run_dir=")
    assert not (small / "new").exists()
    finished.assert_unchanged()


# ---------------------------------------------------------------------- train.py runs
def test_disk_full_while_writing_outputs_names_the_disk(finished, tmp_path, mount):
    small = tmp_path / "small"
    mount(small, "size=2m")  # room for Hydra's files and the log, not for a 256-wide member's checkpoint
    res = run([*TRAIN, f"run_dir='{small / 'new'}'", "branches.b2.dim=256", "branches.b2.depth=2"], tmp_path)
    one_error(
        res, "the disk is full: no space left while writing", str(small / "new"), "pass another run_dir="
    )
    finished.assert_unchanged()


def test_disk_full_while_writing_the_final_checkpoint_names_the_disk(finished, tmp_path, mount):
    """A 24 MiB disk holds the 20 MiB last.ckpt but not the final.ckpt written after it."""
    small = tmp_path / "small"
    mount(small, "size=24m")
    res = run([*TRAIN, f"run_dir='{small / 'new'}'", "branches.b2.dim=256", "branches.b2.depth=2"], tmp_path)
    one_error(
        res, "the disk is full: no space left while writing", str(small / "new"), "pass another run_dir="
    )
    assert (small / "new" / "checkpoints" / "last.ckpt").is_file()  # the resumable state was kept
    assert not list((small / "new" / "checkpoints").glob(".*.tmp"))  # no half-written file left
    finished.assert_unchanged()


def test_branch_typo_fails_before_any_data_is_read(finished):
    res = run([*TRAIN, "branch=b9", f"run_dir='{finished.parent / 'b9'}'"], finished.parent)
    one_error(res, "unknown branch ['b9']", "expected 'all' or some of")
    assert "indexed" not in res.stdout and "decoding" not in res.stdout  # the data was never touched
    finished.assert_unchanged()


def test_bad_values_are_named_together_in_one_error(finished):
    res = run([*TRAIN, "trainer.max_epochs=abc", "data.batch_size=abc"], finished.parent)
    one_error(res, "trainer.max_epochs='abc': expected an integer >= 1", "data.batch_size='abc'")
    finished.assert_unchanged()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1: expected an integer >= 1"),
        ("branch=b9", "unknown branch ['b9']"),
        ("freeze=b3", "freeze=['b3'] names members that are not selected"),
    ],
)
def test_a_bad_value_is_refused_before_torch_loads_and_writes_nothing(tmp_path, override, message):
    # train.py as a script in a process of its own, which says on its way out whether torch was loaded
    argv = [str(REPO / "train.py"), *TINY_RUN, override, f"run_dir='{tmp_path / 'r'}'"]
    probe = (
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('torch loaded:', 'torch' in sys.modules)\n"
    )
    res = run([sys.executable, "-c", probe], tmp_path)
    one_error(res, message)
    assert res.stdout.strip().splitlines()[-1] == "torch loaded: False"
    assert not (tmp_path / "r").exists()  # no run folder, no Hydra log, no lock


def test_bad_test_file_with_skip_set_names_it_without_suggesting_skip(finished, tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    bad = sorted((root / "valve" / "test").glob("*.wav"))[0]
    bad.write_bytes(b"not audio")
    cmd = [*TRAIN, f"data.root='{root}'", "data.name=tiny", "data.on_bad_file=skip"]
    res = run([*cmd, f"run_dir='{finished.parent / 'bad-test'}'"], finished.parent)
    line = one_error(res, str(bad), "not a readable audio file", "It is a test clip")
    assert SKIP_HINT not in line
    finished.assert_unchanged()


def lock_holder(lock: Path) -> str:
    return lock.read_text() if lock.exists() else ""


def test_second_train_py_on_a_run_folder_in_use_is_refused(finished, tmp_path):
    busy = finished.parent / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TRAIN, f"run_dir='{busy}'", "trainer.max_epochs=100000"]  # runs until killed
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while f"pid {first.pid} " not in lock_holder(busy / "run.lock"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        res = run([*cmd, "seed=1"], tmp_path)
        one_error(res, f"run folder {busy} is in use by another train.py (pid {first.pid} on", "run_dir=")
        assert first.poll() is None  # the first run goes on
        assert "seed=1" not in (busy / ".hydra" / "overrides.yaml").read_text()  # Hydra never ran for it
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the killed holder's lock: the folder can be taken again
    fd = os.open(busy / "run.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    finished.assert_unchanged()


# ---------------------------------------------------------------------- tools/score.py
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus=1"], "argument 'bogus=1': expected key=value with key one of"),
        (["inputs=x"], "missing run=...; usage: python tools/score.py run=RUN inputs=FILE_OR_DIR"),
        (["run=r", "inputs=x", "batch_size=0"], "batch_size='0': expected a whole number of clips >= 1"),
        (["--help"], None),
    ],
)
def test_score_tool_answers_its_arguments_before_torch_loads(tmp_path, args, message):
    # the tool as a script in a process of its own, which says on its way out whether torch was loaded
    argv = [SCORE[1], *args]
    probe = (
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('torch loaded:', 'torch' in sys.modules)\n"
    )
    res = run([sys.executable, "-c", probe], tmp_path)
    if message is None:  # --help: the usage, exit status 0
        assert res.returncode == 0 and "python tools/score.py run=RUN inputs=FILE_OR_DIR" in res.stdout
    else:
        one_error(res, message)
    assert res.stdout.strip().splitlines()[-1] == "torch loaded: False"


def test_score_tool_with_a_truncated_checkpoint(finished, tmp_path):
    copy = tmp_path / "cut"
    shutil.copytree(finished.dir, copy)
    ckpt = copy / "checkpoints" / "final.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:20000])  # an interrupted copy
    folder = Path(read_csv(finished.dir / "scores.csv")[0]["path"]).parent
    res = run([*SCORE, f"run={copy}", f"inputs={folder}"], tmp_path)
    one_error(res, str(ckpt), "not a readable asd checkpoint")
    finished.assert_unchanged()


def test_score_tool_windows_long_files_and_pads_short_ones_from_a_read_only_run(finished, tmp_path, mount):
    """A 5 s file of five 1 s test clips: its row is its most anomalous window, at the loudest clip."""
    rows = [
        r
        for r in read_csv(finished.dir / "scores.csv")
        if r["machine"] == "rotor" and r["domain"] == "source"
    ]
    rows.sort(key=lambda r: float(r["final"]))
    hot, cold = rows[-1], rows[:4]
    parts = [sf.read(r["path"], dtype="float32") for r in [*cold[:3], hot, cold[3]]]
    sr = parts[0][1]
    inputs = tmp_path / "plant recordings"
    inputs.mkdir()
    sf.write(inputs / "long.wav", np.concatenate([x for x, _ in parts]), sr, subtype="FLOAT")
    sf.write(inputs / "short.wav", parts[0][0][: sr // 10], sr, subtype="FLOAT")
    run_dir = read_only_copy(finished.dir, tmp_path / "ro", mount)  # scoring writes nothing into a run
    out = tmp_path / "scores.csv"
    cmd = [*SCORE, f"run={run_dir}", f"inputs={inputs}", "machine=rotor", "section=00", "domain=source"]
    res = run([*cmd, f"out={out}"], tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "1 file(s) longer than the run's 1 s clips were scored in windows of 1 s every 1 s" in res.stderr
    assert "the file's score is the maximum over its windows" in res.stderr
    assert "1 clip(s) shorter than 1 s (the shortest 0.10 s) were padded by repeating them" in res.stderr
    long, short = read_csv(out)
    assert long["file"].endswith("long.wav") and long["windows"] == "5" and long["window_start"] == "3.000"
    assert float(long["final"]) == pytest.approx(float(hot["final"]), rel=1e-4, abs=1e-6)
    assert short["windows"] == "1" and short["window_start"] == "0.000"
    finished.assert_unchanged()


@pytest.mark.parametrize("hop", ["0", "2.5", "abc"])
def test_score_tool_refuses_a_hop_that_would_leave_audio_unscored(hop):
    spec = importlib.util.spec_from_file_location("score_tool", REPO / "tools" / "score.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(AsdError, match=rf"hop='{hop}': expected seconds in \(0, 2\].*unscored"):
        tool.hop_of({"hop": hop}, audio_config(duration=2.0))
    # the windows the tool scores a 5 s file in (asd.data.windows, which it calls)
    assert window_starts(5 * 16000, 2 * 16000, 16000) == [0, 16000, 32000, 48000]
    assert window_starts(5 * 16000 + 1, 2 * 16000, 2 * 16000) == [0, 32000, 48001]


# ---------------------------------------------------------------------- the audio cache and the data
def make_wavs(folder: Path, n: int, seconds: float, sr: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sf.write(
            folder / f"clip_{i:04d}.wav", 0.1 * rng.standard_normal(int(seconds * sr)), sr, subtype="PCM_16"
        )
    return sorted(str(p) for p in folder.glob("*.wav"))


DECODE = """
import sys
from asd.data.audio import audio_config
from asd.data.cache import AudioCache
cache = AudioCache(sys.argv[1], audio_config(sample_rate=16000, duration=2.0), workers=1)
cache.load(sys.argv[2:], "fan-fit")
"""


def test_killed_decode_leaves_no_temporary_behind(tmp_path, caplog):
    paths = make_wavs(tmp_path / "wav", 300, 2.0, 22050)  # resampled to 16 kHz: a second or more to decode
    cache = tmp_path / "cache"
    decoding = subprocess.Popen([sys.executable, "-c", DECODE, str(cache), *paths])
    kill_while_writing(decoding, cache, ".*.npy.tmp", timeout=60)
    (left,) = cache.glob(".*.npy.tmp")  # what the killed writer left
    # a living writer's temporary (its lock held) stays
    alive = cache / ".pump-fit-0123456789abcdef.x.npy.tmp"
    alive.write_bytes(b"")
    fd = os.open(alive, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.WARNING, logger="asd.data.cache"):
            AudioCache(cache, audio_config(sample_rate=16000, duration=2.0)).load(paths[:2], "valve-fit")
        assert not left.exists() and alive.exists()
        assert f"removed {left}, left by a decode that was interrupted" in caplog.text
    finally:
        os.close(fd)


def test_datasets_with_machines_of_one_name_keep_a_cache_each(tiny_root, tmp_path, caplog):
    a, b = tmp_path / "site-a", tmp_path / "site-b"
    shutil.copytree(tiny_root, a)
    shutil.copytree(tiny_root, b)

    def setup(root: Path) -> None:
        AsdDataModule(root=root, audio={"duration": 1.0}, cache_dir=tmp_path / "cache").setup()

    setup(a)
    setup(b)
    with caplog.at_level(logging.INFO, logger="asd.data.cache"):
        setup(a)  # site B's caches did not evict site A's
    assert "decoding" not in caplog.text and "removed stale" not in caplog.text


def test_padded_and_cut_clips_are_counted_in_one_warning_per_machine_and_split(tiny_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    first, second = sorted((root / "rotor" / "train").glob("*.wav"))[:2]
    x, sr = sf.read(first, dtype="float32")
    sf.write(first, x[: sr // 10], sr, subtype="FLOAT")  # 0.1 s
    sf.write(second, np.tile(x, 60), sr, subtype="FLOAT")  # 60 s
    for attempt in ("decoded", "from the cache"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="asd.data.datamodule"):
            dm = AsdDataModule(root=root, audio={"duration": 1.0}, val_fraction=0.0, cache_dir=tmp_path / "c")
            dm.setup()
        warnings = [
            r.getMessage() for r in caplog.records if "padded" in r.getMessage() or "cut" in r.getMessage()
        ]
        assert warnings == [
            "rotor fit: 1 clip(s) shorter than 1 s (the shortest 0.10 s) were padded by repeating them, "
            "1 longer clip(s) (the longest 60.00 s) were cut to their first 1 s; data.audio.duration sets "
            "the length in seconds, data.audio.pad and data.audio.crop how"
        ], attempt
