import copy
import functools
import logging
import math
from collections import defaultdict

import pytest
import pytorch_lightning as L
import torch
from helpers import quick_trainer
from hydra.utils import instantiate
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader

from asd.branches.dcase_ae import DcaseAEBranch
from asd.branches.transformer_ae import TransformerAEBranch
from asd.diagnostics import StepRecorder
from asd.ensemble import Ensemble
from asd.errors import AsdError
from asd.features import LogMel
from asd.members import BRANCHES, select_branches, select_frozen
from asd.run.build import build_scheduler

SAMPLES = 4000  # 0.25 s at 16 kHz


def tiny_members() -> dict:
    def frontend():
        return LogMel(n_fft=256, hop_length=128, n_mels=16)

    return {
        "b2": TransformerAEBranch(
            frontend(),
            num_samples=SAMPLES,
            patch_freq=8,
            patch_time=4,
            dim=16,
            depth=1,
            decoder_depth=1,
            heads=2,
            dropout=0.1,
        ),
        "dcase_ae": DcaseAEBranch(frontend(), hidden=16, bottleneck=4),
    }


def batches(n: int = 4, size: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        out.append(
            {
                "wave": torch.randn(size, SAMPLES, generator=gen) * 0.1,
                "section": torch.zeros(size, dtype=torch.long),
                "domain": torch.zeros(size, dtype=torch.long),
                "machine": torch.zeros(size, dtype=torch.long),
                "attribute": torch.zeros(size, dtype=torch.long),
                "is_target": torch.zeros(size, dtype=torch.bool),
                "is_normal": torch.ones(size, dtype=torch.bool),
                "index": torch.arange(i * size, (i + 1) * size),
            }
        )
    return out


def fit(ensemble: Ensemble, steps: int = 4) -> None:
    trainer = quick_trainer(steps)
    trainer.fit(ensemble, DataLoader(batches(steps), batch_size=None))


def snapshot(module: torch.nn.Module) -> dict:
    return copy.deepcopy(dict(module.state_dict()))


def same(a, b) -> bool:
    """Bit-identical tensors, recursing into the dicts that extra states are."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("frozen", ["b2", "dcase_ae"])
def test_frozen_member_state_dict_is_bit_identical_after_real_steps(frozen):
    torch.manual_seed(0)
    ensemble = Ensemble(tiny_members(), frozen=[frozen])
    other = next(n for n in ensemble.members if n != frozen)
    before, before_other = snapshot(ensemble.members[frozen]), snapshot(ensemble.members[other])
    assert any(k.endswith("running_mean") for k in snapshot(ensemble.members["dcase_ae"]))  # buffers exist
    fit(ensemble)
    after, after_other = ensemble.members[frozen].state_dict(), ensemble.members[other].state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert same(v, after[k]), f"frozen {frozen}: {k} moved"
    moved = [k for k, v in before_other.items() if not same(v, after_other[k])]
    assert moved, f"the trainable member {other} did not change"
    # buffers of the trainable member moved too (BatchNorm statistics / b2 bin statistics)
    assert any("running" in k or "stats" in k or "mean" in k for k in moved)


def test_train_mode_is_reapplied_and_frozen_member_has_no_optimizer():
    ensemble = Ensemble(tiny_members(), frozen=["dcase_ae"])
    ensemble.train()
    assert not ensemble.members["dcase_ae"].training and ensemble.members["b2"].training
    assert all(not p.requires_grad for p in ensemble.members["dcase_ae"].parameters())
    optimizers = ensemble.configure_optimizers()
    assert len(optimizers) == 1
    ids = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    assert ids == {id(p) for p in ensemble.members["b2"].parameters()}


def test_per_member_optimizer_settings_are_kept():
    members = tiny_members()
    members["b2"].optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.5)
    optimizers = Ensemble(members).configure_optimizers()
    assert [type(o).__name__ for o in optimizers] == ["SGD", "AdamW"]
    assert optimizers[0].param_groups[0]["lr"] == 0.5


def test_member_restores_from_ensemble_and_member_checkpoints(tmp_path):
    torch.manual_seed(1)
    trained = Ensemble(tiny_members())
    fit(trained, steps=2)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ens.ckpt")
    torch.save(trained.members["b2"].state_dict(), tmp_path / "b2.pt")
    for path in ("ens.ckpt", "b2.pt"):
        fresh = Ensemble(tiny_members())
        fresh.load_member("b2", tmp_path / path)
        for k, v in trained.members["b2"].state_dict().items():
            assert torch.equal(v, fresh.members["b2"].state_dict()[k])
    with pytest.raises(AsdError, match="does not fit member dcase_ae"):
        Ensemble(tiny_members()).load_member("dcase_ae", tmp_path / "b2.pt")
    with pytest.raises(AsdError, match="no such file"):
        Ensemble(tiny_members()).load_member("b2", tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(AsdError, match="not a readable"):
        Ensemble(tiny_members()).load_member("b2", tmp_path / "junk.ckpt")


def test_select_branches():
    assert select_branches("all") == list(BRANCHES) == ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]
    assert select_branches("b2") == ["b2"]
    assert select_branches(["b3", "b2", "b3"]) == ["b3", "b2"]
    with pytest.raises(AsdError, match=r"unknown branch \['b9'\].*'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7'"):
        select_branches("b9")
    with pytest.raises(AsdError, match="selects no member"):
        select_branches([])


def test_select_frozen():
    assert select_frozen("b2", ["b2", "dcase_ae"]) == ["b2"]
    assert select_frozen(None, ["b2"]) == []
    with pytest.raises(AsdError, match=r"freeze=\['b3'\] names members that are not selected"):
        select_frozen(["b3"], ["b2"])


# ---------------------------------------------------------------- clipping and schedulers per member
class RawGradNorms(L.Callback):
    """Each member's gradient norm when its optimizer steps: unscaled by AMP, not yet clipped.

    Lightning runs the callbacks' `on_before_optimizer_step` before the module's, where the ensemble clips.
    """

    def __init__(self):
        self.norms: dict[str, list[float]] = defaultdict(list)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        name = pl_module.member_of(optimizer)
        self.norms[name].append(float(pl_module.grad_norm(name)))


class LearningRates(L.Callback):
    """Each member's learning rate after every training step."""

    def __init__(self):
        self.lrs: dict[str, list[float]] = defaultdict(list)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, opt in zip(pl_module.trainable, trainer.optimizers, strict=True):
            self.lrs[name].append(opt.param_groups[0]["lr"])


def sgd_members(lr: float = 0.1) -> dict:
    members = tiny_members()
    members["b2"].optimizer_factory = lambda params: torch.optim.SGD(params, lr=lr)
    return members


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-grad-scaler"])
def test_gradient_clip_is_per_member_and_the_logged_norm_is_the_raw_one(amp):
    torch.manual_seed(0)
    clip = 1e-3  # far below b2's gradient norm, so every step clips
    ensemble = Ensemble(tiny_members(), gradient_clip={"b2": clip, "dcase_ae": None}, grad_norm_every=1)
    raw, after = RawGradNorms(), StepRecorder()  # after: norms once the step is done (grads kept)
    # under a GradScaler, gradients are scaled by 1024 until Lightning unscales them inside opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)] if amp else []
    trainer = quick_trainer(6, callbacks=[raw, after], plugins=plugins)  # 3 batches x 2 optimizer steps
    trainer.fit(ensemble, DataLoader(batches(3), batch_size=None))
    post = {n: [row[f"{n}/grad_norm"] for row in after.rows] for n in ensemble.members}
    assert len(post["b2"]) == len(raw.norms["b2"]) == 3
    assert all(norm > 10 * clip for norm in raw.norms["b2"])
    assert all(norm <= clip for norm in post["b2"])
    assert post["b2"] == pytest.approx([clip] * 3, rel=1e-3)  # clipped to the norm, not to norm / scale
    assert post["dcase_ae"] == raw.norms["dcase_ae"]  # not clipped
    logged = trainer.callback_metrics
    assert logged["train/b2/grad_norm"].item() == pytest.approx(raw.norms["b2"][-1])
    assert logged["train/dcase_ae/grad_norm"].item() == pytest.approx(raw.norms["dcase_ae"][-1])
    assert "train/b2/lr" not in logged  # no scheduler, no lr key


def test_one_gradient_clip_value_is_for_every_trainable_member():
    assert Ensemble(tiny_members(), gradient_clip=0.5).gradient_clip == {"b2": 0.5, "dcase_ae": 0.5}
    assert Ensemble(tiny_members(), gradient_clip=0.5, frozen=["b2"]).gradient_clip == {"dcase_ae": 0.5}
    assert Ensemble(tiny_members()).gradient_clip == {}


STEP_LR = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2, "gamma": 0.5}


