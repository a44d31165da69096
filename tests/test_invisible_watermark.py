"""Known generator watermarks (experts/invisible_watermark.py), made with the imwatermark library."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from imaging import jpeg_bytes, png_bytes
from skimage import data

from experts import get_expert, load_image
from experts.invisible_watermark import KNOWN_PAYLOADS, binomial_tail, decode_bits, max_errors

imwatermark = pytest.importorskip("imwatermark")


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return cv2.resize(data.astronaut(), (640, 512), interpolation=cv2.INTER_AREA)


def _encode(bgr: np.ndarray, kind: str, content, method: str = "dwtDct") -> np.ndarray:
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark(kind, content)
    return encoder.encode(bgr, method)


def test_payload_constants_match_the_generators_code():
    sd1, sd2, sdxl = KNOWN_PAYLOADS
    assert len(sd1.bits) == 136 and np.packbits(sd1.bits).tobytes() == b"StableDiffusionV1"
    assert np.packbits(sd2.bits).tobytes() == b"SDV2"
    assert len(sdxl.bits) == 48 and int("".join(map(str, sdxl.bits)), 2) == 197828617679262


@pytest.mark.parametrize("method", ["dwtDct", "dwtDctSvd"])
def test_vectorised_decoder_matches_the_library(rgb, method):
    marked = _encode(np.ascontiguousarray(rgb[..., ::-1]), "bytes", b"TEST", method)
    library = imwatermark.WatermarkDecoder("bits", 32).decode(marked, method)
    ours, _ = decode_bits(marked, method, 32)
    assert np.array_equal(np.asarray(library, np.uint8), ours)


def test_stable_diffusion_1_mark_is_found(rgb):
    marked = _encode(np.ascontiguousarray(rgb[..., ::-1]), "bytes", b"StableDiffusionV1")[..., ::-1]
    evidence = get_expert("invisible_watermark").analyze(load_image(png_bytes(marked)))
    assert evidence.applicable and evidence.score >= 0.95
    assert evidence.details["indicates"] == "ai_generated"
    assert evidence.details["match"]["label"] == "Stable Diffusion 1.x"
    assert evidence.details["match"]["false_alarm"] < 1e-20


def test_sdxl_mark_as_diffusers_embeds_it(rgb):
    # diffusers hands RGB arrays to the BGR encoder
    marked = _encode(np.ascontiguousarray(rgb), "bits", list(KNOWN_PAYLOADS[2].bits))
    evidence = get_expert("invisible_watermark").analyze(load_image(png_bytes(marked)))
    assert evidence.details["match"]["label"] == "Stable Diffusion XL"
    assert evidence.details["match"]["channel_order"] == "RGB-as-BGR"


def test_clean_and_other_payloads_are_not_detected(rgb):
    other = _encode(np.ascontiguousarray(rgb[..., ::-1]), "bytes", b"SomebodyElse!")[..., ::-1]
    for pixels in (rgb, other, np.full((512, 512, 3), 128, np.uint8)):
        assert not get_expert("invisible_watermark").analyze(load_image(png_bytes(pixels))).applicable


def test_small_images_and_thresholds():
    tiny = load_image(jpeg_bytes(np.zeros((100, 100, 3), np.uint8)))
    assert "256x256" in get_expert("invisible_watermark").analyze(tiny).summary
    assert binomial_tail(0, 48) == pytest.approx(2.0**-48)
    k = max_errors(48, 1e-6, 6)
    assert binomial_tail(k, 48) * 6 <= 1e-6 < binomial_tail(k + 1, 48) * 6
