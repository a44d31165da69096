"""The chat app's handlers without a browser: streaming steps, independent sessions, bad uploads,
the report downloads and the HTTP API's JSON (a scripted model: these test the app, not the model)."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from test_agent import ScriptedBackend, call

from assistant.ui.app import ChatApp, answer_json
from assistant.ui.render import FUSED_LABEL, annotated_image, evidence_panel, verdict_badge
from assistant.ui.session import Session, SharedModels
from experts.samples import authentic, splice

EXPERTS = ["ela", "jpeg", "noise", "metadata", "frequency", "manipulation"]


class TwoStepBackend(ScriptedBackend):
    """Each turn: a call to analyze_image, then an answer that says nothing checkable (so the grounded
    answer replaces it)."""

    def generate(self, messages, tools=(), max_new_tokens=256, on_token=None, guide=None):
        self.outputs = [call("analyze_image", image="image_1")] if len(self.calls) % 2 == 0 else ["Done."]
        return super().generate(messages, tools, max_new_tokens, on_token)


@pytest.fixture()
def app():
    return ChatApp(SharedModels(loader=lambda spec: TwoStepBackend()), experts=EXPERTS)


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _last(updates):
    *_, final = updates
    return final


def test_a_turn_streams_tool_steps_then_the_verdict_masks_evidence_and_report(app, tmp_path):
    image = _write(tmp_path, "splice.jpg", splice().data)
    updates, seen = [], []
    for update in app.respond({"text": "Is this fake?", "files": [image]}, [], None, "", EXPERTS):
        seen.append(copy.deepcopy(update[0]))  # what the browser got at that moment
        updates.append(update)
    steps = [
        m for history in seen for m in history if "analyze_image" in m.get("metadata", {}).get("title", "")
    ]
    assert steps[0]["metadata"]["status"] == "pending" and steps[-1]["metadata"]["status"] == "done"
    history, textbox, badge, annotated, evidence, files, session = updates[-1]
    tool_steps = [m for m in history if "analyze_image" in m.get("metadata", {}).get("title", "")]
    assert len(tool_steps) == 1 and tool_steps[0]["metadata"]["status"] == "done"
    assert "jpeg" in tool_steps[0]["content"]  # each expert's score and summary in the step
    assert history[0] == {"role": "user", "content": {"path": image}}
    assert "manipulated" in history[-1]["content"].lower()
    assert 'data-label="manipulated"' in badge
    picture, regions = annotated["value"]
    assert picture.shape == (400, 600, 3) and regions[-1][1] == FUSED_LABEL
    fused = regions[-1][0] > 0
    assert fused.any() and fused[splice().mask].sum() > 0.5 * fused.sum()  # it marks the pasted cat
    assert 'data-expert="jpeg"' in evidence and "data:image/png;base64," in evidence
    report = json.loads(Path(files[0]).read_text())
    assert report["verdict"]["label"] == "manipulated" and files[1].endswith("report.html")
    html = Path(files[1]).read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html  # self-contained
    assert isinstance(session, Session) and textbox is None


def test_sessions_never_see_each_others_images(app, tmp_path):
    first = _write(tmp_path, "splice.jpg", splice().data)
    second = _write(tmp_path, "coffee.jpg", authentic().data)
    results = {}

    def turn(key, path):
        results[key] = _last(app.respond({"text": "Is this fake?", "files": [path]}, [], None, "", EXPERTS))

    threads = [threading.Thread(target=turn, args=a) for a in (("a", first), ("b", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    session_a, session_b = results["a"][-1], results["b"][-1]
    assert session_a is not session_b
    assert session_a.assistant.agent.backend is session_b.assistant.agent.backend  # one shared model
    assert [i.source for i in session_a.assistant.conversation.images.values()] == ["splice.jpg"]
    assert [i.source for i in session_b.assistant.conversation.images.values()] == ["coffee.jpg"]
    assert 'data-label="manipulated"' in results["a"][2]
    assert 'data-label="manipulated"' not in results["b"][2]
    # A follow-up in one session is about its own image.
    follow = _last(app.respond({"text": "why?", "files": []}, results["b"][0], session_b, "", EXPERTS))
    assert follow[2] == results["b"][2]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.jpg", b"", "empty.jpg: the file is empty"),
        ("notes.png", b"hello, this is text" * 10, "notes.png: not a supported image"),
        ("cut.jpg", splice().data[:600], "cut.jpg:"),
    ],
)
def test_a_bad_upload_gets_a_friendly_message(app, tmp_path, name, data, message):
    path = _write(tmp_path, name, data)
    history, *_ = _last(app.respond({"text": "Is this fake?", "files": [path]}, [], None, "", EXPERTS))
    assert history[-1]["content"].startswith("⚠ I could not read that file.")
    assert message in history[-1]["content"]


def test_the_http_api_returns_the_answer_and_the_report(app, tmp_path):
    image = _write(tmp_path, "splice.jpg", splice().data)
    result, session = app.api_chat(image, "Is this fake?", "", None)
    assert result["verdict"]["label"] == "manipulated" and set(result["experts"]) == set(EXPERTS)
    again, _ = app.api_chat(None, "why?", "", session)  # a follow-up keeps this client's conversation
    assert again["image_id"] == "image_1" and again["verdict"] == result["verdict"]
    report = app.api_analyze(image, "ela,jpeg")
    assert report["schema"] == "forensics-report/1" and [e["expert"] for e in report["evidence"]] == [
        "ela",
        "jpeg",
    ]
    assert app.api_analyze(_write(tmp_path, "empty.png", b""), "")["error"].endswith(
        "the file is empty (0 bytes)"
    )
    assert app.api_reset(session)[0] == "ok" and session.assistant.conversation.images == {}


def test_the_http_api_endpoints_keep_their_documented_names():
    from assistant.ui.app import build_app

    public = {f.api_name for f in build_app(SharedModels()).fns.values() if f.api_visibility == "public"}
    assert public == {"chat", "analyze", "reset"}  # docs/INTEGRATIONS.md lists these three


def test_render_pieces():
    assert 'data-label="none"' in verdict_badge(None)
    assert "appears here" in evidence_panel(None)
    from assistant.analysis import analyze
    from experts.image import load_image

    image = load_image(authentic().data)
    analysis = analyze(image, ["metadata"])
    picture, regions = annotated_image(analysis, image)
    assert picture.shape == (400, 600, 3) and regions == []  # nothing marked on the authentic photo
    masks = {"noise": np.ones((400, 600), bool)}
    assert [label for _, label in annotated_image(analysis, image, masks)[1]] == ["noise mask"]


def test_answer_json_is_json(app, tmp_path):
    image = _write(tmp_path, "splice.jpg", splice().data)
    bot = Session().ensure(app.models, "", EXPERTS)
    answer = bot.chat("Is this fake?", images=[image])
    assert json.loads(json.dumps(answer_json(answer)))["verdict"]["label"] == "manipulated"