@pytest.mark.parametrize(
    "factory, expected",
    [
        # what hydra builds from a `branches.b2.scheduler` node
        (lambda: instantiate(STEP_LR), lambda k: 0.1 * 0.5 ** (k // 2)),
        (lambda: functools.partial(LambdaLR, lr_lambda=lambda k: 1 / (1 + k)), lambda k: 0.1 / (1 + k)),
    ],
    ids=["StepLR", "LambdaLR"],
)
def test_member_scheduler_moves_its_lr_by_the_hand_computed_sequence(factory, expected):
    ensemble = Ensemble(sgd_members(0.1), schedulers={"b2": factory(), "dcase_ae": None}, grad_norm_every=1)
    lrs = LearningRates()
    trainer = quick_trainer(10, callbacks=[lrs])  # 5 batches: 5 steps of each member
    trainer.fit(ensemble, DataLoader(batches(5), batch_size=None))
    assert lrs.lrs["b2"] == pytest.approx([expected(k) for k in range(1, 6)])  # after step k
    assert lrs.lrs["dcase_ae"] == [1e-3] * 5  # no scheduler: its lr stays
    # logged: the lr the last step used, before its scheduler step
    assert trainer.callback_metrics["train/b2/lr"].item() == pytest.approx(expected(4))
    assert "train/dcase_ae/lr" not in trainer.callback_metrics


COSINE = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": "auto"}


@pytest.mark.parametrize(
    "limits, n_batches, steps",
    [
        # max_steps counts both members' steps (manual optimisation): 10 global steps = 5 per member
        ({"max_steps": 10}, 5, 5),
        ({"max_steps": -1, "max_epochs": 2}, 3, 6),  # 2 epochs of 3 batches
        ({"max_steps": 8, "max_epochs": 3}, 3, 4),  # the steps cap the epochs
    ],
    ids=["max_steps", "epochs", "capped"],
)
def test_an_auto_length_schedule_ends_with_the_fit(limits, n_batches, steps):
    factory = build_scheduler(COSINE, "branches.b2.scheduler")
    ensemble = Ensemble(sgd_members(0.1), schedulers={"b2": factory, "dcase_ae": None})
    lrs = LearningRates()
    trainer = quick_trainer(callbacks=[lrs], **limits)
    trainer.fit(ensemble, DataLoader(batches(n_batches), batch_size=None))
    # cosine from 0.1 to 0 over exactly the fit's steps of b2: the last step brings it to 0
    expected = [0.05 * (1 + math.cos(math.pi * k / steps)) for k in range(1, steps + 1)]
    assert lrs.lrs["b2"] == pytest.approx(expected, abs=1e-12)
    assert ensemble.member_schedulers()["b2"].T_max == steps
    assert lrs.lrs["dcase_ae"] == [1e-3] * steps


def test_an_auto_length_needs_a_fit_with_an_end():
    ensemble = Ensemble(sgd_members(0.1), schedulers={"b2": build_scheduler(COSINE, "branches.b2.scheduler")})
    with pytest.raises(AsdError, match=r"branches.b2.scheduler: T_max=auto needs a finite training length"):
        quick_trainer(-1, max_epochs=-1).fit(ensemble, DataLoader(batches(2), batch_size=None))


@pytest.mark.parametrize(
    "node, message",
    [
        ({**COSINE, "T_max": "auto", "total_iters": "auto"}, "T_max and total_iters are both auto"),
        ({**COSINE, "_target_": "torch.optim.lr_scheduler.CosineAnnealingLRR"}, "cannot be imported"),
        ({**COSINE, "eta_mn": 0.0}, "cannot build torch.optim.lr_scheduler.CosineAnnealingLR"),
    ],
    ids=["two-auto", "bad-target", "bad-argument"],
)
def test_a_bad_auto_length_node_fails_when_built_naming_the_key(node, message):
    with pytest.raises(AsdError, match=rf"branches.b2.scheduler.*{message}"):
        build_scheduler(node, "branches.b2.scheduler")


@pytest.mark.parametrize(
    "settings",
    [
        {"gradient_clip": {"b2": 1.0, "b9": 1.0}},
        {"schedulers": {"b9": functools.partial(StepLR, step_size=1)}},
    ],
    ids=["gradient_clip", "schedulers"],
)
def test_settings_for_members_not_in_the_ensemble_are_refused(settings):
    with pytest.raises(AsdError, match=r"is set for \['b9'\]: not members of this ensemble"):
        Ensemble(tiny_members(), **settings)


def test_settings_of_a_frozen_member_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="asd.ensemble"):
        ensemble = Ensemble(
            tiny_members(),
            frozen=["dcase_ae"],
            gradient_clip={"dcase_ae": 1.0},
            schedulers={"b2": None, "dcase_ae": functools.partial(StepLR, step_size=1)},
        )
    assert "gradient_clip of ['dcase_ae'] ignored" in caplog.text
    assert "scheduler of ['dcase_ae'] ignored" in caplog.text
    assert ensemble.gradient_clip == {} and ensemble.scheduler_factories == {}
    optimizers = ensemble.configure_optimizers()  # the plain list: no scheduler left
    assert len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.Optimizer)


