"""Refined localisation: the manipulation localiser's coarse regions re-drawn along the edges of what was
edited by a promptable segmenter, as in "From Passive Perception to Active Memory: BoxPromptIML" (a
localiser's coarse masks become box prompts for a SAM-style segmenter, whose object-aligned masks replace
them).

For each of the largest connected components of the coarse mask the segmenter is prompted with the
component's box (grown a little) and a positive point at its most confident pixel (optionally also the
coarse heatmap around it as a mask prompt). A component is kept, re-drawn, when the segmenter confirms
it (its mask overlaps the coarse component by at least `confirm_iou`); otherwise the coarse component is
kept as it was or dropped (`unconfirmed`). The defaults were chosen on CASIA v1 `val`
(`python -m benchmarks.segment --split val` and its options) with the shipped localiser and student:
regions from the coarse heatmap at 0.4 (`--prompt-threshold`; the localiser's own mask, drawn at 0.5,
misses edges; 0.3-0.6 tried), its two largest, the heatmap as a mask prompt, confirmation at IoU 0.1,
unconfirmed regions dropped: pixel-F1 0.508 -> 0.552 there (from the localiser's own mask 0.547; with
it, three regions 0.543, unconfirmed regions kept 0.547). Without the mask prompt an earlier student
lost 0.004; with the first, undertrained localiser (whose map covered about 45% of the image) the mask
prompt was what hurt. The segmenter is the distilled student (experts/student.py) by default; any
object with SAM's predictor interface and `mask_input_from` (e.g. experts.sam.SamTeacher) works.

Score: the manipulation localiser's own score (refinement changes where, not whether); each refined
region is scored by the localiser's heatmap inside it, since the segmenter's own probability says "part
of this object", not "edited".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from experts.base import Evidence, ModelNotAvailableError, not_applicable
from experts.image import LoadedImage
from experts.maps import regions_from_mask, resize_map, working_copy
from experts.sam import prompts_from_mask

WORKING_PIXELS = 1024 * 1024  # refinement runs on a copy of at most this many pixels


@dataclass(frozen=True, eq=False)
class Refinement:
    """A refined mask (bool HxW), its soft version (float32 in [0, 1]) and what happened to each coarse
    component: box, coarse and refined area shares, agreement (IoU with the coarse component), kept."""

    mask: np.ndarray
    probability: np.ndarray
    components: list[dict] = field(default_factory=list)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def heatmap_near(component: np.ndarray, heatmap: np.ndarray, reach: int = 7) -> np.ndarray:
    """The coarse heatmap within `reach` pixels of one component, zero elsewhere: the mask prompt of
    that component (the student is trained on the same, finetune/train_student.py)."""
    size = 2 * reach + 1
    near = cv2.dilate(component.astype(np.uint8), np.ones((size, size), np.uint8)) > 0
    return np.where(near, heatmap, 0.0).astype(np.float32)


def refine(
    predictor,
    pixels: np.ndarray,
    coarse: np.ndarray,
    heatmap: np.ndarray | None = None,
    threshold: float = 0.5,
    min_fraction: float = 0.002,
    max_regions: int = 2,
    confirm_iou: float = 0.1,
    unconfirmed: str = "drop",
    use_mask_prompt: bool = False,
) -> Refinement:
    """Refine a coarse mask (bool) or heatmap (float in [0, 1], thresholded at `threshold`) of an RGB
    image with a promptable segmenter; `heatmap` (default: the coarse map) gives each component's most
    confident point and the mask prompt. Returns masks at the image's size."""
    if unconfirmed not in ("drop", "keep"):
        raise ValueError(f"unconfirmed must be 'drop' or 'keep', not {unconfirmed!r}")
    shape = pixels.shape[:2]
    work, _ = working_copy(np.ascontiguousarray(pixels), WORKING_PIXELS)
    coarse = resize_map(coarse if coarse.dtype == bool else coarse.astype(np.float32), work.shape[:2])
    heatmap = coarse.astype(np.float32) if heatmap is None else heatmap.astype(np.float32)
    heatmap = np.clip(resize_map(heatmap, work.shape[:2]), 0.0, 1.0)
    prompts = prompts_from_mask(coarse, threshold, min_fraction, max_regions, confidence=heatmap)
    mask = np.zeros(work.shape[:2], bool)
    probability = np.zeros(work.shape[:2], np.float32)
    components = []
    if prompts:
        predictor.set_image(work)
        for prompt in prompts:
            mask_input = None
            if use_mask_prompt:
                mask_input = predictor.mask_input_from(heatmap_near(prompt.component, heatmap))
            logits, scores, _ = predictor.predict(
                point_coords=np.array([prompt.point], np.float32),
                point_labels=np.array([1]),
                box=np.array(prompt.box, np.float32),
                mask_input=mask_input,
                return_logits=True,
            )
            refined = logits[0] > 0
            agreement = _iou(refined, prompt.component)
            kept = agreement >= confirm_iou
            if kept:
                mask |= refined
                probability = np.maximum(probability, 1.0 / (1.0 + np.exp(-logits[0])))
            elif unconfirmed == "keep":
                mask |= prompt.component
                probability = np.maximum(probability, heatmap * prompt.component)
            components.append(
                {
                    "box": [round(v) for v in prompt.box],
                    "coarse_fraction": round(prompt.fraction, 4),
                    "refined_fraction": round(float(refined.mean()), 4),
                    "agreement_iou": round(float(agreement), 3),
                    "segmenter_score": round(float(scores[0]), 3),
                    "confirmed": bool(kept),
                }
            )
        predictor.reset_image()
    if work.shape[:2] != shape:
        scale = shape[1] / work.shape[1]
        for item in components:
            item["box"] = [round(v * scale) for v in item["box"]]
    return Refinement(
        resize_map(mask, shape), np.clip(resize_map(probability, shape), 0, 1).astype(np.float32), components
    )


