"""Error level analysis (ELA). Follows N. Krawetz, "A picture's worth... Digital image analysis and
forensics", Black Hat Briefings 2007.

Re-saving a JPEG at a quality it was compressed with before changes it little; a region with a different
compression history (pasted from another photo, resampled, painted) changes more. We re-save at the
quality where the image's error curve dips (its likely earlier compression, the "JPEG ghost" of H. Farid,
IEEE TIFS 2009), average the absolute difference over channels and 16x16 windows, and work in log units
relative to the image's own median, discounting texture (busy areas always re-compress worse), so photos
of any quality compare. The heatmap shows where that normalised error level stands out; the mask keeps
regions that are robust outliers.

Texture alone also makes regions stand out, so the score asks a texture-free question: does the region
lack the compression history the rest of the image shows? We compare the error of a re-save on the
image's own 8x8 grid with the error of a re-save shifted off the grid (the same content, no aligned
history): where earlier compression at that quality left a trace, the aligned error is lower.

Score: probability-like strength of the strongest outlier region: a logistic of how much less aligned
compression history it carries than the rest of the image (log ratio, discounted for regions under 5% of
the image). A photo re-saved as a whole at a higher quality keeps only an imperfect trace of its first
compression in fine detail, so untouched re-saved photos show such regions too: the centre sits at the
95th percentile of untouched CASIA v1 train photos re-saved at quality 90 (0% of single-compressed and
never-compressed ones reach it). On CASIA the score then separates spliced from untouched images only
when the untouched ones were not re-saved, so treat it as weak evidence; the map is the main output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from experts.base import Evidence, ExpertError, graphic_declined, not_applicable, nothing_to_examine
from experts.image import LoadedImage
from experts.jpeg_tables import nearest_quality_absolute
from experts.maps import mask_from_heatmap, ratio_phrase, regions_from_mask, resize_map, working_copy

GRID_SHIFT = 4  # half a JPEG block: a re-save shifted by this much shares no grid with the original
FULL_EVIDENCE_FRACTION = 0.05  # regions smaller than this share of the image count for less
JPEG_MAX_SIDE = 65_535  # the format's limit: a longer image cannot be re-saved
ERROR_FLOOR = 0.25  # grey levels; keeps log ratios finite in flat areas that re-compress exactly


def resave_error(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Per-pixel absolute difference (mean over the channels) between an RGB image and its JPEG re-save."""
    bgr = np.ascontiguousarray(pixels[..., ::-1])  # OpenCV's encoder expects BGR for the right YCbCr
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ExpertError(f"OpenCV could not encode a JPEG at quality {quality}; check the OpenCV install")
    difference = cv2.absdiff(bgr, cv2.imdecode(encoded, cv2.IMREAD_COLOR)).reshape(-1, 3)
    return cv2.reduce(difference, 1, cv2.REDUCE_AVG, dtype=cv2.CV_32F).reshape(pixels.shape[:2])


