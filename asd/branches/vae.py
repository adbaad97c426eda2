"""b7: convolutional variational autoencoder on log-mel, with a spatial latent and optional skips.

The clip's log-mel is standardised per mel bin, encoded by strided 2-D convolutions over
(mel, frame) into a Gaussian posterior with `latent_channels` channels at the bottleneck
resolution (1 / 2**len(channels) of each axis), and decoded back by transposed convolutions.
Training minimises a reconstruction loss plus `kl_weight` times the KL divergence to the
standard normal prior. The anomaly score is the clip's mean squared reconstruction error in
normalised units (the error profile's Mahalanobis with `score_mode="mahalanobis"`, and with the
error's time statistics too with "temporal", the default config's), plus
`score_kl` times its KL; `error_map` gives the error per bin for heatmaps, and the embedding z is
the posterior mean pooled over the bottleneck's mel and frame positions, (B, latent_channels).

Choices:
- Length-agnostic: every layer is convolutional, so clips of any length (random crops, longer
  test clips) pass. The standardised spectrogram is zero-padded (the bin mean) at the high-mel /
  late end to a multiple of the total stride 2**len(channels) on both axes and the
  reconstruction cut back; losses, scores and maps cover the true bins only.
- Spatial latent: a posterior pooled to one vector per clip cannot say *where* in time and
  frequency a spectrogram is, so it reconstructs badly for normal and anomalous clips alike.
  Pooling happens only for the embedding.
- Bottleneck batch norm: the posterior mean passes a BatchNorm (as in BN-VAE, Zhu et al. 2020),
  which keeps its batch statistics away from zero and so keeps the KL from collapsing; its
  running statistics make eval-mode outputs independent of the batch. In eval mode the latent is
  the posterior mean (no sampling), so a clip's score is a fixed function of the clip.
- Normalisation: per-mel-bin running moments of every training frame (`asd.features.BinStats`,
  as b2 and b4), updated only by `loss` in train mode.
- Skips (`skip`) from encoder levels to the decoder at every resolution above the bottleneck:
  "add" sums the encoder features in, "concat" concatenates them and mixes with a 1x1
  convolution, "gated" adds them times a learned per-channel gate sigmoid(logit) (logit starts
  at 0). Skips let the decoder bypass the bottleneck: with them it can copy anomalous detail
  through, so the error may separate less. A gate at 0 (logit -inf) gives exactly `skip="none"`
  with the same weights, because gated skips add and never change the decoder's shapes. No skip
  feeds the bottleneck resolution itself, and prior samples (`sample`) decode with zero skips.
  Default `none`: in a quick check on the default synthetic data (`train.py branch=b7`, 10 epochs,
  score_mode=mahalanobis) `none` scored 0.601 / 0.663 official (seeds 0 / 1) against 0.600 / 0.650
  for `gated`: level within noise, and `none` keeps the bottleneck the only path.
- Score: with score_mode=mse the same check gave 0.41 (none) / 0.43 (gated) official, weak on the
  target domains; the error profile's Mahalanobis (`asd.branches.error_profile`, as b2 and b4)
  gave the 0.60 above. `score_mode: temporal` (the config's default since 2026-12-05, as for b2 and
  b6) adds the error's peak and change over time: b7 0.619 -> 0.687 on synthetic seeds 61-63
  (docs/results.md, "The reconstruction error over time").
- Reconstruction loss (`recon`): "mse"; "fft" (L1 or L2 by `fft_norm` between the magnitudes of
  the orthonormal `torch.fft.rfft2` of input and reconstruction); "logfft" (the same on log1p
  magnitudes); "ssim" (1 - SSIM, torchmetrics, 11-bin Gaussian window); "hybrid", the sum of
  those four weighted by `recon_weights`. SSIM needs a data range: each clip's input is mapped
  to [0, 1] by its own min and max, the reconstruction by the same affine map, and
  `data_range=1`; so the constants do not depend on batch mates.
- KL scale: the KL per clip is summed over latent elements and divided by the clip's number of
  input bins, so it sits on the per-bin scale of the reconstruction loss.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from asd.branches.base import Branch, OptimizerFactory, conv_input
from asd.branches.error_profile import ErrorProfileScoring
from asd.choices import FFT_NORMS, RECON_TERMS, RECONS, SKIPS
from asd.errors import AsdError
from asd.features import BinStats, probe_length

log = logging.getLogger(__name__)

LOGVAR_RANGE = (-10.0, 10.0)  # keeps exp(logvar) finite early in training


# -- losses ---------------------------------------------------------------------------------------


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over all but the batch axis, (B,) float32."""
    per = 0.5 * (mu.float().square() + torch.expm1(logvar.float()) - logvar.float())  # (B, ...)
    return per.flatten(1).sum(dim=1)


