"""Adding columns to tables made by an older imagelake: new catalog columns are nullable, so a
table created before they existed gets them with ``ALTER TABLE ... ADD COLUMNS`` (old rows read
as null) instead of failing its next append with a schema mismatch.

Jobs upgrade the tables they write; ``imagelake migrate`` (run by ``imagelake serve`` before its
workers start) upgrades every table, so read paths never alter a table.
"""

from __future__ import annotations

import pyarrow as pa
from deltalake import Field

from lake.catalog import Lake, table_spec
from lake.commit import open_table
from lake.lock import LakeLock

__all__ = ["upgrade_lake", "upgrade_table"]


def upgrade_table(lake: Lake, name: str) -> list[str]:
    """Add the catalog's columns that table ``name`` lacks; returns their names (empty: up to date)."""
    spec = table_spec(name)
    have = set(pa.schema(open_table(lake, name).schema()).names)
    missing = [f for f in spec.schema if f.name not in have]
    if not missing:
        return []
    with LakeLock(lake, "commit", timeout=600, holder=f"upgrade {name}"):
        table = open_table(lake, name)
        have = set(pa.schema(table.schema()).names)
        missing = [f for f in spec.schema if f.name not in have]
        if missing:
            table.alter.add_columns([Field.from_arrow(f) for f in missing])
    return [f.name for f in missing]


def upgrade_lake(lake: Lake) -> dict[str, list[str]]:
    """:func:`upgrade_table` for every catalog table the lake has; ``{table: added columns}`` for
    the tables that changed. Tables that do not exist yet are left alone (they are created with
    the current schema when first written)."""
    from deltalake import DeltaTable

    from lake.catalog import TABLES
    from lake.remote import delta_options

    added = {}
    for name in TABLES:
        if DeltaTable.is_deltatable(lake.table_uri(name), storage_options=delta_options(lake)):
            columns = upgrade_table(lake, name)
            if columns:
                added[name] = columns
    return added

