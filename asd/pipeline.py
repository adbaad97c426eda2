"""`train(cfg)`: fit → backends → fusion → score test clips → evaluate → write the run folder.

Every stage records itself in `stages.json` in the run folder; a finished stage found there
(with its outputs) is skipped and logged as skipped, so re-running the same `run_dir` only
does what is missing, and `resume=true` continues an interrupted fit from `last.ckpt`.
Under DDP every rank computes its shard; whole-split results are gathered (duplicates a
distributed sampler pads in are removed by clip index) and only rank 0 writes.
"""

from __future__ import annotations

import csv
import hashlib
import html
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from asd.anomalies import KINDS, AnomalyConfig, PseudoAnomalies, PseudoAnomalyDataset, anomaly_config
from asd.branches.base import Branch
from asd.data.datamodule import AsdDataModule, ClipDataset, WaveStore
from asd.data.table import ClipTable
from asd.ensemble import FLOW, FLOW_SOURCES, REFERENCE, Ensemble, select_branches, select_frozen
from asd.errors import AsdError
from asd.evaluation import evaluate, fit_gamma_threshold
from asd.evaluation.export import write_submission
from asd.evaluation.metrics import TABLE_KEYS
from asd.fileio import torch_save_atomic, write_text_atomic
from asd.fusion.attention import group_weights, plot_attention_weights
from asd.fusion.stage import (
    apply_fusion,
    attention_head,
    fit_fusion,
    held_out_meta_scores,
    summarise_kinds,
    weights_table,
)
from asd.scoring import FUSIONS, GroupNormalizer, fuse

log = logging.getLogger(__name__)

STAGES = ("fit", "backends", "fusion", "score", "evaluate")
FINAL_CKPT = "checkpoints/final.ckpt"
#: the learned fusions (asd.fusion), fitted on held-out normals vs pseudo-anomalies
LEARNED = ("meta", "attention")


