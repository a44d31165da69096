"""The training data: rows of ../shared/data/manifest.csv by dataset, split and label, read as RGB
uint8 arrays (masks as bool). Splits are used as given: train on `train`, tune on `val`, never `test`
(../shared/data/README.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.evaluate import EvalItem, default_manifest, read_manifest


def manifest_items(
    datasets: Sequence[str],
    split: str,
    labels: Sequence[str] | None = None,
    manifest: Path | None = None,
) -> list[EvalItem]:
    """Manifest rows of these datasets and split (and labels, when given), in manifest order."""
    if split == "test":
        raise ValueError("training recipes never read the test split")
    items = read_manifest(manifest or default_manifest(), split=split, datasets=list(datasets))
    return [item for item in items if labels is None or item.label in labels]


def read_rgb(path: Path | str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mask(path: Path | str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as bool, resized (nearest) to (height, width) when the image differs."""
    with Image.open(path) as image:
        mask = image.convert("L")
        if shape and mask.size != (shape[1], shape[0]):
            mask = mask.resize((shape[1], shape[0]), Image.NEAREST)
        return np.asarray(mask) > 127


def hash_fold(key: str, folds: int) -> int:
    """A fold in [0, folds) that depends only on `key`: the same on every run and machine."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % folds


def fold_of(item: EvalItem, folds: int) -> int:
    """The cross-fitting fold of a manifest row, by its group (a source photo and the forgeries made
    from it fall in the same fold)."""
    return hash_fold(item.group or item.path, folds)


def parse_fold(text: str) -> tuple[int, int]:
    """'k/K' -> (k, K), with 0 <= k < K."""
    fold, _, folds = text.partition("/")
    k, n = int(fold), int(folds)
    if not 0 <= k < n:
        raise ValueError(f"a fold is 'k/K' with 0 <= k < K, not {text!r}")
    return k, n
