"""Deepfake faces: finds each face, aligns it the way FFHQ was aligned, and classifies the crop as a real
face, a GAN-generated face or a face blended into its photo (face swap / reenactment). Detection is
MediaPipe BlazeFace (Bazarevsky et al., "BlazeFace: Sub-millisecond Neural Face Detection on Mobile
GPUs", CVPR workshops 2019) by default, or MTCNN (Zhang et al., "Joint Face Detection and Alignment
using Multi-task Cascaded Convolutional Networks", IEEE SPL 2016; facenet-pytorch's weights) as an
option: `DeepfakeFaces(detector="mtcnn")`, or FORENSICS_FACE_DETECTOR=mtcnn for the CLI, the app and
the integrations. The classifier was trained on BlazeFace's alignment (`python -m benchmarks.faces
--detector mtcnn` measures the other). Alignment follows the FFHQ recipe of Karras et al., "A Style-Based
Generator Architecture for GANs", CVPR 2019, from BlazeFace's eye and mouth keypoints; the classifier
is EfficientNet-Lite0 (ImageNet) with its last blocks fine-tuned on StyleGAN3 faces, real faces and
self-blended faces after Shiohara & Yamasaki, "Detecting Deepfakes with Self-Blended Images", CVPR 2022
(finetune/train_faces.py; data, scores and the format check are on the model card).

Score: the largest per-face probability that the face is not a real photographed face (GAN-made or
blended); the image score is that of the most suspicious face. Not applicable when no face is found, or
when the photo is black and white (the classifier was trained on colour faces only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import cv2
import numpy as np
import torch

from experts.base import (
    Evidence,
    ExpertError,
    ModelNotAvailableError,
    Region,
    not_applicable,
    nothing_to_examine,
)
from experts.image import LoadedImage
from experts.maps import working_copy

log = logging.getLogger(__name__)

FACE_SIZE = 256  # side of the aligned crop the classifier sees (FFHQ-style framing)
CLASSES = ("real", "gan", "blended")  # classifier outputs, in order
INDICATES = {"gan": "ai_generated", "blended": "manipulated"}
FIRST_TRAINED_BLOCK = 2  # the stem and the blocks before this one keep their ImageNet weights
TRAINED_PREFIXES = (
    *(f"blocks.{i}." for i in range(FIRST_TRAINED_BLOCK, 7)),
    "conv_head.",
    "bn2.",
    "classifier.",
)
WEIGHTS_NAME = "faces"
INSTALL_HINT = (
    "pip install --no-deps mediapipe==0.10.21 && pip install absl-py attrs flatbuffers 'protobuf>=4.25.3,<5'"
)

# BlazeFace keypoints, in MediaPipe's order: the subject's right eye (image left in a frontal photo),
# left eye, nose tip, mouth centre, right ear tragion, left ear tragion. MTCNN's five landmarks (eyes,
# nose, mouth corners) are mapped onto these: the mouth centre between its corners, the ears where the
# box's sides meet the eyes' height.
RIGHT_EYE, LEFT_EYE, NOSE, MOUTH, RIGHT_EAR, LEFT_EAR = range(6)
DEFAULT_DETECTOR = "blazeface"
DETECTOR_ENV = "FORENSICS_FACE_DETECTOR"  # another detector's name (FACE_DETECTORS), for the CLI and the app
MTCNN_HINT = "pip install --no-deps facenet-pytorch==2.6.0"

_DETECTORS: dict[Any, Any] = {}
_DETECTOR_LOCK = threading.Lock()  # MediaPipe graphs are not re-entrant: one image at a time
_MODEL_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """A face in raw pixel coordinates: bbox (x0, y0, x1, y1) as floats, keypoints (6, 2) x/y."""

    bbox: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray

    @property
    def eye_distance(self) -> float:
        return float(np.hypot(*(self.keypoints[LEFT_EYE] - self.keypoints[RIGHT_EYE])))


# --------------------------------------------------------------------------------------------------
# Detection


@contextlib.contextmanager
def _native_stderr_silenced():
    """MediaPipe's native code (TFLite, absl) writes INFO and warning lines straight to file descriptor 2
    when a detector starts and first runs; they are noise to a user. Only that first use is wrapped."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _blazeface(model_selection: int):
    """The process's BlazeFace detector (0: short range, faces filling much of the frame; 1: full range,
    small faces); call with _DETECTOR_LOCK held."""
    if model_selection not in _DETECTORS:
        try:
            from mediapipe.python.solutions import face_detection
        except ImportError as exc:  # also protobuf 5+ breaking mediapipe 0.10.21
            raise ModelNotAvailableError(
                f"the face detector (MediaPipe BlazeFace) cannot be imported ({exc}); install it with "
                f"`{INSTALL_HINT}`"
            ) from exc
        with _native_stderr_silenced():
            detector = face_detection.FaceDetection(
                model_selection=model_selection, min_detection_confidence=0.5
            )
            detector.process(np.zeros((64, 64, 3), np.uint8))  # the first run logs too
        _DETECTORS[model_selection] = detector
    return _DETECTORS[model_selection]


