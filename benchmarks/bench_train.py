"""Training throughput, peak memory and scoring real-time factor of each member and of the joint ensemble.

Composes the real Hydra config (`conf/train.yaml` plus the trailing overrides), so it measures
the members `python train.py` would build, on the same data (the built-in synthetic set unless
overridden). Targets: each member alone (b2, dcase_ae) and the Ensemble of all of them.

  train   clips/s of forward + backward + optimizer step on real batches from the fit loader
          (batch size from the config; fetching the batch included), after --warmup steps,
          timed over --steps steps; parameter counts
  memory  peak increase over the warm-up plus a few steps (CPU: process RSS; CUDA: allocator),
          each target in a fresh subprocess so peaks do not mix
  score   real-time factor of `asd.run.predict.member_scores` over the test split (eval mode,
          no_grad, through `asd.run.predict.infer` as the pipeline scores): compute seconds per
          second of audio, best of --score-repeats passes; below 1 is faster than real time

and compares the joint step (one pass over the data, each batch fetched once) with training the
members alone one after the other (one pass each): joint clips/s / sequential clips/s. In the
joint step the flow (b5) learns on its sources' embeddings (b1-b3, an eval-mode pass without
gradients); alone (`branch=b5`) it is another model, on log-mel statistics. So the sequential
figure counts b5 as the same member trained after its sources: the ensemble of b5 and its
sources with the sources frozen (target `b5_after_sources`); `ratio_b5_alone` keeps the figure
with b5 alone, as the files before 2026-12-05 evening have it.
Timings run in one subprocess, the targets taking turns every few steps, so load from other
processes falls on all of them alike; clips/s come from the median step (the wall-clock
figure, bursts included, is reported beside it). The measuring subprocesses run under the entry
points' malloc setting (`asd.allocator`, `ASD_MALLOC`; reuse of freed memory since 2026-12-05,
`system` for glibc's own, as the files before that date were measured).

    python benchmarks/bench_train.py                                    # CPU, ~1-2 min on 2 cores
    python benchmarks/bench_train.py --device cuda --precision bf16
    python benchmarks/bench_train.py --steps 20 branches.b2.dim=128     # Hydra overrides last
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from timing import write_result  # benchmarks/timing.py, beside this script
from torch import Tensor

from asd.allocator import allocator_choice, reuse_freed_memory
from asd.data.datamodule import AsdDataModule
from asd.ensemble import FLOW, Ensemble
from asd.errors import AsdError
from asd.features import logmel_frontends
from asd.members import member_names
from asd.run.build import build_datamodule, build_ensemble, data_facts
from asd.run.calibrate import fit_member_backends
from asd.run.predict import infer, member_scores

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "bench_train.json"
ENSEMBLE = "ensemble"
FLOW_AFTER = f"{FLOW}_after_sources"  # the flow on its frozen sources' embeddings, as the ensemble trains it
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
MEMORY_STEPS = 5  # training steps after the warm-up in each memory subprocess
ROUND_STEPS = 5  # consecutive training steps a target gets in its turn


# ---------------------------------------------------------------------- config and data
def compose_config(overrides: list[str]) -> DictConfig:
    """`conf/train.yaml` with the command line's Hydra overrides, as `python train.py` composes it.

    The learning rate is held constant unless an override says otherwise: a schedule over the fit
    (`lr_schedule=cosine`, the default) takes its length from a Lightning Trainer, which these
    timed steps run without; it changes the rate, not the work of a step.
    """
    if not any(o.lstrip("+~").startswith("lr_schedule=") for o in overrides):
        overrides = [*overrides, "lr_schedule=constant"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def setup_data(cfg: DictConfig) -> AsdDataModule:
    """The run's datamodule, generated (synthetic) or decoded into the cache on first use; with the
    members' log-mels in the feature cache, as `train.py` has them (unless data.feature_cache=false)."""
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup()
    dm.cache_features(logmel_frontends(build_ensemble(cfg, data_facts(dm)).members.values()))
    return dm


