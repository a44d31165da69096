"""Tool schemas for the language model, generated from the expert registry, and the parsing and
validation of the tool calls it writes.

Every registered expert is one tool (its dataclass fields are the tool's parameters, with their JSON
types and defaults), plus three assistant-level tools: `analyze_image` (all experts and the fused
verdict), `show_map` (attach an expert's heatmap and mask to the answer) and `compare_images`.

Models write calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes/Qwen
convention; see assistant/backends/base.py). Parsing is tolerant where the intent is unambiguous (a
missing closing tag, a code fence, a bare JSON object whose only keys are name/arguments, Python-style
quotes inside a tool-call block, "parameters" for "arguments", arguments given as a JSON string) and
never guesses otherwise: anything else that looks like a call becomes an error message that goes back
to the model as an observation.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from assistant.backends.base import ToolCall
from experts.registry import available_experts, expert_class

ANALYZE_IMAGE = "analyze_image"
SHOW_MAP = "show_map"
COMPARE_IMAGES = "compare_images"
ASSISTANT_TOOLS = (ANALYZE_IMAGE, SHOW_MAP, COMPARE_IMAGES)
FUSED_MAP = "fused"

IMAGE_ID = re.compile(r"^image_[0-9]+$")
_IMAGE_PARAMETER = {
    "type": "string",
    "pattern": IMAGE_ID.pattern,
    "description": 'Image id, e.g. "image_1"; default: the one asked about.',
}
_JSON_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}

# --------------------------------------------------------------------------------------------------
# Schemas


def _json_type(annotation: Any) -> dict[str, Any] | None:
    """The JSON schema of a dataclass field's type, or None when it has no JSON form."""
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list) and args:
        item_types = {a for a in args if a is not Ellipsis}
        if len(item_types) == 1:
            items = _json_type(item_types.pop())
            return {"type": "array", "items": items} if items else None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and (inner := _json_type(options[0])):
            return {**inner, "type": [inner["type"], "null"]}
    return None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def expert_parameters(name: str) -> dict[str, dict[str, Any]]:
    """JSON-schema properties for an expert's settings: its dataclass fields with a JSON type."""
    factory = expert_class(name)
    if not dataclasses.is_dataclass(factory):
        return {}
    hints = typing.get_type_hints(factory)
    properties: dict[str, dict[str, Any]] = {}
    for item in dataclasses.fields(factory):
        schema = _json_type(hints.get(item.name))
        if not item.init or item.name.startswith("_") or schema is None:
            continue
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            properties[item.name] = schema  # required: no default to fall back on
            continue
        # No description: a setting is named and typed with its default, and every one of them is
        # best left unset; the schemas go into small models' prompts, where each token counts.
        properties[item.name] = {**schema, "default": _jsonable(default)}
    return properties


def _function(name: str, description: str, properties: dict, required: Sequence[str] = ()) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(required),
                "additionalProperties": False,
            },
        },
    }


def expert_tool(name: str) -> dict[str, Any]:
    """The tool schema (OpenAI function form) of one registered expert."""
    factory = expert_class(name)
    description = getattr(factory, "description", name)
    return _function(name, description, {"image": _IMAGE_PARAMETER, **expert_parameters(name)})


