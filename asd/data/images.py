"""Image inputs (`data=images`): folders of pictures as the same dict batches audio gives.

A picture becomes a fixed-length float vector in `batch["wave"]`, so the whole data path (splits,
loaders, windows, DDP, pseudo-anomaly datasets) is the audio one. The members that take a 2-D
input read it back through `asd.features.ImageFrontend`, which hands them a (B, C*h, w) array in
the place of a (B, n_mels, frames) log-mel. `ImageLayout` is the one place that knows how the
vector is laid out:

- whole images: the (C, H, W) array flattened, channel-major;
- `patch: P`: the image cut into a grid of P x P patches, patch-major (every patch's (C, P, P)
  block contiguous), so a patch is a contiguous run of the vector and `asd.data.windows` cuts
  patches with `size = hop = C*P*P` exactly as it cuts audio windows. Training draws random
  patches; a picture's score is the mean over its patches.

Layouts read (`index_images`), per category folder (the data root itself, or each folder under it
that has one of these layouts):

- industrial-inspection style: `train/good/`, `test/good/`, `test/<defect>/`, and optionally
  `ground_truth/<defect>/<name>_mask.<ext>` (a pixel mask per defective test picture);
- plain: `normal/` and `anomaly/` (files, or subfolders per defect); `test_normals` of each
  category's normals (seeded) become test pictures, the rest train.

The data root is one "machine" (its folder name); each category is a section ("00" when the root is
itself the category). Every picture is converted to `mode` (gray: 1 channel, rgb: 3), scaled to
[0, 1] and resized to `size` (bilinear); with `resize: false` a picture of another size is an
error instead. Unreadable, empty or (without resize) mixed-size files get one error naming the
file and the fix; `on_bad_file: skip` leaves unreadable training pictures out and lists them.
Pictures are decoded once per run into memory (no disk cache: decoding is fast next to training).

One file: the layout contract (`ImageLayout`), the folder rules and the data module that applies
both change together; split, a layout rule would live apart from the reader that enforces it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asd.data.datamodule import AsdDataModule, WaveStore
from asd.data.table import Clip, ClipTable
from asd.data.windows import Windowing
from asd.errors import AsdError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MODES = {"gray": ("L", 1), "rgb": ("RGB", 3)}
#: the folder names of the two layouts
NORMAL_FOLDERS = ("good", "normal")
#: a mask's name: the picture's stem + this (industrial-inspection ground truth)
MASK_SUFFIX = "_mask"


class ImageError(AsdError):
    """A picture that cannot be read into the run's layout."""


