"""The embedded model (or any backend of assistant/backends) as a LangChain chat model, so a LangChain
agent runs entirely offline:

    from langchain.agents import create_agent
    from assistant.integrations.langchain_model import ForensicsChatModel
    from assistant.integrations.langchain_tools import forensics_tools

    agent = create_agent(ForensicsChatModel(), forensics_tools(include_assistant=False))
    agent.invoke({"messages": [("user", "Is photo.jpg fake? Use analyze_image.")]})

`bind_tools` takes LangChain tools, pydantic models, functions or OpenAI tool dicts; the backend renders
them into the prompt (its chat template, or the system message) and the model writes
`<tool_call>{...}</tool_call>`, which is parsed and validated against the bound schemas
(assistant/tools.py) into AIMessage.tool_calls; calls that do not fit become invalid_tool_calls with
the reason. Images in a HumanMessage (image_url data: URLs or base64 image blocks) reach the backend
as pixels. Generation is greedy (deterministic); tokens stream to the callbacks.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, PrivateAttr

from assistant.backends.base import Message, ToolCall
from assistant.tools import parse_tool_call_attempts
from experts.base import ForensicsError
from experts.image import load_image


class ForensicsChatModel(BaseChatModel):
    """A LangChain chat model over one of our backends. backend: a ready Backend (e.g. shared with a
    ForensicsAssistant); otherwise `model` (None: the embedded model, or a local transformers folder)
    is loaded on first use."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = None
    model: str | None = None
    max_new_tokens: int = 256
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "image-forensics-backend"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model or "embedded", "max_new_tokens": self.max_new_tokens}

    def _backend(self) -> Any:
        with self._lock:
            if self.backend is None:
                from assistant.backends import load_backend

                self.backend = load_backend(self.model)
            return self.backend

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with these tools offered on every call (tool_choice is accepted and ignored: the
        model decides, and an agent's loop stops when it answers without a call)."""
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        tools = list(kwargs.get("tools") or ())
        ours = [to_message(m) for m in messages]
        on_token: Callable[[str], None] | None = (
            (lambda text: run_manager.on_llm_new_token(text)) if run_manager is not None else None
        )
        text = self._backend().generate(
            ours, tools, kwargs.get("max_new_tokens", self.max_new_tokens), on_token
        )
        for word in stop or ():
            if word in text:
                text = text[: text.index(word)]
        message = to_ai_message(text, tools)
        return ChatResult(generations=[ChatGeneration(message=message)])


def to_ai_message(text: str, tools: Sequence[dict[str, Any]]) -> AIMessage:
    """The model's text as an AIMessage: valid calls in tool_calls, the rest in invalid_tool_calls."""
    if not tools:
        return AIMessage(content=text)
    attempts, remaining = parse_tool_call_attempts(text, tools)
    calls, invalid = [], []
    for index, attempt in enumerate(attempts):
        if attempt.call is not None:
            calls.append(
                {
                    "name": attempt.call.name,
                    "args": attempt.call.arguments,
                    "id": f"call_{index + 1}",
                    "type": "tool_call",
                }
            )
        else:
            invalid.append(
                {
                    "name": attempt.name,
                    "args": json.dumps(attempt.arguments) if attempt.arguments is not None else None,
                    "id": f"call_{index + 1}",
                    "error": attempt.error,
                    "type": "invalid_tool_call",
                }
            )
    return AIMessage(content=remaining, tool_calls=calls, invalid_tool_calls=invalid)


def to_message(message: BaseMessage) -> Message:
    """A LangChain message as one of ours (text and images; an AIMessage keeps its tool calls)."""
    text, images = _content(message.content)
    if isinstance(message, SystemMessage):
        return Message("system", text)
    if isinstance(message, HumanMessage):
        return Message("user", text, tuple(images))
    if isinstance(message, ToolMessage):
        return Message("tool", text, name=getattr(message, "name", None) or "tool")
    if isinstance(message, AIMessage):
        calls = tuple(ToolCall(c["name"], dict(c["args"]), c.get("id") or "") for c in message.tool_calls)
        return Message("assistant", text, tool_calls=calls)
    return Message("user", text, tuple(images))


def _content(content: Any) -> tuple[str, list[np.ndarray]]:
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for block in content or ():
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind in ("image_url", "image"):
            data = _image_bytes(block)
            if data is not None:
                images.append(load_image(data).display)
    return "\n".join(t for t in texts if t), images


def _image_bytes(block: dict[str, Any]) -> bytes | None:
    """The bytes of an image block: {"type": "image_url", "image_url": {"url": "data:...;base64,..."}}
    or {"type": "image", "base64": ...} / {"source_type": "base64", "data": ...}. Remote URLs are
    refused: the model runs offline."""
    url = block.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    payload = block.get("base64") or (block.get("data") if block.get("source_type") == "base64" else None)
    if isinstance(url, str):
        match = re.match(r"^data:[^;]*;base64,(.*)$", url, re.DOTALL)
        if not match:
            raise ForensicsError("only data: URLs are accepted for images (the model runs offline)")
        payload = match.group(1)
    return base64.b64decode(payload) if payload else None
