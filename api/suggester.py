"""Live suggestions: II-20's interactive learning over the compact matrix (:mod:`lake.compact`).

Per request, for one bucket: a linear model is fitted on the bucket's members (positives) against
its rejected suggestions, the discard pile and random unlabeled images (negatives), then one FAISS
scan scores every image and keeps the best unlabeled ones. The model is a class-balanced, L2-
regularised logistic regression on the 128-d PCA codes, fitted by Newton's method (a few 129 x 129
solves, a few ms), so it is simply refitted on every call and always reflects the latest feedback;
there is no model state to keep in sync between server processes. (Measured on Fashion-MNIST:
logistic regression on PCA-128 matches it on the full 1280-d embeddings, 0.947 vs 0.950 mean
precision over rounds 1-5; a closed-form ridge fit was 10 points worse. tests/bench/
bench_suggest_quality.py measured it again on four kinds of images: PCA-128 is within 0.4-1 point
of the full embeddings at the same C, so the compression is not what lost; the regularisation
was: C = 10 instead of 1 gains 1.5-4 points of the ceiling on every set.)

Exploration, as in II-20, adapts to how well the model is doing, but only once acceptance drops:
with ``a`` the accepted share of the bucket's last feedback rounds, nothing explores while
``a >= 0.5`` (an exploring pick on a page the model fills well is a lost hit: measured, 1-3 points
of the ceiling), and below it a fraction ``0.5 * (1 - a)**2`` explores; the first page, before
any feedback, does not (it explored a tenth until session 10: not exploring it gained 0.4-0.7
points of the ceiling at 28 per round on shapes, fashion-2k and the first 10k of Fashion-MNIST,
and was level on both emoji sets; at 8 per round a tenth rounded to no pick anyway). Half of the
exploring picks are neighbours of the bucket's best-scoring members that the model ranks lower (their neighbour lists are cached per process), half diverse
random picks (farthest-first among random unlabeled images). A curator who accepts nearly
everything gets pure exploitation; one who rejects a lot gets more of the collection shown.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.errors import without_paths
from lake.buckets import DISCARD, BucketState
from lake.catalog import Lake
from api.suggest_overlay import search_excluding, served_matrix
from lake.compact import CompactMatrix
from lake.errors import Unavailable

__all__ = ["BucketLabels", "Suggester", "explore_fraction", "fit_logistic", "labels_of"]


def explore_fraction(acceptance: float | None, below: float = 0.5, first: float = 0.0) -> float:
    """Share of suggestions that explore, from the recent acceptance rate (None: no feedback yet,
    ``first``); nothing explores while ``acceptance >= below``."""
    if acceptance is None:
        return first
    if acceptance >= below:  # the model is doing well: exploring only spends the curator's page
        return 0.0
    return 0.5 * (1.0 - acceptance) ** 2


def fit_logistic(pos: np.ndarray, neg: np.ndarray, c: float = 1.0, iterations: int = 12,
                 neg_weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression with balanced class weights, by Newton's method:
    ``(w, b)`` with score = x @ w + b. Same objective as sklearn's ``LogisticRegression(C=c,
    class_weight="balanced")``; a (d+1)-square solve per step, a few ms for d = 128.
    ``neg_weights``: relative weights of the negatives (the class keeps its balanced total).
    """
    x = np.hstack([np.vstack([pos, neg]).astype(np.float64), np.ones((len(pos) + len(neg), 1))])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    n = len(y)
    nw = np.ones(len(neg)) if neg_weights is None else np.asarray(neg_weights, np.float64)
    nw = nw * (len(neg) / max(nw.sum(), 1e-12))
    sw = c * np.concatenate([np.full(len(pos), n / (2 * max(1, len(pos)))), nw * n / (2 * max(1, len(neg)))])
    reg = np.ones(x.shape[1])
    reg[-1] = 0.0  # the intercept is not penalised
    beta = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -30, 30)))
        grad = x.T @ (sw * (p - y)) + reg * beta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-4:
            break
    return beta[:-1].astype(np.float32), float(beta[-1])


@dataclass(frozen=True)
class BucketLabels:
    """What a bucket's model needs, copied out of the log's fold so that scoring runs without
    holding the store's lock (a writer in the same process is never kept waiting)."""

    bucket_id: str
    positives: list[str]
    rejected: list[str]
    discard: list[str]
    labeled: frozenset[str]
    acceptance: float | None
    seq: int


