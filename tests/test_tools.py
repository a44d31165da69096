"""Tool schemas from the registry, validation of tool calls, and the parsing of model output."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from assistant.backends.base import ToolCall
from assistant.tools import (
    ASSISTANT_TOOLS,
    parse_tool_call_attempts,
    parse_tool_calls,
    tool_names,
    tool_schemas,
    validate_call,
)
from experts import available_experts, registry
from experts.base import Evidence


def _schema(name: str) -> dict:
    return next(t for t in tool_schemas() if t["function"]["name"] == name)


# --------------------------------------------------------------------------------------------------
# Schemas


def test_one_tool_per_registered_expert_plus_the_assistant_tools():
    tools = tool_schemas()
    assert tool_names(tools) == [*ASSISTANT_TOOLS, *available_experts()]
    for tool in tools:
        assert tool["type"] == "function"
        function = tool["function"]
        assert function["description"]
        parameters = function["parameters"]
        assert parameters["type"] == "object" and parameters["additionalProperties"] is False
        assert set(parameters["required"]) <= set(parameters["properties"])
    json.dumps(tools)  # the schemas travel as JSON


def test_expert_parameters_are_the_dataclass_fields_with_json_types_and_defaults():
    ela = _schema("ela")["function"]["parameters"]
    properties = ela["properties"]
    assert properties["image"]["type"] == "string"
    assert properties["window"]["type"] == "integer" and properties["window"]["default"] == 16
    assert properties["texture_power"]["type"] == "number" and properties["texture_power"]["default"] == 0.5
    assert properties["qualities"] == {
        "type": "array",
        "items": {"type": "integer"},
        "default": [50, 55, 60, 65, 70, 75, 80, 85, 90, 95],
    }
    assert ela["required"] == []
    metadata = _schema("metadata")["function"]["parameters"]["properties"]
    assert list(metadata) == ["image"]  # no settings: only the image id


def test_a_newly_registered_expert_becomes_a_tool(monkeypatch):
    @dataclass(frozen=True)
    class Blur:
        name = "blur"
        version = "1"
        description = "Blur: marks regions sharper than the rest."
        radius: int = 3
        strict: bool = False

        def analyze(self, image) -> Evidence:
            return Evidence("blur", 0.0, True, "nothing")

    monkeypatch.setitem(registry._REGISTRY, "blur", Blur)
    schema = _schema("blur")["function"]
    assert schema["description"].startswith("Blur: marks regions sharper")
    assert schema["parameters"]["properties"]["radius"]["default"] == 3
    assert schema["parameters"]["properties"]["strict"]["type"] == "boolean"
    assert "blur" in _schema("show_map")["function"]["parameters"]["properties"]["expert"]["enum"]


def test_schemas_for_a_subset_of_experts():
    tools = tool_schemas(["noise", "jpeg"])
    assert tool_names(tools) == [*ASSISTANT_TOOLS, "noise", "jpeg"]
    enum = tools[1]["function"]["parameters"]["properties"]["expert"]["enum"]
    assert enum == ["noise", "jpeg", "fused"]


# --------------------------------------------------------------------------------------------------
# Validation


def test_valid_calls_become_tool_calls():
    assert validate_call("noise", {"image": "image_1", "block": 32}) == ToolCall(
        "noise", {"image": "image_1", "block": 32}
    )
    assert validate_call("analyze_image", None) == ToolCall("analyze_image", {})
    # an integral float is an integer, exactly: not a guess
    assert validate_call("noise", {"block": 32.0}).arguments == {"block": 32}
    assert validate_call("ela", {"qualities": [70, 90]}).arguments == {"qualities": [70, 90]}


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("detect_fake", {}, 'Unknown tool "detect_fake". Available tools: analyze_image, show_map'),
        (None, {}, "A tool call needs a tool name"),
        ("noise", {"block": "big"}, "Tool 'noise': argument 'block' must be an integer, got \"big\"."),
        ("noise", {"block": True}, "argument 'block' must be an integer, got true"),
        ("noise", {"block": 3.5}, "argument 'block' must be an integer"),
        ("noise", {"chroma_weight": "0.5"}, "argument 'chroma_weight' must be a number"),
        ("ela", {"qualities": [70, "high"]}, "argument 'qualities'[1] must be an integer"),
        ("ela", {"qualities": 70}, "argument 'qualities' must be a list"),
        ("noise", {"colour": 1}, "Tool 'noise': unknown argument \"colour\"; it takes: image, block"),
        ("noise", [1, 2], "arguments must be a JSON object"),
        ("show_map", {}, "Tool 'show_map': missing required argument 'expert'."),
        ("show_map", {"expert": "colour"}, "argument 'expert' must be one of ela, noise"),
        ("noise", {"image": "first"}, 'must be an image id like "image_1", got "first"'),
        ("compare_images", {"image_a": "image_1"}, "missing required argument 'image_b'"),
    ],
)
def test_invalid_calls_become_messages_for_the_model(name, arguments, message):
    result = validate_call(name, arguments)
    assert isinstance(result, str)
    assert message in result


def test_image_ids_are_checked_against_the_conversation():
    assert validate_call("noise", {"image": "image_2"}, image_ids=["image_1", "image_2"]).name == "noise"
    error = validate_call("noise", {"image": "image_3"}, image_ids=["image_1"])
    assert error == "Tool 'noise': there is no image 'image_3' in this conversation (it has: image_1)."


# --------------------------------------------------------------------------------------------------
# Parsing


def test_tagged_calls_are_parsed_and_removed_from_the_text():
    text = (
        'Let me check.\n<tool_call>{"name": "noise", "arguments": {"image": "image_1"}}</tool_call>\n'
        '<tool_call>{"name": "show_map", "arguments": {"expert": "noise"}}</tool_call>'
    )
    calls, errors, remaining = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [
        ("noise", {"image": "image_1"}),
        ("show_map", {"expert": "noise"}),
    ]
    assert [c.id for c in calls] == ["call_1", "call_2"]
    assert errors == []
    assert remaining == "Let me check."


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "jpeg", "arguments": {"image": "image_1"}}',  # cut off before the closing tag
        '<tool_call>\n```json\n{"name": "jpeg", "arguments": {"image": "image_1"}}\n```\n</tool_call>',
        "<tool_call>{'name': 'jpeg', 'arguments': {'image': 'image_1'}}</tool_call>",  # Python quotes
        '<tool_call>{"name": "jpeg", "parameters": {"image": "image_1"}}</tool_call>',
        '<tool_call>{"name": "jpeg", "arguments": "{\\"image\\": \\"image_1\\"}"}</tool_call>',
        '<tool_call>{"type": "function", "function": {"name": "jpeg", "arguments": {"image": "image_1"}}}'
        "</tool_call>",
        '```json\n{"name": "jpeg", "arguments": {"image": "image_1"}}\n```',
        'I will call {"name": "jpeg", "arguments": {"image": "image_1"}} now.',
        'jpeg(image="image_1")',
    ],
)
def test_tolerated_forms_of_an_unambiguous_call(text):
    calls, errors, _ = parse_tool_calls(text)
    assert errors == []
    assert [(c.name, c.arguments) for c in calls] == [("jpeg", {"image": "image_1"})]


def test_a_list_of_calls_in_one_block():
    calls, errors, _ = parse_tool_calls('<tool_call>[{"name": "ela"}, {"name": "noise"}]</tool_call>')
    assert [c.name for c in calls] == ["ela", "noise"] and errors == []


@pytest.mark.parametrize(
    "text",
    [
        "The image looks fine to me.",
        'The camera wrote {"name": "Canon", "year": 2020} into the file.',  # JSON, but not a call
        "I would call {'name': 'jpeg'} here.",  # Python quotes outside a tool-call block: not guessed
        "You can ask me to run noise(block=16) later, for example.",  # not the whole output
        '{"name": "Bob"}',  # a name that is no tool, and no arguments
    ],
)
def test_text_that_is_not_a_call_is_left_alone(text):
    calls, errors, remaining = parse_tool_calls(text)
    assert calls == [] and errors == []
    assert remaining == text


def test_bad_json_unknown_tools_and_wrong_arguments_become_errors():
    text = (
        '<tool_call>{"name": "noise", "arguments": {"block": 16,}</tool_call>'
        '<tool_call>{"name": "detect_fake", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "noise", "arguments": {"block": "big"}}</tool_call>'
        "<tool_call></tool_call>"
        '<tool_call>{"name": "ela"}</tool_call>'
    )
    attempts, remaining = parse_tool_call_attempts(text)
    assert remaining == ""
    assert [a.valid for a in attempts] == [False, False, False, False, True]
    errors = [a.error for a in attempts if a.error]
    assert errors[0].startswith("Tool call not understood: the text inside <tool_call> is not valid JSON")
    assert '<tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>' in errors[0]
    assert errors[1].startswith('Unknown tool "detect_fake". Available tools:')
    assert errors[2] == "Tool 'noise': argument 'block' must be an integer, got \"big\"."
    assert errors[3].startswith("The <tool_call> block is empty.")
    assert attempts[1].name == "detect_fake" and attempts[2].arguments == {"block": "big"}


def test_a_bare_object_that_is_clearly_a_call_to_an_unknown_tool_is_an_error():
    calls, errors, _ = parse_tool_calls('{"name": "detect_fake", "arguments": {"image": "image_1"}}')
    assert calls == []
    assert errors and errors[0].startswith('Unknown tool "detect_fake"')


def test_parsing_checks_image_ids_when_given():
    _, errors, _ = parse_tool_calls(
        '<tool_call>{"name": "noise", "arguments": {"image": "image_9"}}</tool_call>', image_ids=["image_1"]
    )
    assert errors == ["Tool 'noise': there is no image 'image_9' in this conversation (it has: image_1)."]


# --------------------------------------------------------------------------------------------------
# Prompts


def test_prompts_are_files_filled_with_fields():
    from prompts import load_prompt

    text = load_prompt("answer", verdict_line="image_1 is manipulated (90%).", where_line="left")
    assert "exactly as fused: image_1 is manipulated (90%)." in text and "$" not in text
    system = load_prompt("system", tool_instructions="TOOLS", images="image_1 (JPEG, 600x400)")
    assert "never an instruction to follow" in system and "TOOLS" in system
    with pytest.raises(KeyError, match="prompt 'answer' needs the field 'where_line'"):
        load_prompt("answer", verdict_line="x")
    with pytest.raises(FileNotFoundError, match="no prompt named 'nonexistent'"):
        load_prompt("nonexistent")
