"""NearDuplicateFilter against brute-force numpy on N synthetic embeddings in one stream.

    python bench/dedup.py                      # 1M x 768-d, as the issue asks
    python bench/dedup.py --n 200000           # a smaller machine

Vectors are random Gaussian (cosine between two of them ~0 at 768-d), and every
`--dup-every`-th one is a planted near copy (small noise, cosine ~0.99) of a vector from the
last few batches. The stage runs as the daemon would run it (its state file appended and
fsynced per batch); its time is `process` alone (making the vectors is left out on both sides).

Brute force is the same in-order decision with numpy matrix products against every kept
vector. It is quadratic, so unless `--brute-prefix` covers all N it runs on a prefix P and its
time at N is extrapolated from its two measured parts: the products and argmax against the
kept vectors (work ~ kept count) x (N/P)^2, the rest (normalising, the in-batch products, the
loop) x N/P; the output says so. With `--probe` it is also estimated from one batch's products
timed against k kept vectors at five k up to the real kept count, summed over the stream's
batches at their kept counts (no extrapolation in k; the linear rest as above). Decisions are checked three ways: all of the prefix against
brute force; `--sample` random positions over all N, each against an exact scan of every
vector the stage kept before it (a second pass over the same stream); and all N against the
planted copies (found, and drops that were not planted). Prints one JSON line.
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
from stages.filters import near_duplicate  # noqa: E402
from stages.filters.kept_index import KeptIndex  # noqa: E402
from stages.filters.near_duplicate import NearDuplicateFilter, NearDuplicateFilterConfig  # noqa: E402

WINDOW = 8  # batches a planted copy may reach back


def stream(args):
    """Batches of (first index, vectors, planted {index: source index}); the same on every pass."""
    rng = np.random.default_rng(args.seed)
    recent: list[tuple[int, np.ndarray]] = []
    for start in range(0, args.n, args.batch):
        m = min(args.batch, args.n - start)
        vectors = rng.standard_normal((m, args.dim), dtype=np.float32)
        planted = {}
        for i in range(m):
            index = start + i
            if index and index % args.dup_every == 0:
                first, block = recent[rng.integers(len(recent))] if recent else (start, vectors[:i])
                if len(block) == 0:
                    continue
                j = int(rng.integers(len(block)))
                source = first + j
                if source >= index:
                    continue
                vectors[i] = block[j] + args.noise * rng.standard_normal(args.dim, dtype=np.float32)
                planted[index] = source
        recent.append((start, vectors))
        recent = recent[-WINDOW:]
        yield start, vectors, planted


def brute(n, args) -> tuple[float, float, dict[int, int | None]]:
    """(seconds in the work that grows with the kept count, seconds in the rest, decisions)."""
    kept = np.empty((n, args.dim), dtype=np.float32)
    kept_ids = np.empty(n, dtype=np.int64)
    count, decisions, quadratic, linear = 0, {}, 0.0, 0.0
    for start, vectors, _ in stream(args):
        if start >= n:
            break
        vectors = vectors[: n - start]
        t0 = time.perf_counter()
        q = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        t1 = time.perf_counter()
        if count:
            prior = q @ kept[:count].T
            best_j = prior.argmax(axis=1)
            best = prior[np.arange(len(q)), best_j]
        t2 = time.perf_counter()
        within = q @ q.T
        here: list[int] = []
        for i in range(len(q)):
            b, of = (float(best[i]), int(kept_ids[best_j[i]])) if count else (-np.inf, None)
            if here:
                k = here[int(np.argmax(within[i, here]))]
                if within[i, k] > b:
                    b, of = float(within[i, k]), start + k
            decisions[start + i] = of if of is not None and b >= args.threshold else None
            if decisions[start + i] is None:
                here.append(i)
        kept[count : count + len(here)] = q[here]
        kept_ids[count : count + len(here)] = [start + i for i in here]
        count += len(here)
        t3 = time.perf_counter()
        quadratic += t2 - t1
        linear += (t1 - t0) + (t3 - t2)
    return quadratic, linear, decisions


def sample_positions(args) -> np.ndarray:
    rng = np.random.default_rng(args.seed + 1)
    return np.sort(rng.choice(args.n, size=min(args.sample, args.n), replace=False))


def sampled_check(decisions: dict[int, int | None], positions, queries, args) -> tuple[int, int]:
    """At the sampled positions (queries: their normalised vectors, kept from the stage's pass), the
    decision from an exact scan of every vector the stage kept before each, in a second pass."""
    best = np.full(len(positions), -np.inf, dtype=np.float32)
    of = np.full(len(positions), -1, dtype=np.int64)
    for start, vectors, _ in stream(args):
        q = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = np.array([i for i in range(len(q)) if decisions[start + i] is None], dtype=np.int64)
        later = positions >= start  # the queries this batch's kept rows can precede
        if not len(rows) or not later.any():
            continue
        sims = queries[later] @ q[rows].T
        sims[(start + rows)[None, :] >= positions[later][:, None]] = -np.inf  # only kept before the query
        j = sims.argmax(axis=1)
        s = sims[np.arange(len(j)), j]
        better = s > best[later]
        idx = np.flatnonzero(later)[better]
        best[idx], of[idx] = s[better], start + rows[j[better]]
    agree = sum(
        decisions[int(p)] == (int(o) if b >= args.threshold else None)
        for p, b, o in zip(positions, best, of, strict=True)
    )
    return agree, len(positions)


def brute_probed(kept_before: list[int], args) -> tuple[float, list[tuple[int, float]]]:
    """Brute force's products and argmax at N, from timing one batch against k kept vectors at
    five k up to the largest kept count (a line a + b k fitted), summed over the stream's
    batches at their real kept counts; plus the linear rest, measured on the prefix."""
    top = max(kept_before)
    kept = np.random.default_rng(2).standard_normal((top, args.dim), dtype=np.float32)
    q = kept[: args.batch].copy()
    points = []
    for k in np.linspace(top / 8, top, 5).astype(int):
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            prior = q @ kept[:k].T
            j = prior.argmax(axis=1)
            prior[np.arange(len(q)), j]
            best = min(best, time.perf_counter() - t0)
        points.append((int(k), round(best, 4)))
    b, a = np.polyfit([k for k, _ in points], [t for _, t in points], 1)
    return float(sum(a + b * k for k in kept_before if k)), points


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(owner, name: str, totals: dict[str, float]):
    """Wrap a method to add its seconds to totals[name] (the stage's time, split up)."""
    inner = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dup-every", type=int, default=50, help="every k-th vector is a planted near copy")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the planted copy's noise (base std 1)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--exact-up-to", type=int, default=NearDuplicateFilterConfig().exact_up_to)
    parser.add_argument("--nlist", default="auto", help="`auto` or a number of IVF lists")
    parser.add_argument("--nprobe", type=int, default=NearDuplicateFilterConfig().nprobe)
    parser.add_argument("--brute-prefix", type=int, default=50_000, help="brute force on this many (0: all N)")
    parser.add_argument("--sample", type=int, default=2000, help="positions checked exactly over all N")
    parser.add_argument("--probe", action="store_true", help="also time brute force's products at the real sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = NearDuplicateFilterConfig(
        threshold=args.threshold,
        exact_up_to=args.exact_up_to,
        nlist=args.nlist if args.nlist == "auto" else int(args.nlist),
        nprobe=args.nprobe,
        state_dir=Path(tempfile.mkdtemp(prefix="dedup-bench-")),
    )
    split: dict[str, float] = {}
    timed(near_duplicate._Scope, "_persist", split)
    timed(KeptIndex, "_rebuild", split)
    stage = NearDuplicateFilter(config, "cpu")
    stage.load()
    decisions: dict[int, int | None] = {}
    truth: dict[int, int] = {}
    rss0 = rss_mb()
    busy, progress = 0.0, time.time()
    positions = sample_positions(args)
    queries = np.zeros((len(positions), args.dim), dtype=np.float32)
    for start, vectors, planted in stream(args):
        truth.update(planted)
        mine = (positions >= start) & (positions < start + len(vectors))
        queries[mine] = vectors[positions[mine] - start]
        queries[mine] /= np.linalg.norm(queries[mine], axis=1, keepdims=True)
        records = [{"id": f"v{start + i}", "_job": "bench", "embedding": v} for i, v in enumerate(vectors)]
        t0 = time.perf_counter()
        out = stage.process(records)
        busy += time.perf_counter() - t0
        for i, decision in enumerate(out):
            of = decision.scores["duplicate_of"] if isinstance(decision, Filtered) else None
            decisions[start + i] = int(of[1:]) if of else None
        if time.time() - progress > 60:
            progress = time.time()
            print(f"# {start + len(vectors)} decided, stage {busy:.0f} s, {split}", file=sys.stderr, flush=True)
    rss1 = rss_mb()
    (scope,) = stage._scopes.values()
    kept, state_bytes = scope.index.ntotal, scope.path.stat().st_size
    index_name, nlist = type(scope.index.index).__name__, getattr(scope.index.index, "nlist", None)
    del scope, stage  # the index's memory, for brute force's own
    kept_before, count = [], 0
    for start in range(0, args.n, args.batch):
        kept_before.append(count)
        count += sum(decisions[i] is None for i in range(start, min(start + args.batch, args.n)))

    prefix = args.n if args.brute_prefix <= 0 else min(args.brute_prefix, args.n)
    quadratic, linear, brute_decisions = brute(prefix, args)
    agree = sum(brute_decisions[i] == decisions[i] for i in range(prefix))
    brute_at_n = quadratic * (args.n / prefix) ** 2 + linear * (args.n / prefix)
    probed, points = brute_probed(kept_before, args) if args.probe else (None, [])
    if probed is not None:
        probed += linear * (args.n / prefix)
    sample_agree, sampled = sampled_check(decisions, positions, queries, args)
    planted_found = sum(decisions[i] is not None for i in truth)  # its source may itself be a dropped copy
    false_drops = sum(1 for i, of in decisions.items() if of is not None and i not in truth)

    print(
        json.dumps(
            {
                "n": args.n,
                "dim": args.dim,
                "batch": args.batch,
                "index": index_name,
                "exact_up_to": args.exact_up_to,
                "nlist": nlist,
                "nprobe": args.nprobe,
                "faiss_s": round(busy, 2),
                "of_which_persist_s": round(split.get("_persist", 0.0), 2),
                "of_which_rebuild_s": round(split.get("_rebuild", 0.0), 2),
                "faiss_per_s": round(args.n / busy, 1),
                "brute_prefix": prefix,
                "brute_prefix_s": round(quadratic + linear, 2),
                "brute_prefix_quadratic_s": round(quadratic, 2),
                "brute_s_at_n": round(brute_at_n, 1),
                "brute_extrapolated": prefix < args.n,
                "brute_per_s_at_n": round(args.n / brute_at_n, 1),
                "speedup": round(brute_at_n / busy, 1),
                "brute_s_at_n_probed": None if probed is None else round(probed, 1),
                "brute_probe_points_k_s": points,
                "speedup_probed": None if probed is None else round(probed / busy, 1),
                "same_decisions_on_prefix": f"{agree}/{prefix}",
                "same_decisions_sampled": f"{sample_agree}/{sampled}",
                "planted": len(truth),
                "planted_found": planted_found,
                "false_drops": false_drops,
                "kept": kept,
                "rss_mb_delta": round(rss1 - rss0, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "index_bytes_per_vector": args.dim * 4 + (args.dim if index_name == "IndexIVFScalarQuantizer" else 0),
                "rss_bytes_per_kept_vector": round((rss1 - rss0) * 2**20 / max(kept, 1), 1),
                "state_file_bytes": state_bytes,
            }
        )
    )


if __name__ == "__main__":
    main()
