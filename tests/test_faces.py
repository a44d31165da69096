"""The deepfake-face expert with its shipped weights: detection, alignment, the classifier's direction on
real and self-blended faces, not-applicable evidence without a face, and the evidence contract."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from experts import get_expert, load_image
from experts.faces import LEFT_EYE, RIGHT_EYE, align_face, classify_crops, detect_faces, transform_points
from experts.learned import available

pytestmark = pytest.mark.skipif(
    not available("faces"), reason="experts/weights/faces.safetensors not shipped"
)


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_evidence(astronaut):
    return get_expert("faces").analyze(load_image(astronaut))


def test_mtcnn_is_the_option_that_finds_the_same_face(astronaut, monkeypatch):
    """detector="mtcnn" (or FORENSICS_FACE_DETECTOR=mtcnn) finds the astronaut's face where BlazeFace does,
    with its eyes and mouth mapped onto BlazeFace's keypoints; an unknown detector is refused."""
    from experts.base import ExpertError
    from experts.faces import DETECTOR_ENV, MOUTH, NOSE, DeepfakeFaces

    blaze, mtcnn = (detect_faces(astronaut, detector=name) for name in ("blazeface", "mtcnn"))
    assert len(blaze) == len(mtcnn) == 1
    (b,), (m,) = blaze, mtcnn
    overlap = [
        max(b.bbox[0], m.bbox[0]),
        max(b.bbox[1], m.bbox[1]),
        min(b.bbox[2], m.bbox[2]),
        min(b.bbox[3], m.bbox[3]),
    ]
    assert overlap[2] - overlap[0] > 60 and overlap[3] - overlap[1] > 60
    for point in (RIGHT_EYE, LEFT_EYE, NOSE, MOUTH):
        assert np.hypot(*(b.keypoints[point] - m.keypoints[point])) < 0.25 * b.eye_distance, point
    monkeypatch.setenv(DETECTOR_ENV, "mtcnn")
    evidence = get_expert("faces").analyze(load_image(astronaut))
    assert evidence.details["detector"] == "mtcnn" and evidence.details["faces_found"] == 1
    assert evidence.score < 0.5
    with pytest.raises(ExpertError, match="unknown face detector"):
        DeepfakeFaces(detector="haar")


def test_finds_the_astronauts_face(astronaut_evidence):
    assert astronaut_evidence.applicable
    assert astronaut_evidence.details["faces_found"] == 1
    x0, y0, x1, y1 = astronaut_evidence.regions[0].bbox
    # the face is at about x 178-273, y 83-178 in the 512x512 photo (../shared/MODELS.md section 5)
    assert 160 < x0 < 200 and 250 < x1 < 290 and 60 < y0 < 110 and 160 < y1 < 200


def test_real_face_scores_low(astronaut_evidence):
    assert astronaut_evidence.score < 0.5
    assert astronaut_evidence.regions[0].label == "real face"
    assert not astronaut_evidence.mask.any()


def test_contract(astronaut_evidence, astronaut):
    evidence = astronaut_evidence
    assert evidence.heatmap.shape == astronaut.shape[:2] and evidence.heatmap.dtype == np.float32
    assert evidence.mask.shape == astronaut.shape[:2] and evidence.mask.dtype == bool
    assert evidence.heatmap.min() >= 0.0 and evidence.heatmap.max() <= 1.0
    # the heatmap sits on the face and nowhere else
    assert evidence.heatmap[130, 225] == pytest.approx(evidence.score, abs=1e-3)
    assert evidence.heatmap[450, 50] == 0.0
    assert evidence.details["indicates"] in ("ai_generated", "manipulated")
    face = evidence.details["faces"][0]
    assert face["fake_probability"] == evidence.score and face["label"] == "real face"
    json.dumps(evidence.details)


def test_alignment_levels_the_eyes_of_a_tilted_face(astronaut):
    rotation = cv2.getRotationMatrix2D((256, 256), 25, 1.0)
    tilted = cv2.warpAffine(astronaut, rotation, (512, 512), borderMode=cv2.BORDER_REFLECT_101)
    face = detect_faces(tilted)[0]
    crop, matrix = align_face(tilted, face.keypoints)
    eyes = transform_points(matrix, face.keypoints[[RIGHT_EYE, LEFT_EYE]])
    assert crop.shape == (256, 256, 3)
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1.0  # level
    # FFHQ framing: the crop's side is at least four eye distances
    assert 0.17 < (eyes[1, 0] - eyes[0, 0]) / 256 <= 0.2501


def test_no_face_is_not_applicable():
    from skimage import data

    evidence = get_expert("faces").analyze(load_image(data.coffee()))
    assert not evidence.applicable and evidence.score is None
    assert "no face" in evidence.summary.lower()


