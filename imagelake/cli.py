"""``imagelake`` — the one console script in front of every layer.

User mistakes end with one line on stderr (``imagelake: error: ...``) and a non-zero exit code;
only ``--debug`` shows tracebacks for them. Exit codes: 0 ok, 1 failure, 2 bad input or not
found, 3 another run holds the lake's lock, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from imagelake.cli_parser import build_parser
from lake.catalog import Lake
from lake.errors import BadInput, ImagelakeError, LockHeld, NotFound
from lake.settings import Settings, load_settings

__all__ = ["main", "build_parser"]


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"lake": args.lake, "master": args.master, "runner": args.runner}
    for name in ("host", "port", "workers"):
        overrides[name] = getattr(args, name, None)
    return load_settings(config=args.config, overrides=overrides)


def _cmd_ingest(args, settings: Settings, lake: Lake) -> int:
    from jobs.ingest.driver import run_ingest

    summary = run_ingest(lake, settings, args.images, collection=args.collection,
                         progress=not args.no_progress and sys.stderr.isatty())
    print(summary.line())
    return 0


def _cmd_embed(args, settings: Settings, lake: Lake) -> int:
    if args.import_file:
        from jobs.embed.importer import import_embeddings

        result = import_embeddings(lake, settings, args.import_file, args.model, key=args.key, keys_file=args.keys,
                                   dim=args.dim)
        print("\n".join(result.lines()))
        return 0
    if args.key or args.keys or args.dim is not None:
        raise BadInput("--key, --keys and --dim go with --import FILE")
    try:
        from jobs.embed.driver import run_embed
    except ImportError as e:
        raise BadInput(f"embedding needs the 'embed' extra (pip install 'imagelake[embed]'): {e}") from None
    summary = run_embed(lake, settings, model=args.model, device=args.device, precision=args.precision,
                        runtime=args.runtime, progress=not args.no_progress and sys.stderr.isatty())
    print(embed_line(summary))
    return 0


def embed_line(summary: dict[str, Any]) -> str:
    return (f"embed {summary['run_id']}: {summary['embedded']} images embedded with {summary['model']}, "
            f"{summary['rejected']} rejected, in {summary['seconds']:.1f} s "
            f"({summary.get('images_per_s') or 0:.0f} img/s)")


def _cmd_run(args, settings: Settings, lake: Lake) -> int:
    from jobs.pipeline import PipelineRequest, parse_steps, run_pipeline

    request = PipelineRequest(images=args.images, collection=args.collection, model=args.model,
                              device=args.device, precision=args.precision,
                              steps=None if args.steps is None else parse_steps(args.steps))
    summary = run_pipeline(lake, settings, request, progress=not args.no_progress and sys.stderr.isatty())
    print(summary.line())
    return 0


def _cmd_cluster(args, settings: Settings, lake: Lake) -> int:
    from jobs.cluster import check_sim, run_cluster

    sim = check_sim(args.sim) if args.sim is not None else None
    levels = None
    if args.levels:
        try:
            levels = [int(v) for v in args.levels.split(",") if v.strip()]
        except ValueError:
            raise BadInput(f"--levels must be numbers of clusters like 10,40, got {args.levels!r}") from None
    s = run_cluster(lake, settings, sim=sim, levels=levels, k=args.k, recluster=args.recluster, model=args.model,
                    full=args.full, progress=not args.no_progress and sys.stderr.isatty())
    topic = (f"fitted k={s['k']} levels {s['levels']}" if s["topic_fitted"]
             else f"{s['topic_assigned']} new images assigned to {s['topic_model']}")
    dups = "all images" if s["dup_mode"] == "full" else f"incremental: {s['dup_new']} new images"
    print(f"cluster {s['run_id']}: {s['images']} images, {s['dup_groups']} near-duplicate groups "
          f"({s['dup_images']} images) at sim {s['sim']} ({dups}); topics {topic}; {s['seconds']:.1f} s")
    return 0


def _cmd_tag(args, settings: Settings, lake: Lake) -> int:
    from jobs.tag import run_tag

    s = run_tag(lake, settings, model=args.model)
    learned = (f"model v{s['learned_model']} ({s['learned_classes']} tags) gave {s['learned_tags']} learned tags"
               if s["learned_model"] else "no user tags yet, no learned tags")
    print(f"tag {s['run_id']}: {s['concept_tags']} concept tags for {s['concept_images']} new images; {learned}; "
          f"{s['seconds']:.1f} s")
    return 0


def _cmd_export(args, settings: Settings, lake: Lake) -> int:
    from jobs.cluster.export import export_bucket, export_cluster

    if args.bucket and (args.as_of or args.version is not None or args.format != "folder"):
        return _export_bucket_at(args, lake)
    if args.cluster and (args.as_of or args.version is not None or args.format != "folder"):
        raise BadInput("--as-of, --version and --format are for --bucket; a cluster exports as a folder")
    result = export_cluster(lake, args.cluster, args.to) if args.cluster else export_bucket(lake, args.bucket, args.to)
    print(f"exported {result['links']} images to {result['to']}")
    return 0


def _export_bucket_at(args, lake: Lake) -> int:
    from lake.bucket_export import manifest, parse_point, snapshot, write_folder

    snap = snapshot(lake, args.bucket, parse_point(args.version, args.as_of))
    result = write_folder(manifest(lake, snap), args.to, args.format)
    print(f"exported {result['images']} images of bucket {args.bucket} ({snap.bucket.get('name')!r}, "
          f"bucket_events version {snap.log_version}) to {result['to']} as {args.format}")
    return 0


def _cmd_grid(args, settings: Settings, lake: Lake) -> int:
    try:
        from jobs.grid.driver import grid_line, run_grid
    except ImportError as e:
        raise BadInput(f"the grid job needs the 'grid' extra (pip install 'imagelake[grid]'): {e}") from None
    summary = run_grid(lake, settings, where=args.where, seed=args.seed, layout_id=args.layout_id,
                       model=args.model, full=args.full)
    print(grid_line(summary))
    return 0


def _cmd_index(args, settings: Settings, lake: Lake) -> int:
    try:
        from jobs.index.driver import run_index
    except ImportError as e:
        raise BadInput(f"indexing needs the 'index' extra (pip install 'imagelake[index]'): {e}") from None
    summary = run_index(lake, settings, model=args.model, rebuild=args.rebuild, memory_budget_mb=args.memory_budget,
                        shard_size=args.shard_size, opq=args.opq, factory=args.factory,
                        progress=not args.no_progress and sys.stderr.isatty())
    print(index_line(summary))
    return 0


def index_line(summary: dict[str, Any]) -> str:
    if summary["action"] == "up_to_date":
        return f"index {summary['run_id']}: build {summary['build_id']} is up to date ({summary['ntotal']} vectors)"
    what = "full build" if summary["action"] == "full" else f"incremental build (+{summary['delta']} vectors)"
    return (f"index {summary['run_id']}: {what} {summary['build_id']} published: {summary['factory']}, "
            f"{summary['ntotal']} vectors in {summary['shards']} shard(s), {summary['seconds']:.1f} s"
            + (f" ({summary['reason']})" if summary["action"] == "full" else "")
            + (f"; read {summary['read_s']} s, train {summary['train_s']} s, encode {summary['encode_s']} s"
               if "train_s" in summary else ""))


def _cmd_sql(args, settings: Settings, lake: Lake) -> int:
    from lake.sql import SqlSandbox, format_result

    sandbox = SqlSandbox(lake, settings)
    try:
        result = sandbox.query(args.query, max_rows=args.max_rows)
    finally:
        sandbox.close()
    sys.stdout.write(format_result(result, args.format))
    if result.truncated and args.format == "table":
        print(f"(truncated at {len(result.rows)} rows; use --max-rows or a LIMIT)", file=sys.stderr)
    return 0


def _cmd_status(args, settings: Settings, lake: Lake) -> int:
    from imagelake.status import render_status
    from lake.status import lake_status

    status = lake_status(lake, abandon_after_h=settings.run_abandon_h)
    print(json.dumps(status, default=str, indent=2) if args.format == "json" else render_status(status))
    return 0


def _cmd_serve(args, settings: Settings, lake: Lake) -> int:
    from imagelake.serve import serve

    if not _migrate_in_child(lake):
        return 1
    serve(settings)
    return 0


def _migrate_in_child(lake: Lake) -> bool:
    """``imagelake migrate`` in a child process: deltalake's runtime must not be forked, and the
    server forks its workers. Read paths then never need to alter a table."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "imagelake", "--lake", lake.root, "migrate"]) == 0