def tool_schemas(experts: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The assistant's tools, then one tool per expert (default: every registered expert)."""
    names = list(available_experts() if experts is None else experts)
    return [
        _function(
            ANALYZE_IMAGE,
            "Run every forensic expert on an image and fuse their evidence into the verdict (authentic, "
            "manipulated, ai_generated or uncertain) with its probability and where the evidence is. "
            "Start here for 'is this image real or fake?'.",
            {"image": _IMAGE_PARAMETER},
        ),
        _function(
            SHOW_MAP,
            "Attach an expert's heatmap and mask to the answer so the person can see where it found "
            f"something; '{FUSED_MAP}' is the verdict's combined mask.",
            {
                "expert": {
                    "type": "string",
                    "enum": [*names, FUSED_MAP],
                    "description": "The expert whose map to show.",
                },
                "image": _IMAGE_PARAMETER,
            },
            required=("expert",),
        ),
        _function(
            COMPARE_IMAGES,
            "Analyse two images and compare their verdicts and evidence (e.g. an original and a suspect "
            "copy).",
            {
                "image_a": {**_IMAGE_PARAMETER, "description": 'The first image id, e.g. "image_1".'},
                "image_b": {**_IMAGE_PARAMETER, "description": 'The second image id, e.g. "image_2".'},
            },
            required=("image_a", "image_b"),
        ),
        *(expert_tool(name) for name in names),
    ]


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


# --------------------------------------------------------------------------------------------------
# Validation


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(value: Any, schema: Mapping[str, Any], where: str) -> tuple[Any, str | None]:
    """(the value, converted where exact, e.g. 3.0 -> 3 for an integer) or an error message."""
    expected = schema.get("type")
    options = expected if isinstance(expected, list) else [expected]
    if value is None and "null" in options:
        return None, None
    kind = next(o for o in options if o != "null") if options != [None] else None
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return value, f"{where} must be an integer, got {_short(value)}"
    elif kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return value, f"{where} must be a number, got {_short(value)}"
    elif kind == "boolean" and not isinstance(value, bool):
        return value, f"{where} must be true or false, got {_short(value)}"
    elif kind == "string" and not isinstance(value, str):
        return value, f"{where} must be a string, got {_short(value)}"
    elif kind == "array":
        if not isinstance(value, (list, tuple)):
            return value, f"{where} must be a list, got {_short(value)}"
        checked = []
        for index, item in enumerate(value):
            item, error = _check_value(item, schema.get("items", {}), f"{where}[{index}]")
            if error:
                return value, error
            checked.append(item)
        value = checked
    if "enum" in schema and value not in schema["enum"]:
        return value, f"{where} must be one of {', '.join(map(str, schema['enum']))}; got {_short(value)}"
    if "pattern" in schema and isinstance(value, str) and not re.fullmatch(schema["pattern"], value):
        return value, f'{where} must be an image id like "image_1", got {_short(value)}'
    return value, None


def validate_call(
    name: Any,
    arguments: Any,
    tools: Sequence[Mapping[str, Any]] | None = None,
    image_ids: Iterable[str] | None = None,
    call_id: str = "",
) -> ToolCall | str:
    """A ToolCall when `name` is one of `tools` (default: tool_schemas()) and `arguments` fit its
    schema; otherwise a message for the model that says what was wrong and how to call it. With
    `image_ids`, image arguments must also name one of those images."""
    tools = tool_schemas() if tools is None else tools
    by_name = {tool["function"]["name"]: tool["function"] for tool in tools}
    if not isinstance(name, str) or not name:
        return f"A tool call needs a tool name (a string); available tools: {', '.join(by_name)}."
    if name not in by_name:
        return f"Unknown tool {_short(name)}. Available tools: {', '.join(by_name)}."
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        return f"Tool {name!r}: arguments must be a JSON object such as {{}}, got {_short(arguments)}."
    parameters = by_name[name].get("parameters", {})
    properties = parameters.get("properties", {})
    checked: dict[str, Any] = {}
    for key, value in arguments.items():
        if key not in properties:
            takes = ", ".join(properties) or "no arguments"
            return f"Tool {name!r}: unknown argument {_short(key)}; it takes: {takes}."
        value, error = _check_value(value, properties[key], f"argument {key!r}")
        if error:
            return f"Tool {name!r}: {error}."
        checked[key] = value
    missing = [key for key in parameters.get("required", ()) if key not in checked]
    if missing:
        return f"Tool {name!r}: missing required argument {missing[0]!r}."
    if image_ids is not None:
        known = list(image_ids)
        for key, value in checked.items():
            if (
                properties[key].get("pattern") == IMAGE_ID.pattern
                and value is not None
                and value not in known
            ):
                have = ", ".join(known) or "no images yet"
                return f"Tool {name!r}: there is no image {value!r} in this conversation (it has: {have})."
    return ToolCall(name, checked, call_id)


# --------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class CallAttempt:
    """One tool call found in a model's output: the ToolCall when valid, else the error message."""

    name: str | None
    arguments: Any
    call: ToolCall | None
    error: str | None

    @property
    def valid(self) -> bool:
        return self.call is not None


class ParsedCalls(NamedTuple):
    calls: list[ToolCall]
    errors: list[str]
    remaining_text: str


_TAG_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:json|javascript|js|python|tool_call)?[ \t]*\n?(.*?)```", re.DOTALL)
_CALL_KEYS = {"name", "arguments", "parameters", "id", "type"}
_FORMAT_HINT = 'Write exactly: <tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>'


def _python_literal(text: str) -> Any:
    """A dict or list written with Python quotes (a common slip), or raise ValueError. Only plain
    data is accepted: literal_eval evaluates no code, and sets, bytes or complex numbers are refused."""
    value = ast.literal_eval(text)

    def plain(item: Any) -> Any:
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise ValueError("keys must be strings")
            return {k: plain(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [plain(v) for v in item]
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        raise ValueError(f"{type(item).__name__} is not JSON data")

    if not isinstance(value, (dict, list)):
        raise ValueError("not an object")
    return plain(value)


def _decode_block(text: str) -> tuple[list[Any], str | None]:
    """The JSON values in a tool-call block (one object, a list of objects, or several objects one
    after another), or an error message."""
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return [], f"The <tool_call> block is empty. {_FORMAT_HINT}"
    decoder, values, position = json.JSONDecoder(), [], 0
    try:
        while position < len(body):
            value, end = decoder.raw_decode(body, position)
            values.extend(value if isinstance(value, list) else [value])
            position = end
            while position < len(body) and body[position] in " \t\r\n,;":
                position += 1
        return values, None
    except json.JSONDecodeError as exc:
        json_error = exc
    try:
        value = _python_literal(body)
        return (value if isinstance(value, list) else [value]), None
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return [], (
        f"Tool call not understood: the text inside <tool_call> is not valid JSON ({json_error.msg} at "
        f"character {json_error.pos}): {_short(body, 80)}. {_FORMAT_HINT}"
    )


def _attempt(value: Any, tools: Sequence[Mapping[str, Any]], image_ids, call_id: str) -> CallAttempt:
    if not isinstance(value, Mapping):
        return CallAttempt(None, None, None, f"A tool call must be a JSON object, got {_short(value)}.")
    function = value.get("function")
    if "name" not in value and isinstance(function, Mapping):  # OpenAI's {"type": "function", ...}
        value = function
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI encodes arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            error = f"Tool {_short(name)}: arguments must be a JSON object, got {_short(arguments)}."
            return CallAttempt(name if isinstance(name, str) else None, arguments, None, error)
    result = validate_call(name, arguments, tools, image_ids, call_id)
    if isinstance(result, str):
        return CallAttempt(name if isinstance(name, str) else None, arguments, None, result)
    return CallAttempt(result.name, result.arguments, result, None)


def _looks_like_call(value: Any, names: set[str]) -> bool:
    """A bare JSON object in prose counts as a call only when it can be nothing else: its keys are
    call keys, and it names a known tool or carries arguments."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not set(value) <= _CALL_KEYS:
        return False
    return value["name"] in names or "arguments" in value or "parameters" in value


def _bare_calls(text: str, names: set[str]) -> list[tuple[int, int, Any]]:
    """JSON objects outside tags that are unmistakably calls: (start, end, value) spans."""
    decoder, spans, position = json.JSONDecoder(), [], 0
    while (start := text.find("{", position)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if _looks_like_call(value, names):
            spans.append((start, end, value))
            position = end
        else:
            position = start + 1
    return spans


def _function_style(text: str, names: set[str]) -> tuple[str, dict[str, Any]] | None:
    """`show_map(expert="noise")` when that is the whole output and names a known tool."""
    stripped = text.strip().strip("`").strip()
    if not re.fullmatch(r"[A-Za-z_]\w*\s*\(.*\)", stripped, re.DOTALL):
        return None
    try:
        node = ast.parse(stripped, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    if node.func.id not in names:
        return None
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
    except ValueError:
        return None
    return node.func.id, arguments


def parse_tool_call_attempts(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    image_ids: Iterable[str] | None = None,
    first_id: int = 1,
) -> tuple[list[CallAttempt], str]:
    """Every tool call in `text` as a CallAttempt (valid or with its error), and the text left once
    the calls are removed."""
    tools = tool_schemas() if tools is None else tools
    names = set(tool_names(tools))
    image_ids = list(image_ids) if image_ids is not None else None
    attempts: list[CallAttempt] = []

    def next_id() -> str:
        return f"call_{first_id + len(attempts)}"

    if _TAG_BLOCK.search(text):
        for match in _TAG_BLOCK.finditer(text):
            values, error = _decode_block(match.group(1))
            if error:
                attempts.append(CallAttempt(None, None, None, error))
            for value in values:
                attempts.append(_attempt(value, tools, image_ids, next_id()))
        remaining = _TAG_BLOCK.sub(" ", text)
        return attempts, _tidy(remaining)
    # No tags: a fenced block holding a call, or a bare call object, or name(arguments).
    remaining = text
    for match in list(_FENCE.finditer(text)):
        values, error = _decode_block(match.group(1))
        if error or not values or not all(_looks_like_call(v, names) for v in values):
            continue
        attempts.extend(_attempt(value, tools, image_ids, next_id()) for value in values)
        remaining = remaining.replace(match.group(0), " ", 1)
    spans = _bare_calls(remaining, names)
    for start, end, _ in reversed(spans):
        remaining = remaining[:start] + " " + remaining[end:]
    attempts.extend(_attempt(value, tools, image_ids, next_id()) for _, _, value in spans)
    if not attempts and (call := _function_style(text, names)):
        attempts.append(_attempt({"name": call[0], "arguments": call[1]}, tools, image_ids, next_id()))
        remaining = ""
    return attempts, _tidy(remaining)


def _tidy(text: str) -> str:
    text = re.sub(r"</?tool_call>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"```[ \t]*(?:json)?[ \t]*\n?\s*```", " ", text)
    return re.sub(r"[ \t]+\n", "\n", re.sub(r"[ \t]{2,}", " ", text)).strip()


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None = None, image_ids: Iterable[str] | None = None
) -> ParsedCalls:
    """(valid calls, error messages for the model, the text without the calls)."""
    attempts, remaining = parse_tool_call_attempts(text, tools, image_ids)
    calls = [a.call for a in attempts if a.call is not None]
    errors = [a.error for a in attempts if a.error]
    return ParsedCalls(calls, errors, remaining)
