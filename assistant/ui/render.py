"""What the app shows, as plain values: the verdict badge and the evidence panel (HTML strings), the
annotated image (the image with the fused and per-expert masks as labelled regions), the tool steps
as collapsible chat messages, and the downloadable report. No gradio here except the message type,
so each piece is tested on its own."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from assistant.report import heatmap_png, report_dict, where_phrases, write_report
from experts.base import Analysis, Evidence, Verdict
from experts.fusion import MASK_MIN_SCORE
from experts.image import LoadedImage, orient

LABEL_TEXT = {
    "authentic": "Authentic",
    "manipulated": "Manipulated",
    "ai_generated": "AI-generated",
    "uncertain": "Uncertain",
}
FUSED_LABEL = "fused mask (verdict)"
TOOL_MARK, FAILED_MARK, WARNING_MARK = "⚙", "✗", "⚠"
# Colours of the annotated image's regions: the verdict's mask in red, each expert's in its own colour.
MASK_OPACITY, HEATMAP_OPACITY = 0.55, 0.7
MASK_COLOURS = ("#e53935", "#1e88e5", "#fdd835", "#8e24aa", "#00897b", "#fb8c00", "#6d4c41", "#3949ab")

CSS = """
.forensics-badge{display:flex;align-items:center;gap:1rem;padding:1rem 1.2rem;border-radius:14px;
  background:var(--block-background-fill);border:1px solid var(--border-color-primary)}
.forensics-badge .pill{padding:.35rem .9rem;border-radius:999px;color:#fff;font-weight:700;
  letter-spacing:.02em;font-size:1.05rem;white-space:nowrap}