def labels_of(state: BucketState, bucket_id: str) -> BucketLabels:
    """Take under the store's lock (``with store.reading() as state``); use after releasing it."""
    return BucketLabels(bucket_id, state.member_ids(bucket_id, pending=False), list(state.rejected.get(bucket_id, {})),
                        state.member_ids(DISCARD), frozenset(state.labeled(bucket_id)),
                        state.acceptance(bucket_id), state.last_seq)


@dataclass
class _Model:
    w: np.ndarray
    b: float
    positives: np.ndarray      # rows
    negatives: int
    seed: int                  # of the draws (see Suggester._seed_of)


class Suggester:
    """One per server process; thread-safe. Maps the compact matrix on first use and re-checks the
    features version every ``refresh_s`` seconds (a new embed run gets a new build)."""

    def __init__(self, lake: Lake, *, dims: int = 128, refresh_s: float = 30.0, max_negatives: int = 500,
                 c: float = 10.0, tetris_others: bool = True, tetris_margin: float = 0.0, tetris_prior: float = 0.5,
                 explore_below: float = 0.5, explore_first: float = 0.0, random_weight: float = 1.0, seed: int = 0,
                 cache=None):
        self.lake, self.dims, self.refresh_s, self.max_negatives = lake, dims, refresh_s, max_negatives
        self.c, self.tetris_others, self.tetris_margin = c, tetris_others, tetris_margin
        self.tetris_prior, self.explore_below, self.explore_first = tetris_prior, explore_below, explore_first
        self.random_weight = random_weight   # of a random unlabeled negative against a rejected one
        self.seed = seed   # of the random draws, beside the bucket's labels (see _seed_of)
        self.cache = cache   # the artifact cache (object-store lakes); None: the default one
        self._lock = threading.Lock()
        self._matrix: CompactMatrix | None = None
        self._checked = float("-inf")
        self._mapped: dict = {}      # folder -> the build mapped (verified) once; see api.suggest_overlay
        self._neighbour_cache: OrderedDict[tuple[str, int], list[int]] = OrderedDict()

    def matrix(self) -> CompactMatrix:
        with self._lock:
            if self._matrix is None or time.monotonic() - self._checked >= self.refresh_s:
                from lake.errors import NotFound
                try:
                    from lake.store import store_errors

                    with store_errors(self.lake):
                        self._matrix = served_matrix(self.lake, self.dims, cache=self.cache, mapped=self._mapped)
                except NotFound as e:
                    if self._matrix is None:
                        raise Unavailable(f"suggestions are not available: {without_paths(str(e))}") from None
                self._checked = time.monotonic()
                _limit_threads(len(self._matrix))
            return self._matrix

    def refresh_soon(self) -> None:
        """Re-check the matrix (and the upload overlay) at the next request: after an upload."""
        with self._lock:
            self._checked = float("-inf")

    # -- the model -----------------------------------------------------------------------------

    def _rows(self, m: CompactMatrix, image_ids) -> np.ndarray:
        return m.ids.rows_of(image_ids)

    def _seed_of(self, positives: np.ndarray, labeled_rows: np.ndarray) -> int:
        """The seed of a bucket's random draws (unlabeled negatives, exploration), from what the
        curator did, not from the bucket's id or the log's position: the same members and labeled
        images over the same build give the same page in any lake, run or server process (with the
        bucket id as the seed, two runs of the same actions differed by up to 1.5 points of the
        ceiling in the quality benchmark). Both arrays are sorted rows (``rows_of``)."""
        h = hashlib.sha256(self.seed.to_bytes(8, "little", signed=True))
        h.update(len(positives).to_bytes(8, "little"))
        h.update(np.ascontiguousarray(positives, np.int64).tobytes())
        h.update(np.ascontiguousarray(labeled_rows, np.int64).tobytes())
        return int.from_bytes(h.digest()[:8], "little")

    def model(self, labels: BucketLabels, labeled_rows: np.ndarray,
              others: np.ndarray | None = None) -> _Model | None:
        """The bucket's model (None without a positive that has features). ``others``: rows of other
        buckets' members, negatives too (Tetris mode, where the models compete for each image)."""
        m = self.matrix()
        positives = self._rows(m, labels.positives)
        if len(positives) == 0:
            return None
        seed = self._seed_of(positives, labeled_rows)
        rejected = self._rows(m, labels.rejected)
        discard = self._rows(m, labels.discard[-self.max_negatives:])
        parts = [rejected, discard] if others is None else [rejected, discard, np.setdiff1d(others, positives)]
        known = np.unique(np.concatenate(parts))
        if others is None:
            known = known[: self.max_negatives]
        elif len(known) > self.max_negatives:
            known = np.random.default_rng(seed + 2).choice(
                known, self.max_negatives, replace=False)
        want = int(np.clip(2 * len(positives), 50, self.max_negatives)) if len(known) < self.max_negatives else 0
        rng = np.random.default_rng(seed)
        randoms = _random_unlabeled(rng, len(m), labeled_rows, want)
        negatives = np.concatenate([known, randoms]).astype(np.int64)
        weights = None if self.random_weight == 1.0 else np.r_[np.ones(len(known)), np.full(len(randoms), self.random_weight)]
        w, b = fit_logistic(m.vectors(positives), m.vectors(negatives), c=self.c, neg_weights=weights)
        return _Model(w, b, positives, len(negatives), seed)

    # -- suggestions ---------------------------------------------------------------------------

    def suggest(self, labels: BucketLabels, n: int, *, explore: bool = True) -> dict[str, Any]:
        """The top ``n`` unlabeled images for the bucket with how each was chosen.

        Returns ``suggestions`` ([{image_id, score, source: model|neighbour|explore}]),
        ``explore_fraction``, ``acceptance``, ``positives``, ``negatives``, ``ms``.
        """
        t0 = time.perf_counter()
        m = self.matrix()
        labeled = self._rows(m, labels.labeled)
        model = self.model(labels, labeled)
        acceptance = labels.acceptance
        fraction = explore_fraction(acceptance, self.explore_below, self.explore_first) if explore and model is not None else (1.0 if model is None else 0.0)
        n_explore = int(fraction * n) if model is not None else n
        n_neigh = (n_explore + 1) // 2 if model is not None else 0
        n_model = n - n_explore
        picks: list[dict[str, Any]] = []
        taken: set[int] = set()
        if model is not None:
            k = min(len(m), n_model + 8)
            scores, rows = search_excluding(m, model.w[None, :], k, labeled)
            for s, r in zip(scores[0], rows[0]):
                if len(picks) >= n_model:
                    break
                if r >= 0:
                    picks.append({"row": int(r), "score": float(s + model.b), "source": "model"})
                    taken.add(int(r))
            if n_neigh:
                pos_scores = m.vectors(model.positives) @ model.w
                skip = set(labeled.tolist()) | taken
                lists = [[r for r in self._neighbours(m, int(b)) if r not in skip]
                         for b in model.positives[np.argsort(-pos_scores)[:2]]]
                while sum(p["source"] == "neighbour" for p in picks) < n_neigh and any(lists):
                    for lst in lists:
                        while lst and lst[0] in taken:
                            lst.pop(0)
                        if lst and sum(p["source"] == "neighbour" for p in picks) < n_neigh:
                            r = lst.pop(0)
                            picks.append({"row": r, "score": None, "source": "neighbour"})
                            taken.add(r)
        n_random = n - len(picks)
        if n_random > 0:
            seed = model.seed if model is not None else self._seed_of(np.zeros(0, np.int64), labeled)
            rng = np.random.default_rng(seed + 1)
            exclude = np.union1d(labeled, np.array(sorted(taken), np.int64))
            for r in _diverse(m, _random_unlabeled(rng, len(m), exclude, 10 * n_random), n_random):
                picks.append({"row": int(r), "score": None, "source": "explore"})
        if model is not None:
            rows_ = np.array([p["row"] for p in picks if p["score"] is None], np.int64)
            if len(rows_):
                s = m.vectors(rows_) @ model.w + model.b
                it = iter(s)
                for p in picks:
                    if p["score"] is None:
                        p["score"] = float(next(it))
        out = [{"image_id": m.ids.image_id(p["row"]), "score": None if p["score"] is None else round(p["score"], 5),
                "source": p["source"]} for p in picks]
        return {"suggestions": out, "explore_fraction": round(fraction, 4), "acceptance": acceptance,
                "positives": 0 if model is None else int(len(model.positives)),
                "negatives": 0 if model is None else model.negatives,
                "ms": round((time.perf_counter() - t0) * 1e3, 2)}

    def representatives(self, member_ids: list[str], n: int, *, sample: int = 5000) -> list[str]:
        """The ``n`` members nearest the bucket's centre (mean direction in the compact space): its
        most typical images, for the bucket bar. Scores the last ``sample`` members that have
        features; members without features (all of them before the first embed run) count only
        when fewer than ``n`` have them (latest first)."""
        try:
            m = self.matrix()
        except Unavailable:  # no features in the lake yet
            m = None
        rows = m.ids.rows_of(member_ids[-sample:]) if m is not None else []
        best: list[str] = []
        if len(rows):
            v = m.vectors(rows)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            centre = v.mean(axis=0)
            order = np.argsort(-(v @ centre), kind="stable")[:n]
            best = [m.ids.image_id(int(rows[i])) for i in order]
        if len(best) < n:
            chosen = set(best)
            best += [i for i in reversed(member_ids) if i not in chosen][: n - len(best)]
        return best

    def _neighbours(self, m: CompactMatrix, row: int) -> list[int]:
        """The 64 nearest images of ``row`` (inner product in the compact space), cached per
        process: a bucket's best members change slowly, so exploration rarely pays a second scan."""
        key = (m.path, row)
        with self._lock:
            hit = self._neighbour_cache.get(key)
            if hit is not None:
                self._neighbour_cache.move_to_end(key)
                return hit
        _, rows = m.index.search(m.vectors(np.array([row]))[None, 0], min(len(m), 65))
        found = [int(r) for r in rows[0] if r >= 0 and r != row]
        with self._lock:
            self._neighbour_cache[key] = found
            while len(self._neighbour_cache) > 4096:
                self._neighbour_cache.popitem(last=False)
        return found

    def tetris(self, buckets_labels: list[tuple[dict[str, Any], BucketLabels]], labeled_all: set[str]) -> dict[str, Any] | None:
        """The single unlabeled image some bucket's model is most sure of, and that bucket.

        Args:
            buckets_labels: (bucket row, its labels) for every live bucket.
            labeled_all: images labeled for any bucket (none of them is shown).
        """
        m = self.matrix()
        labeled = self._rows(m, labeled_all)
        member_rows = [self._rows(m, labels.positives) for _, labels in buckets_labels]
        buckets, models = [], []
        for i, (b, labels) in enumerate(buckets_labels):
            others = (np.concatenate([r for j, r in enumerate(member_rows) if j != i])
                      if self.tetris_others and len(member_rows) > 1 else None)
            model = self.model(labels, labeled, others)
            if model is not None:
                buckets.append(b)
                models.append(model)
        if not models:
            return None
        w = np.vstack([mo.w for mo in models]).astype(np.float32)
        bias = np.array([mo.b + self.tetris_prior * np.log(len(mo.positives) / max(1, mo.negatives))
                         for mo in models], np.float32)
        _, rows = search_excluding(m, w, 16, labeled)
        candidates = np.unique(rows[rows >= 0])
        if len(candidates) == 0:
            return None
        # every candidate goes to the bucket whose model scores it highest; show the surest one. The
        # models are fitted class-balanced, so each logit assumes a 50/50 prior; ``tetris_prior`` puts
        # back part of the bucket's own prior, log(positives / negatives): a bucket that has found many
        # members is trusted more than one with a few (measured: 0.5 closes most of the gap to plain,
        # unbalanced logistic regression on Fashion-MNIST's shirt / T-shirt pair, and wins on emoji)
        scores = m.vectors(candidates) @ w.T + bias
        best = scores.argmax(axis=1)
        margin = scores[np.arange(len(candidates)), best] - (np.partition(scores, -2, axis=1)[:, -2]
                                                            if len(models) > 1 else 0.0)
        pick = int(np.argmax(scores[np.arange(len(candidates)), best] + self.tetris_margin * margin))
        return {"image_id": m.ids.image_id(candidates[pick]), "bucket": buckets[int(best[pick])],
                "score": round(float(scores[pick, best[pick]]), 5)}


