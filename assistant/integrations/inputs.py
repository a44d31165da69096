"""Images in and out of the integrations: an image arrives as a file path, base64 or a data: URL;
masks and heatmaps leave as PNG bytes or base64."""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.report import heatmap_png, mask_png
from experts.base import InvalidImageError
from experts.image import LoadedImage, load_image

IMAGE_ARGUMENT = (
    "The image: a local file path, a base64 string of the file's bytes, or a data: URL "
    "(data:image/png;base64,...)."
)
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def open_image(image: str | bytes | Path | LoadedImage, max_pixels: int | None = None) -> LoadedImage:
    """A LoadedImage from a path, base64, a data URL or bytes; InvalidImageError says what is wrong."""
    if isinstance(image, (LoadedImage, bytes, bytearray)):
        return load_image(image, max_pixels=max_pixels)
    text = str(image).strip()
    if not text:
        raise InvalidImageError("no image given: pass a file path or the file's bytes as base64")
    if _DATA_URL.match(text):
        return load_image(_b64decode(text.split(",", 1)[1]), max_pixels=max_pixels, name="<data URL>")
    if (
        len(text) < 4096
        and ("/" in text or "\\" in text or "." in text[-6:])
        and Path(text).expanduser().exists()
    ):
        return load_image(Path(text).expanduser(), max_pixels=max_pixels)
    if len(text) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s_-]+", text):
        return load_image(_b64decode(text), max_pixels=max_pixels, name="<base64>")
    return load_image(Path(text), max_pixels=max_pixels)  # InvalidImageError: no such file


def _b64decode(text: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"the image is neither a file path nor valid base64 ({exc})") from exc


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def mask_base64(mask: np.ndarray) -> str:
    return base64.b64encode(png_bytes(mask_png(mask))).decode()


def heatmap_base64(heatmap: np.ndarray) -> str:
    return base64.b64encode(png_bytes(heatmap_png(heatmap))).decode()
