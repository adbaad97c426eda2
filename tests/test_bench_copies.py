"""benchmarks/bench_copies.py: what the default speed copies add to the `stats` backend features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def test_it_times_the_features_with_and_without_the_default_copies(tmp_path):
    out = tmp_path / "results, here"
    args = ["--clips", "4", "--batch", "2", "--seconds", "1", "--rounds", "1", "--results", str(out)]
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_copies.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "bench_copies.json").read_text())
    speeds = list(OmegaConf.load(REPO / "conf" / "branches" / "default.yaml").stats.speeds)
    assert result["speeds"] == speeds and speeds
    # each training clip's features, then each copy's: (1 + R) times the width
    width = result["feature_width"]
    assert width["with"] == (1 + len(speeds)) * width["without"]
    rates = result["clips_per_s"]
    assert rates["with"] > 0 and rates["without"] > 0
    assert result["ratio_without_over_with"] == rates["without"] / rates["with"]
    assert "| with the default copies |" in (out / "bench_copies.md").read_text()
