"""Image pseudo-anomalies: every kind changes the picture where its mask says and only there; config, plot."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from asd.anomalies import Injection
from asd.data.images import ImageLayout
from asd.errors import AsdError
from asd.image_anomalies import (
    IMAGE_KINDS,
    ImageAnomalyConfig,
    ImagePseudoAnomalies,
    image_anomaly_config,
    plot_image_injections,
)

SEEDS = range(4)
# gray and RGB, whole pictures and patch-major vectors
LAYOUTS = [
    ImageLayout(1, 16, 16),
    ImageLayout(3, 16, 16),
    ImageLayout(1, 16, 16, patch=4),
    ImageLayout(3, 16, 16, patch=4),
    ImageLayout(3, 12, 20),
]
LAYOUT_IDS = ["gray", "rgb", "gray-patch4", "rgb-patch4", "rgb-12x20"]


def picture(layout: ImageLayout, seed: int = 0) -> np.ndarray:
    """A textured picture in [0, 1] as the layout's flat vector: a gradient, a stripe pattern and noise."""
    rng = np.random.default_rng(seed)
    c, h, w = layout.channels, layout.height, layout.width
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.3 + 0.3 * x + 0.1 * np.sin(7 * y + np.arange(c)[:, None, None])  # (C, H, W)
    img = np.clip(base + 0.05 * rng.standard_normal((c, h, w)), 0, 1)
    return layout.to_flat(img)


def pixels(flat: np.ndarray, layout: ImageLayout) -> np.ndarray:
    """(numel,) -> (C, H, W) by the layout's own reshape (independent of the generator's calls)."""
    return layout.to_image(np.asarray(flat))


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_kind_changes_only_inside_its_mask(kind, layout):
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
    x = picture(layout)
    other = picture(layout, seed=99)[::-1].copy()  # another section's picture: different content
    for seed in SEEDS:
        inj = gen(x, np.random.default_rng(seed), outlier=other, kind=kind)
        assert isinstance(inj, Injection) and inj.kind == kind
        assert inj.wave.dtype == np.float32 and inj.wave.shape == (layout.numel,)
        assert inj.mask.dtype == bool and inj.mask.shape == (layout.height, layout.width)
        assert np.isfinite(inj.wave).all()
        before, after = pixels(x, layout), pixels(inj.wave, layout)
        outside = ~inj.mask
        # bit-identical outside the mask, in every channel
        assert np.array_equal(before[:, outside].view(np.uint32), after[:, outside].view(np.uint32))
        assert inj.mask.any() and inj.mask.sum() < inj.mask.size
        assert (before[:, inj.mask] != after[:, inj.mask]).any(), f"{kind} seed {seed} changed nothing"
        # clipped to the picture's range widened by at most the largest strength
        lo, hi = before.min(), before.max()
        margin = max(ImageAnomalyConfig().strength) * (hi - lo) + 1e-6
        assert lo - margin <= after.min() and after.max() <= hi + margin


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3]], ids=["gray", "rgb-patch4"])
@pytest.mark.parametrize("kind", [*IMAGE_KINDS, None])
def test_deterministic_for_a_seed(kind, layout):
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
    x, other = picture(layout), picture(layout, seed=5)
    a = gen(x, np.random.default_rng(7), outlier=other, kind=kind)
    b = gen(x, np.random.default_rng(7), outlier=other, kind=kind)
    c = gen(x, np.random.default_rng(8), outlier=other, kind=kind)
    assert a.kind == b.kind and np.array_equal(a.wave, b.wave) and np.array_equal(a.mask, b.mask)
    assert not (a.kind == c.kind and np.array_equal(a.wave, c.wave)), "another seed gave the same edit"


def test_patch_layout_edits_the_same_pixels():
    """A patch-major vector is edited as a picture: the same seed gives the same picture in both layouts."""
    whole, patched = ImageLayout(3, 16, 16), ImageLayout(3, 16, 16, patch=4)
    img = pixels(picture(whole), whole)
    for kind in IMAGE_KINDS:
        other = np.ascontiguousarray(img[:, ::-1])
        a = ImagePseudoAnomalies(ImageAnomalyConfig(), whole)(
            whole.to_flat(img), np.random.default_rng(3), whole.to_flat(other), kind=kind
        )
        b = ImagePseudoAnomalies(ImageAnomalyConfig(), patched)(
            patched.to_flat(img), np.random.default_rng(3), patched.to_flat(other), kind=kind
        )
        assert np.array_equal(a.mask, b.mask)
        assert np.array_equal(pixels(a.wave, whole), pixels(b.wave, patched))


def test_rgb_edits_share_one_mask_and_scratch_has_one_colour():
    layout = ImageLayout(3, 16, 16)
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
    x = picture(layout)
    for seed in SEEDS:
        inj = gen(x, np.random.default_rng(seed), kind="scratch")
        after = pixels(inj.wave, layout)[:, inj.mask]  # (3, n)
        assert np.all(after == after[:, :1]), "a scratch is drawn in one colour"
        blob = gen(x, np.random.default_rng(seed), kind="blobs")
        shift = (pixels(blob.wave, layout) - pixels(x, layout))[:, blob.mask]  # (3, n)
        assert np.allclose(shift, shift[:1], atol=1e-6), "a blob shifts every channel alike"


def test_flat_picture_still_gets_edits():
    layout = ImageLayout(1, 16, 16)
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
    flat = np.full(layout.numel, 0.5, dtype=np.float32)
    for kind in ("blobs", "scratch", "noise"):
        inj = gen(flat, np.random.default_rng(0), kind=kind)
        assert (inj.wave != flat).any() and np.isfinite(inj.wave).all()


