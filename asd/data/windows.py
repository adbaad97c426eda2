"""Windows: what the members see of a clip when `data.audio.window` is set.

Training budgets are in optimizer steps over random crops (docs/architecture.md, "Training
budget"), so a machine with 10 clips of 10 s and one with 10,000 both train for the steps the
budget gives them, not for a number of passes over whole clips:

- Training: each epoch draws `batches x batch_size` crops of `window` samples, each from a clip
  and at a start drawn uniformly (with replacement). The draws come from the training loader's
  generator, so a resumed run draws exactly what the uninterrupted one would have.
- Validation and scoring: every clip is cut into windows every `hop` samples, the last ending
  at the clip's end (so no window is padded); a clip's score, and each of its other columns, is
  the mean over its windows. Scoring backends (kNN banks, Mahalanobis models) are fitted on the
  windows of the training clips, each window one entry, because members score windows.

Members are built for windows of exactly `window` samples (the `num_samples` the builder passes),
so nothing else in a member changes. Without a window, everything stays per whole clip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from asd.data.audio import AudioConfig
from asd.errors import AsdError
from asd.features import FEATURE_PREFIX


def with_wave(item: dict[str, torch.Tensor], wave: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of a batch item with another wave, and without the cached features of the old one
    (`FEATURE_PREFIX` keys): whatever changes a clip's wave (crops, pseudo-anomalies) goes through here."""
    out = {k: v for k, v in item.items() if not k.startswith(FEATURE_PREFIX)}
    out["wave"] = wave
    return out


def window_starts(length: int, size: int | None, hop: int | None) -> list[int]:
    """Starts of `size`-sample windows every `hop` that cover `length` samples; the last ends at the end."""
    if size is None or hop is None or length <= size:
        return [0]
    starts = list(range(0, length - size + 1, hop))
    return starts if starts[-1] == length - size else [*starts, length - size]


@dataclass(frozen=True)
class Windowing:
    """Windows of `size` samples every `hop` samples, over clips of `clip` samples.

    `align`: random training crops start at multiples of it (image patches: the patch's length).
    """

    size: int
    hop: int
    clip: int
    align: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.clip:
            raise AsdError(
                f"data.audio.window is {self.size} samples but clips have {self.clip}: the window must be "
                "positive and no longer than data.audio.duration"
            )
        if not 0 < self.hop <= self.size:
            raise AsdError(
                f"data.audio.window_hop is {self.hop} samples: expected a step in (0, window]; "
                "null steps by the whole window"
            )

    @property
    def starts(self) -> list[int]:
        """Where each clip's scoring windows begin (the same for every clip: clips share one length)."""
        return window_starts(self.clip, self.size, self.hop)

    @property
    def per_clip(self) -> int:
        return len(self.starts)


def windowing_of(audio: AudioConfig) -> Windowing | None:
    """The run's windowing from its `AudioConfig` (validated there), None when members see whole clips."""
    if audio.window is None:
        return None
    rate = audio.sample_rate
    hop = audio.window_hop or audio.window
    return Windowing(
        size=round(audio.window * rate), hop=round(hop * rate), clip=round(audio.duration * rate)
    )


class ClipWindows(Dataset):
    """Every scoring window of every clip of a dataset of batch dicts, in clip order.

    Item `j` is window `j % per_clip` of clip `j // per_clip`, with that clip's labels and
    `index = j`; `mean_over_windows` folds per-window rows back into per-clip ones. The last clip
    read is kept, so a dataset that builds its items (pseudo-anomalies) builds each clip once.
    """

    def __init__(self, dataset: Dataset, windowing: Windowing):
        self.dataset, self.windowing = dataset, windowing
        self.starts = windowing.starts
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.dataset) * len(self.starts)  # type: ignore[arg-type]

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        clip, w = divmod(j, len(self.starts))
        if self._last is None or self._last[0] != clip:
            self._last = (clip, self.dataset[clip])
        item = dict(self._last[1])
        wave = item["wave"]
        if wave.shape[-1] != self.windowing.clip:
            raise AsdError(
                f"clip {clip} has {wave.shape[-1]} samples, not the run's {self.windowing.clip}: windows are "
                "cut from clips of data.audio.duration"
            )
        start = self.starts[w]
        item = with_wave(item, wave[..., start : start + self.windowing.size])
        item["index"] = torch.tensor(j, dtype=torch.long)
        return item


def mean_over_windows(rows: dict[str, np.ndarray], per_clip: int) -> dict[str, np.ndarray]:
    """Per-window rows (clip-major, `per_clip` each) -> per-clip means; `index` becomes the clip's row."""
    out: dict[str, np.ndarray] = {}
    for key, value in rows.items():
        if key == "index":
            out[key] = value[::per_clip] // per_clip
            continue
        folded = value.reshape(-1, per_clip, *value.shape[1:])  # (N*W, ...) -> (N, W, ...)
        out[key] = folded.mean(axis=1)
    return out


class RandomCrops(Dataset):
    """Batch dicts addressed by (clip, start): the clip's labels and `size` samples from `start`."""

    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        clip, start = key
        item = self.dataset[clip]
        return with_wave(item, item["wave"][..., start : start + self.size])


class RandomCropSampler(Sampler[tuple[int, int]]):
    """`draws` (clip, start) pairs per epoch, clip and start uniform, from the loader's generator."""

    def __init__(
        self, clips: int, clip_samples: int, size: int, draws: int, generator: torch.Generator, align: int = 1
    ):
        if clips < 1:
            raise AsdError("no training clips to crop from")
        self.clips, self.draws, self.generator, self.align = clips, draws, generator, align
        self.positions = (clip_samples - size) // align + 1  # starts 0, align, 2 align, ...

    def __len__(self) -> int:
        return self.draws

    def __iter__(self) -> Iterator[tuple[int, int]]:
        clips = torch.randint(self.clips, (self.draws,), generator=self.generator)
        starts = torch.randint(self.positions, (self.draws,), generator=self.generator) * self.align
        yield from zip(clips.tolist(), starts.tolist(), strict=True)


class FirstWindows(Dataset):
    """Item i: clip i's first scoring window (pictures of what a member saw of a clip)."""

    def __init__(self, dataset: Dataset, windowing: Windowing):
        self.windows = ClipWindows(dataset, windowing)

    def __len__(self) -> int:
        return len(self.windows.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.windows[i * len(self.windows.starts)]
        item["index"] = torch.tensor(i, dtype=torch.long)
        return item


def member_view(dataset: Dataset, windowing: Windowing | None) -> Dataset:
    """The dataset as members see its clips: unchanged, or each clip's first window."""
    return dataset if windowing is None else FirstWindows(dataset, windowing)
