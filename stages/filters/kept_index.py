"""The kept vectors of NearDuplicateFilter in a faiss index that stays cheap to search as it grows.

Exact up to `exact_up_to` vectors (a product with the float32 vectors kept here: faiss's
IndexFlatIP would hold a second copy of them, and its top-1 search took 6.6x as long as the
product at 16k x 768 on this 2-core machine), then an IVF: `nprobe` of its lists are
scanned per query. With `nlist: auto` the IVF is rebuilt each time the count passes a doubling
of `exact_up_to`, with ~4 sqrt(n) lists, so a query scans ~nprobe sqrt(n) / 4 vectors plus the
4 sqrt(n) centroids; with a fixed nlist a query scans nprobe / nlist of all n, a share that
grows with n.

The IVF's lists hold 8-bit codes (faiss's `IndexIVFScalarQuantizer`), a quarter of the float32
vectors' bytes: the scan is memory-bound, and ran 1.9x faster in isolation, the stage 1.3x
at 1M (bench/RESULTS.md). The codes'
scores are approximate; the decision is not. Every vector's decoding error is measured when it
is added (`||v - decoded(v)||`, clamped outliers included) and each list keeps its largest, so
a code's score is within that bound of the exact cosine. The best `CANDIDATES` by code are
re-scored on the float32 vectors (kept beside the index), and the answer is the exact best of
the scanned lists whenever the bound proves it, or certainly below the threshold; a query the
bound cannot settle (a near miss of the threshold) is scanned exactly. So the decisions are
those of an IVF of float32 vectors over the same lists.

The index depends only on the vectors and their order (trained on a fixed stride of the first
ones, k-means seeded), so a restart that adds the same vectors builds the same index. Row
numbers (the ids faiss returns) are the order of addition, in both kinds.
"""

from __future__ import annotations

import numpy as np

TRAIN_PER_LIST = 16  # k-means points per list with nlist auto: few, as training is ~ n_train * nlist
KMEANS_ITERATIONS = 10
CANDIDATES = 8  # the best by code per query, re-scored exactly
ROUNDING = 1e-5  # float32 sums over 768 terms: added to every bound


