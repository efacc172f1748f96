"""Keyword search without a text model: words matched against what the lake already knows.

Three sources, each with its own score in 0..1, and an image's score is its best one:

* **concepts**: ImageNet classes one of whose terms contains every query word (as whole words, a
  trailing plural ``s`` ignored) or equals the query. A class's terms are its readable name
  (``jobs/embed/imagenet_classes.tsv``), its WordNet synonyms and the words of the WordNet synsets
  up to five is-a steps above it (``api/imagenet_words.tsv``, shipped): "espresso" names espresso
  (967) and espresso maker (550), "house cat" the domestic cats, "dog" the 118 breeds. An image
  scores the summed probability of the matching classes among its stored top 50 (``features``,
  the model with the most rows), capped at 1.
* **tags**: current user, learned and concept tags (``tags``, as ``GET /images/<id>/tags`` shows
  them) containing the query, case-insensitive; score 1 for a user tag, the model's score otherwise.
* **metadata values**: text and list-of-text columns of ``metadata`` and ``capture`` (keywords,
  title, camera, lens, ...) containing the query, case-insensitive; score 1.

``matched`` names what matched: ``concept:espresso``, ``concept:tabby (kind of house cat)``, ``tag:user:coffee``, ``capture.keywords``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from api.services import LakeReader
from lake.errors import BadInput
from lake.metadata_filter import compile_filter, connection_columns

__all__ = ["search_text", "matching_concepts", "MAX_QUERY"]

MAX_QUERY = 200
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
            for w in _WORD.findall(text.lower())]


@lru_cache(maxsize=1)
def _concepts() -> tuple[tuple[int, str, tuple[tuple[str, frozenset[str], str], ...]], ...]:
    """Per class: (index, readable name, ((term, its words, how), ...)), the name first.

    ``how`` is ``""`` for the name, ``"synonym"`` for another lemma of the class's synset and
    ``"kind of"`` for a lemma of a broader synset (``imagenet_words.tsv``, WordNet 3.0).
    """
    from importlib import resources

    from jobs.embed.classes import imagenet_classes

    text = resources.files("api").joinpath("imagenet_words.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    classes = imagenet_classes()
    if rows[0] != ["index", "wnid", "synonyms", "broader"] or len(rows) != 1001 or \
            [r[1] for r in rows[1:]] != [c.wnid for c in classes]:
        raise RuntimeError("api/imagenet_words.tsv is damaged: expected a header and the 1000 classes' wnids in order")
    out = []
    for c, (_, _, synonyms, broader) in zip(classes, rows[1:]):
        terms: dict[str, str] = {c.name.lower(): ""}
        for term in synonyms.split(", "):
            terms.setdefault(term.strip().lower(), "synonym")
        for synset in filter(None, broader.split("|")):
            for term in synset.split(", "):
                terms.setdefault(term.strip().lower(), "kind of")
        out.append((c.index, c.name, tuple((t, frozenset(_words(t)), how) for t, how in terms.items() if _words(t))))
    return tuple(out)


def matching_concepts(query: str) -> list[tuple[int, str]]:
    """(class index, caption) of the ImageNet classes the query names.

    A class matches when one of its terms (its name, a synonym, a broader term) contains every query
    word as a whole word (a plural ``s`` ignored) or equals the query; the caption names the term that matched (the
    class's own terms before broader ones, one equal to the query before one containing it): ``espresso``, ``tabby (tabby cat)``, ``espresso (kind of coffee)``.
    """
    qwords = _words(query)
    words, phrase = set(qwords), " ".join(qwords)
    if not words:
        return []
    out = []
    for i, name, terms in _concepts():
        hit = None
        for own in (True, False):  # the class's own name and synonyms before broader terms
            tier = [t for t in terms if (t[2] != "kind of") == own]
            hit = next((t for t in tier if " ".join(_words(t[0])) == phrase), None) or \
                next((t for t in tier if words <= t[1]), None)
            if hit is not None:
                break
        if hit is not None:
            term, _, how = hit
            out.append((i, name if not how else f"{name} ({term})" if how == "synonym" else f"{name} ({how} {term})"))
    return out


def _concept_hits(reader: LakeReader, concepts: list[tuple[int, str]], k: int) -> list[dict[str, Any]]:
    """Images whose stored top 50 hold a matching class, scored by the summed probability of the
    matching classes (the model's probability that the image shows any of them, capped at 1)."""
    if not concepts:
        return []
    names = {i: n for i, n in concepts}
    marks = ", ".join("?" for _ in concepts)
    sql = f"""
        WITH m AS (SELECT model FROM features GROUP BY model ORDER BY count(*) DESC, model LIMIT 1),
             f AS (SELECT image_id, unnest(concept_ids) AS cid, unnest(concept_probs) AS p
                   FROM features WHERE model = (SELECT model FROM m))
        SELECT image_id, least(sum(p), 1.0) AS score, arg_max(cid, p) AS cid FROM f WHERE cid IN ({marks})
        GROUP BY image_id ORDER BY score DESC, image_id LIMIT ?"""
    rows = reader.select(sql, [*[int(i) for i, _ in concepts], k])
    return [{"image_id": r["image_id"], "score": float(r["score"]), "matched": [f"concept:{names[int(r['cid'])]}"]}
            for r in rows]


def _tag_hits(reader: LakeReader, query: str, k: int) -> list[dict[str, Any]]:
    from jobs.tag.state import CURRENT_TAGS_SQL

    sql = f"""SELECT image_id, max(score) AS score, list(DISTINCT source || ':' || tag ORDER BY source || ':' || tag) AS m
              FROM (SELECT image_id, tag, source, coalesce(score, 1.0) AS score FROM ({CURRENT_TAGS_SQL})
                    WHERE contains(lower(tag), lower(?)))
              GROUP BY image_id ORDER BY score DESC, image_id LIMIT ?"""
    rows = reader.select(sql, [query, k])
    return [{"image_id": r["image_id"], "score": float(r["score"]), "matched": [f"tag:{m}" for m in r["m"]]}
            for r in rows]


def _metadata_hits(reader: LakeReader, query: str, k: int) -> list[dict[str, Any]]:
    cur = reader.cursor()
    try:
        columns = connection_columns(cur)
        names = sorted(n for n, c in columns.items() if "." in n and c.element_kind == "string"
                       and not n.startswith("images.") and n.split(".", 1)[1] not in ("source_file", "run_id", "taken_offset"))
        if not names:
            return []
        cases, params = [], []
        for name in names:
            cond, p = compile_filter({name: {"contains": query}}, columns)
            cases.append(f"CASE WHEN {cond} THEN '{name}' END")  # name: a whitelisted column name
            params.extend(p)
        sql = (f"SELECT image_id, m FROM (SELECT i.image_id, list_filter([{', '.join(cases)}], lambda x: x IS NOT NULL) AS m "
               "FROM images i LEFT JOIN metadata m ON m.image_id = i.image_id "
               "LEFT JOIN capture c ON c.image_id = i.image_id) WHERE len(m) > 0 ORDER BY image_id LIMIT ?")
        rows = cur.sql(sql, params=[*params, k]).to_arrow_table().to_pylist()
    finally:
        cur.close()
    return [{"image_id": r["image_id"], "score": 1.0, "matched": list(r["m"])} for r in rows]


def search_text(reader: LakeReader, query: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` best images for ``query`` (best first): ``{"image_id", "score", "matched"}``.

    Raises:
        BadInput: an empty query, one over :data:`MAX_QUERY` characters, or one without a letter or digit.
    """
    query = (query or "").strip()
    if not query:
        raise BadInput("missing ?q=: the words to search for, e.g. /search/text?q=espresso")
    if len(query) > MAX_QUERY:
        raise BadInput(f"q is longer than {MAX_QUERY} characters")
    if not _WORD.search(query.lower()):
        raise BadInput(f"q {query[:40]!r} has no letter or digit to match")
    best: dict[str, dict[str, Any]] = {}
    for hits in (_concept_hits(reader, matching_concepts(query), k), _tag_hits(reader, query, k),
                 _metadata_hits(reader, query, k)):
        for h in hits:
            cur = best.get(h["image_id"])
            if cur is None:
                best[h["image_id"]] = h
            else:
                cur["matched"] = sorted(set(cur["matched"]) | set(h["matched"]))
                cur["score"] = max(cur["score"], h["score"])
    ranked = sorted(best.values(), key=lambda h: (-h["score"], h["image_id"]))[:k]
    for h in ranked:
        h["score"] = round(h["score"], 6)
        h["matched"] = sorted(h["matched"])
    return ranked
