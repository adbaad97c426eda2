"""Pixel-level AUROC of the members' error maps against ground-truth defect masks (`data=images`).

Every member that draws error maps (`has_error_map`: b2, b4, b6, b7) gives a squared error per
input bin; on pictures a bin is a pixel of one channel (`asd.features.ImageFrontend`), so the map
is the error averaged over channels, one value per pixel. With patches, each picture's map is put
back together from its patches (grid order, `ImageLayout`). The pixel AUROC of a member is
`sklearn.metrics.roc_auc_score` over every pixel of the test pictures whose ground truth is known:
normal pictures (all pixels normal) and defective pictures with a mask file; a defective picture
without a mask is left out (and counted). Per section and over all sections.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from asd.data.windows import ClipWindows

log = logging.getLogger(__name__)


def error_maps(member, dm, device: torch.device) -> np.ndarray:
    """The member's per-pixel error of every test picture, (N, H, W) float32."""
    layout = dm.layout
    dataset = dm.datasets["test"]
    items = ClipWindows(dataset, dm.windowing) if dm.windowing is not None else dataset
    loader = DataLoader(items, batch_size=dm.eval_batch_size, shuffle=False)
    channels, h, w = layout.view
    out = []
    member.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            _, _, err = member.error_map(batch)  # (B, C*h, w)
            out.append(err.float().reshape(-1, channels, h, w).mean(dim=1).cpu().numpy())  # (B, h, w)
    maps = np.concatenate(out) if out else np.zeros((0, h, w), dtype=np.float32)
    if layout.patch is None:
        return maps
    gh, gw = layout.grid
    maps = maps.reshape(-1, gh, gw, h, w).transpose(0, 1, 3, 2, 4)  # (N, gh, h, gw, w)
    return maps.reshape(-1, gh * h, gw * w)


def pixel_rows(ensemble, dm, device: torch.device) -> list[dict]:
    """Pixel AUROC per member with error maps, per section and `all`; [] without any mask."""
    test = dm.tables["test"]
    truth = [dm.mask_of("test", i) for i in range(len(test))]
    known = [i for i, m in enumerate(truth) if m is not None]
    defective = [i for i in known if not test[i].is_normal]
    if not defective:
        return []
    unknown = len(test) - len(known)
    if unknown:
        log.info("pixel AUROC: %d defective test pictures have no mask file and are left out", unknown)
    members = [n for n, m in ensemble.members.items() if m.has_error_map]
    rows = []
    for name in members:
        maps = error_maps(ensemble.members[name], dm, device)
        groups: dict[str, list[int]] = {}
        for i in known:
            groups.setdefault(test[i].section, []).append(i)
        groups["all"] = known
        for section, idx in groups.items():
            y = np.concatenate([truth[i].reshape(-1) for i in idx])
            if y.all() or not y.any():
                continue  # one class of pixels: no AUROC
            s = np.concatenate([maps[i].reshape(-1) for i in idx])
            rows.append(
                {
                    "member": name,
                    "section": section,
                    "pixel_auroc": float(roc_auc_score(y, s)),
                    "pictures": len(idx),
                    "defect_pixels": int(y.sum()),
                    "pixels": int(y.size),
                }
            )
    return rows
