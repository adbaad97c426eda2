"""b3: contrastive CNN, a small ResNet on log-mel trained with supervised contrastive loss plus a classifier.

The clip's log-mel is standardised per mel bin and encoded by a small 2-D ResNet (strided
stem, one stage per entry of `channels`, the first at full resolution and each later one
halving both axes) into an embedding z (B, emb_dim): the last stage's map is averaged over
time and its channels x remaining mel bins are projected linearly, so the embedding keeps
where in frequency a pattern sits. Training pulls clips of the same class together on the
unit sphere and pushes the rest apart, so at test time a clip unlike every training normal
of its section lands far from them.

Choices:
- Normalisation: `asd.features.BinStats` (shared with b2), per-mel-bin mean and standard deviation of
  every training frame seen so far, updated only by `loss` in train mode. It keeps no batch statistics at
  scoring time, and a frozen member (eval mode) never moves it.
- Loss: `supcon_loss` (Khosla et al. 2020, the L_out form) on L2-normalised z with
  temperature `temperature`, plus `head_weight` times the cross-entropy of a cosine
  classifier (unit-norm class weights, logits scaled by `head_scale`) over `classify`
  classes. `positives="attribute"`: two clips are positives when they share the section
  (so the machine) and, where both attribute ids are known (>= 0), the attribute class;
  `positives="section"` ignores attributes. An anchor with no positive in the batch is left
  out of the contrastive term; the classifier's class weights act as prototypes that every
  clip always has, so a lone clip still trains through the head.
- Few-shot target clips: every clip's loss is weighted by n^-`balance`, n the number of clips
  of its (section, domain) in the batch, weights scaled to mean 1 (`balance_weights`). With
  `balance=1` each (section, domain) group present in a batch weighs the same in total, so the
  one or two target clips in a batch count as much as the dozen source clips of their section;
  0 switches the weighting off. The same weights apply to both loss terms.
- z is the encoder's output before L2 normalisation (the loss and both scores use its
  direction only; b5 standardises z itself).
- Score: `score_mode="knn"` is the mean cosine distance to the `k` nearest training normals
  of the clip's section, min over the source and target banks (`asd.scoring.KnnBackend`);
  `"centre"` is the cosine distance to the mean unit embedding of the section's training
  normals, source and target centres apart, the smaller of the two. Domain-unknown training
  clips join the source bank or centre. The fitted state is a `KnnBackend` (for "centre" one
  whose banks hold the centres), so it rides in `state_dict`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asd.branches.base import Branch, OptimizerFactory, check_int
from asd.errors import AsdError
from asd.features import BinStats
from asd.scoring import KnnBackend

log = logging.getLogger(__name__)

SCORE_MODES = ("knn", "centre")
LABEL_KINDS = ("attribute", "section")
_MASKED = -1e9  # logit of an anchor with itself: finite, so a batch of one gives no NaN gradient


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AsdError(f"b3: {key}={value!r} must be a number (branches.b3.{key})")
    return float(value)


def balance_weights(section: Tensor, domain: Tensor, power: float = 1.0) -> Tensor:
    """Per-clip weights n^-power, n = the clip's (section, domain) count in the batch, mean 1, (B,)."""
    groups = torch.stack([section, domain], dim=1)  # (B, 2)
    _, inverse, counts = torch.unique(groups, dim=0, return_inverse=True, return_counts=True)
    w = counts[inverse].float().pow(-power)  # (B,)
    return w * (w.numel() / w.sum())


def positive_pairs(section: Tensor, attribute: Tensor | None = None) -> Tensor:
    """(B, B) bool: same section and, where `attribute` is given and both ids are >= 0, same attribute.

    The diagonal is False: a clip is not its own positive.
    """
    pos = section[:, None] == section[None, :]  # (B, B)
    if attribute is not None:
        unknown = attribute < 0  # (B,)
        same = attribute[:, None] == attribute[None, :]
        pos = pos & (same | unknown[:, None] | unknown[None, :])
    return pos & ~torch.eye(section.shape[0], dtype=torch.bool, device=section.device)


