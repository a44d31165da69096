"""The learned manipulation localiser with its shipped weights: finds a synthetic splice in a photo it
never saw, stays quiet on a pristine one, keeps the evidence contract."""

from __future__ import annotations

import numpy as np
import pytest
from imaging import iou, jpeg_bytes, texture

from experts import load_image
from experts.base import ModelNotAvailableError
from experts.learned import available
from experts.manipulation import ManipulationLocaliser, load_localiser

pytestmark = pytest.mark.skipif(not available("manipulation"), reason="manipulation weights not shipped")

# Measured with the shipped weights at the 384 px working side: IoU 0.85 on this splice, whose truth
# covers 14% of the image, so marking the whole image would score IoU 0.14 (chance); mean heatmap inside
# / outside the splice 18.5. The floors sit well between chance and the measurement.
SPLICE_IOU_FLOOR = 0.6
HEAT_RATIO_FLOOR = 5.0


@pytest.fixture(scope="module")
def held_out_splice():
    """Chelsea's head pasted into `coffee` (scikit-image photos, never used for training) with the
    synthesiser's splice, then saved as a JPEG at quality 90."""
    from skimage import data

    from finetune.synth import splice

    rng = np.random.default_rng(11)
    shape = np.zeros((120, 150), bool)
    yy, xx = np.mgrid[:120, :150]
    shape[((yy - 60) / 60) ** 2 + ((xx - 75) / 75) ** 2 <= 1] = True
    edited, mask = splice(rng, data.coffee(), data.chelsea(), shape)
    return load_image(jpeg_bytes(edited, 90), name="splice.jpg"), mask


@pytest.fixture(scope="module")
def pristine():
    from skimage import data

    return load_image(jpeg_bytes(data.coffee(), 90), name="coffee.jpg")


def test_finds_a_splice_in_a_held_out_photo(held_out_splice):
    image, truth = held_out_splice
    evidence = ManipulationLocaliser().analyze(image)
    assert evidence.applicable and evidence.mask.any()
    assert iou(evidence.mask, truth) > SPLICE_IOU_FLOOR
    assert evidence.heatmap[truth].mean() > HEAT_RATIO_FLOOR * evidence.heatmap[~truth].mean()


def test_scores_the_splice_above_the_pristine_photo(held_out_splice, pristine):
    spliced = ManipulationLocaliser().analyze(held_out_splice[0])
    clean = ManipulationLocaliser().analyze(pristine)
    # Measured 0.99 against 0.24 (at a 512 px working side the pristine photo scored 0.67).
    assert clean.score < 0.5 <= spliced.score


def test_evidence_contract(held_out_splice):
    image, _ = held_out_splice
    evidence = ManipulationLocaliser().analyze(image)
    assert evidence.heatmap.shape == evidence.mask.shape == (image.height, image.width)
    assert evidence.heatmap.dtype == np.float32 and evidence.mask.dtype == bool
    assert evidence.heatmap.min() >= 0.0 and evidence.heatmap.max() <= 1.0
    assert 0.0 <= evidence.score <= 1.0
    assert evidence.details["indicates"] == "manipulated"
    for region in evidence.regions:
        x0, y0, x1, y1 = region.bbox
        assert evidence.mask[y0:y1, x0:x1].any()


def test_large_image_is_shrunk_to_the_working_size():
    pixels = texture((700, 1400))
    evidence = ManipulationLocaliser(working_side=256).analyze(load_image(pixels))
    assert evidence.details["working_size"] == [256, 128]
    assert evidence.heatmap.shape == (700, 1400)


def test_tiny_image_is_not_applicable():
    evidence = ManipulationLocaliser().analyze(load_image(np.full((1, 1, 3), 128, np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "too small" in evidence.summary


def test_a_thumbnail_is_left_to_the_experts_made_for_it():
    """On CIFAKE's 32 px images the network's score is noise that read as editing evidence."""
    thumbnail = texture((64, 96))
    evidence = ManipulationLocaliser().analyze(load_image(thumbnail))
    assert not evidence.applicable and "trained on photos" in evidence.summary
    assert ManipulationLocaliser().analyze(load_image(np.resize(thumbnail, (65, 96, 3)))).applicable


def test_a_graphic_is_not_judged_by_a_network_trained_on_photos():
    chart = np.full((300, 400, 3), 255, np.uint8)
    chart[100:280, 50:120] = (30, 90, 200)  # bars of a chart: a handful of colours
    chart[180:280, 200:270] = (220, 120, 30)
    evidence = ManipulationLocaliser().analyze(load_image(chart))
    assert not evidence.applicable and "graphics" in evidence.summary


def test_missing_weights_make_it_not_applicable(monkeypatch, pristine):
    def missing():
        raise ModelNotAvailableError("experts/weights/manipulation.safetensors is missing")

    monkeypatch.setattr("experts.manipulation.load_localiser", missing)
    evidence = ManipulationLocaliser().analyze(pristine)
    assert not evidence.applicable and "is missing" in evidence.summary


def test_shipped_weights_hold_the_val_calibration():
    model = load_localiser()
    assert model.trace is not None  # the shipped model uses the trace front end
    assert float(model.score_scale) != 1.0 or float(model.score_shift) != 0.0


def test_test_time_flips_average_maps_flipped_back():
    """Every flipped copy's map is flipped back before the average: a network that returns its input
    gives the input back, whatever the flips; the image logits are averaged as they come."""
    import torch

    from experts.manipulation import flipped_logits

    def echo(images: torch.Tensor):
        return images[:, :1], images[:, 0, 0, :].sum(1)  # the first row: changes under the upside-down flip

    flips = ((), (3,), (2,))
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    pixel, image = flipped_logits(echo, images, flips)
    assert torch.equal(pixel, images[:, :1])
    expected = torch.stack([echo(images.flip(d) if d else images)[1] for d in flips]).mean(0)
    assert torch.allclose(image, expected) and not torch.allclose(image, echo(images)[1])
