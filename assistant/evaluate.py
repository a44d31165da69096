"""`forensics eval`: every registered expert and the fused verdict, scored by one harness on a labelled
manifest, the way IMDL-BenCo (Ma et al., "IMDL-BenCo: A Comprehensive Benchmark and Codebase for Image
Manipulation Detection & Localization", NeurIPS 2024) scores every registered model with the same metrics.

Image level (positive = manipulated, ai_generated or deepfake_face; negative = authentic, real_photo or
real_face; each expert's score and the verdict's probability are read as P(positive)):
  - ROC AUC: Mann-Whitney rank statistic, a tie between a positive and a negative counts 1/2.
  - AP: step-wise area under the precision-recall curve, as scikit-learn's average_precision_score.
  - accuracy: score >= 0.5 means "positive".
  - ECE: expected calibration error over 10 equal-width bins of the score (Naeini et al., AAAI 2015;
    Guo et al., ICML 2017): sum over bins of (bin share) x |fraction positive - mean score|.
  An expert that is not applicable to an image (score None) is left out of the "applicable" metrics
  (the table, beside its coverage); the "all images" variant in metrics.json counts n/a as score 0.

Pixel level, on manipulated images that have a non-empty ground-truth mask, averaged over those images
(the convention of the CASIA tables in the localisation literature); a missing heatmap or mask counts as
all-zero, and an expert that never gives one on these images is shown as "—":
  - F1 at a fixed 0.5 threshold on the heatmap (the honest number);
  - F1 at the best threshold t > 0 for each image (optimistic: it peeks at the ground truth);
  - F1 and IoU of the expert's own binary mask;
  - pixel ROC AUC of the heatmap, per image, then averaged.

Cost: median seconds per image (Evidence.seconds; the whole analysis for "fused") and peak memory as
the tracemalloc peak over the first few images (Python and numpy allocations, which include OpenCV's
numpy outputs; native buffers of e.g. torch are not counted). metrics.json also gives the process's
ru_maxrss.

--jpeg-quality and --resize re-encode and rescale both classes identically, to remove shortcuts such as
CASIA's different quantisation tables (../shared/data/README.md, "Traps").

The metric functions are in assistant/metrics.py, the figures in assistant/eval_plots.py.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from assistant.analysis import analyze
from assistant.metrics import (
    CALIBRATION_BINS,
    DECISION_THRESHOLD,
    PixelScores,
    finite_or_none,
    image_metrics,
    pixel_scores,
)
from experts.base import Analysis, ForensicsError
from experts.fusion import UNCERTAIN_BAND, fused_heatmap
from experts.image import LoadedImage, load_image
from experts.registry import available_experts, get_expert

log = logging.getLogger(__name__)

POSITIVE_LABELS = frozenset({"manipulated", "ai_generated", "deepfake_face"})
NEGATIVE_LABELS = frozenset({"authentic", "real_photo", "real_face"})
EXCLUDED_PREFIX = "excluded"
FUSED = "fused"
MEMORY_PROBE_IMAGES = 3
DEFAULT_MANIFEST = Path("../shared/data/manifest.csv")
DATA_ENV_VAR = "FORENSICS_DATA"
MANIFEST_COLUMNS = ("path", "dataset", "label", "manipulation", "mask", "split")


class ManifestError(ForensicsError):
    """The manifest is missing, malformed, or selects no images."""


# --------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class EvalItem:
    """One manifest row to evaluate. `path` is as written in the manifest (relative to its folder)."""

    path: str
    file: Path
    dataset: str
    label: str
    manipulation: str
    split: str
    mask_file: Path | None = None
    group: str = ""  # images that share a source photo share a group (never split across splits)

    @property
    def positive(self) -> bool:
        return self.label in POSITIVE_LABELS


def default_manifest() -> Path:
    """../shared/data/manifest.csv from the current directory, else $FORENSICS_DATA (a manifest file
    or the folder that holds manifest.csv)."""
    if DEFAULT_MANIFEST.exists():
        return DEFAULT_MANIFEST
    configured = os.environ.get(DATA_ENV_VAR)
    if configured:
        path = Path(configured)
        return path / "manifest.csv" if path.is_dir() else path
    raise ManifestError(
        f"no manifest: {DEFAULT_MANIFEST} does not exist here; pass --manifest PATH or set "
        f"{DATA_ENV_VAR} to the data folder"
    )


def read_manifest(
    manifest: Path,
    split: str | None = "test",
    datasets: Sequence[str] | None = None,
) -> list[EvalItem]:
    """Rows of a manifest.csv (layout of ../shared/data), in file order, with the split taken from a
    splits.csv (columns path,split) beside it where one exists. Drops excluded_* rows; split=None or
    "all" keeps every split. Raises ManifestError for unknown datasets or labels."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest file; pass --manifest PATH")
    root = manifest.parent
    rows = _read_csv(manifest)
    missing = [c for c in MANIFEST_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ManifestError(f"{manifest}: missing column(s) {', '.join(missing)}")
    overrides = _split_overrides(root / "splits.csv")
    known_datasets = sorted({row["dataset"] for row in rows})
    unknown = sorted(set(datasets or ()) - set(known_datasets))
    if unknown:
        raise ManifestError(
            f"dataset(s) {', '.join(unknown)} not in {manifest}; available: {', '.join(known_datasets)}"
        )
    items = []
    for row in rows:
        label = row["label"].strip()
        if label.startswith(EXCLUDED_PREFIX):
            continue
        if label not in POSITIVE_LABELS | NEGATIVE_LABELS:
            raise ManifestError(f"{manifest}: row {row['path']!r} has unknown label {label!r}")
        row_split = overrides.get(row["path"], row["split"])
        if split not in (None, "all") and row_split != split:
            continue
        if datasets and row["dataset"] not in datasets:
            continue
        items.append(
            EvalItem(
                path=row["path"],
                file=root / row["path"],
                dataset=row["dataset"],
                label=label,
                manipulation=row.get("manipulation", ""),
                split=row_split,
                mask_file=root / row["mask"] if row.get("mask") else None,
                group=row.get("group", ""),
            )
        )
    return items


def _split_overrides(path: Path) -> dict[str, str]:
    return {row["path"]: row["split"] for row in _read_csv(path)} if path.is_file() else {}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def limit_items(items: Sequence[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first `limit` items of a class-balanced interleave (positives and negatives alternate, each
    class in md5(path) order), so a small run is a deterministic sample that still has both classes."""
    if limit is None or limit >= len(items):
        return list(items)

    def md5_order(group: list[EvalItem]) -> list[EvalItem]:
        return sorted(group, key=lambda item: hashlib.md5(item.path.encode()).hexdigest())

    positives = md5_order([item for item in items if item.positive])
    negatives = md5_order([item for item in items if not item.positive])
    chosen: list[EvalItem] = []
    for index in range(max(len(positives), len(negatives))):
        chosen.extend(group[index] for group in (positives, negatives) if index < len(group))
    kept = {id(item) for item in chosen[:limit]}
    return [item for item in items if id(item) in kept]  # back in manifest order


# --------------------------------------------------------------------------------------------------
# Inputs: optional identical re-encoding of both classes


def transform_image(
    image: LoadedImage,
    jpeg_quality: int | None = None,
    resize: float | None = None,
) -> LoadedImage:
    """Resize by `resize` (area interpolation), then save as JPEG at `jpeg_quality` (PNG when only
    resizing) and reload, so the experts see a file like any other. Metadata is not carried over."""
    if jpeg_quality is None and resize is None:
        return image
    pixels = image.pixels
    if resize is not None:
        import cv2

        pixels = cv2.resize(pixels, scaled_size(pixels.shape[:2], resize), interpolation=cv2.INTER_AREA)
    buffer = io.BytesIO()
    if jpeg_quality is not None:
        Image.fromarray(pixels).save(buffer, "JPEG", quality=int(jpeg_quality))
    else:
        Image.fromarray(pixels).save(buffer, "PNG")
    return load_image(buffer.getvalue(), name=image.source)


def scaled_size(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """(width, height) for cv2, at least 1x1."""
    height, width = shape
    return max(1, round(width * factor)), max(1, round(height * factor))


def read_mask(file: Path) -> np.ndarray:
    """A ground-truth mask image as bool HxW (pixel > 127)."""
    with Image.open(file) as mask:
        return np.asarray(mask.convert("L")) > 127


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The mask at the (height, width) of the transformed image, by nearest-neighbour resizing."""
    if mask.shape == shape:
        return mask
    import cv2

    resized = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


# --------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class ImageRecord:
    """What the evaluation kept about one image: scores (None = not applicable), seconds, and pixel
    scores when it is a manipulated image with a usable mask."""

    item: EvalItem
    size: tuple[int, int]
    format: str
    scores: dict[str, float | None]
    seconds: dict[str, float]
    pixel: dict[str, PixelScores] | None = None


@dataclass
class Evaluation:
    experts: list[str]
    items: list[EvalItem]
    records: list[ImageRecord]
    errors: list[dict[str, str]]
    metrics: dict[str, dict[str, Any]]
    jpeg_quality: int | None = None
    resize: float | None = None
    empty_masks: int = 0
    memory_probe_images: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [*self.experts, FUSED]


def evaluate(
    items: Sequence[EvalItem],
    experts: Sequence[str] | None = None,
    jpeg_quality: int | None = None,
    resize: float | None = None,
    progress: bool = True,
    memory_probe_images: int = MEMORY_PROBE_IMAGES,
) -> Evaluation:
    """Analyse every item and score each expert and the fused verdict. Unreadable images, unreadable
    masks and expert failures are recorded in `errors`, and the run goes on."""
    from tqdm import tqdm

    names = list(experts or available_experts())
    records: list[ImageRecord] = []
    errors: list[dict[str, str]] = []
    probe: list[LoadedImage] = []
    empty_masks = 0
    for item in tqdm(
        items, desc="forensics eval", unit="image", disable=None if progress else True, file=sys.stderr
    ):
        try:
            original = load_image(item.file)
            image = transform_image(original, jpeg_quality, resize)
        except (ForensicsError, OSError, ValueError) as exc:
            errors.append(_error(item, "load", exc))
            continue
        truth = None
        if item.positive and item.mask_file is not None:
            try:
                truth = _ground_truth(item.mask_file, original.pixels.shape[:2], image.pixels.shape[:2])
            except (OSError, ValueError) as exc:
                errors.append(_error(item, "mask", exc))
            if truth is not None and not truth.any():
                empty_masks += 1
                truth = None
        try:
            analysis = analyze(image, names)
        except Exception as exc:
            log.warning("analysis failed on %s: %s", item.path, exc)
            errors.append(_error(item, "analyze", exc))
            continue
        errors.extend(
            {"path": item.path, "stage": f"expert:{e.expert}", "error": str(e.details["error"])}
            for e in analysis.evidence
            if e.details.get("error")
        )
        records.append(_record(item, image, analysis, truth, names, errors))
        if len(probe) < memory_probe_images:
            probe.append(image)
    metrics = summarize(records, names)
    for name, megabytes in peak_memory_mb(probe, names).items():
        metrics[name]["peak_mb"] = megabytes
    return Evaluation(
        names, list(items), records, errors, metrics, jpeg_quality, resize, empty_masks, len(probe)
    )


def _error(item: EvalItem, stage: str, exc: BaseException) -> dict[str, str]:
    return {"path": item.path, "stage": stage, "error": f"{type(exc).__name__}: {exc}"}


def _ground_truth(file: Path, original_shape: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    mask = read_mask(file)
    if mask.shape != original_shape:
        raise ValueError(
            f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{original_shape[1]}x{original_shape[0]}"
        )
    return fit_mask(mask, shape)


def _record(
    item: EvalItem,
    image: LoadedImage,
    analysis: Analysis,
    truth: np.ndarray | None,
    names: Sequence[str],
    errors: list[dict[str, str]],
) -> ImageRecord:
    scores: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    pixel: dict[str, PixelScores] = {}
    for name in names:
        found = analysis.evidence_for(name)
        usable = found is not None and found.applicable
        scores[name] = found.score if usable else None
        seconds[name] = found.seconds if found is not None else 0.0
        if truth is not None:
            heatmap = _checked_shape(item, name, found.heatmap if usable else None, truth.shape, errors)
            mask = _checked_shape(item, name, found.mask if usable else None, truth.shape, errors)
            pixel[name] = pixel_scores(truth, heatmap, mask)
    scores[FUSED] = float(analysis.verdict.probability)
    seconds[FUSED] = float(analysis.timings.get("total", sum(seconds.values())))
    if truth is not None:
        pixel[FUSED] = pixel_scores(
            truth,
            fused_heatmap(analysis.evidence, truth.shape),
            _checked_shape(item, FUSED, analysis.verdict.mask, truth.shape, errors),
        )
    return ImageRecord(
        item, (image.width, image.height), image.format, scores, seconds, pixel if truth is not None else None
    )


def _checked_shape(
    item: EvalItem, name: str, array: np.ndarray | None, shape: tuple[int, int], errors: list[dict[str, str]]
) -> np.ndarray | None:
    """The array, or None (scored as all-zero) with an error recorded when it is not at image size."""
    if array is None or array.shape == shape:
        return array
    errors.append(
        {
            "path": item.path,
            "stage": f"pixel:{name}",
            "error": f"map is {array.shape}, image is {shape}: scored as empty",
        }
    )
    return None


def summarize(records: Sequence[ImageRecord], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per expert (and "fused"): coverage, image metrics on applicable images and on all images (n/a
    as 0), pixel metrics averaged over manipulated images with masks, and median seconds per image."""
    labels = np.array([record.item.positive for record in records], dtype=bool)
    located = [record.pixel for record in records if record.pixel is not None]
    metrics: dict[str, dict[str, Any]] = {}
    for name in [*names, FUSED]:
        raw = [record.scores.get(name) for record in records]
        applicable = np.array([score is not None for score in raw], dtype=bool)
        scores = np.array([0.0 if score is None else score for score in raw], dtype=np.float64)
        seconds = [record.seconds.get(name, 0.0) for record in records]
        metrics[name] = {
            "n_images": len(records),
            "n_applicable": int(applicable.sum()),
            "coverage": finite_or_none(applicable.mean()) if records else None,
            "image_applicable": image_metrics(labels[applicable], scores[applicable]),
            "image_all_na_as_0": image_metrics(labels, scores),
            "pixel": _pixel_summary([pixel[name] for pixel in located]),
            "median_seconds": finite_or_none(np.median(seconds)) if seconds else None,
            "peak_mb": None,
        }
    metrics[FUSED]["verdicts"] = verdict_counts(records)
    return metrics


def verdict_counts(records: Sequence[ImageRecord]) -> dict[str, dict[str, int]]:
    """How the fused verdict labelled the authentic and the fake images: a label above the uncertain
    band on an authentic image is a false accusation."""
    counts = {
        "negative": {"authentic": 0, "uncertain": 0, "accused": 0},
        "positive": {"authentic": 0, "uncertain": 0, "accused": 0},
    }
    for record in records:
        counts["positive" if record.item.positive else "negative"][verdict_band(record)] += 1
    return counts


def verdict_band(record: ImageRecord) -> str:
    """ "authentic", "uncertain" or "accused" (manipulated or AI-generated), from the fused probability."""
    low, high = UNCERTAIN_BAND
    probability = record.scores.get(FUSED) or 0.0
    return "authentic" if probability < low else "uncertain" if probability <= high else "accused"


def verdict_outcome(record: ImageRecord) -> str:
    """How the fused verdict did on this image, in the words of verdict_line."""
    band = verdict_band(record)
    if record.item.positive:
        return {"accused": "caught", "uncertain": "uncertain", "authentic": "missed"}[band]
    return {"accused": "falsely accused", "uncertain": "uncertain", "authentic": "cleared"}[band]


def verdict_line(counts: dict[str, dict[str, int]]) -> str:
    negative, positive = counts["negative"], counts["positive"]
    parts = []
    if sum(negative.values()):
        parts.append(
            f"authentic images: {negative['accused']} falsely accused (labelled manipulated or "
            f"AI-generated), {negative['uncertain']} uncertain, {negative['authentic']} authentic"
        )
    if sum(positive.values()):
        parts.append(
            f"fake images: {positive['accused']} caught, {positive['uncertain']} uncertain, "
            f"{positive['authentic']} missed"
        )
    return "Fused verdicts: " + "; ".join(parts) + "."


def _pixel_summary(scores: Sequence[PixelScores]) -> dict[str, Any]:
    with_heatmap = sum(score.has_heatmap for score in scores)
    with_mask = sum(score.has_mask for score in scores)

    def mean(field_name: str, shown: int) -> float | None:
        if not shown:  # never localised: "—", not a misleading 0
            return None
        values = np.array([getattr(score, field_name) for score in scores], dtype=np.float64)
        return finite_or_none(np.nanmean(values)) if np.isfinite(values).any() else None

    return {
        "n_images": len(scores),
        "n_with_heatmap": with_heatmap,
        "n_with_mask": with_mask,
        "f1_at_0.5": mean("f1_fixed", with_heatmap),
        "f1_best_threshold_optimistic": mean("f1_best", with_heatmap),
        "pixel_auc": mean("pixel_auc", with_heatmap),
        "mask_f1": mean("mask_f1", with_mask),
        "mask_iou": mean("mask_iou", with_mask),
    }


def peak_memory_mb(images: Sequence[LoadedImage], names: Sequence[str]) -> dict[str, float | None]:
    """tracemalloc peak (MB) of each expert, and of all experts plus fusion ("fused"), over `images`.
    Experts are called directly, not through the runner, whose cache would hide the work."""
    from experts.fusion import fuse

    if not images:
        return dict.fromkeys([*names, FUSED])
    peaks: dict[str, float] = {}
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for image in images:
            # Each expert's peak is measured from what was allocated before it; the whole run's peak
            # ("fused") from the start, so it includes the evidence that earlier experts left behind.
            evidence = []
            start = tracemalloc.get_traced_memory()[0]
            whole = 0
            for name in names:
                before = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                try:
                    evidence.append(get_expert(name).analyze(image))
                except Exception as exc:
                    log.debug("memory probe: %s failed: %s", name, exc)
                peak = tracemalloc.get_traced_memory()[1]
                peaks[name] = max(peaks.get(name, 0), peak - before)
                whole = max(whole, peak - start)
            tracemalloc.reset_peak()
            fuse(evidence, (image.height, image.width), jpeg_quality=image.last_jpeg_quality)
            peaks[FUSED] = max(peaks.get(FUSED, 0), whole, tracemalloc.get_traced_memory()[1] - start)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return {name: round(peaks.get(name, 0.0) / 2**20, 1) for name in [*names, FUSED]}


# --------------------------------------------------------------------------------------------------
# Report files


def markdown_table(metrics: dict[str, dict[str, Any]], names: Sequence[str]) -> str:
    header = [
        "expert",
        "coverage",
        "AUC",
        "AP",
        "acc",
        "ECE",
        "FPR@0.5",
        "TPR@0.5",
        "AUC all (n/a=0)",
        "pixel-F1@0.5",
        "pixel-F1 best-thr (optimistic)",
        "mask F1",
        "IoU",
        "pixel AUC",
        "median s/img",
        "peak MB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name in names:
        row = metrics[name]
        image, image_all, pixel = row["image_applicable"], row["image_all_na_as_0"], row["pixel"]
        cells = [
            f"**{name}**" if name == FUSED else name,
            format_cell(row["coverage"], 2),
            format_cell(image["auc"]),
            format_cell(image["ap"]),
            format_cell(image["accuracy"]),
            format_cell(image["ece"]),
            format_cell(image["fpr"]),
            format_cell(image["tpr"]),
            format_cell(image_all["auc"]),
            format_cell(pixel["f1_at_0.5"]),
            format_cell(pixel["f1_best_threshold_optimistic"]),
            format_cell(pixel["mask_f1"]),
            format_cell(pixel["mask_iou"]),
            format_cell(pixel["pixel_auc"]),
            _seconds_cell(row["median_seconds"]),
            format_cell(row["peak_mb"], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _seconds_cell(value: float | None) -> str:
    return "—" if value is None else ("<0.001" if value < 0.001 else f"{value:.3f}")


def dataset_counts(items: Iterable[EvalItem]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for item in items:
        counts.setdefault(item.dataset, Counter())[item.label] += 1
    return {dataset: dict(sorted(labels.items())) for dataset, labels in sorted(counts.items())}


def versions(names: Sequence[str]) -> dict[str, Any]:
    from importlib import metadata

    def version_of(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    found = {
        package: version_of(package)
        for package in (
            "image-forensics-assistant",
            "numpy",
            "pillow",
            "opencv-python-headless",
            "scipy",
            "scikit-image",
            "torch",
            "matplotlib",
        )
    }
    found["python"] = platform.python_version()
    found["experts"] = {name: str(getattr(get_expert(name), "version", "?")) for name in names}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
        found["git_commit"] = commit.stdout.strip() or None
    except OSError:
        found["git_commit"] = None
    return found


def write_outputs(
    evaluation: Evaluation, out: Path, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write metrics.json, metrics.md, roc.png, reliability.png and worst_cases.png into `out`;
    returns the metrics.json content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = evaluation.records
    evaluated = [record.item for record in records]
    report = {
        "command": command_line(),
        "settings": settings or evaluation.settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(evaluation.experts),
        "dataset_counts": {
            "selected": dataset_counts(evaluation.items),
            "evaluated": dataset_counts(evaluated),
        },
        "n_images": len(records),
        "n_positive": sum(item.positive for item in evaluated),
        "n_negative": sum(not item.positive for item in evaluated),
        "n_pixel_images": sum(record.pixel is not None for record in records),
        "n_empty_masks_skipped": evaluation.empty_masks,
        "conventions": {
            "positive_labels": sorted(POSITIVE_LABELS),
            "negative_labels": sorted(NEGATIVE_LABELS),
            "image_applicable": "AUC/AP/accuracy/ECE over images where the expert is applicable",
            "image_all_na_as_0": "the same over all images, a not-applicable expert scored 0",
            "accuracy": f"score >= {DECISION_THRESHOLD} means positive",
            "ece": f"{CALIBRATION_BINS} equal-width bins of the score, |fraction positive - mean score|",
            "pixel": "manipulated images with a non-empty mask; averaged per image; no heatmap/mask = all "
            "zero; null when the expert never gave one",
            "f1_at_0.5": "heatmap >= 0.5",
            "f1_best_threshold_optimistic": "best threshold t > 0 chosen per image with the ground truth",
            "fused_heatmap": "the fusion's pixel model over the experts' heatmaps (0.5: its threshold)",
            "fused_mask": "the verdict's mask (empty when None)",
            "median_seconds": "Evidence.seconds per expert; whole analysis for fused",
            "peak_mb": f"tracemalloc peak over the first {evaluation.memory_probe_images} images "
            "(Python + numpy allocations)",
        },
        "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "metrics": evaluation.metrics,
        "errors": evaluation.errors,
        "images": [_image_row(record) for record in records],
    }
    (out / "metrics.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "metrics.md").write_text(_markdown_report(evaluation, report), encoding="utf-8")
    from assistant import eval_plots  # imported here: eval_plots imports this module

    eval_plots.plot_roc(evaluation, out / "roc.png")
    eval_plots.plot_reliability(evaluation, out / "reliability.png")
    eval_plots.plot_worst_cases(evaluation, out / "worst_cases.png")
    return report


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it again: `forensics eval ...` or `python -m ...`."""
    program, *rest = list(argv if argv is not None else sys.argv) or [""]
    path = Path(program)
    if path.name == "__main__.py" and path.parent.name == "assistant":
        program = "python -m assistant"
    elif path.name == "evaluate.py" and path.parent.name == "assistant":
        program = "python -m assistant.evaluate"
    else:
        program = path.name or program
    return " ".join([program, shlex.join(rest)]).strip()


def _image_row(record: ImageRecord) -> dict[str, Any]:
    row: dict[str, Any] = {
        "path": record.item.path,
        "dataset": record.item.dataset,
        "label": record.item.label,
        "size": list(record.size),
        "format": record.format,
        "scores": {name: None if score is None else round(score, 6) for name, score in record.scores.items()},
        "seconds": record.seconds,
    }
    if record.pixel is not None:
        row["pixel"] = {
            name: {
                "f1_at_0.5": finite_or_none(p.f1_fixed),
                "f1_best": finite_or_none(p.f1_best),
                "pixel_auc": finite_or_none(p.pixel_auc),
                "mask_f1": finite_or_none(p.mask_f1),
                "mask_iou": finite_or_none(p.mask_iou),
                "has_heatmap": p.has_heatmap,
                "has_mask": p.has_mask,
            }
            for name, p in record.pixel.items()
        }
    return row


TABLE_NOTES = (
    "AUC, AP, acc (score >= 0.5) and ECE (10 bins) are over the images where the expert is "
    'applicable (its coverage); "AUC all" scores n/a as 0. Pixel metrics are averaged over '
    'manipulated images with masks, a missing map counting as empty; "best-thr" picks each image\'s '
    "threshold with the ground truth and is optimistic. Fused heatmap: the fusion's pixel model over the "
    "experts' heatmaps; fused mask: the verdict's mask. Peak MB: tracemalloc peak over {probe} image(s) "
    "(Python and numpy allocations). — means not measurable (one class only, or no maps)."
)


SHORTCUT_NOTE = (
    "\nInputs were evaluated as stored: format shortcuts (e.g. CASIA's class-specific JPEG quantisation "
    "tables and sizes, ../shared/data/README.md) can inflate image-level scores; compare with "
    "--jpeg-quality Q and --resize F, which treat both classes alike.\n"
)


def _markdown_report(evaluation: Evaluation, report: dict[str, Any]) -> str:
    settings = report["settings"]
    counts = "; ".join(
        f"{dataset}: " + ", ".join(f"{n} {label}" for label, n in labels.items())
        for dataset, labels in report["dataset_counts"]["evaluated"].items()
    )
    steps = []
    if evaluation.jpeg_quality:
        steps.append(f"re-saved as JPEG q{evaluation.jpeg_quality}")
    if evaluation.resize:
        steps.append(f"resized x{evaluation.resize}")
    transform = ", ".join(steps) or "as stored"
    return "\n".join(
        [
            f"# forensics eval: split {settings.get('split')}, inputs {transform}",
            "",
            f"`{report['command']}`",
            "",
            f"{report['n_images']} images ({report['n_positive']} positive, {report['n_negative']} negative; "
            f"{report['n_pixel_images']} with masks for pixel metrics); {counts}. "
            f"{len(report['errors'])} error(s) recorded in metrics.json.",
            "",
            markdown_table(evaluation.metrics, evaluation.names),
            "",
            verdict_line(evaluation.metrics[FUSED]["verdicts"]),
            "",
            TABLE_NOTES.format(probe=evaluation.memory_probe_images),
            "" if evaluation.jpeg_quality or evaluation.resize else SHORTCUT_NOTE,
            "",
        ]
    )


# --------------------------------------------------------------------------------------------------
# Command line (used by `forensics eval` and `python -m assistant.evaluate`)


def _comma_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _experts_argument(text: str) -> list[str]:
    names = _comma_list(text)
    unknown = [name for name in names if name not in available_experts()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown expert(s) {', '.join(unknown)}; available: {', '.join(available_experts())}"
        )
    return names


def _bounded(kind: type, low: float, high: float):
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]")
        return value

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `forensics eval` options to `parser`."""
    parser.description = (
        "Score every expert and the fused verdict on a labelled data set (manifest.csv layout): "
        "image AUC/AP/accuracy/ECE, pixel F1/IoU/AUC on masks, time and memory. Writes metrics.json, "
        "metrics.md and plots, and prints the table."
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help=f"manifest.csv (default: {DEFAULT_MANIFEST} if it exists, else ${DATA_ENV_VAR})",
    )
    parser.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    parser.add_argument(
        "--datasets",
        type=_comma_list,
        default=None,
        help="comma-separated datasets from the manifest (default: all)",
    )
    parser.add_argument(
        "--experts",
        type=_experts_argument,
        default=None,
        help="comma-separated experts (default: all registered)",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=_bounded(int, 1, 100),
        default=None,
        metavar="Q",
        help="re-save every input as JPEG quality Q first (both classes alike)",
    )
    parser.add_argument(
        "--resize",
        type=_bounded(float, 0.01, 8.0),
        default=None,
        metavar="F",
        help="resize every input by factor F first (area interpolation; masks nearest)",
    )
    parser.add_argument(
        "--limit",
        type=_bounded(int, 1, 10**9),
        default=None,
        metavar="N",
        help="evaluate N images: a deterministic class-balanced sample",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: reports/eval-<split>-<datasets>[-qQ][-xF][-nN])",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_out_dir(args: argparse.Namespace) -> Path:
    parts = [f"eval-{args.split}", "+".join(args.datasets) if args.datasets else "all"]
    if args.jpeg_quality is not None:
        parts.append(f"q{args.jpeg_quality}")
    if args.resize is not None:
        parts.append(f"x{args.resize:g}")
    if args.limit is not None:
        parts.append(f"n{args.limit}")
    return Path("reports") / "-".join(parts)


def run(args: argparse.Namespace) -> int:
    """Run `forensics eval` with parsed arguments; returns the exit code (0 ok, 1 nothing could be
    evaluated, 2 bad manifest or selection)."""
    try:
        manifest = Path(args.manifest) if args.manifest else default_manifest()
        items = read_manifest(manifest, args.split, args.datasets)
        if not items:
            raise ManifestError(
                f"{manifest}: no rows for split {args.split!r} and datasets "
                f"{', '.join(args.datasets) if args.datasets else '(all)'}"
            )
        items = limit_items(items, args.limit)
    except ForensicsError as exc:
        print(f"forensics eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out_dir(args)
    settings = {
        "manifest": str(manifest),
        "split": args.split,
        "datasets": args.datasets,
        "experts": args.experts or available_experts(),
        "jpeg_quality": args.jpeg_quality,
        "resize": args.resize,
        "limit": args.limit,
        "out": str(out),
    }
    evaluation = evaluate(
        items, args.experts, args.jpeg_quality, args.resize, progress=not getattr(args, "no_progress", False)
    )
    evaluation.settings = settings
    report = write_outputs(evaluation, out)
    print(markdown_table(evaluation.metrics, evaluation.names))
    print(verdict_line(evaluation.metrics[FUSED]["verdicts"]))
    print(
        f"\n{report['n_images']} images, {len(report['errors'])} error(s); wrote metrics.json, metrics.md, "
        f"roc.png, reliability.png, worst_cases.png to {out}",
        file=sys.stderr,
    )
    return 0 if evaluation.records else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m assistant.evaluate")
    configure_parser(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
