"""Analysis -> the report contract (ARCHITECTURE.md): report.json, mask.png, overlay.png,
heatmaps/<expert>.png, masks/<expert>.png and a self-contained report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from assistant.grounding import caveat_of
from experts.base import Analysis, Driver, Evidence
from experts.image import LoadedImage, orient

SCHEMA = "forensics-report/1"
_GRID = (
    ("upper-left", "top centre", "upper-right"),
    ("left", "centre", "right"),
    ("lower-left", "bottom centre", "lower-right"),
)


def where_phrases(mask: np.ndarray | None, orientation: int = 1, max_phrases: int = 3) -> list[str]:
    """Plain-language locations of the largest marked areas, as a viewer sees the image
    (EXIF orientation applied), e.g. "upper-left (about 9% of the image)"."""
    if mask is None or not mask.any():
        return []
    shown = orient(mask, orientation).astype(np.uint8)
    height, width = shown.shape
    _, _, stats, centroids = cv2.connectedComponentsWithStats(shown, connectivity=8)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:max_phrases] + 1
    phrases = []
    for index in order:
        fraction = stats[index, cv2.CC_STAT_AREA] / shown.size
        if fraction < 0.001:
            continue
        cx, cy = centroids[index]
        row, col = min(int(3 * cy / height), 2), min(int(3 * cx / width), 2)
        size = f"about {fraction:.0%} of the image" if fraction >= 0.01 else "a small area"
        phrase = f"{_GRID[row][col]} ({size})"
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in (
        "image-forensics-assistant",
        "numpy",
        "pillow",
        "opencv-python-headless",
        "scikit-image",
        "torch",
    ):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def driver_record(driver: Driver) -> dict:
    """One driver of the verdict as in the report contract ("held": cut by the fusion rule that the
    verdict's "rule" names, experts/fusion.py)."""
    return {
        "expert": driver.expert,
        "score": driver.score,
        "weight": driver.weight,
        "contribution": driver.contribution,
        "held": driver.held,
    }


def report_dict(analysis: Analysis, image: LoadedImage, files: dict[str, Any] | None = None) -> dict:
    """The JSON report; `files` maps "mask", "heatmaps/<expert>", "masks/<expert>" to written names."""
    files = files or {}
    verdict = analysis.verdict
    return {
        "schema": SCHEMA,
        "image": {
            "path": analysis.image.path,
            "sha256": analysis.image.sha256,
            "format": analysis.image.format,
            "width": analysis.image.width,
            "height": analysis.image.height,
            "notes": list(analysis.image.notes),
        },
        "verdict": {
            "label": verdict.label,
            "probability": verdict.probability,
            "uncertain_band": list(verdict.uncertain_band),
            "rule": verdict.rule,
            "caveat": caveat_of(verdict),
            "drivers": [driver_record(d) for d in verdict.drivers],
            "mask": files.get("mask"),
            "where": where_phrases(verdict.mask, image.orientation),
        },
        "evidence": [_evidence_dict(e, files) for e in analysis.evidence],
        "timings": analysis.timings,
        "versions": versions(),
    }


def _evidence_dict(evidence: Evidence, files: dict[str, Any]) -> dict:
    return {
        "expert": evidence.expert,
        "version": evidence.version,
        "applicable": evidence.applicable,
        "score": None if evidence.score is None else round(float(evidence.score), 4),
        "summary": evidence.summary,
        "details": evidence.details,
        "regions": [r.to_dict() for r in evidence.regions],
        "heatmap": files.get(f"heatmaps/{evidence.expert}"),
        "mask": files.get(f"masks/{evidence.expert}"),
        "seconds": evidence.seconds,
    }


def write_report(analysis: Analysis, image: LoadedImage, out_dir: Path) -> dict:
    """Write every file of the contract into out_dir and return the report dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    verdict_mask = analysis.verdict.mask
    fused = verdict_mask if verdict_mask is not None else np.zeros((image.height, image.width), bool)
    _save_png(mask_png(fused), out_dir / "mask.png")
    files["mask"] = "mask.png"
    _save_png(overlay(image, verdict_mask), out_dir / "overlay.png")
    for evidence in analysis.evidence:
        if evidence.heatmap is not None:
            name = f"heatmaps/{evidence.expert}.png"
            _save_png(heatmap_png(evidence.heatmap), out_dir / name)
            files[f"heatmaps/{evidence.expert}"] = name
        if evidence.mask is not None:
            name = f"masks/{evidence.expert}.png"
            _save_png(mask_png(evidence.mask), out_dir / name)
            files[f"masks/{evidence.expert}"] = name
    report = report_dict(analysis, image, files)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (out_dir / "report.html").write_text(render_html(report, out_dir), encoding="utf-8")
    return report


def mask_png(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def heatmap_png(heatmap: np.ndarray) -> np.ndarray:
    """A heatmap in [0, 1] as an RGB image (inferno colour map: dark = normal, bright = suspicious)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.clip(heatmap, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(image: LoadedImage, mask: np.ndarray | None) -> np.ndarray:
    """The image as a viewer sees it, with the mask tinted red and outlined."""
    shown = image.display.copy()
    if mask is None or not mask.any():
        return shown
    marked = orient(mask, image.orientation)
    tinted = shown.astype(np.float32)
    tinted[marked] = 0.55 * tinted[marked] + 0.45 * np.array([255, 0, 0], np.float32)
    result = tinted.astype(np.uint8)
    contours, _ = cv2.findContours(marked.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(result.shape[:2]) / 300))
    cv2.drawContours(result, contours, -1, (255, 255, 0), thickness)
    return result


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, "PNG", compress_level=1)  # fast: maps can be 24 MP


