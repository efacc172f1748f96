"""Two models in one lake: each keeps its builds and is searched by its own index; where filters."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from api import API_PREFIX
from jobs.index.driver import published_builds, run_index
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.commit import commit_rows, now_utc
from lake.settings import Settings

N = 300
URL = f"{API_PREFIX}/search/similar"


def _ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def _features(lake: Lake, model: str, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d))
    x = centres[np.arange(N) % 5] + 0.1 * rng.normal(size=(N, d))
    commit_rows(lake, "features", [dict(image_id=i, model=model, embedding=v.astype(np.float32).tolist(),
                                        run_id=f"feat-{seed}", created_at=now_utc())
                                   for i, v in zip(_ids(N), x)], run_id=f"feat-{seed}")


@pytest.fixture
def lake(lake_factory) -> Lake:
    lake = lake_factory()
    commit_rows(lake, "images", [dict(image_id=i, seq=s, uri=f"/x/{s}.jpg", collection="odd" if s % 2 else "even",
                                      run_id="img", ingested_at=now_utc()) for s, i in enumerate(_ids(N))],
                run_id="img")
    _features(lake, "alpha@1", 16, 1)
    _features(lake, "beta@1", 8, 2)
    for model in ("alpha@1", "beta@1", "alpha@1"):
        run_index(lake, Settings(lake=lake.root, runner="local"), model=model, runner=LocalRunner(), rebuild=True)
    run_index(lake, Settings(lake=lake.root, runner="local"), model="alpha@1", runner=LocalRunner(), rebuild=True)
    run_index(lake, Settings(lake=lake.root, runner="local"), model="alpha@1", runner=LocalRunner(), rebuild=True)
    return lake


def test_second_model_keeps_first_models_build_and_both_search(lake, client):
    import os
    builds = published_builds(lake)
    beta = [b for b in builds if b["model"] == "beta@1"]
    assert len(beta) == 1 and os.path.isdir(os.path.join(lake.artifacts_dir(), beta[0]["path"]))
    query = _ids(N)[0]
    for model, d in (("alpha@1", 16), ("beta@1", 8)):
        r = client.get(URL, query_string={"image_id": query, "k": 5, "model": model})
        assert r.status_code == 200, r.get_data(as_text=True)
        body = r.get_json()
        assert body["build_id"] in {b["build_id"] for b in builds if b["model"] == model}
        assert len(body["results"]) == 5
    r = client.get(URL, query_string={"image_id": query, "k": 5, "model": "gamma@1"})
    assert r.status_code == 404 and "gamma@1" in r.get_json()["error"]


def test_where_filters_similar_and_still_returns_k(lake, client):
    ids = _ids(N)
    odd = {ids[s] for s in range(1, N, 2)}
    r = client.get(URL, query_string={"image_id": ids[0], "k": 20, "model": "alpha@1",
                                      "where": '{"collection": "odd"}'})
    assert r.status_code == 200, r.get_data(as_text=True)
    got = [h["image_id"] for h in r.get_json()["results"]]
    assert len(got) == 20 and set(got) <= odd
    bad = client.get(URL, query_string={"image_id": ids[0], "where": '{"nosuch": 1}'})
    assert bad.status_code == 400 and "nosuch" in bad.get_json()["error"]


def test_grid_where_takes_the_filter_language(lake):
    from jobs.grid.where import select_seqs
    from lake.errors import BadInput

    assert select_seqs(lake, '{"collection": "odd"}').tolist() == list(range(1, N, 2))
    assert select_seqs(lake, "collection = 'even'").tolist() == list(range(0, N, 2))
    with pytest.raises(BadInput, match="nosuch"):
        select_seqs(lake, '{"nosuch": 1}')
