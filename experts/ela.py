"""Error level analysis (ELA). Follows N. Krawetz, "A picture's worth... Digital image analysis and
forensics", Black Hat Briefings 2007.

Re-saving a JPEG at the quality it was last compressed with changes it little; a region with a different
compression history (pasted from another photo, resampled, painted) changes more. We re-save the image at
the quality where its error curve dips (the likely earlier compression, as in H. Farid's "JPEG ghosts",
IEEE TIFS 2009), average the absolute difference over channels and 16x16 windows, divide by the image's
own median error (so photos of any quality compare) and by local texture (busy areas always re-compress
worse), and look for the region that stands out.

Score: probability-like strength of the strongest outlier region: a logistic of how many times more
error it re-compresses with than the rest of the image, fitted on CASIA v1 train images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from experts.base import Evidence, not_applicable
from experts.image import LoadedImage
from experts.maps import mask_from_heatmap, ratio_phrase, regions_from_mask, resize_map, working_copy

# IJG (libjpeg) base luminance table: quality q scales it by 5000/q (q < 50) or 200 - 2q.
_IJG_LUMA = np.array(
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


def ijg_table(quality: int) -> np.ndarray:
    """The luminance quantisation table libjpeg writes at this quality (1-100)."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((_IJG_LUMA * scale + 50.0) / 100.0), 1, 255)


def estimate_jpeg_quality(luma_table: np.ndarray) -> int:
    """The IJG quality whose table is closest to this one (camera and Photoshop tables land near it)."""
    errors = [np.abs(ijg_table(q) - luma_table).mean() for q in range(1, 101)]
    return int(np.argmin(errors)) + 1


