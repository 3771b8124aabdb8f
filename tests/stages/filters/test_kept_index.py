"""KeptIndex: the IVF that NearDuplicateFilter's kept vectors live in, rebuilt as it grows, its
8-bit codes re-checked so that its answers are those of an exact scan of the same lists."""

from __future__ import annotations

import numpy as np

from stages.filters.kept_index import KeptIndex

DIM = 32


def _unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _lists(index: KeptIndex) -> list[list[int]]:
    import faiss

    lists = index.index.invlists
    return [
        faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).tolist() if lists.list_size(n) else []
        for n in range(index.index.nlist)
    ]


def test_auto_nlist_grows_and_a_restart_builds_the_same_index():
    rng = np.random.default_rng(5)
    vectors = _unit(rng, 1000)
    grown = KeptIndex(64, "auto", 4)
    seen = []
    for start in range(0, 1000, 100):  # batches, as the filter adds them
        grown.add(vectors[start : start + 100])
        seen.append((type(grown.index).__name__, getattr(grown.index, "nlist", 0)))
    assert seen[0] == ("IndexIVFScalarQuantizer", 4)  # 100 > 64: trained on the first 64, 64 // 16 lists
    assert seen[-1][1] > seen[1][1]  # rebuilt with more lists at 128, 256, 512
    np.testing.assert_array_equal(grown.vectors(), vectors)  # rows are the order of addition
    restarted = KeptIndex(64, "auto", 4)
    restarted.add(vectors)  # a restart reads all kept vectors at once
    assert restarted.index.nlist == grown.index.nlist
    assert _lists(restarted) == _lists(grown)  # every vector in the same list, in the same order
    queries = vectors[::7] + 0.05 * _unit(rng, len(vectors[::7]))
    a, b = grown.search(queries, 0.9), restarted.search(queries, 0.9)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert (a[1] == np.arange(0, 1000, 7)).mean() > 0.95  # the near copies find their source


def test_fixed_nlist_is_trained_once_and_empty_searches_find_nothing():
    rng = np.random.default_rng(6)
    index = KeptIndex(100, 4, 4)
    sims, rows = index.search(_unit(rng, 3), 0.9)
    assert np.isneginf(sims).all() and (rows == -1).all()
    kept = _unit(rng, 90)
    index.add(kept)
    assert index.index is None  # exact: the kept vectors themselves, no second copy in faiss
    queries = np.concatenate([kept[[5, 40]], _unit(rng, 2)])
    sims, rows = index.search(queries, 0.9)
    exact = queries @ kept.T
    np.testing.assert_array_equal(rows, exact.argmax(axis=1))
    np.testing.assert_allclose(sims, exact.max(axis=1), rtol=1e-6)
    assert list(rows[:2]) == [5, 40]
    index.add(_unit(rng, 500))
    assert (
        type(index.index).__name__ == "IndexIVFScalarQuantizer"
        and index.index.nlist == 4
        and index.trained_on(5000) == 100
    )


def _exact_over_probed_lists(index: KeptIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What an IVF of float32 vectors over the same lists answers: the exact best of the probed lists."""
    _, probes = index.index.quantizer.search(queries, index.index.nprobe)
    lists = _lists(index)
    best, rows = np.full(len(queries), -np.inf, dtype=np.float32), np.full(len(queries), -1)
    for i, probed in enumerate(probes):
        members = np.array([row for n in probed for row in lists[n]], dtype=np.int64)
        sims = index.vectors()[members] @ queries[i]
        best[i], rows[i] = sims.max(), members[sims == sims.max()].min()
    return best, rows


def test_the_codes_never_change_a_decision_even_at_the_threshold():
    # Kept vectors in tight clusters, and queries whose exact best lands on both sides of the
    # threshold by less than the 8-bit codes' error: the cases an approximate score gets wrong.
    rng = np.random.default_rng(7)
    centres = _unit(rng, 40)
    kept = centres[rng.integers(0, 40, 3000)] + 0.08 * _unit(rng, 3000)
    # Vectors after the training rows (the first 2048) with a value far outside the range the
    # codes were trained on: clamped, so their codes score them far from their real cosine.
    kept[2100::3, 3] += 2.0
    kept /= np.linalg.norm(kept, axis=1, keepdims=True)
    index = KeptIndex(256, "auto", 4)
    index.add(kept)
    assert type(index.index).__name__ == "IndexIVFScalarQuantizer" and index.trained_on(3000) == 2048
    sources = kept[np.r_[rng.integers(0, 3000, 300), rng.choice(np.arange(2100, 3000, 3), 300)]]
    noise = _unit(rng, 600) * rng.uniform(0.0, 0.6, (600, 1)).astype(np.float32)
    queries = sources + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_best, exact_rows = _exact_over_probed_lists(index, queries)
    threshold = float(np.median(exact_best))  # half of the queries just above it, half just below
    near = np.abs(exact_best - threshold) < 0.01
    assert near.sum() >= 20, near.sum()  # there are near misses for the codes to get wrong
    best, rows = index.search(queries, threshold)
    above = exact_best >= threshold
    np.testing.assert_array_equal(best >= threshold, above)  # every decision as the exact scan's
    np.testing.assert_array_equal(rows[above], exact_rows[above])  # and the same kept vector named
    np.testing.assert_allclose(best[above], exact_best[above], rtol=1e-5)
    assert (best[~above] < threshold).all()
