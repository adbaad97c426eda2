"""The feature cache (issue 13): the members' log-mel of every clip computed once, kept memory-mapped
beside the audio cache, handed to the members' front ends instead of computed per batch. It must
change no score, rebuild when the audio or the setting changes, and never travel with a wave that
was changed (pseudo-anomalies, crops)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from asd.data.audio import audio_config
from asd.data.cache import AudioCache, FeatureCache
from asd.data.datamodule import ClipDataset, WaveStore, join_rows
from asd.data.windows import RandomCrops, with_wave
from asd.errors import AsdError
from asd.features import FEATURE_PREFIX, LogMel, feature_key, logmel_frontends
from asd.run.build import build_datamodule, build_ensemble, data_facts
from asd.run.calibrate import fit_backends
from asd.run.predict import member_scores
from tests.conftest import kill_while_writing, tiny_config


def counting(fe: LogMel) -> list[torch.Tensor]:
    """The waves whose log-mel `fe` computes itself (not served from the memo or the cache)."""
    calls: list[torch.Tensor] = []
    compute = fe._compute
    fe._compute = lambda w: calls.append(w.detach().clone()) or compute(w)
    return calls


def cached_audio(tmp_path, n=5, seconds=0.5, seed=0):
    """An audio cache file of `n` short WAVs, as the data module reads it (a memmap)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = tmp_path / f"clip_{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        paths.append(str(p))
    cache = AudioCache(tmp_path / "cache", audio_config(sample_rate=16000, duration=seconds))
    return cache, paths, cache.load(paths, "m-train").waves


def test_cached_features_equal_the_front_end_and_are_read_back_without_computing(tmp_path):
    _, _, waves = cached_audio(tmp_path)
    fe = LogMel(n_mels=32)
    feats = FeatureCache(fe).load(waves)
    assert isinstance(feats, np.memmap) and feats.shape == (5, 32, fe.num_frames(waves.shape[1]))
    torch.testing.assert_close(torch.from_numpy(np.array(feats)), fe(torch.from_numpy(np.array(waves))))
    other = LogMel(n_mels=32)
    calls = counting(other)
    again = FeatureCache(other).load(waves)
    assert calls == [] and np.array_equal(again, feats)  # a hit: nothing computed


def test_a_changed_setting_or_audio_file_builds_new_features_and_a_damaged_file_is_rebuilt(tmp_path):
    cache, paths, waves = cached_audio(tmp_path)
    first = FeatureCache(LogMel(n_mels=32))
    path = first.path_for(type(tmp_path)(waves.filename))
    first.load(waves)
    other = FeatureCache(LogMel(n_mels=16))
    assert other.path_for(type(tmp_path)(waves.filename)) != path
    assert other.load(waves).shape[1] == 16 and path.exists()  # both settings kept beside each other

    fe = LogMel(n_mels=32)
    calls = counting(fe)
    with open(path, "r+b") as f:  # damaged: cut short
        f.truncate(os.path.getsize(path) - 100)
    rebuilt = FeatureCache(fe).load(waves)
    assert calls and rebuilt.shape[0] == 5

    # the audio cache file is rewritten (same key, e.g. rebuilt after damage): the features follow it
    calls.clear()
    audio = type(tmp_path)(waves.filename)
    stamp = audio.stat().st_mtime_ns
    os.utime(audio, ns=(stamp + 10**9, stamp + 10**9))
    FeatureCache(fe).load(np.load(audio, mmap_mode="r"))
    assert calls


def test_a_new_audio_cache_key_deletes_the_old_keys_features(tmp_path):
    import soundfile as sf

    cache, paths, waves = cached_audio(tmp_path)
    old = FeatureCache(LogMel(n_mels=32))
    old_path = old.path_for(type(tmp_path)(waves.filename))
    old.load(waves)
    sf.write(paths[0], np.zeros(8000, np.float32), 16000)  # a file changed: a new audio key
    new_waves = cache.load(paths, "m-train").waves
    assert new_waves.filename != waves.filename
    assert not old_path.exists() and not old_path.with_suffix(".json").exists()


