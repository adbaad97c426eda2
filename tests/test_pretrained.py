"""b1, the Audio Spectrogram Transformer member: weights sources, windows, pooling, heads, checkpoints."""

from __future__ import annotations

import copy
import json
import logging
import math

import huggingface_hub.constants
import pytest
import pytorch_lightning as L
import torch
import torch.nn.functional as F
from helpers import quick_trainer
from torch.utils.data import DataLoader
from transformers import ASTConfig, ASTModel

from asd.branches.auxiliary import VIEWS
from asd.branches.pretrained import AngularHead, PretrainedASTBranch, window_starts
from asd.ensemble import Ensemble
from asd.errors import AsdError

SR, T = 16000, 8000  # 0.5 s clips -> 1 + (8000 - 400) // 160 = 48 Kaldi frames
SCRATCH = dict(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    patch_size=16,
    frequency_stride=16,
    time_stride=16,
    num_mel_bins=32,
)
#: a pre-trained-style config: 24-frame windows of 400 + 23 * 160 = 4080 samples
FOLDER_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=8,
    frequency_stride=8,
    time_stride=8,
    num_mel_bins=32,
    max_length=24,
)
WINDOW = 4080


def tiny(**kw) -> PretrainedASTBranch:
    args = dict(num_samples=T, num_sections=3, num_attributes=5, **SCRATCH)
    args.update(kw)
    return PretrainedASTBranch(**args)


def clips(n: int, num_samples: int = T, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sines of a few pitches; section = pitch class, attribute = a finer split of it."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / SR
    attribute = torch.arange(n) % 5
    freq = 200.0 + 300.0 * attribute[:, None]  # (n, 1)
    wave = 0.5 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(n, num_samples, generator=g)
    return {
        "wave": wave.float(),
        "section": attribute.clamp_max(2),
        "attribute": attribute,
        "machine": torch.zeros(n, dtype=torch.long),
        "domain": (torch.arange(n) % 4 == 3).long(),
        "is_target": torch.arange(n) % 4 == 3,
        "is_normal": torch.ones(n, dtype=torch.bool),
        "index": torch.arange(n),
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: on a busy machine, waking intra-op threads costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    """A local folder written by save_pretrained, with its state dict for comparison."""
    torch.manual_seed(1)
    model = ASTModel(ASTConfig(**FOLDER_CONFIG))
    path = tmp_path_factory.mktemp("ast")
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


# -- weights --------------------------------------------------------------------------------------


def test_scratch_sizes_follow_the_clip(caplog):
    with caplog.at_level(logging.INFO, logger="asd.branches.pretrained"):
        m = tiny(num_samples=8800)  # 1 + 8400 // 160 = 53 frames -> 16 + ceil(37 / 16) * 16 = 64
    assert m.weights_source == "scratch"
    assert "b1: AST weights from scratch (random init, trained here)" in caplog.text
    assert m.encoder.config.max_length == 64 and m.frontend.max_length == 64
    assert (m.grid_freq, m.grid_time, m.embed_dim) == (2, 4, 32)
    assert m.window == 400 + 63 * 160 >= 8800  # the clip is one window


def test_local_folder_loads_its_weights(folder, caplog):
    path, state = folder
    with caplog.at_level(logging.INFO, logger="asd.branches.pretrained"):
        m = PretrainedASTBranch(num_samples=WINDOW, num_sections=3, weights=str(path), hidden_size=999)
    assert m.weights_source == f"folder:{path.resolve()}"
    assert "AST weights from local folder" in caplog.text and "fine-tuned here" in caplog.text
    assert m.embed_dim == 32 and m.encoder.config.max_length == 24 and m.window == WINDOW
    loaded = m.encoder.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_hub_id_goes_through_from_pretrained(monkeypatch):
    calls = []

    def fake(cls, name, **kw):
        calls.append((name, kw))
        return ASTModel(ASTConfig(**FOLDER_CONFIG)), {"missing_keys": set(), "mismatched_keys": set()}

    monkeypatch.setattr(ASTModel, "from_pretrained", classmethod(fake))
    m = PretrainedASTBranch(num_samples=WINDOW, weights="org/some-ast", mode="frozen")
    assert calls == [("org/some-ast", {"output_loading_info": True})]
    assert m.weights_source == "hub:org/some-ast"


def test_unreachable_hub_id_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    with pytest.raises(AsdError) as err:
        PretrainedASTBranch(num_samples=T, num_sections=3, weights="asd-tests/no-such-ast")
    msg = str(err.value)
    assert "branches.b1.weights=asd-tests/no-such-ast" in msg
    assert "huggingface-cli download asd-tests/no-such-ast --local-dir DIR" in msg
    assert "branches.b1.weights=scratch" in msg


def test_bad_folders_are_clear_errors(folder, tmp_path):
    with pytest.raises(AsdError, match="no such folder.*weights=scratch"):
        PretrainedASTBranch(num_samples=T, weights=str(tmp_path / "missing" / "ast"), mode="frozen")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AsdError, match="no config.json"):
        PretrainedASTBranch(num_samples=T, weights=str(tmp_path / "empty"), mode="frozen")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(AsdError, match="is a file"):
        PretrainedASTBranch(num_samples=T, weights=str(tmp_path / "weights.pt"), mode="frozen")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(AsdError, match="model_type='vit'"):
        PretrainedASTBranch(num_samples=T, weights=str(vit), mode="frozen")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder[0] / "config.json").read_text())
    with pytest.raises(AsdError, match="cannot load the AST weights"):
        PretrainedASTBranch(num_samples=T, weights=str(no_weights), mode="frozen")


