"""Regression guard for suggestion quality (the fast subset of tests/bench/bench_suggest_quality.py).

Generated, hard data that needs no download: eight shapes drawn over random crops of scikit-image's
photos (192 images, the class is the shape). The lake is ingested and embedded with lite0 by the
real jobs once (~15 s on 2 cores, cached under test-artifacts/quality/). The same simulated curator
as the benchmark (5 seed members, 8 suggestions a round, accept right / reject wrong, 5 rounds,
3 seeds) drives :class:`api.suggester.Suggester` (the engine behind ``GET /buckets/<id>/suggestions``,
called directly: the HTTP layer adds nothing to which images come back) and the baselines.
Measured when written: engine 0.772 of the ceiling, plain logistic regression 0.781, II-20 0.408;
the engine before this guard (C = 1, exploring at any acceptance) was 0.72.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench_suggest_quality as quality  # noqa: E402

from api.suggester import Suggester  # noqa: E402
from lake.catalog import Lake  # noqa: E402

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def shapes() -> quality.LabeledSet:
    root = quality.build_lake("shapes", cache=ROOT / "test-artifacts" / "quality")
    return quality.load_set("shapes", root)


def test_served_engine_keeps_up_with_logistic_regression_and_beats_ii20(shapes):
    import numpy as np

    per_round = 8
    engine = Suggester(Lake.at(shapes.lake_root))
    runs = [quality.simulate_engine(shapes, engine, per_round, s) for s in SEEDS]
    served = np.vstack([h for h, _ in runs])
    base = {name: np.vstack([quality.simulate_policy(shapes, pick, per_round, s) for s in SEEDS])
            for name, pick in (("logreg", quality.pick_logreg), ("ii20", quality.pick_ii20),
                               ("oracle", quality.pick_oracle))}
    share = {name: quality.share(h, base["oracle"]) for name, h in {"served": served, **base}.items()}
    assert len(served) == 8 * len(SEEDS) and share["oracle"] == 1.0
    assert share["served"] >= share["logreg"] - 0.03, share
    assert share["served"] >= share["ii20"] + 0.10, share
    # every round returns a full page of unlabeled images, fast
    ms = sum((m for _, m in runs), [])
    assert len(ms) == len(served) * quality.ROUNDS and float(np.median(ms)) < 200, ms


def test_tetris_mode_puts_images_in_the_right_bucket_more_often_than_the_baselines(shapes):
    """Tetris mode with 4 buckets (40 images shown per run, 3 seeds): the share whose suggested
    bucket is right. Measured when written: engine 0.833, plain logistic regression 0.525, II-20
    0.433; the engine that ranked by score + margin and ignored the other buckets' members 0.792;
    with half of each bucket's prior put back (session 9) 0.850."""
    engine = Suggester(Lake.at(shapes.lake_root))

    def accuracy(run):
        runs = [run(s) for s in SEEDS]
        shown = sum(n for _, n, _ in runs)
        assert shown == quality.TETRIS_STEPS * len(SEEDS)  # never runs dry on 192 images
        return sum(r for r, _, _ in runs) / shown

    served = accuracy(lambda s: quality.simulate_tetris_engine(shapes, engine, 4, s))
    logreg = accuracy(lambda s: quality.simulate_tetris_policy(shapes, quality.tetris_logreg, 4, s))
    ii20 = accuracy(lambda s: quality.simulate_tetris_policy(shapes, quality.tetris_ii20, 4, s))
    assert served >= logreg and served >= ii20 + 0.15, (served, logreg, ii20)
