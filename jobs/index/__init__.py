"""The index job: sharded FAISS IVF-PQ builds over the ``features`` table, published atomically.

* :mod:`jobs.index.plan` — which index for n vectors and a memory budget (the documented rule).
* :mod:`jobs.index.build` — build folders, manifests (written last), verification.
* :mod:`jobs.index.partition` — the shard-encoding partition function (runs on Spark executors).
* :mod:`jobs.index.driver` — ``run_index``: full builds, incremental delta shards, publishing.
"""
