"""b4: denoising diffusion (DDPM) on log-mel; partial noising and DDIM denoising as the anomaly score.

Training is the DDPM epsilon objective: standardise the clip's log-mel, pick a step t
uniformly from the `timesteps` of the noise schedule, mix in Gaussian noise
(`x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`, a_t the cumulative alpha-bar) and regress eps
with an MSE. Scoring noises the clip only part way, to `t_star` of the schedule, walks it
back to a clean spectrogram with a few deterministic DDIM steps (eta = 0), and reports the
mean squared difference to the input: a denoiser that only knows normal sounds pulls an
anomalous spectrogram towards a normal one, so the difference grows.

Choices:
- Denoiser: a 1-D U-Net over frames whose input channels are the mel bins (residual blocks
  with GroupNorm and SiLU, a sinusoidal timestep embedding added in every block, stride-2
  convolutions down, nearest-neighbour upsampling and skip concatenation up). Every
  convolution mixes all mel bins, so harmonic structure is seen at once. A 2-D U-Net over
  (mel, frame) images was 20-60x slower per training step on a 2-core CPU at equal depth.
- Ragged clips: the U-Net halves the frame axis `len(channels) - 1` times, so its input is
  zero-padded at the late end to a multiple of 2**(len(channels) - 1) frames and its output
  cut back. Zero is the bin mean after standardisation; the diffusion itself (noise, loss,
  score) lives on the true frames only.
- Normalisation: per-mel-bin running mean and standard deviation of every training frame
  (`asd.features.BinStats`, shared with b2), updated only by `loss` in train mode, the identity before the
  first step. Standardised bins match the unit-variance noise the schedule assumes.
- Scoring noise: `noise_draws` noise tensors of one clip's shape are drawn once at
  construction from a CPU `torch.Generator` seeded with `seed` and reused for every clip
  (common random numbers). A clip's score is thus a fixed function of the clip: identical
  across calls, batch compositions, ranks and devices (up to floating point).
- Eval-mode `loss` (validation) draws its steps and noise from the same seeded generator, so
  it is deterministic and does not advance the global random stream; train-mode draws use
  torch's default generator on the batch's device (seeded per rank by Lightning).
- No embedding: `embed` returns (B, 0) and `embed_dim` is 0 (the flow member b5 skips it).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asd.branches.base import Branch, OptimizerFactory
from asd.branches.error_profile import ErrorProfileScoring
from asd.choices import SCHEDULES
from asd.errors import AsdError
from asd.features import BinStats

log = logging.getLogger(__name__)


EpsModel = Callable[[Tensor, Tensor], Tensor]


# -- the diffusion process ------------------------------------------------------------------------


def alpha_bar_schedule(kind: str, timesteps: int) -> Tensor:
    """Cumulative signal fraction alpha-bar_t for steps t = 0..timesteps-1, (timesteps,) float64.

    "linear": DDPM's betas from 1e-4 to 0.02 over 1000 steps, rescaled by 1000 / timesteps so a
    shorter chain ends as noisy. "cosine": Nichol & Dhariwal's alpha-bar = cos^2((t/T + s)/(1 + s)
    * pi/2) with s = 0.008. Betas are capped at 0.999 so every alpha-bar stays positive.
    """
    if kind == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # (T+1,)
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
        betas = 1.0 - f[1:] / f[:-1]  # (T,)
    else:
        raise AsdError(f"b4: schedule={kind!r} is unknown; set branches.b4.schedule to one of {SCHEDULES}")
    return torch.cumprod(1.0 - betas.clamp(max=0.999), dim=0)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward process: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, per clip step t (B,); x0 (B, ...)."""
    a = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """The `steps` DDIM steps from `t_start` down towards 0, evenly spaced: 60, 5 -> [60, 48, 36, 24, 12]."""
    return [round(t_start * (steps - i) / steps) for i in range(steps)]


