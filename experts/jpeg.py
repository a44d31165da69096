"""JPEG double-compression evidence: where the image's compression history is not the same everywhere.

A photo that was edited and saved again as JPEG carries two compressions. The untouched background
went through both on the same 8x8 grid; a region pasted in from elsewhere usually did not (its own
first compression sat on a different grid, or at a different quality). Three analyses look for that:

(a) Aligned double quantisation (A-DQ), after Bianchi, De Rosa & Piva, "Improved DCT coefficient
    analysis for forgery localization in JPEG images", ICASSP 2011, and Bianchi & Piva, "Image
    forgery localization via block-grained analysis of JPEG artifacts", IEEE TIFS 2012 (which
    refine Lin, He, Tang & Tang, Pattern Recognition 2009). The 8x8 DCT coefficients of the file's
    own luma plane, divided by its quantisation table, show periodic peaks and gaps when they were
    quantised twice. Per frequency we fit a mixture of a single-compression histogram (estimated
    from the DCT on a grid shifted by one pixel, which erases the quantisation) and the
    double-compression one for the first quantiser step Q1, keep frequencies where the double
    compression model wins clearly, and sum per block the log-likelihood ratios: a block whose
    coefficients fall into the gaps was not compressed twice on this grid. Smooth blocks and blocks
    with clipped pixels carry no evidence (their rounding errors are not the model's). A file
    stored without loss (PNG) is tested the same way with a quantiser step of 1: a JPEG it once was
    leaves its levels in every block but a pasted one.
(b) Grid misalignment, after the blocking-artifact-grid idea of Li, Yuan & Yu, "Passive detection of
    doctored JPEG image via block artifact grid extraction", Signal Processing 2009: pixel
    discontinuities are accumulated per grid phase in local windows; a region blocky on both axes
    on a grid other than the file's (0, 0) grid was compressed before it was pasted off-grid. Only
    run when the image has a JPEG grid of its own; it needs a clearly blocky donor (quality <~70).
(c) JPEG ghosts, after Farid, "Exposing digital forgeries from JPEG ghosts", IEEE TIFS 2009: the
    image is re-compressed at qualities 50..95 and the difference is averaged over 16x16 windows and
    normalised per window; a region whose difference curve departs from the rest's was compressed
    at a different quality. Re-saving on the stored grid only re-quantises each
    block's DCT coefficients, so the differences are computed in the DCT domain without an encoder.

Score: probability-like strength of a local inconsistency in compression history, the largest of
the three analyses' calibrated scores; 0.5 is where the image starts to look locally edited. A file
that is double-compressed uniformly (re-saved, not edited) or single-compressed scores low.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from experts.base import Evidence, not_applicable, nothing_to_examine
from experts.image import LoadedImage
from experts.jpeg_tables import ijg_table, nearest_quality_relative
from experts.maps import regions_from_mask

MIN_SIDE = 32  # pixels: at least 4x4 blocks, or there is no histogram to speak of
MAX_BLOCKS = 150_000  # about 10 MP; larger images are analysed on every k-th block (blocks are independent)


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    matrix = np.cos((2 * n + 1) * k * np.pi / 16) * 0.5
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


DCT = _dct_matrix()  # orthonormal 8x8 DCT-II: JPEG's forward DCT
ZIGZAG = sorted(
    ((u, v) for u in range(8) for v in range(8)),
    key=lambda uv: (uv[0] + uv[1], uv[1] if (uv[0] + uv[1]) % 2 == 0 else uv[0]),
)


def clipped_blocks(pixels: np.ndarray, stride: int = 1, min_pixels: int = 4) -> np.ndarray:
    """Blocks (on the stored grid) with at least min_pixels pixels clipped to 0 or 255 in some
    channel. Luma computed from clipped RGB is off the quantiser's levels: an earlier decode that
    clipped (saturated colours) left such blocks off the first compression's levels. (4 pixels:
    on CASIA train, 1 lost a tenth of the detections, 8 doubled the false alarms on re-saves.)"""
    clipped = ((pixels == 0) | (pixels == 255)).any(axis=-1)
    return grid_blocks(clipped, stride).sum(axis=(2, 3)) >= min_pixels


def decoded_luma(image: LoadedImage) -> np.ndarray | None:
    """The JPEG's own luma plane (Y), decoded without the conversion to RGB, or None when the file
    cannot give it. The luma computed back from RGB differs where the RGB was clipped (saturated
    colours), which would push those blocks off the quantiser's levels."""
    if not image.is_jpeg or not image.data:
        return None
    try:
        with Image.open(io.BytesIO(image.data)) as decoded:
            if decoded.mode not in ("RGB", "L") or decoded.size != (image.width, image.height):
                return None
            if decoded.mode == "RGB":
                decoded.draft("YCbCr", decoded.size)
                if decoded.mode != "YCbCr":
                    return None
            planes = np.asarray(decoded)
    except (OSError, ValueError, SyntaxError):
        return None
    luma = planes if planes.ndim == 2 else planes[..., 0]
    return luma.astype(np.float32) if luma.shape == (image.height, image.width) else None


