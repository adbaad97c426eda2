"""`threshold=midpoint`: thresholds between held-out normals and labelled anomalous validation clips.

The user's labelled anomalies (`validation_anomalies`: a folder or a list of WAV files) are
checked before training (each names a machine and section of the run, is not labelled normal,
and is no test clip, by path or by content) and scored after calibration through the test clips'
path (`asd.run.predict.predict`). docs/evaluation.md defines the threshold.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from asd.calibration import fence_note, fit_midpoint_thresholds
from asd.data.audio import Decoded
from asd.data.datamodule import AsdDataModule, ClipDataset, WaveStore, label_tensors
from asd.data.table import Clip, ClipTable
from asd.errors import AsdError
from asd.members import plain
from asd.run import calibrate as cal
from asd.run.crossfit import run_copies
from asd.run.predict import context_of, predict

log = logging.getLogger(__name__)


def validation_anomaly_clips(spec: str | list[str], dm: AsdDataModule) -> list[Clip]:
    """The clips `validation_anomalies` names (a folder of WAV files or a list of files), checked:
    each names a machine and section of the run, is not labelled normal, and is no test clip."""
    from asd.data.index import parse_path

    key = "validation_anomalies"
    if isinstance(spec, str):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise AsdError(f"{key}={spec}: no such folder; give a folder of WAV files or a list of them")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".wav")
        if not files:
            raise AsdError(f"{key}={spec}: the folder holds no .wav files")
    else:
        files = [Path(f).expanduser() for f in spec]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise AsdError(
                f"{key}: no such file {missing[0]} ({len(missing)} missing); list existing WAV files"
            )
    test_clips = TestClipIndex(list(dm.tables["test"]))
    clips = []
    for f in files:
        try:
            clip = parse_path(f)
        except AsdError as e:
            raise AsdError(
                f"{key}: {e}; name the files as DCASE/MIMII clips so machine and section are known"
            ) from None
        if clip.label == "normal":
            raise AsdError(f"{key}: {f} is labelled normal by its name; list labelled anomalous clips only")
        if (clip.machine, clip.section) not in dm.section_keys:
            known = ", ".join(f"{m}/section_{s}" for m, s in dm.section_keys)
            raise AsdError(
                f"{key}: {f} is {clip.machine} section {clip.section}, which this run has no model "
                f"of ({known})"
            )
        same = test_clips.find(f)
        if same is not None:
            raise AsdError(
                f"{key}: {f} is the test clip {same}; thresholds must never see test clips: "
                "give labelled anomalies kept apart from the test set"
            )
        clips.append(clip)
    return clips


class TestClipIndex:
    """Finds a file among the test clips: the same path, or the same bytes (a copy).

    Test clips are hashed lazily, only those of a size some asked-for file has.
    """

    def __init__(self, clips: list[Clip]):
        self.paths = {os.path.realpath(c.path): c.path for c in clips}
        self.by_size: dict[int, list[str]] = {}
        for c in clips:
            self.by_size.setdefault(os.path.getsize(c.path), []).append(c.path)
        self.hashes: dict[int, dict[str, str]] = {}

    def find(self, path: Path) -> str | None:
        """The test clip `path` is (None when it is none of them)."""
        if os.path.realpath(path) in self.paths:
            return self.paths[os.path.realpath(path)]
        size = path.stat().st_size
        if size not in self.by_size:
            return None
        if size not in self.hashes:
            self.hashes[size] = {_sha1(p): p for p in self.by_size[size]}
        return self.hashes[size].get(_sha1(path))


def _sha1(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def midpoint_thresholds(run: Any) -> None:
    """`threshold=midpoint`: each section's threshold halfway between the mean left-out final score of
    its reference normals and the mean final score of its labelled anomalous validation clips, which
    are scored through the test clips' path (`predict`). A section without any keeps its percentile one
    (`threshold_model`: the default model's).
    `run` is the stage's `asd.run.stages.RunState` (not imported: stages imports this module)."""
    cfg, dm, calibration = run.cfg, run.dm, run.calibration
    clips = validation_anomaly_clips(plain(cfg.validation_anomalies), dm)
    table = ClipTable(clips)
    labels = label_tensors(table, dm.machine_names, dm.section_keys, dm.attribute_keys)
    dataset = ClipDataset(table, WaveStore([Decoded([c.path for c in clips], dm.audio)]), labels)
    columns = predict(
        run.ensemble,
        calibration,
        dataset,
        run.device,
        dm.eval_batch_size,
        dm.num_workers,
        "validation anomalies",
        dm.windowing,
        run_copies(run),
    )
    normals, kind = cal.reference_normals(dm, warn=False)
    fence = cfg.get("threshold_fence", None)
    context = context_of(normals)
    rows, left = cal.threshold_rows(cfg, context, dm, calibration.final)  # as the percentile fit
    calibration.thresholds, kept, clipped = fit_midpoint_thresholds(
        calibration.thresholds,
        calibration.reference_final.numpy()[rows],
        context["section"][rows],
        columns["final"],
        labels["section"],
        fence,
    )
    names = cal.section_names(dm)
    note = (
        f"midpoint thresholds (threshold=midpoint): halfway between the mean left-out {calibration.final} "
        f"score of {kind} normals and the mean of {len(clips)} labelled anomalous validation clips, "
        "per machine/section"
    )
    if clipped:
        note += "; " + fence_note(clipped, fence, "normal score")
    note += left
    if kept:
        fell = ", ".join(names[s] for s in kept)
        # the calibrate stage's note says how those were fitted (and what threshold_fence clipped)
        kept_note = calibration.threshold_note.removesuffix(left)  # which ends with `left`, said above
        note += f"; {fell} had no labelled anomalies and kept the {kept_note}"
        log.warning(
            "stage calibrate: threshold=midpoint: %s have no labelled anomalous validation clips: "
            "they keep the %s percentile thresholds (the default model)",
            fell,
            cal.threshold_model(cfg),
        )
    calibration.threshold_note = note
    log.info("stage calibrate: %s: %s", note, np.round(calibration.thresholds.numpy(), 3).tolist())
