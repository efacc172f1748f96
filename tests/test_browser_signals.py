"""The dashboard's views of the derived signals, in a real headless Chromium with the page's
Content-Security-Policy enforced, at 1366x768: keyword search in the Search view, the Most unusual
view, a bucket page's doubtful members, capture metadata and quality flags in the image drawer, and
the map's overlay by capture date.

One module-scoped lake (42 photos of 3 scenes, planted outliers, JPEGs with EXIF, four of them
dated 2015-2021) run once through ingest, quality, embed, index, outliers, tag and grid, and one
server, serve every test. Assertions are
about what a person sees (tests/test_browser.py's helpers: visible and inside the viewport)."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image, ImageEnhance

from browser import running_server
from test_browser import assert_seen, assert_seen_text, browser, errors, logged_in_page, pytestmark  # noqa: F401
from test_signals import _full_exif, _photo, _save

VIEWPORT = {"width": 1366, "height": 768}
SCENES = ("coffee", "astronaut", "chelsea")


def _keywords_exif(words: str) -> Image.Exif:
    ex = Image.Exif()
    ex[0x9C9E] = words.encode("utf-16-le") + b"\x00\x00"  # XPKeywords
    return ex


def _dated_exif(when: str) -> Image.Exif:
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x9003] = when  # DateTimeOriginal
    return ex


DATED_YEARS = (2015, 2018, 2019, 2021)  # the three below and paris.jpg


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from jobs.pipeline import PipelineRequest, run_pipeline
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.settings import Settings
    from lake.tokens import create_token
    from photo_lake import write_photos

    root = tmp_path_factory.mktemp("browser-signals")
    images = root / "images"
    labels = write_photos(images, 14, SCENES, seed=3)
    odd = images / "odd"
    odd.mkdir()
    yy, xx = np.mgrid[0:96, 0:128]
    checker = Image.fromarray((((xx // 8 + yy // 8) % 2) * 255).astype(np.uint8)).convert("RGB")
    (odd / "checker.png").write_bytes(_save(checker, "PNG"))
    stripes = Image.fromarray(np.stack([(np.sin(xx / 3.0) * 127 + 128).astype(np.uint8),
                                        np.zeros_like(xx, np.uint8), (yy * 2).astype(np.uint8)], -1))
    (odd / "stripes.png").write_bytes(_save(stripes, "PNG"))
    exif = images / "exif"
    exif.mkdir()
    (exif / "paris.jpg").write_bytes(_save(_photo(21), "JPEG", _full_exif()))  # Canon, GPS, "paris;morning"
    dark = ImageEnhance.Brightness(_photo(24)).enhance(0.08)
    (exif / "night.jpg").write_bytes(_save(dark, "JPEG", _keywords_exif("nightshot")))
    for seed, year in zip((31, 32, 33), DATED_YEARS[:3]):
        (exif / f"dated_{year}.jpg").write_bytes(_save(_photo(seed), "JPEG", _dated_exif(f"{year}:05:01 10:00:00")))
    lake = Lake.at(root / "lake")
    settings = Settings(lake=lake.root, runner="local", partition_files=64, outlier_k=5)
    run_pipeline(lake, settings, PipelineRequest(images=str(images), collection="signals",
                                                 steps=("ingest", "quality", "embed", "index", "outliers", "tag", "grid")),
                 runner=LocalRunner())
    _, token = create_token(lake, "curate", "browser signals test")
    from lake.commit import open_table

    t = open_table(lake, "images").to_pyarrow_table(columns=["uri", "image_id"])
    ids = dict(zip(t.column("uri").to_pylist(), t.column("image_id").to_pylist()))
    label = {i: u.split("/")[-2] for u, i in ids.items()}
    with running_server(lake.root, env_extra={"IMAGELAKE_SUGGEST_DIMS": "16"}) as base:
        yield {"base": base, "token": token, "ids": ids, "label": label, "labels": labels}


@pytest.fixture
def page(browser, site, artifacts_dir, request, errors):  # noqa: F811
    """As tests/test_browser.py's, at 1366x768; any console error or HTTP error fails the test."""
    with logged_in_page(browser, site, errors, VIEWPORT,
                        artifacts_dir / f"dashboard-signals-{request.node.name}.png") as p:
        yield p


def _search_words(page, site, words: str) -> None:
    page.goto(site["base"] + "/#search")
    page.fill("#search-text", words)
    page.press("#search-text", "Enter")
    # this search's answer, not a previous one's grid
    page.wait_for_function("(q) => document.querySelector('#search-status').textContent.includes(`\"${q}\"`)", arg=words)
    page.wait_for_selector("#search-results .cell img")