# ---------------------------------------------------------------------- small helpers
def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def sync_from_rank_zero(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers.

    DDP broadcasts buffers only at the start of each forward, so after the last training step
    every rank holds its own BatchNorm/normalisation statistics; inference must use one model.
    """
    if dist.is_available() and dist.is_initialized():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Stages:
    """Which stages of a run folder are finished (`stages.json`)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        self.done: dict[str, bool] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def finished(self, stage: str, *outputs: Path) -> bool:
        if self.done.get(stage) and all(p.exists() for p in outputs):
            log.info("stage %s: skipped (finished earlier in %s)", stage, self.path.parent)
            return True
        return False

    def mark(self, stage: str) -> None:
        self.done[stage] = True
        if is_rank_zero():
            write_text_atomic(self.path, json.dumps(self.done, indent=1))

    def clear_after(self, stage: str) -> None:
        """A redone stage invalidates every later one."""
        for later in STAGES[STAGES.index(stage) + 1 :]:
            self.done.pop(later, None)


# ---------------------------------------------------------------------- building
def build_datamodule(cfg: DictConfig) -> AsdDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("name", None)
    try:
        return AsdDataModule(**data)
    except TypeError as e:
        raise AsdError(f"data config: {e}; check the keys under data.") from e


def member_names(cfg: DictConfig) -> list[str]:
    names = select_branches(
        OmegaConf.to_object(cfg.branch) if OmegaConf.is_config(cfg.branch) else cfg.branch
    )
    if cfg.reference:
        names.append(REFERENCE)
    return names


def build_member(name: str, cfg: DictConfig, runtime: dict[str, Any]) -> Branch:
    """Instantiate `branches.<name>`, passing the data facts (clip length, class counts) it asks for."""
    if name not in cfg.branches:
        raise AsdError(f"no config for member {name}: add branches.{name} (see conf/branches/default.yaml)")
    node = OmegaConf.to_container(cfg.branches[name], resolve=True)
    node.pop("loss_weight", None)  # the ensemble's business, not the member's
    try:
        params = inspect.signature(get_class(node["_target_"]).__init__).parameters
    except Exception as e:  # hydra raises several types for a bad import path
        raise AsdError(f"branches.{name}._target_={node.get('_target_')!r} cannot be imported: {e}") from e
    extra = {k: v for k, v in runtime.items() if k in params and k not in node}
    try:
        member = instantiate(node, **extra)
    except Exception as e:  # hydra wraps constructor errors; show the member's own message
        cause = e.__cause__ or e
        if isinstance(cause, AsdError):
            raise cause from None
        raise AsdError(f"branches.{name}: cannot build the member: {cause}") from e
    if not isinstance(member, Branch):
        raise AsdError(f"branches.{name}._target_ builds {type(member).__name__}, not an asd Branch")
    return member


def data_facts(dm: AsdDataModule) -> dict[str, Any]:
    """What members are sized by: audio settings and class maps (saved with the run)."""
    return dm.state_dict()


def build_ensemble(cfg: DictConfig, facts: dict[str, Any]) -> Ensemble:
    names = member_names(cfg)
    freeze = OmegaConf.to_object(cfg.freeze) if OmegaConf.is_config(cfg.freeze) else cfg.freeze
    frozen = select_frozen(freeze, names)
    audio = facts["audio"]
    runtime = {
        "num_samples": round(audio["duration"] * audio["sample_rate"]) if audio["duration"] else None,
        "sample_rate": audio["sample_rate"],
        "num_machines": len(facts["machines"]),
        "num_sections": len(facts["sections"]),
        "num_attributes": len(facts["attributes"]),
    }
    members = {n: build_member(n, cfg, runtime) for n in names if n != FLOW}
    if FLOW in names:
        # b5 models the embeddings of b1-b3 when any of them is selected, else log-mel statistics
        dims = [members[n].embed_dim for n in FLOW_SOURCES if n in members]
        members[FLOW] = build_member(FLOW, cfg, {**runtime, "input_dim": sum(dims) if dims else None})
        members = {n: members[n] for n in names}  # keep the configured order
    weights = {n: cfg.branches[n].get("loss_weight", 1.0) for n in names}
    ensemble = Ensemble(
        members, loss_weights=weights, frozen=frozen, grad_norm_every=cfg.get("grad_norm_every", 50)
    )
    for name, path in (cfg.get("ckpt") or {}).items():
        ensemble.load_member(name, path)
    return ensemble


def signature(cfg: DictConfig, facts: dict[str, Any]) -> dict[str, Any]:
    """What a run's weights depend on; a run folder of another signature is refused."""
    names = member_names(cfg)
    members = {n: OmegaConf.to_container(cfg.branches[n], resolve=True) for n in names}
    sig = {"members": names, "config": members, "facts": facts}
    sig["hash"] = hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return sig


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    kind = cfg.logger.kind
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        # a folder per fit attempt (logs/version_N): a resumed fit never overwrites earlier logs
        return CSVLogger(save_dir=str(run_dir), name="logs")
    if kind == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise AsdError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard, or use logger=csv"
            ) from None
        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        mode = cfg.logger.get("mode") or ("online" if _wandb_has_key() else "offline")
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            tags=list(cfg.logger.tags),
            save_dir=str(run_dir),
            offline=mode == "offline",
            name=run_dir.name,
        )
    raise AsdError(f"logger.kind={kind!r}: expected csv, tensorboard or wandb (logger=csv|tensorboard|wandb)")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def show_progress() -> bool:
    """Progress bars only for a person at a terminal: not under CI, not into a file or pipe."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def build_trainer(
    cfg: DictConfig, run_dir: Path, logger: Any, extra_callbacks: list | None = None, checkpoints: bool = True
) -> L.Trainer:
    from pytorch_lightning.callbacks import ModelCheckpoint

    callbacks = list(extra_callbacks or [])
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0))
    opts = OmegaConf.to_container(cfg.trainer, resolve=True)
    try:
        return L.Trainer(
            **opts,
            logger=logger,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            enable_progress_bar=show_progress(),
            enable_checkpointing=checkpoints,
        )
    except (TypeError, ValueError) as e:
        raise AsdError(f"trainer config: {e}; check the keys under trainer.") from e


# ---------------------------------------------------------------------- inference
def infer(
    fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    dm: AsdDataModule,
    split: str | Dataset,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Run `fn` over a whole split (or any dataset of batch dicts), sharded across ranks, gathered,
    de-duplicated, in clip order."""
    dataset = dm.datasets[split] if isinstance(split, str) else split
    split = split if isinstance(split, str) else type(dataset).__name__
    distributed = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
    loader = DataLoader(dataset, batch_size=dm.eval_batch_size, sampler=sampler, num_workers=dm.num_workers)
    chunks: dict[str, list[np.ndarray]] = {}
    from tqdm.auto import tqdm

    bar = tqdm(loader, desc=f"scoring {split}", leave=False, disable=not (show_progress() and is_rank_zero()))
    with torch.no_grad():
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = fn(batch)
            out["index"] = batch["index"]
            for k, v in out.items():
                chunks.setdefault(k, []).append(
                    v.detach().float().cpu().numpy() if k != "index" else v.cpu().numpy()
                )
    local = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in chunks.items()}
    if distributed:
        gathered: list[dict[str, np.ndarray]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        local = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in local}
    if not local:
        return {}
    # The sampler pads the last shard with repeats of the first clips: keep each index once.
    index, first = np.unique(local["index"], return_index=True)
    if len(index) != len(dataset):
        raise AsdError(f"internal: inference over {split} returned {len(index)} of {len(dataset)} clips")
    return {k: v[first] for k, v in local.items()}


