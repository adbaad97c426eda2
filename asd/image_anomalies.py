"""Image pseudo-anomalies: normal pictures turned into labelled anomalous ones, in pixel space.

The picture counterpart of `asd.anomalies`: the same `Injection`, the same call contract (a flat
vector in, the edited vector out, first draws of the rng pick the kind) and the same promise that
every edit stays inside its mask, here an (H, W) pixel mask shared by all channels. A vector is
always read and written through `ImageLayout.to_image` / `to_flat`, so whole pictures and
patch-major vectors are edited alike.

Kinds and why:
- blobs: a brightness shift inside a Perlin-noise blob mask (stains, discolouration);
- scratch: a thin random curve at a contrasting intensity (scratches, cracks, hairs);
- cutpaste: a rectangle of the picture itself copied elsewhere, maybe flipped: every value is
  normal for the picture, only the structure is wrong (misplaced parts);
- noise: Gaussian noise inside a blob mask (rough or contaminated surfaces);
- outlier: a rectangle of another section's picture pasted in (foreign objects).

Sizes follow the picture: intensities are shares of its own value range (floored by `MIN_RANGE`,
so a flat picture still gets a visible edit) and edited values are clipped to that range widened
by the drawn strength. The edit of each kind builds a whole new picture; only its masked pixels
are copied back, so pixels outside the mask stay bit-identical by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from asd.anomalies import Injection, draw_kind, perlin_noise
from asd.choices import IMAGE_KINDS
from asd.data.images import ImageLayout
from asd.errors import AsdError
from asd.fileio import write_atomic

log = logging.getLogger(__name__)

#: value range assumed for a picture flatter than this, so strengths stay visible on a flat picture
MIN_RANGE = 0.1


@dataclass(frozen=True)
class ImageAnomalyConfig:
    """What the image generator may inject and how strongly; ranges are (low, high), drawn per call."""

    kinds: tuple[str, ...] = IMAGE_KINDS
    p_none: float = 0.0  # probability that a call returns the picture unchanged, kind "none"
    blob_fraction: tuple[float, float] = (0.02, 0.1)  # share of pixels in a Perlin blob mask
    strength: tuple[float, float] = (0.2, 0.6)  # intensity change as a share of the value range; sign random
    patch: tuple[float, float] = (0.1, 0.3)  # cutpaste/outlier rectangle side as a share of the picture side
    width: tuple[int, int] = (1, 3)  # scratch width in pixels


def image_anomaly_config(values: Mapping[str, Any] | None) -> ImageAnomalyConfig:
    """An `ImageAnomalyConfig` from a (Hydra) mapping of its fields (`fusion.image_anomalies`)."""
    converted = {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in dict(values or {}).items()
    }
    known = [f.name for f in fields(ImageAnomalyConfig)]
    unknown = sorted(set(converted) - set(known))
    if unknown:
        raise AsdError(f"fusion.image_anomalies: unknown key(s) {unknown}; expected some of {known}")
    if isinstance(converted.get("kinds"), str):
        converted["kinds"] = (converted["kinds"],)  # `kinds: scratch` means one kind, not seven letters
    kinds = converted.get("kinds", IMAGE_KINDS)
    bad = [k for k in kinds if k not in IMAGE_KINDS]
    if bad or not kinds:
        raise AsdError(
            f"fusion.image_anomalies.kinds={list(kinds)}: expected a kind or a non-empty list of kinds "
            f"from {list(IMAGE_KINDS)}" + (f" ({bad} unknown)" if bad else "")
        )
    return ImageAnomalyConfig(**converted)


def _as_picture(flat: Any, name: str, layout: ImageLayout) -> np.ndarray:
    """A finite float32 (C, H, W) copy of the layout vector `flat`, or an AsdError naming `name`."""
    arr = np.asarray(flat)
    if arr.shape != (layout.numel,) or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise AsdError(
            f"`{name}` must be a ({layout.numel},) float vector of a {layout.channels}x{layout.height}x"
            f"{layout.width} picture, got shape {arr.shape} {arr.dtype}"
        )
    if not np.isfinite(arr).all():
        raise AsdError(f"`{name}` has NaN/inf values; fix the picture before generating pseudo-anomalies")
    return layout.to_image(arr.astype(np.float32)).copy()  # (numel,) -> (C, H, W)


def _blob_mask(
    shape: tuple[int, int], rng: np.random.Generator, cfg: ImageAnomalyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool Perlin blobs covering a drawn share of the pixels, and a 0.5..1 weight for soft edges."""
    noise = perlin_noise(shape, (int(rng.integers(2, 5)), int(rng.integers(2, 5))), rng)
    # a quantile threshold gives the drawn share of pixels (at least the top one), never an empty mask
    threshold = min(np.quantile(noise, 1 - rng.uniform(*cfg.blob_fraction)), noise.max())
    mask = noise >= threshold
    depth = (noise - threshold) / max(0.5 * (noise.max() - threshold), 1e-12)
    return mask, np.where(mask, 0.5 + 0.5 * np.clip(depth, 0, 1), 0.0)  # half strength at the rim


