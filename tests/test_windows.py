"""Windows (asd.data.windows): random training crops, scoring windows, and the step budget."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from asd.data.audio import AudioConfig
from asd.data.datamodule import AsdDataModule
from asd.data.windows import (
    ClipWindows,
    RandomCropSampler,
    Windowing,
    mean_over_windows,
    member_view,
    window_starts,
    windowing_of,
)
from asd.errors import AsdError
from asd.run.build import with_budget
from asd.run.predict import infer


class Ramps(torch.utils.data.Dataset):
    """Clip i is the ramp i*1000 + (0, 1, ..., T-1): a window's values say where it was cut."""

    def __init__(self, n: int, length: int):
        self.n, self.length = n, length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        wave = torch.arange(self.length, dtype=torch.float32) + 1000 * i
        return {"wave": wave, "section": torch.tensor(i % 2), "index": torch.tensor(i)}


def test_window_starts_cover_the_clip_and_the_last_ends_at_its_end():
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(12, 4, 4) == [0, 4, 8]
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(4, 4, 4) == [0]
    assert window_starts(3, 4, 4) == [0]
    assert window_starts(10, None, None) == [0]


def test_windowing_of_reads_seconds_and_hop_defaults_to_the_window():
    assert windowing_of(AudioConfig(sample_rate=100, duration=1.0)) is None
    w = windowing_of(AudioConfig(sample_rate=100, duration=1.0, window=0.4))
    assert (w.size, w.hop, w.clip, w.starts) == (40, 40, 100, [0, 40, 60])
    w = windowing_of(AudioConfig(sample_rate=100, duration=1.0, window=0.4, window_hop=0.3))
    assert w.starts == [0, 30, 60]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"window": 1.0}, "needs data.audio.duration"),
        ({"duration": 1.0, "window": 2.0}, "longer than the clips"),
        ({"duration": 1.0, "window": 0.5, "window_hop": 0.6}, "window_hop"),
        ({"duration": 1.0, "window_hop": 0.5}, "window_hop"),
        ({"duration": 1.0, "window": -1.0}, "data.audio.window"),
    ],
)
def test_bad_window_settings_name_the_key(kw, match):
    with pytest.raises(AsdError, match=match):
        AudioConfig(sample_rate=100, **kw)


def test_window_is_not_part_of_the_decoding_cache_key():
    a = AudioConfig(sample_rate=100, duration=1.0)
    assert a.key() == AudioConfig(sample_rate=100, duration=1.0, window=0.5).key()


def test_clip_windows_cut_each_clip_and_the_mean_folds_back_per_clip():
    ds = Ramps(3, 10)
    windowing = Windowing(size=4, hop=4, clip=10)  # starts 0, 4, 6
    windows = ClipWindows(ds, windowing)
    assert len(windows) == 9
    item = windows[4]  # clip 1, window 1
    assert torch.equal(item["wave"], torch.tensor([1004.0, 1005, 1006, 1007]))
    assert int(item["section"]) == 1 and int(item["index"]) == 4
    # a clip's row is the mean of its windows' rows, in clip order
    rows = infer(lambda b: {"m": b["wave"].mean(dim=1)}, ds, torch.device("cpu"), 4, windowing=windowing)
    expected = [np.mean([1000 * i + 1.5, 1000 * i + 5.5, 1000 * i + 7.5]) for i in range(3)]
    np.testing.assert_allclose(rows["m"], expected)
    np.testing.assert_array_equal(rows["index"], [0, 1, 2])
    per_window = infer(
        lambda b: {"m": b["wave"].mean(dim=1)},
        ds,
        torch.device("cpu"),
        4,
        windowing=windowing,
        per_window=True,
    )
    assert per_window["m"].shape == (9,)
    np.testing.assert_allclose(mean_over_windows(per_window, 3)["m"], expected)


def test_a_clip_of_another_length_is_refused():
    with pytest.raises(AsdError, match="not the run's 12"):
        ClipWindows(Ramps(1, 10), Windowing(size=4, hop=4, clip=12))[0]


def test_member_view_is_the_first_window_or_the_dataset_itself():
    ds = Ramps(2, 10)
    assert member_view(ds, None) is ds
    view = member_view(ds, Windowing(size=4, hop=2, clip=10))
    assert len(view) == 2
    assert torch.equal(view[1]["wave"], torch.tensor([1000.0, 1001, 1002, 1003]))
    assert int(view[1]["index"]) == 1


def test_random_crops_come_from_the_loader_generator_and_stay_inside_the_clip():
    g = torch.Generator().manual_seed(3)
    sampler = RandomCropSampler(clips=5, clip_samples=10, size=4, draws=200, generator=g)
    state = g.get_state()
    first = list(sampler)
    assert len(first) == len(sampler) == 200
    assert {c for c, _ in first} == set(range(5))
    assert {s for _, s in first} == set(range(7))  # starts 0..6: every crop lies inside the clip
    g.set_state(state)
    assert list(sampler) == first  # a restored generator draws the same crops (resume)
    assert list(sampler) != first  # and the next epoch draws others


def make_dm(root, tmp_path, **kw) -> AsdDataModule:
    dm = AsdDataModule(root=root, cache_dir=tmp_path / "cache", batch_size=4, val_fraction=0.25, **kw)
    dm.setup()
    return dm


def test_datamodule_trains_on_crops_and_validates_on_windows(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path, audio={"duration": 1.0, "window": 0.25}, batches_per_epoch=3)
    size = dm.windowing.size
    assert dm.train_batches == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert all(b["wave"].shape == (4, size) for b in batches)
    # every crop is a stretch of its clip's wave
    fit = dm.datasets["fit"]
    b = batches[0]
    for wave, index in zip(b["wave"], b["index"], strict=True):
        full = fit[int(index)]["wave"]
        hits = [s for s in range(len(full) - size + 1) if torch.equal(full[s : s + size], wave)]
        assert hits
    val = list(dm.val_dataloader())
    n_val = len(dm.datasets["val"])
    assert sum(len(v["wave"]) for v in val) == n_val * dm.windowing.per_clip
    # without batches_per_epoch an epoch draws one crop per training clip
    dm2 = make_dm(tiny_root, tmp_path, audio={"duration": 1.0, "window": 0.25})
    assert dm2.train_batches == -(-len(dm2.datasets["fit"]) // 4)


def test_the_step_budget_sets_the_epochs_and_says_so(caplog):
    dm = SimpleNamespace(
        train_batches=7, batch_size=4, windowing=Windowing(4, 4, 8), training_unit="random 1 s crops"
    )
    cfg = OmegaConf.create({"steps": 50, "trainer": {"max_epochs": 10}})
    with caplog.at_level("INFO"):
        out = with_budget(cfg, dm)
    assert out.trainer.max_epochs == 8  # ceil(50 / 7)
    assert "steps=50" in caplog.text and "8 epochs of 7 batches of 4 random 1 s crops" in caplog.text
    cfg = OmegaConf.create({"steps": None, "trainer": {"max_epochs": 10}})
    assert with_budget(cfg, dm).trainer.max_epochs == 10
