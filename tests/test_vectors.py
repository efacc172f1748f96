"""lake.vectors: embeddings come back aligned with seq, filtered as asked."""

from __future__ import annotations

import numpy as np
import pytest

from lake.commit import commit_rows
from lake.errors import NotFound
from lake.vectors import default_model_key, load_embeddings


def test_embeddings_are_sorted_by_seq_and_filterable(lake):
    with pytest.raises(NotFound):
        default_model_key(lake)
    ids = [f"{i:064x}" for i in range(6)]
    commit_rows(lake, "images", [{"image_id": x, "seq": 5 - i, "uri": f"/x/{i}"} for i, x in enumerate(ids)], run_id="i")
    commit_rows(lake, "features", [{"image_id": x, "model": "m@1", "embedding": [float(i), 1.0, 0.0]}
                                   for i, x in enumerate(ids)] +
                [{"image_id": ids[0], "model": "old@0", "embedding": [9.0, 9.0]}], run_id="f")
    assert default_model_key(lake) == "m@1"
    emb = load_embeddings(lake)
    assert emb.seqs.tolist() == [0, 1, 2, 3, 4, 5] and emb.image_ids == ids[::-1]
    assert emb.vectors.dtype == np.float32 and emb.vectors[:, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert np.allclose(np.linalg.norm(emb.normalized(), axis=1), 1)
    assert load_embeddings(lake, where="i.seq < 2").seqs.tolist() == [0, 1]
    assert load_embeddings(lake, seqs=np.array([4, 1])).image_ids == [ids[4], ids[1]]
    assert load_embeddings(lake, "old@0").vectors.shape == (1, 2)
