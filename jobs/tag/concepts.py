"""Concept tags: the model's top ImageNet classes until their cumulative probability reaches a cut.

ImageTagger's rule: sort an image's class probabilities, keep classes until the running sum is at
least ``cum_prob`` (0.9 by default) — one tag for a confident image, several for an ambiguous one —
capped at ``max_tags``. ``features.concept_ids``/``concept_probs`` hold each image's top 50.
"""

from __future__ import annotations

from jobs.embed.classes import class_names

__all__ = ["concept_tags", "readable"]


def readable(name: str) -> str:
    """The first synonym of an ImageNet class name, lower case (``"tabby, tabby cat"`` → ``"tabby"``)."""
    return name.split(",")[0].strip().lower()


def concept_tags(ids: list[int] | None, probs: list[float] | None, cum_prob: float = 0.9,
                 max_tags: int = 5) -> list[tuple[str, float]]:
    """(readable class name, probability) for the top classes until the cumulative probability
    reaches ``cum_prob``, most probable first, at most ``max_tags``."""
    if not ids or not probs:
        return []
    names = class_names()
    out, total = [], 0.0
    for i, p in sorted(zip(ids, probs), key=lambda t: -t[1]):
        if len(out) >= max_tags or total >= cum_prob:
            break
        out.append((readable(names[int(i)]), float(p)))
        total += float(p)
    return out
