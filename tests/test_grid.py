"""The grid map: layout logic, quality metric, the grid job and CLI, tiles, and the HTTP routes.

Layout-logic tests use synthetic features with planted groups committed straight to the lake
(embedding cost would add nothing there); one test runs real images through ingest and embed.
"""

from __future__ import annotations

import hashlib
import io
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from imagelake.cli import main
from jobs.grid.driver import run_grid
from jobs.grid.layout import LayoutParams, grid_shape, layout_grid
from jobs.grid.quality import neighbourhood_preservation, random_baseline
from jobs.grid.tiles import Pyramid
from lake.catalog import Lake
from lake.commit import commit_rows, ensure_tables, open_table
from lake.errors import BadInput, Conflict
from lake.settings import Settings

MODEL = "synthetic@1"
GROUP_COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 200, 30), (200, 40, 200), (30, 200, 200)]


def planted(n_groups: int = 6, per: int = 40, d: int = 64, seed: int = 0, noise: float = 0.15):
    """Vectors in ``n_groups`` tight groups (near-identical images), and each row's group."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_groups, d)).astype(np.float32)
    groups = np.repeat(np.arange(n_groups), per)
    rng.shuffle(groups)
    vectors = centers[groups] + noise * rng.normal(size=(len(groups), d)).astype(np.float32)
    return vectors.astype(np.float32), groups


def _jpeg(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fill_lake(lake: Lake, vectors: np.ndarray, groups: np.ndarray) -> list[str]:
    """Commit images, 64 px thumbnails and features rows for synthetic vectors; returns image ids."""
    ensure_tables(lake)
    ids = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(len(vectors))]
    commit_rows(lake, "images", [
        {"image_id": ids[i], "seq": i, "uri": f"/data/img_{i}.jpg", "collection": f"c{int(groups[i]) % 2}",
         "format": "JPEG", "width": 64, "height": 48, "bytes": 1000} for i in range(len(ids))], run_id="t-images")
    jpegs = {g: _jpeg(GROUP_COLORS[g % len(GROUP_COLORS)]) for g in set(groups.tolist())}
    commit_rows(lake, "thumbnails", [
        {"image_id": ids[i], "size": 64, "width": 64, "height": 48, "jpeg": jpegs[int(groups[i])]}
        for i in range(len(ids))], run_id="t-thumbs")
    commit_rows(lake, "features", [{"image_id": ids[i], "model": MODEL, "embedding": vectors[i].tolist()}
                                   for i in range(len(ids))], run_id="t-features")
    return ids


def largest_region_share(cells: np.ndarray, width: int, height: int, groups: np.ndarray) -> float:
    """Worst group's share of members in its largest 8-connected region of the grid."""
    from scipy.ndimage import label

    worst = 1.0
    for g in np.unique(groups):
        mask = np.zeros(width * height, bool)
        mask[cells[groups == g]] = True
        regions, count = label(mask.reshape(height, width), structure=np.ones((3, 3)))
        sizes = np.bincount(regions.ravel())[1:]
        worst = min(worst, sizes.max() / mask.sum())
    return worst


# -- layout logic -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 99, 240, 1001])
def test_every_item_gets_exactly_one_cell(n):
    vectors = np.random.default_rng(n).normal(size=(n, 16)).astype(np.float32)
    layout = layout_grid(vectors, seed=3)
    width, height = grid_shape(n)
    assert (layout.width, layout.height) == (width, height)
    assert width * height >= n and width * height - n < width
    assert len(np.unique(layout.cells)) == n
    assert layout.cells.min() >= 0 and layout.cells.max() < width * height


def test_same_seed_same_layout_and_other_seed_differs():
    vectors, _ = planted(seed=4)
    a, b = layout_grid(vectors, seed=11), layout_grid(vectors, seed=11)
    assert np.array_equal(a.cells, b.cells) and np.array_equal(a.xy, b.xy)
    c = layout_grid(vectors, seed=12)
    assert not np.array_equal(a.cells, c.cells)


