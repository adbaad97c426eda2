"""How far do per-clip log-mel statistics go on the synthetic data, with and without labels?

    python benchmarks/bench_statistics.py [--seeds 100 101 102] [--test-per-class 100]
        [--difficulty 0.5] [--first-shot] [--name bench_statistics]

No training: each seed generates a synthetic dataset with `test_per_class` test clips per machine,
section, domain and label (10 in a default run; 100 here shrinks the std of each section's AUCs
about threefold, with the square root of the clip count), computes every clip's log-mel with the
`stats` reference's settings, and scores the test clips with

- unsupervised columns, the `stats` reference's calibrated pooled-covariance Mahalanobis against
  the training normals (`asd.scoring.MahalanobisBackend`) on one statistic per bin each: `mean`
  (the reference `stats_mahalanobis`), `std` (the spread over time), and `mean+std` (the two
  calibrated scores averaged); and `temporal`, the reference's own `stats_temporal` column (the
  max of the mean's calibrated score and those of each band's peak above its median frame and
  its mean frame-to-frame change, the latter beside the fast modulation of a few bands;
  `asd.branches.logmel_stats`); `temporal, no modulation`, the same column without the
  modulation statistic (`branches.stats.modulation=null`); and the reference's own
  `stats_mahalanobis` and `stats_temporal` columns with speed-perturbed copies of the training
  clips in its Mahalanobis models (`--speeds`, by default `SPEEDS`, whatever the config says),
  `mean, speed copies` and `temporal, speed copies`;
- a supervised linear model that sees the test labels: logistic regression on each bin's mean,
  std, max and mean absolute frame difference plus the domain, fitted per section on 4/5 of its
  test clips and scoring the other fifth (5 folds, stratified by label and domain). It shows
  whether labelled anomalies lift a linear reading of the clip statistics towards a target such
  as issue 11's 0.80. It is not an upper bound: a non-linear model, or one that sees more than
  clip statistics, may go further.

Prints and writes `benchmarks/results/<name>.{md,json}`: the official DCASE 2023 score per seed and
method, mean and sample std, and each method's AUC per anomaly kind (a kind's anomalies against
the same section and domain's normals, averaged over sections and domains).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd.branches.logmel_stats import LogMelStatsReference  # noqa: E402
from asd.data.index import index_dataset  # noqa: E402
from asd.data.synthetic import KINDS_FILE, SyntheticConfig, ensure_synthetic  # noqa: E402
from asd.evaluation import evaluate  # noqa: E402
from asd.scoring import MahalanobisBackend  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
METHODS = (
    "mean",
    "std",
    "mean+std",
    "temporal",
    "temporal, no modulation",
    "mean, speed copies",
    "temporal, speed copies",
    "supervised linear",
)
#: the factors of the speed-perturbed copies (`branches.stats.speeds`) this benchmark compares with none
SPEEDS = [0.9, 0.95, 1.05, 1.1]
#: the first-shot configuration of benchmarks/bench_quality.py
FIRST_SHOT = {"machines": ("valve",), "sections": 1, "source_train": 8, "target_train": 2, "duration": 10.0}


def reference_settings() -> DictConfig:
    """The `stats` reference's node of the default config (front end and Mahalanobis settings)."""
    node = OmegaConf.load(REPO / "conf" / "branches" / "default.yaml").stats
    OmegaConf.resolve(node)  # the front end's sample rate: 16 kHz outside a run's data config
    return node


def read_waves(paths: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([sf.read(p, dtype="float32")[0] for p in paths]))  # (B, T)


