"""The entry points' malloc setting (asd.allocator): freed blocks are reused, ASD_MALLOC chooses.

Each case is a fresh process, since the setting is process-wide: the page faults of allocating
and filling two 64 MB tensors again and again are counted with getrusage, with and without it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from asd.allocator import ENV, allocator_choice, reuse_freed_memory
from asd.errors import AsdError

REPO = Path(__file__).resolve().parents[1]

REFILL = """
import json, resource
from asd.allocator import reuse_freed_memory
reused = reuse_freed_memory()
import torch
def refill():
    a, b = torch.empty(16 * 2**20), torch.empty(16 * 2**20)  # 64 MB each, over glibc's mmap threshold
    a.fill_(1.0)
    b.fill_(2.0)
    del a, b
for _ in range(10):  # reusing, the heap grows until its free blocks fit these tensors, then stays
    refill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    refill()
print(json.dumps({"reused": reused, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def run(args: list[str], setting: str | None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if setting is not None:
        env[ENV] = setting
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@glibc
def test_freed_memory_is_reused_by_default_and_system_keeps_glibc_behaviour():
    pages = 4 * 128 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # four refills' worth of fresh pages
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.exists() and "[always]" in thp.read_text()
    outcome = {}
    for setting in (None, "reuse", "system"):
        res = run([sys.executable, "-c", REFILL], setting)
        assert res.returncode == 0, res.stderr
        outcome[setting] = json.loads(res.stdout.strip().splitlines()[-1])
    # glibc's own behaviour: every refill maps fresh pages, a fault each (one per 2 MiB where the
    # kernel backs every mapping with huge pages)
    assert outcome["system"]["reused"] is False
    assert outcome["system"]["faults"] > (pages / 512 if huge else pages) * 0.9, outcome
    for setting in (None, "reuse"):  # the default is reuse: the refills find their pages mapped
        assert outcome[setting]["reused"] is True
        assert outcome[setting]["faults"] < outcome["system"]["faults"] / 20, outcome


@pytest.mark.parametrize("value", ["Reuse", " system ", ""])
def test_choice_reads_case_and_blanks(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert allocator_choice() == (value.strip().lower() or "reuse")


def test_a_wrong_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(AsdError, match=r"ASD_MALLOC='jemalloc': expected one of reuse, system.*unset it"):
        reuse_freed_memory()


@pytest.mark.parametrize(
    "entry", [["train.py"], ["tools/score.py", "run=x", "inputs=y"], ["debug_freeze.py", "--freeze", "b2"]]
)
def test_the_entry_points_apply_it_and_refuse_a_wrong_value(entry):
    res = run([sys.executable, *entry], "tcmalloc")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: environment variable ASD_MALLOC='tcmalloc'")
