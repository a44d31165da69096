"""Noise inconsistency: finds regions whose noise differs (noisier or smoother), allows for texture on
untouched photos, and handles awkward inputs."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from imaging import decode, iou, jpeg_bytes, png_bytes

from experts import samples
from experts.image import load_image
from experts.noise import NoiseInconsistency, measure_noise


def _ellipse(shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    yy, xx = np.mgrid[:height, :width]
    return ((yy - 0.35 * height) / (0.18 * height)) ** 2 + ((xx - 0.6 * width) / (0.15 * width)) ** 2 <= 1.0


def noisier_region_forgery() -> tuple[bytes, np.ndarray]:
    """scikit-image's cat (a quality-85 JPEG) with strong sensor-like noise added inside an ellipse, as
    if that part came from a noisier camera, re-saved at quality 92."""
    from skimage import data

    host = decode(jpeg_bytes(data.chelsea(), 85)).astype(np.float32)
    mask = _ellipse(host.shape[:2])
    noise = np.random.default_rng(1).normal(0.0, 12.0, host.shape)
    host[mask] += noise[mask]
    return jpeg_bytes(np.clip(host, 0, 255).astype(np.uint8), 92), mask


def smoother_region_forgery() -> tuple[bytes, np.ndarray]:
    """The cat with noise everywhere except an ellipse that was blurred (as a denoised or upscaled
    paste would be), saved at quality 95."""
    from skimage import data

    noisy = data.chelsea().astype(np.float32) + np.random.default_rng(0).normal(0.0, 8.0, (300, 451, 3))
    noisy = np.clip(noisy, 0, 255).astype(np.uint8)
    mask = _ellipse(noisy.shape[:2])
    result = noisy.copy()
    result[mask] = cv2.GaussianBlur(noisy, (0, 0), 1.5)[mask]
    return jpeg_bytes(result, 95), mask


@pytest.fixture(scope="module")
def expert() -> NoiseInconsistency:
    return NoiseInconsistency()


@pytest.fixture(scope="module")
def noisier(expert):
    data, mask = noisier_region_forgery()
    return load_image(data), mask, expert.analyze(load_image(data))


def test_finds_a_noisier_region(noisier):
    _, mask, evidence = noisier
    assert iou(evidence.mask, mask) >= 0.6
    assert evidence.details["region_direction"] == "noisier"
    assert evidence.details["region_noise_ratio"] > 1.5
    assert "noise level is" in evidence.summary and "x that of the rest" in evidence.summary


def test_finds_a_smoother_region(expert):
    data, mask = smoother_region_forgery()
    evidence = expert.analyze(load_image(data))
    assert iou(evidence.mask, mask) >= 0.5
    assert evidence.details["region_direction"] == "smoother"
    assert evidence.details["region_noise_ratio"] < 0.8


@pytest.mark.parametrize("sigma", [1.0, 4.0, 8.0])
def test_measures_the_noise_sigma_of_a_flat_image(sigma):
    pixels = 128 + np.random.default_rng(0).normal(0.0, sigma, (240, 320, 3))
    levels = measure_noise(np.clip(pixels, 0, 255).astype(np.uint8), 16, 90)
    luma_sigma = sigma * float(np.sqrt(0.299**2 + 0.587**2 + 0.114**2))  # independent noise per channel
    assert np.median(levels.luma) == pytest.approx(luma_sigma, rel=0.15)


def test_untouched_photos_score_low(expert, noisier):
    from skimage import data

    scores = [expert.analyze(load_image(samples.authentic().data)).score]
    scores += [
        expert.analyze(load_image(png_bytes(getattr(data, name)()))).score for name in ("astronaut", "coffee")
    ]
    assert max(scores) < 0.5


def test_flat_image_is_not_examined(expert):
    """A flat colour has no noise to compare; "consistent" there would count as defence."""
    evidence = expert.analyze(load_image(np.full((200, 300, 3), 120, np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "flat colour" in evidence.summary


def test_contract_shapes_types_and_determinism(expert, noisier):
    image, _, evidence = noisier
    assert evidence.heatmap.dtype == np.float32 and evidence.heatmap.shape == (image.height, image.width)
    assert evidence.mask.dtype == bool and evidence.mask.shape == (image.height, image.width)
    assert 0.0 <= evidence.score <= 1.0
    json.dumps(evidence.details)
    again = expert.analyze(image)
    assert again.score == evidence.score and np.array_equal(again.heatmap, evidence.heatmap)


@pytest.mark.parametrize("size", [(1, 1), (40, 400)])
def test_too_small_is_not_applicable(expert, size):
    evidence = expert.analyze(load_image(np.full((*size, 3), 128, np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "too small" in evidence.summary


def test_mostly_clipped_image_is_not_applicable(expert):
    pixels = np.zeros((240, 320, 3), np.uint8)
    pixels[:, :8] = 128  # a sliver of grey in a black frame
    evidence = expert.analyze(load_image(png_bytes(pixels)))
    assert not evidence.applicable


def test_grayscale_and_large_images(expert):
    from skimage import data

    gray = data.camera()
    evidence = expert.analyze(load_image(jpeg_bytes(gray, 90)))
    assert evidence.applicable and evidence.heatmap.shape == gray.shape
    big = np.tile(data.astronaut(), (4, 6, 1))  # 2048 x 3072: analysed on a 2-megapixel copy
    evidence = expert.analyze(load_image(jpeg_bytes(big, 90)))
    assert evidence.heatmap.shape == big.shape[:2] and evidence.mask.shape == big.shape[:2]
