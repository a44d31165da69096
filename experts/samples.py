"""Deterministic example images made from scikit-image's bundled photos: an authentic JPEG, a
splice and a copy-move forgery, each with its ground-truth mask. Used by the demo (`forensics
analyze` with no arguments), the tests and the UI's examples. Not training data."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True, eq=False)
class Sample:
    name: str
    data: bytes  # encoded file, as a user would upload it
    mask: np.ndarray  # bool HxW, True where manipulated
    description: str


def _jpeg(pixels: np.ndarray, quality: int, subsampling: int = 2) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def authentic() -> Sample:
    """scikit-image's coffee photo, compressed once at quality 85."""
    from skimage import data

    pixels = data.coffee()
    return Sample(
        "authentic_coffee.jpg",
        _jpeg(pixels, 85),
        np.zeros(pixels.shape[:2], bool),
        "an untouched photo compressed once as JPEG (quality 85)",
    )


def splice() -> Sample:
    """The cat's head from `chelsea` pasted into `coffee`: the host was a quality-70 JPEG, the donor
    a quality-95 JPEG with its own noise, pasted off the 8x8 grid, and the result re-saved at 90."""
    from skimage import data

    host = _decode(_jpeg(data.coffee(), 70))
    donor = data.chelsea().astype(np.float32)
    donor += np.random.default_rng(0).normal(0, 3.0, donor.shape)
    donor = _decode(_jpeg(np.clip(donor, 0, 255).astype(np.uint8), 95))
    patch = donor[40:200, 120:300]
    y, x = 101, 37  # not multiples of 8: the donor's JPEG grid is misaligned with the host's
    yy, xx = np.mgrid[: patch.shape[0], : patch.shape[1]]
    ellipse = ((yy - patch.shape[0] / 2) / (patch.shape[0] / 2)) ** 2 + (
        (xx - patch.shape[1] / 2) / (patch.shape[1] / 2)
    ) ** 2 <= 1.0
    result = host.copy()
    region = result[y : y + patch.shape[0], x : x + patch.shape[1]]
    region[ellipse] = patch[ellipse]
    mask = np.zeros(host.shape[:2], bool)
    mask[y : y + patch.shape[0], x : x + patch.shape[1]] = ellipse
    return Sample(
        "splice_coffee_cat.jpg",
        _jpeg(result, 90),
        mask,
        "a cat's head from another photo pasted into a coffee photo, then re-saved as JPEG",
    )


def copy_move() -> Sample:
    """A block of `astronaut` copied to another place in the same photo, re-saved at quality 90."""
    from skimage import data

    pixels = _decode(_jpeg(data.astronaut(), 80))
    result = pixels.copy()
    (sy, sx), (ty, tx), (h, w) = (0, 378), (30, 298), (150, 72)
    result[ty : ty + h, tx : tx + w] = pixels[sy : sy + h, sx : sx + w]
    mask = np.zeros(pixels.shape[:2], bool)
    mask[ty : ty + h, tx : tx + w] = True
    return Sample(
        "copy_move_astronaut.jpg",
        _jpeg(result, 90),
        mask,
        "the toy rocket in the astronaut photo duplicated onto the wall beside it (the mask marks the copy)",
    )


SAMPLES = {"authentic": authentic, "splice": splice, "copy_move": copy_move}