def ddim_sample(eps_model: EpsModel, x_t: Tensor, steps: Sequence[int], alpha_bar: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) from x_t at step `steps[0]` through `steps` to a clean x0, float32.

    Each step predicts x0 from the model's noise estimate and re-noises it to the next step with that
    same estimate; after the last step the prediction itself (alpha-bar = 1) is returned.

    Args:
        eps_model: (x (N, ...), t (N,) long) -> predicted noise (N, ...).
        x_t: noisy input (N, ...).
        steps: strictly decreasing steps, the first being x_t's.
        alpha_bar: the schedule, (timesteps,).
    """
    x = x_t.float()
    for i, t in enumerate(steps):
        a_t = alpha_bar[t].float()
        a_prev = alpha_bar[steps[i + 1]].float() if i + 1 < len(steps) else torch.ones_like(a_t)
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (N,)
        eps = eps_model(x, t_vec).float()
        x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps
    return x


# -- the denoiser ---------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer steps (B,) -> (B, dim) float32, as in the Transformer positions."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.sin(), args.cos()], dim=1)  # (B, dim)


class ResBlock1d(nn.Module):
    """GroupNorm-SiLU-conv twice, the step embedding added in between, and a residual path."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x (B, c_in, L), temb (B, time_dim) -> (B, c_out, L)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, L)
        h = h + self.time(F.silu(temb))[:, :, None]  # (B, c_out, 1) broadcast over frames
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class UNet1d(nn.Module):
    """Noise predictor: noisy log-mel (B, n_mels, frames) and steps (B,) -> noise estimate, same shape.

    One residual block per level on the way down and up, `channels[i]` channels at level i, the
    frame axis halved between levels; mel bins are the input and output channels.
    """

    def __init__(self, n_mels: int, channels: Sequence[int], time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.time_dim = time_dim
        self.factor = 2 ** (len(channels) - 1)  # frames must be a multiple of this
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.inp = nn.Conv1d(n_mels, channels[0], 3, padding=1)
        self.down_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        c = channels[0]
        for i, ch in enumerate(channels):
            self.down_blocks.append(ResBlock1d(c, ch, time_dim, groups, dropout))
            c = ch
            if i < len(channels) - 1:
                self.downs.append(nn.Conv1d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock1d(c, c, time_dim, groups, dropout)
        self.up_blocks, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(channels))):
            self.up_blocks.append(ResBlock1d(c + channels[i], channels[i], time_dim, groups, dropout))
            c = channels[i]
            if i > 0:
                self.ups.append(nn.Conv1d(c, channels[i - 1], 3, padding=1))
                c = channels[i - 1]
        self.out_norm = nn.GroupNorm(groups, c)
        self.out = nn.Conv1d(c, n_mels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        frames = x.shape[-1]
        pad = -frames % self.factor
        h = F.pad(x, (0, pad))  # (B, n_mels, L), L = frames + pad
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))  # (B, time_dim)
        h = self.inp(h)  # (B, c0, L)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, temb)  # (B, c_i, L / 2^i)
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)  # (B, c_i, L / 2^(i+1))
        h = self.mid(h, temb)
        for j, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), temb)  # (B, c + c_i, l) -> (B, c_i, l)
            if j < len(self.ups):
                h = self.ups[j](F.interpolate(h, scale_factor=2, mode="nearest"))  # (B, c_{i-1}, 2l)
        h = self.out(F.silu(self.out_norm(h)))  # (B, n_mels, L)
        return h[..., :frames]  # (B, n_mels, frames)


# -- the member -----------------------------------------------------------------------------------


