"""Scores of the reconstruction members (b2, b4, b6, b7): mean squared error, or Mahalanobis of their errors.

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

`score_mode="temporal"` scores the error the way the `stats_temporal` reference scores a log-mel
(`asd.branches.logmel_stats`): beside the profile, on `PROFILE_BANDS` bands of the signed error
(one band per bin on a map of fewer bins, a small picture), each band's peak above its median
frame and its mean frame-to-frame change; three calibrated Mahalanobis models, and the largest of
the three distances. The profile keeps only the error's mean over time, so an event the
reconstruction misses for a few frames (a click, a missing valve cycle) is averaged away; the peak
and the change keep it. On a machine of 10 clips, where the reconstruction barely depends on the
clip, the profile's Mahalanobis is the mean log-mel's (a distance that does not move when every
clip is shifted by one vector), and this mode's is `stats_temporal`'s (docs/results.md, "The
reconstruction error over time").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asd.branches.logmel_stats import time_statistics
from asd.choices import PROFILE_MODES
from asd.errors import AsdError
from asd.scoring import MahalanobisBackend

#: bands of the temporal statistics of the error (`stats_temporal`'s default); a map of fewer bins
#: (a small picture) uses one band per bin
PROFILE_BANDS = 32


def profile_bands(n_bins: int) -> int:
    """Bands of the time statistics of an error map of `n_bins` bins: `PROFILE_BANDS`, at most one per bin."""
    return min(PROFILE_BANDS, n_bins)


def profile_backend() -> MahalanobisBackend:
    """One calibrated Mahalanobis model per section and domain, the section's within-domain covariance."""
    return MahalanobisBackend(per_domain=True, covariance="pooled", calibrate=True)


class TemporalProfileBackend(nn.Module):
    """Three calibrated Mahalanobis models of an error's statistics, and the largest distance.

    Features are (B, n_bins + 2 * bands), bands = `profile_bands(n_bins)`: the profile, then each
    band's peak and change (`asd.branches.logmel_stats.time_statistics`). Each part is calibrated on
    its models' left-out distances, so the three speak one scale and the max flags a clip that any
    of them finds out of the ordinary.
    """

    #: the score is built from calibrated distances (`Branch.calibrated`)
    calibrate = True
    PARTS = ("profile", "peak", "change")

    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleDict({name: profile_backend() for name in self.PARTS})

    @property
    def fitted(self) -> bool:
        return all(backend.fitted for backend in self.parts.values())

    @staticmethod
    def _split(feats: Tensor) -> dict[str, Tensor]:
        # width n + 2 * min(32, n): 96 or more when n >= 32 (bands = 32), else 3 n (bands = n)
        width = feats.shape[1]
        bands = PROFILE_BANDS if width >= 3 * PROFILE_BANDS else width // 3
        d = width - 2 * bands
        pieces = (feats[:, :d], feats[:, d : d + bands], feats[:, d + bands :])
        return dict(zip(TemporalProfileBackend.PARTS, pieces, strict=True))

    def fit(self, feats: Tensor, section: Tensor, domain: Tensor) -> TemporalProfileBackend:
        for name, x in self._split(feats).items():
            self.parts[name].fit(x, section, domain)
        return self

    def score(self, feats: Tensor, section: Tensor) -> Tensor:
        """(B,): the largest of the three calibrated distances."""
        parts = self._split(feats)
        return torch.stack([self.parts[n].score(x, section) for n, x in parts.items()]).amax(dim=0)


class ErrorProfileScoring:
    """Mixin of a `Branch` with `error_map`: `score` by `score_mode`, and the backend it needs."""

    name: str
    score_mode: str = "mse"

    def _init_scoring(self, score_mode: str, own: tuple[str, ...] = ()) -> None:
        """Check `score_mode` and build the backend it needs; `own`: modes the member scores itself."""
        modes = (*own, *PROFILE_MODES)
        if score_mode not in modes:
            raise AsdError(
                f"{self.name}: score_mode={score_mode!r} is unknown; set branches.{self.name}.score_mode "
                f"to one of {modes}"
            )
        self.score_mode = score_mode
        self.needs_backend = score_mode in ("mahalanobis", "temporal")
        if score_mode == "mahalanobis":
            self.backend = profile_backend()
        elif score_mode == "temporal":
            self.backend = TemporalProfileBackend()

    def error_profile(self, batch: dict[str, Tensor]) -> Tensor:
        """input - reconstruction averaged over frames, (B, n_mels) float32, in the front end's units;
        with `score_mode="temporal"` followed by the error's time statistics, (B, n_mels + 2 * bands)."""
        spec, recon, _ = self.error_map(batch)  # (B, n_mels, frames) each
        error = spec.float() - recon.float()
        profile = error.mean(dim=2)
        if self.score_mode != "temporal":
            return profile
        fix = f"use longer clips or a smaller hop_length, or branches.{self.name}.score_mode=mahalanobis"
        return torch.cat(
            [profile, time_statistics(error, profile_bands(error.shape[1]), self.name, fix)], dim=1
        )

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        """The error profile when a backend scores it, else the embedding (nothing is fitted)."""
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
        """Anomaly score per clip, (B,): the mean squared error, or the error profile's Mahalanobis
        (with `score_mode="temporal"` the largest of the three calibrated distances)."""
        if self.score_mode == "mse":
            return self.error_map(batch)[2].mean(dim=(1, 2))
        if not self.backend.fitted:
            raise AsdError(
                f"{self.name}: score_mode={self.score_mode!r} needs fit_backend to run first (on the "
                "training normals' backend_features), or a checkpoint whose backend was fitted"
            )
        return self.backend.score(self.error_profile(batch), batch["section"])