def test_priming_serves_the_cache_only_for_that_wave_unchanged(tmp_path):
    fe = LogMel(n_mels=32)
    wave = 0.1 * torch.randn(3, 8000)
    spec = LogMel(n_mels=32)(wave)
    calls = counting(fe)
    fe.prime(wave, spec)
    out = fe(wave)
    assert calls == [] and out is not spec
    torch.testing.assert_close(out, spec, rtol=0, atol=0)
    fe(wave.clone())  # another tensor: computed
    assert len(calls) == 1
    fe(wave)  # the primed result survives a computation of another wave
    assert len(calls) == 1
    wave.mul_(2.0)  # changed in place: computed
    fe(wave)
    assert len(calls) == 2
    with pytest.raises(AsdError, match="do not fit a wave batch"):
        fe.prime(wave, spec[:, :16])


def test_features_of_another_wave_are_refused(tmp_path):
    fe = LogMel(n_mels=32)
    wave = 0.1 * torch.randn(2, 16000)
    other = LogMel(n_mels=32)(0.1 * torch.randn(2, 16000))
    with pytest.raises(AsdError, match="do not belong to this batch's waves"):
        fe.prime(wave, other)


def test_items_carry_features_and_lose_them_with_a_new_wave(tmp_path):
    _, _, waves = cached_audio(tmp_path)
    fe = LogMel(n_mels=32)
    key = feature_key(fe)
    labels = {"index": torch.arange(5)}
    from asd.data.table import ClipTable

    table = ClipTable([object()] * 5)  # the dataset only counts its clips here
    ds = ClipDataset(table, WaveStore([waves]), labels, {key: WaveStore([FeatureCache(fe).load(waves)])})
    item = ds[2]
    assert key in item and item[key].shape == (32, fe.num_frames(waves.shape[1]))
    assert not any(k.startswith(FEATURE_PREFIX) for k in with_wave(item, item["wave"] * 0))
    crop = RandomCrops(ds, 4000)[(1, 512)]
    assert crop["wave"].shape == (4000,) and key not in crop
    joined = join_rows([(ds, [4, 0]), (ds, [])])
    assert len(joined) == 2 and key in joined[0]
    torch.testing.assert_close(joined[1][key], ds[0][key], rtol=0, atol=0)


def test_pseudo_anomalies_never_carry_the_normal_clips_features(tmp_path):
    from asd.anomalies import AnomalyConfig, PseudoAnomalies, PseudoAnomalyDataset
    from asd.data.table import Clip, ClipTable

    _, paths, waves = cached_audio(tmp_path, seconds=1.0)
    fe = LogMel(n_mels=32)
    key = feature_key(fe)
    clips = ClipTable(
        [
            Clip(path=p, machine="fan", section="00", domain="source", split="train", label="normal")
            for p in paths
        ]
    )
    labels = {"index": torch.arange(5), "section": torch.zeros(5, dtype=torch.long)}
    ds = ClipDataset(clips, WaveStore([waves]), labels, {key: WaveStore([FeatureCache(fe).load(waves)])})
    fake = PseudoAnomalyDataset(ds, PseudoAnomalies(AnomalyConfig(sample_rate=16000)), copies=2, seed=0)
    assert key in ds[0] and all(key not in fake[i] for i in range(len(fake)))


@pytest.fixture(scope="module")
def two_runs(tiny_root):
    """The same tiny ensemble scored with and without the feature cache."""
    cfg = tiny_config(tiny_root)
    out = {}
    for cached in (False, True):
        dm = build_datamodule(cfg)
        dm.setup()
        torch.manual_seed(0)
        ensemble = build_ensemble(cfg, data_facts(dm))
        if cached:
            dm.cache_features(logmel_frontends(ensemble.members.values()))
        fit_backends(ensemble, dm, torch.device("cpu"))
        ensemble.eval()
        out[cached] = (dm, ensemble)
    return out


