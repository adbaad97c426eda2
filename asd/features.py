"""Front ends as `nn.Module`s: the DCASE baseline log-mel, AST's Kaldi fbank, pictures (`ImageFrontend`).

One file: every front end shares the input checks and the output contract members rely on
((B, bins, frames), float32, autocast off), and `share_frontends` decides which of them may be one.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import scipy.fft
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import ASTFeatureExtractor
from transformers.audio_utils import hertz_to_mel, mel_filter_bank, mel_to_hertz, window_function

from asd.errors import AsdError

log = logging.getLogger(__name__)

# transformers warns once per filter bank when a mel filter covers no FFT bin. Both front ends
# check for empty filters themselves and say what they mean (see LogMel and AstFbank).
_EMPTY_FILTER_WARNING = "At least one mel filter has all zero values"


def _as_batch(wave: Tensor, owner: str) -> Tensor:
    """(T,) or (B, T) -> (B, T); any other shape or an empty wave is an AsdError."""
    if not isinstance(wave, Tensor):
        raise AsdError(f"{owner}: expected the wave as a torch.Tensor, got {type(wave).__name__}")
    if wave.ndim == 1:
        wave = wave.unsqueeze(0)  # (T,) -> (1, T)
    if wave.ndim != 2:
        raise AsdError(
            f"{owner}: expected a wave of shape (B, T) or (T,), got {tuple(wave.shape)}; "
            "down-mix multi-channel audio to mono first (data.audio settings)"
        )
    if wave.shape[-1] == 0:
        raise AsdError(f"{owner}: got an empty wave (0 samples); check the clip's decoding and cropping")
    return wave


def probe_length(frontend: nn.Module, default: int) -> int:
    """The input length to probe a front end with: its own (`ImageFrontend`) or any (`default`) for audio."""
    return int(getattr(frontend, "num_samples", default))


def _positive(owner: str, key: str, value: float, example: str, integer: bool = False) -> None:
    """Raise an AsdError naming `key` unless `value` is a positive number (an int when `integer`)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    is_number = is_int or isinstance(value, (float, np.floating))
    if not is_number or (integer and not is_int) or not value > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise AsdError(f"{owner}: {key}={value!r} must be {kind} (e.g. {key}={example})")


def slaney_mel_filters(
    num_frequency_bins: int, n_mels: int, f_min: float, f_max: float, sample_rate: int
) -> np.ndarray:
    """librosa's slaney mel filters in float32, (num_frequency_bins, n_mels), on any transformers.

    transformers' `mel_filter_bank(..., dtype=np.float32)` rounds the triangles to float32 before the
    slaney area normalisation, which makes it bit-exact with `librosa.filters.mel` (its docs). Its
    releases without `dtype` (5.17 among them) compute in float64 only; there the same rounding is
    done here with the same arithmetic, so both give the same bits (tests/test_features.py).
    """
    args = {
        "num_frequency_bins": num_frequency_bins,
        "num_mel_filters": n_mels,
        "min_frequency": f_min,
        "max_frequency": f_max,
        "sampling_rate": sample_rate,
        "mel_scale": "slaney",
    }
    if "dtype" in inspect.signature(mel_filter_bank).parameters:
        return mel_filter_bank(**args, norm="slaney", dtype=np.float32)
    triangles = mel_filter_bank(**args, norm=None).astype(np.float32)
    mels = np.linspace(
        hertz_to_mel(f_min, mel_scale="slaney"), hertz_to_mel(f_max, mel_scale="slaney"), n_mels + 2
    )
    edges = mel_to_hertz(mels, mel_scale="slaney")
    # float32 triangles times float64 areas, rounded back to float32: numpy's in-place `*=` in transformers
    return (triangles * (2.0 / (edges[2:] - edges[:-2]))[None, :]).astype(np.float32)


