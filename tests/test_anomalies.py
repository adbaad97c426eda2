"""Pseudo-anomalies: every kind changes the clip where its mask says and only there; config, dataset, plot."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage, signal
from torch.utils.data import DataLoader

from asd.anomalies import (
    DEFAULT_KINDS,
    KINDS,
    STEADY_KINDS,
    TF_KINDS,
    AnomalyConfig,
    Injection,
    PseudoAnomalies,
    PseudoAnomalyDataset,
    anomaly_config,
    perlin_noise,
    plot_injections,
)
from asd.data.datamodule import ClipDataset, WaveStore
from asd.data.table import Clip, ClipTable
from asd.errors import AsdError

SR, N_FFT, HOP = 16000, 512, 128
TIME_KINDS = [k for k in KINDS if k not in TF_KINDS and k not in STEADY_KINDS]
SEEDS = range(6)


def machine_clip(f0: float = 120.0, seed: int = 0, n: int = SR) -> np.ndarray:
    """A never-silent machine-like clip: a hum with harmonics over broadband noise."""
    t = np.arange(n) / SR
    hum = sum(0.1 / k * np.sin(2 * np.pi * k * f0 * t + k) for k in range(1, 6))
    return (hum + 0.02 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def spectrogram(x: np.ndarray) -> np.ndarray:
    """scipy's STFT with the generator's parameters, independent of `asd.anomalies.stft`."""
    return signal.stft(x, fs=SR, nperseg=N_FFT, noverlap=N_FFT - HOP, boundary="zeros", padded=True)[2]


@pytest.fixture(scope="module")
def gen() -> PseudoAnomalies:
    return PseudoAnomalies(AnomalyConfig())


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return machine_clip()


# ---------------------------------------------------------------- confinement


@pytest.mark.parametrize("kind", TIME_KINDS)
def test_time_kinds_change_one_span_and_leave_every_other_sample_bit_identical(gen, clip, kind):
    other = machine_clip(f0=310.0, seed=7)
    before = clip.copy()
    for seed in SEEDS:
        inj = gen(clip, np.random.default_rng(seed), outlier=other, kind=kind)
        assert inj.kind == kind
        assert inj.wave.dtype == np.float32 and inj.wave.shape == clip.shape and np.isfinite(inj.wave).all()
        assert inj.mask.dtype == bool and inj.mask.shape == clip.shape
        span = np.flatnonzero(inj.mask)
        assert span[-1] - span[0] + 1 == len(span)  # one contiguous span
        assert 0.1 * len(clip) - 1 <= len(span) <= 0.6 * len(clip) + 1  # `span` = (0.1, 0.6) of the clip
        np.testing.assert_array_equal(inj.wave[~inj.mask], clip[~inj.mask])
        # clearly audible inside: the change is at least 5% of the clip's RMS over the span
        assert rms(inj.wave[inj.mask] - clip[inj.mask]) > 0.05 * rms(clip)
    np.testing.assert_array_equal(clip, before)  # the input is never edited in place


@pytest.mark.parametrize("kind", TF_KINDS)
def test_tf_kinds_change_the_spectrogram_inside_their_mask_only(gen, clip, kind):
    frames = 1 + math.ceil(len(clip) / HOP)
    for seed in SEEDS:
        inj = gen(clip, np.random.default_rng(seed), kind=kind)
        assert inj.kind == kind and inj.wave.dtype == np.float32 and inj.wave.shape == clip.shape
        assert inj.mask.dtype == bool and inj.mask.shape == (N_FFT // 2 + 1, frames)
        assert inj.mask.any() and not inj.mask.all()
        energy = np.abs(spectrogram(inj.wave.astype(np.float64) - clip)) ** 2
        # leakage allowance: +-2 bins (Hann main lobe) and +-3 frames (frames overlapping a changed one)
        near = ndimage.binary_dilation(inj.mask, np.ones((5, 7), dtype=bool))
        inside = energy[inj.mask].sum()
        assert inside > 0.1 * (np.abs(spectrogram(clip)) ** 2)[inj.mask].sum()  # a real change
        assert energy[~near].sum() < 0.05 * inside
        # samples no masked frame's window reaches are bit-identical
        touched = np.zeros(len(clip), dtype=bool)
        for j in np.flatnonzero(inj.mask.any(axis=0)):
            touched[max(0, j * HOP - N_FFT) : j * HOP + N_FFT] = True  # frame j +- one window length
        np.testing.assert_array_equal(inj.wave[~touched], clip[~touched])
        if kind == "tf_span":
            cols = np.flatnonzero(inj.mask.any(axis=0))
            assert inj.mask[:, cols].all() and cols[-1] - cols[0] + 1 == len(cols)  # all bins, one span
            assert (~touched).sum() > 0.3 * len(clip)  # at most 60% of frames: much stays untouched
        if kind == "tf_band":
            rows = np.flatnonzero(inj.mask.any(axis=1))
            assert inj.mask[rows].all() and rows[-1] - rows[0] + 1 == len(rows)  # all frames, one band


@pytest.mark.parametrize("kind", STEADY_KINDS)
def test_steady_kinds_change_the_whole_clip_the_same_way_throughout(gen, clip, kind):
    noise = np.random.default_rng(5).standard_normal(4 * SR).astype(np.float32)  # 4 s of white noise
    for source in (clip, noise):
        frames = source[: len(source) // 1600 * 1600].reshape(-1, 1600)  # 100 ms frames
        for seed in SEEDS:
            inj = gen(source, np.random.default_rng(seed), kind=kind)
            assert inj.kind == kind and inj.wave.dtype == np.float32 and inj.wave.shape == source.shape
            assert inj.mask.dtype == bool and inj.mask.shape == source.shape and inj.mask.all()
            change = (inj.wave.astype(np.float64) - source)[: frames.size].reshape(frames.shape)
            assert rms(change) > 0.02 * rms(source)  # a real change, if a small one
            if kind == "hum":  # an added steady component: as loud in every 100 ms (fades aside)
                per_frame = np.sqrt(np.mean(change[1:-1] ** 2, axis=1))
                assert per_frame.std() < 0.05 * per_frame.mean()
            else:  # a fixed filter: each frame's change is that frame passed through it, so the change's
                # share of each noise frame's energy is the same throughout
                share = np.sum(change**2, axis=1) / np.sum(frames.astype(np.float64) ** 2, axis=1)
                if source is noise:
                    assert share[1:-1].std() < 0.25 * share[1:-1].mean()
    # eq is linear: twice the clip, twice the result (hum is added at the clip's level, so it scales too)
    for kind_ in STEADY_KINDS:
        one = gen(clip, np.random.default_rng(2), kind=kind_).wave.astype(np.float64)
        two = gen(2 * clip, np.random.default_rng(2), kind=kind_).wave.astype(np.float64)
        np.testing.assert_allclose(two, 2 * one, atol=1e-5)


def test_eq_never_carries_the_clips_end_into_its_start_and_always_changes_the_clip(gen):
    loud_end = np.zeros(SR, dtype=np.float32)
    loud_end[3 * SR // 4 :] = machine_clip(n=SR // 4)  # silent for 0.75 s, then a machine
    tone = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR).astype(np.float32)  # energy in one bin only
    silent = np.zeros(SR, dtype=np.float32)
    for seed in range(20):
        out = gen(loud_end, np.random.default_rng(seed), kind="eq").wave
        assert np.abs(out[: SR // 20]).max() < 1e-3 * np.abs(loud_end).max()  # the first 50 ms stay silent
        changed = gen(tone, np.random.default_rng(seed), kind="eq").wave.astype(np.float64) - tone
        assert rms(changed) >= 0.05 * rms(tone)  # bands land where the clip has energy, and do not cancel
        quiet = gen(silent, np.random.default_rng(seed), kind="eq").wave
        assert rms(quiet) > 0.1 * AnomalyConfig().min_rms  # a silent clip changes too
    low = PseudoAnomalies(AnomalyConfig(sample_rate=200, n_fft=16, hop=8))  # low rates draw inside their band
    for kind in STEADY_KINDS:
        assert np.isfinite(low(machine_clip(n=400), np.random.default_rng(0), kind=kind).wave).all()


def test_eq_bands_and_hum_levels_follow_their_ranges(clip):
    noise = np.random.default_rng(5).standard_normal(4 * SR)
    gen = PseudoAnomalies(AnomalyConfig(eq_db=(6.0, 6.0), eq_octaves=(0.5, 0.5)))
    out = gen(noise.astype(np.float32), np.random.default_rng(1), kind="eq").wave.astype(np.float64)
    # the spectrum's ratio, smoothed over 1/6 octave, stays within the bands' reach: 1-3 bands of 6 dB
    freqs = np.fft.rfftfreq(len(noise), 1 / SR)
    ratio_db = 10 * np.log10(np.abs(np.fft.rfft(out)) ** 2 / np.abs(np.fft.rfft(noise)) ** 2)
    smooth = [
        ratio_db[(freqs > f / 2 ** (1 / 12)) & (freqs < f * 2 ** (1 / 12))].mean()
        for f in 2 ** np.arange(7, 12.8, 0.1)
    ]
    assert 5.0 < np.abs(smooth).max() < 18.5
    assert np.ptp(smooth) > 3.0  # bands, not one gain over every frequency
    hum = PseudoAnomalies(AnomalyConfig(hum_db=(-20.0, -20.0), fade_ms=0.0))
    inj = hum(clip, np.random.default_rng(4), kind="hum")
    assert rms(inj.wave.astype(np.float64) - clip) == pytest.approx(0.1 * rms(clip), rel=1e-3)  # -20 dB


def test_added_components_follow_level_db_relative_to_the_clip_and_a_floor_for_silence(clip):
    cfg = AnomalyConfig(level_db=(0.0, 0.0), fade_ms=0.0)
    gen = PseudoAnomalies(cfg)
    for kind in ("tone", "harmonics", "band_noise"):
        inj = gen(clip, np.random.default_rng(3), kind=kind)
        added = inj.wave[inj.mask].astype(np.float64) - clip[inj.mask]
        assert rms(added) == pytest.approx(rms(clip), rel=1e-3)  # 0 dB: the clip's own RMS
    silent = np.zeros(SR, dtype=np.float32)
    inj = gen(silent, np.random.default_rng(3), kind="tone")
    assert rms(inj.wave[inj.mask]) == pytest.approx(cfg.min_rms, rel=1e-3)
    assert not inj.wave[~inj.mask].any()


def test_gain_drift_peaks_at_the_drawn_gain_and_pitch_drift_keeps_span_edges(clip):
    gen = PseudoAnomalies(AnomalyConfig(gain_db=(6.0, 6.0)))
    inj = gen(clip, np.random.default_rng(0), kind="gain_drift")
    ratio_db = 20 * np.log10(np.abs(inj.wave[inj.mask].astype(np.float64)) / np.abs(clip[inj.mask]))
    assert np.abs(ratio_db).max() == pytest.approx(6.0, abs=0.01)
    inj = gen(clip, np.random.default_rng(0), kind="pitch_drift")
    span = np.flatnonzero(inj.mask)
    assert inj.wave[span[0]] == clip[span[0]] and inj.wave[span[-1]] == clip[span[-1]]


def test_outlier_substitution_puts_the_other_clip_in_the_span(clip):
    other = machine_clip(f0=310.0, seed=7)
    gen = PseudoAnomalies(AnomalyConfig(p_substitute=1.0, fade_ms=0.0))
    inj = gen(clip, np.random.default_rng(1), outlier=other, kind="outlier")
    got, want = inj.wave[inj.mask].astype(np.float64), other[inj.mask].astype(np.float64)
    assert np.corrcoef(got, want)[0, 1] > 0.999
    assert rms(got) == pytest.approx(rms(clip[inj.mask]), rel=1e-3)  # at the span's own loudness
    short = gen(clip, np.random.default_rng(1), outlier=other[:1000], kind="outlier")  # repeated to fit
    assert short.wave.shape == clip.shape


def test_perlin_noise_is_smooth_seeded_and_zero_on_the_lattice():
    a = perlin_noise((64, 96), (4, 6), np.random.default_rng(0), octaves=1)
    assert a.shape == (64, 96) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, perlin_noise((64, 96), (4, 6), np.random.default_rng(0), octaves=1))
    np.testing.assert_allclose(a[::16, ::16], 0.0, atol=1e-12)  # gradient noise vanishes at lattice points
    assert np.abs(np.diff(a, axis=1)).max() < 0.2 < a.max() - a.min()  # smooth, yet varied


# ---------------------------------------------------------------- drawing kinds


def test_p_none_one_always_returns_the_clip_unchanged(clip):
    gen = PseudoAnomalies(AnomalyConfig(p_none=1.0))
    for seed in SEEDS:
        inj = gen(clip, np.random.default_rng(seed), outlier=clip)
        assert inj.kind == "none" and inj.mask.shape == clip.shape and not inj.mask.any()
        np.testing.assert_array_equal(inj.wave, clip)


def test_kinds_are_drawn_only_from_the_enabled_ones(clip):
    def drawn(cfg: AnomalyConfig, outlier: np.ndarray | None) -> set[str]:
        gen = PseudoAnomalies(cfg)
        return {gen.draw_kind(np.random.default_rng(s), outlier is not None) for s in range(200)}

    assert drawn(AnomalyConfig(kinds=("tone",)), None) == {"tone"}
    assert drawn(AnomalyConfig(kinds=("tone", "tf_band")), None) == {"tone", "tf_band"}
    assert drawn(AnomalyConfig(), clip) == set(DEFAULT_KINDS) == set(KINDS) - set(STEADY_KINDS)
    assert drawn(AnomalyConfig(), None) == set(DEFAULT_KINDS) - {
        "outlier"
    }  # no outlier wave, no outlier kind
    assert drawn(AnomalyConfig(kinds=KINDS), clip) == set(KINDS)  # the steady kinds when asked for
    assert drawn(AnomalyConfig(kinds=("tone",), p_none=0.5), None) == {"tone", "none"}
    gen = PseudoAnomalies(AnomalyConfig(kinds=("harmonics",)))
    assert all(gen(clip, np.random.default_rng(s)).kind == "harmonics" for s in SEEDS)


def test_same_seed_same_injection_other_seed_another(gen, clip):
    other = machine_clip(f0=310.0, seed=7)
    for seed in SEEDS:
        a = gen(clip, np.random.default_rng(seed), outlier=other)
        b = gen(clip, np.random.default_rng(seed), outlier=other)
        c = gen(clip, np.random.default_rng(seed + 100), outlier=other)
        assert a.kind == b.kind
        np.testing.assert_array_equal(a.wave, b.wave)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert not np.array_equal(a.wave, c.wave)


def test_bad_calls_raise_clear_errors(gen, clip):
    rng = np.random.default_rng(0)
    with pytest.raises(AsdError, match="outlier="):
        gen(clip, rng, kind="outlier")
    with pytest.raises(AsdError, match="needs an outlier clip"):
        PseudoAnomalies(AnomalyConfig(kinds=("outlier",)))(clip, rng)
    with pytest.raises(AsdError, match="unknown pseudo-anomaly kind 'click'"):
        gen(clip, rng, kind="click")
    with pytest.raises(AsdError, match="`wave`.*1-D"):
        gen(np.stack([clip, clip]), rng)
    with pytest.raises(AsdError, match="`wave` has 100 samples; expected at least 512"):
        gen(clip[:100], rng)
    with pytest.raises(AsdError, match="`wave` has NaN"):
        gen(np.full(SR, np.nan, dtype=np.float32), rng)
    with pytest.raises(AsdError, match="`outlier` has NaN"):
        gen(clip, rng, outlier=np.full(10, np.inf), kind="outlier")
    with pytest.raises(AsdError, match="`rng` must be a numpy Generator"):
        gen(clip, 0)


# ---------------------------------------------------------------- config


def test_anomaly_config_from_hydra_lists_and_defaults():
    cfg = anomaly_config(OmegaConf.create({"kinds": ["tone", "tf_blobs"], "span": [0.2, 0.3], "p_none": 0.1}))
    assert cfg == AnomalyConfig(kinds=("tone", "tf_blobs"), span=(0.2, 0.3), p_none=0.1)
    assert anomaly_config(None) == AnomalyConfig()
    assert anomaly_config({"kinds": "tone"}).kinds == ("tone",)


def test_the_configs_anomaly_settings_are_the_generators_defaults():
    """conf/fusion/default.yaml lists the edit strengths so they can be set without Hydra's `+`;
    they must say what the generator does when nothing is set."""
    conf = Path(__file__).resolve().parents[1] / "conf" / "fusion" / "default.yaml"
    values = {
        k: v for k, v in OmegaConf.to_container(OmegaConf.load(conf).anomalies).items() if k != "copies"
    }
    assert {"level_db", "gain_db", "eq_db", "hum_db"} <= set(values)
    assert anomaly_config(values) == AnomalyConfig()


def test_frames_that_do_not_overlap_are_a_clear_error(clip, tmp_path):
    """Types and ranges of `fusion.anomalies` are the schema's (tests/test_config.py); this needs two keys."""
    with pytest.raises(AsdError, match=r"fusion\.anomalies\.hop=400: expected at most n_fft // 2 = 256"):
        PseudoAnomalies(anomaly_config({"hop": 400}))
    with pytest.raises(AsdError, match=r"plot_injections\.hop=300"):
        plot_injections(clip, [], tmp_path / "x.png", hop=300)


