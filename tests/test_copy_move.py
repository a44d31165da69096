"""CopyMove: clones synthesised from scikit-image photos must be found (both copies marked, the
transform recovered); flat copies, periodic textures and untouched photos must not be accused."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from imaging import jpeg_bytes, png_bytes, texture

from experts.copy_move import CopyMove
from experts.image import load_image
from experts.samples import authentic, copy_move

EXPERT = CopyMove()


def clone_disc(
    pixels: np.ndarray,
    source: tuple[int, int],
    target: tuple[int, int],
    radius: int,
    angle: float,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copy a disc at `source` to `target`, rotated by `angle` degrees and scaled; returns (pixels,
    source mask, target mask)."""
    height, width = pixels.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    source_mask = (xx - source[0]) ** 2 + (yy - source[1]) ** 2 <= radius**2
    matrix = cv2.getRotationMatrix2D(source, angle, scale)
    matrix[:, 2] += np.subtract(target, source)
    warped = cv2.warpAffine(pixels, matrix, (width, height), flags=cv2.INTER_CUBIC)
    target_mask = cv2.warpAffine(
        source_mask.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST
    ).astype(bool)
    result = pixels.copy()
    result[target_mask] = warped[target_mask]
    return result, source_mask, target_mask


@pytest.fixture(scope="module")
def sample_evidence():
    sample = copy_move()
    return sample, EXPERT.analyze(load_image(sample.data))


def test_finds_the_sample_copy_and_its_source(sample_evidence):
    sample, evidence = sample_evidence
    assert evidence.score >= 0.8
    copy = sample.mask
    source = np.roll(copy, (-30, 80), axis=(0, 1))  # samples.copy_move copies (0, 378) to (30, 298)
    assert (evidence.mask & copy).sum() / copy.sum() >= 0.8
    assert (evidence.mask & source).sum() / source.sum() >= 0.8
    assert evidence.mask.sum() <= 1.5 * (copy | source).sum()  # nothing much beyond the two copies
    top = evidence.details["duplications"][0]
    assert [abs(v) for v in top["shift_vector_px"]] == pytest.approx([80, 30], abs=1.5)
    assert {region.label for region in evidence.regions[:2]} == {"duplicated region A", "duplicated region B"}
    assert "appears" in evidence.summary and "px" in evidence.summary


def test_forgery_scores_far_above_the_authentic_sample(sample_evidence):
    _, forged = sample_evidence
    clean = EXPERT.analyze(load_image(authentic().data))
    assert clean.score < 0.2
    assert not clean.mask.any()
    assert forged.score - clean.score >= 0.6


def test_recovers_rotation_and_scale_of_a_transformed_clone():
    from skimage import data

    pixels, source, target = clone_disc(data.chelsea(), (300, 120), (120, 200), 45, 25.0, 1.15)
    evidence = EXPERT.analyze(load_image(jpeg_bytes(pixels)))
    assert evidence.score >= 0.8
    assert (evidence.mask & target).sum() / target.sum() >= 0.7
    assert (evidence.mask & source).sum() / source.sum() >= 0.7
    top = evidence.details["duplications"][0]
    assert top["method"] == "keypoints" and top["support"] >= 8
    # The direction is unknown, so the transform may be A->B or its inverse.
    assert abs(abs(top["rotation_deg"]) - 25.0) <= 2.0
    assert min(abs(top["scale"] - 1.15), abs(top["scale"] - 1 / 1.15)) <= 0.03


def test_finds_an_object_cloned_on_a_plain_background():
    """Only the object and its copy are textured: the match covers all the texture there is, which
    must not be mistaken for a periodic pattern."""
    from skimage import data

    height, width = 400, 600
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = np.broadcast_to(
        np.array([90.0, 150.0, 200.0]) + ramp * [0.0, 30.0, 40.0], (height, width, 3)
    ).copy()
    sky += np.random.default_rng(0).normal(0.0, 1.0, sky.shape)
    sky[50:150, 80:180] = data.chelsea()[60:160, 140:240]  # the "bird"
    pixels, source, target = clone_disc(
        np.clip(sky, 0, 255).astype(np.uint8), (130, 100), (430, 270), 48, 0, 1
    )
    evidence = EXPERT.analyze(load_image(jpeg_bytes(pixels)))
    assert evidence.score >= 0.8
    assert (evidence.mask & target).sum() / target.sum() >= 0.7
    assert (evidence.mask & source).sum() / source.sum() >= 0.7


def test_copied_flat_sky_is_not_evidence():
    from skimage import data

    pixels = data.rocket()
    assert pixels[60:140, 60:140].std() < 30  # the source is sky: smooth, few keypoints
    forged, _, _ = clone_disc(pixels, (100, 100), (300, 60), 35, 0.0, 1.0)
    assert EXPERT.analyze(load_image(jpeg_bytes(forged))).score < 0.5


def test_periodic_texture_is_not_a_clone():
    tile = np.random.default_rng(0).integers(0, 255, (24, 24, 3)).astype(np.uint8)
    pixels = np.tile(cv2.GaussianBlur(tile, (3, 3), 0), (17, 25, 1))[:400, :600]
    evidence = EXPERT.analyze(load_image(jpeg_bytes(pixels)))
    assert evidence.score < 0.5


