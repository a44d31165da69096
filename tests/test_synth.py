"""The forgery synthesiser: deterministic by seed, exact masks, every kind edits something."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.augment import PostProcess
from finetune.synth import KINDS, MANIPULATIONS, Synthesiser, ellipse_shape, place_shape, shapes_from_masks


@pytest.fixture(scope="module")
def synthesiser() -> Synthesiser:
    from skimage import data

    rng = np.random.default_rng(7)
    shapes = [ellipse_shape(rng) for _ in range(4)]
    return Synthesiser([data.coffee(), data.chelsea(), data.astronaut()], shapes)


def test_same_seed_same_forgery_other_seed_other_forgery(synthesiser):
    first = synthesiser.make(np.random.default_rng(3))
    again = synthesiser.make(np.random.default_rng(3))
    other = synthesiser.make(np.random.default_rng(4))
    assert first.kind == again.kind
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_edits_only_inside_its_nonempty_mask(synthesiser, kind):
    for seed in range(3):
        forgery = synthesiser.make(np.random.default_rng(seed), kind=kind)
        assert forgery.kind == kind
        assert forgery.edited_mask.dtype == bool and forgery.edited_mask.any()
        outside = ~forgery.edited_mask
        assert np.array_equal(forgery.edited[outside], forgery.host[outside])
        changed = np.any(forgery.edited != forgery.host, axis=2)
        assert changed[forgery.edited_mask].mean() > 0.2  # the region really was edited


def test_post_processing_keeps_mask_and_image_aligned(synthesiser):
    post = PostProcess(p_jpeg=1.0, p_resize=1.0, scale=(0.5, 0.6))
    shrunk = Synthesiser(synthesiser.hosts, synthesiser.shapes, post=post)
    forgery = shrunk.make(np.random.default_rng(1), kind="splice")
    assert forgery.image.shape[:2] == forgery.mask.shape
    assert forgery.image.shape[0] < forgery.host.shape[0]
    assert 0.3 < forgery.mask.mean() / forgery.edited_mask.mean() < 3.0


def test_pristine_examples_have_empty_masks(synthesiser):
    forgery = synthesiser.make(np.random.default_rng(0), pristine=True)
    assert forgery.kind == "pristine" and not forgery.mask.any()
    assert np.array_equal(forgery.edited, forgery.host)


def test_shapes_come_from_the_largest_component_of_each_mask():
    mask = np.zeros((50, 60), bool)
    mask[5:10, 5:10] = True  # 25 px
    mask[20:40, 30:55] = True  # 500 px, the one kept
    (shape,) = shapes_from_masks([mask, np.zeros((10, 10), bool)], min_pixels=100)
    assert shape.shape == (20, 25) and shape.all()


def test_placed_shape_covers_the_requested_share():
    rng = np.random.default_rng(0)
    placed = place_shape(rng, np.ones((10, 20), bool), (200, 300), (0.1, 0.1))
    assert 0.08 < placed.mean() < 0.12


def test_manipulations_table_matches_kinds():
    assert set(MANIPULATIONS) == set(KINDS)
