"""The one interface every language-model backend implements, and the messages that flow through it.

A backend turns a conversation (plus tool schemas and images) into text. It does not parse tool
calls, run experts or decide anything: the agent does that (assistant/agent.py). Tool calls travel
as text in the model's output, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the
Hermes/Qwen convention that most chat models with tool use were tuned on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass(frozen=True, eq=False)
class Message:
    """One turn. `images` are RGB uint8 arrays the model may look at (a text-only model ignores them);
    for role "tool", `name` is the tool that produced `content`."""

    role: str
    content: str
    images: tuple[np.ndarray, ...] = ()
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")


@dataclass(frozen=True)
class ModelInfo:
    """What answered: reported in answer.json and the UI."""

    backend: str  # "embedded" or "transformers"
    base_model: str  # e.g. "SmolLM2-135M-Instruct" or a local path
    adapter: str | None = None  # LoRA adapter path or name, if any
    vision: str | None = None  # vision tower, if the model sees pixels
    details: dict[str, Any] = field(default_factory=dict)


TokenCallback = Callable[[str], None]
# Evidence-guided decoding (assistant/guide.py): given the reply so far, text to append without asking
# the model, or None.
Guide = Callable[[str], str | None]


@runtime_checkable
class Backend(Protocol):
    info: ModelInfo

    def generate(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] = (),
        max_new_tokens: int = 256,
        on_token: TokenCallback | None = None,
        guide: Guide | None = None,
    ) -> str:
        """The model's reply to the conversation, greedy (deterministic). `tools` are JSON schemas in
        OpenAI function form; the backend renders them into the prompt with the model's chat template
        when it supports tools, else into the system message. `on_token` receives text as it streams;
        `guide`, when given, is asked after every token for text to append as if the model wrote it."""
        ...

    def count_tokens(self, text: str) -> int: ...