def _cmd_migrate(args, settings: Settings, lake: Lake) -> int:
    from lake.migrate import upgrade_lake

    added = upgrade_lake(lake)
    for table, columns in added.items():
        print(f"{table}: added {', '.join(columns)}")
    if not added:
        print("every table is up to date")
    return 0


def _cmd_janitor(args, settings: Settings, lake: Lake) -> int:
    from lake.janitor import clean

    hours = settings.staging_retention_h if args.older_than is None else args.older_than
    vacuum = settings.vacuum_retention_h if args.vacuum_retention is None else args.vacuum_retention
    if vacuum < 0:
        raise BadInput(f"--vacuum-retention must be 0 or more hours, got {vacuum}")
    print(clean(lake, hours, vacuum_retention_h=vacuum).line())
    return 0


def _cmd_demo(args, settings: Settings, lake: Lake) -> int:
    if args.no_serve:
        from imagelake.demo import build_demo

        build_demo(lake, settings, data_dir=args.data, fashion_mnist=args.fashion_mnist)
        return 0
    # Build in a child process: deltalake's runtime must not be forked, and the server forks.
    import subprocess

    build = [sys.executable, "-m", "imagelake", "--lake", lake.root, "--master", settings.master,
             "--runner", settings.runner, *(["--config", args.config] if args.config else []),
             "demo", "--no-serve", "--data", args.data, "--fashion-mnist", str(args.fashion_mnist)]
    if subprocess.call(build) != 0:
        return 1
    from imagelake.serve import serve

    print(f"serving the demo lake on http://{settings.host}:{settings.port}/ (Ctrl-C to stop)", file=sys.stderr)
    serve(settings)
    return 0