def test_checkpoint_missing_layers_is_refused_not_randomly_filled(folder, tmp_path):
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    config = json.loads((folder[0] / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights hold 2 layers
    (deeper / "config.json").write_text(json.dumps(config))
    (deeper / "model.safetensors").write_bytes((folder[0] / "model.safetensors").read_bytes())
    with pytest.raises(AsdError, match="missing from the checkpoint.*layers.2"):
        PretrainedASTBranch(num_samples=T, weights=str(deeper), mode="frozen")


# -- windows and pooling --------------------------------------------------------------------------


def test_window_starts():
    assert window_starts(100, 100) == [0]
    assert window_starts(60, 100) == [0]
    assert window_starts(200, 100) == [0, 100]
    assert window_starts(250, 100) == [0, 100, 150]  # the last window ends at the clip's end


def test_long_clip_embedding_is_the_mean_of_its_windows(folder):
    n = 2 * WINDOW + 1000  # windows at 0, 4080 and 5160
    long = PretrainedASTBranch(num_samples=n, weights=str(folder[0]), mode="frozen").eval()
    one = PretrainedASTBranch(num_samples=WINDOW, weights=str(folder[0]), mode="frozen").eval()
    wave = clips(2, num_samples=n)["wave"]
    parts = [one.embed({"wave": wave[:, s : s + WINDOW]}) for s in (0, WINDOW, n - WINDOW)]
    assert torch.allclose(long.embed({"wave": wave}), torch.stack(parts).mean(dim=0), atol=1e-5)


def test_mean_pooling_leaves_out_patches_over_padding(folder):
    # 2000 samples -> 11 frames padded to 24; time patches start at frames 0, 8, 16: the last is padding
    m = PretrainedASTBranch(num_samples=2000, weights=str(folder[0]), mode="frozen").eval()
    wave = clips(2, num_samples=2000)["wave"]
    hidden = m.encoder(input_values=m.frontend(wave)).last_hidden_state  # (2, 2 + 4 * 3, 32)
    patches = hidden[:, 2:].reshape(2, 4, 3, 32)  # (B, grid_freq, grid_time, hidden)
    assert torch.allclose(m.embed({"wave": wave}), patches[:, :, :2].mean(dim=(1, 2)), atol=1e-6)
    cls = PretrainedASTBranch(num_samples=2000, weights=str(folder[0]), mode="frozen", pooling="cls")
    assert torch.allclose(cls.eval().embed({"wave": wave}), hidden[:, :2].mean(dim=1), atol=1e-6)


# -- modes and training ---------------------------------------------------------------------------


def test_shapes_and_label_space():
    torch.manual_seed(0)
    m = tiny().eval()
    b = clips(4)
    assert m.loss(b).shape == ()
    assert m.embed(b).shape == m.backend_features(b).shape == (4, 32)
    assert m.use_attributes and m.head.num_classes == 5
    sections = tiny(num_attributes=3)  # one attribute string per section: classify sections
    assert not sections.use_attributes and sections.head.num_classes == 3
    assert tiny(labels="section").head.num_classes == 3
    assert tiny(num_attributes=3, labels="attribute").head.num_classes == 3
    with pytest.raises(AsdError, match="'section'"):
        sections.loss({"wave": b["wave"]})


def test_frozen_mode_has_nothing_to_train(folder):
    m = PretrainedASTBranch(num_samples=WINDOW, weights=str(folder[0]), mode="frozen")
    assert [p for p in m.parameters() if p.requires_grad] == [] and m.head is None
    m.train()
    assert not m.encoder.training  # eval mode survives train()
    b = clips(2, num_samples=WINDOW)
    loss = m.loss(b)
    assert loss.shape == () and float(loss) == 0.0 and not loss.requires_grad
    with pytest.raises(AsdError, match="freeze=b1"):
        m.configure_optimizers()


@pytest.mark.parametrize("head", ["arcface", "adacos"])
def test_loss_reaches_every_parameter(head):
    torch.manual_seed(0)
    m = tiny(head=head).train()
    loss = m.loss(clips(5))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_unseen_attributes_are_left_out_of_the_loss():
    torch.manual_seed(0)
    m = tiny().eval()
    b = clips(5)
    mixed = dict(b, attribute=torch.tensor([0, -1, 2, -1, 4]))
    kept = {k: v[[0, 2, 4]] for k, v in b.items()}
    assert torch.allclose(m.loss(mixed), m.loss(kept), atol=1e-5)
    none = m.loss(dict(b, attribute=torch.full((5,), -1)))
    none.backward()
    assert float(none.detach()) == 0.0 and all(p.grad is not None for p in m.parameters())
    with pytest.raises(AsdError, match="attribute id 7 is outside"):
        m.loss(dict(b, attribute=torch.tensor([0, 1, 2, 3, 7])))


def test_adam_steps_lower_the_loss():
    torch.manual_seed(0)
    m = tiny().train()
    b = clips(5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_head_lr_makes_two_param_groups():
    m = tiny(head_lr=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    groups = m.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


# -- the angular heads by hand --------------------------------------------------------------------


def test_arcface_logits_by_hand():
    head = AngularHead(2, 2, kind="arcface", scale=10.0, margin=0.3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    a = torch.tensor([0.4, 2.0, 3.0])  # angles to class 0 (cos) and to class 1 (sin)
    z = torch.stack([a.cos(), a.sin()], dim=1) * 3.0  # the norm does not matter
    loss = head(z, torch.tensor([0, 0, 0]))
    # theta + m for theta below pi - m = 2.84; past it the cosine continues as cos(theta) - m sin(m)
    target = torch.tensor([math.cos(0.7), math.cos(2.3), math.cos(3.0) - 0.3 * math.sin(0.3)])
    logits = 10.0 * torch.stack([target, a.sin()], dim=1)
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor([0, 0, 0])), atol=1e-5)
    # the class-1 clip's own target: 0.4 rad from class 0 is pi/2 - 0.4 from class 1
    loss1 = head(z[:1], torch.tensor([1]))
    want = F.cross_entropy(
        10.0 * torch.tensor([[math.cos(0.4), math.cos(math.pi / 2 - 0.4 + 0.3)]]), torch.tensor([1])
    )
    assert torch.allclose(loss1, want, atol=1e-5)


def test_adacos_scale_update_by_hand():
    head = AngularHead(3, 4, kind="adacos")
    assert math.isclose(float(head.scale), math.sqrt(2) * math.log(3), rel_tol=1e-6)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]]))
    z = torch.tensor([[1.0, 0.5, 0.2], [0.3, 1.0, 0.1], [0.2, 0.1, 1.0]])
    y = torch.tensor([0, 1, 2])
    cos = F.normalize(z, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    s = float(head.scale)
    others = torch.ones(3, 4).scatter(1, y[:, None], 0.0)
    b_avg = float((torch.exp(s * cos) * others).sum(dim=1).mean())
    theta_med = float(torch.acos(cos.gather(1, y[:, None])).median())
    new = math.log(b_avg) / math.cos(min(math.pi / 4, theta_med))
    head.eval()
    head(z, y)
    assert math.isclose(float(head.scale), s)  # eval mode never moves the scale
    head.train()
    loss = head(z, y)
    assert math.isclose(float(head.scale), new, rel_tol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(new * cos, y), atol=1e-5)
    # every non-target cosine near -1: log B_avg < 0, and the floor keeps the scale positive
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [-1, 0, 0], [-1, 0.01, 0], [-1, 0, 0.01]]))
    head(torch.tensor([[1.0, 0, 0]]), torch.tensor([0]))
    assert float(head.scale) == 1.0