def test_words_in_the_search_box_show_matching_images_with_the_matched_term(page, site):
    _search_words(page, site, "espresso")
    assert "match \"espresso\"" in assert_seen_text(page.locator("#search-status"), "the result count")
    first = page.locator("#search-results .cell").first
    assert_seen(first.locator("img"), "the best match")
    assert "espresso" in assert_seen_text(first.locator(".caption"), "the matched term on the best match")
    top = [page.locator("#search-results .cell").nth(i).get_attribute("data-image-id") for i in range(5)]
    assert [site["label"][i] for i in top] == ["coffee"] * 5
    page.wait_for_function("() => [...document.querySelectorAll('#search-results img')].slice(0, 5)"
                           ".every(i => i.complete && i.naturalWidth > 0)")


def test_most_unusual_view_shows_the_planted_outliers_first_with_their_score(page, site):
    page.goto(site["base"] + "/#unusual")
    page.wait_for_selector("#unusual-grid .cell img")
    cells = page.locator("#unusual-grid .cell")
    assert cells.count() == min(56, len(site["ids"]))
    assert_seen(page.get_by_role("tab", name="Most unusual"), "the tab")
    text = assert_seen_text(cells.first.locator(".caption"), "the first score")
    assert text.startswith("score 0.") or text.startswith("score 1.")
    scores = [float(cells.nth(i).get_attribute("data-score")) for i in range(cells.count())]
    assert scores == sorted(scores, reverse=True)
    top = {cells.nth(i).get_attribute("data-image-id") for i in range(6)}
    planted = {i for u, i in site["ids"].items() if "/odd/" in u}
    assert planted <= top, [site["label"][i] for i in top]
    assert_seen(cells.nth(1).locator("img"), "the second most unusual")