def resave_error(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Per-pixel absolute difference (mean over RGB) between the image and its JPEG re-save."""
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a JPEG at quality {quality}")
    resaved = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    # Channel order does not matter for a mean absolute difference, so BGR/RGB are never swapped.
    return cv2.absdiff(pixels, resaved).astype(np.float32).mean(axis=2)


def _grid_aligned_crop(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """A central crop whose corner sits on the 8x8 JPEG grid, so re-saving it behaves like the whole."""
    height, width = pixels.shape[:2]
    top = ((height - min(height, max_side)) // 2) // 8 * 8
    left = ((width - min(width, max_side)) // 2) // 8 * 8
    return pixels[top : top + max_side, left : left + max_side]


@dataclass(frozen=True)
class ErrorLevelAnalysis:
    name = "ela"
    version = "1"
    description = (
        "Error level analysis: re-saves the JPEG and maps regions that re-compress with more error than "
        "the rest, a sign of a different compression history."
    )
    qualities: tuple[int, ...] = (50, 55, 60, 65, 70, 75, 80, 85, 90, 95)
    window: int = 16  # smoothing window in pixels: two JPEG blocks
    texture_power: float = 0.5  # how strongly to discount busy areas (0 = plain ELA)
    min_side: int = 32
    max_pixels: int = 2_000_000
    # Logistic from log(region / rest error ratio) to score, fitted on CASIA v1 train.
    logistic_center: float = math.log(2.5)
    logistic_slope: float = 4.0

    def analyze(self, image: LoadedImage) -> Evidence:
        height, width = image.height, image.width
        if min(height, width) < self.min_side:
            return not_applicable(
                self.name, f"The image is too small for error level analysis ({width}x{height} pixels; "
                f"it needs at least {self.min_side} on each side).", self.version
            )
        pixels = np.ascontiguousarray(image.pixels)
        file_quality = estimate_jpeg_quality(image.quantization[0]) if image.quantization.get(0) is not None else 100
        quality, error_curve = self._choose_quality(pixels, file_quality)
        error = resave_error(pixels, quality)
        # ELA needs the stored pixel grid, so it runs at full size; only the map is downscaled.
        error, scale = working_copy(error, self.max_pixels)
        gray, _ = working_copy(image.gray, self.max_pixels)
        window = max(3, round(self.window * scale))
        level = cv2.blur(error, (window, window))
        texture = cv2.blur(np.abs(cv2.Laplacian(gray, cv2.CV_32F)), (window, window))
        normalised = level / (np.median(level) + 0.25) / (texture + np.median(texture) + 1.0) ** self.texture_power
        return self._evidence(image, level, normalised, quality, file_quality, error_curve)

    def _choose_quality(self, pixels: np.ndarray, file_quality: int) -> tuple[int, dict[int, float]]:
        """The re-save quality at which the mean error dips most below its neighbours: the likely earlier
        compression. Qualities at or above the file's own are skipped (re-saving there changes nothing)."""
        crop = _grid_aligned_crop(pixels, 1024)
        candidates = [q for q in self.qualities if q <= file_quality - 3] or [min(self.qualities)]
        curve = {q: float(resave_error(crop, q).mean()) for q in self.qualities}

        def dip(q: int) -> float:
            index = self.qualities.index(q)
            neighbours = [curve[self.qualities[j]] for j in (index - 1, index + 1) if 0 <= j < len(curve)]
            return curve[q] / (float(np.mean(neighbours)) + 1e-3)

        return min(candidates, key=dip), curve

    def _evidence(
        self,
        image: LoadedImage,
        level: np.ndarray,
        normalised: np.ndarray,
        quality: int,
        file_quality: int,
        error_curve: dict[int, float],
    ) -> Evidence:
        low, high = np.percentile(normalised, [50.0, 99.5])
        heatmap = np.clip((normalised - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
        candidate = mask_from_heatmap(heatmap, 0.5, min_fraction=0.005)
        ratio, region = _strongest_region(candidate, level, normalised)
        score = 1.0 / (1.0 + math.exp(-self.logistic_slope * (math.log(max(ratio, 1e-6)) - self.logistic_center)))
        mask = region if score >= 0.5 else np.zeros_like(region)
        shape = (image.height, image.width)
        heatmap_full = np.clip(resize_map(heatmap, shape), 0.0, 1.0).astype(np.float32)
        mask_full = resize_map(mask, shape)
        details = {
            "indicates": "manipulated",
            "resave_quality": int(quality),
            "estimated_file_quality": int(file_quality),
            "region_error_ratio": round(float(ratio), 3),
            "region_fraction": round(float(region.mean()), 4),
            "median_error": round(float(np.median(level)), 3),
            "error_by_quality": {str(q): round(v, 3) for q, v in error_curve.items()},
        }
        phrase = ratio_phrase(ratio)
        if not region.any():
            summary = (f"No region re-compresses very differently from the rest of the image (at quality "
                       f"{quality}); error level analysis finds nothing suspicious.")
        elif score >= 0.5:
            summary = (f"The marked region re-compresses with {phrase} the error of the rest of the image "
                       f"(at quality {quality}), a sign of a different compression history.")
        else:
            summary = (f"The strongest region re-compresses with only {phrase} the error of the rest of "
                       f"the image (at quality {quality}); this is weak evidence, within what textured "
                       "areas of untouched photos show.")
        return Evidence(
            expert=self.name, score=round(float(score), 4), applicable=True, summary=summary,
            heatmap=heatmap_full, mask=mask_full,
            regions=regions_from_mask(mask_full, heatmap_full, "high error level"),
            details=details, version=self.version,
        )


def _strongest_region(candidate: np.ndarray, level: np.ndarray, normalised: np.ndarray) -> tuple[float, np.ndarray]:
    """The connected component whose error stands out most; returns (its mean error / the rest's, mask)."""
    if not candidate.any():
        return 1.0, candidate
    count, labels = cv2.connectedComponents(candidate.astype(np.uint8), connectivity=8)
    best_ratio, best_label = 1.0, 0
    for label in range(1, count):
        inside = labels == label
        ratio = float(level[inside].mean()) / (float(level[~inside].mean()) + 0.25)
        if ratio > best_ratio:
            best_ratio, best_label = ratio, label
    return best_ratio, (labels == best_label) if best_label else np.zeros_like(candidate)
