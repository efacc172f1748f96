"""Storage layer: table catalog and schemas, staged writes, idempotent Delta commits, locks, SQL."""
