"""Error level analysis: finds the synthetic forgeries' masks, stays quiet on untouched photos, and
handles awkward inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from imaging import iou, jpeg_bytes, png_bytes

from experts import samples
from experts.ela import ErrorLevelAnalysis, resave_error
from experts.image import load_image
from experts.jpeg_tables import nearest_quality_absolute


@pytest.fixture(scope="module")
def expert() -> ErrorLevelAnalysis:
    return ErrorLevelAnalysis()


@pytest.fixture(scope="module")
def splice_result(expert):
    sample = samples.splice()
    return sample, expert.analyze(load_image(sample.data))


def test_finds_the_spliced_region(splice_result):
    sample, evidence = splice_result
    assert iou(evidence.mask, sample.mask) >= 0.6
    assert evidence.score >= 0.5
    assert evidence.details["region_error_ratio"] > 2.0
    # The host was a quality-70 JPEG: the re-save should find that earlier compression.
    assert evidence.details["resave_quality"] == 70
    assert "x the error of the rest of the image" in evidence.summary


def test_finds_the_copied_region(expert):
    sample = samples.copy_move()
    evidence = expert.analyze(load_image(sample.data))
    assert iou(evidence.mask, sample.mask) >= 0.35


def test_authentic_photo_scores_low_and_below_the_forgery(expert, splice_result):
    evidence = expert.analyze(load_image(samples.authentic().data))
    assert evidence.score < 0.2
    assert evidence.score < splice_result[1].score
    assert evidence.mask.mean() < 0.05


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_untouched_photos_are_not_accused(expert, name):
    from skimage import data

    pixels = getattr(data, name)()
    for encoded in (png_bytes(pixels), jpeg_bytes(pixels, 85)):
        evidence = expert.analyze(load_image(encoded))
        assert evidence.score < 0.5, (name, evidence.summary)


def test_contract_shapes_types_and_determinism(expert, splice_result):
    sample, evidence = splice_result
    image = load_image(sample.data)
    assert evidence.applicable
    assert evidence.heatmap.dtype == np.float32 and evidence.heatmap.shape == (image.height, image.width)
    assert evidence.mask.dtype == bool and evidence.mask.shape == (image.height, image.width)
    assert evidence.heatmap.min() >= 0.0 and evidence.heatmap.max() <= 1.0
    json.dumps(evidence.details)  # plain JSON types only
    again = expert.analyze(image)
    assert again.score == evidence.score
    assert np.array_equal(again.heatmap, evidence.heatmap) and np.array_equal(again.mask, evidence.mask)


@pytest.mark.parametrize("size", [(1, 1), (20, 300)])
def test_too_small_is_not_applicable(expert, size):
    evidence = expert.analyze(load_image(np.full((*size, 3), 128, np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "too small" in evidence.summary


def test_graphic_with_few_colours_is_not_applicable(expert):
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[50:150, 100:200] = 255
    evidence = expert.analyze(load_image(png_bytes(pixels)))
    assert not evidence.applicable
    assert "few flat colours" in evidence.summary


def test_grayscale_and_odd_sized_images_work(expert):
    from skimage import data

    pixels = data.camera()[:301, :457]  # grayscale, not a multiple of 8
    evidence = expert.analyze(load_image(jpeg_bytes(pixels, 80)))
    assert evidence.applicable and evidence.heatmap.shape == pixels.shape


def test_large_image_maps_come_back_at_original_size(expert):
    from skimage import data

    pixels = np.tile(data.astronaut(), (4, 6, 1))  # 2048 x 3072, over the 2-megapixel map limit
    evidence = expert.analyze(load_image(jpeg_bytes(pixels, 90)))
    assert evidence.heatmap.shape == pixels.shape[:2] and evidence.mask.shape == pixels.shape[:2]


@pytest.mark.parametrize("quality", [50, 75, 90, 97])
def test_estimates_the_quality_of_a_libjpeg_file(quality):
    from skimage import data

    image = load_image(jpeg_bytes(data.coffee(), quality))
    assert nearest_quality_absolute(image.quantization[0]) == quality


def test_resave_at_the_files_own_quality_changes_little():
    from skimage import data

    image = load_image(jpeg_bytes(data.coffee(), 80))
    # Near-idempotent only if the re-save uses the same colour transform (RGB/BGR order) as the file.
    assert resave_error(image.pixels, 80).mean() < 0.3
    assert resave_error(image.pixels, 60).mean() > 10 * resave_error(image.pixels, 80).mean()


@pytest.mark.parametrize(("quality", "applicable"), [(30, False), (52, False), (53, True), (75, True)])
def test_declines_a_file_saved_below_every_quality_it_re_saves_at(expert, quality, applicable):
    """Below its lowest re-save quality (50) plus 3 there is no lower quality to probe: the last
    compression covers every region alike, and ELA says so instead of scoring."""
    from skimage import data

    evidence = expert.analyze(load_image(jpeg_bytes(data.coffee(), quality)))
    assert evidence.applicable == applicable
    if not applicable:
        assert f"quality about {quality}" in evidence.summary and evidence.score is None
