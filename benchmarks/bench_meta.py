"""MAML meta step cost: `torch.func.vmap` over tasks vs a Python loop over tasks, first and second order.

One meta step is `MAML.outer_loss(tasks)` (inner steps on every task's support, query loss) plus
its backward to the meta-parameters. Both sides compute the same numbers; the table shows the
milliseconds per step, the loop/vmap ratio and the largest difference between the two sides'
meta-gradients, and the same numbers go to a JSON file.

    python benchmarks/bench_meta.py                 # CPU, ~10 s on one thread
    python benchmarks/bench_meta.py --device cuda   # on the GPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import best_times, environment, write_result  # benchmarks/timing.py, beside this script

from asd.fusion import MAML, MetaClassifier, make_tasks

TASKS = (8, 32, 128)
MEMBERS, MACHINES = 4, 7  # features: 2 * 4 + 1 + 3 + 7 = 19 columns, as meta_features makes them


def run_case(
    n_tasks: int, per_class: int, first_order: bool, inner_steps: int, repeats: int, device: torch.device
) -> dict:
    gen = torch.Generator().manual_seed(n_tasks)
    dim = 2 * MEMBERS + 1 + 3 + MACHINES
    rows = 2 * per_class * n_tasks
    x = torch.randn(rows, dim, generator=gen)
    y = (torch.arange(rows) % 2).float()  # per_class normals and anomalies in every task
    group = torch.arange(rows) // (2 * per_class)
    tasks = make_tasks(x.to(device), y.to(device), group.to(device), 0.5, gen)
    torch.manual_seed(0)
    model = MetaClassifier(dim, hidden=16).to(device)
    sides = [
        MAML(model, inner_lr=0.1, inner_steps=inner_steps, first_order=first_order, use_vmap=v)
        for v in (True, False)
    ]

    def step(maml: MAML):
        def run() -> torch.Tensor:
            loss = maml.outer_loss(tasks)
            grads = torch.autograd.grad(loss, list(maml.params().values()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return torch.cat([g.flatten() for g in grads])

        return run

    fns = [step(m) for m in sides]
    for fn in fns:  # warm-up: first-call tracing of the torch.func transforms, allocations
        fn()
    (t_vmap, t_loop), (g_vmap, g_loop) = best_times(fns, repeats)
    return {
        "tasks": n_tasks,
        "rows_per_task": 2 * per_class,
        "order": "first" if first_order else "second",
        "vmap_ms": 1000 * t_vmap,
        "loop_ms": 1000 * t_loop,
        "loop_over_vmap": t_loop / t_vmap,
        "max_abs_grad_diff": float((g_vmap - g_loop).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=8, help="normals (and anomalies) per task")
    parser.add_argument("--inner-steps", type=int, default=3, help="inner SGD steps per task")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (best is kept)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_meta.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    print(f"{'tasks':>5} {'order':>6} {'vmap ms':>8} {'loop ms':>8} {'loop/vmap':>9} {'max |dgrad|':>11}")
    for first_order in (True, False):
        for n_tasks in TASKS:
            row = run_case(n_tasks, args.per_class, first_order, args.inner_steps, args.repeats, device)
            rows.append(row)
            print(
                f"{n_tasks:>5} {row['order']:>6} {row['vmap_ms']:>8.1f} {row['loop_ms']:>8.1f} "
                f"{row['loop_over_vmap']:>9.2f} {row['max_abs_grad_diff']:>11.1e}"
            )
    result = {
        "what": "MAML.outer_loss + backward per meta step: vmap over tasks vs a Python loop over tasks",
        "model": f"MetaClassifier({2 * MEMBERS + 1 + 3 + MACHINES}, hidden=16)",
        "inner_steps": args.inner_steps,
        "rows_per_task": 2 * args.per_class,
        **environment(device),
        "cases": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