def _limit_threads(rows: int) -> None:
    """Small solves and scans are fastest on one thread; spinning BLAS/OpenMP pools on a shared box
    cost tens of ms. A server process gets its parallelism from concurrent requests (measured at
    1M images: a one-query scan takes 48-56 ms with one OpenMP thread, 65-89 ms with two)."""
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    faiss.omp_set_num_threads(1)


def _random_unlabeled(rng: np.random.Generator, n: int, labeled: np.ndarray, want: int) -> np.ndarray:
    if want <= 0 or n == 0:
        return np.zeros(0, np.int64)
    draw = np.unique(rng.integers(0, n, size=min(n, 2 * want + len(labeled) // 8 + 16)))
    draw = draw[~np.isin(draw, labeled)]
    if len(draw) < want and len(labeled) < n:
        rest = np.setdiff1d(np.arange(n), labeled)
        draw = rest[rng.permutation(len(rest))]
    return rng.permutation(draw)[:want]


def _diverse(m: CompactMatrix, candidates: np.ndarray, want: int) -> list[int]:
    """Farthest-first selection: each pick is the candidate farthest from the picks so far."""
    if len(candidates) <= want:
        return list(candidates)
    x = m.vectors(candidates)
    chosen = [0]
    dist = np.linalg.norm(x - x[0], axis=1)
    while len(chosen) < want:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
    return [int(candidates[i]) for i in chosen]
