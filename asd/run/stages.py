"""The stages of a run: fit -> crossfit -> backends -> calibrate -> predict -> report.

Each stage names the run-folder files it reads and writes, computes on every rank
(`compute`: inference is sharded across DDP ranks and gathered), writes its files from rank 0
only (`write`), and can restore its result from those files instead (`load`). A stage never
rewrites another stage's files. `stages.json` records each finished stage with the settings it
ran with; `asd.run.job.train` skips a finished stage whose settings and files are unchanged and
redoes a stage whose settings changed, with every stage after it. docs/architecture.md draws
the flow.

One file: the six stages share `RunState`, `Stage` and `StageLog`, and each stage's settings
say what a change must redo; together they are the one flow `asd.run.job` runs. The
labelled-anomaly threshold lives in `asd.run.validation`.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from asd.anomalies import PseudoAnomalyDataset
from asd.calibration import Calibration
from asd.data.datamodule import AsdDataModule
from asd.ensemble import Ensemble, is_reference
from asd.errors import AsdError
from asd.evaluation.export import write_submission
from asd.evaluation.metrics import decision_table
from asd.fileio import torch_save_atomic, write_text_atomic
from asd.run import calibrate as cal
from asd.run import publish, report
from asd.run.build import (
    build_logger,
    build_trainer,
    fused_members,
    hardware,
    inference_device,
    plain,
    resolve_trainer,
    signature_changes,
    with_budget,
)
from asd.run.checkpointing import (
    LAST_CKPT,
    Interrupted,
    interrupted_message,
    own_interrupt_message,
    resumable,
)
from asd.run.crossfit import cross_fit, crossfit_folds, run_copies, training_clips
from asd.run.distributed import quiet_other_ranks, sync_from_rank_zero
from asd.run.loggers import wandb_run_id
from asd.run.predict import infer, member_embeddings, predict
from asd.run.validation import midpoint_thresholds, validation_anomaly_clips

log = logging.getLogger(__name__)

FINAL_CKPT = "checkpoints/final.ckpt"


@dataclass
class RunState:
    """What one `train(cfg)` call carries from stage to stage."""

    cfg: DictConfig
    run_dir: Path
    dm: AsdDataModule
    ensemble: Ensemble
    signature: dict[str, Any]
    device: torch.device = torch.device("cpu")
    trainer: L.Trainer | None = None
    calibration: Calibration | None = None
    #: the crossfit stage's out-of-fold scores (`asd.run.crossfit.cross_fit`), None without it
    crossfit: dict[str, Any] | None = None
    #: its copies, built once for scoring (`asd.run.crossfit.run_copies`)
    copies: list[Ensemble] | None = None
    fake: PseudoAnomalyDataset | None = None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    #: the final method's `decision_table` rows (report stage)
    decisions: list[dict] = field(default_factory=list)

    @property
    def year(self) -> int:
        """The official-score convention: the test clips' layout, else `year` of the config.

        Pictures have no domains: they are scored as DCASE 2020 (AUC and pAUC per section, averaged)."""
        layouts = {c.layout for c in self.dm.tables["test"]}
        if layouts & {"dcase2020", "mimii", "images"}:
            return 2020
        if "dcase2021" in layouts:
            return 2021
        return int(self.cfg.data.get("year") or self.cfg.get("year") or 2023)


class Stage:
    """One step of a run; subclasses name their files and settings and do the work."""

    name = ""
    #: a stage that is off by the settings: its skip is said at info level, not as a warning
    optional = False
    #: run-folder files it reads (besides the data) and writes, relative to the run folder
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def settings(self, run: RunState) -> dict[str, Any]:
        """What its result depends on beyond earlier stages' results: a change redoes it."""
        return {}

    def skip_reason(self, run: RunState) -> str:
        """Why this stage cannot run on this data ("" when it can)."""
        return ""

    def compute(self, run: RunState) -> None:
        """The work, on every rank."""

    def write(self, run: RunState) -> None:
        """Write `writes`; called on rank 0 only."""

    def load(self, run: RunState) -> None:
        """Restore the result from `writes` (a finished stage that is skipped)."""

    def outputs(self, run: RunState) -> list[Path]:
        return [run.run_dir / rel for rel in self.writes]


