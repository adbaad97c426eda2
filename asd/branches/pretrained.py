"""b1: Audio Spectrogram Transformer (`transformers.ASTModel`) on AST's Kaldi fbank, kNN scoring.

Weights (`weights`): a Hugging Face hub id (loaded with `ASTModel.from_pretrained`), a local
folder written by `save_pretrained`, or "scratch": a small AST initialised at random from the
size arguments and trained here. A hub id that cannot be loaded or a missing/invalid folder is
an AsdError that says how to supply the weights; there is never a silent fallback to random ones.
The source is logged at INFO and kept in `weights_source`.

Choices:
- Input length: a scratch model's `max_length` (fbank frames per window) follows the clip: the
  Kaldi frame count of `num_samples`, rounded up to the next whole patch step so that patches
  cover every frame (the few extra frames are the extractor's padding). Pre-trained weights keep
  their config's `max_length` (1024 frames, about 10.24 s, for AudioSet AST).
- Long clips: a clip longer than one window of `AstFbank.samples_per_window()` samples is cut
  into windows at 0, W, 2W, ... and a last window that ends at the clip's end, so it overlaps its
  neighbour instead of being padded; every window is then a full one, and the clip's embedding is
  the mean of its windows' embeddings. A clip no longer than one window is one window, padded by
  the extractor.
- Embedding z (`pooling`): "mean" (default) averages the final-layer patch tokens whose patch
  holds at least one real frame (patches over the extractor's padding are left out, which matters
  for short clips in a 1024-frame pre-trained window); "cls" averages the [CLS] and distillation
  tokens, AST's own pooled output. Mean pooling keeps the time-frequency detail that anomalies
  live in, where the [CLS] tokens of an AudioSet model summarise coarse sound classes.
- Modes: "finetune" trains the AST with an angular-margin classifier (`head`: ArcFace additive
  angular margin with a fixed scale, or AdaCos with its adaptive scale and no margin) over
  attribute classes ((machine, section, attribute string) of training clips) or sections
  (`labels`; "auto" takes attributes when the data has more of them than sections). Clips whose
  attribute is -1 (a combination not seen in training) are left out of an attribute loss:
  falling back to their section id would mix two label spaces.
  "frozen" keeps the AST fixed (no gradients, always in eval mode) and builds no head: the
  member has no trainable parameter, `loss` returns a constant zero that needs no gradient, and
  `configure_optimizers` refuses, so the ensemble must treat it as frozen.
- Score: `asd.scoring.KnnBackend` on L2-normalised z (cosine distance), one bank per (section,
  source|target), the smaller of the two k-NN mean distances; fitted by `fit_backend`.

One file: one member per file (STYLE.md); loading weights (hub, folder, scratch) and the
angular-margin heads are b1's alone.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import ASTConfig, ASTModel

from asd.branches.auxiliary import VIEWS, self_supervised_views
from asd.branches.base import Branch, OptimizerFactory, on_host
from asd.data.windows import window_starts as cover
from asd.errors import AsdError
from asd.features import AstFbank
from asd.scoring import KnnBackend

log = logging.getLogger(__name__)

AST_MODEL_TYPE = "audio-spectrogram-transformer"
#: the AudioSet-trained AST the full-size configuration uses
DEFAULT_HUB_ID = "MIT/ast-finetuned-audioset-10-10-0.4593"
#: bounds of AdaCos's adaptive scale
SCALE_RANGE = (1.0, 100.0)
#: the [CLS] and distillation tokens come before the patch tokens
NUM_SPECIAL_TOKENS = 2


def _weights_help(hub_id: str = DEFAULT_HUB_ID) -> str:
    return (
        f"to use pre-trained AST weights, download them on a connected machine with `huggingface-cli "
        f"download {hub_id} --local-dir DIR`, copy DIR here and set branches.b1.weights=DIR; or train a "
        "small AST here with branches.b1.weights=scratch"
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _looks_like_path(weights: str) -> bool:
    """True for strings that cannot be a hub id (`name` or `org/name`)."""
    return (
        weights.startswith((".", "/", "~", "\\"))
        or weights.count("/") > 1
        or "\\" in weights
        or Path(weights).suffix in (".json", ".safetensors", ".bin", ".pt", ".ckpt")
    )


def load_ast(weights: str, config: ASTConfig | None = None) -> tuple[ASTModel, str]:
    """The AST and where its weights came from: `config` at random for "scratch", else a folder or hub id."""
    if weights == "scratch":
        return ASTModel(config), "scratch"
    path = Path(weights).expanduser()
    if path.is_dir():
        return _load_folder(path), f"folder:{path.resolve()}"
    if path.exists():
        raise AsdError(
            f"branches.b1.weights={weights}: is a file, not a folder written by save_pretrained "
            f"(config.json plus model.safetensors); {_weights_help()}"
        )
    if _looks_like_path(weights):
        raise AsdError(f"branches.b1.weights={weights}: no such folder; {_weights_help()}")
    try:
        model, info = ASTModel.from_pretrained(weights, output_loading_info=True)
    except Exception as e:  # hub, network and file errors come in many types
        raise AsdError(
            f"branches.b1.weights={weights}: no local folder of that name, and the hub id could not be "
            f"loaded ({_first_line(e)}); {_weights_help(weights)}"
        ) from e
    _check_complete(info, weights)
    return model.float(), f"hub:{weights}"


def _load_folder(path: Path) -> ASTModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AsdError(
            f"branches.b1.weights={path}: the folder has no config.json, so it was not written by "
            f"save_pretrained; {_weights_help()}"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise AsdError(f"branches.b1.weights={path}: config.json is not a readable JSON object ({e})") from e
    if model_type != AST_MODEL_TYPE:
        raise AsdError(
            f"branches.b1.weights={path}: config.json is of model_type={model_type!r}, not "
            f"{AST_MODEL_TYPE!r}; give the folder of an Audio Spectrogram Transformer"
        )
    try:
        model, info = ASTModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as e:  # missing weight files, shape mismatches, corrupt files
        raise AsdError(
            f"branches.b1.weights={path}: cannot load the AST weights ({_first_line(e)}); {_weights_help()}"
        ) from e
    _check_complete(info, str(path))
    return model.float()


def _check_complete(info: dict, weights: str) -> None:
    """A checkpoint that leaves AST weights uninitialised would silently be partly random."""
    missing = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
    if missing:
        names = ", ".join(str(k) for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise AsdError(
            f"branches.b1.weights={weights}: {len(missing)} AST weights are missing from the checkpoint or "
            f"of another shape ({names}); not a complete AST checkpoint of its config; {_weights_help()}"
        )


def window_starts(num_samples: int, window: int) -> list[int]:
    """First sample of each window: 0, W, 2W, ..., and a last one ending at the clip's end."""
    return cover(num_samples, window, window)