def spectral_distance(x: Tensor, recon: Tensor, log_magnitude: bool, norm: str) -> Tensor:
    """Mean L1 or L2 distance between |rfft2| (optionally log1p of it) of x and recon, each (B, M, F)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        mags = [torch.fft.rfft2(t.float(), norm="ortho").abs() for t in (x, recon)]  # (B, M, F//2+1) each
        if log_magnitude:
            mags = [m.log1p() for m in mags]
        diff = mags[0] - mags[1]
        return diff.abs().mean() if norm == "l1" else diff.square().mean()


def ssim_loss(x: Tensor, recon: Tensor) -> Tensor:
    """1 - SSIM of recon against x, each (B, M, F), on each clip's input range mapped to [0, 1]."""
    lo = x.amin(dim=(1, 2), keepdim=True).detach()  # (B, 1, 1)
    span = (x.amax(dim=(1, 2), keepdim=True).detach() - lo).clamp_min(1e-6)
    with torch.autocast(device_type=x.device.type, enabled=False):
        a = ((x.float() - lo) / span)[:, None]  # (B, 1, M, F)
        b = ((recon.float() - lo) / span)[:, None]  # (B, 1, M, F)
        return 1.0 - structural_similarity_index_measure(b, a, data_range=1.0)


# -- the network ----------------------------------------------------------------------------------


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 3x3 convolution, batch norm, SiLU: halves both axes."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.SiLU())


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 4x4 transposed convolution, batch norm, SiLU: doubles both axes."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.SiLU()
    )


class Skip(nn.Module):
    """Merge of decoder features h and encoder features e of one level, same shape (B, C, m, f)."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind = kind
        if kind == "concat":
            self.mix = nn.Conv2d(2 * channels, channels, 1)
        if kind == "gated":
            #: per-channel gate sigmoid(logit); -inf closes it exactly
            self.logit = nn.Parameter(torch.zeros(channels))

    def gate(self) -> Tensor:
        """The gated skip's per-channel gate in [0, 1], (C,)."""
        return torch.sigmoid(self.logit)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        if self.kind == "add":
            return h + e
        if self.kind == "concat":
            return self.mix(torch.cat([h, e], dim=1))  # (B, 2C, m, f) -> (B, C, m, f)
        if self.kind == "gated":
            return h + self.gate()[None, :, None, None] * e
        return h


