"""b3: discriminative embedding CNN, trained from scratch on auxiliary classes; kNN scoring.

A clip's log-mel is standardised per mel bin and encoded by a small 2-D ResNet (strided
stem, one stage per entry of `channels`, the first at full resolution and each later one
halving both axes) into an embedding (B, emb_dim): the last stage's map is averaged over
time and its channels x remaining mel bins are projected linearly, so the embedding keeps
where in frequency a pattern sits. With `spectrum="multires"` a second branch encodes the
log power of the FFT of the whole clip (`asd.features.LogSpectrum`, standardised per bin) with
a 1-D CNN over frequency (`SpectrumEncoder`), and the two embeddings, each L2-normalised so both
weigh the same in a cosine, are concatenated (embed_dim = 2 emb_dim): the full spectrum resolves
1/duration Hz, where the log-mel sees ~100 Hz bands.
Training pulls clips of one class together and apart from the other classes, so at test time a
clip unlike every training normal of its section lands far from them.

Objectives (`objective`):
- "subcluster_adacos" (the DCASE 2023/2024 from-scratch recipe, `asd.branches.auxiliary`):
  sub-cluster AdaCos over `classify` classes with `subclusters` fixed centres each, and mixup of
  waves and targets (`mixup` probability per clip, lam ~ Beta(`mixup_alpha`, `mixup_alpha`)).
  The keys `temperature`, `positives`, `head_weight`, `head_scale` are the other objective's.
- "supcon": `supcon_loss` (Khosla et al. 2020, the L_out form) on L2-normalised embeddings with
  temperature `temperature`, plus `head_weight` times the cross-entropy of a cosine classifier
  (unit-norm class weights, logits scaled by `head_scale`) over `classify` classes.
  `positives="attribute"`: two clips are positives when they share the section (so the machine)
  and, where both attribute ids are known (>= 0), the attribute class; `positives="section"`
  ignores attributes. An anchor with no positive in the batch is left out of the contrastive term;
  the classifier's class weights act as prototypes that every clip always has. No mixup.

Choices:
- Classes: `classify="section"` (machine x section) or `"attribute"` (section x attributes).
- One class (`self_supervised`): when `classify` gives a single class (one section, no attributes:
  the first-shot case) the objectives have nothing to separate, so with "auto" every training clip
  also enters as transformed copies (`asd.branches.auxiliary.VIEWS`: time-reversed, faster,
  slower) and the class is (label, view); "always" does this on any data, "never" not at all. The
  constructor logs the objective and classes at INFO. Scores embed the untransformed clip.
- Normalisation: `asd.features.BinStats` (shared with b2), per-bin mean and standard deviation of
  every untransformed, unmixed training clip seen so far, updated only by `loss` in train mode. It
  keeps no batch statistics at scoring time, and a frozen member (eval mode) never moves it.
- Few-shot target clips: every clip's loss is weighted by n^-`balance`, n the number of clips
  of its (section, domain) in the batch, weights scaled to mean 1 (`balance_weights`). With
  `balance=1` each (section, domain) group present in a batch weighs the same in total, so the
  one or two target clips in a batch count as much as the dozen source clips of their section;
  0 switches the weighting off.
- The embedding is the log-mel encoder's output before L2 normalisation (with "multires", the two
  unit halves); the losses and both scores use its direction only, b5 standardises it itself.
- Score: `score_mode="knn"` is the mean cosine distance to the `k` nearest training normals
  of the clip's section, min over the source and target banks (`asd.scoring.KnnBackend`), with
  `knn_density` each bank clip's distance divided by its local scale (its mean distance to its k
  nearest training neighbours of the section), so a sparse target bank is not penalised;
  `"centre"` is the cosine distance to the mean unit embedding of the section's training
  normals, source and target centres apart, the smaller of the two. Domain-unknown training
  clips join the source bank or centre. `"mahalanobis"` is the unit embedding's Mahalanobis
  distance to the section's Gaussian models (`asd.scoring.MahalanobisBackend`: one mean per
  domain, the section's within-domain covariance shrunk by Ledoit-Wolf, each model calibrated
  on its clips' left-out distances), the scoring of the reference and of the error profiles
  (`asd.branches.error_profile`): one covariance per section uses every training clip, where a
  1-nearest-neighbour bank of a few target clips reads one clip. The fitted state is the
  backend (`KnnBackend`, for "centre" one whose banks hold the centres, or
  `MahalanobisBackend`), so it rides in `state_dict`.

Measured options and defaults: docs/b3.md (`benchmarks/bench_b3.py`).

One file: one member per file (STYLE.md); its two encoders and two objectives share the inputs,
the statistics and the label handling; the pieces of the classification recipe that need no
member (sub-cluster AdaCos, mixup, self-supervised views) live in `asd/branches/auxiliary.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asd.branches.auxiliary import VIEWS, SubclusterAdaCos, mixup, one_hot, self_supervised_views
from asd.branches.base import Branch, OptimizerFactory, on_host
from asd.errors import AsdError
from asd.features import BinStats, LogSpectrum
from asd.scoring import KnnBackend, MahalanobisBackend

log = logging.getLogger(__name__)

SCORE_MODES = ("knn", "centre", "mahalanobis")

_MASKED = -1e9  # logit of an anchor with itself: finite, so a batch of one gives no NaN gradient


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


class SpectrumEncoder(nn.Module):
    """Full log spectrum (B, n_bins) -> embedding (B, emb_dim) by a 1-D CNN over frequency.

    A wide strided stem (kernel `kernel`, stride `stride` bins) reads the fine spectrum; each later
    entry of `channels` is a stride-2 convolution and a 3-wide one; the map is averaged into
    `positions` frequency bands whose channels are projected linearly, so the embedding keeps where
    in frequency a line sits, for any number of bins.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        emb_dim: int = 128,
        positions: int = 16,
        kernel: int = 256,
        stride: int = 64,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv1d(1, channels[0], kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm1d(channels[0]),
            nn.ReLU(),
        ]
        for c_in, c in zip(channels[:-1], channels[1:], strict=True):
            layers += [
                nn.Conv1d(c_in, c, 5, stride=2, padding=2, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(),
                nn.Conv1d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(),
            ]
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(positions)
        self.proj = nn.Linear(channels[-1] * positions, emb_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(x[:, None])  # (B, 1, n_bins) -> (B, C, L)
        h = self.pool(h)  # (B, C, L) -> (B, C, positions)
        return self.proj(h.flatten(1))  # (B, C * positions) -> (B, emb_dim)


class ContrastiveBranch(Branch):
    """b3: ResNet on log-mel (+ 1-D CNN on the full spectrum), sub-cluster AdaCos or SupCon; kNN score."""

    name = "b3"
    needs_backend = True

    def __init__(
        self,
        frontend: nn.Module,
        num_sections: int,
        num_attributes: int | None = None,
        num_samples: int | None = None,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks: int = 1,
        emb_dim: int = 128,
        objective: str = "supcon",
        subclusters: int = 16,
        mixup: float = 0.0,
        mixup_alpha: float = 1.0,
        self_supervised: str = "auto",
        spectrum: str = "logmel",
        spectrum_channels: Sequence[int] = (32, 64, 128),
        temperature: float = 0.1,
        positives: str = "attribute",
        classify: str = "attribute",
        head_weight: float = 1.0,
        head_scale: float = 16.0,
        balance: float = 1.0,
        score_mode: str = "knn",
        k: int = 1,
        knn_density: bool = False,
        knn_calibrate: bool = False,
        optimizer: OptimizerFactory | None = None,
    ):
        """Build the encoders for the front end's `n_mels` bins (and the clip's `num_samples`).

        Args:
            frontend: wave (B, T) -> log-mel (B, n_mels, frames) with an `n_mels` attribute (`LogMel`).
            num_sections, num_attributes: class counts of (machine, section) and of training
                (machine, section, attributes); `num_attributes` is needed when classifying attributes.
            num_samples: clip length in samples (the builder passes it); `spectrum="multires"` needs it.
            channels, blocks, emb_dim: ResNet stage widths, residual blocks per stage, embedding size
                (per input branch).
            objective: "subcluster_adacos" or "supcon" (see the module docstring).
            subclusters: centres per class of sub-cluster AdaCos.
            mixup, mixup_alpha: probability that a clip is mixed, and the Beta parameter of the mix.
            self_supervised: "auto" (transformed copies as classes when `classify` gives one class),
                "always" or "never".
            spectrum: "logmel", or "multires" (log-mel and full-spectrum branches, concatenated).
            spectrum_channels: widths of the full-spectrum CNN.
            temperature, positives, head_weight, head_scale: the supcon objective's (module docstring).
            classify: classes of the objective, "attribute" or "section".
            balance: exponent of the (section, domain) balancing weights, in [0, 1]; 0 = unweighted.
            score_mode: "knn", "centre" or "mahalanobis".
            k: neighbours averaged by the kNN score.
            knn_density: divide kNN distances by each bank clip's local scale (`KnnBackend(density=)`).
            knn_calibrate: standardise each bank's distances by its clips' left-out ones
                (`KnnBackend(calibrate=)`).
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["frontend", "optimizer"])
        adacos = objective == "subcluster_adacos"
        if not adacos and mixup > 0:
            raise AsdError(
                f"b3: mixup={mixup} needs objective=subcluster_adacos (supcon has no targets to mix); "
                "set branches.b3.mixup=0"
            )
        if score_mode not in SCORE_MODES:
            raise AsdError(
                f"b3: score_mode={score_mode!r} is unknown; set branches.b3.score_mode to one of "
                f"{SCORE_MODES}"
            )
        if knn_density and score_mode != "knn":
            raise AsdError(
                f"b3: knn_density rescales kNN distances; it needs score_mode=knn (got {score_mode!r}): "
                "set branches.b3.knn_density=false"
            )
        if knn_calibrate and score_mode != "knn":
            raise AsdError(
                f"b3: knn_calibrate standardises kNN distances; it needs score_mode=knn (got "
                f"{score_mode!r}): set branches.b3.knn_calibrate=false"
            )
        by_attribute = classify == "attribute" and (adacos or head_weight > 0)
        if by_attribute and num_attributes is None:
            raise AsdError(
                "b3: classify='attribute' needs num_attributes (the pipeline passes it); "
                "pass it or set branches.b3.classify=section"
            )
        n_mels = getattr(frontend, "n_mels", None)
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise AsdError(
                f"b3: the frontend {type(frontend).__name__} has no integer `n_mels`; use "
                "asd.features.LogMel (branches.b3.frontend)"
            )
        multires = spectrum == "multires"
        if multires and num_samples is None:
            raise AsdError(
                "b3: spectrum=multires needs the clip length (num_samples, passed by the pipeline when "
                "data.audio.duration is set); set data.audio.duration or branches.b3.spectrum=logmel"
            )

        num_real = num_attributes if by_attribute else num_sections
        one_class = num_real == 1
        self.views = VIEWS if self_supervised == "always" or (self_supervised == "auto" and one_class) else ()
        if one_class and not self.views:
            log.warning(
                "b3: classify=%s gives 1 class and self_supervised=never: the %s objective has nothing "
                "to separate, so b3 learns little",
                classify,
                objective,
            )
        self.frontend = frontend
        self.n_mels = n_mels
        self.embed_dim = emb_dim * (2 if multires else 1)
        self.objective, self.classify, self.positives = objective, classify, positives
        self.temperature, self.head_scale = float(temperature), float(head_scale)
        self.balance, self.head_weight = float(balance), float(head_weight)
        self.mixup, self.mixup_alpha = float(mixup), float(mixup_alpha)
        self.num_classes = num_real * max(len(self.views), 1)
        self.score_mode = score_mode
        self.stats = BinStats(n_mels)
        self.encoder = ResNetEncoder(n_mels, tuple(channels), blocks, emb_dim)
        if multires:
            self.spectrum_frontend = LogSpectrum(num_samples)
            self.spectrum_stats = BinStats(self.spectrum_frontend.n_bins)
            self.spectrum_encoder = SpectrumEncoder(tuple(spectrum_channels), emb_dim)
        else:
            self.spectrum_frontend = self.spectrum_stats = self.spectrum_encoder = None
        # only a member that uses its head has one: an unused parameter would break DDP's gradient sync
        self.head = None
        self.adacos = SubclusterAdaCos(self.num_classes, self.embed_dim, subclusters) if adacos else None
        if not adacos and head_weight > 0:
            self.head = nn.Parameter(torch.randn(self.num_classes, self.embed_dim) * self.embed_dim**-0.5)
        if score_mode == "mahalanobis":
            self.backend = MahalanobisBackend(per_domain=True, covariance="pooled", calibrate=True)
        else:
            self.backend = KnnBackend(
                k=k if score_mode == "knn" else 1,
                normalize=True,
                density=knn_density,
                calibrate=knn_calibrate,
            )
        log.info("b3: %s", self.describe(num_sections, num_attributes))

    def describe(self, num_sections: int, num_attributes: int | None) -> str:
        """The objective, its classes and inputs, in words (logged when the member is built)."""
        data = f"{num_sections} section(s), {num_attributes} attribute class(es)"
        views = ", ".join(self.views)
        num_real = self.num_classes // max(len(self.views), 1)
        if self.views and num_real == 1:
            classes = f"classify={self.classify} gives 1 class, so the classes are self-supervised: {views}"
        elif self.views:
            classes = f"{num_real} {self.classify} classes x self-supervised views {views}"
        else:
            classes = f"{self.classify} classes"
        if self.adacos is not None:
            subclusters = self.adacos.subclusters
            objective = f"sub-cluster AdaCos ({subclusters} sub-clusters per class, mixup p={self.mixup})"
        else:
            objective = f"supervised contrastive (positives: {self.positives}) + cosine classifier"
        inputs = "log-mel + full spectrum" if self.spectrum_encoder is not None else "log-mel"
        return f"{data}; {classes} ({self.num_classes} in all); objective {objective}; inputs {inputs}"

    # -- pieces -----------------------------------------------------------------------------------

    def spectrogram(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's log-mel in the front end's units, (B, n_mels, frames)."""
        return self._logmel(batch["wave"])

    def _logmel(self, wave: Tensor) -> Tensor:
        spec = self.frontend(wave)  # (B, T) -> (B, n_mels, frames)
        if spec.ndim != 3 or spec.shape[1] != self.n_mels:
            raise AsdError(
                f"b3: the frontend returned {tuple(spec.shape)}, expected (B, {self.n_mels}, frames); "
                "branches.b3.frontend must be a log-mel front end such as asd.features.LogMel"
            )
        return spec

    def _inputs(self, wave: Tensor) -> tuple[Tensor, Tensor | None]:
        """Log-mel (B, n_mels, frames) and, with the full-spectrum branch, log spectrum (B, n_bins, 1)."""
        mel = self._logmel(wave)
        if self.spectrum_frontend is None:
            return mel, None
        return mel, self.spectrum_frontend(wave)[:, :, None]  # (B, n_bins) -> (B, n_bins, 1)

    def _encode(self, mel: Tensor, spec: Tensor | None) -> Tensor:
        """Standardised inputs -> the embedding (B, embed_dim) float32."""
        z = self.encoder(self.stats.normalise(mel)).float()  # (B, emb_dim)
        if spec is None:
            return z
        zs = self.spectrum_encoder(self.spectrum_stats.normalise(spec)[:, :, 0]).float()  # (B, emb_dim)
        # unit halves: both branches weigh the same in every cosine (the raw concatenation let the
        # full-spectrum half dominate and scored worse on held-out synthetic data)
        return torch.cat([F.normalize(z, dim=1), F.normalize(zs, dim=1)], dim=1)  # (B, 2 emb_dim)

    @staticmethod
    def _labels(batch: dict[str, Tensor], kind: str) -> Tensor:
        """The batch's `kind` ids, (B,) long."""
        if kind not in batch:
            raise AsdError(f"b3: the batch has no '{kind}' ids; b3 trains on batches of asd.data.datamodule")
        return batch[kind].long()

    def check_ids(self, batch: dict[str, Tensor]) -> None:
        """The objective's class ids of the batch (with the views' classes) fit its classes."""
        kind = "attribute" if self.classify == "attribute" else "section"
        if kind not in batch or not batch[kind].numel():
            return
        ids = batch[kind].long()
        n = len(self.views) or 1
        low, high = int(ids.min()), int(ids.max())
        self._check_classes(torch.tensor([low * n if low >= 0 else low, high * n + n - 1]))

    def _check_classes(self, labels: Tensor) -> None:
        if not on_host(labels):  # checked on the batch's CPU copy (`check_ids`) instead
            return
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise AsdError(
                f"b3: '{self.classify}' ids range over [{int(labels.min())}, {int(labels.max())}] but the "
                f"objective has {self.num_classes} classes; build b3 with the data's num_sections / "
                "num_attributes (a checkpoint of another dataset does not fit)"
            )

    def _head_loss(self, z: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
        """Weighted cross-entropy of the cosine classifier; clips of unknown class (-1) are left out."""
        self._check_classes(labels)
        with torch.autocast(z.device.type, enabled=False):
            logits = self.head_scale * F.normalize(z.float(), dim=1) @ F.normalize(self.head.float(), dim=1).T
            ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")  # (B,)
            w = weight * (labels >= 0)
            return (w * ce).sum() / w.sum().clamp_min(1e-12)

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The objective's loss on the batch (and its self-supervised views), (section, domain)-balanced."""
        wave = batch["wave"]
        mel, spec = self._inputs(wave)
        if self.training:  # statistics of untransformed, unmixed clips only: those are what is scored
            self.stats.update(mel)
            if spec is not None:
                self.spectrum_stats.update(spec)
        section = self._labels(batch, "section")
        domain = self._labels(batch, "domain")
        by_attribute = self.positives == "attribute" if self.adacos is None else False
        attribute = self._labels(batch, "attribute") if by_attribute or self.classify == "attribute" else None
        weight = balance_weights(section, domain, self.balance)  # (B,)
        if self.views:
            n = len(self.views)
            wave, view = self_supervised_views(wave)  # (V B, T), (V B,)
            section = section.repeat(n) * n + view  # class (label, view), view-major rows
            if attribute is not None:
                attribute = attribute.repeat(n)
                attribute = torch.where(attribute >= 0, attribute * n + view, attribute)
            weight = weight.repeat(n)
            mel = None
        labels = attribute if self.classify == "attribute" and attribute is not None else section

        if self.adacos is not None:
            self._check_classes(labels)
            target = one_hot(labels, self.num_classes)  # (B', C)
            weight = weight * (labels >= 0)
            if self.training and self.mixup > 0:
                wave, target, weight = mixup(wave, target, weight, self.mixup, self.mixup_alpha)
                mel = None
            z = self._encode(*self._inputs(wave)) if mel is None else self._encode(mel, spec)
            return self.adacos(z, target, weight)

        z = self._encode(*self._inputs(wave)) if mel is None else self._encode(mel, spec)
        positive = positive_pairs(section, attribute if self.positives == "attribute" else None)
        total = supcon_loss(F.normalize(z, dim=1), positive, weight, self.temperature)
        if self.head is not None:
            total = total + self.head_weight * self._head_loss(z, labels, weight)
        return total

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """The encoders' embedding of the untransformed clip before L2 normalisation, (B, embed_dim)."""
        return self._encode(*self._inputs(batch["wave"]))

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """kNN banks, centres or Gaussian models per (section, source|target) of the normals' embeddings."""
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
        if self.score_mode == "mahalanobis":
            self.backend.fit(F.normalize(feats, dim=1), section, domain)
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
        """Distance to the section's training normals (kNN, centre or Gaussian), min over domains, (B,)."""
        if not self.backend.fitted:
            raise AsdError(
                "b3: score needs fit_backend to run first (on the training normals' backend_features), "
                "or a checkpoint whose backend was fitted"
            )
        z = self.embedding(batch)
        if self.score_mode == "mahalanobis":
            z = F.normalize(z, dim=1)
        return self.backend.score(z, self._labels(batch, "section"))
