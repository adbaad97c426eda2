"""The config's nodes as pydantic models: every key of `conf/`, its type and its range.

Known key sets forbid other keys, so a typo fails naming the key. Keys the shipped config does not show
(b3's `head_scale`) take the constructor's default; `trainer` and `logger` pass other keys to Lightning.
Runtime facts (`num_samples`, b5's `input_dim`, ...) come from the data, not from keys.

One file: the nodes read top to bottom like `conf/` (members, data, fusion, trainer, logger, the top
level), so a key is found where its YAML file puts it.
"""

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo
from pydantic.functional_validators import PlainValidator
from pydantic_core import PydanticCustomError

from asd.choices import (
    CRITERION_MEASURES,
    CROPS,
    DEFAULT_KINDS,
    FFT_NORMS,
    FUSION_CANDIDATES,
    IMAGE_KINDS,
    KINDS,
    MODELS,
    OBJECTIVES,
    ON_BAD_FILE,
    PADS,
    POOLS,
    PROFILE_MODES,
    RECON_TERMS,
    RECONS,
    SCHEDULES,
    SELF_SUPERVISED,
    SKIPS,
    SPECTRA,
    STRATEGIES,
    WEIGHT_RULES,
)
from asd.config.values import (
    Count,
    Dropout,
    Flag,
    Folder,
    Fraction,
    PosInt,
    Positive,
    Seed,
    Text,
    Weight,
    choice,
    integer,
    integers,
    interval,
    is_int,
    is_number,
    is_texts,
    number,
    value,
)
from asd.data.index import YEARS


def _distinct(v: Any, options: tuple[str, ...]) -> bool:
    return is_texts(v) and bool(v) and all(x in options for x in v) and len(set(v)) == len(v)


def _names(v: Any) -> bool:
    return isinstance(v, str) or is_texts(v)


# values of one key (or a few), named so the nodes read as a list of keys
Selection = value("'all', a member name or a list of them", _names)
Frozen = value("a member name or a list of them", _names, null=True)
References = value("true, false, a reference or a list of them", lambda v: isinstance(v, bool) or _names(v))
Models = value(
    f"a non-empty list of distinct sound models from {list(MODELS)}", lambda v: _distinct(v, MODELS)
)
Kinds = value(  # `kinds: tone` is one kind (asd.anomalies.anomaly_config)
    f"a kind or a non-empty list of distinct kinds from {list(KINDS)}",
    lambda v: v in KINDS or _distinct(v, KINDS),
)
Margin = value("a number of radians in [0, pi/2)", lambda v: is_number(v) and 0 <= v < math.pi / 2)
TimeDim = value("an even integer >= 2", lambda v: is_int(v) and v >= 2 and v % 2 == 0)
Shrinkage = value("'auto' or a number in [0, 1]", lambda v: v == "auto" or (is_number(v) and 0 <= v <= 1))
Speeds = value(
    "a list of distinct factors in [0.5, 2] other than 1",
    lambda v: (
        isinstance(v, list)
        and all(is_number(r) and 0.5 <= r <= 2 for r in v)
        and len(set(v)) == len(v)
        and 1 not in v
    ),
)
Channel = value("a channel index >= 0 or 'mean'", lambda v: v == "mean" or (is_int(v) and v >= 0))
Machines = value("a non-empty list of machine types", lambda v: bool(v) and is_texts(v), null=True)
Devices = value(
    "an integer >= 1, 'auto' or a list of device indices",
    lambda v: (
        v == "auto" or (is_int(v) and v >= 1) or (isinstance(v, list) and bool(v) and all(map(is_int, v)))
    ),
)
Precision = value("a Lightning precision such as '32-true'", lambda v: isinstance(v, str) or is_int(v))
Deterministic = value("true, false or 'warn'", lambda v: isinstance(v, bool) or v == "warn", null=True)
ReconWeights = value(
    f"a mapping of some of {list(RECON_TERMS)} to weights >= 0",
    lambda v: (
        isinstance(v, dict)
        and set(v) <= set(RECON_TERMS)
        and all(is_number(w) and w >= 0 for w in v.values())
    ),
)
Checkpoints = value(
    "a mapping of member names to checkpoint paths (null: none)",
    lambda v: isinstance(v, dict) and all(p is None or isinstance(p, str) for p in v.values()),
)


