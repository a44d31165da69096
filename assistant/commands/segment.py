"""`forensics segment IMAGE (--box X0,Y0,X1,Y1 | --point X,Y ...) --out MASK.png`: the mask of the object
or region a box or points pick out, from the promptable student segmenter (experts/student.py) or, with
`--teacher CHECKPOINT`, from SAM itself (experts/sam.py). For people and agents who want to ask about one
region: pass its mask to the experts, or compare it with their maps.

Coordinates are pixels of the image as stored (before any EXIF rotation), the frame of every mask and
region the experts report; x to the right, y down, box corners inclusive. `--point` is positive (on the
object), `--negative-point` marks what is not. The mask is written as PNG, 0 or 255, at the image's size;
a JSON line on stdout gives its area, bounding box and the segmenter's predicted IoU.

Exit status: 0 mask written; 1 the image or the model could not be read; 2 usage error (bad or
out-of-image prompt).
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

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _numbers(text: str, count: int, what: str) -> tuple[float, ...]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} needs {count} comma-separated numbers, got {text!r}")
    return values


def box_argument(text: str) -> tuple[float, ...]:
    return _numbers(text, 4, "--box X0,Y0,X1,Y1")


def point_argument(text: str) -> tuple[float, ...]:
    return _numbers(text, 2, "--point X,Y")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("image", metavar="IMAGE", help="the image")
    parser.add_argument("--box", type=box_argument, metavar="X0,Y0,X1,Y1", help="a box around the region")
    parser.add_argument(
        "--point", type=point_argument, action="append", default=[], metavar="X,Y", help="a point on it"
    )
    parser.add_argument(
        "--negative-point",
        type=point_argument,
        action="append",
        default=[],
        metavar="X,Y",
        help="a point that is not part of it",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="MASK.png", help="where to write the mask")
    parser.add_argument("--teacher", metavar="SAM_CHECKPOINT", help="use SAM with this official checkpoint")
    parser.add_argument(
        "--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"), help="SAM model of --teacher"
    )


def check_prompts(args: argparse.Namespace, width: int, height: int) -> str | None:
    """A message when the prompts are missing or fall outside a width x height image, else None."""
    if args.box is None and not args.point and not args.negative_point:
        return "give a prompt: --box X0,Y0,X1,Y1 and/or --point X,Y"
    if args.box is None and not args.point:
        return "negative points alone select nothing: add --box or a positive --point"
    if args.box is not None:
        x0, y0, x1, y1 = args.box
        if not (x0 < x1 and y0 < y1):
            return f"--box {x0:g},{y0:g},{x1:g},{y1:g}: X0 must be less than X1 and Y0 less than Y1"
        if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
            return (
                f"--box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {width}x{height} image "
                f"(x from 0 to {width - 1}, y from 0 to {height - 1})"
            )
    for flag, points in (("--point", args.point), ("--negative-point", args.negative_point)):
        for x, y in points:
            if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                return f"{flag} {x:g},{y:g} is outside the {width}x{height} image"
    return None


def _predictor(args: argparse.Namespace):
    if args.teacher:
        from experts.sam import SamTeacher

        return SamTeacher.from_checkpoint(args.teacher, args.model_type), f"sam {args.model_type}"
    from experts.student import student_predictor

    return student_predictor(), "student"


def run(args: argparse.Namespace) -> int:
    try:
        image = load_image(args.image)
    except ForensicsError as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return EXIT_FAILED
    problem = check_prompts(args, image.width, image.height)
    if problem:
        print(f"forensics segment: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        predictor, model = _predictor(args)
    except (ForensicsError, ValueError) as exc:
        print(f"forensics: {exc}", file=sys.stderr)
        return EXIT_FAILED
    points = [*args.point, *args.negative_point]
    labels = [1] * len(args.point) + [0] * len(args.negative_point)
    predictor.set_image(image.pixels)
    masks, scores, _ = predictor.predict(
        point_coords=np.array(points, np.float32) if points else None,
        point_labels=np.array(labels) if points else None,
        box=np.array(args.box, np.float32) if args.box is not None else None,
        multimask_output=False,
    )
    predictor.reset_image()
    mask = masks[0]
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.out, format="PNG")
    except (OSError, ValueError) as exc:
        print(f"forensics: {args.out}: cannot write the mask ({exc})", file=sys.stderr)
        return EXIT_FAILED
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
    result = {
        "path": str(args.image),
        "mask": str(args.out),
        "model": model,
        "prompt": {"box": list(args.box) if args.box else None, "points": points, "labels": labels},
        "width": image.width,
        "height": image.height,
        "area": len(xs),
        "area_fraction": round(len(xs) / mask.size, 4),
        "bbox": bbox,
        "score": round(float(scores[0]), 4),
    }
    print(json.dumps(result))
    return EXIT_OK
