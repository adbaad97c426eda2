"""Builders: the config's objects (datamodule, members, ensemble, loggers, trainer) via Hydra.

Every object comes from its config node's `_target_` through `hydra.utils.instantiate`; what
only the data can tell (clip length, class counts, the flow's input width, the run folder) is
passed at build time to the constructors that name it. Types and ranges are checked before any
of this by the schema (`asd.config.validate`); the checks here are the cross-field ones.

One file: the run's fit and the crossfit stage's copies are built by the same functions from the
same config (members, trainer, its budget in epochs), so a copy trains exactly like the run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from asd.branches.base import Branch
from asd.calibration import LEARNED
from asd.choices import FUSIONS, WEIGHTED
from asd.data.datamodule import AsdDataModule
from asd.data.images import image_layout_of
from asd.ensemble import FLOW, FLOW_SOURCES, Ensemble, MemberMixedPrecision
from asd.errors import AsdError
from asd.features import share_frontends
from asd.members import (
    IMAGE_MEMBERS,
    REFERENCES,
    member_names,
    plain,
    select_branches,
    select_frozen,
)
from asd.run.checkpointing import LAST_CKPT, AtomicCheckpointIO, ResumeCheckpoint
from asd.run.progress import show_progress

log = logging.getLogger(__name__)

#: keys of a member's node that are the ensemble's business, not the member constructor's
ENSEMBLE_KEYS = ("loss_weight", "gradient_clip", "scheduler")
#: the length arguments of torch's schedulers (CosineAnnealingLR, OneCycleLR, LinearLR and
#: PolynomialLR) that a scheduler node may set to `auto`: the fit's optimizer steps per member
BUDGET_KEYS = ("T_max", "total_steps", "total_iters")
#: the schedules `lr_schedule` and `branches.<m>.scheduler` may name: a scheduler node, or None (constant)
SCHEDULES: dict[str, dict[str, Any] | None] = {
    "cosine": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": "auto"},
    "constant": None,
}


class BudgetScheduler:
    """A scheduler node whose length is `auto`: built by each fit with that fit's optimizer steps per
    member, so the schedule ends with the training however `trainer.max_epochs`, `steps` or a
    cross-fit copy's smaller data set set its length."""

    #: `Ensemble.configure_optimizers` calls `factory(optimizer, trainer, members)` on factories saying so
    needs_budget = True

    def __init__(self, node: dict[str, Any], key: str, where: str):
        self.node, self.key, self.where = node, key, where

    def __call__(self, optimizer: torch.optim.Optimizer, trainer: L.Trainer, members: int) -> Any:
        return build({**self.node, self.key: self.steps(trainer, members)}, self.where)(optimizer)

    def steps(self, trainer: L.Trainer, members: int) -> int:
        """Optimizer steps per member of this fit: Lightning's `estimated_stepping_batches` (epochs x
        batches, capped by `max_steps`), where `max_steps` counts every member's step (manual
        optimisation steps `members` optimizers per batch)."""
        steps = trainer.estimated_stepping_batches
        if trainer.max_steps != -1:
            steps = min(steps, trainer.max_steps / members)
        if not math.isfinite(steps):
            raise AsdError(
                f"{self.where}: {self.key}=auto needs a finite training length, but the trainer has no "
                "end (trainer.max_epochs=-1 and no max_steps); set steps or trainer.max_epochs, or give "
                f"{self.key} a number"
            )
        return max(1, math.ceil(steps))


