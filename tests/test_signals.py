"""Derived signals: capture metadata at ingest, image quality, outliers and keyword search.

One module-scoped lake (built once: ingest with capture metadata, embed, index, quality, outliers,
tag, on the session's Spark) serves the lake-level tests; the EXIF reader's tests need no lake.
"""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from jobs.capture.exif import read_capture

UTC = dt.timezone.utc
MiB = 1 << 20


def _photo(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(1, 3)) % 256, (yy * rng.uniform(1, 3)) % 256, ((xx + yy) * 0.7) % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _full_exif() -> Image.Exif:
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = "Canon", "Canon EOS 5D Mark IV", 1
    sub = ex.get_ifd(0x8769)
    sub[0x9003], sub[0x9011], sub[0x9291] = "2021:07:14 18:30:05", "+02:00", "25"
    sub[0x829A], sub[0x829D], sub[0x8827] = IFDRational(1, 250), IFDRational(28, 10), 400
    sub[0x920A], sub[0xA434] = IFDRational(50, 1), "EF50mm f/1.8 STM"
    gps = ex.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(48, 1), IFDRational(51, 1), IFDRational(2964, 100))
    gps[3], gps[4] = "W", (IFDRational(2, 1), IFDRational(17, 1), IFDRational(4008, 100))
    gps[5], gps[6] = b"\x01", IFDRational(35, 2)
    ex[0x9C9E] = "espresso;morning".encode("utf-16-le") + b"\x00\x00"
    ex[0x9C9B] = "Coffee break".encode("utf-16-le") + b"\x00\x00"
    return ex


def _maker_note_exif() -> Image.Exif:
    """Nikon D850, a bad date (month 13) and a 1 MB maker note."""
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0132] = "Nikon", "D850", "2023:13:45 99:00:00"
    ex[0x927C] = b"M" * MiB
    return ex


def _save(im: Image.Image, fmt: str, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


def _corrupt_exif_ifd(jpeg: bytes) -> bytes:
    """The JPEG with its Exif sub-IFD pointer (tag 0x8769, big-endian TIFF header) set past the end."""
    data = bytearray(jpeg)
    i = data.find(b"\x87\x69\x00\x04")
    assert i > 0
    data[i + 8:i + 12] = (0x7FFFFFF0).to_bytes(4, "big")
    return bytes(data)


def test_exif_of_a_jpeg_written_by_pillow_is_read_field_by_field():
    row = read_capture(_save(_photo(1), "JPEG", _full_exif()), "a" * 64, max_block_bytes=MiB)
    assert row["taken_at"] == dt.datetime(2021, 7, 14, 16, 30, 5, 250000, tzinfo=UTC)  # 18:30 at +02:00
    assert row["taken_offset"] == "+02:00"
    assert (row["make"], row["model"], row["camera"]) == ("Canon", "Canon EOS 5D Mark IV", "Canon EOS 5D Mark IV")
    assert (row["lens"], row["focal_mm"], row["exposure_s"], row["f_number"], row["iso"]) == \
        ("EF50mm f/1.8 STM", 50.0, 0.004, 2.8, 400)
    assert row["gps_lat"] == pytest.approx(48.8582333) and row["gps_lon"] == pytest.approx(-2.2944667)
    assert row["gps_alt"] == -17.5 and row["has_gps"] is True and row["orientation"] == 1
    assert row["keywords"] == ["espresso", "morning"] and row["title"] == "Coffee break"
    assert row["issues"] == []


def test_hostile_exif_leaves_fields_null_with_a_reason_and_never_raises():
    tiff = read_capture(_save(_photo(2), "TIFF", _maker_note_exif()), "b" * 64, max_block_bytes=MiB)
    assert tiff["camera"] == "Nikon D850" and tiff["taken_at"] is None  # 1 MB maker note read past
    assert tiff["issues"] == ["taken_at:bad_date"]
    png = read_capture(_save(_photo(3), "PNG", _maker_note_exif()), "c" * 64, max_block_bytes=MiB)
    assert png["make"] is None and png["issues"] == ["exif:too_large"]  # a 1 MB eXIf block over the cap
    broken = read_capture(_corrupt_exif_ifd(_save(_photo(4), "JPEG", _full_exif())), "d" * 64, max_block_bytes=MiB)
    assert broken["camera"] == "Canon EOS 5D Mark IV" and broken["has_gps"]      # the other IFDs still read
    assert broken["taken_at"] is None and broken["exposure_s"] is None
    assert "exif_ifd:bad_offset" in broken["issues"]
    ex = _full_exif()
    ex.get_ifd(0x8769)[0x920A] = IFDRational(5, 0)
    ex.get_ifd(0x8825)[2] = (IFDRational(95, 1), IFDRational(0, 1), IFDRational(0, 1))
    bad = read_capture(_save(_photo(5), "JPEG", ex), "e" * 64, max_block_bytes=MiB)
    assert bad["focal_mm"] is None and bad["gps_lat"] is None and not bad["has_gps"]
    assert {"focal_mm:zero_denominator", "gps:out_of_range"} <= set(bad["issues"])
    assert read_capture(b"not an image", "f" * 64, max_block_bytes=MiB)["issues"] == ["image:unreadable"]
    plain = read_capture(_save(_photo(6), "JPEG"), "0" * 64, max_block_bytes=MiB)
    assert plain["issues"] == [] and plain["camera"] is None and plain["keywords"] == []
