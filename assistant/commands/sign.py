"""`forensics sign IMAGE --cert CERT --key KEY [--out FILE]`: attach C2PA Content Credentials."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experts.base import ForensicsError
from experts.c2pa import MIME_TYPES, sign
from experts.image import load_image


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Sign an image with your certificate so that anyone can later check who published it and whether "
        "it was changed since (C2PA Content Credentials; `forensics analyze` validates them)."
    )
    parser.add_argument("image", metavar="IMAGE", help="JPEG, PNG, WEBP, TIFF or GIF file")
    parser.add_argument("--cert", required=True, type=Path, help="certificate chain, PEM, end-entity first")
    parser.add_argument("--key", required=True, type=Path, help="private key of that certificate, PEM")
    parser.add_argument(
        "--out", type=Path, help="output file (default: IMAGE with .signed before the suffix)"
    )
    parser.add_argument(
        "--source",
        default="digitalCapture",
        help="IPTC digital source type to declare (default digitalCapture; e.g. trainedAlgorithmicMedia)",
    )
    parser.add_argument("--tsa-url", help="RFC 3161 time-stamp authority URL (network); default none")


def run(args: argparse.Namespace) -> int:
    source = Path(args.image)
    out = args.out or source.with_name(f"{source.stem}.signed{source.suffix}")
    try:
        image = load_image(source)
        mime_type = MIME_TYPES.get(image.format)
        if mime_type is None:
            raise ForensicsError(f"{source}: {image.format} files cannot carry C2PA; convert to JPEG or PNG")
        for path in (args.cert, args.key):
            if not path.is_file():
                raise ForensicsError(f"{path}: no such file")
        signed = sign(
            image.data,
            mime_type,
            args.cert.read_bytes(),
            args.key.read_bytes(),
            title=source.name,
            source_type=args.source,
            tsa_url=args.tsa_url,
        )
        out.write_bytes(signed)
    except (ForensicsError, OSError) as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: Content Credentials attached")
    return 0
