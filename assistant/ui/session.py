"""Per-person state of the app, and the language model that all of them share.

Each browser session (and each gradio_client) gets its own `Session`: its own ForensicsAssistant
conversation, its own images and its own report files, so several people at once never see each
other's images. The language model is loaded once per model path and shared (`SharedModels`); its
replies run one at a time behind a lock, because a backend keeps per-reply state (the KV cache).
Experts and the fusion run outside that lock, but the first analysis of each image runs behind
`EXPERTS_LOCK`, because the runner's cache is a plain dict shared by all threads.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.agent import Agent
from assistant.analysis import analyze
from assistant.api import ForensicsAssistant
from assistant.backends import Backend, Message, load_backend
from experts.base import Analysis, ForensicsError
from experts.image import ImageInput, LoadedImage, load_image
from experts.registry import available_experts

log = logging.getLogger(__name__)

EXPERTS_LOCK = threading.Lock()
EMBEDDED = "embedded"


class LockedBackend:
    """A backend shared by sessions: one reply at a time. Everything else (info, support, ...) is the
    wrapped backend's."""

    def __init__(self, backend: Backend, lock: threading.Lock | None = None) -> None:
        self.backend = backend
        self.lock = lock or threading.Lock()

    @property
    def info(self):
        return self.backend.info

    def generate(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] = (),
        max_new_tokens: int = 256,
        on_token: Callable[[str], None] | None = None,
        guide: Callable[[str], str | None] | None = None,
    ) -> str:
        with self.lock:
            return self.backend.generate(messages, tools, max_new_tokens, on_token, guide)

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def __getattr__(self, name: str) -> Any:  # e.g. `support`, which the agent reads
        return getattr(self.backend, name)


def _warmed(backend: Backend) -> Backend:
    """The backend after a warm-up turn (experts' weights loaded, system prompt cached)."""
    Agent(backend).warm_up()
    return backend


class SharedModels:
    """Backends by model path, loaded on first use and shared by every session. `loader` builds a
    backend from a model spec (None or "embedded": the embedded model); tests pass their own."""

    def __init__(self, loader: Callable[[str | None], Backend] | None = None, **options: Any) -> None:
        self._loader = loader or (lambda spec: _warmed(load_backend(spec, **options)))
        self._backends: dict[str, LockedBackend] = {}
        self._loading = threading.Lock()

    def get(self, spec: str | None = None) -> LockedBackend:
        key = (spec or "").strip() or EMBEDDED
        with self._loading:
            if key not in self._backends:
                log.info("loading the language model %s", key)
                self._backends[key] = LockedBackend(self._loader(None if key == EMBEDDED else key))
            return self._backends[key]

    def add(self, spec: str, backend: Backend) -> None:
        with self._loading:
            self._backends[spec] = LockedBackend(backend)


@dataclass(eq=False)
class Session:
    """One person's conversation. `assistant` is built on the first question (the model loads then);
    `experts` and `model` are the settings it was built with, so a change of setting starts a new
    assistant. `folder` holds this session's uploads-as-analysed and report files."""

    assistant: ForensicsAssistant | None = None
    model: str = EMBEDDED
    experts: tuple[str, ...] = ()
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="forensics-session-")))
    last_image: str | None = None  # the image id of the last answer

    def ensure(
        self, models: SharedModels, model: str | None, experts: Iterable[str] | None
    ) -> ForensicsAssistant:
        """The session's assistant for these settings; a change of model or experts starts a fresh
        conversation (the earlier answers were made with other tools)."""
        model = (model or "").strip() or EMBEDDED
        chosen = tuple(experts) if experts else tuple(available_experts())
        if self.assistant is None or model != self.model or chosen != self.experts:
            backend = models.get(model)
            self.assistant = ForensicsAssistant(backend, experts=chosen)
            self.model, self.experts = model, chosen
        return self.assistant

    def add_image(self, source: ImageInput, name: str | None = None) -> tuple[str, LoadedImage]:
        """Load an upload into the conversation and analyse it (behind EXPERTS_LOCK); raises
        InvalidImageError with a message for the person when it is not a readable image."""
        if self.assistant is None:
            raise ForensicsError("the session has no assistant yet")
        image = load_image(source, name=name)
        conversation = self.assistant.conversation
        image_id = conversation.add_image(image)
        known = conversation.analyses.get(image_id)
        if known is None or [e.expert for e in known.evidence] != list(self.experts):
            with EXPERTS_LOCK:
                conversation.analyses[image_id] = analyze(image, self.experts)
        return image_id, image

    def analysis(self, image_id: str | None = None) -> tuple[Analysis, LoadedImage] | None:
        if self.assistant is None:
            return None
        conversation = self.assistant.conversation
        key = image_id or self.last_image or conversation.current_image
        if key is None or key not in conversation.analyses:
            return None
        return conversation.analyses[key], conversation.images[key]

    def reset(self) -> None:
        if self.assistant is not None:
            self.assistant.reset()
        self.last_image = None
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix="forensics-session-"))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def analyze_locked(image: ImageInput | LoadedImage, experts: Iterable[str] | None = None) -> Analysis:
    """assistant.analyze behind EXPERTS_LOCK (see the module docstring)."""
    with EXPERTS_LOCK:
        return analyze(image, list(experts) if experts else None)
