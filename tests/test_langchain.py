"""LangChain: the experts and the assistant as tools (typed arguments, masks as artifacts), and our
backend as a chat model with bind_tools, so a LangChain agent runs offline."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import ValidationError
from test_agent import ScriptedBackend, call

from assistant.integrations.langchain_model import ForensicsChatModel
from assistant.integrations.langchain_tools import assistant_tool, forensics_tools
from experts.samples import splice


@pytest.fixture(scope="module")
def splice_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lc") / "splice.jpg"
    path.write_bytes(splice().data)
    return path


def _covers_the_cat(mask: np.ndarray) -> bool:
    truth = splice().mask
    marked = mask.dtype == bool and mask.shape == truth.shape and mask.any()
    return marked and (mask & truth).sum() > 0.5 * mask.sum()  # what it marks is mostly the pasted cat


def test_a_langchain_agent_calls_our_tool_and_the_mask_arrives_as_an_artifact(splice_file):
    backend = ScriptedBackend(call("ela", image=str(splice_file)), "ELA marks the left of the image.")
    agent = create_agent(ForensicsChatModel(backend=backend), forensics_tools(["ela", "jpeg"], None, False))
    result = agent.invoke(
        {"messages": [HumanMessage(f"Was {splice_file} edited? Use error level analysis.")]}
    )
    messages = result["messages"]
    assert [type(m).__name__ for m in messages] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert messages[1].tool_calls[0]["name"] == "ela"
    tool_message = messages[2]
    assert "score" in tool_message.content and "Summary:" in tool_message.content  # what the model reads
    assert _covers_the_cat(tool_message.artifact["mask"])  # what the application gets
    assert tool_message.artifact["evidence"].expert == "ela"
    assert messages[3].content == "ELA marks the left of the image."
    second_prompt, second_tools = backend.calls[1]
    assert second_prompt[-1].role == "tool" and second_prompt[-1].content == tool_message.content
    assert {t["function"]["name"] for t in second_tools} == {"analyze_image", "ela", "jpeg"}


def test_a_fake_chat_model_emits_a_call_and_our_tool_runs_with_base64():
    encoded = base64.b64encode(splice().data).decode()
    model = GenericFakeChatModel(
        messages=iter(
            [AIMessage("", tool_calls=[{"name": "analyze_image", "args": {"image": encoded}, "id": "c1"}])]
        )
    )
    experts = ["ela", "jpeg", "metadata", "manipulation", "ai_generated"]  # enough for the splice's verdict
    tools = {tool.name: tool for tool in forensics_tools(experts, include_assistant=False)}
    request = model.invoke("Is this image fake?").tool_calls[0]
    message = tools[request["name"]].invoke({**request, "type": "tool_call"})
    assert isinstance(message, ToolMessage) and message.tool_call_id == "c1"
    assert "Fused verdict" in message.content and "manipulated" in message.content
    assert message.artifact["analysis"].verdict.label == "manipulated"
    assert message.artifact["report"]["schema"] == "forensics-report/1"
    assert _covers_the_cat(message.artifact["mask"])
    bad = tools["ela"].invoke(
        {"name": "ela", "args": {"image": "missing.jpg"}, "id": "c2", "type": "tool_call"}
    )
    assert bad.status == "error" and "missing.jpg: no such file" in bad.content


def test_tool_arguments_are_typed_from_the_expert_settings():
    ela = next(t for t in forensics_tools(["ela"], include_assistant=False) if t.name == "ela")
    schema = ela.args_schema.model_json_schema()
    assert schema["required"] == ["image"] and schema["properties"]["qualities"]["type"] == "array"
    with pytest.raises(ValidationError):
        ela.args_schema(image="x.jpg", qualities="high")


def test_the_whole_assistant_as_a_tool(splice_file):
    from assistant import ForensicsAssistant

    experts = ["ela", "jpeg", "metadata", "manipulation", "ai_generated"]
    bot = ForensicsAssistant(ScriptedBackend(call("analyze_image", image="image_1")), experts=experts)
    tool = assistant_tool(bot)
    message = tool.invoke(
        {
            "name": tool.name,
            "args": {"question": "Is this fake?", "image": str(splice_file)},
            "id": "a",
            "type": "tool_call",
        }
    )
    assert "[fused verdict: manipulated" in message.content
    assert _covers_the_cat(message.artifact["masks"]["fused"])


class Recording:
    """A backend proxy that keeps what the model was given."""

    def __init__(self, backend) -> None:
        self.backend, self.seen = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def generate(self, messages, tools=(), max_new_tokens=256, on_token=None, guide=None):
        self.seen.append((list(messages), list(tools)))
        return self.backend.generate(messages, tools, max_new_tokens, on_token)


@pytest.mark.slow
def test_the_embedded_model_as_a_langchain_chat_model_with_bind_tools():
    from assistant.backends import load_backend

    backend = Recording(load_backend())
    tools = forensics_tools(["ela"], include_assistant=False)
    model = ForensicsChatModel(backend=backend, max_new_tokens=24).bind_tools(tools)
    data_url = "data:image/jpeg;base64," + base64.b64encode(splice().data).decode()
    reply = model.invoke(
        [
            HumanMessage(
                [
                    {"type": "text", "text": "Is this image fake? Call analyze_image."},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ]
            )
        ]
    )
    assert isinstance(reply, AIMessage) and (reply.content or reply.tool_calls or reply.invalid_tool_calls)
    assert all(c["name"] in {"analyze_image", "ela"} for c in reply.tool_calls)
    messages, offered = backend.seen[0]
    assert [t["function"]["name"] for t in offered] == ["analyze_image", "ela"]
    assert messages[0].images[0].shape == (400, 600, 3)  # the image reached the backend as pixels
    prompt, _ = backend.prompt(messages, offered)
    assert "analyze_image" in prompt  # the bound tools are in what the model reads
