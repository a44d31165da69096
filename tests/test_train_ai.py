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
