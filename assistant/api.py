"""ForensicsAssistant: the product in one object, for Python users and every surface built on it.

from assistant import ForensicsAssistant
bot = ForensicsAssistant.load()                  # the embedded model; or load("path/to/model")
answer = bot.chat("Is this image fake?", images=["photo.jpg"])
print(answer.text, answer.verdict.label, answer.verdict.probability)
bot.chat("why?")                                 # follow-ups keep the conversation
analysis = bot.analyze("photo.jpg")              # experts + fusion, no language model
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from assistant.agent import Agent, Answer, Conversation, Event
from assistant.analysis import analyze
from assistant.backends import Backend, load_backend
from experts.base import Analysis
from experts.image import ImageInput, LoadedImage


class ForensicsAssistant:
    """A language model that plans tool calls and explains; experts that measure; a fusion that
    decides. Holds one conversation at a time (`reset()` starts a new one)."""

    def __init__(self, backend: Backend, experts: Iterable[str] | None = None, **agent_options: Any) -> None:
        self.agent = Agent(backend, experts=experts, **agent_options)
        self.conversation = Conversation()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        adapter: str | None = None,
        device: str | None = None,
        experts: Iterable[str] | None = None,
        warm_up: bool = True,
        retry_answer: bool = False,
        **options: Any,
    ) -> ForensicsAssistant:
        """model None (or "embedded") is the embedded offline model; otherwise a local transformers
        model folder. options go to the backend (e.g. allow_download=True, dtype=...). warm_up: load
        the experts' weights and cache the system prompt now (a second or two), not on the first question.
        retry_answer: a rejected answer is rewritten once by the model before the grounded one
        replaces it (worth it for a large model on a GPU)."""
        backend = load_backend(model, adapter=adapter, device=device, **options)
        assistant = cls(backend, experts=experts, retry_answer=retry_answer)
        if warm_up:
            assistant.agent.warm_up()
        return assistant

    @property
    def model(self):
        return self.agent.backend.info

    def chat(
        self,
        question: str,
        images: Sequence[ImageInput | LoadedImage] = (),
        on_event: Callable[[Event], None] | None = None,
    ) -> Answer:
        """Ask about the conversation's images (adding `images` first); returns a checked Answer."""
        return self.agent.ask(self.conversation, question, images=images, on_event=on_event)

    def analyze(
        self,
        image: ImageInput | LoadedImage,
        experts: Iterable[str] | None = None,
        params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Analysis:
        """Experts and fusion only, no language model (the same as assistant.analyze)."""
        return analyze(image, experts if experts is not None else self.agent.experts, params)

    def reset(self) -> None:
        self.conversation = Conversation()
