"""b3's auxiliary classification task: sub-cluster AdaCos, mixup, and self-supervised classes for one class.

The recipe of the strongest from-scratch DCASE systems (Wilkinghoff, DCASE 2021-2024): learn an
embedding by classifying each training clip's auxiliary class (section, or section x attributes)
with an angular-margin loss, then score test clips by their distance to the training normals.
The pieces, written from the papers' descriptions:

- `SubclusterAdaCos`: each class has `subclusters` centres on the unit sphere, fixed at random
  (not trained: trained centres give the network an easy way to a trivial solution, Wilkinghoff
  2023). A clip's class logit is the log-sum-exp over its class's sub-clusters of s * cos, so the
  class probability is the sum of its sub-clusters' softmax probabilities and a class may spread
  over several modes (operating conditions) without being pulled to one point. The scale s is
  AdaCos's adaptive scale (Zhang et al. 2019): s0 = sqrt(2) log(M - 1) for M sub-clusters in all, then
  every training batch s = log(B_avg) / cos(min(pi/4, theta_med)), where B_avg is the batch mean of
  sum exp(s cos) over the sub-clusters of the clip's other classes and theta_med the median angle of a
  clip to the nearest sub-cluster of its own class. With soft (mixup) targets both use the target
  weights: non-target terms weigh 1 - y_c, the own-class cosine is sum_c y_c max_k cos_ck.
- `mixup`: each clip is mixed, with probability `prob`, with a random other clip of the batch:
  wave lam x_i + (1 - lam) x_j, target and loss weight mixed with the same lam ~ Beta(alpha, alpha).
  Mixing waves feeds both of b3's input branches the same mixture.
- `self_supervised_views`: when the labels give one class (one section and no attributes: the
  first-shot case) a classifier has nothing to separate. The clip and transformed copies of it
  become the classes (`VIEWS`): time-reversed (the envelope of impacts and run-ups is not
  symmetric), sped up and slowed down by `SPEED` (every line and rhythm moves, as a different
  operating condition would). The network must then encode pitch, tempo and envelope shape of the
  machine's normal sound; test clips are embedded untransformed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asd.errors import AsdError

VIEWS = ("original", "reversed", "faster", "slower")
SPEED = 1.15  # rate of the sped-up view; the slowed-down one plays at 1 / SPEED


class SubclusterAdaCos(nn.Module):
    """Sub-cluster AdaCos head: fixed unit centres, log-sum-exp over sub-clusters, adaptive scale."""

    def __init__(self, num_classes: int, dim: int, subclusters: int = 16):
        super().__init__()
        if num_classes < 2:
            raise AsdError(
                f"SubclusterAdaCos: {num_classes} class(es); a classifier needs at least 2 "
                "(b3 adds self-supervised classes when the data has one)"
            )
        self.num_classes, self.subclusters = num_classes, subclusters
        centres = F.normalize(torch.randn(num_classes * subclusters, dim), dim=1)
        self.register_buffer("centres", centres.view(num_classes, subclusters, dim))  # (C, K, D)
        self.register_buffer("scale", torch.tensor(self.initial_scale(num_classes * subclusters)))

    @staticmethod
    def initial_scale(num_centres: int) -> float:
        """AdaCos's fixed scale sqrt(2) log(M - 1) for M centres (at least that of 3 centres)."""
        return math.sqrt(2.0) * math.log(max(num_centres - 1, 2))

    def cosines(self, z: Tensor) -> Tensor:
        """Cosine of each embedding to each centre, (B, D) -> (B, C, K) float32."""
        unit = F.normalize(z.float(), dim=1)
        return torch.einsum("bd,ckd->bck", unit, self.centres.float())

    @staticmethod
    def class_logits(cos: Tensor, scale: Tensor | float) -> Tensor:
        """(B, C, K) cosines -> (B, C) class logits, log-sum-exp over the sub-clusters of scale * cos."""
        return torch.logsumexp(scale * cos, dim=2)

    @staticmethod
    def adaptive_scale(cos: Tensor, target: Tensor, scale: Tensor | float) -> Tensor:
        """AdaCos's next scale from a batch's cosines (B, C, K) and targets (B, C) summing to 1, scalar.

        s' = log(B_avg) / cos(min(pi/4, theta_med)); the scale stays where B_avg <= 1 (log <= 0).
        """
        with torch.no_grad():
            scale = torch.as_tensor(scale, dtype=torch.float32, device=cos.device)
            others = (1 - target)[:, :, None] * torch.exp(scale * cos)  # (B, C, K)
            b_avg = others.sum(dim=(1, 2)).mean()
            own = (target * cos.max(dim=2).values).sum(dim=1)  # (B,)
            theta_med = torch.acos(own.clamp(-1 + 1e-7, 1 - 1e-7)).median()
            new = torch.log(b_avg) / torch.cos(theta_med.clamp(max=math.pi / 4))
            return torch.where(b_avg > 1, new, scale)

    def forward(self, z: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """Weighted cross-entropy of the class logits against soft targets (B, C), float32 scalar.

        In train mode the scale is updated from the batch first (AdaCos uses the new scale at once).
        """
        with torch.autocast(z.device.type, enabled=False):
            cos = self.cosines(z)  # (B, C, K)
            target = target.float()
            if self.training:
                self.scale.copy_(self.adaptive_scale(cos, target, self.scale))
            log_p = F.log_softmax(self.class_logits(cos, self.scale), dim=1)  # (B, C)
            ce = -(target * log_p).sum(dim=1)  # (B,)
            w = torch.ones_like(ce) if weight is None else weight.float()
            return (w * ce).sum() / w.sum().clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, subclusters={self.subclusters}, scale={float(self.scale):.3f}"


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B,) class ids -> (B, C) float targets; an unknown id (-1) gives a row of zeros."""
    return F.one_hot(labels.clamp_min(0), num_classes).float() * (labels >= 0)[:, None]


def mixup(
    wave: Tensor, target: Tensor, weight: Tensor, prob: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Mix each clip, with probability `prob`, with a random clip of the batch (torch's global RNG).

    Returns wave (B, T), target (B, C) and weight (B,), each lam * own + (1 - lam) * partner, with
    lam ~ Beta(alpha, alpha) per mixed clip and lam = 1 for the others.
    """
    b = wave.shape[0]
    partner = torch.randperm(b)
    lam = torch.distributions.Beta(alpha, alpha).sample((b,))  # (B,)
    lam = torch.where(torch.rand(b) < prob, lam, torch.ones(b)).to(wave.device)
    partner = partner.to(wave.device)

    def mix(x: Tensor) -> Tensor:
        shape = (b,) + (1,) * (x.ndim - 1)
        return lam.view(shape).to(x.dtype) * x + (1 - lam.view(shape)).to(x.dtype) * x[partner]

    return mix(wave), mix(target.float()), mix(weight.float())