def _cmd_token(args, settings: Settings, lake: Lake) -> int:
    from lake.tokens import create_token, list_tokens, revoke_token

    if args.token_command == "create":
        token_id, token = create_token(lake.ensure(), args.scope, args.name)
        print(token)
        print(f"token {token_id} ({args.scope}) created; it is shown only now, keep it safe", file=sys.stderr)
    elif args.token_command == "list":
        for t in list_tokens(lake):
            state = f"revoked {t['revoked_at']:%Y-%m-%d %H:%M}" if t["revoked_at"] else "active"
            print(f"{t['token_id']}  {t['scope']:<6}  {state:<24}  {t['name']}")
    else:
        revoke_token(lake, args.token_id)
        print(f"token {args.token_id} revoked")
    return 0


def _cmd_metadata(args, settings: Settings, lake: Lake) -> int:
    from lake.metadata import import_metadata, metadata_columns, parse_type_overrides

    if args.metadata_command == "columns":
        columns = metadata_columns(lake.ensure())
        if args.format == "json":
            print(json.dumps(columns))
        else:
            width = max(len(c["name"]) for c in columns)
            for c in columns:
                print(f"{c['name']:<{width}}  {c['type']:<14}  {c['values']:>9} values{'  (fixed)' if c['fixed'] else ''}")
        return 0
    from jobs.runs import job_run

    types = parse_type_overrides(args.type)
    with job_run(lake.ensure(), "metadata", {k: v for k, v in vars(args).items() if k != "func"},
                 settings=settings) as run:
        summary = import_metadata(lake, args.file, key=args.key, key_column=args.key_column,
                                  collection=args.collection, types=types, lists=args.list,
                                  list_sep=args.list_sep, fmt=args.format, run_id=run.run_id)
        run.rows_in, run.rows_out = summary.rows, summary.imported
        run.metrics.update(inserted=summary.inserted, updated=summary.updated, rejected=summary.rejected,
                           reasons=summary.reasons, new_columns=summary.new_columns)
    print("\n".join(summary.lines()))
    return 0


