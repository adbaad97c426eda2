"""The entry points' memory allocator setting: freed blocks stay in the process for reuse.

Every batch allocates and frees tensors of tens of MB: b7's last decoder level alone holds
16 x 16 x 128 x 320 floats (42 MB) several times per batch of 16 clips. glibc's malloc serves a
block over its mmap threshold (which it raises as it goes, up to 32 MB) from fresh anonymous pages
and unmaps it on free, so such a tensor costs a page fault per 4 KiB and the kernel's zeroing of
every page, batch after batch. Scoring 16 clips with the default ensemble made 49,000-68,000 page
faults per call this way and 130-260 with freed blocks reused, and took 1.05-1.30x as long
(medians of 8 calls, two runs of three rounds; a training pass of every member 1.27-1.63x), with
the scores the same to the bit (benchmarks/bench_allocator.py).

`reuse_freed_memory` sets glibc's M_MMAP_MAX to 0 (every block comes from the heap) and
M_TRIM_THRESHOLD to its largest value (free memory at the top of the heap is not handed back), so a
freed block is reused by a later allocation with its pages already mapped. The cost is memory: the
process keeps its high-water mark of heap until it exits, and torch's 64-byte-aligned requests do
not always fit the block a tensor of the same size left, so the heap grows until its free blocks
fit the batch's tensors (two 64 MB tensors refilled: five rounds and 736 MB resident, then no
growth). On the default pipeline at 1k clips of 10 s peak RSS went from 3.0 to 3.4 GB and the
run took 205 instead of 225 s (benchmarks/results/bench_scale_1k_malloc_*); at 6k clips resident
anonymous memory was 4.1 GB against 2.8 (docs/results.md; 2.8 GB with reuse once the cache rows
came to be read with pread, one run, cause not found). `ASD_MALLOC=system` keeps the C
library's defaults where memory is tighter than time.

Why not a library: the usual advice for PyTorch on CPUs is a caching allocator (jemalloc or
tcmalloc) preloaded with LD_PRELOAD, which needs a system package and must be set before the
interpreter starts. glibc's own `mallopt` does the part that matters here inside the process,
with nothing to install. On a C library without glibc's malloc (macOS, musl) nothing changes.

`ASD_MALLOC` is `reuse` (the default) or `system`. The setting is process-wide, so only the
entry points call it (`train.py`, `tools/score.py`, `debug_freeze.py`): a program that imports
asd keeps its own allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

from asd.errors import AsdError

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: the largest trim threshold mallopt takes (a C int)
TRIM_NEVER = 2**31 - 1

ENV = "ASD_MALLOC"
CHOICES = ("reuse", "system")


def allocator_choice() -> str:
    """`ASD_MALLOC`, checked: "reuse" (the default) or "system"."""
    value = os.environ.get(ENV, "reuse").strip().lower() or "reuse"
    if value not in CHOICES:
        raise AsdError(
            f"environment variable {ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)} "
            f"(reuse keeps freed memory in the process for the next batch; system keeps the C "
            "library's defaults); unset it for the default"
        )
    return value


def reuse_freed_memory() -> bool:
    """Apply `ASD_MALLOC` to this process; True when glibc's malloc now keeps freed blocks."""
    if allocator_choice() == "system":
        log.debug("%s=system: the C library's malloc settings are kept", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.debug("not glibc (%s %s): malloc settings unchanged", platform.system(), platform.libc_ver())
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        log.debug("glibc's mallopt is not reachable (%s): malloc settings unchanged", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1
    log.debug("malloc keeps freed blocks for reuse: %s", done)
    return done
