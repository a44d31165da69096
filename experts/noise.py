"""Local noise-level inconsistency. Follows B. Mahdian and S. Saic, "Using noise inconsistencies for
blind image forensics", Image and Vision Computing 27(10), 2009 (NOI1): the finest detail of a photo is
mostly sensor noise, so its level, measured block by block, should be consistent across the photo; a
region pasted from another photo (or resampled, or retouched) often carries a different level.

Changes for real, JPEG-compressed photos, each kept because it raised pixel F1 on CASIA v1 train:
(1) the per-block noise level comes from Immerkaer's residual ("Fast noise variance estimation", CVIU
1996) over the block's smoother pixels (the 10% strongest gradients are skipped, after Tai and Yang,
2008) instead of the wavelet HH1 median; (2) noise naturally varies with brightness (sensor noise is
signal dependent) and texture (fine detail leaks into the residual), so each block's log noise level is
compared with what a robust regression on its brightness and on the same residual one octave down
predicts for this image, and the map shows the deviation in robust standard units; (3) colour (chroma)
noise is averaged in with luma noise: colour processing differs between sources.

Score: probability-like strength of the most inconsistent region, a logistic of its mean robust
z-score (noisier or smoother). Untouched photos also show regions several robust sigmas off (textured
rock against smooth sky and sea, for example), and on CASIA v1 train this statistic is no higher for
tampered than for untouched images, so the centre sits near the 99th percentile of untouched CASIA train
photos: the score rises only for a region far outside anything seen there. Treat the score as weak
evidence; the map is the main output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from experts.base import Evidence, not_applicable, nothing_to_examine
from experts.image import LoadedImage
from experts.maps import mask_from_heatmap, ratio_phrase, regions_from_mask, resize_map, working_copy

# Immerkaer's kernel: the difference of two Laplacians, blind to flat areas, ramps and straight edges, so
# what it responds to in a smooth neighbourhood is noise. E|response| = 6 * sigma * sqrt(2 / pi).
IMMERKAER_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
RESPONSE_TO_SIGMA = math.sqrt(math.pi / 2.0) / 6.0
NOISE_FLOOR = 1.0  # grey levels; JPEG wipes the noise of flat areas to ~0, where log ratios mean nothing


def block_mean(values: np.ndarray, block: int) -> np.ndarray:
    """Mean over block x block tiles (partial tiles at the edges are averaged as they are)."""
    height, width = values.shape
    size = (max(1, round(width / block)), max(1, round(height / block)))
    return cv2.resize(values, size, interpolation=cv2.INTER_AREA)


def robust_residual(target: np.ndarray, predictors: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, float]:
    """Residual of a least-squares fit refitted on inliers (within 2.5 robust sigma), and that sigma."""
    design = np.column_stack([predictors, np.ones(len(target))])
    inliers = np.ones(len(target), bool)
    residual, sigma = target - target.mean(), 1.0
    for _ in range(rounds):
        if inliers.sum() < design.shape[1] + 2:
            break
        coefficients = np.linalg.lstsq(design[inliers], target[inliers], rcond=None)[0]
        residual = target - design @ coefficients
        sigma = 1.4826 * float(np.median(np.abs(residual[inliers] - np.median(residual[inliers])))) + 1e-6
        inliers = np.abs(residual) < 2.5 * sigma
    return residual, sigma


@dataclass(frozen=True, eq=False)
class NoiseLevels:
    """Per-block measurements of one image (all arrays have the block grid's shape)."""

    luma: np.ndarray  # noise sigma of Y, grey levels
    chroma: np.ndarray  # mean noise sigma of Cr and Cb
    brightness: np.ndarray  # mean Y / 255
    texture: np.ndarray  # fine detail one octave down (what texture, not noise, predicts)
    reliable: np.ndarray  # enough smooth pixels, not clipped to black or white


def measure_noise(pixels: np.ndarray, block: int, edge_percentile: float) -> NoiseLevels:
    """Block-wise noise levels from Immerkaer residuals, skipping the strongest-gradient pixels (edges and
    texture would otherwise pass for noise), as in Tai and Yang, ICALIP 2008."""
    ycrcb = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2YCrCb).astype(np.float32)
    luma = ycrcb[..., 0]
    gradient = cv2.magnitude(cv2.Sobel(luma, cv2.CV_32F, 1, 0), cv2.Sobel(luma, cv2.CV_32F, 0, 1))
    smooth = (gradient <= np.percentile(gradient[::3, ::3], edge_percentile)).astype(np.float32)
    # Texture as a predictor: the same residual one octave down. White noise halves there while natural
    # texture (a 1/f spectrum) does not, so the fit learns how much fine detail is texture.
    half_size = (max(1, luma.shape[1] // 2), max(1, luma.shape[0] // 2))
    coarse_detail = np.abs(
        cv2.filter2D(cv2.resize(luma, half_size, interpolation=cv2.INTER_AREA), cv2.CV_32F, IMMERKAER_KERNEL)
    )
    smooth_share = block_mean(smooth, block)

    def level(channel: np.ndarray) -> np.ndarray:
        response = np.abs(cv2.filter2D(channel, cv2.CV_32F, IMMERKAER_KERNEL))
        return block_mean(response * smooth, block) / np.maximum(smooth_share, 1e-3) * RESPONSE_TO_SIGMA

    brightness = block_mean(luma, block) / 255.0
    return NoiseLevels(
        luma=level(luma),
        chroma=0.5 * (level(ycrcb[..., 1]) + level(ycrcb[..., 2])),
        brightness=brightness,
        texture=cv2.resize(
            block_mean(coarse_detail, max(1, block // 2)),
            brightness.shape[::-1],
            interpolation=cv2.INTER_AREA,
        ),
        reliable=(smooth_share > 0.25) & (brightness > 0.03) & (brightness < 0.97),
    )


@dataclass(frozen=True)
class NoiseInconsistency:
    name = "noise"
    version = "3"  # 2: declines a featureless image; 3: or random noise
    description = (
        "Noise inconsistency: maps the local noise level (luma and colour), allowing for brightness and "
        "texture, and marks a region whose noise is clearly higher or lower than the rest of the image."
    )
    block: int = 16  # pixels per noise-level block
    edge_percentile: float = 90.0  # pixels with a stronger gradient than this share are not used
    smooth_blocks: int = 3  # average the deviation over this many blocks each way
    chroma_weight: float = 0.5  # colour noise separates sources at least as well as luma noise
    top_percentile: float = 99.0  # this share of blocks deviate less than the heatmap's 1.0
    mask_deviation: float = 0.5  # mean |robust z| a region needs to be masked (drops faint candidates)
    min_blocks: int = 24  # fewer blocks than this cannot show an inconsistency
    max_pixels: int = 2_000_000
    # Logistic from the strongest region's mean |z| to score; centre near the 99th percentile of untouched
    # CASIA train photos (see the module docstring).
    logistic_center: float = 5.0
    logistic_slope: float = 2.0

    def analyze(self, image: LoadedImage) -> Evidence:
        pixels, scale = working_copy(image.pixels, self.max_pixels)
        blocks_high, blocks_wide = pixels.shape[0] // self.block, pixels.shape[1] // self.block
        if blocks_high < 3 or blocks_wide < 3 or blocks_high * blocks_wide < self.min_blocks:
            return not_applicable(
                self.name,
                f"The image is too small to compare noise between regions ({image.width}x{image.height} "
                f"pixels; it needs at least {3 * self.block} on each side).",
                self.version,
            )
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what)
        levels = measure_noise(pixels, self.block, self.edge_percentile)
        if levels.reliable.sum() < self.min_blocks:
            return not_applicable(
                self.name,
                "Too little of the image is smooth and unclipped to measure its noise (a graphic, or mostly "
                "black, white or edges).",
                self.version,
            )
        predictors = np.column_stack(
            [
                levels.brightness.ravel(),
                levels.brightness.ravel() ** 2,
                np.log(levels.texture.ravel() + 1.0),
            ]
        )
        # Colour noise is averaged in when the image has colour: it separated sources at least as well as
        # luma noise on CASIA v1 train.
        weight = self.chroma_weight if float(np.median(levels.chroma)) > 0.05 else 0.0
        luma_z, luma_log = self._deviation(levels.luma, predictors, levels.reliable)
        chroma_z, chroma_log = self._deviation(levels.chroma, predictors, levels.reliable)
        smooth = (self.smooth_blocks, self.smooth_blocks)
        deviation_z = cv2.blur((1.0 - weight) * luma_z + weight * chroma_z, smooth)
        deviation_log = cv2.blur((1.0 - weight) * luma_log + weight * chroma_log, smooth)
        log_level = (1.0 - weight) * np.log(levels.luma + NOISE_FLOOR) + weight * np.log(
            levels.chroma + NOISE_FLOOR
        )
        return self._evidence(
            image, pixels.shape[:2], deviation_z, deviation_log, log_level, levels.luma, scale
        )

    @staticmethod
    def _deviation(
        noise: np.ndarray, predictors: np.ndarray, reliable: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each block's log noise level minus what the image's own brightness and texture trend predicts:
        as a robust z-score and in log units. Unreliable blocks get 0 (no evidence either way)."""
        use = reliable.ravel()
        residual, sigma = robust_residual(np.log(noise.ravel()[use] + NOISE_FLOOR), predictors[use])
        log_residual = np.zeros(noise.size, np.float32)
        log_residual[use] = residual
        log_residual = log_residual.reshape(noise.shape)
        return log_residual / sigma, log_residual

    def _evidence(
        self,
        image: LoadedImage,
        work_shape: tuple[int, int],
        deviation_z: np.ndarray,
        deviation_log: np.ndarray,
        log_level: np.ndarray,
        luma_noise: np.ndarray,
        scale: float,
    ) -> Evidence:
        centred_blocks = deviation_z - float(np.median(deviation_z))
        top = float(np.percentile(np.abs(centred_blocks), self.top_percentile))
        # Upsample the block maps so that regions get smooth edges at the working size.
        centred = resize_map(centred_blocks, work_shape)
        adjusted_log = resize_map(deviation_log, work_shape)
        raw_log = resize_map(log_level.astype(np.float32), work_shape)
        magnitude = np.abs(centred)
        work_heatmap = np.clip(magnitude / max(top, 1e-6), 0.0, 1.0).astype(np.float32)
        candidate = mask_from_heatmap(work_heatmap, 0.5, min_fraction=0.01)
        count, labels = cv2.connectedComponents(candidate.astype(np.uint8), connectivity=8)
        regions = []
        for label in range(1, count):
            inside = labels == label
            strength = float(magnitude[inside].mean())
            if strength >= self.mask_deviation:
                regions.append((strength, inside))
        work_mask = np.zeros(work_shape, bool)
        for _, inside in regions:
            work_mask |= inside
        shape = (image.height, image.width)
        heatmap = np.clip(resize_map(work_heatmap, shape), 0.0, 1.0).astype(np.float32)
        mask = resize_map(work_mask, shape)
        details = {
            "indicates": "manipulated",
            "median_luma_noise_sigma": round(float(np.median(luma_noise)), 3),
            "block_pixels": round(self.block / scale, 1),
            "regions_found": len(regions),
        }
        score = 0.0
        if not regions:
            summary = (
                "The noise level is consistent across the image once brightness and texture are allowed "
                "for; no region stands out."
            )
        else:
            strength, inside = max(regions, key=lambda region: region[0])
            score = 1.0 / (1.0 + math.exp(-self.logistic_slope * (strength - self.logistic_center)))
            raw_ratio = math.exp(float(raw_log[inside].mean() - raw_log[~inside].mean()))
            ratio = math.exp(float(adjusted_log[inside].mean() - adjusted_log[~inside].mean()))
            direction = "noisier" if centred[inside].mean() > 0 else "smoother"
            details.update(
                region_noise_ratio=round(raw_ratio, 3),
                region_adjusted_noise_ratio=round(ratio, 3),
                region_deviation=round(strength, 3),
                region_direction=direction,
                region_fraction=round(float(inside.mean()), 4),
            )
            which = "marked region" if score >= 0.5 else "most unusual region"
            what = (
                f"The {which}'s noise level is {ratio_phrase(raw_ratio)} that of the rest of the image "
                f"({ratio_phrase(ratio)} after allowing for its brightness and texture: {direction})"
            )
            if score >= 0.5:
                summary = f"{what}, more than untouched photos vary by: it may come from another source."
            else:
                summary = f"{what}, within what untouched photos vary by: weak evidence."
        return Evidence(
            expert=self.name,
            score=round(float(score), 4),
            applicable=True,
            summary=summary,
            heatmap=heatmap,
            mask=mask,
            regions=regions_from_mask(mask, heatmap, "inconsistent noise"),
            details=details,
            version=self.version,
        )