def _run_blazeface(rgb: np.ndarray, model_selection: int) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(score, relative box x0 y0 x1 y1, relative keypoints (6, 2)) for each detection."""
    with _DETECTOR_LOCK:
        result = _blazeface(model_selection).process(np.ascontiguousarray(rgb))
    found = []
    for detection in result.detections or ():
        box = detection.location_data.relative_bounding_box
        points = np.array([(p.x, p.y) for p in detection.location_data.relative_keypoints], np.float64)
        corners = np.array([box.xmin, box.ymin, box.xmin + box.width, box.ymin + box.height], np.float64)
        found.append((float(detection.score[0]), corners, points))
    return found


def _mtcnn():
    """The process's MTCNN detector (facenet-pytorch, weights in its package); call with _DETECTOR_LOCK
    held."""
    if "mtcnn" not in _DETECTORS:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:
            raise ModelNotAvailableError(
                f"the MTCNN face detector (facenet-pytorch) cannot be imported ({exc}); install it with "
                f"`{MTCNN_HINT}`, or use the default detector, BlazeFace"
            ) from exc
        _DETECTORS["mtcnn"] = MTCNN(keep_all=True, device="cpu")
    return _DETECTORS["mtcnn"]


def _run_mtcnn(rgb: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(score, relative box x0 y0 x1 y1, relative keypoints (6, 2) in BlazeFace's order) per face."""
    with _DETECTOR_LOCK, torch.inference_mode():
        boxes, scores, landmarks = _mtcnn().detect(np.ascontiguousarray(rgb), landmarks=True)
    if boxes is None:
        return []
    size = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
    found = []
    for box, score, points in zip(boxes, scores, landmarks, strict=True):
        box, points = np.asarray(box, np.float64), np.asarray(points, np.float64)  # object dtype: numpy 2
        eyes, nose, corners = points[:2], points[2], points[3:]
        ears = np.array([[box[0], eyes[0, 1]], [box[2], eyes[1, 1]]])
        keypoints = np.vstack([eyes, nose, corners.mean(axis=0), ears]) / size
        found.append((float(score), box / np.tile(size, 2), keypoints))
    return found


