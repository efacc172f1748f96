"""Ingest: list, hash, validate, thumbnail, reject bad input; incremental."""
