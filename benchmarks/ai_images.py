"""The AI-generated-image expert on the test split: AUCs, false positives on pristine photos, speed.

    .venv/bin/python benchmarks/ai_images.py [--skip-speed]

- cifake test (32x32 JPEG, both classes alike as distributed): AUC and accuracy at the threshold.
- ai_playground test, raw and "resized alike": every image, of both classes, area-resized to a 384 px
  short side and saved as JPEG 90 before the expert sees it (raw, the classes differ by size: AI 559 px
  and ~49 KB, real 1080-2936 px and ~790 KB).
- False positives: how many pristine photos never trained on (kodak, exif_samples, skimage_data, CASIA v1
  authentic test) score at or above the expert's threshold, with the worst listed.
- Speed: median seconds on scikit-image's coffee resized to 1024x768 (JPEG 90) and on a 6000x4000 JPEG.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant.evaluate import default_manifest, read_manifest  # noqa: E402
from assistant.metrics import roc_auc  # noqa: E402
from experts import load_image  # noqa: E402
from experts.ai_generated import THRESHOLD, AIGeneratedImage  # noqa: E402

PRISTINE = ("kodak", "exif_samples", "skimage_data")
ALIKE_SIDE, ALIKE_QUALITY = 384, 90


def resized_alike(path: Path, side: int = ALIKE_SIDE, quality: int = ALIKE_QUALITY) -> bytes:
    """The image area-resized to this short side, as a JPEG at this quality (both classes alike)."""
    with Image.open(path) as opened:
        pixels = np.asarray(opened.convert("RGB"))
    height, width = pixels.shape[:2]
    scale = side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    buffer = io.BytesIO()
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    Image.fromarray(resized).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def scores_of(items, expert, alike: bool = False) -> list[tuple[str, int, float]]:
    rows = []
    for item in items:
        image = load_image(resized_alike(item.file), name=item.path) if alike else load_image(item.file)
        evidence = expert.analyze(image)
        rows.append((item.path, int(item.positive), float(evidence.score or 0.0)))
    return rows


def auc_line(name: str, rows: list[tuple[str, int, float]]) -> str:
    labels = np.array([r[1] for r in rows])
    scores = np.array([r[2] for r in rows])
    accuracy = float(((scores >= THRESHOLD) == labels.astype(bool)).mean())
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    return (
        f"{name:<34} n={len(rows):>4} ({positives} AI / {negatives} real)  "
        f"AUC {roc_auc(labels, scores):.3f}  "
        f"accuracy@{THRESHOLD} {accuracy:.3f}  mean score AI {scores[labels == 1].mean():.3f} / "
        f"real {scores[labels == 0].mean():.3f}"
    )


def false_positive_lines(name: str, rows: list[tuple[str, int, float]], worst: int = 5) -> list[str]:
    flagged = [r for r in rows if r[2] >= THRESHOLD]
    lines = [
        f"{name:<34} n={len(rows):>4}  called AI-generated: {len(flagged)} "
        f"({100.0 * len(flagged) / max(1, len(rows)):.1f}%)  median score "
        f"{statistics.median(r[2] for r in rows):.3f}"
    ]
    for path, _, score in sorted(rows, key=lambda r: -r[2])[:worst]:
        lines.append(f"    {score:.3f}  {path}")
    return lines


def speed(expert) -> list[str]:
    from skimage import data

    lines = []
    for width, height, repeats in ((1024, 768, 5), (6000, 4000, 3)):
        pixels = cv2.resize(data.coffee(), (width, height), interpolation=cv2.INTER_CUBIC)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        image = load_image(buffer.getvalue())
        expert.analyze(image)  # warm-up: weights, first-call allocations
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            expert.analyze(image)
            times.append(time.perf_counter() - began)
        lines.append(f"speed {width}x{height}: median {statistics.median(times):.3f} s over {repeats} runs")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    manifest = default_manifest()
    expert = AIGeneratedImage()

    print("## Detection (test split)")
    cifake = read_manifest(manifest, "test", ["cifake"])
    print(auc_line("cifake", scores_of(cifake, expert)))
    playground = read_manifest(manifest, "test", ["ai_playground"])
    print(auc_line("ai_playground (raw)", scores_of(playground, expert)))
    alike_rows = scores_of(playground, expert, alike=True)
    print(auc_line(f"ai_playground (alike: {ALIKE_SIDE}px, JPEG {ALIKE_QUALITY})", alike_rows))
    for path, label, score in alike_rows:
        print(f"    {score:.3f}  {'AI  ' if label else 'real'}  {path}")

    print(f"\n## False positives on pristine photos (score >= {THRESHOLD})")
    everything = []
    for dataset in PRISTINE:
        rows = scores_of(read_manifest(manifest, "test", [dataset]), expert)
        everything.extend(rows)
        print("\n".join(false_positive_lines(dataset, rows, worst=3)))
    print("\n".join(false_positive_lines("kodak + exif_samples + skimage_data", everything)))
    casia = [item for item in read_manifest(manifest, "test", ["casia1"]) if item.label == "authentic"]
    print("\n".join(false_positive_lines("casia1 authentic", scores_of(casia, expert))))

    if not args.skip_speed:
        print("\n## Speed")
        print("\n".join(speed(expert)))


if __name__ == "__main__":
    main()
