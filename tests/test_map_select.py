"""The map's rectangle/lasso selection: which cells a polygon holds, and the route's bad input; the
date overlay's bad input.
(The route on a real layout, driven by a person's drag, is in tests/test_browser.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from api import API_PREFIX
from api.map_select import cells_in_polygon


def _cells(polygon, width=6, height=5) -> set[tuple[int, int]]:
    idx = cells_in_polygon(np.asarray(polygon, float), width, height)
    return {(int(i % width), int(i // width)) for i in idx}


def test_a_rectangle_holds_the_cells_whose_centres_are_inside():
    assert _cells([[1, 1], [3, 1], [3, 3], [1, 3]]) == {(1, 1), (2, 1), (1, 2), (2, 2)}
    assert _cells([[1.6, 1.6], [2.4, 1.6], [2.4, 2.4], [1.6, 2.4]]) == set()  # no centre inside
    assert _cells([[-5, -5], [50, -5], [50, 50], [-5, 50]]) == {(x, y) for x in range(6) for y in range(5)}  # clipped


def test_a_lasso_is_any_polygon_even_a_concave_one():
    triangle = _cells([[0, 0], [4, 0], [0, 4]])
    assert triangle == {(x, y) for x in range(4) for y in range(4) if x + y + 1 < 4}
    # a U shape: the notch in the middle is not selected
    u = _cells([[0, 0], [1, 0], [1, 3], [2, 3], [2, 0], [3, 0], [3, 4], [0, 4]])
    assert (1, 1) not in u and (0, 1) in u and (2, 1) in u and (1, 3) in u


@pytest.mark.parametrize("body, words", [
    ({}, "polygon"), ({"polygon": [[0, 0], [1, 1]]}, "2 points"), ({"polygon": "x"}, "polygon"),
    ({"polygon": [[0, 0], [1, "a"], [2, 2]]}, "two finite numbers"), ({"polygon": [[0, 0], [1], [2, 2]]}, "[x, y]"),
    ({"polygon": [[0, 0]] * 2001}, "2001 points"),
])
def test_bad_polygons_are_400_with_the_error_shape(client, body, words):
    r = client.post(f"{API_PREFIX}/grid/latest/select", json=body)
    assert r.status_code == 400 and r.get_json()["ok"] is False and words in r.get_json()["error"], r.get_json()


def test_no_layout_is_a_404_and_the_route_is_documented(client):
    r = client.post(f"{API_PREFIX}/grid/latest/select", json={"polygon": [[0, 0], [1, 0], [1, 1]]})
    assert r.status_code == 404 and r.get_json()["ok"] is False
    assert "/grid/{layout}/select" in client.get(f"{API_PREFIX}/openapi.json").get_json()["paths"]


@pytest.mark.parametrize("query, words", [
    ("from=yesterday", "not a date"), ("to=2021-13-01", "not a date"), ("from=2020&to=2019", "before to"),
    ("from=2020-01-01&to=2020-01-01", "before to"), ("limit=0", "limit"), ("limit=x", "limit"), ("undated=maybe", "undated"),
])
def test_bad_date_overlay_parameters_are_400_with_the_error_shape(client, query, words):
    r = client.get(f"{API_PREFIX}/grid/latest/dates?{query}")
    assert r.status_code == 400 and r.get_json()["ok"] is False and words in r.get_json()["error"], r.get_json()


def test_the_date_overlay_without_a_layout_is_a_404_and_is_documented(client):
    r = client.get(f"{API_PREFIX}/grid/latest/dates?from=2020")
    assert r.status_code == 404 and r.get_json()["ok"] is False
    assert "/grid/{layout}/dates" in client.get(f"{API_PREFIX}/openapi.json").get_json()["paths"]
