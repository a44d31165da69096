"""`forensics` command line: analyze, eval, experts."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from assistant.analysis import analyze
from assistant.report import report_dict, write_report
from experts import available_experts, expert_class
from experts.base import ForensicsError
from experts.image import LoadedImage, load_image

# Sub-commands that live in their own module: each has configure_parser(parser) and run(args) -> int.
COMMANDS = {
    "chat": ("assistant.commands.chat", "ask the assistant about an image (answers with a checked verdict)"),
    "eval": ("assistant.evaluate", "evaluate experts and fusion on a labelled data set"),
    "sign": ("assistant.commands.sign", "attach C2PA Content Credentials signed with your certificate"),
    "protect": ("assistant.commands.protect", "embed our invisible, tamper-localising watermark"),
    "verify": ("assistant.commands.verify", "check an image for our watermark and show changed regions"),
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".mpo"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forensics", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    analyze_cmd = commands.add_parser(
        "analyze",
        help="analyse images and write reports",
        description="Analyse images with the forensic experts. With no IMAGE, analyses the built-in "
        "example images (an authentic photo, a splice and a copy-move forgery).",
    )
    analyze_cmd.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    analyze_cmd.add_argument("--out", type=Path, help="write the report files here (one folder per image)")
    analyze_cmd.add_argument("--experts", type=_expert_list, help="comma-separated experts (default: all)")
    analyze_cmd.add_argument("--json", action="store_true", help="print the JSON report(s) to stdout")
    analyze_cmd.add_argument("--max-pixels", type=int, help="raise the decompression-bomb limit (pixels)")
    analyze_cmd.set_defaults(handler=cmd_analyze)

    for name, (module_name, summary) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = commands.add_parser(name, help=summary)
        module.configure_parser(command)
        command.set_defaults(handler=module.run)

    list_cmd = commands.add_parser("experts", help="list the registered experts")
    list_cmd.set_defaults(handler=cmd_experts)
    return parser


def _expert_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_experts()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown expert(s) {', '.join(unknown) or '(none given)'}; available: "
            f"{', '.join(available_experts())}"
        )
    return names


def cmd_experts(args: argparse.Namespace) -> int:
    for name in available_experts():
        print(f"{name:<12} {expert_class(name).description}")
    return 0


def _expand(paths: Sequence[str]) -> Iterator[str]:
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from (str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield text


def _inputs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, source) pairs; the built-in examples when no image is given."""
    if args.images:
        return [(path, path) for path in _expand(args.images)]
    from experts.samples import SAMPLES

    samples = [make() for make in SAMPLES.values()]
    return [(f"example:{s.name}", s.data) for s in samples]


def cmd_analyze(args: argparse.Namespace) -> int:
    inputs = _inputs(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    done = _finished(args.out) if args.out else set()
    results_file = (args.out / "results.jsonl").open("a", encoding="utf-8") if args.out else None
    used_dirs = (
        {p.name for p in args.out.iterdir() if p.is_dir()} if args.out and args.out.exists() else set()
    )
    failures = skipped = 0
    progress = _progress(inputs, disable=len(inputs) < 2 or args.json)
    try:
        for label, source in progress:
            if label in done:
                skipped += 1
                continue
            try:
                image = load_image(source, max_pixels=args.max_pixels, name=label)
                analysis = analyze(image, args.experts)
            except ForensicsError as exc:
                failures += 1
                progress.write(f"forensics: {exc}", file=sys.stderr)
                _append(results_file, {"path": label, "error": str(exc)})
                continue
            folder = args.out / _folder_name(label, image, used_dirs) if args.out else None
            report = write_report(analysis, image, folder) if folder else report_dict(analysis, image)
            _append(results_file, report)
            if args.json:
                print(json.dumps(report, indent=2, ensure_ascii=False))
            else:
                progress.write(_summary_table(report, folder))
    finally:
        if results_file:
            results_file.close()
    if skipped:
        print(
            f"forensics: skipped {skipped} image(s) already reported in {args.out / 'results.jsonl'} "
            "(resuming; delete that file to analyse them again)",
            file=sys.stderr,
        )
    return 1 if failures else 0


def _progress(inputs: list, disable: bool):
    from tqdm import tqdm

    return tqdm(inputs, unit="image", disable=True if disable else None, file=sys.stderr)


def _folder_name(label: str, image: LoadedImage, used: set[str]) -> str:
    """<stem>, or <stem>-<sha256 prefix> when two inputs share a stem."""
    stem = Path(label.split(":", 1)[-1]).stem or "image"
    name = stem if stem not in used else f"{stem}-{image.sha256[:8]}"
    if name in used:
        name = f"{stem}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"
    used.add(name)
    return name


def _finished(out: Path) -> set[str]:
    """Inputs already reported in out/results.jsonl (so an interrupted batch resumes)."""
    path = out / "results.jsonl"
    if not path.exists():
        return set()
    finished = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if "error" not in row and "image" in row:
            finished.add(row["image"]["path"])
    return finished


def _append(handle, row: dict) -> None:
    if handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def _summary_table(report: dict, folder: Path | None) -> str:
    verdict = report["verdict"]
    lines = [
        f"{report['image']['path']}: {verdict['label'].upper()}  "
        f"P(not authentic) = {verdict['probability']:.2f}  "
        f"(uncertain between {verdict['uncertain_band'][0]:.2f} and {verdict['uncertain_band'][1]:.2f})",
    ]
    if verdict["where"]:
        lines.append(f"  where: {'; '.join(verdict['where'])}")
    lines.extend(f"  note: {note}" for note in report["image"]["notes"])
    for item in report["evidence"]:
        score = " n/a" if item["score"] is None else f"{item['score']:.2f}"
        lines.append(f"  {item['expert']:<10} {score}  {item['summary']}")
    if folder:
        lines.append(f"  report: {folder / 'report.html'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
