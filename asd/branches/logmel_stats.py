"""Reference detector without training: per-clip log-mel statistics against the training normals.

The simplest detector that works on stationary machine sounds, reported beside the ensemble so
every table shows whether the learned members beat it. Each clip becomes one vector: the mean
over time of every log-mel bin (and, with `stats: mean_std`, the standard deviation too). Two
scores, both fitted on the fit split's normals with separate source and target references per
section, the smaller of the two:

- "mahalanobis": the distance to the section's Gaussian (mean and Ledoit-Wolf-shrunk covariance,
  `asd.scoring.MahalanobisBackend`), the statistic of the DCASE baselines' selective Mahalanobis
  applied to the raw spectrum instead of to an autoencoder's errors;
- "knn": the euclidean distance to the `k` nearest training clips (`asd.scoring.KnnBackend`).

It has no parameters to train, so the ensemble never gives it an optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asd.branches.base import Branch
from asd.errors import AsdError
from asd.scoring import KnnBackend, MahalanobisBackend

STATS = ("mean", "mean_std")


class LogMelStatsReference(Branch):
    """Mean (and std) log-mel per clip; Mahalanobis and kNN against source/target training normals."""

    name = "stats"
    needs_backend = True

    def __init__(
        self,
        frontend: nn.Module,
        stats: str = "mean",
        k: int = 1,
        shrinkage: float | str = "auto",
        covariance: str = "domain",
        calibrate: bool = False,
    ):
        """Args:
        frontend: wave (B, T) -> log-mel (B, n_mels, frames) (`asd.features.LogMel`).
        stats: "mean" (n_mels values per clip) or "mean_std" (2 * n_mels).
        k: neighbours of the kNN score.
        shrinkage: covariance shrinkage of the Mahalanobis score, "auto" (Ledoit-Wolf) or in [0, 1].
        covariance: "domain" (a covariance per source/target model) or "pooled" (each domain's own
            mean, one within-domain covariance per section; `MahalanobisBackend(covariance=)`).
        calibrate: standardise each model's and bank's distances by its clips' left-out ones, so
            source and target speak one scale before the min (`calibrate=` of both backends).
        """
        super().__init__()
        self.frontend, self.stats = frontend, stats
        self.backend = nn.ModuleDict(
            {
                "mahalanobis": MahalanobisBackend(
                    shrinkage=shrinkage, per_domain=True, covariance=covariance, calibrate=calibrate
                ),
                "knn": KnnBackend(k=k, normalize=False, calibrate=calibrate),
            }
        )

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """One statistics vector per clip, (B, n_mels) or (B, 2 * n_mels), float32."""
        spec = self.frontend(batch["wave"]).float()  # (B, T) -> (B, n_mels, frames)
        if self.stats == "mean":
            return spec.mean(dim=2)
        return torch.cat([spec.mean(dim=2), spec.std(dim=2)], dim=1)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Nothing to learn: zero (the ensemble never trains a member without parameters)."""
        return batch["wave"].new_zeros(())

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["wave"].new_zeros((batch["wave"].shape[0], 0))

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        return self.features(batch)

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        for backend in self.backend.values():
            backend.fit(feats.detach().float(), meta["section"], meta["domain"])

    #: the keys of `scores`: columns `stats_mahalanobis`, `stats_knn`
    score_kinds = ("mahalanobis", "knn")

    def scores(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both scores, each (B,)."""
        if not self.backend["knn"].fitted:
            raise AsdError("stats: fit_backend must run on the training normals before scoring")
        feats = self.features(batch)
        return {name: backend.score(feats, batch["section"]) for name, backend in self.backend.items()}

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        return self.scores(batch)["mahalanobis"]
