"""Face classifiers compared on `val`, as the benchmark normalises the test split: `python -m
benchmarks.faces_val [--checkpoint runs/faces5/checkpoint.pt ...]`.

Each recipe selects and calibrates on its own `val` files, normalised its own way (`--source-loss`
changes how), so their own val figures do not compare. This scores the shipped classifier and the best
state of each given checkpoint (calibrated as the recipe calibrates it) on one set of `val` files, made
with the benchmark's normalisation (finetune.faces.EncodeAlike defaults; 8 copies per face, as val is
small): a choice between recipes made here is made on `val`, never on `test`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from experts.faces import _classifier, build_classifier
from finetune.faces import EncodeAlike, normalised_set
from finetune.train_faces import calibrate, face_crops, predict, scores_by_kind


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", action="append", default=[], help="a train_faces checkpoint.pt")
    parser.add_argument("--crops", default="runs/faces_val", help="where the aligned val faces are cached")
    parser.add_argument("--max-real-called-fake", type=float, default=0.05)
    args = parser.parse_args()
    crops = face_crops("val", Path(args.crops))
    files, labels = normalised_set(crops, 1000, 8, EncodeAlike(), draw="compare|{path}|{variant}|{index}")
    print(f"val: {len(crops.paths)} faces, {len(files)} normalised files")
    print("shipped", scores_by_kind(predict(_classifier(), files), labels))
    for path in args.checkpoint:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = build_classifier(pretrained=True)
        model.load_state_dict(state["best"]["state"], strict=False)
        # Calibrated on other val files than those scored, as the recipe does after selection.
        calibration, calibration_labels = normalised_set(
            crops, 1001, 3, EncodeAlike(), draw="calibrate|{path}|{variant}|{index}"
        )
        offset = calibrate(model, calibration, calibration_labels, args.max_real_called_fake)
        print(
            f"{path} (best epoch {state['best']['epoch']}, offset {offset})",
            scores_by_kind(predict(model, files), labels),
        )


if __name__ == "__main__":
    main()