# -- scoring and checkpoints ----------------------------------------------------------------------


def test_score_needs_fit_backend_and_a_training_clip_scores_zero():
    torch.manual_seed(0)
    m = tiny(k=1).eval()
    b = clips(6)
    with pytest.raises(AsdError, match="fit_backend"):
        m.score(b)
    feats = m.backend_features(b)
    m.fit_backend(feats, {k: b[k] for k in ("section", "domain", "machine", "attribute")})
    s = m.score(b)
    assert s.shape == (6,) and torch.allclose(s, torch.zeros(6), atol=1e-5)  # each is in its bank
    other = m.score(clips(6, seed=3))
    assert bool((other > 1e-4).all())
    assert torch.equal(m.score(b), s)  # eval mode is deterministic


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = tiny(head="adacos")
    b = clips(8)
    rows = [{k: v[i] for k, v in b.items()} for i in range(8)]
    trainer = quick_trainer(2)
    trainer.fit(m, DataLoader(rows, batch_size=4))
    m.eval()
    m.fit_backend(m.backend_features(b), {k: b[k] for k in ("section", "domain")})
    test = clips(3, seed=2)
    path = tmp_path / "b1.pt"
    torch.save(m.state_dict(), path)

    fresh = tiny(head="adacos").eval()
    assert float(fresh.head.scale) != float(m.head.scale)  # training moved the AdaCos scale
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert float(fresh.head.scale) == float(m.head.scale)
    assert torch.equal(fresh.score(test), m.score(test))
    assert torch.equal(fresh.embed(test), m.embed(test))


