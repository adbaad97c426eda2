"""The built-in synthetic dataset: machine sounds in the DCASE 2022+ dev layout, so nothing needs a download.

Two sound models (a rotating machine and an impulsive valve), sections that differ by
machine parameters, a target domain with a shifted operating condition and only a few
training clips, and five anomaly kinds per machine whose strength follows `difficulty`.
Every clip draws from its own generator seeded by (seed, machine, section, domain, split,
label, index), so a config always gives bit-identical files and changing one count
leaves every other clip as it was.

One file: the two sound models, their anomaly kinds and the folder writer share one seeded
per-clip generator; the dataset's bit-identity depends on keeping them together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve

from asd.choices import MODELS
from asd.errors import AsdError
from asd.paths import cache_root

log = logging.getLogger(__name__)

ANOMALY_KINDS: dict[str, tuple[str, ...]] = {
    "rotor": ("bearing", "imbalance", "clicks", "tilt", "rub"),
    "valve": ("missing", "leak", "resonance", "rattle", "tilt"),
}
MANIFEST = "synthetic.json"
KINDS_FILE = "anomaly_kinds.csv"
VERSION = 1  # bump whenever the sound models change, so cached datasets are rebuilt

_DOMAINS = ("source", "target")
_SPLITS = ("train", "test")
_LABELS = ("normal", "anomaly")
_SECTION_TAG = 0x5EC7  # separates the section-parameter stream from the clip streams
_PEAK = 0.3  # typical peak level of a normal clip; leaves about 10 dB for anomalies before clipping
_MAX_PEAK = 0.98
# Valve background noise types: (tilt dB/octave, level dB re the unit impulse); A, B source; C, D target.
_VALVE_NOISE = {"A": (-3.0, -42.0), "B": (0.0, -39.0), "C": (-6.0, -30.0), "D": (-9.0, -27.0)}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, difficulty and seed of the synthetic dataset; checked on creation."""

    machines: tuple[str, ...] = ("rotor", "valve")
    sections: int = 2
    source_train: int = 40  # normal training clips per (machine, section) in the source domain
    target_train: int = 5  # few target-domain training normals; 0 allowed (no target data at all)
    test_per_class: int = 10  # test clips per (machine, section, domain, label)
    duration: float = 2.0  # seconds
    sample_rate: int = 16000
    difficulty: float = 0.5  # 0 = obvious anomalies ... 1 = subtle
    seed: int = 0

    def __post_init__(self) -> None:
        machines = self.machines
        if isinstance(machines, str) or not isinstance(machines, list | tuple) or not machines:
            raise AsdError(
                f"SyntheticConfig.machines={machines!r}: give a non-empty list of models from {MODELS}"
            )
        unknown = [m for m in machines if m not in MODELS]
        if unknown:
            raise AsdError(
                f"SyntheticConfig.machines: unknown sound model(s) {unknown}; choose from {MODELS}"
            )
        if len(set(machines)) != len(machines):
            raise AsdError(f"SyntheticConfig.machines={list(machines)} names a model twice; list each once")
        object.__setattr__(self, "machines", tuple(machines))
        for name, low, high in (
            ("sections", 1, 100),
            ("source_train", 1, 10000),
            ("target_train", 0, 10000),
            ("test_per_class", 1, 10000),
            ("sample_rate", 8000, 48000),
            ("seed", 0, 2**63 - 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                raise AsdError(f"SyntheticConfig.{name}={value!r}: must be an integer in [{low}, {high}]")
            object.__setattr__(self, name, int(value))
        for name, low, high in (("duration", 0.1, 60.0), ("difficulty", 0.0, 1.0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float | np.number)
                or not low <= value <= high
            ):
                raise AsdError(f"SyntheticConfig.{name}={value!r}: must be a number in [{low}, {high}]")
            object.__setattr__(self, name, float(value))

    def key(self) -> str:
        """Stable 12-hex-digit hash of every field and the generator version (the cache folder name)."""
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def samples(self) -> int:
        """Samples per clip."""
        return round(self.duration * self.sample_rate)


@dataclass
class SyntheticClip:
    """One rendered clip: float32 wave in [-1, 1], its attributes, its anomaly kind (None when normal).

    `details` holds the anomaly's drawn parameters, e.g. `{"freq": 412.5, "level_db": -21.3}`.
    """

    wave: np.ndarray
    attributes: dict[str, str]
    anomaly: str | None = None
    details: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- random streams


def _word(text: str) -> int:
    """A stable 32-bit integer for a name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def clip_rng(
    seed: int, machine: str, section: int, domain: str, split: str, label: str, index: int
) -> np.random.Generator:
    """The generator of one clip, independent of every other clip and of the dataset's counts."""
    words = [seed, _word(machine), section, _word(domain), _word(split), _word(label), index]
    return np.random.default_rng(np.random.SeedSequence(words))


def _section_rng(seed: int, machine: str, section: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _word(machine), section, _SECTION_TAG]))


