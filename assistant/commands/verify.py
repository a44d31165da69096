"""`forensics verify IMAGE [--json] [--mask FILE]`: look for our watermark (experts/watermark.py).

Exit status: 0 our watermark is present and intact; 3 present, but regions were changed or a second
payload was embedded; 4 no watermark of ours; 1 the image could not be read; 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from experts.base import ForensicsError
from experts.image import load_image
from experts.watermark import DEFAULT_FALSE_ALARM, DEFAULT_KEY, verify

EXIT_INTACT, EXIT_CHANGED, EXIT_ABSENT = 0, 3, 4


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("image", metavar="IMAGE", help="the image to check")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--mask", type=Path, help="write the tamper mask here (PNG, 255 = changed)")
    parser.add_argument("--key", default=DEFAULT_KEY, help="the key used by `forensics protect`")
    parser.add_argument(
        "--false-alarm", type=float, default=DEFAULT_FALSE_ALARM, help="decision threshold (default 1e-8)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        image = load_image(args.image)
        result = verify(image.pixels, key=args.key, false_alarm=args.false_alarm)
    except ForensicsError as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return 1
    if args.mask and result.tamper_mask is not None:
        Image.fromarray(result.tamper_mask.astype(np.uint8) * 255).save(args.mask)
    report = {"path": str(args.image), **result.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    elif not result.present:
        print(
            f"{args.image}: no watermark of ours found"
            + (f" ({'; '.join(result.notes)})" if result.notes else "")
        )
    else:
        payloads = ", ".join(repr(p.payload) for p in result.payloads)
        print(
            f"{args.image}: watermark present, payload {payloads}, "
            f"false-alarm probability {result.false_alarm:.1e}"
        )
        if result.conflict:
            print("  conflict: more than one payload is embedded (the image was re-watermarked)")
        print(f"  changed after protection: {result.tampered_fraction:.1%} of the image")
    if not result.present:
        return EXIT_CHANGED if result.conflict else EXIT_ABSENT
    return EXIT_CHANGED if result.conflict or result.tampered_fraction > 0 else EXIT_INTACT