def _run_both_blazefaces(rgb: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """BlazeFace's short- and full-range detections together (overlaps are merged by the caller)."""
    return _run_blazeface(rgb, 0) + _run_blazeface(rgb, 1)


# The face detectors by name: each returns (score, relative box, relative keypoints) per candidate.
_DETECTOR_RUNS = {DEFAULT_DETECTOR: _run_both_blazefaces, "mtcnn": _run_mtcnn}
FACE_DETECTORS = tuple(_DETECTOR_RUNS)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_faces(
    pixels: np.ndarray,
    min_score: float = 0.6,
    max_side: int = 1024,
    min_eye_distance: float = 8.0,
    detector: str = DEFAULT_DETECTOR,
) -> list[DetectedFace]:
    """Faces in an RGB uint8 image, most confident first, by `detector` (FACE_DETECTORS). BlazeFace looks
    at a 128 (short range) or 192 (full range) pixel copy anyway, so detection runs on a copy at most
    max_side pixels long; both BlazeFace models run and overlapping boxes are merged. Faces whose eyes
    are under min_eye_distance pixels apart in the original are too small to judge and are dropped."""
    height, width = pixels.shape[:2]
    if min(height, width) < 16:
        return []
    small, _ = working_copy(pixels, max_side * max_side * min(height, width) // max(height, width))
    candidates = _DETECTOR_RUNS[detector](small)
    candidates.sort(key=lambda c: -c[0])
    kept: list[tuple[float, np.ndarray, np.ndarray]] = []
    for candidate in candidates:
        if candidate[0] >= min_score and all(_iou(candidate[1], k[1]) < 0.3 for k in kept):
            kept.append(candidate)
    size = np.array([width, height], np.float64)
    faces = []
    for score, corners, points in kept:
        box = np.clip(corners.reshape(2, 2) * size, 0, size).ravel()
        face = DetectedFace(tuple(float(v) for v in box), score, points * size)
        if face.eye_distance >= min_eye_distance and box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            faces.append(face)
    return faces


# --------------------------------------------------------------------------------------------------
# Alignment


def alignment_quad(keypoints: np.ndarray) -> np.ndarray:
    """The FFHQ crop square (top-left, bottom-left, bottom-right, top-right) from eye and mouth points:
    eyes level, side = max(4 x eye distance, 3.6 x eye-to-mouth distance), centred a little below the
    eyes (Karras et al. 2019, ffhq-dataset/download_ffhq.py)."""
    eye_left, eye_right = keypoints[RIGHT_EYE], keypoints[LEFT_EYE]  # image left, image right
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = keypoints[MOUTH] - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * np.array([-1.0, 1.0])
    x /= max(float(np.hypot(*x)), 1e-6)
    x *= max(float(np.hypot(*eye_to_eye)) * 2.0, float(np.hypot(*eye_to_mouth)) * 1.8)
    y = np.flipud(x) * np.array([-1.0, 1.0])
    centre = eye_avg + eye_to_mouth * 0.1
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])


