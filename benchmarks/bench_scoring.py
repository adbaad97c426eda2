"""kNN scoring throughput: `asd.scoring.KnnBackend` (tiled torch) vs scikit-learn and faiss, exact search.

Each contender scores the same queries against the same bank with the cosine distance, averaged
over the k nearest neighbours (what b1's and b3's backends compute):

  torch     `KnnBackend.score`: float32 tiles ranked with matrix products, the k winners'
            distances recomputed in float64 (what asd uses)
  sklearn   `NearestNeighbors(metric="cosine", algorithm="brute")`
  faiss     `faiss.IndexFlatIP` on L2-normalised rows (exact inner-product search in float32),
            distance 1 - q.b; only when faiss-cpu is installed (`pip install faiss-cpu`; asd does
            not need it) and on CPU

The table shows queries per second, each contender's time over torch's, and each one's largest
difference from a float64 brute-force reference on the first 100 queries; the same numbers go to
a JSON file. Best of `--repeats`, the contenders taking turns (`benchmarks/timing.py`); faiss
uses as many threads as torch.

    python benchmarks/bench_scoring.py                 # CPU, ~5 min on 2 cores
    python benchmarks/bench_scoring.py --banks 1000 10000 --dims 128
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

CHECKED = 100  # queries compared against the float64 reference


def reference(query: torch.Tensor, bank: torch.Tensor, k: int) -> np.ndarray:
    """Mean cosine distance (1 - cos) to the k nearest, brute force in float64."""
    q, b = (torch.nn.functional.normalize(x.double(), dim=1) for x in (query, bank))
    return (1 - q @ b.T).topk(k, dim=1, largest=False).values.mean(dim=1).numpy()


def contenders(bank: torch.Tensor, query: torch.Tensor, k: int, device: torch.device) -> dict:
    """name -> function() -> (queries,) float64 mean distances; each indexed outside the timing."""
    zeros = torch.zeros(bank.shape[0], dtype=torch.long, device=device)
    knn = KnnBackend(k=k).fit(bank.to(device), zeros, zeros)
    q_dev, q_sec = query.to(device), torch.zeros(query.shape[0], dtype=torch.long, device=device)

    def torch_score() -> np.ndarray:
        out = knn.score(q_dev, q_sec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.cpu().numpy()

    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(bank.numpy())
    out = {"torch": torch_score, "sklearn": lambda: nn_index.kneighbors(query.numpy())[0].mean(axis=1)}
    try:
        import faiss
    except ImportError:
        return out
    if device.type != "cpu":
        return out
    faiss.omp_set_num_threads(torch.get_num_threads())
    unit_bank, unit_query = (torch.nn.functional.normalize(x, dim=1).numpy() for x in (bank, query))
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(unit_bank))
    out["faiss"] = lambda: (1 - index.search(np.ascontiguousarray(unit_query), k)[0].astype(np.float64)).mean(
        1
    )
    return out


def run_case(n_bank: int, dim: int, n_query: int, k: int, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(n_bank + dim)
    bank = torch.randn(n_bank, dim, generator=gen)
    query = torch.randn(n_query, dim, generator=gen)
    fns = contenders(bank, query, k, device)
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, CUDA context, the device copy of the bank
    times, outs = best_times(list(fns.values()), repeats)
    ref = reference(query[:CHECKED], bank, k)
    row = {"bank": n_bank, "dim": dim, "queries": n_query}
    for name, t, scores in zip(fns, times, outs, strict=True):
        row[name] = {
            "queries_per_s": n_query / t,
            "time_over_torch": t / times[0],
            "max_abs_diff": float(np.abs(np.asarray(scores)[:CHECKED] - ref).max()),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 384, 768])
    parser.add_argument("--queries", type=int, default=1000, help="query clips per case")
    parser.add_argument("--k", type=int, default=1, help="neighbours averaged per query")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case (best is kept)")
    parser.add_argument("--device", default="cpu", help="torch device for KnnBackend (cpu, cuda)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_scoring.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    print(f"{'bank':>7} {'dim':>4} {'method':>8} {'queries/s':>10} {'/torch':>7} {'max |diff|':>10}")
    for n_bank in args.banks:
        for dim in args.dims:
            row = run_case(n_bank, dim, args.queries, args.k, args.repeats, device)
            rows.append(row)
            for name in ("torch", "sklearn", "faiss"):
                if name in row:
                    r = row[name]
                    print(
                        f"{n_bank:>7} {dim:>4} {name:>8} {r['queries_per_s']:>10.0f} "
                        f"{r['time_over_torch']:>7.2f} {r['max_abs_diff']:>10.1e}"
                    )
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    result = {
        "what": "exact kNN mean cosine distance: KnnBackend.score, sklearn brute force, faiss IndexFlatIP",
        "k": args.k,
        **environment(device),
        "sklearn": sklearn.__version__,
        "faiss": faiss_version,
        "cases": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
