"""The work of the backends and calibrate stages: reference state fitted on normal training clips.

- `fit_backends`: the members' kNN/Mahalanobis banks on the fit split's normals, and the raw
  scores of the reference normals that calibration is fitted on (held-out training clips, or
  every training clip scored out of fold by the crossfit stage).
- `calibrate`: z-score statistics from those scores, the learned fusions on the normals against
  pseudo-anomalies made from them, and per-section thresholds from left-out final scores.

Test clips never reach either. Under DDP every rank computes the same state from gathered
inputs; the stages write it from rank 0.

One file: both stages (and the crossfit stage, through `fit_member_backends` and
`pseudo_anomalies`) work on one set of reference normals, scored one way; which clips those are
and how their scores and pseudo-anomalies are made is one contract.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from asd.anomalies import AnomalyConfig, PseudoAnomalies, PseudoAnomalyDataset, anomaly_config
from asd.calibration import (
    Calibration,
    fence_note,
    fit_normalizers,
    fit_thresholds,
    left_out_z,
    percentile_note,
    threshold_normals,
)
from asd.choices import FUSION_CANDIDATES, FUSIONS, WEIGHTED
from asd.data.datamodule import AsdDataModule, ClipDataset, join_rows
from asd.ensemble import Ensemble, is_reference
from asd.errors import AsdError
from asd.evaluation import THRESHOLD_MODELS
from asd.fusion import select
from asd.fusion.stage import apply_fusion, fit_fusion, held_out_meta_scores, summarise_kinds
from asd.members import REFERENCES, plain
from asd.run.build import fused_members
from asd.run.predict import context_of, infer, member_scores
from asd.scoring import DOMAIN_NAMES, fuse

log = logging.getLogger(__name__)


def threshold_model(cfg: DictConfig) -> str:
    """How `threshold_percentile` becomes a threshold from normals alone: `threshold` itself, or for
    `threshold=midpoint` the default model (its sections without labelled anomalies keep that one)."""
    chosen = cfg.get("threshold", "normal")
    return chosen if chosen in THRESHOLD_MODELS else "normal"


def section_names(dm: AsdDataModule) -> list[str]:
    return [f"{m}/section_{s}" for m, s in dm.section_keys]


def reference_normals(dm: AsdDataModule, warn: bool = True) -> tuple[ClipDataset, str]:
    """The normals that normalisation, fusion and thresholds are fitted on, and how to name them.

    When the run cross-fits (`asd.run.crossfit`), every training clip: the crossfit stage scored
    each out of fold. Else the held-out training normals; a section that holds out fewer than 2
    clips adds its training clips, and with nothing held out at all every training clip is used.
    Training clips stand in for held-out ones only with a warning: members have fitted them, so
    their statistics are optimistic and thresholds will flag too many clips.
    """
    val, fit = dm.datasets["val"], dm.datasets["fit"]
    if dm.crossfit_folds:  # every training clip, scored out of fold (the crossfit stage)
        return fit, f"cross-fitted ({dm.crossfit_folds} folds)"
    say = log.warning if warn else log.debug
    if not len(val):
        say(
            "no held-out training normals (data.val_fraction=%s, or one clip per group): score "
            "normalisation, fusion and thresholds use the training clips themselves and are optimistic",
            dm.val_fraction,
        )
        return fit, "training"
    held = val.labels["section"].tolist()
    # a section needs 2 held-out clips for a spread of its own scores
    missing = sorted(s for s in set(fit.labels["section"].tolist()) if held.count(s) < 2)
    if not missing:
        return val, "held-out"
    names = section_names(dm)
    say(
        "%s hold out fewer than 2 training clips (too few of them): their training clips stand in "
        "beside the held-out ones, so their normalisation and thresholds are optimistic",
        ", ".join(names[s] for s in missing),
    )
    rows = [i for i, s in enumerate(fit.labels["section"].tolist()) if s in missing]
    return join_rows([(val, range(len(val))), (fit, rows)]), "held-out (and some training)"


def run_infer(
    fn,
    dm: AsdDataModule,
    dataset: ClipDataset | PseudoAnomalyDataset,
    device,
    what: str,
    per_window=False,
    check=None,
):
    """`infer` with the data module's loader settings and windowing (a row per clip unless `per_window`)."""
    return infer(
        fn, dataset, device, dm.eval_batch_size, dm.num_workers, what, dm.windowing, per_window, check
    )


