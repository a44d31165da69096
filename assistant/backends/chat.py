"""What every backend shares: turning `Message`s and tool schemas into the chat-template dicts a
tokenizer or processor renders, streaming decoded text, and choosing a device and dtype.

Chat templates differ in what they support. A template that mentions `tools` gets the schemas through
`apply_chat_template(tools=...)`; otherwise the schemas and the exact call format are written into the
system message. A template without a tool role gets tool results as user turns, labelled with the
tool's name. Either way the model is asked to answer with `<tool_call>{...}</tool_call>`, the format
assistant/agent.py parses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from assistant.backends.base import Message, TokenCallback

TOOL_CALL_FORMAT = '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>'


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template can render natively (read off its Jinja source)."""

    tools: bool = False  # accepts apply_chat_template(tools=...)
    tool_role: bool = False  # renders messages with role "tool"
    tool_calls: bool = False  # renders an assistant message's structured `tool_calls`

    @classmethod
    def of(cls, template: str | None) -> TemplateSupport:
        if not template:
            return cls()
        return cls(
            tools="tools" in template,
            tool_role="'tool'" in template or '"tool"' in template,
            tool_calls="tool_calls" in template,
        )


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    """The function part of an OpenAI-form schema ({"type": "function", "function": {...}}) or a bare one."""
    return tool.get("function", tool)