def clip_statistics(
    paths: list[str],
    ref: LogMelStatsReference,
    perturbed: LogMelStatsReference,
    train: list[bool],
    batch: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-bin statistics of each clip's log-mel (the `stats` reference `ref`'s front end), (N, n_mels)
    each; `reference`: the reference's own feature vectors of the same log-mels; `perturbed`:
    `perturbed`'s backend features of the training clips (`train`) alone, each clip's then its
    speed-perturbed copies' (test clips are scored as they are; the clips' own log-mels are not
    computed twice)."""
    specs, own, copies = [], [], []
    for i in range(0, len(paths), batch):
        wave = read_waves(paths[i : i + batch])
        with torch.inference_mode():
            specs.append(ref.frontend(wave).float())
            own.append(ref.features_of(specs[-1], wave))
            fit = torch.tensor(train[i : i + batch])
            if fit.any():
                mine = perturbed.features_of(specs[-1][fit], wave[fit])
                copies.append(torch.cat([mine, perturbed.copy_features(wave[fit])], dim=1))
    spec = torch.cat(specs)  # (N, n_mels, frames)
    return {
        "mean": spec.mean(dim=2),
        "std": spec.std(dim=2),
        "max": spec.amax(dim=2),
        "delta": spec.diff(dim=2).abs().mean(dim=2),
        "reference": torch.cat(own),
        "perturbed": torch.cat(copies),
    }


def mahalanobis(
    x: torch.Tensor, train: torch.Tensor, section: torch.Tensor, domain: torch.Tensor
) -> np.ndarray:
    """The `stats` reference's score of the test rows (~train) against the training rows."""
    ref = reference_settings()
    backend = MahalanobisBackend(
        shrinkage=ref.shrinkage, per_domain=True, covariance=ref.covariance, calibrate=ref.calibrate
    )
    backend.fit(x[train], section[train], domain[train])
    return backend.score(x[~train], section[~train]).double().numpy()


def reference_scores(
    ref: LogMelStatsReference,
    fit: torch.Tensor,
    test: torch.Tensor,
    train: torch.Tensor,
    section: torch.Tensor,
    domain: torch.Tensor,
) -> dict[str, np.ndarray]:
    """`ref`'s scores (`mahalanobis`, `knn`, `temporal`) of the test rows (~train) of `test` (its
    features), fitted on `fit`, its backend features of the training rows (with their copies)."""
    ref.fit_backend(fit, {"section": section[train], "domain": domain[train]})
    out = ref.score_features(test[~train], section[~train])
    return {k: v.double().numpy() for k, v in out.items()}


def supervised(
    x: np.ndarray, y: np.ndarray, section: np.ndarray, domain: np.ndarray, seed: int
) -> np.ndarray:
    """Out-of-fold probability of 'anomaly' per test row: logistic regression per section, 5 folds."""
    out = np.zeros(len(y))
    for s in np.unique(section):
        rows = np.flatnonzero(section == s)
        features = np.c_[x[rows], domain[rows]]
        folds = StratifiedKFold(5, shuffle=True, random_state=seed)
        for fit, held in folds.split(features, y[rows] * 2 + domain[rows]):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
            model.fit(features[fit], y[rows][fit])
            out[rows[held]] = model.predict_proba(features[held])[:, 1]
    return out