def member_scores(ensemble: Ensemble, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every score column of every member for one batch."""
    out: dict[str, Tensor] = {}
    batch = ensemble.with_flow_input(batch)
    for name, member in ensemble.members.items():
        if hasattr(member, "scores"):
            for kind, s in member.scores(batch).items():
                out[f"{name}_{kind}"] = s
        else:
            out[name] = member.score(batch)
    return out


# ---------------------------------------------------------------------- the job
def inference_device(cfg: DictConfig) -> torch.device:
    """Where a run that skips training scores: the configured accelerator when it is there."""
    wants_gpu = str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda", "auto")
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def resolve_run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        pass
    return Path(cfg.run_dir)


def train(cfg: DictConfig) -> Path:
    """Run (or finish) the whole job described by `cfg`; return the run folder."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = resolve_run_dir(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if not hydra_cfg.exists() and is_rank_zero():
        write_text_atomic(hydra_cfg, OmegaConf.to_yaml(cfg))

    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    facts = data_facts(dm)
    ensemble = build_ensemble(cfg, facts)
    check_final(ensemble, cfg)
    anomaly_settings(cfg, dm.audio.sample_rate)  # a typo fails now, not after training
    sig = signature(cfg, facts)
    stages = Stages(run_dir)
    final_ckpt = run_dir / FINAL_CKPT

    # ---- fit
    if stages.finished("fit", final_ckpt):
        load_final(ensemble, final_ckpt, sig)
        device = inference_device(cfg)
        trainer = None
    else:
        stages.clear_after("fit")
        logger = build_logger(cfg, run_dir)
        trainer = build_trainer(cfg, run_dir, logger)
        last = run_dir / "checkpoints" / "last.ckpt"
        resume_from = str(last) if cfg.resume and last.exists() else None
        if cfg.resume and resume_from is None:
            log.warning("resume=true but %s does not exist: training from the start", last)
        if resume_from:
            log.info("stage fit: resuming from %s", last)
        if ensemble.trainable:
            with warnings.catch_warnings():
                # frozen members are in eval mode on purpose; Lightning warns about any such module
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                trainer.fit(ensemble, datamodule=dm, ckpt_path=resume_from)
            if trainer.interrupted:
                raise AsdError(f"training was interrupted; continue with resume=true run_dir={run_dir}")
        else:
            log.info("stage fit: every member is frozen, nothing to train")
        device = trainer.strategy.root_device
        sync_from_rank_zero(ensemble)
        if not is_rank_zero():  # one copy of every message: rank 0 speaks for all
            logging.getLogger("asd").setLevel(logging.ERROR)
        if is_rank_zero():
            torch_save_atomic({"state_dict": ensemble.state_dict(), "asd_signature": sig}, final_ckpt)
        stages.mark("fit")
    ensemble.to(device).eval()

    # ---- backends: reference state fitted on the fit split's normals
    backends_path = run_dir / "backends.pt"
    if stages.finished("backends", backends_path):
        backends = torch.load(backends_path, map_location="cpu", weights_only=True)
        check_backends(ensemble, backends)
    else:
        stages.clear_after("backends")
        needing = [n for n, m in ensemble.members.items() if m.needs_backend]
        if needing:
            feats = infer(
                lambda b: {n: ensemble.members[n].backend_features(b) for n in needing}, dm, "fit", device
            )
            meta = _meta_of(dm.datasets["fit"])
            for n in needing:
                try:
                    ensemble.members[n].fit_backend(
                        torch.as_tensor(feats[n]).to(device), {k: v.to(device) for k, v in meta.items()}
                    )
                except AsdError as e:
                    hint = "reference=false leaves the reference out" if n == REFERENCE else f"leave {n} out"
                    raise AsdError(f"member {n} cannot fit its scoring backend: {e} (or: {hint})") from None
        backends = fit_normalisation(ensemble, cfg, dm, device)
        backends["signature"] = sig
        if is_rank_zero():
            torch_save_atomic(backends, backends_path)
            torch_save_atomic({"state_dict": ensemble.state_dict(), "asd_signature": sig}, final_ckpt)
        stages.mark("backends")

    # ---- fusion: attention head and meta-learner on held-out normals vs pseudo-anomalies; thresholds
    settings = fusion_settings(cfg)
    if backends.get("fusion_settings") == settings and stages.finished("fusion", backends_path):
        pass
    else:
        if stages.done.get("fusion"):
            log.info("stage fusion: fusion/final/threshold settings changed since the last run: refitting")
        stages.clear_after("fusion")
        stages.done.pop("fusion", None)
        backends = fit_fusion_stage(ensemble, backends, cfg, dm, device, run_dir)
        backends["fusion_settings"] = settings
        if is_rank_zero():
            torch_save_atomic(backends, backends_path)
            write_text_atomic(hydra_cfg, OmegaConf.to_yaml(cfg))  # the settings this run now holds
        stages.mark("fusion")

    # ---- score the test clips
    scores_path = run_dir / "scores.csv"
    if not len(dm.tables["test"]):
        log.warning("no test clips: stopping after the backends")
        barrier()
        return run_dir
    if stages.finished("score", scores_path):
        columns = read_scores(scores_path)
    else:
        stages.clear_after("score")
        columns = score_split(ensemble, backends, cfg, dm, "test", device)
        if is_rank_zero():
            write_scores(scores_path, dm.tables["test"], columns)
            write_submission(
                list(dm.tables["test"]),
                columns["final"],
                columns["decision"],
                run_dir / "submission",
                year=year_of(cfg, dm),
            )
        stages.mark("score")

    # ---- evaluate, tables, plots
    test = dm.tables["test"]
    unevaluable = why_not_evaluable(test)
    if unevaluable:
        log.warning("stage evaluate: skipped: %s; scores and decisions are written", unevaluable)
    elif stages.finished("evaluate", run_dir / "metrics.csv"):
        pass
    elif is_rank_zero():
        results = evaluate_methods(test, columns, year_of(cfg, dm))
        notes = [
            f"{n} weights: {m.weights_source}"
            + (" (random init, trained here)" * (m.weights_source == "scratch"))
            for n, m in ensemble.members.items()
            if hasattr(m, "weights_source")
        ]
        if "fusion" in backends:
            counts = backends["fusion"]["counts"]
            kinds = ", ".join(f"{k} {n}" for k, n in backends["fusion"]["kinds"].items())
            notes.append(
                f"learned fusions fitted on {counts['normal']} {backends['normalised_on']} normals and "
                f"{counts['pseudo_anomaly']} pseudo-anomalies ({kinds}); meta-learner adapted "
                f"{backends['fusion']['meta_args']['test_steps']} inner steps per machine/section/domain"
            )
        weights_rows = []
        if "fusion" in backends and is_rank_zero():
            weights_rows = write_attention_weights(run_dir, backends, dm, columns, cfg.plots)
        write_metrics(run_dir, results, columns, cfg, notes, weights_rows)
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"test/{m}/official": r.official for m, r in results.items()}, step=trainer.global_step
            )
        if cfg.plots:
            write_plots(run_dir, ensemble, dm, columns, cfg, device)
        if trainer is not None and cfg.logger.kind == "wandb":
            publish_to_wandb(trainer.logger, run_dir, results, weights_rows)
        stages.mark("evaluate")
    barrier()
    if trainer is not None and cfg.logger.kind == "wandb" and is_rank_zero():
        import wandb

        wandb.finish()  # flush now, so the run folder stays the last line printed
    return run_dir


