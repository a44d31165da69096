"""`forensics protect IMAGE --payload TEXT --out FILE`: embed our watermark (experts/watermark.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.commands._io import save_pixels
from experts.base import ForensicsError
from experts.image import load_image
from experts.watermark import DEFAULT_KEY, TARGET_PSNR, embed


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed an invisible watermark that carries PAYLOAD (1-8 bytes, e.g. an owner id), survives JPEG, "
        "resizing and cropping, and later shows where the image was changed (`forensics verify`)."
    )
    parser.add_argument("image", metavar="IMAGE", help="the image to protect")
    parser.add_argument("--payload", required=True, help="identity payload, 1-8 bytes of UTF-8 text")
    parser.add_argument("--out", required=True, type=Path, help="output file (.png lossless, or .jpg)")
    parser.add_argument("--key", default=DEFAULT_KEY, help="secret key (default: the public project key)")
    parser.add_argument("--psnr", type=float, default=TARGET_PSNR, help="target quality in dB (default 41)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when --out is .jpg")


def run(args: argparse.Namespace) -> int:
    try:
        image = load_image(args.image)
        marked = embed(image.pixels, args.payload, key=args.key, psnr=args.psnr)
        save_pixels(marked, args.out, quality=args.quality)
    except ForensicsError as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: watermarked with payload {args.payload!r}")
    return 0