def grid_blocks(plane: np.ndarray, stride: int = 1, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The 8x8 blocks of a 2-D array on the grid starting at offset (dy, dx), keeping every
    stride-th block row and column: shape (rows, cols, 8, 8)."""
    plane = plane[offset[0] :, offset[1] :]
    rows, cols = plane.shape[0] // 8, plane.shape[1] // 8
    blocks = plane[: rows * 8, : cols * 8].reshape(rows, 8, cols, 8).transpose(0, 2, 1, 3)
    return blocks[::stride, ::stride]


def block_dct(luma: np.ndarray, stride: int = 1, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Blockwise 8x8 DCT of (luma - 128) on the grid starting at offset: (rows, cols, 8, 8)."""
    blocks = grid_blocks(luma, stride, offset).astype(np.float32) - 128.0
    return DCT @ blocks @ DCT.T


# --------------------------------------------------------------------------------------------------
# (a) Aligned double quantisation


@dataclass(frozen=True, eq=False)
class AlignedDoubleQuantisation:
    """Per-block evidence of double quantisation on the stored grid.

    llr: (rows, cols) sum over the used frequencies of log p(coefficient | compressed twice) /
    p(coefficient | compressed once): positive where the block shows the double-compression
    pattern, negative where its coefficients sit in the pattern's gaps (not compressed twice).
    """

    llr: np.ndarray
    first_table: np.ndarray  # 8x8 estimated first quantiser step, 0 where not estimated
    mixture: np.ndarray  # 8x8 estimated share of double-compressed blocks per frequency
    gain: np.ndarray  # 8x8 log-likelihood gain of the double- over the single-compression model

    @property
    def frequencies(self) -> int:
        return int((self.first_table > 0).sum())


def _period_weights(q1: np.ndarray, q2: float, bins: np.ndarray, sigma: float, bias: float) -> np.ndarray:
    """n(x) of Bianchi & Piva: how many first-quantiser levels q1*k land in second-quantiser bin x,
    times q1/q2 so it averages 1, blurred by the decoder's rounding error (sigma, in bins). One row
    per candidate q1. Levels exactly on a bin edge count half."""
    q1 = np.asarray(q1, np.float64)[:, None]
    shifted = bins[None, :] + bias / q2
    upper = q2 / q1 * (shifted + 0.5)
    lower = q2 / q1 * (shifted - 0.5)
    on_upper = np.abs(upper - np.round(upper)) < 1e-9
    on_lower = np.abs(lower - np.round(lower)) < 1e-9
    count = np.floor(upper) - np.ceil(lower) + 1 - 0.5 * on_upper - 0.5 * on_lower
    weights = q1 / q2 * count
    if sigma > 0.05:
        radius = int(np.ceil(4 * sigma))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        padded = np.pad(weights, ((0, 0), (radius, radius)), mode="edge")
        weights = cv2.filter2D(padded, -1, (kernel / kernel.sum())[None, :], borderType=cv2.BORDER_CONSTANT)
        weights = weights[:, radius:-radius]
    return weights


MIXTURE_GRID = np.linspace(0.05, 1.0, 20)
# Decoding noise of one JPEG decode per DCT coefficient (integer IDCT, rounding of YCbCr->RGB): std
# 0.33-0.44 measured on camera JPEGs (CASIA Au, exif_samples), with heavier tails.
FIRST_DECODE_VARIANCE = 0.18
SMOOTH_AC_LEVEL = 2.5  # an AC coefficient above this (and above half its step) counts as texture
MIN_TEXTURED_AC = 8  # blocks with fewer such AC coefficients carry no double-compression evidence
GAP_FLOOR = 0.1  # a coefficient in a gap counts at most log(1/0.1) = 2.3 nats: the noise has tails


def _fit_frequency(
    stored: np.ndarray, shifted: np.ndarray, q2: float, sigma: float, bias: float, q1_max: int
) -> tuple[float, int, float, np.ndarray, int] | None:
    """Best first quantiser for one frequency: (log-likelihood gain over single compression, q1,
    mixture weight, per-bin log-likelihood ratio, bin offset), or None when nothing fits.

    stored: quantised coefficients as in the file; shifted: coefficients on the grid shifted by one
    pixel, quantised with the same step (the single-compression reference histogram)."""
    limit = int(min(np.abs(stored).max(), 2048)) + 1
    bins = np.arange(-limit, limit + 1)
    shifted = shifted[np.abs(shifted) <= limit]
    observed = np.bincount(stored.ravel() + limit, minlength=bins.size).astype(np.float64)
    reference = np.bincount(shifted + limit, minlength=bins.size).astype(np.float64) + 0.5
    candidates = np.array([q1 for q1 in range(2, q1_max + 1) if q2 % q1], dtype=np.float64)
    if candidates.size == 0:
        return None
    # The zero bin is left out of the fit: it holds smooth blocks under every hypothesis.
    nonzero = bins != 0
    counts = observed[nonzero]
    single = reference[nonzero] / reference[nonzero].sum()
    weights = _period_weights(candidates, q2, bins, sigma, bias)[:, nonzero]
    double = weights * single
    double /= np.maximum(double.sum(axis=1, keepdims=True), 1e-12)
    seen = counts > 0
    mixture = (
        MIXTURE_GRID[None, :, None] * double[:, None, seen]
        + (1 - MIXTURE_GRID[None, :, None]) * single[None, None, seen]
    )
    gains = np.log(np.maximum(mixture, 1e-300)) @ counts[seen] - np.log(single[seen]) @ counts[seen]
    best_q1, best_alpha = np.unravel_index(int(np.argmax(gains)), gains.shape)
    alpha = float(MIXTURE_GRID[best_alpha])
    full_weights = _period_weights(candidates[best_q1 : best_q1 + 1], q2, bins, sigma, bias)[0]
    normaliser = float((full_weights[nonzero] * single).sum())
    ratio = alpha * full_weights / max(normaliser, 1e-12) + 1 - alpha
    log_ratio = np.log(np.maximum(ratio, GAP_FLOOR))
    log_ratio[limit] = 0.0
    return float(gains[best_q1, best_alpha]), int(candidates[best_q1]), alpha, log_ratio, limit


def aligned_double_quantisation(
    coefficients: np.ndarray,
    shifted: np.ndarray,
    table: np.ndarray,
    frequencies: int = 44,
    min_gain: float = 20.0,
    min_mixture: float = 0.4,
    min_nonzero: int = 40,
    min_frequencies: int = 4,
    reliable: np.ndarray | None = None,
) -> AlignedDoubleQuantisation:
    """Fit the double-quantisation model per DCT frequency (zig-zag order, DC first) and sum the
    per-block log-likelihood ratios over the frequencies where it clearly beats single
    compression (gain >= min_gain nats, at least min_mixture of the blocks). Blocks outside
    `reliable` (e.g. with clipped pixels) and smooth blocks get no evidence (llr 0)."""
    table = table.astype(np.float64)
    rows, cols = coefficients.shape[:2]
    llr = np.zeros((rows, cols), np.float64)
    first_table = np.zeros((8, 8), np.int32)
    mixture = np.zeros((8, 8))
    gain_table = np.zeros((8, 8))
    # Smooth blocks are left out: their rounding errors are correlated (a flat block rounds all 64
    # pixels the same way, moving the DC by up to 4), so they stray off the first quantiser's levels
    # without having been tampered with.
    strong_ac = np.abs(coefficients) > np.maximum(SMOOTH_AC_LEVEL, table / 2)
    textured = np.count_nonzero(strong_ac.reshape(rows, cols, 64)[:, :, 1:], axis=2) >= MIN_TEXTURED_AC
    if reliable is not None:
        textured &= reliable
    for u, v in ZIGZAG[:frequencies]:
        q2 = float(table[u, v])
        values = coefficients[:, :, u, v].astype(np.float64)
        stored = np.round(values / q2).astype(np.int64)
        if np.count_nonzero(stored) < min_nonzero:
            continue
        residual = values - q2 * stored
        # The first compression's levels are blurred by two roundings to integer pixels (after the
        # first decode and after the last); the residual only measures the last one.
        sigma = float(np.sqrt(residual.var() + FIRST_DECODE_VARIANCE)) / q2
        bias = float(residual.mean()) if (u, v) == (0, 0) else 0.0  # DC rounding is biased
        reference = np.round(shifted[:, :, u, v].astype(np.float64) / q2).astype(np.int64).ravel()
        fit = _fit_frequency(stored, reference, q2, sigma, bias, int(min(3 * q2 + 8, 100)))
        if fit is None:
            continue
        gain, q1, alpha, log_ratio, offset = fit
        gain_table[u, v] = gain
        if gain < min_gain or alpha < min_mixture:
            continue
        first_table[u, v], mixture[u, v] = q1, alpha
        llr += np.where(textured, log_ratio[np.clip(stored, -offset, offset) + offset], 0.0)
    if np.count_nonzero(first_table) < min_frequencies:
        # One or two frequencies that happen to fit are what single-compressed camera JPEGs show;
        # a real earlier compression leaves its pattern across many frequencies.
        return AlignedDoubleQuantisation(
            np.zeros_like(llr), np.zeros_like(first_table), np.zeros_like(mixture), gain_table
        )
    return AlignedDoubleQuantisation(llr, first_table, mixture, gain_table)


def tampered_probability(llr: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Per-block probability of NOT being double-compressed: the log-likelihood ratio averaged over
    the informative blocks of each 3x3 neighbourhood (blocks without evidence are skipped, not
    counted as zero), through a logistic (margin > 0 leans towards "double-compressed"). A larger
    neighbourhood or a margin of 0.25 lost 0.04-0.09 pixel F1 on CASIA train."""
    informative = (llr != 0).astype(np.float64)
    total = cv2.blur(llr, (3, 3), borderType=cv2.BORDER_CONSTANT)
    count = cv2.blur(informative, (3, 3), borderType=cv2.BORDER_CONSTANT)
    mean = total / (count + 0.05)
    return 1.0 / (1.0 + np.exp(np.clip(mean + margin, -50, 50)))


# --------------------------------------------------------------------------------------------------
# (b) Grid misalignment


GRID_SUPPORT_Z = 3.0  # windows above this many robust z count towards choosing the grid phase
GRID_MIN_SCALE = 1.0  # grey levels summed over a block's 8 rows: the least phase fluctuation assumed


@dataclass(frozen=True, eq=False)
class MisalignedGrid:
    """strength: (rows, cols) blocking on the best non-aligned grid phase, in robust z units of
    the image's own phase fluctuations; offset: that grid's (dy, dx) in pixels (0 = the file's grid
    on that axis)."""

    strength: np.ndarray
    offset: tuple[int, int]


def _phase_profiles(luma: np.ndarray, stride: int, cap: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Blocking per grid phase and block, (rows, cols, 8) for columns and for rows. Phase p holds
    the excess of the step between pixel p and p+1 of the block over the steps next to it: a JPEG
    grid at offset o makes phase (o - 1) mod 8 stand out (phase 7 for the file's own grid)."""
    profiles = []
    for plane in (luma, luma.T):
        steps = np.minimum(np.abs(np.diff(plane.astype(np.float32), axis=1)), cap)  # edges saturate
        neighbours = np.zeros_like(steps)
        neighbours[:, 1:-1] = 0.5 * (steps[:, :-2] + steps[:, 2:])
        excess = np.pad(steps - neighbours, ((0, 0), (0, 1)))
        profiles.append(grid_blocks(excess, stride).sum(axis=2))  # (rows, cols, 8): sum over rows
    columns, rows = profiles
    return columns, rows.transpose(1, 0, 2)


def misaligned_grid(luma: np.ndarray, stride: int = 1, window: int = 5) -> MisalignedGrid:
    """Local blocking on a grid other than the file's, after Li, Yuan & Yu 2009: per window of
    window x window blocks and per axis, each phase's blocking above the window's median phase, in
    units of the image's typical phase fluctuation. The phase is chosen once per axis (a pasted
    region brings one grid) as the one with the most strongly blocky windows. A JPEG grid makes
    blocks, so a window must be blocky on both axes (stripes and edges are blocky on one): the
    strength is the weaker axis. Phases next to the file's own grid (offsets of +-1 pixel) and
    offsets of 0 on one axis are not candidates: the file's own blocking leaks into them."""
    per_axis = []
    offset = [0, 0]
    for axis, profile in enumerate(_phase_profiles(luma, stride)):
        local = np.stack([cv2.blur(profile[..., p], (window, window)) for p in range(8)], axis=-1)
        deviation = local - np.median(local, axis=-1, keepdims=True)
        # The floor keeps flat or synthetic images (a few sharp edges on flat ground) from
        # turning tiny fluctuations into huge z values.
        scale = max(1.4826 * float(np.median(np.abs(deviation))), GRID_MIN_SCALE)
        z = deviation[..., 1:6] / scale  # candidate phases 1..5; 7 is the file's grid
        support = np.maximum(z - GRID_SUPPORT_Z, 0).sum(axis=(0, 1))
        phase = int(np.argmax(support)) + 1
        offset[1 - axis] = (phase + 1) % 8  # column phases give dx, row phases give dy
        per_axis.append(np.maximum(z[..., phase - 1], 0))
    return MisalignedGrid(np.minimum(per_axis[0], per_axis[1]), (offset[0], offset[1]))


# --------------------------------------------------------------------------------------------------
# (c) JPEG ghosts

GHOST_QUALITIES = tuple(range(50, 100, 5))


@dataclass(frozen=True, eq=False)
class Ghosts:
    """anomaly: (rows, cols) largest distance of a window's normalised difference curve from the
    image's median curve; curve: that median curve per quality (0 = the quality it re-saves best
    at); qualities: the qualities tried."""

    anomaly: np.ndarray
    curve: np.ndarray
    qualities: tuple[int, ...]
    curves: np.ndarray  # (rows, cols, qualities) per window, scaled to [0, 1]


def jpeg_ghosts(coefficients: np.ndarray, qualities: tuple[int, ...] = GHOST_QUALITIES) -> Ghosts:
    """Farid's JPEG ghosts on the stored grid. Re-saving at quality q on the same grid re-quantises
    each block's coefficients with the IJG table for q, so the squared difference per block is
    sum((c - T_q round(c / T_q))^2) / 64 (orthonormal DCT), up to pixel rounding. Differences are
    averaged over 2x2 blocks (16x16 pixels) and each window's curve is scaled to [0, 1] over the
    qualities, as in the paper; smooth windows (small differences at every quality) are skipped."""
    differences = []
    for quality in qualities:
        step = ijg_table(quality).astype(np.float32)
        residual = coefficients - step * np.round(coefficients / step)
        differences.append(cv2.blur(np.square(residual).mean(axis=(2, 3)), (2, 2)))
    stack = np.stack(differences, axis=-1)
    low, high = stack.min(axis=-1, keepdims=True), stack.max(axis=-1, keepdims=True)
    curves = (stack - low) / np.maximum(high - low, 1e-6)
    textured = high[..., 0] > max(float(np.percentile(high, 30)), 1.0)
    if not textured.any():
        return Ghosts(np.zeros(stack.shape[:2]), np.zeros(len(qualities)), tuple(qualities), curves)
    median_curve = np.median(curves[textured], axis=0)
    anomaly = np.abs(curves - median_curve).max(axis=-1)
    anomaly[~textured] = 0.0
    return Ghosts(anomaly, median_curve, tuple(qualities), curves)


# --------------------------------------------------------------------------------------------------
# Combining the three analyses


# Calibrated on the train split only: CASIA v1 authentic photos as they are, re-saved at quality
# 75-100 and saved as PNG, real photos of faces_real / ai_playground, CASIA tampered images, and
# splices made from CASIA train photos. At these settings 1.4% of those 360 authentic or re-saved
# images reach 0.5 (CASIA train authentic as is: 1 of 610), against 42% of the tampered ones.
ADQ_EVIDENCE_AT_HALF = 45.0  # nats of "not double-compressed" evidence in one region
ADQ_SLOPE = 1.5  # per e-fold of evidence
ADQ_MIN_INFORMATIVE = 10  # blocks with evidence; smaller regions count proportionally less
GRID_REGION_Z = 2.0  # windows above this are candidate misaligned regions
GRID_AT_HALF, GRID_SLOPE = 4.0, 3.0  # region strength (robust z) at score 0.5, per z
GHOST_REGION = 0.35  # windows whose curve departs this far from the image's are candidate regions
GHOST_AT_HALF, GHOST_SLOPE = 0.75, 12.0
MIN_REGION_BLOCKS = 8  # grid and ghost regions smaller than this count proportionally less,
MIN_REGION_FRACTION = 0.01  # ... and so do those under 1% of the image


@dataclass(frozen=True, eq=False)
class _Finding:
    """One analysis' regions: heat (block map in [0, 1], 0.5 at the region threshold), the block
    masks of its regions with their scores (strongest first), and numbers for the details."""

    analysis: str
    heat: np.ndarray
    regions: list[tuple[float, np.ndarray]]
    numbers: dict[str, Any]

    @property
    def score(self) -> float:
        return self.regions[0][0] if self.regions else 0.0


def _logistic(value: float | np.ndarray) -> Any:
    return 1.0 / (1.0 + np.exp(-np.clip(value, -50, 50)))


MAX_REGIONS = 50  # regions kept per analysis (strongest first); the rest are noise-sized


def _scored_regions(candidates: np.ndarray, scores_of) -> list[tuple[float, np.ndarray]]:
    """Connected regions of a block mask, strongest first. scores_of(labels, count) returns one
    score per label 0..count-1 (label 0, the background, is ignored); per-label sums come from
    np.bincount, so images with thousands of specks stay fast."""
    count, labels = cv2.connectedComponents(candidates.astype(np.uint8), connectivity=8)
    if count <= 1:
        return []
    scores = np.asarray(scores_of(labels, count), np.float64)
    order = np.argsort(-scores[1:])[:MAX_REGIONS] + 1
    return [(float(scores[index]), labels == index) for index in order if scores[index] > 0.001]


def _per_label(labels: np.ndarray, count: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(labels.ravel(), None if weights is None else weights.ravel(), minlength=count)


def _aligned_finding(dq: AlignedDoubleQuantisation) -> _Finding:
    """Regions with evidence of NOT being double-compressed in an image that is."""
    heat = tampered_probability(dq.llr)
    informative_total = max(int(np.count_nonzero(dq.llr)), 1)

    def scores_of(labels: np.ndarray, count: int) -> np.ndarray:
        evidence = -_per_label(labels, count, dq.llr)
        informative = _per_label(labels, count, (dq.llr != 0).astype(np.float64))
        evidence = np.maximum(evidence * np.minimum(1.0, informative / ADQ_MIN_INFORMATIVE), 1e-6)
        scores = _logistic(ADQ_SLOPE * np.log(evidence / ADQ_EVIDENCE_AT_HALF))
        # A region holding most of the evidence is the background, not a region in it.
        return np.where(informative > 0.5 * informative_total, 0.0, scores)

    regions = _scored_regions(heat > 0.5, scores_of) if dq.frequencies else []
    evidence = float(-dq.llr[regions[0][1]].sum()) if regions else 0.0
    return _Finding("aligned", heat.astype(np.float32), regions, {"region_evidence_nats": round(evidence, 1)})


def _local_finding(
    analysis: str, values: np.ndarray, threshold: float, at_half: float, slope: float
) -> _Finding:
    """Regions of a strength map above threshold, scored by their mean strength; regions smaller
    than MIN_REGION_BLOCKS blocks or MIN_REGION_FRACTION of the image count proportionally less."""
    min_blocks = max(MIN_REGION_BLOCKS, MIN_REGION_FRACTION * values.size)

    def scores_of(labels: np.ndarray, count: int) -> np.ndarray:
        size = _per_label(labels, count)
        strength = (
            _per_label(labels, count, values) / np.maximum(size, 1) * np.minimum(1.0, size / min_blocks)
        )
        return _logistic(slope * (strength - at_half))

    heat = _logistic((values - threshold) * (4.0 / max(at_half - threshold, 1e-6))).astype(np.float32)
    regions = _scored_regions(values > threshold, scores_of)
    strength = float(values[regions[0][1]].mean()) if regions else 0.0
    return _Finding(analysis, heat, regions, {"region_strength": round(strength, 3)})


def _to_pixels(block_map: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """A block map back at image size: each sampled block covers stride x stride blocks; the strip
    right and below the last whole block repeats the edge."""
    side = 8 * stride
    pixels = np.repeat(np.repeat(block_map, side, axis=0), side, axis=1)[: shape[0], : shape[1]]
    pad = ((0, shape[0] - pixels.shape[0]), (0, shape[1] - pixels.shape[1]))
    return np.pad(pixels, pad, mode="edge") if any(p[1] for p in pad) else pixels


def _quality_phrase(table: np.ndarray, known: np.ndarray | None = None) -> tuple[int, str]:
    quality, error = nearest_quality_relative(table, known)
    return quality, f"quality ~{quality}" + ("" if error < 0.15 else " (not a libjpeg table)")


ANALYSIS_NAMES = {
    "aligned": "aligned double quantisation",
    "grid": "grid misalignment",
    "ghost": "JPEG ghosts",
}
MASK_MIN_SCORE = 0.05  # double-quantisation regions with less evidence (~4 nats) stay out of the mask


@dataclass(frozen=True)
class JpegCompression:
    name = "jpeg"
    version = "3"  # 2: declines a featureless image; 3: or random noise
    description = (
        "JPEG compression history: marks regions that were not double-compressed like the rest of the "
        "image, are blocky on a shifted 8x8 grid, or leave a different JPEG ghost."
    )
    frequencies: int = 44  # DCT frequencies (zig-zag order) used by the double-quantisation model
    ghost_qualities: tuple[int, ...] = GHOST_QUALITIES

    def analyze(self, image: LoadedImage) -> Evidence:
        height, width = image.height, image.width
        if min(height, width) < MIN_SIDE:
            return not_applicable(
                self.name,
                f"The image is too small ({width}x{height}) for JPEG block statistics; it needs at least "
                f"{MIN_SIDE}x{MIN_SIDE} pixels.",
                self.version,
            )
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what)
        jpeg_luma = decoded_luma(image)
        luma = image.gray if jpeg_luma is None else jpeg_luma
        stride = max(1, math.ceil(math.sqrt((height // 8) * (width // 8) / MAX_BLOCKS)))
        coefficients = block_dct(luma, stride)
        table = image.quantization.get(0) if image.is_jpeg else None
        # A file stored without loss (PNG, ...) may still have been a JPEG: its coefficients then sit
        # on that JPEG's levels, which the same model finds with a "last" quantiser step of 1.
        last_table = np.ones((8, 8)) if table is None else table
        dq = aligned_double_quantisation(
            coefficients,
            block_dct(luma, stride, (1, 1)),
            last_table,
            self.frequencies,
            reliable=~clipped_blocks(image.pixels, stride),
        )
        ghosts = jpeg_ghosts(coefficients, self.ghost_qualities)
        findings = [
            _aligned_finding(dq),
            _local_finding("ghost", ghosts.anomaly, GHOST_REGION, GHOST_AT_HALF, GHOST_SLOPE),
        ]
        details: dict[str, Any] = {"indicates": "manipulated", **_history_details(table, dq)}
        # A shifted grid only means something against the file's own JPEG grid: on a photo that was
        # never a JPEG, blocky-looking texture is all it would find (false alarms on film scans).
        if table is not None or dq.frequencies:
            grid = misaligned_grid(luma, stride)
            findings.append(_local_finding("grid", grid.strength, GRID_REGION_Z, GRID_AT_HALF, GRID_SLOPE))
            details["grid_offset_dy_dx"] = list(grid.offset)
        else:
            details["grid_misalignment"] = "not run: no JPEG grid in this image to compare against"
        details.update(
            {
                "analyses_run": [ANALYSIS_NAMES[f.analysis] for f in findings],
                "scores": {ANALYSIS_NAMES[f.analysis]: round(f.score, 4) for f in findings},
            }
        )
        details |= {
            "ghost_median_curve": {
                str(q): round(float(v), 3) for q, v in zip(ghosts.qualities, ghosts.curve, strict=True)
            },
            "block_stride": stride,
        }
        for finding in findings:
            details.update({f"{finding.analysis}_{k}": v for k, v in finding.numbers.items()})

        winner = max(findings, key=lambda f: f.score)
        heat_blocks = winner.heat
        mask_blocks = np.zeros(heat_blocks.shape, bool)
        for finding in findings:
            if finding is not winner and finding.score >= 0.5:
                heat_blocks = np.maximum(heat_blocks, finding.heat)
            # The double-quantisation map is the calibrated localiser: its weaker regions are shown
            # too (the score says how weak); the grid and ghost maps only mark regions when strong.
            floor = MASK_MIN_SCORE if finding.analysis == "aligned" else 0.5
            for region_score, region in finding.regions:
                if region_score >= floor:
                    mask_blocks |= region
        heatmap = _to_pixels(heat_blocks, stride, (height, width)).astype(np.float32)
        mask = _to_pixels(mask_blocks, stride, (height, width))
        details["region_fraction"] = round(float(mask.mean()), 4)
        if winner.analysis == "ghost" and winner.regions:
            inside = ghosts.curves[winner.regions[0][1]].mean(axis=0)
            details["ghost_region_best_quality"] = int(ghosts.qualities[int(np.argmin(inside))])
        score = round(float(winner.score), 4)
        return Evidence(
            expert=self.name,
            score=score,
            applicable=True,
            summary=_summary(winner.analysis, score, details),
            heatmap=heatmap,
            mask=mask,
            regions=regions_from_mask(mask, heatmap, "inconsistent JPEG compression history"),
            details=details,
        )


def _history_details(table: np.ndarray | None, dq: AlignedDoubleQuantisation) -> dict[str, Any]:
    """What the file's table and the double-quantisation fit say about its compression history."""
    details: dict[str, Any] = {"is_jpeg": table is not None}
    if table is not None:
        quality, phrase = _quality_phrase(table.astype(np.float64))
        details.update(
            {
                "last_quality_estimate": quality,
                "last_compression": phrase,
                "luma_table_first_row": [int(v) for v in table[0]],
            }
        )
    details["earlier_compression_found"] = dq.frequencies > 0
    details["double_quantised_frequencies"] = dq.frequencies
    if dq.frequencies:
        known = dq.first_table > 0
        quality, phrase = _quality_phrase(dq.first_table.astype(np.float64), known)
        details.update(
            {
                "first_quality_estimate": quality,
                "first_compression": phrase,
                "first_table_estimate": dq.first_table.tolist(),  # 0: step not estimated
                "earlier_compression_share": round(float(dq.mixture[known].mean()), 3),
            }
        )
    return details


def _summary(analysis: str, score: float, details: dict[str, Any]) -> str:
    """One or two plain sentences: what was found, with the number behind it, and how strong."""
    lead = "" if score >= 0.5 else "Weak evidence: "
    share = f"{100 * details['region_fraction']:.1f}% of the image"
    first = details.get("first_compression")
    if details["is_jpeg"]:
        history = f"compressed twice (first at {first}, then at {details['last_compression']})"
    else:
        history = f"stored without loss after an earlier JPEG compression (at {first})"
    if score >= 0.25 and analysis == "aligned":
        text = (
            f"the image was {history}, but the marked region ({share}) does not carry that earlier "
            "compression on the same grid, so it was likely pasted in (from another image or another "
            "part of this one) or edited before the last save."
        )
        return lead + text if lead else text[0].upper() + text[1:]
    if score >= 0.25 and analysis == "grid":
        dy, dx = details["grid_offset_dy_dx"]
        text = (
            f"the marked region ({share}) is blocky on an 8x8 JPEG grid shifted by {dy} px down and "
            f"{dx} px right of the file's grid (blockiness {details['grid_region_strength']:.1f} times "
            "the image's usual spread), so it was compressed before it was pasted off-grid."
        )
        return lead + text if lead else text[0].upper() + text[1:]
    if score >= 0.25 and analysis == "ghost":
        text = (
            f"the marked region ({share}) re-compresses unlike the rest (a JPEG ghost: its error curve "
            f"departs by {details['ghost_region_strength']:.2f} from the image's, lowest at quality "
            f"~{details.get('ghost_region_best_quality')}), so its compression history differs."
        )
        return lead + text if lead else text[0].upper() + text[1:]
    ran = ", ".join(details["analyses_run"])
    if details["earlier_compression_found"]:
        faint = (
            f"; the faint marks on {share} are within what unedited re-saved photos show"
            if details["region_fraction"] > 0
            else ""
        )
        return (
            f"The whole image was {history} and no region clearly breaks that pattern: it was re-saved, "
            f"which by itself is not evidence of a local edit (score {score:.2f}{faint})."
        )
    if details["is_jpeg"]:
        return (
            f"No trace of double JPEG compression: the file looks compressed once "
            f"({details['last_compression']}) and no region stands out (score {score:.2f}; ran {ran})."
        )
    return (
        "Not a JPEG file and no trace of an earlier JPEG compression, so the compression-history tests "
        f"have little to go on; no region stands out (score {score:.2f}; ran {ran})."
    )
