"""How many lists NearDuplicateFilter's IVF must probe to find a near copy (its `nprobe`).

    python bench/dedup_recall.py               # 200k random 768-d vectors, 16,384 near copies

Builds the IVF as KeptIndex does with `nlist: auto` (f * sqrt(n / 1.5) lists, k-means on 16 a
list, 10 iterations) for f = 4 (the stage's) and 8, then ranks, for each near copy (the same
noise as bench/dedup.py: std 0.1 on a std-1 vector, cosine ~0.995), the list its source is in
among the copy's nearest centroids. A copy whose source's list ranks at or past p is missed at
nprobe p (it may still be caught through another kept copy). Prints one line per f.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=16384)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n, d, nq = args.n, args.dim, args.queries
    x = rng.standard_normal((n, d), dtype=np.float32)
    src = rng.integers(n, size=nq)
    q = x[src] + args.noise * rng.standard_normal((nq, d), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for f in (4, 8):
        nlist = round(f * np.sqrt(n / 1.5))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.min_points_per_centroid, ivf.cp.max_points_per_centroid = 10, 1, 64
        t0 = time.perf_counter()
        ivf.train(x[:: max(1, n // (16 * nlist))][: 16 * nlist])
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ivf.add(x)
        add_s = time.perf_counter() - t0
        _, own = ivf.quantizer.search(x[src], 1)
        _, near = ivf.quantizer.search(q, 32)
        hit = near == own
        ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), 99)
        misses = {p: int((ranks >= p).sum()) for p in (1, 2, 4, 6, 8, 12, 16, 24)}
        times = {}
        for p in (8, 16):
            ivf.nprobe = p
            t0 = time.perf_counter()
            ivf.search(q[:2048], 1)
            times[p] = round(time.perf_counter() - t0, 3)
        print(
            f"f {f} nlist {nlist} train {train_s:.1f} s add {add_s:.1f} s; copies missed of {nq} at nprobe p: "
            f"{misses}; search of 2048 at nprobe 8/16: {times[8]}/{times[16]} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
