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

from lake.catalog import Lake
from lake.errors import BadInput, ImagelakeError, LockHeld, NotFound
from lake.settings import Settings, load_settings

__all__ = ["main", "build_parser"]


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
    s.add_argument("--no-progress", action="store_true")

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

    s = sub.add_parser("janitor", help="remove staging leftovers and orphaned data files")
    s.add_argument("--older-than", type=float, metavar="HOURS",
                   help="age after which unfinished runs' files go (default: setting staging_retention_h)")

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

    sub.add_parser("settings", help="print the effective settings and where they came from")
    return p


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
    try:
        from jobs.embed.driver import run_embed
    except ImportError as e:
        raise BadInput(f"embedding needs the 'embed' extra (pip install 'imagelake[embed]'): {e}") from None
    summary = run_embed(lake, settings, model=args.model, device=args.device,
                        progress=not args.no_progress and sys.stderr.isatty())
    print(embed_line(summary))
    return 0


def embed_line(summary: dict[str, Any]) -> str:
    return (f"embed {summary['run_id']}: {summary['embedded']} images embedded with {summary['model']}, "
            f"{summary['rejected']} rejected, in {summary['seconds']:.1f} s "
            f"({summary.get('images_per_s') or 0:.0f} img/s)")


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
            + (f" ({summary['reason']})" if summary["action"] == "full" else ""))


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

    status = lake_status(lake)
    print(json.dumps(status, default=str, indent=2) if args.format == "json" else render_status(status))
    return 0


def _cmd_serve(args, settings: Settings, lake: Lake) -> int:
    from imagelake.serve import serve

    serve(settings)
    return 0


def _cmd_janitor(args, settings: Settings, lake: Lake) -> int:
    from lake.janitor import clean

    hours = settings.staging_retention_h if args.older_than is None else args.older_than
    print(clean(lake, hours).line())
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


def _cmd_settings(args, settings: Settings, lake: Lake) -> int:
    print(json.dumps({"settings": settings.to_dict(), "sources": list(settings.sources)}, indent=2, default=list))
    return 0


_COMMANDS = {
    "ingest": _cmd_ingest, "embed": _cmd_embed, "index": _cmd_index, "sql": _cmd_sql, "status": _cmd_status, "serve": _cmd_serve,
    "janitor": _cmd_janitor, "demo": _cmd_demo, "token": _cmd_token, "settings": _cmd_settings,
}


def _exit_code(e: ImagelakeError) -> int:
    if isinstance(e, LockHeld):
        return 3
    if isinstance(e, (BadInput, NotFound)) or 400 <= e.status < 500:
        return 2
    return 1


def _spark_message(e: Exception) -> str | None:
    name = type(e).__name__
    if "Py4J" in name or "Spark" in name or "Analysis" in name:
        first = next((line for line in str(e).splitlines() if line.strip()), name)
        return f"the Spark job failed: {first.strip()[:500]}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        for noisy in ("py4j", "pyspark"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        lake = Lake.at(settings.lake)
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
        msg = _spark_message(e)
        if msg is None or args.debug:
            raise
        print(f"imagelake: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