class StageLog:
    """`stages.json`: each finished stage and the settings it ran with."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stages.json"
        try:
            self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError) as e:
            raise AsdError(f"{self.path}: unreadable ({e}); delete it to redo every stage") from e

    def status(self, stage: Stage, settings: dict[str, Any], run: RunState) -> str:
        """ "finished", "changed" (finished with other settings) or "todo"."""
        if stage.name not in self.done or not all(p.exists() for p in stage.outputs(run)):
            return "todo"
        recorded = self.done[stage.name]
        # `true`: a run folder of an asd that did not record settings; trust it as it is
        if recorded is True or _jsonable(recorded) == _jsonable(settings):
            return "finished"
        return "changed"

    def forget_from(self, stage: str, order: list[str]) -> None:
        for later in order[order.index(stage) :]:
            self.done.pop(later, None)

    def mark(self, stage: str, settings: dict[str, Any]) -> None:
        self.done[stage] = settings or True
        write_text_atomic(self.path, json.dumps(self.done, indent=1, default=str))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def crossfitting(run: RunState) -> dict[str, bool]:
    """The settings key of a cross-fitted run ({} otherwise: folders of runs before it stay finished)."""
    return {"crossfit": True} if run.dm.crossfit_folds else {}


# ---------------------------------------------------------------------- the stages
class Fit(Stage):
    """Train the members jointly; write the trained weights with the run's signature."""

    name = "fit"
    writes = (FINAL_CKPT,)

    def settings(self, run: RunState) -> dict[str, Any]:
        """Which clips train (the hold-out), how long, from which seed: a change retrains.

        The members' own configuration is the run's signature, checked against `final.ckpt`.
        """
        data, trainer = run.cfg.data, run.cfg.trainer
        return {
            "split": {
                k: plain(data.get(k)) for k in ("val_fraction", "seed", "mimii_train_normals", "machines")
            },
            "budget": {
                **{k: plain(trainer.get(k)) for k in ("max_epochs", "max_steps")},
                "steps": plain(run.cfg.get("steps")),
                "batches_per_epoch": plain(data.get("batches_per_epoch")),
            },
            "seed": int(run.cfg.seed),
            **crossfitting(run),  # nothing held out while cross-fitting
        }

    def identity(self, run: RunState) -> dict[str, Any]:
        """What a fit resumed from `last.ckpt` must share with the one that wrote it (not the budget)."""
        settings = self.settings(run)
        return {
            "signature": run.signature["hash"],
            "split": settings["split"],
            "seed": settings["seed"],
            **crossfitting(run),
        }

    def compute(self, run: RunState) -> None:
        cfg, run_dir = run.cfg, run.run_dir
        if cfg.get("threshold", "normal") == "midpoint":  # a bad list fails now, not after training
            validation_anomaly_clips(plain(cfg.validation_anomalies), run.dm)
        identity = self.identity(run)
        cfg = with_budget(cfg, run.dm)
        last = run_dir / LAST_CKPT
        resume_from = resumable(last, identity) if cfg.resume else None
        # a resumed fit logs on in the folder's wandb run; a fit from the start begins a new one
        logger = build_logger(cfg, run_dir, resume=resume_from is not None)
        run.trainer = build_trainer(cfg, run_dir, logger, identity=identity)
        if not cfg.resume and last.exists():
            log.warning("stage fit: training from the start replaces %s (resume=true continues it)", last)
        if run.ensemble.trainable:
            with warnings.catch_warnings(), own_interrupt_message():
                # frozen members are in eval mode on purpose; Lightning warns about any such module
                warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
                # nothing held out (cross-fitting, or data.val_fraction=0): no validation batches, on purpose
                warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
                try:
                    run.trainer.fit(run.ensemble, datamodule=run.dm, ckpt_path=resume_from)
                except SIGTERMException:  # raised after the batch that SIGTERM interrupted
                    raise Interrupted(interrupted_message(last, run_dir, "SIGTERM")) from None
                except SystemExit:  # Lightning's answer to Ctrl-C: teardown, then exit(1)
                    if run.trainer.interrupted:
                        raise Interrupted(interrupted_message(last, run_dir, "Ctrl-C")) from None
                    raise
        else:
            log.info("stage fit: every member is frozen, nothing to train")
        run.device = run.trainer.strategy.root_device
        sync_from_rank_zero(run.ensemble)
        quiet_other_ranks()  # from here on every rank holds the same model: rank 0 speaks for all

    def write(self, run: RunState) -> None:
        state = {"state_dict": run.ensemble.state_dict(), "asd_signature": run.signature}
        torch_save_atomic(state, run.run_dir / FINAL_CKPT)

    def load(self, run: RunState) -> None:
        load_weights(run.ensemble, run.run_dir / FINAL_CKPT, run.signature)
        run.device = inference_device(run.cfg)