def align_face(
    pixels: np.ndarray, keypoints: np.ndarray, size: int = FACE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """The aligned size x size RGB crop and the 2x3 affine matrix from raw to crop coordinates.

    Every face goes through the same two steps, whatever its source: an area-filtered shrink of the
    surrounding region to about the crop's scale (no aliasing when the face is large), then a bicubic
    affine warp; borders outside the photo are mirrored."""
    quad = alignment_quad(keypoints)
    side = float(np.hypot(*(quad[3] - quad[0])))
    height, width = pixels.shape[:2]
    x0, y0 = np.floor(quad.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 2
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 - x0 < 2 or y1 - y0 < 2:
        x0, y0, x1, y1 = 0, 0, width, height
    region = pixels[y0:y1, x0:x1]
    shrink = min(1.0, size / max(side, 1e-6))
    scale = np.array([1.0, 1.0])
    if shrink < 0.9:
        target = (max(2, round((x1 - x0) * shrink)), max(2, round((y1 - y0) * shrink)))
        scale = np.array([target[0] / (x1 - x0), target[1] / (y1 - y0)])
        region = cv2.resize(region, target, interpolation=cv2.INTER_AREA)
    to_region = np.array([[scale[0], 0, -x0 * scale[0]], [0, scale[1], -y0 * scale[1]]], np.float64)
    quad_region = (quad - np.array([x0, y0])) * scale
    destination = np.array([[0, 0], [0, size], [size, size]], np.float32)
    warp = cv2.getAffineTransform(quad_region[:3].astype(np.float32), destination)
    crop = cv2.warpAffine(
        np.ascontiguousarray(region),
        warp,
        (size, size),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    matrix = warp @ np.vstack([to_region, [0, 0, 1]])
    return crop, matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


# --------------------------------------------------------------------------------------------------
# Classifier


def stem_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The frozen part of EfficientNet-Lite0: stem and blocks before FIRST_TRAINED_BLOCK."""
    features = model.bn1(model.conv_stem(images))
    for block in model.blocks[:FIRST_TRAINED_BLOCK]:
        features = block(features)
    return features


def head_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The trained part: the last blocks, the 1x1 head convolution, pooling and the 3-way classifier."""
    for block in model.blocks[FIRST_TRAINED_BLOCK:]:
        features = block(features)
    return model.forward_head(model.bn2(model.conv_head(features)))


def build_classifier(pretrained: bool = True) -> torch.nn.Module:
    from experts.backbone import lite0

    model = lite0(pretrained=pretrained)
    model.reset_classifier(len(CLASSES))
    return model


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the recipe ships: only the parameters and statistics it changed."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


@cache
def _classifier() -> torch.nn.Module:
    from experts.learned import load_weights

    state = load_weights(WEIGHTS_NAME)
    model = build_classifier(pretrained=True)
    missing_here = sorted(set(state) - set(model.state_dict()))
    if missing_here:
        raise ModelNotAvailableError(
            f"the faces weights hold tensors this model lacks ({missing_here[:3]}); reinstall the package"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model.eval()


def class_probabilities(
    model: torch.nn.Module, batch: torch.Tensor, flip_average: bool = True
) -> torch.Tensor:
    """Softmax over CLASSES for a normalised batch, averaged over each face and its mirror image; the
    one definition the expert and the training recipe's validation share."""
    if flip_average:
        both = torch.softmax(model(torch.cat([batch, batch.flip(-1)])).float(), dim=1)
        return 0.5 * (both[: len(batch)] + both[len(batch) :])
    return torch.softmax(model(batch).float(), dim=1)


def classify_crops(crops: np.ndarray, flip_average: bool = True) -> np.ndarray:
    """Class probabilities (n, 3) in CLASSES order for aligned uint8 crops (n, FACE_SIZE, FACE_SIZE, 3)."""
    from experts.backbone import normalise

    with _MODEL_LOCK:
        model = _classifier()
    with torch.inference_mode():
        probabilities = class_probabilities(model, normalise(crops), flip_average).numpy()
    return probabilities.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# The expert


@dataclass(frozen=True)
class DeepfakeFaces:
    name = "faces"
    version = "2"  # 2: declines random noise (BlazeFace finds faces in it)
    description = (
        "Deepfake faces: finds faces, aligns them and judges each one real, GAN-generated or blended into "
        "the photo (face swap), with a box and probability per face."
    )
    min_score: float = 0.6  # the detector's confidence a detection needs
    max_faces: int = 8  # the most confident faces are judged; the rest are listed as not judged
    min_eye_distance: float = 12.0  # pixels; smaller faces carry too little detail to judge
    flip_average: bool = True  # average the classifier over the crop and its mirror image
    detector: str = field(default_factory=lambda: os.environ.get(DETECTOR_ENV) or DEFAULT_DETECTOR)

    def __post_init__(self) -> None:
        if self.detector not in FACE_DETECTORS:
            raise ExpertError(
                f"unknown face detector {self.detector!r} (from {DETECTOR_ENV} or detector=); "
                f"choose one of {', '.join(FACE_DETECTORS)}"
            )

    def analyze(self, image: LoadedImage) -> Evidence:
        if what := image.nothing_to_examine:
            return nothing_to_examine(self.name, self.version, what, faces=[])
        faces = detect_faces(
            image.pixels, self.min_score, min_eye_distance=self.min_eye_distance, detector=self.detector
        )
        if not faces:
            return not_applicable(
                self.name,
                "No face found in the image, so the deepfake-face check does not apply.",
                self.version,
                faces=[],
            )
        judged = faces[: self.max_faces]
        crops = np.stack([align_face(image.pixels, face.keypoints)[0] for face in judged])
        if _is_grey(crops):
            return not_applicable(
                self.name,
                f"{len(faces)} face{'s' if len(faces) != 1 else ''} found, but the photo is black and white; "
                "the deepfake-face classifier was trained on colour faces only, so it does not judge these.",
                self.version,
                faces=[{"bbox": list(_int_box(face.bbox, image.pixels.shape[:2]))} for face in faces],
            )
        probabilities = classify_crops(crops, self.flip_average)
        return self._evidence(image, judged, probabilities, len(faces))

    def _evidence(
        self, image: LoadedImage, faces: list[DetectedFace], probabilities: np.ndarray, found: int
    ) -> Evidence:
        shape = (image.height, image.width)
        heatmap = np.zeros(shape, np.float32)
        mask = np.zeros(shape, bool)
        regions, listed = [], []
        for face, probability in zip(faces, probabilities, strict=True):
            fake = float(1.0 - probability[0])
            kind = CLASSES[1 + int(np.argmax(probability[1:]))]
            x0, y0, x1, y1 = _int_box(face.bbox, shape)
            window, ellipse = _face_ellipse(face, shape)
            np.maximum(heatmap[window], ellipse * fake, out=heatmap[window])
            if fake >= 0.5:
                mask[window] |= ellipse >= 0.5
            label = "fake face" if fake >= 0.5 else "real face"
            regions.append(Region((x0, y0, x1, y1), round(fake, 4), label))
            listed.append(
                {
                    "bbox": [x0, y0, x1, y1],
                    "detector_score": round(face.score, 4),
                    "fake_probability": round(fake, 4),
                    "gan_probability": round(float(probability[1]), 4),
                    "blended_probability": round(float(probability[2]), 4),
                    "label": label,
                    "kind": kind if fake >= 0.5 else "real",
                    "eye_distance_px": round(face.eye_distance, 1),
                }
            )
        worst = int(np.argmax([face["fake_probability"] for face in listed]))
        score = listed[worst]["fake_probability"]
        kind = CLASSES[1 + int(np.argmax(probabilities[worst][1:]))]
        details = {
            "indicates": INDICATES[kind],
            "faces": listed,
            "faces_found": found,
            "faces_judged": len(faces),
            "detector": self.detector,
        }
        return Evidence(
            expert=self.name,
            score=round(score, 4),
            applicable=True,
            summary=_summary(listed, worst, kind, found),
            heatmap=heatmap,
            mask=mask,
            regions=tuple(regions),
            details=details,
            version=self.version,
        )


def _is_grey(crops: np.ndarray, tolerance: float = 2.0) -> bool:
    """True when the face crops carry no colour (a greyscale photo stored as RGB)."""
    signed = crops.astype(np.int16)
    spread = np.abs(signed[..., 0] - signed[..., 1]) + np.abs(signed[..., 1] - signed[..., 2])
    return float(spread.mean()) < tolerance


def _int_box(box: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    height, width = shape
    x0 = min(max(int(np.floor(box[0])), 0), width - 1)
    y0 = min(max(int(np.floor(box[1])), 0), height - 1)
    x1 = max(min(int(np.ceil(box[2])), width), x0 + 1)
    y1 = max(min(int(np.ceil(box[3])), height), y0 + 1)
    return x0, y0, x1, y1


def _face_ellipse(face: DetectedFace, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """A soft ellipse over the face box (1 inside, fading out over a fifth of its radii), as the window
    of the image it covers and its values there."""
    height, width = shape
    x0, y0, x1, y1 = face.bbox
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) * 0.6, 0.5), max((y1 - y0) * 0.65, 0.5)
    margin = 1.2
    bx0, bx1 = max(int(cx - rx * margin), 0), min(int(np.ceil(cx + rx * margin)) + 1, width)
    by0, by1 = max(int(cy - ry * margin), 0), min(int(np.ceil(cy + ry * margin)) + 1, height)
    bx1, by1 = max(bx1, bx0), max(by1, by0)
    ys, xs = np.mgrid[by0:by1, bx0:bx1].astype(np.float32)
    radius = np.sqrt(((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2)
    ellipse = np.clip((margin - radius) / (margin - 1.0), 0.0, 1.0).astype(np.float32)
    return (slice(by0, by1), slice(bx0, bx1)), ellipse


def _summary(faces: list[dict[str, Any]], worst: int, kind: str, found: int) -> str:
    count = f"{found} face{'s' if found != 1 else ''} found"
    probability = faces[worst]["fake_probability"]
    if probability >= 0.5:
        what = "generated by a GAN" if kind == "gan" else "blended into the photo (as in a face swap)"
        fakes = sum(face["fake_probability"] >= 0.5 for face in faces)
        return (
            f"{count}; {fakes} look{'s' if fakes == 1 else ''} fake: the most suspicious face is "
            f"{probability:.0%} likely {what}."
        )
    strength = "weak evidence either way" if probability >= 0.3 else "none looks fake"
    return f"{count}; the most suspicious face is {probability:.0%} likely fake, so {strength}."
