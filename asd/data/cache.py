"""Decoded-audio cache (one memory-mapped .npy per clip list, so only the first epoch decodes WAVs)
and the feature cache beside it (a front end's features of those clips, computed once).

One file: the two caches share one naming scheme (a new audio key deletes that name's features:
`AudioCache._remove_stale`) and one way of writing (`locked_temp`, `create_memmap`, `build_lock`),
and a change to either must keep the other's files valid.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asd.choices import ON_BAD_FILE
from asd.data.audio import AudioConfig, AudioError, decode
from asd.errors import AsdError

log = logging.getLogger(__name__)

# Bump when the cache files' layout or meaning changes, so old files are rebuilt instead of misread.
CACHE_FORMAT = 2
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


@dataclass
class CachedAudio:
    """Waveforms of the good clips of one list, in the order given."""

    waves: np.ndarray  # (N_good, T) float32; a read-only np.memmap when it came from or went to the cache
    paths: list[str]  # the N_good paths, as given, minus the bad ones
    bad: list[tuple[str, str]]  # (path, reason) of skipped files; only with on_bad_file="skip"
    hit: bool  # served from the cache without decoding
    lengths: np.ndarray  # (N_good,) each recording's own length in samples, before crop/pad to T


class AudioCache:
    """Decode lists of recordings once, keep them as `<name>-<key>.npy` + `.json` under `cache_dir`.

    The key hashes the audio settings and every file's absolute path, size and mtime, so
    any change of files or settings builds a new cache file (older ones of that name are
    deleted). Cold loads decode with `workers` threads.

    Files are written under hidden temporary names and renamed into place. A writer holds an
    `flock` on each of its temporaries, which the kernel releases when the writer dies, so every
    load deletes the temporaries whose lock it can take: those of a decode that was killed.
    """

    def __init__(self, cache_dir: str | Path, cfg: AudioConfig, workers: int = 2):
        if not isinstance(cfg, AudioConfig):
            raise AsdError(f"AudioCache needs an AudioConfig (see asd.data.audio.audio_config), got {cfg!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise AsdError(f"workers={workers!r}: expected an integer >= 1 (decoding threads)")
        self.cache_dir = Path(cache_dir)
        self.cfg = cfg
        self.workers = workers

    def load(self, paths: Sequence[str], name: str, on_bad_file: str = "error") -> CachedAudio:
        """Waveforms of `paths` (N, T) from the cache, decoding and caching them on a miss.

        Args:
            paths: audio files, in the order the rows should have.
            name: cache name such as "fan-train"; one cache file per name is kept.
            on_bad_file: "error" raises the first AudioError; "skip" leaves bad files out and
                lists them in `bad` and in a warning.
        """
        if on_bad_file not in ON_BAD_FILE:
            raise AsdError(f"data.on_bad_file={on_bad_file!r}: expected one of {ON_BAD_FILE}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AsdError(
                f"cache name {name!r}: use letters, digits and '_.=+-' only (e.g. 'fan-train'), "
                "it becomes part of a file name"
            )
        paths = [str(p) for p in paths]
        if not paths:
            empty = np.zeros((0, self.cfg.num_samples or 0), np.float32)
            return CachedAudio(empty, [], [], hit=False, lengths=np.zeros(0, np.int64))
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AsdError(
                f"cache folder {self.cache_dir} cannot be created ({e.strerror}); "
                "point it (or the ASD_CACHE environment variable) at a writable folder"
            ) from e
        self._remove_dead_temps()
        key = self._key(paths)
        npy, meta = self.cache_dir / f"{name}-{key}.npy", self.cache_dir / f"{name}-{key}.json"
        cached = self._open(npy, meta, key, len(paths))
        hit = cached is not None
        if not hit:
            with build_lock(self.cache_dir, name):
                cached = self._open(npy, meta, key, len(paths))  # built while we waited?
                hit = cached is not None
                if not hit:
                    cached = self._decode_into_cache(paths, name, key, npy, meta, on_bad_file)
        waves, bad_rows, lengths = cached
        if hit:
            log.info("%s: %d clips of %d samples from %s", name, waves.shape[0], waves.shape[1], npy)
        bad = [(paths[i], reason) for i, reason in bad_rows]
        if bad and on_bad_file == "error":
            raise AudioError(bad[0][1])
        if bad:
            listing = "\n".join(f"  {reason}" for _, reason in bad)
            log.warning("%s: skipped %d bad file(s) (data.on_bad_file=skip):\n%s", name, len(bad), listing)
        skipped = {i for i, _ in bad_rows}
        good = [p for i, p in enumerate(paths) if i not in skipped]
        return CachedAudio(waves=waves, paths=good, bad=bad, hit=hit, lengths=np.asarray(lengths, np.int64))

    def _decode_into_cache(
        self, paths: list[str], name: str, key: str, npy: Path, meta: Path, on_bad_file: str
    ) -> tuple[np.ndarray, list[tuple[int, str]], list[int]]:
        """Decode `paths` into the cache files `npy` + `meta` (under `build_lock`): the waves as a memmap,
        the bad rows and each clip's length, as `_open` returns them."""
        t0 = time.perf_counter()
        log.info("%s: decoding %d files with %d thread(s) into %s", name, len(paths), self.workers, npy)
        bad_rows, lengths = self._build(paths, name, key, npy, meta, on_bad_file)
        self._remove_stale(name, key)
        waves = np.load(npy, mmap_mode="r")  # (N_good, T)
        log.info("%s: cached %s in %.1f s", name, waves.shape, time.perf_counter() - t0)
        return waves, bad_rows, lengths

    def _key(self, paths: list[str]) -> str:
        """Hash of the settings and each file's absolute path, size and mtime (None when missing)."""
        h = hashlib.sha256(f"{CACHE_FORMAT}:{self.cfg.key()}".encode())
        for p in paths:
            full = os.path.abspath(p)
            try:
                st = os.stat(full)
                stamp = [full, st.st_size, st.st_mtime_ns]
            except OSError:
                stamp = [full, None, None]
            h.update(json.dumps(stamp).encode())
        return h.hexdigest()[:16]

    def _open(
        self, npy: Path, meta: Path, key: str, count: int
    ) -> tuple[np.ndarray, list[tuple[int, str]], list[int]] | None:
        """The cached (waves, bad rows, lengths) when both files exist and agree, else None (rebuild)."""
        if not (npy.exists() and meta.exists()):
            return None
        try:
            info = json.loads(meta.read_text())
            if info["format"] != CACHE_FORMAT or info["key"] != key or info["count"] != count:
                raise ValueError("its sidecar describes another clip list")
            bad_rows = [(int(i), str(reason)) for i, reason in info["bad"]]
            if any(not 0 <= i < count for i, _ in bad_rows):
                raise ValueError("its sidecar lists bad rows out of range")
            lengths = [int(t) for t in info["lengths"]]
            if len(lengths) != count - len(bad_rows):
                raise ValueError("its sidecar lists another number of lengths than of clips")
            waves = np.load(npy, mmap_mode="r")
            want = (count - len(bad_rows), self.cfg.num_samples or info["shape"][1])
            if waves.dtype != np.float32 or waves.shape != want or list(waves.shape) != info["shape"]:
                raise ValueError(f"it holds {waves.dtype} {waves.shape}, expected float32 {want}")
            if npy.stat().st_size != waves.offset + waves.nbytes:
                raise ValueError("its size does not match its header")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("cache %s is damaged or incomplete (%s); rebuilding it", npy, e)
            return None
        return waves, bad_rows, lengths

    def _build(
        self, paths: list[str], name: str, key: str, npy: Path, meta: Path, on_bad_file: str
    ) -> tuple[list[tuple[int, str]], list[int]]:
        """Decode all paths into `npy` (atomically) and write its sidecar; returns the bad rows and
        the good clips' own lengths."""
        n, t = len(paths), self.cfg.num_samples
        bad_rows: list[tuple[int, str]] = []
        lengths: list[int] = []
        first_good = -1
        out = None
        with locked_temp(self.cache_dir, f".{name}-{key}.", ".npy") as tmp:
            with closing(self._decode_all(paths)) as results:
                for i, decoded in enumerate(results):
                    if isinstance(decoded, AudioError):
                        if on_bad_file == "error":
                            raise decoded
                        bad_rows.append((i, str(decoded)))
                        continue
                    result, length = decoded
                    lengths.append(length)
                    if out is None:
                        # duration=None: the first good clip sets T; rows of skipped files stay unused
                        first_good, t = i, t or result.shape[0]
                        out = create_memmap(self.cache_dir, tmp, (n, t))  # (N, T)
                    if result.shape[0] != t:
                        raise AsdError(
                            f"{paths[i]} has {result.shape[0]} samples but {paths[first_good]} has {t}: "
                            f"clips of different lengths cannot be cached together for '{name}'; "
                            "set data.audio.duration (seconds) to crop/pad every clip to one length"
                        )
                    out[i - len(bad_rows)] = result
                    unmap_rows(out, i - len(bad_rows), i - len(bad_rows) + 1)
            if out is None:
                raise AudioError(
                    f"all {n} files of '{name}' are bad, nothing to load; the first: {bad_rows[0][1]}"
                )
            out.flush()
            if bad_rows:
                self._shrink(out, n - len(bad_rows), tmp, name, key)
            del out
            os.replace(tmp, npy)
        sidecar = {
            "format": CACHE_FORMAT,
            "key": key,
            "count": n,
            "shape": [n - len(bad_rows), t],
            "config": asdict(self.cfg),
            "paths": paths,
            "bad": [[i, reason] for i, reason in bad_rows],
            "lengths": lengths,
        }
        with locked_temp(self.cache_dir, f".{name}-{key}.", ".json") as tmp:
            Path(tmp).write_text(json.dumps(sidecar, indent=1))
            os.replace(tmp, meta)
        return bad_rows, lengths

    def _shrink(self, out: np.memmap, good: int, tmp: str, name: str, key: str) -> None:
        """Replace the file `tmp` (N, T) by one holding only its first `good` rows (good, T)."""
        with locked_temp(self.cache_dir, f".{name}-{key}.", ".npy") as tmp2:
            small = create_memmap(self.cache_dir, tmp2, (good, out.shape[1]))
            step = max(1, (8 << 20) // max(1, out.shape[1] * out.itemsize))  # 8 MB chunks: memory stays flat
            for s in range(0, good, step):
                small[s : s + step] = out[s : min(s + step, good)]
                unmap_rows(small, s, s + step)
                unmap_rows(out, s, s + step)
            small.flush()
            del small
            os.replace(tmp2, tmp)

    def _decode_all(self, paths: list[str]) -> Iterator[tuple[np.ndarray, int] | AudioError]:
        """(wave, own length) or AudioError per path, in order; threads decode ahead of the writer."""
        one: Callable[[str], tuple[np.ndarray, int] | AudioError] = self._decode_one
        if self.workers == 1:
            yield from map(one, paths)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="asd-decode")
        try:
            yield from pool.map(one, paths)
        finally:  # on an error, drop the files not started yet instead of decoding them all first
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode_one(self, path: str) -> tuple[np.ndarray, int] | AudioError:
        try:
            return decode(path, self.cfg)
        except AudioError as e:
            return e

    def _remove_dead_temps(self) -> None:
        """Delete the temporaries of writers that died (a killed decode): those whose lock is free."""
        with os.scandir(self.cache_dir) as it:
            temps = [e.path for e in it if e.name.startswith(".") and e.name.endswith(".tmp")]
        for path in temps:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a living process is writing it
            else:
                try:
                    os.unlink(path)
                    log.warning("removed %s, left by a decode that was interrupted", path)
                except FileNotFoundError:
                    pass  # its writer renamed it into place just before our lock
            finally:
                os.close(fd)

    def _remove_stale(self, name: str, key: str) -> None:
        """Delete this name's cache files of other keys (older files or settings), their features too."""
        pattern = re.compile(re.escape(name) + r"-([0-9a-f]{16})(\.[0-9a-f]{12}\.features)?\.(npy|json)")
        with os.scandir(self.cache_dir) as it:
            entries = list(it)
        for entry in entries:
            m = pattern.fullmatch(entry.name)
            if m and m.group(1) != key:
                try:
                    os.unlink(entry.path)
                    log.info("removed stale cache file %s", entry.path)
                except FileNotFoundError:
                    pass  # another process removed it first