def build_model(cfg: DictConfig, facts: dict[str, Any], which: str) -> Ensemble:
    """The configured Ensemble, or one member of it alone wrapped in an Ensemble of one."""
    full = build_ensemble(cfg, facts)
    if which == ENSEMBLE:
        return full
    if which == FLOW_AFTER:
        # the flow as the joint step trains it, its sources only embedding: b5 trained after them
        sources = full.flow_sources
        return Ensemble(
            {n: full.members[n] for n in [*sources, FLOW]},
            loss_weights={FLOW: full.loss_weights[FLOW]},
            frozen=sources,
            grad_norm_every=full.grad_norm_every,
        )
    if which == FLOW:
        # alone, the flow is built as `branch=b5` builds it: on log-mel statistics, not others' embeddings
        alone = cfg.copy()
        alone.branch, alone.reference, alone.freeze = [FLOW], False, []
        return build_ensemble(alone, facts)
    return Ensemble(
        {which: full.members[which]},
        loss_weights={which: full.loss_weights[which]},
        frozen=[which] if which in full.frozen else [],
        grad_norm_every=full.grad_norm_every,
    )


def batches(dm: AsdDataModule) -> Iterator[dict[str, Tensor]]:
    """Training batches from the fit loader, epoch after epoch."""
    while True:
        yield from dm.train_dataloader()


# ---------------------------------------------------------------------- memory
def current_rss_kib() -> int:
    """Resident set size now, KiB (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    """Peak resident set size of this process, KiB (`ru_maxrss` is bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory increase over a block: CUDA allocator peak, or process RSS peak on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
        else:
            # Without the reset, a higher peak from decoding the data would hide the training peak.
            if reset_peak_rss():
                self.method = "peak RSS (reset via /proc/self/clear_refs) - RSS before"
                self.base = current_rss_kib() * 1024
            else:
                self.method = "ru_maxrss after - ru_maxrss before (lower bound: earlier peaks not reset)"
                self.base = peak_rss_kib() * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_kib() * 1024
        self.increase = max(0, self.peak - self.base)


# ---------------------------------------------------------------------- measurements (in subprocesses)
def autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    model: Ensemble,
    stream: Iterator[dict[str, Tensor]],
    steps: int,
    device: torch.device,
    precision: str,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
) -> list[tuple[int, float]]:
    """`steps` steps as `Ensemble.training_step` takes them, minus its logging; (clips, seconds) of each."""
    amp = autocast(device, precision)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        model.prime(batch)  # the batch's cached log-mels, as `Ensemble.training_step` does
        with amp():
            losses = model.losses(batch)
            total = sum(model.loss_weights[n] * loss for n, loss in losses.items())
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        sync(device)
        out.append((len(batch["wave"]), time.perf_counter() - start))
    return out


def train_summary(timed: list[tuple[int, float]], round_steps: int) -> dict[str, Any]:
    """Throughput of timed steps: best round (headline), median step, and total wall time.

    On a shared machine a step can stall many times over (OpenMP threads waiting for a
    descheduled sibling). The fastest round of `round_steps` consecutive steps is the least
    disturbed estimate (as `timeit` takes the best repeat); the median step and the wall figure,
    bursts included, stand beside it, and `slow_steps` counts steps over 3x the median.
    """
    clips, seconds = sum(c for c, _ in timed), sum(s for _, s in timed)
    rounds = [timed[i : i + round_steps] for i in range(0, len(timed), round_steps)]
    best = max(sum(c for c, _ in r) / sum(s for _, s in r) for r in rounds)  # clips/s
    median = statistics.median(s / c for c, s in timed)  # seconds per clip
    return {
        "steps": len(timed),
        "clips": clips,
        "seconds": round(seconds, 4),
        "clips_per_s": round(best, 2),
        "clips_per_s_median": round(1.0 / median, 2),
        "clips_per_s_wall": round(clips / seconds, 2),
        "step_ms_median": round(1000 * statistics.median(s for _, s in timed), 2),
        "step_ms_max": round(1000 * max(s for _, s in timed), 2),
        "slow_steps": sum(s / c > 3 * median for c, s in timed),
    }


def frontend_ms(
    model: Ensemble, dm: AsdDataModule, device: torch.device, repeats: int = 10
) -> dict[str, float]:
    """Median milliseconds of each member's own front end (LogMel) on one training batch."""
    wave = next(iter(dm.train_dataloader()))["wave"].to(device)  # (B, T)
    out = {}
    with torch.no_grad():
        for name, member in model.members.items():
            frontend = getattr(member, "frontend", None)
            if frontend is None:
                continue
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                frontend(wave)  # (B, T) -> (B, n_mels, frames)
                sync(device)
                times.append(time.perf_counter() - start)
            out[name] = round(1000 * statistics.median(times), 2)
    return out


