"""`AsdDataModule`: a dataset folder (or the built-in synthetic data) as dict batches.

Splits:
    fit   training normals the members learn from
    val   held-out training normals, per (machine, section, domain), for score normalisation
          and decision thresholds; never trained on (empty when the run cross-fits: `merge_holdout`)
    test  every test clip, none dropped

With `data.audio.window` set, the training loader yields random crops of that length
(`batches_per_epoch` batches an epoch, drawn with replacement) and the validation loader every
window of each held-out clip (`asd.data.windows`).

One file: the data module, the split datasets it builds and the hold-out and label rules they
share are one contract (which clip lands in which split, with which ids); the picture data module
(`asd.data.images`) reuses all of it through `index`/`_load`/`describe`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from asd.data.audio import SKIP_HINT, AudioConfig, AudioError, audio_config, length_changes
from asd.data.cache import AudioCache, FeatureCache, NoRoom, RowReader
from asd.data.index import index_dataset
from asd.data.synthetic import SyntheticConfig, ensure_synthetic
from asd.data.table import DOMAIN_IDS, Clip, ClipTable
from asd.data.windows import ClipWindows, RandomCrops, RandomCropSampler, Windowing, windowing_of
from asd.errors import AsdError
from asd.features import FEATURE_PREFIX
from asd.paths import cache_root

log = logging.getLogger(__name__)

SPLITS = ("fit", "val", "test")


class WaveStore:
    """Rows of several (memory-mapped) wave arrays addressed by one index; picklable for workers.

    Rows of a cache file are read with `pread` (`RowReader`), not through its map: an epoch over
    thousands of clips leaves them in the kernel's page cache, not in the process's resident
    memory. The file is opened with the store, right after its map, so a later run that deletes
    it (`AudioCache._remove_stale`) leaves both readable; where it cannot be opened the rows are
    read through the map. `pread=False` always reads through the map (for comparisons:
    `benchmarks/bench_data.py`).
    """

    def __init__(self, parts: Sequence[np.ndarray], pread: bool = True):
        self._files = [getattr(p, "filename", None) for p in parts]
        self._parts: list[np.ndarray] = list(parts)
        self.pread = pread
        self._open_readers()
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])

    def _open_readers(self) -> None:
        self._readers: list[RowReader | None] = []
        for part in self._parts:
            reader = None
            if self.pread and RowReader.fits(part):
                try:
                    reader = RowReader(part)
                except OSError as e:  # gone or unreadable since it was mapped: the map still reads it
                    log.warning("%s: reading its rows through the memory map (%s)", part.filename, e)
            self._readers.append(reader)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def parts(self) -> list[Any]:
        return list(self._parts)

    def __getitem__(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        j = int(i - self._offsets[part])
        reader = self._readers[part]
        if reader is not None:
            return reader.read(j)
        return np.array(self._parts[part][j], dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen memory maps by file name instead of receiving a pickled copy of the data.
        state = self.__dict__.copy()
        state["_parts"] = [None if f else p for f, p in zip(self._files, self._parts, strict=True)]
        del state["_readers"]  # each process opens its own files
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._parts = [
            np.load(f, mmap_mode="r") if f else p for f, p in zip(self._files, self._parts, strict=True)
        ]
        self._open_readers()


class WaveRows:
    """Some rows of a wave store, read lazily (a part of a WaveStore; picklable for workers)."""

    def __init__(self, store: Any, rows: Sequence[int]):
        self.store, self.rows = store, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store[self.rows[i]]


class ClipDataset(Dataset):
    """One split: waves plus the label tensors of every clip, and cached features of the waves.

    `features` maps a batch key (`asd.features.feature_key`) to a store of one front end's features
    of each clip, in row order (`AsdDataModule.cache_features`); each item carries them beside its wave.
    """

    def __init__(
        self,
        table: ClipTable,
        waves: WaveStore,
        labels: dict[str, torch.Tensor],
        features: dict[str, WaveStore] | None = None,
    ):
        if len(table) != len(waves):
            raise AsdError(f"internal: {len(table)} clips but {len(waves)} waves")
        self.table, self.waves, self.labels = table, waves, labels
        self.features: dict[str, WaveStore] = {}
        for key, store in (features or {}).items():
            self.add_features(key, store)

    def add_features(self, key: str, store: WaveStore) -> None:
        if not key.startswith(FEATURE_PREFIX) or len(store) != len(self.table):
            raise AsdError(f"internal: features {key!r} of {len(store)} clips for {len(self.table)} clips")
        self.features[key] = store

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: v[i] for k, v in self.labels.items()}
        item["wave"] = torch.from_numpy(self.waves[i])
        for key, store in self.features.items():
            item[key] = torch.from_numpy(store[i])
        return item


def join_rows(parts: Sequence[tuple[ClipDataset, Sequence[int]]]) -> ClipDataset:
    """One ClipDataset of the rows `rows` of each dataset in turn, `index` 0..len-1; the cached
    features every part with rows has are kept (read lazily, like the waves)."""
    parts = [(d, [int(r) for r in rows]) for d, rows in parts]
    table = ClipTable([d.table[i] for d, rows in parts for i in rows])
    waves = WaveStore([WaveRows(d.waves, rows) for d, rows in parts])
    labels = {k: torch.cat([d.labels[k][rows] for d, rows in parts]) for k in parts[0][0].labels}
    labels["index"] = torch.arange(len(table), dtype=torch.long)
    with_rows = [(d, rows) for d, rows in parts if rows]
    keys = set.intersection(*(set(d.features) for d, _ in with_rows)) if with_rows else set()
    features = {k: WaveStore([WaveRows(d.features[k], rows) for d, rows in with_rows]) for k in sorted(keys)}
    return ClipDataset(table, waves, labels, features)


def feature_store(waves: WaveStore, cache: FeatureCache) -> WaveStore:
    """The cached features of every row of `waves`, addressed like it (parts of audio cache files)."""
    parts: list[Any] = []
    for part in waves.parts:
        if isinstance(part, WaveRows):
            if not isinstance(part.store, WaveStore):
                raise AsdError(f"internal: no feature cache for rows of a {type(part.store).__name__}")
            parts.append(WaveRows(feature_store(part.store, cache), part.rows))
        elif len(part) == 0:
            fe = cache.frontend
            parts.append(np.zeros((0, fe.n_mels, fe.num_frames(part.shape[-1])), np.float32))
        else:
            parts.append(cache.load(part))
    return WaveStore(parts)


class AsdDataModule(L.LightningDataModule):
    """Index, decode (through the cache), split and batch a dataset.

    Clips are cut or padded to `audio.duration`; each split of each machine where that changed
    a clip says so once, with counts. The cache names hold the dataset folder's hash, so two
    datasets with machines of one name keep a cache each.

    Args:
        root: dataset folder; None uses the built-in synthetic dataset (generated once).
        year: DCASE year (2020..2025) when the folder layout alone is ambiguous.
        machines: restrict to these machine types.
        synthetic: `SyntheticConfig` fields for the built-in dataset.
        audio: `AudioConfig` fields (sample_rate, channel, duration, ...).
        val_fraction: share of each (machine, section, domain) group's training normals held out.
        mimii_train_normals: MIMII only: normals per (machine, id) used for training.
        on_bad_file: "error" stops at the first unreadable training file; "skip" leaves
            it out and lists it in `skipped`. Test clips are never skipped.
        batches_per_epoch: with `audio.window`, the training batches of random crops one epoch
            draws; None draws one crop per training clip.
        name: what the dataset is called in run folders and summaries.
        pin_memory: loaders return page-locked batches (the build sets it when training on a GPU).
        feature_cache: keep the members' log-mels of every clip in a memory-mapped cache beside the
            audio cache, so no batch recomputes them (`cache_features`; whole clips only).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        year: int | None = None,
        machines: Sequence[str] | None = None,
        synthetic: dict[str, Any] | SyntheticConfig | None = None,
        audio: dict[str, Any] | AudioConfig | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        mimii_train_normals: int | None = None,
        on_bad_file: str = "error",
        batches_per_epoch: int | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        name: str = "data",
        pin_memory: bool = False,
        feature_cache: bool = True,
    ):
        super().__init__()
        #: keep the members' log-mels of every clip beside the audio cache (`cache_features`)
        self.feature_cache = feature_cache
        self.pin_memory = pin_memory  # page-locked batches: faster host-to-GPU copies (set by the build)
        #: sees each training/validation batch on the CPU before it moves (`Ensemble.check_ids`, by the run)
        self.check_batch: Callable[[dict[str, torch.Tensor]], None] | None = None
        self.name = name
        self.root = Path(root).expanduser() if root else None
        self.year = year
        self.machines = list(machines) if machines else None
        if isinstance(synthetic, SyntheticConfig):
            self.synthetic = synthetic
        else:
            self.synthetic = SyntheticConfig(**(synthetic or {}))
        if isinstance(audio, AudioConfig):
            self.audio = audio
        else:
            self.audio = audio_config(**(audio or {}))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.mimii_train_normals = mimii_train_normals
        self.on_bad_file = on_bad_file
        self.batches_per_epoch = batches_per_epoch
        self.windowing: Windowing | None = windowing_of(self.audio)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root() / "audio"
        self.seed = seed

        #: k > 0: nothing is held out, every training clip is scored out of fold (`asd.run.crossfit`)
        self.crossfit_folds = 0
        self.tables: dict[str, ClipTable] = {}
        self.datasets: dict[str, ClipDataset] = {}
        self.skipped: list[tuple[str, str]] = []
        self.machine_names: list[str] = []
        self.section_keys: list[tuple[str, str]] = []
        self.attribute_keys: list[tuple[str, str, str]] = []

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        """Generate the synthetic dataset once (rank 0 only under DDP)."""
        if self.root is None:
            ensure_synthetic(cfg=self.synthetic)

    def dataset_root(self) -> Path:
        return self.root if self.root is not None else ensure_synthetic(cfg=self.synthetic)

    def index(self) -> ClipTable:
        """Every clip of the dataset, from file and folder names (`asd.data.index`)."""
        return index_dataset(
            self.dataset_root(),
            year=self.year if self.root is not None else 2023,
            machines=self.machines,
            mimii_train_normals=self.mimii_train_normals,
            seed=self.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        table = self.index()
        train = table.select(split="train")
        not_normal = train.select(where=lambda c: c.label != "normal")
        if len(not_normal):
            raise AsdError(
                f"{len(not_normal)} training clips are not labelled normal (first: {not_normal[0].path}); "
                "asd trains on normal clips only: move them to the test folder"
            )
        fit, val = split_holdout(train, self.val_fraction, self.seed)
        test = table.select(split="test")
        if not len(fit):
            raise AsdError(
                f"no training clips under {self.dataset_root()}: asd needs normal training recordings "
                "(for MIMII folders set data.mimii_train_normals=N)"
            )
        if not len(test):
            log.warning("no test clips under %s: only training will run", self.dataset_root())
        untrained = sorted({(c.machine, c.section) for c in test} - {(c.machine, c.section) for c in train})
        if untrained:
            names = ", ".join(f"{m}/section_{s}" for m, s in untrained)
            raise AsdError(
                f"{names}: test clips but no training clips under {self.dataset_root()}; every machine "
                "and section needs normal training recordings (add them, or remove those test clips)"
            )

        self.machine_names = table.machines()
        self.section_keys = sorted({(c.machine, c.section) for c in table})
        self.attribute_keys = sorted({(c.machine, c.section, c.attribute_string) for c in train})

        for split, part in (("fit", fit), ("val", val), ("test", test)):
            on_bad = self.on_bad_file if split != "test" else "error"
            kept, waves = self._load(split, part, on_bad)
            self.tables[split] = kept
            self.datasets[split] = ClipDataset(kept, waves, self.label_tensors(kept))
        log.info("data: %s", self.describe())

    def merge_holdout(self, folds: int) -> None:
        """Train on every training clip (the held-out ones join the fit split) for cross-fitting
        with `folds` folds: the crossfit stage scores each clip out of fold instead."""
        fit, val = self.datasets["fit"], self.datasets["val"]
        merged = join_rows([(fit, range(len(fit))), (val, range(len(val)))])
        self.tables["fit"], self.tables["val"] = merged.table, ClipTable([])
        self.datasets["fit"] = merged
        self.datasets["val"] = ClipDataset(
            self.tables["val"], WaveStore([]), self.label_tensors(self.tables["val"])
        )
        self.crossfit_folds = folds
        log.info("data: %d training clips, none held out (cross-fitted, %d folds)", len(merged), folds)

    def cache_features(self, frontends: Mapping[str, Any]) -> None:
        """Give every split the cached features of these front ends (batch key -> `LogMel`), computed
        once per clip and setting beside the audio cache (`FeatureCache`); batches then carry them and
        the members' front ends serve them (`LogMel.prime`) instead of computing them per batch.

        Not with `data.audio.window`: crops and scoring windows compute their features from the cut
        wave (a slice of the whole clip's features would differ at the crop's edges), nor with
        `data.feature_cache=false`.
        """
        if not self.feature_cache or not frontends:
            return
        if self.windowing is not None:
            log.info("feature cache: not used with data.audio.window (features are computed per crop)")
            return
        t0 = time.perf_counter()
        try:
            stores = {
                (split, key): feature_store(dataset.waves, FeatureCache(frontend))
                for key, frontend in frontends.items()
                for split, dataset in self.datasets.items()
            }
        except (OSError, NoRoom) as e:  # a full disk or a read-only cache: training works without it
            log.warning(
                "feature cache: not written (%s); the members compute their log-mels per batch, as with "
                "data.feature_cache=false (which also silences this)",
                e,
            )
            return
        for (split, key), store in stores.items():
            self.datasets[split].add_features(key, store)
        log.info(
            "feature cache: %d setting(s) for %s clips in %.1f s (data.feature_cache=false: per batch)",
            len(frontends),
            sum(len(d) for d in self.datasets.values()),
            time.perf_counter() - t0,
        )

    def describe(self) -> str:  # the loaded splits in one line (the log's)
        counts = ", ".join(f"{len(self.tables[s])} {s}" for s in SPLITS)
        return f"{counts} clips; machines {self.machine_names}; {len(self.section_keys)} sections"

    def _load(self, split: str, table: ClipTable, on_bad: str) -> tuple[ClipTable, WaveStore]:
        """Decode (or read from the cache `<machine>-<split>-<folder hash>`) each machine's clips."""
        tag = hashlib.sha1(str(self.dataset_root().resolve()).encode()).hexdigest()[:8]
        cache = AudioCache(self.cache_dir, self.audio)
        clips: list[Clip] = []
        parts: list[np.ndarray] = []
        for machine in table.machines():
            group = table.select(machine=machine)
            try:
                loaded = cache.load([c.path for c in group], f"{machine}-{split}-{tag}", on_bad)
            except AudioError as e:
                if split != "test":
                    raise
                raise AudioError(
                    f"{str(e).replace(SKIP_HINT, '')}. It is a test clip: data.on_bad_file=skip never "
                    "leaves one out, so that every test clip is scored"
                ) from e
            changes = length_changes(loaded.lengths, self.audio)
            if changes:
                log.warning(
                    "%s %s: %s; data.audio.duration sets the length in seconds, data.audio.pad and "
                    "data.audio.crop how",
                    machine,
                    split,
                    changes,
                )
            if loaded.bad:
                self.skipped.extend(loaded.bad)
                bad = {p for p, _ in loaded.bad}
                group = group.select(where=lambda c, bad=bad: c.path not in bad)
            clips.extend(group)
            parts.append(loaded.waves)
        return ClipTable(clips), WaveStore(parts)

    def label_tensors(self, table: ClipTable) -> dict[str, torch.Tensor]:
        """Class ids and flags of each clip; attributes unseen in training get id -1."""
        return label_tensors(table, self.machine_names, self.section_keys, self.attribute_keys)

    # ------------------------------------------------------------------ loaders
    @property
    def modality(self) -> str:
        """What the clips are: "audio" here, "image" for `asd.data.images.ImageDataModule`."""
        return "audio"

    @property
    def training_unit(self) -> str:
        """What one training item is, in words (the budget's log line)."""
        w = self.windowing
        return "whole training clips" if w is None else f"random {w.size / self.audio.sample_rate:g} s crops"

    @property
    def num_machines(self) -> int:
        return len(self.machine_names)

    @property
    def num_sections(self) -> int:
        return len(self.section_keys)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_keys)

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in SPLITS:
            raise AsdError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not self.datasets:
            raise AsdError("AsdDataModule.setup() must run before asking for a loader")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    @property
    def train_batches(self) -> int:
        """Optimizer steps one training epoch takes."""
        if self.windowing is not None and self.batches_per_epoch:
            return self.batches_per_epoch
        return math.ceil(len(self.datasets["fit"]) / self.batch_size)

    def on_before_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict:
        if self.check_batch is not None:  # the members' id checks on the CPU copy: no device sync
            self.check_batch(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.windowing is None:
            return self.loader("fit", shuffle=True)
        # random crops: clip and start drawn from the loader's generator (restored on resume)
        generator = torch.Generator().manual_seed(self.seed)
        fit = self.datasets["fit"]
        draws = self.train_batches * self.batch_size
        w = self.windowing
        sampler = RandomCropSampler(len(fit), w.clip, w.size, draws, generator, w.align)
        return DataLoader(
            RandomCrops(fit, self.windowing.size),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader | list:
        # no held-out clips (tiny datasets): no validation loop rather than an empty one
        if not len(self.datasets["val"]):
            return []
        if self.windowing is None:
            return self.loader("val")
        return DataLoader(
            ClipWindows(self.datasets["val"], self.windowing),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def state_dict(self) -> dict[str, Any]:
        """Class-id maps, so a checkpoint knows which ids mean which machine/section."""
        return {
            "machines": self.machine_names,
            "sections": [list(k) for k in self.section_keys],
            "attributes": [list(k) for k in self.attribute_keys],
            "audio": asdict(self.audio),
        }


def label_tensors(
    table: ClipTable,
    machines: Sequence[str],
    section_keys: Sequence[tuple[str, str]],
    attribute_keys: Sequence[tuple[str, str, str]],
) -> dict[str, torch.Tensor]:
    """The label tensors of a batch dict for these clips, with a run's class-id maps.

    Attributes unseen in training get id -1; a machine or section the maps lack is the caller's
    to refuse first.
    """
    machine_id = {m: i for i, m in enumerate(machines)}
    section_id = {tuple(k): i for i, k in enumerate(section_keys)}
    attribute_id = {tuple(k): i for i, k in enumerate(attribute_keys)}
    clips = list(table)
    return {
        "machine": torch.tensor([machine_id[c.machine] for c in clips], dtype=torch.long),
        "section": torch.tensor([section_id[(c.machine, c.section)] for c in clips], dtype=torch.long),
        "attribute": torch.tensor(
            [attribute_id.get((c.machine, c.section, c.attribute_string), -1) for c in clips],
            dtype=torch.long,
        ),
        "domain": torch.tensor([DOMAIN_IDS[c.domain] for c in clips], dtype=torch.long),
        "is_target": torch.tensor([c.is_target for c in clips], dtype=torch.bool),
        "is_normal": torch.tensor([c.is_normal for c in clips], dtype=torch.bool),
        "index": torch.arange(len(clips), dtype=torch.long),
    }


def split_holdout(train: ClipTable, fraction: float, seed: int) -> tuple[ClipTable, ClipTable]:
    """Hold out `fraction` of each (machine, section, domain) group (at least one clip of groups of 2+).

    Deterministic for a seed; a group of one clip stays entirely in `fit`.
    """
    groups: dict[tuple[str, str, str], list[Clip]] = defaultdict(list)
    for c in train:
        groups[(c.machine, c.section, c.domain)].append(c)
    held: set[str] = set()
    rng = np.random.default_rng(seed)
    for key in sorted(groups):
        clips = sorted(groups[key], key=lambda c: c.path)
        n_val = 0 if fraction == 0 or len(clips) < 2 else max(1, round(len(clips) * fraction))
        for i in rng.permutation(len(clips))[:n_val]:
            held.add(clips[i].path)
    fit = train.select(where=lambda c: c.path not in held)
    val = train.select(where=lambda c: c.path in held)
    return fit, val
