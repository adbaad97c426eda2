"""Reference detector without training: per-clip log-mel statistics against the training normals.

The simplest detector that works on stationary machine sounds, reported beside the ensemble so
every table shows whether the learned members beat it. Each clip becomes one vector: the mean
over time of every log-mel bin (and, with `stats: mean_std`, the standard deviation too). Two
scores (three with `temporal`), each fitted on the fit split's normals with separate source and
target references per section, the smaller of the two:

- "mahalanobis": the distance to the section's Gaussian (mean and Ledoit-Wolf-shrunk covariance,
  `asd.scoring.MahalanobisBackend`), the statistic of the DCASE baselines' selective Mahalanobis
  applied to the raw spectrum instead of to an autoencoder's errors;
- "knn": the euclidean distance to the `k` nearest training clips (`asd.scoring.KnnBackend`);
- "temporal" (with `temporal=True`, which needs `calibrate`): the largest of three calibrated
  Mahalanobis scores, the mean one above and two of how the sound moves over time, on `bands`
  log-mel bands (adjacent bins averaged): each band's peak above its median frame (clicks,
  rattles, missing or extra events) and its mean change from one frame to the next (modulation,
  roughness, hiss). The mean hears changes of the long-term spectrum (a tone, a moved
  resonance, a tilt) and barely the others; the two time statistics hear the others and barely
  the spectrum. Each score is calibrated on its models' left-out distances, so the max flags a
  clip as soon as one of them finds it out of the ordinary, where an average would let the two
  that see nothing dilute the one that does (docs/results.md, "Clip statistics that hear time").
  With `modulation` (a second log-mel front end with a short hop, 4 ms by default), the change
  model also reads how fast each of a few broad bands flickers: the std over time of the band
  minus its moving average over `modulation_smooth` frames. A shaft-rate wobble (an imbalance, a
  rub once per revolution; 10-100 Hz) is averaged away within one 32 ms frame of the main log-mel
  and is this statistic's whole content; it is envelope analysis, the oldest tool of machine
  vibration monitoring, on the sound. It joins the change vector (one Mahalanobis model of the
  `bands` change values and its own bands' values), so the max gains no fourth chance to flag a
  normal clip
  (docs/results.md, "Fast modulation in the change model").

With `speeds`, every Mahalanobis model also learns from speed-perturbed copies of its training
clips (each clip resampled so that its frequencies and its tempo scale by each factor, as Kaldi's
speed perturbation does for speech): a machine whose speed or load moves its tones between
recordings varies more than a few clips show, most of all in a target domain of 2-5 clips, and
the copies teach the models that direction of variation. The copies join the spread of their
clip's domain (the covariances), not its mean, which stays the real clips' own; they are left out
with their clip by the calibration and are never measured themselves
(`MahalanobisBackend.fit(copies=)`). The kNN bank keeps the real clips only, since a clip's own
copy would be its nearest neighbour. Scoring is unchanged: test clips are not perturbed.
(docs/results.md, "Speed-perturbed copies of the training clips" and "Speed copies in the spread,
not the mean".)

It has no parameters to train, so the ensemble never gives it an optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from asd.branches.base import Branch
from asd.errors import AsdError
from asd.scoring import KnnBackend, MahalanobisBackend

log = logging.getLogger(__name__)

STATS = ("mean", "mean_std")


class LogMelStatsReference(Branch):
    """Mean (and std) log-mel per clip; Mahalanobis and kNN against source/target training normals."""

    name = "stats"
    needs_backend = True

    def __init__(
        self,
        frontend: nn.Module,
        stats: str = "mean",
        k: int = 1,
        shrinkage: float | str = "auto",
        covariance: str = "domain",
        calibrate: bool = False,
        temporal: bool = False,
        bands: int = 32,
        speeds: Sequence[float] = (),
        modulation: nn.Module | None = None,
        modulation_smooth: int = 9,
    ):
        """Args:
        frontend: wave (B, T) -> log-mel (B, n_mels, frames) (`asd.features.LogMel`).
        stats: "mean" (n_mels values per clip) or "mean_std" (2 * n_mels).
        k: neighbours of the kNN score.
        shrinkage: covariance shrinkage of the Mahalanobis score, "auto" (Ledoit-Wolf) or in [0, 1].
        covariance: "domain" (a covariance per source/target model) or "pooled" (each domain's own
            mean, one within-domain covariance per section; `MahalanobisBackend(covariance=)`).
        calibrate: standardise each model's and bank's distances by its clips' left-out ones, so
            source and target speak one scale before the min (`calibrate=` of both backends).
        temporal: add the "temporal" score (module docstring); needs `calibrate`, since it takes
            the max of three distances.
        bands: log-mel bands of the temporal statistics (adjacent mel bins averaged), at most n_mels.
        speeds: factors of the speed-perturbed training copies of the Mahalanobis models (module
            docstring), each in [0.5, 2] and not 1; empty: none.
        modulation: wave (B, T) -> log-mel (B, bands, frames) with a short hop (`asd.features.LogMel`),
            whose bands' fast modulation joins the change model (module docstring); unused (and
            logged) without `temporal`. None: off.
        modulation_smooth: frames of the moving average each band of `modulation` is taken from
            before its std over time (odd, >= 3): 9 frames of a 4 ms hop (36 ms) take out what moves
            slower than about 12 Hz and leave what moves faster (wholly from about 28 Hz on).
        """
        super().__init__()
        if temporal and not calibrate:
            raise AsdError(
                "stats: temporal=true takes the max of three Mahalanobis scores, which share a scale only "
                "when calibrated; set branches.stats.calibrate=true or branches.stats.temporal=false"
            )
        if not isinstance(bands, int) or isinstance(bands, bool) or bands < 1:
            raise AsdError(
                f"stats: bands={bands!r}; use a whole number >= 1 (at most the front end's n_mels)"
            )
        if modulation is not None and not temporal:  # a part of the column temporal=false leaves out
            log.info("stats: modulation unused: it joins stats_temporal's change model, and temporal=false")
            modulation = None
        smooth_ok = isinstance(modulation_smooth, int) and not isinstance(modulation_smooth, bool)
        if not smooth_ok or modulation_smooth < 3 or modulation_smooth % 2 == 0:
            raise AsdError(
                f"stats: modulation_smooth={modulation_smooth!r}; use an odd whole number >= 3 (frames of "
                "the moving average, centred on each frame)"
            )
        listed = isinstance(speeds, Sequence) and not isinstance(speeds, str)
        factors = listed and all(
            isinstance(r, Real) and not isinstance(r, bool) and 0.5 <= r <= 2 for r in speeds
        )
        if not factors or 1 in speeds or len(set(speeds)) != len(speeds):
            raise AsdError(
                f"stats: speeds={speeds!r}; use a list of distinct factors in [0.5, 2] other than 1 (e.g. "
                "[0.9, 1.1]), or [] for no speed-perturbed copies"
            )
        self.frontend, self.stats, self.temporal, self.bands = frontend, stats, bool(temporal), bands
        self.speeds = [float(r) for r in speeds]
        self.modulation, self.modulation_smooth = modulation, modulation_smooth
        #: values of the modulation statistic per clip (0: off)
        self.modulation_bands = int(modulation.n_mels) if modulation is not None else 0

        def mahalanobis() -> MahalanobisBackend:
            return MahalanobisBackend(
                shrinkage=shrinkage, per_domain=True, covariance=covariance, calibrate=calibrate
            )

        backends = {
            "mahalanobis": mahalanobis(),
            "knn": KnnBackend(k=k, normalize=False, calibrate=calibrate),
        }
        if self.temporal:
            backends |= {"peak": mahalanobis(), "change": mahalanobis()}
        self.backend = nn.ModuleDict(backends)
        #: the keys of `scores`: columns `stats_mahalanobis`, `stats_knn` (and `stats_temporal`)
        self.score_kinds = ("mahalanobis", "knn", "temporal") if self.temporal else ("mahalanobis", "knn")

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """One statistics vector per clip, float32: (B, n_mels) or (B, 2 * n_mels), then with
        `temporal` each band's peak above its median frame and its mean frame-to-frame change
        (2 * `bands` more values), then with `modulation` each of its bands' fast modulation
        (`modulation_bands` more)."""
        wave = batch["wave"]
        return self.features_of(self.frontend(wave).float(), wave)  # (B, T) -> (B, n_mels, frames)

    def features_of(self, spec: Tensor, wave: Tensor | None = None) -> Tensor:
        """`features` of log-mels computed already by this reference's front end, (B, n_mels, frames);
        with `modulation`, `wave` (B, T) is the clips' waveform, which its own front end reads."""
        stat = spec.mean(dim=2) if self.stats == "mean" else torch.cat([spec.mean(dim=2), spec.std(dim=2)], 1)
        if not self.temporal:
            return stat
        fix = (
            "use longer clips, a smaller hop_length or fewer branches.stats.bands, or "
            "branches.stats.temporal=false"
        )
        parts = [stat, time_statistics(spec, self.bands, "stats", fix)]
        if self.modulation is not None:
            if wave is None:
                raise AsdError(
                    "stats: features_of needs the clips' waves with branches.stats.modulation set (its own "
                    "front end reads them); pass wave=, or set branches.stats.modulation=null"
                )
            fine = self.modulation(wave).float()  # (B, modulation_bands, frames)
            parts.append(modulation_statistics(fine, self.modulation_smooth, "stats", fix))
        return torch.cat(parts, dim=1)

    def _parts(self, feats: Tensor) -> dict[str, Tensor]:
        """`features` split into each backend's input."""
        if not self.temporal:
            return {"mahalanobis": feats, "knn": feats}
        d = feats.shape[1] - 2 * self.bands - self.modulation_bands
        stat, peak, change = feats[:, :d], feats[:, d : d + self.bands], feats[:, d + self.bands :]
        return {"mahalanobis": stat, "knn": stat, "peak": peak, "change": change}  # change + modulation

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Nothing to learn: zero (the ensemble never trains a member without parameters)."""
        return batch["wave"].new_zeros(())

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["wave"].new_zeros((batch["wave"].shape[0], 0))

    def backend_features(self, batch: dict[str, Tensor]) -> Tensor:
        """`features` of each training clip, then of each of its `speeds` copies: (B, (1 + R) * F)."""
        feats = self.features(batch)
        return torch.cat([feats, self.copy_features(batch["wave"])], dim=1) if self.speeds else feats

    def copy_features(self, wave: Tensor) -> Tensor:
        """`features` of each clip's `speeds` copies, one after another: (B, T) -> (B, R * F)."""
        waves = [speed_perturb(wave, r) for r in self.speeds]  # (B, T / r) each
        return torch.cat([self.features_of(self.frontend(w).float(), w) for w in waves], dim=1)

    def fit_backend(self, feats: Tensor, meta: dict[str, Tensor]) -> None:
        feats, r = feats.detach().float(), len(self.speeds)
        if r and (feats.ndim != 2 or not feats.shape[0] or feats.shape[1] % (1 + r)):
            raise AsdError(
                f"stats: fit_backend got features of shape {tuple(feats.shape)}; with branches.stats.speeds="
                f"{self.speeds} it needs (N >= 1, (1 + {r}) * F) rows from backend_features"
            )
        rows = feats.reshape(feats.shape[0], 1 + r, -1) if r else feats[:, None]  # (N, 1 + R, F)
        parts = self._parts(rows[:, 0])
        copies = [self._parts(rows[:, 1 + i]) for i in range(r)]
        for name, backend in self.backend.items():
            extra = {}  # the kNN bank keeps the real clips only
            if copies and isinstance(backend, MahalanobisBackend):
                extra["copies"] = torch.stack([c[name] for c in copies], dim=1)  # (N, R, F_name)
            backend.fit(parts[name], meta["section"], meta["domain"], **extra)

    def scores(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every score of `score_kinds`, each (B,)."""
        return self.score_features(self.features(batch), batch["section"])

    def score_features(self, feats: Tensor, section: Tensor) -> dict[str, Tensor]:
        """`scores` of clips whose `features` are computed already, (B,) each."""
        if not self.backend["knn"].fitted:
            raise AsdError("stats: fit_backend must run on the training normals before scoring")
        parts = self._parts(feats)
        out = {name: backend.score(parts[name], section) for name, backend in self.backend.items()}
        if self.temporal:  # the max of three calibrated scores; peak and change are not columns of their own
            three = [out["mahalanobis"], out.pop("peak"), out.pop("change")]
            out["temporal"] = torch.stack(three).amax(dim=0)
        return out

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        return self.scores(batch)["mahalanobis"]


def time_statistics(spec: Tensor, bands: int, who: str, fix: str) -> Tensor:
    """How a log-mel (or any (B, bins, frames) map) moves over time: (B, 2 * bands).

    Adjacent bins are averaged into `bands` bands; each band gives its peak above its median frame
    (clicks, rattles, missing or extra events) and its mean change from one frame to the next
    (modulation, roughness, hiss). For maps too small the error names `who` and ends with `fix`.
    """
    n_bins, frames = spec.shape[1], spec.shape[2]
    if frames < 2 or bands > n_bins:
        raise AsdError(
            f"{who}: temporal statistics need at least 2 frames and bands <= n_mels; this clip gives "
            f"{frames} frame(s) of {n_bins} mels with bands={bands} ({fix})"
        )
    band = F.adaptive_avg_pool1d(spec.transpose(1, 2), bands).transpose(1, 2)  # (B, bands, frames)
    peak = band.amax(dim=2) - band.median(dim=2).values
    change = band.diff(dim=2).abs().mean(dim=2)
    return torch.cat([peak, change], dim=1)


def modulation_statistics(spec: Tensor, smooth: int, who: str, fix: str) -> Tensor:
    """How fast each band of a short-hop log-mel flickers: (B, bands, frames) -> (B, bands).

    The std over time of each band minus its centred moving average over `smooth` frames (fewer at
    the clip's ends), so the slow course of the sound is taken out and what moves within a few
    frames is left: amplitude modulation at a shaft's rate, a rub once per revolution, roughness.
    For maps too short the error names `who` and ends with `fix`.
    """
    frames = spec.shape[2]
    if frames < 2:
        raise AsdError(
            f"{who}: the modulation statistic needs at least 2 frames; this clip gives {frames} ({fix})"
        )
    trend = F.avg_pool1d(spec, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    return (spec - trend).std(dim=2)


def speed_perturb(wave: Tensor, factor: float) -> Tensor:
    """(B, T) -> (B, round(T / factor)): the clip played `factor` times faster, so every frequency and
    every tempo scale by `factor`, at the same sample rate.

    Band-limited (FFT) resampling: the spectrum is cut (faster: the bins above the new Nyquist
    frequency go, so nothing aliases) or padded with zeros (slower), and scaled so that a sine keeps
    its amplitude. Unlike `scipy.signal.resample` the Nyquist bin gets no special treatment (one bin
    of a few thousand, for these statistics). The factor is snapped to a fraction with a denominator
    of at most 100 so a clip length maps to the same output length everywhere.
    """
    n = wave.shape[-1]
    ratio = Fraction(factor).limit_denominator(100)
    m = max(1, round(n * ratio.denominator / ratio.numerator))
    spec = torch.fft.rfft(wave.float(), dim=-1)  # (B, n // 2 + 1)
    bins = m // 2 + 1
    if bins <= spec.shape[-1]:
        spec = spec[..., :bins]
    else:
        spec = F.pad(spec, (0, bins - spec.shape[-1]))
    return torch.fft.irfft(spec, n=m, dim=-1) * (m / n)