class CrossFit(Stage):
    """k more fits, each without one fold: out-of-fold scores of every training normal and of its
    pseudo-anomalies, for the calibrate stage (`asd.run.crossfit`); off for larger runs."""

    name = "crossfit"
    optional = True
    writes = ("crossfit.pt",)

    def settings(self, run: RunState) -> dict[str, Any]:
        fusion = run.cfg.fusion
        fakes = {k: plain(fusion.get(k)) for k in ("seed", "anomalies", "image_anomalies")}
        fakes["anomalies"] = stored_anomalies(fakes["anomalies"])
        return {
            "folds": run.dm.crossfit_folds,
            "fused": fused_members(run.ensemble),
            "pseudo_anomalies": fakes if fusion.enabled else False,
        }

    def skip_reason(self, run: RunState) -> str:
        if run.dm.crossfit_folds:
            return ""
        return f"off ({crossfit_folds(run.cfg, training_clips(run.dm))[1]})"

    def compute(self, run: RunState) -> None:
        dm = run.dm
        fake = cal.pseudo_anomalies(run.cfg, dm, dm.datasets["fit"]) if run.cfg.fusion.enabled else None
        run.crossfit = cross_fit(
            run.cfg,
            dm,
            fused_members(run.ensemble),
            fake,
            run.device,
            dm.crossfit_folds,
            run.run_dir,
            run.ensemble,
        )

    def write(self, run: RunState) -> None:
        torch_save_atomic({**run.crossfit, "signature": run.signature}, run.run_dir / "crossfit.pt")

    def load(self, run: RunState) -> None:
        run.crossfit = load_crossfit_file(run.run_dir / "crossfit.pt", run.signature)


class Backends(Stage):
    """Fit the members' kNN/Mahalanobis banks on the training normals; score the reference normals."""

    name = "backends"
    reads = (FINAL_CKPT,)
    writes = ("backends.pt",)

    def settings(self, run: RunState) -> dict[str, Any]:
        # the reference normals' scores it keeps are those of the fused columns
        # with cross-fitting, the reference scores it keeps are the crossfit stage's
        return {"fused": fused_members(run.ensemble), **crossfitting(run)}

    def compute(self, run: RunState) -> None:
        run.ensemble.to(run.device).eval()
        if run.crossfit is not None and len(run.crossfit["fold"]) != len(run.dm.datasets["fit"]):
            raise AsdError(
                f"{run.run_dir / 'crossfit.pt'} holds {len(run.crossfit['fold'])} training clips, the data "
                f"{len(run.dm.datasets['fit'])}: delete it to cross-fit again"
            )
        state = cal.fit_backends(run.ensemble, run.dm, run.device, crossfit=run.crossfit)
        self.state = {**state, "signature": run.signature}

    def write(self, run: RunState) -> None:
        torch_save_atomic(self.state, run.run_dir / "backends.pt")

    def load(self, run: RunState) -> None:
        run.ensemble.to(run.device).eval()
        self.state = load_backends_file(run.run_dir / "backends.pt", run.signature)
        cal.load_backends(run.ensemble, self.state)


#: `fusion.anomalies` keys conf/fusion/default.yaml lists since 2026-12-05 (before, only the schema
#: knew them), at the values they held then. Fixed here, not read from `AnomalyConfig`: should a
#: default change later, runs made with the old value must be cross-fitted and calibrated again
LISTED_LATER: dict[str, tuple[float, float]] = {
    "level_db": (-10.0, 5.0), "span": (0.1, 0.6), "gain_db": (6.0, 12.0), "pitch_semitones": (1.0, 3.0),
    "mod_rate_hz": (2.0, 30.0), "mod_depth": (0.3, 0.9), "band": (0.03, 0.2), "blob_fraction": (0.03, 0.15),
    "eq_db": (3.0, 10.0), "eq_octaves": (0.3, 1.5), "hum_db": (-30.0, -12.0),
}  # fmt: skip