# ---------------------------------------------------------------------- backends stage
def fit_member_backends(
    ensemble: Ensemble, dm: AsdDataModule, dataset: ClipDataset, device: torch.device
) -> list[str]:
    """Fit the members' scoring backends (kNN banks, Mahalanobis models) on `dataset`'s clips; their names."""
    needing = [n for n, m in ensemble.members.items() if m.needs_backend]
    if not needing:
        return needing

    def backend_features(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        ensemble.prime(batch)  # cached log-mels, when the batch has them
        return {n: ensemble.members[n].backend_features(batch) for n in needing}

    # members score windows, so their banks and models hold the training clips' windows
    feats = run_infer(
        backend_features,
        dm,
        dataset,
        device,
        "fit",
        per_window=True,
    )
    per_clip = dm.windowing.per_clip if dm.windowing is not None else 1
    context = {k: v.repeat_interleave(per_clip) for k, v in context_of(dataset).items()}
    for n in needing:
        try:
            ensemble.members[n].fit_backend(
                torch.as_tensor(feats[n]).to(device), {k: v.to(device) for k, v in context.items()}
            )
        except AsdError as e:
            hint = "reference=false leaves the references out" if n in REFERENCES else f"leave {n} out"
            raise AsdError(f"member {n} cannot fit its scoring backend: {e} (or: {hint})") from None
    return needing


def fit_backends(
    ensemble: Ensemble, dm: AsdDataModule, device: torch.device, crossfit: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fit the members' scoring backends on the fit split; score the reference normals.

    Returns the `backends.pt` content: each member's fitted backend state, and the raw scores of
    the reference normals (every fused member's column) with how those normals were chosen. With
    `crossfit` (the crossfit stage's result) those scores are its out-of-fold ones.
    """
    needing = fit_member_backends(ensemble, dm, dm.datasets["fit"], device)
    state = {"members": {n: ensemble.members[n].backend_state() for n in needing}}
    if crossfit is not None:
        return {
            **state,
            "reference_scores": dict(crossfit["reference_scores"]),
            "fake_scores": crossfit["fake_scores"],
            "normalised_on": reference_normals(dm)[1],
        }
    normals, kind = reference_normals(dm)
    raw = run_infer(
        lambda b: member_scores(ensemble, b),
        dm,
        normals,
        device,
        "held-out normals",
        check=ensemble.check_ids,
    )
    return {
        **state,
        "reference_scores": {c: torch.as_tensor(raw[c]) for c in fused_members(ensemble)},
        "normalised_on": kind,
    }


def load_backends(ensemble: Ensemble, backends: dict[str, Any]) -> None:
    """Put the fitted backend states of `backends.pt` into the members."""
    missing = [n for n, m in ensemble.members.items() if m.needs_backend and n not in backends["members"]]
    if missing or set(backends["reference_scores"]) != set(fused_members(ensemble)):
        raise AsdError(f"backends.pt does not belong to these members (lacks {missing}); delete it to refit")
    for name, state in backends["members"].items():
        ensemble.members[name].load_backend_state(state)


# ---------------------------------------------------------------------- calibrate stage
def choose_final(
    calibration: Calibration,
    cfg: DictConfig,
    z: Tensor | None,
    loo: Tensor,
    ctx: dict[str, Tensor] | None,
    y: Tensor | None,
    source: Tensor | None,
    dm: AsdDataModule,
    kind: Tensor | None = None,
) -> None:
    """`final=auto`: the fusion that best separates cross-fitted normals from pseudo-anomalies.

    Sets `calibration.final`, `.selection` (every candidate's criterion) and `.reason`.
    Without pseudo-anomalies (`fusion.enabled=false`) there is nothing to judge on: zmean decides.
    When a (machine, section, domain) group holds fewer than `fusion.select.min_normals` reference
    normals, meta and attention are left out of the candidates: fitted and judged on so few clips
    they lost to the label-free fusions on every small configuration of
    `benchmarks/bench_quality.py` (docs/results.md). `zweighted` (one weight per member) stays.
    """
    if z is None:
        calibration.final = "zmean"
        calibration.reason = "final=auto without pseudo-anomalies (fusion.enabled=false): zmean"
        log.info("stage calibrate: %s", calibration.reason)
        return
    fcfg = plain(cfg.fusion)
    names = list(fcfg["select"]["candidates"])
    thin = ""
    n_normal = len(loo)
    groups = ctx["section"][:n_normal] * 3 + ctx["domain"][:n_normal]  # (machine, section, domain) ids
    fewest = int(torch.bincount(groups)[torch.unique(groups)].min())
    need = int(fcfg["select"]["min_normals"])
    if fewest < need and any(n in select.LEARNED for n in names):
        # too few clips to fit a learned fusion on, or to judge one: the label-free fallback decides
        names = [n for n in names if n not in select.LEARNED] or ["zmean"]
        thin = (
            f"meta and attention were not candidates: a machine/section/domain group holds {fewest} "
            f"reference normal(s), fewer than fusion.select.min_normals={need}; "
        )
    if n_normal < 2 and WEIGHTED in names:
        # one normal cannot be split into folds: zweighted could only be judged on its own weights' rows
        names = [n for n in names if n != WEIGHTED] or ["zmean"]
        thin += "zweighted was not a candidate: 1 reference normal cannot be cross-fitted; "
    learned, plan = {}, None
    folds, seed = int(fcfg["select"]["folds"]), int(fcfg["seed"])
    judged = np.ones(len(y), dtype=bool)
    by_kind = fcfg["select"].get("split", "source") == "kind"
    fitted_names = [n for n in names if n in select.LEARNED or n == WEIGHTED]
    if fitted_names:
        plan = select.kind_plan(n_normal, source, kind, folds, seed) if by_kind else None
        if by_kind and plan is None:
            by_kind = False
            log.info(
                "stage calibrate: fusion.select.split=kind needs 2 or more pseudo-anomaly kinds: by source"
            )
        plan = plan or select.source_plan(n_normal, source, folds, seed)
        judged = torch.stack([held for _, held in plan]).any(dim=0).numpy()
    if WEIGHTED in names:
        rows = torch.cat([loo, z[n_normal:]])
        power, rule, measure = weighted_settings(fcfg["weighted"])
        learned[WEIGHTED] = select.cross_fitted_weighted(
            rows,
            y.numpy().astype(np.int64),
            ctx["section"].numpy(),
            plan,
            power,
            rule,
            measure,
            reference_columns(calibration.members),
            reference_share(fcfg["weighted"]),
        )
    if any(n in select.LEARNED for n in names):
        learned |= select.cross_fitted_learned(
            z,
            loo,
            ctx,
            y,
            plan,
            members=calibration.members,
            num_machines=dm.num_machines,
            num_sections=dm.num_sections,
            cfg=fcfg,
        )
    scores = {n: v[judged] for n, v in select.candidate_scores(names, z, loo, learned).items()}
    best, table = select.select(scores, y.numpy().astype(np.int64)[judged], ctx["section"].numpy()[judged])
    calibration.final, calibration.selection = best, table
    listed = ", ".join(f"{n} {v:.4f}" for n, v in table.items())
    fitted, which = "", "/".join(fitted_names)
    if plan and by_kind:
        fitted = f", {which} fitted without the judged clips' fold and kinds ({len(plan)} fits)"
    elif plan:
        fitted = f", {which} fitted out of fold ({len(plan)} folds)"
    calibration.reason = (
        f"final=auto chose {best}: {thin}the highest hmean of per-section AUC and pAUC of "
        f"{n_normal} {calibration.normalised_on} normals (left-out) against "
        f"{int(judged[n_normal:].sum())} pseudo-anomalies" + fitted + f": {listed}"
    )
    log.info("stage calibrate: %s", calibration.reason)


def weigh_members(
    calibration: Calibration, rows: Tensor, y: Tensor, section: Tensor, cfg: DictConfig
) -> None:
    """`zweighted`'s weights: each member's criterion on `rows` (N, M) (normals' left-out z-scores,
    then their pseudo-anomalies'), and the weights `fusion.weighted.rule` makes (`power` or the
    discriminant, `asd.fusion.select.member_weights`)."""
    power, rule, measure = weighted_settings(cfg.fusion.weighted)
    members = calibration.members
    criteria, weights, note = select.member_weights(
        rows,
        y.numpy().astype(np.int64),
        section.numpy(),
        power,
        rule,
        measure,
        reference_columns(members),
        reference_share(cfg.fusion.weighted),
    )
    calibration.member_criteria = {m: float(c) for m, c in zip(members, criteria, strict=True)}
    calibration.weights = {m: float(w) for m, w in zip(members, weights / weights.sum(), strict=True)}
    calibration.weights_rule, calibration.weights_note, calibration.weights_measure = rule, note, measure
    log.info(
        "stage calibrate: zweighted weights (fusion.weighted.rule=%s, measure=%s; each member's criterion "
        "alone on normals vs pseudo-anomalies in brackets)%s: %s%s",
        rule,
        measure,
        f", {note}" if note else "",
        ", ".join(f"{m} {w:.2f} ({criteria[i]:.3f})" for i, (m, w) in enumerate(calibration.weights.items())),
        anchored_note(cfg.fusion.weighted, members),
    )


def calibrated_members(ensemble: Ensemble, cfg: DictConfig) -> list[str]:
    """Fused members that keep their calibrated backend's scores as z-scores (none by default).

    `fusion.normalisation.calibrated=backend` keeps them: their statistics then come from left-out
    scores of every fit-split normal, per source/target model, without a test clip's domain. The
    default `held_out` normalises them like the others, on normals the members never trained on:
    a backend's left-out scores are of clips the member itself fitted, and how optimistic that
    makes them differs from member to member (docs/results.md: `held_out` scored higher in every
    paired seed).
    """
    if cfg.fusion.normalisation.get("calibrated", "held_out") != "backend":
        return []
    return [n for n in fused_members(ensemble) if ensemble.members[column_member(ensemble, n)].calibrated]


def column_member(ensemble: Ensemble, column: str) -> str:
    """The member a score column comes from: `b2` -> b2, `stats_mahalanobis` -> stats."""
    if column in ensemble.members:
        return column
    return next(n for n in ensemble.members if column.startswith(f"{n}_"))


def anomaly_settings(cfg: DictConfig, sample_rate: int) -> tuple[AnomalyConfig, int]:
    """The pseudo-anomaly generator's settings and the number of copies per clip, validated."""
    values = {k: v for k, v in plain(cfg.fusion.anomalies).items() if k != "copies"}
    return anomaly_config({**values, "sample_rate": sample_rate}), anomaly_copies(cfg)


def anomaly_copies(cfg: DictConfig) -> int:
    """`fusion.anomalies.copies`: pseudo-anomalies per reference normal (audio and pictures)."""
    copies = cfg.fusion.anomalies.get("copies", 8)
    if not isinstance(copies, int) or copies < 1:
        raise AsdError(f"fusion.anomalies.copies={copies}: expected a whole number of pseudo-anomalies >= 1")
    return copies


def anomaly_generator(cfg: DictConfig, dm: AsdDataModule) -> tuple[Any, int]:
    """The run's pseudo-anomaly generator and copies per clip: waveform edits for audio
    (`fusion.anomalies`), picture edits for images (`fusion.image_anomalies`, the copies of
    `fusion.anomalies.copies`)."""
    if dm.modality == "image":
        from asd.image_anomalies import ImagePseudoAnomalies, image_anomaly_config

        config = image_anomaly_config(plain(cfg.fusion.get("image_anomalies")))
        return ImagePseudoAnomalies(config, dm.layout), anomaly_copies(cfg)
    config, copies = anomaly_settings(cfg, dm.audio.sample_rate)
    return PseudoAnomalies(config), copies


def pseudo_anomalies(cfg: DictConfig, dm: AsdDataModule, normals: ClipDataset) -> PseudoAnomalyDataset:
    """The pseudo-anomalies the fusions are fitted on: `fusion.anomalies.copies` edits of each of
    `normals`, outlier clips drawn from the fit split; the same for the same settings and clips."""
    generator, copies = anomaly_generator(cfg, dm)
    return PseudoAnomalyDataset(
        normals, generator, copies=copies, seed=int(cfg.fusion.seed), pool=dm.datasets["fit"]
    )


#: `fusion.weighted` keys added after runs were written, at the values those runs used
WEIGHTED_ADDED = {"rule": "criterion", "measure": "official", "reference_share": None}


def weighted_settings(weighted: Mapping[str, Any]) -> tuple[float, str, str]:
    """(power, rule, measure) of a `fusion.weighted` node; a key it lacks has its `WEIGHTED_ADDED` value."""
    return (
        float(weighted["power"]),
        str(weighted.get("rule", WEIGHTED_ADDED["rule"])),
        str(weighted.get("measure", WEIGHTED_ADDED["measure"])),
    )


def reference_share(weighted: Mapping[str, Any]) -> float | None:
    """`fusion.weighted.reference_share` as a float, or None (off; also for configs written before it)."""
    share = weighted.get("reference_share", None)
    return None if share is None else float(share)


def reference_columns(columns: Sequence[str]) -> np.ndarray:
    """Which fused columns are a reference's (`fusion.references`), a boolean mask (M,)."""
    return np.array([is_reference(c) for c in columns], dtype=bool)


def anchored_note(weighted: Mapping[str, Any], columns: Sequence[str]) -> str:
    """What `fusion.weighted.reference_share` did to `zweighted`'s weights, for the summary ("" when off)."""
    share = reference_share(weighted)
    if share is None:
        return ""
    fused = [c for c in columns if is_reference(c)]
    if not fused:
        return f"; fusion.weighted.reference_share={share:g} unused: no reference column is fused"
    return f"; {', '.join(fused)} held at least {share:g} of the weight (fusion.weighted.reference_share)"


def threshold_rows(
    cfg: DictConfig, context: Mapping[str, Tensor], dm: AsdDataModule, final: str
) -> tuple[np.ndarray, str]:
    """The reference normals the thresholds are fitted on (`threshold_min_domain`), and the summary's
    words for those left out ("" when none is).

    Only a cross-fitted run leaves any out: there each clip of a small domain was scored by a copy
    that saw at most one other clip of it, and its left-out score sits above its test clips'. A
    held-out clip was scored by members that saw the rest of its domain, and measured no higher
    than its section's other held-out clips (docs/results.md), so held-out runs keep every normal
    (the note says so where a small group would have gone).
    A small domain's clips can take the threshold of the rest of their section only when `final`
    is a z-score of each clip's own domain (a fusion); a member's raw score (`final=b2`) keeps every
    normal, and the note says so."""
    least = int(cfg.get("threshold_min_domain", 1))
    if least > 1 and not dm.crossfit_folds:
        every = np.ones(len(context["section"]), dtype=bool)
        if threshold_normals(context["section"], context["domain"], least).all():
            return every, ""
        return every, (
            f"; no small domain was left out (threshold_min_domain={least} applies to cross-fitted runs "
            "only: here each clip was scored by members that saw the rest of its domain)"
        )
    if least > 1 and final not in FUSION_CANDIDATES:  # fused per-domain z-scores: one scale
        return np.ones(len(context["section"]), dtype=bool), (
            f"; threshold_min_domain={least} unused: final={final} is a raw score, whose domains "
            "need not share a scale"
        )
    rows = threshold_normals(context["section"], context["domain"], least)
    if rows.all():
        return rows, ""
    names = section_names(dm)
    section, domain = context["section"].numpy(), context["domain"].numpy()
    groups = sorted({(int(s), int(d)) for s, d in zip(section[~rows], domain[~rows], strict=True)})
    which = ", ".join(f"{names[s]} {DOMAIN_NAMES[d]}" for s, d in groups)
    note = (
        f"; the {int((~rows).sum())} left-out scores of domains with fewer than {least} of their section's "
        f"normals ({which}) set no threshold; their clips take the threshold the rest of their section sets "
        "(threshold_min_domain)"
    )
    return rows, note


def _z_limit(cfg: DictConfig) -> float | None:
    """`fusion.normalisation.z_limit` as a float, or None (off; also for configs written before it)."""
    limit = cfg.fusion.normalisation.get("z_limit", None)
    return None if limit is None else float(limit)


def calibrate(
    ensemble: Ensemble, backends: dict[str, Any], cfg: DictConfig, dm: AsdDataModule, device: torch.device
) -> tuple[Calibration, PseudoAnomalyDataset | None]:
    """Normalisers, learned fusions and thresholds from the reference normals (and their fakes).

    The thresholds (`threshold`: a normal prediction bound or a gamma fit) come from the normals'
    final scores, each computed as if the clip had been held out of everything fitted here:
    z-statistics without it (`left_out_z`) and, for `final=meta`, an adaptation without it and its
    pseudo-anomalies (`held_out_meta_scores`).
    Returns the calibration and the pseudo-anomalies it was fitted on (for the plots).
    """
    normals, kind = reference_normals(dm, warn=False)  # the backends stage said it
    members = fused_members(ensemble)
    raw = {c: v.numpy() for c, v in backends["reference_scores"].items()}
    context = context_of(normals)
    shrinkage = float(cfg.fusion.normalisation.shrinkage)
    keep = calibrated_members(ensemble, cfg)
    calibration = Calibration(
        members=members,
        normalizers=fit_normalizers(raw, members, context, shrinkage, keep=keep),
        shrinkage=shrinkage,
        reference_scores=dict(backends["reference_scores"]),
        normalised_on=kind,
        final=cfg.final,
        threshold_percentile=float(cfg.threshold_percentile),
        z_limit=_z_limit(cfg),
    )
    log.info(
        "stage calibrate: score normalisation on %d %s normals%s",
        len(normals),
        kind,
        f"; {', '.join(keep)} keep their calibrated backend scores as z-scores" if keep else "",
    )
    normal_z = calibration.normalise(raw, context)
    fake = z = ctx = y = rows_source = None  # the fusions' training rows: normals, then pseudo-anomalies
    if cfg.fusion.enabled:
        fcfg = plain(cfg.fusion)
        fake = pseudo_anomalies(cfg, dm, normals)
        generator, copies = fake.generator, fake.copies
        kinds = fake.kinds()
        out_of_fold = backends.get("fake_scores") is not None
        log.info(
            "stage calibrate: %s %d pseudo-anomalies of %d %s normals (%s)",
            "out-of-fold scores of" if out_of_fold else "scoring",
            len(fake),
            len(normal_z),
            kind,
            ", ".join(f"{k} {n}" for k, n in summarise_kinds(kinds, generator.all_kinds).items()),
        )
        if out_of_fold:  # scored by the crossfit stage
            fake_raw = {c: v.numpy() for c, v in backends["fake_scores"].items()}
        else:
            fake_raw = run_infer(
                lambda b: member_scores(ensemble, b),
                dm,
                fake,
                device,
                "pseudo-anomalies",
                check=ensemble.check_ids,
            )
        source = torch.arange(len(fake)) // copies
        fake_context = {k: v[source] for k, v in context.items()}
        z = torch.cat([normal_z, calibration.normalise(fake_raw, fake_context)])
        ctx = {k: torch.cat([context[k], fake_context[k]]) for k in ("machine", "section", "domain")}
        y = torch.cat([torch.zeros(len(normal_z)), torch.as_tensor(kinds >= 0, dtype=torch.float32)])
        rows_source = torch.cat([torch.arange(len(normal_z)), source])
        calibration.fusion = fit_fusion(
            z,
            ctx["machine"],
            ctx["section"],
            ctx["domain"],
            y,
            members=members,
            num_machines=dm.num_machines,
            num_sections=dm.num_sections,
            cfg=fcfg,
        )
        calibration.fusion.kinds = summarise_kinds(kinds, generator.all_kinds)
    # Decision thresholds need scores of normals nothing was fitted on. The members never saw
    # these clips, but their z-scores were normalised with statistics that include them (a z of a
    # group of 5 can never exceed 1.8) and the meta-learner adapted on them: both are undone here.
    loo = left_out_z(calibration, context)
    if z is not None:
        weigh_members(calibration, torch.cat([loo, z[len(loo) :]]), y, ctx["section"], cfg)
    if cfg.final == "auto":
        row_kind = None if y is None else torch.cat([torch.full((len(loo),), -1), torch.as_tensor(kinds)])
        choose_final(calibration, cfg, z, loo, ctx, y, rows_source, dm, row_kind)
    final_name = calibration.final
    if final_name == "meta":
        final_t = held_out_meta_scores(
            calibration.fusion, z, ctx["machine"], ctx["section"], ctx["domain"], y, rows_source, query_z=loo
        )
    elif final_name == "attention":
        fused = apply_fusion(
            calibration.fusion, loo, context["machine"], context["section"], context["domain"]
        )
        final_t = fused["attention"]
    elif final_name == WEIGHTED:
        final_t = calibration.weighted(loo)
    elif final_name in FUSIONS:
        final_t = fuse(loo, final_name)
    else:
        final_t = torch.as_tensor(raw[final_name])
    final = final_t.double().numpy()
    calibration.reference_final = torch.as_tensor(final)  # threshold=midpoint's normal side
    fence, shrinkage = cfg.get("threshold_fence", None), float(cfg.get("threshold_shrinkage", 0.0))
    model = threshold_model(cfg)
    rows, left = threshold_rows(cfg, context, dm, final_name)
    calibration.thresholds, clipped = fit_thresholds(
        final[rows],
        context["section"][rows],
        dm.num_sections,
        calibration.threshold_percentile,
        fence,
        shrinkage,
        model,
    )
    note = percentile_note(calibration.threshold_percentile, f"{int(rows.sum())} {kind}", shrinkage, model)
    if cfg.get("threshold", "normal") == model:  # under threshold=midpoint it names the fallback
        note += f" (threshold={model})"
    calibration.threshold_note = note + (f", {fence_note(clipped, fence)}" if clipped else "") + left
    log.info("stage calibrate: thresholds: %s", calibration.threshold_note)
    log.info(
        "stage calibrate: thresholds from %d %s normals' left-out %s scores: %s",
        int(rows.sum()),
        kind,
        final_name,
        np.round(calibration.thresholds.numpy(), 3).tolist(),
    )
    return calibration, fake
