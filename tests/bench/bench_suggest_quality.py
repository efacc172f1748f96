"""The suggestion-quality benchmark: a simulated curator against the served engine and the
baselines on the labeled sets of :mod:`quality_sets` (see the README's "Suggestion quality").

    PYTHONPATH=. python tests/bench/bench_suggest_quality.py --sets fashion-2k,emoji --per-round 8,28
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from quality_sets import (CACHE, SETS, LabeledSet, build_lake, build_lake_batch, emoji_package,  # noqa: F401
                          load_set, write_emoji, write_fashion, write_photos, write_shapes)

# -- the simulated curator -----------------------------------------------------------------------

ROUNDS, SEED_MEMBERS = 5, 5


def seed_rows(ds: LabeledSet, seed: int) -> dict[int, np.ndarray]:
    """5 seed members per class (classes with more than 5 images), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in range(len(ds.classes)):
        rows = np.flatnonzero(ds.y == c)
        if len(rows) > SEED_MEMBERS:
            out[c] = np.sort(rng.choice(rows, SEED_MEMBERS, replace=False))
    return out


def simulate_policy(ds: LabeledSet, pick, per_round: int, seed: int, rounds: int = ROUNDS) -> np.ndarray:
    """Hits (classes x rounds) of ``pick(pos, rejected, seen, rng) -> rows`` (an exploitation loop
    in NumPy: the baselines and the oracle)."""
    seeds = seed_rows(ds, seed)
    hits = np.zeros((len(seeds), rounds))
    for ci, (c, rows) in enumerate(sorted(seeds.items())):
        rng = np.random.default_rng(seed * 1000 + c)
        pos, rejected = list(rows), []
        seen = np.zeros(len(ds.y), bool)
        seen[rows] = True
        for r in range(rounds):
            top = pick(ds, c, np.array(pos), np.array(rejected, np.int64), seen, per_round, rng)
            right = top[ds.y[top] == c]
            hits[ci, r] = len(right)
            pos += right.tolist()
            rejected += top[ds.y[top] != c].tolist()
            seen[top] = True
    return hits


def _one_to_two(ds, pos, rejected, seen, rng):
    """II-20's negatives: the latest rejected, topped up with random unlabeled, 2 per positive."""
    want = 2 * len(pos)
    neg = rejected[-want:].tolist()
    if len(neg) < want:
        extra = rng.permutation(np.flatnonzero(~seen))[: want - len(neg)]
        neg += extra.tolist()
    return np.array(neg, np.int64)