@dataclass(frozen=True)
class ImageLayout:
    """How a picture of `channels` x `height` x `width` lies in a batch's `wave` vector (see module doc)."""

    channels: int
    height: int
    width: int
    patch: int | None = None

    def __post_init__(self) -> None:
        if self.patch is not None and (self.height % self.patch or self.width % self.patch or self.patch < 1):
            raise AsdError(
                f"data.image.patch={self.patch} does not tile {self.height}x{self.width} pictures: "
                "choose a patch size that divides both sides of data.image.size"
            )

    @property
    def numel(self) -> int:
        return self.channels * self.height * self.width

    @property
    def view(self) -> tuple[int, int, int]:
        """What a member sees of one item: (C, h, w), a patch or the whole picture."""
        side = self.patch
        return (self.channels, side, side) if side else (self.channels, self.height, self.width)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row ((1, 1) without patches)."""
        return (self.height // self.patch, self.width // self.patch) if self.patch else (1, 1)

    def to_flat(self, image: np.ndarray) -> np.ndarray:
        """(C, H, W) -> the (numel,) vector of this layout."""
        if self.patch is None:
            return np.ascontiguousarray(image, dtype=np.float32).reshape(-1)
        gh, gw = self.grid
        p = self.patch
        blocks = image.reshape(self.channels, gh, p, gw, p).transpose(1, 3, 0, 2, 4)  # (gh, gw, C, p, p)
        return np.ascontiguousarray(blocks, dtype=np.float32).reshape(-1)

    def to_image(self, flat: np.ndarray) -> np.ndarray:
        """The (numel,) vector -> (C, H, W); inverse of `to_flat`."""
        flat = np.asarray(flat)
        if flat.shape != (self.numel,):
            raise AsdError(f"an image vector of this run has {self.numel} values, got shape {flat.shape}")
        if self.patch is None:
            return flat.reshape(self.channels, self.height, self.width)
        gh, gw = self.grid
        p = self.patch
        blocks = flat.reshape(gh, gw, self.channels, p, p).transpose(2, 0, 3, 1, 4)  # (C, gh, p, gw, p)
        return blocks.reshape(self.channels, self.height, self.width)

    def windowing(self) -> Windowing | None:
        """Patches as `asd.data.windows` windows: contiguous, non-overlapping, in grid order."""
        if self.patch is None:
            return None
        size = self.channels * self.patch * self.patch
        return Windowing(size=size, hop=size, clip=self.numel, align=size)


@dataclass(frozen=True)
class ImageConfig:
    """`data.image.*`: what every picture is turned into."""

    size: tuple[int, int] = (64, 64)  # (height, width) after resizing
    mode: str = "gray"  # gray | rgb
    resize: bool = True  # false: a picture of another size is an error
    patch: int | None = None  # members see P x P patches of the (resized) picture

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AsdError(f"data.image.mode={self.mode!r}: expected one of {list(MODES)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise AsdError(f"data.image.size={list(self.size)}: expected [height, width], both >= 1")

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout(MODES[self.mode][1], int(self.size[0]), int(self.size[1]), self.patch)


def image_config(values: dict[str, Any] | ImageConfig | None) -> ImageConfig:
    if isinstance(values, ImageConfig):
        return values
    values = dict(values or {})
    if "size" in values:
        size = values["size"]
        values["size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    return ImageConfig(**values)


# ---------------------------------------------------------------------- reading pictures
def read_image(path: str | Path, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """One picture as (C, H, W) float32 in [0, 1] at `cfg.size`, and its own (height, width)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            own = (img.height, img.width)
            if img.mode in ("I;16", "I;16B", "I;16L", "I") and cfg.mode == "gray":
                # 16-bit grayscale (common in TIFF): keep the depth, scale by the type's range
                arr = np.asarray(img, dtype=np.float32) / (65535.0 if img.mode.startswith("I;16") else 1.0)
                pic = Image.fromarray(arr, mode="F")
            else:
                pic = img.convert(MODES[cfg.mode][0])
                arr = None
            height, width = cfg.size
            if own != (height, width):
                if not cfg.resize:
                    raise ImageError(
                        f"{path}: {own[0]}x{own[1]} pixels, but data.image.size is {height}x{width} and "
                        "data.image.resize=false; resize the pictures, set data.image.size to their size, "
                        "or set data.image.resize=true"
                    )
                pic = pic.resize((width, height), Image.Resampling.BILINEAR)
            data = np.asarray(pic, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(
            f"{path}: cannot be read as a picture ({type(e).__name__}: {e}); replace or remove the "
            "file (data.on_bad_file=skip leaves unreadable training pictures out)"
        ) from e
    if arr is None:
        data = data / 255.0
    data = data[None] if data.ndim == 2 else data.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
    if not np.isfinite(data).all():
        raise ImageError(f"{path}: NaN or infinite pixel values; fix the file")
    return np.ascontiguousarray(data, dtype=np.float32), own


def read_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as (H, W) bool at `size` (nearest-neighbour; any non-zero pixel is defect)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            pic = img.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST)
            return np.asarray(pic) > 0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(
            f"{path}: cannot be read as a mask ({type(e).__name__}: {e}); fix or remove it"
        ) from e


# ---------------------------------------------------------------------- indexing folders
def _pictures(folder: Path) -> list[Path]:
    """Picture files anywhere under `folder`, sorted; other files are named in one error."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ImageError(
            f"{others[0]}: not a picture file (expected one of {', '.join(IMAGE_SUFFIXES)}); "
            f"{len(others)} such file(s) under {folder}: move them out of the dataset"
        )
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def _layout_of(folder: Path) -> str | None:
    """`inspection`, `plain` or None (not a category folder)."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "inspection"
    if (folder / "train").is_dir():
        return "inspection"  # test/ missing: training only
    if (folder / "normal").is_dir():
        return "plain"
    return None