class Node(BaseModel):
    """A config node whose keys are all known."""

    model_config = ConfigDict(extra="forbid")


class Target(BaseModel):
    """A Hydra `_target_` node (a front end); its other keys are the target's arguments."""

    model_config = ConfigDict(extra="allow")
    target: Text = Field(alias="_target_")


class Partial(Target):
    """A `_partial_` factory that gets runtime arguments (an optimizer its parameters)."""

    partial: value("true (it gets runtime arguments)", lambda v: v is True) = Field(alias="_partial_")


#: a learning-rate schedule: a name (`asd.run.build.SCHEDULES`), or a `_partial_` torch scheduler node
Schedule = value(
    "'cosine', 'constant' or a _partial_ torch LR scheduler node ({_target_: ..., _partial_: true})",
    lambda v: (
        v in ("cosine", "constant")
        or (isinstance(v, dict) and isinstance(v.get("_target_"), str) and v.get("_partial_") is True)
    ),
    null=True,
)


class Member(Node):
    """Keys every `branches.<name>` node may have; the ensemble, not the member, uses the last three."""

    target: Text = Field(alias="_target_")
    optimizer: Partial | None = None
    loss_weight: Weight = 1.0
    gradient_clip: number(gt=0, null=True) = None
    scheduler: Schedule = None


class B1(Member):
    """`asd.branches.pretrained.PretrainedASTBranch`; the sizes are those of a scratch AST."""

    weights: Text = "scratch"
    mode: choice("finetune", "frozen") = "finetune"
    hidden_size: PosInt = 64
    num_layers: PosInt = 2
    num_heads: PosInt = 4
    intermediate_size: PosInt = 128
    patch_size: PosInt = 16
    frequency_stride: PosInt = 16
    time_stride: PosInt = 16
    num_mel_bins: PosInt = 128
    dropout: Dropout = 0.0
    pooling: choice("mean", "cls") = "mean"
    labels: choice("auto", "attribute", "section") = "auto"
    head: choice("arcface", "adacos") = "arcface"
    scale: Positive = 30.0
    margin: Margin = 0.5
    k: PosInt = 1
    knn_calibrate: Flag = False
    head_lr: number(gt=0, null=True) = None


class B2(Member):
    """`asd.branches.transformer_ae.TransformerAEBranch`."""

    frontend: Target
    patch_freq: PosInt = 16
    patch_time: PosInt = 8
    dim: PosInt = 128
    depth: PosInt = 4
    decoder_depth: PosInt = 2
    heads: PosInt = 4
    mlp_ratio: Positive = 4.0
    dropout: Dropout = 0.1
    mask_ratio: number(ge=0, lt=1) = 0.0
    score_mode: choice(*PROFILE_MODES) = "mse"


class B3(Member):
    """`asd.branches.contrastive.ContrastiveBranch`."""

    frontend: Target
    channels: integers() = [16, 32, 64, 128]
    blocks: PosInt = 1
    emb_dim: PosInt = 128
    objective: choice(*OBJECTIVES) = "supcon"
    subclusters: PosInt = 16
    mixup: Fraction = 0.0
    mixup_alpha: Positive = 1.0
    self_supervised: choice(*SELF_SUPERVISED) = "auto"
    spectrum: choice(*SPECTRA) = "logmel"
    spectrum_channels: integers() = [32, 64, 128]
    temperature: Positive = 0.1
    positives: choice("attribute", "section") = "attribute"
    classify: choice("attribute", "section") = "attribute"
    head_weight: Weight = 1.0
    head_scale: Positive = 16.0
    balance: Fraction = 1.0
    score_mode: choice("knn", "centre", "mahalanobis") = "knn"
    k: PosInt = 1
    knn_density: Flag = False
    knn_calibrate: Flag = False


