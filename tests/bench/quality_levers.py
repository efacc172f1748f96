"""Feature levers of the suggestion engine, measured in NumPy on the quality benchmark's curator:
the engine's fit (class-balanced logistic regression, C = 10, its negatives: rejected plus random
unlabeled, at least 50; no exploration) on float features instead of the served 8-bit PCA codes.

    PYTHONPATH=. python tests/bench/quality_levers.py shapes,emoji-hard 28 pca,full,pca+conpca1

Variants: ``pca`` (PCA-128 of the unit embeddings), ``full`` (the 1280-d unit embeddings: the upper
bound of an exact full-precision re-rank), ``pca+con<l>`` / ``pca+sqrtcon<l>`` (the top-50 concept
probabilities, or their square roots, appended with weight l), ``pca+conpca<l>`` (PCA-32 of the
square-rooted concepts appended). High-dimensional fits are solved exactly in the span of the
training rows. Not part of ``make bench`` (a study; the README quotes its figures).
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent.parent)]
import bench_suggest_quality as q  # noqa: E402

from api.suggester import fit_logistic  # noqa: E402


def fit_span(pos: np.ndarray, neg: np.ndarray, c: float):
    """The engine's fit; with more dimensions than rows, solved exactly in the rows' span."""
    x = np.vstack([pos, neg]).astype(np.float64)
    if x.shape[1] <= x.shape[0] or x.shape[1] <= 160:
        return fit_logistic(pos, neg, c=c)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[s > 1e-8 * s[0]].T
    w, b = fit_logistic(pos @ v, neg @ v, c=c)
    return (v @ w).astype(np.float32), b


def make_pick(f: np.ndarray, c_reg: float = 10.0, max_neg: int = 500):
    def pick(ds, c, pos, rejected, seen, k, rng):
        known = np.unique(rejected)[:max_neg]
        want = int(np.clip(2 * len(pos), 50, max_neg)) if len(known) < max_neg else 0
        free = np.flatnonzero(~seen)
        randoms = rng.choice(free, min(want, len(free)), replace=False)
        w, _ = fit_span(f[pos], f[np.concatenate([known, randoms]).astype(np.int64)], c_reg)
        return q._top(f @ w, seen, k)
    return pick


def pca(x: np.ndarray, k: int = 128) -> np.ndarray:
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return ((x - mu) @ vt[:k].T).astype(np.float32)


def features(ds, variant: str) -> np.ndarray:
    p = pca(ds.full)
    if variant == "pca":
        return p
    if variant == "full":
        return ds.full
    concepts = ds.concepts.toarray().astype(np.float32)
    for prefix, extra in (("pca+conpca", lambda: pca(np.sqrt(concepts), 32)), ("pca+sqrtcon", lambda: np.sqrt(concepts)),
                          ("pca+con", lambda: concepts)):
        if variant.startswith(prefix):
            return np.hstack([p, float(variant[len(prefix):]) * extra()])
    raise ValueError(f"unknown variant {variant!r}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sets, rounds, variants = argv[0].split(","), [int(p) for p in argv[1].split(",")], argv[2].split(",")
    for name in sets:
        ds = q.load_set(name, q.build_lake(name, q.CACHE))
        for per_round in rounds:
            oracle = np.vstack([q.simulate_policy(ds, q.pick_oracle, per_round, s) for s in (0, 1, 2)])
            line = f"{name} n={per_round}:"
            for v in variants:
                t = time.time()
                f = features(ds, v)
                h = np.vstack([q.simulate_policy(ds, make_pick(f), per_round, s) for s in (0, 1, 2)])
                line += f"  {v} {q.share(h, oracle):.3f} ({time.time() - t:.0f}s)"
                print(line, flush=True)


if __name__ == "__main__":
    main()
