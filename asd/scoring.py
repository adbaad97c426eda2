"""Scoring backends fitted on training normals, per-group score normalisation and label-free fusion.

Ids follow the batch contract of `asd.branches.base`: `section` is a (machine, section) class id,
unique across machines, so a (section, domain) pair is a (machine, section, domain) group; `domain`
is 0 source, 1 target, 2 unknown.

Fitted state is kept as module *extra state* (`get_extra_state`/`set_extra_state`, a dict of plain
tensors), not as parameters or buffers: bank sizes vary between fits, `torch.load(weights_only=True)`
reads it, and `.half()`/`.to(dtype)` on a surrounding model can never degrade it. Scoring moves the
state to the query's device (one cached copy) and returns a tensor on that device.

One file: the backends and the normaliser share the fitted-state contract (extra state, device
cache, id checks) described here, and both backends share the source/target calibration
(`bank_calibration`); split apart they would import each other's private helpers.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from asd.choices import FUSIONS
from asd.errors import AsdError

log = logging.getLogger(__name__)

DOMAIN_NAMES = {0: "source", 1: "target", 2: "unknown"}
_BLOCK = 4096  # query rows per block where a backend has no `chunk` setting


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and distances, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _out_dtype(x: Tensor) -> torch.dtype:
    """Scores come back in the input's float dtype, at least float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_feats(feats: Tensor, where: str) -> None:
    """`feats` must be a finite, non-empty (N, D) float tensor."""
    if not isinstance(feats, Tensor) or feats.dim() != 2 or not feats.is_floating_point():
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise AsdError(f"{where}: `feats` must be a float tensor of shape (N, D), got {got}")
    if feats.shape[1] == 0:
        raise AsdError(f"{where}: `feats` has 0 feature dimensions; the member produced empty embeddings")
    _check_finite(feats, "feats", where)


def _check_finite(x: Tensor, name: str, where: str) -> None:
    bad = ~torch.isfinite(x)
    if x.numel() and bool(bad.any()):
        rows = torch.nonzero(bad.reshape(x.shape[0], -1).any(dim=1)).flatten()
        raise AsdError(
            f"{where}: `{name}` has {int(bad.sum())} NaN/inf values in rows {rows[:10].tolist()}"
            f"{' ...' if rows.numel() > 10 else ''}; the member that produced them diverged or read "
            "broken audio - fix or retrain it before scoring"
        )


def _check_ids(ids: Tensor, name: str, n: int, where: str, device: torch.device) -> Tensor:
    """An integer (N,) id tensor, moved to `device`."""
    if (
        not isinstance(ids, Tensor)
        or ids.dim() != 1
        or ids.dtype.is_floating_point
        or ids.dtype == torch.bool
    ):
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise AsdError(f"{where}: `{name}` must be an integer tensor of shape (N,), got {got}")
    if ids.shape[0] != n:
        raise AsdError(
            f"{where}: `{name}` has {ids.shape[0]} entries but there are {n} rows; pass one per clip"
        )
    return ids.to(device=device, dtype=torch.long)


def _check_domain(domain: Tensor, where: str) -> None:
    bad = (domain < 0) | (domain > 2)
    if bool(bad.any()):
        values = sorted(set(domain[bad].tolist()))
        raise AsdError(f"{where}: `domain` has values {values}; use 0 source, 1 target, 2 unknown")


def _check_empty(n: int, where: str) -> None:
    if n == 0:
        raise AsdError(f"{where}: no clips to fit on; pass the embeddings of at least one training normal")