@pytest.mark.parametrize(
    "factory",
    [functools.partial(ReduceLROnPlateau), lambda opt: {"scheduler": StepLR(opt, 1), "interval": "epoch"}],
    ids=["ReduceLROnPlateau", "dict"],
)
def test_a_factory_that_does_not_make_a_step_scheduler_is_refused(factory):
    ensemble = Ensemble(tiny_members(), schedulers={"b2": factory})
    with pytest.raises(AsdError, match="branches.b2.scheduler made"):
        ensemble.configure_optimizers()


def test_resume_from_a_checkpoint_continues_the_lr_sequence(tmp_path):
    def ensemble() -> Ensemble:
        return Ensemble(sgd_members(0.1), schedulers={"b2": functools.partial(ExponentialLR, gamma=0.5)})

    def loader() -> DataLoader:
        return DataLoader(batches(2), batch_size=None)

    expected = [0.1 * 0.5**k for k in range(1, 5)]  # after each of 4 steps
    whole = LearningRates()
    quick_trainer(8, callbacks=[whole]).fit(ensemble(), loader())  # 2 epochs of 2 batches
    assert whole.lrs["b2"] == pytest.approx(expected)

    first = quick_trainer(4)
    first.fit(ensemble(), loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [2]
    resumed, rest = ensemble(), LearningRates()  # a fresh scheduler would restart at lr 0.1
    quick_trainer(8, callbacks=[rest]).fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    assert rest.lrs["b2"] == pytest.approx(expected[2:])
    assert resumed.member_schedulers()["b2"].last_epoch == 4


def test_flow_input_is_embedded_in_eval_mode_and_moves_no_running_statistics():
    """b5's input comes from b3 as scored (eval mode); computing it leaves b3's BatchNorm buffers alone."""
    from asd.branches.contrastive import ContrastiveBranch
    from asd.branches.flow import FlowBranch

    torch.manual_seed(0)
    b3 = ContrastiveBranch(
        LogMel(n_fft=256, hop_length=128, n_mels=16),
        num_sections=1,
        classify="section",
        channels=(4, 8),
        emb_dim=8,
    )
    ensemble = Ensemble({"b3": b3, "b5": FlowBranch(None, input_dim=8, hidden=16, layers=2, blocks=1)})
    ensemble.train()
    batch = batches(1)[0]
    before = snapshot(b3)
    z = ensemble.with_flow_input(batch)["z"]
    assert same(snapshot(b3), before)  # no running mean/var/count moved
    assert b3.training  # its mode is restored
    b3.eval()
    assert torch.equal(z, b3.embed(batch).float())


def test_the_ensemble_checks_every_members_ids_on_the_cpu_batch():
    from asd.branches.flow import FlowBranch

    members = {
        **tiny_members(),
        "b5": FlowBranch(LogMel(n_mels=8), hidden=8, layers=2, blocks=1, conditional=True, num_sections=1),
    }
    ensemble = Ensemble(members)
    batch = batches(1)[0]
    ensemble.check_ids(batch)
    with pytest.raises(AsdError, match="b5: section ids"):
        ensemble.check_ids({**batch, "section": torch.ones_like(batch["section"])})
