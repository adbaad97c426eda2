"""Decoding: channel choice and down-mix, resampling, crop/pad, and one clear error per broken file."""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asd.data.audio import AudioConfig, AudioError, audio_config, load_audio
from asd.errors import AsdError

MIMII = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimii_0db"


def write(path: Path, data: np.ndarray, sr: int = 8000, subtype: str = "FLOAT") -> str:
    sf.write(path, data, sr, subtype=subtype)
    return str(path)


def wav_bytes(samples: list[int], sr: int = 8000, declared: int | None = None, junk: bytes = b"") -> bytes:
    """A mono PCM_16 RIFF/WAVE built by hand, optionally with an odd-sized chunk before `data`."""
    data = struct.pack(f"<{len(samples)}h", *samples)
    fmt = struct.pack("<HHIIHH", 1, 1, sr, sr * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    if junk:
        body += b"junk" + struct.pack("<I", len(junk)) + junk + b"\0" * (len(junk) % 2)
    body += b"data" + struct.pack("<I", len(data) if declared is None else declared) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---- config ----------------------------------------------------------------------------------------


def test_num_samples_and_defaults():
    assert AudioConfig().num_samples is None
    assert AudioConfig(duration=10.0).num_samples == 160000
    assert AudioConfig(sample_rate=8000, duration=0.5).num_samples == 4000
    assert audio_config() == AudioConfig()


def test_key_is_stable_and_changes_with_every_setting():
    base = audio_config(duration=2.0)
    assert base.key() == audio_config(duration=2.0).key()
    assert len(base.key()) == 12 and int(base.key(), 16) >= 0
    others = [
        audio_config(duration=3.0),
        audio_config(duration=2.0, sample_rate=8000),
        audio_config(duration=2.0, channel=1),
        audio_config(duration=2.0, channel="mean"),
        audio_config(duration=2.0, crop="center"),
        audio_config(duration=2.0, pad="zero"),
        audio_config(duration=2.0, resample=False),
        audio_config(),
    ]
    assert len({base.key(), *(c.key() for c in others)}) == len(others) + 1


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"crop": "random"}, "data.audio.crop"),
        ({"pad": "reflect"}, "data.audio.pad"),
        ({"channel": -1}, "data.audio.channel"),
        ({"channel": "left"}, "data.audio.channel"),
        ({"channel": 1.5}, "data.audio.channel"),
        ({"sample_rate": 0}, "data.audio.sample_rate"),
        ({"sample_rate": -16000}, "data.audio.sample_rate"),
        ({"sample_rate": 16000.5}, "data.audio.sample_rate"),
        ({"duration": 0}, "data.audio.duration"),
        ({"duration": -1.0}, "data.audio.duration"),
        ({"duration": math.nan}, "data.audio.duration"),
        ({"duration": 1e-6}, "data.audio.duration"),
        ({"resample": "yes"}, "data.audio.resample"),
        ({"sr": 16000}, "data.audio.sr"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(AsdError, match=key.replace(".", r"\.")):
        audio_config(**kwargs)


def test_audio_error_is_an_asd_error():
    assert issubclass(AudioError, AsdError)


# ---- decoding ------------------------------------------------------------------------------------


def test_pcm16_mono_is_decoded_exactly(tmp_path):
    ints = np.array([0, 1, -1, 16384, -32768, 32767, 100], dtype=np.int16)
    path = write(tmp_path / "a.wav", ints, subtype="PCM_16")
    x = load_audio(path, audio_config(sample_rate=8000))
    assert x.dtype == np.float32 and x.shape == (7,)
    np.testing.assert_array_equal(x, ints / np.float32(32768))


def test_channel_index_and_mean_of_eight_channels(tmp_path):
    ints = np.tile(np.arange(1, 9, dtype=np.int16) * 512, (50, 1))  # (50, 8): channel c holds (c + 1) / 64
    ints[:, 5] = np.arange(-25, 25) * 256  # channel 5 a ramp of k / 128
    path = write(tmp_path / "eight.wav", ints, subtype="PCM_16")
    x3 = load_audio(path, audio_config(sample_rate=8000, channel=3))
    np.testing.assert_array_equal(x3, np.full(50, 4 / 64, np.float32))
    mean = load_audio(path, audio_config(sample_rate=8000, channel="mean"))
    others = (1 + 2 + 3 + 4 + 5 + 7 + 8) / 64  # every channel but 5
    np.testing.assert_allclose(mean, (others + np.arange(-25, 25) / 128) / 8, atol=1e-7)


def test_stereo_channels_and_mono_mean(tmp_path):
    stereo = np.stack([np.full(20, 0.25), np.full(20, -0.75)], axis=1).astype(np.float32)  # (20, 2)
    path = write(tmp_path / "stereo.wav", stereo)
    np.testing.assert_array_equal(load_audio(path, audio_config(sample_rate=8000, channel=1)), stereo[:, 1])
    np.testing.assert_array_equal(load_audio(path, audio_config(sample_rate=8000, channel="mean")), -0.25)
    mono = write(tmp_path / "mono.wav", np.full(20, 0.5, np.float32))
    np.testing.assert_array_equal(load_audio(mono, audio_config(sample_rate=8000, channel="mean")), 0.5)


def test_channel_beyond_the_file_is_an_error(tmp_path):
    path = write(tmp_path / "stereo.wav", np.zeros((20, 2), np.float32) + 0.1)
    with pytest.raises(AudioError, match=r"stereo\.wav.*2 channel.*data\.audio\.channel=2"):
        load_audio(path, audio_config(sample_rate=8000, channel=2))


def test_crop_start_and_center(tmp_path):
    path = write(tmp_path / "ramp.wav", np.arange(10, dtype=np.float32) / 32)
    start = load_audio(path, audio_config(sample_rate=8000, duration=4 / 8000))
    center = load_audio(path, audio_config(sample_rate=8000, duration=4 / 8000, crop="center"))
    np.testing.assert_array_equal(start, np.array([0, 1, 2, 3], np.float32) / 32)
    np.testing.assert_array_equal(center, np.array([3, 4, 5, 6], np.float32) / 32)


def test_pad_wrap_and_zero(tmp_path):
    path = write(tmp_path / "short.wav", np.array([1, 2, 3], np.float32) / 8)
    wrap = load_audio(path, audio_config(sample_rate=8000, duration=7 / 8000))
    zero = load_audio(path, audio_config(sample_rate=8000, duration=7 / 8000, pad="zero"))
    np.testing.assert_array_equal(wrap, np.array([1, 2, 3, 1, 2, 3, 1], np.float32) / 8)
    np.testing.assert_array_equal(zero, np.array([1, 2, 3, 0, 0, 0, 0], np.float32) / 8)
    same = load_audio(path, audio_config(sample_rate=8000, duration=3 / 8000))
    np.testing.assert_array_equal(same, np.array([1, 2, 3], np.float32) / 8)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


@pytest.mark.parametrize("file_sr, cfg_sr", [(8000, 16000), (16000, 8000), (44100, 16000)])
def test_resampling_keeps_length_ratio_and_frequency(tmp_path, file_sr, cfg_sr):
    t = np.arange(file_sr) / file_sr  # 1 s
    path = write(tmp_path / "sine.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr=file_sr)
    x = load_audio(path, audio_config(sample_rate=cfg_sr))
    assert x.dtype == np.float32 and x.shape == (cfg_sr,)
    assert peak_hz(x, cfg_sr) == pytest.approx(440, abs=1.0)
    assert np.abs(x[cfg_sr // 10 : -cfg_sr // 10]).max() == pytest.approx(0.5, abs=0.01)


def test_resampling_then_wrap_to_duration(tmp_path):
    path = write(tmp_path / "half.wav", np.full(4000, 0.25, np.float32), sr=8000)  # 0.5 s at 8 kHz
    x = load_audio(path, audio_config(sample_rate=16000, duration=1.0))
    assert x.shape == (16000,)
    np.testing.assert_array_equal(x[:8000], x[8000:])  # the 0.5 s (8000 samples at 16 kHz) repeated


def test_other_rate_without_resampling_is_an_error(tmp_path):
    path = write(tmp_path / "eight_k.wav", np.full(80, 0.1, np.float32), sr=8000)
    with pytest.raises(AudioError, match=r"eight_k\.wav.*8000 Hz.*sample_rate=16000.*data\.audio\.resample"):
        load_audio(path, audio_config(sample_rate=16000, resample=False))


def test_silent_file_is_returned_with_a_warning(tmp_path, caplog):
    path = write(tmp_path / "silent.wav", np.zeros(40, np.float32))
    with caplog.at_level(logging.WARNING, logger="asd.data.audio"):
        x = load_audio(path, audio_config(sample_rate=8000))
    np.testing.assert_array_equal(x, np.zeros(40, np.float32))
    assert "silent.wav" in caplog.text and "zero" in caplog.text


def test_hand_built_wav_with_odd_chunk_before_data(tmp_path):
    path = tmp_path / "junk.wav"
    path.write_bytes(wav_bytes([100, -200, 300, -400], junk=b"abc"))
    np.testing.assert_array_equal(
        load_audio(path, audio_config(sample_rate=8000)), np.array([100, -200, 300, -400]) / 32768
    )


# ---- broken files: one AudioError naming the file ---------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav", audio_config())


def test_directory_is_not_a_file(tmp_path):
    (tmp_path / "dir.wav").mkdir()
    with pytest.raises(AudioError, match=r"dir\.wav: not a regular file"):
        load_audio(tmp_path / "dir.wav", audio_config())


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav", audio_config())


def test_wav_with_zero_frames(tmp_path):
    path = write(tmp_path / "noframes.wav", np.zeros((0, 1), np.float32), subtype="PCM_16")
    with pytest.raises(AudioError, match=r"noframes\.wav: .*zero frames"):
        load_audio(path, audio_config(sample_rate=8000))


def test_truncated_wav_written_by_soundfile(tmp_path):
    full = write(tmp_path / "full.wav", np.full((1000, 2), 0.1, np.float32), subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(Path(full).read_bytes()[:2000])  # header says 4000 data bytes, 1956 follow
    assert sf.info(str(cut)).frames < 1000  # libsndfile itself only shortens the file silently
    with pytest.raises(AudioError, match=r"cut\.wav: truncated WAV.*4000 data bytes.*1956"):
        load_audio(cut, audio_config(sample_rate=8000))


def test_truncated_hand_built_wav(tmp_path):
    path = tmp_path / "short.wav"
    path.write_bytes(wav_bytes([1, 2, 3, 4], declared=16, junk=b"x"))  # claims 8 samples, holds 4
    with pytest.raises(AudioError, match=r"short\.wav: truncated WAV.*16 data bytes.*only 8"):
        load_audio(path, audio_config(sample_rate=8000))


def test_text_named_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav: not a readable audio file"):
        load_audio(path, audio_config())


@pytest.mark.parametrize("bad, subtype", [(np.nan, "FLOAT"), (np.inf, "DOUBLE"), (-np.inf, "FLOAT")])
def test_non_finite_samples(tmp_path, bad, subtype):
    data = np.full(100, 0.1, np.float32)
    data[[40, 70]] = bad
    path = write(tmp_path / "nan.wav", data, sr=8000, subtype=subtype)
    with pytest.raises(AudioError, match=r"nan\.wav: 2 NaN/inf sample\(s\), the first at 0\.005 s"):
        load_audio(path, audio_config(sample_rate=8000))


def test_nan_in_an_unused_channel_is_ignored_but_mean_sees_it(tmp_path):
    data = np.full((30, 2), 0.2, np.float32)
    data[3, 1] = np.nan
    path = write(tmp_path / "half_nan.wav", data)
    np.testing.assert_array_equal(
        load_audio(path, audio_config(sample_rate=8000, channel=0)), np.float32(0.2)
    )
    with pytest.raises(AudioError, match=r"half_nan\.wav: 1 NaN"):
        load_audio(path, audio_config(sample_rate=8000, channel="mean"))


# ---- real MIMII recordings (8-channel WAVE_FORMAT_EXTENSIBLE), when the shared data is present ----


def test_real_mimii_files():
    files = sorted(MIMII.glob("*/id_*/*/*.wav")) if MIMII.is_dir() else []
    if not files:
        pytest.skip(f"no MIMII files under {MIMII}")
    info = sf.info(str(files[0]))
    assert (info.channels, info.samplerate, info.frames) == (8, 16000, 160000)
    ch0 = load_audio(files[0], audio_config(channel=0))
    mean = load_audio(files[0], audio_config(channel="mean", duration=10.0))
    assert ch0.shape == mean.shape == (160000,) and ch0.dtype == mean.dtype == np.float32
    raw, _ = sf.read(str(files[0]), dtype="float32", always_2d=True)  # (160000, 8)
    np.testing.assert_array_equal(ch0, raw[:, 0])
    np.testing.assert_allclose(mean, raw.mean(axis=1), atol=1e-6)
    with pytest.raises(AudioError, match="8 channel"):
        load_audio(files[0], audio_config(channel=8))
