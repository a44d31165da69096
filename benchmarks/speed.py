"""Median seconds per expert, and for all of them together, on a 1024x768 JPEG.

    .venv/bin/python benchmarks/speed.py [--repeats 7] [--size 1024x768]

The image is scikit-image's `coffee` photo resized to the requested size and saved as JPEG
(quality 90); the expert cache is cleared before every repeat, so every run is cold.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import cv2
from PIL import Image
from skimage import data

from experts import available_experts, get_expert, load_image


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", default="1024x768")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    buffer = io.BytesIO()
    pixels = cv2.resize(data.coffee(), (width, height), interpolation=cv2.INTER_AREA)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    image = load_image(buffer.getvalue())
    names = available_experts()
    for name in names:  # warm-up: imports, lazy weights
        get_expert(name).analyze(image)
    per_expert: dict[str, list[float]] = {name: [] for name in names}
    totals = []
    for _ in range(args.repeats):
        total_start = time.perf_counter()
        for name in names:
            start = time.perf_counter()
            get_expert(name).analyze(image)
            per_expert[name].append(time.perf_counter() - start)
        totals.append(time.perf_counter() - total_start)
    print(f"{width}x{height} JPEG, {args.repeats} repeats, median seconds")
    print("| expert | median s |\n|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(per_expert[name]):.3f} |")
    print(f"| **all experts** | **{statistics.median(totals):.3f}** |")


if __name__ == "__main__":
    main()