# ---------------------------------------------------------------- signal helpers


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)) + 1e-12)


def _db(level_db: float) -> float:
    return 10.0 ** (level_db / 20.0)


def _envelope_db(freqs: np.ndarray, tilt: float, bumps: np.ndarray) -> np.ndarray:
    """Smooth spectral envelope in dB: a tilt in dB/octave re 1 kHz plus Gaussian bumps in log frequency.

    `bumps` is (K, 3): centre Hz, width in octaves, gain dB.
    """
    octaves = np.log2(np.maximum(freqs, 20.0) / 1000.0)  # (F,)
    centres = np.log2(bumps[:, 0] / 1000.0)[:, None]  # (K, 1)
    shape = bumps[:, 2, None] * np.exp(-0.5 * ((octaves[None] - centres) / bumps[:, 1, None]) ** 2)  # (K, F)
    return tilt * octaves + shape.sum(axis=0)


def _shaped(white: np.ndarray, sr: int, tilt: float, bumps: np.ndarray) -> np.ndarray:
    """White noise coloured by `_envelope_db`, at unit RMS."""
    spec = np.fft.rfft(white)
    gain = 10.0 ** (_envelope_db(np.fft.rfftfreq(len(white), 1.0 / sr), tilt, bumps) / 20.0)
    out = np.fft.irfft(spec * gain, n=len(white))
    return out / _rms(out)


def _band_noise(white: np.ndarray, sr: int, centre: float, octaves: float) -> np.ndarray:
    """White noise through a Gaussian band around `centre` (`octaves` = one standard deviation), unit RMS."""
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(len(white), 1.0 / sr)
    gain = np.exp(-0.5 * (np.log2(np.maximum(f, 20.0) / centre) / octaves) ** 2)
    out = np.fft.irfft(spec * gain, n=len(white))
    return out / _rms(out)


def _ringing(sr: int, freqs: np.ndarray, taus: np.ndarray, amps: np.ndarray, length: float) -> np.ndarray:
    """Sum of exponentially decaying sines: the impulse response of a few resonances."""
    t = np.arange(round(length * sr)) / sr  # (L,)
    modes = amps[:, None] * np.exp(-t[None] / taus[:, None]) * np.sin(2 * np.pi * freqs[:, None] * t[None])
    return modes.sum(axis=0)  # (K, L) -> (L,)


def _place(n: int, sr: int, times: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Copies of `kernel` starting at `times` (s, may be negative) with gains `amps`, cut to n samples."""
    pad = len(kernel)
    train = np.zeros(n + pad)
    idx = np.round(np.asarray(times) * sr).astype(np.int64) + pad
    keep = (idx >= 0) & (idx < n + pad)
    np.add.at(train, idx[keep], np.asarray(amps)[keep])
    return fftconvolve(train, kernel)[pad : pad + n]


def _harmonics(coefs: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """sum_k |c_k| sin(k * angle + arg c_k) by Horner's rule on exp(i angle): far cheaper than K sines."""
    z = np.exp(1j * angle)  # (n,)
    acc = np.full(angle.shape, coefs[-1], dtype=complex)
    for c in coefs[-2:0:-1]:
        acc *= z
        acc += c
    return (acc * z).imag


def _filter_bump(x: np.ndarray, sr: int, centre: float, octaves: float, gain_db: float) -> np.ndarray:
    """`x` through a smooth peak (or notch) filter of `gain_db` at `centre`."""
    f = np.fft.rfftfreq(len(x), 1.0 / sr)
    shape = gain_db * np.exp(-0.5 * (np.log2(np.maximum(f, 20.0) / centre) / octaves) ** 2)
    return np.fft.irfft(np.fft.rfft(x) * 10.0 ** (shape / 20.0), n=len(x))


def _smooth(gate: np.ndarray, sr: int, seconds: float) -> np.ndarray:
    """A 0/1 gate with its edges rounded by a Hann window, so switching does not click."""
    window = np.hanning(max(3, round(seconds * sr)))
    return np.convolve(gate.astype(float), window / window.sum(), mode="same")


def _lerp(strong: float, weak: float, difficulty: float) -> float:
    """Linear from `strong` (difficulty 0) to `weak` (difficulty 1); for quantities already in dB."""
    return strong + (weak - strong) * difficulty


def _geo(strong: float, weak: float, difficulty: float) -> float:
    """Geometric from `strong` to `weak`, i.e. linear in dB; for amplitudes and ratios."""
    return strong * (weak / strong) ** difficulty


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int | None = None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size))


