"""benchmarks/bench_weights.py table: each weight rule re-fuses a recorded run's test z-scores."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_weights.py"


def recorded_run(folder: Path, seed: int) -> None:
    """A finished run as `bench_weights.py run` leaves it, made by hand: member `b2` separates the
    pseudo-anomalies best but ranks the test anomalies backwards; `stats_temporal` the reverse."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    n = 40
    y = np.r_[np.zeros(n), np.ones(n)]
    rows = np.c_[rng.normal(size=2 * n) + 3.0 * y, rng.normal(size=2 * n) + 0.6 * y]
    torch.save(
        {
            "rows": torch.tensor(rows),
            "y": torch.tensor(y),
            "section": torch.zeros(2 * n, dtype=torch.long),
            "members": ["b2", "stats_temporal"],
        },
        folder / "weights_rows.pt",
    )
    labels = ["normal"] * 20 + ["anomaly"] * 20
    domains = ["source", "target"] * 20
    test = np.array([0.0] * 20 + [1.0] * 20)
    z = np.c_[-2.0 * test + 0.3 * rng.normal(size=40), 2.0 * test + 0.3 * rng.normal(size=40)]
    torch.save(
        {"z": torch.tensor(z), "members": ["b2", "stats_temporal"], "context": {}}, folder / "weights_test.pt"
    )
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "machine", "section", "domain", "label", "final"])
        for i in range(40):
            w.writerow([f"clip {i}, a.wav", "valve", "00", domains[i], labels[i], z[i] @ [0.5, 0.5]])
    (folder / "summary.md").write_text(
        "# asd run summary (synthetic, official score convention: DCASE 2023)\n"
    )
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("fusion:\n  weighted:\n    power: 2.0\n")


def test_the_references_share_rows_follow_the_reference_where_the_criterion_follows_the_pseudo_anomalies(
    tmp_path,
):
    runs = [tmp_path / f"seed{s}" for s in (1, 2)]
    for s, run in enumerate(runs):
        recorded_run(run, s)
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "table",
        *map(str, runs),
        "--name",
        "t",
        "--shares",
        "0.8",
        "1",
        "--results",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((out / "t.json").read_text())
    assert "criterion, reference_share=0.8 against criterion: +" in (out / "t.md").read_text()
    for r in results:
        plain, anchored = r["weights"]["criterion"], r["weights"]["criterion, reference_share=0.8"]
        assert plain["b2"] > plain["stats_temporal"]  # the pseudo-anomalies favour b2
        assert anchored["stats_temporal"] == np.float64(0.8).round(4)
        assert anchored["b2"] == np.float64(0.2).round(4)
        official = r["official"]
        assert official["criterion"] < 0.5 < official["criterion, reference_share=0.8"]
        assert official["criterion, reference_share=1"] == official["stats_temporal (fused z)"]
