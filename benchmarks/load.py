"""Load check of the chat app: N concurrent sessions through gradio_client, each with its own image.

    python benchmarks/load.py                  # starts the app here (embedded model), 8 sessions
    python benchmarks/load.py --url http://127.0.0.1:7860/ --sessions 8

Each session asks "Is this image fake?" about a different image through the /chat endpoint. Every
answer must be about its own image: the sha256 it names is that of the image the session sent, and its
verdict label and probability equal those of that image's own analysis (experts and fusion run here,
deterministically). Prints each session's latency, then the median and the worst. Exit status 1 when
any answer is about another image or failed. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "Is this image fake?"


def test_images(count: int, folder: Path) -> list[Path]:
    """Different images: the built-in examples, then scikit-image photos and re-saved variants."""
    from skimage import data

    from experts.samples import SAMPLES

    blobs = [make().data for make in SAMPLES.values()]
    photos = [data.astronaut(), data.chelsea(), data.rocket(), data.coffee(), data.immunohistochemistry()]
    for index, photo in enumerate(photos):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo)).save(buffer, "JPEG", quality=80 + index)
        blobs.append(buffer.getvalue())
    quality = 70
    while len(blobs) < count:  # more sessions than images: re-save the examples at other qualities
        image = Image.open(io.BytesIO(blobs[len(blobs) % 3]))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        blobs.append(buffer.getvalue())
        quality += 3
    paths = []
    for index, blob in enumerate(blobs[:count]):
        path = folder / f"session_{index + 1}.jpg"
        path.write_bytes(blob)
        paths.append(path)
    return paths


def start_app() -> str:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from assistant.ui import SharedModels, build_app, launch

    models = SharedModels()
    models.get(None)  # load the model before the clock starts
    _, url = launch(build_app(models), port=None, block=False)
    return url


def one_session(url: str, path: Path) -> tuple[float, dict]:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    start = time.perf_counter()
    result = client.predict(handle_file(str(path)), QUESTION, "", api_name="/chat")
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running app (default: start one here with the embedded model)")
    parser.add_argument("--sessions", type=int, default=8)
    args = parser.parse_args(argv)

    from assistant.analysis import analyze

    folder = Path(tempfile.mkdtemp(prefix="forensics-load-"))
    paths = test_images(args.sessions, folder)
    expected = {}
    for path in paths:
        verdict = analyze(path).verdict
        expected[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), verdict.label, verdict.probability)
    url = args.url or start_app()
    print(f"{args.sessions} concurrent sessions against {url}", flush=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.sessions) as pool:
        results = list(pool.map(lambda p: one_session(url, p), paths))
    wall = time.perf_counter() - started
    wrong = 0
    for path, (seconds, result) in zip(paths, results, strict=True):
        sha256, label, probability = expected[path]
        verdict = result.get("verdict") or {}
        own = (
            result.get("image", {}).get("sha256") == sha256
            and verdict.get("label") == label
            and abs(verdict.get("probability", -1) - probability) < 1e-9
        )
        wrong += not own
        print(
            f"  {path.name}: {seconds:6.1f} s  {verdict.get('label', result.get('error'))} "
            f"P={verdict.get('probability', float('nan')):.2f}  "
            + ("its own image" if own else f"WRONG (expected {label} P={probability:.2f} sha {sha256[:12]})")
        )
    latencies = [seconds for seconds, _ in results]
    print(
        f"latency: median {statistics.median(latencies):.1f} s, worst {max(latencies):.1f} s; "
        f"all {args.sessions} sessions in {wall:.1f} s; answers about another image: {wrong}"
    )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
