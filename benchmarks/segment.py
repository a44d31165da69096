"""The promptable student segmenter and the refinement step, against the targets of their issue.

    .venv/bin/python -m benchmarks.segment [--split test] [--threads 1] [--source manipulation]

Prints:
  - the student's parameter count (target <= 10M);
  - the median milliseconds of one `predict` (a box prompt) after `set_image`, on the CPU with
    `--threads` torch threads, over CASIA v1 images (target <= 150 ms);
  - mean IoU on CASIA v1 tampered images of the split, prompted with ground-truth boxes: one box per
    connected component of the mask of at least 64 pixels, the union of the predicted masks compared
    with the whole mask (target >= 0.75); beside it the IoU of the boxes themselves, filled, as a
    baseline;
  - mean pixel-F1 of the `--source` expert's mask (default: the manipulation localiser) on the same
    images, without and with refinement (experts/refine.py), and the difference (target >= +0.03)
    with its 95% interval (paired bootstrap over the images: how far the split's size lets it move).
Test is for reporting only; tune on `--split val`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from assistant.evaluate import default_manifest, read_manifest
from assistant.metrics import f1_score, iou
from experts.image import load_image
from finetune.data import read_mask, read_rgb
from finetune.train_student import component_boxes


def casia_tampered(split: str, limit: int) -> list:
    items = read_manifest(default_manifest(), split=split, datasets=["casia1"])
    items = [i for i in items if i.label == "manipulated" and i.mask_file]
    return items[:limit] if limit else items


def speed(predictor, images: list[np.ndarray], repeats: int) -> float:
    timings = []
    for pixels in images:
        predictor.set_image(pixels)
        h, w = pixels.shape[:2]
        box = np.array([w * 0.3, h * 0.3, w * 0.7, h * 0.7], np.float32)
        predictor.predict(box=box)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.predict(box=box)
            timings.append(time.perf_counter() - start)
    return 1000 * statistics.median(timings)


def box_iou(predictor, items) -> tuple[float, float, float]:
    """(mean IoU with component boxes, with the whole mask's box, of the filled boxes themselves)."""
    per_component, whole, filled = [], [], []
    for item in tqdm(items, desc="box prompts", leave=False):
        pixels = read_rgb(item.file)
        truth = read_mask(item.mask_file, pixels.shape[:2])
        boxes = component_boxes(truth)
        predictor.set_image(pixels)
        union = np.zeros(truth.shape, bool)
        baseline = np.zeros(truth.shape, bool)
        for box in boxes:
            masks, _, _ = predictor.predict(box=np.array(box, np.float32))
            union |= masks[0]
            x0, y0, x1, y1 = (int(v) for v in box)
            baseline[y0 : y1 + 1, x0 : x1 + 1] = True
        ys, xs = np.nonzero(truth)
        masks, _, _ = predictor.predict(box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32))
        predictor.reset_image()
        per_component.append(iou(truth, union))
        whole.append(iou(truth, masks[0]))
        filled.append(iou(truth, baseline))
    return float(np.mean(per_component)), float(np.mean(whole)), float(np.mean(filled))


def refinement_f1(items, source: str, **settings) -> tuple[np.ndarray, np.ndarray, int]:
    """(per-image pixel-F1 of the source expert's mask, of the refined mask, images where they differ)."""
    from experts.refine import RefinedLocalisation
    from experts.runner import run_expert

    expert = RefinedLocalisation(source=source, **settings)
    before, after, changed = [], [], 0
    for item in tqdm(items, desc="refinement", leave=False):
        image = load_image(item.file)
        truth = read_mask(item.mask_file, (image.height, image.width))
        coarse = run_expert(image, source)
        refined = expert.analyze(image)
        coarse_mask = coarse.mask if coarse.mask is not None else np.zeros(truth.shape, bool)
        refined_mask = refined.mask if refined.mask is not None else coarse_mask
        before.append(f1_score(truth, coarse_mask))
        after.append(f1_score(truth, refined_mask))
        changed += int((coarse_mask != refined_mask).any())
    return np.array(before), np.array(after), changed


def bootstrap_interval(differences: np.ndarray, draws: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of paired per-image differences, resampling the images."""
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(differences), (draws, len(differences)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--limit", type=int, default=0, help="first N tampered images (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed predicts per image (speed)")
    parser.add_argument("--source", default="manipulation", help="the expert whose mask is refined")
    parser.add_argument("--confirm-iou", type=float, default=None, help="override the expert's setting")
    parser.add_argument("--unconfirmed", choices=("drop", "keep"), default=None)
    parser.add_argument("--max-regions", type=int, default=None, help="override the expert's setting")
    parser.add_argument(
        "--prompt-threshold",
        default=None,
        help="override the expert's setting: a threshold of the heatmap, or \"mask\" for the source's mask",
    )
    parser.add_argument(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the expert's setting",
    )
    parser.add_argument("--skip-refinement", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from experts.student import load_student, parameter_count, student_predictor

    predictor = student_predictor()
    items = casia_tampered(args.split, args.limit)
    params = parameter_count(load_student())
    milliseconds = speed(predictor, [read_rgb(i.file) for i in items[:5]], args.repeats)
    print(f"CASIA v1 {args.split}: {len(items)} tampered images; torch threads: {args.threads}")
    print("| measure | value | target |\n|---|---|---|")
    print(f"| student parameters | {params / 1e6:.2f}M | <= 10M |")
    print(f"| predict after set_image (median, box prompt) | {milliseconds:.1f} ms | <= 150 ms |")
    per_component, whole, filled = box_iou(predictor, items)
    print(f"| mean IoU, ground-truth component boxes | {per_component:.3f} | >= 0.75 |")
    print(f"| mean IoU, one box around the whole mask | {whole:.3f} | |")
    print(f"| mean IoU of the filled boxes themselves (baseline) | {filled:.3f} | |")
    if not args.skip_refinement:
        settings = {}
        if args.confirm_iou is not None:
            settings["confirm_iou"] = args.confirm_iou
        if args.unconfirmed is not None:
            settings["unconfirmed"] = args.unconfirmed
        if args.max_regions is not None:
            settings["max_regions"] = args.max_regions
        if args.prompt_threshold is not None:
            mask = args.prompt_threshold == "mask"
            settings["threshold"] = None if mask else float(args.prompt_threshold)
        if args.mask_prompt is not None:
            settings["use_mask_prompt"] = args.mask_prompt
        before, after, changed = refinement_f1(items, args.source, **settings)
        low, high = bootstrap_interval(after - before)
        print(f"| pixel-F1 of {args.source} mask | {before.mean():.3f} | |")
        print(f"| pixel-F1 of {args.source} mask, refined | {after.mean():.3f} | |")
        print(
            f"| refinement gain ({changed} images changed; 95% interval) | "
            f"{after.mean() - before.mean():+.3f} ({low:+.3f} to {high:+.3f}) | >= +0.03 |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
