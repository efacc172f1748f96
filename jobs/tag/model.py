"""The learned-tag model: Gaussian naive Bayes over PCA-reduced embeddings, versioned in the lake.

ImageTagger's idea at lake scale: each user tag is a class; an image's embedding is a sample.
``sklearn.naive_bayes.GaussianNB`` keeps per-class counts, means and variances, so a correction is
an O(d) update (``partial_fit``; removing a label is the inverse update), not a retrain.

Several API worker processes share one model. It lives under ``artifacts/tags/gnb/``: each version
in its own folder ``v<NNNNNN>/`` (checksummed arrays, manifest last) and a ``CURRENT`` file naming
the newest. Writers hold the lake lock ``tag-model``, read CURRENT, apply their change, write
version N+1 and then move CURRENT (atomic rename); readers re-read CURRENT (a tiny file) and
reload when it names a new version. A reader that meets a corrupt version keeps the one it has.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from sklearn.naive_bayes import GaussianNB

from jobs.cluster.topics import Projection, fit_projection
from lake.artifacts import read_arrays, read_text, write_arrays, write_text_atomic
from lake.catalog import Lake
from lake.errors import CorruptArtifact
from lake.lock import LakeLock

__all__ = ["TagModel", "ModelStore", "SMOOTHING"]

log = logging.getLogger("imagelake.jobs.tag")

SMOOTHING = 0.1  # variance floor, as a fraction of the median feature variance of all embeddings


@dataclass
class TagModel:
    """A fitted (or empty) naive Bayes over projected embeddings. ``version`` 0: not saved yet."""

    features_model: str
    projection: Projection
    epsilon: float
    classes: list[str]
    theta: np.ndarray        # (c, d) class means
    var: np.ndarray          # (c, d) class variances, without epsilon
    count: np.ndarray        # (c,) samples per class
    version: int = 0

    @classmethod
    def empty(cls, features_model: str, vectors: np.ndarray, pca_dim: int) -> "TagModel":
        """A model with no classes whose projection and variance floor come from ``vectors``."""
        proj = fit_projection(vectors, pca_dim)
        x = proj.apply(vectors[: min(len(vectors), 100_000)]) if len(vectors) else np.zeros((0, 1), np.float32)
        d = x.shape[1]
        eps = float(SMOOTHING * np.median(x.var(axis=0))) if len(x) > 1 else 1e-3
        return cls(features_model, proj, max(eps, 1e-9), [], np.zeros((0, d)), np.zeros((0, d)), np.zeros(0))

    @property
    def d(self) -> int:
        return int(self.theta.shape[1])

    def _nb(self, learning: bool = False) -> GaussianNB:
        # Learning runs with var_smoothing=0 on the raw variances: GaussianNB.partial_fit would
        # otherwise re-derive epsilon from each (tiny) batch. Prediction adds the fixed floor.
        nb = GaussianNB(var_smoothing=0.0 if learning else 1e-9)
        nb.classes_ = np.array(self.classes, dtype=object)
        nb.theta_ = self.theta.copy()
        nb.var_ = self.var.copy() if learning else self.var + self.epsilon
        nb.class_count_ = self.count.astype(np.float64).copy()
        total = self.count.sum()
        nb.class_prior_ = self.count / total if total else np.full(len(self.count), 1.0 / max(1, len(self.count)))
        nb.epsilon_ = 0.0 if learning else self.epsilon
        nb.n_features_in_ = self.d
        return nb

    def learn(self, x: np.ndarray, labels: list[str]) -> None:
        """Add samples (rows of raw embeddings ``x``) with ``labels`` (``GaussianNB.partial_fit``)."""
        if not labels:
            return
        z = self.projection.apply(np.asarray(x, np.float32)).astype(np.float64)
        new = sorted(set(labels) - set(self.classes))
        if new:
            classes = sorted(self.classes + new)  # GaussianNB looks classes up with searchsorted
            where = {c: i for i, c in enumerate(self.classes)}
            theta, var, count = np.zeros((len(classes), self.d)), np.zeros((len(classes), self.d)), np.zeros(len(classes))
            for i, c in enumerate(classes):
                if c in where:
                    theta[i], var[i], count[i] = self.theta[where[c]], self.var[where[c]], self.count[where[c]]
            self.classes, self.theta, self.var, self.count = classes, theta, var, count
        nb = self._nb(learning=True)
        nb.partial_fit(z, np.array(labels, dtype=object))
        self.theta, self.count = nb.theta_, nb.class_count_
        self.var = np.maximum(nb.var_, 0.0)

    def unlearn(self, x: np.ndarray, labels: list[str]) -> None:
        """Remove samples previously learned (a user took a tag back): the inverse of :meth:`learn`."""
        z = self.projection.apply(np.asarray(x, np.float32)).astype(np.float64)
        for row, label in zip(z, labels):
            if label not in self.classes:
                continue
            c = self.classes.index(label)
            n = self.count[c]
            if n <= 1:
                self.theta[c], self.var[c], self.count[c] = 0.0, 0.0, 0.0
                continue
            mean = (n * self.theta[c] - row) / (n - 1)
            second = (n * (self.var[c] + self.theta[c] ** 2) - row ** 2) / (n - 1)
            self.theta[c], self.var[c], self.count[c] = mean, np.maximum(second - mean ** 2, 0.0), n - 1

    def predict(self, x: np.ndarray, top: int = 5) -> list[list[tuple[str, float]]]:
        """Per row of raw embeddings ``x``: up to ``top`` (tag, posterior) pairs, most probable first."""
        live = np.flatnonzero(self.count > 0)
        if len(live) == 0 or len(x) == 0:
            return [[] for _ in range(len(x))]
        z = self.projection.apply(np.asarray(x, np.float32))
        sub = TagModel(self.features_model, self.projection, self.epsilon, [self.classes[i] for i in live],
                       self.theta[live], self.var[live], self.count[live])
        proba = sub._nb().predict_proba(z)
        order = np.argsort(-proba, axis=1)[:, :top]
        return [[(sub.classes[j], float(proba[i, j])) for j in order[i]] for i in range(len(z))]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"theta": self.theta, "var": self.var, "count": self.count,
                "pca_A": self.projection.A, "pca_b": self.projection.b}


class ModelStore:
    """The versioned model of one lake; one per process, thread-safe, reloads on a new version."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.root = lake.artifacts_dir("tags", "gnb")
        self._lock = threading.Lock()
        self._model: TagModel | None = None

    def current_version(self) -> int:
        raw = read_text(f"{self.root}/CURRENT")
        try:
            return int(raw.decode().strip()) if raw else 0
        except ValueError:
            return 0

    def _read(self, version: int) -> TagModel:
        art = read_arrays(f"{self.root}/v{version:06d}")
        m = art.meta
        return TagModel(m["features_model"], Projection(art.arrays["pca_A"], art.arrays["pca_b"]),
                        float(m["epsilon"]), list(m["classes"]), art.arrays["theta"], art.arrays["var"],
                        art.arrays["count"], version)

    def load(self) -> TagModel | None:
        """The newest version (cached until CURRENT moves); ``None`` before the first save."""
        version = self.current_version()
        with self._lock:
            if version and (self._model is None or self._model.version != version):
                try:
                    self._model = self._read(version)
                except CorruptArtifact as e:
                    log.warning("tag model v%d unusable (%s); keeping v%s", version, e,
                                self._model.version if self._model else None)
            return self._model

    def save(self, model: TagModel) -> int:
        """Write ``model`` as the next version and make it current; call under :meth:`locked`."""
        version = self.current_version() + 1
        meta = {"features_model": model.features_model, "epsilon": model.epsilon, "classes": model.classes,
                "version": version}
        write_arrays(f"{self.root}/v{version:06d}", model.arrays(), meta)
        write_text_atomic(f"{self.root}/CURRENT", str(version).encode())
        model.version = version
        with self._lock:
            self._model = model
        return version

    def locked(self) -> LakeLock:
        """The writers' lock: read, change and save the model inside it."""
        return LakeLock(self.lake, "tag-model", timeout=60, holder="tag model update")

    def fresh(self) -> TagModel | None:
        """The newest version read from storage now (for writers holding the lock)."""
        version = self.current_version()
        return self._read(version) if version else None


def pairs_to_matrix(pairs: Iterable[tuple[int, str]], vectors: np.ndarray) -> tuple[np.ndarray, list[str]]:
    rows, labels = zip(*pairs) if pairs else ((), ())
    return vectors[list(rows)], list(labels)
