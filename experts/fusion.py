"""fuse(): evidence -> a calibrated Verdict, with prosecution and defence.

Every expert that could examine the image speaks, for or against (after "The Courtroom Trial of
Pixels": prosecution and defence). In log-odds,

    logit P(not authentic) = (b + sum_i applicable_i * (c_i + w_i * score_i) + provenance) / T

w_i >= 0 is how far the expert's score is evidence AGAINST authenticity; c_i is what the expert's
presence says when it finds nothing (negative: "I looked and it is clean" is evidence FOR
authenticity). b, c, w are fitted by logistic regression on the `val` splits (raw, and re-saved as
JPEG and resized, so the weights hold up under re-compression), and the temperature T on out-of-fold
predictions, so the probability is calibrated (finetune/train_fusion.py; the numbers are in
experts/weights/fusion.md). The fusion can hold one such image model per kind of image (`context_of`:
photo, thumbnail); the shipped fusion weighs the evidence alike on both and gives each its own
temperature T. A weight the `val` sets cannot teach is set by
design instead (metadata's: there its only signal is a CASIA artefact, see `FusionConfig.fixed`).
Each driver of a verdict carries its contribution in log-odds.

Provenance is not learned (no data set here carries Content Credentials or watermarks): a broken or
tampered provenance signal prosecutes with a fixed weight, an intact one defends (details
"supports_authentic"), and it can lower suspicion a great deal but not erase strong evidence.

The fused heatmap is a pixel-wise logistic model over the localising experts' heatmaps, fitted on
CASIA `val`, smoothed a little (`smoothed`), and rescaled so that 0.5 is the threshold that gave the
best pixel-F1 there, raised in an image with a strong finding to a share of its peak
(`marking_threshold`; smoothing and share also chosen there); the verdict's mask is that heatmap at
0.5.

An expert the image model weighs but that was not run at all (a partial analysis, `--experts ...`)
counts at its typical contribution on `val`, not as one that looked and found nothing: what was not
examined leans neither way.

Inside the uncertain band the label is "uncertain": weak evidence is reported as weak. With fewer
than MIN_EXPERTS_TO_CLEAR experts able to examine the image (a tiny image, a flat colour, random noise),
nothing is cleared: the verdict is "uncertain" at 0.5 and names the rule (or the rule that held its
evidence). On a photo (larger than a thumbnail) the AI-image detector alone cannot make the verdict
"AI-generated": it is validated on thumbnails, not on photos from cameras it never saw
(experts/weights/ai_generated.md, "Limits"), so when the evidence against is mostly its own and no
second expert points to synthesis, its
contribution stops at the uncertain band's upper edge. (Beside editing evidence that outweighs it, it
still counts as fitted.) A JPEG last saved below HEAVY_COMPRESSION_BELOW is compressed so hard that its
block artefacts swamp every detector's traces: there all evidence against but provenance stops at that
edge together, and the verdict names the rule (Verdict.rule) so the answer can say why. Weak findings
do not add up to an accusation: unless at least one expert the verdict rests on is convinced on its own
(a score of WITNESS_SCORE, or its own in WITNESS_SCORES, or more from an expert the fusion weighs, or
provenance that prosecutes), the evidence against stops at that edge in the same way. Nothing clears a
graphic (a chart, a logo, a drawing, a screenshot of text; an expert that declines one says so in its
details): the photo experts cannot examine it and its content can be made up without a trace, so
where the evidence would clear it, it is "uncertain" at the band's lower edge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np

from experts.base import Driver, Evidence, ModelNotAvailableError, Verdict

UNCERTAIN_BAND = (0.35, 0.65)
MIN_EXPERTS_TO_CLEAR = 2  # "authentic" needs at least this many experts able to examine the image
MASK_MIN_SCORE = 0.5  # an expert's own mask is worth naming when its score is this high
WEIGHTS_NAME = "fusion"
SMOOTHING_SIDE = 256  # `smoothed` works on a copy of the pixel model's probability at most this long
# The kinds of image with their own image model (context_of): a thumbnail has a short side of at most
# THUMBNAIL_SIDE.
PHOTO, THUMBNAIL = "photo", "thumbnail"
THUMBNAIL_SIDE = 64
# A lone witness: on a photo, this detector makes a verdict "AI-generated" only with a second expert that
# points to synthesis with a score of at least CORROBORATION_SCORE.
LONE_DETECTOR = "ai_generated"
CORROBORATION_SCORE = 0.5
# Heavy compression: below this JPEG quality (the jpeg expert's estimate of the last save, or the same
# estimate from the file's table when that expert did not run) the evidence against is held at the
# band's upper edge. CASIA, faces_real and playground `val` photos re-saved at quality 5: 27 of 88
# untouched ones accused, 37 of 100 forgeries caught (chance); at 8: 5 of 88 (over 5%); at 10 to 20:
# 1 or 2 (experts/weights/fusion.md, "A second rule by design").
HEAVY_COMPRESSION_BELOW = 10
COMPRESSION_WITNESS = "jpeg"
# No witness: an accusation needs one expert convinced on its own, at this score or more (an expert's 0.5
# is its own "more likely than not"). On `val` (experts/weights/fusion.md, "A third rule by design") it
# holds 1 of 82 CASIA forgeries as stored, none at q90, and no faces, CIFAKE or playground image.
WITNESS_SCORE = 0.5
# Experts whose 0.5 is no conviction. The manipulation localiser's is reached by 29% of the untouched
# `val` photos (CASIA 27%, real faces 42%), its 0.8 by 4%: as a witness it needs 0.8. On `val` no
# verdict changes (at 0.7 or 0.8; at 0.85, 3 CASIA forgeries caught would be held); it keeps the
# localiser at 0.6-0.8 with weak company from accusing a photo unlike CASIA's (fusion card).
WITNESS_SCORES = {"manipulation": 0.8}
LONE_DETECTOR_RULE, HEAVY_COMPRESSION_RULE, GRAPHIC_RULE = "lone_detector", "heavy_compression", "graphic"
NO_WITNESS_RULE, UNEXAMINED_RULE = "no_witness", "too_little_examined"

# Provenance in log-odds: tampered or forged provenance prosecutes; intact provenance defends, by at
# most half of the evidence against when there is some.
PROVENANCE_EXPERTS = ("c2pa", "invisible_watermark", "watermark")
PROVENANCE_PROSECUTION = 5.0
PROVENANCE_DEFENCE = 3.0


def context_of(shape: tuple[int, int]) -> str:
    """The kind of image whose evidence an image model weighs: a thumbnail (short side at most
    THUMBNAIL_SIDE: the editing experts see little in it, and its evidence is CIFAKE's) or a photo."""
    return THUMBNAIL if min(shape) <= THUMBNAIL_SIDE else PHOTO


@dataclass(frozen=True)
class ImageModel:
    """The fitted image-level numbers for one kind of image (see the module docstring)."""

    experts: tuple[str, ...]
    bias: float
    presence: tuple[float, ...]  # c_i
    weight: tuple[float, ...]  # w_i >= 0
    temperature: float = 1.0
    typical: tuple[float, ...] = ()  # c_i * applicable_i + w_i * score_i, averaged over the fit's val images

    def contributions(self, evidence: Sequence[Evidence]) -> list[Driver]:
        """One Driver per applicable expert with its contribution in log-odds (after temperature)."""
        index = {name: i for i, name in enumerate(self.experts)}
        drivers = []
        for item in evidence:
            if not item.applicable or item.score is None:
                continue
            if item.expert in PROVENANCE_EXPERTS or item.details.get("supports_authentic"):
                logit = _provenance_logit(item)
                drivers.append(Driver(item.expert, round(item.score, 4), 0.0, round(logit, 4)))
                continue
            i = index.get(item.expert)
            if i is None:  # an expert the fusion was not fitted with: shown, not counted
                drivers.append(Driver(item.expert, round(item.score, 4), 0.0, 0.0))
                continue
            logit = (self.presence[i] + self.weight[i] * item.score) / self.temperature
            weight = round(self.weight[i], 4)
            drivers.append(Driver(item.expert, round(item.score, 4), weight, round(logit, 4)))
        return drivers

    def unexamined(self, evidence: Sequence[Evidence]) -> float:
        """The log-odds (after temperature) of the experts this model weighs that were not run at all:
        each counts at its typical contribution."""
        ran = {item.expert for item in evidence}
        typical = zip(self.experts, self.typical, strict=False)  # none stored (an older file): nothing
        return sum(t for name, t in typical if name not in ran) / self.temperature

    def probability(self, drivers: Sequence[Driver], unexamined: float) -> float:
        provenance = [d.contribution for d in drivers if d.expert in PROVENANCE_EXPERTS]
        learned = [d.contribution for d in drivers if d.expert not in PROVENANCE_EXPERTS]
        against = (
            self.bias / self.temperature + unexamined + sum(learned) + sum(c for c in provenance if c > 0)
        )
        defence = sum(c for c in provenance if c < 0)
        if against > 0:  # intact provenance takes away at most half of the evidence against
            defence = max(defence, -0.5 * against)
        return _sigmoid(against + defence)


@dataclass(frozen=True)
class FusionModel:
    """The fitted numbers of the fusion: an image model per kind of image (`context_of`; a kind
    without its own uses the photo model) and the pixel model (see the module docstring)."""

    image_models: Mapping[str, ImageModel]
    pixel_experts: tuple[str, ...] = ()
    pixel_weight: tuple[float, ...] = ()
    pixel_bias: float = 0.0
    pixel_threshold: float = 0.5  # of the pixel model's probability; rescaled to 0.5 in the heatmap
    pixel_relative: float = 0.0  # and in each image at least this share of its peak (`marking_threshold`)
    pixel_smoothing: float = 0.0  # Gaussian sigma over the probability, a share of the longer side
    uncertain_band: tuple[float, float] = UNCERTAIN_BAND
    source: str = "fitted"
    notes: dict = field(default_factory=dict)

    def image_model(self, shape: tuple[int, int]) -> ImageModel:
        return self.image_models.get(context_of(shape)) or self.image_models[PHOTO]

    def heatmap(self, evidence: Sequence[Evidence], shape: tuple[int, int]) -> np.ndarray | None:
        """The fused heatmap (float32 HxW in [0, 1], 0.5 = the image's marking threshold); None without
        maps."""
        maps = {
            e.expert: e.heatmap
            for e in evidence
            if e.applicable and e.heatmap is not None and e.heatmap.shape == shape
        }
        if not any(name in maps for name in self.pixel_experts):
            return None
        logit = np.full(shape, self.pixel_bias, np.float32)
        for name, weight in zip(self.pixel_experts, self.pixel_weight, strict=True):
            if name in maps:
                logit += np.float32(weight) * maps[name]
        probability = smoothed(1.0 / (1.0 + np.exp(-logit)), self.pixel_smoothing)
        t = marking_threshold(probability, self.pixel_threshold, self.pixel_relative)
        rescaled = np.where(probability < t, 0.5 * probability / t, 0.5 + 0.5 * (probability - t) / (1 - t))
        return np.clip(rescaled, 0.0, 1.0).astype(np.float32)

    # -- storage ------------------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict, dict[str, str]]:
        import torch

        tensors = {}
        for context, image in self.image_models.items():
            tensors[f"{context}.bias"] = torch.tensor([image.bias])
            tensors[f"{context}.presence"] = torch.tensor(image.presence)
            tensors[f"{context}.weight"] = torch.tensor(image.weight)
            tensors[f"{context}.temperature"] = torch.tensor([image.temperature])
            if image.typical:
                tensors[f"{context}.typical"] = torch.tensor(image.typical)
        tensors |= {
            "pixel_weight": torch.tensor(self.pixel_weight or (0.0,)),
            "pixel_bias": torch.tensor([self.pixel_bias]),
            "pixel_threshold": torch.tensor([self.pixel_threshold]),
            "pixel_relative": torch.tensor([self.pixel_relative]),
            "pixel_smoothing": torch.tensor([self.pixel_smoothing]),
            "uncertain_band": torch.tensor(self.uncertain_band),
        }
        metadata = {
            "experts": json.dumps({context: list(m.experts) for context, m in self.image_models.items()}),
            "pixel_experts": json.dumps(list(self.pixel_experts)),
            "notes": json.dumps(self.notes),
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict[str, str], source: str) -> FusionModel:
        def values(key: str) -> tuple[float, ...]:
            return tuple(float(v) for v in tensors[key].flatten().tolist())

        image_models = {
            context: ImageModel(
                experts=tuple(experts),
                bias=values(f"{context}.bias")[0],
                presence=values(f"{context}.presence"),
                weight=values(f"{context}.weight"),
                temperature=values(f"{context}.temperature")[0],
                typical=values(f"{context}.typical") if f"{context}.typical" in tensors else (),
            )
            for context, experts in json.loads(metadata["experts"]).items()
        }
        pixel_experts = tuple(json.loads(metadata.get("pixel_experts", "[]")))
        return cls(
            image_models=image_models,
            pixel_experts=pixel_experts,
            pixel_weight=values("pixel_weight")[: len(pixel_experts)],
            pixel_bias=values("pixel_bias")[0],
            # Settings, not fitted numbers: undo float32's rounding (0.35 reads 0.3499999940395355).
            pixel_threshold=round(values("pixel_threshold")[0], 6),
            pixel_relative=round(values("pixel_relative")[0], 6) if "pixel_relative" in tensors else 0.0,
            pixel_smoothing=round(values("pixel_smoothing")[0], 6) if "pixel_smoothing" in tensors else 0.0,
            uncertain_band=tuple(round(v, 6) for v in values("uncertain_band")[:2]),
            source=source,
            notes=json.loads(metadata.get("notes", "{}")),
        )


# Used only when the fitted file is missing (a broken install): the first, hand-set weights in
# log-odds, so the product still answers, and says so in every verdict's model source.
HAND_SET = FusionModel(
    image_models={
        PHOTO: ImageModel(
            experts=("ela", "noise", "jpeg", "copy_move", "metadata", "frequency"),
            bias=-2.0,
            presence=(0.0,) * 6,
            weight=(2.5, 2.5, 3.5, 4.5, 4.5, 2.0),
        )
    },
    pixel_experts=("ela", "noise", "copy_move"),
    pixel_weight=(3.0, 3.0, 4.0),
    pixel_bias=-3.0,
    source="hand-set (experts/weights/fusion.safetensors is missing)",
)


@cache
def fusion_model() -> FusionModel:
    """The shipped, fitted fusion (hash-checked), else the hand-set one with a warning."""
    from experts.learned import load_metadata, load_weights

    try:
        return FusionModel.from_tensors(load_weights(WEIGHTS_NAME), load_metadata(WEIGHTS_NAME), "fitted")
    except ModelNotAvailableError as exc:
        import logging

        logging.getLogger(__name__).warning("%s; using the hand-set fusion", exc)
        return HAND_SET


def fuse(
    evidence: Sequence[Evidence],
    shape: tuple[int, int],
    model: FusionModel | None = None,
    uncertain_band: tuple[float, float] | None = None,
    lone_detector: str | None = LONE_DETECTOR,
    jpeg_quality: int | None = None,
) -> Verdict:
    """Combine evidence for an image of the given (height, width) into a Verdict. `lone_detector`: the
    expert that alone cannot make a photo "AI-generated" (None: no such rule, to measure its effect).
    `jpeg_quality`: the file's last JPEG quality (LoadedImage.last_jpeg_quality), for the
    heavy-compression rule when the jpeg expert did not run."""
    model = model or fusion_model()
    band = uncertain_band or model.uncertain_band
    image_model = model.image_model(shape)
    drivers = image_model.contributions(evidence)
    unexamined = image_model.unexamined(evidence)
    rule = None
    against = {d.expert for d in drivers if d.expert not in PROVENANCE_EXPERTS}
    if heavily_compressed(evidence, jpeg_quality):
        rule = HEAVY_COMPRESSION_RULE
        drivers = _held_below(drivers, against, band[1], image_model, unexamined)
    elif not any(_is_witness(d) for d in drivers):
        drivers = _held_below(drivers, against, band[1], image_model, unexamined)
        rule = NO_WITNESS_RULE if any(d.held for d in drivers) else None
    elif lone_detector and _lone_witness(evidence, drivers, shape, lone_detector):
        drivers = _held_below(drivers, {lone_detector}, band[1], image_model, unexamined)
        rule = LONE_DETECTOR_RULE if any(d.held for d in drivers) else None
    probability = image_model.probability(drivers, unexamined)
    drivers.sort(key=lambda d: abs(d.contribution), reverse=True)
    examined = [d for d in drivers if d.expert in image_model.experts or d.expert in PROVENANCE_EXPERTS]
    low, high = band
    if len(examined) < MIN_EXPERTS_TO_CLEAR and probability <= high:
        # Too little could be measured (e.g. a 1x1 image) to clear or accuse: no evidence either way.
        return Verdict("uncertain", 0.5, tuple(drivers), None, band, rule or UNEXAMINED_RULE)
    if probability < low and any(e.details.get("graphic") for e in evidence):
        probability, rule = low, GRAPHIC_RULE  # not cleared: see the module docstring
    if probability < low:
        label = "authentic"
    elif probability <= high:
        label = "uncertain"
    else:
        label = _kind(evidence, drivers)
    mask = None
    if label != "authentic":
        heatmap = model.heatmap(evidence, shape)
        mask = heatmap >= 0.5 if heatmap is not None else None
        mask = mask if mask is not None and mask.any() else None
    return Verdict(label, round(probability, 4), tuple(drivers), mask, band, rule)


def smoothed(probability: np.ndarray, share: float) -> np.ndarray:
    """The pixel model's probability blurred (Gaussian, sigma `share` of the longer side, on a copy of
    at most SMOOTHING_SIDE px), so that a region is marked as a whole rather than in specks."""
    if share <= 0:
        return probability
    import cv2

    height, width = probability.shape
    scale = min(1.0, SMOOTHING_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(probability.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), share * max(size))
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def marking_threshold(probability: np.ndarray, threshold: float, relative: float) -> float:
    """The pixel model's probability from which a pixel of this image is marked: the fitted threshold,
    raised where the image has a strong peak to `relative` of that peak, so that the weak halo around a
    strong finding is not marked with it."""
    return float(min(max(threshold, relative * float(probability.max(initial=0.0))), 0.99))


def fused_heatmap(evidence: Sequence[Evidence], shape: tuple[int, int]) -> np.ndarray | None:
    """The fused heatmap of the shipped fusion (None when no localising expert made a map)."""
    return fusion_model().heatmap(evidence, shape)


def _kind(evidence: Sequence[Evidence], drivers: Sequence[Driver]) -> str:
    """ "ai_generated" when the evidence against is mostly from experts that point to synthesis."""
    indicates = {e.expert: e.indicates for e in evidence}
    against = [d for d in drivers if d.contribution > 0]
    synthesis = sum(d.contribution for d in against if indicates[d.expert] == "ai_generated")
    editing = sum(d.contribution for d in against if indicates[d.expert] != "ai_generated")
    return "ai_generated" if synthesis > editing else "manipulated"


def _lone_witness(
    evidence: Sequence[Evidence], drivers: Sequence[Driver], shape: tuple[int, int], detector: str
) -> bool:
    """Whether, on a photo, the evidence against would make it "AI-generated" on `detector`'s word:
    no other expert points to synthesis (a generated face, a generator's frequency peaks, watermark,
    metadata or Content Credentials)."""
    seconded = any(
        e.applicable
        and e.expert != detector
        and e.indicates == "ai_generated"
        and (e.score or 0.0) >= CORROBORATION_SCORE
        for e in evidence
    )
    return context_of(shape) == PHOTO and not seconded and _kind(evidence, drivers) == "ai_generated"


def _is_witness(driver: Driver) -> bool:
    """Whether an expert is convinced on its own that the image is not authentic: a score of
    WITNESS_SCORE (its own in WITNESS_SCORES) or more from an expert the fusion weighs (weight > 0), or
    provenance that prosecutes."""
    counts = driver.weight > 0 or (driver.expert in PROVENANCE_EXPERTS and driver.contribution > 0)
    return counts and driver.score >= WITNESS_SCORES.get(driver.expert, WITNESS_SCORE)


def heavily_compressed(evidence: Sequence[Evidence], jpeg_quality: int | None = None) -> bool:
    """Whether the file was last saved below HEAVY_COMPRESSION_BELOW: the jpeg expert's estimate, or
    the file's own (`jpeg_quality`) when that expert did not run."""
    quality = next(
        (e.details.get("last_quality_estimate") for e in evidence if e.expert == COMPRESSION_WITNESS),
        jpeg_quality,
    )
    return quality is not None and quality < HEAVY_COMPRESSION_BELOW


def _held_below(
    drivers: list[Driver], experts: Collection[str], high: float, model: ImageModel, unexamined: float
) -> list[Driver]:
    """The drivers with these experts' evidence against scaled down together so that it raises the
    probability at most to `high` (not at all when the others already pass it)."""
    held = [d for d in drivers if d.expert in experts and d.contribution > 0]
    others = [d for d in drivers if not (d.expert in experts and d.contribution > 0)]
    total = sum(d.contribution for d in held)
    room = max(_logit(high) - _logit(model.probability(others, unexamined)), 0.0)
    if total <= room:
        return drivers
    return [
        *others,
        *(
            replace(d, contribution=math.floor(room * (d.contribution / total) * 1e4) / 1e4, held=True)
            for d in held
        ),
    ]


def _provenance_logit(item: Evidence) -> float:
    if item.details.get("supports_authentic"):
        return -PROVENANCE_DEFENCE * (1.0 - float(item.score or 0.0))
    return PROVENANCE_PROSECUTION * float(item.score or 0.0)


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))
