"""benchmarks/bench_member_threads.py: members stepped side by side in threads against the joint step."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_member_threads as bmt  # noqa: E402
from bench_train import ENSEMBLE, batches, build_model, compose_config, setup_data  # noqa: E402

from asd.run.build import data_facts  # noqa: E402


def test_balanced_groups_put_the_longest_first_into_the_lighter_group():
    # a 5 -> g0 (5), b 4 -> g1 (4), c 3 -> g1 (7), d 3 -> g0 (8), e 1 -> g1 (8)
    times = {"e": 1.0, "c": 3.0, "a": 5.0, "d": 3.0, "b": 4.0}
    assert bmt.balanced_groups(times) == [["a", "d"], ["b", "c", "e"]]
    # equal loads go to the first group; three groups
    assert bmt.balanced_groups({"x": 1.0, "y": 1.0, "z": 1.0}, groups=3) == [["x"], ["y"], ["z"]]
    assert bmt.balanced_groups({"x": 2.0, "y": 1.0, "z": 1.0}) == [["x"], ["y", "z"]]


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["debug=default", "branch=[b2,b6]", "reference=false"])
    dm = setup_data(cfg)
    return cfg, dm


def test_member_steps_one_after_another_equal_the_joint_step(tiny):
    # the threads' work (each member's zero_grad, loss, backward, step) is the joint step's: from the
    # same weights, batch and random state, one step of each leaves the same parameters
    cfg, dm = tiny
    torch.manual_seed(0)
    model = build_model(cfg, data_facts(dm), ENSEMBLE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    joint = bmt.Stepper(model, batches(dm))
    alone = bmt.Stepper(copy.deepcopy(model), batches(dm))
    assert joint.names == alone.names == ["b2", "b6"]
    batch = joint.batch()
    alone.model.prime(batch)
    torch.manual_seed(1)
    joint.joint(batch)
    torch.manual_seed(1)
    alone.members(alone.with_flow(batch), alone.names)
    pairs = zip(joint.model.named_parameters(), alone.model.named_parameters(), strict=True)
    moved = 0
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, before[name]))
    assert moved > 0  # the step changed the weights: the comparison is not of two untouched models


def test_main_writes_every_way_and_the_ratio(tiny, tmp_path):
    args = ["--steps", "1", "--rounds", "1", "--warmup", "0", "--results", str(tmp_path), "--name", "t"]
    assert bmt.main([*args, "debug=default", "branch=[b2,b6]", "reference=false"]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert set(res["ms_per_step"]) == set(bmt.WAYS)
    assert all(v > 0 for v in res["ms_per_step"].values())
    assert sorted(n for g in res["groups"] for n in g) == ["b2", "b6"]
    ms = res["ms_per_step"]
    assert res["joint_over_threads"] == pytest.approx(ms["joint"] / ms["threads"])
    md = (tmp_path / "t.md").read_text()
    assert "joint / threads" in md and "| threads |" in md


def test_one_trainable_member_and_bad_counts_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bmt.main(["--results", str(tmp_path), "debug=default", "branch=[b2]", "reference=false"])
    assert "threads need at least 2" in capsys.readouterr().err
    refused = ((["--steps", "0"], "--steps must be at least 1"), (["--warmup", "-1"], "--warmup must be"))
    for bad, says in refused:
        with pytest.raises(SystemExit):
            bmt.main([*bad, "--results", str(tmp_path)])
        assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
