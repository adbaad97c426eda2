"""The one exception type users see for bad input, configuration or files, and the disk faults
(full, read-only, forbidden) turned into it."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from asd.paths import cache_root


class AsdError(ValueError):
    """A problem with the user's data, files or configuration.

    The message always names the offending file or key and says how to fix it, so
    entry points can print it as one line instead of a traceback.
    """


#: errno of a write that fails for a reason outside asd, which the user fixes on the disk
DISK_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
#: less free space than this is a full disk to a run: its checkpoints alone take more
MIN_FREE = 2**20


def unwritable(folder: str | Path) -> str:
    """Why a run cannot write in `folder` (or where it would be made, when it does not exist yet):
    a file in the way, a read-only or forbidden folder, a full disk; "" when it can."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only mount, even for root
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return f"{existing} is on a read-only file system"
        return f"{existing} is not writable for this user (its permissions)"
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE:
        return f"the disk holding {existing} is full ({free / 1024:.0f} KiB free)"
    return ""


def disk_fault(e: BaseException, where: str | Path, fix: str) -> AsdError | None:
    """One AsdError for a write that failed on a full, read-only or forbidden disk, else None.

    Args:
        e: the exception, or one whose cause or context is the OSError.
        where: the folder that was being written, named when the error names no file.
        fix: the other way out for a file outside the cache, e.g. "pass another run_dir="; files
            under the cache folder (`asd.paths.cache_root`) get "point ASD_CACHE at another disk".
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FAULTS:
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    named = e.filename2 or e.filename  # filename2: the destination of a move
    target = named or where
    cache = cache_root().resolve()
    if Path(os.path.abspath(target)).is_relative_to(cache):
        where, fix = cache, f"point the ASD_CACHE environment variable (now {cache}) at another disk"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB"
        except OSError:
            free = "an unknown amount"
        full = "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is used up"
        what = f"writing {named}" if named else f"writing into {where}"
        return AsdError(
            f"{full}: no space left while {what} ({free} free there without the file that did not fit); "
            f"free space there, or {fix}"
        )
    if e.errno == errno.EROFS:
        return AsdError(f"{target} is on a read-only file system; {fix}")
    return AsdError(f"no permission to write {target}; fix the folder's permissions, or {fix}")