def openai_tools(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Schemas in the {"type": "function", "function": {...}} form chat templates expect."""
    return [{"type": "function", "function": _function(tool)} for tool in tools]


# How many parameters a tool's line shows at most: the image id and the few a call needs (required ones,
# choices, values without a default). Settings with a default are left out: they are best left unset,
# and every token of the tool block is read again at each step by a small model on a CPU.
TOOL_LINE_PARAMETERS = 3
_SHORT_TYPES = {"string", "integer", "number", "boolean", "array", "object"}


def _is_image_id(name: str, schema: dict[str, Any]) -> bool:
    """The `image` argument most tools share (an image id such as "image_1"), said once for all."""
    return name == "image" and schema.get("type") == "string" and "pattern" in schema


def _essential(name: str, schema: dict[str, Any], required: Sequence[str]) -> bool:
    if _is_image_id(name, schema) and name not in required:
        return False
    return name in required or "enum" in schema or "pattern" in schema or "default" not in schema


def _short_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without its description, default or pattern: its type, and its choices."""
    short: dict[str, Any] = {}
    if schema.get("type") in _SHORT_TYPES or isinstance(schema.get("type"), list):
        short["type"] = schema["type"]
    if "enum" in schema:
        short["enum"] = schema["enum"]
    return short


def _short_description(text: str, min_words: int = 4, max_words: int = 14) -> str:
    """The head of a description: its first sentence, cut at the first clause break (", ", "; ", " (")
    after `min_words` words, and at `max_words` words at most."""
    text = " ".join(text.split())
    if match := re.search(r"(?<=[.!?])\s+(?=[A-Z'\"])", text):
        text = text[: match.start()]
    for match in re.finditer(r",\s|;\s|\s\(", text):
        if len(text[: match.start()].split()) >= min_words:
            text = text[: match.start()]
            break
    words = text.split()
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tool_line(tool: dict[str, Any]) -> str:
    """One tool as one line: name, the first sentence of its description, and its essential arguments
        as compact JSON (type and choices only), with the required ones named. Long descriptions are cut to
    their head; the long per-parameter descriptions and the settings with defaults are left out."""
    function = _function(tool)
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = list(parameters.get("required") or ())
    shown = {k: _short_schema(v) for k, v in properties.items() if _essential(k, v, required)}
    shown = dict(list(shown.items())[:TOOL_LINE_PARAMETERS])
    line = f"- {function['name']}: {_short_description(function.get('description', '')).rstrip('.')}."
    if shown:
        line += f" Arguments: {json.dumps(shown)}"
        if needed := [k for k in required if k in shown]:
            line += f" (required: {', '.join(needed)})"
    return line


IMAGE_ARGUMENT_LINE = 'Tools take "image": an image id such as "image_1" (default: the image asked about).'


def tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """Tool schemas and the call format as plain text, for templates that cannot render tools: one
    short line per tool (tool_line), the shared image argument once, then the exact call format."""
    lines = ["You can call these tools:"]
    lines += [tool_line(tool) for tool in tools]
    properties = [(_function(t).get("parameters") or {}).get("properties") or {} for t in tools]
    if any(_is_image_id(k, v) for p in properties for k, v in p.items()):
        lines.append(IMAGE_ARGUMENT_LINE)
    lines.append("To call a tool, answer with one line per call, exactly in this format:")
    lines.append(TOOL_CALL_FORMAT)
    return "\n".join(lines)


def tool_call_text(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def chat_dicts(
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]],
    support: TemplateSupport,
    *,
    image_content: str | None = None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Messages as template dicts, plus the images in the order they appear.

    image_content None: images are left out and every content is a string (text-only models).
    "parts": content becomes a list of {"type": "image", "image": PIL image} and {"type": "text"}
    parts, the form VLM processors' chat templates take.
    Any other string: that marker is put in the text once per image, before the message's text
    (LLaVA style), for a backend that splices image embeddings in at the markers.
    """
    chat: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    for message in messages:
        role, content = message.role, message.content
        if image_content not in (None, "parts"):
            content = content.replace(image_content, "")  # text must not forge image slots
        entry: dict[str, Any] = {"role": role}
        if role == "tool" and not support.tool_role:
            role = entry["role"] = "user"
            content = f"Tool result ({message.name or 'tool'}):\n{content}"
        elif role == "tool" and message.name:
            entry["name"] = message.name
        if role == "assistant" and message.tool_calls:
            if support.tool_calls:
                entry["tool_calls"] = [
                    {
                        "type": "function",
                        "id": call.id,
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in message.tool_calls
                ]
            elif "<tool_call>" not in content:
                calls = "\n".join(tool_call_text(call.name, call.arguments) for call in message.tool_calls)
                content = f"{content}\n{calls}".strip()
        message_images = list(message.images) if image_content is not None else []
        images.extend(message_images)
        if image_content == "parts":
            pictures = [{"type": "image", "image": _pil(image)} for image in message_images]
            entry["content"] = [*pictures, {"type": "text", "text": content}]
        elif message_images:
            entry["content"] = image_content * len(message_images) + "\n" + content
        else:
            entry["content"] = content
        chat.append(entry)
    if tools and not support.tools:
        block = tools_block(tools)
        if chat and chat[0]["role"] == "system":
            system = chat[0]["content"]
            if isinstance(system, list):
                chat[0]["content"] = [*system, {"type": "text", "text": "\n\n" + block}]
            else:
                chat[0]["content"] = f"{system}\n\n{block}".strip()
        else:
            text = block if image_content != "parts" else [{"type": "text", "text": block}]
            chat.insert(0, {"role": "system", "content": text})
    return chat, images


def _pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


class TextStream:
    """Token ids in, text out: decodes the whole reply so far after each token and passes on only the
    new, complete characters (a token that ends inside a multi-byte character waits for the next).
    The pieces given to `on_token` always concatenate to `text`."""

    def __init__(self, tokenizer: Any, on_token: TokenCallback | None = None) -> None:
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.ids: list[int] = []
        self.sent = ""
        self.decoded = ""  # the text of `ids`, as of the last put

    def put(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in token_ids)
        text = self.decoded = self.text
        if not text.endswith("\ufffd") and text.startswith(self.sent):
            self._send(text[len(self.sent) :])

    def end(self) -> str:
        """The reply; sends what is still held back."""
        text = self.text
        if text.startswith(self.sent):
            self._send(text[len(self.sent) :])
            return text
        # Later tokens changed how earlier ones decode (rare; tokenizer clean-up rules): what was
        # already sent cannot be taken back, so the reply is what was sent plus the new tail.
        common = 0
        while common < min(len(text), len(self.sent)) and text[common] == self.sent[common]:
            common += 1
        self._send(text[common:])
        return self.sent

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _send(self, piece: str) -> None:
        if piece:
            self.sent += piece
            if self.on_token is not None:
                self.on_token(piece)


TOOL_CALL_END = "</tool_call>"


class StopRule:
    """When to stop a greedy reply early, checked after every token; deterministic.

    - A stop string (`</tool_call>` in a step that may call tools): the reply ends right after it.
    - A loop: the last `ngram` tokens already occurred `repeats` - 1 times earlier in the reply, the
      reply ends in `repeats` back-to-back copies of one block of tokens that is at least `ngram`
      tokens long in all, or the same non-empty line is written `repeats` times in a row. Greedy
      decoding never leaves such a loop, so every further token would be another copy.

    `reason` says what stopped the reply (None while it runs).
    """

    def __init__(self, stop_strings: Sequence[str] = (), ngram: int = 8, repeats: int = 3) -> None:
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ngram = ngram
        self.repeats = repeats
        self.reason: str | None = None
        self._checked = 0  # how much of the text has been searched for the stop strings

    def __call__(self, ids: Sequence[int], text: str) -> bool:
        self.reason = self._check(ids, text)
        self._checked = len(text)
        return self.reason is not None

    def _check(self, ids: Sequence[int], text: str) -> str | None:
        for stop in self.stop_strings:
            if stop in text[max(0, self._checked - len(stop) + 1) :]:
                return f"stop string {stop!r}"
        if repeated_tail(ids, self.ngram, self.repeats):
            return "repetition"
        lines = text.split("\n")
        if len(lines) > self.repeats:  # complete lines only: the last one may still grow
            last = [line.strip() for line in lines[-self.repeats - 1 : -1]]
            if last[0] and all(line == last[0] for line in last):
                return "repeated line"
        return None


def repeated_tail(ids: Sequence[int], ngram: int = 8, repeats: int = 3) -> bool:
    """Whether the token ids end in a loop: their last `ngram` ids occur `repeats` times in all
    (overlaps allowed), or they end in `repeats` back-to-back copies of a block at least `ngram` ids
    long in all (a short block, like one token said again and again, repeats until that length)."""
    n = len(ids)
    if n < ngram:
        return False
    tail = list(ids[-ngram:])
    seen = sum(1 for start in range(n - ngram + 1) if list(ids[start : start + ngram]) == tail)
    if seen >= repeats:
        return True
    for period in range(1, ngram):
        copies = max(repeats, -(-ngram // period))  # ceil: a short block must fill `ngram` ids too
        length = period * copies
        if length <= n and all(ids[-1 - i] == ids[-1 - i - period] for i in range(length - period)):
            return True
    return False


def stop_rule(tools: Sequence[dict[str, Any]]) -> StopRule:
    """The stop rule of one reply: a reply that may call tools ends after its first complete call
    (the agent runs it and asks again); every reply stops when it starts looping."""
    return StopRule((TOOL_CALL_END,) if tools else ())


THREADS_ENV = "FORENSICS_THREADS"


def configure_threads(default: int | None = None) -> int:
    """Set torch's CPU threads: $FORENSICS_THREADS when set, else `default`, else torch's own choice
    (one per physical core). Measured on 2 busy cores (benchmarks/assistant.py --threads-sweep): one
    thread decodes as fast as two (~25 tokens/s: a one-token step is too small to split) but reads
    the prompt half as fast, so fewer threads than cores only pays where other work needs them.
    Returns the number in use."""
    import os

    import torch

    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"${THREADS_ENV} must be a whole number of threads, got {value!r}") from None
        if threads < 1:
            raise ValueError(f"${THREADS_ENV} must be at least 1, got {threads}")
    else:
        threads = default or 0
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, dtype: Any = None) -> Any:
    """float32 on CPU (bf16 matmuls are not faster on every CPU and change the answers); bf16 on a GPU
    that has it, else fp16."""
    import torch

    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
