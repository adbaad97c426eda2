"""Tests of the built-in synthetic dataset: layout, names, attribute CSVs, determinism, caching, anomalies."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asd.data import synthetic
from asd.data.synthetic import (
    ANOMALY_KINDS,
    SyntheticConfig,
    clip_rng,
    ensure_synthetic,
    generate,
    render_clip,
    section_params,
)
from asd.errors import AsdError

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(sections=2, source_train=3, target_train=2, test_per_class=2, duration=0.5)
NAME = re.compile(
    r"(?P<machine>rotor|valve)/(?P<folder>train|test)/section_(?P<section>\d\d)_(?P<domain>source|target)_"
    r"(?P<split>train|test)_(?P<label>normal|anomaly)_(?P<index>\d{4})_(?P<attrs>[^_]+_[^_]+_[^_]+_[^_]+)\.wav"
)
ATTRIBUTE_KEYS = {"rotor": ["vel", "load"], "valve": ["rate", "noise"]}


def parse(root: Path, path: Path) -> dict[str, str]:
    rel = path.relative_to(root).as_posix()
    m = NAME.fullmatch(rel)
    assert m, f"{rel} is not a DCASE 2022+ dev name"
    return m.groupdict()


def attributes_of(attrs: str) -> dict[str, str]:
    tokens = attrs.split("_")
    return dict(zip(tokens[::2], tokens[1::2], strict=True))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "ds", SMALL)


# --- layout, names, CSVs ----------------------------------------------------------------


def test_names_parse_as_dcase2022_and_counts_match(small):
    wavs = sorted(small.rglob("*.wav"))
    groups: dict[tuple, list[int]] = {}
    for p in wavs:
        g = parse(small, p)
        assert g["folder"] == g["split"]
        assert g["split"] == "test" or g["label"] == "normal"
        assert list(attributes_of(g["attrs"])) == ATTRIBUTE_KEYS[g["machine"]]
        key = (g["machine"], g["section"], g["domain"], g["split"], g["label"])
        groups.setdefault(key, []).append(int(g["index"]))
    expected = {("source", "train", "normal"): 3, ("target", "train", "normal"): 2}
    expected |= {(d, "test", lab): 2 for d in ("source", "target") for lab in ("normal", "anomaly")}
    assert len(groups) == 2 * 2 * len(expected)
    for (machine, section, *rest), indices in groups.items():
        assert sorted(indices) == list(range(expected[tuple(rest)])), (machine, section, rest)
    assert len(wavs) == 2 * 2 * 13
    assert sorted(p.name for p in small.iterdir()) == [
        "anomaly_kinds.csv",
        "rotor",
        "synthetic.json",
        "valve",
    ]


def test_wav_format_and_levels(small):
    for p in sorted(small.rglob("*.wav"))[::5]:
        info = sf.info(p)
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 8000, "PCM_16")
        wave, _ = sf.read(p)
        peak = np.abs(wave).max()
        assert 0.05 < peak <= 0.981, p.name  # audible, never clipped


def test_attribute_csvs(small):
    for machine in ("rotor", "valve"):
        for section in ("00", "01"):
            with open(small / machine / f"attributes_{section}.csv", newline="") as f:
                rows = list(csv.reader(f))
            assert rows[0] == ["file_name", "d1p", "d1v", "d2p", "d2v"]
            listed = {r[0]: r[1:] for r in rows[1:]}
            on_disk = sorted(small.glob(f"{machine}/*/section_{section}_*.wav"))
            assert sorted(listed) == sorted(p.relative_to(small).as_posix() for p in on_disk)
            for name, cells in listed.items():
                attrs = attributes_of(parse(small, small / name)["attrs"])
                assert cells == [x for kv in attrs.items() for x in kv]


def test_manifest_and_anomaly_kinds(small):
    manifest = json.loads((small / "synthetic.json").read_text())
    assert manifest["config"] == {**asdict(SMALL), "machines": ["rotor", "valve"]}
    assert manifest["key"] == SMALL.key()
    assert manifest["files"] == len(list(small.rglob("*.wav"))) == 52
    with open(small / "anomaly_kinds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tests = sorted(p.relative_to(small).as_posix() for p in small.glob("*/test/*.wav"))
    assert sorted(r["file_name"] for r in rows) == tests
    for r in rows:
        machine = r["file_name"].split("/")[0]
        assert r["kind"] in (("none",) if r["label"] == "normal" else ANOMALY_KINDS[machine])
        assert r["label"] == parse(small, small / r["file_name"])["label"]
    # Kinds cycle with the index: in each (machine, section, domain) the 2 anomalies are two different kinds.
    per_group = Counter(
        (r["file_name"].split("_test_")[0], r["kind"]) for r in rows if r["label"] == "anomaly"
    )
    assert set(per_group.values()) == {1}


def test_domain_shift_shows_in_attributes(small):
    values: dict[tuple[str, str, str], set[str]] = {}
    for p in small.rglob("*.wav"):
        g = parse(small, p)
        for k, v in attributes_of(g["attrs"]).items():
            values.setdefault((g["machine"], k, g["domain"]), set()).add(v)
    for machine, key in (("rotor", "vel"), ("valve", "rate"), ("valve", "noise")):
        assert not values[(machine, key, "source")] & values[(machine, key, "target")], (machine, key)
    assert min(map(int, values[("rotor", "vel", "target")])) > max(
        map(int, values[("rotor", "vel", "source")])
    )


def test_index_dataset_reads_it(small):
    index = pytest.importorskip("asd.data.index")
    table = index.index_dataset(small)
    assert len(table) == 52
    assert table.machines() == ["rotor", "valve"]
    assert table.sections("rotor") == ["00", "01"]
    counts = {
        (c["machine"], c["section"], c["domain"], c["split"], c["label"]): c["count"] for c in table.counts()
    }
    assert counts[("valve", "01", "source", "train", "normal")] == 3
    assert counts[("valve", "01", "target", "train", "normal")] == 2
    assert counts[("rotor", "00", "target", "test", "anomaly")] == 2
    assert all(c.layout == "dcase2022" and list(c.attributes) == ATTRIBUTE_KEYS[c.machine] for c in table)


# --- determinism -------------------------------------------------------------------------


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path, small):
    again = tree_bytes(generate(tmp_path / "again", SMALL))
    assert again == tree_bytes(small)
    other = tree_bytes(generate(tmp_path / "other", replace(SMALL, seed=1)))
    waves = {b for name, b in other.items() if name.endswith(".wav")}
    assert not waves & {b for name, b in again.items() if name.endswith(".wav")}


def test_changing_one_count_leaves_other_clips_alone(tmp_path, small):
    bigger = tree_bytes(generate(tmp_path / "bigger", replace(SMALL, source_train=4, test_per_class=3)))
    base = tree_bytes(small)
    wavs = [name for name in base if name.endswith(".wav")]
    assert all(bigger[name] == base[name] for name in wavs)
    assert len([n for n in bigger if n.endswith(".wav")]) == len(wavs) + 2 * 2 * (1 + 4)


def test_key_is_stable_across_processes_and_sensitive_to_every_field():
    code = "from asd.data.synthetic import SyntheticConfig as C; print(C(seed=3, machines=['valve']).key())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    cfg = SyntheticConfig(seed=3, machines=("valve",))
    assert out.stdout.strip() == cfg.key()
    assert re.fullmatch(r"[0-9a-f]{12}", cfg.key())
    assert SyntheticConfig(duration=2).key() == SyntheticConfig(duration=2.0).key()
    changed = dict(
        machines=("rotor",), sections=3, source_train=7, target_train=1, test_per_class=4,
        duration=1.5, sample_rate=8000, difficulty=0.25, seed=9,
    )  # fmt: skip
    keys = {replace(SyntheticConfig(), **{k: v}).key() for k, v in changed.items()}
    assert len(keys | {SyntheticConfig().key()}) == len(changed) + 1


# --- ensure_synthetic -------------------------------------------------------------------


def test_ensure_reuses_then_regenerates_on_config_change(tmp_path):
    root = tmp_path / "ds"
    cfg = replace(SMALL, sections=1)
    assert ensure_synthetic(root, cfg) == root
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_synthetic(root, cfg) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps

    ensure_synthetic(root, replace(cfg, seed=5))
    assert json.loads((root / "synthetic.json").read_text())["key"] == replace(cfg, seed=5).key()
    assert len(list(root.rglob("*.wav"))) == 26
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary or old siblings left


def test_ensure_regenerates_a_damaged_dataset(tmp_path):
    root = ensure_synthetic(tmp_path / "ds", replace(SMALL, sections=1))
    victim = next(root.glob("rotor/train/*.wav"))
    victim.unlink()
    ensure_synthetic(root, replace(SMALL, sections=1))
    assert victim.exists()


def test_ensure_default_folder_is_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_CACHE", str(tmp_path / "cache"))
    cfg = replace(SMALL, sections=1, machines=("valve",))
    assert ensure_synthetic(cfg=cfg) == tmp_path / "cache" / "synthetic" / cfg.key()


def test_interrupted_generation_never_looks_finished(tmp_path, monkeypatch):
    real = synthetic.render_clip
    calls = []

    def dies_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_clip", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "ds", SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_clip", real)
    assert len(list(ensure_synthetic(tmp_path / "ds", SMALL).rglob("*.wav"))) == 52


def test_refuses_to_overwrite_other_data(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(AsdError, match="not a synthetic dataset"):
        ensure_synthetic(other, SMALL)
    with pytest.raises(AsdError, match="not an empty folder"):
        generate(other, SMALL)
    with pytest.raises(AsdError, match="is a file"):
        ensure_synthetic(other / "notes.txt", SMALL)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("machines", ("fan",)),
        ("machines", "rotor"),
        ("machines", ()),
        ("machines", ("rotor", "rotor")),
        ("sections", 0),
        ("sections", 1.5),
        ("source_train", 0),
        ("target_train", -1),
        ("test_per_class", 0),
        ("duration", 0.0),
        ("duration", -1.0),
        ("sample_rate", 100),
        ("difficulty", 1.5),
        ("difficulty", float("nan")),
        ("seed", -1),
        ("seed", True),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(AsdError, match=f"SyntheticConfig.{field}"):
        SyntheticConfig(**{field: value})


def test_target_train_may_be_zero(tmp_path):
    cfg = replace(SMALL, sections=1, target_train=0, machines=["rotor"])
    assert cfg.machines == ("rotor",)
    root = generate(tmp_path / "ds", cfg)
    assert not list(root.glob("rotor/train/*_target_*"))
    assert len(list(root.rglob("*.wav"))) == 11


def test_render_clip_rejects_bad_arguments():
    with pytest.raises(AsdError, match="anomaly kind 'leak'"):
        render_clip(SMALL, "rotor", 0, anomaly="leak")
    with pytest.raises(AsdError, match="section 2"):
        render_clip(SMALL, "rotor", 2)
    with pytest.raises(AsdError, match="domain 'none'"):
        render_clip(SMALL, "valve", 0, domain="none")


# --- the sounds ---------------------------------------------------------------------------


def band_energy(x: np.ndarray, sr: int, low: float, high: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1.0 / sr)
    return float(spec[(f >= low) & (f <= high)].sum())


def gain_db(after: np.ndarray, before: np.ndarray, sr: int, low: float, high: float) -> float:
    return 10 * np.log10(band_energy(after, sr, low, high) / band_energy(before, sr, low, high))


def pair(machine: str, kind: str, cfg: SyntheticConfig = SMALL):
    """The same clip rendered normal and with `kind`: one generator state, so only the anomaly differs."""
    normal = render_clip(
        cfg, machine, 0, "source", None, clip_rng(cfg.seed, machine, 0, "source", "test", "x", 0)
    )
    odd = render_clip(
        cfg, machine, 0, "source", kind, clip_rng(cfg.seed, machine, 0, "source", "test", "x", 0)
    )
    return normal, odd


@pytest.mark.parametrize("machine, kind", [(m, k) for m, kinds in ANOMALY_KINDS.items() for k in kinds])
def test_every_anomaly_kind_changes_the_clip(machine, kind):
    normal, odd = pair(machine, kind)
    assert odd.anomaly == kind and odd.details and normal.anomaly is None
    assert normal.attributes == odd.attributes
    assert np.all(np.isfinite(odd.wave)) and np.abs(odd.wave).max() <= 0.981
    assert np.sqrt(np.mean((odd.wave - normal.wave) ** 2)) > 1e-3


def test_bearing_tone_adds_energy_at_its_frequency_only():
    cfg = replace(SMALL, duration=1.0)
    normal, odd = pair("rotor", "bearing", cfg)
    f, sr = odd.details["freq"], cfg.sample_rate
    assert 100.0 < f < 1200.0
    diff = odd.wave.astype(float) - normal.wave
    at_tone = band_energy(diff, sr, 0.98 * f, 1.02 * f) + band_energy(diff, sr, 1.96 * f, 2.04 * f)
    assert at_tone > 0.95 * band_energy(diff, sr, 0, sr / 2)  # the tone and its 2nd harmonic, nothing else
    assert gain_db(odd.wave, normal.wave, sr, 0.98 * f, 1.02 * f) > 10.0


def test_tilt_changes_the_spectrum_by_its_gain_at_its_centre():
    normal, odd = pair("valve", "tilt", replace(SMALL, duration=1.0))
    centre, expected = odd.details["freq"], odd.details["gain_db"]
    assert abs(expected) > 3.0
    measured = gain_db(odd.wave, normal.wave, SMALL.sample_rate, 0.95 * centre, 1.05 * centre)
    assert measured == pytest.approx(expected, abs=1.0)


def test_difficulty_scales_the_anomaly():
    ratios = []
    for difficulty in (0.0, 0.5, 1.0):
        normal, odd = pair("valve", "leak", replace(SMALL, difficulty=difficulty))
        added = odd.wave.astype(float) - normal.wave
        ratios.append(np.mean(added**2) / np.mean(normal.wave.astype(float) ** 2))
    assert ratios[0] > 10 * ratios[1] > 100 * ratios[2]


def test_sections_are_distinguishable():
    """Leave-one-out nearest section mean of band log-energies names every clip's section."""
    cfg = replace(SMALL, duration=1.0)
    edges = np.geomspace(50, 7900, 33)
    for machine in ("rotor", "valve"):
        feats, labels = [], []
        for section in (0, 1):
            params = section_params(cfg, machine, section)
            for i in range(5):
                rng = clip_rng(cfg.seed, machine, section, "source", "train", "normal", i)
                wave = render_clip(cfg, machine, section, "source", None, rng, params).wave
                feats.append([np.log(band_energy(wave, 16000, lo, hi)) for lo, hi in pairwise(edges)])
                labels.append(section)
        feats, labels = np.array(feats), np.array(labels)  # (10, 32), (10,)
        for i in range(len(feats)):
            rest = np.arange(len(feats)) != i
            means = [feats[rest & (labels == s)].mean(axis=0) for s in (0, 1)]
            assert np.argmin([np.linalg.norm(feats[i] - m) for m in means]) == labels[i], (machine, i)


# --- the tool -----------------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "make_synthetic.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def test_tool_writes_and_reports(tmp_path):
    out = tmp_path / "ds"
    args = ["--out", str(out), "--sections", "1", "--source-train", "2", "--target-train", "1"]
    done = run_tool(*args, "--test-per-class", "1", "--duration", "0.2", "--machines", "valve", "--seed", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(out)
    assert "7 clips" in done.stdout and "train/source/normal    2" in done.stdout
    manifest = json.loads((out / "synthetic.json").read_text())
    assert manifest["config"]["machines"] == ["valve"] and manifest["config"]["seed"] == 4


def test_tool_errors(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    done = run_tool("--out", str(tmp_path), "--sections", "1")
    assert (
        done.returncode == 2 and done.stderr.startswith("error: ") and "refusing to overwrite" in done.stderr
    )
    done = run_tool("--out", str(tmp_path / "new"), "--difficulty", "3")
    assert done.returncode == 2 and "SyntheticConfig.difficulty" in done.stderr
    assert not (tmp_path / "new").exists()
