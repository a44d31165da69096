"""Watermark benchmark: our watermark (experts/watermark.py) beside the three invisible-watermark schemes
(dwtDct, dwtDctSvd, rivaGan), in one table.

    .venv/bin/python benchmarks/watermark.py [--covers 10] [--quick] [--skip-false-alarms]

Covers: the first N Kodak images of ../shared/data (clean_photos/kodak, 768x512 film scans, lossless;
default 10, --quick 3). Each method embeds a payload (ours: 64 bits "bench-01", CRC and coding inside;
imwatermark: the 32 bits b"WMRK", rivaGan's fixed size) and is decoded after each attack; bit accuracy
is the fraction of payload bits read correctly, averaged over covers (0.5 = chance). No method gets help
from the benchmark: imwatermark decodes at the attacked size (it has no sync), ours resynchronises itself.

Attacks: JPEG (PIL) 90/70/50; resize 0.75 and 0.5 (OpenCV area); crop 10% (5% off each side, no
resize); Gaussian blur sigma 1; Gaussian noise sigma 5; brightness x1.2 and x0.8; a second embedding
of another payload with the same method (ours: accuracy of the FIRST payload, best of the decoded
sync peaks; verify also reports the conflict).
Tamper localisation: a 20% x 20% patch of another cover pasted at a seeded position into our marked
image; IoU of the tamper mask with it, saved as PNG and as JPEG 90.
False alarms: our detector (and the invisible_watermark expert) on every image in
../shared/data/manifest.csv; the theoretical per-image rate is the default threshold (1e-8 and 1e-6).
Speed: median of 5 protect / verify runs on scikit-image's coffee resized to 1024x768.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experts import get_expert, load_image  # noqa: E402
from experts import watermark as ours  # noqa: E402
from experts.invisible_watermark import decode_bits  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
OUR_PAYLOAD, OUR_SECOND = "bench-01", "intruder"
IMW_PAYLOAD, IMW_SECOND = b"WMRK", b"EVIL"
METHODS = ("ours", "dwtDct", "dwtDctSvd", "rivaGan")


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def attacks(method: str) -> dict[str, object]:
    rng = np.random.default_rng(0)

    def crop(p):
        h, w = p.shape[:2]
        return p[round(h * 0.05) : round(h * 0.95), round(w * 0.05) : round(w * 0.95)]

    def noise(p):
        return np.clip(p + rng.normal(0, 5, p.shape), 0, 255).astype(np.uint8)

    return {
        "JPEG 90": lambda p: jpeg(p, 90),
        "JPEG 70": lambda p: jpeg(p, 70),
        "JPEG 50": lambda p: jpeg(p, 50),
        "resize 0.75": lambda p: cv2.resize(p, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA),
        "resize 0.5": lambda p: cv2.resize(p, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
        "crop 10%": crop,
        "blur sigma 1": lambda p: cv2.GaussianBlur(p, (0, 0), 1.0),
        "noise sigma 5": noise,
        "brightness +20%": lambda p: np.clip(p.astype(np.float32) * 1.2, 0, 255).astype(np.uint8),
        "brightness -20%": lambda p: np.clip(p.astype(np.float32) * 0.8, 0, 255).astype(np.uint8),
        "second embedding": lambda p: embed(method, p, second=True),
    }


def _imw_encoder(payload: bytes):
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    return encoder


def embed(method: str, pixels: np.ndarray, second: bool = False) -> np.ndarray:
    if method == "ours":
        return ours.embed(pixels, OUR_SECOND if second else OUR_PAYLOAD)
    if method == "rivaGan":
        from imwatermark import WatermarkEncoder

        WatermarkEncoder.loadModel()
    encoder = _imw_encoder(IMW_SECOND if second else IMW_PAYLOAD)
    bgr = np.ascontiguousarray(pixels[..., ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, method)[..., ::-1])


def bit_accuracy(method: str, pixels: np.ndarray) -> float:
    if method == "ours":
        truth = np.unpackbits(np.frombuffer(ours.payload_bytes(OUR_PAYLOAD), np.uint8))
        result = ours.verify(pixels, tamper=False)
        if not result.candidates:
            return 0.5
        return max(
            float((np.unpackbits(np.frombuffer(c.raw, np.uint8)) == truth).mean()) for c in result.candidates
        )
    truth = np.unpackbits(np.frombuffer(IMW_PAYLOAD, np.uint8))
    if pixels.shape[0] * pixels.shape[1] < 256 * 256:
        return 0.5  # the library refuses images this small
    bits, _ = decode_bits(np.ascontiguousarray(pixels[..., ::-1]), method, truth.size)
    return float((bits == truth).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def covers(count: int) -> list[tuple[str, np.ndarray]]:
    paths = sorted((DATA / "clean_photos" / "kodak").glob("kodim*.png"))[:count]
    if not paths:
        raise SystemExit(f"no Kodak covers under {DATA}; this benchmark needs ../shared/data")
    return [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in paths]


def tamper_iou(images: list[tuple[str, np.ndarray]]) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    scores: dict[str, list[float]] = {"png": [], "jpeg90": []}
    for index, (_, cover) in enumerate(images):
        marked = ours.embed(cover, OUR_PAYLOAD)
        donor = images[(index + 1) % len(images)][1]
        h, w = marked.shape[:2]
        ph, pw = h // 5, w // 5
        y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        sy, sx = int(rng.integers(0, donor.shape[0] - ph)), int(rng.integers(0, donor.shape[1] - pw))
        tampered = marked.copy()
        tampered[y : y + ph, x : x + pw] = donor[sy : sy + ph, sx : sx + pw]
        truth = np.zeros((h, w), bool)
        truth[y : y + ph, x : x + pw] = True
        for name, version in (("png", tampered), ("jpeg90", jpeg(tampered, 90))):
            result = ours.verify(version)
            mask = result.tamper_mask if result.tamper_mask is not None else np.zeros_like(truth)
            scores[name].append(float((mask & truth).sum() / max((mask | truth).sum(), 1)))
    return float(np.mean(scores["png"])), float(np.mean(scores["jpeg90"]))


def false_alarms() -> tuple[int, int, int, float]:
    """(images, our detections, invisible_watermark detections, largest sync z) over the whole data set."""
    rows = list(csv.DictReader((DATA / "manifest.csv").open(encoding="utf-8")))
    expert = get_expert("invisible_watermark")
    count = ours_hits = imw_hits = 0
    top_z = 0.0
    for row in rows:
        try:
            image = load_image(DATA / row["path"])
        except Exception as exc:  # a corrupt file is reported, not counted
            print(f"skip {row['path']}: {exc}", file=sys.stderr)
            continue
        count += 1
        result = ours.verify(image.pixels, tamper=False)
        ours_hits += int(result.present or result.conflict)
        top_z = max(top_z, result.best_sync_z)
        imw_hits += int(expert.analyze(image).applicable)
        if result.present:
            print(f"false alarm: {row['path']} {result.to_dict()}", file=sys.stderr)
    return count, ours_hits, imw_hits, top_z


def speed() -> tuple[float, float]:
    pixels = cv2.resize(skdata.coffee(), (1024, 768), interpolation=cv2.INTER_AREA)
    protect_times, verify_times = [], []
    for _ in range(5):
        start = time.perf_counter()
        marked = ours.embed(pixels, OUR_PAYLOAD)
        protect_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours.verify(marked)
        verify_times.append(time.perf_counter() - start)
    return statistics.median(protect_times), statistics.median(verify_times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--covers", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 covers")
    parser.add_argument("--skip-false-alarms", action="store_true")
    parser.add_argument("--false-alarms-only", action="store_true", help="only the false-alarm row")
    args = parser.parse_args()
    if args.false_alarms_only:
        count, ours_hits, imw_hits, top_z = false_alarms()
        print(
            f"images {count}: ours {ours_hits} (largest sync z {top_z:.1f}), invisible_watermark {imw_hits}"
        )
        return
    images = covers(3 if args.quick else args.covers)
    rows: dict[str, dict[str, float]] = {}
    for method in METHODS:
        quality: dict[str, list[float]] = {"PSNR (dB)": [], "SSIM": [], "no attack": []}
        for _, cover in images:
            marked = embed(method, cover)
            quality["PSNR (dB)"].append(psnr(cover, marked))
            quality["SSIM"].append(structural_similarity(cover, marked, channel_axis=2))
            quality["no attack"].append(bit_accuracy(method, marked))
            for name, attack in attacks(method).items():
                quality.setdefault(name, []).append(bit_accuracy(method, attack(marked)))
        rows[method] = {name: float(np.mean(values)) for name, values in quality.items()}
        print(f"done: {method}", file=sys.stderr)
    iou_png, iou_jpeg = tamper_iou(images)
    protect_s, verify_s = speed()
    print(f"Covers: {len(images)} Kodak images ({', '.join(n for n, _ in images)}), 768x512.\n")
    print("| metric | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for metric in rows["ours"]:
        cells = []
        for method in METHODS:
            value = rows[method][metric]
            cells.append(f"{value:.2f}" if metric == "PSNR (dB)" else f"{value:.3f}")
        label = metric if metric in ("PSNR (dB)", "SSIM") else f"bit accuracy: {metric}"
        print(f"| {label} | " + " | ".join(cells) + " |")
    dash = " | —" * (len(METHODS) - 1)
    print("| payload bits | 64 (+16 CRC, rate-1/3 code) | 32 | 32 | 32 |")
    print(f"| tamper IoU, pasted 20% patch (PNG / JPEG 90) | {iou_png:.3f} / {iou_jpeg:.3f}{dash} |")
    print(f"| protect / verify seconds, 1024x768 | {protect_s:.3f} / {verify_s:.3f}{dash} |")
    if not args.skip_false_alarms:
        count, ours_hits, imw_hits, top_z = false_alarms()
        print(
            f"| false alarms on all {count} images of ../shared/data | {ours_hits} (threshold 1e-8 "
            f"per image; largest sync z {top_z:.1f}) | {imw_hits} (invisible_watermark expert, "
            f"threshold 1e-6){dash[:-4]} |"
        )


if __name__ == "__main__":
    main()
