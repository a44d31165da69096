"""Printed text and copy-move (stop 36): are a page's repeated words taken for clones?

    .venv/bin/python -m benchmarks.printed_pages [--seeds 0-149] [--font PATH] [--casia [--resize F]
        [--jpeg-quality Q]]

A photographed page repeats its words ("the", "of", a name), and copy-move, which looks for a region
found twice, took them for clones. This draws photographed pages (`drawn_page`: words from a short
list, so they recur; uneven light, soft focus, noise, a tilt of up to 5 degrees, 0.8-2x, JPEG 60-95)
and counts the pages copy-move scores 0.5 or more, and those where it set repeated printed words aside
(`printed_words_not_counted`). Seeds 0-149 with Pillow's default font are the pages the lettering rule
(`experts/copy_move.py`, LETTER_*) was chosen on; other seeds and another font (`--font
/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf`) are held out. `--casia` also runs copy-move on CASIA
v1 `train` and `val` and counts the images where a duplication was set aside as printed words (real
clones must not be), as stored or handled as `forensics eval` handles them (`--resize 0.5`: area
interpolation, saved as PNG; `--jpeg-quality Q`). Never reads `test`.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from assistant.evaluate import default_manifest, read_manifest, transform_image
from experts import load_image
from experts.copy_move import CopyMove

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "markers",
    "coins",
    "background",
    "pixels",
    "image",
    "region",
    "label",
    "object",
    "data",
    "either",
    "parts",
    "extreme",
    "grey",
    "values",
    "histogram",
    "first",
    "determine",
    "these",
    "found",
    "that",
    "we",
    "can",
    "are",
    "at",
    "is",
]


def drawn_page(seed: int, font_path: str | None = None) -> bytes:
    """A photographed page of text whose words recur, as a JPEG file (deterministic by seed)."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(13, 30))
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size=size)
    width, lines = int(rng.integers(380, 900)), int(rng.integers(5, 12))
    height = int(lines * size * 1.5 + 2 * size)
    page = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(page)
    ink = int(rng.integers(0, 70))
    for line in range(lines):
        draw.text((size, size + line * size * 1.5), " ".join(rng.choice(WORDS, 20)), font=font, fill=ink)
    coverage = np.asarray(page, np.float32) / 255
    yy, xx = np.mgrid[:height, :width]
    light = 0.75 + 0.25 * (1 - ((xx / width - rng.random()) ** 2 + (yy / height - rng.random()) ** 2))
    paper = float(rng.uniform(170, 240))
    pixels = (ink + (paper - ink) * coverage) * light + rng.normal(0, rng.uniform(1, 5), coverage.shape)
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    photo = photo.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    photo = photo.rotate(float(rng.uniform(-5, 5)), Image.Resampling.BICUBIC, fillcolor=int(paper * 0.8))
    scale = float(rng.uniform(0.8, 2.0))
    photo = photo.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.convert("RGB").save(buffer, "JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0-149", help="first-last seed of the drawn pages")
    parser.add_argument("--font", default=None, help="a TrueType font file (default: Pillow's own)")
    parser.add_argument("--casia", action="store_true", help="also CASIA v1 train and val")
    parser.add_argument("--resize", type=float, default=None, help="CASIA images resized by this factor")
    parser.add_argument(
        "--jpeg-quality", type=int, default=None, help="CASIA images re-saved at this quality"
    )
    args = parser.parse_args()
    first, last = (int(part) for part in args.seeds.split("-"))
    expert = CopyMove()
    scores, set_aside = [], 0
    for seed in range(first, last + 1):
        evidence = expert.analyze(load_image(drawn_page(seed, args.font)))
        scores.append(evidence.score)
        set_aside += evidence.details.get("printed_words_not_counted", 0) > 0
    scores = np.array(scores)
    print(
        f"drawn pages {first}-{last} ({args.font or 'default font'}): {len(scores)} pages, copy-move >= 0.5 "
        f"on {int((scores >= 0.5).sum())}, >= 0.15 on {int((scores >= 0.15).sum())}; printed words set aside "
        f"on {set_aside}"
    )
    if args.casia:
        items = read_manifest(default_manifest(), split="all", datasets=["casia1"])
        items = [item for item in items if item.split in ("train", "val")]
        touched = []
        for item in items:
            image = transform_image(load_image(item.file), args.jpeg_quality, args.resize)
            evidence = expert.analyze(image)
            if evidence.details.get("printed_words_not_counted", 0):
                touched.append(f"{item.path} ({item.label}, copy-move {evidence.score:.2f})")
        handled = (
            f" (resize {args.resize}, JPEG quality {args.jpeg_quality})"
            if args.resize or args.jpeg_quality
            else ""
        )
        print(f"CASIA v1 train+val{handled}: {len(items)} images, printed words set aside on {len(touched)}")
        for line in touched:
            print("  " + line)


if __name__ == "__main__":
    main()