def kind_aucs(scores: np.ndarray, kinds: np.ndarray, y: np.ndarray, group: np.ndarray) -> dict[str, float]:
    """Each anomaly kind's AUC against its section and domain's normals, averaged over groups."""
    out = {}
    for kind in sorted(set(kinds[y == 1])):
        aucs = []
        for g in np.unique(group):
            rows = (group == g) & ((kinds == kind) | (y == 0))
            if (kinds[rows] == kind).any() and (y[rows] == 0).any():
                aucs.append(roc_auc_score(y[rows], scores[rows]))
        out[kind] = float(np.mean(aucs))
    return out


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    extra = FIRST_SHOT if args.first_shot else {}
    cfg = SyntheticConfig(seed=seed, difficulty=args.difficulty, test_per_class=args.test_per_class, **extra)
    root = ensure_synthetic(cfg=cfg)
    clips = index_dataset(root)
    with open(root / KINDS_FILE, newline="") as f:
        kind_of = {str(root / r["file_name"]): r["kind"] for r in csv.DictReader(f)}
    ref = instantiate(reference_settings(), speeds=[]).eval()
    perturbed = instantiate(reference_settings(), speeds=args.speeds).eval()
    if not ref.temporal or not perturbed.speeds or not ref.modulation_bands:
        raise SystemExit(
            "this benchmark reports stats.temporal with and without speed copies and modulation: set "
            "stats.temporal=true and a stats.modulation front end in conf/branches/default.yaml and give "
            "--speeds a factor or more"
        )
    feats = clip_statistics([c.path for c in clips], ref, perturbed, [c.split == "train" for c in clips])
    sections = sorted({(c.machine, c.section) for c in clips})
    section = torch.tensor([sections.index((c.machine, c.section)) for c in clips])
    domain = torch.tensor([int(c.domain == "target") for c in clips])
    train = torch.tensor([c.split == "train" for c in clips])
    test = [c for c in clips if c.split == "test"]
    y = np.array([int(c.label == "anomaly") for c in test])
    kinds = np.array([kind_of.get(c.path, "none") for c in test])
    scores = {name: mahalanobis(feats[name], train, section, domain) for name in ("mean", "std")}
    scores["mean+std"] = (scores["mean"] + scores["std"]) / 2
    own = feats["reference"]
    scores["temporal"] = reference_scores(ref, own[train], own, train, section, domain)["temporal"]
    plain = instantiate(reference_settings(), speeds=[], modulation=None).eval()  # the features before it
    mine = own[:, : own.shape[1] - ref.modulation_bands]
    before = reference_scores(plain, mine[train], mine, train, section, domain)
    scores["temporal, no modulation"] = before["temporal"]
    copied = reference_scores(perturbed, feats["perturbed"], own, train, section, domain)
    scores["mean, speed copies"], scores["temporal, speed copies"] = copied["mahalanobis"], copied["temporal"]
    rich = torch.cat([feats[k] for k in ("mean", "std", "max", "delta")], dim=1)[~train].double().numpy()
    scores["supervised linear"] = supervised(rich, y, section[~train].numpy(), domain[~train].numpy(), seed)
    group = section[~train].numpy() * 2 + domain[~train].numpy()
    return {
        "seed": seed,
        "test_clips": len(test),
        "official": {m: evaluate(test, scores[m], year=2023).official for m in METHODS},
        "kind_auc": {m: kind_aucs(scores[m], kinds, y, group) for m in METHODS},
    }


def table(runs: list[dict]) -> str:
    seeds = [r["seed"] for r in runs]
    lines = [
        "| method | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- | --- | " + " | ".join("---" for _ in seeds) + " |",
    ]
    for m in METHODS:
        values = [r["official"][m] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {m} | {statistics.mean(values):.3f} ± {spread:.3f} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    kinds = sorted(runs[0]["kind_auc"]["mean"])
    lines += ["", "AUC per anomaly kind, mean over seeds:", ""]
    lines += ["| method | " + " | ".join(kinds) + " |", "| --- | " + " | ".join("---" for _ in kinds) + " |"]
    for m in METHODS:
        values = [statistics.mean(r["kind_auc"][m][k] for r in runs) for k in kinds]
        lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument(
        "--first-shot", action="store_true", help="bench_quality.py's first-shot configuration"
    )
    parser.add_argument(
        "--speeds",
        type=float,
        nargs="+",
        default=SPEEDS,
        help=f"factors of the speed-perturbed training copies (default: {SPEEDS})",
    )
    parser.add_argument("--name", default="bench_statistics")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        print(
            f"seed {seed}: " + ", ".join(f"{m} {v:.3f}" for m, v in runs[-1]["official"].items()), flush=True
        )
    setting = (
        f"difficulty {args.difficulty}, {args.test_per_class} test clips per machine/section/domain/label, "
        f"speed copies {args.speeds}"
        + (", first-shot (one valve section, 8 + 2 training clips of 10 s)" if args.first_shot else "")
    )
    text = f"# Clip statistics on synthetic data ({setting})\n\n{table(runs)}\n"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.md").write_text(text)
    result = {"setting": setting, "seeds": args.seeds, "runs": runs}
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
