"""Metadata of a JPEG without decoding it: its EXIF, XMP and IPTC segments, and a small EXIF reader.

Reading capture metadata through Pillow opens the image a second time at ingest and builds every
tag of every IFD (a maker note included) as Python objects; that was most of the ingest time that
capture metadata added. :func:`jpeg_metadata` walks the JPEG's marker segments up to the start of
scan, keeping the blocks Pillow would keep (``info["exif"]``: the ``Exif`` APP1 segments
concatenated; ``info["xmp"]``: the last XMP packet), and :class:`ExifBlock` reads the TIFF
structure inside the EXIF block lazily: each IFD's entry table is read once, a tag's value is
decoded only when asked for, and an IFD pointer is followed only when asked for.

Both keep Pillow's semantics (``PIL.Image.Exif`` and ``ImageFileDirectory_v2`` as of Pillow 13): a
tag of an unknown type or of no data is skipped; a tag whose data runs past the block, or a
truncated entry table, ends the IFD there (the entries before it are kept); the first of two
entries with one tag wins; single values are unwrapped. Rationals are read as floats (what the
capture fields make of Pillow's ``IFDRational``). Anything they do not handle the same way (a
BigTIFF or malformed header, a segment running past the end, no frame header before the scan)
makes them answer ``None`` or raise ``ValueError``, and the caller reads the image through Pillow.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from PIL import TiffTags

__all__ = ["JpegMetadata", "jpeg_metadata", "ExifBlock"]

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset(range(0xD0, 0xD9))  # RSTn and SOI: no length
_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass(frozen=True)
class JpegMetadata:
    exif: bytes | None      # Pillow's info["exif"]
    xmp: bytes | None       # Pillow's info["xmp"]
    photoshop: bool         # an APP13 "Photoshop 3.0" segment (IPTC) is present


def jpeg_metadata(data: bytes) -> JpegMetadata | None:
    """The metadata segments of a JPEG, or None when ``data`` is not a JPEG this walk is sure of."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    exif: bytes | None = None
    xmp: bytes | None = None
    photoshop = frame = False
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return None
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker < 0xC0:  # no marker Pillow knows (it refuses the file)
            return None
        if marker in (0xDA, 0xD9):  # start of scan (Pillow stops reading markers here), end of image
            return JpegMetadata(exif, xmp, photoshop) if marker == 0xDA and frame else None
        if pos + 2 > end:
            return None
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2 or pos + length > end:
            return None
        if marker == 0xE1:
            segment = data[pos + 2:pos + length]
            if segment.startswith(b"Exif\x00\x00"):
                exif = segment if exif is None else exif + segment[6:]
            elif segment.startswith(_XMP_ID):
                xmp = segment[len(_XMP_ID):]
        elif marker == 0xED and data.startswith(b"Photoshop 3.0\x00", pos + 2):
            photoshop = True
        elif marker in _SOF:
            if length < 8 or data[pos + 2] != 8 or data[pos + 7] not in (1, 3, 4):
                return None  # a frame Pillow refuses (not 8-bit, not 1/3/4 components)
            frame = True
        pos += length
    return None


# type -> (bytes per value, struct code); Pillow's registered loaders
_TYPES = {1: (1, ""), 2: (1, ""), 3: (2, "H"), 4: (4, "L"), 5: (8, "L"), 6: (1, "b"), 7: (1, ""),
          8: (2, "h"), 9: (4, "l"), 10: (8, "l"), 11: (4, "f"), 12: (8, "d"), 13: (4, "L"), 16: (8, "Q")}
_EXIF_IFD, _GPS_IFD, _ORIENTATION = 0x8769, 0x8825, 0x0112
_NAN = float("nan")
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


