"""b5: RealNVP normalizing flow (nflows) on one feature vector per clip; score -log p(x).

The input x is, in the ensemble, `batch["z"]`: the detached, concatenated embeddings of the
other members (the member is then built with `input_dim`); alone, it is the clip's log-mel
statistics from its own front end: the mean and the standard deviation over time of every mel
bin, (B, 2 * n_mels).

Choices:
- Standardisation: per-feature mean and standard deviation in buffers, updated by `loss` in
  train mode only, so a frozen member (eval mode) never moves them. By default they are the
  exact moments of every training vector seen so far; with `momentum` they follow the
  embeddings as the other members train (an exponential average that weights each batch by at
  least `momentum`). Before any update they are the identity. The moments of each batch are
  summed over all ranks first, so every DDP process keeps the same statistics.
- Degenerate input: a standard deviation is floored at `min_std` times the root mean square
  of all of them, so a feature constant over the training data (a dead unit, a silent mel bin)
  stays finite: it is 0 after standardisation and a clip that moves it scores very high. If
  every feature is constant (silent clips, a collapsed embedding) training stops with an
  AsdError: there is no density to learn.
- PCA (`pca_dim`): the flow models the top `pca_dim` principal coordinates of the standardised
  input, scaled to unit variance, and an isotropic Gaussian the rest (probabilistic PCA's
  residual, variance = mean of the discarded eigenvalues), so -log p(x) stays a density over
  the whole input and a clip off the principal subspace is penalised. The input moves while
  the other members train, so the basis is tracked online: each training batch updates the
  running covariance and takes `POWER_STEPS` steps of orthogonal (block power) iteration from
  the previous basis. The basis therefore changes smoothly, without the sign flips and swaps
  of a fresh eigendecomposition; it is a buffer, fixed in eval mode and restored by checkpoints.
- The flow: `layers` affine coupling layers (RealNVP) in pairs with complementary random
  masks drawn from a fixed seed (identical on every rank and every run), conditioners are
  nflows `ResidualNet`s whose output layers start near zero (so the flow starts near the
  identity, as in Glow; a random stack of couplings multiplies large shifts), base
  distribution a standard normal. Log-scales are bounded,
  `max_log_scale * tanh(raw / max_log_scale)`, so no layer can produce a zero or infinite
  scale. No ActNorm/BatchNorm: the input is already standardised, and data-initialised or
  batch-statistic layers would differ across DDP ranks.
- Conditioning (`conditional`): the conditioners also see the one-hot (machine, section)
  class, so the score is -log p(x | section): a clip that looks normal for another section
  is still unlikely for its own.
- Domains (`selective`): the conditioners also see the one-hot domain (source, or unknown, vs
  target), and the score is the smaller of -log p(x | source) and -log p(x | target): the flow
  version of the DCASE baselines' selective Mahalanobis. A clip's domain is not needed to score
  it, and a target normal is measured against the target density instead of being an outlier
  of the source one.
- Units: `loss` is the flow's negative log-likelihood of its input (the standardised x, or
  its whitened principal coordinates) in nats per modelled dimension, the training signal;
  `score` and `log_prob` are in nats in the input's own units, i.e. they include the
  standardisation's log-determinant -sum(log std), and with PCA the whitening's and the
  residual's terms.
- Numerics: the front end and the flow run in float32 with autocast disabled; a non-finite
  input is an AsdError; standardised values are clipped to +-`MAX_STD` standard deviations
  (such a clip is an extreme outlier either way) so the float32 flow stays finite.

One file: one member per file (STYLE.md); its input-width, standardisation and PCA choices
belong together with the flow they feed.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.nn.nets import ResidualNet
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import AffineCouplingTransform
from torch import Tensor, nn

from asd.branches.base import Branch, OptimizerFactory, on_host
from asd.errors import AsdError
from asd.features import probe_length

log = logging.getLogger(__name__)

#: orthogonal-iteration steps per training batch for the online PCA basis
POWER_STEPS = 2
#: standardised inputs are clipped to this many standard deviations
MAX_STD = 1e4
#: floor of the PCA residual variance, in standardised units
MIN_RESIDUAL_VAR = 1e-6


class RunningMoments(nn.Module):
    """Running mean and variance (or full covariance) of feature vectors, in float64 buffers.

    With `momentum=None` the moments are exact over every vector passed to `update`; with a
    momentum each batch weighs at least that much (an exponential average once the exact
    weight n / count falls below it).
    """

    def __init__(self, dim: int, full_cov: bool = False, momentum: float | None = None):
        super().__init__()
        self.momentum = momentum
        self.full_cov = full_cov
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        shape = (dim, dim) if full_cov else (dim,)
        self.register_buffer("cov", torch.zeros(shape, dtype=torch.float64))  # population (co)variance

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Merge the rows of `x` (B, D); under torch.distributed, the rows of every rank."""
        xs = x.detach().double() - self.mean  # (B, D), shifted by the running mean against cancellation
        n = torch.tensor(float(xs.shape[0]), dtype=torch.float64, device=xs.device)
        s1 = xs.sum(dim=0)  # (D,)
        s2 = xs.T @ xs if self.full_cov else xs.pow(2).sum(dim=0)  # (D, D) or (D,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for t in (n, s1, s2):
                dist.all_reduce(t)
        delta = s1 / n  # (D,) batch mean minus running mean
        batch_cov = s2 / n - (torch.outer(delta, delta) if self.full_cov else delta.pow(2))
        w = n / (self.count + n)  # exact merge weight of the batch
        if self.momentum is not None:
            w = w.clamp_min(self.momentum)
        spread = torch.outer(delta, delta) if self.full_cov else delta.pow(2)
        self.cov.copy_((1 - w) * self.cov + w * batch_cov + w * (1 - w) * spread)
        self.mean += w * delta
        self.count += n.long()

    @property
    def var(self) -> Tensor:
        """Per-feature variance, (D,) float64."""
        return self.cov.diagonal() if self.full_cov else self.cov

    def std(self, min_std: float) -> Tensor:
        """Per-feature standard deviation floored at `min_std` x their RMS, (D,); ones before any update."""
        var = self.var.clamp_min(0)
        rms = var.mean().sqrt()
        unit = (self.count == 0) | (rms == 0)  # a tensor test: no host sync in a training step
        return torch.where(unit, torch.ones_like(var), var.sqrt().clamp_min(min_std * rms))

    def is_degenerate(self) -> bool:
        """True when every feature has been constant (to float precision) over at least two vectors."""
        if int(self.count) < 2:
            return False
        scale = 1.0 + float(self.mean.abs().max())
        return float(self.var.clamp_min(0).sqrt().max()) <= 1e-7 * scale