def stored_anomalies(values: dict[str, Any] | None) -> dict[str, Any] | None:
    """`fusion.anomalies` as a stage's settings store it: a key of `LISTED_LATER` left out where it
    holds the value it had when the config began to list it, so a run folder made before (with the
    same edits) is not cross-fitted and calibrated again."""
    if values is None:
        return None
    return {
        k: v
        for k, v in values.items()
        if not (k in LISTED_LATER and isinstance(v, list | tuple) and tuple(v) == LISTED_LATER[k])
    }


class Calibrate(Stage):
    """Normalisers, learned fusions and thresholds: `calibration.pt` (and the pseudo-anomaly plot)."""

    name = "calibrate"
    reads = (FINAL_CKPT, "backends.pt")
    writes = ("calibration.pt",)

    def __init__(self, backends: Backends):
        self.backends = backends

    def settings(self, run: RunState) -> dict[str, Any]:
        cfg = run.cfg
        fusion = plain(cfg.fusion)
        # the defaults, and what runs made before the keys existed used: their calibration still stands
        weighted = fusion.get("weighted", {})
        for key, value in cal.WEIGHTED_ADDED.items():
            if weighted.get(key) == value:
                del weighted[key]
        if "anomalies" in fusion:
            fusion["anomalies"] = stored_anomalies(fusion["anomalies"])
        return {
            "fusion": fusion,
            "final": cfg.final,
            "threshold_percentile": float(cfg.threshold_percentile),
            "threshold_fence": cfg.get("threshold_fence", None),
            # only when set: runs made before the key existed stored no such setting
            **({"threshold_shrinkage": float(k)} if (k := cfg.get("threshold_shrinkage")) else {}),
            # 1 is what runs made before the key existed used: their thresholds still stand
            **({"threshold_min_domain": int(m)} if (m := cfg.get("threshold_min_domain", 1)) != 1 else {}),
            "threshold": cfg.get("threshold", "normal"),
            # threshold=midpoint's sections without labelled anomalies keep this model's thresholds
            # (gamma's before threshold=normal existed: such runs are calibrated again)
            **({"midpoint_fallback": cal.threshold_model(cfg)} if cfg.get("threshold") == "midpoint" else {}),
            "validation_anomalies": plain(cfg.get("validation_anomalies")),
        }

    def compute(self, run: RunState) -> None:
        run.calibration, run.fake = cal.calibrate(
            run.ensemble, self.backends.state, run.cfg, run.dm, run.device
        )
        if run.cfg.get("threshold", "normal") == "midpoint":
            midpoint_thresholds(run)

    def write(self, run: RunState) -> None:
        run.calibration.save(run.run_dir / "calibration.pt")
        if run.cfg.plots and run.fake is not None:
            publish.plot_fusion_training(run.run_dir / "plots", run.dm, run.fake)

    def load(self, run: RunState) -> None:
        run.calibration = Calibration.load(run.run_dir / "calibration.pt")


class Predict(Stage):
    """Score every test clip: `scores.csv`, `errors.csv`, the DCASE submission files, and the
    members' test embeddings `embeddings.npz`."""

    name = "predict"
    reads = (FINAL_CKPT, "backends.pt", "calibration.pt")
    writes = ("scores.csv", "errors.csv", "embeddings.npz", "submission")

    def skip_reason(self, run: RunState) -> str:
        return "" if len(run.dm.tables["test"]) else "no test clips"

    def compute(self, run: RunState) -> None:
        dm = run.dm
        run.columns = predict(
            run.ensemble,
            run.calibration,
            dm.datasets["test"],
            run.device,
            dm.eval_batch_size,
            dm.num_workers,
            "test",
            dm.windowing,
            run_copies(run),
        )
        none = [n for n, m in run.ensemble.members.items() if m.embed_dim == 0]
        if none:
            log.info(
                "stage predict: %s have no embedding (embed_dim 0): not in embeddings.npz", ", ".join(none)
            )
        self.embeddings = infer(
            lambda b: member_embeddings(run.ensemble, b),
            dm.datasets["test"],
            run.device,
            dm.eval_batch_size,
            dm.num_workers,
            "test embeddings",
            dm.windowing,
        )

    def write(self, run: RunState) -> None:
        test = run.dm.tables["test"]
        report.write_scores(run.run_dir / "scores.csv", test, run.columns)
        report.write_errors(run.run_dir / "errors.csv", test, run.columns)
        report.write_embeddings(run.run_dir / "embeddings.npz", test, self.embeddings)
        write_submission(
            list(test), run.columns["final"], run.columns["decision"], run.run_dir / "submission", run.year
        )

    def load(self, run: RunState) -> None:
        run.columns = report.read_scores(run.run_dir / "scores.csv")


