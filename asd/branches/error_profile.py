"""Scores of the reconstruction members (b2, b4): mean squared error, or the error profile's Mahalanobis.

`score_mode="mse"` is the mean squared reconstruction error of a clip, in the member's normalised
units. `score_mode="mahalanobis"` is the statistic of the DCASE baselines' selective Mahalanobis
applied to the member's own reconstruction: each clip becomes its error profile, the signed error
input - reconstruction averaged over time per mel bin (B, n_mels, in the front end's units), and the
score is its Mahalanobis distance to the section's training normals' profiles
(`asd.scoring.MahalanobisBackend` with one mean per domain, the section's within-domain covariance,
and every model calibrated on its clips' left-out distances, so a target domain of a few clips is
measured on the same scale as the source). A profile keeps *which* bins are reconstructed badly,
where the squared error keeps only how much; on a target domain the member reconstructs worse
everywhere, the profile's mean shifts, and the target model absorbs that shift.
"""

from __future__ import annotations

from torch import Tensor

from asd.errors import AsdError
from asd.scoring import MahalanobisBackend

SCORE_MODES = ("mse", "mahalanobis")


class ErrorProfileScoring:
    """Mixin of a `Branch` with `error_map`: `score` by `score_mode`, and the backend it needs."""

    name: str
    score_mode: str = "mse"

    def _init_scoring(self, score_mode: str, own: tuple[str, ...] = ()) -> None:
        """Check `score_mode` and build the backend it needs; `own`: modes the member scores itself."""
        modes = (*own, *SCORE_MODES)
        if score_mode not in modes:
            raise AsdError(
                f"{self.name}: score_mode={score_mode!r} is unknown; set branches.{self.name}.score_mode "
                f"to one of {modes}"
            )
        self.score_mode = score_mode
        self.needs_backend = score_mode == "mahalanobis"
        if self.needs_backend:
            self.backend = MahalanobisBackend(per_domain=True, covariance="pooled", calibrate=True)

    def error_profile(self, batch: dict[str, Tensor]) -> Tensor:
        """input - reconstruction averaged over frames, (B, n_mels) float32, in the front end's units."""
        spec, recon, _ = self.error_map(batch)  # (B, n_mels, frames) each
        return (spec.float() - recon.float()).mean(dim=2)

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        """The error profile with `score_mode="mahalanobis"`, else the embedding (nothing is fitted)."""
        return self.error_profile(batch) if self.needs_backend else self.embed(batch)

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """The per-section Mahalanobis models of the training normals' error profiles."""
        missing = [k for k in ("section", "domain") if k not in meta]
        if missing:
            raise AsdError(
                f"{self.name}.fit_backend: `meta` lacks {missing}; pass each clip's section and domain"
            )
        if self.needs_backend:
            self.backend.fit(feats.detach().float(), meta["section"], meta["domain"])

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Anomaly score per clip, (B,): the mean squared error, or the error profile's Mahalanobis."""
        if self.score_mode == "mse":
            return self.error_map(batch)[2].mean(dim=(1, 2))
        if not self.backend.fitted:
            raise AsdError(
                f"{self.name}: score_mode='mahalanobis' needs fit_backend to run first (on the training "
                "normals' backend_features), or a checkpoint whose backend was fitted"
            )
        return self.backend.score(self.error_profile(batch), batch["section"])
