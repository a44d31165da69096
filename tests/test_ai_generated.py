"""The AI-generated-image expert with its shipped weights: it separates CIFAKE fakes from reals, stays
low on a pristine photo, keeps the evidence contract, and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imaging import texture

from experts import get_expert, load_image
from experts.ai_generated import MIN_SIDE, THRESHOLD, grid_positions, npr_patches
from experts.learned import available

pytestmark = pytest.mark.skipif(
    not available("ai_generated"), reason="experts/weights/ai_generated.* missing: run finetune.train_ai"
)

SAMPLES = 8


@pytest.fixture(scope="module")
def expert():
    return get_expert("ai_generated")


def cifake_test(shared_data, label: str) -> list:
    from assistant.evaluate import read_manifest

    items = [i for i in read_manifest(shared_data / "manifest.csv", "test", ["cifake"]) if i.label == label]
    return items[:SAMPLES]


def test_cifake_fakes_score_higher_than_reals(expert, shared_data):
    fakes = [expert.analyze(load_image(i.file)).score for i in cifake_test(shared_data, "ai_generated")]
    reals = [expert.analyze(load_image(i.file)).score for i in cifake_test(shared_data, "real_photo")]
    assert len(fakes) == len(reals) == SAMPLES
    assert np.mean(fakes) > np.mean(reals) + 0.2, (fakes, reals)


def test_pristine_kodak_photos_score_low(expert, shared_data):
    kodak = shared_data / "clean_photos" / "kodak"
    scores = [expert.analyze(load_image(kodak / f"kodim0{i}.png")).score for i in range(1, 5)]
    assert max(scores) < THRESHOLD and float(np.median(scores)) < 0.2, scores


def test_evidence_contract_on_a_tiny_and_a_wide_image(expert):
    for height, width in ((32, 32), (300, 1100)):
        pixels = texture((height, width))
        evidence = expert.analyze(load_image(pixels))
        assert evidence.applicable and 0.0 <= evidence.score <= 1.0
        assert evidence.heatmap.shape == (height, width) and evidence.heatmap.dtype == np.float32
        assert evidence.heatmap.min() >= 0.0 and evidence.heatmap.max() <= 1.0
        assert evidence.mask is None
        assert evidence.details["indicates"] == "ai_generated"
        for key in ("appearance_probability", "upsampling_trace_probability"):
            assert 0.0 <= evidence.details[key] <= 1.0


def test_too_small_image_is_not_applicable(expert):
    evidence = expert.analyze(load_image(np.full((MIN_SIDE - 1, 40, 3), 90, np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert f"{MIN_SIDE}x{MIN_SIDE}" in evidence.summary


def test_deterministic(expert, shared_data):
    image = load_image(shared_data / "clean_photos" / "kodak" / "kodim05.png")
    first, second = expert.analyze(image), expert.analyze(image)
    assert first.score == second.score and np.array_equal(first.heatmap, second.heatmap)


def test_patches_cover_the_image_on_an_even_grid():
    positions = grid_positions(384, 512, 64, 48)
    assert len(positions) == 48 and positions[0] == (0, 0) and positions[-1] == (320, 448)
    patches, _, size = npr_patches(np.zeros((33, 47, 3), np.uint8))
    assert size == 32 and patches.shape == (1, 32, 32, 3)


def test_only_thumbnails_reach_the_thumbnail_network(expert, shared_data):
    cifake = cifake_test(shared_data, "ai_generated")[0]
    thumbnail = expert.analyze(load_image(cifake.file))
    photo = expert.analyze(load_image(shared_data / "clean_photos" / "kodak" / "kodim05.png"))
    assert 0.0 <= thumbnail.details["thumbnail_probability"] <= 1.0
    assert "thumbnail network" in thumbnail.summary
    assert "thumbnail_probability" not in photo.details and "thumbnail network" not in photo.summary


def test_the_weights_file_leaves_out_what_loads_from_the_package():
    from experts.ai_generated import THUMBNAIL_FROZEN, build_models, trained_state

    models = build_models()
    state = trained_state(models)
    first = {k[len("thumbnail.members.0.") :] for k in state if k.startswith("thumbnail.members.0.")}
    last = {k for k in state if k.startswith(f"thumbnail.members.{len(models.thumbnail.members) - 1}.")}
    assert not any(k.startswith(THUMBNAIL_FROZEN) and k.endswith(".weight") for k in first)
    assert {"blocks.2.0.conv_pw.weight", "conv_head.weight", "classifier.weight"} <= first
    assert "bn1.running_mean" in first and len(last) == len(first)
    assert {"combine.weight", "thumbnail_combine.weight", "head.1.weight", "npr.fc.weight"} <= set(state)
    assert not any(k.startswith(("conv_stem", "blocks.")) for k in state)  # the frozen backbone


def test_the_shipped_thumbnail_network_is_the_trained_one():
    """Training adapts the batch-norm statistics of the layers whose weights stay frozen; the shipped
    file must carry them, or the network runs on ImageNet statistics it was not validated with."""
    from experts.ai_generated import build_models, load_trained, thumbnail_logits, trained_state

    trained = build_models()
    with torch.no_grad():
        for name, buffer in trained.thumbnail.named_buffers():
            if name.startswith(("members.0.bn1.", "members.1.blocks.0.")) and buffer.is_floating_point():
                buffer.mul_(1.5).add_(0.1)  # what running statistics do in train mode
    shipped = load_trained(build_models(), trained_state(trained))
    views = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    with torch.no_grad():
        expected, got = thumbnail_logits(trained.thumbnail, views), thumbnail_logits(shipped.thumbnail, views)
    assert torch.allclose(got, expected, atol=0.05)


def test_a_long_thin_strip_is_cut_to_its_middle_before_it_is_enlarged():
    from experts.ai_generated import BACKBONE_SIZE, MAX_ASPECT, enlarge_for_backbone, thumbnail_view

    strip = np.zeros((16, 400_000, 3), np.uint8)
    enlarged = enlarge_for_backbone(strip)
    assert enlarged.shape[0] == BACKBONE_SIZE and enlarged.shape[1] <= MAX_ASPECT * BACKBONE_SIZE
    assert thumbnail_view(strip).shape == (128, 128, 3)
    photo = np.zeros((100, 700, 3), np.uint8)  # within MAX_ASPECT: enlarged whole, as in training
    assert enlarge_for_backbone(photo).shape == (BACKBONE_SIZE, 1568, 3)


def test_a_thumbnail_is_judged_alike_as_stored_and_mirrored(expert, shared_data):
    """The thumbnail branches see both orientations; a mirrored thumbnail gets the same score and a
    mirrored heatmap (a photo, seen once, need not)."""
    pixels = load_image(cifake_test(shared_data, "ai_generated")[1].file).pixels
    stored = expert.analyze(load_image(pixels))
    mirror = expert.analyze(load_image(np.ascontiguousarray(pixels[:, ::-1])))
    assert stored.score == pytest.approx(mirror.score, abs=1e-4)
    assert np.allclose(stored.heatmap, mirror.heatmap[:, ::-1], atol=1e-4)
    wide = texture((48, 200), seed=1)
    stored, mirror = (
        expert.analyze(load_image(wide)),
        expert.analyze(load_image(np.ascontiguousarray(wide[:, ::-1]))),
    )
    assert stored.score == pytest.approx(mirror.score, abs=1e-4)
    assert np.allclose(stored.heatmap, mirror.heatmap[:, ::-1], atol=1e-4)
