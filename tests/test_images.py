"""Image inputs (`data=images`, issue 16): layouts, formats, errors, the front end, member
selection, and whole runs on generated pictures and on the bundled digits."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from asd.data.images import ImageDataModule, ImageError, ImageLayout, image_config, index_images, read_image
from asd.errors import AsdError
from asd.features import ImageFrontend
from asd.members import IMAGE_MEMBERS, member_names
from asd.run import FinishedRun, train

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
SIDE = 16


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("train", overrides=["debug=default", "data=images", *overrides])


def picture(
    rng: np.random.Generator, defect: bool = False, rgb: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth normal picture (a horizontal gradient with a little noise), or one with a bright square;
    returns the uint8 pixels and the defect mask."""
    base = np.tile(np.linspace(40, 120, SIDE), (SIDE, 1)) + rng.normal(0, 4, (SIDE, SIDE))
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    if defect:
        r, c = rng.integers(2, SIDE - 6, 2)
        mask[r : r + 4, c : c + 4] = True
        base[mask] = 250
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    if rgb:
        pixels = np.stack([pixels, pixels[::-1], 255 - pixels], axis=-1)
    return pixels, mask


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def inspection(root: Path, n_train: int = 10, n_test: int = 4, seed: int = 0, rgb: bool = False) -> Path:
    """train/good, test/good, test/square (+ ground_truth/square/*_mask.png)."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", picture(rng, rgb=rgb)[0])
    for i in range(n_test):
        save(root / "test" / "good" / f"{i:03d}.png", picture(rng, rgb=rgb)[0])
        pixels, mask = picture(rng, defect=True, rgb=rgb)
        save(root / "test" / "square" / f"{i:03d}.png", pixels)
        save(root / "ground_truth" / "square" / f"{i:03d}_mask.png", (mask * 255).astype(np.uint8))
    return root


# ---------------------------------------------------------------------- layouts
def test_inspection_layout_indexes_splits_labels_and_masks(tmp_path):
    root = inspection(tmp_path / "bottle")
    table, masks = index_images(root)
    assert {c.machine for c in table} == {"bottle"} and {c.section for c in table} == {"00"}
    assert len(table.select(split="train")) == 10
    test = table.select(split="test")
    assert sorted(c.label for c in test) == ["anomaly"] * 4 + ["normal"] * 4
    assert all(c.attributes == {"defect": "square"} for c in test if c.label == "anomaly")
    assert all(c.domain == "none" and c.layout == "images" for c in table)
    assert len(masks) == 4 and all(Path(m).name.endswith("_mask.png") for m in masks.values())


def test_one_folder_per_category_gives_one_section_each(tmp_path):
    inspection(tmp_path / "set" / "bottle", n_train=3, n_test=1)
    inspection(tmp_path / "set" / "cable", n_train=3, n_test=1, seed=1)
    table, _ = index_images(tmp_path / "set")
    assert {c.machine for c in table} == {"set"}
    assert table.sections() == ["bottle", "cable"]
    only, _ = index_images(tmp_path / "set", categories=["cable"])
    assert only.sections() == ["cable"]
    with pytest.raises(ImageError, match=r"data.categories: \['wood'\]"):
        index_images(tmp_path / "set", categories=["wood"])


def test_plain_layout_tests_a_seeded_share_of_normals(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        save(tmp_path / "normal" / f"n{i}.png", picture(rng)[0])
    save(tmp_path / "anomaly" / "a0.png", picture(rng, defect=True)[0])
    save(tmp_path / "anomaly" / "scratch" / "a1.png", picture(rng, defect=True)[0])
    table, masks = index_images(tmp_path, test_normals=0.3, seed=3)
    test = table.select(split="test")
    assert len(table.select(split="train")) == 7 and len(test) == 5
    assert sorted(c.attributes.get("defect", "") for c in test if c.label == "anomaly") == ["", "scratch"]
    again, _ = index_images(tmp_path, test_normals=0.3, seed=3)
    assert [c.path for c in again.select(split="test")] == [c.path for c in test]
    assert masks == {}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_formats_read_as_gray_and_rgb(tmp_path, suffix):
    pixels, _ = picture(np.random.default_rng(0), rgb=True)
    path = tmp_path / f"p{suffix}"
    Image.fromarray(pixels).save(path)
    gray, own = read_image(path, image_config({"size": 8}))
    rgb, _ = read_image(path, image_config({"size": [8, 12], "mode": "rgb"}))
    assert own == (SIDE, SIDE) and gray.shape == (1, 8, 8) and rgb.shape == (3, 8, 12)
    assert 0 <= gray.min() and gray.max() <= 1 and rgb.dtype == np.float32


def test_sixteen_bit_tiff_keeps_its_range(tmp_path):
    path = tmp_path / "deep.tiff"
    Image.fromarray(np.full((SIDE, SIDE), 65535, dtype=np.uint16)).save(path)
    values, _ = read_image(path, image_config({"size": SIDE}))
    assert values.max() == pytest.approx(1.0)


# ---------------------------------------------------------------------- bad input
def test_an_unreadable_picture_is_named_and_skip_leaves_a_training_one_out(tmp_path):
    root = inspection(tmp_path / "d", n_train=4, n_test=1)
    bad = root / "train" / "good" / "broken.png"
    bad.write_bytes(b"not a png at all")
    dm = ImageDataModule(root, image={"size": SIDE})
    with pytest.raises(ImageError, match=r"broken.png: cannot be read as a picture.*on_bad_file=skip"):
        dm.setup()
    dm = ImageDataModule(root, image={"size": SIDE}, on_bad_file="skip", val_fraction=0.0)
    dm.setup()
    assert len(dm.tables["fit"]) == 4 and [Path(p).name for p, _ in dm.skipped] == ["broken.png"]
    (root / "test" / "good" / "broken.png").write_bytes(b"junk")
    dm = ImageDataModule(root, image={"size": SIDE}, on_bad_file="skip")
    with pytest.raises(ImageError, match=r"test.good.broken.png"):
        dm.setup()  # a test picture is never left out


def test_mixed_sizes_without_resize_are_an_error_naming_the_file(tmp_path):
    root = inspection(tmp_path / "d", n_train=3, n_test=1)
    save(root / "train" / "good" / "big.png", np.zeros((20, 24), dtype=np.uint8))
    with pytest.raises(ImageError, match=r"big.png: 20x24 pixels.*data.image.resize=false"):
        ImageDataModule(root, image={"size": SIDE, "resize": False}).setup()
    dm = ImageDataModule(root, image={"size": SIDE})  # resize (the default) takes it
    dm.setup()
    assert dm.datasets["fit"][0]["wave"].shape == (SIDE * SIDE,)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: (r / "train" / "good").mkdir(parents=True), r"no normal training pictures"),
        (lambda r: r.mkdir(), r"no picture folders in a known layout"),
        (lambda r: save(r / "train" / "good" / "notes.txt.png", np.zeros((4, 4), np.uint8))
         or (r / "train" / "good" / "notes.txt").write_text("x"), r"notes.txt: not a picture file"),
        (lambda r: save(r / "train" / "good" / "a.png", np.zeros((4, 4), np.uint8))
         or save(r / "train" / "crack" / "b.png", np.zeros((4, 4), np.uint8)), r"\['crack'\] beside good/"),
    ],
    ids=["empty", "no-layout", "not-a-picture", "defects-in-train"],
)  # fmt: skip
def test_folders_that_cannot_be_used_get_one_clear_error(tmp_path, make, message):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(ImageError, match=message):
        index_images(root)


def test_a_missing_root_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not a folder"):
        index_images(tmp_path / "nowhere")
    with pytest.raises(AsdError, match="data.root"):
        ImageDataModule(None)


# ---------------------------------------------------------------------- layout, front end, selection
def test_patch_layout_round_trips_and_patches_are_contiguous():
    layout = ImageLayout(3, 8, 12, patch=4)
    image = np.arange(3 * 8 * 12, dtype=np.float32).reshape(3, 8, 12)
    flat = layout.to_flat(image)
    np.testing.assert_array_equal(layout.to_image(flat), image)
    w = layout.windowing()
    assert (w.size, w.hop, w.align, layout.grid) == (48, 48, 48, (2, 3))
    second = flat[w.size : 2 * w.size].reshape(3, 4, 4)  # patch (row 0, column 1)
    np.testing.assert_array_equal(second, image[:, 0:4, 4:8])
    with pytest.raises(AsdError, match="does not tile"):
        ImageLayout(1, 10, 12, patch=4)


def test_random_patches_start_on_the_grid(tmp_path):
    root = inspection(tmp_path / "d", n_train=4, n_test=1)
    dm = ImageDataModule(root, image={"size": SIDE, "patch": 8}, batches_per_epoch=3, batch_size=4)
    dm.setup()
    sampler = dm.train_dataloader().sampler
    starts = [s for _, s in sampler]
    assert len(starts) == 12 and all(s % 64 == 0 and 0 <= s <= 3 * 64 for s in starts)


def test_image_frontend_stacks_channels_as_rows():
    front = ImageFrontend(channels=3, height=4, width=5)
    out = front(torch.arange(60.0).reshape(1, 60))
    assert out.shape == (1, 12, 5) and front.n_mels == 12
    torch.testing.assert_close(out[0, 4], torch.arange(20.0, 25.0))  # row 0 of channel 1
    with pytest.raises(AsdError, match="expected 3x4x5 = 60"):
        front(torch.zeros(2, 59))


def test_audio_members_are_refused_by_name_and_left_out_of_all():
    assert member_names(config("data.root=/x")) == [
        *[n for n in IMAGE_MEMBERS if n.startswith("b")],
        "dcase_ae",
        "stats",
    ]
    with pytest.raises(AsdError, match=r"\['b1'\] only make sense for audio.*Audio Spectrogram"):
        member_names(config("data.root=/x", "branch=[b1,b2]"))


# ---------------------------------------------------------------------- whole runs
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rgb_patches_with_masks_run_end_to_end_with_pixel_auroc(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    root = inspection(tmp_path / "data" / "tiles", n_train=12, n_test=4, rgb=True)
    cfg = config(
        "logger=wandb",
        f"data.root='{root}'",
        f"run_dir='{tmp_path / 'run'}'",
        f"data.image.size=[{SIDE},{SIDE}]",
        "data.image.mode=rgb",
        "data.image.patch=8",
        "data.batches_per_epoch=2",
    )
    run = train(cfg)
    scores = read_csv(run / "scores.csv")
    assert len(scores) == 8
    pixels = read_csv(run / "pixel_metrics.csv")
    assert {r["member"] for r in pixels} == {"b2", "b4", "b6", "b7"}
    assert all(0.0 <= float(r["pixel_auroc"]) <= 1.0 and r["pictures"] == "8" for r in pixels)
    summary = (run / "summary.md").read_text()
    assert "official score convention: DCASE 2020" in summary and "pixel AUROC" in summary
    assert (run / "plots" / "pseudo_anomalies.png").exists()
    assert any(p.name.startswith("heatmap_b2_") for p in (run / "plots").iterdir())
    # wandb as for audio: the offline run holds the metrics table, the pixel AUROC and the heatmaps
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    deadline = time.monotonic() + 30  # wandb's service process finishes writing after finish() returns
    while b"test/metrics" not in (records := offline[0].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for key in ("test/metrics", "test/b2/pixel_auroc", "test/zmean/official", "plots/heatmap/heatmap_b2"):
        assert key.encode() in records, key
    with pytest.raises(AsdError, match=r"run on pictures.*not built yet"):
        FinishedRun(run)  # tools/score.py reads audio


def test_midpoint_thresholds_on_pictures_are_refused_before_training(tmp_path):
    root = inspection(tmp_path / "d", n_train=3, n_test=1)
    cfg = config(f"data.root='{root}'", f"run_dir='{tmp_path / 'run'}'", "threshold=midpoint",
                 f"validation_anomalies='{root / 'test' / 'square'}'")  # fmt: skip
    with pytest.raises(AsdError, match="threshold=midpoint with data=images"):
        train(cfg)


def test_digits_example_runs_end_to_end_with_debug_default(tmp_path):
    out = tmp_path / "digits"
    made = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_digits.py"), "--out", str(out), "--normal", "3",
         "--size", "16", "--anomalies-per-digit", "2"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert len(list((out / "test").glob("digit_*"))) == 9 and not (out / "test" / "digit_3").exists()
    again = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_digits.py"), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert again.returncode == 2 and "not an empty folder" in again.stderr
    # the learned fusions are candidates here (12 held-out normals): judged on pseudo-anomaly kinds
    # left out of their fits (fusion.select.split=kind), end to end
    run = train(
        config(
            f"data.root='{out}'",
            f"run_dir='{tmp_path / 'run'}'",
            "data.image.size=[16,16]",
            "fusion.select.split=kind",
        )
    )
    rows = read_csv(run / "metrics.csv")
    official = {r["method"]: float(r["official"]) for r in rows if r["machine"] == "all"}
    section = {r["method"]: r for r in rows if r["machine"] == "digits"}
    assert set(official) >= {"b2", "b7", "stats_mahalanobis", "zmean", "meta", "attention"}
    assert all(0.0 <= v <= 1.0 for v in official.values())
    # DCASE 2020 convention on pictures: the section's official score is the mean of its AUC and pAUC
    b2 = section["b2"]
    assert official["b2"] == pytest.approx((float(b2["auc"]) + float(b2["pauc"])) / 2)
    assert int(b2["n_normal"]) == len(list((out / "test" / "good").iterdir())) and b2["n_anomaly"] == "18"
    summary = (run / "summary.md").read_text()
    for member in ("b2", "b4", "b5", "b6", "b7", "dcase_ae_mse", "stats_mahalanobis"):
        assert f"| {member} |" in summary
    assert "| b1 |" not in summary and "| b3 |" not in summary
    # no time statistics on pictures: the mean statistics' column is the fused reference
    assert "| stats_temporal |" not in summary
    assert "(fusion.references): stats_mahalanobis" in summary
    assert "fitted without the judged clips' fold and kinds (4 fits)" in summary
    assert not (run / "pixel_metrics.csv").exists()  # digits have no masks
