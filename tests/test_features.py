"""LogMel against an independent numpy reference; AstFbank against the extractor it wraps."""

from __future__ import annotations

import inspect
import logging
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor

from asd.errors import AsdError
from asd.features import AstFbank, LogMel, rfft64

SR = 16000


# ---------- independent numpy reference of the DCASE baseline log-mel ----------


def hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    """Slaney mel: linear (3 mel per 200 Hz) below 1 kHz, logarithmic (27 mel per factor 6.4) above."""
    f = np.asarray(f, dtype=np.float64)
    linear = 3.0 * f / 200.0
    logpart = 15.0 + 27.0 * np.log(np.maximum(f, 1e-12) / 1000.0) / np.log(6.4)
    return np.where(f >= 1000.0, logpart, linear)


def mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0), 200.0 * m / 3.0)


def slaney_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles between neighbouring mel points, area-normalised."""
    edges = mel_to_hz_slaney(np.linspace(hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, freqs.size))
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        rise = (freqs - lo) / (mid - lo)
        fall = (hi - freqs) / (hi - mid)
        fb[i] = np.maximum(0.0, np.minimum(rise, fall)) * 2.0 / (hi - lo)
    return fb


def reference_logmel(
    wave: np.ndarray, sr: int = SR, n_fft: int = 1024, hop: int = 512, n_mels: int = 128, power: float = 2.0
) -> np.ndarray:
    """(T,) -> (n_mels, frames): zero-padded centred frames, periodic Hann, rfft, mel, 20/p*log10."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2)
    n_frames = 1 + (padded.size - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    starts = np.arange(n_frames) * hop
    frames = np.stack([padded[s : s + n_fft] * window for s in starts])  # (frames, n_fft)
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** power  # (frames, F)
    mel = slaney_filterbank(sr, n_fft, n_mels, 0.0, sr / 2) @ spec.T  # (n_mels, frames)
    return 20.0 / power * np.log10(mel + sys.float_info.epsilon)


# ---------- LogMel ----------


def test_reference_filterbank_matches_hand_values():
    # the reference itself: 1 kHz is 15 slaney mel, 6.4 kHz is 15 + 27 = 42 mel
    np.testing.assert_allclose(hz_to_mel_slaney(np.array([0.0, 200.0, 1000.0, 6400.0])), [0, 3, 15, 42])
    np.testing.assert_allclose(mel_to_hz_slaney(hz_to_mel_slaney(np.array([50.0, 3000.0]))), [50, 3000])


@pytest.mark.parametrize(
    ("n_fft", "n_mels", "f_min", "f_max", "sr"), [(1024, 128, 0.0, 8000.0, SR), (400, 64, 50.0, 7000.0, SR)]
)
def test_slaney_filters_are_the_same_bits_on_transformers_without_dtype(
    monkeypatch, n_fft, n_mels, f_min, f_max, sr
):
    # transformers 5.17 (the GPU machine's) has no `dtype=`: the filters must not change with it
    from transformers.audio_utils import mel_filter_bank

    import asd.features as features

    if "dtype" not in inspect.signature(mel_filter_bank).parameters:
        pytest.skip("this transformers has no dtype= to compare the float64-only path against")
    new = features.slaney_mel_filters(n_fft // 2 + 1, n_mels, f_min, f_max, sr)

    def old_signature(
        num_frequency_bins,
        num_mel_filters,
        min_frequency,
        max_frequency,
        sampling_rate,
        norm=None,
        mel_scale="htk",
        triangularize_in_mel_space=False,
    ):
        return mel_filter_bank(
            num_frequency_bins,
            num_mel_filters,
            min_frequency,
            max_frequency,
            sampling_rate,
            norm,
            mel_scale,
            triangularize_in_mel_space,
        )

    monkeypatch.setattr(features, "mel_filter_bank", old_signature)
    old = features.slaney_mel_filters(n_fft // 2 + 1, n_mels, f_min, f_max, sr)
    assert old.dtype == new.dtype == np.float32
    np.testing.assert_array_equal(old, new)
    np.testing.assert_allclose(
        new.T, slaney_filterbank(sr, n_fft, n_mels, f_min, f_max), rtol=1e-6, atol=1e-9
    )


def test_logmel_matches_numpy_reference_on_noise():
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    ours = LogMel()(torch.from_numpy(wave))[0].numpy()
    ref = reference_logmel(wave)
    assert ours.shape == ref.shape == (128, 32)
    assert np.abs(ours - ref).max() < 1e-3


def test_logmel_sine_lands_in_expected_band():
    # 1000 Hz is FFT bin 64 (15.625 Hz bins). Slaney mel points are spaced 45.246/129 = 0.3507 mel,
    # so band 42 peaks at point 43 = 15.08 mel = 1005.6 Hz and band 41 at 982.1 Hz: band 42 is closest.
    t = np.arange(SR) / SR
    wave = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    ours = LogMel()(torch.from_numpy(wave))[0].numpy()  # (128, 32)
    ref = reference_logmel(wave)
    inner = slice(2, -2)  # frames away from the zero-padded edges
    assert (ours[:, inner].argmax(axis=0) == 42).all()
    # float32 FFT round-off dominates bands ~100 dB below the tone: compare the bands that hold energy
    loud = ref[:, inner] > ref[:, inner].max() - 60.0
    assert loud.sum() > 10
    assert np.abs(ours[:, inner][loud] - ref[:, inner][loud]).max() < 1e-3


def test_logmel_power_one_and_other_sizes_match_reference():
    rng = np.random.default_rng(1)
    wave = rng.uniform(-1, 1, 4000).astype(np.float32)
    ours = LogMel(n_fft=512, hop_length=160, n_mels=64, power=1.0)(torch.from_numpy(wave))[0].numpy()
    ref = reference_logmel(wave, n_fft=512, hop=160, n_mels=64, power=1.0)
    assert ours.shape == ref.shape == (64, 1 + 4000 // 160)
    assert np.abs(ours - ref).max() < 1e-3


def test_logmel_shapes_and_batch_consistency():
    fe = LogMel()
    wave = torch.randn(3, 8000)
    out = fe(wave)
    assert out.shape == (3, 128, 16) and out.dtype == torch.float32
    single = fe(wave[1])
    assert single.shape == (1, 128, 16)
    torch.testing.assert_close(single[0], out[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "num_samples, hop, expected", [(16000, 512, 32), (160000, 512, 313), (511, 512, 1), (512, 512, 2)]
)
def test_logmel_num_frames(num_samples, hop, expected):
    fe = LogMel(hop_length=hop)
    assert fe.num_frames(num_samples) == expected
    assert fe(torch.zeros(num_samples)).shape[-1] == expected


def test_logmel_short_wave_uses_zero_padding():
    wave = np.random.default_rng(2).standard_normal(100).astype(np.float32)  # < n_fft // 2
    ours = LogMel()(torch.from_numpy(wave))[0].numpy()
    ref = reference_logmel(wave)
    assert ours.shape == ref.shape == (128, 1)
    assert np.abs(ours - ref).max() < 1e-3


def test_logmel_silence_is_log_eps():
    out = LogMel()(torch.zeros(2, 1024))
    torch.testing.assert_close(out, torch.full_like(out, 10 * np.log10(sys.float_info.epsilon)))


def test_logmel_under_bf16_autocast_stays_float32():
    fe = LogMel()
    wave = torch.randn(2, 4096)
    plain = fe(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = fe(wave.to(torch.bfloat16))
        auto32 = fe(wave)
    assert auto.dtype == auto32.dtype == torch.float32
    torch.testing.assert_close(auto32, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(auto, fe(wave.to(torch.bfloat16).float()), atol=1e-5, rtol=0)


def test_logmel_buffers_move_but_are_not_saved():
    fe = LogMel()
    assert fe.state_dict() == {}
    buffers = dict(fe.named_buffers())
    assert buffers["mel_fb"].shape == (128, 513) and buffers["window"].shape == (1024,)
    moved = fe.to("meta")
    assert {b.device.type for b in moved.buffers()} == {"meta"}


def test_logmel_survives_half_module():
    fe = LogMel().half()
    assert fe(torch.randn(2048)).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"n_fft": 0}, "n_fft"),
        ({"n_fft": 1023}, "n_fft"),
        ({"n_fft": 1024.0}, "n_fft"),
        ({"hop_length": -1}, "hop_length"),
        ({"n_mels": 0}, "n_mels"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"f_max": 9000.0}, "f_max"),
        ({"f_max": "8k"}, "f_max"),
        ({"f_min": 8000.0}, "f_min"),
        ({"f_min": -1.0}, "f_min"),
        ({"power": 0.0}, "power"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_logmel_rejects_bad_arguments(kwargs, key):
    with pytest.raises(AsdError, match=key):
        LogMel(**kwargs)


@pytest.mark.parametrize("wave", [torch.zeros(2, 1, 4000), torch.zeros(2, 0), torch.zeros(0)])
def test_logmel_rejects_bad_waves(wave):
    with pytest.raises(AsdError, match="LogMel"):
        LogMel()(wave)


def test_logmel_construction_is_warning_free():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LogMel()
        AstFbank()


def test_logmel_reports_empty_filters(caplog):
    with caplog.at_level(logging.WARNING, logger="asd.features"):
        LogMel(n_fft=256, n_mels=128)  # 129 FFT bins cannot feed 128 slaney bands
    assert "cover no FFT bin" in caplog.text and "n_mels=128" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_logmel_and_fbank_on_cuda_match_cpu():
    wave = torch.randn(2, SR)
    fe = LogMel()
    torch.testing.assert_close(fe.to("cuda")(wave.cuda()).cpu(), LogMel()(wave), atol=1e-3, rtol=0)
    with torch.autocast("cuda", dtype=torch.float16):
        assert fe(wave.cuda()).dtype == torch.float32
    fb = AstFbank(max_length=128).to("cuda")(wave.cuda())
    assert fb.device.type == "cuda" and fb.shape == (2, 128, 128)
    torch.testing.assert_close(fb.cpu(), AstFbank(max_length=128)(wave), atol=1e-4, rtol=0)


# ---------- AstFbank ----------


def test_fbank_shape_dtype_and_padding():
    wave = 0.1 * torch.randn(2, SR)
    out = AstFbank(normalize=False)(wave)
    assert out.shape == (2, 1024, 128) and out.dtype == torch.float32
    frames = 1 + (SR - 400) // 160  # 98 Kaldi frames in 1 s
    assert torch.isfinite(out).all()
    assert (out[:, frames:] == 0).all()  # the extractor zero-pads after the last frame
    assert (out[:, frames - 1] != 0).any(dim=-1).all()


def test_fbank_raw_equals_extractor_and_normalisation_is_ast():
    wave = 0.1 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(3))
    raw = AstFbank(max_length=64, normalize=False)(wave)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = ASTFeatureExtractor(max_length=64, do_normalize=False)
    expected = extractor(list(wave.numpy()), sampling_rate=SR, return_tensors="np")["input_values"]
    np.testing.assert_array_equal(
        AstFbank(max_length=64, normalize=False, backend="extractor")(wave), expected
    )
    # the batched torch recipe (the default) matches it to float32 rounding of log values
    np.testing.assert_allclose(raw.numpy(), expected, rtol=0, atol=5e-6)
    normed = AstFbank(max_length=64)(wave)
    torch.testing.assert_close(normed, (raw - -4.2677393) / (2 * 4.5689974))
    custom = AstFbank(max_length=64, mean=1.0, std=0.5)(wave)
    torch.testing.assert_close(custom, raw - 1.0)


@pytest.mark.parametrize("max_length", [1024, 300])
def test_fbank_torch_recipe_matches_the_extractor_on_long_silent_and_tonal_clips(max_length):
    wave = 0.05 * torch.randn(5, 10 * SR, generator=torch.Generator().manual_seed(0))
    wave[1] = 0.5 * torch.sin(torch.arange(10 * SR) * 0.05)  # a tone
    wave[2, : 4 * SR] = 0.0  # 4 s of digital silence: the mel floor
    wave[3] = 0.0
    wave[4] += 0.6  # a DC offset 12 times the signal: each frame's mean removal matters
    wave[4, 5 * SR :] = 0.6  # and a constant: silence once the offset is removed
    ours = AstFbank(max_length=max_length)(wave)
    theirs = AstFbank(max_length=max_length, backend="extractor")(wave)
    assert ours.shape == theirs.shape == (5, max_length, 128)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)  # normalised units: / 9.14


def test_rfft64_is_the_float64_fft_rounded_to_complex64():
    frames = torch.randn(3, 7, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = rfft64(frames, 512)
    assert ours.dtype == torch.complex64 and ours.shape == (3, 7, 257)
    exact = np.fft.rfft(frames.numpy(), n=512)  # complex128, zero-padded from 400 to 512
    np.testing.assert_allclose(ours.numpy(), exact.astype(np.complex64), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, torch.fft.rfft(frames, n=512).to(torch.complex64), rtol=1e-6, atol=0)
    with torch.inference_mode():  # scoring's mode: inference tensors go through scipy too
        torch.testing.assert_close(rfft64(frames.clone(), 512), ours, rtol=0, atol=0)
    # float32 frames and frames that need gradients are taken in float64, detached
    single = frames.float().requires_grad_()
    torch.testing.assert_close(rfft64(single, 512), rfft64(single.detach().double(), 512), rtol=0, atol=0)


def test_fbank_backend_is_checked():
    with pytest.raises(AsdError, match="backend='numpy'"):
        AstFbank(backend="numpy")


def test_fbank_accepts_a_single_wave():
    wave = torch.randn(4000)
    out = AstFbank(max_length=32)(wave)
    torch.testing.assert_close(out, AstFbank(max_length=32)(wave[None]))
    assert out.shape == (1, 32, 128)


def test_fbank_windows_and_truncation(caplog):
    fe = AstFbank(max_length=16, normalize=False)
    assert fe.samples_per_window() == 400 + 15 * 160
    assert fe.num_frames(fe.samples_per_window()) == 16
    assert fe.num_frames(fe.samples_per_window() - 1) == 15
    assert fe.num_frames(399) == 0
    wave = torch.randn(1, fe.samples_per_window())
    full = fe(wave)
    assert (full[0, -1] != 0).any()  # 16 real frames fill the window
    assert (fe(wave[:, :-1])[0, -1] == 0).all()  # one sample less: the last row is padding
    with caplog.at_level(logging.WARNING, logger="asd.features"):
        longer = fe(torch.cat([wave, torch.randn(1, 1600)], dim=1))
        fe(torch.cat([wave, torch.randn(1, 1600)], dim=1))
    torch.testing.assert_close(longer, full)  # truncated to the first 16 frames
    assert caplog.text.count("only the first max_length=16") == 1


def test_fbank_rejects_other_sample_rates():
    with pytest.raises(AsdError, match="data.audio.sample_rate=16000"):
        AstFbank(sample_rate=22050)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"num_mel_bins": 0}, "num_mel_bins"), ({"max_length": 0}, "max_length"), ({"std": 0.0}, "std")],
)
def test_fbank_rejects_bad_arguments(kwargs, key):
    with pytest.raises(AsdError, match=key):
        AstFbank(**kwargs)


@pytest.mark.parametrize("wave", [torch.zeros(2, 399), torch.zeros(2, 0), torch.zeros(2, 2, 800)])
def test_fbank_rejects_bad_waves(wave):
    with pytest.raises(AsdError, match="AstFbank"):
        AstFbank()(wave)