def _cmd_settings(args, settings: Settings, lake: Lake) -> int:
    print(json.dumps({"settings": settings.to_dict(), "sources": list(settings.sources)}, indent=2, default=list))
    return 0


_COMMANDS = {
    "ingest": _cmd_ingest, "embed": _cmd_embed, "index": _cmd_index, "run": _cmd_run, "cluster": _cmd_cluster,
    "tag": _cmd_tag, "export": _cmd_export, "grid": _cmd_grid, "sql": _cmd_sql, "status": _cmd_status, "serve": _cmd_serve,
    "migrate": _cmd_migrate, "janitor": _cmd_janitor, "demo": _cmd_demo, "token": _cmd_token, "settings": _cmd_settings,
    "metadata": _cmd_metadata,
}


def _exit_code(e: ImagelakeError) -> int:
    from lake.store_errors import StoreUnavailable

    if isinstance(e, LockHeld):
        return 3
    if isinstance(e, (BadInput, NotFound, StoreUnavailable)) or 400 <= e.status < 500:
        return 2
    return 1


#: Commands that do not reach the lake's store before their work starts (or, ``serve``, answer a
#: store outage per request with a 503 instead of refusing to start).
_NO_STORE_PROBE = {"serve", "settings", "demo"}


def _probe_store(lake: Lake) -> None:
    """One listing of ``_locks/`` with the store's bounded timeouts: a missing bucket, refused
    credentials or an unreachable endpoint end the command at once with one line (exit 2), before
    deltalake's own clients retry for minutes and answer with a Rust error chain."""
    from lake.store import LakeStore

    LakeStore.for_lake(lake).list("_locks")


def _spark_message(e: Exception) -> str | None:
    name = type(e).__name__
    if "Py4J" in name or "Spark" in name or "Analysis" in name:
        first = next((line for line in str(e).splitlines() if line.strip()), name)
        return f"the Spark job failed: {first.strip()[:500]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. ``main(argv)`` returns its exit code (for in-process callers and tests);
    ``main()`` — the console script and ``python -m imagelake`` — ends the process with it.

    Why the process ends with ``os._exit``: deltalake reads tables through a pyarrow dataset over a
    Python filesystem object, and Arrow's worker threads drop their last references to it
    asynchronously. When that happens while CPython is finalizing, the worker asks for the GIL,
    CPython (< 3.14) answers with ``pthread_exit``, and the forced unwind through Arrow's
    ``noexcept`` destructor calls ``std::terminate`` ("terminate called without an active
    exception", exit 134) after the command has already printed its result. Every command has
    finished its own work and cleanup (Delta commits are synchronous, runners are closed in
    ``finally``) when it returns, so the CLI flushes its streams and logs and exits without
    finalizing the interpreter.
    """
    if argv is None:
        _exit_process(_main_as_script)
    return _run(argv)


def _main_as_script() -> int:
    try:
        return _run(sys.argv[1:])
    except SystemExit as e:  # argparse's usage errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # --debug and unexpected errors: the traceback, then exit 1
        import traceback

        traceback.print_exc()
        return 1


def _exit_process(command: Any) -> None:
    import os

    code = 1
    try:
        code = command()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to say
                pass
        os._exit(code)


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    root = ""
    try:
        settings = _settings(args)
        root = settings.lake
        logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        for noisy in ("py4j", "pyspark"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from lake.remote import configure

        configure(settings.storage_options, settings.lake)  # deltalake, obstore and pyarrow alike, children too
        lake = Lake.at(settings.lake)
        if not lake.is_local and args.command not in _NO_STORE_PROBE:
            _probe_store(lake)
        return _COMMANDS[args.command](args, settings, lake)
    except ImagelakeError as e:
        if args.debug:
            raise
        print(f"imagelake: error: {e}", file=sys.stderr)
        return _exit_code(e)
    except KeyboardInterrupt:
        print("imagelake: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from lake.store_errors import as_store_unavailable

        store = as_store_unavailable(e, root)
        if store is not None and not args.debug:  # deltalake or pyarrow lost the store mid-command
            print(f"imagelake: error: {store}", file=sys.stderr)
            return 2
        msg = _spark_message(e)
        if msg is None or args.debug:
            raise
        print(f"imagelake: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