def test_planted_groups_land_in_compact_regions():
    vectors, groups = planted(n_groups=6, per=60, seed=5)
    layout = layout_grid(vectors, seed=0)
    random_cells = np.random.default_rng(0).permutation(layout.width * layout.height)[:len(vectors)]
    assert largest_region_share(random_cells, layout.width, layout.height, groups) < 0.6
    assert largest_region_share(layout.cells, layout.width, layout.height, groups) > 0.9
    # Nearly every cell's grid neighbours are from its own group.
    grid = layout.cell_items()
    same = total = 0
    for gy in range(layout.height):
        for gx in range(layout.width - 1):
            a, b = grid[gy, gx], grid[gy, gx + 1]
            if a >= 0 and b >= 0:
                same += groups[a] == groups[b]
                total += 1
    assert same / total > 0.85


def test_quality_metric_separates_good_and_random_layouts():
    vectors = np.random.default_rng(1).normal(size=(900, 8)).astype(np.float32)
    layout = layout_grid(vectors, seed=0)
    good = neighbourhood_preservation(vectors, layout.cells, layout.width, layout.height, sample=None)
    shuffled = np.random.default_rng(2).permutation(layout.width * layout.height)[:900]
    bad = neighbourhood_preservation(vectors, shuffled, layout.width, layout.height, sample=None)
    assert abs(bad - random_baseline(900)) < 0.03
    assert good > 5 * bad and good > 0.3
    # A sample estimates the full score.
    sampled = neighbourhood_preservation(vectors, layout.cells, layout.width, layout.height, sample=300)
    assert abs(sampled - good) < 0.06


def test_refinement_improves_on_the_split_alone():
    vectors = np.random.default_rng(2).normal(size=(1600, 12)).astype(np.float32)
    split = layout_grid(vectors, seed=0, params=LayoutParams(rounds=0))
    refined = layout_grid(vectors, seed=0)
    q = [neighbourhood_preservation(vectors, lay.cells, lay.width, lay.height, sample=None) for lay in (split, refined)]
    assert q[1] > q[0] + 0.03


def test_parallel_paths_equal_the_sequential_ones(monkeypatch, tmp_path):
    """Threaded block assignments, blocked exact kNN of the quality score and the decoding pool of
    the tiles (the paths large collections take) give exactly what the one-thread paths give."""
    import jobs.grid.layout as layout_mod
    import jobs.grid.quality as quality_mod
    from jobs.grid.tiles import build_tiles

    vectors, groups = planted(n_groups=5, per=300, d=16, seed=3)
    monkeypatch.setattr(layout_mod, "_solver_threads", lambda n_tiles: 1)
    one = layout_grid(vectors, seed=4, params=LayoutParams(rounds=6))
    monkeypatch.setattr(layout_mod, "_solver_threads", lambda n_tiles: 3)
    three = layout_grid(vectors, seed=4, params=LayoutParams(rounds=6))
    assert np.array_equal(one.cells, three.cells)

    whole = neighbourhood_preservation(vectors, one.cells, one.width, one.height, sample=400, seed=1)
    monkeypatch.setattr(quality_mod, "_BLOCK", 97)   # 16 blocks, the last one short
    assert neighbourhood_preservation(vectors, one.cells, one.width, one.height, sample=400, seed=1) == whole

    pyramid = Pyramid(one.width, one.height, cell_px=64)
    jpegs = {g: _jpeg(GROUP_COLORS[g], size=(64, 40 + 4 * g)) for g in range(5)}
    order = np.argsort(one.cells)
    batches = [(one.cells[order[lo:lo + 500]], [jpegs[int(groups[i])] if i % 37 else None for i in order[lo:lo + 500]])
               for lo in range(0, len(order), 500)]
    a = build_tiles(str(tmp_path / "a"), pyramid, iter(batches), workers=1)
    b = build_tiles(str(tmp_path / "b"), pyramid, iter(batches), workers=2)
    assert a == b
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 3 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


# -- the job, the CLI and --where -------------------------------------------------------------

@pytest.fixture(scope="module")
def grid_lake(tmp_path_factory):
    """A lake with 240 images in 6 planted groups and one layout ``L1`` (seed 7)."""
    lake = Lake.at(tmp_path_factory.mktemp("grid") / "lake")
    vectors, groups = planted(n_groups=6, per=40, seed=1)
    ids = fill_lake(lake, vectors, groups)
    summary = run_grid(lake, Settings(lake=lake.root, grid_spare_fraction=0.0), seed=7, layout_id="L1")
    return lake, ids, groups, summary


@pytest.fixture
def lake(grid_lake):
    return grid_lake[0]


