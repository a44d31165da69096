"""The face recipe's data: one encoding for every class, and with a source loss the quality loss
falls on the face before its self-blend is made, so a blend's boundary is not blurred away after it."""

from __future__ import annotations

import cv2
import numpy as np

from finetune.faces import BLENDED, REAL, EncodeAlike, FaceCrops, decode, normalised_set

KEYPOINTS = np.array([[96, 112], [160, 112], [128, 145], [128, 180], [48, 125], [208, 125]], np.float32)


def sharpness(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def one_real_face() -> FaceCrops:
    texture = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return FaceCrops(texture[None], KEYPOINTS[None], np.array([REAL]), ("face.png",))


def test_the_default_encoding_leaves_the_crop_as_the_benchmark_sees_it():
    lossless = EncodeAlike(p_lossless=1.0, p_resolution=0.0, p_flip=0.0)
    crop = one_real_face().crops[0]
    assert np.array_equal(decode(lossless(np.random.default_rng(0), crop)), crop)


def test_a_source_loss_softens_the_real_face_and_the_fake_made_from_it():
    crops = one_real_face()
    lossless = EncodeAlike(p_lossless=1.0, p_resolution=0.0, p_flip=0.0)
    blur = EncodeAlike(p_blur=1.0, p_resolution=0.0, blur_sigma=(2.0, 2.0))
    plain_files, labels = normalised_set(crops, 0, 1, lossless)
    soft_files, soft_labels = normalised_set(crops, 0, 1, lossless, source=blur)
    assert labels.tolist() == soft_labels.tolist() == [REAL, BLENDED]
    plain, soft = [decode(f) for f in plain_files], [decode(f) for f in soft_files]
    assert np.array_equal(plain[0], crops.crops[0])
    for before, after in zip(plain, soft, strict=True):  # the real copy and its blend, both softened
        assert sharpness(after) < 0.2 * sharpness(before)