class NoRoom(AsdError):
    """The cache folder's disk has too little free space for a cache file."""


def create_memmap(folder: Path, path: str, shape: tuple[int, ...]) -> np.memmap:
    """A float32 .npy memmap of `shape` at `path` (in `folder`), after checking the disk has room."""
    need = int(np.prod(shape)) * 4
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NoRoom(
            f"the cache for {shape[0]} clips needs {need / 1e9:.2f} GB but {folder} has "
            f"{free / 1e9:.2f} GB free; free space or point ASD_CACHE at a larger disk"
        )
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


class RowReader:
    """Rows of a cache file read with `pread` into fresh arrays instead of through its memory map.

    A read through the map leaves the row's pages mapped, counted in the process's resident memory
    until the map closes: an epoch over 6,000 clips of 10 s would hold 5.5 GB of audio and features.
    `pread` copies from the kernel's page cache (which keeps the file for the next epoch, and gives
    it up under memory pressure) and maps nothing; on this machine it reads a row of 10 s in 36 us,
    against 28 us through a kept map and 52 us through a map unmapped after each row, and an epoch
    from the feature cache runs at the same rate either way (`benchmarks/bench_data.py`). Only for
    what `fits`: a whole read-only float32 .npy map, as `np.load(mmap_mode="r")` returns it.
    """

    def __init__(self, array: np.memmap):
        self.path, self.offset = str(array.filename), int(array.offset)
        self.row_shape = array.shape[1:]
        self.rows, self.row_bytes = len(array), int(np.prod(self.row_shape)) * array.itemsize
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        weakref.finalize(self, os.close, self.fd)
        size = os.fstat(self.fd).st_size
        if size != self.offset + self.rows * self.row_bytes:
            raise AsdError(
                f"{self.path}: {size} bytes, but its map holds {self.rows} rows of {self.row_bytes} "
                "bytes: the cache file was replaced while in use; delete it and run again"
            )

    @staticmethod
    def fits(array: Any) -> bool:
        return (
            hasattr(os, "preadv")
            and isinstance(array, np.memmap)
            and isinstance(array.base, mmap.mmap)  # the file's own map, not a view of part of it
            and array.mode == "r"
            and array.dtype == np.float32
            and array.ndim >= 1
            and array.flags.c_contiguous
            and bool(array.filename)
        )

    def __reduce__(self):
        raise TypeError(
            f"a RowReader of {self.path} holds this process's file descriptor: pickle the WaveStore, "
            "which opens its files again"
        )

    def read(self, row: int) -> np.ndarray:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of {self.path}, which has {self.rows}")
        out = np.empty(self.row_shape, np.float32)
        if self.row_bytes == 0:
            return out
        view, done, at = memoryview(out).cast("B"), 0, self.offset + row * self.row_bytes
        while done < self.row_bytes:
            got = os.preadv(self.fd, [view[done:]], at + done)
            if got == 0:
                raise AsdError(
                    f"{self.path}: row {row} ends after {done} of {self.row_bytes} bytes: the cache "
                    "file was cut short while in use; delete it and run again"
                )
            done += got
        return out