def _layout_rows(lake: Lake, layout_id: str) -> pa.Table:
    table = open_table(lake, "grid").to_pyarrow_dataset().to_table()
    rows = table.filter(pa.compute.equal(table["layout_id"], layout_id))
    return rows.sort_by("image_id")


def test_grid_job_writes_one_cell_per_image_and_metadata(grid_lake):
    lake, ids, groups, summary = grid_lake
    rows = _layout_rows(lake, "L1")
    assert sorted(rows.column("image_id").to_pylist()) == sorted(ids)
    cells = [(x, y) for x, y in zip(rows.column("gx").to_pylist(), rows.column("gy").to_pylist())]
    assert len(set(cells)) == len(ids)
    assert summary["width"] == 16 and summary["height"] == 15
    assert all(0 <= x < 16 and 0 <= y < 15 for x, y in cells)
    meta = open_table(lake, "grid_layouts").to_pyarrow_dataset().to_table().to_pylist()
    (l1,) = [m for m in meta if m["layout_id"] == "L1"]
    assert l1["n"] == 240 and l1["seed"] == 7 and l1["model"] == MODEL
    assert l1["quality"] == pytest.approx(summary["quality"], abs=1e-6) and l1["quality"] > 0.5
    runs = open_table(lake, "job_runs").to_pyarrow_dataset().to_table().to_pylist()
    assert any(r["job"] == "grid" and r["state"] == "succeeded" for r in runs)


def test_cli_same_seed_same_layout_and_where_subset(grid_lake, capsys, monkeypatch):
    lake = grid_lake[0]
    monkeypatch.setenv("IMAGELAKE_GRID_SPARE_FRACTION", "0")   # L1's: no spare cells
    assert main(["--lake", lake.root, "grid", "--seed", "7", "--layout-id", "L1-again"]) == 0
    out = capsys.readouterr().out
    assert "grid L1-again: 240 images on 16x15 cells, quality" in out and "random" in out
    a, b = _layout_rows(lake, "L1"), _layout_rows(lake, "L1-again")
    assert a.select(["image_id", "gx", "gy"]).equals(b.select(["image_id", "gx", "gy"]))

    assert main(["--lake", lake.root, "grid", "--where", "collection = 'c0' AND seq < 200",
                 "--layout-id", "evens"]) == 0
    rows = _layout_rows(lake, "evens")
    expected = {i for i, g in zip(grid_lake[1][:200], grid_lake[2][:200]) if g % 2 == 0}
    assert set(rows.column("image_id").to_pylist()) == expected


