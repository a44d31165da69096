"""Forgery synthesiser: manipulated images with exact masks, made from pristine `train`-split photos.

Five kinds, each the edit a person makes with a photo editor, on object-shaped regions (the shapes of
real CASIA v1 `train` ground-truth masks, rescaled and moved):
  - splice: a region of another photo pasted in, colour-matched to its new surroundings (mean and
    spread in Lab) and blended with a Poisson seamless clone or a feathered alpha;
  - copy_move: a region of the same photo rotated, rescaled and pasted elsewhere;
  - removal: an object-shaped region filled in by inpainting (cv2.inpaint, Telea or Navier-Stokes);
  - retouch: local resampling, blur, sharpening, median filtering or noise inside a region;
  - double_jpeg: the region keeps a different JPEG history from the rest (another quality, and the
    8x8 grid aligned or shifted).
Every edit changes pixels only inside its mask (the blend's feathering lies inside it too), so the mask
is exact before post-processing. Then one random chain over the whole image (finetune.augment
.PostProcess: resize, blur, noise, JPEG) hides the container, as it does for every training image.

Deterministic: every random choice comes from the numpy Generator the caller passes.

    .venv/bin/python -m finetune.synth --preview runs/synth_preview.png --n 16
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from experts.maps import fit_longest_side
from finetune.augment import PostProcess, recompress

log = logging.getLogger(__name__)

KINDS = ("splice", "copy_move", "removal", "retouch", "double_jpeg")
HOST_SIDE = (384, 512)  # hosts are resized so their longest side lies here: the expert's working scale


@dataclass(frozen=True, eq=False)
class Forgery:
    """One synthesised example. `image` is after post-processing; `edited` before it, at the host's size,
    where exactly the pixels under `edited_mask` differ from `host`."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    host: np.ndarray
    edited: np.ndarray
    edited_mask: np.ndarray


# --------------------------------------------------------------------------------------------------
# Region shapes


def shapes_from_masks(masks: Sequence[np.ndarray], min_pixels: int = 200) -> list[np.ndarray]:
    """The largest connected component of each mask, cropped to its bounding box."""
    shapes = []
    for mask in masks:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count < 2:
            continue
        index = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        x, y, w, h, area = (int(v) for v in stats[index])
        if area >= min_pixels:
            shapes.append(labels[y : y + h, x : x + w] == index)
    return shapes


def ellipse_shape(rng: np.random.Generator) -> np.ndarray:
    """A random blob (a few overlapping ellipses), when no real object masks are at hand."""
    size = 128
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = (int(rng.integers(40, 88)), int(rng.integers(40, 88)))
        axes = (int(rng.integers(15, 45)), int(rng.integers(15, 45)))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    ys, xs = np.nonzero(canvas)
    return canvas[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)


