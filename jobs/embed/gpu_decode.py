"""JPEG decode and resize on the GPU for the CUDA embed path, with the CPU decoder as fallback.

**Not verified on a GPU** (no session of this repository has had one with torchvision installed;
see README, "GPU"). torchvision's ``decode_jpeg(..., device="cuda")`` (nvJPEG) decodes a list of
JPEGs in one call on the device; the preprocessing of :mod:`jobs.embed.decode` follows on the
device: the same source box (:func:`jobs.embed.decode._crop_box`) cut at whole pixels, then an
antialiased bilinear resize to the model's input (``torch.nn.functional.interpolate(...,
antialias=True)``, PIL's filter in spirit; the embeddings are expected to stay at cosine >= 0.99
of the CPU path's and ``tests/bench/bench_gpu.py`` prints the figure).

Falls back to the CPU decoder, per image: files that are not baseline/progressive JPEGs, JPEGs
with an EXIF orientation other than 1 (nvJPEG does not apply it), CMYK/greyscale JPEGs nvJPEG
refuses, and everything when torchvision or its device decoder is missing. A file the CPU decoder
rejects becomes the usual :class:`jobs.embed.decode.ImageRejected`.
"""

from __future__ import annotations

import io
import math

import numpy as np

from jobs.embed.decode import ImageRejected, _crop_box, decode_image

__all__ = ["gpu_decode_available", "decode_batch"]

_AVAILABLE: dict[str, bool] = {}


def gpu_decode_available(device: str = "cuda") -> bool:
    """Whether torchvision can decode JPEGs on ``device`` in this process (probed once)."""
    if device not in _AVAILABLE:
        ok = False
        try:
            import torch
            import torchvision.io as tvio

            if torch.cuda.is_available() and hasattr(tvio, "decode_jpeg"):
                from PIL import Image

                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
                data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
                out = tvio.decode_jpeg([data], device=device, mode=tvio.ImageReadMode.RGB)
                ok = out[0].shape == (3, 16, 16)
        except Exception:  # ImportError, a CPU-only torchvision build, no nvJPEG: the CPU decodes
            ok = False
        _AVAILABLE[device] = ok
    return _AVAILABLE[device]


def _needs_cpu(data: bytes, max_pixels: int) -> tuple[bool, tuple[int, int] | None]:
    """(True, None) unless ``data`` is a JPEG nvJPEG can take as it is; else (False, (w, h))."""
    from PIL import Image

    if data[:2] != b"\xff\xd8":
        return True, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("RGB", "L") or im.width * im.height > max_pixels:
                return True, None
            if im.getexif().get(0x0112, 1) != 1:
                return True, None
            return False, im.size
    except Exception:
        return True, None


def _resize_on_device(chw, size: int, crop_fraction: float):
    import torch.nn.functional as F

    _, h, w = chw.shape
    left, top, right, bottom = _crop_box((w, h), size, crop_fraction)
    x0, y0 = int(math.floor(left)), int(math.floor(top))
    x1, y1 = max(x0 + 1, int(math.ceil(right))), max(y0 + 1, int(math.ceil(bottom)))
    crop = chw[:, y0:y1, x0:x1].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(dtype=chw.dtype)[0].permute(1, 2, 0)  # HWC uint8


def decode_batch(datas: list[bytes], size: int, crop_fraction: float, device: str = "cuda", *,
                 max_pixels: int = 100_000_000) -> list:
    """Each of ``datas`` as a uint8 ``[size, size, 3]`` tensor on ``device``, or the
    :class:`ImageRejected` the CPU decoder raised for it; input order."""
    import torch

    out: list = [None] * len(datas)
    gpu_idx = []
    for i, data in enumerate(datas):
        cpu, _ = _needs_cpu(data, max_pixels)
        if cpu or not gpu_decode_available(device):
            try:
                out[i] = torch.from_numpy(np.array(decode_image(data, size, crop_fraction, max_pixels=max_pixels))).to(device)
            except ImageRejected as e:
                out[i] = e
        else:
            gpu_idx.append(i)
    if gpu_idx:
        import torchvision.io as tvio

        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu_idx]
        try:
            decoded = tvio.decode_jpeg(tensors, device=device, mode=tvio.ImageReadMode.RGB)
        except RuntimeError:  # one bad file fails the batched call: decode one by one
            decoded = []
            for t in tensors:
                try:
                    decoded.append(tvio.decode_jpeg(t, device=device, mode=tvio.ImageReadMode.RGB))
                except RuntimeError:
                    decoded.append(None)
        for i, chw in zip(gpu_idx, decoded):
            if chw is None:
                try:
                    out[i] = torch.from_numpy(np.array(decode_image(datas[i], size, crop_fraction,
                                                                    max_pixels=max_pixels))).to(device)
                except ImageRejected as e:
                    out[i] = e
            else:
                out[i] = _resize_on_device(chw, size, crop_fraction)
    return out


def stack(images: list) -> "object":
    """Stack tensors (device) or arrays (host) of one batch."""
    if images and not isinstance(images[0], np.ndarray):
        import torch

        return torch.stack(images)
    return np.stack(images)
