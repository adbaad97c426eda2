"""Work done once per batch (issue 13): one log-mel module per setting with a memo of its last batch,
b1/b3 scored from the embeddings the flow's input already holds, and b2 decoding the latent it kept.
None may change a result."""

from __future__ import annotations

import copy

import pytest
import torch

from asd.errors import AsdError
from asd.features import LogMel, share_frontends
from asd.run.build import build_datamodule, build_ensemble, data_facts
from asd.run.calibrate import fit_backends
from asd.run.predict import member_scores
from tests.conftest import tiny_config


def test_logmel_returns_its_last_result_for_the_same_unchanged_wave():
    fe = LogMel()
    wave = torch.randn(2, 8000)
    calls = []
    compute = fe._compute
    fe._compute = lambda w: calls.append(1) or compute(w)
    first = fe(wave)
    second = fe(wave)
    assert len(calls) == 1 and second is not first  # computed once, handed out as copies
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    first.add_(1.0)  # a caller edits its result in place: nobody else's changes
    torch.testing.assert_close(fe(wave), second, rtol=0, atol=0)
    fe(wave.clone())  # another tensor: computed again
    assert len(calls) == 2
    wave.mul_(2.0)  # changed in place: the memo is stale
    again = fe(wave)
    assert len(calls) == 3 and not torch.allclose(again, second)
    torch.testing.assert_close(again, LogMel()(wave), rtol=0, atol=0)


def test_logmel_memo_is_per_grad_mode_and_never_for_waves_that_need_gradients():
    fe = LogMel()
    calls = []
    compute = fe._compute
    fe._compute = lambda w: calls.append(1) or compute(w)
    wave = torch.randn(1, 4000)
    with torch.inference_mode():
        fe(wave)
        fe(wave)
    assert len(calls) == 1
    outside = fe(wave)  # another mode: computed again, a normal tensor
    assert len(calls) == 2 and not outside.is_inference()
    needs = torch.randn(1, 4000, requires_grad=True)
    assert fe(needs).requires_grad and fe(needs).requires_grad and len(calls) == 4
    with torch.inference_mode():
        made_inside = torch.randn(1, 4000)  # an inference tensor: no version counter, no memo
        fe(made_inside)
        fe(made_inside)
    assert len(calls) == 6


def test_members_with_the_same_settings_share_one_module():
    a, b, c = (torch.nn.Module() for _ in range(3))
    a.frontend, b.frontend, c.frontend = LogMel(), LogMel(), LogMel(n_mels=64)
    groups = share_frontends({"a": a, "b": b, "c": c})
    assert a.frontend is b.frontend and c.frontend is not a.frontend
    assert list(groups.values()) == [["a", "b"]]


@pytest.fixture(scope="module")
def fitted(tiny_root):
    cfg = tiny_config(tiny_root)
    dm = build_datamodule(cfg)
    dm.setup()
    ensemble = build_ensemble(cfg, data_facts(dm))
    fit_backends(ensemble, dm, torch.device("cpu"))
    ensemble.eval()
    test = dm.datasets["test"]
    batch = {k: torch.stack([test[i][k] for i in range(len(test))]) for k in test[0]}
    return ensemble, batch


def test_shared_modules_and_reused_embeddings_change_no_score(fitted):
    ensemble, batch = fitted
    logmels = {
        id(m.frontend) for m in ensemble.members.values() if type(getattr(m, "frontend", None)) is LogMel
    }
    assert len(logmels) == 1  # the default members all read the same log-mel settings
    separate = copy.deepcopy(ensemble)
    for member in separate.members.values():
        if type(getattr(member, "frontend", None)) is LogMel:
            member.frontend = copy.deepcopy(member.frontend)
    with torch.inference_mode():
        ours = member_scores(ensemble, batch)
        flow_input = separate.with_flow_input(batch)
        assert {"z_b1", "z_b2", "z_b3", "z_b2_latent"} <= set(flow_input)  # what the members read back
        plain = {k: v for k, v in flow_input.items() if not k.startswith("z_")}
        theirs = {}
        for name, member in separate.members.items():
            for kind, s in member.scores(plain).items():
                theirs[f"{name}_{kind}" if kind else name] = s
    assert {"b1", "b3"} <= set(ours) and set(ours) == set(theirs)
    for column in ours:
        torch.testing.assert_close(ours[column], theirs[column], rtol=0, atol=0, msg=column)


def test_a_member_reuses_the_flow_inputs_embedding_only_in_eval_mode_without_gradients(fitted):
    ensemble, batch = fitted
    b3 = ensemble.members["b3"]
    marked = {**batch, "z_b3": torch.full((len(batch["wave"]), b3.embed_dim), 7.0)}
    with torch.no_grad():
        assert (b3.embedding(marked) == 7.0).all()
        b3.train()
        try:
            assert not (b3.embedding(marked) == 7.0).all()  # train mode: its own pass
        finally:
            b3.eval()
    assert not (b3.embedding(marked) == 7.0).all()  # gradients wanted: its own pass


def test_b2_decodes_the_flow_inputs_latent_only_in_eval_mode_without_gradients(fitted):
    ensemble, batch = fitted
    b2 = ensemble.members["b2"]
    with torch.no_grad():
        kept = b2.flow_outputs(batch)
        torch.testing.assert_close(kept["z_b2"], b2.embed(batch), rtol=0, atol=0)
        own = b2.error_map(batch)[1]  # no latent in the batch: its own encoder pass
        torch.testing.assert_close(b2.error_map({**batch, **kept})[1], own, rtol=0, atol=0)
        marked = {**batch, "z_b2_latent": torch.zeros_like(kept["z_b2_latent"])}
        decoded = b2.stats.denormalise(b2._unpatchify(b2._decode(marked["z_b2_latent"])))
        torch.testing.assert_close(b2.error_map(marked)[1], decoded, rtol=0, atol=0)  # the kept latent
        assert not torch.equal(decoded, own)
        b2.train()
        try:
            torch.manual_seed(0)
            trained_mode = b2.error_map(marked)[1]
            torch.manual_seed(0)
            torch.testing.assert_close(trained_mode, b2.error_map(batch)[1], rtol=0, atol=0)  # its own pass
        finally:
            b2.eval()
    # gradients wanted: its own pass (the Transformer's fast path runs only without them: rounding apart)
    torch.testing.assert_close(b2.error_map(marked)[1].detach(), own)
    fewer = {k: v[:2] for k, v in batch.items()}  # two clips, with the latent of all of them
    with torch.no_grad(), pytest.raises(AsdError, match="z_b2_latent .* is not the latent of its 2 clips"):
        b2.error_map({**fewer, "z_b2_latent": kept["z_b2_latent"]})
