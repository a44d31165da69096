"""Language-model backends behind one interface (base.Backend).

    load_backend()                         the embedded VLM (SmolLM2-135M + EfficientNet-Lite0)
    load_backend("/models/Qwen2.5-VL-3B")  a local transformers model, text or vision-language
    load_backend(path, adapter=lora_dir)   with a LoRA adapter on top

BACKENDS maps a backend name to its builder, the way segment-anything's `sam_model_registry` does.
Importing this package is cheap: torch and transformers load when a backend is built.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from assistant.backends.base import Backend, Message, ModelInfo, TokenCallback, ToolCall


def _embedded(adapter: str | Path | None = None, device: str | None = None, **options: Any) -> Backend:
    from assistant.backends.embedded import load_embedded

    return load_embedded(adapter, device, **options)


def _transformers(
    spec: str | Path, adapter: str | Path | None = None, device: str | None = None, **options: Any
) -> Backend:
    from assistant.backends.transformers_backend import load_transformers

    return load_transformers(spec, adapter, device, **options)


BACKENDS: dict[str, Callable[..., Backend]] = {"embedded": _embedded, "transformers": _transformers}


def load_backend(
    spec: str | Path | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
    **options: Any,
) -> Backend:
    """A ready backend. spec None or "embedded": the embedded model; anything else: a local model
    folder for the transformers backend (a hub id only with allow_download=True).

    options go to the builder: dtype for both; use_images, weights_dir, gguf_path, cache_dir for the
    embedded model; allow_download for transformers.
    """
    if spec is None or str(spec) == "embedded":
        return BACKENDS["embedded"](adapter, device, **options)
    return BACKENDS["transformers"](spec, adapter, device, **options)


__all__ = ["BACKENDS", "Backend", "Message", "ModelInfo", "TokenCallback", "ToolCall", "load_backend"]