def test_one_pixel_image_is_not_applicable():
    evidence = get_expert("faces").analyze(load_image(np.full((1, 1, 3), 128, np.uint8)))
    assert not evidence.applicable


def test_self_blended_test_face_scores_higher_than_its_source(shared_data):
    from assistant.evaluate import read_manifest
    from finetune.data import read_rgb
    from finetune.faces import crop_largest_face, item_rng, self_blend

    items = read_manifest(shared_data / "manifest.csv", split="test", datasets=["faces_real"])
    sources, fakes = [], []
    for item in items[:4]:  # held out: never seen in training or model selection
        crop, keypoints = crop_largest_face(read_rgb(item.file))
        sources.append(crop)
        fakes.append(self_blend(item_rng(7, item.path), crop, keypoints)[0])
    real_scores = 1 - classify_crops(np.stack(sources))[:, 0]
    fake_scores = 1 - classify_crops(np.stack(fakes))[:, 0]
    assert fake_scores.mean() > real_scores.mean() + 0.2
    assert (fake_scores > real_scores).sum() >= 3


def test_black_and_white_photo_is_not_judged(astronaut):
    grey = np.repeat(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    evidence = get_expert("faces").analyze(load_image(grey))
    assert not evidence.applicable and "black and white" in evidence.summary
    assert len(evidence.details["faces"]) == 1


def test_training_draws_fresh_self_blends_each_epoch(astronaut):
    """finetune.train_faces pairs every real face with a self-blend of it, fixed by (seed, epoch) so a
    resumed run sees the same data, and different in every epoch."""
    from finetune.faces import FaceCrops, crop_largest_face
    from finetune.train_faces import FacesConfig, _encoder, epoch_files

    crop, keypoints = crop_largest_face(astronaut)
    crops = FaceCrops(
        np.stack([crop, crop]), np.stack([keypoints, keypoints]), np.array([0, 1]), ("real.png", "gan.png")
    )
    config = FacesConfig()
    files, labels, boundaries = epoch_files(crops, config, 0, *_encoder(config))
    assert labels.tolist() == [0, 2, 1]  # real, its self-blend, GAN
    assert boundaries.shape == (3, 1, 16, 16) and boundaries[1].max() > 0 == boundaries[[0, 2]].abs().max()
    assert epoch_files(crops, config, 0, *_encoder(config))[0] == files
    assert epoch_files(crops, config, 1, *_encoder(config))[0] != files


def test_training_keeps_the_frozen_stem_in_eval_mode():
    from experts.faces import FIRST_TRAINED_BLOCK, build_classifier
    from finetune.train_faces import train_mode

    model = build_classifier(pretrained=False)
    train_mode(model)
    assert not model.bn1.training and not model.blocks[FIRST_TRAINED_BLOCK - 1].training
    assert model.blocks[FIRST_TRAINED_BLOCK].training and model.classifier.training


def test_the_boundary_head_reads_the_classifier_on_the_way_without_changing_its_answer():
    """With the auxiliary blend-boundary loss the classifier computes the same logits (the head is a
    side branch, trained only), and the boundary map has the target's shape."""
    import torch

    from experts.faces import build_classifier
    from finetune.train_faces import boundary_head, logits, logits_and_boundary

    model = build_classifier(pretrained=False).eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        output, boundary = logits_and_boundary(model, boundary_head(model), images)
        assert torch.allclose(output, logits(model, images), atol=1e-5)
    assert boundary.shape == (2, 1, 16, 16)


def test_calibration_raises_the_bar_for_calling_a_real_face_fake(astronaut):
    """finetune.train_faces.calibrate shifts the fake log-odds so that at most the given share of real
    faces scores >= 0.5 (give or take one face: the shift is applied before the mirror average)."""
    import torch

    from experts.faces import build_classifier
    from finetune.faces import REAL, crop_largest_face, item_rng
    from finetune.train_faces import FacesConfig, _encoder, calibrate, predict

    crop, _ = crop_largest_face(astronaut)
    encode, _ = _encoder(FacesConfig())
    files = [encode(item_rng(0, str(i)), crop) for i in range(8)]
    labels = np.full(8, REAL)
    torch.manual_seed(1)  # an untrained classifier whose scores need a shift (order-independent)
    model = build_classifier(pretrained=False)
    before = 1 - predict(model, files)[:, REAL]
    offset = calibrate(model, files, labels, 0.25)
    after = 1 - predict(model, files)[:, REAL]
    assert offset > 0
    assert (after >= 0.5).sum() <= 2 + 1
    assert np.all(after <= before + 1e-6)