def supcon_loss(
    z: Tensor, positive: Tensor, weight: Tensor | None = None, temperature: float = 0.1
) -> Tensor:
    """Weighted supervised contrastive loss (Khosla et al. 2020, L_out) of unit embeddings, float32 scalar.

    For anchor i with positives P(i) and all other clips A(i):
    l_i = -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t)),
    and the loss is sum_i w_i l_i / sum_i w_i over anchors with at least one positive (0 if none).

    Args:
        z: L2-normalised embeddings, (B, D).
        positive: (B, B) bool positive pairs; the diagonal is ignored.
        weight: per-anchor weights (B,), all 1 when None.
        temperature: t > 0.
    """
    with torch.autocast(z.device.type, enabled=False):  # logsumexp of 1/t-scaled logits: float32
        z = z.float()
        b = z.shape[0]
        self_pair = torch.eye(b, dtype=torch.bool, device=z.device)
        logits = (z @ z.T / temperature).masked_fill(self_pair, _MASKED)  # (B, B)
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)  # (B, B)
        pos = positive & ~self_pair
        n_pos = pos.sum(dim=1)  # (B,)
        per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp_min(1)  # (B,)
        w = torch.ones(b, device=z.device) if weight is None else weight.float()
        w = w * (n_pos > 0)
        # an empty sum keeps the graph (0 * loss), so every parameter still gets a (zero) gradient
        return (w * per_anchor).sum() / w.sum().clamp_min(1e-12)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Log-mel (B, n_mels, frames) -> embedding (B, emb_dim) by a small 2-D ResNet."""

    def __init__(
        self, n_mels: int, channels: Sequence[int] = (16, 32, 64, 128), blocks: int = 1, emb_dim: int = 128
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        layers, c_prev, bins = [], channels[0], (n_mels + 1) // 2  # a stride-2 3x3 conv: ceil(n / 2)
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            bins = bins if stride == 1 else (bins + 1) // 2
            for j in range(blocks):
                layers.append(BasicBlock(c_prev, c, stride if j == 0 else 1))
                c_prev = c
        self.stages = nn.Sequential(*layers)
        self.out_bins = bins
        self.proj = nn.Linear(c_prev * bins, emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x[:, None]))  # (B, 1, n_mels, frames) -> (B, C, F', T')
        h = h.mean(dim=3)  # (B, C, F', T') -> (B, C, F')
        return self.proj(h.flatten(1))  # (B, C * F') -> (B, emb_dim)


class ContrastiveBranch(Branch):
    """b3: ResNet on log-mel, supervised contrastive + cosine-classifier loss; kNN or centre score."""

    name = "b3"
    needs_backend = True

    def __init__(
        self,
        frontend: nn.Module,
        num_sections: int,
        num_attributes: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks: int = 1,
        emb_dim: int = 128,
        temperature: float = 0.1,
        positives: str = "attribute",
        classify: str = "attribute",
        head_weight: float = 1.0,
        head_scale: float = 16.0,
        balance: float = 1.0,
        score_mode: str = "knn",
        k: int = 1,
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the encoder for the front end's `n_mels` bins.

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames) with an `n_mels` attribute (`LogMel`).
            num_sections, num_attributes: class counts of (machine, section) and of training
                (machine, section, attributes); `num_attributes` is needed when `classify="attribute"`.
            channels, blocks, emb_dim: ResNet stage widths, residual blocks per stage, embedding size.
            temperature: of the contrastive loss.
            positives: "attribute" (same section and, when both known, attributes) or "section".
            classify: classes of the cosine classifier head, "attribute" or "section".
            head_weight: weight of the classifier's cross-entropy; 0 builds no head.
            head_scale: the classifier's logit scale (cosine similarities times this).
            balance: exponent of the (section, domain) balancing weights, in [0, 1]; 0 = unweighted.
            score_mode: "knn" or "centre".
            k: neighbours averaged by the kNN score.
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        check_int("b3", "num_sections", num_sections, example="the number of (machine, section) pairs")
        if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
            raise AsdError(f"b3: channels={channels!r} must be a list of stage widths (branches.b3.channels)")
        for c in channels:
            check_int("b3", "channels", c, example="[16, 32, 64]")
        check_int("b3", "blocks", blocks, example="1")
        check_int("b3", "emb_dim", emb_dim, example="128")
        check_int("b3", "k", k, example="1")
        temperature, head_weight = _number(temperature, "temperature"), _number(head_weight, "head_weight")
        head_scale, balance = _number(head_scale, "head_scale"), _number(balance, "balance")
        if not temperature > 0:
            raise AsdError(
                f"b3: temperature={temperature} must be positive (branches.b3.temperature, e.g. 0.1)"
            )
        if not head_weight >= 0:
            raise AsdError(
                f"b3: head_weight={head_weight} must be >= 0 (branches.b3.head_weight); 0 = no head"
            )
        if not head_scale > 0:
            raise AsdError(f"b3: head_scale={head_scale} must be positive (branches.b3.head_scale, e.g. 16)")
        if not 0 <= balance <= 1:
            raise AsdError(f"b3: balance={balance} must be in [0, 1] (branches.b3.balance); 0 = unweighted")
        for key, value in (("positives", positives), ("classify", classify)):
            if value not in LABEL_KINDS:
                raise AsdError(
                    f"b3: {key}={value!r} is unknown; set branches.b3.{key} to one of {LABEL_KINDS}"
                )
        if score_mode not in SCORE_MODES:
            raise AsdError(
                f"b3: score_mode={score_mode!r} is unknown; set branches.b3.score_mode to one of "
                f"{SCORE_MODES}"
            )
        num_classes = num_sections
        if classify == "attribute" and head_weight > 0:
            if num_attributes is None:
                raise AsdError(
                    "b3: classify='attribute' needs num_attributes (the pipeline passes it); "
                    "pass it or set branches.b3.classify=section"
                )
            num_classes = check_int(
                "b3", "num_attributes", num_attributes, example="the number of attribute classes"
            )
        n_mels = getattr(frontend, "n_mels", None)
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise AsdError(
                f"b3: the frontend {type(frontend).__name__} has no integer `n_mels`; use "
                "asd.features.LogMel (branches.b3.frontend)"
            )

        self.frontend = frontend
        self.n_mels = n_mels
        self.embed_dim = emb_dim
        self.temperature, self.head_scale, self.balance = temperature, head_scale, balance
        self.head_weight, self.positives, self.classify = head_weight, positives, classify
        self.num_classes, self.score_mode = num_classes, score_mode
        self.stats = BinStats(n_mels)
        self.encoder = ResNetEncoder(n_mels, tuple(channels), blocks, emb_dim)
        # only a member that uses its head has one: an unused parameter would break DDP's gradient sync
        self.head = (
            nn.Parameter(torch.randn(num_classes, emb_dim) * emb_dim**-0.5) if head_weight > 0 else None
        )
        self.backend = KnnBackend(k=k if score_mode == "knn" else 1, normalize=True)

    # -- pieces -----------------------------------------------------------------------------------

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        spec = self.frontend(batch["wave"])  # (B, T) -> (B, n_mels, frames)
        if spec.ndim != 3 or spec.shape[1] != self.n_mels:
            raise AsdError(
                f"b3: the frontend returned {tuple(spec.shape)}, expected (B, {self.n_mels}, frames); "
                "branches.b3.frontend must be a log-mel front end such as asd.features.LogMel"
            )
        return spec

    @staticmethod
    def _labels(batch: dict[str, Tensor], kind: str) -> Tensor:
        """The batch's `kind` ids, (B,) long."""
        if kind not in batch:
            raise AsdError(f"b3: the batch has no '{kind}' ids; b3 trains on batches of asd.data.datamodule")
        return batch[kind].long()

    def _head_loss(self, z: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """Weighted cross-entropy of the cosine classifier; clips of unknown class (-1) are left out."""
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise AsdError(
                f"b3: '{self.classify}' ids range over [{int(labels.min())}, {int(labels.max())}] but the "
                f"head has {self.num_classes} classes; build b3 with the data's num_sections / "
                "num_attributes (a checkpoint of another dataset does not fit)"
            )
        with torch.autocast(z.device.type, enabled=False):
            logits = self.head_scale * F.normalize(z.float(), dim=1) @ F.normalize(self.head.float(), dim=1).T
            ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")  # (B,)
            w = weight * (labels >= 0)
            return (w * ce).sum() / w.sum().clamp_min(1e-12)

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Balanced supervised contrastive loss plus `head_weight` times the classifier's cross-entropy."""
        spec = self.spectrogram(batch)  # (B, n_mels, frames)
        if self.training:
            self.stats.update(spec)
        z = self.encoder(self.stats.normalise(spec)).float()  # (B, emb_dim)
        section = self._labels(batch, "section")
        domain = self._labels(batch, "domain")
        attribute = (
            self._labels(batch, "attribute") if "attribute" in (self.positives, self.classify) else None
        )
        weight = balance_weights(section, domain, self.balance)  # (B,)
        positive = positive_pairs(section, attribute if self.positives == "attribute" else None)
        total = supcon_loss(F.normalize(z, dim=1), positive, weight, self.temperature)
        if self.head is not None:
            labels = attribute if self.classify == "attribute" else section
            total = total + self.head_weight * self._head_loss(z, labels, weight)
        return total

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """The encoder's embedding before L2 normalisation, (B, emb_dim) float32."""
        return self.encoder(self.stats.normalise(self.spectrogram(batch))).float()

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """kNN banks, or centres, per (section, source|target) of the training normals' embeddings."""
        missing = [key for key in ("section", "domain") if key not in meta]
        if missing:
            raise AsdError(f"b3.fit_backend: `meta` lacks {missing}; pass each clip's section and domain ids")
        if not isinstance(feats, Tensor) or feats.ndim != 2 or feats.shape[1] != self.embed_dim:
            got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise AsdError(f"b3.fit_backend: `feats` must be b3 embeddings (N, {self.embed_dim}), got {got}")
        feats = feats.detach().float()
        section, domain = meta["section"], meta["domain"]
        if self.score_mode == "knn":
            self.backend.fit(feats, section, domain)
            return
        if not bool(torch.isfinite(feats).all()):
            raise AsdError("b3.fit_backend: `feats` has NaN/inf values; the member diverged - retrain it")
        if not isinstance(section, Tensor) or not isinstance(domain, Tensor) or section.shape != domain.shape:
            raise AsdError("b3.fit_backend: meta['section'] and meta['domain'] must be (N,) id tensors")
        groups = torch.stack([section.long(), (domain.long() == 1).long()], dim=1).to(feats.device)  # (N, 2)
        keys, inverse = torch.unique(groups, dim=0, return_inverse=True)
        unit = F.normalize(feats, dim=1)  # (N, D)
        sums = torch.zeros(keys.shape[0], unit.shape[1], device=unit.device).index_add_(0, inverse, unit)
        # the mean of unit vectors; the backend normalises it again, so its length does not matter
        self.backend.fit(sums, keys[:, 0], keys[:, 1])  # (G, D), one bank row per group

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Cosine distance to the section's training normals (kNN mean or centre), min over domains, (B,)."""
        if not self.backend.fitted:
            raise AsdError(
                "b3: score needs fit_backend to run first (on the training normals' backend_features), "
                "or a checkpoint whose backend was fitted"
            )
        return self.backend.score(self.embed(batch), self._labels(batch, "section"))
