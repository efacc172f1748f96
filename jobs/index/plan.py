"""Which FAISS index to build for ``n`` vectors of dimension ``d`` within a memory budget.

The rule (also in the README):

* **Flat** (exact, ``IDMap2,Flat``) when ``n < flat_below`` (default 10,000): too few vectors to
  train 256-centroid PQ codebooks (FAISS wants >= 39 x 256 training points), and brute force over
  10k vectors costs about a millisecond anyway.
* **IVF-PQ** otherwise, always followed by exact re-ranking of the candidates on float16 copies:
  - ``nlist`` = the power of two nearest ``sqrt(n)``, between 16 and 65,536, and at most
    ``train_n / 39`` so every list gets enough training points. (FAISS's usual 4-16 x sqrt(n)
    pays off at billions of vectors; on a few cores the coarse assignment of every vector at
    build time, n x nlist x d flops, dominates, and sqrt(n) keeps a 1M build within minutes.)
  - PQ ``nbits`` = 8, or fewer (down to 4) when the training sample is below ``39 * 2**nbits``.
  - PQ ``m`` (bytes per code at 8 bits) = the largest of 64, 48, 32, 16, 8 that divides ``d`` and
    whose codes plus the 8-byte id fit ``memory_budget / n`` bytes per vector. 64 is the cap:
    re-ranking restores precision, so larger codes buy little candidate recall for their memory.
  - **OPQ** is not used by default: with exact re-ranking of ``max(200, 10 k)`` candidates the
    measured recall@10 is already >= 0.98, and OPQ training at d=1280 costs minutes. ``opq=True``
    adds an ``OPQ{m}`` rotation (trained on at most 32k of the sample).
  - ``nprobe`` default = ``max(16, nlist / 32)``, at most ``nlist``.
* Vectors are L2-normalised and searched by inner product (cosine similarity).

Raises :class:`lake.errors.BadInput` when even 8-byte codes do not fit the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lake.errors import BadInput

__all__ = ["IndexPlan", "choose_plan", "FLAT_BELOW", "MAX_TRAIN"]

FLAT_BELOW = 10_000
MAX_TRAIN = 131_072
_M_CHOICES = (64, 48, 32, 16, 8)
_ID_BYTES = 8


@dataclass(frozen=True)
class IndexPlan:
    """A chosen index: the FAISS factory string and what it was derived from."""

    kind: str             # "flat" or "ivfpq"
    factory: str
    d: int
    n: int
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    opq: bool = False
    nprobe: int = 0
    train_n: int = 0

    @property
    def bytes_per_vector(self) -> float:
        """Resident bytes per vector of the searchable part (codes + ids; Flat: the floats)."""
        if self.kind == "flat":
            return 4 * self.d + _ID_BYTES
        return math.ceil(self.m * self.nbits / 8) + _ID_BYTES

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes_per_vector": self.bytes_per_vector}


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def choose_plan(n: int, d: int, memory_budget_bytes: int, *, flat_below: int = FLAT_BELOW,
                max_train: int = MAX_TRAIN, opq: bool = False, factory: str | None = None) -> IndexPlan:
    """The index for ``n`` vectors of dimension ``d`` (see the module docstring for the rule).

    Args:
        memory_budget_bytes: resident budget of codes + ids over all shards.
        flat_below: collections smaller than this get an exact Flat index.
        max_train: training sample cap (default 128k; keep it <= 256k).
        opq: add an OPQ rotation in front of IVF-PQ.
        factory: an explicit FAISS factory string (expert override; nprobe then defaults to 16).
    Raises:
        BadInput: ``n`` or ``d`` not positive, or a budget too small for 8-byte codes.
    """
    if n <= 0 or d <= 0:
        raise BadInput(f"cannot plan an index for {n} vectors of dimension {d}")
    train_n = min(n, max_train)
    if factory:
        nprobe = 16 if "IVF" in factory else 0
        return IndexPlan("custom", factory, d, n, nprobe=nprobe, train_n=train_n, opq=factory.startswith("OPQ"))
    if n < flat_below:
        return IndexPlan("flat", "IDMap2,Flat", d, n, train_n=0)
    nlist = min(65_536, max(16, _pow2_near(math.sqrt(n))))
    while nlist > 16 and nlist * 39 > train_n:
        nlist //= 2
    nbits = 8
    while nbits > 4 and train_n < 39 * (1 << nbits):
        nbits -= 1
    per_vector = memory_budget_bytes / n
    m = next((m for m in _M_CHOICES if d % m == 0 and math.ceil(m * nbits / 8) + _ID_BYTES <= per_vector), 0)
    if m == 0:
        smallest = next((c for c in reversed(_M_CHOICES) if d % c == 0), None)
        if smallest is None:
            raise BadInput(f"dimension {d} is not divisible by any PQ size ({_M_CHOICES}); pass an explicit factory")
        need = n * (math.ceil(smallest * nbits / 8) + _ID_BYTES)
        raise BadInput(f"a memory budget of {memory_budget_bytes / 2**20:.0f} MiB is too small for {n} vectors "
                       f"(at least {math.ceil(need / 2**20)} MiB); raise index_memory_mb / --memory-budget")
    pq = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
    factory = f"{'OPQ%d,' % m if opq else ''}IVF{nlist},{pq}"
    nprobe = min(nlist, max(16, nlist // 32))
    return IndexPlan("ivfpq", factory, d, n, nlist=nlist, m=m, nbits=nbits, opq=opq, nprobe=nprobe, train_n=train_n)
