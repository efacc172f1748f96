"""The 1000 ImageNet-1k class names, for reading ``features.concept_ids`` (tags, the dashboard).

They ship as data, ``imagenet_classes.tsv`` (index, WordNet id, readable name) next to this module;
index 967 is ``espresso``. Every built-in model predicts these classes in this order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["ImagenetClass", "imagenet_classes", "class_names"]


@dataclass(frozen=True)
class ImagenetClass:
    index: int
    wnid: str
    name: str


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImagenetClass, ...]:
    text = resources.files("jobs.embed").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    header, body = rows[0], rows[1:]
    if header != ["index", "wnid", "name"] or len(body) != 1000:
        raise RuntimeError("imagenet_classes.tsv is damaged: expected a header and 1000 rows")
    classes = tuple(ImagenetClass(int(i), wnid, name) for i, wnid, name in body)
    if [c.index for c in classes] != list(range(1000)):
        raise RuntimeError("imagenet_classes.tsv is damaged: indexes are not 0..999 in order")
    return classes


def class_names() -> list[str]:
    """Readable names by class index (``class_names()[967] == "espresso"``)."""
    return [c.name for c in imagenet_classes()]