class AngularHead(nn.Module):
    """Cosine classifier trained with an ArcFace margin (fixed scale) or an AdaCos adaptive scale.

    ArcFace (Deng et al. 2019): the target logit is s * cos(theta_y + m). Past theta_y = pi - m,
    cos(theta_y + m) would rise again, so there the target cosine continues as cos(theta_y) - m sin(m),
    which keeps the logit decreasing in theta_y. AdaCos (Zhang et al. 2019): no margin; the scale is
    re-estimated at every training step from the batch as log(B_avg) / cos(min(pi/4, theta_med)),
    with B_avg the mean over clips of sum over non-target classes of exp(s cos theta_j) and theta_med
    the median target angle, starting from sqrt(2) log(C - 1). The scale is a buffer, so it moves only
    in train mode and a checkpoint restores it; it is kept in SCALE_RANGE, whose floor keeps it positive
    (log B_avg < 0 when every non-target cosine is negative) and whose ceiling stops a runaway when
    classes collapse (non-target cosines above cos(pi/4) make the update expand).
    """

    def __init__(
        self, dim: int, num_classes: int, kind: str = "arcface", scale: float = 30.0, margin: float = 0.5
    ):
        super().__init__()
        self.kind, self.num_classes, self.margin = kind, num_classes, float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        start = math.sqrt(2.0) * math.log(num_classes - 1) if kind == "adacos" else float(scale)
        self.register_buffer("scale", torch.tensor(start, dtype=torch.float32))

    def cosine(self, z: Tensor) -> Tensor:
        """Cosine of each clip to each class centre, (B, D) -> (B, C) float32."""
        return F.normalize(z.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the clips whose label is >= 0; (B, D), (B,) -> scalar."""
        with torch.autocast(device_type=z.device.type, enabled=False):  # angles need float32
            cos = self.cosine(z)  # (B, C)
            valid = labels >= 0  # (B,)
            y = labels.clamp_min(0)[:, None]  # (B, 1); ignored rows are masked out below
            target = cos.gather(1, y)  # (B, 1)
            if self.kind == "arcface":
                m = self.margin
                sin = (1.0 - target * target).clamp_min(1e-7).sqrt()
                shifted = target * math.cos(m) - sin * math.sin(m)  # cos(theta_y + m)
                target = torch.where(target > math.cos(math.pi - m), shifted, target - m * math.sin(m))
            elif self.training:
                self._update_scale(cos, y, valid)
            logits = cos.scatter(1, y, target) * self.scale  # (B, C)
            per_clip = F.cross_entropy(logits, y[:, 0], reduction="none")  # (B,)
            # a batch without any labelled clip still gives every weight a (zero) gradient, as DDP needs
            return (per_clip * valid).sum() / valid.sum().clamp_min(1)

    @torch.no_grad()
    def _update_scale(self, cos: Tensor, y: Tensor, valid: Tensor) -> None:
        if not bool(valid.any()):
            return
        cos, y = cos[valid], y[valid]  # (n, C), (n, 1)
        # log B_avg by log-sum-exp, so a large scale cannot overflow exp()
        logits = (self.scale * cos).scatter(1, y, float("-inf"))  # (n, C): non-target classes only
        log_b_avg = torch.logsumexp(logits.flatten(), dim=0) - math.log(cos.shape[0])
        theta_med = torch.acos(cos.gather(1, y).clamp(-1.0, 1.0)).median()
        new = log_b_avg / torch.cos(theta_med.clamp_max(math.pi / 4))
        self.scale.copy_(new.clamp(SCALE_RANGE[0], SCALE_RANGE[1]))

    def extra_repr(self) -> str:
        margin = f", margin={self.margin}" if self.kind == "arcface" else ""
        return f"kind={self.kind}, classes={self.num_classes}{margin}"


@dataclass(frozen=True)
class ScratchAST:
    """The sizes of a small AST initialised at random and trained here (`weights: scratch`)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    patch_size: int = 16
    frequency_stride: int = 16
    time_stride: int = 16
    num_mel_bins: int = 128
    dropout: float = 0.0

    def config(self, num_samples: int | None, sample_rate: int) -> ASTConfig:
        """The AST config whose `max_length` covers clips of `num_samples` samples."""
        if num_samples is None:
            raise AsdError(
                "b1: weights=scratch sizes the AST from the clip length, but num_samples is unknown; set "
                "data.audio.duration (clips of a fixed length) or use pre-trained weights"
            )
        if self.hidden_size % self.num_heads:
            raise AsdError(
                f"b1: hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads} "
                "(branches.b1.hidden_size, e.g. 64 with num_heads=4)"
            )
        patch = self.patch_size
        if patch > self.num_mel_bins:
            raise AsdError(
                f"b1: patch_size={patch} is larger than num_mel_bins={self.num_mel_bins} "
                "(branches.b1.patch_size)"
            )
        frames = AstFbank(sample_rate=sample_rate, num_mel_bins=self.num_mel_bins).num_frames(num_samples)
        if frames < patch:
            raise AsdError(
                f"b1: clips of {num_samples} samples give {frames} fbank frames, fewer than patch_size="
                f"{patch}; use longer clips (data.audio.duration) or a smaller branches.b1.patch_size"
            )
        stride = self.time_stride
        max_length = patch + math.ceil((frames - patch) / stride) * stride  # patches cover every frame
        return ASTConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=float(self.dropout),
            attention_probs_dropout_prob=float(self.dropout),
            patch_size=patch,
            frequency_stride=self.frequency_stride,
            time_stride=stride,
            num_mel_bins=self.num_mel_bins,
            max_length=max_length,
        )


