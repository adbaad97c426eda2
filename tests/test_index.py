"""Tests of the dataset indexer: every naming convention, attribute CSVs, MIMII splits, errors."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asd.data.index import CONVENTIONS, index_dataset, parse_attributes, parse_path
from asd.data.table import Clip
from asd.errors import AsdError

MIMII_0DB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mimii_0db"


def touch(root: Path, *names: str) -> list[Path]:
    """Create empty files (the indexer never opens audio)."""
    paths = []
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        paths.append(p)
    return paths


def fields(clip: Clip) -> tuple:
    return (clip.machine, clip.section, clip.domain, clip.split, clip.label, clip.attributes, clip.layout)


# --- DCASE 2020 -------------------------------------------------------------------------


def test_dcase2020_dev_and_eval(tmp_path):
    touch(
        tmp_path,
        "fan/train/normal_id_00_00000000.wav",
        "fan/test/anomaly_id_02_00000001.wav",
        "fan/test/normal_id_02_00000002.wav",
        "fan/test/id_01_00000000.wav",
    )
    table = index_dataset(tmp_path)
    assert [c.path for c in table] == [
        str(tmp_path / "fan/test/anomaly_id_02_00000001.wav"),
        str(tmp_path / "fan/test/id_01_00000000.wav"),
        str(tmp_path / "fan/test/normal_id_02_00000002.wav"),
        str(tmp_path / "fan/train/normal_id_00_00000000.wav"),
    ]
    assert [fields(c) for c in table] == [
        ("fan", "02", "none", "test", "anomaly", {}, "dcase2020"),
        ("fan", "01", "none", "test", "unknown", {}, "dcase2020"),
        ("fan", "02", "none", "test", "normal", {}, "dcase2020"),
        ("fan", "00", "none", "train", "normal", {}, "dcase2020"),
    ]


def test_dcase2020_eval_name_outside_test_folder_is_an_error(tmp_path):
    with pytest.raises(AsdError, match=r"id_00_00000000\.wav.*test/"):
        parse_path(tmp_path / "fan/train/id_00_00000000.wav")


# --- DCASE 2021 -------------------------------------------------------------------------


def test_dcase2021_dev_and_eval(tmp_path):
    touch(
        tmp_path,
        "gearbox/train/section_00_source_train_normal_0000.wav",
        "gearbox/train/section_00_target_train_normal_0001_strength_1_ambient.wav",
        "gearbox/source_test/section_00_source_test_anomaly_0000.wav",
        "gearbox/target_test/section_00_target_test_normal_0000.wav",
        "gearbox/source_test/section_03_0000.wav",
        "gearbox/target_test/section_03_0000.wav",
    )
    table = index_dataset(tmp_path)
    rows = [(Path(c.path).parent.name, c.name[:14], *fields(c)[1:6]) for c in table]
    assert {c.machine for c in table} == {"gearbox"}
    assert {c.layout for c in table} == {"dcase2021"}  # train/ clips too: the folder has source_test/
    assert rows == [
        ("source_test", "section_00_sou", "00", "source", "test", "anomaly", {}),
        ("source_test", "section_03_000", "03", "source", "test", "unknown", {}),
        ("target_test", "section_00_tar", "00", "target", "test", "normal", {}),
        ("target_test", "section_03_000", "03", "target", "test", "unknown", {}),
        ("train", "section_00_sou", "00", "source", "train", "normal", {}),
        ("train", "section_00_tar", "00", "target", "train", "normal", {"strength": "1", "tag": "ambient"}),
    ]


def test_dcase2021_eval_in_plain_test_folder_has_no_domain(tmp_path):
    clip = parse_path(tmp_path / "fan/test/section_03_0007.wav", year=2021)
    assert fields(clip) == ("fan", "03", "none", "test", "unknown", {}, "dcase2021")


def test_folder_decides_2021_per_machine_folder(tmp_path):
    touch(
        tmp_path,
        "a/train/section_00_source_train_normal_0000.wav",
        "a/source_test/section_00_source_test_normal_0000.wav",
        "b/train/section_00_source_train_normal_0000_x_1.wav",
        "b/test/section_00_source_test_normal_0000_x_1.wav",
    )
    layouts = {(c.machine, c.split): c.layout for c in index_dataset(tmp_path)}
    assert layouts == {
        ("a", "train"): "dcase2021",
        ("a", "test"): "dcase2021",
        ("b", "train"): "dcase2022",
        ("b", "test"): "dcase2022",
    }
    # on its own, a train/ clip cannot know: 2022+ unless the year says 2021
    name = "a/train/section_00_source_train_normal_0000.wav"
    assert parse_path(tmp_path / name).layout == "dcase2022"
    assert parse_path(tmp_path / name, year=2021).layout == "dcase2021"


# --- DCASE 2022-2025 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "attributes"),
    [
        ("vel_6_loc_A", {"vel": "6", "loc": "A"}),
        ("pat_01", {"pat": "01"}),
        ("noAttribute", {}),
        ("car_A1_spd_28V_mic_1", {"car": "A1", "spd": "28V", "mic": "1"}),
        ("m-n_W", {"m-n": "W"}),
        ("a_1_b", {"a": "1", "tag": "b"}),
        ("ambient", {"tag": "ambient"}),
    ],
)
def test_dcase2022_attributes_from_name(tmp_path, tail, attributes):
    clip = parse_path(tmp_path / f"valve/train/section_01_target_train_normal_0009_{tail}.wav")
    assert fields(clip) == ("valve", "01", "target", "train", "normal", attributes, "dcase2022")
    assert clip.path == str(tmp_path / f"valve/train/section_01_target_train_normal_0009_{tail}.wav")


@pytest.mark.parametrize("tail", ["a__b", "a_1_", "a_1_a_2", "tag_x_y"])
def test_ambiguous_attribute_tails_are_errors(tmp_path, tail):
    with pytest.raises(AsdError, match="Rename the file"):
        parse_path(tmp_path / f"valve/train/section_01_target_train_normal_0009_{tail}.wav")
    with pytest.raises(ValueError):
        parse_attributes(tail)


def test_dcase2022_test_and_eval_clips(tmp_path):
    anomaly = parse_path(tmp_path / "fan/test/section_02_source_test_anomaly_0042_loc_B.wav", year=2023)
    assert fields(anomaly) == ("fan", "02", "source", "test", "anomaly", {"loc": "B"}, "dcase2022")
    evaluation = parse_path(tmp_path / "fan/test/section_00_0123.wav", year=2025)
    assert fields(evaluation) == ("fan", "00", "none", "test", "unknown", {}, "dcase2022")


def test_supplemental_clips_are_train_normals(tmp_path):
    name = "AutoTrash/supplemental/section_00_target_supplemental_noise_0003.wav"
    clip = parse_path(tmp_path / name, year=2025)
    assert fields(clip) == (
        "AutoTrash",
        "00",
        "target",
        "train",
        "normal",
        {"supplemental": "noise_0003"},
        "dcase2022",
    )
    with pytest.raises(AsdError, match="2024/2025"):
        parse_path(tmp_path / name, year=2022)
    with pytest.raises(AsdError, match="supplemental/"):
        parse_path(tmp_path / "AutoTrash/train/section_00_target_supplemental_noise_0003.wav")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("fan/test/section_00_source_train_normal_0000_a_1.wav", "split 'train'"),
        ("fan/train/section_00_source_test_normal_0000_a_1.wav", "split 'test'"),
        ("fan/source_test/section_00_target_test_normal_0000.wav", "domain 'target'"),
        ("fan/train/section_00_0000.wav", "unlabelled eval"),
        ("fan/id_00/normal/00000000.wav/x.wav", "fits no convention"),
        ("fan/extra/normal/00000000.wav", "id_XX"),
        ("fan/train/section_0_source_train_normal_0000.wav", "fits no convention"),
        ("fan/train/notes.txt", "only .wav"),
    ],
)
def test_names_that_contradict_their_folder(tmp_path, name, message):
    with pytest.raises(AsdError, match=message) as info:
        parse_path(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)
    assert CONVENTIONS in str(info.value)


# --- forced year ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "year", "message"),
    [
        ("fan/source_test/section_00_source_test_normal_0000.wav", 2022, "a DCASE 2021 clip"),
        ("fan/train/section_00_source_train_normal_0000_a_1.wav", 2020, "a DCASE 2021\\+ name"),
        ("fan/test/section_00_0000.wav", 2020, "a DCASE 2021\\+ name"),
        ("fan/train/normal_id_00_00000000.wav", 2023, "a DCASE 2020 name"),
        ("fan/id_00/normal/00000000.wav", 2020, "a MIMII clip"),
        ("fan/supplemental/section_00_source_supplemental_x.wav", 2021, "a supplemental clip"),
    ],
)
def test_forced_year_contradicted_by_the_file(tmp_path, name, year, message):
    with pytest.raises(
        AsdError,
        match=f"{re.escape(name)}: this is {message}.*, but year={year} was asked for; leave year unset",
    ):
        parse_path(tmp_path / name, year=year)


@pytest.mark.parametrize("year", [2019, 2026, True, "2022"])
def test_unknown_year_is_an_error(tmp_path, year):
    with pytest.raises(AsdError, match="year="):
        parse_path(tmp_path / "fan/train/normal_id_00_00000000.wav", year=year)
    touch(tmp_path, "fan/train/normal_id_00_00000000.wav")
    with pytest.raises(AsdError, match="year="):
        index_dataset(tmp_path, year=year)


def test_forced_year_applies_to_the_whole_index(tmp_path):
    touch(tmp_path, "fan/train/section_00_source_train_normal_0000_a_1.wav", "fan/test/section_00_0001.wav")
    assert {c.layout for c in index_dataset(tmp_path, year=2021)} == {"dcase2021"}
    assert {c.layout for c in index_dataset(tmp_path, year=2024)} == {"dcase2022"}
    with pytest.raises(AsdError, match="year=2020"):
        index_dataset(tmp_path, year=2020)


# --- attribute CSVs ---------------------------------------------------------------------


def test_attribute_csv_merges_by_name(tmp_path, caplog):
    touch(
        tmp_path,
        "fan/train/section_00_source_train_normal_0000_m-n_W.wav",
        "fan/test/section_00_0000.wav",
        "fan/test/section_00_source_test_anomaly_0001_noAttribute.wav",
        "pump/train/section_00_source_train_normal_0000_m-n_W.wav",
    )
    (tmp_path / "fan/attributes_00.csv").write_text(
        "file_name,d1p,d1v,d2p,d2v\n"
        "fan/train/section_00_source_train_normal_0000_m-n_W.wav,m-n,W,,\n"
        "section_00_0000.wav,vel,6,loc,A\n"
        "fan/test/section_00_source_test_anomaly_0001_noAttribute.wav,noAttribute,\n"
        "fan/train/section_00_0000.wav,wrong,folder\n"
        "fan/test/section_00_9999.wav,gone,1\n"
    )
    with caplog.at_level(logging.WARNING, logger="asd.data.index"):
        table = index_dataset(tmp_path)
    attrs = {(c.machine, Path(c.path).parent.name, c.name): c.attributes for c in table}
    assert attrs == {
        ("fan", "test", "section_00_0000.wav"): {"vel": "6", "loc": "A"},
        ("fan", "test", "section_00_source_test_anomaly_0001_noAttribute.wav"): {},
        # the CSV replaces the name's guess ({"m-n": "W"} happens to agree here)
        ("fan", "train", "section_00_source_train_normal_0000_m-n_W.wav"): {"m-n": "W"},
        # another machine folder's CSV does not apply
        ("pump", "train", "section_00_source_train_normal_0000_m-n_W.wav"): {"m-n": "W"},
    }
    assert "2 rows name no indexed clip" in caplog.text


def test_attribute_csv_fixes_values_with_underscores(tmp_path):
    touch(tmp_path, "ToyCar/train/section_00_source_train_normal_0000_car_A_1_spd_28.wav")
    (tmp_path / "ToyCar/attributes_00.csv").write_bytes(
        "\ufefffile_name,d1p,d1v,d2p,d2v\r\n"
        "section_00_source_train_normal_0000_car_A_1_spd_28.wav,car,A_1,spd,28\r\n".encode()
    )
    [clip] = index_dataset(tmp_path)
    assert clip.attributes == {"car": "A_1", "spd": "28"}
    assert parse_path(clip.path).attributes == {"car": "A", "1": "spd", "tag": "28"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("name,d1p,d1v\nsection_00_0000.wav,a,1\n", "header"),
        ("file_name,d1p\nsection_00_0000.wav,a\n", "header"),
        ("file_name,d1p,d1v,d3p,d3v\nsection_00_0000.wav,a,1,b,2\n", "header"),
        ("file_name,d1p,d1v\nsection_00_0000.wav,a,1,extra\n", "line 2: 4 cells"),
        ("file_name,d1p,d1v\nsection_00_0000.wav,,1\n", "line 2: value '1'"),
        ("file_name,d1p,d1v,d2p,d2v\nsection_00_0000.wav,a,1,a,2\n", "line 2: attribute 'a' appears twice"),
        ("file_name,d1p,d1v\nsection_00_0000.wav,a,1\nsection_00_0000.wav,a,2\n", "line 3:.*listed twice"),
        ("file_name,d1p,d1v\n,a,1\n", "not a .wav file name"),
    ],
)
def test_malformed_attribute_csv(tmp_path, content, message):
    touch(tmp_path, "fan/test/section_00_0000.wav")
    (tmp_path / "fan/attributes_00.csv").write_text(content)
    with pytest.raises(AsdError, match=message) as info:
        index_dataset(tmp_path)
    assert "attributes_00.csv" in str(info.value)


def test_attribute_csv_that_is_not_utf8(tmp_path):
    touch(tmp_path, "fan/test/section_00_0000.wav")
    (tmp_path / "fan/attributes_00.csv").write_bytes(b"file_name,d1p,d1v\n\xff\xfe,a,1\n")
    with pytest.raises(AsdError, match="attributes_00.csv.*UTF-8"):
        index_dataset(tmp_path)


# --- MIMII ------------------------------------------------------------------------------


MIMII_NAMES = [
    f"fan/id_{i}/{kind}/{n:08d}.wav"
    for i in ("00", "02")
    for kind in ("normal", "abnormal")
    for n in range(3)
]


def test_mimii_all_test_by_default(tmp_path):
    touch(tmp_path / "-6_dB_fan", *MIMII_NAMES)
    table = index_dataset(tmp_path)
    assert len(table) == 12
    assert {fields(c)[:5] for c in table} == {
        ("fan", i, "none", "test", label) for i in ("00", "02") for label in ("normal", "anomaly")
    }
    assert {c.layout for c in table} == {"mimii"}
    assert [c.path for c in table] == sorted(str(tmp_path / "-6_dB_fan" / n) for n in MIMII_NAMES)


def test_mimii_train_normals_seeded_draw(tmp_path):
    touch(tmp_path, *MIMII_NAMES)
    table = index_dataset(tmp_path, mimii_train_normals=2, seed=3)
    for section in ("00", "02"):
        normals = sorted(str(tmp_path / f"fan/id_{section}/normal/{n:08d}.wav") for n in range(3))
        random.Random(3).shuffle(normals)
        train = [c.path for c in table.select(section=section, split="train")]
        assert sorted(train) == sorted(normals[:2])
    assert len(table.select(split="test", label="normal")) == 2
    assert len(table.select(split="test", label="anomaly")) == 6
    assert index_dataset(tmp_path, mimii_train_normals=2, seed=3) == table
    draws = set()
    for s in range(10):
        draws.add(
            tuple(
                c.path for c in index_dataset(tmp_path, mimii_train_normals=1, seed=s).select(split="train")
            )
        )
    assert len(draws) > 1
    assert index_dataset(tmp_path, mimii_train_normals=0) == index_dataset(tmp_path)


def test_mimii_train_normals_taking_every_normal_warns_and_drops_nothing(tmp_path, caplog):
    touch(tmp_path, *MIMII_NAMES)
    with caplog.at_level("WARNING", logger="asd.data.index"):
        table = index_dataset(tmp_path, mimii_train_normals=3)
    assert "fan id_00 (3), fan id_02 (3)" in caplog.text and "no AUC" in caplog.text
    assert len(table) == 12
    assert len(table.select(split="train")) == 6 and len(table.select(split="test", label="normal")) == 0


def test_mimii_train_normals_errors(tmp_path):
    touch(tmp_path, *MIMII_NAMES)
    with pytest.raises(AsdError, match="mimii_train_normals=-1"):
        index_dataset(tmp_path, mimii_train_normals=-1)
    other = tmp_path / "dcase"
    touch(other, "fan/train/normal_id_00_00000000.wav")
    with pytest.raises(AsdError, match="no MIMII"):
        index_dataset(other, mimii_train_normals=1)
    with pytest.raises(AsdError, match="no MIMII"):
        index_dataset(other, mimii_train_normals=0)


def test_real_mimii_files():
    if not MIMII_0DB.is_dir():
        pytest.skip(f"{MIMII_0DB} is not present")
    table = index_dataset(MIMII_0DB)
    assert len(table) == 30
    assert table.machines() == ["fan", "pump", "slider", "valve"]
    assert table.sections("fan") == ["02", "04", "06"]
    for machine in ("pump", "slider", "valve"):
        assert table.sections(machine) == ["00", "02", "04", "06"]
    assert {c.label for c in table} == {"normal", "anomaly"}
    assert {(c.split, c.layout, c.domain) for c in table} == {("test", "mimii", "none")}


# --- roots, walking, selection ----------------------------------------------------------


def test_root_forms_give_the_same_clips(tmp_path, monkeypatch):
    names = ["fan/train/section_00_source_train_normal_0000_a_1.wav", "fan/test/section_00_0000.wav"]
    touch(tmp_path / "dev_data" / "raw", *names)
    full = index_dataset(tmp_path)
    assert index_dataset(tmp_path / "dev_data" / "raw") == full
    assert index_dataset(tmp_path / "dev_data/raw/fan") == full
    monkeypatch.chdir(tmp_path / "dev_data/raw/fan")
    assert index_dataset(".") == full
    assert index_dataset("train").machines() == ["fan"]


def test_only_wav_files_are_clips(tmp_path):
    touch(
        tmp_path,
        "fan/train/normal_id_00_00000001.WAV",
        "fan/train/normal_id_00_00000000.wav",
        "fan/README.md",
        "fan/train/list.csv",
        "fan.zip",
        "fan/train/normal_id_00_00000002.flac",
    )
    table = index_dataset(tmp_path)
    assert [c.name for c in table] == ["normal_id_00_00000000.wav", "normal_id_00_00000001.WAV"]


def test_machines_selection(tmp_path):
    touch(tmp_path, "fan/train/normal_id_00_00000000.wav", "pump/train/normal_id_00_00000000.wav")
    assert index_dataset(tmp_path, machines=["pump"]).machines() == ["pump"]
    with pytest.raises(AsdError, match=r"\['valve'\] are not under .*found: \['fan', 'pump'\]"):
        index_dataset(tmp_path, machines=["pump", "valve"])
    for bad in ([], "fan"):
        with pytest.raises(AsdError, match="machines="):
            index_dataset(tmp_path, machines=bad)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_is_walked_once(tmp_path, caplog):
    touch(tmp_path, "fan/train/normal_id_00_00000000.wav")
    (tmp_path / "fan/train/loop").symlink_to(tmp_path / "fan")
    with caplog.at_level(logging.WARNING, logger="asd.data.index"):
        assert len(index_dataset(tmp_path)) == 1
    assert "same folder" in caplog.text


# --- errors -----------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(AsdError, match="does not exist"):
        index_dataset(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    [f] = touch(tmp_path, "fan/train/normal_id_00_00000000.wav")
    with pytest.raises(AsdError, match="is not a folder"):
        index_dataset(f)


def test_no_wav_files(tmp_path):
    touch(tmp_path, "fan/train/readme.txt")
    with pytest.raises(AsdError, match="no .wav files") as info:
        index_dataset(tmp_path)
    assert CONVENTIONS in str(info.value)


def test_unknown_name_in_tree(tmp_path):
    touch(tmp_path, "fan/train/normal_id_00_00000000.wav", "fan/train/recording 1.wav")
    with pytest.raises(AsdError, match="recording 1.wav: the file name fits no convention") as info:
        index_dataset(tmp_path)
    assert CONVENTIONS in str(info.value)
    assert "Rename the file or move it" in str(info.value)


def test_two_copies_of_a_dataset(tmp_path):
    touch(tmp_path, "a/fan/train/normal_id_00_00000000.wav", "b/fan/train/normal_id_00_00000000.wav")
    with pytest.raises(AsdError, match="same clip.*two copies"):
        index_dataset(tmp_path)


def test_non_path_argument():
    with pytest.raises(AsdError, match="got int"):
        parse_path(3)  # type: ignore[arg-type]
    with pytest.raises(AsdError, match="got NoneType"):
        index_dataset(None)  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------------------


FOLDERS = ["", "fan", "fan/train", "fan/test", "fan/source_test", "fan/target_test", "fan/supplemental",
           "fan/id_00/normal", "fan/id_0x/abnormal", "id_00/normal", "train", "/", "fan/id_00"]  # fmt: skip
PREFIXES = ["", "section_00_", "section_00_source_train_normal_0000_", "section_01_target_test_anomaly_1_",
            "normal_id_00_", "id_00_", "section_00_source_supplemental_", "0"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    folder=st.sampled_from(FOLDERS),
    prefix=st.sampled_from(PREFIXES),
    text=st.text(),
    suffix=st.sampled_from(["", ".wav", ".WAV", "_1.wav"]),
    year=st.sampled_from([None, *range(2020, 2026)]),
)
def test_arbitrary_names_raise_only_asd_error(folder, prefix, text, suffix, year):
    path = os.path.join(folder, prefix + text + suffix)
    try:
        clip = parse_path(path, year=year)
    except AsdError:
        return
    assert os.path.isabs(clip.path)
    assert len(clip.section) == 2 and clip.section.isdigit()
    assert clip.machine


attr_char = st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="_/\\")
attr_token = st.text(alphabet=attr_char, min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(
    section=st.integers(0, 99),
    domain=st.sampled_from(["source", "target"]),
    split=st.sampled_from(["train", "test"]),
    label=st.sampled_from(["normal", "anomaly"]),
    number=st.integers(0, 99999),
    attributes=st.dictionaries(attr_token.filter(lambda k: k != "tag"), attr_token, max_size=4),
)
def test_dcase2022_names_round_trip(section, domain, split, label, number, attributes):
    tail = "_".join(f"{k}_{v}" for k, v in attributes.items()) or "noAttribute"
    name = f"section_{section:02d}_{domain}_{split}_{label}_{number:04d}_{tail}.wav"
    clip = parse_path(Path("/data/ToyCar") / split / name)
    assert fields(clip) == ("ToyCar", f"{section:02d}", domain, split, label, attributes, "dcase2022")