def test_none_and_input_errors():
    layout = ImageLayout(1, 16, 16)
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
    x = picture(layout)
    inj = gen(x, np.random.default_rng(0), kind="none")
    assert inj.kind == "none" and np.array_equal(inj.wave, x) and not inj.mask.any()
    assert inj.mask.shape == (16, 16)
    with pytest.raises(AsdError, match="needs `outlier=`"):
        gen(x, np.random.default_rng(0), kind="outlier")
    with pytest.raises(AsdError, match="unknown image pseudo-anomaly kind 'tone'"):
        gen(x, np.random.default_rng(0), kind="tone")
    with pytest.raises(AsdError, match=r"\(256,\) float vector"):
        gen(x[:-1], np.random.default_rng(0))
    with pytest.raises(AsdError, match="NaN"):
        gen(np.where(np.arange(x.size) == 3, np.nan, x), np.random.default_rng(0))
    with pytest.raises(AsdError, match="`outlier`"):
        gen(x, np.random.default_rng(0), outlier=np.zeros(5), kind="outlier")
    with pytest.raises(AsdError, match="numpy Generator"):
        gen(x, 0)


def test_draw_kind_with_and_without_outlier():
    gen = ImagePseudoAnomalies(ImageAnomalyConfig(), ImageLayout(1, 8, 8))
    with_outlier = {gen.draw_kind(np.random.default_rng(s), with_outlier=True) for s in range(200)}
    without = {gen.draw_kind(np.random.default_rng(s), with_outlier=False) for s in range(200)}
    assert with_outlier == set(IMAGE_KINDS)
    assert without == set(IMAGE_KINDS) - {"outlier"}
    assert ImagePseudoAnomalies.all_kinds == IMAGE_KINDS
    # a call without kind draws exactly what draw_kind draws from the same rng state
    x = picture(ImageLayout(1, 8, 8))
    for s in range(20):
        assert gen(x, np.random.default_rng(s)).kind == gen.draw_kind(np.random.default_rng(s), False)
    only_outlier = ImagePseudoAnomalies(ImageAnomalyConfig(kinds=("outlier",)), ImageLayout(1, 8, 8))
    assert only_outlier.draw_kind(np.random.default_rng(0), with_outlier=True) == "outlier"
    with pytest.raises(AsdError, match=r"fusion.image_anomalies.kinds=\['outlier'\] needs an outlier"):
        only_outlier.draw_kind(np.random.default_rng(0), with_outlier=False)


def test_p_none():
    layout = ImageLayout(1, 8, 8)
    always = ImagePseudoAnomalies(ImageAnomalyConfig(p_none=1.0), layout)
    assert {always.draw_kind(np.random.default_rng(s), True) for s in range(20)} == {"none"}
    x = picture(layout)
    inj = always(x, np.random.default_rng(0))
    assert inj.kind == "none" and np.array_equal(inj.wave, x) and not inj.mask.any()
    half = ImagePseudoAnomalies(ImageAnomalyConfig(p_none=0.5), layout)
    n_none = sum(half.draw_kind(np.random.default_rng(s), True) == "none" for s in range(400))
    assert 150 < n_none < 250  # binomial(400, 0.5): 5 sigma either side


def test_config_from_mapping():
    cfg = image_anomaly_config(
        OmegaConf.create({"kinds": ["blobs", "scratch"], "strength": [0.1, 0.2], "width": [2, 2]})
    )
    assert cfg == ImageAnomalyConfig(kinds=("blobs", "scratch"), strength=(0.1, 0.2), width=(2, 2))
    assert image_anomaly_config({"kinds": "scratch"}).kinds == ("scratch",)
    assert image_anomaly_config(None) == ImageAnomalyConfig()
    with pytest.raises(AsdError, match=r"fusion.image_anomalies.kinds=\['blobs', 'tone'\].*'cutpaste'"):
        image_anomaly_config({"kinds": ["blobs", "tone"]})
    with pytest.raises(AsdError, match="fusion.image_anomalies.kinds"):
        image_anomaly_config({"kinds": []})
    with pytest.raises(AsdError, match=r"unknown key\(s\) \['level_db'\]"):
        image_anomaly_config({"level_db": [0, 1]})


def test_forced_width_is_the_scratch_width():
    layout = ImageLayout(1, 32, 32)
    x = picture(layout)
    for side in (1, 3):
        gen = ImagePseudoAnomalies(ImageAnomalyConfig(width=(side, side)), layout)
        mask = gen(x, np.random.default_rng(1), kind="scratch").mask
        # a thin curve: its area is about width x length, far below a filled blob
        assert mask.sum() <= side * (side + 1) * 3 * 32


def test_plot_writes_a_png(tmp_path):
    for layout in (ImageLayout(1, 16, 16, patch=4), ImageLayout(3, 16, 16)):
        gen = ImagePseudoAnomalies(ImageAnomalyConfig(), layout)
        x, other = picture(layout), picture(layout, seed=1)
        injections = [gen(x, np.random.default_rng(i), other, kind=k) for i, k in enumerate(IMAGE_KINDS)]
        injections.append(gen(x, np.random.default_rng(0), kind="none"))
        path = plot_image_injections(x, injections, layout, tmp_path / f"inj{layout.channels}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not list(tmp_path.glob(".*.tmp")), "the atomic write leaves no temporary file"
    bad = Injection(x, "blobs", np.zeros((4, 4), dtype=bool))
    with pytest.raises(AsdError, match="mask has shape"):
        plot_image_injections(x, [bad], layout, tmp_path / "bad.png")
