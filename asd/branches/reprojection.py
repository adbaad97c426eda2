"""b6: dual-subspace re-projection (sDSR-style) on log-mel: VQ autoencoder, then code-space anomalies.

Stage 1 trains a vector-quantised autoencoder on the clip's standardised log-mel, seen as a
one-channel image: a strided 2-D conv encoder (each of `channels` halves mel bins and frames),
a codebook of `codebook_size` vectors (nearest neighbour, straight-through gradients) and a
transposed-conv decoder. Loss: mean squared reconstruction error + `commitment` times the
encoder's distance to its codes (+ the codebook loss when the codebook is learned, not EMA).

Stage 2 keeps stage 1 fixed and trains three modules on anomalies injected into the quantised
features: inside a mask (Perlin blobs or a frequency band from `asd.anomalies`, drawn on the
spectrogram and max-pooled to the code grid; empty with probability `empty_mask_prob`) every
cell's code is replaced by another codebook entry.
- x_g, the general decoder, is the stage-1 decoder (as in DSR): it draws the modified codes,
  anomaly included.
- x_s, the object-specific decoder: a subspace-restriction net maps the modified features back
  onto the codebook (re-quantised) and a second decoder draws them; trained with L2 to the
  *unmodified* spectrogram (and the restricted features to the unmodified codes), so it only
  learns to draw normal sound.
- the mask predictor sees (x_g, x_s) and is trained with a focal loss against the injected mask.
The score (`score_mode`) runs the same path without injection: "mask" pools the predicted mask
(`score_pool`: mean, max, or the mean of the top `topk` fraction of bins), as DSR does; "mse" is
the mean squared error of x_s, "mahalanobis" the Mahalanobis distance of x_s's error profile
to the section's source and target models (`asd.branches.error_profile`, as b4 scores), and
"temporal" (the default, as b2 and b7) that and the error's peak and change over time.
z = quantised features averaged over the code grid.

Choices:
- One run, two stages: `loss` counts its train-mode calls in the buffer `steps` (saved in
  checkpoints, so a resumed run stays in its stage); calls 0..stage1_steps-1 train stage 1,
  later ones stage 2. Eval-mode calls (validation, a frozen member) count nothing and compute
  the current stage's loss.
- Freezing stage 1 in stage 2, and stage 2 in stage 1: the idle stage's modules run under
  no_grad and every parameter keeps requires_grad (one optimizer, built once). DDP without
  unused-parameter search needs a gradient for every parameter each step, so the idle
  parameters enter the loss times zero; the member's optimizer then drops the idle stage's
  gradients before it steps (a step pre-hook for the ensemble's manual optimisation,
  `on_before_optimizer_step` when trained alone), so AdamW neither moves nor decays them:
  stage-1 weights are bit-identical through stage 2.
- Codebook: EMA updates of code counts and sums (`ema_decay`, Laplace-smoothed; buffers, no
  gradient) or learned by the codebook loss (`ema: false`). Either way the first train-mode
  batch initialises it with randomly picked encoder outputs, so no code starts far from the
  data and a few codes do not take every cell.
- Normalisation: per-mel-bin running moments of stage-1 training frames (`BinStats`, as b2/b4);
  stage 2 does not move them, so the frozen encoder keeps its input scale.
- Warm start of stage 2: at its first step the object decoder gets the stage-1 decoder's weights
  and the restriction net is the identity (its last convolution starts at zero), so x_s starts
  equal to x_g and stage 2 learns only to pull the injected cells back to normal codes; from
  scratch, a small model's x_s stays too blurred in a short budget for the mask to be found.
  Until that step x_s is drawn by the stage-1 decoder, so a fit that ends in stage 1 (first-shot:
  10 optimizer steps) scores as a VQ autoencoder, and `fit_backend` warns that it did.
- Injection: a masked cell gets code (c + r) mod K with r uniform in 1..K-1, so every masked
  cell changes and no cell outside the mask does (its vector is bit-identical).
- Any length: fully convolutional; the spectrogram is zero-padded (the bin mean) at the
  high-mel / late end to a multiple of 2**len(channels) and every output cropped back, so
  training crops and test clips of other lengths work, and scores are pooled per clip.
- Randomness: train-mode masks come from a numpy generator seeded from torch's default
  generator (so `torch.manual_seed` / Lightning's seeding reproduce them); eval-mode losses use
  `seed` and are deterministic.

One file: one member per file (STYLE.md); its two stages, code-space injection, decoders and
mask predictor only make sense together.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from asd.anomalies import AnomalyConfig, _band_mask, _blob_mask
from asd.branches.base import Branch, OptimizerFactory, conv_input
from asd.branches.error_profile import ErrorProfileScoring
from asd.choices import POOLS, STRATEGIES
from asd.errors import AsdError
from asd.features import BinStats, probe_length
from asd.fileio import write_atomic

log = logging.getLogger(__name__)


def focal_loss(logits: Tensor, target: Tensor, gamma: float) -> Tensor:
    """Mean binary focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma."""
    ce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    p_t = torch.exp(-ce)  # probability given to the true class
    return ((1.0 - p_t) ** gamma * ce).mean()


def inject_codes(
    codes: Tensor, mask: Tensor, codebook_size: int, generator: torch.Generator | None = None
) -> Tensor:
    """Codes (B, h, w) with every cell of `mask` (B, h, w) replaced by a different, uniformly drawn code."""
    offset = torch.randint(1, codebook_size, codes.shape, generator=generator, device="cpu").to(codes.device)
    return torch.where(mask.to(codes.device), (codes + offset) % codebook_size, codes)


def pool_scores(prob: Tensor, pool: str, topk: float) -> Tensor:
    """Mask probabilities (B, M, T) -> one score per clip (B,)."""
    flat = prob.flatten(1)  # (B, M*T)
    if pool == "mean":
        return flat.mean(dim=1)
    if pool == "max":
        return flat.amax(dim=1)
    k = max(1, round(topk * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _encoder(channels: Sequence[int], dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.ReLU()]  # halves mel bins and frames
        c_in = c
    layers.append(nn.Conv2d(c_in, dim, 3, padding=1))
    return nn.Sequential(*layers)


def _decoder(channels: Sequence[int], dim: int) -> nn.Sequential:
    rev = list(reversed(channels))
    layers: list[nn.Module] = [nn.Conv2d(dim, rev[0], 3, padding=1), nn.ReLU()]
    outs = [*rev[1:], 1]
    for i, (c_in, c_out) in enumerate(zip(rev, outs, strict=True)):
        layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))  # doubles both axes
        if i < len(outs) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Codebook(nn.Module):
    """`size` code vectors of width `dim`: EMA-updated buffers, or a parameter learned by its loss."""

    def __init__(self, size: int, dim: int, ema: bool, decay: float, eps: float = 1e-5):
        super().__init__()
        self.size, self.ema, self.decay, self.eps = size, ema, decay, eps
        init = torch.randn(size, dim)
        if ema:
            self.register_buffer("vectors", init)
            self.register_buffer("cluster_size", torch.ones(size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.vectors = nn.Parameter(init)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _flat(z: Tensor) -> Tensor:
        return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, h, w) -> (B*h*w, D)

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code of every cell: features (B, D, h, w) -> indices (B, h, w)."""
        flat = self._flat(z)
        vectors = self.vectors.detach().float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ vectors.T + vectors.pow(2).sum(1)  # (N, K)
        b, _, h, w = z.shape
        return dist2.argmin(dim=1).reshape(b, h, w)

    def lookup(self, codes: Tensor, detach: bool = False) -> Tensor:
        """Indices (B, h, w) -> code vectors (B, D, h, w)."""
        vectors = self.vectors.detach() if detach else self.vectors
        return vectors[codes].permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    @torch.no_grad()
    def initialise(self, z: Tensor) -> None:
        """Set every code to a randomly picked feature vector of `z` (B, D, h, w); rank 0's on every rank."""
        flat = self._flat(z)
        picked = flat[torch.randint(0, flat.shape[0], (self.size,), device=flat.device)]  # (K, D)
        if _distributed():
            dist.broadcast(picked, 0)
        self.vectors.copy_(picked)
        if self.ema:
            self.embed_sum.copy_(picked)
            self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor) -> None:
        """EMA step towards the mean feature of each code's cells; counts and sums summed over ranks."""
        flat, idx = self._flat(z), codes.reshape(-1)
        counts = torch.bincount(idx, minlength=self.size).float()  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)  # (K, D)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # no division by zero
        self.vectors.copy_(self.embed_sum / smoothed[:, None])


