"""Members trained side by side in threads against the one joint step (issue 13's missing 1.3x).

The joint step (`Ensemble.training_step`) runs every member's forward, one backward of the loss
sum and one optimizer step per member, all on the calling thread; torch spreads each operation
over its intra-op threads. The members share no parameters, so their forward + backward + step
could instead run side by side: two Python threads, one intra-op thread each, the members split
into two groups of about equal time (the longest first into the lighter group). This script
measures whether that beats the joint step on this machine, on the configured members and data
as `python train.py` builds them (the flow, b5, gets its sources' embeddings first, as the joint
step gives them).

Three ways take turns every round (so load from other processes falls on all of them), each a
full step (zero_grad, losses, backward, optimizer steps), median over the timed steps:

  joint       the joint step as it trains, with torch's intra-op threads (default: its own choice)
  joint_1     the same step with one intra-op thread (what the threads below each get)
  threads     the members in two threads, one intra-op thread each

and prints ms per step and the ratio joint / threads (above 1: the threads are faster). The
threads draw from torch's one global random generator in an order that changes from run to
run, so that way of training would not reproduce a run; it is measured here, not offered.

    python benchmarks/bench_member_threads.py                      # ~1 min on 2 cores
    python benchmarks/bench_member_threads.py --steps 40 branch=[b2,b4,b6]

Writes `benchmarks/results/<name>.{json,md}` (default name bench_member_threads).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytorch_lightning as L
import torch
from bench_train import ENSEMBLE, batches, build_model, compose_config, setup_data
from timing import environment, write_tables
from torch import Tensor

from asd.ensemble import FLOW, Ensemble
from asd.run.build import data_facts

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("joint", "joint_1", "threads")


def balanced_groups(times: dict[str, float], groups: int = 2) -> list[list[str]]:
    """Members split into `groups` groups of about equal summed time: longest first, each into the
    group with the least time so far (ties: the first group). Groups keep that order."""
    out: list[list[str]] = [[] for _ in range(groups)]
    load = [0.0] * groups
    for name in sorted(times, key=lambda n: (-times[n], n)):
        i = min(range(groups), key=lambda g: (load[g], g))
        out[i].append(name)
        load[i] += times[name]
    return out


class Stepper:
    """One ensemble and its optimizers, stepped jointly or member by member."""

    def __init__(self, model: Ensemble, stream: Iterator[dict[str, Tensor]]):
        self.model, self.stream = model, stream
        self.names = list(model.trainable)
        optimizers = model.configure_optimizers()  # a list, or (list, schedulers) with a schedule
        optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
        self.optimizers = dict(zip(self.names, optimizers, strict=True))
        model.train()

    def batch(self) -> dict[str, Tensor]:
        batch = next(self.stream)
        self.model.prime(batch)  # the batch's cached log-mels, as the joint step has them
        return batch

    def joint(self, batch: dict[str, Tensor]) -> None:
        """`Ensemble.training_step` minus its logging."""
        m = self.model
        losses = m.losses(batch)
        total = sum(m.loss_weights[n] * loss for n, loss in losses.items())
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in self.optimizers.values():
            opt.step()

    def members(self, batch: dict[str, Tensor], names: Sequence[str]) -> None:
        """zero_grad, loss, backward and step of each of `names`, one after another."""
        m = self.model
        for n in names:
            opt = self.optimizers[n]
            opt.zero_grad(set_to_none=True)
            (m.loss_weights[n] * m.members[n].loss(batch)).backward()
            opt.step()

    def with_flow(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with the flow's input (its sources' embeddings), as `Ensemble.losses` builds it."""
        return self.model.with_flow_input(batch) if FLOW in self.names else batch


def median_ms(fn: Callable[[], None], steps: int, setup: Callable[[], object] | None = None) -> float:
    """Median ms of `steps` calls of `fn` (given `setup()`'s result when `setup` is set, untimed)."""
    times = []
    for _ in range(steps):
        arg = setup() if setup is not None else None
        start = time.perf_counter()
        fn() if setup is None else fn(arg)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(stepper: Stepper, steps: int, rounds: int, warmup: int, threads: int) -> dict:
    """Per-member time (1 thread), the groups, and each way's median ms per step over `rounds`;
    torch's intra-op threads are `threads` again afterwards, whatever happened."""
    try:
        return _measure(stepper, steps, rounds, warmup, threads)
    finally:
        torch.set_num_threads(threads)


