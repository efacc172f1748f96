"""Capture metadata of one image file: when, where and with what it was taken (EXIF, IPTC, XMP).

:func:`read_capture` returns one ``capture`` row for an image's bytes. It never raises for bad
metadata: a field that is missing, malformed or hostile (a bad date, a rational with a zero
denominator, GPS out of range, an IFD offset past the end, a block over ``max_block_bytes``) is
left null and a short reason ``"<field>:<reason>"`` is added to the row's ``issues``; the ingest
driver counts them per reason in its ``job_runs`` metrics. Only the tags below are decoded; maker
notes and thumbnails inside EXIF are never read.

``taken_at`` is DateTimeOriginal (else DateTimeDigitized, else DateTime) with SubSecTimeOriginal;
with an OffsetTimeOriginal (or OffsetTime) it is converted to UTC and ``taken_offset`` keeps the
offset (``+02:00``); without one the camera's wall-clock time is stored as if it were UTC and
``taken_offset`` is null.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import warnings
from typing import Any

from PIL import Image

from jobs.capture.segments import ExifBlock, jpeg_metadata
from lake.catalog import TABLES

__all__ = ["CAPTURE_FIELDS", "read_capture", "empty_capture"]

#: The ``capture`` table's columns (declared in the catalog).
CAPTURE_FIELDS = list(TABLES["capture"].schema)

_MAX_TEXT = 256
_MAX_KEYWORDS = 100

# base IFD
_MAKE, _MODEL, _ORIENTATION, _DATETIME, _DESCRIPTION = 0x010F, 0x0110, 0x0112, 0x0132, 0x010E
_XP_TITLE, _XP_KEYWORDS = 0x9C9B, 0x9C9E
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
# Exif IFD
_EXPOSURE, _FNUMBER, _ISO, _ORIGINAL, _DIGITIZED = 0x829A, 0x829D, 0x8827, 0x9003, 0x9004
_OFFSET, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL, _FOCAL, _LENS = 0x9010, 0x9011, 0x9291, 0x920A, 0xA434


class _Issue(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def empty_capture(image_id: str) -> dict[str, Any]:
    row = {f.name: None for f in CAPTURE_FIELDS}
    row.update(image_id=image_id, has_gps=False, keywords=[], issues=[])
    return row


def read_capture(data: bytes, image_id: str, *, max_block_bytes: int) -> dict[str, Any]:
    """The ``capture`` row of an image's bytes (without ``run_id``/``created_at``); never raises."""
    row = empty_capture(image_id)
    issues: list[str] = row["issues"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _read_jpeg_segments(data, row, issues, max_block_bytes):
            _read_with_pillow(data, row, issues, max_block_bytes)
    row["has_gps"] = row["gps_lat"] is not None and row["gps_lon"] is not None
    row["camera"] = _camera(row["make"], row["model"])
    row["keywords"] = list(dict.fromkeys(k for k in row["keywords"] if k))[:_MAX_KEYWORDS]
    return row


def _read_jpeg_segments(data: bytes, row: dict, issues: list[str], max_block: int) -> bool:
    """Fill ``row`` from a JPEG's segments without opening the image (see :mod:`jobs.capture.segments`);
    False when the JPEG needs Pillow (not a JPEG, an odd header, IPTC data) and ``row`` is untouched."""
    meta = jpeg_metadata(data)
    if meta is None or meta.photoshop:
        return False
    block = meta.exif
    try:
        exif = ExifBlock(block if block is None or len(block) <= max_block else None, meta.xmp)
    except ValueError:
        return False
    try:
        _exif_fields(block, lambda: exif, row, issues, max_block)
        _xmp_fields(meta.xmp, row, issues, max_block)
    except Exception:  # a bug in a field reader must not fail the image either
        issues.append("capture:unexpected")
    return True


def _read_with_pillow(data: bytes, row: dict, issues: list[str], max_block: int) -> None:
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:
        issues.append("image:unreadable")
        return
    try:
        _exif_fields(im.info.get("exif"), im.getexif, row, issues, max_block)
        _iptc_fields(im, row, issues)
        _xmp_fields(im.info.get("xmp") or im.info.get("XML:com.adobe.xmp"), row, issues, max_block)
    except Exception:  # a bug in a field reader must not fail the image either
        issues.append("capture:unexpected")
    finally:
        im.close()


def _field(row: dict, issues: list[str], name: str, fn, *args) -> None:
    try:
        value = fn(*args)
    except _Issue as e:
        issues.append(f"{name}:{e.reason}")
        return
    except Exception:
        issues.append(f"{name}:unreadable")
        return
    if value is not None:
        row[name] = value


def _exif_fields(block: Any, load_exif, row: dict, issues: list[str], max_block: int) -> None:
    """``block``: the raw EXIF block (or None); ``load_exif()``: its IFD0 (``Image.Exif`` or
    :class:`~jobs.capture.segments.ExifBlock`)."""
    if isinstance(block, (bytes, bytearray)) and len(block) > max_block:
        issues.append("exif:too_large")
        return
    try:
        exif = load_exif()
    except Exception:
        issues.append("exif:unreadable")
        return
    if not exif and not block:
        return
    sub = _ifd(exif, _EXIF_IFD, "exif_ifd", issues)
    gps = _ifd(exif, _GPS_IFD, "gps", issues)
    _field(row, issues, "make", _text, exif.get(_MAKE))
    _field(row, issues, "model", _text, exif.get(_MODEL))
    _field(row, issues, "orientation", _orientation, exif.get(_ORIENTATION))
    _field(row, issues, "lens", _text, sub.get(_LENS))
    _field(row, issues, "focal_mm", _positive, sub.get(_FOCAL), 10_000)
    _field(row, issues, "exposure_s", _positive, sub.get(_EXPOSURE), 100_000)
    _field(row, issues, "f_number", _positive, sub.get(_FNUMBER), 1_000)
    _field(row, issues, "iso", _iso, sub.get(_ISO))
    _field(row, issues, "title", _text, exif.get(_XP_TITLE) or exif.get(_DESCRIPTION))
    try:
        row["keywords"].extend(_split_keywords(_text(exif.get(_XP_KEYWORDS), 4096)))
    except Exception:
        issues.append("keywords:unreadable")
    try:
        taken, offset = _taken_at(sub, exif)
        row["taken_at"], row["taken_offset"] = taken, offset
    except _Issue as e:
        issues.append(f"taken_at:{e.reason}")
    except Exception:
        issues.append("taken_at:unreadable")
    if gps:
        try:
            row["gps_lat"], row["gps_lon"] = _gps_position(gps)
        except _Issue as e:
            issues.append(f"gps:{e.reason}")
        except Exception:
            issues.append("gps:unreadable")
        _field(row, issues, "gps_alt", _altitude, gps)


def _ifd(exif: Image.Exif, tag: int, name: str, issues: list[str]) -> dict:
    if tag not in exif:
        return {}
    try:
        ifd = exif.get_ifd(tag)
    except Exception:
        issues.append(f"{name}:bad_offset")
        return {}
    if not ifd:
        issues.append(f"{name}:bad_offset")
    return ifd or {}


def _text(value: Any, limit: int = _MAX_TEXT) -> str | None:
    if value is None:
        return None
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):  # XP* tags as byte tuples
        value = bytes(value)
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value[: limit * 4])
        if len(raw) >= 2 and raw[1:2] == b"\x00":  # XP* tags are UTF-16LE
            text = raw.decode("utf-16-le", "replace")
        else:
            text = raw.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        raise _Issue("bad_type")
    text = text.replace("\x00", "")
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    text = text.strip()
    return text[:limit] or None