# ---------------------------------------------------------------- dataset


def clip_dataset(freqs: list[float], sections: list[int], n: int = 4096) -> ClipDataset:
    """A ClipDataset whose clip i hums at freqs[i], in global section id sections[i]."""
    clips = [Clip(path=f"c{i}.wav", machine=f"m{s // 2}", section=f"{s:02d}") for i, s in enumerate(sections)]
    waves = np.stack([machine_clip(f, seed=i, n=n) for i, f in enumerate(freqs)])  # (N, n)
    k = len(sections)
    labels = {
        "machine": torch.tensor([s // 2 for s in sections]),
        "section": torch.tensor(sections),
        "attribute": torch.arange(k),
        "domain": torch.tensor([i % 2 for i in range(k)]),
        "is_target": torch.tensor([i % 2 == 1 for i in range(k)]),
        "is_normal": torch.ones(k, dtype=torch.bool),
        "index": torch.arange(k),
    }
    return ClipDataset(ClipTable(clips), WaveStore([waves]), labels)


@pytest.fixture(scope="module")
def base() -> ClipDataset:
    return clip_dataset([100, 130, 170, 220, 290, 380], [0, 0, 1, 1, 2, 2])


def test_dataset_items_are_labelled_copies_of_their_source(base):
    ds = PseudoAnomalyDataset(base, PseudoAnomalies(AnomalyConfig(p_none=0.3)), copies=3, seed=5)
    assert len(ds) == 18
    kinds = ds.kinds()
    assert kinds.dtype == np.int64 and kinds.shape == (18,)
    for i in range(len(ds)):
        item, source = ds[i], base[i // 3]
        assert set(item) == set(source) | {"source", "kind"}
        assert item["wave"].dtype == torch.float32 and item["wave"].shape == (4096,)
        assert int(item["index"]) == i and int(item["source"]) == i // 3
        assert item["source"].dtype == item["kind"].dtype == item["index"].dtype == torch.long
        for key in ("machine", "section", "attribute", "domain", "is_target"):
            assert torch.equal(item[key], source[key])
        assert int(item["kind"]) == kinds[i]
        assert bool(item["is_normal"]) == (kinds[i] == -1)
        if kinds[i] == -1:
            assert torch.equal(item["wave"], source["wave"])
        else:
            assert KINDS[kinds[i]] in KINDS and not torch.equal(item["wave"], source["wave"])
    assert (kinds == -1).any() and (kinds >= 0).any()
    assert torch.equal(ds[-1]["wave"], ds[17]["wave"])
    with pytest.raises(IndexError):
        ds[18]


def test_dataset_is_deterministic_per_index_across_instances_and_workers(base):
    gen = PseudoAnomalies(AnomalyConfig())
    ds = PseudoAnomalyDataset(base, gen, copies=2, seed=11)
    again = pickle.loads(pickle.dumps(PseudoAnomalyDataset(base, gen, copies=2, seed=11)))  # as a worker
    other_seed = PseudoAnomalyDataset(base, gen, copies=2, seed=12)
    differs = 0
    for i in reversed(range(len(ds))):  # any order: items do not depend on which were read before
        assert all(torch.equal(ds[i][k], again[i][k]) for k in ds[i])
        differs += not torch.equal(ds[i]["wave"], other_seed[i]["wave"])
    assert differs >= len(ds) - 1
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["wave"].shape == (4, 4096) and batch["kind"].shape == (4,)


def test_outliers_come_from_another_section_of_the_pool(base):
    pool = clip_dataset([510, 640, 770, 900], [0, 1, 2, 3])
    gen = PseudoAnomalies(AnomalyConfig(kinds=("outlier",), p_substitute=1.0, fade_ms=0.0))
    ds = PseudoAnomalyDataset(base, gen, copies=4, seed=0, pool=pool)
    assert (ds.kinds() == KINDS.index("outlier")).all()
    used = set()
    for i in range(len(ds)):
        item = ds[i]
        wave = item["wave"].numpy().astype(np.float64)
        changed = wave != base.waves[i // 4]
        # the substituted span correlates with exactly one pool clip: the one drawn
        corr = [np.corrcoef(wave[changed], pool.waves[j][changed])[0, 1] for j in range(len(pool))]
        j = int(np.argmax(corr))
        assert corr[j] > 0.999
        assert int(pool.labels["section"][j]) != int(item["section"])
        used.add(j)
    assert len(used) == len(pool)  # every other-section clip gets drawn at some point


def test_dataset_without_other_sections_skips_outliers_or_refuses(base):
    one_section = clip_dataset([100, 130, 170], [4, 4, 4])
    ds = PseudoAnomalyDataset(one_section, PseudoAnomalies(AnomalyConfig()), copies=8, seed=0)
    assert KINDS.index("outlier") not in set(ds.kinds().tolist())
    with pytest.raises(AsdError, match="no clip outside section ids \\[4\\]"):
        PseudoAnomalyDataset(one_section, PseudoAnomalies(AnomalyConfig(kinds=("outlier",))), 1, 0)


# ---------------------------------------------------------------- plot


def test_plot_injections_writes_a_png(gen, clip, tmp_path):
    other = machine_clip(f0=310.0, seed=7)
    injections = [gen(clip, np.random.default_rng(0), outlier=other, kind=k) for k in ("tone", "tf_blobs")]
    injections.append(Injection(clip.copy(), "none", np.zeros(len(clip), dtype=bool)))
    out = plot_injections(clip, injections, tmp_path / "plots" / "injections.png")
    assert out == tmp_path / "plots" / "injections.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["injections.png"]  # no temporary file left behind
    with pytest.raises(AsdError, match="pass the generator's n_fft and hop"):
        plot_injections(clip, injections[1:2], tmp_path / "bad.png", n_fft=256, hop=64)