def _top(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    scores = np.where(seen, -np.inf, scores)
    k = min(k, int((~seen).sum()))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
    return top[np.argsort(-scores[top])]


def pick_ii20(ds, c, pos, rejected, seen, k, rng):
    from sklearn.svm import LinearSVC

    neg = _one_to_two(ds, pos, rejected, seen, rng)
    x = ds.concepts[np.concatenate([pos, neg])]
    clf = LinearSVC(C=1.0, max_iter=5000).fit(x, np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    return _top(np.asarray(ds.concepts @ clf.coef_.ravel()).ravel(), seen, k)


def pick_logreg(ds, c, pos, rejected, seen, k, rng):
    from sklearn.linear_model import LogisticRegression

    neg = _one_to_two(ds, pos, rejected, seen, rng)
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(ds.full[np.concatenate([pos, neg])],
                                                       np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    return _top(ds.full @ clf.coef_.ravel().astype(np.float32), seen, k)


def pick_knn(ds, c, pos, rejected, seen, k, rng):
    """Nearest to any member (cosine on the full embeddings)."""
    return _top((ds.full @ ds.full[pos].T).max(axis=1), seen, k)


def pick_oracle(ds, c, pos, rejected, seen, k, rng):
    return _top((ds.y == c).astype(np.float32) + rng.random(len(ds.y)) * 1e-3, seen, k)


BASELINES = {"II-20 (LinearSVC, top-50 concepts)": pick_ii20, "LogReg full 1280-d": pick_logreg,
             "kNN to members": pick_knn, "oracle": pick_oracle}


def simulate_engine(ds: LabeledSet, suggester, per_round: int, seed: int, rounds: int = ROUNDS):
    """Hits of :class:`api.suggester.Suggester` called directly, and its per-round ``ms``."""
    from common import BucketLog

    from api.suggester import labels_of

    labels, seeds = ds.labels, seed_rows(ds, seed)
    hits, ms = np.zeros((len(seeds), rounds)), []
    for ci, (c, rows) in enumerate(sorted(seeds.items())):
        log, bucket = BucketLog(), f"{seed:08x}{c:08x}"
        log.emit(action="create", bucket_id=bucket, payload='{"name": "c"}')
        log.emit(action="add", bucket_id=bucket, image_ids=[ds.image_ids[r] for r in rows])
        for r in range(rounds):
            out = suggester.suggest(labels_of(log.state, bucket), per_round)
            ms.append(out["ms"])
            got = [s["image_id"] for s in out["suggestions"]]
            acc = [i for i in got if labels[i] == c]
            hits[ci, r] = len(acc)
            log.emit(action="feedback", bucket_id=bucket, image_ids=acc, rejected_ids=[i for i in got if labels[i] != c])
    return hits, ms


# -- Tetris mode and fast-forward -----------------------------------------------------------------

TETRIS_STEPS, FF_N, FF_WARM = 40, 50, 1


def tetris_classes(ds: LabeledSet, n_buckets: int, seed: int) -> tuple[dict[int, np.ndarray], list[int]]:
    """The seed members per class and the ``n_buckets`` classes (drawn with ``seed``) that get a bucket."""
    seeds = seed_rows(ds, seed)
    rng = np.random.default_rng(seed * 7919 + n_buckets)
    return seeds, sorted(rng.choice(sorted(seeds), min(n_buckets, len(seeds)), replace=False).tolist())


def simulate_tetris_engine(ds: LabeledSet, suggester, n_buckets: int, seed: int, steps: int = TETRIS_STEPS):
    """Tetris mode with the engine: each of ``n_buckets`` classes has a bucket seeded with 5 members;
    every step shows the one image :meth:`Suggester.tetris` is surest of, with its suggested bucket.
    The curator drops it into its class's bucket, or on the discard pile when its class has none.
    Returns (right, shown, ms): a shown image is right when the suggested bucket is its class's."""
    from common import BucketLog

    from api.suggester import labels_of
    from lake.buckets import DISCARD

    seeds, chosen = tetris_classes(ds, n_buckets, seed)
    labels, log, bucket_class = ds.labels, BucketLog(), {}
    for c in chosen:
        b = f"{seed:08x}{c:08x}"
        bucket_class[b] = c
        log.emit(action="create", bucket_id=b, payload='{"name": "c"}')
        log.emit(action="add", bucket_id=b, image_ids=[ds.image_ids[r] for r in seeds[c]])
    class_bucket = {c: b for b, c in bucket_class.items()}
    right = shown = 0
    ms = []
    for _ in range(steps):
        views = [(row, labels_of(log.state, row["bucket_id"])) for row in log.state.listing() if not row["system"]]
        t0 = time.perf_counter()
        nxt = suggester.tetris(views, log.state.labeled())
        ms.append((time.perf_counter() - t0) * 1e3)
        if nxt is None or nxt["image_id"] is None:
            break
        c = labels[nxt["image_id"]]
        shown += 1
        right += int(bucket_class.get(nxt["bucket"]["bucket_id"]) == c)
        if c in class_bucket:
            log.emit(action="add", bucket_id=class_bucket[c], image_ids=[nxt["image_id"]])
        else:
            log.emit(action="discard", bucket_id=DISCARD, image_ids=[nxt["image_id"]])
    return right, shown, ms


def simulate_tetris_policy(ds: LabeledSet, scores_of, n_buckets: int, seed: int, steps: int = TETRIS_STEPS):
    """The same curator over a NumPy policy: ``scores_of(ds, members, discarded, seen, rng)`` gives an
    (images x buckets) score matrix; the unseen image with the highest score is shown with its
    best bucket. Returns (right, shown, [])."""
    seeds, chosen = tetris_classes(ds, n_buckets, seed)
    members = {c: list(seeds[c]) for c in chosen}
    discarded: list[int] = []
    seen = np.zeros(len(ds.y), bool)
    for rows in members.values():
        seen[rows] = True
    rng = np.random.default_rng(seed)
    right = shown = 0
    for _ in range(min(steps, int((~seen).sum()))):
        s = np.where(seen[:, None], -np.inf, scores_of(ds, members, discarded, seen, rng))
        i = int(np.argmax(s.max(axis=1)))
        b = int(np.argmax(s[i]))
        shown += 1
        right += int(chosen[b] == ds.y[i])
        seen[i] = True
        (members[int(ds.y[i])] if int(ds.y[i]) in members else discarded).append(i)
    return right, shown, []


def _tetris_negatives(ds, members, c, discarded, seen, rng):
    """A bucket's negatives in the baselines: the other buckets' members, the discard pile and
    random unlabeled images, topped up to 2 per positive."""
    neg = [r for d, rows in members.items() if d != c for r in rows] + discarded
    want = 2 * len(members[c])
    if len(neg) < want:
        neg += rng.permutation(np.flatnonzero(~seen))[: want - len(neg)].tolist()
    return np.array(neg, np.int64)


def tetris_ii20(ds, members, discarded, seen, rng):
    """II-20's method per bucket (LinearSVC on the top-50 concepts), decision values side by side."""
    from sklearn.svm import LinearSVC

    cols = []
    for c, pos in members.items():
        neg = _tetris_negatives(ds, members, c, discarded, seen, rng)
        clf = LinearSVC(C=1.0, max_iter=5000).fit(ds.concepts[np.r_[pos, neg]], np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        cols.append(np.asarray(ds.concepts @ clf.coef_.ravel()).ravel() + clf.intercept_[0])
    return np.stack(cols, axis=1)


def tetris_logreg(ds, members, discarded, seen, rng):
    """One logistic regression per bucket on the full embeddings; calibrated probabilities side by side."""
    from sklearn.linear_model import LogisticRegression

    cols = []
    for c, pos in members.items():
        neg = _tetris_negatives(ds, members, c, discarded, seen, rng)
        clf = LogisticRegression(C=1.0, max_iter=1000).fit(ds.full[np.r_[pos, neg]], np.r_[np.ones(len(pos)), np.zeros(len(neg))])
        cols.append(ds.full @ clf.coef_.ravel().astype(np.float32) + clf.intercept_[0])
    return np.stack(cols, axis=1)


TETRIS_BASELINES = {"II-20 (LinearSVC, top-50 concepts)": tetris_ii20, "LogReg full 1280-d": tetris_logreg}


def ff_size(ds: LabeledSet, c: int, warm: int = FF_WARM, n: int = FF_N) -> int:
    """How many images a fast-forward of class ``c`` takes: ``n``, or fewer when the class has fewer
    left after the seeds and the warm-up rounds (so the oracle's precision is 1 on every set)."""
    return min(n, int((ds.y == c).sum()) - SEED_MEMBERS - 8 * warm)


def fast_forward_engine(ds: LabeledSet, suggester, seed: int, warm: int = FF_WARM, n: int = FF_N) -> np.ndarray:
    """Fast-forward precision per class: ``warm`` rounds of 8 with feedback, then the engine's top
    :func:`ff_size` without exploration (what ``POST .../fast-forward`` takes), the share of them right.
    Classes with fewer than 4 images left are skipped."""
    from common import BucketLog

    from api.suggester import labels_of

    labels, out = ds.labels, []
    for c, rows in sorted(seed_rows(ds, seed).items()):
        if ff_size(ds, c, warm, n) < 4:
            continue
        log, bucket = BucketLog(), f"{seed:08x}{c:08x}"
        log.emit(action="create", bucket_id=bucket, payload='{"name": "c"}')
        log.emit(action="add", bucket_id=bucket, image_ids=[ds.image_ids[r] for r in rows])
        for _ in range(warm):
            got = [s["image_id"] for s in suggester.suggest(labels_of(log.state, bucket), 8)["suggestions"]]
            log.emit(action="feedback", bucket_id=bucket, image_ids=[i for i in got if labels[i] == c],
                     rejected_ids=[i for i in got if labels[i] != c])
        got = [s["image_id"] for s in suggester.suggest(labels_of(log.state, bucket), ff_size(ds, c, warm, n),
                                                        explore=False)["suggestions"]]
        out.append(np.mean([labels[i] == c for i in got]) if got else 0.0)
    return np.array(out)


def fast_forward_policy(ds: LabeledSet, pick, seed: int, warm: int = FF_WARM, n: int = FF_N) -> np.ndarray:
    """The same for a NumPy policy (the baselines and the oracle)."""
    out = []
    for c, rows in sorted(seed_rows(ds, seed).items()):
        if ff_size(ds, c, warm, n) < 4:
            continue
        rng = np.random.default_rng(seed * 1000 + c)
        pos, rejected = list(rows), []
        seen = np.zeros(len(ds.y), bool)
        seen[rows] = True
        for _ in range(warm):
            top = pick(ds, c, np.array(pos), np.array(rejected, np.int64), seen, 8, rng)
            pos += top[ds.y[top] == c].tolist()
            rejected += top[ds.y[top] != c].tolist()
            seen[top] = True
        top = pick(ds, c, np.array(pos), np.array(rejected, np.int64), seen, ff_size(ds, c, warm, n), rng)
        out.append(float(np.mean(ds.y[top] == c)) if len(top) else 0.0)
    return np.array(out)


def report_modes(ds: LabeledSet, engines: dict, seeds, bucket_counts) -> list[str]:
    """Tetris accuracy per bucket count and fast-forward precision, engine(s) beside the baselines."""
    lines = [f"  {ds.name}: Tetris mode, {TETRIS_STEPS} images shown per run, share whose suggested bucket is right"
             f" (an image of a class without a bucket is never right), {len(seeds)} seeds",
             f"    {'method':38s}" + "".join(f"  {k} bkts" for k in bucket_counts) + "   step ms p50"]
    methods = {name: (lambda k, s, e=eng: simulate_tetris_engine(ds, e, k, s)) for name, eng in engines.items()}
    methods.update({name: (lambda k, s, f=f: simulate_tetris_policy(ds, f, k, s)) for name, f in TETRIS_BASELINES.items()})
    for name, run in methods.items():
        cells, ms = [], []
        for k in bucket_counts:
            runs = [run(k, s) for s in seeds]
            cells.append(sum(r for r, _, _ in runs) / max(1, sum(n for _, n, _ in runs)))
            ms += sum((m for _, _, m in runs), [])
        lines.append(f"    {name:38s}" + "".join(f"  {c:6.3f}" for c in cells) +
                     (f"   {np.percentile(ms, 50):6.1f}" if ms else ""))
    lines += [f"  {ds.name}: fast-forward precision (top {FF_N}, or what the class has left, after 5 seeds and {FF_WARM} round(s) of 8), mean over classes and seeds"]
    ff = {name: np.concatenate([fast_forward_engine(ds, eng, s) for s in seeds]) for name, eng in engines.items()}
    ff.update({name: np.concatenate([fast_forward_policy(ds, pick, s) for s in seeds])
               for name, pick in BASELINES.items() if name != "kNN to members"})
    for name, p in ff.items():
        lines.append(f"    {name:38s}  " + (f"{p.mean():6.3f}" if len(p) else "   n/a (every class has < 4 images left)"))
    return lines


from api import API_PREFIX  # noqa: E402


class ServedAPI:
    """The served engine end to end: the real Flask app over the set's lake (a private copy with
    an empty bucket log), driven through Flask's test client with an admin token."""

    def __init__(self, ds: LabeledSet, workdir: Path):
        import shutil

        from api import create_app
        from lake.catalog import Lake
        from lake.settings import Settings
        from lake.tokens import create_token

        root = workdir / ds.name
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(ds.lake_root, root, ignore=shutil.ignore_patterns("artifacts", "bucket_events"))
        self.lake = Lake.at(root)
        self.app = create_app(Settings().replace(lake=str(root), refresh_s=0.0), {"TESTING": True})
        self.client = self.app.test_client()
        self.client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(self.lake, 'admin', 'bench')[1]}"
        self.base = f"{API_PREFIX}/buckets"
        with self.app.app_context():  # build the suggestion matrix now, not inside the first round's ms
            from api.suggest import suggester
            suggester().matrix()

    def _ok(self, response, status=200) -> dict:
        body = response.get_json()
        if response.status_code != status:
            raise RuntimeError(f"{response.status_code}: {body}")
        return body

    def simulate(self, ds: LabeledSet, per_round: int, seed: int, rounds: int = ROUNDS):
        labels, seeds = ds.labels, seed_rows(ds, seed)
        hits, ms = np.zeros((len(seeds), rounds)), []
        for ci, (c, rows) in enumerate(sorted(seeds.items())):
            b = self._ok(self.client.post(self.base, json={"name": f"{ds.classes[c]} s{seed} n{per_round}"}), 201)
            b = b["bucket"]["bucket_id"]
            self._ok(self.client.post(f"{self.base}/{b}/images", json={"image_ids": [ds.image_ids[r] for r in rows]}))
            for r in range(rounds):
                out = self._ok(self.client.get(f"{self.base}/{b}/suggestions?n={per_round}"))
                ms.append(out["ms"])
                got = [s["image_id"] for s in out["suggestions"]]
                acc = [i for i in got if labels[i] == c]
                hits[ci, r] = len(acc)
                self._ok(self.client.post(f"{self.base}/{b}/feedback",
                                          json={"accepted": acc, "rejected": [i for i in got if labels[i] != c]}))
            # undo the bucket's events (feedback x rounds, add, create): a member of any bucket is
            # never suggested for another, so a finished bucket would otherwise help the next one
            for _ in range(rounds + 2):
                self._ok(self.client.post(f"{API_PREFIX}/undo"))
        return hits, ms

    def close(self):
        self.app.extensions["imagelake"].close()


def share(hits: np.ndarray, oracle: np.ndarray) -> float:
    """Cumulative hits over the rounds divided by the oracle's (all buckets, all seeds)."""
    return float(hits.sum() / max(1.0, oracle.sum()))


def evaluate(ds: LabeledSet, per_round: int, seeds, served=None, variants: dict | None = None,
             baselines=None) -> dict:
    """{method: (hits per seed stacked: (seeds*classes, rounds), ms list)} for one set and page size."""
    out: dict[str, tuple[np.ndarray, list]] = {}
    if served is not None:
        runs = [served.simulate(ds, per_round, s) for s in seeds]
        out["served (HTTP API)"] = (np.vstack([h for h, _ in runs]), sum((m for _, m in runs), []))
    for name, make in (variants or {}).items():
        eng = make()
        runs = [simulate_engine(ds, eng, per_round, s) for s in seeds]
        out[name] = (np.vstack([h for h, _ in runs]), sum((m for _, m in runs), []))
    for name, pick in BASELINES.items():
        if baselines is None or name == "oracle" or name.split(" ")[0].lower() in baselines:
            out[name] = (np.vstack([simulate_policy(ds, pick, per_round, s) for s in seeds]), [])
    return out


def report(ds: LabeledSet, per_round: int, results: dict) -> list[str]:
    oracle = results["oracle"][0]
    lines = [f"  {ds.name}: {len(ds.y)} images, {len(ds.classes)} classes, {per_round} per round, "
             f"{len(oracle)} bucket runs",
             f"    {'method':38s}" + "".join(f"   r{r + 1}" for r in range(ROUNDS)) + "  prec1-5  share  round ms p50/p90"]
    for name, (hits, ms) in results.items():
        prec = hits.mean(axis=0) / per_round
        lat = f"  {np.percentile(ms, 50):6.1f} / {np.percentile(ms, 90):5.1f}" if ms else ""
        lines.append(f"    {name:38s}" + "".join(f" {p:5.2f}" for p in prec) +
                     f"   {hits.sum() / (len(hits) * ROUNDS * per_round):5.3f}  {share(hits, oracle):5.3f}{lat}")
    return lines


def engine_variants(ds: LabeledSet, names: list[str]) -> dict:
    """Suggester configurations for the lever study (``--variants``), run directly (no HTTP)."""
    from api.suggester import Suggester
    from lake.catalog import Lake

    lake = Lake.at(ds.lake_root)
    configs = {"engine": {}, **VARIANTS}
    return {f"engine[{n}]": (lambda kw=configs[n]: Suggester(lake, **kw)) for n in names}


VARIANTS: dict[str, dict] = {"c1": {"c": 1.0}, "tetris-own": {"tetris_others": False},
                           "margin1": {"tetris_margin": 1.0}, "prior0": {"tetris_prior": 0.0},
                           "prior1": {"tetris_prior": 1.0}, "first10": {"explore_first": 0.1},
                           "noexplore": {"explore_first": 0.0, "explore_below": 0.0},
                           "rw03": {"random_weight": 0.3}, "rw01": {"random_weight": 0.1}}


def main(argv=None):
    import argparse
    import sys
    import tempfile
    import time

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent.parent)]
    from common import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--per-round", default="8,28")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--no-api", action="store_true", help="skip the HTTP run of the served engine")
    parser.add_argument("--variants", default="", help="engine configurations to run directly: " + ",".join(VARIANTS))
    parser.add_argument("--baselines", default="ii-20,logreg,knn",
                        help="baselines to run beside the oracle (ii-20, logreg, knn; '' for none)")
    parser.add_argument("--embed", choices=("job", "batch"), default="job",
                        help="how fashion-<N>k lakes get their features: the embed job, or the batch path "
                             "(quality_sets.build_lake_batch: the same runtime in one process, then embed --import)")
    parser.add_argument("--embed-limit", type=int, default=None,
                        help="with --embed batch: embed only the first N images of each fashion set (a time box)")
    parser.add_argument("--modes", default="2,4,7", help="bucket counts for the Tetris/fast-forward section ('' skips it)")
    args = parser.parse_args(argv)
    print("bench_suggest_quality")
    print(machine())
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    for name in args.sets.split(","):
        t0 = time.perf_counter()
        root = build_lake_batch(name, limit=args.embed_limit) if args.embed == "batch" and name.startswith("fashion-") else build_lake(name)
        if root is None:
            print(f"\n  {name}: source data not installed, skipped")
            continue
        ds = load_set(name, root)
        served = None if args.no_api else ServedAPI(ds, work)
        variants = engine_variants(ds, [v for v in args.variants.split(",") if v])
        try:
            for per_round in (int(p) for p in args.per_round.split(",") if p):
                print("\n" + "\n".join(report(ds, per_round, evaluate(ds, per_round, seeds, served, variants,
                                                                         [b for b in args.baselines.split(",") if b]))), flush=True)
            if args.modes:
                engines = {"engine": engine_variants(ds, ["engine"])["engine[engine]"](), **{k: v() for k, v in variants.items()}}
                print("\n" + "\n".join(report_modes(ds, engines, seeds, [int(k) for k in args.modes.split(",")])), flush=True)
        finally:
            if served is not None:
                served.close()
        print(f"    ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
