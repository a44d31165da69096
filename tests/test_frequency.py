"""FrequencyFingerprint: periodic spectral peaks from upsampling. Fixtures are made by code: a
scikit-image photo shrunk (which erases its own traces) and enlarged again the way generators do it
(zero-insertion + convolution, as a transposed convolution) or by interpolation."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from experts.frequency import FrequencyFingerprint, jpeg_grid, score_from_strength, upsampling_lattice
from experts.image import load_image
from experts.samples import authentic

EXPERT = FrequencyFingerprint()


def photo(name: str = "astronaut") -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def encode(pixels: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def transposed_conv_x2(pixels: np.ndarray) -> np.ndarray:
    """x2 upsampling as a generator's transposed convolution does it: zeros between the pixels, then
    a 4x4 kernel (slightly uneven, like a learned one) that does not fill them evenly."""
    small = cv2.resize(pixels, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA).astype(np.float32)
    height, width = small.shape[:2]
    sparse = np.zeros((2 * height, 2 * width, 3), np.float32)
    sparse[::2, ::2] = small
    taps = np.array([[1, 3, 3, 1]], np.float32)
    kernel = taps.T @ taps / 16.0
    kernel += np.random.default_rng(0).normal(0, 0.02, kernel.shape).astype(np.float32)
    return np.clip(cv2.filter2D(sparse, -1, kernel), 0, 255).astype(np.uint8)


def bilinear_x3(pixels: np.ndarray) -> np.ndarray:
    """Shrink to 2/3 and enlarge x3 (a 2x larger image: more tiles, a steadier spectrum)."""
    small = cv2.resize(pixels, None, fx=2 / 3, fy=2 / 3, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)


def analyze(data: bytes):
    return EXPERT.analyze(load_image(data))


def test_generator_style_upsampling_gives_a_peak_at_half_a_cycle():
    evidence = analyze(encode(transposed_conv_x2(photo())))
    assert evidence.score >= 0.6
    top = evidence.details["peaks"][0]
    assert abs(top["fx"]) == 0.5 or abs(top["fy"]) == 0.5
    assert evidence.details["indicates"] == "ai_generated"
    assert "hint" in evidence.summary and "not proof" in evidence.summary


def test_jpeg_grid_frequencies_are_ignored_and_said_so():
    # The same x2 trace sits at 1/2 cycle/pixel, a multiple of 1/8: in a JPEG it cannot be told apart
    # from 8x8 blocking, so it must not count.
    evidence = analyze(encode(transposed_conv_x2(photo()), "JPEG"))
    assert evidence.details["jpeg_grid_excluded"] is True
    assert evidence.score < 0.3
    assert "multiples of 1/8" in evidence.summary


def test_period_three_upsampling_survives_jpeg():
    evidence = analyze(encode(bilinear_x3(photo("coffee")), "JPEG"))
    assert evidence.score >= 0.4
    top = evidence.details["peaks"][0]
    assert abs(top["period_px"] - 3.0) < 0.1


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_untouched_photos_have_no_peaks(name):
    evidence = analyze(encode(photo(name)))
    assert evidence.score < 0.2 and evidence.details["peaks"] == []
    assert "weak evidence" in evidence.summary


def test_authentic_jpeg_sample_scores_low():
    evidence = analyze(authentic().data)
    assert evidence.score < 0.2 and evidence.details["jpeg_grid_excluded"] is True


def test_periodic_texture_in_one_corner_is_not_a_generator_trace():
    pixels = photo().astype(np.float32)
    stripes = 40.0 * np.cos(2 * np.pi * np.arange(128) / 3.0)  # a fence-like pattern, period 3 px
    pixels[:128, :128] += stripes[None, :, None]
    evidence = analyze(encode(np.clip(pixels, 0, 255).astype(np.uint8)))
    assert evidence.score < 0.3


def test_texture_filling_the_image_off_the_upsampling_lattice_does_not_count():
    # A finely woven fabric: periodic everywhere, but at (0.242, 0.172) cycle/pixel, not at a
    # multiple of 1/16 or 1/6 where upsampling puts its peaks.
    yy, xx = np.mgrid[:512, :512]
    weave = 6.0 * np.cos(2 * np.pi * (0.2422 * xx + 0.1719 * yy))
    pixels = np.clip(photo().astype(np.float32) + weave[..., None], 0, 255).astype(np.uint8)
    evidence = analyze(encode(pixels))
    assert evidence.score < 0.2 and evidence.details["peaks"] == []


def test_decoded_jpeg_saved_as_png_is_recognised():
    decoded = np.asarray(Image.open(io.BytesIO(encode(photo("coffee"), "JPEG", quality=30))).convert("RGB"))
    evidence = analyze(encode(decoded))
    assert evidence.details["jpeg_grid_excluded"] is True
    assert "8x8" in evidence.details["jpeg_grid_reason"]
    assert evidence.score < 0.2


def test_evidence_has_no_maps_and_serialises():
    evidence = analyze(encode(photo()[:300, :400]))
    assert evidence.heatmap is None and evidence.mask is None
    json.dumps(evidence.details)
    second = analyze(encode(photo()[:300, :400]))
    assert second.score == evidence.score and second.summary == evidence.summary


def test_small_and_featureless_images():
    tiny = analyze(encode(photo()[:32, :32]))
    assert not tiny.applicable and tiny.score is None and "too small" in tiny.summary
    small = analyze(encode(photo()[:80, :100]))  # 64-pixel tiles below 128 px
    assert small.applicable and small.details["tile_size"] == 64
    flat = analyze(encode(np.full((256, 256, 3), 90, np.uint8)))
    assert not flat.applicable and "flat colour" in flat.summary


def test_score_mapping_is_a_capped_hint():
    assert score_from_strength(6.4) < 0.1
    assert 0.3 < score_from_strength(9.0) < 0.4
    assert score_from_strength(15.0) <= 0.7 + 1e-6
    assert score_from_strength(100.0) <= 0.8 + 1e-6
    assert all(np.diff([score_from_strength(z) for z in np.linspace(0, 40, 81)]) >= 0)


def test_jpeg_grid_marks_multiples_of_an_eighth():
    grid = jpeg_grid(128)
    assert grid[0, 16] and grid[64, 64] and grid[17, 0] and not grid[8, 8] and not grid[0, 43]


def test_upsampling_lattice_is_sixteenths_and_sixths():
    lattice = upsampling_lattice(128)
    assert lattice[0, 64] and lattice[8, 24] and lattice[0, 43] and lattice[21, 64]  # 1/2, 1/16, 1/3, 1/6
    assert not lattice[0, 31] and not lattice[22, 0] and not lattice[0, 42]
    assert lattice.mean() < 0.05


def test_pristine_photos_are_not_accused(shared_data):
    folders = ("kodak", "exif_samples", "skimage")
    paths = [p for f in folders for p in sorted((shared_data / "clean_photos" / f).glob("*.*"))]
    paths = [p for p in paths if p.suffix.lower() in (".png", ".jpg")][::2]  # half of them, for time
    if not paths:
        pytest.skip("clean_photos not present")
    scores = {p.name: EXPERT.analyze(load_image(p)).score for p in paths}
    assert max(scores.values()) < 0.2, scores


def test_cifake_thumbnails_are_not_applicable(shared_data):
    sample = next((shared_data / "ai_generated" / "cifake").rglob("*.jpg"), None)
    if sample is None:
        pytest.skip("cifake not present")
    assert not EXPERT.analyze(load_image(sample)).applicable
