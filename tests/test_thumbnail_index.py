"""The thumbnail point-lookup index against a real ingested lake: same bytes as a SQL lookup, new
files indexed incrementally, a compacted table re-indexed, misses and prefix collisions."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from conftest import write_images
from jobs.ingest.driver import run_ingest
from lake.settings import Settings
from lake.thumbnail_index import ThumbnailIndex, id_prefixes


def _sql_lookup(uri: str) -> dict[tuple[str, int], bytes]:
    con = duckdb.connect()
    con.register("t", DeltaTable(uri).to_pyarrow_dataset())
    return {(i, s): bytes(j) for i, s, j in con.sql("SELECT image_id, size, jpeg FROM t").fetchall()}


@pytest.fixture
def ingested(lake, tmp_path):
    settings = Settings(lake=lake.root, runner="local", partition_files=5)
    write_images(tmp_path / "a", 17)
    run_ingest(lake, settings, str(tmp_path / "a"))
    return lake, settings


def test_lookups_match_sql_across_files_then_new_files_are_added_incrementally(ingested, tmp_path):
    lake, settings = ingested
    uri = lake.table_uri("thumbnails")
    files = DeltaTable(uri).file_uris()
    assert len(files) >= 4  # 17 images in partitions of 5: several files, each spanning the id range
    index = ThumbnailIndex()
    expected = _sql_lookup(uri)
    assert index.update(files) == len(expected) == 17 * len(settings.thumbnail_sizes)
    assert all(index.get(i, s) == jpeg for (i, s), jpeg in expected.items())
    assert index.update(files) == 0

    write_images(tmp_path / "b", 6, start=100)
    run_ingest(lake, settings, str(tmp_path / "b"))
    grown = DeltaTable(uri).file_uris()
    assert index.update(grown) == 6 * len(settings.thumbnail_sizes)  # only the new files are read
    assert all(index.get(i, s) == jpeg for (i, s), jpeg in _sql_lookup(uri).items())


def test_misses_and_collisions_and_a_compacted_table(ingested):
    lake, settings = ingested
    uri = lake.table_uri("thumbnails")
    index = ThumbnailIndex()
    index.update(DeltaTable(uri).file_uris())
    some_id = next(iter(_sql_lookup(uri)))[0]
    assert index.get(some_id, 999) is None                          # a size that was not made
    assert index.get("0" * 64, 64) is None                          # an unknown id
    twin = some_id[:16] + ("0" if some_id[16] != "0" else "1") + some_id[17:]
    assert index.get(twin, settings.thumbnail_sizes[0]) is None     # same 64-bit prefix, other id

    DeltaTable(uri).optimize.compact()                               # every file replaced by one
    compacted = DeltaTable(uri).file_uris()
    assert len(compacted) == 1
    assert index.update(compacted) == 17 * len(settings.thumbnail_sizes)  # started over
    assert all(index.get(i, s) == jpeg for (i, s), jpeg in _sql_lookup(uri).items())


def test_id_prefixes_reads_the_first_16_hex_digits():
    ids = pa.array(["00000000000000ff" + "0" * 48, "FFFFFFFFFFFFFFFF" + "a" * 48, "abc", ""])
    assert id_prefixes(ids).tolist() == [255, 2**64 - 1, 0, 0]
    assert id_prefixes(pa.chunked_array([ids.slice(1, 1)])).tolist() == [2**64 - 1]


def test_a_shared_artifact_is_built_once_and_mapped_by_other_processes(ingested, tmp_path):
    import numpy as np

    lake, settings = ingested
    uri = lake.table_uri("thumbnails")
    shared = str(tmp_path / "artifacts" / "thumbnail_index")
    first = ThumbnailIndex(artifact_dir=shared)
    files = DeltaTable(uri).file_uris()
    assert first.update(files) == 17 * len(settings.thumbnail_sizes)
    assert first.mapped is not None and isinstance(first._keys, np.memmap)  # re-mapped after writing
    second = ThumbnailIndex(artifact_dir=shared)                     # another worker: maps, reads no data file
    assert second.update(files) == 17 * len(settings.thumbnail_sizes) and second.mapped == first.mapped
    expected = _sql_lookup(uri)
    assert all(second.get(i, s) == jpeg for (i, s), jpeg in expected.items())
    for round_ in range(4):                                          # new versions: new folders, the newest kept
        write_images(tmp_path / f"n{round_}", 2, start=200 + 10 * round_)
        run_ingest(lake, settings, str(tmp_path / f"n{round_}"))
        assert first.update(DeltaTable(uri).file_uris()) == 2 * len(settings.thumbnail_sizes)
    import os
    assert len([e for e in os.listdir(shared) if not e.startswith(".")]) == 3
    late = ThumbnailIndex(artifact_dir=shared)
    late.update(DeltaTable(uri).file_uris())
    assert late.mapped == first.mapped
    assert all(late.get(i, s) == jpeg for (i, s), jpeg in _sql_lookup(uri).items())
