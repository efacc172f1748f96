"""One typed, frozen settings object for every layer.

Load order, later wins: built-in defaults → ``imagelake.toml`` (the working directory's, or the
file named by ``--config`` / ``IMAGELAKE_CONFIG``) → ``IMAGELAKE_<NAME>`` environment variables →
CLI flags. Every setting is declared once in :data:`SETTINGS` with its type, default and help; the
README's settings table is checked against this registry by a test.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lake.errors import BadInput

__all__ = ["Setting", "SETTINGS", "Settings", "load_settings"]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Build it with :func:`load_settings`, change it with ``replace``."""

    lake: str = _opt("./lakehouse", "Lake root: a local path or a deltalake-supported URI.")
    storage_options: dict = field(default_factory=dict, metadata={"help": "Object-store options for an s3:// lake (a TOML table, or JSON in IMAGELAKE_STORAGE_OPTIONS): endpoint, region, allow_http, access_key_id_env, secret_access_key_env, session_token_env, conditional_put, virtual_hosted_style; see Object storage."})
    master: str = _opt("local[*]", "Spark master URL (local[N], spark://host:7077, k8s://..., yarn).")
    runner: str = _opt("spark", "Where partition functions run: 'spark', or 'local' (in-process, tiny data).")
    partition_files: int = _opt(512, "Files per ingest partition (one Spark task, one staged file per table).")
    spark_driver_memory: str = _opt("2g", "spark.driver.memory for the sessions the CLI starts.")
    spark_ui: bool = _opt(False, "Start the Spark web UI (off by default: it needs a free port).")
    max_image_bytes: int = _opt(64 * 1024 * 1024, "Larger files are rejected at ingest (reason too_large).")
    max_image_pixels: int = _opt(100_000_000, "Images with more pixels are rejected (decompression-bomb guard).")
    thumbnail_sizes: tuple = _opt((64, 256), "Longest side in px of the JPEG thumbnails made at ingest.")
    thumbnail_quality: int = _opt(85, "JPEG quality of thumbnails.")
    capture_metadata: bool = _opt(True, "Read capture metadata (EXIF date, camera, lens, exposure, GPS; IPTC/XMP keywords and title) at ingest into the `capture` table.")
    capture_max_block_bytes: int = _opt(1 << 20, "Largest EXIF or XMP block read at ingest; a larger one is skipped (its fields null, issue exif:too_large or xmp:too_large).")
    sql_timeout_s: float = _opt(10.0, "Read-only SQL is interrupted after this many seconds (fetching and encoding the rows included).")
    sql_max_rows: int = _opt(10_000, "Rows one SQL query returns at most; more sets truncated=true.")
    sql_max_bytes: int = _opt(64 * 1024 * 1024, "Largest SQL result in bytes (its Arrow data, and its JSON in the API), counted while fetching; more is refused (HTTP 413).")
    sql_memory_limit: str = _opt("2GB", "DuckDB memory_limit for SQL queries.")
    sql_max_temp_size: str = _opt("1GiB", "DuckDB max_temp_directory_size: disk SQL queries may spill to, in a private temporary folder removed when the sandbox closes.")
    sql_threads: int = _opt(2, "DuckDB threads for SQL queries.")
    host: str = _opt("127.0.0.1", "Address `imagelake serve` binds to.")
    port: int = _opt(8000, "Port `imagelake serve` listens on.")
    workers: int = _opt(2, "Server worker processes for `imagelake serve`.")
    threads: int = _opt(8, "Threads per server worker.")
    upload_max_bytes: int = _opt(20 * 1024 * 1024, "Largest accepted upload in bytes (HTTP 413 above).")
    upload_max_pixels: int = _opt(40_000_000, "Most pixels in an uploaded image (HTTP 413 above).")
    auth: bool = _opt(True, "Require API tokens (read scope for GET, curate for writes); false opens every route (trusted single-user machines only).")
    thumbnail_cache_mb: float = _opt(64.0, "Per-server-process memory for cached thumbnails (they never change); 0 turns the cache off.")
    refresh_s: float = _opt(2.0, "How often the API re-checks table versions for new commits.")
    index_memory_mb: int = _opt(4096, "Resident memory budget of the PQ part of an index (codes + ids); picks the PQ code size.")
    index_shard_size: int = _opt(250_000, "Vectors per index shard (one Spark task each).")
    index_rebuild_fraction: float = _opt(0.2, "`imagelake index` retrains once images embedded since the last full build exceed this fraction of it.")
    search_max_k: int = _opt(100, "Most results one similarity search returns (k above is a 400).")
    search_nprobe: int = _opt(0, "IVF lists probed per query; 0 uses the build's own choice.")
    search_candidates: int = _opt(400, "PQ candidates re-ranked exactly per query (at least 10 x k).")
    search_threads: int = _opt(2, "Threads that search index shards in parallel, per server process.")

    bucket_max_images: int = _opt(1000, "Most image ids one curation request may carry (HTTP 413 above).")
    bucket_writer_hung_s: float = _opt(5.0, "A server worker whose curation action has waited this long with nothing from the node's bucket-log writer (no answer, no push) commits it, and its next ones, itself until the writer answers again; 0: never (wait for the writer, 503 after 60 s).")
    suggest_dims: int = _opt(128, "PCA dimensions of the 8-bit matrix suggestions score (bytes per image).")
    suggest_max_n: int = _opt(200, "Most suggestions (and fast-forward images) one request may ask for.")
    suggest_refresh_s: float = _opt(30.0, "How often a server process checks for new features (a new suggestion matrix).")
    staging_retention_h: float = _opt(24.0, "The janitor keeps staging files of unfinished runs this long.")
    vacuum_retention_h: int = _opt(168, "The janitor's VACUUM deletes table files that commits removed over this many hours ago; versions younger than this stay readable (time travel).")
    dup_sim: float = _opt(0.85, "Near-duplicate threshold for `imagelake cluster`: similarity (0..1, 1 = identical only) of the duplicate descriptor at or above which images are joined into one group.")
    topic_k: int = _opt(0, "Topic clusters (k-means k); 0 picks k from the number of images (round(sqrt(n/2)), 2..4096).")
    cluster_pca_dim: int = _opt(128, "Embeddings are PCA-reduced to this many dimensions for duplicate search and topic k-means (0: no reduction).")
    tag_cum_prob: float = _opt(0.9, "Concept tags: the top ImageNet classes are kept until their cumulative probability reaches this.")
    tag_max_concepts: int = _opt(5, "Concept tags: at most this many per image.")
    tag_min_score: float = _opt(0.5, "Learned tags: posterior probability at or above which a tag is given.")
    tag_pca_dim: int = _opt(0, "Learned tags: embeddings are PCA-reduced to this many dimensions before naive Bayes (0: none).")

    grid_quality_sample: int = _opt(2000, "Cells scored for a layout's neighbourhood-preservation quality (exact kNN over all images for each; 0: skip; all cells when fewer).")
    grid_spare_fraction: float = _opt(0.05, "Share of extra empty cells a full grid layout leaves, spread over the map, for later images: `imagelake grid` places new images into the newest layout's free cells (old cells kept) while they fit, and lays everything out anew once they do not; 0: every run is a full layout.")
    grid_tile_cache: bool = _opt(True, "Keep deep-zoom tiles rendered on first request as files under the layout's tile folder.")
    run_abandon_h: float = _opt(72.0, "A `running` job run whose process cannot be checked from here (another host or container, or a row from an older version) counts as abandoned once this many hours old; 0: never by age. Runs on this host are checked by their process at once.")
    artifact_cache_dir: str = _opt("", "Local folder where server workers keep verified copies of an object-store lake's artifacts (index builds, suggestion matrix, tile packs) to memory-map; empty: $XDG_CACHE_HOME/imagelake/artifacts. Unused for local lakes.")
    artifact_cache_mb: int = _opt(10240, "Size bound of the artifact cache in MiB; least recently used entries are removed above it (the artifacts in use are kept).")
    quality_blur: float = _opt(25.0, "Quality: an image is `blurry` when the variance of the Laplacian of its 256 px grey thumbnail (0..255 levels) is below this.")
    quality_dark: float = _opt(0.15, "Quality: `dark` when the mean grey level (0..1) is below this.")
    quality_bright: float = _opt(0.85, "Quality: `bright` when the mean grey level (0..1) is above this.")
    quality_low_contrast: float = _opt(0.03, "Quality: `low_contrast` when the standard deviation of grey levels (0..1) is below this.")
    quality_low_information: float = _opt(3.0, "Quality: `low_information` when the entropy of the grey histogram (bits, 0..8) is below this.")
    quality_grayscale: float = _opt(0.02, "Quality: `grayscale` when the mean colour saturation (0..1) is below this.")
    quality_odd_aspect: float = _opt(3.0, "Quality: `odd_aspect` when the longer side is more than this many times the shorter.")
    quality_tiny: int = _opt(64, "Quality: `tiny` when the original's shorter side is below this many pixels.")
    outlier_k: int = _opt(10, "Outliers: an image's score is 1 minus its mean cosine similarity to this many nearest neighbours.")
    log_level: str = _opt("WARNING", "Python log level for jobs and the server (DEBUG, INFO, WARNING, ERROR).")
    sources: tuple = field(default=(), compare=False, metadata={"internal": True})

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in SETTINGS}


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str


