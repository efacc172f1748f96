"""The read-only SQL sandbox on a real DuckDB over real Delta tables in tmp_path."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import os
import re
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake.catalog import TABLES, Lake
from lake.commit import commit_rows
from lake.errors import BadInput, QueryTimeout
from lake.settings import Settings
from lake.sql import SQL_TABLES, QueryResult, SqlSandbox, format_result, jsonable

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def _image(i: int) -> dict:
    return {"image_id": f"{i:064x}", "seq": i, "uri": f"/photos/{i}.jpg", "collection": "demo",
            "format": "JPEG", "width": 640 + i, "height": 480, "bytes": 1000 * i, "mtime": T0,
            "run_id": "r1", "ingested_at": T0}


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Lake:
    lake = Lake.at(tmp_path_factory.mktemp("lake"))
    commit_rows(lake, "images", [_image(i) for i in range(3)], run_id="r1")
    commit_rows(lake, "job_runs", [{"run_id": "r1", "job": "ingest", "state": "succeeded",
                                    "started_at": T0, "ended_at": T0, "rows_in": 3, "rows_out": 3}],
                run_id="r1")
    return lake


@pytest.fixture(scope="module")
def sandbox(lake):
    box = SqlSandbox(lake, Settings(lake=lake.root, sql_max_rows=100, refresh_s=3600))
    yield box
    box.close()


def test_select_returns_columns_types_and_rows(sandbox):
    result = sandbox.query("SELECT seq, width, mtime FROM images ORDER BY seq")
    assert result.columns == ["seq", "width", "mtime"]
    assert result.types == ["BIGINT", "INTEGER", "TIMESTAMP WITH TIME ZONE"]
    assert [r[:2] for r in result.rows] == [(0, 640), (1, 641), (2, 642)]
    assert result.rows[0][2] == T0
    assert result.truncated is False and result.elapsed_ms > 0


def test_describe_show_and_with_are_allowed(sandbox):
    assert ("images",) in sandbox.query("SHOW TABLES").rows
    described = sandbox.query("DESCRIBE job_runs").rows
    assert [r[0] for r in described] == TABLES["job_runs"].schema.names
    assert sandbox.query("WITH j AS (SELECT job FROM job_runs) SELECT * FROM j").rows == [("ingest",)]


@pytest.mark.parametrize("name", list(SQL_TABLES))
def test_every_catalog_table_is_a_view_with_its_columns(sandbox, name):
    result = sandbox.query(f'SELECT * FROM "{name}"')
    assert result.columns == TABLES[name].schema.names
    expected = {"images": 3, "job_runs": 1}.get(name, 0)
    assert len(result.rows) == expected


def test_empty_table_keeps_catalog_types(sandbox):
    types = {r[0]: r[1] for r in sandbox.query("DESCRIBE index_builds").rows}
    assert types["shards"] == "STRUCT(file VARCHAR, sha256 VARCHAR, ntotal BIGINT)[]"
    assert types["created_at"] == "TIMESTAMP WITH TIME ZONE"


@pytest.mark.parametrize("sql, says", [
    ("INSERT INTO images (image_id) VALUES ('x')", "not INSERT statements"),
    ("CREATE TABLE t AS SELECT 1", "not CREATE statements"),
    ("ATTACH 'other.db'", "not ATTACH statements"),
    ("SET threads=8", "not SET statements"),
    ("PRAGMA version", "not PRAGMA statements"),
    ("EXPLAIN SELECT 1", "not EXPLAIN statements"),
    ("INSTALL httpfs", "not LOAD statements"),
    ("LOAD httpfs", "not LOAD statements"),
    ("PIVOT images ON format USING count(*)", "not PIVOT or other multi-part statements"),
    ("CALL pragma_version()", "not CALL statements"),
    ("select 1; select 2", "exactly one SQL statement, got 2"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file and network access are disabled"),
    ("SELECT * FROM 'https://example.com/x.parquet'", "file and network access are disabled"),
    ("SELECT * FROM glob('/etc/*')", "file and network access are disabled"),
    ("SELECT * FROM nosuch", "The lake's tables are: images"),
    ("SELECT nosuch FROM images", 'column "nosuch" not found'),
    ("SELEC 1", "SQL syntax error"),
    ("", "the SQL is empty"),
    ("  ;  ", "the SQL is empty"),
])
def test_refused_statements(sandbox, sql, says):
    with pytest.raises(BadInput) as e:
        sandbox.query(sql)
    assert says in str(e.value)
    assert not isinstance(e.value, QueryTimeout)


def test_copy_into_the_tables_dir_is_refused_and_writes_nothing(sandbox, lake):
    target = lake.path("tables", "x.csv")
    with pytest.raises(BadInput, match="not COPY statements"):
        sandbox.query(f"COPY (SELECT 1) TO '{target}'")
    assert not os.path.exists(target)


def test_reading_parquet_outside_the_lake_is_refused(sandbox, tmp_path):
    outside = tmp_path / "secret.parquet"
    pq.write_table(pa.table({"secret": [42]}), outside)
    with pytest.raises(BadInput, match="file and network access are disabled") as e:
        sandbox.query(f"SELECT * FROM read_parquet('{outside}')")
    assert "images" in str(e.value)


def test_dot_dot_does_not_leave_the_tables_dir(sandbox, lake):
    with pytest.raises(BadInput, match="file and network access are disabled"):
        sandbox.query(f"SELECT * FROM read_csv('{lake.path('tables')}/../../../../../../etc/passwd')")


def test_settings_stay_locked(sandbox):
    assert sandbox.query("SELECT current_setting('enable_external_access')").rows == [(False,)]
    assert sandbox.query("SELECT current_setting('lock_configuration')").rows == [(True,)]


def test_slow_query_times_out_and_the_sandbox_keeps_answering(sandbox):
    with pytest.raises(QueryTimeout, match=r"ran past the 0.5 s limit"):
        sandbox.query("SELECT count(*) FROM range(100000000) a, range(100000) b "
                      "WHERE a.range + b.range = 7", timeout_s=0.5)
    assert sandbox.query("SELECT count(*) FROM images").rows == [(3,)]


def test_row_cap_sets_truncated(sandbox):
    capped = sandbox.query("SELECT * FROM range(10000)", max_rows=7)
    assert len(capped.rows) == 7 and capped.truncated
    exact = sandbox.query("SELECT * FROM range(7)", max_rows=7)
    assert len(exact.rows) == 7 and not exact.truncated
    default = sandbox.query("SELECT * FROM range(500)")
    assert len(default.rows) == 100 and default.truncated


def test_new_commit_becomes_visible_after_refresh(lake):
    box = SqlSandbox(lake, Settings(lake=lake.root, refresh_s=3600))
    try:
        before = box.refresh()
        assert set(before) == set(TABLES) - {"tokens"} == set(SQL_TABLES)
        commit_rows(lake, "tags", [{"image_id": _image(1)["image_id"], "tag": "cat", "source": "user",
                                    "score": 1.0}], run_id="tag-run")
        assert box.query("SELECT count(*) FROM tags").rows == [(0,)]   # within refresh_s
        after = box.refresh(force=True)
        assert after["tags"] == before["tags"] + 1 and after["images"] == before["images"]
        assert box.query("SELECT tag FROM tags").rows == [("cat",)]
    finally:
        box.close()


def test_query_refreshes_by_itself_after_refresh_s(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    box = SqlSandbox(lake, Settings(lake=lake.root, refresh_s=0))
    try:
        assert box.query("SELECT count(*) FROM images").rows == [(0,)]
        commit_rows(lake, "images", [_image(5)], run_id="r5")
        assert box.query("SELECT seq FROM images").rows == [(5,)]
    finally:
        box.close()


def test_concurrent_queries_from_eight_threads(sandbox):
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = sandbox.query(f"SELECT count(*) + {i} FROM images").rows
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {i: [(3 + i,)] for i in range(8)}


class ObjectStoreLike(Lake):
    """A local lake that takes the object-store code path (pyarrow datasets, no file access at all)."""

    @property
    def is_local(self) -> bool:
        return False


def test_non_local_lake_uses_registered_datasets(lake, tmp_path):
    box = SqlSandbox(ObjectStoreLike(lake.root), Settings(lake=lake.root))
    try:
        assert box.query("SELECT count(*) FROM images").rows == [(3,)]
        assert box.query("SELECT * FROM features").columns == TABLES["features"].schema.names
        with pytest.raises(BadInput, match="file and network access are disabled"):
            box.query(f"SELECT * FROM read_parquet('{lake.path('tables')}/images/*.parquet')")
    finally:
        box.close()
    fresh = ObjectStoreLike(str(tmp_path / "remote"))
    box = SqlSandbox(fresh, Settings(lake=fresh.root, refresh_s=3600))
    try:
        assert box.query("SELECT count(*) FROM grid").rows == [(0,)]
        commit_rows(fresh, "grid", [{"layout_id": "l1", "image_id": "a", "gx": 1, "gy": 2}], run_id="g1")
        box.refresh(force=True)
        assert box.query("SELECT layout_id, gx, gy FROM grid").rows == [("l1", 1, 2)]
    finally:
        box.close()


def test_queries_keep_working_while_commits_land(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    box = SqlSandbox(lake, Settings(lake=lake.root, refresh_s=0))
    seen, errors, stop = set(), [], threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                seen.add(box.query("SELECT count(*) FROM images").rows[0][0])
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    readers = [threading.Thread(target=read) for _ in range(4)]
    try:
        for t in readers:
            t.start()
        for i in range(5):
            commit_rows(lake, "images", [_image(i)], run_id=f"r{i}")
        deadline = time.monotonic() + 5
        while 5 not in seen and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in readers:
            t.join()
        box.close()
    assert errors == []
    assert 5 in seen and seen <= set(range(6))


def test_closed_sandbox_refuses_queries(lake):
    box = SqlSandbox(lake, Settings(lake=lake.root))
    box.close()
    box.close()
    with pytest.raises(Exception, match="closed"):
        box.query("SELECT 1")


RESULT = QueryResult(["id", "at", "jpeg", "tags"],
                     ["INTEGER", "TIMESTAMP WITH TIME ZONE", "BLOB", "VARCHAR[]"],
                     [(1, T0, b"\xff\xd8", ["a", "b,c"]), (2, None, None, [])], True, 1.5)


def test_format_json():
    data = json.loads(format_result(RESULT, "json"))
    assert data == {"columns": ["id", "at", "jpeg", "tags"], "types": RESULT.types,
                    "rows": [[1, "2024-05-01T12:00:00+00:00", {"$bytes": 2}, ["a", "b,c"]],
                             [2, None, None, []]],
                    "truncated": True, "elapsed_ms": 1.5}


def test_format_csv():
    rows = list(csv.reader(io.StringIO(format_result(RESULT, "csv"))))
    assert rows == [["id", "at", "jpeg", "tags"],
                    ["1", "2024-05-01T12:00:00+00:00", '{"$bytes": 2}', '["a", "b,c"]'],
                    ["2", "", "", "[]"]]


def test_format_table():
    lines = format_result(RESULT, "table").splitlines()
    assert lines[0].split(" | ")[0].strip() == "id" and "tags" in lines[0]
    assert set(lines[1]) <= {"-", "+"}
    assert "NULL" in lines[3] and "2024-05-01T12:00:00+00:00" in lines[2]
    assert lines[-1] == "(2 rows, truncated: more rows exist; add a LIMIT)"
    with pytest.raises(BadInput, match="unknown format"):
        format_result(RESULT, "xml")  # type: ignore[arg-type]


def test_jsonable():
    assert jsonable(T0) == "2024-05-01T12:00:00+00:00"
    assert jsonable(dt.date(2024, 1, 2)) == "2024-01-02"
    assert jsonable(b"abc") == {"$bytes": 3}
    assert jsonable(decimal.Decimal("1.25")) == 1.25
    assert jsonable([T0, {"k": b"x", "n": [decimal.Decimal("2")]}]) == \
        ["2024-05-01T12:00:00+00:00", {"k": {"$bytes": 1}, "n": [2.0]}]
    assert jsonable(("k", 1)) == ["k", 1]
    assert jsonable(float("nan")) is None
    json.dumps(jsonable(RESULT.rows))


def test_query_values_are_jsonable_end_to_end(sandbox):
    result = sandbox.query("SELECT i.mtime, t.jpeg, [1.5::DECIMAL(4,2)] AS d, {'a': i.seq} AS s "
                           "FROM images i LEFT JOIN thumbnails t USING (image_id) ORDER BY i.seq LIMIT 1")
    assert jsonable(result.rows) == [["2024-05-01T12:00:00+00:00", None, [1.5], {"a": 0}]]


# -- the sandbox holds nothing writable, and refuses DML anywhere in the statement ------------------

@pytest.fixture
def fresh_lake(tmp_path) -> Lake:
    """A lake of its own (three images, every other table empty) for tests that try to write or
    that make tokens, so the module's shared lake stays as the tests above expect it."""
    lake = Lake.at(tmp_path / "lake")
    commit_rows(lake, "images", [_image(i) for i in range(3)], run_id="r1")
    return lake