def _measure(stepper: Stepper, steps: int, rounds: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(1)
    alone = {}
    for n in stepper.names:  # each member's own step; the flow's input is made untimed
        for _ in range(warmup):
            stepper.members(stepper.with_flow(stepper.batch()), [n])
        step = lambda batch, n=n: stepper.members(batch, [n])  # noqa: E731
        alone[n] = median_ms(step, steps, setup=lambda: stepper.with_flow(stepper.batch()))
    groups = balanced_groups(alone)
    per_round: dict[str, list[float]] = {w: [] for w in WAYS}
    with ThreadPoolExecutor(len(groups)) as pool:

        def threaded() -> None:
            batch = stepper.with_flow(stepper.batch())  # the flow's sources embed before the threads start
            for f in [pool.submit(stepper.members, batch, g) for g in groups]:
                f.result()

        ways = {
            "joint": (threads, lambda: stepper.joint(stepper.batch())),
            "joint_1": (1, lambda: stepper.joint(stepper.batch())),
            "threads": (1, threaded),
        }
        for _ in range(rounds):
            for way, (n_threads, fn) in ways.items():
                torch.set_num_threads(n_threads)
                for _ in range(warmup):
                    fn()
                per_round[way].append(median_ms(fn, steps))
    ms = {w: statistics.median(v) for w, v in per_round.items()}
    return {
        "member_ms_1_thread": alone,
        "groups": groups,
        "group_ms_1_thread": [sum(alone[n] for n in g) for g in groups],
        "ms_per_step": ms,
        "ms_per_round": per_round,
        "joint_over_threads": ms["joint"] / ms["threads"],
        "joint_1_over_threads": ms["joint_1"] / ms["threads"],
    }


def markdown(result: dict) -> list[str]:
    env, ms = result["environment"], result["ms_per_step"]
    pairs = zip(result["groups"], result["group_ms_1_thread"], strict=True)
    groups = " | ".join(f"{', '.join(g)} ({t:.0f} ms)" for g, t in pairs)
    return [
        "# Members side by side in threads against the joint step (benchmarks/bench_member_threads.py)",
        "",
        f"{result['date']}, {env['machine']}, {result['cpu_count']} CPUs, torch {env['torch']}, "
        f"{result['threads']} intra-op threads for `joint`; batch {result['batch_size']}, "
        f"{result['steps']} timed steps x {result['rounds']} rounds, "
        f"overrides {result['overrides'] or 'none'}",
        "",
        f"groups (each member's step alone, 1 thread): {groups}",
        "",
        "| way | ms per step (median of rounds) | per round |",
        "| --- | --- | --- |",
        *(
            f"| {w} | {ms[w]:.1f} | {', '.join(f'{x:.1f}' for x in result['ms_per_round'][w])} |"
            for w in WAYS
        ),
        "",
        f"joint / threads: **{result['joint_over_threads']:.2f}x**; joint with 1 thread / threads: "
        f"{result['joint_1_over_threads']:.2f}x (above 1: the threads are faster)",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per way and round (default 12)")
    p.add_argument("--rounds", type=int, default=3, help="rounds the ways take turns in (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing (default 2)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of `joint` (default: torch's)")
    p.add_argument("--name", default="bench_member_threads", help="result name under benchmarks/results/")
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = p.parse_args(argv)
    for key, least in (("steps", 1), ("rounds", 1), ("warmup", 0)):
        if getattr(args, key) < least:
            p.error(f"--{key} must be at least {least}")
    threads = args.threads or torch.get_num_threads()
    cfg = compose_config(args.overrides)
    dm = setup_data(cfg)
    L.seed_everything(int(cfg.seed), verbose=False)
    stepper = Stepper(build_model(cfg, data_facts(dm), ENSEMBLE), batches(dm))
    if len(stepper.names) < 2:
        p.error(f"{len(stepper.names)} trainable member(s): threads need at least 2 (see branch=, freeze=)")
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "threads": threads,
        "batch_size": int(cfg.data.batch_size),
        "steps": args.steps,
        "rounds": args.rounds,
        "overrides": args.overrides,
        **measure(stepper, args.steps, args.rounds, args.warmup, threads),
    }
    result["environment"] = environment(torch.device("cpu"))
    write_tables(args.results, args.name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
