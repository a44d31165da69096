"""Prompt templates as files (system.md, tools.md, answer.md, ...), filled with string.Template:
`$name` is a field, `$$` a literal dollar sign. Editing a prompt never needs a code change."""

from __future__ import annotations

from functools import cache
from importlib import resources
from string import Template


@cache
def _template(name: str) -> Template:
    path = resources.files(__package__).joinpath(f"{name}.md")
    if not path.is_file():
        known = sorted(p.name.removesuffix(".md") for p in resources.files(__package__).iterdir())
        known = [k for k in known if not k.startswith("_") and not k.endswith(".py")]
        raise FileNotFoundError(f"no prompt named {name!r} in prompts/; available: {', '.join(known)}")
    return Template(path.read_text(encoding="utf-8"))


def load_prompt(name: str, **fields: object) -> str:
    """The prompt prompts/<name>.md with its $fields filled in. A field the template uses but the
    caller did not give raises KeyError naming it; extra fields are ignored."""
    template = _template(name)
    try:
        return template.substitute({key: str(value) for key, value in fields.items()}).strip()
    except KeyError as exc:
        raise KeyError(f"prompt {name!r} needs the field {exc.args[0]!r}") from None


__all__ = ["load_prompt"]
