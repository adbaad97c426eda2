import copy

import pytest
import torch
from helpers import quick_trainer
from torch.utils.data import DataLoader

from asd.branches.dcase_ae import DcaseAEBranch
from asd.branches.transformer_ae import TransformerAEBranch
from asd.ensemble import BRANCHES, Ensemble, select_branches, select_frozen
from asd.errors import AsdError
from asd.features import LogMel

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
    assert select_branches("all") == list(BRANCHES) == ["b1", "b2", "b3", "b4", "b5"]
    assert select_branches("b2") == ["b2"]
    assert select_branches(["b3", "b2", "b3"]) == ["b3", "b2"]
    with pytest.raises(AsdError, match=r"unknown branch \['b9'\].*'b1', 'b2', 'b3', 'b4', 'b5'"):
        select_branches("b9")
    with pytest.raises(AsdError, match="selects no member"):
        select_branches([])


def test_select_frozen():
    assert select_frozen("b2", ["b2", "dcase_ae"]) == ["b2"]
    assert select_frozen(None, ["b2"]) == []
    with pytest.raises(AsdError, match=r"freeze=\['b3'\] names members that are not selected"):
        select_frozen(["b3"], ["b2"])
