"""ForensicsAssistant and `forensics chat`: the answer file, masks, follow-ups and the verdict check."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image
from test_agent import ScriptedBackend, call

from assistant import ForensicsAssistant
from assistant.commands import chat as chat_command
from experts.samples import splice


def test_assistant_answers_with_the_fused_verdict_and_keeps_the_conversation():
    bot = ForensicsAssistant(ScriptedBackend(call("jpeg", image="image_1"), "This photo is authentic."))
    answer = bot.chat("Is this image fake?", images=[splice().data])
    assert answer.verdict.label == "manipulated"
    assert answer.corrected  # the model said "authentic": the check replaced it
    assert "manipulated" in answer.text.lower()
    assert bot.analyze(splice().data).verdict.probability == answer.verdict.probability
    follow_up = bot.chat("why?")
    assert follow_up.verdict.label == "manipulated" and follow_up.image_id == "image_1"
    bot.reset()
    assert bot.conversation.images == {}


def test_answer_file_and_masks(tmp_path):
    bot = ForensicsAssistant(ScriptedBackend(call("analyze_image", image="image_1")))
    answer = bot.chat("Is this image fake? Show me the noise map.", images=[splice().data])
    record = chat_command.write_answer(answer, chat_command.answer_record(answer, "splice.jpg"), tmp_path)
    saved = json.loads((tmp_path / "answer.json").read_text())
    assert saved == record
    assert set(saved) >= {"text", "verdict", "tool_calls", "fallback", "model", "masks"}
    assert saved["verdict"]["label"] == answer.verdict.label
    assert saved["verdict"]["mask"] == "masks/fused.png"
    assert {"backend", "base_model", "adapter"} == set(saved["model"])
    assert all(set(c) >= {"name", "arguments", "valid"} for c in saved["tool_calls"])
    assert "masks/fused.png" in saved["masks"]
    mask = np.asarray(Image.open(tmp_path / "masks/fused.png"))
    assert mask.shape == (400, 600) and mask.max() == 255
    assert (tmp_path / "heatmaps/noise.png").exists()


def test_chat_command_reports_a_bad_image(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    parser = argparse.ArgumentParser()
    chat_command.configure_parser(parser)
    args = parser.parse_args([str(bad)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ForensicsAssistant, "load", classmethod(lambda cls, *a, **k: cls(ScriptedBackend())))
        assert chat_command.run(args) == 1
    assert "bad.jpg: the file is empty" in capsys.readouterr().err