class _Ifd:
    """One IFD's entries: tag -> (type, count, data offset in the block, size); values decoded on get."""

    def __init__(self, block: bytes, endian: str, offset: int, group: int | None):
        self._block, self._endian, self._group = block, endian, group
        self._entries: dict[int, tuple[int, int, int, int]] = {}
        self._values: dict[int, Any] = {}
        end = len(block)
        if offset + 2 > end:
            return  # Pillow: the entry count cannot be read, an empty IFD
        (count,) = struct.unpack_from(endian + "H", block, offset)
        n = min(count, (end - offset - 2) // 12)  # a truncated table keeps the entries before the cut
        total = 0
        for i, (tag, typ, num, inline) in enumerate(struct.iter_unpack(endian + "HHL4s",
                                                                       block[offset + 2:offset + 2 + 12 * n])):
            if tag in self._entries or typ not in _TYPES:
                continue
            size = num * _TYPES[typ][0]
            if size > 4:
                (start,) = struct.unpack(endian + "L", inline)
                total += size
                if total > end:  # Pillow: more tag data than the block holds, the tag is skipped
                    continue
                if start + size > end:  # Pillow: a truncated read ends the IFD here
                    break
            else:
                start = offset + 2 + 12 * i + 8
            if size:
                self._entries[tag] = (typ, num, start, size)

    def __contains__(self, tag: object) -> bool:
        return tag in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, tag: int) -> Any:
        if tag not in self._values:
            self._values[tag] = self._decode(tag, *self._entries[tag])
        return self._values[tag]

    def get(self, tag: int, default: Any = None) -> Any:
        return self[tag] if tag in self._entries else default

    def _decode(self, tag: int, typ: int, num: int, start: int, size: int) -> Any:
        if typ in (1, 7):
            return self._block[start:start + size]
        if typ == 2:
            raw = self._block[start:start + size]
            return (raw[:-1] if raw.endswith(b"\x00") else raw).decode("latin-1", "replace")
        rational = typ in (5, 10)
        values: Any = struct.unpack_from(f"{self._endian}{num * 2 if rational else num}{_TYPES[typ][1]}",
                                         self._block, start)
        if rational:  # as float(IFDRational): the correctly rounded quotient, NaN over zero
            values = tuple([a / b if b else _NAN for a, b in zip(values[::2], values[1::2])])
        if len(values) == 1 or TiffTags.lookup(tag, self._group).length == 1:
            return values[0]
        return values


class ExifBlock(_Ifd):
    """IFD0 of an EXIF block (Pillow's ``Image.Exif``): ``get``, ``in``, ``len`` and ``get_ifd``."""

    def __init__(self, block: bytes | None, xmp: bytes | None = None):
        """``block``: Pillow's ``info["exif"]`` (None: no EXIF, an empty IFD0); ``xmp``: its ``info["xmp"]``.

        Raises:
            ValueError: a header Pillow would read differently (read the image through Pillow).
        """
        tiff, endian, first = b"", "<", 0
        if block is not None:
            tiff = block[6:] if block.startswith(b"Exif\x00\x00") else block
            if tiff.startswith(b"Exif\x00\x00"):  # Pillow strips the prefix up to twice
                tiff = tiff[6:]
            head = tiff[:4]
            if head == b"II*\x00":
                endian = "<"
            elif head == b"MM\x00*":
                endian = ">"
            else:
                raise ValueError("not a classic TIFF header")
            if len(tiff) < 8:
                raise ValueError("short TIFF header")
            (first,) = struct.unpack_from(endian + "L", tiff, 4)
        super().__init__(tiff, endian, first if block is not None else len(tiff), None)
        if _ORIENTATION not in self._entries and xmp:
            m = _XMP_ORIENTATION.search(xmp)  # Pillow's getexif reads the orientation from XMP too
            if m:
                self._entries[_ORIENTATION] = (0, 0, 0, 0)
                self._values[_ORIENTATION] = int(m[2])

    def get_ifd(self, tag: int) -> "_Ifd | dict":
        """The Exif (0x8769) or GPS (0x8825) IFD; empty when the pointer leads nowhere."""
        offset = self.get(tag)
        if not isinstance(offset, int) or isinstance(offset, bool):
            return {}
        if offset < 0:
            raise ValueError("negative IFD offset")
        return _Ifd(self._block, self._endian, offset, tag)
