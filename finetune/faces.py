"""Face data for the deepfake-face expert: aligned crops of real and StyleGAN faces, self-blended fakes
made from real faces, and the one normalisation that every crop goes through whatever its class.

Self-blended images follow Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR
2022: a face is blended with a slightly altered copy of itself (colour, sharpness, a small shift and
scale) through a soft mask around the face, which leaves the blending boundary and the statistical
mismatch of a face swap without any identity change.

The sources differ in container (StyleGAN faces are 256x256 PNGs, real faces mostly JPEGs of any size;
../shared/data/README.md, faces_real). So every face, real or fake, is detected, aligned and cropped by
experts.faces.align_face (the same filter chain), and then `encode_alike` re-encodes it with the same
random distribution of resolution loss and JPEG quality (or leaves it lossless) for every class.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from experts.faces import (
    DEFAULT_DETECTOR,
    FACE_SIZE,
    LEFT_EAR,
    LEFT_EYE,
    MOUTH,
    RIGHT_EAR,
    RIGHT_EYE,
    align_face,
    detect_faces,
    transform_points,
)

log = logging.getLogger(__name__)

REAL, GAN, BLENDED = 0, 1, 2  # class indices, as experts.faces.CLASSES


@dataclass(frozen=True, eq=False)
class FaceCrops:
    """Aligned crops (n, FACE_SIZE, FACE_SIZE, 3) uint8, their keypoints in crop coordinates (n, 6, 2),
    labels (REAL or GAN) and the source paths."""

    crops: np.ndarray
    keypoints: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]

    def save(self, path: Path) -> None:
        np.savez(
            path, crops=self.crops, keypoints=self.keypoints, labels=self.labels, paths=np.array(self.paths)
        )

    @classmethod
    def load(cls, path: Path) -> FaceCrops:
        with np.load(path) as data:
            return cls(data["crops"], data["keypoints"], data["labels"], tuple(str(p) for p in data["paths"]))

    def select(self, label: int) -> FaceCrops:
        keep = self.labels == label
        return FaceCrops(
            self.crops[keep], self.keypoints[keep], self.labels[keep], tuple(np.array(self.paths)[keep])
        )


def crop_largest_face(
    pixels: np.ndarray, detector: str = DEFAULT_DETECTOR
) -> tuple[np.ndarray, np.ndarray] | None:
    """The aligned crop of the largest face (by eye distance) and its keypoints in crop coordinates."""
    faces = detect_faces(pixels, detector=detector)
    if not faces:
        return None
    face = max(faces, key=lambda f: f.eye_distance)
    crop, matrix = align_face(pixels, face.keypoints)
    return crop, transform_points(matrix, face.keypoints)


def read_face_crops(
    items: Sequence, labels: Sequence[int], cache: Path | None = None, detector: str = DEFAULT_DETECTOR
) -> FaceCrops:
    """Detect (with `detector`) and align the largest face of each manifest item (items without a face
    are skipped and logged); cached as .npz when `cache` is given."""
    if cache is not None and cache.is_file():
        return FaceCrops.load(cache)
    from finetune.data import read_rgb

    crops, keypoints, kept_labels, paths, faceless = [], [], [], [], []
    for item, label in tqdm(list(zip(items, labels, strict=True)), desc="faces", leave=False):
        found = crop_largest_face(read_rgb(item.file), detector)
        if found is None:
            faceless.append(item.path)
            continue
        crops.append(found[0])
        keypoints.append(found[1])
        kept_labels.append(label)
        paths.append(item.path)
    if faceless:
        log.info("no face in %d of %d images (e.g. %s); skipped", len(faceless), len(items), faceless[0])
    result = FaceCrops(
        np.stack(crops), np.stack(keypoints).astype(np.float32), np.array(kept_labels, np.int64), tuple(paths)
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        result.save(cache)
    return result


def item_rng(seed: int, key: str) -> np.random.Generator:
    """A generator fixed by (seed, key): the same input gets the same randomness in every run."""
    digest = hashlib.md5(f"{seed}|{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# --------------------------------------------------------------------------------------------------
# Self-blended faces


def face_hull(keypoints: np.ndarray) -> np.ndarray:
    """A face outline (float32 points) from the six BlazeFace keypoints: the ears, a forehead line
    above the eyes, the jaw and the chin below the mouth."""
    eyes = (keypoints[RIGHT_EYE] + keypoints[LEFT_EYE]) / 2
    down = keypoints[MOUTH] - eyes
    points = [
        keypoints[RIGHT_EAR],
        keypoints[LEFT_EAR],
        keypoints[RIGHT_EYE] - 0.7 * down,
        keypoints[LEFT_EYE] - 0.7 * down,
        keypoints[RIGHT_EAR] + 0.9 * down + 0.25 * (keypoints[MOUTH] - keypoints[RIGHT_EAR]),
        keypoints[LEFT_EAR] + 0.9 * down + 0.25 * (keypoints[MOUTH] - keypoints[LEFT_EAR]),
        keypoints[MOUTH] + 0.8 * down,
    ]
    return np.array(points, np.float32)


def blend_mask(rng: np.random.Generator, keypoints: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """A soft float32 mask in [0, 1] around the face: a randomly deformed hull or an ellipse, grown or
    shrunk, blurred at its edge, scaled by a random blending ratio."""
    hull = face_hull(keypoints)
    centre = hull.mean(axis=0)
    hull = centre + (hull - centre) * rng.uniform(0.8, 1.1, size=(len(hull), 1))
    hull += rng.normal(0, size * 0.01, hull.shape)
    mask = np.zeros((size, size), np.uint8)
    if rng.random() < 0.5:
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(hull).astype(np.int32)), 255)
    else:
        low, high = hull.min(axis=0), hull.max(axis=0)
        axes = (int(max((high[0] - low[0]) / 2, 4)), int(max((high[1] - low[1]) / 2, 4)))
        angle = float(rng.uniform(-10, 10))
        cv2.ellipse(mask, (int(centre[0]), int(centre[1])), axes, angle, 0, 360, 255, -1)
    radius = int(rng.integers(1, 10))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    soft = mask.astype(np.float32) / 255.0
    blur = int(rng.integers(2, 12)) * 2 + 1
    soft = cv2.GaussianBlur(soft, (blur, blur), 0)
    soft = cv2.GaussianBlur(soft, (blur, blur), 0) if rng.random() < 0.5 else soft
    return soft * float(rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0]))


def _colour_jitter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-6, 6)) % 180
    hsv[..., 1] *= rng.uniform(0.8, 1.2)
    rgb = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    rgb = (rgb - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)
    rgb += rng.uniform(-10, 10, size=3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _sharpness(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    choice = rng.integers(3)
    if choice == 0:
        return cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 1.5)))
    if choice == 1:
        blurred = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.8, 2.0)))
        return cv2.addWeighted(
            image, 1 + float(rng.uniform(0.3, 1.0)), blurred, -float(rng.uniform(0.3, 1.0)), 0
        )
    scale = float(rng.uniform(0.4, 0.8))
    size = image.shape[1], image.shape[0]
    small = cv2.resize(
        image, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), cv2.INTER_AREA
    )
    return cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)


def _shift(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    scale = float(rng.uniform(0.95, 1.05))
    dx, dy = rng.uniform(-0.03, 0.03, size=2) * size
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), 0.0, scale)
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def self_blend(
    rng: np.random.Generator, crop: np.ndarray, keypoints: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A self-blended fake of an aligned real face and its soft blending mask: the face of an altered
    copy (colour jitter, sharpen or blur, small scale and shift) pasted back onto the original."""
    source = crop.copy()
    if rng.random() < 0.8:
        source = _colour_jitter(rng, source)
    if rng.random() < 0.8:
        source = _sharpness(rng, source)
    source = _shift(rng, source)
    target = crop
    if rng.random() < 0.5:  # the altered copy can be the background as well as the face
        source, target = target, source
    mask = blend_mask(rng, keypoints, crop.shape[0])[..., None]
    blended = source.astype(np.float32) * mask + target.astype(np.float32) * (1 - mask)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8), mask[..., 0]


