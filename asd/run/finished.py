"""`FinishedRun`: a finished run folder, loaded to score new recordings (`tools/score.py`).

It rebuilds the ensemble from the run's `.hydra/config.yaml` and the data facts stored with its
weights, refuses a folder whose files disagree, and scores through `asd.run.predict.predict`,
the same path the run's predict stage took (with a cross-fitted run's copies, `crossfit.pt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from asd.calibration import Calibration
from asd.config import validate
from asd.data.audio import Decoded, audio_config
from asd.data.datamodule import ClipDataset, WaveStore, label_tensors
from asd.data.table import Clip, ClipTable
from asd.data.windows import windowing_of
from asd.errors import AsdError
from asd.run.build import build_ensemble, fused_members, signature, signature_changes
from asd.run.calibrate import load_backends
from asd.run.crossfit import load_copies
from asd.run.predict import predict
from asd.run.stages import FINAL_CKPT, StageLog, load_backends_file, load_crossfit_file, load_weights


class FinishedRun:
    """The trained ensemble, its backends and calibration, and the class maps of one run folder."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir).expanduser().resolve()
        cfg_path = self.dir / ".hydra" / "config.yaml"
        for need in (cfg_path, self.dir / FINAL_CKPT, self.dir / "backends.pt", self.dir / "calibration.pt"):
            if not need.exists():
                raise AsdError(
                    f"{self.dir} is not a finished asd run: {need.relative_to(self.dir)} is missing "
                    "(give the folder train.py printed last, after it finished)"
                )
        done = StageLog(self.dir).done
        if "calibrate" not in done:
            raise AsdError(f"{self.dir}: training did not finish its calibrate stage; re-run train.py on it")
        self.cfg = OmegaConf.load(cfg_path)
        validate(self.cfg)
        if "image" in self.cfg.data:
            raise AsdError(
                f"{self.dir} is a run on pictures (data=images): scoring new pictures with a finished run "
                "is not built yet; put them under the dataset's test/ folder and run train.py on it again "
                "(its finished stages are reused)"
            )
        try:
            stored = torch.load(self.dir / FINAL_CKPT, map_location="cpu", weights_only=True)["asd_signature"]
            self.facts = stored["facts"]
        except Exception as e:  # torch raises many types for foreign or damaged files
            raise AsdError(f"{self.dir / FINAL_CKPT}: not a readable asd checkpoint ({e})") from e
        sig = signature(self.cfg, self.facts)
        if sig["hash"] != stored.get("hash"):
            raise AsdError(
                f"{self.dir}: its .hydra/config.yaml describes another configuration than its checkpoint "
                f"({signature_changes(stored, sig)}); score with the run folder exactly as train.py wrote it"
            )
        self.ensemble = build_ensemble(self.cfg, self.facts)
        load_weights(self.ensemble, self.dir / FINAL_CKPT, sig)
        load_backends(self.ensemble, load_backends_file(self.dir / "backends.pt", sig))
        self.ensemble.eval()
        #: a cross-fitted run's copies: its fused columns are their mean (as in its predict stage)
        self.copies = []
        if "crossfit" in done:
            crossfit = load_crossfit_file(self.dir / "crossfit.pt", sig)
            self.copies = load_copies(
                self.cfg, self.facts, crossfit, fused_members(self.ensemble), self.ensemble
            )
        self.calibration = Calibration.load(self.dir / "calibration.pt")
        self.audio = audio_config(**self.facts["audio"])
        self.sections = [tuple(k) for k in self.facts["sections"]]
        #: the run's test batch size: the same clips in the same batches give the same numbers
        self.batch_size = int(self.cfg.data.get("eval_batch_size") or self.cfg.data.batch_size)

    def check_known(self, clips: Sequence[Clip]) -> None:
        """Every clip's machine and section are ones this run has models of."""
        for c in clips:
            if (c.machine, c.section) not in self.sections:
                known = ", ".join(f"{m}/section_{s}" for m, s in self.sections)
                raise AsdError(
                    f"{c.path}: this run has no model of {c.machine} section {c.section}; it knows {known}"
                )

    def dataset(self, clips: Sequence[Clip]) -> ClipDataset:
        """The clips decoded with the run's audio settings, labelled with its class maps."""
        self.check_known(clips)
        table = ClipTable(clips)
        labels = label_tensors(table, self.facts["machines"], self.sections, self.facts["attributes"])
        return ClipDataset(table, WaveStore([Decoded([c.path for c in clips], self.audio)]), labels)

    def score(self, clips: Sequence[Clip], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Every column (members, fusions, final, decision) of these clips, in their order."""
        dataset = self.dataset(clips)
        return predict(
            self.ensemble,
            self.calibration,
            dataset,
            torch.device("cpu"),
            batch_size or self.batch_size,
            what="inputs",
            windowing=windowing_of(self.audio),
            copies=self.copies,
        )
