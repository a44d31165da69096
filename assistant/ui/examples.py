"""The app's example images: the built-in examples (experts/samples.py, made from scikit-image's
photos) written once to files, each with a question and what the right answer is."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from experts.samples import SAMPLES

QUESTIONS = {
    "authentic": "Is this image fake?",
    "splice": "Was this photo edited? Show me where.",
    "copy_move": "Is anything in this picture duplicated?",
}
TITLES = {
    "authentic": "Untouched photo",
    "splice": "Splice: a cat's head pasted in",
    "copy_move": "Copy-move: the rocket duplicated",
}


@dataclass(frozen=True)
class Example:
    name: str
    path: Path
    question: str
    truth: str  # "authentic" or "manipulated": how the example was made
    description: str

    @property
    def label(self) -> str:
        return f"{TITLES.get(self.name, self.name)} (truth: {self.truth})"


@cache
def examples(folder: Path | None = None) -> tuple[Example, ...]:
    """The examples as files in `folder` (default: a temporary folder kept for the process)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="forensics-examples-"))
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for key, make in SAMPLES.items():
        sample = make()
        path = folder / sample.name
        if not path.exists():
            path.write_bytes(sample.data)
        truth = "manipulated" if sample.mask.any() else "authentic"
        made.append(Example(key, path, QUESTIONS.get(key, "Is this image fake?"), truth, sample.description))
    return tuple(made)
