"""Shared fixtures: every test writes caches under a temporary ASD_CACHE, never the home folder."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def share_cores() -> None:
    """Under pytest-xdist, each worker and the processes its tests start get an equal share of the
    cores as threads: two workers of two torch threads each on two cores spin against each other and
    run several times slower. An OMP_NUM_THREADS set by the user is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        # the cores this process may use, as xdist's `-n auto` counts them
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


share_cores()  # before numpy's BLAS and torch load: each reads OMP_NUM_THREADS once, when it loads

from asd.data.synthetic import SyntheticConfig, generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIMII = REPO.parent / "shared" / "data" / "mimii_0db"

#: a synthetic dataset small enough for unit tests (1 s clips, one section per machine)
TINY = SyntheticConfig(sections=1, source_train=8, target_train=2, test_per_class=3, duration=1.0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("ASD_CACHE")
    os.environ["ASD_CACHE"] = str(tmp_path_factory.mktemp("asd-cache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    yield
    if old is None:
        os.environ.pop("ASD_CACHE", None)
    else:
        os.environ["ASD_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic DCASE 2022+ dataset (2 machines x 1 section), generated once per session."""
    return generate(tmp_path_factory.mktemp("tiny") / "data", TINY)


@pytest.fixture
def mount(tmp_path) -> Iterator[Callable[[Path, str], None]]:
    """`mount(where, options)`: a real tmpfs for this test (unmounted after it); skips where not allowed."""
    mounted: list[Path] = []

    def do(where: Path, options: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        try:
            res = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
            )
        except FileNotFoundError:
            pytest.skip("no mount command here to make a small or read-only file system")
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): it needs root or CAP_SYS_ADMIN")
        mounted.append(where)

    yield do
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def kill_while_writing(proc: subprocess.Popen, folder: Path, pattern: str, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as a file matching `pattern` appears in `folder` (a write under way)."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        assert proc.poll() is None, f"{proc.args[:3]} ended before it could be killed; give it more work"
        assert time.monotonic() < deadline, f"no {pattern} in {folder} after {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def tiny_config(tiny_root: Path, *overrides: str):
    """train.py's config for the tiny dataset at debug sizes (no run folder is made)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        base = ["debug=default", f"data.root={tiny_root}", "data=dcase", "run_dir=/tmp/x"]
        return compose("train", overrides=[*base, *overrides])