class DiffusionBranch(ErrorProfileScoring, Branch):
    """b4: DDPM denoiser on log-mel; partial noising + DDIM denoising error as the score, no z."""

    name = "b4"
    needs_backend = False
    has_error_map = True

    def __init__(
        self,
        frontend: nn.Module,
        num_samples: int,
        channels: Sequence[int] = (128, 128, 256),
        time_dim: int = 128,
        norm_groups: int = 8,
        dropout: float = 0.0,
        timesteps: int = 200,
        schedule: str = "cosine",
        t_star: float = 0.2,
        ddim_steps: int = 4,
        noise_draws: int = 2,
        seed: int = 0,
        score_mode: str = "mse",
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the denoiser for clips of exactly `num_samples` samples.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames), e.g. `asd.features.LogMel`.
            num_samples: clip length in samples (`data.audio.duration` times the sample rate).
            channels: U-Net channels per level, 1 to 5 levels, each a multiple of `norm_groups`.
            time_dim: width of the timestep embedding (even).
            norm_groups: GroupNorm groups in every block.
            dropout: dropout inside the residual blocks while training, in [0, 1).
            timesteps: length of the diffusion chain.
            schedule: noise schedule, "cosine" or "linear".
            t_star: how far scoring noises a clip, as a fraction of the chain in (0, 1]; step
                round(t_star * (timesteps - 1)).
            ddim_steps: denoiser calls per draw when scoring, at most the t_star step.
            noise_draws: noise tensors each clip is scored with; the errors are averaged.
            seed: seed of the scoring noise and of the eval-mode loss draws.
            score_mode: "mse" (the mean squared denoising error), or "mahalanobis" / "temporal" of the
                error (`asd.branches.error_profile`).
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        self._init_scoring(score_mode)
        if num_samples is None:
            raise AsdError("b4 needs clips of one fixed length (num_samples): set data.audio.duration")
        if any(c % norm_groups for c in channels):
            raise AsdError(
                f"b4: channels={list(channels)} must all be multiples of norm_groups={norm_groups} "
                "(GroupNorm); change branches.b4.channels or branches.b4.norm_groups"
            )
        self.t_star_step = round(t_star * (timesteps - 1))
        if ddim_steps > max(1, self.t_star_step):
            raise AsdError(
                f"b4: ddim_steps={ddim_steps} exceeds the {self.t_star_step} steps between t_star={t_star} "
                f"(of timesteps={timesteps}) and the clean spectrogram; lower branches.b4.ddim_steps or "
                "raise branches.b4.t_star"
            )

        self.frontend = frontend
        self.num_samples = num_samples
        ref = next(itertools.chain(frontend.parameters(), frontend.buffers()), None)
        device = ref.device if ref is not None else None  # probe where the front end lives
        with torch.no_grad():
            probe = frontend(torch.zeros(1, num_samples, device=device))  # (1, n_mels, frames)
        if probe.ndim != 3:
            raise AsdError(f"b4: the frontend must return (B, n_mels, frames), got {tuple(probe.shape)}")
        self.n_mels, self.num_frames = int(probe.shape[1]), int(probe.shape[2])
        self.channels = tuple(int(c) for c in channels)
        self.timesteps, self.schedule, self.seed = timesteps, schedule, seed
        self.ddim_steps = ddim_timesteps(self.t_star_step, ddim_steps)
        self.noise_draws = noise_draws
        #: the member has no embedding (docs/architecture.md, "Members")
        self.embed_dim = 0

        self.stats = BinStats(self.n_mels)
        self.denoiser = UNet1d(self.n_mels, self.channels, time_dim, norm_groups, float(dropout))
        if self.num_frames % self.denoiser.factor:
            log.info(
                "b4: %d frames are zero-padded to %d inside the U-Net (a multiple of %d for %d levels)",
                self.num_frames,
                self.num_frames + (-self.num_frames % self.denoiser.factor),
                self.denoiser.factor,
                len(self.channels),
            )
        # derived from the config, so not in the state dict
        self.register_buffer("alpha_bar", alpha_bar_schedule(schedule, timesteps).float(), persistent=False)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(noise_draws, self.n_mels, self.num_frames, generator=g)  # (D, n_mels, frames)
        self.register_buffer("score_noise", noise, persistent=False)

    # -- pieces -----------------------------------------------------------------------------------

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        wave = batch["wave"]
        if wave.ndim != 2 or wave.shape[1] != self.num_samples:
            raise AsdError(
                f"b4 was built for clips of {self.num_samples} samples but got a wave batch of shape "
                f"{tuple(wave.shape)}; the clip length must equal data.audio.duration used when the model "
                "was built (every clip is padded or cropped to it)"
            )
        return self.frontend(wave)  # (B, T) -> (B, n_mels, frames)

    def _draws(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Training steps (B,) and noise like x0: global RNG in train mode, the seeded generator in eval."""
        b = x0.shape[0]
        if self.training:
            t = torch.randint(0, self.timesteps, (b,), device=x0.device)
            return t, torch.randn_like(x0)
        g = torch.Generator().manual_seed(self.seed)
        t = torch.randint(0, self.timesteps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return t.to(x0.device), noise.to(x0.device)

    def _denoise(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input log-mel, normalised x0, DDIM result per draw): (B, M, F), (B, M, F), (D, B, M, F)."""
        spec = self.spectrogram(batch)  # (B, M, F)
        x0 = self.stats.normalise(spec)  # (B, M, F) float32
        d, (b, m, f) = self.noise_draws, x0.shape
        a = self.alpha_bar[self.t_star_step]
        x_t = a.sqrt() * x0[None] + (1.0 - a).sqrt() * self.score_noise[:, None]  # (D, B, M, F)
        # float32 even under the predict stage's autocast: in bf16 the DDIM chain's rounding moved b4's
        # official score by 0.0041 on an H200 (docs/results.md, "GPU"), and it gained no speed there
        with torch.autocast(x0.device.type, enabled=False):
            recon = ddim_sample(self.denoiser, x_t.reshape(d * b, m, f), self.ddim_steps, self.alpha_bar)
        return spec.float(), x0, recon.reshape(d, b, m, f)  # (D*B, M, F) -> (D, B, M, F)

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """DDPM noise-prediction MSE at uniformly drawn steps."""
        spec = self.spectrogram(batch)  # (B, n_mels, frames)
        if self.training:
            self.stats.update(spec)
        x0 = self.stats.normalise(spec)  # (B, n_mels, frames)
        t, noise = self._draws(x0)  # (B,), (B, n_mels, frames)
        eps = self.denoiser(q_sample(x0, t, noise, self.alpha_bar), t)  # (B, n_mels, frames)
        return F.mse_loss(eps.float(), noise)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """No embedding: (B, 0)."""
        return batch["wave"].new_zeros(batch["wave"].shape[0], 0)

    def error_map(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(input log-mel, reconstruction, squared error), each (B, n_mels, frames).

        Input and reconstruction (the mean over draws) are in the front end's units; the error is the
        per-bin squared error in normalised units averaged over draws, so its clip mean is `score`.
        """
        spec, x0, recon = self._denoise(batch)
        err = (recon - x0[None]).pow(2).mean(dim=0)  # (D, B, M, F) -> (B, M, F)
        return spec, self.stats.denormalise(recon.mean(dim=0)), err
