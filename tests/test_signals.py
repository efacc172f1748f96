"""Derived signals: capture metadata at ingest, image quality, outliers and keyword search.

One module-scoped lake (built once: ingest with capture metadata, embed, index, quality, outliers,
tag, on the session's Spark) serves the lake-level tests; the EXIF reader's tests need no lake.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from jobs.capture import exif as capture_exif
from jobs.capture.exif import read_capture

UTC = dt.timezone.utc
MiB = 1 << 20


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(1, 3)) % 256, (yy * rng.uniform(1, 3)) % 256, ((xx + yy) * 0.7) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _full_exif() -> Image.Exif:
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = "Canon", "Canon EOS 5D Mark IV", 1
    sub = ex.get_ifd(0x8769)
    sub[0x9003], sub[0x9011], sub[0x9291] = "2021:07:14 18:30:05", "+02:00", "25"
    sub[0x829A], sub[0x829D], sub[0x8827] = IFDRational(1, 250), IFDRational(28, 10), 400
    sub[0x920A], sub[0xA434] = IFDRational(50, 1), "EF50mm f/1.8 STM"
    gps = ex.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(48, 1), IFDRational(51, 1), IFDRational(2964, 100))
    gps[3], gps[4] = "W", (IFDRational(2, 1), IFDRational(17, 1), IFDRational(4008, 100))
    gps[5], gps[6] = b"\x01", IFDRational(35, 2)
    ex[0x9C9E] = "paris;morning".encode("utf-16-le") + b"\x00\x00"
    ex[0x9C9B] = "Eiffel tower".encode("utf-16-le") + b"\x00\x00"
    return ex


def _maker_note_exif() -> Image.Exif:
    """Nikon D850, a bad date (month 13) and a 1 MB maker note."""
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0132] = "Nikon", "D850", "2023:13:45 99:00:00"
    ex[0x927C] = b"M" * MiB
    return ex


def _save(im: Image.Image, fmt: str, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _corrupt_exif_ifd(jpeg: bytes) -> bytes:
    """The JPEG with its Exif sub-IFD pointer (tag 0x8769, big-endian TIFF header) set past the end."""
    data = bytearray(jpeg)
    i = data.find(b"\x87\x69\x00\x04")
    assert i > 0
    data[i + 8:i + 12] = (0x7FFFFFF0).to_bytes(4, "big")
    return bytes(data)


def test_exif_of_a_jpeg_written_by_pillow_is_read_field_by_field():
    row = read_capture(_save(_photo(1), "JPEG", _full_exif()), "a" * 64, max_block_bytes=MiB)
    assert row["taken_at"] == dt.datetime(2021, 7, 14, 16, 30, 5, 250000, tzinfo=UTC)  # 18:30 at +02:00
    assert row["taken_offset"] == "+02:00"
    assert (row["make"], row["model"], row["camera"]) == ("Canon", "Canon EOS 5D Mark IV", "Canon EOS 5D Mark IV")
    assert (row["lens"], row["focal_mm"], row["exposure_s"], row["f_number"], row["iso"]) == \
        ("EF50mm f/1.8 STM", 50.0, 0.004, 2.8, 400)
    assert row["gps_lat"] == pytest.approx(48.8582333) and row["gps_lon"] == pytest.approx(-2.2944667)
    assert row["gps_alt"] == -17.5 and row["has_gps"] is True and row["orientation"] == 1
    assert row["keywords"] == ["paris", "morning"] and row["title"] == "Eiffel tower"
    assert row["issues"] == []


def test_hostile_exif_leaves_fields_null_with_a_reason_and_never_raises():
    tiff = read_capture(_save(_photo(2), "TIFF", _maker_note_exif()), "b" * 64, max_block_bytes=MiB)
    assert tiff["camera"] == "Nikon D850" and tiff["taken_at"] is None  # 1 MB maker note read past
    assert tiff["issues"] == ["taken_at:bad_date"]
    png = read_capture(_save(_photo(3), "PNG", _maker_note_exif()), "c" * 64, max_block_bytes=MiB)
    assert png["make"] is None and png["issues"] == ["exif:too_large"]  # a 1 MB eXIf block over the cap
    broken = read_capture(_corrupt_exif_ifd(_save(_photo(4), "JPEG", _full_exif())), "d" * 64, max_block_bytes=MiB)
    assert broken["camera"] == "Canon EOS 5D Mark IV" and broken["has_gps"]      # the other IFDs still read
    assert broken["taken_at"] is None and broken["exposure_s"] is None
    assert "exif_ifd:bad_offset" in broken["issues"]
    ex = _full_exif()
    ex.get_ifd(0x8769)[0x920A] = IFDRational(5, 0)
    ex.get_ifd(0x8825)[2] = (IFDRational(95, 1), IFDRational(0, 1), IFDRational(0, 1))
    bad = read_capture(_save(_photo(5), "JPEG", ex), "e" * 64, max_block_bytes=MiB)
    assert bad["focal_mm"] is None and bad["gps_lat"] is None and not bad["has_gps"]
    assert {"focal_mm:zero_denominator", "gps:out_of_range"} <= set(bad["issues"])
    assert read_capture(b"not an image", "f" * 64, max_block_bytes=MiB)["issues"] == ["image:unreadable"]
    plain = read_capture(_save(_photo(6), "JPEG"), "0" * 64, max_block_bytes=MiB)
    assert plain["issues"] == [] and plain["camera"] is None and plain["keywords"] == []


def test_the_jpeg_segment_reader_answers_as_pillow_does_on_mutated_exif_blocks():
    """read_capture reads a JPEG's EXIF from its segments, not through Pillow; on 60 randomly
    mutated EXIF blocks (offsets, counts, types, lengths) both readers give the same row."""
    def both(data: bytes) -> tuple[dict | None, dict]:
        rows = [capture_exif.empty_capture("0" * 64) for _ in range(2)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast = capture_exif._read_jpeg_segments(data, rows[0], rows[0]["issues"], MiB)
            capture_exif._read_with_pillow(data, rows[1], rows[1]["issues"], MiB)
        return (rows[0] if fast else None), rows[1]

    good = _save(_photo(7), "JPEG", _full_exif())
    start = good.find(b"Exif\x00\x00") + 6
    end = start + int.from_bytes(good[start - 8:start - 6], "big") - 8
    rng, read_fast = random.Random(7), 0
    for _ in range(60):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(start, end)] = rng.choice((0, 0xFF, rng.randrange(256)))
        fast, pillow = both(bytes(data))
        if fast is not None:
            read_fast += 1
            assert fast == pillow
    assert read_fast > 45 and both(good)[0] == both(good)[1]


# -- one lake through the pipeline -------------------------------------------------------------

CLEAN = ("coffee", "astronaut", "chelsea")


def _png(im: Image.Image) -> bytes:
    return _save(im, "PNG")


@pytest.fixture(scope="module")
def signals_lake(tmp_path_factory, spark):
    """48 photo views (3 scenes), planted bad images (blurred, dark, flat), planted outliers, and
    files with EXIF, run once through ingest, embed, index, outliers and tag in process, then the
    quality step on the session's Spark (one Spark run: its start-up is what costs)."""
    from PIL import ImageEnhance, ImageFilter

    from jobs.pipeline import PipelineRequest, run_pipeline
    from jobs.runner import LocalRunner, SparkRunner
    from lake.catalog import Lake
    from lake.settings import Settings
    from photo_lake import photo_view, write_photos

    root = tmp_path_factory.mktemp("signals")
    images = root / "images"
    write_photos(images, 16, CLEAN, seed=3)
    rng = np.random.default_rng(11)
    planted: dict[str, list[str]] = {"blurry": [], "dark": [], "flat": [], "outlier": []}
    bad = images / "bad"
    bad.mkdir()
    for i in range(3):
        view = photo_view(CLEAN[i], rng)
        for kind, im in (("blurry", view.filter(ImageFilter.GaussianBlur(3))),
                         ("dark", ImageEnhance.Brightness(view).enhance(0.1)),
                         ("flat", Image.fromarray(np.clip(np.full((90, 120, 3), (60 + 40 * i, 140, 90)) +
                                                          rng.normal(0, 2, (90, 120, 3)), 0, 255).astype(np.uint8)))):
            path = bad / f"{kind}_{i}.png"
            path.write_bytes(_png(im))
            planted[kind].append(str(path))
    odd = images / "odd"
    odd.mkdir()
    yy, xx = np.mgrid[0:96, 0:128]
    outliers = {
        "colorwheel": photo_view("colorwheel", rng),
        "checker": Image.fromarray((((xx // 8 + yy // 8) % 2) * 255).astype(np.uint8)).convert("RGB"),
        "stripes": Image.fromarray(np.stack([(np.sin(xx / 3.0) * 127 + 128).astype(np.uint8),
                                             np.zeros_like(xx, np.uint8), (yy * 2).astype(np.uint8)], -1)),
        "hubble": photo_view("hubble_deep_field", rng),
    }
    for name, im in outliers.items():
        path = odd / f"{name}.png"
        path.write_bytes(_png(im))
        planted["outlier"].append(str(path))
    exif = images / "exif"
    exif.mkdir()
    (exif / "paris.jpg").write_bytes(_save(_photo(21), "JPEG", _full_exif()))
    (exif / "nikon.tif").write_bytes(_save(_photo(22), "TIFF", _maker_note_exif()))
    (exif / "broken.jpg").write_bytes(_corrupt_exif_ifd(_save(_photo(23), "JPEG", _full_exif())))
    lake = Lake.at(root / "lake")
    settings = Settings(lake=lake.root, master="local[2,3]", partition_files=64, outlier_k=5)
    summary = run_pipeline(lake, settings, PipelineRequest(
        images=str(images), collection="signals", steps=("ingest", "embed", "index", "outliers", "tag")),
        runner=LocalRunner())
    quality = run_pipeline(lake, settings, PipelineRequest(steps=("quality",)), runner=SparkRunner(settings, spark=spark))
    assert quality.steps[0]["rows_out"] == summary.steps[0]["rows_out"]
    return lake, settings, planted, summary


def _ids_by_uri(lake) -> dict[str, str]:
    from lake.commit import open_table

    t = open_table(lake, "images").to_pyarrow_table(columns=["uri", "image_id"])
    return dict(zip(t.column("uri").to_pylist(), t.column("image_id").to_pylist()))


def _sql(lake, sql):
    from lake.sql import SqlSandbox
    from lake.settings import Settings

    box = SqlSandbox(lake, Settings(lake=lake.root))
    try:
        return box.query(sql).rows
    finally:
        box.close()


def test_capture_rows_are_in_sql_filters_facets_and_the_image_route(signals_lake):
    from api import create_app
    from lake.metadata_filter import matching_seqs
    from lake.tokens import create_token

    lake, settings, _, summary = signals_lake
    ids = _ids_by_uri(lake)
    ingest = next(s for s in summary.steps if s["step"] == "ingest")
    metrics = _sql(lake, f"SELECT metrics FROM job_runs WHERE run_id = '{ingest['run_id']}' AND state = 'succeeded'")
    import json
    issues = json.loads(metrics[0][0])["capture_issues"]
    assert issues == {"exif_ifd:bad_offset": 1, "taken_at:bad_date": 1}
    rows = _sql(lake, "SELECT camera, count(*) FROM capture WHERE camera IS NOT NULL GROUP BY 1 ORDER BY 1")
    assert [tuple(r) for r in rows] == [("Canon EOS 5D Mark IV", 2), ("Nikon D850", 1)]
    assert len(matching_seqs(lake, {"has_gps": True})) == 2
    assert len(matching_seqs(lake, {"taken_at": {">=": "2021-07-14T16:00:00Z", "<": "2021-07-14T17:00:00Z"}})) == 1
    assert len(matching_seqs(lake, {"camera": {"contains": "nikon"}, "collection": "signals"})) == 1
    app = create_app(settings.replace(refresh_s=0.0), {"TESTING": True})
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'read', 't')[1]}"
        paris = next(i for u, i in ids.items() if u.endswith("paris.jpg"))
        image = client.get(f"/api/v1/images/{paris}").get_json()["image"]
        assert image["capture"]["camera"] == "Canon EOS 5D Mark IV" and image["capture"]["gps_alt"] == -17.5
        assert image["capture"]["taken_at"].startswith("2021-07-14T16:30:05")
        assert image["quality"]["blurry"] in (True, False)
        facet = client.get("/api/v1/facets?column=camera").get_json()
        assert {v["value"]: v["count"] for v in facet["values"]} == {"Canon EOS 5D Mark IV": 2, "Nikon D850": 1}
        assert client.get("/api/v1/facets?column=capture.has_gps&where=%7B%22has_gps%22%3A%20true%7D"
                          ).get_json()["values"] == [{"value": True, "count": 2}]
        bad = client.get('/api/v1/facets?column=camera&where={"taken_at": {">=": "last week"}}')
        assert bad.status_code == 400 and bad.get_json()["ok"] is False
    finally:
        app.extensions["imagelake"].close()


def test_quality_flags_planted_images_and_not_clean_photos(signals_lake):
    lake, _, planted, _ = signals_lake
    ids = _ids_by_uri(lake)
    rows = _sql(lake, "SELECT image_id, blurry, dark, low_contrast, low_information, issues FROM image_quality")
    by_id = {r[0]: r for r in rows}
    assert len(by_id) == len(ids)  # every image measured, once
    for uri in planted["blurry"]:
        assert by_id[ids[uri]][1], uri
    for uri in planted["dark"]:
        assert by_id[ids[uri]][2], uri
    for uri in planted["flat"]:
        assert by_id[ids[uri]][3] and by_id[ids[uri]][4], uri
    clean = [i for u, i in ids.items() if "/photo_" in u and u.split("/")[-2] in CLEAN[:3]]
    assert len(clean) == 48
    assert [by_id[i][5] for i in clean if by_id[i][5]] == []
    # filters on the flags find them (the statistics of adopted files cover every column)
    assert _sql(lake, "SELECT count(*) FROM image_quality WHERE dark")[0][0] >= 3


def test_quality_step_is_incremental(signals_lake):
    from jobs.quality.driver import run_quality

    lake, settings, _, _ = signals_lake
    again = run_quality(lake, settings.replace(runner="local"))
    assert again["rows_in"] == 0 and again["rows_out"] == 0


def test_planted_outliers_are_the_most_unusual(signals_lake):
    from jobs.outliers import run_outliers

    lake, settings, planted, _ = signals_lake
    ids = _ids_by_uri(lake)
    from api import create_app
    from lake.tokens import create_token

    app = create_app(settings.replace(refresh_s=0.0), {"TESTING": True})
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'read', 't')[1]}"
        body = client.get("/api/v1/images/unusual?n=10").get_json()
        assert body["ok"] and len(body["results"]) == 10
        top = [r["image_id"] for r in body["results"]]
        assert {ids[u] for u in planted["outlier"]} <= set(top), body
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        for bad in ("0", "x", "100000"):
            r = client.get(f"/api/v1/images/unusual?n={bad}")
            assert r.status_code == 400 and r.get_json()["error"]
    finally:
        app.extensions["imagelake"].close()
    assert run_outliers(lake, settings)["rows_out"] == 0  # this build is scored already


