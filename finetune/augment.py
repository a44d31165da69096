"""Post-processing that every training image goes through, so a model learns traces of editing rather
than the container (quantisation tables, chroma subsampling, file size, resolution): JPEG
re-compression, resizing, blur and noise, applied alike to every class."""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image


def recompress(image: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    """Encode as JPEG at this quality (subsampling 0 = 4:4:4, 2 = 4:2:0) and decode again."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(quality), subsampling=subsampling)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def rescale(image: np.ndarray, scale: float, mask: np.ndarray | None = None):
    """Resize by `scale` (area when shrinking, cubic when enlarging); the mask follows (nearest)."""
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(image, size, interpolation=interpolation)
    if mask is None:
        return resized, None
    return resized, cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


@dataclass(frozen=True)
class PostProcess:
    """A random chain over the whole image: resize, blur, noise, then JPEG at a random quality."""

    jpeg_quality: tuple[int, int] = (50, 100)
    p_jpeg: float = 0.9
    scale: tuple[float, float] = (0.5, 1.0)
    p_resize: float = 0.5
    p_blur: float = 0.15
    p_noise: float = 0.15

    def __call__(self, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray | None = None):
        if rng.random() < self.p_resize:
            image, mask = rescale(image, float(rng.uniform(*self.scale)), mask)
        if rng.random() < self.p_blur:
            image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, 1.0)))
        if rng.random() < self.p_noise:
            noise = rng.normal(0.0, float(rng.uniform(1.0, 4.0)), image.shape)
            image = np.clip(image + noise, 0, 255).astype(np.uint8)
        if rng.random() < self.p_jpeg:
            quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
            image = recompress(image, quality, subsampling=int(rng.choice([0, 2])))
        return image, mask
