"""How the fused heatmap is marked, checked out of fold on CASIA v1 `val` (stop 35):

    .venv/bin/python -m benchmarks.fused_marking [--out runs/fusion] [--folds 5]

The pixel model (finetune/train_fusion.py, `fit_pixel_model`) is refitted on four folds of CASIA `val`
(as stored and re-saved at JPEG 90, as shipped) with its threshold and each marking choice, and
scored on the fifth, as stored and at JPEG 90 and 70: without a relative share or smoothing, with
the share (experts.fusion.marking_threshold), and with both (experts.fusion.smoothed). The experts'
maps are cached by the fusion recipe under `--out` (computed once if missing). Never reads `test`.
"""

from __future__ import annotations

import argparse

import numpy as np

from finetune.train_fusion import FusionConfig, collect, fit_pixel_model, fold_of, mean_pixel_f1

EXPERTS = (
    "ela",
    "noise",
    "jpeg",
    "copy_move",
    "metadata",
    "frequency",
    "ai_generated",
    "faces",
    "manipulation",
)
FITTED, SCORED = ("raw", "jpeg90"), ("raw", "jpeg90", "jpeg70")
CHOICES = {
    "threshold only": {"relative_shares": (), "smoothing_shares": ()},
    "with the relative share": {"smoothing_shares": ()},
    "with the share and smoothing (shipped)": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/fusion", help="the fusion recipe's folder (its cache)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    config = FusionConfig(out=args.out, datasets=("casia1",), variants=SCORED, experts=EXPERTS)
    records = collect(config)
    print(f"CASIA v1 val, {args.folds}-fold; mean pixel-F1 of the held-out forgeries")
    print("| marking | " + " | ".join(SCORED) + " | drop q90 -> q70 | chosen per fold |")
    print("|---|" + "---:|" * (len(SCORED) + 1) + "---|")
    for name, overrides in CHOICES.items():
        scores, chosen = {v: [] for v in SCORED}, []
        for fold in range(args.folds):
            train = [r for r in records if fold_of(r, args.folds) != fold and r["variant"] in FITTED]
            ones = np.ones(len(train))
            fields, _ = fit_pixel_model(FusionConfig(**overrides), train, ones, ones)
            chosen.append(
                f"{fields['pixel_threshold']:g}/{fields['pixel_relative']:g}/{fields['pixel_smoothing']:g}"
            )
            held = [r for r in records if fold_of(r, args.folds) == fold and r["truth"] is not None]
            for variant in SCORED:
                alike = [r for r in held if r["variant"] == variant and r["truth"].any()]
                f1 = mean_pixel_f1(
                    alike,
                    fields["pixel_experts"],
                    np.array(fields["pixel_weight"]),
                    fields["pixel_bias"],
                    fields["pixel_threshold"],
                    np.ones(len(alike)),
                    fields["pixel_relative"],
                    fields["pixel_smoothing"],
                )
                scores[variant].append((f1, len(alike)))
        means = {v: np.average([f for f, _ in s], weights=[n for _, n in s]) for v, s in scores.items()}
        cells = " | ".join(f"{means[v]:.3f}" for v in SCORED)
        print(
            f"| {name} | {cells} | {means['jpeg90'] - means['jpeg70']:.3f} | {', '.join(chosen)} |",
            flush=True,
        )
    print("chosen per fold: threshold / relative share / smoothing")


if __name__ == "__main__":
    main()