# ---------------------------------------------------------------------- stage bodies
def load_final(ensemble: Ensemble, path: Path, sig: dict[str, Any]) -> None:
    """Restore the trained (and backend-fitted) ensemble of this run; refuse another configuration's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise AsdError(f"{path}: not a readable asd checkpoint ({e}); delete it to retrain") from e
    theirs = ckpt.get("asd_signature", {}).get("hash") if isinstance(ckpt, dict) else None
    if theirs != sig["hash"]:
        raise AsdError(
            f"{path} was written by another configuration (members/sizes/audio/data differ): "
            "use a new run_dir for this configuration, or the original overrides for this run folder"
        )
    ensemble.load_state_dict(ckpt["state_dict"])


def check_backends(ensemble: Ensemble, backends: dict[str, Any]) -> None:
    """`backends.pt` belongs to these members (their fitted state itself rides in the final checkpoint)."""
    missing = [
        n for n, m in ensemble.members.items() if m.needs_backend and n not in backends.get("fitted", [])
    ]
    if missing:
        raise AsdError(f"backends.pt lacks fitted backends of {missing}; delete it to refit")
    if "reference_scores" not in backends:
        raise AsdError(
            "backends.pt was written by an older asd (no held-out normals' scores); delete it to refit"
        )


def fused_members(ensemble: Ensemble) -> list[str]:
    """The members whose scores feed the fusions (the reference is reported, never fused)."""
    return [n for n in ensemble.members if n != REFERENCE]


def final_choices(ensemble: Ensemble, cfg: DictConfig) -> list[str]:
    learned = list(LEARNED) if cfg.fusion.enabled else []
    return [*learned, *FUSIONS, *fused_members(ensemble)]


def check_final(ensemble: Ensemble, cfg: DictConfig) -> None:
    if cfg.final in LEARNED and not cfg.fusion.enabled:
        raise AsdError(f"final={cfg.final} needs the learned fusions: fusion.enabled=true, or final=zmean")
    if cfg.final not in final_choices(ensemble, cfg):
        raise AsdError(f"final={cfg.final!r}: expected one of {final_choices(ensemble, cfg)}")


def fusion_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the fusion stage's result depends on beyond the members: refit when any of it changes."""
    return {
        "fusion": OmegaConf.to_container(cfg.fusion, resolve=True),
        "final": cfg.final,
        "threshold_percentile": float(cfg.threshold_percentile),
    }


def anomaly_settings(cfg: DictConfig, sample_rate: int) -> tuple[AnomalyConfig, int]:
    """The pseudo-anomaly generator's settings and the number of copies per clip, validated."""
    values = dict(OmegaConf.to_container(cfg.fusion.anomalies, resolve=True))
    copies = values.pop("copies", 8)
    if not isinstance(copies, int) or copies < 1:
        raise AsdError(f"fusion.anomalies.copies={copies}: expected a whole number of pseudo-anomalies >= 1")
    return anomaly_config({**values, "sample_rate": sample_rate}), copies


class _Rows:
    """Some rows of a wave store, read lazily (a part of a WaveStore; picklable for workers)."""

    def __init__(self, store: Any, rows: list[int]):
        self.store, self.rows = store, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store[self.rows[i]]


def reference_normals(dm: AsdDataModule, warn: bool = True) -> tuple[ClipDataset, str]:
    """The normals that normalisation, fusion and thresholds are fitted on, and how to name them.

    The held-out training normals; a section too small to hold any clip out (a single training
    clip) adds its training clips, and with nothing held out at all every training clip is used.
    Training clips stand in for held-out ones only with a warning: members have fitted them, so
    their statistics are optimistic and thresholds will flag too many clips.
    """
    val, fit = dm.datasets["val"], dm.datasets["fit"]
    say = log.warning if warn else log.debug
    if not len(val):
        say(
            "no held-out training normals (data.val_fraction=%s, or one clip per group): score "
            "normalisation, fusion and thresholds use the training clips themselves and are optimistic",
            dm.val_fraction,
        )
        return fit, "training"
    missing = sorted(set(fit.labels["section"].tolist()) - set(val.labels["section"].tolist()))
    if not missing:
        return val, "held-out"
    names = section_names(dm)
    say(
        "%s hold out no training clip (too few of them): their training clips stand in for held-out "
        "normals, so their normalisation and thresholds are optimistic",
        ", ".join(names[s] for s in missing),
    )
    rows = [i for i, s in enumerate(fit.labels["section"].tolist()) if s in missing]
    table = ClipTable([*val.table, *(fit.table[i] for i in rows)])
    waves = WaveStore([_Rows(val.waves, list(range(len(val)))), _Rows(fit.waves, rows)])
    labels = {k: torch.cat([val.labels[k], fit.labels[k][rows]]) for k in val.labels}
    labels["index"] = torch.arange(len(table))
    return ClipDataset(table, waves, labels), "held-out (and some training)"


def _meta_of(dataset: ClipDataset) -> dict[str, Tensor]:
    """Each clip's context ids (never its label)."""
    return {k: dataset.labels[k].clone() for k in ("section", "domain", "machine", "attribute")}


