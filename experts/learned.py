"""Shipped weights of the learned experts: `experts/weights/<name>.safetensors`, each with a model card
`<name>.md` that states the file's sha256 (written by `finetune.recipe.ship_weights`). Loading checks
the hash, so a corrupt or swapped file is refused with a message instead of giving wrong answers."""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

import torch

from experts.base import ModelNotAvailableError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_SHA256_LINE = re.compile(r"sha256[^0-9a-f]*([0-9a-f]{64})")


def weights_file(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def card_file(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.md"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(name: str) -> str:
    card = card_file(name)
    if not card.is_file():
        raise ModelNotAvailableError(f"{card} (the model card of {name}) is missing; reinstall the package")
    match = _SHA256_LINE.search(card.read_text(encoding="utf-8"))
    if not match:
        raise ModelNotAvailableError(f"{card} states no sha256 for {weights_file(name).name}")
    return match.group(1)


@cache
def load_weights(name: str) -> dict[str, torch.Tensor]:
    """The state dict of a shipped weight file, after checking its sha256 against its model card."""
    from safetensors.torch import load_file

    path = weights_file(name)
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} is missing: the {name} weights ship with the package (or train them with the recipe "
            f"named in {card_file(name).name})"
        )
    expected, actual = expected_sha256(name), file_sha256(path)
    if actual != expected:
        raise ModelNotAvailableError(
            f"{path} has sha256 {actual[:12]}..., but its model card says {expected[:12]}...; the file is "
            "corrupt or was replaced: reinstall the package or retrain with the recipe on the card"
        )
    return load_file(path)


def load_metadata(name: str) -> dict[str, str]:
    """The string metadata stored in a shipped weight file's header (load_weights checks the file)."""
    from safetensors import safe_open

    load_weights(name)
    with safe_open(weights_file(name), "pt") as handle:
        return dict(handle.metadata() or {})


def available(name: str) -> bool:
    return weights_file(name).is_file() and card_file(name).is_file()