.forensics-badge .pill.authentic{background:#2e7d32}
.forensics-badge .pill.uncertain{background:#f9a825;color:#222}
.forensics-badge .pill.manipulated,.forensics-badge .pill.ai_generated{background:#c62828}
.forensics-badge .pill.none{background:#78909c}
.forensics-badge .numbers{flex:1;min-width:0}
.forensics-badge .prob{font-size:1.5rem;font-weight:700;line-height:1.1}
.forensics-badge .sub{font-size:.85rem;opacity:.75}
.forensics-badge .bar{position:relative;height:8px;border-radius:4px;margin-top:.45rem;
  background:linear-gradient(90deg,#2e7d32 0%,#2e7d32 35%,#f9a825 35%,#f9a825 65%,#c62828 65%,#c62828 100%)}
.forensics-badge .bar .tick{position:absolute;top:-4px;width:4px;height:16px;border-radius:2px;
  background:var(--body-text-color);transform:translateX(-2px)}
.forensics-evidence table{width:100%;border-collapse:collapse;font-size:.9rem}
.forensics-evidence th{text-align:left;font-weight:600;opacity:.7;padding:.3rem .4rem}
.forensics-evidence td{border-top:1px solid var(--border-color-primary);padding:.45rem .4rem;
  vertical-align:top}
.forensics-evidence td.score{font-variant-numeric:tabular-nums;font-weight:700;white-space:nowrap}
.forensics-evidence .meter{height:5px;border-radius:3px;background:var(--border-color-primary);
  margin-top:.25rem;width:3.5rem}
.forensics-evidence .meter span{display:block;height:100%;border-radius:3px}
.forensics-evidence img{width:96px;border-radius:6px;display:block}
.forensics-evidence .na{opacity:.55}
.forensics-empty{opacity:.6;font-size:.9rem;padding:.6rem}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def verdict_badge(verdict: Verdict | None, where: Sequence[str] = ()) -> str:
    """The verdict as a coloured badge with the calibrated probability and the uncertain band."""
    if verdict is None:
        return (
            '<div class="forensics-badge" id="verdict-badge" data-label="none"><span class="pill none">'
            'No verdict yet</span><div class="numbers"><div class="sub">Upload an image and ask: the '
            "verdict and its probability appear here.</div></div></div>"
        )
    low, high = verdict.uncertain_band
    place = "; ".join(where) if where else "no localised region"
    return (
        f'<div class="forensics-badge" id="verdict-badge" data-label="{_esc(verdict.label)}" '
        f'data-probability="{verdict.probability:.4f}">'
        f'<span class="pill {_esc(verdict.label)}">{_esc(LABEL_TEXT.get(verdict.label, verdict.label))}'
        "</span>"
        f'<div class="numbers"><div class="prob">{verdict.probability:.0%}</div>'
        f'<div class="sub">probability that the image is not authentic (uncertain between {low:.0%} '
        f"and {high:.0%})</div>"
        f'<div class="bar"><span class="tick" style="left:{verdict.probability * 100:.1f}%"></span></div>'
        f'<div class="sub" style="margin-top:.35rem">Where: {_esc(place)}</div></div></div>'
    )


def _thumbnail(array: np.ndarray, side: int = 192) -> str:
    image = Image.fromarray(array)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _score_colour(score: float) -> str:
    return "#c62828" if score >= 0.65 else "#f9a825" if score >= 0.35 else "#2e7d32"


def evidence_panel(analysis: Analysis | None, image: LoadedImage | None = None) -> str:
    """One row per expert: its score (with a meter), its summary and its heatmap."""
    if analysis is None:
        return '<div class="forensics-empty">The evidence of each expert appears here after a question.</div>'
    rows = []
    orientation = image.orientation if image is not None else 1
    for item in sorted(analysis.evidence, key=lambda e: -(e.score if e.score is not None else -1)):
        if item.score is None or not item.applicable:
            score = '<span class="na">n/a</span>'
        else:
            score = (
                f'{item.score:.2f}<div class="meter"><span style="width:{item.score * 100:.0f}%;'
                f'background:{_score_colour(item.score)}"></span></div>'
            )
        heatmap = (
            f'<img src="{_thumbnail(heatmap_png(orient(item.heatmap, orientation)))}" '
            f'alt="{_esc(item.expert)} heatmap">'
            if item.heatmap is not None
            else ""
        )
        rows.append(
            f'<tr data-expert="{_esc(item.expert)}"><td><b>{_esc(item.expert)}</b></td>'
            f'<td class="score">{score}</td><td>{_esc(item.summary)}</td><td>{heatmap}</td></tr>'
        )
    return (
        '<div class="forensics-evidence"><table><tr><th>expert</th><th>score</th><th>what it found</th>'
        f"<th>heatmap</th></tr>{''.join(rows)}</table></div>"
    )


def annotated_image(
    analysis: Analysis,
    image: LoadedImage,
    masks: dict[str, np.ndarray] | None = None,
    heatmaps: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """The value of gr.AnnotatedImage: the image as a viewer sees it and labelled, half-transparent
    regions the person can pick out from the legend: any heatmap the answer showed, the masks of the
    experts whose score counts, and on top the verdict's fused mask. (Every expert's heatmap is in the
    evidence panel; all of them at once over the image would hide it.)"""
    layers: list[tuple[np.ndarray, str]] = []
    strong = [
        e for e in analysis.evidence if e.applicable and e.score is not None and e.score >= MASK_MIN_SCORE
    ]

    def add(array: np.ndarray | None, label: str, opacity: float) -> None:
        if array is None or not np.any(array) or any(existing == label for _, existing in layers):
            return
        layers.append((orient(array, image.orientation).astype(np.float32) * opacity, label))

    for name, heatmap in (heatmaps or {}).items():
        add(heatmap, f"{name} heatmap", HEATMAP_OPACITY)
    for name, mask in [*((e.expert, e.mask) for e in strong), *(masks or {}).items()]:
        if name != "fused":
            add(mask, f"{name} mask", MASK_OPACITY)
    add(analysis.verdict.mask, FUSED_LABEL, MASK_OPACITY)
    return image.display, layers


def colour_map(regions: Sequence[tuple[np.ndarray, str]]) -> dict[str, str]:
    """Red for the verdict's mask; the experts' layers in other colours."""
    others = iter(MASK_COLOURS[1:] * 4)
    return {label: MASK_COLOURS[0] if label == FUSED_LABEL else next(others) for _, label in regions}


def tool_title(name: str | None, arguments: Any) -> str:
    """A tool step's title, e.g. "⚙ noise (image_1)" (symbols that DejaVu Sans has: no emoji font
    is needed)."""
    arguments = arguments if isinstance(arguments, dict) else {}
    shown = ", ".join(
        str(v) if k in ("image", "expert") else f"{k}={json.dumps(v)}" for k, v in arguments.items()
    )
    return f"{TOOL_MARK} {name or 'unknown tool'}" + (f" ({shown})" if shown else "")


def tool_log(evidence: Sequence[Evidence], observation: str, error: str | None) -> str:
    """The body of a finished tool step: its error, or each expert's score and summary."""
    if error:
        return f"{WARNING_MARK} {error}"
    if evidence:
        return "\n".join(
            f"- **{e.expert}** ({'n/a' if e.score is None else f'{e.score:.2f}'}): {e.summary}"
            for e in evidence
        )
    return observation


def answer_footer(answer: Any) -> str:
    """How the answer was made, in one line under it."""
    notes = []
    if answer.verdict is not None:
        notes.append(
            f"verdict **{answer.verdict.label}**, P(not authentic) = {answer.verdict.probability:.2f}"
        )
    if answer.corrected:
        notes.append(
            "the model's own wording did not match the evidence, so this answer was composed from it"
        )
    if answer.fallback:
        notes.append("the triage plan chose the tools")
    return f"\n\n<sub>{' · '.join(notes)}</sub>" if notes else ""


def report_files(analysis: Analysis, image: LoadedImage, folder: Path) -> list[str]:
    """report.json and the self-contained report.html (images inlined as base64) for download."""
    write_report(analysis, image, folder)
    return [str(folder / "report.json"), str(folder / "report.html")]


def analysis_record(analysis: Analysis, image: LoadedImage) -> dict[str, Any]:
    """The report dict (forensics-report/1) without files: what the HTTP API returns."""
    return report_dict(analysis, image)


def where(analysis: Analysis, image: LoadedImage) -> list[str]:
    return where_phrases(analysis.verdict.mask, image.orientation)