class BoundedAffineCoupling(AffineCouplingTransform):
    """RealNVP affine coupling whose log-scale is `bound * tanh(raw / bound)`, in [-bound, bound]."""

    def __init__(self, mask: Tensor, transform_net_create_fn, bound: float):
        super().__init__(mask, transform_net_create_fn)
        self.bound = bound

    def _scale_and_shift(self, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        k = self.num_transform_features
        shift, raw = transform_params[:, :k], transform_params[:, k:]  # (B, k) each
        return torch.exp(self.bound * torch.tanh(raw / self.bound)), shift


def coupling_masks(dim: int, layers: int, seed: int = 0) -> list[Tensor]:
    """`layers` 0/1 masks of length `dim` (1 = transformed), drawn from `seed`.

    Layers come in pairs: a random half, then its complement, so every feature is transformed
    once per pair. No layer repeats the previous one's mask: two couplings of the same half in a
    row act like one (with two features they would be the only choice there is) and, as measured
    on toy data, train worse.
    """
    g = torch.Generator().manual_seed(seed)
    masks: list[Tensor] = []
    for i in range(layers):
        if i % 2 == 0:
            mask = torch.zeros(dim, dtype=torch.long)
            mask[torch.randperm(dim, generator=g)[: dim // 2]] = 1  # transform a random half
            if masks and torch.equal(mask, masks[-1]):
                mask = 1 - mask
        else:
            mask = 1 - masks[-1]  # then the other half
        masks.append(mask)
    return masks


class FlowBranch(Branch):
    """b5: RealNVP on standardised clip features (other members' z or log-mel statistics); -log p score."""

    name = "b5"
    needs_backend = False

    def __init__(
        self,
        frontend: nn.Module | None = None,
        input_dim: int | None = None,
        pca_dim: int | None = None,
        hidden: int = 64,
        layers: int = 4,
        blocks: int = 1,
        dropout: float = 0.0,
        max_log_scale: float = 3.0,
        momentum: float | None = None,
        min_std: float = 1e-3,
        conditional: bool = False,
        num_sections: int | None = None,
        selective: bool = False,
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the flow for `input_dim`-wide `batch["z"]`, or for the front end's log-mel statistics.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames), e.g. `asd.features.LogMel`; used
                (and required) only when `input_dim` is None.
            input_dim: width of `batch["z"]` (the ensemble's concatenated embeddings); None = use
                the front end's statistics, 2 * n_mels features.
            pca_dim: model only the top principal directions of the standardised input with the
                flow (the rest by an isotropic Gaussian); None = the whole input.
            hidden, blocks: width and residual blocks of each coupling's conditioner network.
            layers: number of affine coupling layers (>= 2, so every feature is transformed).
            dropout: dropout in the conditioners while training.
            max_log_scale: bound of each coupling's log-scale.
            momentum: None = exact running moments; else the least weight of each new batch.
            min_std: floor of each feature's standard deviation, relative to their RMS.
            conditional: condition the flow on the (machine, section) class (needs `num_sections`).
            num_sections: class count of (machine, section) pairs (given by the pipeline).
            selective: condition on the domain too; the score is the min over the two domains.
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        self.frontend = frontend
        self.input_dim = input_dim  # the ensemble feeds `z` only when this is set
        if input_dim is not None:
            if input_dim < 2:
                raise AsdError(
                    f"b5: input_dim={input_dim}: the other members' embeddings must have 2 or more features "
                    "for the flow to couple"
                )
            dim = input_dim
        else:
            if frontend is None:
                raise AsdError(
                    "b5: without input_dim (the width of the b1-b3 embeddings, none selected) it models "
                    "log-mel statistics and needs a frontend (branches.b5.frontend)"
                )
            dim = 2 * self._probe_mels(frontend)
        self.feature_dim = dim
        if pca_dim is not None and pca_dim >= dim:
            raise AsdError(
                f"b5: pca_dim={pca_dim} must be smaller than the input width {dim}; set "
                "branches.b5.pca_dim: null to model the whole input"
            )
        self.pca_dim = pca_dim
        self.flow_dim = pca_dim or dim

        self.conditional = bool(conditional)
        if self.conditional and num_sections is None:
            raise AsdError("b5: conditional=true needs num_sections (the pipeline passes it)")
        self.num_sections = num_sections
        self.min_std = float(min_std)
        self.embed_dim = 0

        self.moments = RunningMoments(dim, full_cov=pca_dim is not None, momentum=momentum)
        self._spread_seen = False  # the training inputs have varied (`loss` stops checking)
        if pca_dim is not None:
            g = torch.Generator().manual_seed(0)  # the same starting basis on every rank and run
            start = torch.linalg.qr(torch.randn(dim, pca_dim, generator=g, dtype=torch.float64))[0]
            self.register_buffer("basis", start)  # (D, k) orthonormal columns
            self.register_buffer("pc_std", torch.ones(pca_dim, dtype=torch.float64))  # (k,)
            self.register_buffer("residual_var", torch.ones((), dtype=torch.float64))

        self.selective = bool(selective)
        context = (num_sections if self.conditional else 0) + (2 if self.selective else 0) or None

        def conditioner(n_in: int, n_out: int) -> nn.Module:
            net = ResidualNet(
                n_in, n_out, hidden, context_features=context, num_blocks=blocks, dropout_probability=dropout
            )
            # near-identity start; small but non-zero weights still pass a gradient to every layer
            nn.init.uniform_(net.final_layer.weight, -1e-3, 1e-3)
            nn.init.zeros_(net.final_layer.bias)
            return net

        couplings = [
            BoundedAffineCoupling(mask, conditioner, float(max_log_scale))
            for mask in coupling_masks(self.flow_dim, layers)
        ]
        self.flow = Flow(CompositeTransform(couplings), StandardNormal([self.flow_dim]))
        log.info(
            "b5: RealNVP (%d couplings) on %s, %d features%s%s%s",
            layers,
            "the other members' embeddings z" if input_dim is not None else "log-mel statistics",
            dim,
            f", top {pca_dim} principal coordinates" if pca_dim is not None else "",
            f", conditioned on {num_sections} sections" if self.conditional else "",
            ", selective over source/target" if self.selective else "",
        )

    @staticmethod
    def _probe_mels(frontend: nn.Module) -> int:
        """The front end's mel bins, from a 1 s zero wave."""
        ref = next(itertools.chain(frontend.parameters(), frontend.buffers()), None)
        device = ref.device if ref is not None else None
        with torch.no_grad():
            probe = frontend(
                torch.zeros(1, probe_length(frontend, 16000), device=device)
            )  # (1, n_mels, frames)
        if probe.ndim != 3:
            raise AsdError(f"b5: the frontend must return (B, n_mels, frames), got {tuple(probe.shape)}")
        return int(probe.shape[1])

    # -- pieces -----------------------------------------------------------------------------------

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The clip vectors x the flow models, (B, D) float32, in their own units."""
        if self.input_dim is not None:
            z = batch.get("z")
            if z is None:
                raise AsdError(
                    f"b5 was built with input_dim={self.input_dim} (a flow on the other members' "
                    "embeddings) but the batch has no 'z'; train it in an ensemble with b1-b3, or set "
                    "branches.b5.input_dim: null to use log-mel statistics"
                )
            if z.ndim != 2 or z.shape[1] != self.input_dim:
                raise AsdError(
                    f"b5: batch['z'] has shape {tuple(z.shape)} but branches.b5.input_dim={self.input_dim}; "
                    "set it to the sum of the source members' embed_dim"
                )
            x = z.detach().float()
        else:
            with torch.autocast(batch["wave"].device.type, enabled=False):
                spec = self.frontend(batch["wave"].float())  # (B, T) -> (B, n_mels, frames)
            if spec.shape[-1] < 2:
                raise AsdError(
                    f"b5: the clip gives {spec.shape[-1]} log-mel frame(s); its statistics over time need "
                    "at least 2 - use longer clips (data.audio.duration)"
                )
            spec = spec.float()
            x = torch.cat([spec.mean(dim=2), spec.std(dim=2, unbiased=False)], dim=1)  # (B, 2*n_mels)
        if not torch.isfinite(x).all():
            source = (
                "batch['z'] (an upstream member diverged?)" if self.input_dim else "the log-mel statistics"
            )
            raise AsdError(f"b5: non-finite values (NaN/inf) in its input, {source}")
        return x

    def _context(self, batch: dict[str, Tensor], domain: int | None = None) -> Tensor | None:
        """The conditioners' context, (B, C), or None when unconditional.

        One-hot (machine, section) class when `conditional`, then with `selective` the one-hot
        domain: the clip's own (unknown counts as source), or `domain` (0 source, 1 target) for all.
        """
        parts = []
        if self.conditional:
            parts.append(self._section_one_hot(batch))
        if self.selective:
            if domain is None:
                if "domain" not in batch:
                    raise AsdError("b5: selective=true trains on batch['domain']")
                target = batch["domain"].long() == 1
            else:
                ref = batch["z"] if self.input_dim is not None and "z" in batch else batch["wave"]
                target = torch.full((ref.shape[0],), domain == 1, dtype=torch.bool, device=ref.device)
            parts.append(F.one_hot(target.long(), 2).float())
        return torch.cat(parts, dim=1) if parts else None

    def _section_one_hot(self, batch: dict[str, Tensor]) -> Tensor:
        section = batch.get("section")
        if section is None:
            raise AsdError("b5: conditional=true needs batch['section']")
        if on_host(section):
            self.check_ids(batch)
        return F.one_hot(section.long(), self.num_sections).float()

    def check_ids(self, batch: dict[str, Tensor]) -> None:
        section = batch.get("section")
        if not self.conditional or section is None:
            return
        if section.numel() and (int(section.min()) < 0 or int(section.max()) >= self.num_sections):
            raise AsdError(
                f"b5: section ids {sorted(set(section.tolist()))} outside [0, {self.num_sections}); "
                "branches.b5.num_sections must count every (machine, section) pair"
            )

    def standardise(self, x: Tensor) -> Tensor:
        """(B, D) -> standardised by the running moments, clipped to +-MAX_STD, float32."""
        mean, std = self.moments.mean.float(), self.moments.std(self.min_std).float()
        return ((x.float() - mean) / std).clamp(-MAX_STD, MAX_STD)

    @torch.no_grad()
    def _update_basis(self) -> None:
        """Orthogonal iteration on the standardised covariance from the current basis; residual variance."""
        std = self.moments.std(self.min_std)
        cov = self.moments.cov / torch.outer(std, std)  # (D, D) covariance of the standardised input
        w = self.basis
        for _ in range(POWER_STEPS):
            q, r = torch.linalg.qr(cov @ w)  # (D, k), (k, k)
            sign = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
            w = q * sign  # fix the signs so the basis moves continuously
        self.basis.copy_(w)
        pc_var = (w * (cov @ w)).sum(dim=0)  # (k,) variance along each basis vector (Rayleigh quotients)
        self.pc_std.copy_(pc_var.clamp_min(MIN_RESIDUAL_VAR).sqrt())
        residual = (cov.diagonal().sum() - pc_var.sum()) / (self.feature_dim - self.flow_dim)
        self.residual_var.copy_(residual.clamp_min(MIN_RESIDUAL_VAR))

    def _flow_input(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised (B, D) -> flow coordinates (B, k) and the log-density terms outside the flow (B,).

        Without PCA the flow sees `s` itself. With PCA it sees the principal coordinates scaled
        to unit variance, and the second output adds that scaling's log-determinant and the
        residual's isotropic Gaussian log-density.
        """
        if self.pca_dim is None:
            return s, s.new_zeros(s.shape[0])
        w = self.basis.float()
        c = s @ w  # (B, D) -> (B, k) principal coordinates
        r = s - c @ w.T  # (B, D) part off the principal subspace
        pc_std, var = self.pc_std.float(), self.residual_var.float()
        n_res = self.feature_dim - self.flow_dim
        log_res = -0.5 * r.pow(2).sum(dim=1) / var - 0.5 * n_res * torch.log(2 * math.pi * var)
        return c / pc_std, log_res - torch.log(pc_std).sum()

    def log_prob(self, batch: dict[str, Tensor], domain: int | None = None) -> Tensor:
        """log p(x) (or log p(x | section[, domain])) in nats, in the input's own units, (B,) float32."""
        x = self.features(batch)  # (B, D)
        context = self._context(batch, domain)
        with torch.autocast(x.device.type, enabled=False):
            y, log_rest = self._flow_input(self.standardise(x))  # (B, k), (B,)
            log_det = -torch.log(self.moments.std(self.min_std)).sum().float()  # of x -> standardised
            return self.flow.log_prob(y, context=context) + log_rest + log_det

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Negative log-likelihood of the standardised (projected) input, nats per modelled dimension."""
        x = self.features(batch)  # (B, D)
        context = self._context(batch)
        if self.training:
            self.moments.update(x)
            # a host sync per step until the inputs have shown spread; constant ones never regain it
            if not self._spread_seen and self.moments.is_degenerate():
                what = "embedding dimension of batch['z']" if self.input_dim else "log-mel statistic"
                raise AsdError(
                    f"b5: every {what} has been constant over the {int(self.moments.count)} training clips "
                    "so far (zero variance), so there is no density to learn; check for silent or "
                    "identical clips, or a collapsed upstream member"
                )
            self._spread_seen = self._spread_seen or int(self.moments.count) >= 2
            if self.pca_dim is not None:
                self._update_basis()
        with torch.autocast(x.device.type, enabled=False):
            y, _ = self._flow_input(self.standardise(x))  # (B, k)
            return -self.flow.log_prob(y, context=context).mean() / self.flow_dim

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """No embedding: (B, 0)."""
        ref = batch["z"] if self.input_dim is not None and "z" in batch else batch["wave"]
        return ref.new_zeros(ref.shape[0], 0, dtype=torch.float32)

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """-log p(x) in nats (input units), (B,), higher = more anomalous; `selective`: min over domains."""
        if self.selective:
            return -torch.maximum(self.log_prob(batch, domain=0), self.log_prob(batch, domain=1))
        return -self.log_prob(batch)