def fit_normalisation(ensemble: Ensemble, cfg: DictConfig, dm: AsdDataModule, device: torch.device) -> dict:
    """Per-member z-score statistics per (machine, section, domain) from the held-out normals."""
    normals, kind = reference_normals(dm)
    raw = infer(lambda b: member_scores(ensemble, b), dm, normals, device)
    meta = _meta_of(normals)
    normalizers = {}
    fell_back: dict[str, list[str]] = {}  # one warning per distinct list of groups, naming its members
    for col in fused_members(ensemble):
        norm = GroupNormalizer().fit(torch.as_tensor(raw[col]), meta["section"], meta["domain"], warn=False)
        normalizers[col] = norm
        if norm.fallbacks:
            fell_back.setdefault("; ".join(norm.fallbacks), []).append(col)
    for groups, cols in fell_back.items():
        log.warning(
            "score normalisation of %s: groups with < 2 clips or std ~ 0 fell back: %s",
            ", ".join(cols),
            groups,
        )
    log.info("stage backends: score normalisation on %d %s normals", len(normals), kind)
    return {
        "normalizers": {c: n.state_dict() for c, n in normalizers.items()},
        # the fusion stage (and any refit of it) fits on these same scores: keep them
        "reference_scores": {c: torch.as_tensor(raw[c]) for c in normalizers},
        "fitted": [n for n, m in ensemble.members.items() if m.needs_backend],
        "normalised_on": kind,
    }


def fit_fusion_stage(
    ensemble: Ensemble,
    backends: dict,
    cfg: DictConfig,
    dm: AsdDataModule,
    device: torch.device,
    run_dir: Path,
) -> dict:
    """Learned fusions on held-out normals vs their pseudo-anomalies, then per-section thresholds.

    The thresholds come from the gamma fit on the held-out normals' final scores, each computed
    as if the clip had been held out of everything fitted here: z-statistics without it
    (`left_out_z`) and, for `final=meta`, an adaptation without it and its pseudo-anomalies
    (`asd.fusion.stage.held_out_meta_scores`).
    """
    normals, kind = reference_normals(dm, warn=False)  # the backends stage said it
    backends = {k: v for k, v in backends.items() if k not in ("fusion", "thresholds")}
    backends["final"] = cfg.final
    backends["threshold_percentile"] = float(cfg.threshold_percentile)
    raw = {c: v.numpy() for c, v in backends["reference_scores"].items()}
    meta = _meta_of(normals)
    normal_z = normalised(raw, backends, meta)
    if cfg.fusion.enabled:
        fcfg = OmegaConf.to_container(cfg.fusion, resolve=True)
        config, copies = anomaly_settings(cfg, dm.audio.sample_rate)
        fake = PseudoAnomalyDataset(
            normals,
            PseudoAnomalies(config),
            copies=copies,
            seed=int(fcfg["seed"]),
            pool=dm.datasets["fit"],
        )
        kinds = fake.kinds()
        log.info(
            "stage fusion: scoring %d pseudo-anomalies of %d %s normals (%s)",
            len(fake),
            len(normal_z),
            kind,
            ", ".join(f"{k} {n}" for k, n in summarise_kinds(kinds, KINDS).items()),
        )
        fake_raw = infer(lambda b: member_scores(ensemble, b), dm, fake, device)
        source = torch.arange(len(fake)) // copies
        fake_meta = {k: v[source] for k, v in meta.items()}
        z = torch.cat([normal_z, normalised(fake_raw, backends, fake_meta)])
        ctx = {k: torch.cat([meta[k], fake_meta[k]]) for k in ("machine", "section", "domain")}
        y = torch.cat([torch.zeros(len(normal_z)), torch.as_tensor(kinds >= 0, dtype=torch.float32)])
        rows_source = torch.cat([torch.arange(len(normal_z)), source])
        state = fit_fusion(
            z,
            ctx["machine"],
            ctx["section"],
            ctx["domain"],
            y,
            members=fused_members(ensemble),
            num_machines=dm.num_machines,
            num_sections=dm.num_sections,
            cfg=fcfg,
        )
        state["kinds"] = summarise_kinds(kinds, KINDS)
        backends["fusion"] = state
        if cfg.plots and is_rank_zero():
            plot_fusion_training(run_dir / "plots", dm, fake)
    # Decision thresholds need scores of normals nothing was fitted on. The members never saw
    # these clips, but their z-scores were normalised with statistics that include them (a z of a
    # group of 5 can never exceed 1.8) and the meta-learner adapted on them: both are undone here.
    loo = left_out_z(raw, backends, meta)
    if cfg.final == "meta":
        final_t = held_out_meta_scores(
            backends["fusion"], z, ctx["machine"], ctx["section"], ctx["domain"], y, rows_source, query_z=loo
        )
    elif cfg.final == "attention":
        final_t = apply_fusion(backends["fusion"], loo, meta["machine"], meta["section"], meta["domain"])
        final_t = final_t["attention"]
    elif cfg.final in FUSIONS:
        final_t = fuse(loo, cfg.final)
    else:
        final_t = torch.as_tensor(raw[cfg.final])
    final = final_t.double().numpy()
    pooled = fit_gamma_threshold(final, cfg.threshold_percentile)
    thresholds = np.full(dm.num_sections, pooled, dtype=np.float64)
    section = meta["section"].numpy()
    for s in np.unique(section):
        thresholds[s] = fit_gamma_threshold(final[section == s], cfg.threshold_percentile)
    backends["thresholds"] = torch.as_tensor(thresholds)
    log.info(
        "stage fusion: thresholds from %d %s normals' left-out %s scores: %s",
        len(final),
        kind,
        cfg.final,
        np.round(thresholds, 3).tolist(),
    )
    return backends


