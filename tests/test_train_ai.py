"""The AI-image recipe end to end on a few images: every stage runs, writes its checkpoints, and a
second run resumes from them to the same scores (the NPR CNN and the thumbnail networks are not
trained again)."""

from __future__ import annotations

import json

import torch

from finetune.train_ai import main

SMALL_RUN = [
    "--limit", "40", "--steps", "4", "--eval-every", "2", "--head-epochs", "2",
    "--thumbnail-epochs", "2", "--thumbnail-batch", "4", "--thumbnail-members", "2", "--threads", "1",
    "--no-ship",
]  # fmt: skip


def test_the_recipe_runs_every_stage_and_resumes(shared_data, tmp_path):
    out = tmp_path / "ai"
    assert main([*SMALL_RUN, "--out", str(out)]) == 0
    first = json.loads((out / "scores.json").read_text())
    for name in ("thumbnail_checkpoint.pt", "thumbnail_1_checkpoint.pt"):  # one per member
        assert torch.load(out / name, weights_only=False)["epoch"] == 2
    assert [len(history) for history in first["thumbnail_history"]] == [2, 2]
    assert len(first["thumbnail_member_val_auc_cifake"]) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    assert 0.0 <= first["thumbnail_val_auc_cifake"] <= 1.0 and len(first["thumbnail_combine_weights"]) == 4
    assert main([*SMALL_RUN, "--out", str(out)]) == 0
    second = json.loads((out / "scores.json").read_text())
    first.pop("training_minutes"), second.pop("training_minutes")
    assert second == first


def test_thumbnails_are_drawn_from_photos_too_in_fixed_shares(tmp_path, monkeypatch):
    """CIFAKE half the draws, photos and faces a quarter each, the classes alike within each; a photo
    becomes a thumbnail of a short side in the configured range before the network's view."""
    import numpy as np
    from PIL import Image

    import finetune.train_ai as recipe

    sources = []
    for index, (side, label, domain) in enumerate(
        [(32, 0, recipe.SMALL)] * 3
        + [(32, 1, recipe.SMALL)]
        + [(300, 0, recipe.LARGE)] * 4
        + [(300, 1, recipe.LARGE)]
        + [(200, 0, recipe.FACES), (200, 1, recipe.FACES)]
    ):
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.full((side, side + 10, 3), 40 * index % 255, np.uint8)).save(path)
        sources.append((str(path), label, domain, 1))
    monkeypatch.setattr(recipe, "training_sources", lambda config: sources)
    config = recipe.AIConfig()
    images, chance = recipe.training_thumbnails(config)
    assert len(images) == 11 and np.isclose(chance.sum(), 1.0)
    assert np.allclose([chance[:3].sum(), chance[3]], 0.25)  # CIFAKE: half, its two classes alike
    assert np.allclose([chance[4:8].sum(), chance[8], chance[9], chance[10]], 0.125)
    assert min(images[4][0].shape[:2]) == recipe.THUMBNAIL_SOURCE_SIDE  # a photo is kept at most 256 px
    monkeypatch.setattr(recipe, "thumbnail_view", lambda pixels: pixels)  # what the view is made from
    sides = {
        min(recipe.thumbnail_augment(np.random.default_rng(k), images[4][0], config).shape[:2])
        for k in range(20)
    }
    assert (
        min(sides) >= config.thumbnail_side[0] and max(sides) <= config.thumbnail_side[1] and len(sides) > 5
    )
    only_cifake = recipe.training_thumbnails(recipe.AIConfig(thumbnail_photos=False))
    assert len(only_cifake[0]) == 4 and np.isclose(only_cifake[1][:3].sum(), 0.5)
