"""Core value types that flow through the product, and the error hierarchy.

Everything here is a frozen dataclass. Arrays are numpy, at the image's original (raw, un-rotated)
size: a heatmap is float32 HxW in [0, 1], a mask is bool HxW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

# --------------------------------------------------------------------------------------------------
# Errors: every message says what was wrong and what the user can do.


class ForensicsError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidImageError(ForensicsError, ValueError):
    """The input is not an image we can analyse (corrupt, truncated, empty, too large, ...)."""


class ExpertError(ForensicsError):
    """An expert cannot analyse this image (e.g. too small); the message says why."""


class UnknownExpertError(ForensicsError, KeyError):
    """A name that is not in the expert registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotAvailableError(ForensicsError):
    """Weights or a model that an expert or backend needs are not installed."""


# --------------------------------------------------------------------------------------------------
# Value types

LABELS = ("authentic", "manipulated", "ai_generated", "uncertain")


@dataclass(frozen=True)
class Region:
    """A localised finding: bbox is (x0, y0, x1, y1) in raw pixel coordinates, x1/y1 exclusive."""

    bbox: tuple[int, int, int, int]
    score: float
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": list(self.bbox), "score": round(float(self.score), 4), "label": self.label}


@dataclass(frozen=True, eq=False)
class Evidence:
    """What one expert measured on one image.

    score: how strongly this expert indicates manipulation or synthesis, in [0, 1]; None when it has
    nothing to say (then `applicable` is False). details["indicates"] is "manipulated" or
    "ai_generated" when the expert knows which kind of fake its evidence points to.
    """

    expert: str
    score: float | None
    applicable: bool
    summary: str
    heatmap: np.ndarray | None = None
    mask: np.ndarray | None = None
    regions: tuple[Region, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    version: str = "1"

    def __post_init__(self) -> None:
        if self.score is not None and not (0.0 <= self.score <= 1.0 and math.isfinite(self.score)):
            raise ValueError(f"{self.expert}: score {self.score} is outside [0, 1]")
        if self.heatmap is not None and (self.heatmap.dtype != np.float32 or self.heatmap.ndim != 2):
            raise ValueError(f"{self.expert}: heatmap must be float32 HxW")
        if self.mask is not None and (self.mask.dtype != bool or self.mask.ndim != 2):
            raise ValueError(f"{self.expert}: mask must be bool HxW")
        if not self.summary:
            raise ValueError(f"{self.expert}: evidence needs a summary")

    @property
    def indicates(self) -> str:
        return str(self.details.get("indicates", "manipulated"))


@dataclass(frozen=True)
class Driver:
    """One expert's part in a verdict: its score, the weight the fusion gives that score, and its
    contribution to the verdict's log-odds (positive: evidence against authenticity, the
    prosecution; negative: evidence for it, the defence)."""

    expert: str
    score: float
    weight: float
    contribution: float = 0.0
    held: bool = False  # cut by a rule of the fusion (Verdict.rule, experts/fusion.py)


@dataclass(frozen=True, eq=False)
class Verdict:
    """The fused decision. probability is P(not authentic); inside uncertain_band the label is
    "uncertain"."""

    label: str
    probability: float
    drivers: tuple[Driver, ...]
    mask: np.ndarray | None
    uncertain_band: tuple[float, float]
    # The fusion's rule that bounded the verdict, if any: "lone_detector" (the AI-image detector's word
    # alone held on a photo), "heavy_compression" (a JPEG saved below quality 10: no accusation),
    # "graphic" (a chart, a drawing, a screenshot of text: not cleared), "no_witness" (weak findings
    # only, none convinced on its own: no accusation), "too_little_examined" (fewer than two experts
    # examined the image, e.g. a tiny image, a flat colour, random noise: uncertain at 0.5).
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"unknown verdict label {self.label!r}")


@dataclass(frozen=True)
class ImageFacts:
    """What we know about the input file, independent of any expert."""

    path: str
    sha256: str
    format: str
    width: int
    height: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Analysis:
    image: ImageFacts
    evidence: tuple[Evidence, ...]
    verdict: Verdict
    timings: dict[str, float]

    def evidence_for(self, expert: str) -> Evidence | None:
        return next((e for e in self.evidence if e.expert == expert), None)


# --------------------------------------------------------------------------------------------------
# The expert protocol


@runtime_checkable
class Expert(Protocol):
    """An expert measures one kind of evidence. Shape copied from segment-anything's predictor:
    construction is cheap, weights (if any) load lazily on first `analyze`."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]  # one sentence for tool schemas and the UI

    def analyze(self, image: Any) -> Evidence:  # image: experts.image.LoadedImage
        ...


def not_applicable(expert: str, reason: str, version: str = "1", **details: Any) -> Evidence:
    """Evidence for an expert that has nothing to say about this image."""
    return Evidence(
        expert=expert, score=None, applicable=False, summary=reason, details=details, version=version
    )


def graphic_declined(expert: str, version: str, why: str) -> Evidence:
    """An expert's answer on a graphic (LoadedImage.graphic: a chart, a logo, a drawing, a screenshot of
    text), which it does not judge, for the reason `why`; details["graphic"] tells the fusion."""
    return not_applicable(
        expert,
        "The image is made of a few flat colours or is text on a plain background (a chart, a logo, a "
        f"drawing or a screenshot): {why}",
        version,
        graphic=True,
    )


def nothing_to_examine(expert: str, version: str, what: str, **details: Any) -> Evidence:
    """An expert's answer on an image with nothing to examine (LoadedImage.nothing_to_examine, `what`:
    nearly one flat colour, or random noise): finding nothing there is not evidence of authenticity."""
    return not_applicable(
        expert,
        f"The image is {what} for this expert to examine; finding nothing here says nothing about "
        "authenticity.",
        version,
        **details,
    )
