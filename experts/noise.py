"""PLACEHOLDER being written by a helper: replace this whole file."""

from dataclasses import dataclass

from experts.base import Evidence, not_applicable


@dataclass(frozen=True)
class NoiseInconsistency:
    name = "noise"
    version = "0"
    description = "placeholder"

    def analyze(self, image) -> Evidence:
        return not_applicable(self.name, "placeholder")
