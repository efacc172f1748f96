"""Bring-your-own embeddings (``imagelake embed --import``): Parquet, .npz and .npy input, keys by
image id or URI, every reject reason, incremental re-import, top-50 concepts, the CLI's exit codes,
and the imported vectors read back by the vector reader the later steps use. Real Delta and DuckDB
on a small lake ingested in process from generated images."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from conftest import write_images
from imagelake.cli import main
from jobs.embed.importer import import_embeddings
from jobs.ingest.driver import run_ingest
from lake.catalog import Lake
from lake.errors import BadInput, NotFound
from lake.settings import Settings
from lake.vectors import load_embeddings

MODEL = "my-clip@1"
D = 16


@pytest.fixture(scope="module")
def source_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-src")
    write_images(root / "imgs", 8)
    lake = Lake.at(root / "lake")
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(root / "imgs"))
    return root


@pytest.fixture
def lake(source_lake, tmp_path) -> Lake:
    shutil.copytree(source_lake / "lake", tmp_path / "lake")
    return Lake.at(tmp_path / "lake")


def images(lake: Lake) -> list[dict]:
    return sorted(DeltaTable(lake.table_uri("images")).to_pyarrow_table().to_pylist(), key=lambda r: r["seq"])


def features(lake: Lake) -> dict[str, dict]:
    return {r["image_id"]: r for r in DeltaTable(lake.table_uri("features")).to_pyarrow_table().to_pylist()
            if r["model"] == MODEL}


def rejects(lake: Lake) -> list[dict]:
    rows = DeltaTable(lake.table_uri("embedding_rejects")).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["row_number"])


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_parquet_by_image_id_rejects_and_reimport(lake, tmp_path):
    imgs = images(lake)
    ids = [r["image_id"] for r in imgs]
    v = vectors(10)
    probs = np.random.default_rng(1).dirichlet(np.ones(1000), size=10).astype(np.float32)
    keys = ids[:5] + ["f" * 64, ids[0], ids[5], ids[6], ids[7]]
    emb = [list(r) for r in v]
    emb[7] = list(v[7][:D - 1])                  # bad_dimension
    emb[8] = [float("nan")] + list(v[8][1:])     # not_finite
    emb[9] = [0.0] * D                           # zero_vector
    plist = [list(p) for p in probs]
    plist[4] = [2.0] + plist[4][1:]              # bad_probs
    plist[3] = None                              # no concepts: allowed
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({"image_id": keys, "embedding": pa.array(emb, pa.list_(pa.float32())),
                             "concept_probs": pa.array(plist, pa.list_(pa.float32()))}), path)
    res = import_embeddings(lake, None, str(path), MODEL, batch_rows=4)   # 3 batches
    assert (res.rows, res.imported, res.rejected, res.d) == (10, 4, 6, D)
    assert res.reasons == {"unknown_key": 1, "duplicate_key": 1, "bad_dimension": 1, "not_finite": 1,
                           "zero_vector": 1, "bad_probs": 1}
    got = features(lake)
    assert set(got) == set(ids[:4])
    np.testing.assert_array_equal(np.array(got[ids[0]]["embedding"], np.float32), v[0])
    top = np.argsort(-probs[0])[:50]
    assert got[ids[0]]["concept_ids"] == top.tolist()
    np.testing.assert_allclose(got[ids[0]]["concept_probs"], probs[0][top], rtol=1e-6)
    assert got[ids[3]]["concept_ids"] is None
    rj = rejects(lake)
    assert [(r["row_number"], r["reason"]) for r in rj] == [
        (5, "bad_probs"), (6, "unknown_key"), (7, "duplicate_key"), (8, "bad_dimension"), (9, "not_finite"),
        (10, "zero_vector")]
    assert rj[3]["detail"] == f"{D - 1} values, expected {D}"
    # the same file again adds nothing: not features, not rejects
    again = import_embeddings(lake, None, str(path), MODEL)
    assert (again.imported, again.already, again.rejected) == (0, 4, 6)
    assert len(features(lake)) == 4 and len(rejects(lake)) == 6
    # the vector reader every later step uses sees them, in seq order
    e = load_embeddings(lake, MODEL)
    assert e.image_ids == [i for i in ids if i in got] and e.d == D


def test_npz_by_uri_and_npy_with_keys_and_dimension_guard(lake, tmp_path):
    imgs = images(lake)
    v = vectors(8, seed=3)
    npz = tmp_path / "emb.npz"
    np.savez(npz, embedding=v[:4], uri=np.array([r["uri"] for r in imgs[:4]]))
    res = import_embeddings(lake, None, str(npz), MODEL)
    assert (res.imported, res.rejected) == (4, 0)
    npy = tmp_path / "emb.npy"
    np.save(npy, v)
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(r["image_id"] for r in imgs) + "\n")
    res = import_embeddings(lake, None, str(npy), MODEL, keys_file=str(keys))
    assert (res.imported, res.already, res.rejected) == (4, 4, 0)
    got = features(lake)
    for i, r in enumerate(imgs):
        np.testing.assert_array_equal(np.array(got[r["image_id"]]["embedding"], np.float32), v[i])
    wide = tmp_path / "wide.npz"
    np.savez(wide, embedding=vectors(1)[:, :8], image_id=np.array([imgs[0]["image_id"]]))
    with pytest.raises(BadInput, match="--dim 8, but the vectors stored"):
        import_embeddings(lake, None, str(wide), MODEL, dim=8)
    res = import_embeddings(lake, None, str(wide), "other@2", dim=4)
    assert (res.imported, res.reasons) == (0, {"bad_dimension": 1})


def test_cli_import_and_bad_input(lake, tmp_path, capsys):
    imgs = images(lake)
    npz = tmp_path / "emb.npz"
    np.savez(npz, embedding=vectors(2), image_id=np.array([r["image_id"] for r in imgs[:2]]))
    assert main(["--lake", lake.root, "embed", "--import", str(npz), "--model", MODEL]) == 0
    assert "2 imported under my-clip@1 (d=16)" in capsys.readouterr().out
    for argv, text in [
        (["--import", str(npz), "--model", "my-clip"], "NAME@VERSION"),
        (["--import", str(npz), "--model", "efficientnet-lite0@9"], "built-in model"),
        (["--import", str(tmp_path / "missing.npz"), "--model", MODEL], "no file"),
        (["--import", str(npz), "--model", MODEL, "--dim", "0"], "--dim must be positive"),
        (["--dim", "3"], "go with --import"),
    ]:
        assert main(["--lake", lake.root, "embed", *argv]) == 2, argv
        assert text in capsys.readouterr().err
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert main(["--lake", lake.root, "embed", "--import", str(bad), "--model", MODEL]) == 2
    assert "cannot read it" in capsys.readouterr().err
    npy = tmp_path / "v.npy"
    np.save(npy, vectors(2))
    with pytest.raises(BadInput, match="--keys FILE"):
        import_embeddings(lake, None, str(npy), MODEL)
    with pytest.raises(NotFound):
        import_embeddings(lake, None, str(npy), MODEL, keys_file=str(tmp_path / "none.txt"))
    assert len(features(lake)) == 2


def test_upload_to_a_lake_of_imported_embeddings_takes_the_clients_vector(lake, tmp_path):
    """No model here computes an imported key: ``POST /images`` takes the vector as the form field
    ``embedding`` (checked like an imported row) and the image is searchable at once; without it, or
    with a bad one, a 400 that says so; a search by file is a 409 naming the way out."""
    import io
    import json

    from api import API_PREFIX, create_app
    from conftest import make_jpeg
    from jobs.index.driver import run_index
    from jobs.runner import LocalRunner

    ids = [r["image_id"] for r in images(lake)]
    path = tmp_path / "emb.npz"
    np.savez(path, embedding=vectors(len(ids)), image_id=np.array(ids))
    import_embeddings(lake, None, str(path), MODEL)
    run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), model=MODEL)
    client = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False), {"TESTING": True}).test_client()
    add = f"{API_PREFIX}/images"

    def post(**fields):
        return client.post(add, data={"image": (io.BytesIO(make_jpeg(99, (64, 48))), "new.jpg"), **fields})

    for fields, words in [({}, "form field `embedding`"), ({"embedding": json.dumps([1.0] * (D - 1))}, "dimension 16"),
                          ({"embedding": json.dumps([0.0] * D)}, "zero vector"), ({"embedding": "[1, \"a\"]"}, "JSON array"),
                          ({"embedding": json.dumps([float("nan")] * D)}, "not finite")]:
        r = post(**fields)
        assert r.status_code == 400 and words in r.get_json()["error"], (fields, r.get_json())
    assert len(images(lake)) == len(ids)                      # nothing stored by a refused upload
    r = client.post(f"{API_PREFIX}/search/similar", data={"image": (io.BytesIO(make_jpeg(99, (64, 48))), "q.jpg")})
    assert r.status_code == 409 and "imported" in r.get_json()["error"] and "image_id" in r.get_json()["error"]

    mine = vectors(1, seed=5)[0] * 3
    r = post(embedding=json.dumps(mine.tolist()))
    body = r.get_json()
    assert r.status_code == 201, body
    assert (body["indexed"], body["index_action"], body["model"]) == (True, "overlay", MODEL)
    new_id = body["image_id"]
    assert np.allclose(features(lake)[new_id]["embedding"], mine, atol=1e-6)
    assert features(lake)[new_id]["concept_ids"] is None
    hits = client.get(f"{API_PREFIX}/search/similar", query_string={"image_id": new_id, "k": 3}).get_json()
    assert hits["results"] and new_id not in [h["image_id"] for h in hits["results"]]
    twin = client.get(f"{API_PREFIX}/search/similar", query_string={"image_id": ids[0], "k": len(ids) + 1}).get_json()
    assert new_id in [h["image_id"] for h in twin["results"]]   # the upload is among the others' neighbours
