"""fuse(): evidence -> Verdict.

A first, transparent fusion: each applicable expert's score is weighted by how much that kind of
evidence can be trusted alone, and the weighted scores combine as a noisy-OR,

    P(not authentic) = 1 - prod_i (1 - w_i * s_i).

Evidence FOR authenticity (details["supports_authentic"]: a valid Content Credentials signature, our
watermark intact) does not add to that product; the strongest such support s scales the result down,
P *= 1 - AUTHENTICITY_SUPPORT * w * (1 - score), so proof of integrity can halve suspicion but not
erase strong evidence against it.

Inside the uncertain band the label is "uncertain": weak evidence is reported as weak. The
learned-experts work replaces the weights with ones fitted on held-out data (the interface stays).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experts.base import Driver, Evidence, Verdict

# How far one expert's evidence alone can move the verdict. Classical localisers fire on some
# pristine photos, so none of them alone can reach certainty; a generator signature nearly can.
EXPERT_WEIGHTS: dict[str, float] = {
    "ela": 0.55,
    "noise": 0.55,
    "jpeg": 0.75,
    "copy_move": 0.9,
    "metadata": 0.9,
    "frequency": 0.5,
    "c2pa": 0.95,
    "invisible_watermark": 0.9,
    "watermark": 0.9,
}
DEFAULT_WEIGHT = 0.5
UNCERTAIN_BAND = (0.35, 0.65)
AUTHENTICITY_SUPPORT = 0.5
MIN_EXPERTS_TO_CLEAR = 2  # "authentic" needs at least this many experts able to examine the image
MASK_MIN_SCORE = 0.5  # an expert's mask joins the fused mask only when its own score is this high


def fuse(
    evidence: Sequence[Evidence],
    shape: tuple[int, int],
    weights: dict[str, float] | None = None,
    uncertain_band: tuple[float, float] = UNCERTAIN_BAND,
) -> Verdict:
    """Combine evidence for an image of the given (height, width) into a Verdict."""
    weights = {**EXPERT_WEIGHTS, **(weights or {})}
    drivers: list[Driver] = []
    authentic_odds = 1.0
    synthesis, manipulation, support = 0.0, 0.0, 0.0
    for item in evidence:
        if not item.applicable or item.score is None:
            continue
        weight = weights.get(item.expert, DEFAULT_WEIGHT)
        if item.details.get("supports_authentic"):
            support = max(support, weight * (1.0 - item.score))
            drivers.append(Driver(item.expert, round(item.score, 4), weight))
            continue
        contribution = weight * item.score
        authentic_odds *= 1.0 - contribution
        drivers.append(Driver(item.expert, round(item.score, 4), weight))
        if item.indicates == "ai_generated":
            synthesis = max(synthesis, contribution)
        else:
            manipulation = max(manipulation, contribution)
    probability = float(np.clip((1.0 - authentic_odds) * (1.0 - AUTHENTICITY_SUPPORT * support), 0.0, 1.0))
    drivers.sort(key=lambda d: d.score * d.weight, reverse=True)
    low, high = uncertain_band
    if len(drivers) < MIN_EXPERTS_TO_CLEAR and probability <= high:
        # Too little could be measured (e.g. a 1x1 image) to clear or accuse: no evidence either way.
        return Verdict("uncertain", 0.5, tuple(drivers), None, uncertain_band)
    if probability < low:
        label = "authentic"
    elif probability <= high:
        label = "uncertain"
    else:
        label = "ai_generated" if synthesis > manipulation else "manipulated"
    return Verdict(
        label, round(probability, 4), tuple(drivers), _fused_mask(evidence, shape, label), uncertain_band
    )


def _fused_mask(evidence: Sequence[Evidence], shape: tuple[int, int], label: str) -> np.ndarray | None:
    """Union of the masks of experts whose own score is high; None for an authentic verdict."""
    if label == "authentic":
        return None
    masks = [
        e.mask
        for e in evidence
        if e.applicable
        and e.mask is not None
        and (e.score or 0.0) >= MASK_MIN_SCORE
        and e.mask.shape == shape
    ]
    if not masks:
        return None
    fused = np.logical_or.reduce(masks)
    return fused if fused.any() else None
