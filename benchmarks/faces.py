"""Deepfake-face expert benchmark: `python -m benchmarks.faces` (the figures on the faces model card).

1. AUC on the format-normalised `test` split: StyleGAN3 fakes and self-blended fakes made from the real
   `test` faces, against the real `test` faces, every one detected, aligned, cropped and re-encoded
   alike (finetune.faces.EncodeAlike), then classified as the expert does (mirror-averaged).
2. The format-only baseline: a logistic regression on file type, file size, image size, quantisation
   tables and subsampling, fitted on `train` and scored on `test`, once on the normalised files (should
   be near 0.5) and once on the raw files (near 1.0: why the normalisation matters).
3. False positives of the whole expert on pristine photos (kodak, exif_samples, skimage_data and the
   CASIA v1 authentic `test` images): how many it calls fake (score >= 0.5), and the worst ones.
4. Speed of the whole expert on a 1024x768 image with one face and on a 6000x4000 one.

`--detector mtcnn` runs all four with MTCNN in place of BlazeFace (the expert's option; the classifier
was trained on BlazeFace's crops).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import cv2
import numpy as np

from assistant.evaluate import default_manifest, read_manifest
from assistant.metrics import roc_auc
from experts.faces import DEFAULT_DETECTOR, FACE_DETECTORS, DeepfakeFaces, classify_crops
from experts.image import load_image
from finetune.faces import (
    BLENDED,
    GAN,
    REAL,
    EncodeAlike,
    decode,
    format_baseline,
    normalised_set,
    read_face_crops,
)

PRISTINE = ("kodak", "exif_samples", "skimage_data")


def face_items(split: str):
    items = read_manifest(default_manifest(), split=split, datasets=["faces_real", "faces_stylegan"])
    return items, [GAN if item.positive else REAL for item in items]


def normalised_scores(args: argparse.Namespace) -> None:
    cache = Path(args.out)
    test_items, test_labels = face_items("test")
    train_items, train_labels = face_items("train")
    suffix = "" if args.detector == DEFAULT_DETECTOR else f"_{args.detector}"
    test_crops = read_face_crops(test_items, test_labels, cache / f"crops_test{suffix}.npz", args.detector)
    train_crops = read_face_crops(
        train_items, train_labels, cache / f"crops_train{suffix}.npz", args.detector
    )
    print(
        f"faces aligned: test {int((test_crops.labels == REAL).sum())} real, "
        f"{int((test_crops.labels == GAN).sum())} StyleGAN (of {len(test_items)} files)"
    )
    encode = EncodeAlike()
    files, labels = normalised_set(test_crops, args.seed, args.variants, encode)
    probabilities = np.concatenate(
        [classify_crops(np.stack([decode(d) for d in files[i : i + 32]])) for i in range(0, len(files), 32)]
    )
    fake = 1.0 - probabilities[:, REAL]
    counts = np.bincount(labels, minlength=3)
    print(
        f"\nnormalised test ({args.variants} copies per face): {counts[REAL]} real, {counts[GAN]} StyleGAN, "
        f"{counts[BLENDED]} self-blended"
    )
    print(f"  AUC all fakes vs real:        {roc_auc(labels != REAL, fake):.4f}")
    for name, kind in (("StyleGAN vs real:", GAN), ("self-blended vs real:", BLENDED)):
        keep = (labels == REAL) | (labels == kind)
        print(f"  AUC {name:26s}{roc_auc(labels[keep] == kind, fake[keep]):.4f}")
    print(f"  real called fake (>= 0.5):    {np.mean(fake[labels == REAL] >= 0.5):.3f}")
    print(f"  StyleGAN caught (>= 0.5):     {np.mean(fake[labels == GAN] >= 0.5):.3f}")
    print(f"  self-blended caught (>= 0.5): {np.mean(fake[labels == BLENDED] >= 0.5):.3f}")

    train_files, train_set_labels = normalised_set(train_crops, args.seed + 1, args.variants, encode)
    normalised = format_baseline(train_files, train_set_labels, files, labels)
    raw_train = [item.file.read_bytes() for item in train_items]
    raw_test = [item.file.read_bytes() for item in test_items]
    raw = format_baseline(raw_train, np.array(train_labels), raw_test, np.array(test_labels))
    print(
        "\nformat-only baseline (logistic regression on file type, size, image size, q-tables, subsampling)"
    )
    print(f"  on the normalised test files: AUC {normalised:.4f}   (near 0.5: no container shortcut)")
    print(f"  on the raw test files:        AUC {raw:.4f}   (StyleGAN PNG vs real, mostly JPEG)")


def false_positives(args: argparse.Namespace) -> None:
    expert = DeepfakeFaces(detector=args.detector)
    items = read_manifest(default_manifest(), split="test", datasets=[*PRISTINE, "casia1"])
    items = [item for item in items if item.label == "authentic" or item.dataset in PRISTINE]
    rows = []
    for item in items:
        evidence = expert.analyze(load_image(item.file))
        rows.append((item, evidence))
    print(f"\nfalse positives on pristine test photos ({', '.join(PRISTINE)}, CASIA v1 authentic test)")
    for dataset in (*PRISTINE, "casia1"):
        subset = [(item, e) for item, e in rows if item.dataset == dataset]
        with_face = [e for _, e in subset if e.applicable]
        called = [e for e in with_face if e.score >= 0.5]
        print(
            f"  {dataset:13s} {len(subset):4d} images, {len(with_face):3d} with a face, "
            f"{len(called):3d} called fake"
        )
    worst = sorted((r for r in rows if r[1].applicable), key=lambda r: -r[1].score)[: args.worst]
    print("  most suspicious:")
    for item, evidence in worst:
        print(f"    {evidence.score:.3f}  {item.path}  ({evidence.details['faces_found']} face(s))")


def speed(detector: str) -> None:
    from skimage import data

    expert = DeepfakeFaces(detector=detector)
    astronaut = data.astronaut()
    cases = {
        "1024x768, one face": cv2.resize(astronaut, (1024, 768), interpolation=cv2.INTER_CUBIC),
        "6000x4000, one face": cv2.resize(astronaut, (6000, 4000), interpolation=cv2.INTER_CUBIC),
    }
    print("\nspeed of the whole expert (median of 5 after one warm-up)")
    for name, pixels in cases.items():
        image = load_image(pixels)
        expert.analyze(image)
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            evidence = expert.analyze(image)
            seconds.append(time.perf_counter() - start)
        print(f"  {name}: {np.median(seconds):.3f} s (score {evidence.score}, {len(evidence.regions)} face)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/faces_bench", help="cache of aligned crops")
    parser.add_argument("--detector", choices=FACE_DETECTORS, default=DEFAULT_DETECTOR)
    parser.add_argument("--variants", type=int, default=4, help="normalised copies per test face")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--worst", type=int, default=8)
    parser.add_argument("--no-false-positives", dest="false_positives", action="store_false")
    parser.add_argument("--no-speed", dest="speed", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    normalised_scores(args)
    if args.false_positives:
        false_positives(args)
    if args.speed:
        speed(args.detector)


if __name__ == "__main__":
    main()
