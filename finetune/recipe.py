"""What every training recipe in finetune/ shares: dataclass arguments on the command line, a fixed
seed, an accelerate Accelerator (CPU here; one or many GPUs elsewhere), resumable checkpoints, and
shipping the result as safetensors with a model card that states data, command, scores and sha256.

A recipe is a module with a config dataclass (subclass of RecipeConfig) and `main(argv)`:

    config = parse_config(LocaliserConfig, argv)
    accelerator = start(config)
    checkpoints = Checkpoints(config.out)
    state = checkpoints.load()  # None on a fresh run
    ...
    ship_weights("localiser", model.state_dict(), card=..., config=config, scores={...})
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from experts.learned import WEIGHTS_DIR, card_file, file_sha256, weights_file

C = TypeVar("C", bound="RecipeConfig")


@dataclasses.dataclass
class RecipeConfig:
    out: str = "runs/recipe"  # checkpoints, logs and previews
    seed: int = 0
    resume: bool = True  # continue from the latest checkpoint in `out` when there is one
    ship: bool = True  # write the final weights and model card into experts/weights/
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


def parse_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """An argparse parser built from the dataclass fields: `--field value`, booleans as
    `--field / --no-field`, tuples as comma-separated values."""
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        if hint is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(
                flag,
                default=default,
                type=lambda text, item=item: tuple(item(v) for v in text.split(",") if v),
                help=f"comma-separated (default {','.join(map(str, default))})",
            )
        else:
            parser.add_argument(flag, default=default, type=hint, help=f"default {default}")
    return cls(**vars(parser.parse_args(argv)))


def start(config: RecipeConfig):
    """Seed everything, set threads, make the output folder; return an accelerate Accelerator."""
    from accelerate import Accelerator

    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return Accelerator(cpu=not torch.cuda.is_available())


class Checkpoints:
    """`out/checkpoint.pt` (or another name, for a recipe's second stage), written atomically: model,
    optimiser, step and anything else the recipe needs to resume exactly where it stopped."""

    def __init__(self, out: str | Path, name: str = "checkpoint.pt") -> None:
        self.path = Path(out) / name

    def save(self, **state: Any) -> None:
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)

    def load(self, resume: bool = True) -> dict[str, Any] | None:
        if not resume or not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys. safetensors writes its metadata in
    a random order per process, so the same tensors gave a new sha256 on every run of a recipe; with
    the header canonical, a recipe that reproduces its tensors reproduces the file byte for byte."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8 bytes
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size :])


def ship_weights(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    card: str,
    config: RecipeConfig,
    scores: Mapping[str, Any],
    command: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write experts/weights/<name>.safetensors and its model card <name>.md (the card's text, then
    the command, configuration, scores, size and sha256 that experts.learned checks on load)."""
    from safetensors.torch import save_file

    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    path = weights_file(name)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    save_file(tensors, path, metadata={"name": name, **(metadata or {})})
    canonical_header(path)
    path.chmod(0o644)  # safetensors writes owner-only files; a shipped file must be readable by all
    parameters = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    command = command or "python -m " + shlex.join([_module_name(), *sys.argv[1:]])
    lines = [
        card.strip(),
        "",
        "## Produced by",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d')}, device: "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}.",
        "",
        "```json",
        json.dumps(dataclasses.asdict(config), indent=2),
        "```",
        "",
        "## Scores",
        "",
        *[f"- {key}: {value}" for key, value in scores.items()],
        "",
        "## File",
        "",
        f"- `{path.name}`: {path.stat().st_size:,} bytes, {parameters:,} parameters",
        f"- sha256: {file_sha256(path)}",
        "",
    ]
    card_file(name).write_text("\n".join(lines), encoding="utf-8")
    return path


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem
