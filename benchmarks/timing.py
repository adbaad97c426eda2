"""Shared by the benchmarks: timing (the contenders alternate, each keeps its fastest run), result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def best_times(fns: list, repeats: int) -> tuple[list[float], list]:
    """Fastest of `repeats` calls (seconds) of each function, and their last results.

    The functions take turns, so a burst of load from other processes hits both sides alike.
    """
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best, outs


def environment(device: torch.device) -> dict:
    """Where the numbers were taken: device, threads, torch, CPU, load (other processes add noise)."""
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def write_tables(results: Path, name: str, result: dict, lines: list[str]) -> None:
    """`<name>.json` (`result`) and `<name>.md` (`lines`) under `results`; the table is printed too."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {results / name}.{{json,md}}")
