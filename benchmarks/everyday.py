"""Pristine photos after everyday handling: does the fused verdict accuse them?

    .venv/bin/python -m benchmarks.everyday [--datasets kodak,exif_samples,skimage_data] [--variants ...]

A photo reaches a fact-checker re-saved by a messaging app, shrunk by a social network, brightened,
cropped, with a credit line burnt in, as a screenshot of the post that carried it, enlarged,
sharpened, through a colour filter, or turned a quarter. None of that is
the kind of manipulation the product looks for, and a false accusation is its worst failure. Every
pristine `test` photo (by default `clean_photos`, which nothing was trained or tuned on) goes through
each handling below, and the table gives the fused verdicts: accused (manipulated or AI-generated),
uncertain, cleared, with the accused ones named and the fusion rules that bounded verdicts counted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from assistant.analysis import analyze
from assistant.evaluate import default_manifest, read_manifest
from benchmarks.thumbnails import EXPERTS
from experts import load_image
from experts.maps import fit_longest_side
from finetune.faces import jpeg_bytes, png_bytes

DATASETS = "kodak,exif_samples,skimage_data"
SUBSAMPLING = 2  # 4:2:0, Pillow's default; every JPEG here is saved without metadata, as platforms strip it


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def messaging(image: Image.Image) -> bytes:
    """As a messaging app forwards a photo: long side at most 1600 px, JPEG 70, metadata gone."""
    return jpeg_bytes(fit_longest_side(_rgb(image), 1600), 70, SUBSAMPLING)


def social(image: Image.Image) -> bytes:
    """As a social network shows it: long side at most 1080 px, JPEG 85."""
    return jpeg_bytes(fit_longest_side(_rgb(image), 1080), 85, SUBSAMPLING)


def adjusted(image: Image.Image) -> bytes:
    """Brightness +15%, contrast +10%, saturation +20% over the whole photo, JPEG 90."""
    image = ImageEnhance.Brightness(image.convert("RGB")).enhance(1.15)
    image = ImageEnhance.Contrast(image).enhance(1.1)
    return jpeg_bytes(_rgb(ImageEnhance.Color(image).enhance(1.2)), 90, SUBSAMPLING)


def cropped(image: Image.Image) -> bytes:
    """The centre 80% each way, JPEG 90."""
    width, height = image.size
    left, top = round(width * 0.1), round(height * 0.1)
    return jpeg_bytes(_rgb(image.crop((left, top, width - left, height - top))), 90, SUBSAMPLING)


def credit_line(image: Image.Image) -> bytes:
    """A caption strip with a credit line burnt into the bottom, as agencies and news sites add, JPEG 90."""
    image = image.convert("RGB")
    size = max(12, image.height // 28)
    draw = ImageDraw.Draw(image, "RGBA")
    draw.rectangle((0, image.height - 2 * size, image.width, image.height), fill=(0, 0, 0, 140))
    font = ImageFont.load_default(size=size)
    draw.text(
        (size // 2, image.height - 1.6 * size), "Photo: J. Smith / Example Agency", font=font, fill="white"
    )
    return jpeg_bytes(_rgb(image), 90, SUBSAMPLING)


def enlarged(image: Image.Image) -> bytes:
    """Enlarged 1.5x (bicubic), as a page or a screen at a higher pixel density shows it, JPEG 90."""
    image = image.convert("RGB")
    size = (round(image.width * 1.5), round(image.height * 1.5))
    return jpeg_bytes(_rgb(image.resize(size, Image.Resampling.BICUBIC)), 90, SUBSAMPLING)


def sharpened(image: Image.Image) -> bytes:
    """An unsharp mask over the whole photo (radius 2, 80%), as editors and phones apply, JPEG 90."""
    return jpeg_bytes(_rgb(image.convert("RGB").filter(ImageFilter.UnsharpMask(2, 80, 2))), 90, SUBSAMPLING)


def warm_vignette(image: Image.Image) -> bytes:
    """A photo filter: a warmer tone and a vignette darkening the corners by up to 45%, JPEG 90."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    height, width = rgb.shape[:2]
    y, x = np.mgrid[:height, :width]
    radius = np.hypot((x - width / 2) / (width / 2), (y - height / 2) / (height / 2)) / np.sqrt(2)
    rgb = rgb * (1.0 - 0.45 * radius**2)[..., None] * np.array([1.06, 1.0, 0.9], np.float32)
    return jpeg_bytes(np.clip(rgb, 0, 255).astype(np.uint8), 90, SUBSAMPLING)