def _section_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _inspection(folder: Path, machine: str, section: str) -> tuple[list[Clip], dict[str, str]]:
    """train/good, test/good, test/<defect> (+ ground_truth/<defect>/<stem>_mask.*)."""
    clips, masks = [], {}
    train_good = folder / "train" / "good"
    if not train_good.is_dir():
        extra = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        raise ImageError(
            f"{folder / 'train'}: no good/ folder of normal training pictures"
            + (f" (found {extra}: asd trains on normal pictures only)" if extra else "")
        )
    stray = sorted(
        p.name for p in (folder / "train").iterdir() if p.name != "good" and not p.name.startswith(".")
    )
    if stray:
        raise ImageError(
            f"{folder / 'train'}: {stray} beside good/; asd trains on normal pictures only: move defect "
            "pictures to test/<defect>/"
        )
    for path in _pictures(train_good):
        clips.append(Clip(str(path), machine, section, "none", "train", "normal", {}, "images"))
    test = folder / "test"
    if test.is_dir():
        for sub in sorted(p for p in test.iterdir() if not p.name.startswith(".")):
            if not sub.is_dir():
                raise ImageError(
                    f"{sub}: a file directly under test/; put it in test/good/ or test/<defect>/"
                )
            normal = sub.name in NORMAL_FOLDERS
            for path in _pictures(sub):
                attrs = {} if normal else {"defect": sub.name}
                clips.append(
                    Clip(
                        str(path),
                        machine,
                        section,
                        "none",
                        "test",
                        "normal" if normal else "anomaly",
                        attrs,
                        "images",
                    )
                )
                if not normal:
                    mask = _mask_of(folder / "ground_truth" / sub.name, path.stem)
                    if mask is not None:
                        masks[str(path)] = str(mask)
    return clips, masks


def _mask_of(folder: Path, stem: str) -> Path | None:
    if not folder.is_dir():
        return None
    for suffix in IMAGE_SUFFIXES:
        for name in (f"{stem}{MASK_SUFFIX}{suffix}", f"{stem}{suffix}"):
            if (folder / name).is_file():
                return folder / name
    return None


def _plain(
    folder: Path, machine: str, section: str, test_normals: float, seed: int
) -> tuple[list[Clip], dict[str, str]]:
    """normal/ and anomaly/ (files or defect subfolders); a seeded share of the normals is tested."""
    normals = _pictures(folder / "normal")
    anomalies = _pictures(folder / "anomaly") if (folder / "anomaly").is_dir() else []
    n_test = round(len(normals) * test_normals) if anomalies else 0
    if anomalies and len(normals) >= 2:
        n_test = min(max(n_test, 1), len(normals) - 1)
    rng = np.random.default_rng([seed, len(normals)])
    tested = set(rng.permutation(len(normals))[:n_test].tolist())
    clips = [
        Clip(str(p), machine, section, "none", "test" if i in tested else "train", "normal", {}, "images")
        for i, p in enumerate(normals)
    ]
    for p in anomalies:
        rel = p.relative_to(folder / "anomaly")
        attrs = {"defect": rel.parts[0]} if len(rel.parts) > 1 else {}
        clips.append(Clip(str(p), machine, section, "none", "test", "anomaly", attrs, "images"))
    return clips, {}


