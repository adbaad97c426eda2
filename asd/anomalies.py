"""Pseudo-anomalies: normal clips turned into labelled anomalous ones, in the waveform domain.

Every edit stays inside the mask returned with it. Time kinds rewrite one random span of samples;
TF kinds change the STFT bins of a mask (Perlin blobs, a frequency band, a frame span) and add back
ISTFT(mask * (X' - X)), so samples no masked frame covers are bit-identical. Steady kinds change the
whole clip the same way throughout, as a worn part or a changed mount does: `eq` colours its
long-term spectrum (1-3 smooth bands of 3-10 dB each, more where they overlap), `hum` adds a weak
steady tone with harmonics. They are opt-in (`DEFAULT_KINDS` leaves them out): alone they rank the
columns that hear the long-term spectrum first, but beside the event kinds they move the weights
little and `final` only within noise (docs/results.md, "Steady pseudo-anomalies"). Working on waves
means every member, AST included, sees the same anomalies.

One file: thirteen edit kinds share one mask contract, one seeded RNG per copy and one config;
splitting them would scatter the contract the tests check kind by kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import interpolate, signal
from torch.utils.data import Dataset

from asd.choices import DEFAULT_KINDS, KINDS, STEADY_KINDS
from asd.data.windows import with_wave
from asd.errors import AsdError
from asd.fileio import write_atomic

log = logging.getLogger(__name__)

TF_KINDS = ("tf_blobs", "tf_band", "tf_span")


@dataclass(frozen=True)
class AnomalyConfig:
    """What the generator may inject and how strongly; ranges are (low, high), drawn uniformly per call."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    p_none: float = 0.0  # probability that a call returns the clip unchanged, kind "none"
    level_db: tuple[float, float] = (-10.0, 5.0)  # added components' RMS relative to the clip's RMS
    span: tuple[float, float] = (0.1, 0.6)  # fraction of the clip (or of its frames) one event covers
    n_fft: int = 512
    hop: int = 128
    sample_rate: int = 16000
    gain_db: tuple[float, float] = (6.0, 12.0)  # size of gain changes (gain_drift, TF gain); sign random
    pitch_semitones: tuple[float, float] = (1.0, 3.0)  # peak pitch excursion of pitch_drift
    mod_rate_hz: tuple[float, float] = (2.0, 30.0)
    mod_depth: tuple[float, float] = (0.3, 0.9)  # amplitude-modulation depth
    band: tuple[float, float] = (0.03, 0.2)  # width of band_noise / tf_band as a fraction of 0..sr/2
    blob_fraction: tuple[float, float] = (0.03, 0.15)  # share of STFT bins inside tf_blobs
    p_substitute: float = 0.5  # outlier: probability of substituting the span instead of mixing
    fade_ms: float = 10.0  # ramps inside a span, so added sounds start and end without a click
    min_rms: float = 1e-3  # reference RMS floor: a silent clip still gets an audible added component
    eq_db: tuple[float, float] = (3.0, 10.0)  # eq: peak gain of each smooth band, boosted or cut
    eq_octaves: tuple[float, float] = (0.3, 1.5)  # eq: width (std in octaves) of each band
    hum_db: tuple[float, float] = (-30.0, -12.0)  # hum: the steady tone's RMS relative to the clip's


def anomaly_config(values: Mapping[str, Any] | None) -> AnomalyConfig:
    """An `AnomalyConfig` from a (Hydra) mapping of its fields (`fusion.anomalies`); lists become tuples.

    The fields' types and ranges are the config schema's (`asd.config`); only the STFT overlap, which
    needs two of them, is checked when the generator is built.
    """
    converted = {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in dict(values or {}).items()
    }
    if isinstance(converted.get("kinds"), str):
        converted["kinds"] = (converted["kinds"],)  # `kinds: tone` means one kind, not five letters
    return AnomalyConfig(**converted)