class Report(Stage):
    """Official metrics of every method, the summary, attention weights, plots, the wandb dashboard."""

    name = "report"
    reads = ("scores.csv", "calibration.pt", "embeddings.npz")
    writes = ("metrics.csv", "summary.md")

    def settings(self, run: RunState) -> dict[str, Any]:
        return {"plots": bool(run.cfg.plots), "heatmaps": heatmap_settings(run.cfg)}

    def skip_reason(self, run: RunState) -> str:
        test = run.dm.tables["test"]
        return "no test clips" if not len(test) else report.why_not_evaluable(test)

    def compute(self, run: RunState) -> None:
        test, final = run.dm.tables["test"], run.calibration.final
        run.results = report.evaluate_methods(test, run.columns, run.year, final)
        run.decisions = decision_table(test, run.columns["decision"])
        self.pixels: list[dict] = []
        if run.dm.modality == "image":
            from asd.evaluation.pixels import pixel_rows

            self.pixels = pixel_rows(run.ensemble, run.dm, run.device)

    def write(self, run: RunState) -> None:
        cfg, run_dir, calibration = run.cfg, run.run_dir, run.calibration
        weights_rows: list[dict] = []
        if calibration.fusion is not None:
            names = cal.section_names(run.dm)
            rows, weights_rows, weights = publish.attention_rows(calibration, run.dm, run.columns, names)
            report.write_attention_weights(
                run_dir / "attention_weights.csv", calibration.fusion.members, rows
            )
            if cfg.plots:
                publish.plot_attention(weights_rows, weights, calibration.fusion.members, run_dir / "plots")
        notes = self.notes(run)
        pixels = self.pixels
        if pixels:
            report.write_csv(
                run_dir / "pixel_metrics.csv",
                list(pixels[0]),
                ([r[k] for k in pixels[0]] for r in pixels),
            )
            overall = ", ".join(
                f"{r['member']} {r['pixel_auroc']:.3f}" for r in pixels if r["section"] == "all"
            )
            notes.append(
                f"pixel AUROC of the error maps against the defect masks (pixel_metrics.csv): {overall}"
            )
        report.write_metrics(
            run_dir,
            run.results,
            cfg,
            notes,
            weights_rows,
            calibration.final,
            run.decisions,
            calibration.threshold_note,
            calibration.normalised_on,
            [m for m in calibration.members if is_reference(m)],
            calibration.shrinkage,
            calibration.z_limit,
            report.how_weighted(calibration.weights_rule, calibration.weights_note),
        )
        logger = run.trainer.logger if run.trainer is not None else self.earlier_wandb_run(run)
        if logger is not None:
            logger.log_metrics(
                {f"test/{m}/official": r.official for m, r in run.results.items()}
                | {
                    f"test/{r['member']}/pixel_auroc": r["pixel_auroc"]
                    for r in pixels
                    if r["section"] == "all"
                },
                step=run.trainer.global_step if run.trainer is not None else None,
            )
        if cfg.plots:
            plots = run_dir / "plots"
            thresholds = calibration.thresholds.tolist()
            by_section = {key: thresholds[i] for i, key in enumerate(run.dm.section_keys)}
            heatmaps = heatmap_settings(cfg)
            publish.write_plots(
                plots,
                run.ensemble,
                run.dm,
                run.columns,
                heatmaps,
                run.device,
                {calibration.final: by_section},
            )
            publish.plot_training_curves(run_dir, plots)
            publish.plot_embeddings(run_dir / "embeddings.npz", plots, int(cfg.seed))
        if is_wandb(logger):
            publish.publish_to_wandb(logger, run_dir, run.results, weights_rows)
            if run.trainer is None:  # the logger is this stage's own: flush it now
                import wandb

                wandb.finish()

    @staticmethod
    def earlier_wandb_run(run: RunState) -> Any:
        """When an earlier call did the fit: the folder's wandb run, resumed by id (None without one)."""
        if wandb_run_id(run.run_dir) is None:
            return None
        logger = build_logger(run.cfg, run.run_dir, resume=True)
        return logger if is_wandb(logger) else None

    @staticmethod
    def notes(run: RunState) -> list[str]:
        notes = [
            f"{n} weights: {m.weights_source}"
            + (" (random init, trained here)" * (m.weights_source == "scratch"))
            for n, m in run.ensemble.members.items()
            if m.weights_source
        ]
        if run.calibration.reason:
            notes.append(run.calibration.reason)
        if run.calibration.weights:
            rule, measure = run.calibration.weights_rule, run.calibration.weights_measure
            judged = "its AUC alone" if measure == "auc" else "its criterion"
            notes.append(
                f"zweighted member weights (fusion.weighted.rule={rule}, measure={measure}; in brackets "
                f"{judged} of each member alone on normals vs pseudo-anomalies): "
                + ", ".join(
                    f"{m} {w:.2f} ({run.calibration.member_criteria[m]:.3f})"
                    for m, w in run.calibration.weights.items()
                )
                + cal.anchored_note(run.cfg.fusion.weighted, run.calibration.members)
            )
        if run.trainer is not None:
            notes.append(f"trained with {resolve_trainer(plain(run.cfg.trainer), *hardware()).describe()}")
        fusion = run.calibration.fusion
        if fusion is not None:
            kinds = ", ".join(f"{k} {n}" for k, n in fusion.kinds.items())
            on = run.calibration.normalised_on
            notes.append(
                f"learned fusions fitted on {fusion.counts['normal']} {on} normals and "
                f"{fusion.counts['pseudo_anomaly']} pseudo-anomalies ({kinds}); meta-learner adapted "
                f"{fusion.meta_args['test_steps']} inner steps per machine/section/domain"
            )
        return notes