class B4(Member):
    """`asd.branches.diffusion.DiffusionBranch`."""

    frontend: Target
    channels: integers(max_len=5) = [128, 128, 256]
    time_dim: TimeDim = 128
    norm_groups: PosInt = 8
    dropout: Dropout = 0.0
    timesteps: integer(ge=2) = 200
    schedule: choice(*SCHEDULES) = "cosine"
    t_star: number(gt=0, le=1) = 0.2
    ddim_steps: PosInt = 4
    noise_draws: PosInt = 2
    seed: Seed = 0
    score_mode: choice(*PROFILE_MODES) = "mse"


class B5(Member):
    """`asd.branches.flow.FlowBranch`; the front end is used only when no b1-b3 embedding is selected."""

    frontend: Target | None = None
    pca_dim: integer(ge=2, null=True) = None
    hidden: PosInt = 64
    layers: integer(ge=2) = 4
    blocks: PosInt = 1
    dropout: Dropout = 0.0
    max_log_scale: number(gt=0, le=10) = 3.0
    momentum: number(gt=0, lt=1, null=True) = None
    min_std: number(gt=0, lt=1) = 1e-3
    conditional: Flag = False
    selective: Flag = False


class B6(Member):
    """`asd.branches.reprojection.ReprojectionBranch`."""

    frontend: Target
    channels: integers(max_len=5) = [16, 32]
    code_dim: PosInt = 32
    codebook_size: integer(ge=2) = 64
    ema: Flag = True
    ema_decay: number(gt=0, lt=1) = 0.99
    commitment: Weight = 0.25
    stage1_steps: Count = 50
    strategy: choice(*STRATEGIES) = "both"
    empty_mask_prob: Fraction = 0.2
    blob_fraction: interval(gt=0, lt=1) = [0.03, 0.15]
    band: interval(gt=0, le=0.5) = [0.03, 0.2]
    predictor_channels: PosInt = 16
    focal_gamma: Weight = 2.0
    score_pool: choice(*POOLS) = "topk"
    topk: number(gt=0, le=1) = 0.05
    score_mode: choice("mask", *PROFILE_MODES) = "mask"
    seed: Seed = 0


class B7(Member):
    """`asd.branches.vae.VAEBranch`."""

    frontend: Target
    channels: integers(max_len=6) = [16, 32, 64]
    latent_channels: PosInt = 16
    skip: choice(*SKIPS) = "none"
    kl_weight: Weight = 0.01
    recon: choice(*RECONS) = "mse"
    recon_weights: ReconWeights = {"mse": 1.0}
    fft_norm: choice(*FFT_NORMS) = "l1"
    score_kl: Weight = 0.0
    score_mode: choice(*PROFILE_MODES) = "mse"


class DcaseAE(Member):
    """`asd.branches.dcase_ae.DcaseAEBranch`, the reference detector."""

    frontend: Target
    n_frames: PosInt = 5
    hidden: PosInt = 128
    bottleneck: PosInt = 8
    score_mode: choice("mse", "mahalanobis") = "mse"
    shrinkage: Shrinkage = "auto"


class Stats(Node):
    """`asd.branches.logmel_stats.LogMelStatsReference`, the training-free reference (nothing to optimise)."""

    target: Text = Field(alias="_target_")
    frontend: Target
    stats: choice("mean", "mean_std") = "mean"
    k: PosInt = 1
    shrinkage: Shrinkage = "auto"
    covariance: choice("domain", "pooled") = "domain"
    calibrate: Flag = False
    temporal: Flag = False
    bands: PosInt = 32
    speeds: Speeds = []
    modulation: Target | None = None
    modulation_smooth: integer(ge=3) = 9  # odd: the reference says so


