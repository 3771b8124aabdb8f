"""KeptIndex: the IVF that NearDuplicateFilter's kept vectors live in, rebuilt as it grows."""

from __future__ import annotations

import numpy as np

from stages.filters.kept_index import KeptIndex, all_vectors

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
    assert seen[0] == ("IndexIVFFlat", 4)  # 100 > 64: trained on the first 64, 64 // 16 lists
    assert seen[-1][1] > seen[1][1]  # rebuilt with more lists at 128, 256, 512
    np.testing.assert_array_equal(all_vectors(grown.index), vectors)  # rows are the order of addition
    restarted = KeptIndex(64, "auto", 4)
    restarted.add(vectors)  # a restart reads all kept vectors at once
    assert restarted.index.nlist == grown.index.nlist
    assert _lists(restarted) == _lists(grown)  # every vector in the same list, in the same order
    queries = vectors[::7] + 0.05 * _unit(rng, len(vectors[::7]))
    a, b = grown.search(queries), restarted.search(queries)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert (a[1] == np.arange(0, 1000, 7)).mean() > 0.95  # the near copies find their source


def test_fixed_nlist_is_trained_once_and_empty_searches_find_nothing():
    rng = np.random.default_rng(6)
    index = KeptIndex(100, 4, 4)
    sims, rows = index.search(_unit(rng, 3))
    assert np.isneginf(sims).all() and (rows == -1).all()
    index.add(_unit(rng, 90))
    assert type(index.index).__name__ == "IndexFlatIP"
    index.add(_unit(rng, 500))
    assert type(index.index).__name__ == "IndexIVFFlat" and index.index.nlist == 4 and index.trained_on(5000) == 100
