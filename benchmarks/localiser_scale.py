"""The manipulation localiser against the size it works at (its `working_side`), on `val` only.

    .venv/bin/python -m benchmarks.localiser_scale [--sides 384,448,512] [--per-host 4]

The network was trained on crops of photos whose longest side lay between about 230 and 600 pixels
(CASIA's 384, the synthesiser's 384-512, then resized 0.6-1.2x) and calibrated on CASIA v1 `val`
(384x256). Larger photos are shrunk to the working side first. For each side this prints, through
the expert itself (`ManipulationLocaliser(working_side=...)`):

- CASIA v1 `val` as stored: image AUC and mean pixel-F1 over the tampered images;
- the mean score on the authentic `val` photos of each data set: a score that means the same on
  every kind of photo should not run higher on faces_real or the playground's photos than on CASIA's;
- forgeries made by finetune/synth.py in the full-size `val` photos of faces_real and ai_playground
  (their longest side capped at 1024; shapes from CASIA v1 `val` masks; every image, forged or not,
  re-saved at JPEG 90): image AUC against the same photos untouched, and mean pixel-F1.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from experts import load_image
from experts.manipulation import ManipulationLocaliser
from experts.maps import fit_longest_side
from finetune.augment import recompress
from finetune.data import manifest_items, read_mask, read_rgb
from finetune.synth import MANIPULATIONS, shapes_from_masks
from finetune.train_localiser import LocaliserConfig, f1, load_validation, roc_auc

FORGERY_KINDS = ("splice", "copy_move", "removal", "retouch")
MAX_SIDE = 1024
AUTHENTIC = {"casia1": ["authentic"], "faces_real": ["real_face"], "ai_playground": ["real_photo"]}


def val_forgeries(per_host: int, seed: int = 0):
    """(image, forged, truth mask or None) as `load_validation` gives them: each full-size non-CASIA
    val photo untouched, then `per_host` forgeries of it, all re-saved at JPEG 90."""
    rng = np.random.default_rng(seed)
    casia = manifest_items(["casia1"], "val", ["manipulated"])
    shapes = shapes_from_masks([read_mask(i.mask_file) for i in casia if i.mask_file])
    photos = [
        fit_longest_side(read_rgb(i.file), MAX_SIDE)
        for i in manifest_items(["faces_real", "ai_playground"], "val", ["real_face", "real_photo"])
    ]
    examples = []
    for index, host in enumerate(photos):
        examples.append((recompress(host, 90), False, None))
        for k in range(per_host):
            donor = photos[(index + 1 + k) % len(photos)]
            kind = FORGERY_KINDS[(index + k) % len(FORGERY_KINDS)]
            edited, mask = MANIPULATIONS[kind](rng, host, donor, shapes[int(rng.integers(len(shapes)))])
            examples.append((recompress(edited, 90), True, mask))
    return examples


def measure(expert: ManipulationLocaliser, examples: Sequence[tuple[np.ndarray, bool, np.ndarray | None]]):
    """(image AUC, mean pixel-F1 over the images with a truth mask) of (image, positive, truth)."""
    scores, labels, pixel = [], [], []
    for image, positive, truth in examples:
        evidence = expert.analyze(load_image(image))
        scores.append(evidence.score)
        labels.append(positive)
        if truth is not None and truth.any():
            pixel.append(f1(evidence.mask, truth))
    return roc_auc(np.array(labels), np.array(scores)), float(np.mean(pixel))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="384,448,512", help="working sides to compare")
    parser.add_argument("--per-host", type=int, default=4, help="forgeries made in each val photo")
    args = parser.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")]

    casia = load_validation(LocaliserConfig(), quality=None)
    authentic = {
        name: [read_rgb(i.file) for i in manifest_items([name], "val", labels)]
        for name, labels in AUTHENTIC.items()
    }
    forgeries = val_forgeries(args.per_host)
    counts = ", ".join(f"{name} {len(photos)}" for name, photos in authentic.items())
    forged = sum(positive for _, positive, _ in forgeries)
    print(
        f"val: CASIA v1 {len(casia)} images; authentic {counts}; "
        f"{len(forgeries) - forged} full-size photos with {forged} forgeries"
    )
    print(
        "| working side | CASIA AUC | CASIA pixel-F1 | "
        + " | ".join(f"mean score, {name} authentic" for name in authentic)
        + " | forgeries AUC | forgeries pixel-F1 |"
    )
    print("|---:" * (5 + len(authentic)) + "|")
    for side in sides:
        expert = ManipulationLocaliser(working_side=side)
        casia_auc, casia_f1 = measure(expert, casia)
        means = [
            np.mean([expert.analyze(load_image(p)).score for p in photos]) for photos in authentic.values()
        ]
        forged_auc, forged_f1 = measure(expert, forgeries)
        cells = [
            f"{casia_auc:.3f}",
            f"{casia_f1:.3f}",
            *(f"{m:.3f}" for m in means),
            f"{forged_auc:.3f}",
            f"{forged_f1:.3f}",
        ]
        print(f"| {side} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
