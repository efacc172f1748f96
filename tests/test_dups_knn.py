"""Near-duplicate groups from the kNN graph (nearest-centroid blocking, exact re-check) against the
exact range search: same groups on generated descriptors with the real features' spectrum and
planted near-duplicates (pair precision and recall >= 0.99), the flipped-twin query set, the
default switch above KNN_MIN, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from bench_index import Mixture  # noqa: E402
from jobs.cluster.dups import KNN_MIN, dup_groups, knn_edges  # noqa: E402

SIM = 0.9
N = 12_000


def planted(n: int, d: int = 384, seed: int = 1) -> np.ndarray:
    """Unit vectors with the real features' spectrum (many background pairs near SIM) and 5 % of
    them replaced by noisy copies of others at three noise levels (pairs, chains, small groups)."""
    x = Mixture(d=d, seed=seed).draw(n)
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(n, n // 20, replace=False)
    for level, part in ((0.35, slice(0, None, 3)), (0.7, slice(1, None, 3)), (1.0, slice(2, None, 3))):
        idx = src[part]
        tgt = rng.choice(n, len(idx), replace=False)
        v = x[idx] + level * rng.standard_normal((len(idx), d)).astype(np.float32) / np.sqrt(d)
        x[tgt] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return x


def pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(labels.tolist()):
        if g >= 0:
            groups.setdefault(g, []).append(row)
    return {(a, b) for m in groups.values() for i, a in enumerate(m) for b in m[i + 1:]}


@pytest.fixture(scope="module")
def data():
    x = planted(N)
    flipped = planted(N, seed=1)  # an aligned second query set (the driver's flipped twins)
    flipped[::2] = x[::2]
    flipped /= np.linalg.norm(flipped, axis=1, keepdims=True)
    flipped = np.ascontiguousarray(flipped, np.float32)
    exact = dup_groups(x, SIM, method="range", exact_max=10**9, queries=[x, flipped])
    return x, flipped, exact


@pytest.mark.parametrize("list_size", [1024, 96])  # 12 and 125 lists
def test_knn_groups_match_exact(data, list_size):
    x, flipped, exact = data
    knn = dup_groups(x, SIM, method="knn", list_size=list_size, queries=[x, flipped])
    pe, pk = pairs(exact.labels), pairs(knn.labels)
    assert len(pe) > 5_000 and exact.n_groups > 500
    hit = len(pe & pk)
    assert hit / len(pe) >= 0.99, (hit / len(pe), knn.index)
    assert hit / len(pk) >= 0.99
    assert knn.index.startswith(f"knn{round(N / list_size)},")
    assert abs(knn.n_groups - exact.n_groups) <= 0.01 * exact.n_groups
    # every reported edge is a true pair at >= SIM (exact re-check)
    i, j, s, _ = knn_edges(x, SIM, list_size=list_size)
    np.testing.assert_allclose(s, np.minimum(np.einsum("ij,ij->i", x[i], x[j]), 1.0), atol=1e-5)
    assert (s >= SIM - 1e-5).all() and (i < j).all()


def test_default_switches_to_knn_above_threshold(data):
    x = data[0]
    assert dup_groups(x[:2000], SIM).index == "flat"
    assert dup_groups(x[:2000], SIM, knn_min=1000).index.startswith("knn")
    assert KNN_MIN == 50_000


def test_small_and_bad_input():
    one = np.ones((1, 8), np.float32) / np.sqrt(8)
    assert dup_groups(one, SIM, method="knn").n_groups == 0
    same = np.repeat(one, 40, axis=0)
    g = dup_groups(same, SIM, method="knn", k=4)
    assert g.n_groups == 1 and (g.labels == 0).all()  # a group larger than k stays one component
    with pytest.raises(ValueError, match="method"):
        dup_groups(same, SIM, method="hnsw")
    with pytest.raises(ValueError, match="shape"):
        knn_edges(same, SIM, queries=[same[:3]])