# ---------------------------------------------------------------- rotor: a rotating machine


def _rotor_section(rng: np.random.Generator) -> dict:
    """Speed band, harmonic profile, blade/mesh orders and noise colour of one rotor section."""
    blades = int(rng.integers(5, 12))
    teeth = int(rng.integers(17, 42))
    amps = np.zeros(2 * teeth + 3)  # amplitude per shaft order
    orders = np.arange(1, 13)
    amps[orders] = orders ** -rng.uniform(0.6, 1.2) * rng.lognormal(0.0, 0.4, orders.size)
    amps[blades] += rng.uniform(0.4, 0.8)  # blade pass and its second harmonic
    amps[2 * blades] += rng.uniform(0.1, 0.3)
    mesh = np.zeros_like(amps)  # grows with load
    mesh[teeth] = rng.uniform(0.15, 0.3)
    mesh[[teeth - 1, teeth + 1]] = rng.uniform(0.04, 0.1, 2)  # sidebands at +-1 shaft order
    mesh[[teeth - 2, teeth + 2]] = rng.uniform(0.01, 0.04, 2)
    bumps = np.stack(
        [_log_uniform(rng, 150.0, 6000.0, 4), rng.uniform(0.3, 1.0, 4), rng.uniform(0, 12, 4)], 1
    )
    base = rng.uniform(20.0, 34.0)
    return {
        "vel_source": [round(base) + 2 * j for j in range(4)],
        "vel_target": [round(base * 1.4) + 2 * j for j in range(4)],  # the target domain runs faster
        "amps": amps,
        "mesh": mesh,
        "tilt": rng.uniform(-5.0, -2.0),
        "bumps": bumps,
        "noise_db": rng.uniform(-13.0, -9.0),  # noise re the tonal part
        "target_tilt": rng.uniform(2.0, 4.0),  # target background is brighter and louder
        "target_db": rng.uniform(3.0, 6.0),
    }


