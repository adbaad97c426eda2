"""A config sweep: every option of every config group composes, validates and builds its objects on CPU.

Each case takes the defaults and changes one group; the objects are the datamodule (indexed and
decoded, on tiny data), the ensemble, the logger and the trainer. A GPU trainer is built with
CUDA mocked, never run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as L
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.accelerators import CUDAAccelerator

from asd.config import validate
from asd.ensemble import Ensemble
from asd.run.build import (
    BudgetScheduler,
    build_datamodule,
    build_ensemble,
    build_logger,
    build_trainer,
    data_facts,
    signature,
    signature_changes,
)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
#: tiny synthetic data for the cases that keep data=synthetic without debug=default
TINY_SYNTHETIC = [
    "data.synthetic.sections=1",
    "data.synthetic.source_train=8",
    "data.synthetic.target_train=2",
    "data.synthetic.test_per_class=3",
    "data.synthetic.duration=1.0",
    "data.audio.duration=1.0",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def mimii_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset in the MIMII layout: one machine, rotor clips as id_00 and valve clips as id_02."""
    root = tmp_path_factory.mktemp("mimii")
    for machine, unit in (("rotor", "id_00"), ("valve", "id_02")):
        for split in ("train", "test"):
            for i, f in enumerate(sorted((tiny_root / machine / split).glob("*.wav"))):
                kind = "abnormal" if "_anomaly_" in f.name else "normal"
                dst = root / "fan" / unit / kind / f"{1 if split == 'train' else 2}{i:07d}.wav"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst)
    return root


@pytest.fixture(scope="module")
def dcase2020_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset renamed to the DCASE 2020 convention (<machine>/{train,test}/<label>_id_00_N.wav)."""
    root = tmp_path_factory.mktemp("dcase2020")
    for machine in ("rotor", "valve"):
        for split in ("train", "test"):
            for i, f in enumerate(sorted((tiny_root / machine / split).glob("*.wav"))):
                label = "anomaly" if "_anomaly_" in f.name else "normal"
                (root / machine / split).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, root / machine / split / f"{label}_id_00_{i:08d}.wav")
    return root


@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny pictures in the industrial-inspection layout (train/good, test/good, test/dent)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "parts"
    rng = np.random.default_rng(0)
    for folder, n in (("train/good", 6), ("test/good", 2), ("test/dent", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return root


def cases() -> list[tuple[str, list[str]]]:
    out = [(f"experiment={e}", [f"experiment={e}"]) for e in options("experiment")]
    out += [(f"trainer={t}", [f"trainer={t}"]) for t in options("trainer")]
    out += [(f"logger={lg}", [f"logger={lg}"]) for lg in options("logger")]
    out += [(f"data={d}", [f"data={d}"]) for d in options("data")]
    out += [(f"debug={d}", [f"debug={d}"]) for d in options("debug")]
    out += [("no debug", [])]
    return out


def data_overrides(overrides: list[str], roots: dict[str, Path]) -> list[str]:
    """Point each case at tiny data: its own folder layout where the case names one."""
    chosen = " ".join(overrides)
    if "data=mimii" in chosen or "experiment=mimii" in chosen:
        return [f"data.root={roots['mimii']}", "data.mimii_train_normals=6", "data.audio.duration=1.0"]
    if "experiment=dcase2020" in chosen:
        return [f"data.root={roots['dcase2020']}", "data.audio.duration=1.0"]
    if "data=images" in chosen:
        return [f"data.root={roots['images']}", "data.image.size=[16,16]"]
    if any(k in chosen for k in ("data=dcase", "experiment=dcase")):
        return [f"data.root={roots['dcase2023']}", "data.audio.duration=1.0"]
    return [] if "debug=default" in chosen else TINY_SYNTHETIC


@pytest.mark.parametrize(("case", "overrides"), cases(), ids=[c for c, _ in cases()])
def test_every_option_composes_validates_and_builds(
    case, overrides, tiny_root, mimii_root, dcase2020_root, images_root, tmp_path, monkeypatch
):
    roots = {"dcase2023": tiny_root, "dcase2020": dcase2020_root, "mimii": mimii_root, "images": images_root}
    extra = data_overrides(overrides, roots)
    if "experiment=full" in overrides:
        extra.append("branches.b1.weights=scratch")  # tests never download; the hub id is the user's
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *extra, f"run_dir={tmp_path / 'run'}"])
    validate(cfg)
    dm = build_datamodule(cfg)
    dm.setup()
    assert len(dm.tables["fit"]) and len(dm.tables["test"])
    ensemble = build_ensemble(cfg, data_facts(dm))
    assert isinstance(ensemble, Ensemble) and list(ensemble.members)
    for name in {"b2", "b6", "b7"} & set(ensemble.members):
        # the error's time statistics are for audio: pictures score the error profile alone
        want = "mahalanobis" if "data=images" in overrides else "temporal"
        assert ensemble.members[name].score_mode == want, (name, case)
    # lr_schedule=cosine: every trained member but the baseline AE decays over each fit's own steps
    scheduled = {n for n, f in ensemble.scheduler_factories.items() if isinstance(f, BudgetScheduler)}
    assert scheduled == set(ensemble.trainable) - {"dcase_ae"}
    logger = build_logger(cfg, tmp_path / "run")
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        # built as it would be on a CUDA machine, never run here
        monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
        monkeypatch.setattr(CUDAAccelerator, "parse_devices", staticmethod(lambda devices: [0]))
        monkeypatch.setattr(
            CUDAAccelerator, "get_parallel_devices", staticmethod(lambda devices: [torch.device("cuda", 0)])
        )
    trainer = build_trainer(cfg, tmp_path / "run", logger)
    assert isinstance(trainer, L.Trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        assert isinstance(trainer.accelerator, CUDAAccelerator)
        assert trainer.precision == cfg.trainer.precision


def test_a_signature_names_what_changed_and_keeps_older_folders_without_the_modulation():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        now = compose("train", overrides=["branch=[b2]", "reference=[stats]"])
        off = compose(
            "train", overrides=["branch=[b2]", "reference=[stats]", "branches.stats.modulation=null"]
        )
    facts = {"machines": ["rotor"]}
    ours, plain_off = signature(now, facts), signature(off, facts)
    # modulation=null signs like a folder written before branches.stats.modulation: without both keys
    assert not {"modulation", "modulation_smooth"} & set(plain_off["config"]["stats"])
    assert plain_off["hash"] != ours["hash"]
    text = signature_changes(plain_off, ours)
    assert text.startswith("branches.stats.modulation: absent there, {") and "now" in text
    assert "branches.stats.modulation_smooth: absent there, 9 now" in text
    with initialize_config_dir(str(CONF), version_base="1.3"):
        other = compose("train", overrides=["branch=[b2]", "reference=[stats]", "branches.b2.dim=32"])
    changed = signature_changes(ours, signature(other, facts))
    assert changed.startswith("branches.b2.dim: ") and changed.endswith(", 32 now")
    assert signature_changes(ours, signature(now, {"machines": ["valve"]})) == (
        'data.machines: ["rotor"] there, ["valve"] now'
    )
    assert "no readable configuration" in signature_changes(None, ours)