def test_the_cache_changes_no_score_and_no_member_computes_a_log_mel(two_runs):
    (dm0, plain), (dm1, cached) = two_runs[False], two_runs[True]
    keys = set(logmel_frontends(cached.members.values()))
    assert keys and not dm0.datasets["test"].features and set(dm1.datasets["test"].features) == keys
    test0, test1 = dm0.datasets["test"], dm1.datasets["test"]
    batch0 = {k: torch.stack([test0[i][k] for i in range(len(test0))]) for k in test0[0]}
    batch1 = {k: torch.stack([test1[i][k] for i in range(len(test1))]) for k in test1[0]}
    calls = [counting(fe) for fe in logmel_frontends(cached.members.values()).values()]
    with torch.no_grad():
        ours = member_scores(cached, batch1)
        theirs = member_scores(plain, batch0)
    assert all(c == [] for c in calls)  # every log-mel came from the cache
    assert set(ours) == set(theirs)
    for column in ours:
        torch.testing.assert_close(ours[column], theirs[column], rtol=1e-5, atol=1e-5, msg=column)


def test_training_steps_read_the_cache(tiny_root):
    import pytorch_lightning as L

    cfg = tiny_config(tiny_root)
    dm = build_datamodule(cfg)
    dm.setup()
    ensemble = build_ensemble(cfg, data_facts(dm))
    frontends = logmel_frontends(ensemble.members.values())
    dm.cache_features(frontends)
    calls = [counting(fe) for fe in frontends.values()]
    primed_waves = []
    prime = ensemble.prime

    def spy(batch):
        if ensemble.training:  # training steps only (validation runs in eval mode)
            primed_waves.append(batch["wave"].clone())
        prime(batch)

    ensemble.prime = spy
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(ensemble, datamodule=dm)
    assert len(primed_waves) == 2  # each Ensemble.training_step hands over the batch's cached log-mels
    # members compute only the log-mels of their own augmented copies (b3's views), never a batch's
    for computed in (w for c in calls for w in c):
        for wave in primed_waves:
            assert computed.shape != wave.shape or not torch.equal(computed, wave)


def test_cross_fitted_training_clips_keep_their_features(tiny_root, tmp_path):
    cfg, dm = tiny_datamodule(tiny_root, tmp_path / "cache")
    dm.merge_holdout(3)  # the fit split becomes rows of the fit and val cache files
    fe = LogMel()
    dm.cache_features({feature_key(fe): fe})
    fit = dm.datasets["fit"]
    assert feature_key(fe) in fit.features and len(fit.features[feature_key(fe)]) == len(fit)
    for i in (0, len(fit) - 1):
        item = fit[i]
        torch.testing.assert_close(item[feature_key(fe)][None], LogMel()(item["wave"][None]))


def test_a_batch_cast_to_another_precision_is_computed_not_served():
    fe = LogMel(n_mels=32)
    wave = 0.1 * torch.randn(2, 8000)
    calls = counting(fe)
    fe.prime(wave, LogMel(n_mels=32)(wave).half())  # trainer.precision=16-true casts the batch
    fe(wave)
    assert len(calls) == 1


def test_feature_cache_off_and_windows_leave_batches_without_features(tiny_root):
    off = tiny_config(tiny_root, "data.feature_cache=false")
    windowed = tiny_config(tiny_root, "data.audio.window=0.5")
    for cfg in (off, windowed):
        dm = build_datamodule(cfg)
        dm.setup()
        dm.cache_features(logmel_frontends(build_ensemble(cfg, data_facts(dm)).members.values()))
        assert not any(d.features for d in dm.datasets.values())


def tiny_datamodule(tiny_root, cache_dir):
    cfg = tiny_config(tiny_root, f"data.cache_dir='{cache_dir}'")
    dm = build_datamodule(cfg)
    dm.setup()
    return cfg, dm


def test_a_full_disk_leaves_the_feature_cache_out_with_a_warning(tiny_root, tmp_path, mount, caplog):
    _, probe = tiny_datamodule(tiny_root, tmp_path / "probe")
    audio = sum(f.stat().st_size for f in (tmp_path / "probe").iterdir())
    # room for the audio cache and a little more, not for the log-mels (a quarter of the audio)
    mount(tmp_path / "small", f"size={int(audio * 1.08) // 4096 * 4096 + 8192}")
    cfg, dm = tiny_datamodule(tiny_root, tmp_path / "small" / "cache")
    frontends = logmel_frontends(build_ensemble(cfg, data_facts(dm)).members.values())
    dm.cache_features(frontends)
    assert not any(d.features for d in dm.datasets.values())
    assert "feature cache: not written" in caplog.text and "free" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert not any(k.startswith(FEATURE_PREFIX) for k in batch)