SCHEMAS: dict[str, type[Node]] = {
    "b1": B1,
    "b2": B2,
    "b3": B3,
    "b4": B4,
    "b5": B5,
    "b6": B6,
    "b7": B7,
    "dcase_ae": DcaseAE,
    "stats": Stats,
}


class Branches(Node):
    b1: B1 | None = None
    b2: B2 | None = None
    b3: B3 | None = None
    b4: B4 | None = None
    b5: B5 | None = None
    b6: B6 | None = None
    b7: B7 | None = None
    dcase_ae: DcaseAE | None = None
    stats: Stats | None = None


class Audio(Node):
    """`asd.data.audio.AudioConfig`."""

    sample_rate: PosInt = 16000
    channel: Channel = 0
    duration: number(gt=0, null=True) = None
    crop: choice(*CROPS) = "start"
    pad: choice(*PADS) = "wrap"
    resample: Flag = True
    window: number(gt=0, null=True) = None
    window_hop: number(gt=0, null=True) = None


class Synthetic(Node):
    """`asd.data.synthetic.SyntheticConfig`."""

    machines: Models = list(MODELS)
    sections: integer(ge=1, le=100) = 2
    source_train: integer(ge=1, le=10000) = 40
    target_train: integer(ge=0, le=10000) = 5
    test_per_class: integer(ge=1, le=10000) = 10
    duration: number(ge=0.1, le=60) = 2.0
    sample_rate: integer(ge=8000, le=48000) = 16000
    difficulty: Fraction = 0.5
    seed: integer(ge=0, le=2**63 - 1) = 0


ImageSize = value(
    "a side in pixels (an integer >= 4) or [height, width]",
    lambda v: (
        (is_int(v) and v >= 4)
        or (isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 4 for x in v))
    ),
)


class Image(Node):
    """`asd.data.images.ImageConfig` (`data=images`)."""

    size: ImageSize = [64, 64]
    mode: choice("gray", "rgb") = "gray"
    resize: Flag = True
    patch: integer(ge=4, null=True) = None


class Data(Node):
    """`asd.data.datamodule.AsdDataModule`'s arguments under its `_target_` (`data=images`:
    `asd.data.images.ImageDataModule`'s, the keys `image`, `categories` and `test_normals`)."""

    target: Text = Field(alias="_target_")
    name: Text = "synthetic"
    root: Folder = None
    year: choice(*YEARS, null=True) = None
    machines: Machines = None
    synthetic: Synthetic | None = None
    audio: Audio = Audio()
    batch_size: PosInt = 16
    eval_batch_size: integer(ge=1, null=True) = None
    num_workers: Count = 0
    val_fraction: number(ge=0, lt=1) = 0.1
    mimii_train_normals: integer(ge=1, null=True) = None
    on_bad_file: choice(*ON_BAD_FILE) = "error"
    batches_per_epoch: integer(ge=1, null=True) = None
    cache_dir: Folder = None
    feature_cache: Flag = True
    seed: Seed = 0
    image: Image | None = None
    categories: Machines = None
    test_normals: number(ge=0, lt=1) = 0.2


class Anomalies(Node):
    """`asd.anomalies.AnomalyConfig` fields (the sample rate comes from the data) and `copies`."""

    copies: PosInt = 8
    kinds: Kinds = list(DEFAULT_KINDS)
    p_none: number(ge=0, lt=1) = 0.0
    level_db: interval() = [-10.0, 5.0]
    span: interval(gt=0, le=1) = [0.1, 0.6]
    n_fft: integer(ge=16) = 512
    hop: PosInt = 128
    gain_db: interval(gt=0) = [6.0, 12.0]
    pitch_semitones: interval(gt=0, le=12) = [1.0, 3.0]
    mod_rate_hz: interval(gt=0) = [2.0, 30.0]
    mod_depth: interval(gt=0, le=1) = [0.3, 0.9]
    band: interval(gt=0, le=0.5) = [0.03, 0.2]
    blob_fraction: interval(gt=0, lt=1) = [0.03, 0.15]
    p_substitute: Fraction = 0.5
    fade_ms: Weight = 10.0
    min_rms: Positive = 1e-3
    eq_db: interval(gt=0) = [3.0, 10.0]
    eq_octaves: interval(gt=0) = [0.3, 1.5]
    hum_db: interval() = [-30.0, -12.0]