def test_text_search_finds_the_coffee_photos_for_espresso(signals_lake):
    from api import create_app
    from lake.tokens import create_token

    lake, settings, _, _ = signals_lake
    ids = _ids_by_uri(lake)
    label = {i: u.split("/")[-2] for u, i in ids.items()}
    app = create_app(settings.replace(refresh_s=0.0), {"TESTING": True})
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'read', 't')[1]}"
        body = client.get("/api/v1/search/text?q=espresso&k=10").get_json()
        assert body["ok"] and body["results"], body
        top = body["results"][:5]
        assert all(label[r["image_id"]] == "coffee" for r in top), [(label[r["image_id"]], r) for r in top]
        assert any(m.startswith("concept:espresso") for m in top[0]["matched"])
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        # WordNet words shipped with the classes: a synonym ("java" is a lemma of coffee, espresso's
        # broader synset) and a broader term ("house cat" names the domestic cat classes)
        java = client.get("/api/v1/search/text?q=java&k=5").get_json()["results"]
        assert java and all(label[r["image_id"]] == "coffee" for r in java), java
        assert java[0]["matched"] == ["concept:espresso (kind of java)"]
        cats = client.get("/api/v1/search/text?q=house%20cat&k=5").get_json()["results"]
        assert cats and all(label[r["image_id"]] == "chelsea" for r in cats), [(label[r["image_id"]], r) for r in cats]
        assert all(m.endswith("(kind of house cat)") for r in cats for m in r["matched"])
        meta = client.get("/api/v1/search/text?q=morning").get_json()["results"]
        with_exif = {i for u, i in ids.items() if u.endswith(("paris.jpg", "broken.jpg"))}  # keywords paris;morning
        assert {r["image_id"] for r in meta} == with_exif
        assert all(r["matched"] == ["capture.keywords"] and r["score"] == 1.0 for r in meta)
        for bad in ("", "q=", "q=%20%20", "q=!!!", "q=espresso&k=0", "q=espresso&k=abc", "q=" + "a" * 201):
            r = client.get(f"/api/v1/search/text?{bad}")
            assert r.status_code == 400 and r.get_json()["ok"] is False, bad
        spec = client.get("/api/v1/openapi.json").get_json()
        assert {"/images/unusual", "/search/text"} <= set(spec["paths"])
    finally:
        app.extensions["imagelake"].close()


