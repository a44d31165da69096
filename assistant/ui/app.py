"""The Gradio chat app: `build_app()` returns the Blocks, `launch()` serves them (127.0.0.1 unless
told otherwise; a public share link only with share=True).

Layout: the chat (upload or paste an image, ask in words; each tool step is a collapsible message
with its status; the answer streams), and beside it the verdict badge, the image with the masks as
labelled regions (toggle them from the legend) and the report downloads; under them the evidence
panel (one row per expert) and the settings (model path, experts).

Named API endpoints for programmatic use (gradio_client; docs/INTEGRATIONS.md):
  /chat     (image, question, experts) -> answer JSON; follow-ups keep each client's conversation
  /analyze  (image, experts)           -> the report JSON (experts and fusion, no language model)
  /reset    ()                         -> starts a new conversation
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from assistant.agent import Answer, Event
from assistant.ui.examples import examples
from assistant.ui.render import (
    CSS,
    FAILED_MARK,
    TOOL_MARK,
    WARNING_MARK,
    analysis_record,
    annotated_image,
    answer_footer,
    colour_map,
    evidence_panel,
    report_files,
    tool_log,
    tool_title,
    verdict_badge,
    where,
)
from assistant.ui.session import EMBEDDED, Session, SharedModels, analyze_locked
from experts.base import ForensicsError, InvalidImageError
from experts.image import DEFAULT_MAX_BYTES, load_image
from experts.registry import available_experts, expert_class

log = logging.getLogger(__name__)

TITLE = "Image forensics assistant"
DEFAULT_QUESTION = "Is this image fake?"
INTRO = (
    "Upload or paste an image and ask, e.g. *Is this image fake?*, *Show me the noise map* or *why?*. "
    "Experts measure, a calibrated fusion decides, and the language model explains; every answer is "
    "checked against the evidence."
)
SESSION_SECONDS = 3600  # a session's state is dropped an hour after its last use
REFRESH_SECONDS = 0.15  # how often streamed tokens are pushed to the browser


def _file_path(item: Any) -> str | None:
    if isinstance(item, dict):
        return item.get("path")
    return getattr(item, "path", None) or (str(item) if item else None)


def _close(session: Session | None) -> None:
    if session is not None:
        session.close()


class ChatApp:
    """The handlers behind the UI and the API; one instance serves every session."""

    def __init__(self, models: SharedModels, model: str | None = None, experts: list[str] | None = None):
        self.models = models
        self.default_model = model or EMBEDDED
        self.default_experts = list(experts or available_experts())

    # -- the chat -----------------------------------------------------------------------------------

    def respond(
        self,
        message: dict | str | None,
        history: list[dict],
        session: Session | None,
        model: str,
        experts: list[str],
    ) -> Iterator[tuple]:
        """One chat turn, streamed: (history, textbox, badge, annotated image, evidence, files, session)."""
        session = session or Session()
        history = list(history or [])
        message = message if isinstance(message, dict) else {"text": message or "", "files": []}
        question = (message.get("text") or "").strip()
        files = [p for p in (_file_path(f) for f in message.get("files") or ()) if p]
        for path in files:
            history.append({"role": "user", "content": {"path": path}})
        if question:
            history.append({"role": "user", "content": question})
        skip = gr.skip()
        if not files and not question:
            yield history, None, skip, skip, skip, skip, session
            return
        question = question or DEFAULT_QUESTION
        history.append(
            {
                "role": "assistant",
                "content": "",
                "metadata": {"title": "Reading and analysing the image", "status": "pending"},
            }
        )
        yield history, None, skip, skip, skip, skip, session
        try:
            bot = session.ensure(self.models, model or self.default_model, experts or self.default_experts)
            images = []
            for path in files:
                _, image = session.add_image(path, name=Path(path).name)
                images.append(image)
        except InvalidImageError as exc:
            history[-1] = {
                "role": "assistant",
                "content": f"{WARNING_MARK} I could not read that file. {exc}",
            }
            yield history, None, skip, skip, skip, skip, session
            return
        except (ForensicsError, OSError, ValueError) as exc:
            log.warning("the session could not start: %s", exc)
            history[-1] = {"role": "assistant", "content": f"{WARNING_MARK} {exc}"}
            yield history, None, skip, skip, skip, skip, session
            return
        history.pop()
        yield from self._turn(bot, session, question, images, history)

    def _turn(
        self, bot, session: Session, question: str, images: list, history: list[dict]
    ) -> Iterator[tuple]:
        events: queue.Queue[Event | BaseException | None] = queue.Queue()

        def work() -> None:
            try:
                bot.chat(question, images=images, on_event=events.put)
            except BaseException as exc:  # shown to the person, not lost in a thread
                events.put(exc)
            finally:
                events.put(None)

        threading.Thread(target=work, daemon=True, name="forensics-turn").start()
        skip = gr.skip()
        draft: dict[str, Any] = {"role": "assistant", "content": ""}
        history.append(draft)
        steps: dict[str, tuple[dict, float]] = {}
        answer: Answer | None = None
        last_push = 0.0
        while True:
            event = events.get()
            if event is None:
                break
            if isinstance(event, BaseException):
                log.error("the turn failed", exc_info=event)
                draft["content"] = f"{WARNING_MARK} The assistant failed: {event}"
                continue
            if event.kind == "token":
                draft["content"] += event.data
                visible = _without_tool_calls(draft["content"])
                if time.monotonic() - last_push > REFRESH_SECONDS:
                    last_push = time.monotonic()
                    yield self._streaming(history, draft, visible), None, skip, skip, skip, skip, session
            elif event.kind == "tool_call_started":
                call = event.data
                step = {
                    "role": "assistant",
                    "content": "running…",
                    "metadata": {"title": tool_title(call.name, call.arguments), "status": "pending"},
                }
                history.insert(history.index(draft), step)
                steps[call.id] = (step, time.monotonic())
                draft["content"] = ""
                yield history, None, skip, skip, skip, skip, session
            elif event.kind == "tool_call_finished":
                record = event.data
                step, started = steps.pop(record.id, (None, time.monotonic()))
                if step is None:  # an invalid call: it never started
                    step = {
                        "role": "assistant",
                        "metadata": {"title": tool_title(record.name, record.arguments)},
                    }
                    history.insert(history.index(draft), step)
                step["content"] = tool_log(record.evidence, record.observation, record.error)
                step["metadata"] = {
                    **step["metadata"],
                    "status": "done",
                    "duration": round(time.monotonic() - started, 2),
                    "log": "failed" if record.error else ("triage plan" if record.source == "triage" else ""),
                }
                if record.error and not record.valid:
                    step["metadata"]["title"] = FAILED_MARK + step["metadata"]["title"].removeprefix(
                        TOOL_MARK
                    )
                yield history, None, skip, skip, skip, skip, session
            elif event.kind == "answer":
                answer = event.data
        for step, _ in steps.values():  # a step whose end never came
            step["metadata"]["status"] = "done"
        if answer is None:
            history[history.index(draft)] = {
                "role": "assistant",
                "content": draft["content"] or f"{WARNING_MARK} No answer.",
            }
            yield history, None, skip, skip, skip, skip, session
            return
        draft["content"] = answer.text + answer_footer(answer)
        session.last_image = answer.image_id
        shown = session.analysis(answer.image_id)
        if shown is None:
            yield history, None, verdict_badge(None), None, evidence_panel(None), None, session
            return
        analysis, image = shown
        value = annotated_image(analysis, image, answer.masks, answer.heatmaps)
        files = report_files(analysis, image, session.folder / (answer.image_id or "image"))
        yield (
            history,
            None,
            verdict_badge(analysis.verdict, where(analysis, image)),
            gr.update(value=value, color_map=colour_map(value[1])),
            evidence_panel(analysis, image),
            files,
            session,
        )

    @staticmethod
    def _streaming(history: list[dict], draft: dict, visible: str) -> list[dict]:
        shown = list(history)
        shown[shown.index(draft)] = {"role": "assistant", "content": visible or "…"}
        return shown

    def reset(self, session: Session | None) -> tuple:
        if session is not None:
            session.reset()
        return [], None, verdict_badge(None), None, evidence_panel(None), None, session

    # -- the HTTP API -------------------------------------------------------------------------------

    def api_chat(self, image: str | None, question: str, experts: str, session: Session | None) -> tuple:
        """Ask about an image (or a follow-up about the last one): the answer as JSON."""
        session = session or Session()
        chosen = _expert_names(experts) or self.default_experts
        try:
            bot = session.ensure(self.models, self.default_model, chosen)
            images = []
            if image:
                images.append(session.add_image(image, name=Path(image).name)[1])
            answer = bot.chat((question or "").strip() or DEFAULT_QUESTION, images=images)
        except ForensicsError as exc:
            return {"error": str(exc)}, session
        session.last_image = answer.image_id
        result = answer_json(answer)
        if answer.image_id is not None:
            image = bot.conversation.images[answer.image_id]
            result["image"] = {"name": image.source, "sha256": image.sha256}
        return result, session

    def api_analyze(self, image: str | None, experts: str) -> dict:
        """The report of an image (experts and fusion; no language model)."""
        if not image:
            return {"error": "no image given: pass a file (gradio_client.handle_file(path))"}
        try:
            loaded = load_image(image, name=Path(image).name)
            analysis = analyze_locked(loaded, _expert_names(experts) or self.default_experts)
        except ForensicsError as exc:
            return {"error": str(exc)}
        return analysis_record(analysis, loaded)

    def api_reset(self, session: Session | None) -> tuple[str, Session | None]:
        if session is not None:
            session.reset()
        return "ok", session


def _expert_names(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        expert_class(name)  # UnknownExpertError names the registered ones
    return names


def _without_tool_calls(text: str) -> str:
    """The streamed draft without tool-call markup (a call shows as its own step)."""
    start = text.find("<tool_call>")
    return text if start < 0 else text[:start].rstrip()


def answer_json(answer: Answer) -> dict:
    """What /chat returns."""
    verdict = answer.verdict
    return {
        "text": answer.text,
        "image_id": answer.image_id,
        "verdict": None
        if verdict is None
        else {
            "label": verdict.label,
            "probability": verdict.probability,
            "uncertain_band": list(verdict.uncertain_band),
            "rule": verdict.rule,
            "where": answer.where,
        },
        "experts": {e.expert: e.score for e in answer.evidence},
        "tool_calls": [
            {"name": r.name, "arguments": r.arguments, "valid": r.valid} for r in answer.tool_calls
        ],
        "fallback": answer.fallback,
        "corrected": answer.corrected,
        "model": answer.model.base_model,
    }


def build_app(
    models: SharedModels | None = None, model: str | None = None, experts: list[str] | None = None
) -> gr.Blocks:
    """The app's Blocks. `models` is shared by every session (default: load backends on first use)."""
    handlers = ChatApp(models or SharedModels(), model, experts)
    chosen = handlers.default_experts
    with gr.Blocks(title=TITLE, fill_width=True, analytics_enabled=False) as demo:
        session = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=_close)
        gr.Markdown(f"## {TITLE}\n{INTRO}")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=560,
                    elem_id="chat",
                    placeholder="**Ask about an image.** Drop, paste or upload one below, or try an example.",
                    buttons=["copy"],
                    feedback_options=None,
                )
                textbox = gr.MultimodalTextbox(
                    file_types=["image", ".heic", ".heif"],  # browsers do not all call HEIC an image
                    file_count="single",
                    placeholder="Upload or paste an image, then ask (Enter sends)…",
                    show_label=False,
                    sources=["upload"],
                    elem_id="ask",
                )
                made = examples()
                gr.Examples(
                    examples=[{"text": e.question, "files": [str(e.path)]} for e in made],
                    inputs=textbox,
                    example_labels=[e.label for e in made],
                    label="Examples (made by the project from scikit-image's photos)",
                )
            with gr.Column(scale=4):
                badge = gr.HTML(verdict_badge(None), elem_id="verdict")
                annotated = gr.AnnotatedImage(
                    label="Where: masks over the image (click a legend entry to highlight it)",
                    elem_id="masks",
                    height=380,
                    format="png",
                )
                downloads = gr.File(label="Report (JSON and a self-contained HTML page)", elem_id="report")
        with gr.Accordion("Evidence: what each expert found", open=True):
            evidence = gr.HTML(evidence_panel(None), elem_id="evidence")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                model_box = gr.Textbox(
                    value="" if handlers.default_model == EMBEDDED else handlers.default_model,
                    label="Model",
                    info="Empty: the embedded offline model. Or a local transformers model folder.",
                    placeholder=EMBEDDED,
                )
                reset = gr.Button("New conversation", variant="secondary", scale=0)
            experts_box = gr.CheckboxGroup(
                choices=[(f"{n}: {expert_class(n).description}", n) for n in available_experts()],
                value=chosen,
                label="Experts that run",
            )
        outputs = [chatbot, textbox, badge, annotated, evidence, downloads, session]
        textbox.submit(
            handlers.respond,
            [textbox, chatbot, session, model_box, experts_box],
            outputs,
            api_visibility="private",
            concurrency_limit=8,
            concurrency_id="turns",
        )
        # Named, so that the page's own reset does not take "reset" from the HTTP API's endpoint.
        reset.click(handlers.reset, [session], outputs, api_name="reset_page", api_visibility="private")

        # The HTTP API: hidden components, named endpoints.
        with gr.Group(visible=False):
            api_image = gr.File(label="image", type="filepath")
            api_question = gr.Textbox(label="question")
            api_experts = gr.Textbox(label="experts", info="comma-separated; empty: all")
            api_result = gr.JSON(label="result")
            api_status = gr.Textbox(label="status")
            api_chat, api_analyze, api_reset = gr.Button(), gr.Button(), gr.Button()
        api_chat.click(
            handlers.api_chat,
            [api_image, api_question, api_experts, session],
            [api_result, session],
            api_name="chat",
            api_description="Ask about an image (or a follow-up without one); the answer as JSON.",
            concurrency_limit=8,
            concurrency_id="turns",
        )
        api_analyze.click(
            handlers.api_analyze,
            [api_image, api_experts],
            api_result,
            api_name="analyze",
            api_description="The forensic report of an image (experts and fusion, no language model).",
            concurrency_limit=4,
        )
        api_reset.click(handlers.api_reset, [session], [api_status, session], api_name="reset")
    return demo


def theme() -> gr.themes.Base:
    # System fonts only: the app works offline, so nothing may come from a font CDN.
    return gr.themes.Soft(
        primary_hue="indigo",
        neutral_hue="slate",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def launch(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> tuple[Any, str]:
    """Serve the app; returns (server app, local URL). block=False returns at once (tests)."""
    demo.queue(default_concurrency_limit=4)
    app, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=DEFAULT_MAX_BYTES,
        theme=theme(),
        css=CSS,
        footer_links=["api"],
        quiet=not block,
        ssr_mode=False,
    )
    return app, url
