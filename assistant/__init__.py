"""The product around the experts: the assistant, analysis, reports, evaluation and the CLI."""

from assistant.analysis import analyze

__all__ = ["ForensicsAssistant", "analyze"]


def __getattr__(name: str):
    # ForensicsAssistant pulls in the agent and backends; `forensics analyze` should not pay for that.
    if name == "ForensicsAssistant":
        from assistant.api import ForensicsAssistant

        return ForensicsAssistant
    raise AttributeError(f"module 'assistant' has no attribute {name!r}")
