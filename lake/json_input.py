"""JSON from outside (request bodies, ``--where`` flags, query parameters) under a nesting bound.

Python's parser recurses once per level: a body of 20,000 ``[`` raises ``RecursionError``, which
is no input error to any handler and became a 500. Nothing imagelake accepts nests deeper than a
few levels (the metadata filter language stops at 10), so anything past :data:`MAX_JSON_DEPTH`
is refused as bad input, whether the parser overflowed or not.
"""

from __future__ import annotations

import json
from typing import Any

from lake.errors import BadInput

__all__ = ["MAX_JSON_DEPTH", "check_json_depth", "loads_bounded"]

MAX_JSON_DEPTH = 64


def _too_deep() -> BadInput:
    return BadInput(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects")


def check_json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise BadInput when ``value`` nests arrays/objects deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise _too_deep()
        stack.extend((child, depth + 1) for child in children)


def loads_bounded(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` that raises BadInput (not RecursionError) for over-deep documents; other
    malformed JSON raises ValueError as ``json.loads`` does."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise _too_deep() from None
    check_json_depth(value)
    return value