class PretrainedASTBranch(Branch):
    """b1: Audio Spectrogram Transformer, frozen or fine-tuned with an angular-margin head; kNN score."""

    name = "b1"
    needs_backend = True

    def __init__(
        self,
        num_samples: int | None = None,
        num_sections: int | None = None,
        num_attributes: int | None = None,
        sample_rate: int = 16000,
        weights: str = "scratch",
        mode: str = "finetune",
        pooling: str = "mean",
        labels: str = "auto",
        head: str = "arcface",
        scale: float = 30.0,
        margin: float = 0.5,
        k: int = 1,
        knn_calibrate: bool = False,
        head_lr: float | None = None,
        optimizer: OptimizerFactory | None = None,
        **scratch: Any,
    ):
        """Load or build the AST and, when fine-tuning, its classification head.

        Args:
            num_samples: clip length in samples; required for "scratch" (it sizes `max_length`), and when
                given every wave must have exactly this length.
            num_sections, num_attributes: class counts of the training data, which size the head
                ("finetune" only; see `labels`).
            weights: "scratch", a local folder written by `save_pretrained`, or a hub id.
            mode: "finetune" (train the AST with the head) or "frozen" (fixed AST, nothing to train).
            pooling: "mean" of the patch tokens or "cls" (mean of the [CLS] and distillation tokens).
            labels: what the head classifies: "attribute" classes, "section" classes, or "auto" =
                attributes when there are more of them than sections, else sections.
            head: "arcface" (fixed `scale`, additive angular `margin`) or "adacos" (adaptive scale).
            k: neighbours of the kNN score.
            knn_calibrate: standardise each kNN bank's distances by its clips' left-out ones
                (`KnnBackend(calibrate=)`), so source and target banks share one scale.
            head_lr: learning rate of the head when it should differ from the AST's (a pre-trained AST
                is fine-tuned slowly, a fresh head learns fast); None uses the optimizer's.
            scratch: `ScratchAST` sizes (hidden_size, num_layers, ...; the config's flat keys) of a
                "scratch" AST; pre-trained weights bring their own config, and these are ignored.
        """
        super().__init__(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        self.mode, self.pooling, self.head_lr = mode, pooling, head_lr
        self.num_samples = num_samples
        sizes = ScratchAST(**scratch)  # built for pre-trained weights too, so a misspelt size fails
        config = sizes.config(num_samples, sample_rate) if weights == "scratch" else None
        self.encoder, self.weights_source = load_ast(weights, config)
        config = self.encoder.config
        self._log_source(weights, mode)
        self.frontend = AstFbank(
            sample_rate=sample_rate, num_mel_bins=config.num_mel_bins, max_length=config.max_length
        )
        self.window = self.frontend.samples_per_window()
        # the patch grid as ASTEmbeddings computes it (square patches)
        self.time_stride = config.time_stride
        self.grid_freq = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
        self.grid_time = (config.max_length - config.patch_size) // config.time_stride + 1
        self.embed_dim = int(config.hidden_size)

        self.head: AngularHead | None = None
        self.use_attributes = False
        #: one class in the data (first-shot: one section, no attributes): classify transformed views
        self.self_supervised = False
        if mode == "finetune":
            if num_sections is None:
                raise AsdError(
                    "b1: mode=finetune needs num_sections (the pipeline passes it); or use "
                    "branches.b1.mode=frozen"
                )
            if labels == "attribute" and num_attributes is None:
                raise AsdError(
                    "b1: labels=attribute needs num_attributes (the pipeline passes it); or use "
                    "branches.b1.labels=section"
                )
            more = num_attributes is not None and num_attributes > num_sections
            self.use_attributes = labels == "attribute" or (labels == "auto" and more)
            classes = num_attributes if self.use_attributes else num_sections
            label = "attribute" if self.use_attributes else "section"
            if classes < 2:
                # nothing to separate: the clip and its transformed copies become the classes
                self.self_supervised, classes, label = True, len(VIEWS), "self-supervised view"
                log.info(
                    "b1: the training data has one %s class: fine-tuning on self-supervised classes "
                    "instead (%s of each clip)",
                    "attribute" if self.use_attributes else "section",
                    ", ".join(VIEWS),
                )
            if head == "adacos" and classes < 3:
                raise AsdError(
                    f"b1: head=adacos needs at least 3 classes (its scale starts at sqrt(2) log(C - 1)) but "
                    f"there are {classes} {label}s; set branches.b1.head=arcface"
                )
            self.head = AngularHead(self.embed_dim, classes, kind=head, scale=scale, margin=margin)
            log.info("b1: %s head over %d %s classes", head, classes, label)
        else:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self.backend = KnnBackend(k=k, normalize=True, calibrate=knn_calibrate)

    def _log_source(self, weights: str, mode: str) -> None:
        if weights == "scratch":
            log.info("b1: AST weights from scratch (random init, trained here)")
            if mode == "frozen":
                log.warning("b1: mode=frozen with weights=scratch scores with a random, untrained AST")
            return
        config = self.encoder.config
        kind, where = self.weights_source.split(":", 1)
        trained = "fine-tuned here" if mode == "finetune" else "frozen"
        log.info(
            "b1: AST weights from %s %s (%s)", "hub id" if kind == "hub" else "local folder", where, trained
        )
        log.info(
            "b1: sizes come from the checkpoint (hidden %d, %d layers, max_length %d); the scratch size "
            "arguments are ignored",
            config.hidden_size,
            config.num_hidden_layers,
            config.max_length,
        )

    # -- pieces -----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> PretrainedASTBranch:
        """Switch modes; a frozen AST stays in eval mode."""
        super().train(mode)
        if self.mode == "frozen":
            self.encoder.eval()  # a frozen AST never runs dropout
        return self

    def _wave(self, batch: dict[str, Tensor]) -> Tensor:
        wave = batch["wave"]
        if wave.ndim != 2 or (self.num_samples is not None and wave.shape[1] != self.num_samples):
            raise AsdError(
                f"b1 was built for clips of {self.num_samples} samples but got a wave batch of shape "
                f"{tuple(wave.shape)}; the clip length must equal data.audio.duration used when the model "
                "was built (every clip is padded or cropped to it)"
            )
        return wave

    def _patch_mask(self, window_samples: int) -> Tensor:
        """Which patch tokens hold at least one real (unpadded) frame, (grid_freq * grid_time,) bool."""
        frames = self.frontend.num_frames(window_samples)
        real = torch.arange(self.grid_time) * self.time_stride < frames  # (grid_time,)
        return real.repeat(self.grid_freq)  # tokens are frequency-major: f * grid_time + t

    def encode(self, wave: Tensor) -> Tensor:
        """Pooled AST embedding averaged over the clip's windows, (B, T) -> (B, hidden) float32."""
        b, t = wave.shape
        starts = window_starts(t, self.window)
        size = min(t, self.window)
        windows = torch.stack([wave[:, s : s + size] for s in starts], dim=1)  # (B, n, size)
        fbank = self.frontend(windows.reshape(b * len(starts), size))  # (B*n, max_length, mel)
        hidden = self.encoder(input_values=fbank).last_hidden_state  # (B*n, 2 + P, hidden)
        if self.pooling == "cls":
            pooled = hidden[:, :NUM_SPECIAL_TOKENS].float().mean(dim=1)  # (B*n, hidden)
        else:
            mask = self._patch_mask(size).to(hidden.device)  # (P,)
            pooled = hidden[:, NUM_SPECIAL_TOKENS:][:, mask].float().mean(dim=1)  # (B*n, hidden)
        return pooled.view(b, len(starts), -1).mean(dim=1)  # (B, n, hidden) -> (B, hidden)

    def _labels(self, batch: dict[str, Tensor]) -> Tensor:
        key = "attribute" if self.use_attributes else "section"
        if key not in batch:
            raise AsdError(f"b1: the batch has no {key!r} ids, which the fine-tuning head classifies")
        labels = batch[key].long()
        if on_host(labels):
            self.check_ids(batch)
        return labels

    def check_ids(self, batch: dict[str, Tensor]) -> None:
        key = "attribute" if self.use_attributes else "section"
        if self.head is None or key not in batch:
            return
        top = int(batch[key].max()) if batch[key].numel() else -1
        if top >= self.head.num_classes:
            raise AsdError(
                f"b1: {key} id {top} is outside the head's {self.head.num_classes} classes; the member was "
                "built for another dataset (its num_sections/num_attributes) - retrain it on this data"
            )

    # -- the member contract ----------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Angular-margin cross-entropy over attribute (or section) classes; zero when frozen."""
        wave = self._wave(batch)
        if self.head is None:
            return torch.zeros((), device=wave.device)
        if self.self_supervised:
            views, ids = self_supervised_views(wave)  # (V * B, T), (V * B,)
            return self.head(self.encode(views), ids)
        return self.head(self.encode(wave), self._labels(batch))

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Pooled AST embedding z, (B, hidden)."""
        return self.encode(self._wave(batch))

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """Build the kNN banks (per section, source and target) from training normals' embeddings."""
        missing = [key for key in ("section", "domain") if key not in meta]
        if missing:
            raise AsdError(f"b1.fit_backend: `meta` lacks {missing}; pass each clip's section and domain ids")
        self.backend.fit(feats.detach().float(), meta["section"], meta["domain"])

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Cosine k-NN distance to the training normals of the clip's section, min over domains, (B,)."""
        if not self.backend.fitted:
            raise AsdError(
                "b1: score needs fit_backend to run first (on the training normals' embeddings), or a "
                "checkpoint whose kNN banks were fitted"
            )
        return self.backend.score(self.embedding(batch), batch["section"])

    def configure_optimizers(self) -> Optimizer:
        if self.head is None:
            raise AsdError(
                "b1: mode=frozen has no trainable parameters; freeze it (freeze=b1) or use "
                "branches.b1.mode=finetune"
            )
        if self.head_lr is None:
            return super().configure_optimizers()
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        return self.optimizer_factory(
            [{"params": encoder}, {"params": list(self.head.parameters()), "lr": self.head_lr}]
        )
