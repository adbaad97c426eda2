"""The config schema: every shipped config option validates, and bad values fail naming their key."""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from asd.branches.pretrained import ScratchAST
from asd.config import SCHEMAS, validate, validate_member
from asd.errors import AsdError
from asd.members import plain

CONF = Path(__file__).resolve().parents[1] / "conf"
#: what an option needs besides itself: a data folder (never read here) and MIMII's split size
NEEDS = {
    "data=dcase": ["data.root=/tmp/x"],
    "data=images": ["data.root=/tmp/x"],
    "data=mimii": ["data.root=/tmp/x", "data.mimii_train_normals=10"],
    "experiment=dcase2020": ["data.root=/tmp/x"],
    "experiment=dcase2023": ["data.root=/tmp/x"],
    "experiment=mimii": ["data.root=/tmp/x", "data.mimii_train_normals=10"],
}


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def options(*groups: str) -> list[str]:
    return [f"{g}={p.stem}" for g in groups for p in sorted((CONF / g).glob("*.yaml"))]


def problems(*overrides: str) -> str:
    """The message of the one AsdError that validating the composed config raises."""
    with pytest.raises(AsdError) as err:
        validate(compose_cfg(*overrides))
    return str(err.value)


# -- every shipped option validates --------------------------------------------------------------


@pytest.mark.parametrize("option", ["", *options("experiment", "trainer", "logger", "data", "debug")])
def test_shipped_options_validate(option):
    overrides = [option, *NEEDS.get(option, [])] if option else []
    validate(compose_cfg(*overrides))


def test_documented_combinations_validate():
    validate(
        compose_cfg("experiment=dcase2023", "+experiment@_global_=full", "data.root=/tmp/x", "trainer=gpu")
    )
    validate(compose_cfg("debug=default", "branch=[b2,b4]", "freeze=b2", "final=zmean", "logger=wandb"))


def test_ensemble_keys_of_members_are_accepted():
    validate(
        compose_cfg(
            "branches.b2.gradient_clip=1.0",
            "branches.b4.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:10}",
        )
    )


def test_lr_schedule_is_every_trainable_members_scheduler_unless_one_says_otherwise():
    def schedules(*overrides: str) -> dict[str, object]:
        cfg = compose_cfg(*overrides)
        validate(cfg)
        return {n: plain(node.scheduler) for n, node in cfg.branches.items() if "scheduler" in node}

    members = ["b1", "b2", "b3", "b4", "b5", "b6", "b7"]  # stats trains nothing
    assert schedules() == {**dict.fromkeys(members, "cosine"), "dcase_ae": "constant"}  # the baseline's lr
    assert schedules("branches.b2.scheduler=constant")["b2"] == "constant"
    assert set(schedules("lr_schedule=constant").values()) == {"constant"}
    assert set(schedules("lr_schedule=null").values()) == {None, "constant"}
    step = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 5}
    override = "lr_schedule={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:5}"
    assert schedules(override)["b7"] == step


def test_logger_nodes_need_a_target():
    cfg = compose_cfg()
    cfg.logger = OmegaConf.create({"_target_": "pytorch_lightning.loggers.CSVLogger", "name": "logs"})
    validate(cfg)
    cfg.logger = OmegaConf.create({"kind": "wandb", "project": "asd", "tags": []})
    with pytest.raises(AsdError, match="logger._target_"):
        validate(cfg)