# --------------------------------------------------------------------------------------------------
# Normalisation, the same for every class


def jpeg_bytes(image: np.ndarray, quality: int, subsampling: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(quality), subsampling=int(subsampling))
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class EncodeAlike:
    """Blur (off by default), resolution loss, a mirror flip and a JPEG re-encode at a random quality (or
    lossless PNG), drawn from one distribution for every class. Returns the encoded file, as a file on
    disk would be."""

    jpeg_quality: tuple[int, int] = (60, 100)
    p_lossless: float = 0.2
    p_resolution: float = 0.3
    resolution: tuple[float, float] = (0.5, 0.9)
    p_flip: float = 0.5
    p_blur: float = 0.0  # a Gaussian blur over the whole crop, as in a soft or restored photo
    blur_sigma: tuple[float, float] = (0.5, 2.0)

    def __call__(self, rng: np.random.Generator, crop: np.ndarray) -> bytes:
        return self.encode(rng, crop)[0]

    def encode(self, rng: np.random.Generator, crop: np.ndarray) -> tuple[bytes, bool]:
        """The encoded file and whether it was mirrored (the same draws as calling it)."""
        image = self.degrade(rng, crop)
        mirrored = bool(rng.random() < self.p_flip)
        if mirrored:
            image = np.ascontiguousarray(image[:, ::-1])
        if rng.random() < self.p_lossless:
            return png_bytes(image), mirrored
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        return jpeg_bytes(image, quality, int(rng.choice([0, 2]))), mirrored

    def degrade(self, rng: np.random.Generator, crop: np.ndarray) -> np.ndarray:
        """The quality loss alone (blur, resolution loss), without the flip and the encoding."""
        image = crop
        if self.p_blur and rng.random() < self.p_blur:
            image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(*self.blur_sigma)))
        if rng.random() < self.p_resolution:
            scale = float(rng.uniform(*self.resolution))
            size = image.shape[1], image.shape[0]
            small = cv2.resize(
                image, (round(size[0] * scale), round(size[1] * scale)), interpolation=cv2.INTER_AREA
            )
            image = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
        return image


