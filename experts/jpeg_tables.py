"""IJG (libjpeg) quantisation tables and quality estimation from a file's luminance table.

Two table formulas are kept because the experts were calibrated on them: `ijg_table` scales with
libjpeg's integer arithmetic (5000 // q); `IJG_TABLES_FLOAT_SCALE` scales with 5000 / q, which differs
from libjpeg in some entries for qualities below 50.
"""

from __future__ import annotations

import numpy as np

# The IJG (libjpeg) standard luminance table at quality 50, natural order; quality q scales it by
# 5000/q (q < 50) or 200 - 2q.
IJG_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)

# Tables for qualities 1..100 (index q - 1), scaled with a float 5000 / q below quality 50.
IJG_TABLES_FLOAT_SCALE = np.stack(
    [
        np.clip(np.floor((IJG_LUMA * (5000.0 / q if q < 50 else 200.0 - 2.0 * q) + 50.0) / 100.0), 1, 255)
        for q in range(1, 101)
    ]
)


def ijg_table(quality: int) -> np.ndarray:
    """The libjpeg luminance quantisation table for a quality factor in 1..100."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality  # integer, as libjpeg
    return np.clip(np.floor((IJG_LUMA * scale + 50) / 100), 1, 255)


def nearest_quality_absolute(luma_table: np.ndarray) -> int:
    """The IJG quality whose luminance table (IJG_TABLES_FLOAT_SCALE) is closest to this one in mean
    absolute difference (camera and editor tables land near the quality they behave like)."""
    errors = np.abs(IJG_TABLES_FLOAT_SCALE - np.asarray(luma_table, np.float64)).mean(axis=(1, 2))
    return int(np.argmin(errors)) + 1


def nearest_quality_relative(table: np.ndarray, known: np.ndarray | None = None) -> tuple[int, float]:
    """Nearest IJG quality (ijg_table) to a luma table, only where `known` is True, and the mean
    relative error of that match: near 0 for a libjpeg table, larger for camera or Photoshop tables."""
    known = np.ones((8, 8), bool) if known is None else known
    best = (50, np.inf)
    for quality in range(1, 101):
        reference = ijg_table(quality)[known]
        error = float(np.mean(np.abs(reference - table[known]) / reference))
        if error < best[1]:
            best = (quality, error)
    return best