# -- bad values fail naming the key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer >= 1"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1: expected an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: expected an integer >= 1"),
        ("trainer.devices=0", "trainer.devices=0: expected an integer >= 1, 'auto' or a list"),
        ("trainer.deterministic=maybe", "trainer.deterministic='maybe': expected true, false or 'warn'"),
        ("data.batch_size=abc", "data.batch_size='abc': expected an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0: expected an integer >= 1"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5: expected a number in [0, 1)"),
        ("data.val_fraction=1.0", "data.val_fraction=1.0: expected a number in [0, 1)"),
        ("data.on_bad_file=ignore", "data.on_bad_file='ignore': expected one of 'error', 'skip'"),
        ("data.audio.channel=-1", "data.audio.channel=-1: expected a channel index >= 0 or 'mean'"),
        ("+data.audio.crop=middle", "data.audio.crop='middle': expected one of 'start', 'center'"),
        ("data.audio.duration=0", "data.audio.duration=0: expected a number > 0 or null"),
        ("data.synthetic.sections=0", "data.synthetic.sections=0: expected an integer in [1, 100]"),
        ("+data.synthetic.sectionz=2", "data.synthetic.sectionz=2: unknown key; did you mean 'sections'?"),
        ("branches.b1.mode=train", "branches.b1.mode='train': expected one of 'finetune', 'frozen'"),
        ("branches.b1.head=softmax", "branches.b1.head='softmax': expected one of 'arcface', 'adacos'"),
        ("branches.b1.margin=2.0", "branches.b1.margin=2.0: expected a number of radians in [0, pi/2)"),
        ("branches.b2.dim=true", "branches.b2.dim=True: expected an integer >= 1"),
        ("+branches.b2.dimm=3", "branches.b2.dimm=3: unknown key; did you mean 'dim'?"),
        ("branches.b2.gradient_clip=0", "branches.b2.gradient_clip=0: expected a number > 0 or null"),
        ("branches.b2.scheduler=5", "branches.b2.scheduler=5: expected 'cosine', 'constant' or a _partial_"),
        ("lr_schedule=cosin", "lr_schedule='cosin': expected 'cosine', 'constant' or a _partial_ torch"),
        ("branches.b3.channels=[]", "branches.b3.channels=[]: expected a non-empty list of integers >= 1"),
        ("branches.b3.balance=2.0", "branches.b3.balance=2.0: expected a number in [0, 1]"),
        (
            "branches.b3.objective=adacos",
            "branches.b3.objective='adacos': expected one of 'supcon', 'subcluster_adacos'",
        ),
        ("branches.b4.timesteps=0", "branches.b4.timesteps=0: expected an integer >= 2"),
        ("branches.b4.t_star=1.5", "branches.b4.t_star=1.5: expected a number in (0, 1]"),
        ("branches.b4.optimizer._partial_=false", "branches.b4.optimizer._partial_=False: expected true"),
        ("~branches.b4.frontend._target_", "branches.b4.frontend._target_: missing"),
        ("branches.b5.layers=1", "branches.b5.layers=1: expected an integer >= 2"),
        (
            "branches.dcase_ae.shrinkage=2",
            "branches.dcase_ae.shrinkage=2: expected 'auto' or a number in [0, 1]",
        ),
        ("branches.stats.speeds=[1.0]", "branches.stats.speeds=[1.0]: expected a list of distinct factors"),
        ("branches.stats.speeds=0.9", "branches.stats.speeds=0.9: expected a list of distinct factors in"),
        (
            "branches.stats.speeds=[[0.9]]",
            "branches.stats.speeds=[[0.9]]: expected a list of distinct factors",
        ),
        ("fusion.anomalies.copies=0", "fusion.anomalies.copies=0: expected an integer >= 1"),
        ("fusion.meta.support_fraction=0", "fusion.meta.support_fraction=0: expected a number in (0, 1)"),
        ("fusion.attention.lr=0", "fusion.attention.lr=0: expected a number > 0"),
        (
            "fusion.weighted.rule=lda",
            "fusion.weighted.rule='lda': expected one of 'criterion', 'discriminant'",
        ),
        (
            "fusion.weighted.reference_share=1.5",
            "fusion.weighted.reference_share=1.5: expected a number in [0, 1] or null",
        ),
        ("fusion.normalisation.z_limit=0", "fusion.normalisation.z_limit=0: expected a number > 0 or null"),
        ("threshold_percentile=1.2", "threshold_percentile=1.2: expected a number in (0, 1)"),
        ("threshold_fence=-1", "threshold_fence=-1: expected a number >= 0 or null"),
        ("threshold_shrinkage=-1", "threshold_shrinkage=-1: expected a number >= 0"),
        ("threshold_min_domain=0", "threshold_min_domain=0: expected an integer >= 1"),
        ("threshold_min_domain=2.5", "threshold_min_domain=2.5: expected an integer >= 1"),
        ("branch=5", "branch=5: expected 'all', a member name or a list of them"),  # names: select_branches
        ("freeze=[1]", "freeze=[1]: expected a member name or a list of them or null"),
        ("final=true", "final=True: expected a non-empty string"),
        ("year=2019", "year=2019: expected one of 2020"),
        ("grad_norm_every=-1", "grad_norm_every=-1: expected an integer >= 0"),
        ("heatmaps.count=-1", "heatmaps.count=-1: expected an integer >= 0"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    text = problems(override)
    assert "(1 key)" in text and message in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "fusion.anomalies.kinds=[tone,hiss]",
            "fusion.anomalies.kinds=['tone', 'hiss']: expected a kind or a non-empty",
        ),
        ("fusion.anomalies.kinds=[]", "fusion.anomalies.kinds=[]: expected a kind or a non-empty list"),
        (
            "fusion.anomalies.kinds=[tone,tone]",
            "fusion.anomalies.kinds=['tone', 'tone']: expected a kind or a non-empty",
        ),
        ("fusion.anomalies.p_none=1.0", "fusion.anomalies.p_none=1.0: expected a number in [0, 1)"),
        ("fusion.anomalies.p_none=-0.1", "fusion.anomalies.p_none=-0.1: expected a number in [0, 1)"),
        (
            "+fusion.anomalies.span=[0.6,0.1]",
            "fusion.anomalies.span=[0.6, 0.1]: expected [low, high] with low",
        ),
        ("+fusion.anomalies.span=[0.1,2.0]", "each a number in (0, 1]"),
        ("+fusion.anomalies.level_db=[0.0]", "fusion.anomalies.level_db=[0.0]: expected [low, high]"),
        ("+fusion.anomalies.level_db=[0.0,loud]", "fusion.anomalies.level_db=[0.0, 'loud']: expected [low"),
        ("+fusion.anomalies.n_fft=512.5", "fusion.anomalies.n_fft=512.5: expected an integer >= 16"),
        ("+fusion.anomalies.min_rms=0.0", "fusion.anomalies.min_rms=0.0: expected a number > 0"),
        ("+fusion.anomalies.bogus=1", "fusion.anomalies.bogus=1: unknown key; expected some of"),
        ("+fusion.anomalies.sample_rate=8000", "fusion.anomalies.sample_rate=8000: unknown key"),
    ],
)
def test_bad_pseudo_anomaly_settings_fail_naming_the_key(override, message):
    assert message in problems(override)