def test_a_screenshot_of_text_is_not_judged_for_copying():
    """Rendered text repeats its words pixel for pixel: judged as a photo, this page scores 0.98 (a
    copied region found twice). A graphic is declined, with the reason."""
    words = np.random.default_rng(1).choice(["council", "budget", "said", "the", "vote", "mayor", "plan"], 90)
    page = np.full((420, 700, 3), 255, np.uint8)
    for line in range(9):
        text = " ".join(words[line * 10 : line * 10 + 10])
        cv2.putText(
            page, text, (20, 40 + 42 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA
        )
    evidence = EXPERT.analyze(load_image(jpeg_bytes(page)))
    assert not evidence.applicable and evidence.details["graphic"] and "screenshot" in evidence.summary


def test_lettering_around_a_photo_in_a_post_is_not_a_clone():
    """A screenshot of a post: a photo on a white page whose header and text repeat "news" in one font.
    The page is not a graphic (the photo is most of it), and the repeated glyphs scored 0.95 as "a
    region twice" until matches beside the plain page stopped counting."""
    from skimage import data

    page = np.full((1100, 1080, 3), 255, np.uint8)
    cv2.circle(page, (70, 70), 40, (29, 155, 240), -1)
    lines = [
        "Local News Desk  @localnews",
        "Breaking: the news desk reports the news",
        "as the news came in.",
    ]
    for row, text in enumerate(lines):
        origin = (130 if row == 0 else 30, 80 + 50 * row)
        cv2.putText(page, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 1.0, (15, 20, 25), 2, cv2.LINE_AA)
    page[230:910, 30:1050] = cv2.resize(data.coffee(), (1020, 680), interpolation=cv2.INTER_CUBIC)
    image = load_image(png_bytes(page))
    assert not image.graphic
    assert EXPERT.analyze(image).score < 0.5


def _photographed_page() -> np.ndarray:
    """scikit-image's photograph of a printed page, enlarged 1.5x (PIL bicubic) as a screen shows it:
    "markers" is printed twice, one line apart."""
    from PIL import Image
    from skimage import data

    page = Image.fromarray(data.page()).convert("RGB")
    return np.asarray(page.resize((576, 286), Image.Resampling.BICUBIC))


def test_a_word_printed_twice_on_a_photographed_page_is_not_a_clone():
    """The two "markers" matched at 0.88 until copies that are both a run of glyphs in a line of text
    stopped counting."""
    evidence = EXPERT.analyze(load_image(jpeg_bytes(_photographed_page(), 90)))
    assert evidence.score < 0.5
    assert evidence.details["printed_words_not_counted"] == 1
    assert "apart from a printed word" in evidence.summary


@pytest.mark.parametrize("angle", [1.0, 3.0])
def test_repeated_words_on_a_drawn_page_are_not_clones(angle):
    """A page of text whose words recur, photographed: uneven light, soft focus, noise, a slight tilt,
    JPEG 80. Copy-move found its repeated words as clones (0.57 at 1 degree, 0.89 at 3) until copies
    sitting in printed text stopped counting."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = np.random.default_rng(3)
    words = ["the", "council", "budget", "said", "vote", "mayor", "plan", "of", "and", "report"]
    page = Image.new("L", (760, 330), 255)
    draw = ImageDraw.Draw(page)
    for line in range(9):
        draw.text(
            (20, 16 + 34 * line),
            " ".join(rng.choice(words, 12)),
            font=ImageFont.load_default(size=22),
            fill=40,
        )
    paper = np.asarray(page, np.float32) * np.linspace(0.95, 0.7, 760)[None, :]
    paper += rng.normal(0.0, 3.0, paper.shape)
    photo = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    photo = photo.rotate(angle, Image.Resampling.BICUBIC, fillcolor=150).convert("RGB")
    evidence = EXPERT.analyze(load_image(jpeg_bytes(np.asarray(photo), 80)))
    assert evidence.score < 0.5
    assert evidence.details["printed_words_not_counted"] >= 1


def test_an_object_cloned_on_a_photographed_page_is_still_found():
    """The lettering rule drops copies that sit in printed text, not a stamp-like object cloned on the
    page (a patch of a photo, pasted beside the text and then cloned)."""
    from skimage import data

    page = _photographed_page().copy()
    page[150:230, 420:500] = data.chelsea()[80:160, 180:260]
    forged, _, cloned = clone_disc(page, (460, 190), (90, 60), 35, 0, 1)
    evidence = EXPERT.analyze(load_image(jpeg_bytes(forged, 90)))
    assert evidence.score >= 0.5
    assert evidence.details["printed_words_not_counted"] == 0
    assert (evidence.mask & cloned).sum() / cloned.sum() >= 0.6


def test_deterministic(sample_evidence):
    sample, first = sample_evidence
    second = EXPERT.analyze(load_image(sample.data))
    assert first.score == second.score
    assert np.array_equal(first.mask, second.mask)
    assert first.details == second.details


def test_tiny_image_is_not_applicable():
    evidence = EXPERT.analyze(load_image(np.zeros((1, 1, 3), np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "too small" in evidence.summary


@pytest.mark.parametrize("shape", [(32, 32), (40, 1500), (300, 400)])
def test_edge_shapes_give_evidence_at_full_size(shape):
    pixels = texture(shape, seed=1)
    evidence = EXPERT.analyze(load_image(pixels))
    assert evidence.applicable and evidence.score < 0.5
    assert evidence.heatmap.shape == shape and evidence.mask.shape == shape
    json.dumps(evidence.details)


def test_details_are_json_and_regions_inside_the_image(sample_evidence):
    _, evidence = sample_evidence
    json.dumps(evidence.details)
    height, width = evidence.mask.shape
    for region in evidence.regions:
        x0, y0, x1, y1 = region.bbox
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
