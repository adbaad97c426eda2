"""What every ensemble member offers: pure `loss`/`embed`/`score`, and an optional reference backend.

A batch is a dict of tensors (see `asd.data.datamodule`):

    wave      (B, T) float32   raw audio at the configured sample rate
    machine   (B,)   long      machine-type class id
    section   (B,)   long      (machine, section) class id, unique across machines
    attribute (B,)   long      (machine, section, attributes) class id
    domain    (B,)   long      0 source, 1 target, 2 unknown
    is_target (B,)   bool
    is_normal (B,)   bool
    index     (B,)   long      row of the clip in its split's table

`loss`, `embed`, `score` and `backend_features` never log: the ensemble calls them on
nested members and does the logging, because a nested module's `self.log` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytorch_lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer

from asd.errors import AsdError

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]


def default_optimizer(params: Iterable[torch.nn.Parameter]) -> Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


#: the memory format of the input of b7's decoder (and of its skip connections' encoder features)
#: and of b6's mask predictor on the CPU (`conv_input`). Channels last by default: oneDNN's CPU
#: kernels for transposed convolutions and for a convolution down to 1 channel run faster in it
#: than in NCHW, and the outputs differ only in floating-point order (docs/results.md, "Work done
#: once per batch"). b6's decoders get channels-last input from its codebook lookup either way; the
#: encoders start from 1 channel, whose strides are the same in both formats, and were left as they
#: are, as was b3's ResNet (no measurable gain). Other devices keep their own layout: it was not
#: measured there. benchmarks/bench_frontend.py sets `torch.contiguous_format` here to time both.
CONV_MEMORY_FORMAT = torch.channels_last


def conv_input(x: Tensor) -> Tensor:
    """(B, C, H, W) `x` in `CONV_MEMORY_FORMAT` on the CPU (a copy only where its strides differ);
    elsewhere `x` as it is."""
    return x.contiguous(memory_format=CONV_MEMORY_FORMAT) if x.device.type == "cpu" else x


def on_host(ids: Tensor) -> bool:
    """Whether reading `ids`' values costs no device sync: members check ids in their own steps only then."""
    return ids.device.type == "cpu"


class Branch(L.LightningModule):
    """Base class of the members b1..b5 and the reference detector."""

    #: short name used in configs, metric keys and run folders (`b2`)
    name: str = ""
    #: True when `score` needs `fit_backend` to have run first
    needs_backend: bool = False
    #: width D of `embed` (0 when the member has no embedding); b5 is sized from b1-b3's
    embed_dim: int = 0
    #: True when the member draws heatmaps: `error_map` gives per-bin input/reconstruction/error
    has_error_map: bool = False
    #: where pretrained weights came from (b1: a hub id, a folder, or "scratch"); "" = trained here
    weights_source: str = ""

    def __init__(self, optimizer: OptimizerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer or default_optimizer

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Self-supervised training loss (scalar)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Clip embedding z, (B, D); (B, 0) when the member has none."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed()")

    def embedding(self, batch: dict[str, Tensor]) -> Tensor:
        """`embed(batch)`, or the one the ensemble already computed for this batch in eval mode
        (`z_<name>`, `Ensemble.with_flow_input`) when it would be the same: this member in eval mode
        and no gradients wanted (scoring). Members that score their embedding call this."""
        done = self.kept(batch)
        return done if done is not None else self.embed(batch)

    def kept(self, batch: dict[str, Tensor], suffix: str = "") -> Tensor | None:
        """The batch's `z_<name><suffix>` that `flow_outputs` kept, when it is what this member would
        compute now (eval mode, no gradients wanted); None otherwise."""
        done = batch.get(f"z_{self.name}{suffix}")
        return done if done is not None and not self.training and not torch.is_grad_enabled() else None

    def flow_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What `Ensemble.with_flow_input` adds to the batch for this member as one of the flow's
        sources (called in eval mode without gradients): `embed(batch)` as `z_<name>`, and anything
        else of the same pass that the member's scoring reads back (`kept`; keys `z_<name>_*`; b2
        keeps its encoder's latent, which its reconstruction starts from). They hold for the
        members as they are: score the batch before anything trains them."""
        return {f"z_{self.name}": self.embed(batch)}

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Clip anomaly score, (B,), higher = more anomalous."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def scores(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every score the member reports, each (B,), keyed by a column suffix.

        The default is the one `score` under the key "" (column `bN`); a member with several
        scores from one pass overrides this (the reference: `mse`, `mahalanobis`, giving columns
        `dcase_ae_mse`, `dcase_ae_mahalanobis`).
        """
        return {"": self.score(batch)}

    def error_map(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Input, reconstruction and squared error per bin, each (B, n_mels, frames); see `has_error_map`."""
        raise AsdError(f"{type(self).__name__} draws no error maps (has_error_map is False)")

    def draw(self, name: str, dm, out_dir: Path, n: int, device: torch.device) -> list[Path]:
        """The member's own pictures of up to `n` test clips (beside heatmaps), written to `out_dir`;
        none by default. `dm` is the run's data module; returns the files written."""
        return []

    @property
    def calibrated(self) -> bool:
        """Whether `score` is already a z-score: a backend calibrated on its banks' left-out scores."""
        return bool(self.needs_backend and getattr(getattr(self, "backend", None), "calibrate", False))

    def backend_state(self) -> dict[str, Tensor]:
        """The fitted reference state (`fit_backend`'s result), for the run's `backends.pt`.

        Members with `needs_backend` keep it in their `backend` submodule.
        """
        return self.backend.state_dict() if self.needs_backend else {}

    def load_backend_state(self, state: dict[str, Tensor]) -> None:
        if self.needs_backend:
            self.backend.load_state_dict(state)

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        """What `fit_backend` is fitted on, (B, F); the embedding unless a member needs otherwise."""
        return self.embed(batch)

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        """Fit the reference state `score` needs on training normals.

        Args:
            feats: `backend_features` of every held-in training normal, (N, F), gathered from all ranks.
            meta: the same clips' `section`, `domain`, `machine`, `attribute` ids, each (N,).
        """

    def check_ids(self, batch: dict[str, Tensor]) -> None:
        """Raise `AsdError` when the batch's class ids do not fit this member; nothing by default.

        It reads the ids' values, so the run calls it on the CPU copy of each batch (the data
        module's `on_before_batch_transfer`, `asd.run.predict.infer`'s `check`): on an accelerator
        the member's own steps skip it (`on_host`) and never wait for the device.
        """

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["wave"].shape[0])
        return loss

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