class ConvVAE(nn.Module):
    """Encoder and decoder over (B, 1, mel, frame) images whose sides are multiples of `factor`."""

    def __init__(self, channels: Sequence[int], latent_channels: int, skip: str):
        super().__init__()
        self.factor = 2 ** len(channels)
        self.skip = skip
        self.downs = nn.ModuleList(
            _conv_block(c_in, c_out) for c_in, c_out in zip([1, *channels[:-1]], channels, strict=True)
        )
        self.to_mu = nn.Conv2d(channels[-1], latent_channels, 1)
        self.mu_norm = nn.BatchNorm2d(latent_channels)
        self.to_logvar = nn.Conv2d(channels[-1], latent_channels, 1)
        self.from_latent = nn.Sequential(
            nn.Conv2d(latent_channels, channels[-1], 1), nn.BatchNorm2d(channels[-1]), nn.SiLU()
        )
        # up i takes level i's resolution to level i-1's: channels[i] -> channels[i-1] (level -1 = input)
        outs = [channels[0], *channels[:-1]]
        self.ups = nn.ModuleList(_up_block(channels[i], outs[i]) for i in reversed(range(len(channels))))
        # a skip after every up but the last: encoder levels len-2 .. 0 (not the bottleneck's level)
        self.skips = nn.ModuleList(
            Skip(skip, channels[i]) for i in reversed(range(len(channels) - 1)) if skip != "none"
        )
        self.out = nn.Conv2d(channels[0], 1, 3, padding=1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """x (B, 1, M, F) -> posterior mean and log-variance (B, L, M/s, F/s), and each level's features."""
        feats = []
        h = x
        for down in self.downs:
            h = down(h)  # (B, c_i, M / 2^(i+1), F / 2^(i+1))
            feats.append(h)
        mu = self.mu_norm(self.to_mu(h))
        logvar = self.to_logvar(h).clamp(*LOGVAR_RANGE)
        return mu, logvar, feats

    def decode(self, z: Tensor, feats: Sequence[Tensor] | None = None) -> Tensor:
        """z (B, L, M/s, F/s) -> (B, 1, M, F); `feats` are the encoder's levels (zeros when None)."""
        h = self.from_latent(conv_input(z))  # (B, c_last, M/s, F/s)
        for j, up in enumerate(self.ups):
            h = up(h)  # doubles both axes
            if j < len(self.skips):
                e = conv_input(feats[-2 - j]) if feats is not None else torch.zeros_like(h)  # level len-2-j
                h = self.skips[j](h, e)
        return self.out(h)


# -- the member -----------------------------------------------------------------------------------


class VAEBranch(ErrorProfileScoring, Branch):
    """b7: convolutional VAE on log-mel; reconstruction error (+ KL) score, pooled posterior-mean z."""

    name = "b7"
    needs_backend = False
    has_error_map = True

    def __init__(
        self,
        frontend: nn.Module,
        channels: Sequence[int] = (16, 32, 64),
        latent_channels: int = 16,
        skip: str = "none",
        kl_weight: float = 0.01,
        recon: str = "mse",
        recon_weights: Mapping[str, float] | None = None,
        fft_norm: str = "l1",
        score_kl: float = 0.0,
        score_mode: str = "mse",
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the VAE; it takes clips of any length.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames), e.g. `asd.features.LogMel`.
            channels: encoder widths per level, each level halving mel bins and frames (the decoder
                mirrors them).
            latent_channels: channels of the spatial latent, and the width of `embed`.
            skip: "none", "add", "concat" or "gated" connections from encoder to decoder levels.
            kl_weight: weight of the KL term in the loss (0 is a plain autoencoder with a noisy code).
            recon: reconstruction loss, one of `RECONS`.
            recon_weights: weights of `RECON_TERMS` for recon="hybrid" (missing terms weigh 0).
            fft_norm: "l1" or "l2" distance of the (log) spectral magnitudes for fft/logfft.
            score_kl: weight of the clip's KL added to its score (0: reconstruction error only).
            score_mode: "mse", or "mahalanobis" / "temporal" of the error (`asd.branches.error_profile`).
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        self._init_scoring(score_mode)
        for key, val, options in (
            ("skip", skip, SKIPS),
            ("recon", recon, RECONS),
            ("fft_norm", fft_norm, FFT_NORMS),
        ):
            if val not in options:
                raise AsdError(f"b7: {key}={val!r} is unknown; set branches.b7.{key} to one of {options}")
        weights = {k: float(v) for k, v in (recon_weights or {"mse": 1.0}).items()}
        stray = sorted(set(weights) - set(RECON_TERMS))
        if stray:
            raise AsdError(f"b7: recon_weights has unknown terms {stray}; use some of {RECON_TERMS}")
        if recon == "hybrid" and not any(w > 0 for w in weights.values()):
            raise AsdError(
                f"b7: recon=hybrid needs a positive weight in recon_weights (got {weights}); "
                "e.g. branches.b7.recon_weights.mse=1.0"
            )
        if not channels:
            raise AsdError("b7: channels=[] gives no encoder; set branches.b7.channels, e.g. [16, 32, 64]")

        self.frontend = frontend
        ref = next(itertools.chain(frontend.parameters(), frontend.buffers()), None)
        device = ref.device if ref is not None else None  # probe where the front end lives
        with torch.no_grad():
            probe = frontend(
                torch.zeros(1, probe_length(frontend, 4096), device=device)
            )  # (1, n_mels, frames)
        if probe.ndim != 3:
            raise AsdError(f"b7: the frontend must return (B, n_mels, frames), got {tuple(probe.shape)}")
        self.n_mels = int(probe.shape[1])
        self.recon, self.fft_norm = recon, fft_norm
        self.recon_weights = {k: weights.get(k, 0.0) for k in RECON_TERMS}
        self.kl_weight, self.score_kl = float(kl_weight), float(score_kl)
        self.embed_dim = latent_channels  # width of embed()

        self.stats = BinStats(self.n_mels)
        self.net = ConvVAE([int(c) for c in channels], latent_channels, skip)
        if self.n_mels % self.net.factor:
            log.info(
                "b7: %d mel bins are zero-padded to %d (a multiple of the total stride %d)",
                self.n_mels,
                self.n_mels + (-self.n_mels % self.net.factor),
                self.net.factor,
            )

    # -- pieces -----------------------------------------------------------------------------------

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        return self.frontend(batch["wave"])  # (B, T) -> (B, n_mels, frames)

    def _pad(self, x: Tensor) -> Tensor:
        """(B, M, F) -> (B, 1, M', F') zero-padded at the end to multiples of the total stride."""
        s = self.net.factor
        return F.pad(x, (0, -x.shape[2] % s, 0, -x.shape[1] % s))[:, None]

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised x (B, M, F) -> reconstruction (B, M, F), posterior mean and log-variance (B, L, m, f).

        The latent is a posterior sample in train mode and the mean in eval mode.
        """
        mu, logvar, feats = self.net.encode(self._pad(x))
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        recon = self.net.decode(z, feats)[:, 0, : x.shape[1], : x.shape[2]]  # (B, 1, M', F') -> (B, M, F)
        return recon, mu, logvar

    def recon_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        """The configured reconstruction loss of recon against x, each (B, M, F) normalised."""
        weights = self.recon_weights if self.recon == "hybrid" else {self.recon: 1.0}
        terms = {
            "mse": lambda: F.mse_loss(recon.float(), x.float()),
            "fft": lambda: spectral_distance(x, recon, False, self.fft_norm),
            "logfft": lambda: spectral_distance(x, recon, True, self.fft_norm),
            "ssim": lambda: ssim_loss(x, recon),
        }
        return sum(w * terms[k]() for k, w in weights.items() if w > 0)

    def kl_per_clip(self, mu: Tensor, logvar: Tensor, bins: int) -> Tensor:
        """The posterior's KL to the prior per input bin, (B,)."""
        return gaussian_kl(mu, logvar) / bins

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Reconstruction loss + kl_weight * KL per input bin, averaged over the batch."""
        spec = self.spectrogram(batch)  # (B, n_mels, frames)
        if self.training:
            self.stats.update(spec)
        x = self.stats.normalise(spec)  # (B, n_mels, frames)
        recon, mu, logvar = self._forward(x)
        kl = self.kl_per_clip(mu, logvar, x.shape[1] * x.shape[2]).mean()
        return self.recon_loss(x, recon) + self.kl_weight * kl

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Posterior mean pooled over the bottleneck's mel and frame positions, (B, latent_channels)."""
        x = self.stats.normalise(self.spectrogram(batch))  # (B, M, F)
        mu, _, _ = self.net.encode(self._pad(x))  # (B, L, m, f)
        return mu.float().mean(dim=(2, 3))  # (B, L, m, f) -> (B, L)

    def error_map(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input log-mel, reconstruction, squared error), each (B, n_mels, frames).

        Input and reconstruction are in the front end's units; the error is in normalised units,
        and its clip mean is the `score_mode="mse"` score.
        """
        spec = self.spectrogram(batch)  # (B, M, F)
        x = self.stats.normalise(spec)
        recon, _, _ = self._forward(x)
        return spec.float(), self.stats.denormalise(recon), (recon.float() - x).pow(2)

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """The error score of `score_mode`, plus score_kl times the clip's KL per bin, (B,)."""
        s = super().score(batch)
        if self.score_kl > 0:
            x = self.stats.normalise(self.spectrogram(batch))  # (B, M, F)
            mu, logvar, _ = self.net.encode(self._pad(x))
            s = s + self.score_kl * self.kl_per_clip(mu, logvar, x.shape[1] * x.shape[2])
        return s

    def draw(self, name: str, dm, out_dir: Path, n: int, device: torch.device) -> list[Path]:
        """`<name>_vae_samples.png` (prior draws decoded) and `<name>_vae_recon.png` (reconstructions)."""
        from asd.evaluation.heatmaps import plot_vae

        return plot_vae(self, name, dm, out_dir, n, device)

    @torch.no_grad()
    def sample(self, n: int, frames: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` spectrograms decoded from prior draws, (n, n_mels, frames), in the front end's units.

        The skips carry zeros: what the bottleneck alone encodes. Run it in eval mode.
        """
        s = self.net.factor
        m, f = -(-self.n_mels // s), -(-frames // s)  # bottleneck grid, ceil division
        device = self.stats.mean.device
        z = torch.randn(n, self.net.to_mu.out_channels, m, f, generator=generator).to(device)
        x = self.net.decode(z)[:, 0, : self.n_mels, :frames]  # (n, 1, M', F') -> (n, M, F)
        return self.stats.denormalise(x)
