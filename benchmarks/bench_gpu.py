"""GPU training and scoring: fp32 against AMP, one device against two, and scoring's clips/s.

    python benchmarks/bench_gpu.py                          # experiment=full, synthetic data
    python benchmarks/bench_gpu.py --steps 50 experiment=dcase2023 data.root=DIR   # Hydra overrides last
    python benchmarks/bench_gpu.py --smoke                  # this code on CPU at debug sizes; writes nothing

Without CUDA (and without --smoke) it prints "no GPU: not measured" and writes that to
benchmarks/results/bench_gpu.json (unless that file already holds measurements).

  train    clips/s (median of --steps steps after --warmup) and peak GPU memory (allocator) of each
           member alone and of the whole ensemble, in fp32 (`32-true`) and in AMP (what
           `precision=auto` picks: bf16-mixed, or 16-mixed with one loss scaler for all members),
           through the Trainer that `asd.run.build.build_trainer` makes for train.py.
           Goal: AMP >= 1.5x fp32 for the ensemble at full size.
  scaling  the ensemble's AMP clips/s with 2 devices (DDP) over 1 device, each in a subprocess.
           Goal: >= 1.8x. Needs 2 GPUs.
  score    clips/s of scoring the test split (`asd.run.predict.infer` of `member_scores`, as the
           predict stage) in fp32 and under autocast, and every score column's official score both
           ways (backends fitted once, in fp32). Goal: official score moved by < 0.002.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytorch_lightning as L
import torch
from bench_train import ENSEMBLE, build_model, compose_config, setup_data  # beside this script
from omegaconf import DictConfig, open_dict
from timing import environment, write_result

from asd.data.datamodule import AsdDataModule
from asd.ensemble import Ensemble
from asd.evaluation import evaluate
from asd.members import plain, select_branches
from asd.run import calibrate as cal
from asd.run import predict as predict_module
from asd.run.build import build_trainer, data_facts, hardware, resolve_trainer

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_gpu.json"
NOT_MEASURED = "no GPU: not measured"
#: full-size members, AST from scratch (same compute as the hub weights, nothing downloaded)
FULL = ["experiment=full", "branches.b1.weights=scratch"]
SMOKE = ["debug=default", "data.batch_size=4"]


class StepTimer(L.Callback):
    """Seconds of each training step after the warm-up (the batch already fetched), clips per step."""

    def __init__(self, warmup: int):
        self.warmup, self.seconds, self.clips, self.steps = warmup, [], 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)
        self.steps += 1  # across epochs: batch_idx restarts at each
        if self.steps > self.warmup:
            self.seconds.append(time.perf_counter() - self.start)
        self.clips = len(batch["wave"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_steps(
    cfg: DictConfig, dm: AsdDataModule, which: str, precision: str, devices: int, args: argparse.Namespace
) -> tuple[Ensemble, dict[str, Any]]:
    """Train `which` (a member alone, or the ensemble) for warm-up + timed steps, as train.py would."""
    model = build_model(cfg, data_facts(dm), which)
    steps = args.warmup + args.steps
    trainer_cfg = copy.deepcopy(cfg)
    with open_dict(trainer_cfg):
        trainer_cfg.trainer.update(
            accelerator=args.accelerator,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            precision=precision,
            max_epochs=10_000,
            max_steps=steps * max(1, len(model.trainable)),  # Lightning counts each member's optimizer step
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
    timer = StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            trainer_cfg, Path(tmp), logger=False, extra_callbacks=[timer], checkpoints=False
        )
        if args.accelerator == "gpu":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, datamodule=dm)
    median = statistics.median(timer.seconds)
    world = trainer.world_size
    result = {
        "precision": trainer.precision,
        "devices": world,
        "timed_steps": len(timer.seconds),
        "clips_per_s": round(timer.clips * world / median, 1),
        "step_ms_median": round(1000 * median, 2),
        "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20)
        if args.accelerator == "gpu"
        else None,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }
    return model, result


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- scoring
def score_columns(
    model: Ensemble, dm: AsdDataModule, device: torch.device, amp: bool
) -> dict[str, np.ndarray]:
    """Every member score column of every test clip, with or without autocast (the predict stage's path)."""
    model.to(device).eval()
    patch = contextlib.nullcontext() if amp else fp32_inference()
    with patch:
        return predict_module.infer(
            lambda b: predict_module.member_scores(model, b),
            dm.datasets["test"],
            device,
            dm.eval_batch_size,
            dm.num_workers,
            "test",
            dm.windowing,
        )


def fp32_inference() -> contextlib.AbstractContextManager:
    return mock.patch.object(predict_module, "inference_autocast", lambda device: contextlib.nullcontext())


def year_of(dm: AsdDataModule, cfg: DictConfig) -> int:
    """The official-score convention, as the run's stages choose it."""
    layouts = {c.layout for c in dm.tables["test"]}
    if layouts & {"dcase2020", "mimii"}:
        return 2020
    if "dcase2021" in layouts:
        return 2021
    return int(cfg.data.get("year") or cfg.get("year") or 2023)


def measure_scoring(
    model: Ensemble, dm: AsdDataModule, cfg: DictConfig, device: torch.device, repeats: int
) -> dict[str, Any]:
    """fp32 and autocast scoring of the test split: clips/s (best of `repeats`) and official scores."""
    model.to(device).eval()
    with fp32_inference():
        cal.fit_backends(model, dm, device)
    clips, year = list(dm.tables["test"]), year_of(dm, cfg)
    out: dict[str, Any] = {"clips": len(clips), "year": year}
    columns = {}
    for name, amp in (("fp32", False), ("autocast", True)):
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            columns[name] = score_columns(model, dm, device, amp)
            sync(device)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_clips_per_s"] = round(len(clips) / best, 1)
    official = {}
    for col in sorted(k for k in columns["fp32"] if k != "index"):
        fp32 = evaluate(clips, columns["fp32"][col], year=year).official
        amp = evaluate(clips, columns["autocast"][col], year=year).official
        official[col] = {"fp32": round(fp32, 4), "autocast": round(amp, 4), "diff": round(amp - fp32, 4)}
    out["official"] = official
    out["max_abs_official_diff"] = max(abs(v["diff"]) for v in official.values())
    out["official_within_0.002"] = out["max_abs_official_diff"] < 0.002
    return out


# ---------------------------------------------------------------------- 1 vs 2 devices
def worker(args: argparse.Namespace) -> int:
    """One DDP measurement (`--worker-devices N`); Lightning starts the other ranks from this command."""
    cfg = compose_config(args.overrides)
    dm = setup_data(cfg)
    _, result = fit_steps(cfg, dm, ENSEMBLE, args.amp_precision, args.worker_devices, args)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    Path(args.worker_out).write_text(json.dumps(result))
    return 0


def measure_scaling(args: argparse.Namespace, amp: str, tmp: Path) -> dict[str, Any]:
    if torch.cuda.device_count() < 2:
        return {"note": f"{torch.cuda.device_count()} GPU(s): 2-device scaling not measured"}
    out = {}
    for n in (1, 2):
        path = tmp / f"devices_{n}.json"
        cmd = [sys.executable, __file__, "--worker-devices", str(n), "--worker-out", str(path)]
        cmd += ["--amp-precision", amp, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        subprocess.run([*cmd, *args.overrides], check=True, cwd=REPO)
        out[f"devices_{n}"] = json.loads(path.read_text())
    out["speedup_2_over_1"] = round(out["devices_2"]["clips_per_s"] / out["devices_1"]["clips_per_s"], 2)
    out["goal_1.8x_met"] = out["speedup_2_over_1"] >= 1.8
    return out


# ---------------------------------------------------------------------- the whole benchmark
def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = compose_config(args.overrides)
    dm = setup_data(cfg)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    amp = args.amp_precision
    res: dict[str, Any] = {"overrides": args.overrides, "amp_precision": amp, "train": {}}
    targets = [*select_branches(plain(cfg.branch)), ENSEMBLE]
    model = None
    for which in targets:
        row = {}
        for label, precision in (("fp32", "32-true"), ("amp", amp)):
            model, row[label] = fit_steps(cfg, dm, which, precision, 1, args)
            if which != ENSEMBLE:
                model = None
            release()
        row["amp_speedup"] = round(row["amp"]["clips_per_s"] / row["fp32"]["clips_per_s"], 2)
        res["train"][which] = row
        print(which, json.dumps(row), flush=True)
    res["amp_goal_1.5x_met"] = res["train"][ENSEMBLE]["amp_speedup"] >= 1.5
    res["score"] = measure_scoring(model, dm, cfg, device, args.score_repeats)
    print("score", json.dumps(res["score"]), flush=True)
    if args.accelerator == "gpu":
        with tempfile.TemporaryDirectory() as tmp:
            res["scaling"] = measure_scaling(args, amp, Path(tmp))
        print("scaling", json.dumps(res["scaling"]), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--score-repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="run on CPU at debug sizes; write nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker-devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--amp-precision", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.smoke:
        print(NOT_MEASURED)
        if not args.out.exists() or json.loads(args.out.read_text()).get("status") == NOT_MEASURED:
            write_result(args.out, {"status": NOT_MEASURED, "environment": environment(torch.device("cpu"))})
        return 0
    args.accelerator = "gpu" if has_gpu and not args.smoke else "cpu"
    args.overrides = (SMOKE if args.smoke else FULL) + overrides
    if args.amp_precision is None:
        # what `trainer.precision=auto` picks here; on CPU (--smoke) bf16-mixed stands in for it
        picked = resolve_trainer({"accelerator": args.accelerator, "precision": "auto"}, *hardware())
        args.amp_precision = picked.precision if args.accelerator == "gpu" else "bf16-mixed"
    if args.worker_devices:
        return worker(args)
    started = time.time()
    res = run(args)
    res["seconds"] = round(time.time() - started)
    res["environment"] = environment(torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
    res["date"] = datetime.date.today().isoformat()
    if args.smoke:
        print("smoke run: nothing written")
    else:
        write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