@pytest.fixture
def fresh_box(fresh_lake):
    box = SqlSandbox(fresh_lake, Settings(lake=fresh_lake.root, refresh_s=0))
    yield box
    box.close()


CTE_WRITES = [
    "WITH x AS (INSERT INTO imagelake_empty.tags (image_id, tag, source) VALUES ('{id}', 'injected', 'user') "
    "RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (INSERT INTO tags (image_id, tag, source) VALUES ('{id}', 'injected', 'user') RETURNING *) "
    "SELECT count(*) FROM x",
    "WITH x AS (INSERT INTO imagelake_empty.tokens VALUES ('t1', 'create', 'admin', 'evil', 'ab', NULL) "
    "RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (DELETE FROM images RETURNING *) SELECT count(*) FROM x",
    "WITH x AS (UPDATE images SET width = 1 RETURNING *) SELECT count(*) FROM x",
    "SELECT * FROM (WITH y AS (INSERT INTO imagelake_empty.tags (image_id) VALUES ('a') RETURNING *) "
    "SELECT * FROM y)",
]


@pytest.mark.parametrize("sql", CTE_WRITES)
def test_dml_inside_a_select_is_refused_and_writes_nothing(fresh_box, sql):
    with pytest.raises(BadInput, match="only read-only SELECT queries are allowed") as e:
        fresh_box.query(sql.format(id=_image(1)["image_id"]))
    assert not isinstance(e.value, QueryTimeout)
    assert fresh_box.query("SELECT count(*) FROM tags").rows == [(0,)]
    assert fresh_box.query("SELECT count(*), min(width) FROM images").rows == [(3, 640)]