def test_bucket_page_lists_doubtful_members_and_moves_one_where_its_neighbours_are(page, site):
    headers = {"Authorization": f"Bearer {site['token']}"}
    api = site["base"] + "/api/v1"
    by_class = {c: sorted(i for u, i in site["ids"].items() if f"/{c}/photo_" in u) for c in SCENES}
    wrong = by_class["astronaut"][:2]
    buckets = {}
    for c in SCENES:
        r = requests.post(f"{api}/buckets", json={"name": f"doubt-{c}"}, headers=headers, timeout=30)
        assert r.status_code == 201, r.text
        buckets[c] = r.json()["bucket"]["bucket_id"]
        members = by_class[c] + wrong if c == "coffee" else by_class[c][2:] if c == "astronaut" else by_class[c]
        r = requests.post(f"{api}/buckets/{buckets[c]}/images", json={"image_ids": members}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
    page.goto(f"{site['base']}/#buckets/{buckets['coffee']}")
    page.wait_for_selector("#bucket-doubts-list .doubt")
    heading = page.locator("#bucket-doubts h3")
    heading.scroll_into_view_if_needed()
    assert "Doubtful members" in assert_seen_text(heading, "the section's title")
    doubts = page.locator("#bucket-doubts-list .doubt")
    first_two = {doubts.nth(i).get_attribute("data-image-id") for i in range(2)}
    assert first_two == set(wrong)
    card = doubts.first
    card.scroll_into_view_if_needed()
    assert_seen(card.locator("img"), "the most doubtful member")
    assert "doubt-astronaut" in assert_seen_text(card.locator(".suggested"), "where its neighbours are")
    assert_seen(card.locator(".doubt-remove"), "the remove button")
    assert card.locator("select.doubt-target").input_value() == buckets["astronaut"]  # preselected
    moved = card.get_attribute("data-image-id")
    card.locator(".doubt-move").click()
    page.wait_for_function("(id) => !document.querySelector(`#bucket-doubts-list .doubt[data-image-id='${id}']`)"
                           " && document.querySelector('#bucket-title').textContent.includes('15 members')", arg=moved)
    astronaut = requests.get(f"{api}/buckets/{buckets['astronaut']}?limit=100", headers=headers, timeout=30).json()
    assert moved in astronaut["members"]
    # the other planted one: removed from the bucket
    other = page.locator(f"#bucket-doubts-list .doubt[data-image-id='{(set(wrong) - {moved}).pop()}']")
    other.scroll_into_view_if_needed()
    other.locator(".doubt-remove").click()
    page.wait_for_function("() => document.querySelector('#bucket-title').textContent.includes('14 members')")
    assert_seen(page.locator("#bucket-title"), "the bucket's count")


def test_the_drawer_shows_capture_metadata_and_quality_flags(page, site):
    _search_words(page, site, "morning")  # paris.jpg's EXIF keywords
    assert "capture.keywords" in page.locator("#search-results .cell .caption").first.inner_text()
    page.locator("#search-results .cell").first.click()
    table = page.locator("#details table.capture")
    table.wait_for(state="attached")
    table.scroll_into_view_if_needed()
    text = assert_seen_text(table, "the capture metadata")
    for expected in ("date taken", "2021-07-14 16:30:05", "Canon EOS 5D Mark IV", "EF50mm f/1.8 STM",
                     "1/250 s", "f/2.8", "ISO 400", "50 mm", "48.85823, -2.29447", "-17.5 m"):
        assert expected in text, (expected, text)
    quality = page.locator("#details .quality")
    quality.scroll_into_view_if_needed()
    assert "brightness" in assert_seen_text(quality, "the quality measures")
    page.click("#details-close")
    _search_words(page, site, "nightshot")
    page.locator("#search-results .cell").first.click()
    flags = page.locator("#details .quality-flags")
    flags.wait_for(state="attached")
    flags.scroll_into_view_if_needed()
    assert "dark" in assert_seen_text(flags, "the raised quality flags").split("\n")
    assert "nightshot" in page.locator("#details table.capture").inner_text()  # its only capture field


def test_map_overlay_by_capture_date_colours_the_dated_cells_and_the_slider_narrows_them(page, site, artifacts_dir):
    headers = {"Authorization": f"Bearer {site['token']}"}
    api = site["base"] + "/api/v1"
    dated = {i for u, i in site["ids"].items() if u.endswith(("paris.jpg",) + tuple(f"dated_{y}.jpg" for y in DATED_YEARS))}
    n = len(site["ids"])
    page.goto(site["base"] + "/#map")
    page.wait_for_selector("#map-viewer[data-ready='1']")
    assert page.locator("#map-dates").is_hidden()
    page.select_option("#map-overlay", "date")
    page.wait_for_function("() => document.querySelector('#map-viewer').dataset.dateCells === '4'")
    status = assert_seen_text(page.locator("#map-status"), "the overlay's count")
    assert f"4 cells taken 2015–2021 · {n - 4} without a date" in status, status
    assert_seen(page.locator("#map-date-from"), "the from-year slider")
    assert assert_seen_text(page.locator("#map-date-legend"), "the colour legend").split() == ["2015", "2021"]
    rects = page.locator("#map-viewer rect.map-date")
    assert rects.count() == 4
    under = set()
    for i in range(4):
        assert_seen(rects.nth(i), f"highlighted cell {i}")  # on screen, inside the viewport
        gx, gy = (int(float(rects.nth(i).get_attribute(a))) for a in ("x", "y"))
        under.add(requests.get(f"{api}/grid/latest/cell?x={gx}&y={gy}", headers=headers, timeout=30).json()["image_id"])
    assert under == dated  # the highlighted cells are the dated images' cells
    assert len({rects.nth(i).get_attribute("fill") for i in range(4)}) == 4  # one colour per year
    # the from-year slider, moved with the keyboard as a person would: 2015 -> 2018
    page.focus("#map-date-from")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.querySelector('#map-viewer').dataset.dateCells === '3'")
    assert "3 cells taken 2018–2021" in assert_seen_text(page.locator("#map-status"), "the narrowed count")
    assert assert_seen_text(page.locator("#map-date-from-year"), "the from year") == "2018"
    assert page.locator("#map-viewer rect.map-date").count() == 3
    # images without a date, shown as such
    page.check("#map-date-undated")
    page.wait_for_function("(k) => document.querySelectorAll('#map-viewer rect.map-undated').length === k", arg=n - 4)
    assert f"{n - 4} without a date (grey)" in page.locator("#map-status").inner_text()
    assert_seen(page.locator("#map-viewer rect.map-undated").first, "an undated cell")
    page.screenshot(path=str(artifacts_dir / "dashboard-map-date-overlay.png"))
    # the route itself: the layout's years, a range, and bad input
    body = requests.get(f"{api}/grid/latest/dates?from=2019-01-01&to=2020", headers=headers, timeout=30).json()
    assert body["years"] == [{"year": y, "images": 1} for y in DATED_YEARS] and body["undated"] == n - 4
    assert body["count"] == 1 and body["cells"][0]["day"] == 18017  # 2019-05-01, UTC days since 1970
    for bad in ("from=yesterday", "from=2020&to=2019", "limit=0", "undated=maybe"):
        r = requests.get(f"{api}/grid/latest/dates?{bad}", headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["ok"] is False, bad
    # no overlay clears the cells, the date bar and the status
    page.select_option("#map-overlay", "")
    page.wait_for_function("() => !document.querySelector('#map-viewer rect.map-date, #map-viewer rect.map-undated')")
    assert page.locator("#map-dates").is_hidden() and page.locator("#map-status").inner_text() == ""
