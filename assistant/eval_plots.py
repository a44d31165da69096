"""The figures of `forensics eval`: ROC curves, reliability diagrams and the worst cases of the fused
verdict, drawn with matplotlib's object API (Agg, pyplot's state left alone)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from assistant.analysis import analyze
from assistant.evaluate import (
    FUSED,
    Evaluation,
    ImageRecord,
    fit_mask,
    format_cell,
    read_mask,
    transform_image,
    verdict_outcome,
)
from assistant.metrics import CALIBRATION_BINS, reliability_bins, roc_curve
from experts.fusion import fused_heatmap
from experts.image import load_image

log = logging.getLogger(__name__)

WORST_CASES_PER_CLASS = 4


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the object API renders with Agg and leaves pyplot's state alone

    return Figure(figsize=(width, height), dpi=100)


def _applicable_scores(records: Sequence[ImageRecord], name: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r.item.positive, r.scores[name]) for r in records if r.scores.get(name) is not None]
    return np.array([p[0] for p in pairs], dtype=bool), np.array([p[1] for p in pairs], dtype=np.float64)


def plot_roc(evaluation: Evaluation, path: Path) -> None:
    figure = _figure(6, 6)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    skipped: list[str] = []
    for name in evaluation.names:
        row = evaluation.metrics[name]
        auc = row["image_applicable"]["auc"]
        if auc is None:  # not applicable, or one class only: no curve to draw
            skipped.append(name)
            continue
        false_rate, true_rate = roc_curve(*_applicable_scores(evaluation.records, name))
        axes.plot(
            false_rate,
            true_rate,
            linewidth=2.5 if name == FUSED else 1.3,
            label=f"{name} (AUC {format_cell(auc)}, coverage {format_cell(row['coverage'], 2)})",
        )
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="ROC, applicable images per expert"
        + (f"\nno curve (n/a or one class): {', '.join(skipped)}" if skipped else ""),
    )
    if len(skipped) < len(evaluation.names):
        axes.legend(loc="lower right", fontsize=7)
    figure.savefig(path, bbox_inches="tight")


def plot_reliability(evaluation: Evaluation, path: Path) -> None:
    names = [FUSED, *evaluation.experts]
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    figure = _figure(3.2 * columns, 3.2 * rows)
    centres = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        labels, scores = _applicable_scores(evaluation.records, name)
        counts, _, observed = reliability_bins(labels, scores)
        axes.bar(
            centres,
            np.nan_to_num(observed),
            width=1 / CALIBRATION_BINS,
            edgecolor="black",
            color="tab:blue",
            alpha=0.7,
        )
        axes.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1)
        for centre, count in zip(centres, counts, strict=True):
            if count:
                axes.text(centre, 0.02, str(int(count)), ha="center", fontsize=6)
        if not len(labels):
            axes.text(0.5, 0.5, "never applicable", ha="center", va="center", color="0.4")
        ece = evaluation.metrics[name]["image_applicable"]["ece"]
        axes.set(
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"{name}: ECE {format_cell(ece)}, n={len(labels)}",
            xlabel="score",
            ylabel="fraction positive",
        )
        axes.title.set_fontsize(9)
    figure.tight_layout()
    figure.savefig(path)


def worst_cases(records: Sequence[ImageRecord], per_class: int = WORST_CASES_PER_CLASS) -> list[ImageRecord]:
    """The highest-scored negatives (false positives first) and the lowest-scored positives (false
    negatives first), by the fused probability; ties broken by path."""
    negatives = sorted(
        (r for r in records if not r.item.positive), key=lambda r: (-r.scores[FUSED], r.item.path)
    )
    positives = sorted((r for r in records if r.item.positive), key=lambda r: (r.scores[FUSED], r.item.path))
    return negatives[:per_class] + positives[:per_class]


def plot_worst_cases(evaluation: Evaluation, path: Path) -> None:
    """One row per worst case: the image with the ground-truth outline, the fused heatmap, the verdict
    mask. The images are prepared and analysed again (the runner's cache usually answers)."""
    cases = worst_cases(evaluation.records)
    figure = _figure(10.5, 3.2 * max(1, len(cases)))
    if not cases:
        figure.text(0.5, 0.5, "no images were evaluated", ha="center")
    for row, record in enumerate(cases):
        try:
            image = transform_image(load_image(record.item.file), evaluation.jpeg_quality, evaluation.resize)
            analysis = analyze(image, evaluation.experts)
            truth = None
            if record.pixel is not None and record.item.mask_file is not None:
                truth = fit_mask(read_mask(record.item.mask_file), image.pixels.shape[:2])
        except Exception as exc:
            log.warning("worst-case figure: %s: %s", record.item.path, exc)
            continue
        shape = image.pixels.shape[:2]
        heatmap = fused_heatmap(analysis.evidence, shape)
        mask = analysis.verdict.mask if analysis.verdict.mask is not None else np.zeros(shape, bool)
        probability = record.scores[FUSED]
        kind = verdict_outcome(record)
        drivers = ", ".join(f"{d.expert} {d.score:.2f}" for d in analysis.verdict.drivers[:2]) or "no drivers"
        panels = [
            (f"{record.item.path}\n{record.item.label}: p={probability:.2f} ({kind})", None),
            (f"fused heatmap ({drivers})", heatmap if heatmap is not None else np.zeros(shape, np.float32)),
            (f"verdict mask: {analysis.verdict.label}", mask.astype(np.float32)),
        ]
        for column, (title, overlay) in enumerate(panels):
            axes = figure.add_subplot(len(cases), 3, row * 3 + column + 1)
            axes.imshow(image.pixels)
            if overlay is not None:
                axes.imshow(overlay, cmap="jet", vmin=0, vmax=1, alpha=0.45)
            if truth is not None and truth.any():
                axes.contour(truth, levels=[0.5], colors="white", linewidths=1)
            axes.set_title(title, fontsize=7)
            axes.axis("off")
    figure.tight_layout()
    figure.savefig(path)