def _plain_state(state: Any, cls: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Validate a loaded extra state: a dict holding exactly `keys` (or nothing: unfitted)."""
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AsdError(f"{cls}: checkpoint state is not a dict of tensors; it was not written by {cls}")
    missing = set(keys) - set(state)
    if state and missing:
        raise AsdError(f"{cls}: checkpoint state lacks {sorted(missing)}; it was written by another version")
    return dict(state)


class _DeviceCache:
    """Fitted tensors plus one copy of them on the device of the latest query."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] = {}
        self._copy: dict[str, Tensor] = {}
        self._device: torch.device | None = None

    def set(self, state: dict[str, Tensor]) -> None:
        self.state, self._copy, self._device = state, {}, None

    def on(self, device: torch.device) -> dict[str, Tensor]:
        if self._device != device:
            self._copy = {k: v.to(device) for k, v in self.state.items()}
            self._device = device
        return self._copy


def _knn_mean_distance(
    query: Tensor, bank: Tensor, k: int, cosine: bool, chunk: int, inv_scale: Tensor | None = None
) -> Tensor:
    """Mean distance of each query row to its k nearest bank rows, (B, D) x (N, D) -> (B,).

    Candidates are ranked with float32 matrix products over `chunk` x `chunk` tiles, so memory
    stays bounded for any bank; the k winners' distances are then recomputed exactly in float64.
    With `inv_scale` (N,), each bank row's distance is multiplied by its entry, and the k rows
    nearest by that rescaled distance are averaged (the density rescaling of `KnnBackend`).
    """
    acc = _acc_dtype(query.device)
    k = min(k, bank.shape[0])
    query32, bank32 = query.float(), bank.float()
    if inv_scale is not None and cosine:  # rescaled distances need the true cosine, not q.b
        query32 = query32 / query32.norm(dim=1, keepdim=True).clamp_min(1e-30)
    # rank by a similarity that is monotone in the distance per query row: q.b for cosine (the bank
    # is unit-norm), 2 q.b - |b|^2 = |q|^2 - |q - b|^2 for euclidean
    neg_sq = None if cosine else -(bank32 * bank32).sum(dim=1)  # (N,)
    means = []
    for qs in range(0, query32.shape[0], chunk):
        qb = query32[qs : qs + chunk]  # (b, D)
        best_val = best_idx = None
        for bs in range(0, bank32.shape[0], chunk):
            bb = bank32[bs : bs + chunk]  # (n, D)
            if cosine:
                sim = qb @ bb.T  # (b, n)
            else:
                sim = torch.addmm(neg_sq[None, bs : bs + chunk], qb, bb.T, alpha=2)  # (b, n)
            if inv_scale is not None:  # rank by minus the rescaled distance
                if cosine:
                    dist = (1 - sim).clamp_min(0)  # (b, n)
                else:
                    dist = ((qb * qb).sum(dim=1, keepdim=True) - sim).clamp_min(0).sqrt()  # (b, n)
                sim = -dist * inv_scale[None, bs : bs + chunk].float()
            val, idx = sim.topk(min(k, bb.shape[0]), dim=1)  # (b, k')
            idx = idx + bs
            if best_val is not None:
                val, idx = torch.cat([best_val, val], dim=1), torch.cat([best_idx, idx], dim=1)
                val, pick = val.topk(k, dim=1)
                idx = idx.gather(1, pick)
            best_val, best_idx = val, idx
        # exact distances of the winners, a few queries at a time so (b, k, D) stays ~ chunk x D
        step = max(1, chunk // k)
        for rs in range(0, qb.shape[0], step):
            q = qb[rs : rs + step].to(acc)[:, None, :]  # (r, 1, D)
            winners = best_idx[rs : rs + step]  # (r, k)
            nb = bank.index_select(0, winners.flatten()).to(acc).view(*winners.shape, -1)  # (r, k, D)
            if cosine:
                q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                nb = nb / nb.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                dist = (1 - (q * nb).sum(dim=-1)).clamp_min(0)  # (r, k)
            else:
                dist = (nb - q).norm(dim=-1)  # (r, k)
            if inv_scale is not None:
                dist = dist * inv_scale[winners].to(acc)  # (r, k)
            means.append(dist.mean(dim=1))
    return torch.cat(means) if means else query.new_zeros(0, dtype=acc)


class KnnBackend(nn.Module):
    """k-nearest-neighbour distance to training normals, one bank per (section, domain), min over domains.

    Domain 2 (unknown) training clips join the source bank. A bank smaller than `k` is used whole,
    so its score is the mean distance to all of its clips (DCASE target banks hold 3-10 clips); `fit`
    logs which banks that applies to. With `normalize`, features are L2-normalised and the distance
    is the cosine distance 1 - cos; otherwise it is the euclidean distance.

    With `density`, each bank clip's distance is divided by its local scale rho, as in LOF-like
    normalisation, and the score is the mean rescaled distance of the `k` bank clips nearest in
    rescaled distance. rho is the mean distance of the clip to its `k` nearest other *source* clips
    of its section: the source bank is dense, so a source clip's rho is the spacing of normal
    variation around it, and a target clip's rho is how far the target condition lies from the
    source one. A query near one of the few target clips is then not scored as far as the sparse
    target bank makes it look, which balances the two domains' scores. A section with fewer than 2
    source clips measures rho against all of its clips; one with a single clip has rho = 1. Off by
    default.

    With `calibrate`, each bank's distances are standardised before the min over banks, with the
    mean and std of its own clips' leave-one-out distances (`bank_calibration`): a sparse target
    bank of 5 clips and a dense source bank of 1,000 then speak the same scale, without knowing a
    test clip's domain. Off by default.
    """

    _KEYS = ("normalize", "bank", "section", "domain", "size")
    _MIN_RHO = 1e-6  # duplicate clips have rho 0; a floor keeps their rescaled distances finite

    def __init__(
        self,
        k: int = 1,
        normalize: bool = True,
        chunk: int = 4096,
        density: bool = False,
        calibrate: bool = False,
    ):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise AsdError(f"KnnBackend: k={k!r}; set `k` to a positive integer")
        if not isinstance(chunk, int) or chunk < 1:
            raise AsdError(f"KnnBackend: chunk={chunk!r}; set `chunk` to a positive integer")
        self.k, self.normalize, self.chunk, self.density = k, bool(normalize), chunk, bool(density)
        self.calibrate = bool(calibrate)
        self._fitted = _DeviceCache()

    @property
    def _state_keys(self) -> tuple[str, ...]:
        return self._KEYS + ("rho",) * self.density + ("loc", "scale") * self.calibrate

    @property
    def fitted(self) -> bool:
        return bool(self._fitted.state)

    def fit(self, feats: Tensor, section: Tensor, domain: Tensor) -> KnnBackend:
        """Build the banks from training normals: feats (N, D), section (N,), domain (N,)."""
        where = "KnnBackend.fit"
        _check_feats(feats, where)
        _check_empty(feats.shape[0], where)
        section = _check_ids(section, "section", feats.shape[0], where, feats.device)
        domain = _check_ids(domain, "domain", feats.shape[0], where, feats.device)
        _check_domain(domain, where)
        bank_domain = (domain == 1).long()  # unknown (2) -> source bank (0)
        x = feats.detach().to(_acc_dtype(feats.device))
        if self.normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        pairs = torch.stack([section, bank_domain], dim=1)  # (N, 2)
        keys, inverse, counts = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)  # rows grouped bank by bank, in `keys` order
        small = [(s, d, n) for (s, d), n in zip(keys.tolist(), counts.tolist(), strict=True) if n < self.k]
        if small:
            names = ", ".join(f"section {s} {DOMAIN_NAMES[d]} ({n} clips)" for s, d, n in small)
            log.info(
                "kNN banks smaller than k=%d score the mean distance to all their clips: %s", self.k, names
            )
        state = {
            "normalize": torch.tensor(self.normalize),
            "bank": x[order].float(),
            "section": keys[:, 0].cpu(),
            "domain": keys[:, 1].cpu(),
            "size": counts.cpu(),
        }
        if self.density:
            state["rho"] = self._local_scale(x, section, bank_domain == 0)[order].float()
        if self.calibrate:
            left_out = self._left_out(state)
            state["loc"], state["scale"] = bank_calibration(
                left_out, state["section"], state["domain"], state["size"], "kNN"
            )
        self._fitted.set(state)
        return self

    def _left_out(self, state: dict[str, Tensor]) -> list[Tensor]:
        """Each bank clip's k-NN mean distance to the other clips of its bank, one (n,) per bank.

        A clip is its own nearest neighbour at distance 0 (also rescaled), so the mean over its
        m = min(k + 1, n) nearest with itself, times m / (m - 1), is the mean over its m - 1 others.
        """
        out, start = [], 0
        for n in state["size"].tolist():
            bank = state["bank"][start : start + n]
            scale = 1.0 / state["rho"][start : start + n] if self.density else None
            if n < 2:
                out.append(bank.new_zeros(0, dtype=torch.float64))
            else:
                m = min(self.k + 1, n)
                with_self = _knn_mean_distance(bank, bank, m, self.normalize, self.chunk, scale)
                out.append(with_self.double().cpu() * m / (m - 1))
            start += n
        return out

    def _local_scale(self, x: Tensor, section: Tensor, source: Tensor) -> Tensor:
        """rho per clip, (N,): mean distance to its k nearest other source clips of its section.

        A section with fewer than 2 source clips measures against all of its clips; one with a
        single clip keeps rho = 1.
        """
        rho = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        lone = []
        for s in torch.unique(section).tolist():
            mine = section == s
            reference = mine & source if int((mine & source).sum()) >= 2 else mine
            ref = torch.nonzero(reference).flatten()
            if ref.numel() < 2:
                lone.append(s)
                continue
            m = min(self.k + 1, ref.numel())  # a reference clip is among its m nearest, at distance 0
            mean_with_self = _knn_mean_distance(x[ref], x[ref], m, self.normalize, self.chunk)  # (n,)
            rho[ref] = (mean_with_self * m / (m - 1)).to(x.dtype)
            others = torch.nonzero(mine & ~reference).flatten()
            if others.numel():
                rho[others] = _knn_mean_distance(x[others], x[ref], self.k, self.normalize, self.chunk).to(
                    x.dtype
                )
        if lone:
            log.info("kNN density: sections %s have one training clip; it keeps rho = 1", lone)
        return rho.clamp_min(self._MIN_RHO)

    def score(self, feats: Tensor, section: Tensor) -> Tensor:
        """Anomaly score per clip, (B, D) -> (B,): min over the section's banks of the k-NN mean distance."""
        where = "KnnBackend.score"
        state = self._require_fitted(where)
        _check_feats(feats, where)
        section = _check_ids(section, "section", feats.shape[0], where, feats.device)
        dim = state["bank"].shape[1]
        if feats.shape[1] != dim:
            raise AsdError(
                f"{where}: `feats` has {feats.shape[1]} dims but the banks have {dim}; "
                "score with the member and features the backend was fitted on"
            )
        banks = self._bank_slices(state)
        wanted = torch.unique(section).tolist()
        missing = [s for s in wanted if s not in banks]
        if missing:
            raise AsdError(
                f"{where}: section id(s) {missing} have no kNN bank: the training data given to "
                "fit() has no clips of them; fit on training normals of every section you score"
            )
        acc = _acc_dtype(feats.device)
        fitted = self._fitted.on(feats.device)
        bank = fitted["bank"]
        inv_rho = 1.0 / fitted["rho"] if self.density else None  # (N,)
        out = torch.full((feats.shape[0],), float("inf"), dtype=acc, device=feats.device)
        with torch.autocast(feats.device.type, enabled=False):  # ranking in float16 would be wrong
            for s in wanted:
                rows = torch.nonzero(section == s).flatten()
                for g, start, size in banks[s]:
                    scale = None if inv_rho is None else inv_rho[start : start + size]
                    d = _knn_mean_distance(
                        feats[rows], bank[start : start + size], self.k, self.normalize, self.chunk, scale
                    )  # (b,)
                    if self.calibrate:
                        d = (d - fitted["loc"][g].to(acc)) / fitted["scale"][g].to(acc)
                    out[rows] = torch.minimum(out[rows], d)
        return out.to(_out_dtype(feats))

    def _require_fitted(self, where: str) -> dict[str, Tensor]:
        if not self.fitted:
            raise AsdError(
                f"{where}: the backend is not fitted; call fit() on training normals first, "
                "or load the state_dict of a fitted backend"
            )
        return self._fitted.state

    @staticmethod
    def _bank_slices(state: dict[str, Tensor]) -> dict[int, list[tuple[int, int, int]]]:
        """section id -> [(bank index, first row, rows)] of its source and/or target bank."""
        slices: dict[int, list[tuple[int, int, int]]] = {}
        start = 0
        for g, (s, n) in enumerate(zip(state["section"].tolist(), state["size"].tolist(), strict=True)):
            slices.setdefault(s, []).append((g, start, n))
            start += n
        return slices

    def get_extra_state(self) -> dict[str, Tensor]:
        return dict(self._fitted.state)

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state and ("rho" in state) != self.density:
            raise AsdError(
                f"KnnBackend: the checkpoint's banks were built with density={'rho' in state} but this "
                f"backend has density={self.density}; set the same `density` (b3: knn_density)"
            )
        if isinstance(state, dict) and state and ("loc" in state) != self.calibrate:
            raise AsdError(
                f"KnnBackend: the checkpoint's banks were built with calibrate={'loc' in state} but this "
                f"backend has calibrate={self.calibrate}; set the same `calibrate` or refit the banks"
            )
        state = _plain_state(state, "KnnBackend", self._state_keys)
        if state and bool(state["normalize"]) != self.normalize:
            raise AsdError(
                f"KnnBackend: the checkpoint's banks were built with normalize={bool(state['normalize'])}"
                f" but this backend has normalize={self.normalize}; set the same `normalize`"
            )
        self._fitted.set(state)

    def extra_repr(self) -> str:
        density = ", density=True" if self.density else ""
        calibrate = ", calibrate=True" if self.calibrate else ""
        return f"k={self.k}, normalize={self.normalize}, chunk={self.chunk}{density}{calibrate}"


def bank_calibration(
    left_out: list[Tensor], bank_section: Tensor, bank_domain: Tensor, bank_size: Tensor, what: str
) -> tuple[Tensor, Tensor]:
    """Location and scale (G,) of each bank's scores from its clips' left-out scores (one (n,) per bank).

    A bank's own mean, and its own sample std when it has 3 or more clips; else the std pooled
    over its section's banks (the within-bank spread, each around its own mean). A bank of one clip
    has no left-out score: it takes its section's other banks' values, and a section where no
    bank has 2 clips keeps the raw scores (location 0, scale 1). One info line names the banks that
    borrowed.
    """
    left_out = [v.detach().to("cpu", torch.float64) for v in left_out]
    loc = torch.zeros(len(left_out), dtype=torch.float64)
    scale = torch.ones(len(left_out), dtype=torch.float64)
    borrowed = []
    sections = bank_section.tolist()
    for s in sorted(set(sections)):
        mine = [g for g, t in enumerate(sections) if t == s]
        ss = sum(
            float(((left_out[g] - left_out[g].mean()) ** 2).sum()) for g in mine if left_out[g].numel() >= 2
        )
        dof = sum(left_out[g].numel() - 1 for g in mine if left_out[g].numel() >= 2)
        pooled_std = math.sqrt(ss / dof) if dof and ss > 0 else None
        pooled_loc = torch.cat([left_out[g] for g in mine]).mean() if dof else None
        for g in mine:
            v = left_out[g]
            own_std = float(v.std()) if v.numel() >= 3 else 0.0
            if v.numel() >= 2:
                loc[g] = v.mean()
            elif pooled_loc is not None:
                loc[g] = pooled_loc
            if own_std > 1e-12 * max(1.0, abs(float(loc[g]))):
                scale[g] = own_std
            elif pooled_std is not None:
                scale[g] = pooled_std
            if v.numel() < 3:
                domain = DOMAIN_NAMES.get(int(bank_domain[g]), "all domains")
                borrowed.append(f"section {s} {domain} ({int(bank_size[g])} clips)")
    if borrowed:
        log.info(
            "%s bank calibration: banks of < 3 clips borrow their section's spread: %s",
            what,
            ", ".join(borrowed),
        )
    return loc.float(), scale.float()


def ledoit_wolf(x: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrunk covariance of rows x (N, D) -> ((D, D), shrinkage), as in Ledoit & Wolf (2004).

    Shrinks the maximum-likelihood covariance S (divided by N) toward mu*I with mu = tr(S)/D, by
    the estimated optimal weight min(b^2, d^2)/d^2 with d^2 = |S - mu I|^2 / D and
    b^2 = sum_k |x_k x_k^T - S|^2 / (N^2 D) = (sum_k |x_k|^4 - N |S|^2) / (N^2 D).
    """
    x = x.to(_acc_dtype(x.device))
    n, dim = x.shape
    xc = x - x.mean(dim=0)  # (N, D)
    cov = xc.T @ xc / n  # (D, D)
    mu = torch.trace(cov) / dim
    d2 = ((cov - mu * torch.eye(dim, dtype=x.dtype, device=x.device)) ** 2).sum() / dim
    b2 = ((xc * xc).sum(dim=1) ** 2).sum() - n * (cov * cov).sum()
    b2 = torch.minimum(b2 / (n * n * dim), d2)
    shrinkage = 0.0 if float(d2) == 0 else float(b2 / d2)
    return _shrink(cov, shrinkage), shrinkage


def _shrink(cov: Tensor, shrinkage: float) -> Tensor:
    """(1 - s) S + s mu I with mu = tr(S)/D: the identity scaled to keep the total variance."""
    mu = torch.trace(cov) / cov.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return (1 - shrinkage) * cov + shrinkage * mu * eye


class MahalanobisBackend(nn.Module):
    """Mahalanobis distance to Gaussian models of training normals per section (and domain).

    The covariance is the maximum-likelihood one (divided by N) shrunk toward the scaled identity:
    `shrinkage="auto"` picks the weight by Ledoit-Wolf, a float in [0, 1] fixes it (0 = no
    shrinkage, 1 = scaled identity). With `per_domain`, source (plus unknown) and target clips get
    separate models and the score is the min over them - the "selective Mahalanobis" of the DCASE
    baseline; a domain whose own covariance is singular (one clip, or two with Ledoit-Wolf) keeps its
    own mean but borrows its section's pooled covariance. With `covariance="pooled"`, every domain
    keeps its own mean and shares one covariance: the section's within-domain one (each clip's
    deviation from its own domain's mean), so 5 target clips are not asked for a 128-dim covariance.
    The score is the distance itself, sqrt((x - m)^T C^-1 (x - m)), not its square.

    With `calibrate`, each model's distances are standardised before the min over models, with
    the mean and std of its own clips' left-out distances (`bank_calibration`): each clip measured
    against a model refitted without it (`folds` refits per section, dealt so that a domain of up
    to `folds` clips is left out one clip at a time). Off by default.

    `fit(..., copies=)` adds augmented copies of each training clip (speed-perturbed ones from
    `asd.branches.logmel_stats`): they join the spread of their clip's domain (with the pooled
    covariance, as deviations from the mean of the domain's real clips), are left out together with
    it, and are never measured themselves, so the calibration describes real clips. Each domain's
    mean is its real clips' mean: a copy teaches a direction the sound varies in, not where the
    machine's sound is (averaged into a domain of one clip, copies at other speeds smeared its
    tones).
    Whether a domain has clips enough for a covariance of its own counts its real clips; a section
    too small for one borrows the other sections' spread of real clips only, so there the copies
    change nothing.
    """

    _KEYS = ("mean", "whiten", "section", "domain")
    COVARIANCES = ("domain", "pooled")

    def __init__(
        self,
        shrinkage: float | str = "auto",
        per_domain: bool = True,
        covariance: str = "domain",
        calibrate: bool = False,
        folds: int = 10,
    ):
        super().__init__()
        ok = isinstance(shrinkage, int | float) and not isinstance(shrinkage, bool) and 0 <= shrinkage <= 1
        if shrinkage != "auto" and not ok:
            raise AsdError(f"MahalanobisBackend: shrinkage={shrinkage!r}; use 'auto' or a number in [0, 1]")
        if covariance not in self.COVARIANCES:
            raise AsdError(f"MahalanobisBackend: covariance={covariance!r}; use one of {self.COVARIANCES}")
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
            raise AsdError(f"MahalanobisBackend: folds={folds!r}; use a whole number >= 2")
        self.shrinkage, self.per_domain, self.covariance = shrinkage, bool(per_domain), covariance
        self.calibrate, self.folds = bool(calibrate), folds
        self._fitted = _DeviceCache()

    @property
    def fitted(self) -> bool:
        return bool(self._fitted.state)

    def fit(
        self, feats: Tensor, section: Tensor, domain: Tensor, copies: Tensor | None = None
    ) -> MahalanobisBackend:
        """Fit mean and whitening per group on training normals: feats (N, D), section (N,), domain (N,);
        `copies` (N, R, D): R augmented copies of each clip (class docstring), or None."""
        where = "MahalanobisBackend.fit"
        _check_feats(feats, where)
        _check_empty(feats.shape[0], where)
        device = feats.device if feats.device.type != "mps" else torch.device("cpu")  # MPS lacks float64
        section = _check_ids(section, "section", feats.shape[0], where, device)
        domain = _check_ids(domain, "domain", feats.shape[0], where, device)
        _check_domain(domain, where)
        x = feats.detach().to(device=device, dtype=torch.float64)
        extra = None
        if copies is not None:
            n, d = feats.shape
            shaped = isinstance(copies, Tensor) and copies.is_floating_point() and copies.ndim == 3
            if not shaped or copies.shape[0] != n or copies.shape[2] != d:
                got = tuple(copies.shape) if isinstance(copies, Tensor) else type(copies).__name__
                raise AsdError(
                    f"{where}: `copies` is {got}; expected a float tensor (N, R, D) = ({n}, R, {d}), "
                    "R copies of each training clip"
                )
            bad = torch.nonzero(~torch.isfinite(copies).all(dim=2))[:5].tolist()  # (clip, copy) pairs
            if bad:
                raise AsdError(
                    f"{where}: `copies` has NaN/inf values in (clip, copy) {bad}; check their features"
                )
            extra = copies.detach().to(device=device, dtype=torch.float64)
        # -1 = all domains pooled; else unknown clips join the source model
        group_domain = (domain == 1).long() if self.per_domain else torch.full_like(domain, -1)
        means, whitens, sections, domains, borrowed, left_out, sizes = [], [], [], [], [], [], []
        # too few clips for a covariance of its own: one clip, or two, where Ledoit-Wolf shrinks nothing
        few = 3 if self.shrinkage == "auto" else 2
        lone = [s for s in torch.unique(section).tolist() if int((section == s).sum()) < few]
        shared = self._shared_covariance(x, section, group_domain, lone, where) if lone else None
        if lone and extra is not None:
            log.info(
                "Mahalanobis: the augmented copies change nothing in sections %s: they borrow the other "
                "sections' spread of real clips, and a mean is its real clips' own",
                lone,
            )
        for s in torch.unique(section).tolist():
            in_section = section == s
            xs, gs = x[in_section], group_domain[in_section]
            es = extra[in_section] if extra is not None else None
            models = self._fit_section(xs, gs, f"section {s}", borrowed, shared if s in lone else None, es)
            if self.calibrate:
                left_out += self._left_out(xs, gs, models, es)
            for d, (mean, whiten) in models.items():
                means.append(mean)
                whitens.append(whiten)
                sections.append(s)
                domains.append(d)
                sizes.append(int((gs == d).sum()))
        if borrowed:
            log.warning(
                "Mahalanobis groups too small for a covariance of their own use their section's: %s",
                ", ".join(borrowed),
            )
        state = {
            "mean": torch.stack(means).float(),  # (G, D)
            "whiten": torch.stack(whitens).float(),  # (G, D, D)
            "section": torch.tensor(sections),
            "domain": torch.tensor(domains),
        }
        if self.calibrate:
            state["loc"], state["scale"] = bank_calibration(
                left_out, state["section"], state["domain"], torch.tensor(sizes), "Mahalanobis"
            )
        self._fitted.set(state)
        return self

    def _shared_covariance(
        self, x: Tensor, section: Tensor, group: Tensor, lone: list[int], where: str
    ) -> Tensor:
        """The covariance that sections of too few clips borrow: every other section's within-group spread.

        A section of one training clip (a MIMII unit with one normal left for fitting), or of two
        with Ledoit-Wolf shrinkage (whose estimate for two clips is no shrinkage, a singular
        covariance), keeps its clips' mean; its spread can only come from the machine's other
        sections. When no section has enough clips there is no spread to learn anywhere: the
        identity, so the score is the euclidean distance to the section's mean. Warns once either way.
        """
        rest = ~torch.isin(section, torch.tensor(lone, dtype=section.dtype, device=section.device))
        if int(rest.sum()) < 2:
            log.warning(
                "Mahalanobis: no section has enough training clips for a covariance (1, or 2 with "
                "shrinkage='auto'); the score is the euclidean distance to the section's mean (add "
                "training normals for a Mahalanobis distance)"
            )
            return torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        pairs = torch.stack([section[rest], group[rest]], dim=1)
        xr = x[rest]
        keys, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        centred = torch.cat([xr[inverse == g] - xr[inverse == g].mean(dim=0) for g in range(len(keys))])
        log.warning(
            "Mahalanobis sections %s have too few training clips for a covariance (1, or 2 with "
            "shrinkage='auto'): each keeps its own mean, with the covariance of the other sections' spread",
            lone,
        )
        cov = self._covariance(centred)
        if int(torch.linalg.cholesky_ex(cov)[1]) != 0:
            raise AsdError(
                f"{where}: sections {lone} have too few training clips and the other sections' covariance is "
                f"singular (shrinkage={self.shrinkage!r}); use shrinkage='auto' or add training normals"
            )
        return cov

    def _fit_section(
        self,
        x: Tensor,
        group: Tensor,
        what: str,
        borrowed: list[str] | None = None,
        shared: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """group id -> (mean (D,), whitening L^-1 (D, D)) of one section's clips x (n, D).

        `shared`: one covariance for every group (a section of one clip borrows it), fitting none.
        `extra` (n, R, D): each clip's augmented copies, which join its group's spread (not its mean).
        """
        groups = torch.unique(group).tolist()
        clips = {d: int((group == d).sum()) for d in groups}  # real clips, copies not counted
        # enough for a covariance of its own: 2 clips; with copies, the real clips Ledoit-Wolf needs
        # (3: it shrinks nothing for 2), since the copies of one or two clips show only the speed direction
        least = 3 if extra is not None and self.shrinkage == "auto" else 2
        enough = {d: clips[d] >= least for d in groups}  # without copies: the rule as it always was
        # each group's mean is its real clips' mean: a copy is a direction of variation, not a
        # clip of the machine; averaged in, copies moved to other speeds smear the tones of the mean
        means = {d: x[group == d].mean(dim=0) for d in groups}
        if extra is not None:
            x = torch.cat([x, extra.reshape(-1, x.shape[1])])
            group = torch.cat([group, group.repeat_interleave(extra.shape[1])])
        pooled = shared
        if pooled is None and self.covariance == "pooled" and len(groups) > 1:
            deviations = torch.cat([x[group == d] - means[d] for d in groups])  # within-domain spread
            pooled = self._covariance(deviations)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        models = {}
        for d in groups:
            xs = x[group == d]  # (n, D)
            info = torch.ones((), dtype=torch.int32)
            if pooled is not None:
                chol, info = torch.linalg.cholesky_ex(pooled)
            elif enough[d]:
                chol, info = torch.linalg.cholesky_ex(self._covariance(xs))
            if int(info) != 0 and xs.shape[0] < x.shape[0]:
                # Too few clips of this domain for a covariance of its own (a single clip, or
                # two, where Ledoit-Wolf shrinks nothing): borrow the section's pooled one.
                pooled = self._covariance(x) if pooled is None else pooled
                chol, info = torch.linalg.cholesky_ex(pooled)
                if borrowed is not None:
                    borrowed.append(f"{what} {DOMAIN_NAMES[d]} ({clips[d]} clips)")
            if int(info) != 0:
                raise AsdError(
                    f"MahalanobisBackend.fit: the covariance of {what} {DOMAIN_NAMES.get(d, 'all domains')} "
                    f"is singular ({clips[d]} clips, {x.shape[1]} dims, shrinkage={self.shrinkage!r}); "
                    "use shrinkage='auto' or a value > 0, or more clips than dimensions"
                )
            models[d] = (means[d], torch.linalg.solve_triangular(chol, eye, upper=False))  # C = L L^T
        return models

    def _left_out(
        self, x: Tensor, group: Tensor, models: dict[int, tuple[Tensor, Tensor]], extra: Tensor | None = None
    ) -> list[Tensor]:
        """Each clip's distance to its own group's model refitted without it (and its `extra` copies),
        one (n,) per group.

        Folds are dealt round-robin over the section's clips, group after group, so a fold holds
        at most one clip of a group of up to `folds` clips, and a section of up to `folds` clips is
        left out one clip at a time. A group of one clip has no left-out distance, nor has a clip
        whose refit is singular (too few clips remain); they are not in the returned tensors.
        """
        fold = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        dealt = 0
        for d in models:
            rows = torch.nonzero(group == d).flatten()
            fold[rows] = (dealt + torch.arange(rows.numel(), device=x.device)) % self.folds
            dealt += rows.numel()
        dist = torch.full((x.shape[0],), math.nan, dtype=torch.float64)  # NaN: not measured
        for f in torch.unique(fold).tolist():
            held = fold == f
            keep = ~held
            if int(keep.sum()) < 2:  # nothing to fit a covariance on: these clips stay unmeasured
                continue
            try:
                kept = extra[keep] if extra is not None else None
                refit = self._fit_section(x[keep], group[keep], "left-out refit", extra=kept)
            except AsdError:  # singular without these clips: they stay unmeasured, like a lone clip
                continue
            for d, (mean, whiten) in refit.items():
                rows = torch.nonzero(held & (group == d)).flatten()
                dist[rows.cpu()] = ((x[rows] - mean) @ whiten.T).norm(dim=1).cpu()
        per_group = [dist[(group == d).cpu()] for d in models]
        return [v[v.isfinite()] for v in per_group]

    def _covariance(self, x: Tensor) -> Tensor:
        if self.shrinkage == "auto":
            return ledoit_wolf(x)[0]
        xc = x - x.mean(dim=0)
        return _shrink(xc.T @ xc / x.shape[0], float(self.shrinkage))

    def score(self, feats: Tensor, section: Tensor) -> Tensor:
        """Anomaly score per clip, (B, D) -> (B,): min over the section's models of the distance."""
        where = "MahalanobisBackend.score"
        if not self.fitted:
            raise AsdError(
                f"{where}: the backend is not fitted; call fit() on training normals first, "
                "or load the state_dict of a fitted backend"
            )
        _check_feats(feats, where)
        section = _check_ids(section, "section", feats.shape[0], where, feats.device)
        state = self._fitted.on(feats.device)
        dim = state["mean"].shape[1]
        if feats.shape[1] != dim:
            raise AsdError(
                f"{where}: `feats` has {feats.shape[1]} dims but the models have {dim}; "
                "score with the member and features the backend was fitted on"
            )
        known = set(self._fitted.state["section"].tolist())
        wanted = torch.unique(section).tolist()
        missing = [s for s in wanted if s not in known]
        if missing:
            raise AsdError(
                f"{where}: section id(s) {missing} have no Mahalanobis model: the training data "
                "given to fit() has no clips of them; fit on training normals of every section you score"
            )
        acc = _acc_dtype(feats.device)
        out = torch.full((feats.shape[0],), float("inf"), dtype=acc, device=feats.device)
        group_section = self._fitted.state["section"].tolist()
        with torch.autocast(feats.device.type, enabled=False):
            for g, s in enumerate(group_section):
                rows = torch.nonzero(section == s).flatten()
                mean, whiten = state["mean"][g].to(acc), state["whiten"][g].to(acc)  # (D,), (D, D)
                for start in range(0, rows.shape[0], _BLOCK):
                    r = rows[start : start + _BLOCK]
                    z = (feats[r].to(acc) - mean) @ whiten.T  # (b, D) whitened residuals
                    d = z.norm(dim=1)
                    if self.calibrate:
                        d = (d - state["loc"][g].to(acc)) / state["scale"][g].to(acc)
                    out[r] = torch.minimum(out[r], d)
        return out.to(_out_dtype(feats))

    def get_extra_state(self) -> dict[str, Tensor]:
        return dict(self._fitted.state)

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state and ("loc" in state) != self.calibrate:
            raise AsdError(
                f"MahalanobisBackend: the checkpoint's models were built with calibrate={'loc' in state} "
                f"but this backend has calibrate={self.calibrate}; set the same `calibrate` or refit"
            )
        keys = self._KEYS + ("loc", "scale") * self.calibrate
        self._fitted.set(_plain_state(state, "MahalanobisBackend", keys))

    def extra_repr(self) -> str:
        extra = f", covariance={self.covariance!r}" if self.covariance != "domain" else ""
        extra += f", calibrate=True, folds={self.folds}" if self.calibrate else ""
        return f"shrinkage={self.shrinkage!r}, per_domain={self.per_domain}{extra}"


class GroupNormalizer(nn.Module):
    """z-scores per (section, domain) from a member's scores on held-out normal clips.

    Statistics are float64 mean and sample std (divided by N - 1). Clips of unknown domain (2)
    always use their section's pooled statistics.

    With `shrinkage` = 0, a (section, source|target) group with fewer than 2 clips or a std of ~0
    (at most 1e-6 |mean|) uses its section's pooled statistics, a degenerate section the global
    ones; `fit` logs a warning naming every such group. With `shrinkage` = k > 0, a group's mean
    and variance are pulled towards its section's pooled ones as if k more clips had shown them:
    mean = (n * group mean + k * section mean) / (n + k) and
    var = (sum of squared deviations from the group mean + k * section variance) / (n - 1 + k).
    A group of one clip then keeps part of the domain shift it shows, with the section's spread;
    only an empty group falls back. The mean matters where a domain has 2 clips scored out of
    fold (a first-shot target domain): each was scored by a copy that trained on the other alone,
    so their mean sits far above the test clips' (docs/results.md, "Shrinking the domain
    statistics towards the section's").
    """

    _KEYS = ("section", "domain", "mean", "std")

    def __init__(self, shrinkage: float = 0.0) -> None:
        super().__init__()
        self.shrinkage = float(shrinkage)
        self._fitted = _DeviceCache()
        self.fallbacks: list[str] = []

    @property
    def fitted(self) -> bool:
        return bool(self._fitted.state)

    def fit(self, scores: Tensor, section: Tensor, domain: Tensor, warn: bool = True) -> GroupNormalizer:
        """Fit mean/std per group: scores (N,) of held-out normals, section (N,), domain (N,).

        The groups that fell back are kept in `self.fallbacks`; `warn=False` leaves saying so to
        the caller (the pipeline says it once for all members).
        """
        where = "GroupNormalizer.fit"
        scores = self._check_scores(scores, where)
        _check_empty(scores.shape[0], where)
        section = _check_ids(section, "section", scores.shape[0], where, torch.device("cpu"))
        domain = _check_ids(domain, "domain", scores.shape[0], where, torch.device("cpu"))
        _check_domain(domain, where)
        x = scores.detach().to(device="cpu", dtype=torch.float64)  # a few numbers per group

        def stats(mask: Tensor) -> tuple[float, float] | None:
            v = x[mask]
            if v.numel() < 2:
                return None
            mean, std = float(v.mean()), float(v.std())
            return None if std <= 1e-6 * abs(mean) else (mean, std)

        overall = stats(torch.ones_like(section, dtype=torch.bool))
        if overall is None:
            raise AsdError(
                f"{where}: the {x.numel()} scores are constant or fewer than 2, so they cannot be "
                "normalised; fit on the scores of at least 2 different held-out normal clips"
            )
        rows, fallbacks = [], []
        for s in torch.unique(section).tolist():
            in_section = section == s
            pooled = stats(in_section)
            if pooled is None:
                fallbacks.append(f"section {s} (all domains, {int(in_section.sum())} clips) -> global")
                pooled = overall
            rows.append((s, 2, *pooled))
            for d in (0, 1):
                n = int((in_section & (domain == d)).sum())
                own = self._shrunk(x[in_section & (domain == d)], *pooled) if self.shrinkage else None
                own = own or stats(in_section & (domain == d))
                if own is None:
                    fallbacks.append(f"section {s} {DOMAIN_NAMES[d]} ({n} clips) -> section")
                rows.append((s, d, *(own or pooled)))
        self.fallbacks = fallbacks
        if fallbacks and warn:
            log.warning(
                "score normalisation groups with < 2 clips or std ~ 0 fell back: %s", "; ".join(fallbacks)
            )
        table = torch.tensor([r[2:] for r in rows], dtype=torch.float64)  # (G, 2) mean, std
        self._fitted.set(
            {
                "section": torch.tensor([r[0] for r in rows]),
                "domain": torch.tensor([r[1] for r in rows]),
                "mean": table[:, 0].contiguous(),
                "std": table[:, 1].contiguous(),
            }
        )
        return self

    def _shrunk(self, v: Tensor, section_mean: float, section_std: float) -> tuple[float, float] | None:
        """(mean, std) of a group's scores `v` shrunk towards its section's; None if empty."""
        if v.numel() == 0:
            return None
        own = float(v.mean())
        ss = float(((v - own) ** 2).sum())
        k = self.shrinkage
        mean = (v.numel() * own + k * section_mean) / (v.numel() + k)
        std = math.sqrt((ss + k * section_std**2) / (v.numel() - 1 + k))
        return None if std <= 1e-6 * abs(mean) else (mean, std)

    def transform(self, scores: Tensor, section: Tensor, domain: Tensor) -> Tensor:
        """z-scores (B,) -> (B,): (score - mean) / std of the clip's (section, domain) group."""
        where = "GroupNormalizer.transform"
        if not self.fitted:
            raise AsdError(
                f"{where}: the normaliser is not fitted; call fit() on held-out normal scores first, "
                "or load the state_dict of a fitted normaliser"
            )
        scores = self._check_scores(scores, where)
        section = _check_ids(section, "section", scores.shape[0], where, scores.device)
        domain = _check_ids(domain, "domain", scores.shape[0], where, scores.device)
        _check_domain(domain, where)
        state = self._fitted.on(scores.device)
        # group row of each clip: sections and domains are small ints, so match by broadcasting
        match = (section[:, None] == state["section"][None, :]) & (
            domain[:, None] == state["domain"][None, :]
        )
        found = match.any(dim=1)  # (B,)
        if not bool(found.all()):
            missing = sorted(set(section[~found].tolist()))
            raise AsdError(
                f"{where}: section id(s) {missing} have no normalisation statistics: the held-out "
                "scores given to fit() have no clips of them; fit on clips of every section you score"
            )
        g = match.float().argmax(dim=1)  # (B,)
        acc = _acc_dtype(scores.device)
        z = (scores.to(acc) - state["mean"][g].to(acc)) / state["std"][g].to(acc)
        return z.to(_out_dtype(scores))

    def left_out(self, scores: Tensor, section: Tensor, domain: Tensor) -> Tensor:
        """Each clip's z-score (N,) against the statistics `fit` gives on the other N - 1 clips.

        The same rules as `fit` then `transform` once per clip (fallbacks to the section's and the
        global statistics, variance shrinkage, the near-constant test), in closed form: each
        group's mean and sum of squared deviations are downdated by the clip (Welford's update
        run backwards), so N clips cost one pass instead of N refits. NaN where no refit exists:
        the clip's section holds no other clip, or the other N - 1 scores are constant or fewer
        than 2 (where `fit` raises). Leaves `self` as it is.
        """
        where = "GroupNormalizer.left_out"
        scores = self._check_scores(scores, where)
        section = _check_ids(section, "section", scores.shape[0], where, torch.device("cpu"))
        domain = _check_ids(domain, "domain", scores.shape[0], where, torch.device("cpu"))
        _check_domain(domain, where)
        x = scores.detach().to(device="cpu", dtype=torch.float64)
        n_all, mean_all, ss_all = self._without_each(x, self._moments(x, torch.zeros_like(section)))
        n_sec, mean_sec, ss_sec = self._without_each(x, self._moments(x, section))
        # (section, domain) pairs; domain is 0, 1 or 2
        n_own, mean_own, ss_own = self._without_each(x, self._moments(x, section * 3 + domain))

        def stats(n: Tensor, mean: Tensor, ss: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """(valid, mean, std) as `fit`'s `stats` gives them, per clip."""
            std = (ss / (n - 1).clamp_min(1)).sqrt()
            return (n >= 2) & ~(std <= 1e-6 * mean.abs()), mean, std

        valid, mean, std = stats(n_all, mean_all, ss_all)  # the global row, where `fit` raises if not valid
        section_ok, section_mean, section_std = stats(n_sec, mean_sec, ss_sec)
        mean = torch.where(section_ok, section_mean, mean)  # the section's pooled row
        std = torch.where(section_ok, section_std, std)
        own_ok, own_mean, own_std = stats(n_own, mean_own, ss_own)
        if self.shrinkage:
            k = self.shrinkage  # `mean` and `std` are the section's row here
            shrunk_mean = (n_own * own_mean + k * mean) / (n_own + k)
            shrunk = ((ss_own + k * std**2) / (n_own - 1 + k)).sqrt()
            shrunk_ok = (n_own >= 1) & ~(shrunk <= 1e-6 * shrunk_mean.abs())
            own_ok = shrunk_ok | own_ok
            own_mean = torch.where(shrunk_ok, shrunk_mean, own_mean)
            own_std = torch.where(shrunk_ok, shrunk, own_std)
        use_own = own_ok & (domain != 2)  # an unknown-domain clip is normalised by its section's row
        mean = torch.where(use_own, own_mean, mean)
        std = torch.where(use_own, own_std, std)
        z = (x - mean) / std
        z[~valid | (n_sec < 1)] = math.nan
        return z.to(_out_dtype(scores))

    @staticmethod
    def _moments(x: Tensor, key: Tensor) -> tuple[Tensor, ...]:
        """Per distinct key: the key, each clip's row, and the count, mean and sum of squared deviations."""
        keys, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        count = counts.to(x.dtype)
        mean = torch.zeros_like(count).index_add_(0, inverse, x) / count
        dev = x - mean[inverse]
        return keys, inverse, count, mean, torch.zeros_like(count).index_add_(0, inverse, dev * dev)

    @staticmethod
    def _without_each(x: Tensor, moments: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Per clip: count, mean and sum of squared deviations of its key's scores without it."""
        _, inverse, count, mean, ss = moments
        dev = x - mean[inverse]
        n = count[inverse] - 1
        mean_without = mean[inverse] - dev / n.clamp_min(1)
        ss_without = (ss[inverse] - dev * (x - mean_without)).clamp_min(0)
        return n, torch.where(n > 0, mean_without, 0.0), torch.where(n > 1, ss_without, 0.0)

    @staticmethod
    def _check_scores(scores: Tensor, where: str) -> Tensor:
        if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise AsdError(f"{where}: `scores` must be a float tensor of shape (N,), got {got}")
        _check_finite(scores, "scores", where)
        return scores

    def get_extra_state(self) -> dict[str, Tensor]:
        return dict(self._fitted.state)

    def set_extra_state(self, state: Any) -> None:
        self._fitted.set(_plain_state(state, "GroupNormalizer", self._KEYS))


def fuse(z: Tensor, method: str) -> Tensor:
    """Combine member z-scores (B, M) -> (B,) without labels.

    "zmean" averages the members. "zmin" calls a clip anomalous only when every member agrees it
    is far from its normal scores: each z is calibrated on that member's own normals, so the min
    has at most the false-alarm rate of the most conservative member, and one member reacting to a
    nuisance (a domain shift, a noisy recording) cannot raise the fused score - a sensible default
    when no labels can say which member to trust. "zmax" is the opposite: any single member can
    raise the alarm, more sensitive to anomalies only one member sees, at the cost of a false-alarm
    rate up to the sum of the members' rates.
    """
    if method not in FUSIONS:
        raise AsdError(f"fuse: unknown method {method!r}; use one of {FUSIONS}")
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] == 0 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise AsdError(f"fuse: `z` must be a float tensor of shape (B, M) with M >= 1 members, got {got}")
    _check_finite(z, "z", "fuse")
    if method == "zmean":
        return z.to(_acc_dtype(z.device)).mean(dim=1).to(z.dtype)
    if method == "zmin":
        return z.amin(dim=1)
    return z.amax(dim=1)


def fuse_weighted(z: Tensor, weights: Tensor) -> Tensor:
    """The weighted mean of member z-scores (B, M) -> (B,); `weights` (M,) >= 0, not all zero.

    `zweighted`: the weights come from how the members separate left-out normals from
    pseudo-anomalies (`asd.fusion.select.member_weights`: each alone by default, or all together),
    so a member that cannot tell them apart adds nothing; equal weights give `zmean`.
    """
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] == 0 or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise AsdError(f"fuse_weighted: `z` must be a float tensor of shape (B, M), M >= 1, got {got}")
    w = torch.as_tensor(weights, dtype=_acc_dtype(z.device), device=z.device)
    usable = bool(torch.isfinite(w).all()) and not bool((w < 0).any()) and float(w.sum()) > 0
    if w.shape != (z.shape[1],) or not usable:
        raise AsdError(
            f"fuse_weighted: `weights` must be {z.shape[1]} finite values >= 0, not all 0, got {w.tolist()}"
        )
    _check_finite(z, "z", "fuse_weighted")
    return (z.to(w.dtype) @ (w / w.sum())).to(z.dtype)
