"""Copy-move (cloning) detection: finds a part of the image that appears twice in it.

Two detectors propose how a region was moved, and one dense check confirms each proposal.

1. Keypoints, after Amerini et al., "A SIFT-based forensic method for copy-move attack detection and
   transformation recovery", IEEE TIFS 2011: SIFT keypoints of the luma are matched against each
   other with the generalised 2NN ratio test (g2NN), pairs that are too close are dropped, and
   sequential RANSAC over the pairs recovers each similarity transform (shift, rotation, scale).
2. Blocks, after Fridrich, Soukal & Lukas, "Detection of copy-move forgery in digital images", DFRWS
   2003: quantised low-frequency DCT coefficients of overlapping 16x16 blocks are sorted, and a shift
   vector shared by many identical block pairs reveals a copy that has too few keypoints. Nearly
   constant blocks are skipped: two patches of clear sky are not evidence.

Dense verification, as in the localisation step evaluated by Christlein et al., "An evaluation of
popular copy-move forgery detection approaches", IEEE TIFS 2012: the image is warped by the
transform and compared with itself by local zero-mean correlation. Pixels that match mark the copy;
their preimage marks the source. Which of the two is the original cannot be told from geometry, so
the regions are "duplicated region A / B". Periodic textures are not clones: a transform that still
matches when applied twice, or a block shift voted for by groups of many identical blocks, is dropped.
Nor is lettering: matches beside a plain page's background (a screenshot of a post around its photo)
do not count, and a duplication whose two copies are both a run of glyphs in a line of printed text
(a word that a photographed page prints twice) is dropped: printed text repeats its words.

Score: probability-like strength of the best verified duplication = geometric support x matched
area x pixel fidelity x exactness. Exactness separates clones from repeated real objects (windows,
bricks, fabric): a clone repeats keypoint positions to a fraction of a pixel and block shifts to the
exact pixel. 0.5 means a clearly duplicated region; photos without one stay near 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

from experts.base import Evidence, Region, graphic_declined, not_applicable, nothing_to_examine
from experts.image import LoadedImage
from experts.maps import resize_map, working_copy

MIN_SIDE = 32  # below this there is no room for a region and its copy
BLOCK = 16  # block side (pixels at analysis scale) for the block detector
FLAT_STD = 4.0  # luma standard deviation under which a window is "flat" (sky, walls, saturation)
MATCH_CORRELATION = 0.7  # local correlation at which a pixel counts as a copy of its preimage
# A plain page: one luma level (within 2) covering PAGE_SHARE of the image, as a screenshot's background
# does. Its lettering and icons repeat exactly ("news" in "Local News" and "@localnews"), so pixels with
# PAGE_NEAR of their PAGE_WINDOW-square on the page do not pin a copy down. A screenshot of a post with
# a photo in it: 0.95 -> below 0.5; of CASIA v1 `train` and `val` (1,469 images) 16 scores move, by at
# most 0.09, none across 0.5.
PAGE_SHARE, PAGE_NEAR, PAGE_WINDOW = 0.2, 0.3, 15
# Printed text (`_is_lettering`), judged in the band of rows a copy spans, extended sideways by twice its
# width. Ink: darker than the paper (a closing of the band, wider than a stroke) by 20 grey levels and
# 20%; paper: within 8% of it; marks: ink blobs of at least 6 pixels. Text looks like many small marks of
# one size on paper: paper covers LETTER_PAPER of the band, ink LETTER_INK of it, there are LETTER_MARKS
# marks or more, the three largest hold at most LETTER_TOP3 of the ink, the median mark is LETTER_HEIGHT
# pixels tall or more, and LETTER_ALIKE of the ink lies in marks of about that size (0.5-2.2x as tall, at
# most 3x as wide). Both copies must pass. Chosen on photographed pages drawn for the purpose (text with
# repeated words, paper lighting, blur, noise, tilt up to 5 degrees, 0.8-2x, JPEG 60-95; 150 pages, 137
# with a duplication of 0.5 or more) against the 414 duplications copy-move finds in CASIA v1 `train`
# and `val`: it drops 94% of the pages' duplications and clears 90% of the pages, and no CASIA
# duplication, nor any under looser bounds (0.3, up to 0.5, 5, 0.8, 3 px, 0.3; the nearest: shredded
# paper, 0.25 of its ink in like marks; cloned spires against the sky, three marks hold 0.6).
LETTER_PAPER, LETTER_INK, LETTER_MARKS, LETTER_TOP3 = 0.4, (0.05, 0.45), 8, 0.6
LETTER_HEIGHT, LETTER_ALIKE = 4.0, 0.5
# Quantised DCT coefficients (row u, column v) and their quantisation steps: coarse enough that JPEG
# re-compression rarely changes them, fine enough that different textures rarely collide.
DCT_COEFFICIENTS = ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1))
DCT_STEPS = (48.0, 24.0, 24.0, 20.0, 20.0, 20.0, 16.0, 16.0)


@dataclass(frozen=True, eq=False)
class _Proposal:
    """A transform that maps region A onto region B (2x3 matrix, analysis-scale pixels)."""

    matrix: np.ndarray
    method: str  # "keypoints" or "blocks"
    support: int  # distinct RANSAC inlier keypoints, or distinct block pairs voting for the shift
    anchors_b: np.ndarray  # Nx2 (x, y) points inside region B that support the transform
    precision: float  # keypoints: median inlier residual (px); blocks: share of votes on the exact shift


@dataclass(frozen=True, eq=False)
class _Duplication:
    """A verified proposal with its pixel masks (analysis scale) and the numbers behind its score."""

    proposal: _Proposal
    mask_a: np.ndarray
    mask_b: np.ndarray
    correlation: float  # median local correlation over the textured matched pixels of region B
    distinctive_fraction: float  # matched pixels of B that pin down a position, as a share of the image
    strength: float
    printed_word: bool = False  # both copies are runs of glyphs in a line of text: not counted


@dataclass(frozen=True)
class CopyMove:
    name = "copy_move"
    # 2: declines a featureless image; 3: declines a graphic; 4: lettering on a page; 5: printed words
    # 6: declines random noise
    version = "6"
    description = (
        "Copy-move detection: finds a region duplicated within the same image (SIFT keypoints with "
        "RANSAC, DCT block matching, pixel-level check) and marks both copies."
    )
    max_keypoints: int = 2500
    keypoint_pixels: int = 600_000  # SIFT runs on at most this many pixels (its cost grows with them)
    analysis_pixels: int = 270_000  # blocks and dense verification run on at most this many
    ratio: float = 0.6  # g2NN threshold (Amerini et al. use 0.5; the pixel check allows a looser one)
    min_inliers: int = 5
    sift_contrast: float = 0.02  # under OpenCV's 0.04: copies in low-contrast areas need keypoints too

    def analyze(self, image: LoadedImage) -> Evidence:
        if min(image.height, image.width) < MIN_SIDE:
            return not_applicable(
                self.name,
                f"The image is too small ({image.width}x{image.height}) to look for a copied region; "
                f"copy-move detection needs at least {MIN_SIDE} pixels on each side.",
                self.version,
            )
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what)
        if image.graphic:
            return graphic_declined(
                self.name,
                self.version,
                "such images repeat their letters, icons and shapes exactly, so a region found twice says "
                "nothing of copying.",
            )
        pixels, keypoint_scale = working_copy(image.pixels, self.keypoint_pixels)
        keypoint_luma = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)  # BT.601 luma
        small, small_scale = working_copy(keypoint_luma, self.analysis_pixels)
        keypoint_proposals = _keypoint_proposals(
            keypoint_luma, self.max_keypoints, self.ratio, self.min_inliers, self.sift_contrast
        )
        proposals = [_rescale(p, small_scale) for p in keypoint_proposals] + _block_proposals(small)
        found = _verified(small.astype(np.float32), proposals)
        return _evidence(self, image, found, proposals, keypoint_scale * small_scale)


# --------------------------------------------------------------------------------------------------
# Keypoints: SIFT + g2NN + RANSAC (Amerini et al. 2011)


def _keypoint_proposals(
    luma: np.ndarray, max_keypoints: int, ratio: float, min_inliers: int, contrast: float
) -> list[_Proposal]:
    sift = cv2.SIFT_create(nfeatures=max_keypoints, contrastThreshold=contrast)
    keypoints, descriptors = sift.detectAndCompute(luma, None)
    if descriptors is None or len(keypoints) < 2 * min_inliers:
        return []
    points = np.array([kp.pt for kp in keypoints], np.float32)
    min_distance = max(10.0, 0.02 * math.hypot(*luma.shape))
    pairs = _g2nn_pairs(points, descriptors, ratio, min_distance)
    return _ransac_similarities(points, pairs, min_inliers, min_distance)


def _g2nn_pairs(points: np.ndarray, descriptors: np.ndarray, ratio: float, min_distance: float) -> np.ndarray:
    """Pairs (i, j), i < j, accepted by the generalised 2NN test: the k-th neighbour of a keypoint
    matches while every ratio d_k / d_(k+1) so far is under `ratio`, so one keypoint can match
    several copies. Neighbours closer than min_distance in the image are ignored (same structure)."""
    neighbours = min(len(points) - 1, 10)
    squared = np.einsum("ij,ij->i", descriptors, descriptors)
    distance = squared[:, None] + squared[None, :] - 2.0 * descriptors @ descriptors.T
    dx = points[:, None, 0] - points[None, :, 0]
    dy = points[:, None, 1] - points[None, :, 1]
    distance[dx * dx + dy * dy < min_distance**2] = np.inf  # includes each keypoint itself
    order = np.argpartition(distance, neighbours, axis=1)[:, : neighbours + 1]
    nearest = np.take_along_axis(distance, order, axis=1)
    rank = np.argsort(nearest, axis=1, kind="stable")
    order = np.take_along_axis(order, rank, axis=1)
    nearest = np.sqrt(np.maximum(np.take_along_axis(nearest, rank, axis=1), 0.0))
    # A neighbour with no valid successor (inf) cannot pass a ratio test.
    with np.errstate(invalid="ignore"):  # inf / inf where both are missing: masked out just below
        ratios = np.where(
            np.isfinite(nearest[:, 1:]), nearest[:, :-1] / np.maximum(nearest[:, 1:], 1e-6), np.inf
        )
    accepted = np.cumprod(ratios < ratio, axis=1).astype(bool)
    rows, cols = np.nonzero(accepted)
    partners = order[rows, cols]
    pairs = np.stack([np.minimum(rows, partners), np.maximum(rows, partners)], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _ransac_similarities(
    points: np.ndarray, pairs: np.ndarray, min_inliers: int, min_distance: float, max_transforms: int = 4
) -> list[_Proposal]:
    """Sequential RANSAC: fit a similarity to all pairs (each in both directions, since which side is
    the copy is unknown), keep it if enough distinct keypoints agree, remove its pairs, repeat."""
    proposals = []
    remaining = pairs
    for _ in range(max_transforms):
        if len(remaining) < min_inliers:
            break
        source = np.concatenate([points[remaining[:, 0]], points[remaining[:, 1]]])
        target = np.concatenate([points[remaining[:, 1]], points[remaining[:, 0]]])
        # OpenCV's RANSAC uses a fixed seed, so the result is deterministic.
        matrix, inlier_flags = cv2.estimateAffinePartial2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=3.0, maxIters=2000, confidence=0.995
        )
        if matrix is None:
            break
        inliers = inlier_flags.ravel().astype(bool)
        remaining = remaining[~(inliers[: len(remaining)] | inliers[len(remaining) :])]
        anchors_b = target[inliers]
        distinct = len(np.unique(np.round(anchors_b / 2.0), axis=0))  # one structure, several keypoints
        if distinct < min_inliers:
            break
        predicted = source[inliers] @ matrix[:, :2].T + matrix[:, 2]
        residual = float(np.median(np.hypot(*(predicted - anchors_b).T)))
        shift, _, scale = _similarity_parameters(matrix)
        if shift >= min_distance and 0.25 <= scale <= 4.0:
            proposals.append(_Proposal(matrix, "keypoints", distinct, anchors_b, residual))
    return proposals


def _rescale(proposal: _Proposal, factor: float) -> _Proposal:
    """The same proposal in coordinates scaled by `factor` (the linear part is scale-free)."""
    if factor == 1.0:
        return proposal
    matrix = proposal.matrix.copy()
    matrix[:, 2] *= factor
    return _Proposal(
        matrix, proposal.method, proposal.support, proposal.anchors_b * factor, proposal.precision
    )


# --------------------------------------------------------------------------------------------------
# Blocks: quantised low-frequency DCT + shift-vector voting (Fridrich, Soukal & Lukas 2003)


def _block_proposals(luma: np.ndarray, max_proposals: int = 3) -> list[_Proposal]:
    height, width = luma.shape
    if min(height, width) < 3 * BLOCK:
        return []
    features, positions = _block_features(luma.astype(np.float32))
    if len(positions) < 50:
        return []
    a_index, b_index, group_size = _identical_blocks(features)
    shifts = positions[b_index] - positions[a_index]
    # One sign per shift: A is the block that comes first in raster order.
    flip = (shifts[:, 1] < 0) | ((shifts[:, 1] == 0) & (shifts[:, 0] < 0))
    a_index, b_index = np.where(flip, b_index, a_index), np.where(flip, a_index, b_index)
    shifts = positions[b_index] - positions[a_index]
    far = np.hypot(shifts[:, 0], shifts[:, 1]) >= max(BLOCK, 0.04 * math.hypot(height, width))
    shifts, b_index, group_size = shifts[far], b_index[far], group_size[far]
    if len(shifts) == 0:
        return []
    votes = np.zeros((height, 2 * width + 1), np.float32)  # row dy >= 0, column dx + width
    np.add.at(votes, (shifts[:, 1], shifts[:, 0] + width), 1.0)
    # Rescaling or sub-pixel effects spread a true shift over neighbouring cells: pool 3x3.
    pooled = cv2.boxFilter(votes, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    min_votes = max(20.0, 1e-4 * height * width)
    peaks = []
    for _ in range(max_proposals):
        peak_y, peak_x = np.unravel_index(int(np.argmax(pooled)), pooled.shape)
        if pooled[peak_y, peak_x] < min_votes:
            break
        peaks.append((peak_y, peak_x, float(pooled[peak_y, peak_x])))
        pooled[max(peak_y - 2, 0) : peak_y + 3, max(peak_x - 2, 0) : peak_x + 3] = 0.0
    proposals = []
    for peak_y, peak_x, peak_votes in peaks:
        top, left = max(peak_y - 1, 0), max(peak_x - 1, 0)
        window = votes[top : peak_y + 2, left : peak_x + 2]
        local_y, local_x = np.unravel_index(int(np.argmax(window)), window.shape)
        dy, dx = top + local_y, left + local_x - width
        near = (np.abs(shifts[:, 0] - dx) <= 1) & (np.abs(shifts[:, 1] - dy) <= 1)
        # In a periodic texture many blocks share one feature vector; a clone makes pairs.
        if np.median(group_size[near]) > 3:
            continue
        anchors = positions[b_index[near]].astype(np.float32) + BLOCK / 2.0
        matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
        exact_share = float(votes[dy, dx + width] / peak_votes)
        proposals.append(_Proposal(matrix, "blocks", int(peak_votes), anchors, exact_share))
    return proposals


def _block_features(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantisation-ready DCT features (N x 8) and top-left corners (N x 2, x then y) of every
    textured BLOCK x BLOCK block. Each DCT coefficient of all blocks at once is one separable
    correlation of the image with two 1-D basis vectors."""
    height, width = gray.shape
    rows, cols = height - BLOCK + 1, width - BLOCK + 1
    basis = _dct_matrix(BLOCK)
    features = []
    for (u, v), step in zip(DCT_COEFFICIENTS, DCT_STEPS, strict=True):
        response = cv2.sepFilter2D(
            gray, cv2.CV_32F, basis[v], basis[u], anchor=(0, 0), borderType=cv2.BORDER_CONSTANT
        )
        features.append(response[:rows, :cols].ravel() / step)
    mean = cv2.blur(gray, (BLOCK, BLOCK), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)[:rows, :cols]
    mean_sq = cv2.blur(gray * gray, (BLOCK, BLOCK), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
    std = np.sqrt(np.maximum(mean_sq[:rows, :cols] - mean * mean, 0.0))
    textured = std.ravel() >= 2 * FLAT_STD
    ys, xs = np.divmod(np.arange(rows * cols), cols)
    return np.stack(features, axis=1)[textured], np.stack([xs, ys], axis=1)[textured]


def _identical_blocks(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of blocks with identical quantised features (index a, index b, and how many blocks
    share that feature vector): neighbours in sorted order, as in Fridrich et al., on two
    quantisation grids offset by half a step so a value near a bin edge still matches."""
    count = len(features)
    pairs = []
    for offset in (0.0, 0.5):
        keys = _pack(np.floor(features + offset).astype(np.int64))
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1], True])
        group_sizes = np.repeat(np.diff(starts), np.diff(starts))
        for gap in (1, 2):
            same = sorted_keys[:-gap] == sorted_keys[gap:]
            first, second = order[:-gap][same], order[gap:][same]
            pairs.append(
                np.stack([np.minimum(first, second), np.maximum(first, second), group_sizes[:-gap][same]])
            )
    stacked = np.concatenate(pairs, axis=1)
    _, unique = np.unique(stacked[0] * count + stacked[1], return_index=True)
    return stacked[0, unique], stacked[1, unique], stacked[2, unique]


def _dct_matrix(size: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: row u is the u-th basis vector."""
    u, x = np.mgrid[:size, :size]
    matrix = np.cos(np.pi * (2 * x + 1) * u / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(np.float32)


def _pack(quantised: np.ndarray) -> np.ndarray:
    """One int64 key per row of 8 small integers (8 bits each), so sorting groups identical rows."""
    clipped = np.clip(quantised, -128, 127) + 128
    key = np.zeros(len(quantised), np.int64)
    for column in range(clipped.shape[1]):
        key = (key << 8) | clipped[:, column]
    return key


# --------------------------------------------------------------------------------------------------
# Dense verification (Christlein et al. 2012)


def _verified(gray: np.ndarray, proposals: list[_Proposal]) -> list[_Duplication]:
    """Verified duplications, strongest first; of two covering the same area the stronger is kept.
    Proposals whose geometry is too inexact to ever score are not worth the pixel check."""
    plausible = [p for p in proposals if _exactness(p) > 0.0]
    if not plausible:
        return []
    distinctive = _distinctive(gray) & ~_beside_page(gray)
    found: list[_Duplication] = []
    for proposal in plausible:
        duplication = _verify(gray, distinctive, proposal)
        if duplication is None:
            continue
        same = next((i for i, d in enumerate(found) if _same_area(d, duplication)), None)
        if same is None:
            found.append(duplication)
        elif duplication.strength > found[same].strength:
            found[same] = duplication
    return sorted(found, key=lambda d: -d.strength)


def _verify(gray: np.ndarray, distinctive: np.ndarray, proposal: _Proposal) -> _Duplication | None:
    height, width = gray.shape
    mask_b, similarity, comparable = _matched_region(gray, proposal.matrix, proposal.anchors_b)
    matched_textured = mask_b & comparable
    matched_distinctive = mask_b & distinctive
    if matched_distinctive.sum() < 10 or matched_textured.sum() < 10:
        return None
    correlation = float(np.median(similarity[matched_textured]))
    distinctive_fraction = float(matched_distinctive.sum()) / (height * width)
    strength = _strength(proposal, correlation, distinctive_fraction)
    if strength > 0.0 and _is_periodic(gray, proposal.matrix, matched_textured):
        return None
    mask_a = cv2.warpAffine(
        mask_b.astype(np.uint8),
        proposal.matrix,
        (width, height),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
    ).astype(bool)
    printed_word = strength > 0.0 and _is_lettering(gray, mask_a) and _is_lettering(gray, mask_b)
    return _Duplication(proposal, mask_a, mask_b, correlation, distinctive_fraction, strength, printed_word)


def _matched_region(
    gray: np.ndarray, matrix: np.ndarray, anchors: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of region B that equal their preimage under `matrix`: the connected matching areas
    that contain an anchor point, within a margin around the anchors. Returns (mask_b, similarity,
    comparable), where comparable marks textured pixels whose preimage is inside the image."""
    height, width = gray.shape
    warped, inside = _warp(gray, matrix)
    similarity, textured = _local_similarity(gray, warped)
    similar = ((similarity >= MATCH_CORRELATION) & inside).astype(np.uint8)
    similar = cv2.morphologyEx(similar, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels = cv2.connectedComponents(similar, connectivity=8)
    xs = np.clip(np.round(anchors[:, 0]).astype(int), 0, width - 1)
    ys = np.clip(np.round(anchors[:, 1]).astype(int), 0, height - 1)
    touched = np.bincount(labels[ys, xs], minlength=count) > 0
    touched[0] = False
    mask = touched[labels]
    # Flat areas that merely agree in brightness must not spread the mask over the whole sky.
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    margin = max(BLOCK, round(0.3 * max(x1 - x0, y1 - y0)))
    bound = np.zeros_like(mask)
    bound[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = True
    mask = (mask & bound).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8)).astype(bool)
    return binary_fill_holes(mask), similarity, textured & inside


def _warp(gray: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(warped, inside): warped(q) = gray(M^-1 q) brings region A's content onto region B; inside
    marks where the preimage lies within the image."""
    height, width = gray.shape
    warped = cv2.warpAffine(
        gray, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    inside = cv2.warpAffine(
        np.ones_like(gray), matrix, (width, height), flags=cv2.INTER_NEAREST, borderValue=0.0
    )
    return warped, inside > 0.5


def _local_similarity(gray: np.ndarray, other: np.ndarray, radius: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, textured): zero-mean normalised cross-correlation in (2r+1)^2 windows, where two
    flat windows count as similar when their means agree and a flat one never matches a textured
    one; textured marks windows where neither side is flat."""
    size = (2 * radius + 1, 2 * radius + 1)
    mean_g, mean_o = cv2.blur(gray, size), cv2.blur(other, size)
    var_g = cv2.blur(gray * gray, size) - mean_g * mean_g
    var_o = cv2.blur(other * other, size) - mean_o * mean_o
    covariance = cv2.blur(gray * other, size) - mean_g * mean_o
    correlation = covariance / np.sqrt(np.maximum(var_g * var_o, 1e-6))
    flat_g, flat_o = var_g < FLAT_STD**2, var_o < FLAT_STD**2
    same_level = np.abs(mean_g - mean_o) < 3.0
    similarity = np.where(flat_g & flat_o, same_level.astype(np.float32), correlation)
    similarity = np.where(flat_g ^ flat_o, 0.0, similarity)
    return similarity.astype(np.float32), ~(flat_g | flat_o)


def _distinctive(gray: np.ndarray, step: int = 4, limit: float = 0.75) -> np.ndarray:
    """Pixels whose neighbourhood pins down a position: it stops matching itself when moved by
    `step` pixels in any direction. Flat areas and straight edges fail (an edge matches itself when
    moved along it), so matches there say little about copying."""
    ambiguity = np.full(gray.shape, -1.0, np.float32)
    for dx, dy in ((step, 0), (0, step), (step, step), (step, -step)):
        similarity, textured = _local_similarity(gray, np.roll(gray, (dy, dx), axis=(0, 1)))
        ambiguity = np.maximum(ambiguity, np.where(textured, similarity, 1.0))
    return ambiguity < limit


def _beside_page(gray: np.ndarray) -> np.ndarray:
    """Pixels beside a plain page (PAGE_SHARE, PAGE_NEAR, PAGE_WINDOW): none in an image without one."""
    levels = np.bincount(np.clip(np.rint(gray), 0, 255).astype(np.int64).ravel(), minlength=256)
    plain = np.abs(gray - float(np.argmax(levels))) <= 2.0
    if plain.mean() < PAGE_SHARE:
        return np.zeros(gray.shape, bool)
    return cv2.blur(plain.astype(np.float32), (PAGE_WINDOW, PAGE_WINDOW)) >= PAGE_NEAR


def _is_periodic(gray: np.ndarray, matrix: np.ndarray, matched: np.ndarray) -> bool:
    """A periodic texture (bricks, tiles, stripes) also matches under the transform applied twice;
    a cloned patch does not."""
    affine = np.vstack([matrix, [0.0, 0.0, 1.0]])
    warped_twice, inside_twice = _warp(gray, (affine @ affine)[:2])
    similarity_twice, _ = _local_similarity(gray, warped_twice)
    check = matched & inside_twice
    if check.sum() < 20:
        return False
    return float(np.mean(similarity_twice[check] >= MATCH_CORRELATION)) > 0.5


def _is_lettering(gray: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the copy in `mask` sits in printed text: many small marks of one size on paper (LETTER_*)."""
    if not mask.any():
        return False
    x0, y0, x1, y1 = _bbox(mask)
    height, width = y1 - y0, x1 - x0
    left, right = max(0, x0 - 2 * width), min(gray.shape[1], x1 + 2 * width)
    side = max(5, height // 3 | 1)  # wider than a glyph's stroke, so the closing shows the paper
    top, bottom = max(0, y0 - side), min(gray.shape[0], y1 + side)
    paper_level = cv2.morphologyEx(
        gray[top:bottom, left:right], cv2.MORPH_CLOSE, np.ones((side, side), np.uint8)
    )
    band, paper_level = gray[y0:y1, left:right], paper_level[y0 - top : y1 - top]
    darker = paper_level - band
    ink = darker > np.maximum(20.0, 0.2 * paper_level)
    if (darker < 0.08 * paper_level).mean() < LETTER_PAPER or not LETTER_INK[0] <= ink.mean() <= LETTER_INK[
        1
    ]:
        return False
    _, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    mark_width, mark_height, area = stats[1:, 2], stats[1:, 3], stats[1:, 4]
    marks = area >= 6
    if marks.sum() < LETTER_MARKS or np.sort(area)[-3:].sum() > LETTER_TOP3 * area.sum():
        return False
    typical = float(np.median(mark_height[marks]))
    alike = (mark_height >= 0.5 * typical) & (mark_height <= 2.2 * typical) & (mark_width <= 3 * typical)
    return typical >= LETTER_HEIGHT and area[alike].sum() >= LETTER_ALIKE * area.sum()


def _same_area(first: _Duplication, second: _Duplication) -> bool:
    union_first = first.mask_a | first.mask_b
    union_second = second.mask_a | second.mask_b
    intersection = np.logical_and(union_first, union_second).sum()
    return bool(intersection > 0.5 * min(union_first.sum(), union_second.sum()))


def _strength(proposal: _Proposal, correlation: float, distinctive_fraction: float) -> float:
    """Probability-like strength = support x area x fidelity x exactness, each in [0, 1].

    Support counts verified keypoints or block pairs; area counts matched pixels that pin down a
    position (not flat, not a straight edge); fidelity is the pixel correlation of the two copies.
    The constants were set on CASIA v1 train/val and on synthetic clones made from CASIA train
    photos (no test data)."""
    if proposal.method == "keypoints":
        support = 1.0 - math.exp(-max(proposal.support - 2, 0) / 3.0)
        fidelity = _unit((correlation - 0.82) / 0.12)
    else:
        support = 1.0 - math.exp(-proposal.support / 50.0)
        fidelity = _unit((correlation - 0.75) / 0.12)
    area = 1.0 - math.exp(-distinctive_fraction / 0.002)
    return float(support * area * fidelity * _exactness(proposal))


def _exactness(proposal: _Proposal) -> float:
    """How precisely the geometry repeats, in [0, 1]: a clone repeats keypoint positions to a
    fraction of a pixel (median residual under 0.2 px -> 1) and puts its block votes on one exact
    shift (80% -> 1); repeated real objects (windows, bricks, fabric) do neither."""
    if proposal.method == "keypoints":
        return _unit((0.5 - proposal.precision) / 0.3)
    return _unit((proposal.precision - 0.5) / 0.3)


def _unit(value: float) -> float:
    return min(max(value, 0.0), 1.0)


# --------------------------------------------------------------------------------------------------
# Evidence


def _similarity_parameters(matrix: np.ndarray) -> tuple[float, float, float]:
    """(length of the translation in pixels, rotation in degrees, scale) of a similarity matrix."""
    scale = math.hypot(matrix[0, 0], matrix[1, 0])
    angle = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
    return math.hypot(matrix[0, 2], matrix[1, 2]), angle, scale


def _where(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """'the upper-left', 'the bottom', 'the centre', ... for the centre of a box."""
    cx, cy = (bbox[0] + bbox[2]) / 2 / width, (bbox[1] + bbox[3]) / 2 / height
    vertical = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else ""
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    if vertical and horizontal:
        return f"the {vertical}-{horizontal}"
    if vertical:
        return "the top" if vertical == "upper" else "the bottom"
    return f"the {horizontal}" if horizontal else "the centre"


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _record(duplication: _Duplication, shape: tuple[int, int], scale: float) -> dict | None:
    """JSON-ready numbers for one duplication at the original image size (None if it vanishes)."""
    mask_a, mask_b = resize_map(duplication.mask_a, shape), resize_map(duplication.mask_b, shape)
    if not mask_a.any() or not mask_b.any():
        return None
    proposal = duplication.proposal
    shift, angle, factor = _similarity_parameters(proposal.matrix)
    return {
        "method": proposal.method,
        "support": proposal.support,
        "strength": round(duplication.strength, 4),
        "shift_px": round(shift / scale, 1),
        "shift_vector_px": [
            round(float(proposal.matrix[0, 2]) / scale, 1),
            round(float(proposal.matrix[1, 2]) / scale, 1),
        ],
        "rotation_deg": round(angle, 1),
        "scale": round(factor, 3),
        "correlation": round(duplication.correlation, 3),
        "precision": round(proposal.precision, 3),
        "matched_distinctive_fraction": round(duplication.distinctive_fraction, 5),
        "region_a": list(_bbox(mask_a)),
        "region_b": list(_bbox(mask_b)),
    }


def _summary(top: dict, others: int, width: int, height: int) -> str:
    box_a, box_b = top["region_a"], top["region_b"]
    size = f"{box_b[2] - box_b[0]}x{box_b[3] - box_b[1]}-pixel"
    where_a, where_b = _where(box_a, width, height), _where(box_b, width, height)
    places = f"near {where_b} and near {where_a}" if where_a != where_b else f"both near {where_b}"
    if top["strength"] < 0.15:
        return (
            f"No region clearly appears twice: the best candidate, a {size} region {places}, matches with "
            f"pixel correlation {top['correlation']:.2f} but is too small, inexact or repetitive to count."
        )
    transform = f"shift {top['shift_px']:.0f} px"
    if abs(top["rotation_deg"]) >= 2.0:
        transform += f", rotated {abs(top['rotation_deg']):.0f} degrees"
    if abs(top["scale"] - 1.0) >= 0.03:
        transform += f", scaled {top['scale']:.2f}x"
    support = (
        f"{top['support']} matching keypoints verified"
        if top["method"] == "keypoints"
        else f"{top['support']} matching pairs of 16x16 blocks"
    )
    text = (
        f"A {size} region appears twice, {places} ({transform}; {support}, pixel correlation "
        f"{top['correlation']:.2f})."
    )
    if others:
        text += f" {others} more duplicated region{'s' if others > 1 else ''} found."
    if top["strength"] < 0.5:
        text += " The match is small, inexact or repetitive, so this is weak evidence of copy-move."
    return text


def _printed_words(count: int) -> str:
    return "a printed word" if count == 1 else f"{count} printed words"


def _apart_from(printed_words: int) -> str:
    if not printed_words:
        return ""
    return f", apart from {_printed_words(printed_words)}, as printed text repeats its words"


def _printed_words_note(printed_words: int) -> str:
    if not printed_words:
        return ""
    return f" Not counted: {_printed_words(printed_words)} found twice (printed text repeats its words)."


def _evidence(
    expert: CopyMove, image: LoadedImage, found: list[_Duplication], proposals: list[_Proposal], scale: float
) -> Evidence:
    shape = (image.height, image.width)
    printed_words = sum(d.printed_word for d in found)
    found = [d for d in found if not d.printed_word]
    keypoint_count = sum(p.method == "keypoints" for p in proposals)
    details: dict = {
        "indicates": "manipulated",
        "direction": "unknown",  # geometry alone cannot tell the original from the copy
        "candidates_keypoints": keypoint_count,
        "candidates_blocks": len(proposals) - keypoint_count,
        "analysis_scale": round(scale, 4),
        "printed_words_not_counted": printed_words,
    }
    records = [r for r in (_record(d, shape, scale) for d in found[:3]) if r is not None]
    if not records:
        reason = (
            f"{len(proposals)} candidate match(es) failed the geometric or pixel check"
            if proposals
            else "no group of matching keypoints or blocks was found"
        )
        return Evidence(
            expert=expert.name,
            score=0.0,
            applicable=True,
            summary=(
                f"No region of the image appears twice ({reason}){_apart_from(printed_words)}. This is weak "
                "evidence of authenticity: copy-move is only one kind of edit."
            ),
            heatmap=np.zeros(shape, np.float32),
            mask=np.zeros(shape, bool),
            details=details,
            version=expert.version,
        )
    heat_small = np.zeros(found[0].mask_a.shape, np.float32)
    strong = np.zeros(found[0].mask_a.shape, bool)
    for duplication in found:
        both = duplication.mask_a | duplication.mask_b
        heat_small = np.maximum(heat_small, both * np.float32(duplication.strength))
        if duplication.strength >= 0.5:
            strong |= both
    regions = []
    for index, record in enumerate(records):
        suffix = "" if index == 0 else f" (match {index + 1})"
        regions.append(Region(tuple(record["region_a"]), record["strength"], f"duplicated region A{suffix}"))
        regions.append(Region(tuple(record["region_b"]), record["strength"], f"duplicated region B{suffix}"))
    details["duplications"] = records
    return Evidence(
        expert=expert.name,
        score=records[0]["strength"],
        applicable=True,
        summary=_summary(records[0], len(records) - 1, image.width, image.height)
        + _printed_words_note(printed_words),
        heatmap=resize_map(heat_small, shape),
        mask=resize_map(strong, shape),
        regions=tuple(regions),
        details=details,
        version=expert.version,
    )
