"""Cache files stay out of the process's resident memory (issue 13: peak RSS at 6k clips under
8 GB). Rows are read with pread (`RowReader`), and the cache builders unmap each chunk they
write or read (`unmap_rows`), so a pass over a cache file leaves it in the kernel's page cache
only. Measured for real, on this process's RssFile (Linux /proc); the values must be the
file's, to the bit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asd.data.audio import AudioConfig
from asd.data.cache import AudioCache, FeatureCache, RowReader, create_memmap, unmap_rows
from asd.data.datamodule import WaveRows, WaveStore
from asd.errors import AsdError

MB = 2**20


def resident_file() -> int:
    """Bytes of mapped files resident in this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")


def cache_file(tmp_path: Path, rows: int = 64, width: int = 2**18, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A float32 .npy of `rows` x `width` (64 MB by default) as the caches write it, and its values."""
    values = np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)
    path = tmp_path / "rows.npy"
    out = create_memmap(tmp_path, str(path), values.shape)
    out[:] = values
    out.flush()
    del out
    return path, values


def test_rows_read_with_pread_are_the_files_and_stay_unmapped(tmp_path):
    path, values = cache_file(tmp_path)
    mapped = np.load(path, mmap_mode="r")
    store = WaveStore([mapped])
    before = resident_file()
    for i in np.random.default_rng(1).permutation(len(values)):
        np.testing.assert_array_equal(store[int(i)], values[i])
    assert resident_file() - before < 8 * MB  # 64 MB read

    through_map = WaveStore([mapped], pread=False)
    for i in range(len(values)):
        np.testing.assert_array_equal(through_map[i], values[i])
    assert resident_file() - before > 48 * MB  # the alternative keeps what it read
    unmap_rows(mapped, 0, len(mapped))
    assert resident_file() - before < 8 * MB  # and unmapping gives it back


def test_pread_reads_row_parts_and_pickled_stores(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path, values = cache_file(tmp_path / "a", rows=6, width=1000)
    other, more = cache_file(tmp_path / "b", rows=3, width=1000, seed=1)
    store = WaveStore(
        [
            np.zeros((2, 1000), np.float32),
            np.load(other, mmap_mode="r"),  # rows 2-4: a second file, read at its own offsets
            WaveRows(WaveStore([np.load(path, mmap_mode="r")]), [5, 0]),  # rows 5-6
        ]
    )
    with pytest.raises(TypeError, match="holds this process's file descriptor"):
        pickle.dumps(store._readers[1])
    again = pickle.loads(pickle.dumps(store))  # as a worker gets it: it opens the files itself
    assert again._readers[1].fd != store._readers[1].fd
    for s in (store, again):
        np.testing.assert_array_equal(s[0], np.zeros(1000, np.float32))
        for k in range(3):
            np.testing.assert_array_equal(s[2 + k], more[k])
        np.testing.assert_array_equal(s[5], values[5])
        np.testing.assert_array_equal(s[6], values[0])
        with pytest.raises(IndexError):
            s[7]


def test_a_cache_file_deleted_by_another_run_stays_readable(tmp_path, caplog):
    path, values = cache_file(tmp_path, rows=4, width=1000)
    store = WaveStore([np.load(path, mmap_mode="r")])  # opened with the store
    late = np.load(path, mmap_mode="r")
    os.unlink(path)  # as AudioCache._remove_stale of a run with other settings does
    np.testing.assert_array_equal(store[3], values[3])
    with caplog.at_level("WARNING", logger="asd.data.datamodule"):
        after = WaveStore([late])  # its map outlives the name; it reads through the map
    assert "rows.npy: reading its rows through the memory map" in caplog.text
    np.testing.assert_array_equal(after[2], values[2])


def test_only_whole_read_only_float32_maps_are_read_with_pread(tmp_path):
    path, _ = cache_file(tmp_path, rows=4, width=100)
    mapped = np.load(path, mmap_mode="r")
    assert RowReader.fits(mapped)
    assert not RowReader.fits(mapped[1:])  # a view: its offset is not its own
    assert not RowReader.fits(np.load(path, mmap_mode="r+"))
    assert not RowReader.fits(np.load(path))  # in memory
    with pytest.raises(IndexError, match="row 4 of"):
        RowReader(mapped).read(4)


def test_a_cache_file_cut_short_while_in_use_is_named(tmp_path):
    path, values = cache_file(tmp_path, rows=8, width=1000)
    store = WaveStore([np.load(path, mmap_mode="r")])
    late = np.load(path, mmap_mode="r")  # mapped before the cut, first read after it
    np.testing.assert_array_equal(store[0], values[0])  # opens the file
    os.truncate(path, late.offset + 4 * 4000 + 10)  # rows 0-3 whole, 10 bytes of row 4
    np.testing.assert_array_equal(store[3], values[3])
    with pytest.raises(AsdError, match=r"rows\.npy: row 4 ends after 10 of 4000 bytes: .*delete it"):
        store[4]
    with pytest.raises(AsdError, match=r"rows\.npy: \d+ bytes, but its map holds 8 rows .*delete it"):
        RowReader(late)


def test_unmapping_written_rows_keeps_what_was_written(tmp_path):
    values = np.random.default_rng(2).standard_normal((64, 2**18), dtype=np.float32)
    path = tmp_path / "written.npy"
    before = resident_file()
    out = create_memmap(tmp_path, str(path), values.shape)
    for i in range(len(values)):
        out[i] = values[i]
        unmap_rows(out, i, i + 1)
    assert resident_file() - before < 8 * MB  # 64 MB written
    out.flush()
    del out
    np.testing.assert_array_equal(np.load(path), values)


def test_unmapping_leaves_copy_on_write_maps_and_memory_alone(tmp_path):
    path, values = cache_file(tmp_path, rows=4, width=2048)
    private = np.load(path, mmap_mode="c")
    private[1] = 7.0
    unmap_rows(private, 0, 4)  # would drop the change
    np.testing.assert_array_equal(private[1], np.full(2048, 7.0, np.float32))
    np.testing.assert_array_equal(private[2], values[2])
    in_memory = values.copy()
    unmap_rows(in_memory, 0, 4)
    np.testing.assert_array_equal(in_memory, values)


def peak_growth(build):
    """(result of `build()`, how far this process's peak RSS rose over its RSS before, bytes)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak restarts at the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    before = int(status["VmRSS"].split()[0]) * 1024
    result = build()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return result, int(status["VmHWM"].split()[0]) * 1024 - before


def test_building_the_caches_never_holds_them_resident(tmp_path):
    folder = tmp_path / "wavs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i in range(65):  # 64 good clips of 10 s: 41 MB of float32 audio, as many of features
        p = folder / f"clip{i}.wav"
        sf.write(p, 0.1 * rng.standard_normal(160000), 16000, subtype="PCM_16")
        paths.append(str(p))
    (folder / "clip64.wav").write_bytes(b"RIFF, but no audio")  # skipped: the cache is shrunk
    fe = Rows()
    fe.compute(torch.zeros(2, 160000))  # torch's kernels and buffers are in place before the count
    # one decoding thread: the pool's results do not pile up ahead of the writer
    cache = AudioCache(tmp_path / "cache", AudioConfig(sample_rate=16000, duration=10.0), workers=1)
    audio, grew = peak_growth(lambda: cache.load(paths, "m", on_bad_file="skip"))
    assert audio.waves.shape == (64, 160000) and len(audio.bad) == 1
    assert grew < 24 * MB  # 41 MB written, then copied by the shrink in 8 MB chunks
    feats, grew = peak_growth(lambda: FeatureCache(fe, batch_size=2).load(audio.waves))
    assert grew < 12 * MB  # 41 MB read and 41 MB written, two clips at a time
    np.testing.assert_array_equal(WaveStore([audio.waves])[7], audio.waves[7])
    np.testing.assert_array_equal(WaveStore([feats])[7], audio.waves[7].reshape(250, 640) * 2)


class Rows:
    """A front end as FeatureCache needs one that only reshapes (and doubles) the wave: its own
    temporaries stay small, so the count above sees the cache's pages, not an STFT's buffers."""

    setting = "rows-250x2"
    n_mels = 250

    def num_frames(self, samples: int) -> int:
        return samples // 250

    def compute(self, waves: torch.Tensor) -> torch.Tensor:
        return waves.reshape(len(waves), 250, -1) * 2
