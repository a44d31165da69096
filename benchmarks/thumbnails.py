"""Photos shrunk to thumbnail size: what the AI-image detector and the fused verdict say about them.

    .venv/bin/python -m benchmarks.thumbnails [--split test] [--sides 32,48,64] [--no-fused]

An image with a short side of at most 64 px is a thumbnail (experts.fusion.THUMBNAIL_SIDE): the
editing experts see little in it and the AI-image detector judges it with networks trained for
thumbnails. CIFAKE's are 32x32; this asks how they fare on other small images. Every image of CASIA v1
(authentic only: its forgeries are edits, not generated), faces_real, faces_stylegan and ai_playground
is shrunk (area) to each short side and saved as JPEG 90, both classes alike (resized_alike).
Reported per side: the detector's rate of scores >= 0.5 on real and on generated images, its AUC, and
the fused verdicts (real: accused / uncertain / cleared; generated: caught / uncertain / missed).
"""

from __future__ import annotations

import argparse

import numpy as np

from assistant.analysis import analyze
from assistant.evaluate import default_manifest, read_manifest
from assistant.metrics import roc_auc
from benchmarks.ai_images import resized_alike
from experts import load_image
from experts.ai_generated import AIGeneratedImage

DATASETS = ("casia1", "faces_real", "faces_stylegan", "ai_playground")
EXPERTS = [  # the README's evaluation: every expert but the segmenter, which the fusion does not use
    *("ela", "noise", "jpeg", "copy_move", "metadata", "frequency", "c2pa", "invisible_watermark"),
    *("watermark", "manipulation", "ai_generated", "faces"),
]
QUALITY = 90


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--sides", default="32,48,64", help="short sides in pixels, comma-separated")
    parser.add_argument("--no-fused", action="store_true", help="the detector alone (faster)")
    args = parser.parse_args()
    items = [
        item
        for item in read_manifest(default_manifest(), split=args.split, datasets=list(DATASETS))
        if not (item.dataset == "casia1" and item.positive)
    ]
    detector = AIGeneratedImage()
    generated = sum(item.positive for item in items)
    print(f"{args.split}: {len(items) - generated} real, {generated} generated")
    print(
        "| side | real called AI (detector) | generated called AI (detector) | detector AUC | fused, real: "
        "accused / uncertain / cleared | fused, generated: caught / uncertain / missed |"
    )
    print("|---:|---:|---:|---:|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        labels, scores, verdicts = [], [], {True: [0, 0, 0], False: [0, 0, 0]}
        for item in items:
            image = load_image(resized_alike(item.file, side, QUALITY), name=item.path)
            labels.append(item.positive)
            scores.append(float(detector.analyze(image).score or 0.0))
            if not args.no_fused:
                label = analyze(image, EXPERTS).verdict.label
                verdicts[item.positive][{"authentic": 2, "uncertain": 1}.get(label, 0)] += 1
        truth, values = np.array(labels), np.array(scores)
        fused = {k: " / ".join(map(str, v)) if not args.no_fused else "-" for k, v in verdicts.items()}
        print(
            f"| {side} | {np.mean(values[~truth] >= 0.5):.0%} of {(~truth).sum()} | "
            f"{np.mean(values[truth] >= 0.5):.0%} of {truth.sum()} | {roc_auc(truth, values):.3f} | "
            f"{fused[False]} | {fused[True]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
