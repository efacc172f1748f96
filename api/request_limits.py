"""Limits on what a request body may be, each failure saying which limit it hit.

werkzeug answers every form limit with the same bare 413, so a small body of 2,000 tiny parts
read as "body too large". Here the multipart parts are counted as the body streams past (the
count is the limit: werkzeug's own is switched off), a text field over ``MAX_FORM_MEMORY_SIZE``
says so, and only a body over ``upload_max_bytes`` is "too large". JSON bodies are parsed with a
nesting bound: a deeply nested document must be a 400, not a ``RecursionError`` 500. A bounded
integer query parameter is :func:`int_arg`.
"""

from __future__ import annotations

from typing import IO, Any

from flask import Flask, Request, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

from lake.errors import BadInput
from lake.json_input import loads_bounded

__all__ = ["FormLimit", "LimitedRequest", "BoundedJSONProvider", "init_app", "int_arg"]


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter ``name`` as an integer in ``[lo, hi]`` (``default`` when absent or empty);
    BadInput (400) naming the bounds otherwise."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer from {lo} to {hi}, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise BadInput(f"{name} must be an integer from {lo} to {hi}, got {value}")
    return value


class FormLimit(RequestEntityTooLarge):
    """A 413 for a form limit other than the body size; ``description`` names the limit."""


class _PartCounter:
    """A read-through stream that counts multipart delimiters and stops past ``limit`` parts."""

    def __init__(self, stream: IO[bytes], boundary: bytes, limit: int | None):
        self._stream = stream
        self._delimiter = b"\r\n--" + boundary
        self._tail = b"\r\n"  # the first delimiter opens the body without a line break before it
        self._limit = limit
        self.delimiters = 0   # opening delimiters plus the closing one
        self.hit_byte_limit = False

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except RequestEntityTooLarge:
            self.hit_byte_limit = True
            raise
        # The tail is shorter than a delimiter, so a match here was not counted in the last read.
        window = self._tail + data
        self.delimiters += window.count(self._delimiter)
        self._tail = window[-(len(self._delimiter) - 1):]
        if self._limit is not None and self.delimiters > self._limit + 1:
            raise FormLimit(f"the multipart form has more than {self._limit} parts (the limit on form "
                            "parts, not on bytes); send the file in one field")
        return data


class _FormParser(FormDataParser):
    def __init__(self, *args: Any, max_form_parts: int | None = None, **kwargs: Any):
        super().__init__(*args, max_form_parts=None, **kwargs)  # _PartCounter enforces it
        self.parts_limit = max_form_parts

    def _parse_multipart(self, stream, mimetype, content_length, options):
        counter = _PartCounter(stream, options.get("boundary", "").encode("ascii", "replace"), self.parts_limit)
        try:
            _, form, files = super()._parse_multipart(counter, mimetype, content_length, options)
        except FormLimit:
            raise
        except RequestEntityTooLarge:
            if counter.hit_byte_limit:
                raise  # the body itself is over upload_max_bytes
            raise FormLimit(f"a multipart text field is over {self.max_form_memory_size} bytes (the limit on "
                            "one form field, not on the body); send large content as a file part") from None
        return stream, form, files


class LimitedRequest(Request):
    form_data_parser_class = _FormParser


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, with request bodies parsed under :func:`lake.json_input.loads_bounded`."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads_bounded(s, **kwargs)


def init_app(app: Flask) -> None:
    app.request_class = LimitedRequest
    app.json = BoundedJSONProvider(app)
    app.json.sort_keys = False  # keep table column order in responses