def _check_overlap(cfg: AnomalyConfig, key: str) -> None:
    """The STFT edits need overlapping frames to add back their change without gaps."""
    if cfg.hop > cfg.n_fft // 2:
        raise AsdError(f"{key}.hop={cfg.hop}: expected at most n_fft // 2 = {cfg.n_fft // 2} (overlap)")


def _as_wave(wave: Any, name: str, min_len: int) -> np.ndarray:
    """A finite 1-D float32 copy of `wave`, or an AsdError naming `name`."""
    arr = np.asarray(wave)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise AsdError(f"`{name}` must be a 1-D float array of samples, got shape {arr.shape} {arr.dtype}")
    if len(arr) < min_len:
        raise AsdError(f"`{name}` has {len(arr)} samples; expected at least {min_len}")
    if not np.isfinite(arr).all():
        raise AsdError(f"`{name}` has NaN/inf samples; fix the audio before generating pseudo-anomalies")
    return arr.astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _scaled(x: np.ndarray, rms: float) -> np.ndarray:
    return x * (rms / max(_rms(x), 1e-12))


def _resample(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`x` read at fractional `positions`: a cubic spline keeps the highs that linear interpolation dulls."""
    return interpolate.CubicSpline(np.arange(len(x)), x)(positions)


def _stft_args(cfg: AnomalyConfig) -> dict[str, int]:
    return {"fs": cfg.sample_rate, "nperseg": cfg.n_fft, "noverlap": cfg.n_fft - cfg.hop}


def stft(wave: np.ndarray, config: AnomalyConfig) -> np.ndarray:
    """Complex (F, frames) Hann STFT: F = n_fft // 2 + 1, frames = 1 + ceil(T / hop), centred at j * hop."""
    wave = np.asarray(wave, dtype=np.float64)
    return signal.stft(wave, boundary="zeros", padded=True, **_stft_args(config))[2]


def istft(spec: np.ndarray, config: AnomalyConfig, length: int) -> np.ndarray:
    """Inverse of `stft`, cut to `length` samples; all-zero frames add exactly zero."""
    return signal.istft(spec, boundary=True, **_stft_args(config))[1][:length]


def _gradient_noise(shape: tuple[int, int], ny: int, nx: int, rng: np.random.Generator) -> np.ndarray:
    """One octave of Perlin noise: random unit gradients on an (ny+1, nx+1) lattice, smoothly blended."""
    angle = rng.uniform(0, 2 * np.pi, (ny + 1, nx + 1))
    cos, sin = np.cos(angle), np.sin(angle)  # unit gradients on the small lattice
    y, x = np.arange(shape[0]) * ny / shape[0], np.arange(shape[1]) * nx / shape[1]
    iy, ix = y.astype(int)[:, None], x.astype(int)[None, :]  # lattice cell of every point
    fy, fx = (y % 1)[:, None], (x % 1)[None, :]  # position inside the cell

    def corner(dy: int, dx: int) -> np.ndarray:
        # (H, W): gradient at this corner of each point's cell, dotted with the offset from that corner
        return cos[iy + dy, ix + dx] * (fy - dy) + sin[iy + dy, ix + dx] * (fx - dx)

    u, v = (t * t * t * (t * (t * 6 - 15) + 10) for t in (fx, fy))  # quintic fade: smooth across cells
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return top * (1 - v) + bottom * v


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, octaves: int = 2
) -> np.ndarray:
    """2-D Perlin noise of `shape`: `cells` lattice cells per axis, doubled (at half weight) per octave."""
    octave_list = [
        _gradient_noise(shape, cells[0] * 2**o, cells[1] * 2**o, rng) / 2**o for o in range(octaves)
    ]
    return np.sum(octave_list, axis=0)


def _blob_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: AnomalyConfig) -> np.ndarray:
    noise = perlin_noise(shape, (int(rng.integers(2, 7)), int(rng.integers(3, 13))), rng)
    # a quantile threshold gives exactly the drawn share of bins, so the mask is never empty
    return noise >= np.quantile(noise, 1 - rng.uniform(*cfg.blob_fraction))