def turned(image: Image.Image) -> bytes:
    """Turned a quarter, as a phone's editor saves it (pixels rotated, not an EXIF flag), JPEG 90."""
    return jpeg_bytes(_rgb(image.convert("RGB").transpose(Image.Transpose.ROTATE_90)), 90, SUBSAMPLING)


def screenshot(image: Image.Image) -> bytes:
    """A screenshot of a post that carries the photo: 1080 px wide, a header, text and counters around
    the photo (shrunk to 1020 px wide), PNG."""
    width, margin = 1080, 30
    photo = image.convert("RGB")
    scale = (width - 2 * margin) / photo.width
    photo = photo.resize((width - 2 * margin, max(1, round(photo.height * scale))), Image.Resampling.BICUBIC)
    page = Image.new("RGB", (width, photo.height + 430), "white")
    draw = ImageDraw.Draw(page)
    text, small = ImageFont.load_default(size=30), ImageFont.load_default(size=22)
    draw.ellipse((margin, margin, margin + 80, margin + 80), fill=(29, 155, 240))
    draw.text((130, 40), "Local News Desk  @localnews · 2h", font=text, fill=(15, 20, 25))
    draw.text(
        (margin, 130), "Breaking: crowds gathered downtown this afternoon as the", font=small, fill="black"
    )
    draw.text((margin, 165), "storm cleared. Photo by our reporter on the scene.", font=small, fill="black")
    page.paste(photo, (margin, 230))
    below = 230 + photo.height + 40
    draw.text((margin, below), "12:41 PM · Nov 28, 2026 · 1.2M Views", font=small, fill=(110, 118, 125))
    draw.text((margin, below + 60), "4,211 Reposts    312 Quotes    18.4K Likes", font=small, fill="black")
    return png_bytes(_rgb(page))


HANDLING: dict[str, Callable[[Image.Image], bytes]] = {
    "messaging app (<= 1600 px, JPEG 70)": messaging,
    "social network (<= 1080 px, JPEG 85)": social,
    "brightness, contrast, saturation (JPEG 90)": adjusted,
    "cropped to the centre 80% (JPEG 90)": cropped,
    "credit line burnt in (JPEG 90)": credit_line,
    "screenshot of a post (PNG)": screenshot,
    "enlarged 1.5x (JPEG 90)": enlarged,
    "sharpened (JPEG 90)": sharpened,
    "warm filter with vignette (JPEG 90)": warm_vignette,
    "turned a quarter (JPEG 90)": turned,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", default=DATASETS, help="comma-separated `test` data sets of pristine photos"
    )
    parser.add_argument("--variants", default="", help="comma-separated handling numbers (1-10; default all)")
    parser.add_argument("--as-stored", action="store_true", help="also the files as stored")
    args = parser.parse_args()
    items = [
        item
        for item in read_manifest(default_manifest(), split="test", datasets=args.datasets.split(","))
        if not item.positive
    ]
    chosen = [int(n) - 1 for n in args.variants.split(",") if n] or range(len(HANDLING))
    handling = [list(HANDLING.items())[i] for i in chosen]
    if args.as_stored:
        handling.insert(0, ("as stored", None))
    print(f"{len(items)} pristine photos ({args.datasets})")
    print("| handling | accused | uncertain | cleared | rules that bounded a verdict | accused photos |")
    print("|---|---:|---:|---:|---|---|")
    for name, transform in handling:
        labels, rules, accused = Counter(), Counter(), []
        for item in items:
            if transform is None:
                image = load_image(item.file, name=item.path)
            else:
                with Image.open(item.file) as opened:
                    image = load_image(transform(opened), name=item.path)
            verdict = analyze(image, EXPERTS).verdict
            kind = {"authentic": "cleared", "uncertain": "uncertain"}.get(verdict.label, "accused")
            labels[kind] += 1
            rules[verdict.rule] += verdict.rule is not None
            if kind == "accused":
                accused.append(f"{item.path.rsplit('/', 1)[-1]} {verdict.probability:.2f}")
        bounded = ", ".join(f"{rule} {count}" for rule, count in rules.items() if count) or "-"
        print(
            f"| {name} | {labels['accused']} | {labels['uncertain']} | {labels['cleared']} | {bounded} | "
            f"{', '.join(accused) or '-'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