def normalised_set(
    crops: FaceCrops,
    seed: int,
    variants: int,
    encode: EncodeAlike,
    blended_per_real: int = 1,
    draw: str = "{path}|{variant}|{index}",
    source: EncodeAlike | None = None,
    boundaries: list[np.ndarray] | None = None,
) -> tuple[list[bytes], np.ndarray]:
    """Encoded files and labels: `variants` normalised copies of every crop, plus, for every real crop,
    `blended_per_real` self-blended fakes per variant, all through the same `encode`. Each copy's
    randomness is fixed by (seed, `draw` filled in with the crop's path, variant and index). With a
    `source`, its quality loss is applied to the crop first, before any fake is made of it: a soft
    photo, not a softened forgery. A `boundaries` list receives each file's blend_boundary (zeros
    for a real or GAN face); the files are the same with or without it."""
    files, labels = [], []
    none = np.zeros((BOUNDARY_SIDE, BOUNDARY_SIDE), np.float32)
    for index, (original, points, label, path) in enumerate(
        zip(crops.crops, crops.keypoints, crops.labels, crops.paths, strict=True)
    ):
        for variant in range(variants):
            rng = item_rng(seed, draw.format(path=path, variant=variant, index=index))
            crop = source.degrade(rng, original) if source else original
            files.append(encode(rng, crop))
            labels.append(int(label))
            if boundaries is not None:
                boundaries.append(none)
            if label == REAL:
                for _ in range(blended_per_real):
                    fake, mask = self_blend(rng, crop, points)
                    data, mirrored = encode.encode(rng, fake)
                    files.append(data)
                    labels.append(BLENDED)
                    if boundaries is not None:
                        boundaries.append(blend_boundary(mask[:, ::-1] if mirrored else mask))
    return files, np.array(labels, np.int64)


BOUNDARY_SIDE = 16  # the blend-boundary target's side: the classifier's stride-16 feature map of a face


def blend_boundary(mask: np.ndarray, side: int = BOUNDARY_SIDE) -> np.ndarray:
    """Where a blended face mixes two images, as Face X-ray (Li et al., CVPR 2020) marks it: 4 M (1 - M)
    of the soft blending mask M (1 where they mix half and half: the blurred edge, and the whole face
    when its blending ratio is below 1), averaged over side x side cells (float32)."""
    return cv2.resize(4.0 * mask * (1.0 - mask), (side, side), interpolation=cv2.INTER_AREA).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------------
# The format-only baseline: what a classifier gets from the container alone


def format_features(data: bytes) -> np.ndarray:
    """File type, log file size, log width and height, JPEG quantisation-table statistics and chroma
    subsampling of one encoded image: everything a shortcut could use, nothing of the content."""
    from PIL import JpegImagePlugin

    with Image.open(io.BytesIO(data)) as image:
        is_jpeg = image.format in ("JPEG", "MPO")
        tables = image.quantization if is_jpeg else {}
        luma = np.asarray(tables.get(0, np.zeros(64)), np.float64)
        chroma = np.asarray(tables.get(1, np.zeros(64)), np.float64)
        sampling = JpegImagePlugin.get_sampling(image) if is_jpeg else -1
        width, height = image.size
    return np.array(
        [
            float(is_jpeg),
            float(image.format == "PNG"),
            np.log(len(data)),
            np.log(width),
            np.log(height),
            luma.mean(),
            chroma.mean(),
            luma[0],
            float(sampling),
        ]
    )


def logistic_regression(features: np.ndarray, targets: np.ndarray, l2: float = 1e-3):
    """A standardised L2 logistic regression fitted with L-BFGS; returns a scoring function."""
    import torch

    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-9
    x = torch.as_tensor((features - mean) / std, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.float64)
    weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (weights[:-1] ** 2).sum()
        )
        loss.backward()
        return loss

    optimiser.step(closure)
    fitted = weights.detach()

    def score(new: np.ndarray) -> np.ndarray:
        z = torch.as_tensor((new - mean) / std, dtype=torch.float64)
        return torch.sigmoid(z @ fitted[:-1] + fitted[-1]).numpy()

    return score


def format_baseline(
    train_files: Sequence[bytes],
    train_labels: np.ndarray,
    eval_files: Sequence[bytes],
    eval_labels: np.ndarray,
) -> float:
    """ROC AUC (fake vs real) of a logistic regression on format_features, fitted on one set of files and
    scored on another."""
    from assistant.metrics import roc_auc

    fit = logistic_regression(
        np.stack([format_features(d) for d in train_files]), (np.asarray(train_labels) != REAL).astype(float)
    )
    scores = fit(np.stack([format_features(d) for d in eval_files]))
    return round(float(roc_auc(np.asarray(eval_labels) != REAL, scores)), 4)
