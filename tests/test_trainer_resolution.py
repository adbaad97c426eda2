"""What each `trainer=` option (and `trainer.devices=2`) trains on, with and without a (mocked) CUDA."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import pytorch_lightning as L
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from asd.ensemble import MemberMixedPrecision
from asd.members import plain
from asd.run import build
from asd.run.build import TrainerChoice, build_datamodule, build_trainer, resolve_trainer

CONF = str(Path(__file__).resolve().parents[1] / "conf")
NO_CUDA = (0, False)
BF16_GPUS = (2, True)  # e.g. A100/H100
FP16_GPUS = (2, False)  # e.g. V100/T4: no bf16


def trainer_node(*overrides: str) -> dict:
    with initialize_config_dir(CONF, version_base="1.3"):
        return plain(compose("train", overrides=list(overrides)).trainer)


@pytest.mark.parametrize(
    ("overrides", "hardware", "expected"),
    [
        # the default (trainer=auto): the headline `python train.py branch=all trainer.devices=2`
        ((), NO_CUDA, ("cpu", "auto", "32-true")),
        (("trainer.devices=2",), NO_CUDA, ("cpu", "ddp", "32-true")),
        ((), BF16_GPUS, ("gpu", "auto", "bf16-mixed")),
        (("trainer.devices=2",), BF16_GPUS, ("gpu", "ddp", "bf16-mixed")),
        (("trainer.devices=2",), FP16_GPUS, ("gpu", "ddp", "16-mixed")),
        (("trainer.devices=auto",), BF16_GPUS, ("gpu", "ddp", "bf16-mixed")),  # every GPU of the machine
        (("trainer.devices=auto",), NO_CUDA, ("cpu", "auto", "32-true")),
        # explicit values win over the hardware
        (("trainer.devices=2", "trainer.precision=32-true"), BF16_GPUS, ("gpu", "ddp", "32-true")),
        (("trainer.devices=2", "trainer.precision=16-mixed"), BF16_GPUS, ("gpu", "ddp", "16-mixed")),
        (("trainer.accelerator=cpu",), BF16_GPUS, ("cpu", "auto", "32-true")),
        (("trainer.devices=2", "trainer.strategy=ddp_spawn"), NO_CUDA, ("cpu", "ddp_spawn", "32-true")),
        (("trainer.precision=bf16-mixed",), NO_CUDA, ("cpu", "auto", "bf16-mixed")),  # bf16 on CPU
        (("trainer.precision=bf16",), NO_CUDA, ("cpu", "auto", "bf16-mixed")),  # Lightning's short name
        # the named presets
        (("trainer=cpu",), BF16_GPUS, ("cpu", "auto", "32-true")),
        (("trainer=cpu", "trainer.devices=2"), BF16_GPUS, ("cpu", "ddp", "32-true")),
        (("trainer=gpu",), BF16_GPUS, ("gpu", "auto", "16-mixed")),
        (("trainer=gpu", "trainer.devices=2"), FP16_GPUS, ("gpu", "ddp", "16-mixed")),
        (("trainer=gpu", "trainer.precision=auto"), BF16_GPUS, ("gpu", "auto", "bf16-mixed")),
        (("trainer=ddp",), BF16_GPUS, ("gpu", "ddp", "32-true")),
        (("trainer=ddp",), NO_CUDA, ("cpu", "ddp", "32-true")),
        (("trainer=ddp", "trainer.devices=1"), NO_CUDA, ("cpu", "ddp", "32-true")),  # ddp is explicit there
    ],
)
def test_each_trainer_option_resolves_to_accelerator_strategy_precision(overrides, hardware, expected):
    choice = resolve_trainer(trainer_node(*overrides), *hardware)
    assert (choice.accelerator, choice.strategy, choice.precision) == expected


def test_devices_pass_through_and_the_choice_reads_as_one_line():
    choice = resolve_trainer(trainer_node("trainer.devices=[0,1]"), *BF16_GPUS)
    assert choice == TrainerChoice("gpu", [0, 1], "ddp", "bf16-mixed")
    assert choice.describe() == "accelerator=gpu devices=[0, 1] strategy=ddp precision=bf16-mixed"


def mock_cuda(monkeypatch, hardware: tuple[int, bool]) -> None:
    """This machine as one with `hardware` GPUs, for building (never running) a Trainer."""
    count = hardware[0]
    monkeypatch.setattr(build, "hardware", lambda: hardware)
    if count:
        monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
        monkeypatch.setattr(CUDAAccelerator, "parse_devices", staticmethod(lambda d: list(range(count))))
        monkeypatch.setattr(
            CUDAAccelerator,
            "get_parallel_devices",
            staticmethod(lambda d: [torch.device("cuda", i) for i in d]),
        )


@pytest.mark.parametrize(
    ("hardware", "accelerator", "strategy", "precision"),
    [
        (NO_CUDA, CPUAccelerator, DDPStrategy, "32-true"),
        (BF16_GPUS, CUDAAccelerator, DDPStrategy, "bf16-mixed"),
        (FP16_GPUS, CUDAAccelerator, DDPStrategy, "16-mixed"),
    ],
)
def test_the_headline_command_builds_this_trainer(
    hardware, accelerator, strategy, precision, monkeypatch, tmp_path, caplog
):
    mock_cuda(monkeypatch, hardware)
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("train", overrides=["branch=all", "trainer.devices=2", f"run_dir={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="asd.run.build"):
        trainer = build_trainer(cfg, tmp_path, logger=False, checkpoints=False)
    assert isinstance(trainer, L.Trainer)
    assert isinstance(trainer.accelerator, accelerator) and isinstance(trainer.strategy, strategy)
    assert trainer.num_devices == 2 and trainer.precision == precision
    # 16-mixed: one scaler for every member, updated once per step (test_amp.py)
    assert isinstance(trainer.precision_plugin, MemberMixedPrecision) == (precision == "16-mixed")
    kind = "gpu" if accelerator is CUDAAccelerator else "cpu"
    line = f"trainer: accelerator={kind} devices=2 strategy=ddp precision={precision}"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainer:")] == [line]


def test_one_device_is_one_process(monkeypatch, tmp_path):
    mock_cuda(monkeypatch, NO_CUDA)
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"run_dir={tmp_path}"])
    trainer = build_trainer(cfg, tmp_path, logger=False, checkpoints=False)
    assert isinstance(trainer.strategy, SingleDeviceStrategy) and trainer.precision == "32-true"


@pytest.mark.parametrize(("hardware", "pinned"), [(NO_CUDA, False), (BF16_GPUS, True)])
def test_loaders_pin_memory_on_a_gpu_and_keep_their_workers(hardware, pinned, tiny_root, monkeypatch):
    mock_cuda(monkeypatch, hardware)
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"data.root={tiny_root}", "data.num_workers=1", "debug=default"])
    dm = build_datamodule(cfg)
    dm.setup()
    loader = dm.train_dataloader()
    assert dm.pin_memory is pinned and loader.pin_memory is pinned
    assert loader.persistent_workers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_this_gpu_machine_the_default_picks_gpu_and_mixed_precision():
    choice = resolve_trainer(trainer_node(), *build.hardware())
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert (choice.accelerator, choice.precision) == ("gpu", expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_default_run_trains_and_scores_on_the_gpu_in_mixed_precision(tmp_path):
    from asd.run import train

    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("train", overrides=["debug=default", "branch=b2", "plots=false", f"run_dir={tmp_path}"])
    run = train(cfg)
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    summary = (run / "summary.md").read_text()
    assert f"trained with accelerator=gpu devices=1 strategy=auto precision={expected}" in summary
    with open(run / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(math.isfinite(float(r["final"])) for r in rows)