class Reprojection(NamedTuple):
    """One pass of stage 2 in normalised units, each (B, n_mels, frames) but `restricted`/`target_codes`."""

    x: Tensor  # the (unmodified) input
    x_g: Tensor | None  # general decoder on the (modified) codes; None when not predicting
    x_s: Tensor  # object-specific decoder on the restricted codes
    logits: Tensor | None  # mask predictor; None when not predicting
    mask: Tensor  # injected mask at spectrogram resolution, float 0/1
    restricted: Tensor  # restriction net output (B, D, h, w)
    quantised: Tensor  # unmodified quantised features (B, D, h, w)


class ReprojectionBranch(ErrorProfileScoring, Branch):
    """b6: VQ autoencoder, then code-space anomalies, x_g / x_s decoders and a mask predictor."""

    name = "b6"
    needs_backend = False
    has_error_map = True

    def __init__(
        self,
        frontend: nn.Module,
        channels: Sequence[int] = (16, 32),
        code_dim: int = 32,
        codebook_size: int = 64,
        ema: bool = True,
        ema_decay: float = 0.99,
        commitment: float = 0.25,
        stage1_steps: int = 50,
        strategy: str = "both",
        empty_mask_prob: float = 0.2,
        blob_fraction: Sequence[float] = (0.03, 0.15),
        band: Sequence[float] = (0.03, 0.2),
        predictor_channels: int = 16,
        focal_gamma: float = 2.0,
        score_pool: str = "topk",
        topk: float = 0.05,
        score_mode: str = "mask",
        seed: int = 0,
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the member; it takes clips of any length.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames), e.g. `asd.features.LogMel`.
            channels: encoder channels per stride-2 level (the decoders mirror them).
            code_dim: width D of the code vectors and of `embed`.
            codebook_size: number of code vectors K (>= 2).
            ema, ema_decay: EMA codebook updates and their decay; false learns the codebook by its loss.
            commitment: weight of the encoder's distance to its codes in the stage-1 loss.
            stage1_steps: training `loss` calls of stage 1; later calls train stage 2.
            strategy: injection masks: "perlin" blobs, frequency "band"s, or "both" (one per clip at random).
            empty_mask_prob: probability that a clip's mask is empty (a normal example in stage 2).
            blob_fraction, band: [low, high] share of bins of a Perlin mask / width of a band, as in
                `asd.anomalies.AnomalyConfig`.
            predictor_channels: width of the mask predictor.
            focal_gamma: focusing exponent of the mask predictor's focal loss.
            score_pool: "mean", "max" or "topk" of the predicted mask probabilities.
            topk: fraction of bins averaged by score_pool="topk".
            score_mode: "mask" (the pooled predicted mask), or "mse" / "mahalanobis" / "temporal" of
                x_s's reconstruction error (`asd.branches.error_profile`).
            seed: seed of the masks of eval-mode losses.
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        if strategy not in STRATEGIES:
            raise AsdError(
                f"b6: strategy={strategy!r} is unknown; set branches.b6.strategy to one of {STRATEGIES}"
            )
        if score_pool not in POOLS:
            raise AsdError(
                f"b6: score_pool={score_pool!r} is unknown; set branches.b6.score_pool to one of {POOLS}"
            )
        self._init_scoring(score_mode, own=("mask",))
        if codebook_size < 2:
            raise AsdError(f"b6: codebook_size={codebook_size} leaves no other code to inject; set it >= 2")
        self.embed_dim = code_dim  # width of embed()
        self.frontend = frontend
        self.channels = tuple(int(c) for c in channels)
        self.factor = 2 ** len(self.channels)  # the code grid's cell size in bins and frames
        self.codebook_size, self.commitment, self.stage1_steps = codebook_size, commitment, stage1_steps
        self.strategy, self.empty_mask_prob, self.seed = strategy, empty_mask_prob, seed
        self.focal_gamma, self.score_pool, self.topk = focal_gamma, score_pool, topk
        self.mask_config = AnomalyConfig(blob_fraction=tuple(blob_fraction), band=tuple(band))

        ref = next(itertools.chain(frontend.parameters(), frontend.buffers()), None)
        with torch.no_grad():  # probe the front end where it lives; any clip length gives the mel bins
            probe = frontend(
                torch.zeros(1, probe_length(frontend, 8192), device=ref.device if ref is not None else None)
            )
        if probe.ndim != 3:
            raise AsdError(f"b6: the frontend must return (B, n_mels, frames), got {tuple(probe.shape)}")
        self.stats = BinStats(int(probe.shape[1]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # stage 1
        self.encoder = _encoder(self.channels, code_dim)
        self.codebook = Codebook(codebook_size, code_dim, ema, ema_decay)
        self.decoder = _decoder(self.channels, code_dim)  # also the general decoder x_g of stage 2
        # stage 2
        self.restriction = nn.Sequential(  # residual: features + this
            nn.Conv2d(code_dim, code_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(code_dim, code_dim, 3, padding=1),
        )
        nn.init.zeros_(self.restriction[-1].weight)  # starts as the identity: x_s starts as x_g
        nn.init.zeros_(self.restriction[-1].bias)
        self.object_decoder = _decoder(self.channels, code_dim)
        c = predictor_channels
        # dilations 1, 2, 4: a receptive field of 15 bins x frames; replicated edges, because zero
        # padding marks the borders, which band masks always touch, and the predictor learns that cue
        self.predictor = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=4, dilation=4, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(c, 1, 1),
        )
        self._stage1_modules = (self.encoder, self.codebook, self.decoder)
        self._stage2_modules = (self.restriction, self.object_decoder, self.predictor)
        #: the stage of the last train-mode `loss`, whose idle parameters the optimizer skips
        self.trained_stage = 0

    # -- pieces -----------------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        """The stage the next training `loss` call trains: 1 for the first `stage1_steps` calls, then 2."""
        return 1 if int(self.steps) < self.stage1_steps else 2

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        modules = self._stage1_modules if stage == 1 else self._stage2_modules
        return [p for m in modules for p in m.parameters()]

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        return self.frontend(batch["wave"])  # (B, T) -> (B, n_mels, frames)

    def _pad(self, x: Tensor) -> Tensor:
        """(B, M, T) -> (B, 1, M', T') zero-padded to multiples of the grid's cell size."""
        m, t = x.shape[-2:]
        return F.pad(x, (0, -t % self.factor, 0, -m % self.factor))[:, None]

    def _crop(self, y: Tensor, like: Tensor) -> Tensor:
        """Decoder output (B, 1, M', T') -> (B, M, T) of `like`."""
        return y[:, 0, : like.shape[-2], : like.shape[-1]]

    def quantise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised spectrogram (B, M, T) -> encoder features (B, D, h, w) and their codes (B, h, w)."""
        z = self.encoder(self._pad(x))
        return z, self.codebook.codes(z)

    def draw_masks(self, shape: tuple[int, int], batch_size: int, rng: np.random.Generator) -> Tensor:
        """Injection masks on the code grid, (B, h, w) bool: drawn per clip on (M, T) bins, max-pooled."""
        masks = np.zeros((batch_size, *shape), dtype=bool)
        for i in range(batch_size):
            if rng.random() < self.empty_mask_prob:
                continue
            kind = self.strategy if self.strategy != "both" else ("perlin", "band")[int(rng.integers(2))]
            draw = _blob_mask if kind == "perlin" else _band_mask
            masks[i] = draw(shape, rng, self.mask_config)
        grid = self._pad(torch.from_numpy(masks).float())  # (B, 1, M', T')
        return F.max_pool2d(grid, self.factor)[:, 0] > 0  # a cell touched by any masked bin is masked

    def _to_bins(self, grid: Tensor, like: Tensor) -> Tensor:
        """Grid mask (B, h, w) -> float 0/1 per bin (B, M, T) of `like`."""
        up = grid.float().repeat_interleave(self.factor, 1).repeat_interleave(self.factor, 2)  # (B, M', T')
        return up[:, : like.shape[-2], : like.shape[-1]]

    def reproject(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        predict: bool = True,
    ) -> Reprojection:
        """Stage 2's pass on a normalised spectrogram (B, M, T).

        Args:
            x: the normalised spectrogram.
            mask: grid cells (B, h, w) whose codes are replaced (`inject_codes`); None injects nothing.
            generator: CPU generator of the replacement codes; None is torch's default.
            predict: False skips x_g and the mask predictor (both None in the result): the error
                scores read x_s alone, and the two were most of their scoring time.
        """
        with torch.no_grad():  # stage 1 is fixed here
            _, codes = self.quantise(x)
            quantised = self.codebook.lookup(codes, detach=True)
            if mask is not None and bool(mask.any()):
                codes = inject_codes(codes, mask, self.codebook_size, generator)
            modified = self.codebook.lookup(codes, detach=True)  # (B, D, h, w)
            x_g = self._crop(self.decoder(modified), x) if predict else None
        restricted = modified + self.restriction(modified)
        onto = self.codebook.lookup(self.codebook.codes(restricted), detach=True)
        projected = restricted + (onto - restricted).detach()  # re-quantised, straight-through
        # before stage 2's first step the object decoder is still its random start: draw x_s with
        # the stage-1 decoder it is then copied from (a fit that ends in stage 1 scores as a VQ-AE)
        decoder = self.object_decoder if int(self.steps) > self.stage1_steps else self.decoder
        x_s = self._crop(decoder(projected), x)
        target = (self._to_bins(mask, x) if mask is not None else torch.zeros_like(x)).to(x.device)
        if not predict:
            return Reprojection(x, None, x_s, None, target, restricted, quantised)
        x_g = x_g.to(x_s.dtype)
        pair = conv_input(torch.stack([x_g, x_s, (x_g - x_s).abs()], dim=1))  # (B, 3, M, T)
        logits = self.predictor(pair)[:, 0]  # (B, 1, M, T) -> (B, M, T)
        return Reprojection(x, x_g, x_s, logits, target, restricted, quantised)

    def _idle_anchor(self, stage: int) -> Tensor:
        """Zero that depends on every idle parameter: DDP then sees a gradient for each (dropped later)."""
        return sum(p.sum() for p in self.stage_parameters(3 - stage)) * 0.0

    def drop_idle_gradients(self) -> None:
        """Forget the gradients of the stage the last train-mode `loss` did not train."""
        if self.trained_stage:
            for p in self.stage_parameters(3 - self.trained_stage):
                p.grad = None

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Stage 1: reconstruction + commitment (+ codebook); stage 2: focal mask loss + L2 of x_s."""
        spec = self.spectrogram(batch)
        stage = self.stage
        if self.training:
            if int(self.steps) == self.stage1_steps:  # the first stage-2 step: start x_s from x_g's decoder
                self.object_decoder.load_state_dict(self.decoder.state_dict())
            self.steps += 1
            self.trained_stage = stage
            if stage == 1:
                self.stats.update(spec)
        x = self.stats.normalise(spec)  # (B, M, T)
        loss = self._stage1_loss(x) if stage == 1 else self._stage2_loss(x)
        return loss + self._idle_anchor(stage) if self.training else loss

    def _stage1_loss(self, x: Tensor) -> Tensor:
        z = self.encoder(self._pad(x))  # (B, D, h, w)
        if self.training and not bool(self.codebook.initialised):
            self.codebook.initialise(z.detach())
        codes = self.codebook.codes(z)
        q = self.codebook.lookup(codes)
        loss = self.commitment * F.mse_loss(z.float(), q.detach().float())
        if not self.codebook.ema:
            loss = loss + F.mse_loss(q.float(), z.detach().float())
        elif self.training:
            self.codebook.update(z.detach(), codes)
        recon = self._crop(self.decoder(z + (q.to(z.dtype) - z).detach()), x)  # straight-through
        return loss + F.mse_loss(recon.float(), x)

    def _stage2_loss(self, x: Tensor) -> Tensor:
        if self.training:
            rng, generator = np.random.default_rng(int(torch.randint(0, 2**62, ()))), None
        else:  # deterministic, and the global random stream does not move
            rng, generator = np.random.default_rng(self.seed), torch.Generator().manual_seed(self.seed)
        mask = self.draw_masks(tuple(x.shape[-2:]), x.shape[0], rng).to(x.device)
        r = self.reproject(x, mask, generator)
        return (
            focal_loss(r.logits, r.mask, self.focal_gamma)
            + F.mse_loss(r.x_s.float(), x)
            + F.mse_loss(r.restricted.float(), r.quantised.float())
        )

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        if int(self.steps) <= self.stage1_steps:
            log.warning(
                "b6: the fit ended in stage 1 (%d training steps, stage1_steps=%d): x_s is the stage-1 "
                "decoder's drawing and the mask predictor is untrained; lower branches.b6.stage1_steps "
                "or train longer for stage 2",
                int(self.steps),
                self.stage1_steps,
            )
        super().fit_backend(feats, meta)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Quantised features averaged over the code grid, (B, code_dim)."""
        _, codes = self.quantise(self.stats.normalise(self.spectrogram(batch)))
        return self.codebook.lookup(codes, detach=True).float().mean(dim=(2, 3))  # (B, D, h, w) -> (B, D)

    def mask_probabilities(self, batch: dict[str, Tensor]) -> Tensor:
        """Predicted anomaly mask of the unmodified clips, (B, n_mels, frames) in [0, 1]."""
        return torch.sigmoid(self.reproject(self.stats.normalise(self.spectrogram(batch))).logits.float())

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Pooled predicted mask with score_mode="mask", else x_s's error score (`error_profile`), (B,)."""
        if self.score_mode == "mask":
            return pool_scores(self.mask_probabilities(batch), self.score_pool, self.topk)
        return super().score(batch)

    def draw(self, name: str, dm, out_dir: Path, n: int, device: torch.device) -> list[Path]:
        """`<name>_reprojection_<clip>.png`: input, x_g, x_s and the predicted mask per test clip."""
        return plot_reprojections(self, name, dm, out_dir, n, device)

    def maps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(input, x_g, x_s, mask probability), each (B, n_mels, frames); the first three in input units."""
        spec = self.spectrogram(batch)
        r = self.reproject(self.stats.normalise(spec))
        denorm = self.stats.denormalise
        return spec.float(), denorm(r.x_g), denorm(r.x_s), torch.sigmoid(r.logits.float())

    def error_map(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input log-mel, x_s, squared error of x_s in normalised units), each (B, n_mels, frames)."""
        spec = self.spectrogram(batch)
        r = self.reproject(self.stats.normalise(spec), predict=False)
        return spec.float(), self.stats.denormalise(r.x_s), (r.x_s.float() - r.x).pow(2)

    # -- training ---------------------------------------------------------------------------------

    def configure_optimizers(self) -> Optimizer:
        optimizer = super().configure_optimizers()
        # manual optimisation (the ensemble) steps after backward: drop the idle stage's gradients first
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.drop_idle_gradients())
        return optimizer

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # trained alone (automatic optimisation) the step runs the closure, so the pre-hook comes too early
        self.drop_idle_gradients()


def plot_reprojections(
    member: ReprojectionBranch, name: str, dm, out_dir: Path, n: int, device: torch.device
) -> list[Path]:
    """One PNG per chosen test clip: input, x_g, x_s and the predicted mask; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from asd.evaluation.heatmaps import axes_of, member_batch, pick_clips

    out_dir.mkdir(parents=True, exist_ok=True)
    table = dm.tables["test"]
    rows = pick_clips([c.label for c in table], n)
    if not rows:
        return []
    batch = member_batch(dm, "test", rows, device)
    origin, xlabel, ylabel = axes_of(dm)
    with torch.no_grad():
        maps = [t.float().cpu().numpy() for t in member.maps(batch)]  # 4 x (B, n_mels, frames)
    paths = []
    for j, i in enumerate(rows):
        clip = table[i]
        fig = Figure(figsize=(16, 3.4), layout="constrained")
        axes = fig.subplots(1, 4, sharey=True)
        lo, hi = np.percentile(maps[0][j], [1, 99])
        for ax, img, title, kw in zip(
            axes,
            [m[j] for m in maps],
            ["input", "x_g (general)", "x_s (object-specific)", "predicted mask"],
            [{"vmin": lo, "vmax": hi}] * 3 + [{"vmin": 0.0, "vmax": 1.0, "cmap": "magma"}],
            strict=True,
        ):
            im = ax.imshow(img, origin=origin, aspect="auto", **kw)
            ax.set(title=title, xlabel=xlabel)
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[0].set_ylabel(ylabel)
        fig.suptitle(f"{name}: {clip.name} ({clip.label}, {clip.domain})")
        FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output, no display
        path = out_dir / f"{name}_reprojection_{Path(clip.name).stem}.png"
        write_atomic(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=80))
        paths.append(path)
    return paths