def unmap_rows(array: np.ndarray, start: int, stop: int) -> None:
    """Take rows [start, stop) of a memory-mapped cache file out of this process's resident memory.

    `array` is (a row slice of) an np.memmap of a file, as `np.load(mmap_mode="r")` and
    `create_memmap` give; the cache builders call this after each chunk they write or read. The
    pages stay in the kernel's page cache, so a later read of those rows needs no disk I/O; but a
    pass over a cache file no longer leaves the whole file counted in the process's RSS.
    Written pages of a shared map stay in the page cache, the file's newest content, and reach
    the disk as usual. Pages a neighbouring row shares are dropped too; a read maps them again.
    Nothing happens to an array in memory, a copy-on-write map (mode "c": dropping its pages
    would lose its changes), a non-contiguous array, or where the platform has no madvise.
    """
    owner = array
    while isinstance(owner, np.ndarray) and not isinstance(owner.base, mmap.mmap):
        owner = owner.base
    if (
        not isinstance(owner, np.memmap)
        or owner.mode == "c"
        or not hasattr(mmap, "MADV_DONTNEED")
        or not array.flags.c_contiguous
        or array.ndim == 0
        or stop <= start
    ):
        return
    mapped = owner.base
    first = np.frombuffer(mapped, np.uint8).ctypes.data  # the map's address; ValueError once closed
    row = array.strides[0]
    lo = (array.ctypes.data + start * row - first) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(mapped), array.ctypes.data + stop * row - first)
    if hi > lo:
        mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@contextmanager
