"""The decoded-audio cache: hits without decoding, invalidation, atomic files, damage repair, skip mode."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import asd.data.cache as cache_module
from asd.data.audio import AudioError, audio_config, load_audio
from asd.data.cache import AudioCache, CachedAudio
from asd.errors import AsdError

SR = 8000
CFG = audio_config(sample_rate=SR, duration=0.01)  # 80 samples per clip


def make_clips(folder: Path, n: int = 4, frames: int = 100) -> list[str]:
    """n mono FLOAT WAVs; clip i is a ramp starting at i / 8, so rows are easy to tell apart."""
    paths = []
    for i in range(n):
        path = folder / f"clip_{i}.wav"
        sf.write(path, (i / 8 + np.arange(frames) / 4096).astype(np.float32), SR, subtype="FLOAT")
        paths.append(str(path))
    return paths


def cache_files(folder: Path) -> list[str]:
    """The cache folder's files, without the empty build locks (`.<name>.lock`, `build_lock`)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def clips(tmp_path) -> list[str]:
    (tmp_path / "wav").mkdir()
    return make_clips(tmp_path / "wav")


def test_miss_then_hit_gives_identical_read_only_memmaps(tmp_path, clips, monkeypatch):
    cold = AudioCache(tmp_path / "cache", CFG).load(clips, "fan-train")
    assert isinstance(cold, CachedAudio) and not cold.hit
    assert cold.waves.shape == (4, 80) and cold.waves.dtype == np.float32
    assert isinstance(cold.waves, np.memmap) and not cold.waves.flags.writeable
    assert cold.paths == clips and cold.bad == []
    for row, path in zip(cold.waves, clips, strict=True):
        np.testing.assert_array_equal(row, load_audio(path, CFG))
    assert cold.waves[2, 0] == np.float32(2 / 8)

    def no_decoding(path, cfg):
        raise AssertionError(f"decoded {path} on a cache hit")

    monkeypatch.setattr(cache_module, "decode", no_decoding)
    warm = AudioCache(tmp_path / "cache", CFG).load(clips, "fan-train")
    assert warm.hit and isinstance(warm.waves, np.memmap) and not warm.waves.flags.writeable
    np.testing.assert_array_equal(warm.waves, cold.waves)
    assert warm.paths == clips and warm.bad == []
    names = cache_files(tmp_path / "cache")  # one .npy + its sidecar, no temp files left
    assert len(names) == 2 and names[0].startswith("fan-train-") and names[0].endswith(".json")
    assert names[1] == names[0].replace(".json", ".npy")
    assert (tmp_path / "cache" / ".fan-train.lock").stat().st_size == 0  # the build lock, held by no one


def test_one_and_two_workers_give_the_same_rows_in_order(tmp_path):
    (tmp_path / "wav").mkdir()
    paths = make_clips(tmp_path / "wav", n=9)
    one = AudioCache(tmp_path / "c1", CFG, workers=1).load(paths, "x")
    two = AudioCache(tmp_path / "c2", CFG, workers=2).load(paths, "x")
    np.testing.assert_array_equal(one.waves, two.waves)
    np.testing.assert_array_equal(two.waves[:, 0], np.arange(9, dtype=np.float32) / 8)