def _fit(module: L.LightningModule, batches: list[dict]) -> None:
    trainer = quick_trainer(len(batches), max_epochs=1)  # an optimizer step may not happen every batch
    trainer.fit(module, DataLoader(batches, batch_size=None))


def test_trains_inside_the_ensemble_and_stays_put_when_frozen(folder):
    torch.manual_seed(0)
    member = tiny()
    before = {k: v.clone() for k, v in member.named_parameters()}
    _fit(Ensemble({"b1": member}), [clips(4), clips(4, seed=1)])
    assert all(not torch.equal(p, before[k]) for k, p in member.named_parameters())
    frozen = PretrainedASTBranch(num_samples=WINDOW, weights=str(folder[0]), mode="frozen")
    before = copy.deepcopy(frozen.state_dict())
    beside = tiny(num_samples=WINDOW)  # the ensemble trains only when some member is trainable
    _fit(Ensemble({"b1": frozen, "other": beside}, frozen=["b1"]), [clips(2, num_samples=WINDOW)])
    after = frozen.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    m = tiny()
    b = clips(4)
    m.fit_backend(m.eval().embed(b), {k: b[k] for k in ("section", "domain")})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.train()
        loss = m.loss(b)
        m.eval()
        score = m.score(clips(4, seed=1))
    loss.backward()
    assert torch.isfinite(loss) and score.dtype == torch.float32 and torch.isfinite(score).all()


# -- bad input ------------------------------------------------------------------------------------


def test_wrong_clip_length_is_a_clear_error():
    m = tiny()
    with pytest.raises(AsdError, match="data.audio.duration"):
        m.embed({"wave": torch.zeros(2, T + 160)})


# Types and ranges of the config keys are the schema's (tests/test_config.py); these need several
# keys or the data's facts.
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"labels": "attribute", "num_attributes": None}, "labels=section"),
        ({"hidden_size": 30, "num_heads": 4}, "branches.b1.hidden_size"),
        ({"patch_size": 48}, "larger than num_mel_bins=32"),
        ({"num_samples": None}, "data.audio.duration"),
        ({"num_samples": 2000}, "fewer than patch_size"),
        ({"num_sections": 2, "num_attributes": 2, "head": "adacos"}, "head=arcface"),
        ({"num_sections": None}, "num_sections"),
        ({"sample_rate": 22050}, "data.audio.sample_rate=16000"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, match):
    with pytest.raises(AsdError, match=match):
        tiny(**kw)


def test_one_class_fine_tunes_on_self_supervised_views(caplog):
    with caplog.at_level("INFO", logger="asd.branches.pretrained"):
        m = tiny(num_sections=1, num_attributes=1)
    assert m.self_supervised and m.head.num_classes == len(VIEWS)
    assert "one section class: fine-tuning on self-supervised classes" in caplog.text
    torch.manual_seed(0)
    b = clips(6)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(m.loss(b))
    for _ in range(15):
        opt.zero_grad()
        m.loss(b).backward()
        opt.step()
    assert float(m.loss(b)) < first  # the views are learnable classes
    assert m.embed(b).shape == (6, m.embed_dim)  # test clips are embedded untransformed


def test_scratch_sizes_are_checked_for_typos_even_with_pretrained_weights(tmp_path):
    with pytest.raises(TypeError, match="hidden"):
        tiny(hidden=32)
    with pytest.raises(TypeError, match="hidden"):
        tiny(weights=str(tmp_path), hidden=32)


def test_check_ids_names_ids_outside_the_heads_classes():
    m = tiny()
    ok = clips(4)
    m.check_ids(ok)
    with pytest.raises(AsdError, match="outside the head's 5 classes"):
        m.check_ids({**ok, "attribute": torch.tensor([0, 1, 5, 2])})