def build_scheduler(node: dict[str, Any], where: str) -> Any:
    """The scheduler factory of a `branches.<m>.scheduler` node (`_partial_`): Hydra's partial, or a
    `BudgetScheduler` when one length argument (`BUDGET_KEYS`) is `auto`. Tried once on a stand-in
    optimizer, so a bad argument fails here naming the key, not when the fit starts."""
    auto = [k for k in BUDGET_KEYS if node.get(k) == "auto"]
    if len(auto) > 1:
        raise AsdError(f"{where}: {' and '.join(auto)} are both auto; give one of them the run's length")
    factory = build({**node, auto[0]: 1} if auto else node, where)
    try:
        factory(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    except Exception as e:  # the scheduler's own complaint (an unknown or bad argument)
        raise AsdError(f"{where}: cannot build {node.get('_target_')}: {e}") from e
    return BudgetScheduler(node, auto[0], where) if auto else factory


def build(node: dict[str, Any], key: str, runtime: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """`instantiate(node)`, plus those `runtime` values its constructor names and the node lacks.

    A bad `_target_` or a constructor's own error becomes one AsdError naming the config key.
    """
    target = node.get("_target_")
    if not target:
        raise AsdError(f"{key}: no _target_ (the class or function to build)")
    try:
        params = _parameters(_import(target))
    except Exception as e:  # hydra raises several types for a bad import path
        raise AsdError(f"{key}._target_={target!r} cannot be imported: {e}") from e
    extra = {k: v for k, v in (runtime or {}).items() if k in params and k not in node}
    try:
        return instantiate(node, **extra, **kwargs)
    except Exception as e:  # hydra wraps constructor errors; show the object's own message
        cause = e.__cause__ or e
        if isinstance(cause, AsdError):
            raise cause from None
        if isinstance(cause, ImportError | ModuleNotFoundError):
            raise AsdError(f"{key}: {target} needs a package that is not installed: {cause}") from e
        raise AsdError(f"{key}: cannot build {target}: {cause}") from e


def _import(target: str) -> Any:
    """The class or function a `_target_` names."""
    try:
        return get_class(target)
    except Exception:  # not a class: a factory function
        return get_method(target)


def _parameters(obj: Any) -> set[str]:
    try:
        return set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return set()


# ---------------------------------------------------------------------- data and members
def build_datamodule(cfg: DictConfig) -> AsdDataModule:
    """The `data` node's datamodule; its loaders pin host memory when the run trains on a GPU."""
    on_gpu = resolve_trainer(plain(cfg.trainer), *hardware()).on_gpu
    dm = build(plain(cfg.data), "data", {"pin_memory": on_gpu}, _convert_="all")
    if not isinstance(dm, AsdDataModule):
        raise AsdError(f"data._target_ builds {type(dm).__name__}, not an asd AsdDataModule")
    return dm


def data_facts(dm: AsdDataModule) -> dict[str, Any]:
    """What members are sized by: audio settings and class maps (saved with the run)."""
    return dm.state_dict()


def image_frontend(facts: dict[str, Any]) -> dict[str, Any] | None:
    """The front-end node every image member gets in place of its log-mel (None for audio runs)."""
    layout = image_layout_of(facts)
    if layout is None:
        return None
    channels, height, width = layout.view
    return {"_target_": "asd.features.ImageFrontend", "channels": channels, "height": height, "width": width}


def build_member(name: str, cfg: DictConfig, runtime: dict[str, Any]) -> Branch:
    """Instantiate `branches.<name>`, passing the data facts (clip length, class counts) it asks for."""
    if name not in cfg.branches:
        raise AsdError(f"no config for member {name}: add branches.{name} (see conf/branches/default.yaml)")
    node = {k: v for k, v in plain(cfg.branches[name]).items() if k not in ENSEMBLE_KEYS}
    if runtime.get("frontend") is not None and "frontend" in node:
        node["frontend"] = runtime["frontend"]  # pictures: the image front end replaces the log-mel
        if node.get("temporal"):  # how a sound moves over time: no meaning for a picture's columns
            node["temporal"] = False
            log.info("branches.%s.temporal: off on pictures (time statistics are for audio)", name)
        if node.get("score_mode") == "temporal":  # the reconstruction error's time statistics, likewise
            node["score_mode"] = "mahalanobis"
            log.info(
                "branches.%s.score_mode: mahalanobis (the error profile) on pictures; temporal is for audio",
                name,
            )
        if node.get("speeds"):  # a picture played faster means nothing either
            node["speeds"] = []
            log.info("branches.%s.speeds: off on pictures (speed-perturbed copies are for audio)", name)
    runtime = {k: v for k, v in runtime.items() if k != "frontend"}
    member = build(node, f"branches.{name}", runtime)
    if not isinstance(member, Branch):
        raise AsdError(f"branches.{name}._target_ builds {type(member).__name__}, not an asd Branch")
    return member


def member_samples(audio: dict[str, Any]) -> int | None:
    """Samples per member input: the window's with `data.audio.window`, else the clip's (None: any)."""
    seconds = audio.get("window") or audio["duration"]
    return round(seconds * audio["sample_rate"]) if seconds else None


def build_ensemble(cfg: DictConfig, facts: dict[str, Any]) -> Ensemble:
    names = member_names(cfg)
    frozen = select_frozen(plain(cfg.freeze), names)
    layout = image_layout_of(facts)
    runtime = {
        "num_machines": len(facts["machines"]),
        "num_sections": len(facts["sections"]),
        "num_attributes": len(facts["attributes"]),
    }
    if layout is None:
        audio = facts["audio"]
        # members are built for what they see: the window when clips are windowed (asd.data.windows)
        runtime.update(num_samples=member_samples(audio), sample_rate=audio["sample_rate"])
    else:
        channels, height, width = layout.view
        runtime.update(num_samples=channels * height * width, frontend=image_frontend(facts))
        left_out = [n for n in select_branches(plain(cfg.branch)) if n not in IMAGE_MEMBERS]
        if left_out:
            log.info("data=images: members %s (%s left out: audio only)", names, ", ".join(left_out))
    members = {n: build_member(n, cfg, runtime) for n in names if n != FLOW}
    if FLOW in names:
        # b5 models the embeddings of b1-b3 when any of them is selected, else log-mel statistics
        dims = [members[n].embed_dim for n in FLOW_SOURCES if n in members]
        members[FLOW] = build_member(FLOW, cfg, {**runtime, "input_dim": sum(dims) if dims else None})
        members = {n: members[n] for n in names}  # keep the configured order
    for names_sharing in share_frontends(members).values():
        log.info("one log-mel per batch for %s (the same settings)", ", ".join(names_sharing))
    nodes = {n: plain(cfg.branches[n]) for n in names}
    # a name (lr_schedule's default is "cosine") stands for its node; "constant" and null for none
    chosen = {n: node.get("scheduler") for n, node in nodes.items()}
    chosen = {n: SCHEDULES.get(s, s) if isinstance(s, str) else s for n, s in chosen.items()}
    # a frozen member takes no optimizer steps: lr_schedule is every member's, so no warning for it
    schedulers = {
        n: build_scheduler(node, f"branches.{n}.scheduler")
        for n, node in chosen.items()
        if node and n not in frozen
    }
    ensemble = Ensemble(
        members,
        loss_weights={n: node.get("loss_weight", 1.0) for n, node in nodes.items()},
        frozen=frozen,
        grad_norm_every=cfg.get("grad_norm_every", 50),
        gradient_clip={n: node.get("gradient_clip") for n, node in nodes.items()},
        schedulers=schedulers,
    )
    same: dict[str, list[str]] = {}  # the trained members with the same schedule, said in one line
    for n in ensemble.trainable:
        same.setdefault(json.dumps(chosen[n], sort_keys=True) if chosen[n] else "constant", []).append(n)
    for text, names_sharing in same.items():
        log.info("LR schedule of %s: %s", ", ".join(names_sharing), text)
    for name, path in (cfg.get("ckpt") or {}).items():
        if path is not None:  # conf/train.yaml names every member, so `ckpt.b2=PATH` needs no `+`
            ensemble.load_member(name, path)
    ensemble.fused_references = fused_references(cfg, ensemble)
    return ensemble


#: member keys added after run folders were written: (member, key) -> (the value that means "as
#: before", the keys that do nothing at that value). At that value all of them are left out of the
#: signature, so such a folder still opens with it.
SIGNATURE_ADDED = {("stats", "modulation"): (None, ("modulation_smooth",))}


def signature(cfg: DictConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """What a run's weights depend on; a run folder of another signature is refused."""
    names = member_names(cfg)
    members = {n: plain(cfg.branches[n]) for n in names}
    for (name, key), (before, idle) in SIGNATURE_ADDED.items():
        node = members.get(name)
        if isinstance(node, dict) and key in node and node[key] == before:
            for k in (key, *idle):
                node.pop(k, None)
    sig = {"members": names, "config": members, "facts": facts}
    sig["hash"] = hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return sig


def signature_changes(theirs: Any, ours: dict[str, Any], most: int = 4) -> str:
    """What differs between a run folder's stored `signature` and this run's, for the refusal:
    "branches.stats.modulation: absent there, {...} now; ..." (the first `most` keys, then a count)."""
    if not isinstance(theirs, dict) or not {"members", "config", "facts"} <= set(theirs):
        return "the run folder's file holds no readable configuration"
    missing = object()

    def walk(a: Any, b: Any, key: str, out: list[str]) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, missing), b.get(k, missing), f"{key}.{k}", out)
        elif a != b:
            out.append(f"{key}: {show(a)} there, {show(b)} now")

    def show(v: Any) -> str:
        text = "absent" if v is missing else json.dumps(v, sort_keys=True, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    out: list[str] = []
    walk(theirs["members"], ours["members"], "members", out)
    walk(theirs["config"], ours["config"], "branches", out)
    walk(theirs["facts"], ours["facts"], "data", out)
    if not out:
        return "the same settings under another hash (a file of an older asd)"
    more = f"; and {len(out) - most} more" if len(out) > most else ""
    return "; ".join(out[:most]) + more


# ---------------------------------------------------------------------- cross-field checks
def fused_members(ensemble: Ensemble) -> list[str]:
    """The score columns that feed the fusions: every member's, then the `fusion.references` columns."""
    return [n for n in ensemble.members if n not in REFERENCES] + list(ensemble.fused_references)


#: `fusion.references=auto` fuses the first of these columns the run builds (reference=true):
#: `stats_temporal` on audio, `stats_mahalanobis` where it has no time statistics (pictures, temporal=false)
AUTO_REFERENCES = ("stats_temporal", "stats_mahalanobis")


def fused_references(cfg: DictConfig, ensemble: Ensemble) -> tuple[str, ...]:
    """`fusion.references`, checked against the score columns of the references this run builds.

    `auto` (the default) is the first of `AUTO_REFERENCES` the run builds, and the members alone where
    it builds none (reference=false), said in the log: the training-free clip statistics were the
    strongest single column on the synthetic data, and fused they lift `final` there (docs/results.md,
    "Fusing the reference by default", "Clip statistics that hear time")."""
    wanted = plain(cfg.fusion.get("references"))
    offered = [
        f"{n}_{kind}" for n, m in ensemble.members.items() if n in REFERENCES for kind in m.score_kinds
    ]
    if wanted == "auto":
        kept = tuple(c for c in AUTO_REFERENCES if c in offered)[:1]
        if not kept:
            log.info(
                "fusion.references=auto: this run builds no %s (reference=%s): the members alone are fused",
                " or ".join(AUTO_REFERENCES),
                plain(cfg.get("reference")),
            )
        return kept
    wanted = [wanted] if isinstance(wanted, str) else list(wanted or [])
    unknown = [c for c in wanted if c not in offered]
    if unknown:
        raise AsdError(
            f"fusion.references={unknown}: not a score column of this run's references "
            f"({', '.join(offered) or 'none: reference=false'}); name some of those, fusion.references=auto "
            "or fusion.references=[]"
        )
    return tuple(dict.fromkeys(wanted))


def final_choices(ensemble: Ensemble, cfg: DictConfig) -> list[str]:
    learned = [*LEARNED, WEIGHTED] if cfg.fusion.enabled else []
    return [*learned, *FUSIONS, *fused_members(ensemble)]


def check_final(ensemble: Ensemble, cfg: DictConfig) -> None:
    if cfg.final == "auto":
        return  # the calibrate stage chooses among fusion.select.candidates
    if cfg.final in (*LEARNED, WEIGHTED) and not cfg.fusion.enabled:
        raise AsdError(
            f"final={cfg.final} needs the pseudo-anomalies it is fitted on: "
            "fusion.enabled=true, or final=zmean"
        )
    if cfg.final not in final_choices(ensemble, cfg):
        raise AsdError(f"final={cfg.final!r}: expected auto or one of {final_choices(ensemble, cfg)}")


# ---------------------------------------------------------------------- the hardware
#: Lightning's names of the CUDA accelerator
GPU_ACCELERATORS = ("gpu", "cuda")
#: Lightning's short precision names -> the names it reports
PRECISION_NAMES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


@dataclass(frozen=True)
class TrainerChoice:
    """What a run trains on: the trainer node's `auto` values made concrete (`resolve_trainer`)."""

    accelerator: str
    devices: int | str | list[int]
    strategy: str
    precision: str

    @property
    def on_gpu(self) -> bool:
        return self.accelerator in GPU_ACCELERATORS

    def describe(self) -> str:
        return (
            f"accelerator={self.accelerator} devices={self.devices} "
            f"strategy={self.strategy} precision={self.precision}"
        )


def hardware() -> tuple[int, bool]:
    """This machine's CUDA device count and whether its GPU computes in bf16."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return count, bool(count) and torch.cuda.is_bf16_supported()


def resolve_trainer(trainer: Mapping[str, Any], cuda_devices: int, bf16_supported: bool) -> TrainerChoice:
    """The one decision of what a run trains on; a value the user gave always wins over `auto`.

    - accelerator `auto`: `gpu` with CUDA, else `cpu`;
    - strategy `auto`: `ddp` (one process per device) for more than one device, else one process;
    - precision `auto`: on a GPU `bf16-mixed` where it computes in bf16, else `16-mixed` (loss
      scaling: `MemberMixedPrecision`); `32-true` anywhere else.

    Args:
        trainer: the `trainer` node as a plain mapping.
        cuda_devices: how many CUDA devices this machine has (`hardware()`; tests pass made-up facts).
        bf16_supported: whether its GPU computes in bf16.
    """
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = "gpu" if cuda_devices else "cpu"
    on_gpu = accelerator in GPU_ACCELERATORS
    devices = trainer.get("devices", "auto")
    if devices in ("auto", -1, "-1"):
        count = cuda_devices if on_gpu else 1
    else:
        count = len(devices) if isinstance(devices, list) else int(devices)
    strategy = str(trainer.get("strategy", "auto"))
    if strategy == "auto":
        strategy = "ddp" if count > 1 else "auto"
    precision = str(trainer.get("precision", "32-true"))
    if precision == "auto":
        precision = ("bf16-mixed" if bf16_supported else "16-mixed") if on_gpu else "32-true"
    return TrainerChoice(accelerator, devices, strategy, PRECISION_NAMES.get(precision, precision))


# ---------------------------------------------------------------------- training machinery
def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config a logger records, so runs filter by branch, freeze, final, experiment."""
    choice = resolve_trainer(plain(cfg.trainer), *hardware())
    return {**plain(cfg), "experiment": cfg.get("experiment_name"), "hardware": asdict(choice)}


def build_logger(cfg: DictConfig, run_dir: Path, resume: bool = False) -> Any:
    """The `logger` node's logger, writing under the run folder.

    A logger that takes them gets the run's `name`, its resolved `run_config`, and `resume`: whether to
    continue the run folder's earlier logger run (a resumed fit; stages redone after a finished fit).
    """
    runtime = {"name": run_dir.name, "run_config": run_config(cfg), "resume": resume}
    # not recursive: the recorded config's `_target_` nodes are text, not objects to build
    node = plain(cfg.logger)
    return build(node, "logger", runtime, save_dir=str(run_dir), _convert_="all", _recursive_=False)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    logger: Any,
    extra_callbacks: list | None = None,
    checkpoints: bool = True,
    identity: dict[str, Any] | None = None,
) -> L.Trainer:
    """The `trainer` node's Trainer, writing under the run folder.

    With `checkpoints`, `checkpoints/last.ckpt` is written atomically at epoch ends on the cadence of
    the `checkpoint` node and carries `identity` (asd.run.checkpointing); Lightning's own
    `ModelCheckpoint` is off (`enable_checkpointing` adds only that).
    """
    callbacks = list(extra_callbacks or [])
    plugins = []
    if checkpoints:
        cadence = plain(cfg.get("checkpoint")) or {}
        callbacks.append(ResumeCheckpoint(run_dir / LAST_CKPT, identity, **cadence))
        plugins.append(AtomicCheckpointIO())
    choice = resolve_trainer(plain(cfg.trainer), *hardware())
    log.info("trainer: %s", choice.describe())
    node = {**plain(cfg.trainer), **asdict(choice)}
    if choice.precision == "16-mixed" and (choice.strategy == "auto" or choice.strategy.startswith("ddp")):
        # one loss scaler for all members: `scaler.step` per member, `update` once per training step
        # (sharded strategies, e.g. fsdp, bring their own precision plugin)
        del node["precision"]  # Lightning takes either the precision flag or a precision plugin
        plugins.append(MemberMixedPrecision("cuda" if choice.on_gpu else "cpu"))
    return build(
        node,
        "trainer",
        logger=logger,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=str(run_dir),
        enable_progress_bar=show_progress(),
        enable_checkpointing=False,
        _convert_="all",
    )


def inference_device(cfg: DictConfig) -> torch.device:
    """Where a run that skips training scores: the configured accelerator when it is there."""
    wants_gpu = str(cfg.trainer.get("accelerator", "cpu")) in (*GPU_ACCELERATORS, "auto")
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def resolve_run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        pass
    return Path(cfg.run_dir)


def with_budget(cfg: DictConfig, dm: AsdDataModule) -> DictConfig:
    """`cfg` with `trainer.max_epochs` from the step budget `steps`, when it is set; said in the log.

    An epoch is `dm.train_batches` optimizer steps (random crops with `data.audio.window`, else one
    pass over the training clips), so the budget is met to within one epoch, rounded up.
    """
    steps = cfg.get("steps")
    unit = dm.training_unit
    if steps is None:
        log.info(
            "budget: trainer.max_epochs=%s epochs of %d batches of %s (steps=null)",
            cfg.trainer.get("max_epochs"),
            dm.train_batches,
            unit,
        )
        return cfg
    epochs = max(1, math.ceil(int(steps) / dm.train_batches))
    log.info(
        "budget: steps=%d optimizer steps per member = %d epochs of %d batches of %d %s "
        "(trainer.max_epochs is not used while steps is set)",
        int(steps),
        epochs,
        dm.train_batches,
        dm.batch_size,
        unit,
    )
    return OmegaConf.merge(cfg, {"trainer": {"max_epochs": epochs}})
