"""The pipeline's ``suggest`` step: build the compact suggestion matrix right after embedding.

Without it the first suggestion request after an embed run builds the matrix (a PCA fit over every
vector, seconds at 70k, minutes at 1M) while a curator waits. With it, a server process only maps
the finished build (:func:`lake.compact.ensure_compact`), and the curation view's first load costs
what every later one does. Incremental: a re-run on an unchanged ``features`` version finds the
build and does nothing.
"""

from __future__ import annotations

import os
from typing import Any

from jobs.runs import job_run
from lake.catalog import Lake
from lake.compact import compact_dir, ensure_compact
from lake.settings import Settings

__all__ = ["run_suggest"]


def run_suggest(lake: Lake, settings: Settings, *, model: str | None = None) -> dict[str, Any]:
    """The ``settings.suggest_dims`` matrix for the current features of ``model`` (default: the
    model with the most features).

    Raises:
        NotFound: no features yet (run ``imagelake embed``).
    """
    from lake.commit import open_table
    from lake.vectors import default_model_key

    lake.ensure()
    model = model or default_model_key(lake)
    version = open_table(lake, "features").version()
    folder = compact_dir(lake, model, version, settings.suggest_dims)
    if lake.is_local:
        existed = os.path.isfile(os.path.join(folder, "manifest.json"))
    else:  # an object-store lake: the build's folder is a key prefix in the store
        from lake.compact import compact_key
        from lake.store import LakeStore

        existed = LakeStore.for_lake(lake).exists(f"{compact_key(model, version, settings.suggest_dims)}/manifest.json")
    with job_run(lake, "suggest", {"model": model, "dims": settings.suggest_dims}, settings=settings) as run:
        from lake.artifact_cache import artifact_cache

        matrix = ensure_compact(lake, settings.suggest_dims, model,
                                cache=None if lake.is_local else artifact_cache(settings))
        run.rows_in = len(matrix)
        run.rows_out = 0 if existed else len(matrix)
        run.metrics.update(model=model, features_version=version, dims=settings.suggest_dims,
                           built=not existed, folder=os.path.relpath(folder, lake.root))
    return {"run_id": run.run_id, "rows_in": run.rows_in, "rows_out": run.rows_out, "built": not existed,
            "folder": folder}