def _band_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: AnomalyConfig) -> np.ndarray:
    width = max(1, round(rng.uniform(*cfg.band) * shape[0]))
    low = int(rng.integers(1, shape[0] - width + 1))  # bin 0 (DC) is left alone
    mask = np.zeros(shape, dtype=bool)
    mask[low : low + width] = True
    return mask


def _span_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: AnomalyConfig) -> np.ndarray:
    width = max(1, round(rng.uniform(*cfg.span) * shape[1]))
    start = int(rng.integers(0, shape[1] - width + 1))
    mask = np.zeros(shape, dtype=bool)
    mask[:, start : start + width] = True
    return mask


_TF_MASKS = {"tf_blobs": _blob_mask, "tf_band": _band_mask, "tf_span": _span_mask}


def draw_kind(
    kinds: Sequence[str], p_none: float, rng: np.random.Generator, with_outlier: bool, key: str, item: str
) -> str:
    """One kind from `kinds` ("outlier" only `with_outlier`), or "none" with probability `p_none`;
    the first draws of `rng`. `key` and `item` name the config node and what is edited, for the error."""
    allowed = [k for k in kinds if with_outlier or k != "outlier"]
    if not allowed:
        raise AsdError(
            f"{key}.kinds=['outlier'] needs an outlier {item} (another section's); "
            "pass `outlier=` or enable more kinds"
        )
    if rng.random() < p_none:
        return "none"
    return allowed[int(rng.integers(len(allowed)))]


@dataclass
class Injection:
    """One generated clip: the edited wave, its kind and where the edit may have touched it."""

    wave: np.ndarray  # (T,) float32
    kind: str  # one of KINDS, or "none"
    #: bool: (T,) samples for time kinds, steady kinds (all True) and "none"; (F, frames) for TF_KINDS
    mask: np.ndarray