ImageKinds = value(  # `kinds: blobs` is one kind (asd.image_anomalies.image_anomaly_config)
    f"a kind or a non-empty list of distinct kinds from {list(IMAGE_KINDS)}",
    lambda v: v in IMAGE_KINDS or _distinct(v, IMAGE_KINDS),
)


class ImageAnomalies(Node):
    """`asd.image_anomalies.ImageAnomalyConfig` (`data=images`; the copies are `fusion.anomalies.copies`)."""

    kinds: ImageKinds = list(IMAGE_KINDS)
    p_none: number(ge=0, lt=1) = 0.0
    blob_fraction: interval(gt=0, lt=1) = [0.02, 0.1]
    strength: interval(gt=0, le=1) = [0.2, 0.6]
    patch: interval(gt=0, le=1) = [0.1, 0.3]
    width: integers(ge=1, max_len=2) = [1, 3]


class Attention(Node):
    hidden: PosInt = 16
    context_dim: PosInt = 4
    epochs: PosInt = 300
    lr: Positive = 0.01
    weight_decay: Weight = 1e-4


class Meta(Node):
    hidden: PosInt = 16
    inner_lr: Positive = 0.1
    inner_steps: Count = 3
    test_steps: Count = 3
    first_order: Flag = False
    vmap: Flag = True
    meta_steps: Count = 200
    meta_lr: Positive = 3e-3
    support_fraction: number(gt=0, lt=1) = 0.5


class Weighted(Node):
    power: Positive = 2.0
    rule: choice(*WEIGHT_RULES) = "criterion"
    measure: choice(*CRITERION_MEASURES) = "official"
    reference_share: number(ge=0, le=1, null=True) = 0.8


class Select(Node):
    candidates: value(
        f"a non-empty list of distinct fusions from {list(FUSION_CANDIDATES)}",
        lambda v: _distinct(v, FUSION_CANDIDATES),
    ) = ["meta", "attention", "zweighted"]
    folds: integer(ge=2) = 4
    min_normals: integer(ge=1) = 5
    split: choice("source", "kind") = "source"


class Normalisation(Node):
    shrinkage: number(ge=0) = 2.0
    z_limit: number(gt=0, null=True) = 5.0
    calibrated: choice("backend", "held_out") = "held_out"


class Fusion(Node):
    references: value("auto, a reference score column or a list of them", _names) = "auto"
    enabled: Flag = True
    seed: Seed = 0
    anomalies: Anomalies = Anomalies()
    image_anomalies: ImageAnomalies = ImageAnomalies()
    attention: Attention = Attention()
    meta: Meta = Meta()
    weighted: Weighted = Weighted()
    select: Select = Select()
    normalisation: Normalisation = Normalisation()


class Trainer(BaseModel):
    """The keys of `conf/trainer/` (defaults: Lightning's); any other `Trainer` argument passes unchecked."""

    model_config = ConfigDict(extra="allow")
    target: Text = Field(alias="_target_")
    accelerator: Text = "auto"
    devices: Devices = "auto"
    strategy: Text = "auto"
    precision: Precision = "32-true"
    max_epochs: PosInt = None  # Lightning's -1 (endless) would never reach the later stages
    log_every_n_steps: PosInt = 50
    num_sanity_val_steps: integer(ge=-1) = 2
    enable_model_summary: Flag = True
    deterministic: Deterministic = None


class Logger(BaseModel):
    """A `_target_` logger node; further keys are the logger's arguments."""

    model_config = ConfigDict(extra="allow")
    target: Text = Field(alias="_target_")


def _colormaps() -> list[str]:
    from matplotlib import colormaps  # imported when a cmap is checked, not with the schema

    return list(colormaps)