def test_changed_file_invalidates_and_old_cache_is_removed(tmp_path, clips):
    cache = AudioCache(tmp_path / "cache", CFG)
    first = cache.load(clips, "fan-train")
    before = cache_files(tmp_path / "cache")
    # same size, new content: only the mtime tells them apart, so set it explicitly
    sf.write(clips[1], np.full(100, -0.5, np.float32), SR, subtype="FLOAT")
    st = os.stat(clips[1])
    os.utime(clips[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = cache.load(clips, "fan-train")
    assert not second.hit
    np.testing.assert_array_equal(second.waves[1], np.full(80, -0.5, np.float32))
    np.testing.assert_array_equal(second.waves[[0, 2, 3]], np.asarray(first.waves)[[0, 2, 3]])
    after = cache_files(tmp_path / "cache")
    assert len(after) == 2 and not set(after) & set(before)
    assert cache.load(clips, "fan-train").hit


def test_touching_a_file_invalidates(tmp_path, clips):
    cache = AudioCache(tmp_path / "cache", CFG)
    cache.load(clips, "a")
    st = os.stat(clips[0])
    os.utime(clips[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert not cache.load(clips, "a").hit


def test_other_settings_order_or_list_miss(tmp_path, clips):
    AudioCache(tmp_path / "cache", CFG).load(clips, "a")
    longer = AudioCache(tmp_path / "cache", audio_config(sample_rate=SR, duration=0.02)).load(clips, "a")
    assert not longer.hit and longer.waves.shape == (4, 160)
    zero_pad = AudioCache(tmp_path / "cache", audio_config(sample_rate=SR, duration=0.02, pad="zero"))
    assert not zero_pad.load(clips, "a").hit
    cache = AudioCache(tmp_path / "cache", CFG)
    assert not cache.load(clips[::-1], "a").hit
    assert not cache.load(clips[:3], "a").hit
    assert cache.load(clips[:3], "a").hit


def test_names_are_separate_caches(tmp_path, clips):
    cache = AudioCache(tmp_path / "cache", CFG)
    cache.load(clips, "fan")
    cache.load(clips[:2], "fan-train")  # "fan-train-<key>" must not count as an old "fan" file, nor back
    assert cache.load(clips, "fan").hit and cache.load(clips[:2], "fan-train").hit
    assert len(cache_files(tmp_path / "cache")) == 4


def test_wrong_shape_cache_is_rebuilt(tmp_path, clips, caplog):
    cache = AudioCache(tmp_path / "cache", CFG)
    cache.load(clips, "a")
    (npy,) = (tmp_path / "cache").glob("a-*.npy")
    np.save(npy, np.zeros((3, 80), np.float32))
    with caplog.at_level(logging.WARNING, logger="asd.data.cache"):
        again = cache.load(clips, "a")
    assert not again.hit and again.waves.shape == (4, 80)
    assert "damaged" in caplog.text and npy.name in caplog.text
    np.testing.assert_array_equal(again.waves[3], load_audio(clips[3], CFG))


@pytest.mark.parametrize("damage", ["cut_npy", "garbage_npy", "padded_npy", "bad_json", "no_json"])
def test_damaged_cache_files_are_rebuilt(tmp_path, clips, damage):
    cache = AudioCache(tmp_path / "cache", CFG)
    cold = np.array(cache.load(clips, "a").waves)
    (npy,) = (tmp_path / "cache").glob("a-*.npy")
    meta = npy.with_suffix(".json")
    raw = npy.read_bytes()
    if damage == "cut_npy":  # a half-written file
        npy.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage_npy":
        npy.write_bytes(b"not an npy file at all")
    elif damage == "padded_npy":
        npy.write_bytes(raw + b"\0" * 64)
    elif damage == "bad_json":
        meta.write_text("{ half")
    else:
        meta.unlink()
    again = cache.load(clips, "a")
    assert not again.hit
    np.testing.assert_array_equal(again.waves, cold)
    assert cache.load(clips, "a").hit


def test_sidecar_records_paths_config_and_bad_files(tmp_path, clips):
    AudioCache(tmp_path / "cache", CFG).load(clips, "a")
    (meta,) = (tmp_path / "cache").glob("a-*.json")
    info = json.loads(meta.read_text())
    assert info["paths"] == clips and info["shape"] == [4, 80] and info["bad"] == []
    assert info["config"]["sample_rate"] == SR and info["config"]["duration"] == 0.01
    assert info["lengths"] == [100] * 4  # each clip's own length, before it was cut to 80 samples


def add_bad_files(folder: Path, clips: list[str]) -> list[str]:
    """clips with a text file named .wav at index 1 and a missing file at index 3."""
    text = folder / "text.wav"
    text.write_text("not audio " * 50)
    return [clips[0], str(text), clips[1], str(folder / "missing.wav"), clips[2], clips[3]]


def test_skip_mode_lists_bad_files_and_restores_them_on_a_hit(tmp_path, clips, caplog):
    paths = add_bad_files(tmp_path / "wav", clips)
    cache = AudioCache(tmp_path / "cache", CFG)
    with caplog.at_level(logging.WARNING, logger="asd.data.cache"):
        cold = cache.load(paths, "mixed", on_bad_file="skip")
    assert not cold.hit and cold.waves.shape == (4, 80) and cold.paths == clips
    assert [p for p, _ in cold.bad] == [paths[1], paths[3]]
    assert "text.wav: not a readable audio file" in cold.bad[0][1]
    assert "missing.wav: file not found" in cold.bad[1][1]
    assert "skipped 2 bad file(s)" in caplog.text
    assert "text.wav" in caplog.text and "missing.wav" in caplog.text
    np.testing.assert_array_equal(cold.waves[:, 0], np.arange(4, dtype=np.float32) / 8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asd.data.cache"):
        warm = cache.load(paths, "mixed", on_bad_file="skip")
    assert warm.hit and warm.paths == cold.paths and warm.bad == cold.bad
    assert "skipped 2 bad file(s)" in caplog.text  # a hit warns again: nothing is dropped silently
    with pytest.raises(AudioError, match=r"text\.wav: not a readable audio file"):
        cache.load(paths, "mixed")  # the same cache, now in error mode


def test_error_mode_raises_the_first_bad_file_and_writes_nothing(tmp_path, clips):
    paths = add_bad_files(tmp_path / "wav", clips)
    with pytest.raises(AudioError, match=r"text\.wav: not a readable audio file"):
        AudioCache(tmp_path / "cache", CFG).load(paths, "mixed")
    assert cache_files(tmp_path / "cache") == []


def test_all_bad_in_skip_mode_is_an_error(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"all 2 files of 'x' are bad.*a\.wav: empty file"):
        AudioCache(tmp_path / "cache", CFG).load([tmp_path / "a.wav", tmp_path / "b.wav"], "x", "skip")


def test_different_lengths_need_a_duration(tmp_path):
    short = tmp_path / "short.wav"
    long = tmp_path / "long.wav"
    sf.write(short, np.full(50, 0.1, np.float32), SR)
    sf.write(long, np.full(60, 0.1, np.float32), SR)
    free = AudioCache(tmp_path / "cache", audio_config(sample_rate=SR))
    same = free.load([short, short], "same")
    assert same.waves.shape == (2, 50)
    with pytest.raises(
        AsdError, match=r"long\.wav has 60 samples but .*short\.wav has 50.*data\.audio\.duration"
    ):
        free.load([short, long], "mixed")
    assert [n for n in cache_files(tmp_path / "cache") if n.startswith(".")] == []  # temp file removed


def test_empty_list(tmp_path):
    empty = AudioCache(tmp_path / "cache", CFG).load([], "none")
    assert empty.waves.shape == (0, 80) and empty.paths == [] and empty.bad == [] and not empty.hit


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, p: AudioCache(d, CFG).load(p, "a", on_bad_file="ignore"), r"data\.on_bad_file='ignore'"),
        (lambda d, p: AudioCache(d, CFG).load(p, "../escape"), r"cache name '\.\./escape'"),
        (lambda d, p: AudioCache(d, CFG, workers=0), r"workers=0"),
        (lambda d, p: AudioCache(d, {"sample_rate": 16000}), r"AudioConfig"),
    ],
)
def test_bad_arguments(tmp_path, clips, call, match):
    with pytest.raises(AsdError, match=match):
        call(tmp_path / "cache", clips)


def test_real_mimii_cache(tmp_path):
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimii_0db"
    files = [str(p) for p in sorted(root.glob("*/id_*/*/*.wav"))[:4]] if root.is_dir() else []
    if not files:
        pytest.skip(f"no MIMII files under {root}")
    cache = AudioCache(tmp_path, audio_config(channel="mean", duration=10.0))
    cold = cache.load(files, "mimii")
    warm = cache.load(files, "mimii")
    assert cold.waves.shape == (len(files), 160000) and warm.hit
    np.testing.assert_array_equal(warm.waves, cold.waves)