class LogMel(nn.Module):
    """DCASE baseline log-mel spectrogram on the wave's device: `20/power * log10(mel + eps)`.

    Matches `librosa.feature.melspectrogram` (>= 0.10 defaults: periodic Hann window of `n_fft`
    samples, `center=True` with zero padding, slaney mel scale and slaney area norm) followed by the
    baseline's log. A wave shorter than `n_fft // 2` still gives one frame: the centre padding is zeros.
    The filter bank is a non-persistent buffer, so `.to(device)` moves it and state dicts stay empty.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int = 512,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 2.0,
        eps: float = sys.float_info.epsilon,
    ):
        super().__init__()
        owner = "LogMel"
        _positive(owner, "sample_rate", sample_rate, "16000", integer=True)
        _positive(owner, "n_fft", n_fft, "1024", integer=True)
        _positive(owner, "hop_length", hop_length, "512", integer=True)
        _positive(owner, "n_mels", n_mels, "128", integer=True)
        _positive(owner, "power", power, "2.0")
        _positive(owner, "eps", eps, "1e-16")
        # transformers places FFT bins on linspace(0, sample_rate // 2, n_fft // 2 + 1), which is
        # librosa's rfftfreq only when both are even; refuse the rest rather than be subtly off.
        if n_fft % 2 or sample_rate % 2:
            raise AsdError(
                f"{owner}: n_fft={n_fft} and sample_rate={sample_rate} must both be even "
                "(e.g. n_fft=1024, sample_rate=16000; resample with data.audio.sample_rate)"
            )
        nyquist = sample_rate / 2
        for key, value in (("f_min", f_min), ("f_max", f_max)):
            if not (value is None and key == "f_max") and not isinstance(value, (int, float, np.number)):
                raise AsdError(f"{owner}: {key}={value!r} must be a frequency in Hz (a number)")
        f_max = nyquist if f_max is None else float(f_max)
        if f_max > nyquist:
            raise AsdError(
                f"{owner}: f_max={f_max} is above the Nyquist frequency {nyquist} of sample_rate="
                f"{sample_rate}; set f_max <= {nyquist} or leave it unset"
            )
        if not 0 <= f_min < f_max:
            raise AsdError(f"{owner}: f_min={f_min} must be >= 0 and below f_max={f_max}")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.f_min, self.f_max, self.power, self.eps = float(f_min), f_max, float(power), float(eps)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_FILTER_WARNING)
            fb = slaney_mel_filters(n_fft // 2 + 1, n_mels, self.f_min, f_max, sample_rate)
        empty = np.flatnonzero(fb.max(axis=0) == 0)
        if empty.size:
            # librosa has the same empty filters; their rows are the constant 20/power*log10(eps)
            log.warning(
                "LogMel: %d of n_mels=%d mel filters cover no FFT bin (filters %s) and give a constant "
                "row; lower n_mels or raise n_fft=%d to avoid them",
                empty.size,
                n_mels,
                empty.tolist(),
                n_fft,
            )
        self.register_buffer("mel_fb", torch.from_numpy(fb.T.copy()), persistent=False)  # (n_mels, F)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames for a wave of `num_samples` samples (centred frames: `1 + num_samples // hop_length`)."""
        return 1 + num_samples // self.hop_length

    def forward(self, wave: Tensor) -> Tensor:
        """(B, T) or (T,) -> (B, n_mels, frames) float32 log-mel in dB-like units.

        The last result is kept, and a copy of it returned again for the same wave tensor (the same
        object, not changed in place since) under the same grad/inference mode: members that share
        this module (`share_frontends`) compute a batch's log-mel once. Callers get copies, so one
        that edits its result in place changes nobody else's. No memo for a wave that needs gradients
        (its graph must not be shared) or an inference tensor (it has no version counter to tell
        an in-place change). A result `prime` gave for this wave comes first.
        """
        wave = _as_batch(wave, "LogMel")
        primed = self.__dict__.get("_primed")
        if primed is not None and primed[0] is wave and not (wave.requires_grad or wave.is_inference()):
            if primed[1] == wave._version:
                return primed[2].clone()
        key = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        memo = self.__dict__.get("_memo")
        if wave.requires_grad or wave.is_inference():
            self.__dict__["_memo"] = None
            return self._compute(wave)
        if memo is not None and memo[0] is wave and memo[1] == wave._version and memo[2] == key:
            return memo[3].clone()
        out = self._compute(wave)
        self.__dict__["_memo"] = (wave, wave._version, key, out)
        return out.clone()

    #: bump when `_compute`'s output changes for the same settings: cached features are then rebuilt
    VERSION = 1

    @property
    def setting(self) -> str:
        """Every setting the output depends on, in words: equal settings give equal log-mels."""
        return f"{self.extra_repr()}, eps={self.eps}, version={self.VERSION}"

    def prime(self, wave: Tensor, spec: Tensor) -> None:
        """Serve `spec` (B, n_mels, frames), this module's log-mel of `wave` computed earlier (the
        feature cache, `asd.data.cache.FeatureCache`), whenever `forward` gets this very wave tensor
        unchanged, in any grad mode. A primed result is kept beside the memo, so a member that feeds
        another wave (an augmented copy) does not evict it. Callers get copies, as from the memo."""
        wave = _as_batch(wave, "LogMel")
        want = (wave.shape[0], self.n_mels, self.num_frames(wave.shape[-1]))
        if tuple(spec.shape) != want or spec.requires_grad:
            raise AsdError(
                f"LogMel: cached features of shape {tuple(spec.shape)} do not fit a wave batch "
                f"{tuple(wave.shape)}: expected {want}; the feature cache was built for other settings or "
                "clip lengths (delete the cache folder, $ASD_CACHE/audio, to rebuild it)"
            )
        self.__dict__["_primed"] = None
        # an inference tensor has no version counter to tell an in-place change; a batch cast to
        # another precision (trainer.precision=*-true) lost the float32 features: compute instead
        if wave.is_inference() or spec.dtype != torch.float32 or wave.dtype != torch.float32:
            return
        spec = spec.to(wave.device)
        # the guard reads a result back: on an accelerator (a wait for the device) only the first batch
        if wave.device.type == "cpu" or not self.__dict__.get("_checked_once"):
            self._check_frame(wave, spec)
            self.__dict__["_checked_once"] = True
        self.__dict__["_primed"] = (wave, wave._version, spec)

    def _check_frame(self, wave: Tensor, spec: Tensor) -> None:
        """Raise unless `spec`'s middle frame is this wave's (a guard against features that travel
        with a batch whose wave was changed: pseudo-anomalies and crops drop them, `with_wave`)."""
        j = spec.shape[-1] // 2
        lo, hi = j * self.hop_length - self.n_fft // 2, j * self.hop_length + self.n_fft // 2
        if lo < 0 or hi > wave.shape[-1]:
            return  # a wave shorter than a frame and its padding: nothing cheap to compare
        with torch.no_grad(), torch.autocast(device_type=wave.device.type, enabled=False):
            frame = torch.stft(
                wave[:, lo:hi].float(),
                n_fft=self.n_fft,
                hop_length=self.n_fft,
                window=self.window.float(),
                center=False,
                return_complex=True,
            )  # (B, F, 1)
            mel = torch.matmul(self.mel_fb.float(), frame.abs().pow(self.power))  # (B, n_mels, 1)
            mine = (20.0 / self.power) * torch.log10(mel + self.eps)[:, :, 0]  # (B, n_mels)
            off = (mine - spec[:, :, j].float()).abs().median(dim=1).values  # (B,)
        if bool((off > 0.5).any()):
            raise AsdError(
                f"LogMel: cached features do not belong to this batch's waves (middle frames differ by up "
                f"to {float(off.max()):.2f} dB): a batch item changed its wave but kept its features; "
                "set data.feature_cache=false and report this"
            )

    def compute(self, wave: Tensor) -> Tensor:
        """The log-mel of a (B, T) wave on this module's device, without the memo (the feature cache's)."""
        return self._compute(_as_batch(wave, "LogMel").to(self.mel_fb.device))

    def _compute(self, wave: Tensor) -> Tensor:
        # the STFT, power and log lose too much in half precision: compute in float32 under autocast too
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.stft(
                wave.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.n_fft,
                window=self.window.float(),
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # (B, F, frames) complex64
            spec = spec.abs().pow(self.power)  # (B, F, frames)
            # (n_mels, F) @ (B, F, frames) -> (B, n_mels, frames)
            mel = torch.matmul(self.mel_fb.float(), spec)
            return (20.0 / self.power) * torch.log10(mel + self.eps)

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"n_mels={self.n_mels}, f_min={self.f_min}, f_max={self.f_max}, power={self.power}"
        )