def locked_temp(folder: Path, prefix: str, suffix: str) -> Iterator[str]:
    """A fresh hidden file in `folder` (so os.replace stays on one file system), locked while in use
    and removed afterwards unless it was renamed into place (`AudioCache._remove_dead_temps`)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix + ".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we live: see _remove_dead_temps
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.close(fd)


@contextmanager
def build_lock(folder: Path, name: str) -> Iterator[None]:
    """Held while one process builds cache `name` in `folder`; others wait here, then read its result.

    Under torchrun every rank loads the same cache at once; without this each one decoded the
    audio (and computed the features) into its own temporary and the last rename won. The lock is
    `flock` on the hidden file `.<name>.lock`, released by the kernel when its holder dies, so a
    killed builder never blocks the next run.
    """
    fd = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is building this cache in %s; waiting for it", name, folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class FeatureCache:
    """A front end's features of cached audio, computed once and kept memory-mapped beside it.

    For an audio cache file `<name>-<key>.npy` (`AudioCache`) and a `LogMel`, the features live in
    `<name>-<key>.<setting hash>.features.npy` with a `.json` sidecar: the audio cache's key covers the
    files and the audio settings, the setting hash the front end's, and the sidecar records the audio
    file's size and modification time, so a rebuilt audio file or another setting builds them anew.
    When the audio cache of that name is rebuilt under a new key, its features are deleted with it;
    features of other settings of the same audio stay beside each other (members may differ).
    Written like the audio cache: a locked hidden temporary, renamed into place when complete.
    """

    def __init__(self, frontend: Any, batch_size: int = 32):
        for attr in ("setting", "num_frames", "n_mels", "compute"):
            if not hasattr(frontend, attr):
                raise AsdError(
                    f"FeatureCache needs a front end with {attr!r} (asd.features.LogMel), "
                    f"got {type(frontend).__name__}"
                )
        self.frontend, self.batch_size = frontend, batch_size
        self.tag = hashlib.sha256(f"{CACHE_FORMAT}:{frontend.setting}".encode()).hexdigest()[:12]

    def path_for(self, audio: Path) -> Path:
        return audio.with_name(f"{audio.stem}.{self.tag}.features.npy")

    def load(self, waves: np.ndarray) -> np.ndarray:
        """The features (N, n_mels, frames) float32 of `waves` (N, T), a memmap of an audio cache file:
        read from the cache, or computed in batches and cached first."""
        audio = Path(getattr(waves, "filename", None) or "")
        if not audio.name.endswith(".npy"):
            raise AsdError(
                f"FeatureCache: expected a memory-mapped audio cache file, got {type(waves).__name__}"
            )
        if not audio.is_file():  # replaced meanwhile (another run's new key removed it): an OSError
            raise FileNotFoundError(errno.ENOENT, "the audio cache file is gone", str(audio))
        npy = self.path_for(audio)
        meta = npy.with_suffix(".json")
        st = audio.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        want = (len(waves), self.frontend.n_mels, self.frontend.num_frames(waves.shape[1]))
        cached = self._open(npy, meta, stamp, want)
        if cached is not None:
            return cached
        with build_lock(audio.parent, f"{audio.stem.rsplit('-', 1)[0]}.{self.tag}.features"):
            cached = self._open(npy, meta, stamp, want)  # built while we waited?
            return cached if cached is not None else self._build(waves, audio, npy, meta, stamp, want)

    def _build(
        self, waves: np.ndarray, audio: Path, npy: Path, meta: Path, stamp: list[int], want: tuple[int, ...]
    ) -> np.ndarray:
        t0 = time.perf_counter()
        with locked_temp(audio.parent, f".{npy.stem}.", ".npy") as tmp:
            out = create_memmap(audio.parent, tmp, want)  # (N, n_mels, frames)
            for s in range(0, len(waves), self.batch_size):
                chunk = torch.from_numpy(np.array(waves[s : s + self.batch_size], dtype=np.float32))
                with torch.no_grad():
                    out[s : s + len(chunk)] = self.frontend.compute(chunk).cpu().numpy()
                unmap_rows(waves, s, s + len(chunk))
                unmap_rows(out, s, s + len(chunk))
            out.flush()
            del out
            os.replace(tmp, npy)
        setting = self.frontend.setting
        sidecar = {"format": CACHE_FORMAT, "audio": stamp, "setting": setting, "shape": list(want)}
        with locked_temp(audio.parent, f".{npy.stem}.", ".json") as tmp:
            Path(tmp).write_text(json.dumps(sidecar, indent=1))
            os.replace(tmp, meta)
        log.info("%s: features %s cached in %.1f s", audio.name, want, time.perf_counter() - t0)
        return np.load(npy, mmap_mode="r")

    def _open(self, npy: Path, meta: Path, stamp: list[int], want: tuple[int, ...]) -> np.ndarray | None:
        """The cached features when both files exist and fit the audio file as it is now, else None."""
        if not (npy.exists() and meta.exists()):
            return None
        try:
            info = json.loads(meta.read_text())
            if info["format"] != CACHE_FORMAT or info["audio"] != stamp:
                raise ValueError("they belong to an earlier version of the audio cache file")
            if info["setting"] != self.frontend.setting:
                raise ValueError("they were computed with other settings")
            feats = np.load(npy, mmap_mode="r")
            if feats.dtype != np.float32 or feats.shape != want:
                raise ValueError(f"they hold {feats.dtype} {feats.shape}, expected float32 {want}")
            if npy.stat().st_size != feats.offset + feats.nbytes:
                raise ValueError("the file's size does not match its header")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("features %s: rebuilding them (%s)", npy.name, e)
            return None
        return feats