def left_out_z(raw: dict[str, np.ndarray], backends: dict[str, Any], meta: dict[str, Tensor]) -> Tensor:
    """z-scores (N, members) of the reference normals, each from statistics fitted without it.

    A clip whose section holds no other clip keeps its ordinary z-score (nothing else describes
    its section). The refits' fallback warnings are those `fit_normalisation` already gave.
    """
    n = len(meta["section"])
    out = normalised(raw, backends, meta)
    scoring_log = logging.getLogger("asd.scoring")
    level = scoring_log.level
    scoring_log.setLevel(logging.ERROR)
    try:
        for i in range(n):
            keep = torch.arange(n) != i
            here = {k: meta[k][i : i + 1] for k in ("section", "domain")}
            if not (meta["section"][keep] == here["section"]).any():
                continue
            for j, col in enumerate(backends["normalizers"]):
                x = torch.as_tensor(raw[col])
                try:
                    norm = GroupNormalizer().fit(x[keep], meta["section"][keep], meta["domain"][keep])
                except AsdError:  # the others' scores are constant: keep the ordinary z-score
                    continue
                out[i, j] = norm.transform(x[i : i + 1], here["section"], here["domain"])[0]
    finally:
        scoring_log.setLevel(level)
    return out


def normalised(raw: dict[str, np.ndarray], backends: dict[str, Any], meta: dict[str, Tensor]) -> Tensor:
    """Raw member scores -> z-scores (N, members) in the normalisers' member order."""
    z = []
    for col, state in backends["normalizers"].items():
        norm = GroupNormalizer()
        norm.load_state_dict(state)
        z.append(norm.transform(torch.as_tensor(raw[col]), meta["section"], meta["domain"]))
    return torch.stack(z, dim=1)


def combine(
    raw: dict[str, np.ndarray], backends: dict[str, Any], meta: dict[str, Tensor]
) -> dict[str, np.ndarray]:
    """Raw member scores -> z-scores -> label-free and learned fusions -> the final score.

    `meta` holds each clip's section, domain and machine ids, never its label.
    """
    cols = {k: v for k, v in raw.items() if k != "index"}
    zz = normalised(cols, backends, meta)  # (N, members)
    for method in FUSIONS:
        cols[method] = fuse(zz, method).double().numpy()
    if "fusion" in backends:
        learned = apply_fusion(backends["fusion"], zz, meta["machine"], meta["section"], meta["domain"])
        for method in LEARNED:
            cols[method] = learned[method].double().numpy()
    cols["final"] = cols[backends["final"]]
    return cols


