"""Helpers the tests share: a random texture, encode pixels as JPEG or PNG bytes, decode bytes back to
RGB pixels, and compare masks. A plain module (not a conftest): tests import it as `from imaging
import ...`, which works because pytest puts this folder on sys.path (tests/ has no __init__.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def texture(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A fine random RGB texture of (height, width): random values blurred a little and stretched to the
    full range, so neighbouring pixels are related as in a scene (raw random noise is no scene, and the
    pixel experts decline it)."""
    from scipy.ndimage import gaussian_filter

    values = np.random.default_rng(seed).random((*shape, 3))
    values = gaussian_filter(values, sigma=(1.0, 1.0, 0))
    values = (values - values.min()) / max(float(np.ptp(values)), 1e-9)
    return (values * 255).round().astype(np.uint8)


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
