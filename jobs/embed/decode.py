"""Original file -> model input: ``uint8 [size, size, 3]`` RGB, the way the torch reference sees it.

The preprocessing is the usual evaluation transform: apply EXIF orientation, resize the shorter side
to ``size / crop_fraction`` (256 for 224) with PIL's antialiased bilinear filter, centre-crop
``size``. It is done as one resample of exactly the source box that transform reads
(``resize(box=)``), which gives the same pixels for less work.

JPEGs are decoded at reduced size where that changes little: ``draft()`` lets libjpeg scale by
1/2, 1/4 or 1/8 in the DCT, and is asked for a shorter side of at least twice ``size /
crop_fraction`` px, so PIL's antialiased resample still does the last >= 2x of the reduction
(DCT scaling straight to the target size moved embeddings to cosine ~0.97 of the reference; with
the 2x margin they stay >= 0.999). A 4000x3000 photo decodes at 1000x750 (16x fewer pixels); a
1024x768 or smaller one is decoded in full.

Failures raise :class:`ImageRejected` with a short reason for the ``rejects`` table.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lake.staging import filesystem_for

__all__ = ["ImageRejected", "read_bytes", "decode_image", "load_image"]


class ImageRejected(Exception):
    """This input cannot be embedded. ``reason`` is a short code (not_found, unreadable,
    decode_error, too_large); the message is the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_bytes(uri: str) -> bytes:
    """The original file's bytes, from a local path or any URI pyarrow has a filesystem for."""
    try:
        if "://" not in uri:
            with open(uri, "rb") as f:
                return f.read()
        fs, path = filesystem_for(uri)
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageRejected("not_found", f"{uri}: {e.strerror or e}") from None
    except (OSError, ValueError) as e:
        raise ImageRejected("unreadable", f"{uri}: {e}") from None


def decode_image(data: bytes, size: int, crop_fraction: float = 0.875, *,
                 max_pixels: int = 100_000_000, draft: bool = True) -> np.ndarray:
    """Decode and preprocess; ``draft=False`` decodes JPEGs at full size (the reference path).

    Raises:
        ImageRejected: not an image PIL can decode, or more than ``max_pixels`` pixels.
    """
    try:
        with warnings.catch_warnings():
            # max_pixels is checked below from the header, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageRejected("too_large", f"{w}x{h} pixels is over the limit of {max_pixels}")
                if draft and im.format == "JPEG":
                    # keep >= 2x the resample's output: DCT scaling alone is cruder than PIL's filter
                    scale = min(w, h) / (2 * math.ceil(size / crop_fraction))
                    if scale >= 2:
                        im.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
                im = ImageOps.exif_transpose(im)
                if im.mode != "RGB":
                    im = im.convert("RGB")
                out = im.resize((size, size), Image.Resampling.BILINEAR, box=_crop_box(im.size, size, crop_fraction))
                return np.asarray(out, dtype=np.uint8)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageRejected("decode_error", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageRejected("decode_error", f"{type(e).__name__}: {e}") from None


def _crop_box(wh: tuple[int, int], size: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The source box that "resize the shorter side to round(size / crop_fraction), then crop the
    centre ``size`` square at integer offsets" reads, so one resample gives the same pixels.

    Sub-pixel placement matters: a half-pixel shift of the crop moved embeddings to cosine ~0.997.
    """
    w, h = wh
    short = round(size / crop_fraction)
    rw, rh = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
    sx, sy = w / rw, h / rh
    left, top = (rw - size) // 2, (rh - size) // 2
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def load_image(uri: str, size: int, crop_fraction: float = 0.875, *, max_pixels: int = 100_000_000,
               draft: bool = True) -> np.ndarray:
    return decode_image(read_bytes(uri), size, crop_fraction, max_pixels=max_pixels, draft=draft)