def _rotor(
    sp: dict, domain: str, kind: str | None, difficulty: float, rng: np.random.Generator, n: int, sr: int
) -> tuple[np.ndarray, np.ndarray, dict[str, str], dict[str, float]]:
    """(normal wave, wave with the anomaly, attributes, anomaly details) of one rotor clip."""
    vel = int(rng.choice(sp["vel_source" if domain == "source" else "vel_target"]))
    load = int(rng.integers(1, 4))
    attributes = {"vel": str(vel), "load": str(load)}
    t = np.arange(n) / sr
    f0 = vel * (1.0 + 0.004 * rng.standard_normal())
    wow_depth, wow_rate, wow_phase = (
        0.003 * rng.uniform(0.5, 1.5),
        rng.uniform(0.3, 1.5),
        rng.uniform(0, 2 * np.pi),
    )
    wow = wow_depth * np.sin(2 * np.pi * wow_rate * t + wow_phase)  # slow speed wander
    shaft = 2 * np.pi * np.cumsum(f0 * (1.0 + wow)) / sr  # (n,) shaft angle in radians
    amps = (sp["amps"] + sp["mesh"] * (0.5 + 0.5 * load)) * rng.lognormal(0.0, 0.1, sp["amps"].size)
    phases = rng.uniform(0, 2 * np.pi, amps.size)
    amps[np.arange(amps.size) * f0 * 1.01 >= 0.45 * sr] = 0.0  # nothing above Nyquist
    tonal = _harmonics(amps * np.exp(1j * phases), shaft)
    tilt = sp["tilt"] + (sp["target_tilt"] if domain == "target" else 0.0)
    noise_db = sp["noise_db"] + (sp["target_db"] if domain == "target" else 0.0) + load + rng.normal(0, 1)
    noise = _shaped(rng.standard_normal(n), sr, tilt, sp["bumps"]) * _rms(tonal) * _db(noise_db)
    normal = tonal + noise
    if kind is None:
        return normal, normal, attributes, {}

    jitter = rng.uniform(-3.0, 3.0)  # anomalies of one kind vary in strength, too
    rms = _rms(normal)
    details: dict[str, float] = {}
    if kind == "bearing":  # a defect tone at a non-integer shaft order, with its second harmonic
        order = rng.uniform(6.2, 19.8)  # below 1.1 kHz even at the fastest speed, so no aliasing at 8 kHz
        if abs(order % 1.0 - 0.5) > 0.3:  # keep it at least 0.2 orders away from the shaft harmonics
            order += 0.5 - order % 1.0
        level_db = _lerp(-6.0, -36.0, difficulty) + jitter
        tone = np.sin(order * shaft + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(2 * order * shaft)
        anomalous = normal + rms * _db(level_db) * math.sqrt(2) * tone
        details = {"freq": order * f0, "level_db": level_db}
    elif kind == "imbalance":  # vibration at the shaft rate modulates the whole sound and raises order 1
        depth = min(0.9, _geo(0.8, 0.15, difficulty) * _db(jitter))
        wobble = depth * np.cos(shaft + rng.uniform(0, 2 * np.pi))
        anomalous = normal * (1.0 + wobble) + depth * amps[1] * np.sin(shaft + phases[1])
        details = {"depth": depth}
    elif kind == "clicks":  # impacts of a loose part at random moments
        rate = rng.uniform(3.0, 8.0)
        times = np.sort(rng.uniform(0, n / sr, max(1, rng.poisson(rate * n / sr))))
        freq = rng.uniform(2000.0, min(5000.0, 0.4 * sr))
        kernel = _ringing(
            sr, np.array([freq, 1.6 * freq]), np.array([2e-3, 1e-3]), np.array([1.0, 0.5]), 0.02
        )
        peak = _geo(2.0, 0.2, difficulty) * _db(jitter) * float(np.abs(normal).max())
        anomalous = normal + _place(n, sr, times, peak * rng.uniform(0.6, 1.0, times.size), kernel)
        details = {"freq": freq, "count": float(times.size)}
    elif kind == "tilt":
        anomalous, details = _tilt(normal, sr, difficulty, jitter, rng)
    elif kind == "rub":  # band noise bursts once per revolution
        centre = rng.uniform(1000.0, min(4000.0, 0.35 * sr))
        duty = rng.uniform(0.15, 0.35)
        gate = _smooth(np.mod(shaft / (2 * np.pi) + rng.uniform(0, 1), 1.0) < duty, sr, 0.004)
        burst = _band_noise(rng.standard_normal(n), sr, centre, 0.2) * gate / math.sqrt(duty)
        level_db = _lerp(-4.0, -32.0, difficulty) + jitter
        anomalous = normal + rms * _db(level_db) * burst
        details = {"freq": centre, "level_db": level_db}
    else:
        raise AsdError(f"unknown rotor anomaly kind {kind!r}; choose from {ANOMALY_KINDS['rotor']}")
    return normal, anomalous, attributes, details


def _tilt(
    x: np.ndarray, sr: int, difficulty: float, jitter: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """A changed transfer path: a band boosted or cut by a few dB (a loose cover, a worn mount)."""
    centre = _log_uniform(rng, 300.0, min(5000.0, 0.35 * sr))
    gain_db = _geo(14.0, 2.5, difficulty) * _db(jitter / 2) * rng.choice([-1.0, 1.0])
    shaped = _filter_bump(x, sr, centre, rng.uniform(0.4, 0.8), gain_db)
    return shaped, {"freq": float(centre), "gain_db": float(gain_db)}


# ---------------------------------------------------------------- valve: an impulsive machine


def _valve_section(rng: np.random.Generator) -> dict:
    """Resonances, duty cycle, rate bands and flow band of one valve section."""
    base = int(rng.integers(2, 4))
    return {
        "rate_source": [base, base + 1, base + 2],
        "rate_target": [base + 4, base + 5, base + 6],  # the target domain cycles faster
        "noise_source": ["A", "B"],
        "noise_target": ["C", "D"],
        "open_freqs": np.sort(_log_uniform(rng, 500.0, 3000.0, 3)),
        "open_taus": rng.uniform(0.004, 0.025, 3),
        "open_amps": rng.uniform(0.3, 1.0, 3),
        "close_freqs": np.sort(_log_uniform(rng, 800.0, 4500.0, 3)),
        "close_taus": rng.uniform(0.002, 0.012, 3),
        "close_amps": rng.uniform(0.3, 1.0, 3),
        "close_gain": rng.uniform(0.7, 1.4),
        "duty": rng.uniform(0.3, 0.6),
        "flow_freq": rng.uniform(800.0, 3000.0),
        "flow_db": rng.uniform(-36.0, -30.0),
        "target_flow_db": rng.uniform(6.0, 9.0),  # the target domain runs at a higher supply pressure
        "target_flow_factor": rng.uniform(1.3, 1.6),
        "bumps": np.stack(
            [_log_uniform(rng, 150.0, 6000.0, 3), rng.uniform(0.3, 1.0, 3), rng.uniform(0, 10, 3)], 1
        ),
    }


def _valve_events(vp: dict, n: int, sr: int) -> np.ndarray:
    """The sound of opening/closing impulses and flow noise while open, from drawn clip parameters."""
    order = np.argsort(vp["opens"])  # irregular timing may reorder cycles
    opens, closes = vp["opens"][order], vp["closes"][order]
    open_gain, close_gain = vp["open_gain"][order], vp["close_gain"][order]
    kernels = []
    for part, length in (("open", 0.12), ("close", 0.06)):
        freqs = np.minimum(vp[f"{part}_freqs"] * vp["freq_factor"], 0.45 * sr)
        kernel = _ringing(sr, freqs, vp[f"{part}_taus"], vp[f"{part}_amps"], length)
        kernels.append(kernel / np.abs(kernel).max())
    k_open, k_close = kernels
    x = _place(n, sr, opens, open_gain, k_open) + _place(n, sr, closes, close_gain, k_close)
    t = np.arange(n) / sr
    last = np.maximum(np.searchsorted(opens, t, side="right") - 1, 0)  # (n,) index of the latest opening
    is_open = (t >= opens[last]) & (t < closes[last]) & (open_gain[last] > 0)
    return x + _smooth(is_open, sr, 0.01) * vp["flow"]


def _valve(
    sp: dict, domain: str, kind: str | None, difficulty: float, rng: np.random.Generator, n: int, sr: int
) -> tuple[np.ndarray, np.ndarray, dict[str, str], dict[str, float]]:
    """(normal wave, wave with the anomaly, attributes, anomaly details) of one valve clip."""
    rate = int(rng.choice(sp[f"rate_{domain}"]))
    noise_type = str(rng.choice(sp[f"noise_{domain}"]))
    attributes = {"rate": str(rate), "noise": noise_type}
    period = 1.0 / rate * (1.0 + 0.01 * rng.standard_normal())
    cycles = math.ceil(n / sr / period) + 2
    opens = rng.uniform(-period, 0.0) + period * np.arange(cycles) + rng.normal(0, 0.02 * period, cycles)
    duty = sp["duty"] * (1.0 + 0.04 * rng.standard_normal(cycles))
    target = domain == "target"
    # The target's higher supply pressure also fluctuates more, beyond what its few training clips show.
    spread = 3.0 if target else 1.0
    flow_shift = sp["target_flow_factor"] if target else 1.0
    flow_freq = sp["flow_freq"] * flow_shift * np.exp(0.05 * spread * rng.normal())
    flow_db = sp["flow_db"] + (sp["target_flow_db"] if target else 0.0) + 2.0 * spread * rng.normal()
    vp = {
        **sp,
        "opens": opens,
        "closes": opens + duty * period,
        "open_gain": rng.lognormal(0.0, 0.1, cycles),
        "close_gain": sp["close_gain"] * rng.lognormal(0.0, 0.1, cycles),
        "freq_factor": 1.0 + 0.02 * rng.standard_normal(),
        "open_amps": sp["open_amps"] * rng.lognormal(0.0, 0.25, 3),
        "close_amps": sp["close_amps"] * rng.lognormal(0.0, 0.25, 3),
        "open_taus": sp["open_taus"] * rng.lognormal(0.0, 0.15, 3),
        "close_taus": sp["close_taus"] * rng.lognormal(0.0, 0.15, 3),
        "flow": _band_noise(rng.standard_normal(n), sr, flow_freq, 0.5) * _db(flow_db),
    }
    tilt, level = _VALVE_NOISE[noise_type]
    background = _shaped(rng.standard_normal(n), sr, tilt, sp["bumps"]) * _db(level + rng.normal(0, 1.5))
    normal = _valve_events(vp, n, sr) + background
    if kind is None:
        return normal, normal, attributes, {}

    jitter = rng.uniform(-3.0, 3.0)
    details: dict[str, float] = {}
    if kind == "missing":  # a sticking valve: some cycles skip, the rest come irregularly
        skip = rng.uniform(size=cycles) < _lerp(0.7, 0.1, difficulty)
        inside = np.flatnonzero((vp["opens"] >= 0.0) & (vp["opens"] < n / sr))
        if inside.size:  # at least one cycle that the clip would have shown is gone
            skip[rng.choice(inside)] = True
        late = rng.normal(0, _geo(0.25, 0.03, difficulty) * period, cycles)
        anomalous_vp = {**vp, "opens": vp["opens"] + late, "closes": vp["closes"] + late}
        anomalous_vp["open_gain"] = np.where(skip, 0.0, vp["open_gain"])
        anomalous_vp["close_gain"] = np.where(skip, 0.0, vp["close_gain"])
        anomalous = _valve_events(anomalous_vp, n, sr) + background
        details = {"skipped": float(skip.sum())}
    elif kind == "leak":  # hiss through a seat that no longer closes
        centre = rng.uniform(2500.0, min(6000.0, 0.4 * sr))
        level_db = _lerp(-28.0, -60.0, difficulty) + jitter
        anomalous = normal + _band_noise(rng.standard_normal(n), sr, centre, 0.4) * _db(level_db)
        details = {"freq": centre, "level_db": level_db}
    elif kind == "resonance":  # a cracked or loosened part: one mode moves and rings longer
        which = "open" if rng.uniform() < 0.5 else "close"
        mode = int(rng.integers(3))
        shift = _geo(0.4, 0.04, difficulty) * _db(jitter) * rng.choice([-1.0, 1.0])
        freqs, taus = vp[f"{which}_freqs"].copy(), vp[f"{which}_taus"].copy()
        freqs[mode] *= 1.0 + shift
        taus[mode] *= 1.5
        anomalous_vp = {**vp, f"{which}_freqs": freqs, f"{which}_taus": taus}
        anomalous = _valve_events(anomalous_vp, n, sr) + background
        details = {"freq": float(freqs[mode] * vp["freq_factor"]), "shift": shift}
    elif kind == "rattle":  # the closing member bounces on its seat
        delay = rng.uniform(0.008, 0.025)
        freq = rng.uniform(3000.0, min(5500.0, 0.4 * sr))
        kernel = _ringing(sr, np.array([freq]), np.array([0.003]), np.array([1.0]), 0.03)
        gain = _geo(0.8, 0.08, difficulty) * _db(jitter) * vp["close_gain"]
        anomalous = normal + _place(n, sr, vp["closes"] + delay, gain, kernel)
        details = {"freq": freq, "delay": delay}
    elif kind == "tilt":
        anomalous, details = _tilt(normal, sr, difficulty, jitter, rng)
    else:
        raise AsdError(f"unknown valve anomaly kind {kind!r}; choose from {ANOMALY_KINDS['valve']}")
    return normal, anomalous, attributes, details


def _factory_events(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Other machines nearby, re the machine's RMS: distant knocks and passing hums, about one per 2 s."""
    out = np.zeros(n)
    t = np.arange(n) / sr
    for _ in range(rng.poisson(0.5 * n / sr)):
        start = rng.uniform(0.0, n / sr)
        if rng.uniform() < 0.5:
            freq = rng.uniform(150.0, 900.0)
            knock = _ringing(
                sr, np.array([freq, 1.7 * freq]), np.array([0.03, 0.015]), np.array([1, 0.5]), 0.2
            )
            out += _place(n, sr, np.array([start]), np.array([_db(rng.uniform(0.0, 8.0))]), knock)
        else:
            length, freq = rng.uniform(0.2, 0.8), rng.uniform(100.0, 2000.0)
            window = np.sin(np.pi * np.clip((t - start) / length, 0.0, 1.0)) ** 2
            out += _db(rng.uniform(-20.0, -8.0)) * math.sqrt(2) * window * np.sin(2 * np.pi * freq * t)
    return out


_SECTION_MODELS = {"rotor": _rotor_section, "valve": _valve_section}
_CLIP_MODELS = {"rotor": _rotor, "valve": _valve}


def section_params(cfg: SyntheticConfig, machine: str, section: int) -> dict:
    """The fixed parameters of one (machine, section), drawn from the seed alone."""
    return _SECTION_MODELS[machine](_section_rng(cfg.seed, machine, section))


def render_clip(
    cfg: SyntheticConfig,
    machine: str,
    section: int,
    domain: str = "source",
    anomaly: str | None = None,
    rng: np.random.Generator | None = None,
    params: dict | None = None,
) -> SyntheticClip:
    """One clip in memory; the same `rng` state gives the same normal sound with or without `anomaly`.

    Args:
        anomaly: None for a normal clip, else one of `ANOMALY_KINDS[machine]`.
        rng: the clip's generator; a fresh `clip_rng(cfg.seed, ..., index=0)` when None.
        params: `section_params(cfg, machine, section)`, passed in to skip drawing it again.
    """
    if machine not in cfg.machines:
        raise AsdError(f"machine {machine!r} is not in this config's machines {list(cfg.machines)}")
    if not 0 <= section < cfg.sections:
        raise AsdError(f"section {section} is outside this config's sections 0..{cfg.sections - 1}")
    if domain not in _DOMAINS:
        raise AsdError(f"domain {domain!r}: choose from {_DOMAINS}")
    if anomaly is not None and anomaly not in ANOMALY_KINDS[machine]:
        raise AsdError(f"unknown {machine} anomaly kind {anomaly!r}; choose from {ANOMALY_KINDS[machine]}")
    if rng is None:
        label = "normal" if anomaly is None else "anomaly"
        rng = clip_rng(cfg.seed, machine, section, domain, "test", label, 0)
    sp = params if params is not None else section_params(cfg, machine, section)
    n, sr = cfg.samples(), cfg.sample_rate
    # Everything not about the machine is drawn first, so it is the same with or without an anomaly.
    level_db = rng.uniform(-2.0, 2.0)
    tilt = rng.normal(0.0, 0.4)
    bumps = np.stack(
        [_log_uniform(rng, 100.0, 6000.0, 3), rng.uniform(0.5, 1.5, 3), rng.normal(0, 1.5, 3)], 1
    )
    events = _factory_events(rng, n, sr)
    normal, wave, attributes, details = _CLIP_MODELS[machine](sp, domain, anomaly, cfg.difficulty, rng, n, sr)
    events *= _rms(normal)
    normal, wave = normal + events, wave + events
    # Gain from the normal part only, so an anomaly never changes how loud the machine itself is.
    gain = _PEAK * _db(level_db) / float(np.abs(normal).max())
    # The microphone's place and mounting colour each clip by a few dB.
    spec = np.fft.rfft(wave) * 10.0 ** (_envelope_db(np.fft.rfftfreq(n, 1.0 / sr), tilt, bumps) / 20.0)
    wave = np.fft.irfft(spec, n=n) * gain
    peak = float(np.abs(wave).max())
    if peak > _MAX_PEAK:
        wave *= _MAX_PEAK / peak
    return SyntheticClip(
        wave.astype(np.float32), attributes, anomaly, {k: float(v) for k, v in details.items()}
    )


# ---------------------------------------------------------------- writing datasets


def _groups(cfg: SyntheticConfig) -> list[tuple[str, str, str, int]]:
    """(domain, split, label, count) for every clip group of one section, in writing order."""
    out = [("source", "train", "normal", cfg.source_train), ("target", "train", "normal", cfg.target_train)]
    out += [(d, "test", lab, cfg.test_per_class) for d in _DOMAINS for lab in _LABELS]
    return [g for g in out if g[3] > 0]


def _manifest(cfg: SyntheticConfig) -> dict:
    per_section = sum(g[3] for g in _groups(cfg))
    counts = {
        f"{split}/{domain}/{label}": count * cfg.sections for domain, split, label, count in _groups(cfg)
    }
    return {
        "generator": "asd.data.synthetic",
        "version": VERSION,
        "key": cfg.key(),
        "config": {**asdict(cfg), "machines": list(cfg.machines)},
        "files": per_section * cfg.sections * len(cfg.machines),
        "counts_per_machine": counts,
    }


def read_manifest(root: str | Path) -> dict | None:
    """The `synthetic.json` of a dataset folder, or None when there is none or it is unreadable."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(root: Path, cfg: SyntheticConfig) -> bool:
    """True when `root` holds a complete dataset of exactly this config."""
    expected = _manifest(cfg)
    if read_manifest(root) != expected:
        return False
    wavs = sum(1 for m in cfg.machines for s in _SPLITS for _ in (root / m / s).glob("*.wav"))
    return wavs == expected["files"]


def _check_writable(root: Path) -> None:
    """Refuse a path that is a file, or a non-empty folder that is not a synthetic dataset."""
    if root.exists() and not root.is_dir():
        raise AsdError(
            f"{root} is a file, not a folder; choose another output folder for the synthetic dataset"
        )
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise AsdError(
            f"{root} is not empty and is not a synthetic dataset (no {MANIFEST}); refusing to overwrite it - "
            "choose an empty or new folder"
        )


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def generate(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write the dataset into `out_dir` (missing or empty); the manifest goes last. Returns the root."""
    root = Path(out_dir)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise AsdError(
            f"{root} exists and is not an empty folder; generate() writes only into a new or empty folder - "
            "choose another one, or call ensure_synthetic() to replace an outdated synthetic dataset"
        )
    start = time.perf_counter()
    kinds_rows = [["file_name", "label", "kind"]]
    for machine in cfg.machines:
        for split in _SPLITS:
            (root / machine / split).mkdir(parents=True, exist_ok=True)
        kinds = ANOMALY_KINDS[machine]
        for section in range(cfg.sections):
            sp = section_params(cfg, machine, section)
            rows = []
            for domain, split, label, count in _groups(cfg):
                for index in range(count):
                    rng = clip_rng(cfg.seed, machine, section, domain, split, label, index)
                    # Kinds cycle over the index so every kind appears; the section offset varies the order.
                    kind = kinds[(index + section) % len(kinds)] if label == "anomaly" else None
                    clip = render_clip(cfg, machine, section, domain, kind, rng, sp)
                    tail = "_".join(f"{k}_{v}" for k, v in clip.attributes.items())
                    name = f"section_{section:02d}_{domain}_{split}_{label}_{index:04d}_{tail}.wav"
                    sf.write(root / machine / split / name, clip.wave, cfg.sample_rate, subtype="PCM_16")
                    cells = [f"{machine}/{split}/{name}"]
                    for k, v in clip.attributes.items():
                        cells += [k, str(v)]
                    rows.append(cells)
                    if split == "test":
                        kinds_rows.append([f"{machine}/{split}/{name}", label, kind or "none"])
            n_attr = max(len(r) for r in rows) // 2
            header = ["file_name"] + [f"d{i}{k}" for i in range(1, n_attr + 1) for k in "pv"]
            (root / machine / f"attributes_{section:02d}.csv").write_text(_csv([header, *sorted(rows)]))
    (root / KINDS_FILE).write_text(_csv(kinds_rows))
    manifest = _manifest(cfg)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d synthetic clips to %s in %.1f s", manifest["files"], root, time.perf_counter() - start)
    return root


def ensure_synthetic(out_dir: str | Path | None = None, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """The dataset root for `cfg`, generated only when missing or outdated.

    The default folder is `cache_root()/synthetic/<cfg.key()>`. A new dataset is written
    into a hidden sibling folder and renamed into place, so an interrupted generation
    never looks finished. An outdated synthetic dataset at `out_dir` is replaced; any
    other non-empty folder is refused.
    """
    root = Path(out_dir) if out_dir is not None else cache_root() / "synthetic" / cfg.key()
    root = Path(os.path.abspath(root))
    if _is_current(root, cfg):
        log.info("reusing synthetic dataset %s (key %s)", root, cfg.key())
        return root
    _check_writable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        generate(tmp, cfg)
        if _is_current(root, cfg):  # another process (a DDP rank) finished first: keep its copy
            log.info("another process wrote %s meanwhile; using its copy", root)
            return root
        if root.exists():  # an empty folder or an outdated synthetic dataset: move it aside, then drop it
            old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(root, old)
            shutil.rmtree(old)
        try:
            os.rename(tmp, root)
        except OSError as e:
            if not _is_current(root, cfg):
                raise AsdError(
                    f"cannot move the new synthetic dataset into {root} ({e}); remove it and retry"
                ) from e
            log.info("another process wrote %s meanwhile; using its copy", root)
            return root
        log.info("synthetic dataset ready at %s (key %s)", root, cfg.key())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
