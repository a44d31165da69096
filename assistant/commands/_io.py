"""Reading and writing image files for the sub-commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from experts.base import ForensicsError

JPEG_SUFFIXES = {".jpg", ".jpeg"}


def save_pixels(pixels: np.ndarray, path: Path, quality: int = 95) -> None:
    """Write RGB pixels: JPEG (at `quality`, 4:4:4) for .jpg/.jpeg, otherwise by suffix (PNG, WEBP, ...)."""
    image = Image.fromarray(pixels)
    try:
        if path.suffix.lower() in JPEG_SUFFIXES:
            image.save(path, "JPEG", quality=quality, subsampling=0)
        else:
            image.save(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ForensicsError(f"{path}: cannot write the image ({exc}); use a .png or .jpg name") from exc
