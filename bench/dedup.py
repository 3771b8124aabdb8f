"""NearDuplicateFilter against brute-force numpy on N synthetic embeddings in one stream.

    python bench/dedup.py                      # 1M x 768-d, as the issue asks
    python bench/dedup.py --n 200000 --exact-up-to 20000 --nlist 256   # a smaller machine

Vectors are random Gaussian (cosine between two of them ~0 at 768-d), and every
`--dup-every`-th one is a planted near copy (small noise, cosine ~0.99) of a vector from the
last few batches. The stage runs as the daemon would run it (its state file appended and
fsynced per batch). Brute force is the same in-order decision with numpy matrix products
against every kept vector; it is quadratic, so unless `--brute-prefix` covers all N it runs on
a prefix and its time at N is extrapolated as t(prefix) * (N / prefix)^2, which the output
says. Decisions are compared on the prefix (they must agree), and over all N against the
planted truth. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.base import Filtered  # noqa: E402
from stages.filters.near_duplicate import NearDuplicateFilter, NearDuplicateFilterConfig  # noqa: E402

WINDOW = 8  # batches a planted copy may reach back


def stream(n: int, dim: int, batch: int, dup_every: int, noise: float, seed: int):
    """Batches of (ids, vectors, planted {index: source index}); the same for both sides."""
    rng = np.random.default_rng(seed)
    recent: list[tuple[int, np.ndarray]] = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        vectors = rng.standard_normal((m, dim), dtype=np.float32)
        planted = {}
        for i in range(m):
            index = start + i
            if index and index % dup_every == 0:
                first, block = recent[rng.integers(len(recent))] if recent else (start, vectors[:i])
                if len(block) == 0:
                    continue
                j = int(rng.integers(len(block)))
                source = first + j
                if source >= index:
                    continue
                vectors[i] = block[j] + noise * rng.standard_normal(dim, dtype=np.float32)
                planted[index] = source
        recent.append((start, vectors))
        recent = recent[-WINDOW:]
        yield [f"v{start + i}" for i in range(m)], vectors, planted


def brute(n, args) -> tuple[float, dict[int, int | None]]:
    kept = np.empty((n, args.dim), dtype=np.float32)
    kept_ids = np.empty(n, dtype=np.int64)
    count, decisions = 0, {}
    t0 = time.perf_counter()
    done = 0
    # the same stream as the stage saw (a shorter one would draw a different last batch), cut at n
    for ids, vectors, _ in stream(args.n, args.dim, args.batch, args.dup_every, args.noise, args.seed):
        if done >= n:
            break
        ids, vectors = ids[: n - done], vectors[: n - done]
        done += len(ids)
        q = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        prior = q @ kept[:count].T if count else np.zeros((len(q), 0), np.float32)
        within = q @ q.T
        here: list[int] = []
        for i, rid in enumerate(ids):
            index = int(rid[1:])
            best, of = -np.inf, None
            if count:
                j = int(np.argmax(prior[i]))
                best, of = float(prior[i, j]), int(kept_ids[j])
            if here:
                k = here[int(np.argmax(within[i, here]))]
                if within[i, k] > best:
                    best, of = float(within[i, k]), int(ids[k][1:])
            if of is not None and best >= args.threshold:
                decisions[index] = of
            else:
                decisions[index] = None
                here.append(i)
        kept[count : count + len(here)] = q[here]
        kept_ids[count : count + len(here)] = [int(ids[i][1:]) for i in here]
        count += len(here)
    return time.perf_counter() - t0, decisions


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dup-every", type=int, default=50, help="every k-th vector is a planted near copy")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the planted copy's noise (base std 1)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--exact-up-to", type=int, default=200_000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--brute-prefix", type=int, default=50_000, help="brute force on this many (0: all N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = NearDuplicateFilterConfig(
        threshold=args.threshold,
        exact_up_to=args.exact_up_to,
        nlist=args.nlist,
        nprobe=args.nprobe,
        state_dir=Path(tempfile.mkdtemp(prefix="dedup-bench-")),
    )
    stage = NearDuplicateFilter(config, "cpu")
    stage.load()
    decisions: dict[int, int | None] = {}
    truth: dict[int, int] = {}
    rss0 = rss_mb()
    busy = 0.0
    for ids, vectors, planted in stream(args.n, args.dim, args.batch, args.dup_every, args.noise, args.seed):
        truth.update(planted)
        records = [{"id": rid, "_job": "bench", "embedding": v} for rid, v in zip(ids, vectors, strict=True)]
        t0 = time.perf_counter()
        out = stage.process(records)
        busy += time.perf_counter() - t0
        for rid, decision in zip(ids, out, strict=True):
            of = decision.scores["duplicate_of"] if isinstance(decision, Filtered) else None
            decisions[int(rid[1:])] = int(of[1:]) if of else None
    rss1 = rss_mb()
    (scope,) = stage._scopes.values()
    kept = scope.index.ntotal

    prefix = args.n if args.brute_prefix <= 0 else min(args.brute_prefix, args.n)
    brute_s, brute_decisions = brute(prefix, args)
    agree = sum(brute_decisions[i] == decisions[i] for i in range(prefix))
    brute_at_n = brute_s * (args.n / prefix) ** 2
    planted_found = sum(decisions[i] is not None for i in truth)  # its source may itself be a dropped copy
    false_drops = sum(1 for i, of in decisions.items() if of is not None and i not in truth)

    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "batch": args.batch,
                "index": type(scope.index).__name__,
                "exact_up_to": args.exact_up_to,
                "nlist": args.nlist,
                "nprobe": args.nprobe,
                "faiss_s": round(busy, 2),
                "faiss_per_s": round(args.n / busy, 1),
                "brute_prefix": prefix,
                "brute_prefix_s": round(brute_s, 2),
                "brute_s_at_n": round(brute_at_n, 1),
                "brute_extrapolated": prefix < args.n,
                "brute_per_s_at_n": round(args.n / brute_at_n, 1),
                "speedup": round(brute_at_n / busy, 1),
                "same_decisions_on_prefix": f"{agree}/{prefix}",
                "planted": len(truth),
                "planted_found": planted_found,
                "false_drops": false_drops,
                "kept": kept,
                "rss_mb_delta": round(rss1 - rss0, 1),
                "index_bytes_per_vector": args.dim * 4,
                "rss_bytes_per_kept_vector": round((rss1 - rss0) * 2**20 / max(kept, 1), 1),
                "state_file_bytes": scope.path.stat().st_size,
            }
        )
    )


if __name__ == "__main__":
    main()