def test_the_sandbox_holds_no_table_at_all(fresh_box):
    """Every name is a view over Parquet files or over a typed zero-row SELECT: nothing to write to."""
    assert fresh_box.query("SELECT count(*) FROM duckdb_tables()").rows == [(0,)]
    views = {r[0] for r in fresh_box.query(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal").rows}
    assert views == set(TABLES) - {"tokens"}
    types = {r[0]: r[1] for r in fresh_box.query("DESCRIBE tags").rows}
    assert types["score"] == "FLOAT" and types["created_at"] == "TIMESTAMP WITH TIME ZONE"


def test_cte_insert_through_the_api_is_a_400_and_the_table_stays_empty(fresh_lake):
    from api import API_PREFIX, create_app
    from lake.tokens import create_token

    app = create_app(Settings(lake=fresh_lake.root, refresh_s=0), {"TESTING": True})
    try:
        client = app.test_client()
        read = {"Authorization": f"Bearer {create_token(fresh_lake, 'read', 'reader')[1]}"}
        for sql in CTE_WRITES:
            response = client.post(f"{API_PREFIX}/sql", json={"sql": sql.format(id=_image(1)["image_id"])},
                                   headers=read)
            assert response.status_code == 400, response.get_data(as_text=True)
            body = response.get_json()
            assert set(body) == {"ok", "error", "status"} and body["ok"] is False and body["status"] == 400
            assert "only read-only SELECT" in body["error"]
        counted = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(*) FROM tags"}, headers=read)
        assert counted.status_code == 200 and counted.get_json()["rows"] == [[0]]
        plain = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT seq FROM images ORDER BY seq"},
                            headers=read)
        assert plain.status_code == 200 and plain.get_json()["rows"] == [[0], [1], [2]]
    finally:
        app.extensions["imagelake"].close()


# -- DuckDB's spill folder: private, capped, and not readable ---------------------------------------

def test_spill_folder_is_private_capped_and_removed_on_close(fresh_lake):
    box = SqlSandbox(fresh_lake, Settings(lake=fresh_lake.root, sql_max_temp_size="123MiB"))
    ((temp, cap),) = box.query("SELECT current_setting('temp_directory'), "
                               "current_setting('max_temp_directory_size')").rows
    assert os.path.isdir(temp) and os.path.isabs(temp)
    assert not temp.startswith(os.getcwd()) and not temp.startswith(fresh_lake.root)
    assert os.stat(temp).st_mode & 0o077 == 0          # only this process's user
    assert cap == "123.0 MiB"
    box.close()
    assert not os.path.exists(temp)


def test_read_text_of_the_spill_folder_or_outside_the_lake_is_refused(fresh_box, fresh_lake, tmp_path):
    ((temp,),) = fresh_box.query("SELECT current_setting('temp_directory')").rows
    planted = os.path.join(temp, "planted.txt")
    with open(planted, "w") as f:
        f.write("spilled secret")
    outside = tmp_path / "outside.txt"
    outside.write_text("outside secret")
    beside = os.path.join(fresh_lake.root, "artifacts-note.txt")
    with open(beside, "w") as f:
        f.write("lake-root secret")
    for path in (planted, str(outside), beside):
        for sql in (f"SELECT content FROM read_text('{path}')", f"SELECT * FROM read_blob('{path}')",
                    f"SELECT * FROM '{path}'", f"SELECT * FROM read_csv('{path}')"):
            with pytest.raises(BadInput, match="file and network access are disabled") as e:
                fresh_box.query(sql)
            assert "secret" not in str(e.value)
    assert fresh_box.query("SELECT count(*) FROM images").rows == [(3,)]


def test_allowed_directories_are_the_served_tables_own_folders(fresh_box, fresh_lake):
    ((allowed,),) = fresh_box.query("SELECT current_setting('allowed_directories')").rows
    tables = {d for d in allowed if d.startswith(fresh_lake.path("tables"))}
    assert tables == {fresh_lake.table_uri(name) + "/" for name in TABLES if name != "tokens"}


# -- the tokens table is not in SQL at all ----------------------------------------------------------

def test_tokens_table_is_hidden_from_sql(fresh_lake):
    from api import API_PREFIX, create_app
    from lake.tokens import create_token

    create_token(fresh_lake, "admin", "root")
    box = SqlSandbox(fresh_lake, Settings(lake=fresh_lake.root))
    try:
        with pytest.raises(BadInput, match="The lake's tables are: images") as e:
            box.query("SELECT * FROM tokens")
        assert "tokens" not in str(e.value).split("The lake's tables are:")[1]
        token_files = [f for f in os.listdir(fresh_lake.table_uri("tokens")) if f.endswith(".parquet")]
        assert token_files
        with pytest.raises(BadInput, match="file and network access are disabled"):
            box.query(f"SELECT * FROM read_parquet('{fresh_lake.table_uri('tokens')}/{token_files[0]}')")
        assert box.query("SELECT count(*) FROM duckdb_views() WHERE view_name = 'tokens'").rows == [(0,)]
    finally:
        box.close()
    app = create_app(Settings(lake=fresh_lake.root, refresh_s=0), {"TESTING": True})
    try:
        for scope in ("read", "admin"):
            headers = {"Authorization": f"Bearer {create_token(fresh_lake, scope, scope)[1]}"}
            response = app.test_client().post(f"{API_PREFIX}/sql", json={"sql": "SELECT * FROM tokens"},
                                              headers=headers)
            assert response.status_code == 400 and "secret_sha256" not in response.get_data(as_text=True)
    finally:
        app.extensions["imagelake"].close()


# -- results are bounded in bytes and in time, serialisation included --------------------------------

BIG = "SELECT repeat('A', 100000) AS a FROM range(2000)"                   # 200 MB of text
SLOW_TO_SERIALISE = ("SELECT l FROM range(3000), (SELECT list_transform(range(1000), "
                     "lambda x: x::DECIMAL(18,3)) AS l)")                 # fast in DuckDB, slow in Python


def test_result_over_sql_max_bytes_is_refused_while_fetching(fresh_lake):
    from lake.errors import TooLarge

    box = SqlSandbox(fresh_lake, Settings(lake=fresh_lake.root, sql_max_bytes=1024 * 1024))
    try:
        started = time.monotonic()
        with pytest.raises(TooLarge, match=r"1\.0 MiB.*sql_max_bytes") as e:
            box.query(BIG, max_rows=10_000)
        assert time.monotonic() - started < 5
        assert e.value.status == 413
        assert len(box.query("SELECT repeat('A', 1000) FROM range(100)").rows) == 100  # small results pass
    finally:
        box.close()


def test_result_over_sql_max_bytes_is_a_413_from_the_api(fresh_lake):
    from api import API_PREFIX, create_app

    app = create_app(Settings(lake=fresh_lake.root, auth=False, sql_max_bytes=1024 * 1024), {"TESTING": True})
    try:
        started = time.monotonic()
        response = app.test_client().post(f"{API_PREFIX}/sql", json={"sql": BIG})
        assert time.monotonic() - started < 5
        assert response.status_code == 413
        body = response.get_json()
        assert set(body) == {"ok", "error", "status"} and body["ok"] is False and body["status"] == 413
        assert "sql_max_bytes" in body["error"] and "1.0 MiB" in body["error"]
    finally:
        app.extensions["imagelake"].close()


def test_json_bytes_count_against_sql_max_bytes(fresh_lake):
    """Arrow's size can be far below the JSON's (one byte of int8 -> up to 5 characters): the cap
    holds for the bytes the API sends."""
    from api import API_PREFIX, create_app

    app = create_app(Settings(lake=fresh_lake.root, auth=False, sql_max_bytes=200_000), {"TESTING": True})
    try:
        sql = "SELECT list_transform(range(1000), lambda x: (-100)::TINYINT) AS l FROM range(100)"
        response = app.test_client().post(f"{API_PREFIX}/sql", json={"sql": sql})
        assert response.status_code == 413, response.get_data(as_text=True)[:300]
        ok = app.test_client().post(f"{API_PREFIX}/sql", json={"sql": sql.replace("range(100)", "range(10)")})
        assert ok.status_code == 200 and len(ok.get_data()) <= 200_000 and len(ok.get_json()["rows"]) == 10
    finally:
        app.extensions["imagelake"].close()


def test_time_spent_converting_rows_counts_in_the_time_limit(fresh_lake):
    box = SqlSandbox(fresh_lake, Settings(lake=fresh_lake.root, sql_max_bytes=1 << 30))
    try:
        started = time.monotonic()
        with pytest.raises(QueryTimeout, match="ran past the 1 s limit"):
            box.query(SLOW_TO_SERIALISE, timeout_s=1.0, max_rows=10_000)
        assert time.monotonic() - started < 5   # converting every row takes ~15 s
    finally:
        box.close()


def test_serialisation_past_the_time_limit_is_the_timeout_error_from_the_api(fresh_lake):
    from api import API_PREFIX, create_app

    app = create_app(Settings(lake=fresh_lake.root, auth=False, sql_timeout_s=1.0, sql_max_bytes=1 << 30),
                     {"TESTING": True})
    try:
        started = time.monotonic()
        response = app.test_client().post(f"{API_PREFIX}/sql", json={"sql": SLOW_TO_SERIALISE})
        assert time.monotonic() - started < 5
        assert response.status_code == 400, response.get_data(as_text=True)[:300]
        body = response.get_json()
        assert set(body) == {"ok", "error", "status"} and "ran past the 1 s limit" in body["error"]
    finally:
        app.extensions["imagelake"].close()


@pytest.mark.parametrize("sql, says", [
    ("SELECT * FROM query('SELECT 1')", "table function query() is not available"),
    ("SELECT * FROM query_table('images')", "table function query_table() is not available"),
    ("SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
     "table function json_execute_serialized_sql() is not available"),
    ("SELECT json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
     "function json_execute_serialized_sql() is not available"),
    ("SELECT * FROM checkpoint()", "table function checkpoint() is not available"),
    ("SELECT force_checkpoint()", "function force_checkpoint() is not available"),
    ("SELECT * FROM glob('*')", "file and network access are disabled"),
    ("SUMMARIZE '/etc/passwd'", "file and network access are disabled"),
    ("DESCRIBE SELECT * FROM read_text('/etc/passwd')", "file and network access are disabled"),
    ("SELECT (SELECT content FROM read_text('/etc/passwd'))", "file and network access are disabled"),
    ("SELECT * FROM images WHERE uri IN (SELECT content FROM read_text('/etc/hostname'))",
     "file and network access are disabled"),
])
def test_the_statement_tree_is_checked_everywhere(fresh_box, sql, says):
    with pytest.raises(BadInput, match=re.escape(says)):
        fresh_box.query(sql)


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM range(10)", "SELECT * FROM generate_series(1, 3)", "SELECT unnest([1, 2])",
    "SELECT * FROM unnest([1, 2])", "SELECT count(*) FROM duckdb_columns()",
    "SELECT * FROM pragma_table_info('images')", "SELECT * FROM json_each('{\"a\": 1}')",
    "SUMMARIZE images", "DESCRIBE images", "SHOW TABLES", "FROM images LIMIT 1",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT seq FROM images UNION ALL SELECT seq FROM images EXCEPT SELECT 99",
    "WITH a AS MATERIALIZED (SELECT 1 AS x) SELECT * FROM a, images",
    "SELECT 'a/b:c' AS path, json_serialize_sql('SELECT 1') IS NOT NULL",
])
def test_read_only_queries_pass_the_tree_check(fresh_box, sql):
    assert fresh_box.query(sql).columns


def test_cli_sql_refuses_a_cte_insert_and_an_oversized_result_with_exit_2(fresh_lake, capsys, monkeypatch):
    from imagelake.cli import main

    cte = CTE_WRITES[0].format(id=_image(1)["image_id"])
    assert main(["--lake", fresh_lake.root, "sql", cte]) == 2
    assert "only read-only SELECT" in capsys.readouterr().err
    monkeypatch.setenv("IMAGELAKE_SQL_MAX_BYTES", str(1024 * 1024))
    assert main(["--lake", fresh_lake.root, "sql", BIG]) == 2
    assert "sql_max_bytes" in capsys.readouterr().err
    assert main(["--lake", fresh_lake.root, "sql", "SELECT count(*) AS n FROM tags", "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n0\n"