def index_images(
    root: str | Path, categories: Sequence[str] | None = None, test_normals: float = 0.2, seed: int = 0
) -> tuple[ClipTable, dict[str, str]]:
    """Every picture under `root` as a `ClipTable` (layout "images"), and test picture -> mask file."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImageError(f"data.root={root}: not a folder; point it at a folder of pictures (README: Images)")
    machine = _section_name(root.resolve().name) or "images"
    if _layout_of(root):
        folders = [(root, "00")]
    else:
        folders = [(p, _section_name(p.name)) for p in sorted(root.iterdir()) if p.is_dir() and _layout_of(p)]
    if categories:
        known = [s for _, s in folders]
        missing = sorted(set(categories) - set(known))
        if missing:
            raise ImageError(f"data.categories: {missing} not under {root} (found {known})")
        folders = [(p, s) for p, s in folders if s in categories]
    if not folders:
        raise ImageError(
            f"{root}: no picture folders in a known layout; expected <category>/train/good/ (+ test/good/, "
            "test/<defect>/, ground_truth/<defect>/) or <category>/normal/ (+ anomaly/), the root itself "
            "or one folder per category"
        )
    clips: list[Clip] = []
    masks: dict[str, str] = {}
    for folder, section in folders:
        layout = _layout_of(folder)
        found, found_masks = (
            _inspection(folder, machine, section)
            if layout == "inspection"
            else _plain(folder, machine, section, test_normals, seed)
        )
        if not any(c.split == "train" for c in found):
            raise ImageError(f"{folder}: no normal training pictures; asd learns from normal pictures only")
        clips.extend(found)
        masks.update(found_masks)
    return ClipTable(clips), masks


# ---------------------------------------------------------------------- the data module
class ImageDataModule(AsdDataModule):
    """`AsdDataModule` over a folder of pictures (`conf/data/images.yaml`; see the module docstring).

    Args:
        root: the dataset folder.
        image: `ImageConfig` fields (size, mode, resize, patch).
        categories: restrict to these category folders (sections).
        test_normals: plain layout only: the share of each category's normal pictures tested.
        batches_per_epoch: with `image.patch`, training batches of random patches per epoch
            (None: one patch per training picture).
        Others as `AsdDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        image: dict[str, Any] | ImageConfig | None = None,
        categories: Sequence[str] | None = None,
        test_normals: float = 0.2,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        on_bad_file: str = "error",
        batches_per_epoch: int | None = None,
        seed: int = 0,
        name: str = "images",
        pin_memory: bool = False,
        audio: dict[str, Any] | None = None,
        synthetic: dict[str, Any] | None = None,
        feature_cache: bool = False,
    ):
        # `feature_cache` is accepted so data.feature_cache works with every data choice: pictures
        # have no log-mel to cache (their members read them through ImageFrontend)
        if audio or synthetic:
            # debug=default shrinks the synthetic audio for every data choice; say that it has no effect
            log.info(
                "data.%s: audio settings, not used with data=images (data.image sets the pictures)",
                " and data.".join(k for k, v in (("audio", audio), ("synthetic", synthetic)) if v),
            )
        if not root:
            raise AsdError("data=images needs data.root=DIR, a folder of pictures (README: Images)")
        super().__init__(
            root=root,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            on_bad_file=on_bad_file,
            batches_per_epoch=batches_per_epoch,
            seed=seed,
            name=name,
            pin_memory=pin_memory,
            feature_cache=False,
        )
        self.image = image_config(image)
        self.layout = self.image.layout
        self.windowing = self.layout.windowing()
        self.categories = list(categories) if categories else None
        self.test_normals = float(test_normals)
        if not 0 <= self.test_normals < 1:
            raise AsdError(f"data.test_normals={test_normals}: expected a share in [0, 1)")
        #: test picture path -> its ground-truth mask file (industrial-inspection layout)
        self.masks: dict[str, str] = {}

    @property
    def modality(self) -> str:
        return "image"

    @property
    def training_unit(self) -> str:
        p = self.image.patch
        return f"random {p}x{p} patches" if p else "whole training pictures"

    def prepare_data(self) -> None:
        """Nothing to generate."""

    def index(self) -> ClipTable:
        table, self.masks = index_images(self.dataset_root(), self.categories, self.test_normals, self.seed)
        return table

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        if not len(self.tables["fit"]):
            raise AsdError(f"no readable normal training pictures under {self.dataset_root()}")

    def describe(self) -> str:
        counts = ", ".join(f"{len(self.tables[s])} {s}" for s in ("fit", "val", "test"))
        patches = f", {self.image.patch}x{self.image.patch} patches" if self.image.patch else ""
        return (
            f"{counts} pictures ({self.image.mode}, {self.image.size[0]}x{self.image.size[1]}{patches}); "
            f"sections {[s for _, s in self.section_keys]}"
        )

    def _load(self, split: str, table: ClipTable, on_bad: str) -> tuple[ClipTable, WaveStore]:
        """Decode every picture of a split into the layout's vectors; report resized pictures once."""
        kept, rows, sizes = [], [], Counter()
        for clip in table:
            try:
                picture, own = read_image(clip.path, self.image)
            except ImageError as e:
                if on_bad != "skip":
                    raise
                self.skipped.append((clip.path, str(e)))
                log.warning("skipped %s", e)
                continue
            sizes[own] += 1
            kept.append(clip)
            rows.append(self.layout.to_flat(picture))
        resized = {s: n for s, n in sizes.items() if s != tuple(self.image.size)}
        if resized:
            log.warning(
                "%s: %d pictures resized to %dx%d (from %s); data.image.size sets the size",
                split,
                sum(resized.values()),
                *self.image.size,
                ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(resized.items())),
            )
        array = np.stack(rows) if rows else np.zeros((0, self.layout.numel), dtype=np.float32)
        return ClipTable(kept), WaveStore([array])

    def mask_of(self, split: str, row: int) -> np.ndarray | None:
        """Ground truth (H, W) bool of a split's row: its mask, all False for a normal, None if unknown."""
        clip = self.tables[split][row]
        if clip.is_normal:
            return np.zeros(self.image.size, dtype=bool)
        path = self.masks.get(clip.path)
        return None if path is None else read_mask(path, self.image.size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "machines": self.machine_names,
            "sections": [list(k) for k in self.section_keys],
            "attributes": [list(k) for k in self.attribute_keys],
            "image": {**asdict(self.image), "size": list(self.image.size)},
        }


def image_layout_of(facts: dict[str, Any]) -> ImageLayout | None:
    """The run's picture layout from its data facts (`state_dict`), None for audio runs."""
    image = facts.get("image")
    return None if image is None else image_config(image).layout