def heatmap_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `heatmaps` node; the deprecated `num_heatmaps` (an older run folder's) sets its `count`."""
    heatmaps = {
        "count": 4,
        "indices": None,
        "split": "test",
        "cmap": "magma",
        **(plain(cfg.get("heatmaps")) or {}),
    }
    if cfg.get("num_heatmaps") is not None:
        log.warning(
            "num_heatmaps is deprecated: it sets heatmaps.count=%d; write heatmaps.count", cfg.num_heatmaps
        )
        heatmaps["count"] = int(cfg.num_heatmaps)
    return heatmaps


def is_wandb(logger: Any) -> bool:
    from pytorch_lightning.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def make_stages() -> list[Stage]:
    backends = Backends()
    return [Fit(), CrossFit(), backends, Calibrate(backends), Predict(), Report()]


# ---------------------------------------------------------------------- the files, with their checks
def load_weights(ensemble: Ensemble, path: Path, sig: dict[str, Any]) -> None:
    """Restore the trained ensemble of this run; refuse another configuration's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise AsdError(f"{path}: not a readable asd checkpoint ({e}); delete it to retrain") from e
    theirs = ckpt.get("asd_signature") if isinstance(ckpt, dict) else None
    if not isinstance(theirs, dict) or theirs.get("hash") != sig["hash"]:
        raise AsdError(
            f"{path} was written by another configuration ({signature_changes(theirs, sig)}): "
            "use a new run_dir for this configuration, or the original overrides for this run folder"
        )
    ensemble.load_state_dict(ckpt["state_dict"])


def load_crossfit_file(path: Path, sig: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise AsdError(
            f"{path}: not a readable asd cross-fit file ({e}); delete it to cross-fit again"
        ) from e
    if not isinstance(state, dict) or not {"reference_scores", "copies", "signature"} <= set(state):
        raise AsdError(f"{path} was written by an older asd; delete it to cross-fit again")
    if state["signature"].get("hash") != sig["hash"]:
        raise AsdError(
            f"{path} belongs to another configuration than {FINAL_CKPT} "
            f"({signature_changes(state['signature'], sig)}); delete it to cross-fit again"
        )
    return state


def load_backends_file(path: Path, sig: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise AsdError(f"{path}: not a readable asd backends file ({e}); delete it to refit") from e
    if not isinstance(state, dict) or not {"members", "reference_scores", "signature"} <= set(state):
        raise AsdError(f"{path} was written by an older asd; delete it to refit the backends")
    if state["signature"].get("hash") != sig["hash"]:
        raise AsdError(
            f"{path} belongs to another configuration than {FINAL_CKPT} "
            f"({signature_changes(state['signature'], sig)}); delete it to refit"
        )
    return state
