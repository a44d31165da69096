"""The face recipe's data: one encoding for every class, and with a source loss the quality loss
falls on the face before its self-blend is made, so a blend's boundary is not blurred away after it;
the blend-boundary targets lie where the blended file differs from the real one, mirrored with it."""

from __future__ import annotations

import cv2
import numpy as np

from finetune.faces import BLENDED, BOUNDARY_SIDE, REAL, EncodeAlike, FaceCrops, decode, normalised_set

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


def test_the_boundary_target_marks_where_the_blend_changed_the_face_mirrored_with_the_file():
    """The target is zero for the real copy and, for the blended one, lies where its pixels differ
    from the real copy's; a mirrored file gets a mirrored target."""
    face = one_real_face()  # moved right of centre, so that a target left unmirrored would miss it
    crops = FaceCrops(face.crops, face.keypoints + np.float32([40, 0]), face.labels, face.paths)
    for p_flip in (0.0, 1.0):
        lossless = EncodeAlike(p_lossless=1.0, p_resolution=0.0, p_flip=p_flip)
        boundaries: list[np.ndarray] = []
        files, labels = normalised_set(crops, 3, 1, lossless, boundaries=boundaries)
        assert files == normalised_set(crops, 3, 1, lossless)[0]  # asking for targets changes no file
        assert labels.tolist() == [REAL, BLENDED] and len(boundaries) == 2
        assert boundaries[0].shape == (BOUNDARY_SIDE, BOUNDARY_SIDE) and not boundaries[0].any()
        real, blended = (decode(f).astype(np.float32) for f in files)
        changed = cv2.resize(
            np.abs(blended - real).mean(axis=2), (BOUNDARY_SIDE,) * 2, interpolation=cv2.INTER_AREA
        )
        target = boundaries[1]
        assert target.min() > -1e-6 and target.max() <= 1.0 and target.max() > 0.05  # float rounding
        # Where the target is highest the blend changed the face; where it is zero, nothing changed.
        assert changed[target > 0.5 * target.max()].mean() > 5 * changed[target == 0].mean() + 1.0
