"""Reading one image file at ingest: validate, measure, and make thumbnails — or say why not.

Every failure is a :class:`Rejected` with a stable ``reason`` code (the ``rejects.reason`` column)
and a human ``detail``. Nothing here raises anything else for bad input.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Rejected", "ImageInfo", "Thumbnail", "inspect_image", "ACCEPTED_FORMATS", "REASONS"]

# Formats a browser can show and the embedder can decode; others are rejected as unsupported.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

REASONS = {
    "empty": "the file has zero bytes",
    "too_large": "the file is larger than max_image_bytes",
    "unreadable": "the file could not be read (permissions, I/O error, vanished)",
    "not_an_image": "no image format recognised the bytes",
    "unsupported_format": "an image format imagelake does not accept",
    "too_many_pixels": "more pixels than max_image_pixels (decompression-bomb guard)",
    "truncated": "the image data ends early or is corrupt",
}

_ORIENTATION = 0x0112


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Thumbnail:
    size: int
    width: int
    height: int
    jpeg: bytes


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    format: str
    width: int
    height: int
    thumbnails: tuple[Thumbnail, ...]


def inspect_image(data: bytes, *, max_pixels: int, thumbnail_sizes: tuple[int, ...] = (64, 256),
                  quality: int = 85) -> ImageInfo:
    """Validate ``data`` and return its id (sha256 hex), format, oriented size and JPEG thumbnails.

    JPEGs are decoded at a reduced scale (``draft``) just large enough for the biggest thumbnail,
    which is most of the speed of ingest; the whole stream is still decoded, so truncation is found.

    Raises:
        Rejected: with one of :data:`REASONS`.
    """
    if not data:
        raise Rejected("empty", REASONS["empty"])
    image_id = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise Rejected("too_many_pixels", str(e)) from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", REASONS["not_an_image"]) from None
        except (OSError, ValueError, SyntaxError) as e:
            raise Rejected("truncated", f"cannot parse the header: {e}") from None
        fmt = im.format or "UNKNOWN"
        if fmt not in ACCEPTED_FORMATS:
            raise Rejected("unsupported_format", f"format {fmt} is not accepted; accepted: "
                           f"{', '.join(sorted(ACCEPTED_FORMATS))}")
        width, height = im.size
        if width <= 0 or height <= 0:
            raise Rejected("truncated", f"impossible size {width}x{height}")
        if width * height > max_pixels:
            raise Rejected("too_many_pixels", f"{width}x{height} = {width * height} pixels is more than "
                           f"max_image_pixels={max_pixels}")
        try:
            orientation = im.getexif().get(_ORIENTATION, 1)
        except Exception:  # a broken EXIF block is not a broken image
            orientation = 1
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        if fmt in ("JPEG", "MPO"):
            # The largest thumbnail's box, in the stored (unrotated) orientation: libjpeg then
            # decodes at the smallest 1/2, 1/4 or 1/8 scale that still covers it.
            biggest = max(thumbnail_sizes)
            sw, sh = im.size
            scale = min(1.0, biggest / max(sw, sh))
            im.draft("RGB", (max(1, math.ceil(sw * scale)), max(1, math.ceil(sh * scale))))
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise Rejected("too_many_pixels", str(e)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise Rejected("truncated", f"cannot decode: {e}") from None
        rgb = _to_rgb(im)
        thumbs = tuple(_thumbnail(rgb, s, quality) for s in sorted(thumbnail_sizes))
    return ImageInfo(image_id, "JPEG" if fmt == "MPO" else fmt, width, height, thumbs)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")


def _thumbnail(rgb: Image.Image, size: int, quality: int) -> Thumbnail:
    t = rgb.copy()
    t.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    buf = io.BytesIO()
    t.save(buf, "JPEG", quality=quality, optimize=False)
    return Thumbnail(size, t.width, t.height, buf.getvalue())
