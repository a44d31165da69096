"""`forensics analyze [IMAGE|FOLDER...] [--out DIR] [--jsonl FILE [--resume]] [--json]`: analyse images
with the forensic experts (no language model).

With no IMAGE, analyses the built-in example images (an authentic photo, a splice and a copy-move
forgery). Folders are searched recursively; a progress bar shows on stderr for more than one image.
--out DIR writes the report contract (one folder per image, DIR/results.jsonl; re-running resumes).
--jsonl FILE writes one line per image (path, sha256, verdict, probability, fusion rule, per-expert
scores, or the error); with --resume, images already in FILE (same path or same sha256) are skipped, so an
interrupted batch continues where it stopped.
Exit status: 0 all analysed; 1 some input failed (one line each on stderr); 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from assistant.analysis import analyze
from assistant.report import report_dict, write_report
from experts import available_experts
from experts.base import ForensicsError
from experts.image import LoadedImage, load_image

IMAGE_SUFFIXES = {
    *(".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".mpo"),
    *(".heic", ".heif", ".avif"),
}
JSONL_SCHEMA = "forensics-batch/1"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders")
    parser.add_argument("--out", type=Path, help="write the report files here (one folder per image)")
    parser.add_argument("--experts", type=expert_list, help="comma-separated experts (default: all)")
    parser.add_argument("--json", action="store_true", help="print the JSON report(s) to stdout")
    parser.add_argument("--max-pixels", type=int, help="raise the decompression-bomb limit (pixels)")
    parser.add_argument(
        "--jsonl", type=Path, metavar="FILE", help="one line per image: verdict and per-expert scores"
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --jsonl: skip images already in FILE (by path or sha256)"
    )


def expert_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_experts()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown expert(s) {', '.join(unknown) or '(none given)'}; available: "
            f"{', '.join(available_experts())}"
        )
    return names


def expand(paths: Sequence[str]) -> Iterator[str]:
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from (str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield text


def _inputs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(label, source) pairs; the built-in examples when no image is given."""
    if args.images:
        return [(path, path) for path in expand(args.images)]
    from experts.samples import SAMPLES

    samples = [make() for make in SAMPLES.values()]
    return [(f"example:{s.name}", s.data) for s in samples]


def run(args: argparse.Namespace) -> int:
    if args.resume and not args.jsonl:
        print("forensics: --resume needs --jsonl FILE (an --out folder always resumes)", file=sys.stderr)
        return 2
    inputs = _inputs(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    done = _finished(args.out) if args.out else set()
    batch = BatchLog(args.jsonl, resume=args.resume) if args.jsonl else None
    results_file = (args.out / "results.jsonl").open("a", encoding="utf-8") if args.out else None
    used_dirs = (
        {p.name for p in args.out.iterdir() if p.is_dir()} if args.out and args.out.exists() else set()
    )
    failures = skipped = 0
    progress = _progress(inputs, disable=len(inputs) < 2 or args.json)
    try:
        for label, source in progress:
            if label in done or (batch and batch.has(label, source)):
                skipped += 1
                continue
            try:
                image = load_image(source, max_pixels=args.max_pixels, name=label)
                analysis = analyze(image, args.experts)
            except ForensicsError as exc:
                failures += 1
                progress.write(f"forensics: {exc}", file=sys.stderr)
                _append(results_file, {"path": label, "error": str(exc)})
                if batch:
                    batch.write({"schema": JSONL_SCHEMA, "path": label, "error": str(exc)})
                continue
            folder = args.out / _folder_name(label, image, used_dirs) if args.out else None
            report = write_report(analysis, image, folder) if folder else report_dict(analysis, image)
            _append(results_file, report)
            if batch:
                batch.write(batch_row(label, report))
            if args.json:
                print(json.dumps(report, indent=2, ensure_ascii=False))
            else:
                progress.write(_summary_table(report, folder))
    finally:
        if results_file:
            results_file.close()
        if batch:
            batch.close()
    if skipped:
        where = args.jsonl if batch and batch.known else args.out / "results.jsonl"
        print(
            f"forensics: skipped {skipped} image(s) already reported in {where} "
            "(resuming; delete that file to analyse them again)",
            file=sys.stderr,
        )
    return 1 if failures else 0


def batch_row(label: str, report: dict[str, Any]) -> dict[str, Any]:
    """One --jsonl line: the image, the verdict and each expert's score."""
    verdict = report["verdict"]
    return {
        "schema": JSONL_SCHEMA,
        "path": label,
        "sha256": report["image"]["sha256"],
        "label": verdict["label"],
        "probability": verdict["probability"],
        "rule": verdict["rule"],
        "where": verdict["where"],
        "scores": {item["expert"]: item["score"] for item in report["evidence"]},
        "seconds": report["timings"].get("total"),
    }


class BatchLog:
    """The --jsonl file: appended line by line (flushed, so an interruption loses at most the line being
    written); with resume, the paths and sha256 already in it are skipped. A failed image is not
    counted as done: a resumed batch tries it again."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.paths: set[str] = set()
        self.hashes: set[str] = set()
        if resume and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                if isinstance(row, dict) and "error" not in row:
                    self.paths.add(str(row.get("path")))
                    if row.get("sha256"):
                        self.hashes.add(row["sha256"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.known = bool(self.paths)
        if resume and path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("a", encoding="utf-8") as handle:
                handle.write("\n")  # end the line the interruption cut, so the next one parses
        self.handle = path.open("a" if resume else "w", encoding="utf-8")

    def has(self, label: str, source: object) -> bool:
        if label in self.paths:
            return True
        if not self.hashes:
            return False
        data = _raw_bytes(source)
        return data is not None and hashlib.sha256(data).hexdigest() in self.hashes

    def write(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _raw_bytes(source: object) -> bytes | None:
    """The file's bytes (what LoadedImage.sha256 hashes), or None when it cannot be read."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(str(source)).read_bytes()
    except OSError:
        return None


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
    if verdict["rule"]:
        lines.append(f"  why: {verdict['caveat']}")
    lines.extend(f"  note: {note}" for note in report["image"]["notes"])
    for item in report["evidence"]:
        score = " n/a" if item["score"] is None else f"{item['score']:.2f}"
        lines.append(f"  {item['expert']:<10} {score}  {item['summary']}")
    if folder:
        lines.append(f"  report: {folder / 'report.html'}")
    return "\n".join(lines) + "\n"
