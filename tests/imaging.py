"""Helpers the tests share: encode pixels as JPEG or PNG bytes, decode bytes back to RGB pixels, and
compare masks. A plain module (not a conftest): tests import it as `from imaging import ...`, which
works because pytest puts this folder on sys.path (tests/ has no __init__.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    """The pixels as a JPEG file, saved by PIL at this quality (its default chroma subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """The pixels as a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    """An encoded image's pixels as an RGB uint8 array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    return float((a & b).sum() / max((a | b).sum(), 1))
