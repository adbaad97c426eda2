"""b2: spectrogram patch Transformer autoencoder on log-mel, optionally trained MAE-style.

The clip's log-mel is standardised per mel bin, cut into non-overlapping
`patch_freq x patch_time` patches, encoded by a pre-norm Transformer and decoded back to
patches by a second one. The anomaly score is the mean squared reconstruction error over
the spectrogram; `error_map` gives it per time-frequency bin for heatmaps, and the
embedding z is the encoder's latent averaged over patches.

Choices:
- Normalisation: per-mel-bin mean and standard deviation of every training frame seen so
  far (exact running moments in buffers, updated only by `loss` in train mode). It needs
  no knowledge of the front end's units, keeps no batch or instance statistics at scoring
  time (so a clip's score does not depend on its batch mates or hide a global level shift),
  and a frozen member (eval mode) never moves it. Before any training step the buffers are
  the identity (mean 0, std 1).
- Ragged edges: a spectrogram whose mel bins or frames are not multiples of the patch size
  is padded at the high-frequency / late end with zeros (the bin mean after
  normalisation); the padding is cut off again before any loss, score or map, so no frame
  of the clip is dropped and no padded value counts.
- Masking (`mask_ratio > 0`): while training, `loss` hides that fraction of patches from
  the encoder (random per clip) and the decoder fills them from a learned mask token. The
  loss covers all patches, visible and masked: scoring never masks, so the model must keep
  reconstructing visible patches well, and the masked ones add the inpainting pressure
  that stops it from learning the identity. `embed`, `score` and `error_map` never mask.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asd.branches.base import Branch, OptimizerFactory
from asd.branches.error_profile import ErrorProfileScoring
from asd.errors import AsdError
from asd.features import BinStats

log = logging.getLogger(__name__)


def sincos_2d(grid_freq: int, grid_time: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine positions, (grid_freq * grid_time, dim), frequency-major like the patches."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    f = torch.arange(grid_freq, dtype=torch.float64)[:, None] * omega  # (gf, dim/4)
    t = torch.arange(grid_time, dtype=torch.float64)[:, None] * omega  # (gt, dim/4)
    f_emb = torch.cat([f.sin(), f.cos()], dim=1)[:, None, :].expand(grid_freq, grid_time, 2 * quarter)
    t_emb = torch.cat([t.sin(), t.cos()], dim=1)[None, :, :].expand(grid_freq, grid_time, 2 * quarter)
    pos = torch.cat([f_emb, t_emb], dim=-1)  # (gf, gt, dim)
    return pos.reshape(grid_freq * grid_time, dim).float()  # (gf, gt, dim) -> (N, dim)


def _transformer(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=dim,
        nhead=heads,
        dim_feedforward=int(round(dim * mlp_ratio)),
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # nested tensors only serve padding masks of post-norm layers; we have neither
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


class TransformerAEBranch(ErrorProfileScoring, Branch):
    """b2: patch Transformer autoencoder on log-mel; reconstruction-error score, latent-mean z."""

    name = "b2"
    needs_backend = False
    has_error_map = True

    def __init__(
        self,
        frontend: nn.Module,
        num_samples: int,
        patch_freq: int = 16,
        patch_time: int = 8,
        dim: int = 128,
        depth: int = 4,
        decoder_depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        mask_ratio: float = 0.0,
        score_mode: str = "mse",
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the model for clips of exactly `num_samples` samples.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames), e.g. `asd.features.LogMel`.
            num_samples: clip length in samples (`data.audio.duration` times the sample rate); it fixes
                the number of patches.
            patch_freq, patch_time: patch size in mel bins and frames.
            dim, depth, decoder_depth, heads, mlp_ratio, dropout: Transformer sizes (`dim` a multiple of
                4 and of `heads`).
            mask_ratio: fraction of patches hidden from the encoder while training, in [0, 1); 0 is a
                plain autoencoder.
            score_mode: "mse", or "mahalanobis" / "temporal" of the error (`asd.branches.error_profile`).
        """
        super().__init__(optimizer)
        self.embed_dim = dim  # width of embed()
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        self._init_scoring(score_mode)
        if num_samples is None:
            raise AsdError("b2 needs clips of one fixed length (num_samples): set data.audio.duration")
        if dim % 4 or dim % heads:
            raise AsdError(
                f"b2: dim={dim} must be a multiple of 4 (2-D sine-cosine positions) and of heads={heads}; "
                "set branches.b2.dim accordingly (e.g. 128 with heads=4)"
            )

        self.frontend = frontend
        self.num_samples = num_samples
        ref = next(itertools.chain(frontend.parameters(), frontend.buffers()), None)
        device = ref.device if ref is not None else None  # probe where the front end lives
        with torch.no_grad():
            probe = frontend(torch.zeros(1, num_samples, device=device))  # (1, n_mels, frames)
        if probe.ndim != 3:
            raise AsdError(f"b2: the frontend must return (B, n_mels, frames), got {tuple(probe.shape)}")
        self.n_mels, self.num_frames = int(probe.shape[1]), int(probe.shape[2])
        self.patch_freq, self.patch_time, self.mask_ratio = patch_freq, patch_time, float(mask_ratio)
        self.grid_freq = math.ceil(self.n_mels / patch_freq)
        self.grid_time = math.ceil(self.num_frames / patch_time)
        self.num_patches = self.grid_freq * self.grid_time
        if self.num_frames % patch_time or self.n_mels % patch_freq:
            log.info(
                "b2: %d mel bins x %d frames are padded to %d x %d for %dx%d patches; the padding is "
                "excluded from loss and score",
                self.n_mels,
                self.num_frames,
                self.grid_freq * patch_freq,
                self.grid_time * patch_time,
                patch_freq,
                patch_time,
            )
        patch_dim = patch_freq * patch_time

        self.stats = BinStats(self.n_mels)
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.register_buffer("pos", sincos_2d(self.grid_freq, self.grid_time, dim)[None], persistent=False)
        self.encoder = _transformer(dim, depth, heads, mlp_ratio, dropout)
        self.decoder_embed = nn.Linear(dim, dim)
        self.decoder = _transformer(dim, decoder_depth, heads, mlp_ratio, dropout)
        self.head = nn.Linear(dim, patch_dim)
        # only a masking model has a mask token: an unused parameter would break DDP's gradient sync
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if self.mask_ratio > 0 else None

    # -- pieces -----------------------------------------------------------------------------------

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        wave = batch["wave"]
        if wave.ndim != 2 or wave.shape[1] != self.num_samples:
            raise AsdError(
                f"b2 was built for clips of {self.num_samples} samples but got a wave batch of shape "
                f"{tuple(wave.shape)}; the clip length must equal data.audio.duration used when the model "
                "was built (every clip is padded or cropped to it)"
            )
        return self.frontend(wave)  # (B, T) -> (B, n_mels, frames)

    def _patchify(self, x: Tensor) -> Tensor:
        """(B, n_mels, frames) normalised -> zero-padded patches (B, N, patch_freq * patch_time)."""
        gf, pf, gt, pt = self.grid_freq, self.patch_freq, self.grid_time, self.patch_time
        x = F.pad(x, (0, gt * pt - self.num_frames, 0, gf * pf - self.n_mels))  # (B, gf*pf, gt*pt)
        b = x.shape[0]
        x = x.reshape(b, gf, pf, gt, pt)  # (B, gf, pf, gt, pt)
        x = x.permute(0, 1, 3, 2, 4)  # (B, gf, gt, pf, pt)
        return x.reshape(b, gf * gt, pf * pt)  # (B, N, pf*pt)

    def _unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, patch_freq * patch_time) -> (B, n_mels, frames), padding cut off."""
        gf, pf, gt, pt = self.grid_freq, self.patch_freq, self.grid_time, self.patch_time
        b = patches.shape[0]
        x = patches.reshape(b, gf, gt, pf, pt)  # (B, gf, gt, pf, pt)
        x = x.permute(0, 1, 3, 2, 4)  # (B, gf, pf, gt, pt)
        x = x.reshape(b, gf * pf, gt * pt)  # (B, gf*pf, gt*pt)
        return x[:, : self.n_mels, : self.num_frames]  # (B, n_mels, frames)

    def _encode(self, patches: Tensor, keep: Tensor | None = None) -> Tensor:
        """Patches (B, N, P) -> latent (B, N, dim), or (B, K, dim) for the kept indices `keep` (B, K)."""
        h = self.patch_embed(patches) + self.pos  # (B, N, dim)
        if keep is not None:
            h = torch.gather(h, 1, keep[..., None].expand(-1, -1, h.shape[-1]))  # (B, K, dim)
        return self.encoder(h)

    def _decode(self, latent: Tensor, keep: Tensor | None = None) -> Tensor:
        """Latent (B, N or K, dim) -> reconstructed patches (B, N, P); mask tokens fill the unkept."""
        h = self.decoder_embed(latent)  # (B, N or K, dim)
        if keep is not None:
            b, _, dim = h.shape
            full = self.mask_token.to(h.dtype).expand(b, self.num_patches, dim)  # (B, N, dim)
            h = full.scatter(1, keep[..., None].expand(-1, -1, dim), h)  # (B, N, dim)
        return self.head(self.decoder(h + self.pos))  # (B, N, dim) -> (B, N, P)

    def _random_keep(self, batch_size: int, device: torch.device) -> Tensor:
        """Indices of the patches each clip shows the encoder, (B, K), K = round(N * (1 - mask_ratio))."""
        n_keep = max(1, round(self.num_patches * (1.0 - self.mask_ratio)))
        noise = torch.rand(batch_size, self.num_patches, device=device)  # (B, N)
        return noise.argsort(dim=1)[:, :n_keep]  # (B, K)

    def _squared_error(self, recon: Tensor, patches: Tensor) -> Tensor:
        """Per time-frequency squared error in normalised units, (B, n_mels, frames), float32."""
        return self._unpatchify((recon.float() - patches.float()).pow(2))

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared reconstruction error over the spectrogram; masks patches only in train mode."""
        spec = self.spectrogram(batch)  # (B, n_mels, frames)
        if self.training:
            self.stats.update(spec)
        patches = self._patchify(self.stats.normalise(spec))  # (B, N, P)
        keep = None
        if self.training and self.mask_ratio > 0:
            keep = self._random_keep(patches.shape[0], patches.device)  # (B, K)
        recon = self._decode(self._encode(patches, keep), keep)  # (B, N, P)
        return self._squared_error(recon, patches).mean()

    def _latent(self, batch: dict[str, Tensor]) -> Tensor:
        """The encoder's latent of the batch's whole spectrogram, (B, N, dim)."""
        return self._encode(self._patchify(self.stats.normalise(self.spectrogram(batch))))

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Encoder latent averaged over patches, (B, dim)."""
        return self._latent(batch).float().mean(dim=1)  # (B, N, dim) -> (B, dim)

    def flow_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`embed` and the encoder latent it averages (`z_b2_latent`, (B, N, dim)): scoring decodes it
        instead of encoding the clips a second time (`_scoring_latent`)."""
        latent = self._latent(batch)  # (B, N, dim)
        return {f"z_{self.name}": latent.float().mean(dim=1), f"z_{self.name}_latent": latent}

    def _scoring_latent(self, batch: dict[str, Tensor], patches: Tensor) -> Tensor:
        """The encoder's latent of `patches`, (B, N, dim): the one `flow_outputs` kept for this batch
        when it would be the same (`Branch.kept`)."""
        done = self.kept(batch, "_latent")
        if done is not None:
            if done.shape[:2] != patches.shape[:2]:
                raise AsdError(
                    f"b2: the batch's z_b2_latent {tuple(done.shape)} is not the latent of its "
                    f"{patches.shape[0]} clips ({patches.shape[1]} patches each); drop the z_* keys "
                    "when a batch's clips change, or build them again with Ensemble.with_flow_input"
                )
            return done
        return self._encode(patches)

    def error_map(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input log-mel, reconstruction, squared error), each (B, n_mels, frames).

        Input and reconstruction are in the front end's units (dB for `LogMel`); the error is in
        normalised units, per bin, and its mean over a clip is `score`.
        """
        spec = self.spectrogram(batch)  # (B, n_mels, frames)
        patches = self._patchify(self.stats.normalise(spec))  # (B, N, P)
        recon = self._decode(self._scoring_latent(batch, patches))  # (B, N, P)
        recon_spec = self.stats.denormalise(self._unpatchify(recon))  # (B, n_mels, frames)
        return spec.float(), recon_spec, self._squared_error(recon, patches)