_TYPES = {"str": str, "int": int, "bool": bool, "float": float, "tuple": tuple, "dict": dict}
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, _TYPES[f.type], f.default if f.default is not dataclasses.MISSING else f.default_factory(),
            f.metadata["help"])
    for f in dataclasses.fields(Settings) if not f.metadata.get("internal")
)
_BY_NAME = {s.name: s for s in SETTINGS}


def _coerce(name: str, value: Any) -> Any:
    if name == "sources":
        return value
    spec = _BY_NAME.get(name)
    if spec is None:
        raise BadInput(f"unknown setting {name!r}; known settings: {', '.join(sorted(_BY_NAME))}")
    if spec.type is dict:
        from lake.remote import check_storage_options

        return check_storage_options(value)
    try:
        if spec.type is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return low in {"1", "true", "yes", "on"}
            return bool(value)
        if spec.type is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in value)
        if spec.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return spec.type(value)
    except (TypeError, ValueError):
        raise BadInput(f"setting {name!r} must be of type {spec.type.__name__}, got {value!r}") from None


def _validate(s: Settings) -> Settings:
    if s.runner not in {"spark", "local"}:
        raise BadInput(f"runner must be 'spark' or 'local', got {s.runner!r}")
    for name in ("partition_files", "max_image_bytes", "max_image_pixels", "sql_max_rows", "workers",
                 "threads", "upload_max_bytes", "upload_max_pixels", "sql_threads", "sql_max_bytes", "index_memory_mb",
                 "index_shard_size", "search_max_k", "search_candidates", "search_threads", "bucket_max_images",
                 "suggest_max_n", "artifact_cache_mb", "capture_max_block_bytes", "outlier_k",
                 "quality_odd_aspect"):
        if getattr(s, name) <= 0:
            raise BadInput(f"setting {name!r} must be positive, got {getattr(s, name)!r}")
    if not s.thumbnail_sizes or any(not 16 <= v <= 1024 for v in s.thumbnail_sizes):
        raise BadInput(f"thumbnail_sizes must be sizes between 16 and 1024 px, got {s.thumbnail_sizes!r}")
    if not 0.0 <= s.dup_sim <= 1.0:
        raise BadInput(f"dup_sim must be between 0 and 1 (1 = identical only), got {s.dup_sim!r}")
    if not 0.0 < s.tag_cum_prob <= 1.0 or not 0.0 <= s.tag_min_score <= 1.0:
        raise BadInput("tag_cum_prob must be in (0, 1] and tag_min_score in [0, 1]")
    for name in ("topic_k", "cluster_pca_dim", "tag_pca_dim"):
        if getattr(s, name) < 0:
            raise BadInput(f"setting {name!r} must be 0 or positive, got {getattr(s, name)!r}")
    if s.tag_max_concepts <= 0:
        raise BadInput("tag_max_concepts must be positive")

    if s.bucket_writer_hung_s < 0:
        raise BadInput(f"bucket_writer_hung_s must be 0 (never write past the node's writer) or positive, got "
                       f"{s.bucket_writer_hung_s!r}")
    if s.search_nprobe < 0:
        raise BadInput(f"search_nprobe must be 0 (the build's choice) or positive, got {s.search_nprobe!r}")
    if not 0 < s.index_rebuild_fraction <= 10:
        raise BadInput(f"index_rebuild_fraction must be in (0, 10], got {s.index_rebuild_fraction!r}")

    if not 8 <= s.suggest_dims <= 1024:
        raise BadInput(f"suggest_dims must be between 8 and 1024, got {s.suggest_dims!r}")
    if s.sql_timeout_s <= 0:
        raise BadInput("sql_timeout_s must be positive")
    if s.vacuum_retention_h < 0:
        raise BadInput(f"vacuum_retention_h must be 0 or more hours, got {s.vacuum_retention_h!r}")
    if s.grid_quality_sample < 0:
        raise BadInput(f"grid_quality_sample must be 0 or more, got {s.grid_quality_sample!r}")
    if not 0 <= s.grid_spare_fraction <= 1:
        raise BadInput(f"grid_spare_fraction must be in [0, 1], got {s.grid_spare_fraction!r}")
    return s


def load_settings(
    config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults → TOML file → ``IMAGELAKE_*`` environment → ``overrides`` (CLI flags; ``None`` values skipped).

    Raises:
        BadInput: an unknown key, a value of the wrong type, or a missing/invalid config file.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: list[str] = ["defaults"]

    path = config or env.get("IMAGELAKE_CONFIG")
    if path is None and Path("imagelake.toml").is_file():
        path = "imagelake.toml"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BadInput(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"config file {str(p)!r} is not valid TOML: {e}") from None
        data = data.get("imagelake", data)
        for k, v in data.items():
            values[k] = _coerce(k, v)
        sources.append(str(p))

    for s in SETTINGS:
        key = f"IMAGELAKE_{s.name.upper()}"
        if key in env:
            values[s.name] = _coerce(s.name, env[key])
            sources.append(key)

    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = _coerce(k, v)
            sources.append(f"--{k}")

    return _validate(Settings(**values, sources=tuple(sources)))
