"""`forensics chat [IMAGE] [QUESTION] [--out DIR]`: ask the assistant about an image.

With no IMAGE, it asks about the built-in example splice. The answer's verdict and probability come
from the experts' fusion; the text is checked against them before it is printed. With --out, writes
DIR/answer.json (text, verdict, tool_calls, fallback, corrected, model, masks) and the mask PNGs
beside it. --interactive keeps the conversation going: type follow-ups ("why?", "show me the noise
map"), an empty line ends it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from assistant.report import driver_record, heatmap_png, mask_png
from experts.base import ForensicsError, Verdict
from experts.image import load_image

DEFAULT_QUESTION = "Is this image fake?"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("image", nargs="?", metavar="IMAGE", help="the image (default: a built-in example)")
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION, metavar="QUESTION")
    parser.add_argument("--out", type=Path, help="write answer.json and the masks here")
    parser.add_argument("--model", help="a local transformers model folder (default: the embedded model)")
    parser.add_argument("--adapter", help="a LoRA adapter folder for --model")
    parser.add_argument("--json", action="store_true", help="print answer.json to stdout")
    parser.add_argument("--stream", action="store_true", help="show the model's raw tokens and tool calls")
    parser.add_argument("-i", "--interactive", action="store_true", help="ask follow-up questions")


def run(args: argparse.Namespace) -> int:
    from assistant.api import ForensicsAssistant

    try:
        source, name = _image(args.image)
        source = load_image(source, name=name)  # a bad file fails before the model loads
        bot = ForensicsAssistant.load(args.model, adapter=args.adapter)
        question, images = args.question, [source]
        turn = 0
        while question:
            answer = bot.chat(question, images=images, on_event=_printer(args.stream))
            images = []
            record = answer_record(answer, name)
            if args.out:
                folder = args.out if turn == 0 else args.out / f"turn_{turn + 1}"
                record = write_answer(answer, record, folder)
            if args.json:
                print(json.dumps(record, indent=2, ensure_ascii=False))
            else:
                print(_render(answer))
            turn += 1
            question = _next_question() if args.interactive else ""
    except ForensicsError as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return 1
    return 0


def _image(path: str | None) -> tuple[object, str]:
    if path:
        return path, path
    from experts.samples import splice

    sample = splice()
    return sample.data, f"example:{sample.name}"


def _printer(stream: bool):
    def show(event) -> None:
        if event.kind == "token":
            print(event.data, end="", flush=True, file=sys.stderr)
        elif event.kind == "tool_call_started":
            print(f"\n[tool] {event.data.name}({json.dumps(event.data.arguments)})", file=sys.stderr)

    return show if stream else None


def _next_question() -> str:
    try:
        return input("\nfollow-up (empty line to stop)> ").strip()
    except EOFError:
        return ""


def _render(answer) -> str:
    lines = [answer.text]
    if answer.verdict:
        lines.append(
            f"\n[verdict: {answer.verdict.label}, P(not authentic) = {answer.verdict.probability:.2f}"
            + (" · the model's own answer was corrected" if answer.corrected else "")
            + (" · triage plan used" if answer.fallback else "")
            + "]"
        )
    return "\n".join(lines)


def verdict_record(verdict: Verdict | None, where: list[str], mask_file: str | None) -> dict | None:
    """The verdict as in the report contract."""
    if verdict is None:
        return None
    return {
        "label": verdict.label,
        "probability": verdict.probability,
        "uncertain_band": list(verdict.uncertain_band),
        "rule": verdict.rule,
        "drivers": [driver_record(d) for d in verdict.drivers],
        "mask": mask_file,
        "where": where,
    }


def answer_record(answer, image_name: str) -> dict:
    """answer.json without files (masks are listed by name once written)."""
    info = answer.model
    return {
        "schema": "forensics-answer/1",
        "image": image_name,
        "text": answer.text,
        "verdict": verdict_record(answer.verdict, answer.where, None),
        "tool_calls": [
            {"name": r.name, "arguments": r.arguments, "valid": r.valid, "error": r.error, "source": r.source}
            for r in answer.tool_calls
        ],
        "fallback": answer.fallback,
        "corrected": answer.corrected,
        "problems": list(answer.problems),
        "model": {"backend": info.backend, "base_model": info.base_model, "adapter": info.adapter},
        "masks": [],
    }


def write_answer(answer, record: dict, folder: Path) -> dict:
    """Write answer.json, masks/<name>.png and heatmaps/<name>.png into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = []
    for name, mask in answer.masks.items():
        file = f"masks/{name}.png"
        _save(mask_png(mask), folder / file)
        masks.append(file)
    for name, heatmap in answer.heatmaps.items():
        _save(heatmap_png(heatmap), folder / f"heatmaps/{name}.png")
    record = {**record, "masks": masks}
    if record["verdict"] is not None and "fused" in answer.masks:
        record["verdict"] = {**record["verdict"], "mask": "masks/fused.png"}
    (folder / "answer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return record


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, "PNG", compress_level=1)