@pytest.mark.parametrize("where, message", [
    ("seq <", "one SQL expression"),
    ("1=1; DROP TABLE images", "one SQL expression"),
    ("nosuch = 1", "not a valid predicate"),
    ("image_id IN (SELECT image_id FROM features)", "not a valid predicate"),
    ("uri = (SELECT content FROM read_text('/etc/hostname'))", "not a valid predicate"),
    ("count(*) > 1", "not a valid predicate"),
    ("   ", "empty"),
    ("seq < 0", "selects no image"),
])
def test_bad_where_exits_2_with_a_clear_error(grid_lake, capsys, where, message):
    lake = grid_lake[0]
    before = open_table(lake, "grid").version()
    assert main(["--lake", lake.root, "grid", "--where", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagelake: error: ") and message in err and "Traceback" not in err
    assert open_table(lake, "grid").version() == before


def test_layout_id_is_checked_and_never_overwritten(grid_lake):
    lake = grid_lake[0]
    with pytest.raises(Conflict):
        run_grid(lake, Settings(lake=lake.root), layout_id="L1")
    for bad in ("latest", "a/b", "a.dzi", "", "x" * 65):
        with pytest.raises(BadInput):
            run_grid(lake, Settings(lake=lake.root), layout_id=bad)


def _add_images(lake: Lake, vectors: np.ndarray, groups: np.ndarray, start: int) -> list[str]:
    ids = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(start, start + len(vectors))]
    commit_rows(lake, "images", [
        {"image_id": ids[j], "seq": start + j, "uri": f"/data/img_{start + j}.jpg", "collection": "new",
         "format": "JPEG", "width": 64, "height": 48, "bytes": 1000} for j in range(len(ids))], run_id=f"t-img-{start}")
    commit_rows(lake, "thumbnails", [
        {"image_id": ids[j], "size": 64, "width": 64, "height": 48, "jpeg": _jpeg(GROUP_COLORS[int(groups[j])])}
        for j in range(len(ids))], run_id=f"t-th-{start}")
    commit_rows(lake, "features", [{"image_id": ids[j], "model": MODEL, "embedding": vectors[j].tolist()}
                                   for j in range(len(ids))], run_id=f"t-f-{start}")
    return ids


def test_new_images_go_into_free_cells_and_old_cells_stay(tmp_path, capsys):
    """A second run with a few new images keeps every old image's cell and puts the new ones into
    free cells beside their own group, drawn in the tiles; nothing new: the layout stays; more new
    images than free cells: a full layout."""
    from jobs.grid.tiles import TileSource

    lake = Lake.at(tmp_path / "lake")
    vectors, groups = planted(n_groups=6, per=40, seed=1)
    fill_lake(lake, vectors, groups)
    settings = Settings(lake=lake.root, grid_spare_fraction=0.1)
    first = run_grid(lake, settings, seed=7)
    assert first["mode"] == "full" and first["width"] * first["height"] >= 264   # 240 + 10 % free
    old = _layout_rows(lake, first["layout_id"])
    free = first["width"] * first["height"] - 240

    new_vectors, new_groups = planted(n_groups=6, per=40, seed=1)            # the same group centres
    pick = np.flatnonzero(new_groups == 2)[:5]
    new_ids = _add_images(lake, new_vectors[pick] + 0.01, new_groups[pick], start=240)
    second = run_grid(lake, settings, seed=7)
    assert second["mode"] == "placed" and (second["placed"], second["removed"]) == (5, 0)
    assert (second["width"], second["height"]) == (first["width"], first["height"])
    assert second["free_cells"] == free - 5
    rows = _layout_rows(lake, second["layout_id"])
    kept = rows.filter(pa.compute.is_in(rows["image_id"], old["image_id"]))
    assert kept.select(["image_id", "gx", "gy"]).equals(old.select(["image_id", "gx", "gy"]))   # old cells kept
    cell = {i: (x, y) for i, x, y in zip(*(rows.column(c).to_pylist() for c in ("image_id", "gx", "gy")))}
    assert len(set(cell.values())) == 245 and all(i in cell for i in new_ids)
    old_ids = [hashlib.sha256(f"img-{i}".encode()).hexdigest() for i in range(240)]
    group_of = dict(zip(old_ids, groups.tolist()))
    at = {v: k for k, v in cell.items()}
    for i in new_ids:   # beside its own group: most of its grid neighbours are group-2 images
        x, y = cell[i]
        near = [group_of.get(at.get((x + dx, y + dy)), 2) for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                if (dx, dy) != (0, 0) and (x + dx, y + dy) in at]
        assert near and sum(g == 2 for g in near) / len(near) >= 0.5, (i, near)
    tiles = TileSource(lake.path(f"artifacts/tiles/{second['layout_id']}"))
    p = tiles.pyramid
    x, y = cell[new_ids[0]]
    img = Image.open(io.BytesIO(tiles.tile(p.max_level, x * 64 // 256, y * 64 // 256))).convert("RGB")
    px = img.getpixel(((x * 64) % 256 + 32, (y * 64) % 256 + 24))
    assert all(abs(a - b) < 40 for a, b in zip(px, GROUP_COLORS[2])), px      # the new cell is drawn
    assert tiles.manifest["cells"]["filled"] == 245

    third = run_grid(lake, settings, seed=7)                                   # nothing new
    assert third["mode"] == "unchanged" and third["layout_id"] == second["layout_id"]
    _add_images(lake, new_vectors[:free], new_groups[:free], start=245)        # more than the free cells
    fourth = run_grid(lake, settings, seed=7)
    assert fourth["mode"] == "full" and fourth["n"] == 245 + free


# -- tiles and the HTTP API -------------------------------------------------------------------

def test_dzi_and_every_level_decodes_at_the_right_size(client):
    r = client.get("/api/v1/grid/L1.dzi")
    assert r.status_code == 200 and r.mimetype == "application/xml"
    root = ET.fromstring(r.data)
    assert root.get("TileSize") == "256" and root.get("Overlap") == "0" and root.get("Format") == "jpg"
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (16 * 64, 15 * 64)
    p = Pyramid(16, 15)
    assert p.max_level == 10
    for z in range(p.max_level + 1):
        lw, lh = -(-1024 // 2 ** (10 - z)), -(-960 // 2 ** (10 - z))
        nx, ny = -(-lw // 256), -(-lh // 256)
        for tx in range(nx):
            for ty in range(ny):
                r = client.get(f"/api/v1/grid/L1/tiles/{z}/{tx}_{ty}.jpg")
                assert r.status_code == 200 and r.mimetype == "image/jpeg", (z, tx, ty)
                im = Image.open(io.BytesIO(r.data))
                assert im.size == (min(256, lw - 256 * tx), min(256, lh - 256 * ty)), (z, tx, ty)
        assert client.get(f"/api/v1/grid/L1/tiles/{z}/{nx}_0.jpg").status_code == 404
        assert client.get(f"/api/v1/grid/L1/tiles/{z}/0_{ny}.jpg").status_code == 404
    # Where DZI viewers (OpenSeadragon) look for tiles: next to the .dzi, in <name>_files/.
    assert client.get("/api/v1/grid/L1_files/10/1_1.jpg").data == client.get("/api/v1/grid/L1/tiles/10/1_1.jpg").data
    for path in ("11/0_0", "-1/0_0", "3/-1_0"):
        r = client.get(f"/api/v1/grid/L1/tiles/{path}.jpg")
        assert r.status_code == 404 and r.get_json()["ok"] is False


def test_deep_tile_shows_the_thumbnail_of_its_cell(client, grid_lake):
    lake, ids, groups, _ = grid_lake
    cell = client.get("/api/v1/grid/L1/cell?x=5&y=2").get_json()
    group = int(groups[ids.index(cell["image_id"])])
    im = Image.open(io.BytesIO(client.get("/api/v1/grid/L1/tiles/10/1_0.jpg").data)).convert("RGB")
    # Cell (5, 2) is at (64..128, 128..192) in tile (1, 0) of the full-size level; 64x48 centred.
    pixel = np.asarray(im)[128 + 32, 64 + 32].astype(int)
    assert np.abs(pixel - GROUP_COLORS[group]).max() < 30
    # The tile was cached on disk and is served again, identical, with caching headers.
    again = client.get("/api/v1/grid/L1/tiles/10/1_0.jpg")
    assert again.headers["Cache-Control"].endswith("immutable") and again.headers["ETag"]
    assert client.get("/api/v1/grid/L1/tiles/10/1_0.jpg",
                      headers={"If-None-Match": again.headers["ETag"]}).status_code == 304
    assert again.data == \
        open(lake.artifacts_dir("tiles", "L1", "cache", "10", "1_0.jpg"), "rb").read()


def test_cells_lookups_overlays_and_latest(client, grid_lake):
    lake, ids, groups, _ = grid_lake
    cell = client.get("/api/v1/grid/L1/cell?x=0&y=0").get_json()
    back = client.get(f"/api/v1/grid/L1/images/{cell['image_id']}").get_json()
    assert (back["gx"], back["gy"]) == (0, 0)
    assert client.get("/api/v1/grid/L1/cell?x=16&y=0").status_code == 404
    assert client.get("/api/v1/grid/L1/cell?x=a&y=0").status_code == 400
    assert client.get("/api/v1/grid/L1/cell?x=1").status_code == 400
    assert client.get(f"/api/v1/grid/L1/images/{'0' * 64}").status_code == 404
    assert client.get("/api/v1/grid/L1/images/nothex").status_code == 400

    r = client.post("/api/v1/grid/L1/cells", json={"image_ids": ids[:5] + ["f" * 64]})
    body = r.get_json()
    assert r.status_code == 200 and len(body["cells"]) == 5 and body["missing"] == ["f" * 64]
    assert client.post("/api/v1/grid/L1/cells", json={"image_ids": [1]}).status_code == 400
    assert client.post("/api/v1/grid/L1/cells", data="nope").status_code == 400

    commit_rows(lake, "tags", [{"image_id": i, "tag": "red", "source": "user", "score": 1.0}
                               for i, g in zip(ids, groups) if g == 0], run_id="t-tags")
    body = client.get("/api/v1/grid/L1/overlay?tag=red").get_json()
    assert len(body["cells"]) == int((groups == 0).sum()) and body["not_on_layout"] == 0
    assert client.get("/api/v1/grid/L1/overlay?tag=none").get_json()["cells"] == []
    assert client.get("/api/v1/grid/L1/overlay").status_code == 400

    listing = client.get("/api/v1/grid").get_json()["layouts"]
    newest = listing[0]["layout_id"]
    assert {"L1"} <= {m["layout_id"] for m in listing} and all("quality" in m for m in listing)
    latest = client.get("/api/v1/grid/latest")
    assert latest.status_code == 200 and latest.get_json()["layout"]["layout_id"] == newest
    assert client.get("/api/v1/grid/latest.dzi").headers["X-Layout-Id"] == newest


def test_unknown_layout_is_404_everywhere(client):
    for path in ("/api/v1/grid/nope", "/api/v1/grid/nope.dzi", "/api/v1/grid/nope/tiles/0/0_0.jpg",
                 "/api/v1/grid/nope/cell?x=0&y=0", f"/api/v1/grid/nope/images/{'a' * 64}",
                 "/api/v1/grid/nope/overlay?tag=x"):
        r = client.get(path)
        assert r.status_code == 404 and r.get_json()["status"] == 404, path
    assert client.post("/api/v1/grid/nope/cells", json={"image_ids": []}).status_code == 404


def test_read_token_can_post_cells(app, grid_lake):
    from lake.tokens import create_token

    token = create_token(grid_lake[0], "read", "reader")[1]
    c = app.test_client()
    r = c.post("/api/v1/grid/L1/cells", json={"image_ids": []}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200


# -- end to end with real images ----------------------------------------------------------------

def test_real_images_ingest_embed_grid_end_to_end(tmp_path, capsys):
    """Views of three scikit-image photos (astronaut, coffee, rocket) → ingest → embed (ONNX, in
    process) → grid: the layout puts views of the same photo next to each other."""
    from jobs.embed import run_embed
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from photo_lake import write_photos

    folder = tmp_path / "photos"
    written = write_photos(folder, 12, ("astronaut", "coffee", "rocket"), seed=3)
    label_of = {hashlib.sha256(Path(p).read_bytes()).hexdigest(): label for p, label in written.items()}
    lake = Lake.at(tmp_path / "lake")
    settings = Settings(lake=lake.root, runner="local")
    run_ingest(lake, settings, str(folder), runner=LocalRunner())
    run_embed(lake, settings, runner=LocalRunner())
    assert main(["--lake", lake.root, "--runner", "local", "grid", "--layout-id", "fm"]) == 0
    assert "grid fm: 36 images on 7x6 cells" in capsys.readouterr().out   # 36 + 5 % spare cells
    rows = _layout_rows(lake, "fm").to_pylist()
    assert len({(r["gx"], r["gy"]) for r in rows}) == 36 and {r["image_id"] for r in rows} == set(label_of)
    grid = {(r["gx"], r["gy"]): label_of[r["image_id"]] for r in rows}
    same = [grid[(x, y)] == grid[(x + 1, y)] for (x, y) in grid if (x + 1, y) in grid]
    assert np.mean(same) > 0.75  # random would be about 1/3
    (meta,) = open_table(lake, "grid_layouts").to_pyarrow_dataset().to_table().to_pylist()
    assert meta["quality"] > 0.5 and meta["n"] == 36


def test_tile_artifact_is_verified_before_it_serves(grid_lake, tmp_path):
    import shutil

    from jobs.grid.tiles import TileSource
    from lake.errors import CorruptArtifact, NotFound

    lake = grid_lake[0]
    folder = tmp_path / "copy"
    shutil.copytree(lake.artifacts_dir("tiles", "L1"), folder)
    shutil.rmtree(folder / "cache", ignore_errors=True)   # tiles other tests cached
    source = TileSource(str(folder), cache=False)
    assert source.tile(10, 0, 0)[:2] == b"\xff\xd8"
    assert not (folder / "cache" / "10" / "0_0.jpg").exists()      # cache off: nothing written
    with open(folder / "cells.idx", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    with pytest.raises(CorruptArtifact):
        TileSource(str(folder))
    (folder / "manifest.json").unlink()
    with pytest.raises(NotFound):
        TileSource(str(folder))
