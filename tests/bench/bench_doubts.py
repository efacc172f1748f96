"""Doubtful labels: precision@20 of ``GET /buckets/<id>/doubts``'s ranking on planted mistakes.

    python tests/bench/bench_doubts.py --n 1000 [--rate 0.05] [--seed 0]

A Fashion-MNIST lake of n images (tests/fashion.py: real ingest and embed, cached under
test-artifacts/) is split into ten buckets, one per class, every image in one bucket; a share
``rate`` of each bucket's members is swapped for images of other classes (the planted mistakes).
Every member of every bucket is scored by :func:`api.doubts.find_doubts` on the lake's suggestion
matrix; precision@20 = planted mistakes among the 20 most doubtful members overall. Baselines in
the same run: each vote alone (neighbours, model) and random order (= rate).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402


def main() -> None:
    import fashion
    from api.doubts import find_doubts
    from lake.catalog import Lake
    from lake.commit import open_table
    from lake.compact import ensure_compact

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("bench_doubts\n" + machine())
    if not fashion.available():
        print("  Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); nothing measured")
        return
    t0 = time.perf_counter()
    lake = Lake.at(fashion.build(args.n))
    print(f"  lake of {args.n} Fashion-MNIST images ready in {time.perf_counter() - t0:.0f} s")
    images = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()
    label = {r["image_id"]: fashion.label_of(r["uri"]) for r in images}
    matrix = ensure_compact(lake, 128)
    rng = np.random.default_rng(args.seed)
    by_class = {c: sorted(i for i, l in label.items() if l == c) for c in range(10)}
    buckets: dict[str, list[str]] = {f"b{c}": list(ids) for c, ids in by_class.items()}
    planted: set[str] = set()
    for c in range(10):  # swap rate x members of bucket c with images of other classes from their buckets
        k = int(round(args.rate * len(by_class[c]) / 2))  # a swap plants two mistakes
        for _ in range(k):
            other = int(rng.choice([o for o in range(10) if o != c]))
            pool = [i for i in buckets[f"b{other}"] if label[i] == other]
            mine = [i for i in buckets[f"b{c}"] if label[i] == c]
            a, b = pool[int(rng.integers(len(pool)))], mine[int(rng.integers(len(mine)))]
            buckets[f"b{other}"].remove(a)
            buckets[f"b{c}"].append(a)
            buckets[f"b{c}"].remove(b)
            buckets[f"b{other}"].append(b)
            planted.update((a, b))
    t0 = time.perf_counter()
    scored = []
    for b, ids in buckets.items():
        for r in find_doubts(matrix, buckets, [], b, len(ids)):
            scored.append((r["image_id"], r["score"], r["neighbours"], r["model"]))
    seconds = time.perf_counter() - t0
    members = sum(len(v) for v in buckets.values())
    print(f"  {members} members in 10 buckets, {len(planted)} planted mistakes ({len(planted) / members:.1%}); "
          f"scored in {seconds:.1f} s ({1000 * seconds / 10:.0f} ms per bucket)")

    def precision(key) -> float:
        top = sorted(scored, key=key)[:20]
        return sum(1 for s in top if s[0] in planted) / 20

    print(f"  precision@20, doubts (neighbours + model):  {precision(lambda s: (-s[1], s[0])):.2f}  (target >= 0.8)")
    print(f"  precision@20, neighbours alone:            {precision(lambda s: (s[2], s[0])):.2f}")
    print(f"  precision@20, out-of-fold model alone:     {precision(lambda s: (s[3], s[0])):.2f}")
    order = rng.permutation(len(scored))
    print(f"  precision@20, random order:                {sum(1 for j in order[:20] if scored[j][0] in planted) / 20:.2f}")


if __name__ == "__main__":
    main()
