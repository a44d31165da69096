"""Small helpers shared by the experts: working-resolution copies, map resizing and normalisation,
masks and regions from heatmaps. Pure numpy / OpenCV, no state."""

from __future__ import annotations

import cv2
import numpy as np

from experts.base import Region


def working_copy(pixels: np.ndarray, max_pixels: int = 2_000_000) -> tuple[np.ndarray, float]:
    """Downscale (area interpolation) so the image has at most max_pixels; returns (array, scale)
    where scale = working size / original size (1.0 when no resize was needed)."""
    height, width = pixels.shape[:2]
    if height * width <= max_pixels:
        return pixels, 1.0
    scale = float(np.sqrt(max_pixels / (height * width)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), scale


def fit_longest_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """Downscale (area interpolation) so the longest side is at most `side`; never enlarge."""
    height, width = pixels.shape[:2]
    if max(height, width) <= side:
        return pixels
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def resize_map(values: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D map to (height, width); float maps stay float32, bool maps stay bool."""
    height, width = shape
    if values.shape == (height, width):
        return values
    if values.dtype == bool:
        resized = cv2.resize(values.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        return resized.astype(bool)
    method = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(values.astype(np.float32), (width, height), interpolation=method)


def robust_unit(values: np.ndarray, low_pct: float = 50.0, high_pct: float = 99.5) -> np.ndarray:
    """Map values to [0, 1] float32 between two percentiles (median -> 0 by default)."""
    lo, hi = np.percentile(values, [low_pct, high_pct])
    if hi - lo < 1e-12:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def mask_from_heatmap(heatmap: np.ndarray, threshold: float = 0.5, min_fraction: float = 0.002) -> np.ndarray:
    """Threshold, clean up with a small opening/closing, and drop components under min_fraction of
    the image."""
    mask = (heatmap >= threshold).astype(np.uint8)
    if not mask.any():
        return mask.astype(bool)
    radius = max(1, round(min(mask.shape) / 200))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_fraction * mask.size
    return keep[labels]


def regions_from_mask(
    mask: np.ndarray, heatmap: np.ndarray | None, label: str, max_regions: int = 5
) -> tuple[Region, ...]:
    """Bounding boxes of the largest connected components, scored by the mean heatmap inside."""
    if not mask.any():
        return ()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:max_regions] + 1
    regions = []
    for index in order:
        x, y, w, h = (int(v) for v in stats[index, :4])
        score = float(heatmap[labels == index].mean()) if heatmap is not None else 1.0
        regions.append(Region((x, y, x + w, y + h), round(min(max(score, 0.0), 1.0), 4), label))
    return tuple(regions)


def ratio_phrase(ratio: float) -> str:
    """'3.1x' for a ratio, '0.4x' below one: for summaries."""
    return f"{ratio:.1f}x"