def _rectangle(shape: tuple[int, int], rng: np.random.Generator, cfg: ImageAnomalyConfig) -> tuple[int, int]:
    """(h, w) of a cutpaste/outlier rectangle: `patch` of each side, at least 1 pixel."""
    share = rng.uniform(*cfg.patch)
    return tuple(min(side, max(1, round(share * side))) for side in shape)  # type: ignore[return-value]


def _corner(
    shape: tuple[int, int],
    size: tuple[int, int],
    rng: np.random.Generator,
    avoid: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """A random top-left corner of a `size` rectangle inside `shape`, other than `avoid` when possible."""
    ny, nx = shape[0] - size[0] + 1, shape[1] - size[1] + 1
    if avoid is None or ny * nx == 1:
        i = int(rng.integers(ny * nx))
    else:
        i = int(rng.integers(ny * nx - 1))
        i += i >= avoid[0] * nx + avoid[1]  # skip the avoided corner
    return divmod(i, nx)


class ImagePseudoAnomalies:
    """Seeded generator of image pseudo-anomalies; the contract of `asd.anomalies.PseudoAnomalies`."""

    all_kinds = IMAGE_KINDS

    def __init__(self, config: ImageAnomalyConfig, layout: ImageLayout):
        self.config, self.layout = config, layout
        # kind -> edit(img (C, H, W), rng, strength, other) -> (new picture (C, H, W), (H, W) mask)
        self._edits: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
            k: getattr(self, f"_{k}") for k in IMAGE_KINDS
        }

    def draw_kind(self, rng: np.random.Generator, with_outlier: bool) -> str:
        """The kind a call with `kind=None` uses: the first draws it makes from `rng`."""
        c = self.config
        return draw_kind(c.kinds, c.p_none, rng, with_outlier, "fusion.image_anomalies", "picture")

    def __call__(
        self,
        wave: np.ndarray,
        rng: np.random.Generator,
        outlier: np.ndarray | None = None,
        kind: str | None = None,
    ) -> Injection:
        """Edit the picture vector `wave` (numel,) with a drawn or forced kind; deterministic given `rng`."""
        if not isinstance(rng, np.random.Generator):
            raise AsdError(f"`rng` must be a numpy Generator (np.random.default_rng(seed)), got {type(rng)}")
        img = _as_picture(wave, "wave", self.layout)  # (C, H, W) float32
        if kind is None:
            kind = self.draw_kind(rng, with_outlier=outlier is not None)
        if kind not in IMAGE_KINDS and kind != "none":
            raise AsdError(
                f"unknown image pseudo-anomaly kind {kind!r}; expected 'none' or one of {list(IMAGE_KINDS)}"
            )
        if kind == "none":
            return Injection(self.layout.to_flat(img), "none", np.zeros(img.shape[1:], dtype=bool))
        other = None
        if kind == "outlier":
            if outlier is None:
                raise AsdError("kind='outlier' needs `outlier=`, a picture of another section")
            other = _as_picture(outlier, "outlier", self.layout)
        strength = rng.uniform(*self.config.strength)
        new, mask = self._edits[kind](img.astype(np.float64), rng, strength, other)
        low, high = float(img.min()), float(img.max())
        margin = strength * max(high - low, MIN_RANGE)
        out = img.copy()
        # only masked pixels are written back, so everything outside the mask stays bit-identical
        out[:, mask] = np.clip(new[:, mask], low - margin, high + margin).astype(np.float32)
        return Injection(self.layout.to_flat(out), kind, mask)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _step(img: np.ndarray, strength: float) -> float:
        """`strength` of the picture's value range (floored by MIN_RANGE)."""
        return strength * max(float(img.max() - img.min()), MIN_RANGE)

    # ------------------------------------------------------------------ kinds: picture -> (new picture, mask)
    def _blobs(self, img, rng, strength, other):
        mask, weight = _blob_mask(img.shape[1:], rng, self.config)
        shift = rng.choice([-1.0, 1.0]) * self._step(img, strength)
        return img + shift * weight, mask  # the same shift in every channel: a stain, not a colour cast

    def _noise(self, img, rng, strength, other):
        mask, weight = _blob_mask(img.shape[1:], rng, self.config)
        noise = rng.standard_normal(img.shape) * self._step(img, strength)  # (C, H, W): colour noise
        return img + noise * weight, mask

    def _scratch(self, img, rng, strength, other):
        height, width = img.shape[1:]
        # a quadratic Bezier curve bent sideways by `bow`; with the ends moved back by it, B(1/2) = centre,
        # so the curve always passes through a point of the picture's middle
        centre = rng.uniform(0.25, 0.75, 2) * (height, width)
        length = rng.uniform(0.3, 0.8) * max(height, width)
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.sin(angle), np.cos(angle)])
        bow = rng.uniform(-0.15, 0.15) * length * np.array([-direction[1], direction[0]])
        start, end = centre - length / 2 * direction - bow, centre + length / 2 * direction - bow
        bend = centre + bow
        # the curve is no longer than its control polygon: 3 samples per polygon pixel keep the steps under
        # half a pixel, so consecutive samples fall in the same or touching pixels (no gaps)
        reach = np.linalg.norm(bend - start) + np.linalg.norm(end - bend)
        t = np.linspace(0, 1, int(np.ceil(3 * reach)) + 2)[:, None]
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # (N, 2) (y, x)
        rows, cols = np.floor(points).astype(int).T
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # the middle point always is
        mask = np.zeros((height, width), dtype=bool)
        mask[rows[inside], cols[inside]] = True
        side = max(1, int(rng.integers(self.config.width[0], self.config.width[1] + 1)))
        mask = ndimage.binary_dilation(mask, structure=np.ones((side, side), dtype=bool))
        # contrast: bright on a dark path, dark on a bright one; a random colour on that side
        low, high, step = float(img.min()), float(img.max()), self._step(img, strength)
        mid = (low + high) / 2
        far = high + step if img[:, mask].mean() < mid else low - step
        colour = far + rng.uniform(0, 0.5, img.shape[0]) * (mid - far)  # (C,): at least halfway to `far`
        new = img.copy()
        new[:, mask] = colour[:, None]
        return new, mask

    def _paste(self, img, source, rng, avoid_same: bool):
        """A rectangle of `source` pasted at a random place of `img`, flipped at random."""
        shape = img.shape[1:]
        h, w = _rectangle(shape, rng, self.config)
        y0, x0 = _corner(shape, (h, w), rng)
        y1, x1 = _corner(shape, (h, w), rng, avoid=(y0, x0) if avoid_same else None)
        block = source[:, y0 : y0 + h, x0 : x0 + w]  # (C, h, w)
        if rng.random() < 0.5:
            block = block[:, :, ::-1]
        if rng.random() < 0.5:
            block = block[:, ::-1, :]
        new = img.copy()
        new[:, y1 : y1 + h, x1 : x1 + w] = block
        mask = np.zeros(shape, dtype=bool)
        mask[y1 : y1 + h, x1 : x1 + w] = True
        return new, mask

    def _cutpaste(self, img, rng, strength, other):
        return self._paste(img, img, rng, avoid_same=True)

    def _outlier(self, img, rng, strength, other):
        return self._paste(img, other.astype(np.float64), rng, avoid_same=False)


