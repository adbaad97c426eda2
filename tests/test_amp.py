"""16-mixed in the ensemble's manual optimisation: one scaler, `step` per member, one `update` per step."""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager

import pytest
import pytorch_lightning as L
import torch
from helpers import quick_trainer
from test_ensemble import batches, tiny_members
from torch.utils.data import DataLoader

from asd.branches.dcase_ae import DcaseAEBranch
from asd.ensemble import Ensemble, MemberMixedPrecision
from asd.features import LogMel

STEPS = 3


class FakeScaler:
    """A GradScaler stand-in that records its calls; 'finds' inf/NaN in the training steps listed.

    It scales by a power of two, so scaled-then-unscaled gradients equal fp32 ones bit for bit.
    """

    def __init__(self, scale: float = 1024.0, inf_steps: tuple[int, ...] = ()):
        self.value, self.inf_steps = scale, set(inf_steps)
        self.calls: list[tuple[str, object]] = []
        self.iteration = 0  # training steps seen, counted by update()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls.append(("scale", None))
        return loss * self.value

    def unscale_(self, optimizer) -> None:
        self.calls.append(("unscale_", optimizer))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.value)

    def step(self, optimizer, **kwargs):
        self.calls.append(("step", optimizer))
        return None if self.iteration in self.inf_steps else optimizer.step(**kwargs)

    def update(self) -> None:
        self.calls.append(("update", None))
        if self.iteration in self.inf_steps:
            self.value /= 2
        self.iteration += 1

    def get_scale(self) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"scale": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["scale"]


class Fp32Compute(MemberMixedPrecision):
    """The plugin's scaler bookkeeping with fp32 compute, so a run's numbers equal an fp32 run's."""

    @contextmanager
    def forward_context(self):
        yield


class Logged(L.Callback):
    """What the ensemble logged at the end of each training step, and the members' parameters then."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key, value in trainer.callback_metrics.items():
            self.values[key].append(float(value))
        self.weights.append({k: p.detach().clone() for k, p in pl_module.named_parameters()})


def three_members() -> dict:
    """b2 and dcase_ae train; a third member stays frozen."""
    frontend = LogMel(n_fft=256, hop_length=128, n_mels=16)
    return {**tiny_members(), "frozen_ae": DcaseAEBranch(frontend, hidden=8, bottleneck=2)}


def run(members: dict, plugins: list) -> tuple[Ensemble, Logged, L.Trainer]:
    torch.manual_seed(0)
    ensemble = Ensemble(copy.deepcopy(members), frozen=["frozen_ae"], grad_norm_every=1)
    logged = Logged()
    trainer = quick_trainer(STEPS * len(ensemble.trainable), callbacks=[logged], plugins=plugins)
    trainer.fit(ensemble, DataLoader(batches(STEPS), batch_size=None))
    return ensemble, logged, trainer


def test_one_update_per_step_one_scaler_step_per_trainable_member_and_unscaled_norms_logged():
    torch.manual_seed(0)
    members = three_members()
    scaler = FakeScaler(scale=1024.0)
    ensemble, amp, trainer = run(members, [Fp32Compute("cpu", scaler=scaler)])
    optimizers = trainer.optimizers
    assert len(optimizers) == 2  # the frozen member has none
    per_step = [("scale", None)]
    for opt in optimizers:
        per_step += [("unscale_", opt), ("step", opt)]
    per_step.append(("update", None))
    assert len(scaler.calls) == len(per_step) * STEPS
    for got, want in zip(scaler.calls, per_step * STEPS, strict=True):
        assert got[0] == want[0] and got[1] is want[1]
    # the logged gradient norm is the unscaled one: equal to an fp32 run's, not 1024 times it
    _, fp32, _ = run(members, [])
    for name in ("b2", "dcase_ae"):
        key = f"train/{name}/grad_norm"
        assert len(amp.values[key]) == STEPS and min(fp32.values[key]) > 0
        assert amp.values[key] == pytest.approx(fp32.values[key], rel=1e-6)
    assert amp.values["train/amp/scale"] == [1024.0] * STEPS
    assert amp.values["train/amp/skipped_steps"] == [0.0] * STEPS
    assert "train/amp/scale" not in fp32.values  # no scaler, no AMP keys


def test_inf_steps_are_skipped_and_counted():
    members = three_members()
    _, logged, trainer = run(members, [Fp32Compute("cpu", scaler=FakeScaler(scale=1024.0, inf_steps=(1,)))])
    assert logged.values["train/amp/skipped_steps"] == [0.0, 1.0, 1.0]
    assert logged.values["train/amp/scale"] == [1024.0, 512.0, 512.0]
    before, skipped, after = logged.weights
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 1 moved nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in skipped)  # step 2 trained again
    assert trainer.precision_plugin.state_dict() == {"scaler": {"scale": 512.0}, "skipped_steps": 1}


def test_a_real_grad_scaler_backs_off_once_per_step_whatever_the_number_of_members():
    # fp16 autocast on CPU, a scale far too large for fp16 gradients: steps overflow and are skipped
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000)
    plugin = MemberMixedPrecision("cpu", scaler=scaler)
    _, logged, _ = run(three_members(), [plugin])
    skipped = plugin.skipped_steps
    assert 1 <= skipped <= STEPS
    assert logged.values["train/amp/skipped_steps"][-1] == skipped
    # Lightning's own plugin would back off once per member optimizer: 2 ** (40 - 2 * skipped) here
    assert scaler.get_scale() == 2.0 ** (40 - skipped)


def test_scaler_state_and_skipped_count_survive_a_checkpoint():
    plugin = MemberMixedPrecision("cpu", scaler=FakeScaler(scale=64.0))
    plugin.skipped_steps = 3
    restored = MemberMixedPrecision("cpu", scaler=FakeScaler(scale=1.0))
    restored.load_state_dict(plugin.state_dict())
    assert restored.scaler.get_scale() == 64.0 and restored.skipped_steps == 3
    older = MemberMixedPrecision("cpu", scaler=FakeScaler(scale=1.0))
    older.load_state_dict({"scale": 8.0})  # written by Lightning's MixedPrecision: the scaler's alone
    assert older.scaler.get_scale() == 8.0 and older.skipped_steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_16_mixed_on_a_gpu_trains_and_logs_the_scale():
    torch.manual_seed(0)
    ensemble = Ensemble(tiny_members(), grad_norm_every=1)
    logged = Logged()
    trainer = L.Trainer(
        max_steps=2 * STEPS,
        accelerator="gpu",
        devices=1,
        plugins=[MemberMixedPrecision("cuda")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[logged],
    )
    trainer.fit(ensemble, DataLoader(batches(STEPS), batch_size=None))
    assert len(logged.values["train/amp/scale"]) == STEPS
    assert all(torch.isfinite(torch.tensor(logged.values["train/b2/loss"])))