def _inline(path: Path, max_side: int = 900) -> str:
    image = Image.open(path)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_html(report: dict, out_dir: Path) -> str:
    """A self-contained page (images inlined). Every string is escaped: metadata text is hostile."""
    esc = html.escape
    verdict = report["verdict"]
    rows = []
    for item in report["evidence"]:
        score = "n/a" if item["score"] is None else f"{item['score']:.2f}"
        picture = (
            f'<img src="{_inline(out_dir / item["heatmap"], 240)}" alt="heatmap">' if item["heatmap"] else ""
        )
        rows.append(
            f"<tr><td>{esc(item['expert'])}</td><td>{score}</td>"
            f"<td>{esc(item['summary'])}</td><td>{picture}</td></tr>"
        )
    where = ", ".join(verdict["where"]) or "no localised region"
    notes = "".join(f"<li>{esc(n)}</li>" for n in report["image"]["notes"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Forensic report: {esc(report["image"]["path"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
.badge{{display:inline-block;padding:.3em .8em;border-radius:1em;color:#fff;font-weight:600}}
.authentic{{background:#2e7d32}}.uncertain{{background:#f9a825}}
.manipulated,.ai_generated{{background:#c62828}}
table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.5em;vertical-align:top}}
img{{max-width:100%}}</style></head><body>
<h1>Forensic report</h1>
<p><b>{esc(report["image"]["path"])}</b> · {esc(report["image"]["format"])} ·
{report["image"]["width"]}×{report["image"]["height"]} · sha256 {esc(report["image"]["sha256"][:16])}…</p>
<p><span class="badge {esc(verdict["label"])}">{esc(verdict["label"])}</span>
P(not authentic) = {verdict["probability"]:.2f} (uncertain between {verdict["uncertain_band"][0]:.2f}
and {verdict["uncertain_band"][1]:.2f}) · where: {esc(where)}</p>
<p>{esc(verdict["caveat"])}</p>
<img src="{_inline(out_dir / "overlay.png")}" alt="overlay of the fused mask">
{f"<ul>{notes}</ul>" if notes else ""}
<h2>Evidence</h2>
<table><tr><th>expert</th><th>score</th><th>what it found</th><th>heatmap</th></tr>{"".join(rows)}</table>
<p><small>{esc(json.dumps(report["versions"]))}</small></p>
</body></html>
"""
