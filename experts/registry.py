"""The expert registry: one `register_expert(...)` line makes an expert visible to the CLI, the
report, the tool schemas, the UI and the evaluation harness (the way timm's @register_model does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from experts.base import Expert, UnknownExpertError

_REGISTRY: dict[str, Callable[..., Expert]] = {}


def register_expert(factory: Callable[..., Expert], *, name: str | None = None) -> Callable[..., Expert]:
    """Register an expert class (or factory) under its `name`. Returns it, so it works as a decorator."""
    key = name or getattr(factory, "name", None)
    if not key:
        raise ValueError(f"{factory!r} has no name: give name= or a `name` class attribute")
    if key in _REGISTRY and _REGISTRY[key] is not factory:
        raise ValueError(f"an expert named {key!r} is already registered")
    _REGISTRY[key] = factory
    return factory


def available_experts() -> list[str]:
    """Registered expert names, in registration order."""
    return list(_REGISTRY)


def expert_class(name: str) -> Callable[..., Expert]:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY) or "none"
        raise UnknownExpertError(f"no expert named {name!r}; available: {known}") from None


def get_expert(name: str, **params: Any) -> Expert:
    """A new instance of the named expert, with non-default parameters if given."""
    return expert_class(name)(**params)