class Contender:
    """One model under test (a member alone, or the ensemble) with its optimizers and batch stream."""

    def __init__(self, cfg: DictConfig, dm: AsdDataModule, which: str, device: torch.device, precision: str):
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial weights in every process
        self.name, self.device, self.precision = which, device, precision
        self.model = build_model(cfg, data_facts(dm), which).to(device)
        self.optimizers = self.model.configure_optimizers() if self.model.trainable else []
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
        self.stream = batches(dm)

    def train(self, steps: int) -> list[tuple[int, float]]:
        self.model.train()
        if not self.model.trainable:
            return []
        return train_steps(
            self.model, self.stream, steps, self.device, self.precision, self.optimizers, self.scaler
        )


def measure_memory(cfg: DictConfig, which: str, device: torch.device, precision: str, steps: int) -> dict:
    """Parameter counts and the peak memory increase over `steps` training steps (the first included)."""
    dm = setup_data(cfg)
    c = Contender(cfg, dm, which, device, precision)
    res: dict[str, Any] = {
        "members": list(c.model.members),
        "params": sum(p.numel() for p in c.model.parameters()),
        "trainable_params": sum(p.numel() for p in c.model.parameters() if p.requires_grad),
    }
    with PeakMemory(device) as mem:  # optimizer state is allocated by the first step: inside
        c.train(steps)
    res["peak_mem_mb"] = round(mem.increase / 2**20, 1) if c.model.trainable else None
    res["peak_mem_method"] = mem.method
    return res