def off_grid_resave_error(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Re-save error with the image shifted off its 8x8 grid: what this content costs to compress when
    no earlier compression is aligned with the new one. The uncovered border copies its neighbours."""
    shift = GRID_SHIFT
    error = resave_error(np.ascontiguousarray(pixels[shift:, shift:]), quality)
    return cv2.copyMakeBorder(error, shift, 0, shift, 0, cv2.BORDER_REFLECT)


def _sample(values: np.ndarray) -> np.ndarray:
    """Every 4th pixel each way: plenty for medians and percentiles of smooth maps, 16x faster."""
    return values[::4, ::4]


def _grid_aligned_crop(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """A central crop whose corner sits on the 8x8 JPEG grid, so re-saving it behaves like the whole."""
    height, width = pixels.shape[:2]
    top = ((height - min(height, max_side)) // 2) // 8 * 8
    left = ((width - min(width, max_side)) // 2) // 8 * 8
    return np.ascontiguousarray(pixels[top : top + max_side, left : left + max_side])


@dataclass(frozen=True)
class ErrorLevelAnalysis:
    name = "ela"
    version = "5"  # 2: declines files saved below its lowest re-save quality; 3: LoadedImage.graphic;
    # 4: a graphic is also a few flat colours with antialiased edges, or text on a plain background
    # 5: declines random noise
    description = (
        "Error level analysis: re-saves the image as JPEG and maps regions that re-compress with more "
        "error than the rest, a sign of a different compression history."
    )
    qualities: tuple[int, ...] = (50, 55, 60, 65, 70, 75, 80, 85, 90, 95)
    window: int = 16  # smoothing window in pixels: two JPEG blocks
    texture_power: float = 0.5  # how strongly the heatmap discounts busy areas (0 = plain ELA)
    min_dip: float = 0.97  # error at the chosen quality must be this far below its neighbours' mean
    mask_outlier_z: float = 1.5  # robust z-score (in the normalised map) a region needs to be masked
    min_side: int = 32
    max_map_pixels: int = 2_000_000
    # Logistic from the region's size-discounted missing history to score (see the module docstring).
    logistic_center: float = 0.6
    logistic_slope: float = 8.0

    def analyze(self, image: LoadedImage) -> Evidence:
        height, width = image.height, image.width
        if min(height, width) < self.min_side:
            return not_applicable(
                self.name,
                f"The image is too small for error level analysis ({width}x{height} pixels; it needs at "
                f"least {self.min_side} on each side).",
                self.version,
            )
        if max(height, width) > JPEG_MAX_SIDE:
            return not_applicable(
                self.name,
                f"The image ({width}x{height}) is too long for error level analysis: it re-saves the "
                f"image as a JPEG, which holds at most {JPEG_MAX_SIDE:,} pixels a side.",
                self.version,
            )
        pixels = np.ascontiguousarray(image.pixels)
        if image.graphic:
            why = "error level analysis cannot tell compression history from flat areas."
            return graphic_declined(self.name, self.version, why)
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what)
        luma_table = image.quantization.get(0)
        file_quality = nearest_quality_absolute(luma_table) if luma_table is not None else 100
        if file_quality - 3 < min(self.qualities):
            # Re-saving at or above the file's own quality changes little anywhere, and the last, heavy
            # compression covers every region alike: CASIA v1 val photos saved at quality 50 scored at
            # least 0.5 on 10 of 73 untouched ones (AUC 0.58 against their forgeries).
            return not_applicable(
                self.name,
                f"The file was last saved as a JPEG at quality about {file_quality}, below the qualities "
                f"error level analysis re-saves at ({min(self.qualities)}-{max(self.qualities)}): that "
                "heavy compression covers every region alike, so no earlier compression history can show.",
                self.version,
            )
        quality, dip = self._choose_quality(pixels, file_quality)
        # ELA needs the stored pixel grid, so the re-saves run at full size; only the maps are shrunk.
        aligned, scale = working_copy(resave_error(pixels, quality), self.max_map_pixels)
        off_grid, _ = working_copy(off_grid_resave_error(pixels, quality), self.max_map_pixels)
        gray = cv2.cvtColor(working_copy(pixels, self.max_map_pixels)[0], cv2.COLOR_RGB2GRAY).astype(
            np.float32
        )
        window = max(3, round(self.window * scale))
        level = cv2.blur(aligned, (window, window))
        history = np.log((level + ERROR_FLOOR) / (cv2.blur(off_grid, (window, window)) + ERROR_FLOOR))
        texture = cv2.blur(np.abs(cv2.Laplacian(gray, cv2.CV_32F)), (window, window))
        log_level = np.log(level + ERROR_FLOOR) - self.texture_power * np.log(
            texture + np.median(_sample(texture)) + 1
        )
        return self._evidence(image, level, log_level, history, quality, file_quality, dip)

    def _choose_quality(self, pixels: np.ndarray, file_quality: int) -> tuple[int, float]:
        """The re-save quality where the mean error dips most below its neighbours' mean: the likely
        earlier compression. Qualities at or above the file's own are skipped (re-saving there changes
        little anywhere). Without a clear dip: ten points below the file's quality."""
        grid = sorted(self.qualities)
        candidates = [q for q in grid[1:-1] if q <= file_quality - 3]
        fallback = min(grid[-2], max(grid[0], (file_quality - 10) // 5 * 5))
        if not candidates:
            return fallback, 1.0
        crop = _grid_aligned_crop(pixels, 512)
        needed = {grid[i + d] for i, q in enumerate(grid) if q in candidates for d in (-1, 0, 1)}
        curve = {q: float(resave_error(crop, q).mean()) for q in sorted(needed)}
        dips = {}
        for q in candidates:
            index = grid.index(q)
            dips[q] = curve[q] / (0.5 * (curve[grid[index - 1]] + curve[grid[index + 1]]) + 1e-3)
        best = min(dips, key=dips.__getitem__)
        return (best, dips[best]) if dips[best] < self.min_dip else (fallback, dips[best])

    def _evidence(
        self,
        image: LoadedImage,
        level: np.ndarray,
        log_level: np.ndarray,
        history: np.ndarray,
        quality: int,
        file_quality: int,
        dip: float,
    ) -> Evidence:
        low, high = np.percentile(_sample(log_level), [50.0, 99.5])
        heatmap = np.clip((log_level - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)
        candidate = mask_from_heatmap(heatmap, 0.5, min_fraction=0.005)
        regions = [
            r for r in _outlier_regions(candidate, level, log_level, history) if r.z >= self.mask_outlier_z
        ]
        mask = np.zeros(level.shape, bool)
        for region in regions:
            mask |= region.mask
        strongest = max(regions, key=lambda r: r.evidence, default=None)
        score = self._score(strongest.evidence) if strongest else 0.0
        shape = (image.height, image.width)
        heatmap_full = np.clip(resize_map(heatmap, shape), 0.0, 1.0).astype(np.float32)
        mask_full = resize_map(mask, shape)
        details = {
            "indicates": "manipulated",
            "resave_quality": int(quality),
            "estimated_file_quality": int(file_quality),
            "error_dip_at_quality": round(float(dip), 3),
            "median_error": round(float(np.median(level)), 3),
            "regions_found": len(regions),
        }
        if strongest is None:
            summary = (
                f"No region re-compresses with clearly more error than the rest of the image (at quality "
                f"{quality}); error level analysis finds nothing suspicious."
            )
        else:
            details.update(
                region_error_ratio=round(strongest.ratio, 3),
                region_outlier_z=round(strongest.z, 3),
                region_missing_history=round(strongest.missing_history, 3),
                region_evidence=round(strongest.evidence, 3),
                region_fraction=round(float(strongest.mask.mean()), 4),
            )
            phrase = ratio_phrase(strongest.ratio)
            if score >= 0.5:
                summary = (
                    f"The marked region re-compresses with {phrase} the error of the rest of the image (at "
                    f"quality {quality}) and lacks the compression trace the rest carries: a sign it has a "
                    "different history."
                )
            else:
                summary = (
                    f"The marked region re-compresses with {phrase} the error of the rest of the image (at "
                    f"quality {quality}), no more than fine detail or an earlier re-save of the whole photo "
                    "can cause: weak evidence."
                )
        return Evidence(
            expert=self.name,
            score=round(float(score), 4),
            applicable=True,
            summary=summary,
            heatmap=heatmap_full,
            mask=mask_full,
            regions=regions_from_mask(mask_full, heatmap_full, "high error level"),
            details=details,
            version=self.version,
        )

    def _score(self, evidence: float) -> float:
        return 1.0 / (1.0 + math.exp(-self.logistic_slope * (evidence - self.logistic_center)))


@dataclass(frozen=True, eq=False)
class _Region:
    mask: np.ndarray
    z: float  # robust z-score of its mean normalised log error level within the image
    ratio: float  # mean raw error inside / mean raw error outside
    missing_history: float  # its mean aligned/off-grid log ratio minus the image's median
    fraction: float  # its share of the image

    @property
    def evidence(self) -> float:
        """Missing history, discounted for regions under 5% of the image: small patches of fine detail
        lose the trace of a non-matching earlier table naturally, a pasted object rarely is that small."""
        return self.missing_history * math.sqrt(
            min(self.fraction, FULL_EVIDENCE_FRACTION) / FULL_EVIDENCE_FRACTION
        )


def _outlier_regions(
    candidate: np.ndarray, level: np.ndarray, log_level: np.ndarray, history: np.ndarray
) -> list[_Region]:
    if not candidate.any():
        return []
    sample = _sample(log_level)
    centre = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - centre))) + 1e-3
    history_centre = float(np.median(_sample(history)))
    count, labels = cv2.connectedComponents(candidate.astype(np.uint8), connectivity=8)
    flat_labels = labels.ravel()
    area = np.bincount(flat_labels, minlength=count).astype(np.float64)
    level_sum = np.bincount(flat_labels, level.ravel(), minlength=count)
    log_sum = np.bincount(flat_labels, log_level.ravel(), minlength=count)
    history_sum = np.bincount(flat_labels, history.ravel(), minlength=count)
    total_level = float(level_sum.sum())
    regions = []
    for label in range(1, count):
        inside_mean = level_sum[label] / area[label]
        outside_mean = (total_level - level_sum[label]) / max(labels.size - area[label], 1.0)
        regions.append(
            _Region(
                mask=labels == label,
                z=float((log_sum[label] / area[label] - centre) / spread),
                ratio=float(inside_mean / (outside_mean + 1e-3)),
                missing_history=float(history_sum[label] / area[label] - history_centre),
                fraction=float(area[label] / labels.size),
            )
        )
    return regions
