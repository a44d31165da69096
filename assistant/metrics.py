"""The metrics of `forensics eval`, in numpy only (scikit-learn is not a dependency): image-level ROC AUC,
average precision, accuracy and expected calibration error over (label, score) pairs, and pixel-level F1,
IoU and ROC AUC of a heatmap or mask against a ground-truth mask. assistant/evaluate.py states the
conventions in full."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DECISION_THRESHOLD = 0.5
CALIBRATION_BINS = 10

Values = Sequence[float] | Sequence[bool] | np.ndarray  # labels (bool) or scores (float), one per item


def finite_or_none(value: Any) -> float | None:
    """A finite float rounded for the report, or None (JSON null, shown as "—")."""
    number = float(value)
    return round(number, 6) if np.isfinite(number) else None


def _arrays(labels: Values, scores: Values) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a flat bool array and scores as a flat float64 array."""
    return np.asarray(labels, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel()


# --------------------------------------------------------------------------------------------------
# Image level


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    return ranks


def _threshold_counts(truth: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score, high to low: (threshold, true positives, predicted positives) when
    everything >= threshold is called positive."""
    order = np.argsort(-values, kind="mergesort")
    ordered = values[order]
    true_positives = np.cumsum(truth[order])
    last_of_group = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]
    return ordered[last_of_group], true_positives[last_of_group], last_of_group + 1


def roc_auc(labels: Values, scores: Values) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); NaN unless both classes occur."""
    truth, values = _arrays(labels, scores)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    rank_sum = float(_average_ranks(values)[truth].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def roc_curve(labels: Values, scores: Values) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate), starting at (0, 0); for plotting."""
    truth, values = _arrays(labels, scores)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    _, true_positives, predicted = _threshold_counts(truth, values)
    return (np.r_[0.0, (predicted - true_positives) / negatives], np.r_[0.0, true_positives / positives])


def average_precision(labels: Values, scores: Values) -> float:
    """sum_k (R_k - R_{k-1}) * P_k over distinct thresholds, as sklearn's average_precision_score;
    NaN without positives."""
    truth, values = _arrays(labels, scores)
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    _, true_positives, predicted = _threshold_counts(truth, values)
    precision = true_positives / predicted
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy(labels: Values, scores: Values, threshold: float = DECISION_THRESHOLD) -> float:
    truth, values = _arrays(labels, scores)
    if truth.size == 0:
        return float("nan")
    return float(np.mean((values >= threshold) == truth))


def reliability_bins(
    labels: Values, scores: Values, bins: int = CALIBRATION_BINS, weights: Values | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width score bin: (count, mean score, fraction positive); empty bins hold NaN. With
    `weights`, each image counts by its weight."""
    truth = np.asarray(labels, dtype=np.float64).ravel()
    values = np.asarray(scores, dtype=np.float64).ravel()
    weight = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    index = np.clip((values * bins).astype(int), 0, bins - 1)  # a score of exactly 1.0 joins the top bin
    counts = np.bincount(index, weight, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weight * values, minlength=bins) / counts
        observed = np.bincount(index, weight * truth, minlength=bins) / counts
    return counts, confidence, observed


def expected_calibration_error(
    labels: Values, scores: Values, bins: int = CALIBRATION_BINS, weights: Values | None = None
) -> float:
    counts, confidence, observed = reliability_bins(labels, scores, bins, weights)
    total = counts.sum()
    if total == 0:
        return float("nan")
    filled = counts > 0
    return float(np.sum(counts[filled] / total * np.abs(observed[filled] - confidence[filled])))


def image_metrics(labels: Values, scores: Values) -> dict[str, Any]:
    truth = np.asarray(labels, dtype=bool)
    return {
        "n": int(truth.size),
        "n_positive": int(truth.sum()),
        "auc": finite_or_none(roc_auc(truth, scores)),
        "ap": finite_or_none(average_precision(truth, scores)),
        "accuracy": finite_or_none(accuracy(truth, scores)),
        "ece": finite_or_none(expected_calibration_error(truth, scores)),
        "fpr": finite_or_none(flag_rate(truth, scores, positive=False)),
        "tpr": finite_or_none(flag_rate(truth, scores, positive=True)),
    }


def flag_rate(labels: Values, scores: Values, positive: bool, threshold: float = DECISION_THRESHOLD) -> float:
    """Fraction of the positive (TPR) or negative (FPR) images scored at or above the threshold."""
    truth, values = _arrays(labels, scores)
    chosen = values[truth == positive]
    return float(np.mean(chosen >= threshold)) if chosen.size else float("nan")


# --------------------------------------------------------------------------------------------------
# Pixel level


def f1_score(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Pixel F1 = 2TP / (2TP + FP + FN); 1.0 when both are empty."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    true_positives = int(np.count_nonzero(truth & predicted))
    denominator = int(np.count_nonzero(truth)) + int(np.count_nonzero(predicted))
    return 1.0 if denominator == 0 else 2.0 * true_positives / denominator


def iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Intersection over union; 1.0 when both are empty."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    union = int(np.count_nonzero(truth | predicted))
    return 1.0 if union == 0 else int(np.count_nonzero(truth & predicted)) / union


def best_threshold_f1(truth: np.ndarray, heatmap: np.ndarray) -> float:
    """The highest F1 of `heatmap >= t` over every threshold t > 0 (a pixel at 0 is never called
    manipulated, so an all-zero map scores 0): optimistic, it chooses t with the ground truth in hand."""
    truth, values = _arrays(truth, heatmap)
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    thresholds, true_positives, predicted = _threshold_counts(truth, values)
    f1 = 2.0 * true_positives / (positives + predicted)
    return float(max(0.0, np.max(f1[thresholds > 0], initial=0.0)))


@dataclass(frozen=True)
class PixelScores:
    """One expert on one manipulated image. A missing heatmap or mask was scored as all-zero;
    has_heatmap / has_mask say whether the expert gave one."""

    f1_fixed: float
    f1_best: float
    pixel_auc: float
    has_heatmap: bool
    mask_f1: float
    mask_iou: float
    has_mask: bool


def pixel_scores(truth: np.ndarray, heatmap: np.ndarray | None, mask: np.ndarray | None) -> PixelScores:
    has_heatmap, has_mask = heatmap is not None, mask is not None
    heatmap = heatmap if has_heatmap else np.zeros(truth.shape, np.float32)
    mask = mask if has_mask else np.zeros(truth.shape, bool)
    return PixelScores(
        f1_fixed=f1_score(truth, heatmap >= DECISION_THRESHOLD),
        f1_best=best_threshold_f1(truth, heatmap),
        pixel_auc=roc_auc(truth, heatmap),
        has_heatmap=has_heatmap,
        mask_f1=f1_score(truth, mask),
        mask_iou=iou(truth, mask),
        has_mask=has_mask,
    )
