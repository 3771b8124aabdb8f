"""The kept vectors of NearDuplicateFilter in a faiss index that stays cheap to search as it grows.

Exact (`IndexFlatIP`) up to `exact_up_to` vectors, then an `IndexIVFFlat` (approximate: `nprobe`
lists are searched; the similarity of what is found is exact, the vectors are stored whole).
With `nlist: auto` the IVF is rebuilt each time the count passes a doubling of `exact_up_to`,
with ~4 sqrt(n) lists, so a query scans ~nprobe sqrt(n) / 4 vectors plus the 4 sqrt(n)
centroids; with a fixed nlist a query scans nprobe / nlist of all n, a share that grows with n.
The index depends only on the vectors and their order (trained on a fixed stride of the first
ones, k-means seeded), so a restart that adds the same vectors builds the same index. Row
numbers (the ids faiss returns) are the order of addition, in both kinds.
"""

from __future__ import annotations

import numpy as np

TRAIN_PER_LIST = 16  # k-means points per list with nlist auto: few, as training is ~ n_train * nlist
KMEANS_ITERATIONS = 10


class KeptIndex:
    def __init__(self, exact_up_to: int, nlist: int | str, nprobe: int):
        self.exact_up_to, self.nlist, self.nprobe = exact_up_to, nlist, nprobe
        self.index = None
        self.dim: int | None = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else self.index.ntotal

    def search(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(best similarity, its row) per query; -inf and -1 while empty."""
        if not self.ntotal:
            return np.full(len(vectors), -np.inf, dtype=np.float32), np.full(len(vectors), -1)
        sims, rows = self.index.search(vectors, 1)
        return sims[:, 0], rows[:, 0]

    def add(self, vectors: np.ndarray) -> None:
        import faiss

        before = self.ntotal
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index is None:
            self.dim = vectors.shape[1]
            if self.trained_on(len(vectors)):  # a restart past exact_up_to: straight to the IVF
                return self._rebuild(vectors)
            self.index = faiss.IndexFlatIP(self.dim)
        self.index.add(vectors)
        if self.trained_on(self.index.ntotal) != self.trained_on(before):
            self._rebuild(all_vectors(self.index))

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

    def _rebuild(self, everything: np.ndarray) -> None:
        """Train an IVF on a fixed stride of the first vectors, then add all of them in order."""
        import faiss

        self.index = None  # free the old copy before the new one fills: two copies at most, not three
        first = self.trained_on(len(everything))
        if self.nlist == "auto":
            nlist = max(1, min(round(4 * first**0.5), first // TRAIN_PER_LIST))
            sample = everything[: first : max(1, first // (nlist * TRAIN_PER_LIST))][: nlist * TRAIN_PER_LIST]
        else:  # the first vectors, at most 64 per list: enough for k-means, bounded cost
            nlist, sample = self.nlist, everything[: min(first, 64 * self.nlist)]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter, ivf.cp.min_points_per_centroid = KMEANS_ITERATIONS, 1  # (no warning at 16 a list)
        ivf.cp.max_points_per_centroid = 64  # never subsampled: the sample above is the training set
        ivf.train(np.ascontiguousarray(sample))
        ivf.add(everything)
        ivf.nprobe = min(self.nprobe, nlist)
        self.index = ivf


def all_vectors(index) -> np.ndarray:
    """The vectors of a flat index or an IVFFlat one, by row, as one float32 array."""
    import faiss

    if isinstance(index, faiss.IndexFlat):
        return index.reconstruct_n(0, index.ntotal)
    out = np.empty((index.ntotal, index.d), dtype=np.float32)
    lists = index.invlists
    for number in range(index.nlist):
        size = lists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size)
            out[ids] = codes.view(np.float32).reshape(size, index.d)
    return out
