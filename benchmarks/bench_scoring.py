"""kNN scoring throughput: `asd.scoring.KnnBackend` (tiled torch) vs sklearn brute-force NearestNeighbors.

Both score the same queries against the same bank with cosine distance and k nearest neighbours;
the table shows queries per second, the speed ratio and the largest score difference between
the two, and the same numbers go to a JSON file.

    python benchmarks/bench_scoring.py                 # CPU, ~30 s on 2 cores
    python benchmarks/bench_scoring.py --device cuda   # torch side on the GPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.neighbors import NearestNeighbors
from timing import best_times, environment, write_result  # benchmarks/timing.py, beside this script

from asd.scoring import KnnBackend

BANKS = (1_000, 10_000)
DIMS = (128, 384, 768)


def run_case(n_bank: int, dim: int, n_query: int, k: int, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(n_bank + dim)
    bank = torch.randn(n_bank, dim, generator=gen)
    query = torch.randn(n_query, dim, generator=gen)
    zeros_bank = torch.zeros(n_bank, dtype=torch.long)
    knn = KnnBackend(k=k).fit(bank.to(device), zeros_bank.to(device), zeros_bank.to(device))
    q_dev, q_sec = query.to(device), torch.zeros(n_query, dtype=torch.long, device=device)

    def torch_score() -> np.ndarray:
        out = knn.score(q_dev, q_sec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.cpu().numpy()

    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank.numpy())

    def sklearn_score() -> np.ndarray:
        return nn_index.kneighbors(query.numpy())[0].mean(axis=1)

    torch_score()  # warm-up: first-call allocations, CUDA context, the device copy of the bank
    (t_torch, t_sk), (s_torch, s_sk) = best_times([torch_score, sklearn_score], repeats)
    return {
        "bank": n_bank,
        "dim": dim,
        "queries": n_query,
        "torch_qps": n_query / t_torch,
        "sklearn_qps": n_query / t_sk,
        "speedup": t_sk / t_torch,
        "max_abs_diff": float(np.abs(s_torch - s_sk).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000, help="query clips per case")
    parser.add_argument("--k", type=int, default=1, help="neighbours averaged per query")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (best is kept)")
    parser.add_argument("--device", default="cpu", help="torch device for KnnBackend (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_scoring.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    print(f"{'bank':>6} {'dim':>4} {'torch q/s':>10} {'sklearn q/s':>12} {'ratio':>6} {'max |diff|':>10}")
    for n_bank in BANKS:
        for dim in DIMS:
            row = run_case(n_bank, dim, args.queries, args.k, args.repeats, device)
            rows.append(row)
            print(
                f"{n_bank:>6} {dim:>4} {row['torch_qps']:>10.0f} {row['sklearn_qps']:>12.0f} "
                f"{row['speedup']:>6.2f} {row['max_abs_diff']:>10.1e}"
            )
    result = {
        "what": "KnnBackend.score vs sklearn NearestNeighbors(metric='cosine', algorithm='brute')",
        "k": args.k,
        **environment(device),
        "sklearn": sklearn.__version__,
        "cases": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
