"""Reference detector: the DCASE 2022/2023 Task 2 baseline autoencoder, reported beside the members.

As in the official baseline: the log-mel (128 bins, n_fft 1024, hop 512, dB) is cut into
vectors of `n_frames` = 5 consecutive frames (frame t's bins, then frame t+1's, ...), and a
dense autoencoder 640 -> 128 x4 -> 8 -> 128 x4 -> 640 with BatchNorm and ReLU after every
layer but the output learns to reconstruct them with an MSE loss. Two scores:

- "mse": the mean squared reconstruction error over the clip's vectors.
- "mahalanobis" (the baseline's selective Mahalanobis): the clip's mean reconstruction-error
  vector x - x_hat (640-d), its Mahalanobis distance to the training normals' error vectors of
  the clip's section, with separate source and target models, the smaller of the two.
  Unlike the baseline, whose covariance is that of single-vector errors around zero, the models
  here are fitted on clip-level mean error vectors (mean and Ledoit-Wolf-shrunk covariance, by
  `asd.scoring.MahalanobisBackend`), so the statistic and its reference set live at the same
  level and the few target clips still give a well-conditioned covariance.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from torch import Tensor, nn

from asd.branches.base import Branch, OptimizerFactory
from asd.errors import AsdError
from asd.scoring import MahalanobisBackend

log = logging.getLogger(__name__)


def _dense(n_in: int, n_out: int) -> list[nn.Module]:
    # the baseline's BatchNorm settings (Keras defaults carried over to its PyTorch port)
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3), nn.ReLU()]


class DcaseAEBranch(Branch):
    """DCASE baseline dense autoencoder on stacked log-mel frames; MSE or selective Mahalanobis score."""

    name = "dcase_ae"

    def __init__(
        self,
        frontend: nn.Module,
        n_frames: int = 5,
        hidden: int = 128,
        bottleneck: int = 8,
        score_mode: str = "mse",
        shrinkage: float | str = "auto",
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the autoencoder for the front end's `n_mels` bins.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames) with an `n_mels` attribute (`LogMel`).
            n_frames, hidden, bottleneck: 5, 128 and 8 in the baseline.
            score_mode: what `score` returns, "mse" or "mahalanobis" (`scores` gives both).
            shrinkage: covariance shrinkage of the Mahalanobis models, "auto" (Ledoit-Wolf) or in [0, 1].
        """
        super().__init__(optimizer)
        self.embed_dim = bottleneck  # width of embed()
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        n_mels = getattr(frontend, "n_mels", None)
        if not isinstance(n_mels, int) or n_mels < 1:
            raise AsdError(
                f"dcase_ae: the frontend {type(frontend).__name__} has no integer `n_mels`; "
                "use asd.features.LogMel (the baseline's log-mel)"
            )
        self.frontend = frontend
        self.n_mels, self.n_frames = n_mels, n_frames
        self.input_dim = n_mels * n_frames
        self.score_mode = score_mode
        # Always fitted: `scores` reports the selective Mahalanobis beside the MSE in every mode.
        self.needs_backend = True
        self.encoder = nn.Sequential(
            *_dense(self.input_dim, hidden),
            *_dense(hidden, hidden),
            *_dense(hidden, hidden),
            *_dense(hidden, hidden),
            *_dense(hidden, bottleneck),
        )
        self.decoder = nn.Sequential(
            *_dense(bottleneck, hidden),
            *_dense(hidden, hidden),
            *_dense(hidden, hidden),
            *_dense(hidden, hidden),
            nn.Linear(hidden, self.input_dim),
        )
        self.backend = MahalanobisBackend(shrinkage=shrinkage, per_domain=True)

    def vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """The clips' stacked-frame vectors, (B, V, n_frames * n_mels) with V = frames - n_frames + 1."""
        spec = self.frontend(batch["wave"])  # (B, T) -> (B, n_mels, frames)
        if spec.shape[2] < self.n_frames:
            raise AsdError(
                f"dcase_ae: clips of {batch['wave'].shape[-1]} samples give {spec.shape[2]} frames, "
                f"fewer than n_frames={self.n_frames}; use longer clips (data.audio.duration) or a "
                "smaller n_frames"
            )
        b = spec.shape[0]
        v = spec.unfold(2, self.n_frames, 1)  # (B, n_mels, V, n_frames)
        v = v.permute(0, 2, 3, 1)  # (B, V, n_frames, n_mels)
        return v.reshape(b, v.shape[1], self.input_dim)  # (B, V, n_frames * n_mels), frame-major

    def _reconstruct(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(vectors, reconstruction, bottleneck code): (B, V, D), (B, V, D) float32, (B, V, bottleneck)."""
        x = self.vectors(batch)  # (B, V, D)
        b, v, d = x.shape
        z = self.encoder(x.reshape(b * v, d))  # (B*V, D) -> (B*V, bottleneck)
        recon = self.decoder(z).float().reshape(b, v, d)  # (B*V, D) -> (B, V, D)
        return x.float(), recon, z.reshape(b, v, -1)  # (B*V, bottleneck) -> (B, V, bottleneck)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """MSE over every vector of every clip."""
        x, recon, _ = self._reconstruct(batch)
        return F.mse_loss(recon, x)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Bottleneck code averaged over the clip's vectors, (B, bottleneck)."""
        return self._reconstruct(batch)[2].float().mean(dim=1)  # (B, V, bottleneck) -> (B, bottleneck)

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean reconstruction-error vector x - x_hat over the clip, (B, n_frames * n_mels)."""
        x, recon, _ = self._reconstruct(batch)
        return (x - recon).mean(dim=1)  # (B, V, D) -> (B, D)

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """Fit the source and target Mahalanobis models per section on training normals' error vectors."""
        missing = [k for k in ("section", "domain") if k not in meta]
        if missing:
            raise AsdError(
                f"dcase_ae.fit_backend: `meta` lacks {missing}; pass each clip's section and domain ids"
            )
        self.backend.fit(feats.detach().float(), meta["section"], meta["domain"])

    #: the keys of `scores` once fitted: columns `dcase_ae_mse`, `dcase_ae_mahalanobis`
    score_kinds = ("mse", "mahalanobis")

    def scores(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Both scores from one pass, each (B,): "mse", and "mahalanobis" once the backend is fitted."""
        x, recon, _ = self._reconstruct(batch)
        err = x - recon  # (B, V, D)
        out = {"mse": err.pow(2).mean(dim=(1, 2))}
        if self.backend.fitted:
            out["mahalanobis"] = self.backend.score(err.mean(dim=1), batch["section"])  # (B, D) -> (B,)
        return out

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """The `score_mode` score, (B,)."""
        if self.score_mode == "mahalanobis" and not self.backend.fitted:
            raise AsdError(
                "dcase_ae: score_mode='mahalanobis' needs fit_backend to run first (on the training "
                "normals' backend_features), or a checkpoint whose backend was fitted"
            )
        return self.scores(batch)[self.score_mode]