def test_doubts_find_planted_wrong_bucket_members(signals_lake):
    from api import create_app
    from lake.tokens import create_token

    lake, settings, _, _ = signals_lake
    ids = _ids_by_uri(lake)
    by_class = {c: sorted(i for u, i in ids.items() if f"/{c}/photo_" in u) for c in CLEAN}
    wrong = by_class["astronaut"][:2] + by_class["chelsea"][:1]   # planted in the coffee bucket
    app = create_app(settings.replace(refresh_s=0.0, suggest_dims=16), {"TESTING": True})
    try:
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'curate', 't')[1]}"
        buckets = {}
        for c in CLEAN:
            r = client.post("/api/v1/buckets", json={"name": c})
            assert r.status_code == 201, r.get_json()
            buckets[c] = r.get_json()["bucket"]["bucket_id"]
            members = by_class[c][2:] if c != "coffee" else by_class[c] + wrong
            if c == "chelsea":
                members = by_class[c][1:]
            assert client.post(f"/api/v1/buckets/{buckets[c]}/images", json={"image_ids": members}).status_code == 200
        body = client.get(f"/api/v1/buckets/{buckets['coffee']}/doubts?n=5").get_json()
        assert body["ok"] and len(body["results"]) == 5, body
        first = [r["image_id"] for r in body["results"][:len(wrong)]]
        assert set(first) == set(wrong), body
        suggested = {r["image_id"]: r["suggested_bucket"] for r in body["results"]}
        assert suggested[wrong[0]] == buckets["astronaut"] and suggested[wrong[2]] == buckets["chelsea"]
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        for bad in ("n=0", "n=x", "n=100000"):
            r = client.get(f"/api/v1/buckets/{buckets['coffee']}/doubts?{bad}")
            assert r.status_code == 400 and r.get_json()["ok"] is False
        assert client.get("/api/v1/buckets/discard/doubts").status_code == 400
        assert client.get("/api/v1/buckets/not-a-bucket/doubts").status_code in (400, 404)
        assert "/buckets/{bucket_id}/doubts" in client.get("/api/v1/openapi.json").get_json()["paths"]
    finally:
        app.extensions["imagelake"].close()
