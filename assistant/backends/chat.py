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


def tools_block(tools: Sequence[dict[str, Any]]) -> str:
    """Tool schemas and the call format as plain text, for templates that cannot render tools."""
    lines = ["You can call these tools:"]
    for tool in tools:
        function = _function(tool)
        lines.append(f"- {function['name']}: {function.get('description', '').strip()}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        lines.append(f"  parameters: {json.dumps(parameters, sort_keys=True)}")
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

    def put(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(i) for i in token_ids)
        text = self.text
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