def _number(value: Any) -> float:
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, int) for v in value):  # (num, den)
            if value[1] == 0:
                raise _Issue("zero_denominator")
            return value[0] / value[1]
        raise _Issue("bad_type")
    if isinstance(value, bool) or value is None:
        raise _Issue("bad_type")
    x = float(value)  # int, float or IFDRational
    if not math.isfinite(x):
        raise _Issue("zero_denominator")
    return x


def _positive(value: Any, upper: float) -> float | None:
    if value is None:
        return None
    x = _number(value)
    if not 0 < x <= upper:
        raise _Issue("out_of_range")
    return round(x, 6)


def _iso(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = value[0] if value else None
        if value is None:
            return None
    x = _number(value)
    if not 0 < x <= 10_000_000:
        raise _Issue("out_of_range")
    return int(x)


def _orientation(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or not 1 <= value <= 8:
        raise _Issue("out_of_range")
    return value


_DATE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"^\s*([+-])(\d{2}):(\d{2})\s*$")


def _taken_at(sub: dict, base: Image.Exif) -> tuple[dt.datetime | None, str | None]:
    raw = sub.get(_ORIGINAL) or sub.get(_DIGITIZED) or base.get(_DATETIME)
    if raw is None:
        return None, None
    text = _text(raw, 64)
    if not text or set(text) <= set("0: "):
        raise _Issue("bad_date")  # "0000:00:00 00:00:00", the common "unknown" value
    m = _DATE.match(text)
    if not m:
        raise _Issue("bad_date")
    try:
        when = dt.datetime(*(int(g) for g in m.groups()), tzinfo=dt.timezone.utc)
    except ValueError:
        raise _Issue("bad_date") from None
    if not 1800 <= when.year <= 2200:
        raise _Issue("bad_date")
    subsec = _text(sub.get(_SUBSEC_ORIGINAL), 9) if sub.get(_ORIGINAL) else None
    if subsec and subsec.isdigit():
        when = when.replace(microsecond=int(subsec[:6].ljust(6, "0")))
    offset_text = _text(sub.get(_OFFSET_ORIGINAL) or sub.get(_OFFSET), 16)
    if not offset_text:
        return when, None
    om = _OFFSET_RE.match(offset_text)
    if not om or int(om.group(2)) > 14 or int(om.group(3)) > 59:
        raise _Issue("bad_offset")
    sign = -1 if om.group(1) == "-" else 1
    delta = dt.timedelta(hours=int(om.group(2)), minutes=int(om.group(3))) * sign
    return when - delta, f"{om.group(1)}{om.group(2)}:{om.group(3)}"


def _dms(value: Any) -> float:
    if not isinstance(value, tuple) or len(value) != 3:
        raise _Issue("bad_value")
    d, m, s = (_number(v) for v in value)
    if d < 0 or not 0 <= m < 60 or not 0 <= s < 60:
        raise _Issue("out_of_range")
    return d + m / 60 + s / 3600


def _ref(value: Any) -> str:
    text = (_text(value, 4) or "").upper()
    return text[:1]


def _gps_position(gps: dict) -> tuple[float | None, float | None]:
    if 2 not in gps and 4 not in gps:
        return None, None
    lat, lon = _dms(gps.get(2)), _dms(gps.get(4))
    lat_ref, lon_ref = _ref(gps.get(1)), _ref(gps.get(3))
    if lat_ref not in ("N", "S") or lon_ref not in ("E", "W"):
        raise _Issue("bad_ref")
    lat, lon = (-lat if lat_ref == "S" else lat), (-lon if lon_ref == "W" else lon)
    if not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise _Issue("out_of_range")
    return round(lat, 7), round(lon, 7)


def _altitude(gps: dict) -> float | None:
    if 6 not in gps:
        return None
    alt = _number(gps[6])
    ref = gps.get(5, 0)
    if isinstance(ref, (bytes, bytearray)):
        ref = ref[0] if ref else 0
    if ref == 1:
        alt = -alt
    if not -20_000 <= alt <= 100_000:
        raise _Issue("out_of_range")
    return round(alt, 3)


def _split_keywords(text: str | None) -> list[str]:
    if not text:
        return []
    return [k.strip()[:_MAX_TEXT] for k in re.split(r"[;,]", text) if k.strip()]


def _iptc_fields(im: Image.Image, row: dict, issues: list[str]) -> None:
    from PIL import IptcImagePlugin

    try:
        info = IptcImagePlugin.getiptcinfo(im)
    except Exception:
        issues.append("iptc:unreadable")
        return
    if not info:
        return
    words = info.get((2, 25))
    if words is not None:
        for w in (words if isinstance(words, list) else [words])[:_MAX_KEYWORDS]:
            try:
                k = _text(w)
            except _Issue:
                continue
            if k:
                row["keywords"].append(k)
    if row["title"] is None:
        for key in ((2, 5), (2, 105), (2, 120)):  # object name, headline, caption
            if info.get(key):
                try:
                    row["title"] = _text(info[key] if not isinstance(info[key], list) else info[key][0])
                except _Issue:
                    issues.append("title:bad_type")
                break


_XMP_SUBJECT = re.compile(rb"<dc:subject>(.*?)</dc:subject>", re.S)
_XMP_TITLE = re.compile(rb"<dc:title>(.*?)</dc:title>", re.S)
_XMP_LI = re.compile(rb"<rdf:li[^>]*>([^<]{0,1024})</rdf:li>")


def _xmp_fields(xmp: Any, row: dict, issues: list[str], max_block: int) -> None:
    """dc:subject (keywords) and dc:title from an XMP packet, by pattern (no XML parser, so no entity
    expansion), and only from a packet of at most ``max_block`` bytes."""
    if xmp is None:
        return
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    if not isinstance(xmp, (bytes, bytearray)):
        return
    if len(xmp) > max_block:
        issues.append("xmp:too_large")
        return
    import html

    subject = _XMP_SUBJECT.search(xmp)
    if subject:
        for li in _XMP_LI.findall(subject.group(1))[:_MAX_KEYWORDS]:
            k = html.unescape(li.decode("utf-8", "replace")).strip()[:_MAX_TEXT]
            if k:
                row["keywords"].append(k)
    title = _XMP_TITLE.search(xmp)
    if title and row["title"] is None:
        lis = _XMP_LI.findall(title.group(1))
        if lis:
            row["title"] = html.unescape(lis[0].decode("utf-8", "replace")).strip()[:_MAX_TEXT] or None


def _camera(make: str | None, model: str | None) -> str | None:
    """``make model`` without the make repeated (``Canon`` + ``Canon EOS 5D`` -> ``Canon EOS 5D``)."""
    if not model:
        return make
    if not make:
        return model
    first = make.split()[0].lower()
    return model if model.lower().startswith(first) else f"{make} {model}"