def place_shape(
    rng: np.random.Generator, shape: np.ndarray, size: tuple[int, int], area: tuple[float, float]
) -> np.ndarray:
    """The shape, randomly flipped and scaled to cover a random share `area` of an image of `size`
    (height, width), at a random place; a full-size bool mask."""
    height, width = size
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    fraction = float(rng.uniform(*area))
    scale = np.sqrt(fraction * height * width / max(shape.sum(), 1))
    h = int(np.clip(round(shape.shape[0] * scale), 8, height - 2))
    w = int(np.clip(round(shape.shape[1] * scale), 8, width - 2))
    scaled = cv2.resize(shape.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    mask = np.zeros(size, bool)
    y, x = int(rng.integers(1, height - h)), int(rng.integers(1, width - w))
    mask[y : y + h, x : x + w] = scaled
    if not mask.any():  # a thin shape can vanish when shrunk
        mask[y : y + h, x : x + w] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Blending and colour


def feathered_alpha(mask: np.ndarray, radius: float) -> np.ndarray:
    """Alpha in [0, 1], 1 deep inside the mask, falling to 0 at its edge and 0 everywhere outside."""
    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(inside / max(radius, 1e-3), 0.0, 1.0).astype(np.float32)


def blend(host: np.ndarray, patch: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    mixed = host.astype(np.float32) * (1 - alpha[..., None]) + patch.astype(np.float32) * alpha[..., None]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def match_colour(patch: np.ndarray, reference: np.ndarray, mask: np.ndarray, strength: float) -> np.ndarray:
    """Move the patch's Lab mean and spread under `mask` part of the way (`strength`) towards the
    reference's around the mask, as a careful forger's colour correction does."""
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((25, 25), np.uint8)).astype(bool) & ~mask
    if ring.sum() < 20:
        ring = ~mask
    source = cv2.cvtColor(patch, cv2.COLOR_RGB2LAB).astype(np.float32)
    target = cv2.cvtColor(reference, cv2.COLOR_RGB2LAB).astype(np.float32)
    mean_s, std_s = source[mask].mean(0), source[mask].std(0) + 1.0
    mean_t, std_t = target[ring].mean(0), target[ring].std(0) + 1.0
    gain = 1 + strength * (np.clip(std_t / std_s, 0.5, 2.0) - 1)
    shifted = (source - mean_s) * gain + mean_s + strength * (mean_t - mean_s)
    return cv2.cvtColor(np.clip(shifted, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def paste(rng: np.random.Generator, host: np.ndarray, patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend `patch` (host-sized, valid under `mask`) into host: seamless clone or feathered alpha.
    Pixels outside the mask are left exactly as they were."""
    if rng.random() < 0.4 and mask.sum() > 400:
        ys, xs = np.nonzero(mask)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
        if inner.any() and ys.min() > 1 and xs.min() > 1:
            centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
            try:
                cloned = cv2.seamlessClone(
                    np.ascontiguousarray(patch[..., ::-1]),
                    np.ascontiguousarray(host[..., ::-1]),
                    mask.astype(np.uint8) * 255,
                    centre,
                    cv2.NORMAL_CLONE,
                )[..., ::-1]
                return np.where(mask[..., None], cloned, host)
            except cv2.error:  # the clone's rectangle can clip at the border; fall back to alpha
                pass
    alpha = feathered_alpha(mask, float(rng.uniform(1.0, 5.0)))
    return np.where(mask[..., None], blend(host, patch, alpha), host)


# --------------------------------------------------------------------------------------------------
# The manipulations: each takes a host and returns (edited, mask) with edited == host outside mask


def warp_region(
    image: np.ndarray, source: np.ndarray, target_centre: tuple[float, float], angle: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and scale the pixels under `source` about their centre and move them to target_centre;
    returns the host-sized warped image and the warped (target) mask."""
    ys, xs = np.nonzero(source)
    centre = (float(xs.mean()), float(ys.mean()))
    matrix = cv2.getRotationMatrix2D(centre, angle, scale)
    matrix[:, 2] += np.array(target_centre) - np.array(centre)
    size = (image.shape[1], image.shape[0])
    warped = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    moved = cv2.warpAffine(source.astype(np.uint8), matrix, size, flags=cv2.INTER_NEAREST) > 0
    return warped, moved


def splice(rng, host, donor, shape):
    mask = place_shape(rng, shape, host.shape[:2], (0.03, 0.25))
    if rng.random() < 0.7:  # the donor has its own compression history
        donor = recompress(donor, int(rng.integers(60, 101)), int(rng.choice([0, 2])))
    scale = float(rng.uniform(0.6, 1.4))
    donor = cv2.resize(donor, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    height, width = host.shape[:2]
    if donor.shape[0] < height or donor.shape[1] < width:
        donor = cv2.copyMakeBorder(
            donor,
            0,
            max(0, height - donor.shape[0]),
            0,
            max(0, width - donor.shape[1]),
            cv2.BORDER_REFLECT,
        )
    y = int(rng.integers(0, donor.shape[0] - height + 1))
    x = int(rng.integers(0, donor.shape[1] - width + 1))
    patch = donor[y : y + height, x : x + width]
    if rng.random() < 0.8:
        patch = match_colour(patch, host, mask, float(rng.uniform(0.5, 1.0)))
    return paste(rng, host, patch, mask), mask


def copy_move(rng, host, donor, shape):
    height, width = host.shape[:2]
    source = place_shape(rng, shape, (height, width), (0.02, 0.12))
    ys, xs = np.nonzero(source)
    # a region wider or taller than half the image can only move along the other axis
    half_h = min((ys.max() - ys.min()) / 2 + 2, height / 2)
    half_w = min((xs.max() - xs.min()) / 2 + 2, width / 2)
    target = (float(rng.uniform(half_w, width - half_w)), float(rng.uniform(half_h, height - half_h)))
    angle = float(rng.uniform(-30, 30)) if rng.random() < 0.6 else 0.0
    scale = float(rng.uniform(0.8, 1.25)) if rng.random() < 0.6 else 1.0
    warped, mask = warp_region(host, source, target, angle, scale)
    if mask.sum() < 50:
        mask = source
        warped = cv2.GaussianBlur(host, (0, 0), 2.0)
    return paste(rng, host, warped, mask), mask


def removal(rng, host, donor, shape):
    mask = place_shape(rng, shape, host.shape[:2], (0.005, 0.03))
    method = cv2.INPAINT_TELEA if rng.random() < 0.5 else cv2.INPAINT_NS
    bgr = np.ascontiguousarray(host[..., ::-1])
    filled = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, float(rng.uniform(3, 9)), method)[..., ::-1]
    return np.where(mask[..., None], filled, host), mask


def retouch(rng, host, donor, shape):
    mask = place_shape(rng, shape, host.shape[:2], (0.03, 0.25))
    operation = str(rng.choice(["resample", "blur", "sharpen", "median", "noise"]))
    if operation == "resample":
        factor = float(rng.choice([rng.uniform(0.4, 0.8), rng.uniform(1.3, 2.0)]))
        small = cv2.resize(host, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        edited = cv2.resize(small, (host.shape[1], host.shape[0]), interpolation=cv2.INTER_CUBIC)
    elif operation == "blur":
        edited = cv2.GaussianBlur(host, (0, 0), float(rng.uniform(0.8, 2.5)))
    elif operation == "sharpen":
        soft = cv2.GaussianBlur(host, (0, 0), float(rng.uniform(0.8, 2.0)))
        edited = cv2.addWeighted(
            host, 1 + float(rng.uniform(0.6, 1.5)), soft, -float(rng.uniform(0.6, 1.5)), 0
        )
    elif operation == "median":
        edited = cv2.medianBlur(host, int(rng.choice([3, 5])))
    else:
        noise = rng.normal(0.0, float(rng.uniform(3.0, 9.0)), host.shape)
        edited = np.clip(host + noise, 0, 255).astype(np.uint8)
    return paste(rng, host, edited, mask), mask


def double_jpeg(rng, host, donor, shape):
    """The region and the rest carry different JPEG histories: different qualities, and the region's
    8x8 grid shifted or aligned."""
    mask = place_shape(rng, shape, host.shape[:2], (0.05, 0.3))
    quality = int(rng.choice(np.arange(55, 100, 5)))
    dy, dx = (0, 0) if rng.random() < 0.4 else (int(rng.integers(0, 8)), int(rng.integers(0, 8)))
    region = recompress(np.ascontiguousarray(host[dy:, dx:]), quality, int(rng.choice([0, 2])))
    region = cv2.copyMakeBorder(region, dy, 0, dx, 0, cv2.BORDER_REFLECT)
    # The rest keeps the host's own history; the post-processing JPEG then compresses both again.
    return np.where(mask[..., None], region, host), mask


MANIPULATIONS = {
    "splice": splice,
    "copy_move": copy_move,
    "removal": removal,
    "retouch": retouch,
    "double_jpeg": double_jpeg,
}


# --------------------------------------------------------------------------------------------------
# The synthesiser


@dataclass(frozen=True, eq=False)
class Synthesiser:
    """Pools of pristine hosts and object shapes; `make(rng)` returns one Forgery."""

    hosts: Sequence[np.ndarray]
    shapes: Sequence[np.ndarray] = ()
    kinds: tuple[str, ...] = KINDS
    weights: tuple[float, ...] = (0.35, 0.2, 0.1, 0.15, 0.2)
    post: PostProcess = field(default_factory=PostProcess)

    def make(self, rng: np.random.Generator, kind: str | None = None, pristine: bool = False) -> Forgery:
        host = self.hosts[int(rng.integers(len(self.hosts)))]
        host = fit_longest_side(host, int(rng.integers(HOST_SIDE[0], HOST_SIDE[1] + 1)))
        if pristine:
            edited, mask, kind = host, np.zeros(host.shape[:2], bool), "pristine"
        else:
            if kind is None:
                weights = np.asarray(self.weights[: len(self.kinds)], np.float64)
                kind = str(rng.choice(self.kinds, p=weights / weights.sum()))
            donor = self.hosts[int(rng.integers(len(self.hosts)))]
            shape = self.shapes[int(rng.integers(len(self.shapes)))] if self.shapes else ellipse_shape(rng)
            edited, mask = MANIPULATIONS[kind](rng, host, donor, shape)
        image, post_mask = self.post(rng, edited, mask)
        return Forgery(image, post_mask, kind, host, edited, mask)


def from_manifest(datasets: Sequence[str] = ("casia1",), max_side: int = 512) -> Synthesiser:
    """A synthesiser over `train`-split pristine photos (CASIA v1 authentic, optionally faces_real and
    ai_playground real photos) with shapes from CASIA v1 `train` masks."""
    from finetune.data import manifest_items, read_mask, read_rgb

    pristine = manifest_items(datasets, "train", labels=("authentic", "real_face", "real_photo"))
    hosts = [fit_longest_side(read_rgb(item.file), max_side) for item in pristine]
    tampered = [
        item for item in manifest_items(["casia1"], "train", labels=("manipulated",)) if item.mask_file
    ]
    shapes = shapes_from_masks([read_mask(item.mask_file) for item in tampered])
    log.info("synthesiser: %d hosts, %d shapes", len(hosts), len(shapes))
    return Synthesiser(hosts, shapes)


def preview(path: Path, n: int, seed: int) -> None:
    """A grid of n rows of (image | mask outline over image | mask) for a person to look at."""
    synthesiser = from_manifest(("casia1", "faces_real", "ai_playground"))
    rng = np.random.default_rng(seed)
    tiles = []
    for index in range(n):
        forgery = synthesiser.make(rng, kind=KINDS[index % len(KINDS)])
        image, mask = forgery.image, forgery.mask
        outline = image.copy()
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outline, contours, -1, (255, 0, 0), 1)
        row = np.concatenate([image, outline, np.repeat(mask[..., None] * 255, 3, 2).astype(np.uint8)], 1)
        row = cv2.resize(row, (3 * 256, round(256 * row.shape[0] / row.shape[1] * 3)))
        cv2.putText(row, forgery.kind, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        tiles.append(cv2.copyMakeBorder(row, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255)))
    columns = 2
    rows = []
    for start in range(0, len(tiles), columns):
        group = tiles[start : start + columns]
        height = max(t.shape[0] for t in group)
        group = [cv2.copyMakeBorder(t, 0, height - t.shape[0], 0, 0, cv2.BORDER_CONSTANT) for t in group]
        group += [np.zeros_like(group[0])] * (columns - len(group))
        rows.append(np.concatenate(group, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(rows, 0)[..., ::-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preview", type=Path, required=True, help="PNG grid to write")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    preview(args.preview, args.n, args.seed)
    print(f"wrote {args.preview}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
