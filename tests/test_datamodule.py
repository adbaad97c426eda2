import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asd.data.audio import AudioConfig
from asd.data.datamodule import AsdDataModule, WaveStore, split_holdout
from asd.data.index import index_dataset
from asd.errors import AsdError

KEYS = {"wave", "machine", "section", "attribute", "domain", "is_target", "is_normal", "index"}


def make_dm(root: Path, tmp_path: Path, **kw) -> AsdDataModule:
    kw.setdefault("audio", {"duration": 1.0})
    dm = AsdDataModule(root=root, cache_dir=tmp_path / "cache", batch_size=4, **kw)
    dm.setup()
    return dm


def test_splits_cover_every_clip_once_and_hold_out_per_group(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path, val_fraction=0.25)
    table = index_dataset(tiny_root)
    fit, val, test = (dm.tables[s] for s in ("fit", "val", "test"))
    assert len(fit) + len(val) == len(table.select(split="train"))
    assert len(test) == len(table.select(split="test")) == 2 * 2 * 2 * 3
    assert not {c.path for c in fit} & {c.path for c in val}
    # 8 source normals per section -> round(8 * 0.25) = 2 held out; 2 target normals -> 1 held out
    for machine in ("rotor", "valve"):
        assert len(val.select(machine=machine, domain="source")) == 2
        assert len(val.select(machine=machine, domain="target")) == 1


def test_batches_are_dicts_of_the_documented_tensors(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == KEYS
    assert batch["wave"].shape == (4, 16000) and batch["wave"].dtype == torch.float32
    for k in ("machine", "section", "attribute", "domain", "index"):
        assert batch[k].dtype == torch.long and batch[k].shape == (4,)
    assert batch["is_target"].dtype == torch.bool
    # labels agree with the clip table row each index points at
    for i, idx in enumerate(batch["index"].tolist()):
        clip = dm.tables["test"][idx]
        assert dm.machine_names[batch["machine"][i]] == clip.machine
        assert dm.section_keys[batch["section"][i]] == (clip.machine, clip.section)
        assert bool(batch["is_normal"][i]) == (clip.label == "normal")
        assert bool(batch["is_target"][i]) == (clip.domain == "target")
        assert batch["domain"][i] == {"source": 0, "target": 1}[clip.domain]
    assert dm.num_machines == 2 and dm.num_sections == 2


def test_waves_equal_direct_decoding_and_come_from_the_cache_the_second_time(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    clip = dm.tables["fit"][3]
    expected, _ = sf.read(clip.path, dtype="float32")
    np.testing.assert_array_equal(dm.datasets["fit"][3]["wave"].numpy(), expected[:16000])
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert files  # one cache file per machine and split
    mtimes = [f.stat().st_mtime_ns for f in files]
    make_dm(tiny_root, tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_attribute_ids_are_known_for_training_clips(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    assert (dm.datasets["fit"].labels["attribute"] >= 0).all()
    assert dm.num_attributes == len(dm.attribute_keys) > 2


def test_holdout_is_deterministic_and_keeps_single_clips_in_fit(tiny_root):
    train = index_dataset(tiny_root).select(split="train")
    a = split_holdout(train, 0.25, seed=0)
    b = split_holdout(train, 0.25, seed=0)
    assert a == b
    one = train.select(machine="rotor", domain="target")
    fit, val = split_holdout(type(train)(one.clips[:1]), 0.5, seed=0)
    assert len(fit) == 1 and len(val) == 0


def test_wave_store_pickles_without_copying_the_memory_map(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    store = dm.datasets["test"].waves
    blob = pickle.dumps(store)
    assert len(blob) < 10_000  # file names, not megabytes of audio
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[5], store[5])
    plain = WaveStore([np.ones((2, 3), dtype=np.float32)])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(plain))[1], np.ones(3))


def test_bad_training_file_is_an_error_or_listed_when_skipped(tiny_root, tmp_path):
    root = tmp_path / "data"
    import shutil

    shutil.copytree(tiny_root, root)
    bad = sorted((root / "rotor" / "train").glob("*source*.wav"))[0]
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AsdError, match=bad.name):
        make_dm(root, tmp_path)
    dm = make_dm(root, tmp_path, on_bad_file="skip")
    assert [p for p, _ in dm.skipped] == [str(bad)]
    assert all(c.path != str(bad) for s in ("fit", "val") for c in dm.tables[s])


def test_bad_test_file_is_never_skipped(tiny_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    bad = sorted((root / "valve" / "test").glob("*.wav"))[0]
    bad.write_bytes(b"")
    with pytest.raises(AsdError, match=bad.name):
        make_dm(root, tmp_path, on_bad_file="skip")


def test_synthetic_default_is_generated_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASD_CACHE", str(tmp_path))
    dm = AsdDataModule(
        synthetic={"sections": 1, "source_train": 3, "target_train": 1, "test_per_class": 1, "duration": 0.5},
        audio=AudioConfig(duration=0.5),
    )
    dm.prepare_data()
    dm.setup()
    assert dm.dataset_root().is_relative_to(tmp_path)
    assert len(dm.tables["test"]) == 2 * 2 * 2
