"""Every expert, the full analysis and the whole assistant as LangChain tools.

    from assistant.integrations.langchain_tools import forensics_tools
    tools = forensics_tools()       # per expert, analyze_image, ask_forensics_assistant
    message = tools[0].invoke({"name": "ela", "args": {"image": "photo.jpg"}, "id": "1", "type": "tool_call"})
    message.content                                 # what the model reads: score and summary
    message.artifact["mask"]                        # what the application gets: bool HxW numpy array

Arguments are typed (a pydantic args_schema per tool, generated from the expert's settings, like the
OpenAI schemas in assistant/tools.py). Results use response_format="content_and_artifact": the text
goes to the model, the masks and heatmaps (numpy arrays) and the Evidence / Analysis / Answer objects
go to the application. Text read from the image file (EXIF, XMP, C2PA) reaches the model only inside
an <untrusted-metadata> wrapper, as in the assistant's own prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field, create_model

from assistant.agent import observe_analysis, observe_evidence
from assistant.analysis import analyze
from assistant.integrations.inputs import IMAGE_ARGUMENT, open_image
from assistant.report import report_dict, where_phrases
from assistant.tools import expert_parameters
from experts.base import ForensicsError
from experts.registry import available_experts, expert_class
from experts.runner import run_expert

ANALYZE_TOOL = "analyze_image"
ASSISTANT_TOOL = "ask_forensics_assistant"
_PYTHON_TYPES: dict[str, Any] = {"boolean": bool, "integer": int, "number": float, "string": str}


def _python_type(schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    nullable = isinstance(kind, list) and "null" in kind
    kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
    if kind == "array":
        annotation: Any = list[_python_type(schema.get("items", {}))]
    else:
        annotation = _PYTHON_TYPES.get(kind, Any)
    return annotation | None if nullable else annotation


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def expert_args_schema(name: str) -> type[BaseModel]:
    """The pydantic model of an expert tool's arguments: the image, then the expert's settings with
    their types and defaults."""
    fields: dict[str, Any] = {"image": (str, Field(description=IMAGE_ARGUMENT))}
    for key, schema in expert_parameters(name).items():
        if "default" in schema:
            fields[key] = (_python_type(schema), Field(default=schema["default"]))
        else:
            fields[key] = (_python_type(schema), Field())
    return create_model(f"{_camel(name)}Args", **fields)


class AnalyzeArgs(BaseModel):
    image: str = Field(description=IMAGE_ARGUMENT)


class AskArgs(BaseModel):
    question: str = Field(description="The question about the image, e.g. 'Is this image fake?' or 'why?'.")
    image: str | None = Field(
        default=None, description=IMAGE_ARGUMENT + " Leave empty for a follow-up about the last image."
    )


def expert_tool(name: str) -> StructuredTool:
    """One expert as a LangChain tool; the artifact is {"evidence", "mask", "heatmap", "where"}."""

    def run(image: str, **settings: Any) -> tuple[str, dict[str, Any]]:
        try:
            loaded = open_image(image)
            defaults = {k: v.get("default") for k, v in expert_parameters(name).items()}
            changed = {k: v for k, v in settings.items() if k not in defaults or v != defaults[k]}
            evidence = run_expert(loaded, name, changed)
        except (ForensicsError, ValueError) as exc:
            raise ToolException(str(exc)) from exc
        where = where_phrases(evidence.mask, loaded.orientation)
        content = observe_evidence(evidence, loaded.source or "the image", where, changed or None)
        artifact = {"evidence": evidence, "mask": evidence.mask, "heatmap": evidence.heatmap, "where": where}
        return content.replace(_SHOW_MAP_HINT.format(name=name), "").strip(), artifact

    return StructuredTool.from_function(
        func=run,
        name=name,
        description=getattr(expert_class(name), "description", name),
        args_schema=expert_args_schema(name),
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


_SHOW_MAP_HINT = 'It has a map: show_map with expert "{name}" attaches it to the answer.'


def analyze_tool(experts: Iterable[str] | None = None) -> StructuredTool:
    """All experts and the fused verdict; the artifact is {"analysis", "report", "mask", "masks",
    "heatmaps"} (the report as in report.json, without files)."""
    names = list(experts) if experts is not None else None

    def run(image: str) -> tuple[str, dict[str, Any]]:
        try:
            loaded = open_image(image)
            analysis = analyze(loaded, names)
        except ForensicsError as exc:
            raise ToolException(str(exc)) from exc
        content = observe_analysis(analysis, loaded, loaded.source or "the image")
        artifact = {
            "analysis": analysis,
            "report": report_dict(analysis, loaded),
            "mask": analysis.verdict.mask,
            "masks": {e.expert: e.mask for e in analysis.evidence if e.mask is not None},
            "heatmaps": {e.expert: e.heatmap for e in analysis.evidence if e.heatmap is not None},
        }
        return content, artifact

    return StructuredTool.from_function(
        func=run,
        name=ANALYZE_TOOL,
        description="Run every forensic expert on an image and fuse their evidence into the verdict "
        "(authentic, manipulated, ai_generated or uncertain) with its calibrated probability and where the "
        "evidence is.",
        args_schema=AnalyzeArgs,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


def assistant_tool(assistant: Any = None, loader: Callable[[], Any] | None = None) -> StructuredTool:
    """The whole assistant (its own model, tools and checked answer) as one tool. `assistant` is a
    ForensicsAssistant, or it is built on first use by `loader` (default: ForensicsAssistant.load(),
    the embedded model). The conversation persists across calls, so follow-ups work. The artifact is
    {"answer", "verdict", "masks", "heatmaps"}."""
    holder: dict[str, Any] = {"bot": assistant}
    lock = threading.Lock()

    def bot() -> Any:
        with lock:
            if holder["bot"] is None:
                if loader is not None:
                    holder["bot"] = loader()
                else:
                    from assistant.api import ForensicsAssistant

                    holder["bot"] = ForensicsAssistant.load()
            return holder["bot"]

    def run(question: str, image: str | None = None) -> tuple[str, dict[str, Any]]:
        try:
            images = [open_image(image)] if image else []
            answer = bot().chat(question, images=images)
        except ForensicsError as exc:
            raise ToolException(str(exc)) from exc
        verdict = answer.verdict
        text = answer.text
        if verdict is not None:
            text += f"\n[fused verdict: {verdict.label}, P(not authentic) = {verdict.probability:.2f}]"
        artifact = {"answer": answer, "verdict": verdict, "masks": answer.masks, "heatmaps": answer.heatmaps}
        return text, artifact

    return StructuredTool.from_function(
        func=run,
        name=ASSISTANT_TOOL,
        description="Ask the image forensics assistant a question about an image; it runs its experts, "
        "fuses their evidence into a calibrated verdict and answers in words checked against that verdict.",
        args_schema=AskArgs,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


def forensics_tools(
    experts: Iterable[str] | None = None, assistant: Any = None, include_assistant: bool = True
) -> list[BaseTool]:
    """One tool per expert (default: all registered), analyze_image, and (unless include_assistant is
    False) ask_forensics_assistant, whose model loads on its first call."""
    names = list(available_experts() if experts is None else experts)
    tools: list[BaseTool] = [analyze_tool(names), *(expert_tool(name) for name in names)]
    if include_assistant:
        tools.append(assistant_tool(assistant))
    return tools


def langchain_tool_listing(experts: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """name, description and the JSON schema of the arguments of each tool (`forensics tools --format
    langchain`)."""
    return [
        {
            "name": tool.name,
            "description": tool.description,
            "args_schema": tool.tool_call_schema.model_json_schema(),
        }
        for tool in forensics_tools(experts)
    ]