#: batch keys of cached features start with this (`asd.data.datamodule.ClipDataset`)
FEATURE_PREFIX = "features_"


def feature_key(frontend: LogMel) -> str:
    """The batch key of a front end's cached features: equal for equal settings."""
    return FEATURE_PREFIX + hashlib.sha256(frontend.setting.encode()).hexdigest()[:12]


def logmel_frontends(members: Iterable[nn.Module]) -> dict[str, LogMel]:
    """The `LogMel` front ends of these members by feature key (one per setting): what the feature
    cache computes once per clip (`asd.data.datamodule.AsdDataModule.cache_features`)."""
    out: dict[str, LogMel] = {}
    for member in members:
        frontend = getattr(member, "frontend", None)
        if type(frontend) is LogMel:
            out.setdefault(feature_key(frontend), frontend)
    return out


def prime_frontends(members: Iterable[nn.Module], batch: Mapping[str, Tensor]) -> None:
    """Hand a batch's cached features (`FEATURE_PREFIX` keys) to every member's `LogMel` of their
    setting, so the members read them instead of computing them (`LogMel.prime`)."""
    if not any(k.startswith(FEATURE_PREFIX) for k in batch):
        return
    primed: set[int] = set()  # a front end that members share (`share_frontends`) is primed once
    for member in members:
        frontend = getattr(member, "frontend", None)
        if type(frontend) is LogMel and id(frontend) not in primed and feature_key(frontend) in batch:
            frontend.prime(batch["wave"], batch[feature_key(frontend)])
            primed.add(id(frontend))


