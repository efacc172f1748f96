"""``GET /buckets/<id>/doubts``: members of a bucket that their neighbours and a model say belong elsewhere.

Label errors are found the way cleanlab and fastdup find them, from two votes over the compact
PCA vectors the suggestions use (:mod:`lake.compact`):

* **neighbours**: the share of a member's ``k`` nearest labelled images (members of any live bucket,
  itself excluded; cosine similarity) that are members of this bucket;
* **model**: out-of-fold probability of this bucket from the same logistic regression the
  suggestions fit (members against the other buckets' members, the bucket's rejected images and
  the discard pile), each member scored by a model fitted without its fold (5 folds), so a
  mislabelled image cannot vouch for itself.

``doubt = 1 - (neighbours + model) / 2``; most doubtful first, with ``suggested_bucket``: the other
bucket most of its neighbours are in (null when none is). A bucket without any negative gets the
neighbour vote alone (``model`` null).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import Blueprint, current_app, jsonify

from api.buckets import bucket_store
from api.request_limits import int_arg
from api.suggest import suggester
from api.suggester import fit_logistic
from lake.buckets import DISCARD, check_bucket_id
from lake.compact import CompactMatrix
from lake.errors import BadInput
from lake.sql import jsonable

bp = Blueprint("doubts", __name__)

_K = 10
_FOLDS = 5


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def find_doubts(matrix: CompactMatrix, members: dict[str, list[str]], negatives: list[str], bucket_id: str,
                n: int, k: int = _K) -> list[dict[str, Any]]:
    """The ``n`` most doubtful members of ``bucket_id``.

    Args:
        members: live bucket id -> member image ids (the bucket itself included).
        negatives: extra negatives for the model (the bucket's rejected images, the discard pile).
    """
    own = [i for i in dict.fromkeys(members.get(bucket_id, []))]
    labelled: dict[str, str] = {}
    for b, ids in members.items():
        for i in ids:
            if b == bucket_id or i not in labelled:
                labelled[i] = b
    rows = matrix.ids.rows_of(list(labelled))  # sorted rows of the ids the matrix holds
    ids = [matrix.ids.image_id(int(r)) for r in rows]
    if not own or len(ids) < 2:
        return []
    x = _unit(matrix.vectors(rows))
    label = np.array([labelled[i] for i in ids])
    pos = {i: j for j, i in enumerate(ids)}
    own_idx = np.array([pos[i] for i in own if i in pos], np.int64)
    if not len(own_idx):
        return []
    kk = max(1, min(k, len(ids) - 1))
    sims = x[own_idx] @ x.T
    sims[np.arange(len(own_idx)), own_idx] = -np.inf
    near = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    share = (label[near] == bucket_id).mean(axis=1)
    others = [[b for b in label[row] if b != bucket_id] for row in near]

    neg_ids = [i for i in ids if labelled[i] != bucket_id]
    neg_x = [x[[pos[i] for i in neg_ids]]] if neg_ids else []
    extra = [i for i in dict.fromkeys(negatives) if i not in labelled]
    extra_rows = matrix.ids.rows_of(extra) if extra else np.zeros(0, np.int64)
    if len(extra_rows):
        neg_x.append(_unit(matrix.vectors(extra_rows)))
    model = None
    if neg_x and len(own_idx) >= 2:
        neg = np.vstack(neg_x)
        model = np.zeros(len(own_idx), np.float64)
        folds = np.arange(len(own_idx)) % _FOLDS
        for f in range(min(_FOLDS, len(own_idx))):
            test = folds == f
            w, b = fit_logistic(x[own_idx[~test]], neg, c=10.0)
            model[test] = 1.0 / (1.0 + np.exp(-np.clip(x[own_idx[test]] @ w + b, -30, 30)))
    doubt = 1.0 - (share + model) / 2 if model is not None else 1.0 - share
    out = []
    for j in np.lexsort((np.array([ids[i] for i in own_idx]), -doubt))[:n]:
        votes = others[j]
        suggested = max(set(votes), key=lambda b: (votes.count(b), b)) if votes else None
        out.append({"image_id": ids[own_idx[j]], "score": round(float(doubt[j]), 6),
                    "neighbours": round(float(share[j]), 6),
                    "model": None if model is None else round(float(model[j]), 6),
                    "suggested_bucket": suggested})
    return out


@bp.get("/buckets/<bucket_id>/doubts")
def doubts(bucket_id: str):
    """``?n=`` (default 20) members of the bucket, most doubtful first."""
    if bucket_id == DISCARD:
        raise BadInput("the discard pile has no doubts; it is not a label")
    check_bucket_id(bucket_id)
    n = int_arg("n", 20, 1, current_app.config["IMAGELAKE_SETTINGS"].suggest_max_n)
    with bucket_store().reading() as state:
        state.live_bucket(bucket_id)
        live = [b["bucket_id"] for b in state.listing() if b["bucket_id"] != DISCARD]
        members = {b: state.member_ids(b, pending=False) for b in live}
        negatives = list(state.rejected.get(bucket_id, {})) + state.member_ids(DISCARD)
    results = find_doubts(suggester().matrix(), members, negatives, bucket_id, n)
    return jsonify({"ok": True, "bucket_id": bucket_id, "results": jsonable(results)})


def openapi_paths(settings) -> dict:
    from api.buckets import BUCKET_ID_PARAM
    from api.openapi import errors, json_response

    item = {"type": "object", "required": ["image_id", "score", "neighbours", "model", "suggested_bucket"],
            "properties": {"image_id": {"type": "string"}, "score": {"type": "number"},
                           "neighbours": {"type": "number"}, "model": {"type": ["number", "null"]},
                           "suggested_bucket": {"type": ["string", "null"]}}}
    return {"/buckets/{bucket_id}/doubts": {"get": {
        "summary": "Members whose neighbours and the bucket's model say they belong elsewhere, most doubtful first",
        "description": "score = 1 - (share of the 10 nearest labelled images in this bucket + out-of-fold "
                       "model probability) / 2; suggested_bucket: where most of its neighbours are.",
        "operationId": "bucketDoubts",
        "parameters": [
            BUCKET_ID_PARAM,
            {"name": "n", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                      "maximum": settings.suggest_max_n, "default": 20}},
        ],
        "responses": {
            "200": json_response({"type": "object", "required": ["ok", "bucket_id", "results"], "properties": {
                "ok": {"const": True}, "bucket_id": {"type": "string"},
                "results": {"type": "array", "items": item}}}, "Most doubtful first"),
            **errors(400, 404, 503),
        },
    }}}
