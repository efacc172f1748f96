"""Benchmark of bucket suggestions and curation writes, with baselines measured in the same run.

    PYTHONPATH=. python tests/bench/bench_suggest.py [--lake PATH | --n 2000] [--rounds 10]
                 [--scales 100000,1000000] [--writers 16] [--skip-http] [--parts 1,2,3]

1. **Simulated curator on Fashion-MNIST** (real lite0 features of a Fashion-MNIST lake built by
   tests/fashion.py; ``--lake`` or the largest ready one under test-artifacts/): each class is a
   bucket seeded with 5 images; each round takes 28 suggestions, accepts those of the right class
   and rejects the rest. Mean precision per round and the round's latency (retrain + score +
   select) for
   (a) the served method: class-balanced logistic regression on PCA-128 SQ8 codes, one FAISS scan, adaptive
       exploration (what ``GET /buckets/<id>/suggestions`` runs);
   (b) II-20's method: sklearn LinearSVC on the top-50 sparse concept probabilities, 1 positive :
       2 negatives, exploitation only;
   (c) the naive way: sklearn LogisticRegression retrained from scratch on full 1280-d float32
       embeddings, scoring the full float32 matrix.
2. **Latency at scale**: the lake's vectors replicated with Gaussian noise to 100k and 1M rows
   (synthetic, labels carried over; say so when quoting), (a) vs (c). At 1M the full float32
   matrix (5 GB) does not fit next to everything else on this box: (c) scores a 250k-row float32
   block four times (same bytes streamed as 1M rows).
3. **Curation writes**: 16 threads × 25 actions into one in-process :class:`BucketStore` with
   group commit vs one commit per action; then 16 HTTP clients against ``imagelake serve``
   (2 workers) with mixed traffic (75% writes, 25% reads), p50/p99 latency.
4. **Natural photos**: crops of scikit-image's photos (class = source photo), (a) vs (b) vs (c).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import fashion  # noqa: E402
from common import BucketLog, machine  # noqa: E402

from api.suggester import Suggester, labels_of  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import open_table  # noqa: E402
from lake.compact import build_compact, load_compact  # noqa: E402


# -- a curator simulated on an in-memory log ------------------------------------------------------

def simulate_ours(suggester: Suggester, labels: dict[str, int], classes, seeds: dict[int, list[str]],
                  rounds: int, per_round: int, cpu: list | None = None):
    """Precision per class and round, and each round's wall time; ``cpu`` (a list) gets each round's
    CPU time of this thread (the rounds are single-threaded: on a loaded box this is what an idle one
    would show as wall time, without the waits for a core)."""
    precision, latency = np.zeros((len(classes), rounds)), []
    for ci, cls in enumerate(classes):
        log, bucket = BucketLog(), f"{cls:016x}"
        log.emit(action="create", bucket_id=bucket, payload='{"name": "c"}')
        log.emit(action="add", bucket_id=bucket, image_ids=seeds[cls])
        for r in range(rounds):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = suggester.suggest(labels_of(log.state, bucket), per_round)
            latency.append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.append(time.thread_time() - c0)
            got = [s["image_id"] for s in out["suggestions"]]
            acc = [i for i in got if labels[i] == cls]
            precision[ci, r] = len(acc) / per_round
            log.emit(action="feedback", bucket_id=bucket, image_ids=acc, rejected_ids=[i for i in got if labels[i] != cls])
    return precision, latency


def simulate_baseline(score_fn, n: int, y: np.ndarray, classes, seeds_rows: dict[int, np.ndarray],
                      rounds: int, per_round: int, rng_seed: int = 0):
    """Exploitation-only loop; ``score_fn(pos_rows, neg_rows) -> scores (n,)`` fits and scores."""
    precision, latency = np.zeros((len(classes), rounds)), []
    for ci, cls in enumerate(classes):
        rng = np.random.default_rng(rng_seed + cls)
        pos, rejected = list(seeds_rows[cls]), []
        seen = np.zeros(n, bool)
        seen[pos] = True
        for r in range(rounds):
            t0 = time.perf_counter()
            want = 2 * len(pos)
            neg = rejected[-want:]
            if len(neg) < want:
                extra = rng.integers(0, n, want - len(neg) + 32)
                neg = neg + [int(i) for i in extra if not seen[i]][: want - len(neg)]
            scores = score_fn(np.array(pos), np.array(neg))
            scores[seen] = -np.inf
            top = np.argpartition(-scores, per_round)[:per_round]
            latency.append(time.perf_counter() - t0)
            right = top[y[top] == cls]
            precision[ci, r] = len(right) / per_round
            pos += right.tolist()
            rejected += top[y[top] != cls].tolist()
            seen[top] = True
    return precision, latency


def ii20_scorer(concepts):
    from sklearn.svm import LinearSVC

    def score(pos, neg):
        x = concepts[np.concatenate([pos, neg])]
        yy = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        clf = LinearSVC(C=1.0, max_iter=2000).fit(x, yy)
        return np.asarray(concepts @ clf.coef_.ravel()).ravel() + clf.intercept_[0]
    return score


def naive_scorer(full):
    from sklearn.linear_model import LogisticRegression

    def score(pos, neg):
        x = full[np.concatenate([pos, neg])]
        yy = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        clf = LogisticRegression(C=1.0, max_iter=500).fit(x, yy)
        return full @ clf.coef_.ravel().astype(np.float32) + clf.intercept_[0]
    return score


def load_lake(lake: Lake):
    from scipy import sparse

    from lake.vectors import load_embeddings

    emb = load_embeddings(lake)
    uris = {r["image_id"]: r["uri"] for r in
            open_table(lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()}
    labels = {i: fashion.label_of(uris[i]) for i in emb.image_ids}
    feats = open_table(lake, "features").to_pyarrow_table(columns=["image_id", "concept_ids", "concept_probs"]).to_pylist()
    row = {i: r for r, i in enumerate(emb.image_ids)}
    rows, cols, vals = [], [], []
    for f in feats:
        if f["image_id"] in row:
            rows += [row[f["image_id"]]] * len(f["concept_ids"])
            cols += f["concept_ids"]
            vals += f["concept_probs"]
    concepts = sparse.csr_matrix((vals, (rows, cols)), shape=(len(emb), 1000), dtype=np.float32)
    return emb, labels, concepts


def pick_lake(args) -> Lake:
    if args.lake:
        return Lake.at(args.lake)
    ready = sorted((p for p in (HERE.parent.parent / "test-artifacts").glob("fashion-*") if (p / "ready").is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    if ready and int(ready[-1].name.split("-")[1]) >= args.n:
        return Lake.at(ready[-1] / "lake")
    return Lake.at(fashion.build(args.n))


def p50(xs) -> float:
    return statistics.median(xs) * 1e3


def part1(args):
    lake = pick_lake(args)
    emb, labels, concepts = load_lake(lake)
    y = np.array([labels[i] for i in emb.image_ids])
    classes = list(range(10))
    rng = np.random.default_rng(0)
    seeds_rows = {c: rng.choice(np.flatnonzero(y == c), 5, replace=False) for c in classes}
    seeds = {c: [emb.image_ids[r] for r in seeds_rows[c]] for c in classes}
    suggester = Suggester(lake, dims=128)
    t0 = time.perf_counter()
    m = suggester.matrix()
    print(f"\n[1] simulated curator, Fashion-MNIST, {len(emb)} images with lite0 features, "
          f"{args.rounds} rounds x {args.per_round} suggestions, 10 buckets seeded with 5 images")
    print(f"    compact matrix ready in {time.perf_counter() - t0:.1f} s: PCA-{m.k} SQ8, "
          f"{os.path.getsize(os.path.join(m.path, 'index.faiss')) / len(m):.0f} bytes/image")
    ours, ours_lat = simulate_ours(suggester, labels, classes, seeds, args.rounds, args.per_round)
    ii20, ii20_lat = simulate_baseline(ii20_scorer(concepts), len(emb), y, classes, seeds_rows, args.rounds, args.per_round)
    full = emb.normalized()
    naive, naive_lat = simulate_baseline(naive_scorer(full), len(emb), y, classes, seeds_rows, args.rounds, args.per_round)
    print("    round:                     " + " ".join(f"{r + 1:>5}" for r in range(args.rounds)) + "   mean 1-5")
    for name, p in (("(a) LogReg PCA-128 SQ8 ours", ours), ("(b) II-20 LinearSVC top-50", ii20),
                    ("(c) LogReg full 1280-d f32", naive)):
        print(f"    {name:27s}" + " ".join(f"{v:5.2f}" for v in p.mean(axis=0)) + f"   {p[:, :5].mean():.3f}")
    print(f"    round latency p50: (a) {p50(ours_lat):.1f} ms   (b) {p50(ii20_lat):.1f} ms   (c) {p50(naive_lat):.1f} ms"
          f"   [(c)/(a) = {p50(naive_lat) / p50(ours_lat):.1f}x]")
    return lake, emb, labels, y, m


def part2(args, emb, y, m):
    print("\n[2] round latency at scale (synthetic: the lake's vectors replicated with noise, labels kept)")
    base_full = emb.normalized()
    base_pca = m.vectors(np.array([m.ids.rows_of([i])[0] for i in emb.image_ids]))
    rng = np.random.default_rng(1)
    for n in args.scales:
        reps = int(np.ceil(n / len(emb)))
        idx = np.tile(np.arange(len(emb)), reps)[:n]
        pca = base_pca[idx]
        pca += rng.standard_normal(pca.shape, dtype=np.float32) * (0.25 * base_pca.std(axis=0))
        ids = [hashlib.sha256(r.to_bytes(8, "little")).hexdigest() for r in range(n)]
        folder = tempfile.mkdtemp(prefix="bench-suggest-")
        t0 = time.perf_counter()
        build_compact(folder, ids, pca, model="synthetic", features_version=0, k=pca.shape[1])
        built = time.perf_counter() - t0
        del pca
        mm = load_compact(folder)
        labels = {ids[r]: int(y[idx[r]]) for r in range(n)}
        s = Suggester(Lake.at(folder), dims=mm.k)
        s._matrix, s._checked = mm, float("inf")
        from api.suggester import _limit_threads
        _limit_threads(n)
        classes = [0, 5, 7]
        seeds = {c: [ids[r] for r in np.flatnonzero(y[idx] == c)[:5]] for c in classes}
        cpu: list[float] = []
        prec, lat = simulate_ours(s, labels, classes, seeds, 5, args.per_round, cpu)
        size = os.path.getsize(os.path.join(folder, "index.faiss")) / n
        # naive: LogReg from scratch on 1280-d + float32 scan of n rows (blocks of <= 250k rows)
        block = min(n, 250_000)
        fullb = base_full[idx[:block]]
        fullb += rng.standard_normal(fullb.shape, dtype=np.float32) * 0.01
        from sklearn.linear_model import LogisticRegression
        pos = np.flatnonzero(y[idx[:block]] == 7)[:30]
        neg = rng.integers(0, block, 60)
        naive = []
        for _ in range(3):
            t0 = time.perf_counter()
            clf = LogisticRegression(max_iter=500).fit(fullb[np.concatenate([pos, neg])],
                                                        np.r_[np.ones(len(pos)), np.zeros(len(neg))])
            w = clf.coef_.ravel().astype(np.float32)
            tops = [np.argpartition(-(fullb @ w), 28)[:28] for _ in range(n // block)]
            naive.append(time.perf_counter() - t0)
        del fullb
        print(f"    n={n:>9,}: (a) p50 {p50(lat):6.1f} ms (CPU time p50 {p50(cpu):6.1f} ms, p90 "
              f"{np.percentile(cpu, 90) * 1e3:6.1f} ms), p max {max(lat) * 1e3:6.1f} ms, precision rounds 1-5 "
              f"{prec.mean():.3f}, {size:.0f} bytes/image resident (mmap, build {built:.0f} s)   "
              f"(c) p50 {p50(naive):7.1f} ms ({base_full.shape[1] * 4} bytes/image)   (c)/(a) = {p50(naive) / p50(lat):.0f}x")
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def part3(args, lake_for_http: Lake | None):
    from lake.bucket_store import Action, BucketStore
    from lake.commit import ensure_tables

    print(f"\n[3] curation writes: {args.writers} threads x 25 actions")
    for label, batch in (("group commit", 512), ("one commit per action", 1)):
        lake = Lake.at(tempfile.mkdtemp(prefix="bench-buckets-"))
        ensure_tables(lake, ["bucket_events"])
        store = BucketStore(lake, max_batch=batch)
        bucket = store.submit(Action("create", payload={"name": "b"}, actor="x"))["bucket_id"]
        lat: list[float] = []

        def work(k):
            for j in range(25):
                t0 = time.perf_counter()
                store.submit(Action("add", bucket, (f"{k * 25 + j:064x}",), actor=f"t{k}"))
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(args.writers)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        el = time.perf_counter() - t0
        lat.sort()
        print(f"    in-process, {label:22s}: {len(lat) / el:6.0f} actions/s, p50 {lat[len(lat) // 2] * 1e3:6.1f} ms, "
              f"p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:6.1f} ms, {store.commits} commits")
    if lake_for_http is not None:
        http_mixed(args, lake_for_http)


def http_mixed(args, lake: Lake):

    sys.path.insert(0, str(HERE.parent))
    from test_buckets import Server, _session

    work_lake = Lake.at(tempfile.mkdtemp(prefix="bench-http-"))
    import shutil
    shutil.copytree(lake.root, work_lake.root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("bucket_events"))
    ids = [r["image_id"] for r in open_table(work_lake, "images").to_pyarrow_table(columns=["image_id"]).to_pylist()][:2000]
    sessions = [_session(work_lake, "curate", f"c{k}") for k in range(args.writers)]
    server = Server(work_lake, workers=2)
    try:
        buckets = [sessions[0].post(f"{server.base}/buckets", json={"name": f"b{k}"}, timeout=60).json()["bucket"]["bucket_id"]
                   for k in range(4)]
        lat: dict[str, list[float]] = {"write": [], "read": []}
        errors: list[str] = []

        def client(k):
            rng = np.random.default_rng(k)
            for j in range(25):
                b = buckets[(k + j) % 4]
                t0 = time.perf_counter()
                if j % 4 == 3:
                    r, kind = sessions[k].get(f"{server.base}/buckets/{b}", timeout=60), "read"
                else:
                    r, kind = sessions[k].post(f"{server.base}/buckets/{b}/images",
                                               json={"image_ids": [ids[int(rng.integers(len(ids)))]]}, timeout=60), "write"
                lat[kind].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(r.text[:200])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.writers)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        el = time.perf_counter() - t0
        allv = sorted(lat["write"] + lat["read"])
        q = lambda xs, p: sorted(xs)[max(0, int(len(xs) * p) - 1)] * 1e3  # noqa: E731
        print(f"    HTTP, imagelake serve (2 workers), {args.writers} clients, mixed: {len(allv) / el:.0f} req/s; "
              f"writes p50 {q(lat['write'], .5):.0f} ms p99 {q(lat['write'], .99):.0f} ms; reads p50 {q(lat['read'], .5):.0f} ms "
              f"p99 {q(lat['read'], .99):.0f} ms; all p99 {q(allv, .99):.0f} ms; errors {len(errors)}")
        s = sessions[0].get(f"{server.base}/buckets/{buckets[0]}/suggestions?n=28", timeout=120)
        s = sessions[0].get(f"{server.base}/buckets/{buckets[0]}/suggestions?n=28", timeout=120)
        t = [sessions[0].get(f"{server.base}/buckets/{buckets[0]}/suggestions?n=28", timeout=60).elapsed.total_seconds()
             for _ in range(10)]
        print(f"    HTTP GET suggestions (n=28, {len(ids)}+ images lake): p50 {statistics.median(t) * 1e3:.0f} ms "
              f"(engine {json.loads(s.text)['ms']} ms)")
    finally:
        server.stop()
        shutil.rmtree(work_lake.root, ignore_errors=True)


def photo_lake(n: int) -> tuple[Lake, int]:
    """``n`` photo-like JPEGs (random crops of scikit-image's photos, colour-jittered; the class is
    the source photo) ingested and embedded, cached under test-artifacts/photos-<n>."""
    from common import _sources, write_photos

    from jobs.embed import run_embed
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.settings import Settings

    folder = HERE.parent.parent / "test-artifacts" / f"photos-{n}"
    lake = Lake.at(folder / "lake")
    if not (folder / "ready").is_file():
        write_photos(folder / "jpg", n, size=(320, 240))
        settings = Settings(lake=lake.root, runner="local", partition_files=4096)
        run_ingest(lake, settings, str(folder / "jpg"), collection="photos", runner=LocalRunner())
        run_embed(lake, settings, device="cpu", runner=LocalRunner(), partition_rows=4096)
        (folder / "ready").write_text("ok\n")
    return lake, len(_sources())


def part4(args):
    """Natural photos: the same curator, both methods (and the naive one)."""
    from scipy import sparse

    from lake.vectors import load_embeddings

    lake, n_sources = photo_lake(args.photos)
    emb = load_embeddings(lake)
    uris = {r["image_id"]: r["uri"] for r in open_table(lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()}
    labels = {i: int(Path(uris[i]).stem.split("_")[1]) % n_sources for i in emb.image_ids}
    y = np.array([labels[i] for i in emb.image_ids])
    feats = {f["image_id"]: f for f in open_table(lake, "features").to_pyarrow_table(
        columns=["image_id", "concept_ids", "concept_probs"]).to_pylist()}
    rows, cols, vals = [], [], []
    for r, i in enumerate(emb.image_ids):
        rows += [r] * len(feats[i]["concept_ids"])
        cols += feats[i]["concept_ids"]
        vals += feats[i]["concept_probs"]
    concepts = sparse.csr_matrix((vals, (rows, cols)), shape=(len(emb), 1000), dtype=np.float32)
    classes = sorted(set(y.tolist()))
    rng = np.random.default_rng(0)
    seeds_rows = {c: rng.choice(np.flatnonzero(y == c), 3, replace=False) for c in classes}
    seeds = {c: [emb.image_ids[r] for r in seeds_rows[c]] for c in classes}
    rounds, per = 5, 8
    suggester = Suggester(lake, dims=min(128, len(emb) - 1))
    ours, _ = simulate_ours(suggester, labels, classes, seeds, rounds, per)
    ii20, _ = simulate_baseline(ii20_scorer(concepts), len(emb), y, classes, seeds_rows, rounds, per)
    naive, _ = simulate_baseline(naive_scorer(emb.normalized()), len(emb), y, classes, seeds_rows, rounds, per)
    print(f"\n[4] natural photos: {len(emb)} crops of {len(classes)} scikit-image photos (class = source photo), "
          f"3 seeds, {rounds} rounds x {per}: mean precision (a) {ours.mean():.3f}  (b) II-20 {ii20.mean():.3f}  "
          f"(c) naive {naive.mean():.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lake")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=28)
    parser.add_argument("--scales", default="100000,1000000")
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run")
    parser.add_argument("--photos", type=int, default=480, help="natural photos for part 4")
    args = parser.parse_args()
    args.scales = [int(s) for s in args.scales.split(",") if s]
    args.parts = {int(p) for p in args.parts.split(",") if p}
    print("bench_suggest")
    print(machine())
    print(f"load average before: {os.getloadavg()}")
    if 1 in args.parts:
        lake, emb, labels, y, m = part1(args)
    else:
        lake = pick_lake(args)
        emb, labels, _ = load_lake(lake)
        y, m = np.array([labels[i] for i in emb.image_ids]), Suggester(lake).matrix()
    if 2 in args.parts:
        part2(args, emb, y, m)
    if 3 in args.parts:
        part3(args, None if args.skip_http else lake)
    if 4 in args.parts:
        part4(args)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