def change_speed(wave: Tensor, rate: float) -> Tensor:
    """Play (B, T) waves `rate` times faster (pitch and tempo), keeping T samples; the clip wraps around.

    Linear interpolation at positions n * rate (mod T): a fast, approximate resampler; content pushed
    above the Nyquist frequency by rate > 1 folds back, which the classes do not depend on.
    """
    t = wave.shape[-1]
    pos = torch.arange(t, device=wave.device, dtype=torch.float64) * rate
    left = pos.floor()
    frac = (pos - left).to(wave.dtype)  # (T,)
    i0 = left.long() % t
    i1 = (i0 + 1) % t
    return wave[:, i0] * (1 - frac) + wave[:, i1] * frac


def self_supervised_views(wave: Tensor) -> tuple[Tensor, Tensor]:
    """The clips and their transformed copies, (B, T) -> (V * B, T) waves and (V * B,) view ids.

    Rows are view-major: rows v * B .. (v + 1) * B - 1 are view `VIEWS[v]` of clips 0 .. B - 1.
    """
    views = [wave, wave.flip(-1), change_speed(wave, SPEED), change_speed(wave, 1 / SPEED)]
    ids = torch.arange(len(views), device=wave.device).repeat_interleave(wave.shape[0])  # (V * B,)
    return torch.cat(views), ids
