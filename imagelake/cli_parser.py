"""The ``imagelake`` command line's grammar: every command, flag and default, in one place.

The README's "Command line" section mirrors this parser; ``imagelake COMMAND --help`` prints it.
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagelake", description="An image-collection lakehouse.")
    p.add_argument("--lake", help="lake root: a path or URI (default ./lakehouse; setting 'lake')")
    p.add_argument("--master", help="Spark master URL (default local[*]; setting 'master')")
    p.add_argument("--runner", choices=["spark", "local"], help="run partitions on Spark (default) or in process")
    p.add_argument("--config", help="a TOML settings file (default ./imagelake.toml if present)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ingest", help="add new image files to the lake (incremental)")
    s.add_argument("--images", required=True, metavar="SRC", help="a folder, a list file of paths/URIs, or a URI prefix")
    s.add_argument("--collection", help="collection name (default: the folder's name)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("embed", help="extract features for images that lack them")
    s.add_argument("--model", default="efficientnet-lite0", help="model name from the registry")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="what embedding computes in, part of the features key (auto: fp32 on CPU and on "
                        "a cluster, bf16/fp16 on a local GPU or with --device cuda)")
    s.add_argument("--runtime", default="auto", metavar="NAME",
                   help="CPU runtime: auto (the fastest that passes the quality gate, measured once per machine "
                        "and model) or one of ort-fp32, ort-int8, openvino-fp32, openvino-bf16, openvino-int8, "
                        "torch-bf16, torch-fp32")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--import", dest="import_file", metavar="FILE",
                   help="import your own embeddings (.parquet, .npz, .npy) under --model NAME@VERSION instead of computing them")
    s.add_argument("--key", choices=["image_id", "uri"], help="with --import: the key column (default: the one present)")
    s.add_argument("--keys", metavar="FILE", help="with --import of a .npy: one image id or URI a line, one per row")
    s.add_argument("--dim", type=int, help="with --import: the expected dimension (default: the stored or first row's)")

    s = sub.add_parser("run", help="the whole pipeline, incrementally: ingest, quality, embed, suggest, index, outliers, cluster, tag, grid")
    s.add_argument("--images", metavar="SRC", help="what ingest reads (required when ingest is a step)")
    s.add_argument("--collection", help="collection name for ingest (default: the folder's name)")
    s.add_argument("--steps", metavar="LIST",
                   help="comma-separated steps, run in pipeline order (default: every step, "
                        "ingest,quality,embed,suggest,index,outliers,cluster,tag,grid; one not installed fails the run)")
    s.add_argument("--model", default="efficientnet-lite0", help="embedding model for embed (and the steps after it)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="what embedding computes in, part of the features key (auto: fp32 on CPU and on "
                        "a cluster, bf16/fp16 on a local GPU or with --device cuda)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("cluster", help="near-duplicate groups and topic clusters")
    s.add_argument("--sim", type=float, help="near-duplicate threshold 0..1, 1 = identical only (default: setting dup_sim)")
    s.add_argument("--levels", help="topic cut levels as numbers of clusters, e.g. 10,40 (default k, k/4, k/16, ...)")
    s.add_argument("--k", type=int, help="k-means k (default: setting topic_k, else round(sqrt(n/2)))")
    s.add_argument("--recluster", action="store_true", help="fit new topic clusters over all images")
    s.add_argument("--full", action="store_true",
                   help="recompute every image's duplicate descriptor and pairs (default: only the new images')")
    s.add_argument("--model", help="features model key (default: the one with most rows)")
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("tag", help="concept tags for new images; retrain and apply the learned-tag model")
    s.add_argument("--model", help="features model key (default: the one with most rows)")

    s = sub.add_parser("export", help="write a folder of symlinks to a cluster's (or bucket's) images")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--cluster", metavar="ID", help="a cluster id (see GET /clusters or the clusters table)")
    g.add_argument("--bucket", metavar="ID", help="a bucket id")
    s.add_argument("--to", required=True, metavar="DIR", help="folder to create (must be empty or absent); "
                                                              "for --format csv|parquet the manifest file to write")
    point = s.add_mutually_exclusive_group()
    point.add_argument("--as-of", metavar="TIMESTAMP", help="--bucket: its members as of this ISO 8601 time "
                                                           "(Delta time travel of bucket_events)")
    point.add_argument("--version", metavar="N", help="--bucket: its members at this version of bucket_events")
    s.add_argument("--format", choices=("folder", "csv", "parquet", "imagefolder"), default="folder",
                   help="--bucket: folder (symlinks + manifest.csv, default), csv or parquet (the manifest), "
                        "imagefolder (<label>/ copies + metadata.csv)")

    s = sub.add_parser("grid", help="lay out the collection on a zoomable grid map (layout, quality, tiles)")
    s.add_argument("--where", metavar="SQL", help="only images matching this predicate over images columns, "
                                                  "e.g. \"collection = 'cats'\" (default: all with features)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same data and seed -> same layout (default 0)")
    s.add_argument("--layout-id", metavar="ID", help="id of the new layout (default: the run id)")
    s.add_argument("--model", help="features of this model key (default: the one with most features)")
    s.add_argument("--full", action="store_true", help="lay every image out anew, even when the new ones "
                                                       "fit into the newest layout's free cells")

    s = sub.add_parser("index", help="build or update the similarity index (FAISS IVF-PQ shards)")
    s.add_argument("--model", help="model name or name@version key (default: the model with the most features)")
    s.add_argument("--rebuild", action="store_true", help="retrain and re-encode everything (a full build)")
    s.add_argument("--memory-budget", type=int, metavar="MB",
                   help="resident budget of the PQ codes in MiB (default: setting index_memory_mb)")
    s.add_argument("--shard-size", type=int, metavar="N", help="vectors per shard (default: setting index_shard_size)")
    s.add_argument("--opq", action="store_true", help="add an OPQ rotation before IVF-PQ (slower to train)")
    s.add_argument("--factory", help="an explicit FAISS index_factory string (experts; overrides the rule)")
    s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("sql", help="run one read-only SELECT over the lake's tables")
    s.add_argument("query", metavar="SQL")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.add_argument("--max-rows", type=int, help="row cap (default: setting sql_max_rows)")

    s = sub.add_parser("status", help="tables, versions, row counts and the last runs")
    s.add_argument("--format", choices=["table", "json"], default="table")

    s = sub.add_parser("serve", help="serve the API and dashboard with gunicorn")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--workers", type=int, help="worker processes (default 2)")

    sub.add_parser("migrate", help="add the columns this version's catalog has to tables an older one made")

    s = sub.add_parser("janitor", help="remove staging leftovers and orphaned data files; VACUUM the tables")
    s.add_argument("--older-than", type=float, metavar="HOURS",
                   help="age after which unfinished runs' files go (default: setting staging_retention_h)")
    s.add_argument("--vacuum-retention", type=int, metavar="HOURS",
                   help="VACUUM table files removed over HOURS ago; versions younger stay readable "
                        "(default: setting vacuum_retention_h)")

    s = sub.add_parser("demo", help="build a demo lake from bundled images and serve it")
    s.add_argument("--data", default="./demo-data", help="where the demo images are written")
    s.add_argument("--fashion-mnist", type=int, default=5000, metavar="N",
                   help="how many Fashion-MNIST images to include when the Debian package is present (0: none)")
    s.add_argument("--host", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8000)")
    s.add_argument("--no-serve", action="store_true", help="build the lake and exit")

    s = sub.add_parser("token", help="create, list or revoke API tokens")
    tsub = s.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="create a token and print it (shown once)")
    t.add_argument("--scope", choices=["read", "curate", "admin"], required=True)
    t.add_argument("--name", default="", help="who or what the token is for")
    tsub.add_parser("list", help="list tokens (ids, names, scopes; never secrets)")
    t = tsub.add_parser("revoke", help="revoke a token by id")
    t.add_argument("token_id")

    s = sub.add_parser("metadata", help="import your own per-image metadata; list its columns")
    msub = s.add_subparsers(dest="metadata_command", required=True, metavar="ACTION")
    m = msub.add_parser("import", help="import a CSV, JSON-lines or Parquet file (upsert on image_id)")
    m.add_argument("file", metavar="FILE")
    m.add_argument("--key", required=True, choices=["filename", "uri", "image_id"],
                   help="how a row names its image: file name (with or without extension), URI, or image id")
    m.add_argument("--key-column", metavar="COL", help="the column holding the key (default: by --key, e.g. "
                   "filename, file_name, file, id, name for filename)")
    m.add_argument("--collection", metavar="NAME", help="match only images of this collection")
    m.add_argument("--type", action="append", default=[], metavar="COL=TYPE",
                   help="override a column's type: string, int, float, bool, date, timestamp, list<TYPE> (repeatable)")
    m.add_argument("--list", action="append", default=[], metavar="COL",
                   help="a CSV column whose cells are lists separated by --list-sep (repeatable)")
    m.add_argument("--list-sep", default=";", metavar="SEP", help="separator of --list cells (default ;)")
    m.add_argument("--format", choices=["csv", "jsonl", "parquet"], help="the file's format (default: by extension)")
    m = msub.add_parser("columns", help="the metadata table's columns, types and filled counts")
    m.add_argument("--format", choices=["table", "json"], default="table")

    sub.add_parser("settings", help="print the effective settings and where they came from")
    return p
