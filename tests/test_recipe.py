"""The recipes' shared plumbing: a shipped weights file is the same bytes whenever its tensors are."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.recipe import canonical_header

TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([1.5, -2.0])}
METADATA = {"name": "example", "notes": "{}", "experts": '["ela"]', "pixel_experts": "[]"}


def with_header_reordered(path) -> None:
    """The same file with its header's keys in reverse order, as another process may write it."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header = {k: header[k] for k in reversed(header)}
    header["__metadata__"] = {k: header["__metadata__"][k] for k in reversed(header["__metadata__"])}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])


def test_a_canonical_header_makes_the_same_tensors_the_same_bytes(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file(TENSORS, first, metadata=METADATA)
    save_file(TENSORS, second, metadata=METADATA)
    with_header_reordered(second)
    assert first.read_bytes() != second.read_bytes()
    canonical_header(first)
    canonical_header(second)
    assert first.read_bytes() == second.read_bytes()
    with safe_open(str(first), "pt") as stored:  # still a valid file with the same content
        assert stored.metadata() == METADATA
        assert set(stored.keys()) == set(TENSORS)
        for key, value in TENSORS.items():
            assert torch.equal(stored.get_tensor(key), value)