def plot_image_injections(
    image_flat: np.ndarray, injections: list[Injection], layout: ImageLayout, path: str | Path
) -> Path:
    """The original picture and each injection with its mask outlined in red, side by side; one PNG."""
    original = _as_picture(image_flat, "image_flat", layout)
    low, high = float(original.min()), float(original.max())
    scale = max(high - low, 1e-12)

    def shown(img: np.ndarray) -> np.ndarray:
        # the original's range for every panel, so an edit reads as brighter or darker than the original
        img = np.clip((img - low) / scale, 0, 1)
        return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)  # (C, H, W) -> (H, W[, C])

    panels = [("original", original, None)]
    for inj in injections:
        pic = _as_picture(inj.wave, f"injection {inj.kind!r} wave", layout)
        mask = np.asarray(inj.mask, dtype=bool)
        if mask.shape != pic.shape[1:]:
            raise AsdError(
                f"plot_image_injections: {inj.kind!r} mask has shape {mask.shape}, expected {pic.shape[1:]}"
            )
        panels.append((inj.kind, pic, mask))
    fig = Figure(figsize=(2.2 * len(panels), 2.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, pic, mask) in zip(axes, panels, strict=True):
        ax.imshow(shown(pic), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if mask is not None and mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title)
        ax.set_axis_off()
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG output, no display
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    return path