def attention_weights(
    columns: dict[str, np.ndarray], backends: dict[str, Any], meta: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Mean attention weights per (machine, section, domain) of these clips: keys (G, 3), weights (G, M)."""
    zz = normalised(columns, backends, meta)
    head = attention_head(backends["fusion"])
    return group_weights(head, zz.float(), meta["machine"], meta["section"], meta["domain"])


def score_split(
    ensemble: Ensemble, backends: dict, cfg: DictConfig, dm: AsdDataModule, split: str, device: torch.device
) -> dict[str, np.ndarray]:
    raw = infer(lambda b: member_scores(ensemble, b), dm, split, device)
    meta = _meta_of(dm.datasets[split])
    cols = combine(raw, backends, meta)
    thresholds = backends["thresholds"].numpy()
    cols["decision"] = (cols["final"] > thresholds[meta["section"].numpy()]).astype(np.int64)
    return cols


SCORE_META = ("file", "machine", "section", "domain", "label")


def write_scores(path: Path, table: ClipTable, columns: dict[str, np.ndarray]) -> None:
    """One row per clip: its identity, every member, every fusion, final, decision."""
    names = [k for k in columns if k not in ("final", "decision")] + ["final", "decision"]
    rows = [",".join([*SCORE_META, "path", *names])]
    for i, c in enumerate(table):
        values = [repr(float(columns[n][i])) if n != "decision" else str(int(columns[n][i])) for n in names]
        rows.append(",".join([c.name, c.machine, c.section, c.domain, c.label, c.path, *values]))
    write_text_atomic(path, "\n".join(rows) + "\n")


def read_scores(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        names = [n for n in reader.fieldnames or [] if n not in (*SCORE_META, "path")]
    return {n: np.array([float(r[n]) for r in rows]) for n in names}


def year_of(cfg: DictConfig, dm: AsdDataModule) -> int:
    layouts = {c.layout for c in dm.tables["test"]}
    if layouts & {"dcase2020", "mimii"}:
        return 2020
    if "dcase2021" in layouts:
        return 2021
    return int(cfg.data.get("year") or cfg.year)


def why_not_evaluable(test: ClipTable) -> str:
    """Why the official metrics cannot be computed on these test clips ("" when they can)."""
    unknown = [c for c in test if c.label == "unknown"]
    if unknown:
        return f"{len(unknown)} test clips have no label (evaluation data, e.g. {unknown[0].name})"
    one_class = [
        f"{m}/section_{s}"
        for m in test.machines()
        for s in test.sections(m)
        if len({c.label for c in test.select(machine=m, section=s)}) < 2
    ]
    if one_class:
        return f"AUC needs normal and anomalous test clips, and {', '.join(one_class)} have one kind only"
    return ""


def evaluate_methods(test: ClipTable, columns: dict[str, np.ndarray], year: int) -> dict[str, Any]:
    methods = [k for k in columns if k not in ("final", "decision")]
    return {
        m: evaluate(test, columns[m], year=year, decisions=columns["decision"] if m == "final" else None)
        for m in methods
    }


def section_names(dm: AsdDataModule) -> list[str]:
    return [f"{m}/section_{s}" for m, s in dm.section_keys]


def write_attention_weights(
    run_dir: Path, backends: dict, dm: AsdDataModule, columns: dict[str, np.ndarray], plots: bool
) -> list[dict]:
    """Mean attention weights per (machine, section, domain), on the fusion's training clips and on
    the test clips: `attention_weights.csv`, and `plots/attention_weights.png` of the test clips."""
    state = backends["fusion"]
    names = section_names(dm)
    train_rows = weights_table(state, state["group_keys"], state["group_weights"], names)
    meta = _meta_of(dm.datasets["test"])
    keys, weights = attention_weights(columns, backends, meta)
    test_rows = weights_table(state, keys, weights, names)
    rows = [{"clips": "train", **r} for r in train_rows] + [{"clips": "test", **r} for r in test_rows]
    fields = ["clips", "group", *state["members"]]
    lines = [",".join(fields)] + [",".join(_fmt(r[f]) for f in fields) for r in rows]
    write_text_atomic(run_dir / "attention_weights.csv", "\n".join(lines) + "\n")
    if plots:
        plot_attention_weights(
            [r["group"] for r in test_rows],
            weights.numpy(),
            state["members"],
            run_dir / "plots" / "attention_weights.png",
        )
    return test_rows


def plot_fusion_training(plots: Path, dm: AsdDataModule, fake: PseudoAnomalyDataset) -> None:
    """What the fusion learned from: one held-out clip and a pseudo-anomaly of every enabled kind."""
    from asd.anomalies import plot_injections

    base = fake.base
    wave = np.asarray(base.waves[0], dtype=np.float32)
    section = int(base.labels["section"][0])
    pool = dm.datasets["fit"]
    others = np.flatnonzero(pool.labels["section"].numpy() != section)
    outlier = np.asarray(pool.waves[int(others[0])], dtype=np.float32) if len(others) else None
    rng = np.random.default_rng(0)
    shown = [k for k in fake.generator.config.kinds if k != "outlier" or outlier is not None]
    injections = [fake.generator(wave, rng, outlier=outlier, kind=k) for k in shown]
    config = fake.generator.config
    plot_injections(
        wave,
        injections,
        plots / "pseudo_anomalies.png",
        config.sample_rate,
        n_fft=config.n_fft,
        hop=config.hop,
    )


def write_metrics(
    run_dir: Path,
    results: dict[str, Any],
    columns: dict[str, np.ndarray],
    cfg: DictConfig,
    notes: list[str] = (),
    weights_rows: list[dict] = (),
) -> None:
    """Write `metrics.csv` (per method and machine/section, plus official scores) and `summary.md`."""
    fields: list[str] = []
    rows: list[dict[str, Any]] = []
    for method, ev in results.items():
        for r in ev.rows:
            rows.append({"method": method, **r})
        rows.append({"method": method, "machine": "all", "section": "all", "official": ev.official})
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    buf = [",".join(fields)]
    for r in rows:
        buf.append(",".join(_fmt(r.get(k, "")) for k in fields))
    write_text_atomic(run_dir / "metrics.csv", "\n".join(buf) + "\n")
    write_text_atomic(run_dir / "summary.md", summary_markdown(results, cfg, notes, weights_rows))


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "" if np.isnan(v) else repr(float(v))
    return str(v)


def summary_markdown(
    results: dict[str, Any], cfg: DictConfig, notes: list[str] = (), weights_rows: list[dict] = ()
) -> str:
    year = next(iter(results.values())).year
    fusions = [m for m in results if m in FUSIONS or m in LEARNED]
    fused = [m for m in results if m not in fusions and not m.startswith(f"{REFERENCE}_")]
    reference = [m for m in results if m.startswith(f"{REFERENCE}_")]
    learned = [m for m in LEARNED if m in results]
    lines = [
        f"# asd run summary ({cfg.data.name}, official score convention: DCASE {year})",
        "",
        f"- members (fused): {', '.join(fused)}",
        f"- reference, reported beside and never fused: {', '.join(reference) or 'none (reference=false)'}",
        f"- label-free fusions of the members' z-scores: {', '.join(FUSIONS)}",
        f"- learned fusions (held-out normals vs pseudo-anomalies, never test labels): "
        f"{', '.join(learned) or 'none (fusion.enabled=false)'}",
        f"- final score: `{cfg.final}`; decisions: gamma threshold at the {cfg.threshold_percentile:g} "
        "percentile of held-out normals' left-out final scores per machine/section",
        *(f"- {note}" for note in notes),
        "",
        "| method | official score |",
        "| --- | --- |",
    ]
    for method, ev in results.items():
        lines.append(f"| {method} | {ev.official:.4f} |")
    lines += ["", *comparison_table(results)]
    if weights_rows:
        members = [k for k in weights_rows[0] if k != "group"]
        lines += [
            "",
            "## attention weights (mean over each group's test clips)",
            "",
            "| group | " + " | ".join(members) + " |",
            "| --- |" + " --- |" * len(members),
        ]
        for r in weights_rows:
            lines.append(f"| {r['group']} | " + " | ".join(f"{r[m]:.3f}" for m in members) + " |")
    for method, ev in results.items():
        lines += ["", f"## {method}", "", ev.to_markdown()]
    return "\n".join(lines) + "\n"


def comparison_table(results: dict[str, Any]) -> list[str]:
    """Every method's AUC per machine/section/domain side by side (pAUC in the per-method tables)."""
    first = next(iter(results.values()))
    keys = [k for k in TABLE_KEYS[first.year] if k.startswith("auc")]
    short = {"auc": "AUC", "auc_source": "source", "auc_target": "target"}
    heads = [f"{r['machine']}/{r['section']} {short[k]}" for r in first.rows for k in keys]
    lines = [
        "## AUC per machine/section/domain",
        "",
        "| method | " + " | ".join(heads) + " | official |",
        "| --- |" + " --- |" * (len(heads) + 1),
    ]
    for method, ev in results.items():
        values = [_fmt4(r[k]) for r in ev.rows for k in keys]
        lines.append(f"| {method} | " + " | ".join(values) + f" | {ev.official:.4f} |")
    return lines


def _fmt4(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.4f}"


def publish_to_wandb(
    logger: Any, run_dir: Path, results: dict[str, Any], weights_rows: list[dict] = ()
) -> None:
    """The dashboard: metrics table, official scores, ROC curves, histograms, heatmaps, attention
    weights, summary.md."""
    import wandb

    rows = [{"method": m, **r} for m, ev in results.items() for r in ev.rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = wandb.Table(columns=columns, data=[[_wandb_value(r.get(c)) for c in columns] for r in rows])
    payload: dict[str, Any] = {"test/metrics": table}
    payload.update({f"test/{m}/official": ev.official for m, ev in results.items()})
    if weights_rows:
        names = list(weights_rows[0])
        payload["test/attention_weights"] = wandb.Table(
            columns=names, data=[[r[n] for n in names] for r in weights_rows]
        )
    for png in [run_dir / "plots" / "attention_weights.png", run_dir / "plots" / "pseudo_anomalies.png"]:
        if png.exists():
            payload[f"plots/{png.stem}"] = wandb.Image(str(png))
    for kind in ("roc", "hist", "heatmap"):
        for png in sorted((run_dir / "plots").glob(f"{kind}_*.png")):
            payload[f"plots/{kind}/{png.stem}"] = wandb.Image(str(png))
    summary = (run_dir / "summary.md").read_text()
    payload["summary"] = wandb.Html(f"<pre>{html.escape(summary)}</pre>")
    logger.experiment.log(payload)
    logger.experiment.summary["summary_md"] = summary


def _wandb_value(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return None if np.isnan(v) else float(v)
    return v


def write_plots(
    run_dir: Path,
    ensemble: Ensemble,
    dm: AsdDataModule,
    columns: dict[str, np.ndarray],
    cfg: DictConfig,
    device: torch.device,
) -> None:
    from asd.evaluation.heatmaps import plot_error_maps
    from asd.evaluation.plots import plot_histograms, plot_roc

    plots = run_dir / "plots"
    test = list(dm.tables["test"])
    plot_roc(test, columns["final"], plots)
    plot_histograms(test, columns["final"], plots)
    for name, member in ensemble.members.items():
        if hasattr(member, "error_map") and cfg.num_heatmaps > 0:
            plot_error_maps(member, name, dm, plots, cfg.num_heatmaps, device)


# ---------------------------------------------------------------------- a finished run, for new recordings
class Run:
    """A finished run folder, loaded for scoring new recordings (`tools/score.py`)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir).expanduser().resolve()
        cfg_path = self.dir / ".hydra" / "config.yaml"
        for need in (cfg_path, self.dir / FINAL_CKPT, self.dir / "backends.pt"):
            if not need.exists():
                raise AsdError(
                    f"{self.dir} is not a finished asd run: {need.relative_to(self.dir)} is missing "
                    "(give the folder train.py printed last, after it finished)"
                )
        if not Stages(self.dir).done.get("fusion"):
            raise AsdError(
                f"{self.dir}: training did not finish its backends and fusion stages; re-run train.py on it"
            )
        self.cfg = OmegaConf.load(cfg_path)
        ckpt = torch.load(self.dir / FINAL_CKPT, map_location="cpu", weights_only=True)
        self.backends = torch.load(self.dir / "backends.pt", map_location="cpu", weights_only=True)
        stored = ckpt.get("asd_signature", {})
        self.facts = stored.get("facts")
        if self.facts is None:
            raise AsdError(f"{self.dir / FINAL_CKPT}: no asd signature; was it written by asd train.py?")
        sig = signature(self.cfg, self.facts)
        if sig["hash"] != stored.get("hash") or sig["hash"] != self.backends.get("signature", {}).get("hash"):
            raise AsdError(
                f"{self.dir}: its .hydra/config.yaml describes another configuration than its checkpoint "
                "and backends.pt (members, sizes or audio settings differ); score with the run folder "
                "exactly as train.py wrote it"
            )
        self.ensemble = build_ensemble(self.cfg, self.facts)
        self.ensemble.load_state_dict(ckpt["state_dict"])
        self.ensemble.eval()
        self.sections = [tuple(k) for k in self.facts["sections"]]

    def section_id(self, machine: str, section: str) -> int:
        key = (machine, section)
        if key not in self.sections:
            known = ", ".join(f"{m}/section_{s}" for m, s in self.sections)
            raise AsdError(f"this run has no model of {machine} section {section}; it knows {known}")
        return self.sections.index(key)

    def score(self, waves: Tensor, section: Tensor, domain: Tensor) -> dict[str, np.ndarray]:
        """Every column for a batch of waves (B, T) of known sections; decisions from the run's thresholds."""
        batch = {
            "wave": waves.float(),
            "section": section.long(),
            "domain": domain.long(),
            "machine": torch.tensor(
                [self.facts["machines"].index(self.sections[s][0]) for s in section.tolist()]
            ),
            "attribute": torch.full_like(section, -1),
            "is_target": domain == 1,
            "is_normal": torch.zeros_like(section, dtype=torch.bool),
            "index": torch.arange(len(section)),
        }
        with torch.no_grad():
            raw = {k: v.double().numpy() for k, v in member_scores(self.ensemble, batch).items()}
        cols = combine(
            raw, self.backends, {"section": section, "domain": domain, "machine": batch["machine"]}
        )
        thresholds = self.backends["thresholds"].numpy()
        cols["decision"] = (cols["final"] > thresholds[section.numpy()]).astype(np.int64)
        return cols