class KeptIndex:
    def __init__(self, exact_up_to: int, nlist: int | str, nprobe: int):
        self.exact_up_to, self.nlist, self.nprobe = exact_up_to, nlist, nprobe
        self.index = None
        self.dim: int | None = None
        self._vectors = np.empty((0, 0), dtype=np.float32)  # rows [0, ntotal) in use, the rest capacity
        self._count = 0
        self._list_error: np.ndarray | None = None  # per IVF list: its largest decoding error

    @property
    def ntotal(self) -> int:
        return self._count

    def vectors(self) -> np.ndarray:
        """Every vector added, by row."""
        return self._vectors[: self._count]

    def search(self, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(similarity, row) per query: the exact best of the scanned vectors wherever that is >=
        threshold; below it, an exact similarity of a scanned vector, also below it. -inf and -1
        while empty."""
        if not self._count:
            return np.full(len(vectors), -np.inf, dtype=np.float32), np.full(len(vectors), -1)
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index is None:  # exact phase (ties: the earliest row, as argmax takes the first)
            sims = queries @ self.vectors().T
            rows = sims.argmax(axis=1)
            return sims[np.arange(len(queries)), rows], rows
        ivf = self.index
        # faiss's own search (it parallelises over queries; search_preassigned with the lists
        # found here ran ~1.6x slower), then the same lists again for their bounds.
        by_code, rows = ivf.search(queries, CANDIDATES)
        _, probes = ivf.quantizer.search(queries, ivf.nprobe)
        found = rows >= 0
        exact = np.einsum("qkd,qd->qk", self._vectors[np.where(found, rows, 0)], queries)
        exact[~found] = -np.inf
        pick = exact.argmax(axis=1)
        at = np.arange(len(queries))
        best, best_rows = exact[at, pick], rows[at, pick]
        # Any scanned vector's exact score is at most its code's score plus its list's bound.
        bound = self._list_error[probes].max(axis=1) * np.linalg.norm(queries, axis=1) + ROUNDING
        every_one_scored = ~found[:, -1]  # fewer than CANDIDATES in the scanned lists
        proven_best = (best > by_code[:, -1] + bound) & (best >= threshold)
        proven_below = by_code[:, 0] + bound < threshold  # then `best`, a scanned vector's, is below too
        for i in np.flatnonzero(~(every_one_scored | proven_best | proven_below)):
            best[i], best_rows[i] = self._scan(queries[i], probes[i])
        return best, best_rows

    def _scan(self, query: np.ndarray, lists: np.ndarray) -> tuple[float, int]:
        """The exact best over the float32 vectors of these lists (ties: the earliest row)."""
        import faiss

        invlists = self.index.invlists
        members = [
            faiss.rev_swig_ptr(invlists.get_ids(int(n)), invlists.list_size(int(n)))
            for n in lists
            if n >= 0 and invlists.list_size(int(n))
        ]
        rows = np.concatenate(members)
        sims = self._vectors[rows] @ query
        top = sims.max()
        return float(top), int(rows[sims == top].min())

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(vectors):
            return
        before = self._count
        self._append(vectors)
        if self.trained_on(self._count) != self.trained_on(before):
            self._rebuild()
        elif self.index is not None:  # in the exact phase the vectors above are the index
            self._add_coded(vectors, before)

    def _append(self, vectors: np.ndarray) -> None:
        if self.dim is None:
            self.dim = vectors.shape[1]
        end = self._count + len(vectors)
        if end > len(self._vectors):  # grow by doubling: amortised copies, two copies at most
            grown = np.empty((max(end, 2 * len(self._vectors), 1024), self.dim), dtype=np.float32)
            if self._count:
                grown[: self._count] = self._vectors[: self._count]
            self._vectors = grown
        self._vectors[self._count : end] = vectors
        self._count = end

    def _add_coded(self, vectors: np.ndarray, first_row: int) -> None:
        """Add to the IVF with the lists chosen here, so each list's bound covers what it holds."""
        import faiss

        ivf = self.index
        _, lists = ivf.quantizer.search(vectors, 1)
        lists = np.ascontiguousarray(lists[:, 0], dtype=np.int64)
        errors = np.linalg.norm(vectors - ivf.sq.decode(ivf.sq.compute_codes(vectors)), axis=1)
        np.maximum.at(self._list_error, lists, errors)
        rows = np.arange(first_row, first_row + len(vectors), dtype=np.int64)
        ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(rows), faiss.swig_ptr(lists))

    def trained_on(self, n: int) -> int:
        """How many first vectors the IVF for n vectors is trained on (0: no IVF, exact search).
        It depends on n alone, so an uninterrupted run and a restart at n build the same index."""
        first = self.exact_up_to
        if n <= first:
            return 0
        if self.nlist != "auto":
            return first
        while first * 2 < n:
            first *= 2
        return first

    def _rebuild(self) -> None:
        """Train an IVF on a fixed stride of the first vectors, then add all of them in order."""
        import faiss

        everything = self.vectors()
        first = self.trained_on(len(everything))
        if self.nlist == "auto":
            nlist = max(1, min(round(4 * first**0.5), first // TRAIN_PER_LIST))
            sample = everything[: first : max(1, first // (nlist * TRAIN_PER_LIST))][: nlist * TRAIN_PER_LIST]
        else:  # the first vectors, at most 64 per list: enough for k-means, bounded cost
            nlist, sample = self.nlist, everything[: min(first, 64 * self.nlist)]
        self.index = None  # free the old lists before the new ones fill
        ivf = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        ivf.by_residual = False  # codes of the vectors themselves: one decoding error a vector
        ivf.cp.niter, ivf.cp.min_points_per_centroid = KMEANS_ITERATIONS, 1  # (no warning at 16 a list)
        ivf.cp.max_points_per_centroid = 64  # never subsampled: the sample above is the training set
        ivf.train(np.ascontiguousarray(sample))
        ivf.nprobe = min(self.nprobe, nlist)
        self.index, self._list_error = ivf, np.zeros(nlist, dtype=np.float32)
        for start in range(0, len(everything), 65_536):  # bounded temporaries for the codes and errors
            self._add_coded(np.ascontiguousarray(everything[start : start + 65_536]), start)