def test_every_bad_key_is_listed_in_one_error():
    text = problems(
        "trainer.max_epochs=0", "data.batch_size=0", "+branches.b2.dimm=3", "branches.b4.t_star=0"
    )
    assert text.startswith("invalid config (4 keys):")
    for key in ("trainer.max_epochs=0", "data.batch_size=0", "branches.b2.dimm=3", "branches.b4.t_star=0"):
        assert f"\n  {key}" in text


def test_a_value_left_to_give_is_named():
    text = problems("data=mimii")
    assert "data.root: no value (???)" in text and "data.mimii_train_normals: no value (???)" in text
    assert "(2 keys)" in text  # `???` is not also reported as a bad value


# -- one member's node ----------------------------------------------------------------------------


@functools.cache
def default_nodes() -> dict[str, dict]:
    return OmegaConf.to_container(compose_cfg().branches, resolve=True)


def default_node(name: str) -> dict:
    return dict(default_nodes()[name])


#: what the builder passes from the data, never from the config
RUNTIME = {"num_samples", "sample_rate", "num_machines", "num_sections", "num_attributes", "input_dim"}
#: what the ensemble takes from a member's node
ENSEMBLE = {"loss_weight", "gradient_clip", "scheduler"}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_member_schema_keys_are_the_constructor_arguments(name):
    """Every key the schema allows reaches the constructor, and every argument but a runtime fact is a key."""
    cls = get_class(default_node(name)["_target_"])
    params = inspect.signature(cls.__init__).parameters
    arguments = {p for p, v in params.items() if v.kind is not v.VAR_KEYWORD} - {"self"} - RUNTIME
    if any(v.kind is v.VAR_KEYWORD for v in params.values()):  # b1: the sizes of a scratch AST
        arguments |= {f.name for f in fields(ScratchAST)}
    keys = {f.alias or n for n, f in SCHEMAS[name].model_fields.items()} - ENSEMBLE - {"_target_"}
    assert keys == arguments


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("b1", {"mode": "train"}, "branches.b1.mode='train'"),
        ("b1", {"pooling": "max"}, "branches.b1.pooling='max'"),
        ("b1", {"head": "softmax"}, "branches.b1.head='softmax'"),
        ("b1", {"labels": "machine"}, "branches.b1.labels='machine'"),
        ("b1", {"weights": ""}, "branches.b1.weights='': expected a non-empty string"),
        ("b1", {"num_layers": 0}, "branches.b1.num_layers=0"),
        ("b1", {"k": 0}, "branches.b1.k=0"),
        ("b1", {"margin": 2.0}, "branches.b1.margin=2.0"),
        ("b1", {"dropout": 1.0}, "branches.b1.dropout=1.0: expected a number in [0, 1)"),
        ("b1", {"head_lr": 0}, "branches.b1.head_lr=0: expected a number > 0 or null"),
        ("b1", {"num_sections": 3}, "branches.b1.num_sections=3: unknown key"),  # a runtime fact
        ("b2", {"depth": 0}, "branches.b2.depth=0"),
        ("b2", {"heads": 0}, "branches.b2.heads=0"),
        ("b2", {"mask_ratio": 1.0}, "branches.b2.mask_ratio=1.0"),
        ("b2", {"mlp_ratio": 0}, "branches.b2.mlp_ratio=0"),
        ("b2", {"frontend": "logmel"}, "branches.b2.frontend='logmel': expected a mapping"),
        ("b3", {"emb_dim": 0}, "branches.b3.emb_dim=0"),
        ("b3", {"channels": [4, 0]}, "branches.b3.channels=[4, 0]"),
        ("b3", {"blocks": 1.5}, "branches.b3.blocks=1.5"),
        ("b3", {"temperature": 0.0}, "branches.b3.temperature=0.0"),
        ("b3", {"head_weight": -1.0}, "branches.b3.head_weight=-1.0"),
        ("b3", {"head_scale": 0}, "branches.b3.head_scale=0"),
        ("b3", {"positives": "machine"}, "branches.b3.positives='machine'"),
        ("b3", {"classify": "domain"}, "branches.b3.classify='domain'"),
        ("b3", {"score_mode": "cosine"}, "branches.b3.score_mode='cosine'"),
        ("b3", {"k": 0}, "branches.b3.k=0"),
        ("b3", {"objective": "arcface"}, "branches.b3.objective='arcface'"),
        ("b3", {"subclusters": 0}, "branches.b3.subclusters=0"),
        ("b3", {"mixup": 1.5}, "branches.b3.mixup=1.5: expected a number in [0, 1]"),
        ("b3", {"mixup_alpha": 0}, "branches.b3.mixup_alpha=0: expected a number > 0"),
        ("b3", {"self_supervised": True}, "branches.b3.self_supervised=True"),
        ("b3", {"spectrum": "stft"}, "branches.b3.spectrum='stft'"),
        ("b3", {"spectrum_channels": []}, "branches.b3.spectrum_channels=[]"),
        ("b3", {"knn_density": "yes"}, "branches.b3.knn_density='yes': expected true or false"),
        ("b3", {"num_samples": 32000}, "branches.b3.num_samples=32000: unknown key"),  # a runtime fact
        ("b4", {"channels": []}, "branches.b4.channels=[]"),
        ("b4", {"channels": 16}, "branches.b4.channels=16"),
        ("b4", {"channels": [8] * 6}, "expected a list of 1 to 5 integers >= 1"),
        ("b4", {"time_dim": 7}, "branches.b4.time_dim=7: expected an even integer >= 2"),
        ("b4", {"timesteps": 1}, "branches.b4.timesteps=1"),
        ("b4", {"schedule": "quadratic"}, "branches.b4.schedule='quadratic'"),
        ("b4", {"t_star": 0.0}, "branches.b4.t_star=0.0"),
        ("b4", {"noise_draws": 0}, "branches.b4.noise_draws=0"),
        ("b4", {"dropout": 1.0}, "branches.b4.dropout=1.0"),
        ("b4", {"seed": -1}, "branches.b4.seed=-1"),
        ("b5", {"layers": 1}, "branches.b5.layers=1"),
        ("b5", {"hidden": 0}, "branches.b5.hidden=0"),
        ("b5", {"blocks": 2.5}, "branches.b5.blocks=2.5"),
        ("b5", {"pca_dim": 1}, "branches.b5.pca_dim=1: expected an integer >= 2 or null"),
        ("b5", {"dropout": 1.0}, "branches.b5.dropout=1.0"),
        ("b5", {"momentum": 1.0}, "branches.b5.momentum=1.0: expected a number in (0, 1) or null"),
        ("b5", {"min_std": 0.0}, "branches.b5.min_std=0.0"),
        ("b5", {"max_log_scale": -1.0}, "branches.b5.max_log_scale=-1.0: expected a number in (0, 10]"),
        ("b5", {"conditional": "yes"}, "branches.b5.conditional='yes': expected true or false"),
        ("b5", {"input_dim": 12}, "branches.b5.input_dim=12: unknown key"),  # set from b1-b3 at build time
        ("dcase_ae", {"score_mode": "maha"}, "branches.dcase_ae.score_mode='maha'"),
        ("dcase_ae", {"hidden": 0}, "branches.dcase_ae.hidden=0"),
        ("dcase_ae", {"n_frames": 0}, "branches.dcase_ae.n_frames=0"),
    ],
)
def test_member_schema_names_the_bad_key(name, values, message):
    node = default_node(name)
    validate_member(name, node)
    with pytest.raises(AsdError, match="invalid config") as err:
        validate_member(name, {**node, **values})
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["b2", "b4", "b6", "b7"])
def test_reconstruction_members_take_every_error_score_mode_and_name_them_on_a_typo(name):
    node = default_node(name)
    for mode in ("mse", "mahalanobis", "temporal"):
        validate_member(name, {**node, "score_mode": mode})
    with pytest.raises(AsdError, match="invalid config") as err:
        validate_member(name, {**node, "score_mode": "temporl"})
    assert f"branches.{name}.score_mode='temporl'" in str(err.value) and "'temporal'" in str(err.value)


def test_member_schema_takes_a_config_node_and_knows_its_members():
    validate_member("b2", compose_cfg().branches.b2)
    with pytest.raises(AsdError, match="branches.b9: no such member"):
        validate_member("b9", {})
