"""The product around the experts: analysis, reports, evaluation and the `forensics` CLI."""

from assistant.analysis import analyze

__all__ = ["analyze"]