def share_frontends(members: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Give members whose `frontend` is a `LogMel` of the same settings one instance of it, so a
    batch's log-mel is computed once (its memo) however many members read it. LogMel holds no
    parameters and no state (its buffers are fixed, non-persistent), so sharing changes no result and
    no checkpoint. Returns the members that now share each setting (groups of two or more)."""
    shared: dict[str, LogMel] = {}
    groups: dict[str, list[str]] = {}
    for name, member in members.items():
        frontend = getattr(member, "frontend", None)
        if type(frontend) is LogMel:
            key = frontend.setting
            member.frontend = shared.setdefault(key, frontend)
            groups.setdefault(key, []).append(name)
    return {k: v for k, v in groups.items() if len(v) > 1}


class ImageFrontend(nn.Module):
    """Pictures in the place of a log-mel: a batch's (B, C*h*w) vectors -> (B, C*h, w).

    `asd.data.images.ImageLayout` lays a picture (or one patch of it) out channel-major, so a member
    built for (B, n_mels, frames) sees the picture's rows as "bins" (`n_mels = C*h`, the channels
    stacked vertically) and its columns as "frames". Pixel values are passed as they are ([0, 1]);
    members normalise them like log-mel (per bin) where they normalise log-mel.
    """

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        for key, value in (("channels", channels), ("height", height), ("width", width)):
            _positive("ImageFrontend", key, value, "1", integer=True)
        self.channels, self.height, self.width = int(channels), int(height), int(width)
        self.n_mels = self.channels * self.height

    @property
    def num_samples(self) -> int:
        """The one input length it takes (members probe front ends with a zero input of this length)."""
        return self.channels * self.height * self.width

    def num_frames(self, num_samples: int) -> int:
        return self.width

    def forward(self, wave: Tensor) -> Tensor:
        """(B, C*h*w) -> (B, C*h, w) float32."""
        wave = _as_batch(wave, "ImageFrontend")
        numel = self.channels * self.height * self.width
        if wave.shape[-1] != numel:
            raise AsdError(
                f"ImageFrontend: an item has {wave.shape[-1]} values, expected {self.channels}x{self.height}x"
                f"{self.width} = {numel}; the run was built for another data.image size, mode or patch"
            )
        return wave.float().reshape(wave.shape[0], self.n_mels, self.width)  # (B, C, h, w) rows stacked

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}"


def rfft64(frames: Tensor, n: int) -> Tensor:
    """The float64 real FFT of `frames` (..., L) zero-padded to `n`, rounded to complex64: (..., n//2+1).

    On the CPU through scipy's pocketfft, on as many of its own threads as torch's intra-op pool
    has: torch's CPU path fills and copies a zero-padded float64 buffer before its FFT, and took
    2.1-2.2x scipy's time on AstFbank's frames (benchmarks/bench_frontend.py, `fft`). Both are
    exact float64 FFTs: their complex64 results differed by at most 2.8e-14 (the last bit of the
    smallest bins), and AstFbank's output was the same to the bit. Other devices use torch's FFT.
    Not differentiable: the frames are detached and taken in float64 whatever their dtype.
    """
    frames = frames.detach().to(torch.float64)
    if frames.device.type != "cpu":
        return torch.fft.rfft(frames, n=n).to(torch.complex64)
    spec = scipy.fft.rfft(frames.numpy(), n=n, workers=torch.get_num_threads())  # complex128
    return torch.from_numpy(spec.astype(np.complex64))


class AstFbank(nn.Module):
    """Audio Spectrogram Transformer input: Kaldi fbank via `transformers.ASTFeatureExtractor`.

    Kaldi framing: 25 ms windows (400 samples) every 10 ms (160 samples), no centre padding, so a
    wave gives `num_frames(T)` frames. The extractor zero-pads the fbank to `max_length` frames and
    TRUNCATES longer clips to their first `max_length` frames (about 10.25 s at 16 kHz); a caller that
    needs the whole clip splits the wave into windows of `samples_per_window()` samples. Truncation is
    logged once per module. `normalize` applies AST's `(fbank - mean) / (2 * std)` (AudioSet statistics).

    `backend="torch"` (the default) computes the extractor's numpy recipe batched with torch on the
    wave's device: frames of 400 samples every 160, DC offset removed, pre-emphasis 0.97, a symmetric
    Hann window, a 512-point FFT (float64, the spectrum rounded to complex64 as the extractor stores
    it), power, the extractor's own Kaldi mel filters, floor 2**-23, natural log. It matches
    `backend="extractor"` (the transformers numpy implementation, one Python loop over frames: 20-35
    ms per 10 s clip on one core) to float32 rounding (tests/test_features.py) and is 1.6-3.3x faster
    on the CPU in runs on a shared machine (benchmarks/bench_frontend.py); hand-written because the
    library's only batched path is torchaudio's, which this project cannot install beside a CPU
    torch. Neither is differentiable. The 128-bin Kaldi bank at 16 kHz has one filter that covers no
    FFT bin (filter 3, a constant row); that is the configuration AST was pre-trained with, so it is
    kept and logged at debug level only.
    """

    #: the extractor's pre-emphasis and mel floor (transformers' `_extract_fbank_features`)
    preemphasis = 0.97
    mel_floor = 1.192092955078125e-07
    fft_length = 512

    sample_rate = 16000
    frame_length = 400  # 25 ms at 16 kHz
    frame_shift = 160  # 10 ms at 16 kHz

    def __init__(
        self,
        sample_rate: int = 16000,
        num_mel_bins: int = 128,
        max_length: int = 1024,
        mean: float = -4.2677393,
        std: float = 4.5689974,
        normalize: bool = True,
        backend: str = "torch",
    ):
        super().__init__()
        owner = "AstFbank"
        if backend not in ("torch", "extractor"):
            raise AsdError(f"{owner}: backend={backend!r}: expected 'torch' or 'extractor'")
        self.backend = backend
        if sample_rate != self.sample_rate:
            raise AsdError(
                f"{owner}: sample_rate={sample_rate}, but the Audio Spectrogram Transformer is trained "
                f"on 16 kHz audio; set data.audio.sample_rate={self.sample_rate}"
            )
        _positive(owner, "num_mel_bins", num_mel_bins, "128", integer=True)
        _positive(owner, "max_length", max_length, "1024", integer=True)
        _positive(owner, "std", std, "4.5689974")
        self.num_mel_bins, self.max_length, self.normalize = num_mel_bins, max_length, normalize
        self.mean, self.std = float(mean), float(std)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_FILTER_WARNING)
            self.extractor = ASTFeatureExtractor(
                sampling_rate=self.sample_rate,
                num_mel_bins=num_mel_bins,
                max_length=max_length,
                do_normalize=normalize,
                mean=self.mean,
                std=self.std,
            )
        filters = getattr(self.extractor, "mel_filters", None)  # only on the numpy path
        if filters is None:  # torchaudio is installed: the extractor would not use the numpy recipe
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_EMPTY_FILTER_WARNING)
                filters = mel_filter_bank(
                    num_frequency_bins=self.fft_length // 2 + 1,
                    num_mel_filters=num_mel_bins,
                    min_frequency=20,
                    max_frequency=self.sample_rate // 2,
                    sampling_rate=self.sample_rate,
                    norm=None,
                    mel_scale="kaldi",
                    triangularize_in_mel_space=True,
                )
        empty = np.flatnonzero(filters.max(axis=0) == 0).tolist()
        log.debug("AstFbank: Kaldi mel filters %s cover no FFT bin (as in AST's pre-training)", empty)
        self.register_buffer("kaldi_fb", torch.from_numpy(np.asarray(filters, np.float32)), persistent=False)
        window = window_function(self.frame_length, "hann", periodic=False)  # (400,) float64
        self.register_buffer("kaldi_window", torch.from_numpy(window), persistent=False)
        self._warned_truncation = False

    def num_frames(self, num_samples: int) -> int:
        """Kaldi frames (before padding/truncation to `max_length`) for a wave of `num_samples` samples."""
        if num_samples < self.frame_length:
            return 0
        return 1 + (num_samples - self.frame_length) // self.frame_shift

    def samples_per_window(self) -> int:
        """Samples that give exactly `max_length` frames: split longer waves into windows of this size."""
        return self.frame_length + (self.max_length - 1) * self.frame_shift

    def forward(self, wave: Tensor) -> Tensor:
        """(B, T) or (T,) -> (B, max_length, num_mel_bins) float32 on the wave's device."""
        wave = _as_batch(wave, "AstFbank")
        num_samples = wave.shape[-1]
        if num_samples < self.frame_length:
            raise AsdError(
                f"AstFbank: a wave of {num_samples} samples is shorter than one 25 ms Kaldi frame "
                f"({self.frame_length} samples at 16 kHz); pad or crop clips to a longer length "
                "(data.audio settings)"
            )
        frames = self.num_frames(num_samples)
        if frames > self.max_length and not self._warned_truncation:
            log.warning(
                "AstFbank: clips of %d samples give %d frames; only the first max_length=%d are kept. "
                "Split waves into windows of %d samples to use the whole clip",
                num_samples,
                frames,
                self.max_length,
                self.samples_per_window(),
            )
            self._warned_truncation = True
        if self.backend == "extractor":
            batch = wave.detach().to("cpu", torch.float32).numpy()  # (B, T)
            out = self.extractor(list(batch), sampling_rate=self.sample_rate, return_tensors="np")
            fbank = np.asarray(out["input_values"], dtype=np.float32)  # (B, max_length, num_mel_bins)
            return torch.from_numpy(fbank).to(wave.device)
        with torch.no_grad(), torch.autocast(device_type=wave.device.type, enabled=False):
            fbank = self._kaldi(wave.detach())  # (B, frames, num_mel_bins)
            fbank = fbank[:, : self.max_length]
            if fbank.shape[1] < self.max_length:  # zero rows after the clip, as the extractor pads
                fbank = F.pad(fbank, (0, 0, 0, self.max_length - fbank.shape[1]))
            if self.normalize:
                fbank = (fbank - self.mean) / (self.std * 2)
        return fbank  # (B, max_length, num_mel_bins)

    def _kaldi(self, wave: Tensor) -> Tensor:
        """(B, T) -> (B, frames, num_mel_bins) log Kaldi fbank, the extractor's numpy recipe batched."""
        x = wave.to(torch.float64)
        frames = x.unfold(-1, self.frame_length, self.frame_shift)  # (B, frames, 400), a view
        mean = frames.mean(dim=-1, keepdim=True)  # (B, frames, 1): the DC offset each frame removes
        # The recipe removes a frame's mean m, then pre-emphasises: y[0] = (x[0] - m)(1 - k) and, for
        # n >= 1, y[n] = (x[n] - m) - k (x[n-1] - m) = (x[n] - k x[n-1]) - (1 - k) m. x[n] - k x[n-1]
        # is the same in every frame that holds sample n, so it is taken once on the wave and the
        # frames are cut from it: three passes over the (B, frames, 400) float64 array instead of
        # six (the whole fbank 1.2-1.4x faster in two runs; the float64 values differ from the
        # per-frame order's by rounding, which the complex64 spectrum absorbed on the clips
        # benchmarks/bench_frontend.py compared: the same output to the bit).
        k = self.preemphasis
        emphasised = torch.cat([x[..., :1], x[..., 1:] - k * x[..., :-1]], dim=-1)  # (B, T)
        y = emphasised.unfold(-1, self.frame_length, self.frame_shift) - (1 - k) * mean
        y[..., 0] = (frames[..., 0] - mean[..., 0]) * (1 - k)  # n = 0: no predecessor in the frame
        spec = rfft64(y.mul_(self.kaldi_window), self.fft_length)  # (B, frames, 257) complex64
        power = spec.real.square() + spec.imag.square()  # (B, frames, 257) float32
        mel = torch.clamp(power @ self.kaldi_fb, min=self.mel_floor)  # (B, frames, num_mel_bins)
        return torch.log(mel)

    def extra_repr(self) -> str:
        return (
            f"num_mel_bins={self.num_mel_bins}, max_length={self.max_length}, "
            f"normalize={self.normalize}, mean={self.mean}, std={self.std}, backend={self.backend}"
        )


class BinStats(nn.Module):
    """Exact running mean and variance per mel bin over all frames passed to `update`."""

    def __init__(self, n_bins: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(n_bins))
        self.register_buffer("m2", torch.zeros(n_bins))  # sum of squared deviations from `mean`

    @torch.no_grad()
    def update(self, spec: Tensor) -> None:
        """Merge the frames of `spec` (B, n_bins, frames) into the moments (Chan et al.'s parallel update)."""
        x = spec.detach().float()
        n = x.shape[0] * x.shape[2]
        batch_mean = x.mean(dim=(0, 2))  # (n_bins,)
        batch_m2 = (x - batch_mean[:, None]).pow(2).sum(dim=(0, 2))  # (n_bins,)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count.copy_(total)

    def std(self) -> Tensor:
        """(n_bins,) standard deviation so far; ones before the first update."""
        var = self.m2 / self.count.clamp_min(1)
        return torch.where(self.count > 0, var.sqrt().clamp_min(self.eps), torch.ones_like(var))

    def normalise(self, spec: Tensor) -> Tensor:
        """(B, n_bins, frames) -> standardised per bin; the identity before the first update."""
        return (spec.float() - self.mean[:, None]) / self.std()[:, None]

    def denormalise(self, x: Tensor) -> Tensor:
        """Inverse of `normalise`, (B, n_bins, frames)."""
        return x.float() * self.std()[:, None] + self.mean[:, None]


class LogSpectrum(nn.Module):
    """Full-spectrum front end: the log power of the FFT of the whole clip, (B, T) -> (B, n_bins).

    Where a log-mel averages over 64 ms frames and ~100 Hz bands, the FFT of the whole clip resolves
    1 / duration Hz (0.5 Hz for 2 s), so the fine lines of rotating machines and their drift stay
    visible (the "full-spectrum" input of Wilkinghoff's DCASE 2023/2024 systems). Waves are zero-padded
    or cut to `num_samples` so every clip gives `num_samples // 2 + 1` bins; the power is divided by
    `num_samples` so the level does not depend on the clip length. Computed in float32 under autocast.
    """

    def __init__(self, num_samples: int, eps: float = 1e-10):
        super().__init__()
        _positive("LogSpectrum", "num_samples", num_samples, "32000", integer=True)
        _positive("LogSpectrum", "eps", eps, "1e-10")
        self.num_samples, self.eps = num_samples, float(eps)
        self.n_bins = num_samples // 2 + 1

    def forward(self, wave: Tensor) -> Tensor:
        """(B, T) or (T,) -> (B, num_samples // 2 + 1) float32 log power in dB."""
        wave = _as_batch(wave, "LogSpectrum")
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spec = torch.fft.rfft(wave.float(), n=self.num_samples)  # (B, n_bins) complex64
            power = spec.real.square() + spec.imag.square()
            return 10.0 * torch.log10(power / self.num_samples + self.eps)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, n_bins={self.n_bins}"