class PseudoAnomalies:
    """Seeded generator of pseudo-anomalies; each call draws (or is told) one kind and edits one clip."""

    #: every kind it knows, in the order kind ids count (`PseudoAnomalyDataset.kinds`)
    all_kinds = KINDS

    def __init__(self, config: AnomalyConfig):
        _check_overlap(config, "fusion.anomalies")
        self.config = config
        # time kinds: span (n,) -> new span (n,); TF kinds go through `_tf_edit`
        self._time_edits: dict[str, Callable[..., np.ndarray]] = {
            k: getattr(self, f"_{k}") for k in KINDS if k not in TF_KINDS
        }

    def draw_kind(self, rng: np.random.Generator, with_outlier: bool) -> str:
        """The kind a call with `kind=None` uses: the first draws it makes from `rng`."""
        return draw_kind(self.config.kinds, self.config.p_none, rng, with_outlier, "fusion.anomalies", "clip")

    def __call__(
        self,
        wave: np.ndarray,
        rng: np.random.Generator,
        outlier: np.ndarray | None = None,
        kind: str | None = None,
    ) -> Injection:
        """Edit `wave` (T,) with a drawn or forced kind; deterministic given the state of `rng`."""
        if not isinstance(rng, np.random.Generator):
            raise AsdError(f"`rng` must be a numpy Generator (np.random.default_rng(seed)), got {type(rng)}")
        x = _as_wave(wave, "wave", self.config.n_fft)
        if kind is None:
            kind = self.draw_kind(rng, with_outlier=outlier is not None)
        elif kind not in KINDS and kind != "none":
            raise AsdError(f"unknown pseudo-anomaly kind {kind!r}; expected 'none' or one of {list(KINDS)}")
        if kind == "none":
            return Injection(x.copy(), "none", np.zeros(len(x), dtype=bool))
        other = None
        if kind == "outlier":
            if outlier is None:
                raise AsdError("kind='outlier' needs `outlier=`, a clip of another section or machine")
            other = np.resize(_as_wave(outlier, "outlier", 1), len(x))  # repeated or cut to T samples
        ref = max(_rms(x), self.config.min_rms)
        if kind in TF_KINDS:
            return self._tf_edit(x, rng, kind, ref)
        if kind in STEADY_KINDS:
            n, start = len(x), 0
        else:
            n = min(len(x), max(2, round(rng.uniform(*self.config.span) * len(x))))
            start = int(rng.integers(0, len(x) - n + 1))
        out = x.astype(np.float64)
        span = slice(start, start + n)
        # the edit only ever sees and returns the span, so nothing outside it can change
        out[span] = self._time_edits[kind](out[span], rng, ref, None if other is None else other[span])
        mask = np.zeros(len(x), dtype=bool)
        mask[span] = True
        return Injection(out.astype(np.float32), kind, mask)

    # ------------------------------------------------------------------ helpers
    def _level(self, rng: np.random.Generator, ref: float) -> float:
        """An added component's RMS: `level_db` relative to the clip's (floored) RMS."""
        return ref * 10 ** (rng.uniform(*self.config.level_db) / 20)

    def _fade(self, n: int) -> np.ndarray:
        """(n,) ones with raised-cosine ramps of `fade_ms` at both ends (0 at the span's first sample)."""
        ramp = min(n // 2, round(self.config.fade_ms * self.config.sample_rate / 1000))
        window = np.ones(n)
        if ramp:
            rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
            window[:ramp], window[n - ramp :] = rise, rise[::-1]
        return window

    # ------------------------------------------------------------------ time kinds: span -> new span
    def _tone(self, seg, rng, ref, other) -> np.ndarray:
        sr = self.config.sample_rate
        freq, phase = rng.uniform(100.0, 0.45 * sr), rng.uniform(0, 2 * np.pi)
        tone = np.sin(2 * np.pi * freq * np.arange(len(seg)) / sr + phase)
        return seg + _scaled(tone, self._level(rng, ref)) * self._fade(len(seg))

    def _harmonics(self, seg, rng, ref, other) -> np.ndarray:
        sr = self.config.sample_rate
        f0 = rng.uniform(60.0, min(800.0, 0.2 * sr))
        k = np.arange(1, int(rng.integers(3, 9)) + 1)
        decay, phases = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi, len(k))
        keep = k * f0 < 0.45 * sr  # no partial above 0.45 sr, so nothing aliases
        k, phases = k[keep, None], phases[keep, None]
        partials = np.sin(2 * np.pi * f0 * k * np.arange(len(seg)) / sr + phases)  # (K, n)
        comp = (k**-decay * partials).sum(axis=0)
        return seg + _scaled(comp, self._level(rng, ref)) * self._fade(len(seg))

    def _impulses(self, seg, rng, ref, other) -> np.ndarray:
        out, n, peak = seg.copy(), len(seg), 4 * self._level(rng, ref)  # short clicks: peak well above RMS
        for _ in range(int(rng.integers(2, 9))):
            length = max(2, round(rng.uniform(1.0, 8.0) * self.config.sample_rate / 1000))
            start = int(rng.integers(0, n))
            burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 5))
            stop = min(n, start + length)
            out[start:stop] += (burst * peak / np.abs(burst).max())[: stop - start]
        return out

    def _band_noise(self, seg, rng, ref, other) -> np.ndarray:
        sr = self.config.sample_rate
        width = rng.uniform(*self.config.band) * sr / 2
        low = rng.uniform(50.0, max(60.0, 0.45 * sr - width))
        high = max(min(low + width, 0.45 * sr), 1.1 * low)
        sos = signal.butter(4, [low, high], btype="bandpass", fs=sr, output="sos")
        settle = sr // 10  # drop the filter's start-up transient
        noise = signal.sosfilt(sos, rng.standard_normal(len(seg) + settle))[settle:]
        return seg + _scaled(noise, self._level(rng, ref)) * self._fade(len(seg))

    def _gain_drift(self, seg, rng, ref, other) -> np.ndarray:
        gain = rng.choice([-1.0, 1.0]) * rng.uniform(*self.config.gain_db)
        curve = signal.windows.tukey(len(seg), alpha=rng.uniform(0.3, 1.0))  # smooth rise, hold, fall
        return seg * 10 ** (gain * curve / 20)

    def _pitch_drift(self, seg, rng, ref, other) -> np.ndarray:
        n = len(seg)
        rate = 2 ** (rng.uniform(*self.config.pitch_semitones) / 12) - 1  # peak |playback rate - 1|
        t = np.arange(n)
        # read position t + d(t), d = D (1 - cos 2pi u) / 2: zero at both span ends, so the span keeps its
        # length; d' peaks at D pi / (n - 1) = rate (< 1, positions stay increasing)
        d = rate * (n - 1) / np.pi * (1 - np.cos(2 * np.pi * t / max(n - 1, 1))) / 2
        return _resample(seg, t + rng.choice([-1.0, 1.0]) * d)

    def _modulation(self, seg, rng, ref, other) -> np.ndarray:
        n, sr, fade = len(seg), self.config.sample_rate, self._fade(len(seg))
        t = np.arange(n)
        out = seg
        if rng.random() < 0.5:  # frequency-ish: a small periodic time warp (vibrato)
            rate_hz = rng.uniform(*self.config.mod_rate_hz)
            excursion = (2 ** (rng.uniform(*self.config.pitch_semitones) / 12) - 1) / 2
            warp = fade * excursion * sr / (2 * np.pi * rate_hz) * np.sin(2 * np.pi * rate_hz * t / sr)
            out = _resample(seg, np.clip(t + warp, 0, n - 1))
        rate_hz, depth = rng.uniform(*self.config.mod_rate_hz), rng.uniform(*self.config.mod_depth)
        envelope = 1 + depth * fade * np.sin(2 * np.pi * rate_hz * t / sr + rng.uniform(0, 2 * np.pi))
        return out * envelope

    def _outlier(self, seg, rng, ref, other) -> np.ndarray:
        fade = self._fade(len(seg))
        if rng.random() < self.config.p_substitute:
            # substitute: the other clip at the span's own loudness, cross-faded in and out inside the span
            return seg * (1 - fade) + _scaled(other, max(_rms(seg), self.config.min_rms)) * fade
        return seg + _scaled(other, self._level(rng, ref)) * fade

    # ------------------------------------------------------------------ steady kinds: the whole clip
    def _eq(self, seg, rng, ref, other) -> np.ndarray:
        """1-3 smooth bands, Gaussian in log frequency, each boosted or cut, zero phase. Each band is
        centred where the clip has energy (drawn by its power spectrum), so the change is never
        confined to bins the clip leaves empty; a clip below `min_rms` gets white noise at `min_rms`
        first (a silent clip still changes, as `level_db`'s floor does for added components)."""
        sr, n = self.config.sample_rate, len(seg)
        if _rms(seg) < self.config.min_rms:
            seg = seg + rng.standard_normal(n) * self.config.min_rms
        # reflected ends: one FFT over the clip alone is a circular filter, which would carry the
        # clip's end into its start
        pad = min(n - 1, sr // 4)
        padded = np.pad(seg, pad, mode="reflect")
        spec = np.fft.rfft(padded)
        freqs = np.fft.rfftfreq(len(padded), 1.0 / sr)
        octaves = np.log2(np.maximum(freqs, 1.0))  # DC shares the 1 Hz bin's gain
        low, high = min(100.0, 0.2 * sr), 0.45 * sr  # bands centred between these
        inside = (freqs >= low) & (freqs <= high)
        centres = octaves[inside]  # where a band may be centred
        power = np.abs(spec[inside]) ** 2
        weights = power / power.sum() if power.sum() > 0 else None  # None: uniform
        for _ in range(8):  # bands of opposite sign can cancel: draw again while the change is < 5 % RMS
            curve_db = np.zeros(len(freqs))
            for _ in range(int(rng.integers(1, 4))):
                drawn = rng.choice(len(power), p=weights)
                width = rng.uniform(*self.config.eq_octaves)
                gain = rng.choice([-1.0, 1.0]) * rng.uniform(*self.config.eq_db)
                curve_db += gain * np.exp(-0.5 * ((octaves - centres[int(drawn)]) / width) ** 2)
            out = np.fft.irfft(spec * 10 ** (curve_db / 20), n=len(padded))[pad : pad + n]
            if _rms(out - seg) >= 0.05 * _rms(seg):
                break
        return out

    def _hum(self, seg, rng, ref, other) -> np.ndarray:
        """A weak steady tone (log-uniform 50 Hz .. 0.2 sr) with up to 3 more harmonics, below 0.45 sr."""
        sr = self.config.sample_rate
        f0 = np.exp(rng.uniform(np.log(min(50.0, 0.1 * sr)), np.log(0.2 * sr)))
        k = np.arange(1, int(rng.integers(1, 5)) + 1)
        k = k[k * f0 < 0.45 * sr]  # the fundamental always stays: f0 <= 0.2 sr < 0.45 sr
        phases = rng.uniform(0, 2 * np.pi, len(k))
        partials = np.sin(2 * np.pi * f0 * k[:, None] * np.arange(len(seg)) / sr + phases[:, None])
        comp = (partials / k[:, None]).sum(axis=0)
        level = ref * 10 ** (rng.uniform(*self.config.hum_db) / 20)
        return seg + _scaled(comp, level) * self._fade(len(seg))

    # ------------------------------------------------------------------ TF kinds
    def _tf_edit(self, x: np.ndarray, rng: np.random.Generator, kind: str, ref: float) -> Injection:
        """x + ISTFT(M * (X' - X)): a gain on, or noise in place of, the masked bins."""
        spec = stft(x, self.config)  # (F, frames)
        mask = _TF_MASKS[kind](spec.shape, rng, self.config)
        change = np.zeros(len(x))
        if rng.random() < 0.5:
            gain = rng.choice([-1.0, 1.0]) * rng.uniform(*self.config.gain_db)
            change = istft(np.where(mask, spec * (10 ** (gain / 20) - 1), 0), self.config, len(x))
        if _rms(change) < 1e-3 * ref:  # noise drawn, or a gain on (near-)silent bins that changed nothing
            noise = stft(rng.standard_normal(len(x)) * self._level(rng, ref), self.config)
            change = istft(np.where(mask, noise - spec, 0), self.config, len(x))
        return Injection((x + change).astype(np.float32), kind, mask)


class PseudoAnomalyDataset(Dataset):
    """`copies` pseudo-anomalous versions of every clip of a base ClipDataset, deterministic per index.

    `generator` is a `PseudoAnomalies` or anything with its contract (`all_kinds`, `config.kinds`,
    `draw_kind`, a call returning an `Injection`), such as `asd.image_anomalies.ImagePseudoAnomalies`.
    """

    def __init__(self, base, generator: PseudoAnomalies, copies: int, seed: int, pool=None):
        self.base, self.generator, self.copies, self.seed = base, generator, int(copies), int(seed)
        self.pool = base if pool is None else pool
        self._sections = base.labels["section"].numpy()
        pool_sections = self.pool.labels["section"].numpy()
        # outlier candidates per source section: every pool clip of another (global) section id
        self._others = {int(s): np.flatnonzero(pool_sections != s) for s in np.unique(self._sections)}
        alone = sorted(s for s, idx in self._others.items() if not len(idx))
        if alone and generator.config.kinds == ("outlier",):
            raise AsdError(
                f"fusion.anomalies.kinds=['outlier'] but the pool has no clip outside section ids {alone}; "
                "give a pool with other sections/machines or enable more kinds"
            )
        if alone and "outlier" in generator.config.kinds:
            log.info("no outlier clips for section ids %s: their pseudo-anomalies skip 'outlier'", alone)

    def __len__(self) -> int:
        return len(self.base) * self.copies

    def _draw(self, i: int) -> tuple[np.random.Generator, np.ndarray, str]:
        """Item i's generator, outlier candidates and kind: the first draws of its own rng."""
        rng = np.random.default_rng([self.seed, i])
        others = self._others[int(self._sections[i // self.copies])]
        return rng, others, self.generator.draw_kind(rng, with_outlier=len(others) > 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of a PseudoAnomalyDataset of {len(self)}")
        i = int(i) % len(self)
        source = i // self.copies
        rng, others, kind = self._draw(i)
        outlier = self.pool.waves[int(others[rng.integers(len(others))])] if kind == "outlier" else None
        item = dict(self.base[source])
        injection = self.generator(item["wave"].numpy(), rng, outlier, kind=kind)
        item = with_wave(item, torch.from_numpy(injection.wave))
        item["is_normal"] = torch.tensor(kind == "none")
        item["index"] = torch.tensor(i, dtype=torch.long)
        item["source"] = torch.tensor(source, dtype=torch.long)
        item["kind"] = torch.tensor(self._kind_id(kind), dtype=torch.long)
        return item

    def kinds(self) -> np.ndarray:
        """(len,) int64 kind id of every item (index into the generator's `all_kinds`, -1 for "none"),
        without rendering waves."""
        return np.array([self._kind_id(self._draw(i)[2]) for i in range(len(self))], dtype=np.int64)

    def _kind_id(self, kind: str) -> int:
        names = self.generator.all_kinds
        return names.index(kind) if kind in names else -1


def plot_injections(
    wave: np.ndarray,
    injections: list[Injection],
    path: Path,
    sample_rate: int = 16000,
    n_fft: int = 512,
    hop: int = 128,
) -> Path:
    """Log-spectrograms of the clean clip and each injection, the mask outlined in white; one PNG."""
    cfg = AnomalyConfig(n_fft=n_fft, hop=hop, sample_rate=sample_rate)
    _check_overlap(cfg, "plot_injections")
    x = _as_wave(wave, "wave", n_fft)
    rows = [("clean", x, None)] + [(inj.kind, inj.wave, inj.mask) for inj in injections]
    clean_db = 20 * np.log10(np.abs(stft(x, cfg)) + 1e-9)
    vmax = float(clean_db.max())
    frames = clean_db.shape[1]
    extent = (-hop / 2 / sample_rate, (frames - 0.5) * hop / sample_rate, 0, sample_rate / 2)
    fig = Figure(figsize=(8, 2.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (title, w, mask) in zip(axes, rows, strict=True):
        w = _as_wave(w, f"injection {title!r} wave", n_fft)
        if len(w) != len(x):
            raise AsdError(f"plot_injections: {title!r} has {len(w)} samples, the clean clip {len(x)}")
        spec_db = 20 * np.log10(np.abs(stft(w, cfg)) + 1e-9)
        ax.imshow(spec_db, origin="lower", aspect="auto", extent=extent, vmin=vmax - 80, vmax=vmax)
        if mask is not None and mask.ndim == 1 and mask.any():
            touched = np.flatnonzero(mask) / sample_rate  # time kinds edit one contiguous span
            ax.axvspan(touched[0], touched[-1], facecolor="none", edgecolor="white", lw=1.5)
        elif mask is not None and mask.ndim == 2 and mask.any():
            if mask.shape != spec_db.shape:
                raise AsdError(
                    f"plot_injections: {title!r} mask has shape {mask.shape} but n_fft={n_fft}, hop={hop} "
                    f"give {spec_db.shape}; pass the generator's n_fft and hop"
                )
            times, freqs = np.arange(frames) * hop / sample_rate, np.arange(len(mask)) * sample_rate / n_fft
            ax.contour(times, freqs, mask.astype(float), levels=[0.5], colors="white", linewidths=1.0)
        ax.set(title=title, ylabel="Hz")
    axes[-1].set_xlabel("s")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output, no display
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return path