Colormap = value(
    "a matplotlib colormap name such as 'magma', 'viridis', 'inferno', 'gray' or 'coolwarm'",
    lambda v: isinstance(v, str) and v in _colormaps(),
)
Indices = value(
    "a non-empty list of clip indices >= 0",
    lambda v: isinstance(v, list) and bool(v) and all(is_int(i) and i >= 0 for i in v),
    null=True,
)


def _validation_anomalies(v: Any, info: ValidationInfo) -> Any:
    """A folder or a non-empty list of WAV files, or null; `threshold=midpoint` needs one."""
    if not (v is None or (isinstance(v, str) and v) or (is_texts(v) and v)):
        raise PydanticCustomError("asd", "expected a folder, a non-empty list of WAV files, or null")
    if v is None and info.data.get("threshold") == "midpoint":
        raise PydanticCustomError(
            "asd",
            "threshold=midpoint needs labelled anomalous validation clips (never test clips): set "
            "validation_anomalies=FOLDER or validation_anomalies=[a.wav,b.wav], or use threshold=normal "
            "(the default) or threshold=gamma",
        )
    return v


class Heatmaps(Node):
    """`heatmaps`: spectrogram heatmaps of the members that draw error maps (asd.evaluation.heatmaps)."""

    count: Count = 4
    indices: Indices = None  # clip indices of the split; null: `count` clips, half of them anomalous
    split: choice("test", "train") = "test"
    cmap: Colormap = "magma"


class Checkpoint(Node):
    """`checkpoint`: when the fit writes `checkpoints/last.ckpt` (asd.run.checkpointing)."""

    every_n_epochs: Count = 1
    every_minutes: number(gt=0, null=True) = None


class CrossFit(Node):
    """`crossfit`: out-of-fold scores of every training normal for calibration (asd.run.crossfit)."""

    folds: value("0 (off) or a whole number of folds >= 2", lambda v: is_int(v) and (v == 0 or v >= 2)) = 5
    max_clips: integer(ge=1, null=True) = 100  # cross-fit only runs of at most this many training clips


class TrainConfig(Node):
    """`conf/train.yaml` with its groups."""

    data: Data
    branches: Branches
    fusion: Fusion
    trainer: Trainer
    logger: Logger
    # names are checked once the selection is known: asd.members.select_branches and
    # select_frozen, Ensemble.load_member
    branch: Selection = "all"
    freeze: Frozen = []
    ckpt: Checkpoints = {}
    reference: References = True
    final: Text = "auto"
    threshold_percentile: number(gt=0, lt=1) = 0.9
    threshold_fence: number(ge=0, null=True) = 3.0  # asd.evaluation.clip_far_out; null: scores as they are
    threshold_shrinkage: number(ge=0) = 0.0  # asd.calibration.fit_thresholds; 0: each section's own
    threshold_min_domain: integer(ge=1) = 3  # asd.run.calibrate.threshold_rows (crossfit); 1: every normal
    threshold: choice("normal", "gamma", "midpoint") = "normal"  # asd.calibration.fit_thresholds
    validation_anomalies: Annotated[Any, PlainValidator(_validation_anomalies)] = None
    year: choice(*YEARS, null=True) = None  # null: the data's layout, data.year, else 2023
    seed: Seed = 0
    steps: integer(ge=1, null=True) = None  # the training budget in optimizer steps (null: max_epochs)
    lr_schedule: Schedule = "cosine"  # every member's scheduler unless branches.<m>.scheduler is set
    resume: Flag = False
    checkpoint: Checkpoint = Checkpoint()
    crossfit: CrossFit = CrossFit()
    grad_norm_every: Count = 50
    plots: Flag = True
    heatmaps: Heatmaps = Heatmaps()
    num_heatmaps: integer(ge=0, null=True) = None  # deprecated alias of heatmaps.count (older run folders)
    name: Text = "run"
    experiment_name: Text = "default"
    run_dir: Text = "runs"
    hydra: dict | None = None