@dataclass(frozen=True)
class RefinedLocalisation:
    name = "segmenter"
    version = "4"
    description = (
        "Refined localisation: the learned manipulation localiser's regions re-drawn along object edges "
        "by a promptable segmenter (a distilled SAM student) given each region's box."
    )
    uses = ("manipulation", "student")  # the shipped weights its output depends on
    source: str = "manipulation"  # the expert whose coarse mask is refined
    # Regions to refine: the source expert's heatmap at this threshold, or its own mask (None).
    threshold: float | None = 0.4
    max_regions: int = 2
    confirm_iou: float = 0.1
    unconfirmed: str = "drop"
    use_mask_prompt: bool = True

    def analyze(self, image: LoadedImage) -> Evidence:
        from experts.runner import run_expert
        from experts.student import student_predictor

        coarse = run_expert(image, self.source)
        if not coarse.applicable or coarse.heatmap is None:
            return not_applicable(
                self.name,
                f"There is no coarse map to refine: {coarse.summary}",
                self.version,
                source=self.source,
            )
        try:
            predictor = student_predictor()
        except ModelNotAvailableError as exc:
            return not_applicable(self.name, f"The promptable segmenter's weights are unavailable: {exc}")
        result = refine(
            predictor,
            image.pixels,
            coarse.mask if coarse.mask is not None and self.threshold is None else coarse.heatmap,
            coarse.heatmap,
            threshold=0.5 if self.threshold is None else self.threshold,
            max_regions=self.max_regions,
            confirm_iou=self.confirm_iou,
            unconfirmed=self.unconfirmed,
            use_mask_prompt=self.use_mask_prompt,
        )
        confirmed = sum(c["confirmed"] for c in result.components)
        details = {
            "indicates": coarse.indicates,
            "refinement_of": self.source,
            "coarse_fraction": round(float(coarse.mask.mean()) if coarse.mask is not None else 0.0, 4),
            "refined_fraction": round(float(result.mask.mean()), 4),
            "components": result.components,
        }
        if not result.components:
            summary = (
                f"The {self.source} expert marks no region, so there is nothing to re-draw; its score "
                f"stands ({100 * (coarse.score or 0):.0f}%)."
            )
        else:
            summary = (
                f"Of {len(result.components)} region(s) the {self.source} expert marked, the segmenter "
                f"re-drew {confirmed} along the edges it found, covering {100 * result.mask.mean():.1f}% of "
                "the image; the score is the localiser's own."
            )
        return Evidence(
            expert=self.name,
            score=coarse.score,
            applicable=True,
            summary=summary,
            heatmap=result.probability,
            mask=result.mask,
            regions=regions_from_mask(
                result.mask, resize_map(coarse.heatmap, result.mask.shape), "edited region (refined)"
            ),
            details=details,
            version=self.version,
        )