def measure_speed(
    cfg: DictConfig,
    targets: list[str],
    device: torch.device,
    precision: str,
    steps: int,
    warmup: int,
    score_repeats: int,
    round_steps: int = ROUND_STEPS,
) -> dict[str, Any]:
    """Training throughput and scoring RTF of every target, interleaved round-robin.

    Every round gives each target `round_steps` training steps, in an order that rotates from
    round to round; the scoring passes over the test split take turns the same way. Load from
    other processes thus falls on all targets alike, and their ratios stay fair even when the
    absolute numbers are disturbed.
    """
    dm = setup_data(cfg)
    contenders = [Contender(cfg, dm, which, device, precision) for which in targets]
    timed: dict[str, list[tuple[int, float]]] = {c.name: [] for c in contenders}
    for c in contenders:
        c.train(warmup)
    rounds = [round_steps] * (steps // round_steps) + ([steps % round_steps] if steps % round_steps else [])
    for r, n in enumerate(rounds):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            timed[c.name] += c.train(n)

    amp = autocast(device, precision)
    test = dm.datasets["test"]
    audio_s = len(dm.tables["test"]) * float(dm.audio.duration)
    best = {c.name: float("inf") for c in contenders}
    columns: dict[str, list[str]] = {}
    for c in contenders:
        c.model.eval()
        fit_member_backends(c.model, dm, dm.datasets["fit"], device)
        with amp():
            infer(lambda b, m=c.model: member_scores(m, b), test, device, dm.eval_batch_size)  # warm-up pass
    for r in range(score_repeats):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            start = time.perf_counter()
            with amp():
                cols = infer(
                    lambda b, m=c.model: member_scores(m, b), test, device, dm.eval_batch_size
                )  # on the host
            best[c.name] = min(best[c.name], time.perf_counter() - start)
            columns[c.name] = [k for k in cols if k != "index"]

    res = {}
    for c in contenders:
        res[c.name] = {
            "train": train_summary(timed[c.name], round_steps) if timed[c.name] else None,
            "score": {
                "clips": len(dm.tables["test"]),
                "audio_s": audio_s,
                "seconds": round(best[c.name], 4),
                "rtf": best[c.name] / audio_s,
                "columns": columns[c.name],
            },
            "frontend_ms_per_batch": frontend_ms(c.model, dm, device),
        }
    return res


def worker(args: argparse.Namespace) -> int:
    """Subprocess entry: `memory:<target>` or `speed:<target>,<target>..`; numbers to `args.worker_out`."""
    reuse_freed_memory()  # as the entry points do (ASD_MALLOC; recorded as `allocator`)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(args.overrides)
    device = torch.device(args.device)
    kind, _, what = args.worker.partition(":")
    if kind == "memory":
        res = measure_memory(cfg, what, device, args.precision, args.warmup + MEMORY_STEPS)
    else:
        res = measure_speed(
            cfg, what.split(","), device, args.precision, args.steps, args.warmup, args.score_repeats
        )
    Path(args.worker_out).write_text(json.dumps(res))
    return 0


def run_worker(job: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (a memory peak of its own, nothing left warm)."""
    out = tmp / f"{job.replace(':', '-').replace(',', '-')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", job, "--worker-out", str(out)]
    cmd += ["--device", args.device, "--precision", args.precision, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--score-repeats", str(args.score_repeats)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += args.overrides
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"measuring {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------- the whole benchmark
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def one_after_another(results: dict[str, Any], members: list[str], key: str) -> float:
    """Clips/s of training `members` alone, one after the other: each makes its own pass over the
    data, so their seconds per clip add up."""
    return 1.0 / sum(1.0 / results[n]["train"][key] for n in members)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data once, measure every member and the ensemble, compare joint with sequential."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AsdError("--device cuda: torch sees no CUDA device here; use --device cpu")
    cfg = compose_config(args.overrides)
    names = member_names(cfg)
    load_before = os.getloadavg()
    data_start = time.perf_counter()
    dm = setup_data(cfg)  # generates / caches the data once, before the timed subprocesses
    data_s = time.perf_counter() - data_start
    full = build_ensemble(cfg, data_facts(dm))  # a bad member config fails here, with its own message
    targets = names + ([ENSEMBLE] if len(names) > 1 else [])
    if FLOW in full.trainable and full.flow_sources:
        targets.append(FLOW_AFTER)
    with tempfile.TemporaryDirectory(prefix="asd-bench-train-") as tmp:
        memory = {}
        for which in targets:
            print(f"measuring the memory of {which} ...", file=sys.stderr, flush=True)
            memory[which] = run_worker(f"memory:{which}", args, Path(tmp))
        print(f"timing {', '.join(targets)} interleaved ...", file=sys.stderr, flush=True)
        results = run_worker(f"speed:{','.join(targets)}", args, Path(tmp))
    for which, mem in memory.items():
        train = results[which]["train"]
        if train:
            train["peak_mem_mb"], train["peak_mem_method"] = (
                mem.pop("peak_mem_mb"),
                mem.pop("peak_mem_method"),
            )
            train["peak_mem_steps"] = args.warmup + MEMORY_STEPS
        results[which] = {**mem, **results[which]}

    res: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "precision": args.precision,
        "allocator": allocator_choice(),
        "steps": args.steps,
        "warmup": args.warmup,
        "score_repeats": args.score_repeats,
        "overrides": args.overrides,
        "config": {
            "data": cfg.data.name,
            "batch_size": int(cfg.data.batch_size),
            "eval_batch_size": int(cfg.data.eval_batch_size or cfg.data.batch_size),
            "num_workers": int(cfg.data.num_workers),
            "members": names,
            "frozen": OmegaConf.to_object(cfg.freeze) if OmegaConf.is_config(cfg.freeze) else cfg.freeze,
            "branches": {n: OmegaConf.to_container(cfg.branches[n], resolve=True) for n in names},
        },
        "data": {
            "fit_clips": len(dm.tables["fit"]),
            "test_clips": len(dm.tables["test"]),
            "clip_s": float(dm.audio.duration),
            "sample_rate": int(dm.audio.sample_rate),
            "setup_s": round(data_s, 2),
        },
        "results": results,
    }
    trained = [n for n in names if results[n]["train"]]
    if ENSEMBLE in results and results[ENSEMBLE]["train"] and len(trained) > 1:
        same = [FLOW_AFTER if n == FLOW and FLOW_AFTER in results else n for n in trained]
        res["joint_vs_sequential"] = {"sequential_members": same}
        for key, suffix in (
            ("clips_per_s", ""),
            ("clips_per_s_median", "_median"),
            ("clips_per_s_wall", "_wall"),
        ):
            seq = one_after_another(results, same, key)
            joint = results[ENSEMBLE]["train"][key]
            res["joint_vs_sequential"] |= {
                f"sequential_clips_per_s{suffix}": round(seq, 2),
                f"joint_clips_per_s{suffix}": joint,
                f"ratio{suffix}": round(joint / seq, 3),
            }
            if same != trained:
                alone = one_after_another(results, trained, key)
                res["joint_vs_sequential"][f"ratio_b5_alone{suffix}"] = round(joint / alone, 3)
    return res


def markdown(res: dict[str, Any]) -> str:
    """One line for a results table."""
    cells = []
    for name, r in res["results"].items():
        t = r["train"]
        train = f"{t['clips_per_s']:.0f} clips/s, {t['peak_mem_mb']:.0f} MB" if t else "frozen"
        cells.append(f"{name} {train}, RTF {r['score']['rtf']:.5f}")
    joint = res.get("joint_vs_sequential")
    ratio = f"joint/sequential {joint['ratio']:.2f}x" if joint else "no joint comparison"
    machine = f"{res['device_name']} ({res['cpu_count']} CPU, load {res['loadavg_before'][0]:.1f})"
    run = (
        f"torch {res['torch']}, {res['precision']}, batch {res['config']['batch_size']}, {res['steps']} steps"
    )
    return f"| {res['date'][:10]} | {machine} | {run} | {'; '.join(cells)} | {ratio} |"


def print_table(res: dict[str, Any]) -> None:
    d, c = res["data"], res["config"]
    print(
        f"{res['device_name']} ({res['device']}, {res['cpu_count']} CPUs, {res['torch_threads']} torch "
        f"threads), torch {res['torch']}, precision {res['precision']}, load {res['loadavg_before']}"
    )
    print(
        f"data {c['data']}: {d['fit_clips']} fit / {d['test_clips']} test clips of {d['clip_s']:g} s; "
        f"batch {c['batch_size']}; {res['warmup']} warm-up + {res['steps']} timed steps"
    )
    head = (
        "member",
        "params",
        "clips/s",
        "median",
        "wall",
        "slow",
        "step ms",
        "peak MB",
        "score RTF",
        "x realtime",
    )
    first = max(10, *(len(n) + 1 for n in res["results"]))  # b5_after_sources is 16 wide
    widths = (first, 10, 9, 8, 8, 6, 9, 9, 11, 12)
    print(
        "".join(
            f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths, strict=True))
        )
    )
    for name, r in res["results"].items():
        t = r["train"]
        if t:
            train = (
                f"{t['clips_per_s']:>9.1f}{t['clips_per_s_median']:>8.1f}{t['clips_per_s_wall']:>8.1f}{t['slow_steps']:>6}"
                f"{t['step_ms_median']:>9.1f}{t['peak_mem_mb']:>9.1f}"
            )
        else:
            train = f"{'frozen':>49}"
        rtf = r["score"]["rtf"]
        print(f"{name:<{first}}{r['params']:>10,}{train}{rtf:>11.5f}{1 / rtf:>11.0f}x")
    joint = res.get("joint_vs_sequential")
    if joint:
        print(
            f"sequential ({' then '.join(joint['sequential_members'])}, a pass each): "
            f"{joint['sequential_clips_per_s']:.1f} clips/s; joint ensemble (one pass): "
            f"{joint['joint_clips_per_s']:.1f} clips/s; joint/sequential {joint['ratio']:.2f}x "
            f"(from median steps: {joint['ratio_median']:.2f}x)"
            + (
                f"; with b5 alone on log-mel statistics: {joint['ratio_b5_alone']:.2f}x"
                if "ratio_b5_alone" in joint
                else ""
            )
        )
    if ENSEMBLE in res["results"]:
        fe = res["results"][ENSEMBLE]["frontend_ms_per_batch"]
        if fe:
            cells = ", ".join(f"{n} {ms:.1f} ms" for n, ms in fe.items())
            print(f"each member computes its own LogMel per batch in the joint step: {cells}")
    print(
        "(clips/s: fastest round of consecutive steps; median: from the median step; wall: total time,\n"
        " bursts of other processes included; slow: steps over 3x the median; step ms: median;\n"
        " peak MB: memory increase over the first training steps; RTF: scoring seconds per second of audio)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="32",
        help="autocast for training and scoring: 32 (off), bf16 or 16 (default 32)",
    )
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per member (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    parser.add_argument(
        "--score-repeats",
        type=int,
        default=5,
        help="scoring passes over the test split; the fastest counts (default 5)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. branches.b2.dim=128 data.batch_size=32"
    )
    args = parser.parse_args(argv)
    try:
        if args.worker:
            return worker(args)
        for key, least in (("steps", 1), ("warmup", 0), ("score_repeats", 1), ("threads", 1)):
            if getattr(args, key) is not None and getattr(args, key) < least:
                raise AsdError(f"--{key.replace('_', '-')}={getattr(args, key)} must be at least {least}")
        res = run(args)
    except (AsdError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["markdown"] = markdown(res)
    print_table(res)
    print(res["markdown"])
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
