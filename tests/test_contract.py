"""The contract every registered expert keeps (ARCHITECTURE.md, core types)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from imaging import jpeg_bytes

from experts import available_experts, expert_class, get_expert, load_image
from experts.base import Evidence, ExpertError
from experts.samples import splice

EXPERTS = available_experts()


@pytest.fixture(scope="module")
def spliced():
    return load_image(splice().data, name="splice.jpg")


@pytest.fixture(scope="module")
def huge():
    from skimage import data

    pixels = cv2.resize(data.astronaut(), (6000, 4000), interpolation=cv2.INTER_CUBIC)
    return load_image(jpeg_bytes(pixels, 90), name="huge.jpg")


@pytest.fixture(scope="module")
def strip():
    rng = np.random.default_rng(0)
    return load_image(rng.integers(0, 256, (64, 400_000, 3), dtype=np.uint8), name="strip.png")


def check_evidence(evidence: Evidence, name: str, shape: tuple[int, int]) -> None:
    assert evidence.expert == name
    assert evidence.summary.strip()
    if evidence.applicable:
        assert evidence.score is not None and 0.0 <= evidence.score <= 1.0
    else:
        assert evidence.score is None
    if evidence.heatmap is not None:
        assert evidence.heatmap.shape == shape and evidence.heatmap.dtype == np.float32
        assert np.isfinite(evidence.heatmap).all()
        assert evidence.heatmap.min() >= 0.0 and evidence.heatmap.max() <= 1.0
    if evidence.mask is not None:
        assert evidence.mask.shape == shape and evidence.mask.dtype == bool
    for region in evidence.regions:
        x0, y0, x1, y1 = region.bbox
        assert 0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]
        assert 0.0 <= region.score <= 1.0
    json.dumps(evidence.details)  # JSON-serialisable


def test_registry_lists_the_classical_experts():
    assert {"ela", "noise", "jpeg", "copy_move", "metadata", "frequency"} <= set(EXPERTS)


@pytest.mark.parametrize("name", EXPERTS)
def test_expert_describes_itself(name):
    cls = expert_class(name)
    assert cls.name == name and cls.version and len(cls.description) > 20


@pytest.mark.parametrize("name", EXPERTS)
def test_evidence_shapes_ranges_and_summary(name, spliced):
    check_evidence(get_expert(name).analyze(spliced), name, (spliced.height, spliced.width))


@pytest.mark.parametrize("name", EXPERTS)
def test_deterministic(name, spliced):
    first, second = get_expert(name).analyze(spliced), get_expert(name).analyze(spliced)
    assert first.score == second.score and first.summary == second.summary
    for a, b in ((first.heatmap, second.heatmap), (first.mask, second.mask)):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("name", EXPERTS)
def test_one_pixel_image_is_handled_or_refused_clearly(name):
    tiny = load_image(np.full((1, 1, 3), 128, np.uint8))
    try:
        evidence = get_expert(name).analyze(tiny)
    except ExpertError as exc:
        assert str(exc)
        return
    check_evidence(evidence, name, (1, 1))


@pytest.mark.parametrize("name", EXPERTS)
def test_6000x4000_image(name, huge):
    try:
        evidence = get_expert(name).analyze(huge)
    except ExpertError as exc:
        assert "too large" in str(exc) or "pixels" in str(exc)
        return
    check_evidence(evidence, name, (4000, 6000))


@pytest.mark.parametrize("name", EXPERTS)
def test_a_long_thin_strip_is_handled_or_refused_clearly(name, strip):
    # 64 x 400,000 px is within the pixel limit; it used to crash two experts (a JPEG holds at most
    # 65,535 px a side; the localiser's working size left a 0 px short side) and cost the AI-image
    # detector gigabytes.
    check_evidence(get_expert(name).analyze(strip), name, (strip.height, strip.width))