def test_a_read_only_cache_leaves_the_feature_cache_out_with_a_warning(tiny_root, tmp_path, mount, caplog):
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to remount a file system read-only")
    mount(tmp_path / "ro", "size=64m")
    cfg, dm = tiny_datamodule(tiny_root, tmp_path / "ro" / "cache")  # the audio cache is written
    res = subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot remount read-only ({res.stderr.strip()})")
    _, again = tiny_datamodule(tiny_root, tmp_path / "ro" / "cache")  # read back from the read-only cache
    again.cache_features(logmel_frontends(build_ensemble(cfg, data_facts(again)).members.values()))
    assert not any(d.features for d in again.datasets.values())
    assert "feature cache: not written" in caplog.text and "Read-only" in caplog.text


BUILD = """
import sys
from asd.data.audio import audio_config
from asd.data.cache import AudioCache, FeatureCache
from asd.features import LogMel
audio = AudioCache(sys.argv[1], audio_config(sample_rate=16000, duration=2.0), workers=1)
waves = audio.load(sys.argv[2:], "fan-fit").waves
FeatureCache(LogMel(hop_length=64), batch_size=4).load(waves)
"""


def test_a_killed_feature_build_leaves_nothing_half_written(tmp_path):
    import subprocess
    import sys

    import soundfile as sf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(300):
        p = tmp_path / "wav" / f"clip_{i}.wav"
        p.parent.mkdir(exist_ok=True)
        sf.write(p, (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000)
        paths.append(str(p))
    cache = tmp_path / "cache"
    building = subprocess.Popen([sys.executable, "-c", BUILD, str(cache), *paths], stdout=subprocess.DEVNULL)
    kill_while_writing(building, cache, ".*.features.*.npy.tmp")
    assert not list(cache.glob("*.features.npy"))  # nothing in place: only the killed writer's temporary
    waves = AudioCache(cache, audio_config(sample_rate=16000, duration=2.0)).load(paths, "fan-fit").waves
    assert not list(cache.glob(".*.tmp"))  # the audio cache's load removed the dead temporary
    fe = LogMel(hop_length=64)
    feats = FeatureCache(fe).load(waves)
    last = torch.from_numpy(np.array(waves[-4:]))
    torch.testing.assert_close(torch.from_numpy(np.array(feats[-4:])), fe(last))


LOAD_BOTH = """
import hashlib, logging, sys
import numpy as np
from asd.data.audio import audio_config
from asd.data.cache import AudioCache, FeatureCache
from asd.features import LogMel
logging.basicConfig(level=logging.INFO)
cache = AudioCache(sys.argv[1], audio_config(sample_rate=16000, duration=2.0), workers=1)
audio = cache.load(sys.argv[2:], "fan-fit")
feats = FeatureCache(LogMel(hop_length=64), batch_size=4).load(audio.waves)
print("hit" if audio.hit else "decoded", hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest())
"""


def test_processes_loading_one_cache_at_once_build_it_once(tmp_path):
    """torchrun's ranks load the same caches at the same moment: real processes, held at the lock
    until both wait there, then released together; one decodes and computes, the other reads."""
    import subprocess
    import sys
    import time

    from asd.data.cache import build_lock

    (tmp_path / "wav").mkdir()
    _, paths, _ = cached_audio(tmp_path / "wav", n=40, seconds=2.0)
    cache = tmp_path / "cache"
    cache.mkdir()
    logs = [tmp_path / f"rank{i}.log" for i in range(2)]
    with build_lock(cache, "fan-fit"):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", LOAD_BOTH, str(cache), *paths],
                stdout=subprocess.PIPE,
                stderr=open(log, "w"),
                text=True,
            )
            for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("another process is building" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "the processes never waited at the lock"
            time.sleep(0.05)
    said = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), [log.read_text()[-2000:] for log in logs]
    assert sorted(s[0] for s in said) == ["decoded", "hit"]
    assert said[0][1] == said[1][1]  # the same features in both
    text = "".join(log.read_text() for log in logs)
    assert text.count("decoding 40 files") == 1 and text.count("features (40, ") == 1
    assert not list(cache.glob(".*.tmp"))
