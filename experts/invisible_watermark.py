"""Invisible watermarks of the `invisible-watermark` library (imwatermark; ShieldMnt, MIT), including the
fixed payloads that popular image generators embed by default.

Schemes: `dwtDct` (Haar DWT of the YUV U channel, 4x4 blocks, the largest AC value quantised with step
36; the payload repeats over all blocks), `dwtDctSvd` (same, on the largest singular value) and
`rivaGan` (RivaGAN, Zhang et al. 2019, 32 bits, the library's bundled ONNX decoder). The first two are
decoded here with a vectorised re-implementation of the library's decoder (same decisions, soft
per-bit averages, fast on 24 MP images); RivaGAN through the library.

Known payloads checked by default (all `dwtDct`, read from public source code of the generators):
- Stable Diffusion 1.x reference scripts (CompVis/stable-diffusion `scripts/txt2img.py`):
  `wm = "StableDiffusionV1"`, `set_watermark('bytes', wm.encode('utf-8'))` -> 136 bits; `put_watermark`
  converts RGB to BGR before encoding.
- Stable Diffusion 2.x reference scripts (Stability-AI/stablediffusion `scripts/txt2img.py`):
  `wm = "SDV2"` -> 32 bits.
- Stable Diffusion XL (Stability-AI/generative-models `scripts/demo/streamlit_helpers.py`, copied into
  diffusers' `StableDiffusionXLWatermarker`): `WATERMARK_MESSAGE =
  0b101100111110110010010000011110111011000110011110` -> 48 bits, set with `set_watermark('bits', ...)`.
  diffusers passes RGB arrays to an encoder that expects BGR, so both channel orders are tried for
  every payload.
Other payloads (any scheme, e.g. your own RivaGAN 32-bit key) can be added with `extra_payloads`;
an unknown payload can never be confirmed: a decoder always returns some bits, so a decoded bit
string alone means nothing.

Decision: the number of bit errors k between the decoded bits and a known payload of L bits. Under
"no watermark" each decoded bit matches by chance; the false-alarm probability is the larger of the
fair-coin tail P(Binomial(L, 1/2) <= k) and the tail under this image's own bit bias (smooth images
decode to mostly 0 bits), times the number of payloads x channel orders tried (Bonferroni). A
watermark is reported when that is <= `false_alarm` (default 1e-6 per image; e.g. SDXL's 48 bits
allow up to 5 errors, SD 1.x's 136 bits up to about 37). The bits only survive at the generator's own
pixel grid: resizing or cropping the image removes them, so absence is weak evidence.

Score: 0.97 when a generator's default payload is confirmed (indicates ai_generated); for a
user-supplied payload, 0.9 (indicates what the user says via `extra_payloads`' kind). Not applicable
when no known payload is found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from experts.base import Evidence, ExpertError, not_applicable
from experts.image import LoadedImage

SCALE = 36.0
BLOCK = 4
MIN_PIXELS = 256 * 256  # the library refuses smaller images
DEFAULT_FALSE_ALARM = 1e-6
SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110


@dataclass(frozen=True)
class KnownPayload:
    label: str  # who embeds it
    method: str  # "dwtDct", "dwtDctSvd" or "rivaGan"
    bits: tuple[int, ...]
    source: str  # where the payload is published
    indicates: str = "ai_generated"


def _bytes_bits(data: bytes) -> tuple[int, ...]:
    return tuple(int(b) for b in np.unpackbits(np.frombuffer(data, np.uint8)))


KNOWN_PAYLOADS = (
    KnownPayload(
        "Stable Diffusion 1.x",
        "dwtDct",
        _bytes_bits(b"StableDiffusionV1"),
        "CompVis/stable-diffusion scripts/txt2img.py",
    ),
    KnownPayload(
        "Stable Diffusion 2.x",
        "dwtDct",
        _bytes_bits(b"SDV2"),
        "Stability-AI/stablediffusion scripts/txt2img.py",
    ),
    KnownPayload(
        "Stable Diffusion XL",
        "dwtDct",
        tuple(int(b) for b in bin(SDXL_MESSAGE)[2:]),
        "Stability-AI/generative-models scripts/demo/streamlit_helpers.py; "
        "diffusers StableDiffusionXLWatermarker",
    ),
)


# --------------------------------------------------------------------------------------------------
# Decoders


def _u_blocks(bgr: np.ndarray) -> np.ndarray:
    """4x4 blocks of the Haar LL band of the YUV U channel, in the library's raster order: (N, 4, 4)."""
    import pywt  # only this decoder needs PyWavelets: importing the experts (a training run) does not

    rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
    yuv = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV)
    approx, _ = pywt.dwt2(yuv[:rows, :cols, 1].astype(np.float64), "haar")
    by, bx = approx.shape[0] // BLOCK, approx.shape[1] // BLOCK
    blocks = approx[: by * BLOCK, : bx * BLOCK].reshape(by, BLOCK, bx, BLOCK).transpose(0, 2, 1, 3)
    return blocks.reshape(-1, BLOCK, BLOCK)


def block_bits(bgr: np.ndarray, method: str) -> np.ndarray:
    """The per-block bit decisions of dwtDct / dwtDctSvd (0/1 per block, raster order)."""
    blocks = _u_blocks(bgr)
    if method == "dwtDct":
        flat = blocks.reshape(len(blocks), -1)
        position = np.argmax(np.abs(flat[:, 1:]), axis=1) + 1
        value = np.abs(flat[np.arange(len(flat)), position])
    elif method == "dwtDctSvd":
        # The DCT is orthonormal, so the DCT'd block has the block's own singular values.
        value = np.linalg.svd(blocks, compute_uv=False)[:, 0]
    else:
        raise ValueError(f"no block decoder for {method!r}")
    return (np.mod(value, SCALE) > 0.5 * SCALE).astype(np.uint8)


def decode_bits(bgr: np.ndarray, method: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(decoded bits, per-bit mean of the block decisions) for a payload of `length` bits."""
    if method == "rivaGan":
        return _rivagan(bgr)
    bits = block_bits(bgr, method)
    index = np.arange(bits.size) % length
    means = np.bincount(index, weights=bits, minlength=length) / np.maximum(
        np.bincount(index, minlength=length), 1
    )
    return (means * 255 > 127).astype(np.uint8), means


def _rivagan(bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        from imwatermark.rivaGan import RivaWatermark
    except ImportError as exc:
        from experts.base import ModelNotAvailableError

        raise ModelNotAvailableError(
            "RivaGAN needs invisible-watermark and onnxruntime: pip install onnxruntime; "
            "pip install --no-deps invisible-watermark==0.2.0"
        ) from exc
    RivaWatermark.loadModel()
    frame = np.asarray(bgr, np.float32)[None] / 127.5 - 1.0
    frame = frame.transpose(3, 0, 1, 2)[None]
    soft = RivaWatermark.decoder.run(None, {"frame": frame})[0][0]
    return (soft > 0.52).astype(np.uint8), soft.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Statistics


def binomial_tail(errors: int, length: int) -> float:
    """P(Binomial(length, 1/2) <= errors): chance of this few errors on an unmarked image."""
    return min(1.0, sum(math.comb(length, k) for k in range(errors + 1)) / 2.0**length)


def biased_tail(errors: int, payload: np.ndarray, ones_probability: float) -> float:
    """P(errors <= k) when each decoded bit is 1 with probability `ones_probability` (Poisson binomial)."""
    mismatch = np.where(payload == 1, 1.0 - ones_probability, ones_probability)
    distribution = np.zeros(payload.size + 1)
    distribution[0] = 1.0
    for p in mismatch:
        distribution[1:] = distribution[1:] * (1 - p) + distribution[:-1] * p
        distribution[0] *= 1 - p
    return float(min(1.0, distribution[: errors + 1].sum()))


def _ones_probability(block_ones: float, repeats: int) -> float:
    """P(majority of `repeats` block decisions is 1) when each is 1 with probability block_ones."""
    if repeats <= 0:
        return 0.5
    mean, sd = repeats * block_ones, math.sqrt(max(repeats * block_ones * (1 - block_ones), 1e-12))
    return 0.5 * math.erfc((repeats * 0.498 - mean) / (sd * math.sqrt(2.0)))


@lru_cache(maxsize=64)
def max_errors(length: int, false_alarm: float, tests: int) -> int:
    """The most bit errors still accepted at this false-alarm rate (fair-coin bound)."""
    errors = -1
    while errors + 1 < length and binomial_tail(errors + 1, length) * tests <= false_alarm:
        errors += 1
    return errors


@dataclass(frozen=True)
class Match:
    payload: KnownPayload
    channel_order: str
    errors: int
    false_alarm: float

    def to_dict(self) -> dict:
        return {
            "label": self.payload.label,
            "method": self.payload.method,
            "bits": len(self.payload.bits),
            "channel_order": self.channel_order,
            "bit_errors": self.errors,
            "false_alarm": float(self.false_alarm),
            "source": self.payload.source,
        }


def check_payloads(
    rgb: np.ndarray, payloads: tuple[KnownPayload, ...], false_alarm: float = DEFAULT_FALSE_ALARM
) -> list[Match]:
    """Every payload x channel order, best (lowest false-alarm probability) first."""
    tests = 2 * len(payloads)
    orders = {"BGR": np.ascontiguousarray(rgb[..., ::-1]), "RGB-as-BGR": np.ascontiguousarray(rgb)}
    block_cache: dict[tuple[str, str], np.ndarray] = {}
    matches = []
    for payload in payloads:
        expected = np.asarray(payload.bits, np.uint8)
        for order, image in orders.items():
            if payload.method == "rivaGan":
                decoded, _ = _rivagan(image)
                bias = 0.5
            else:
                key = (order, payload.method)
                if key not in block_cache:
                    block_cache[key] = block_bits(image, payload.method)
                bits = block_cache[key]
                index = np.arange(bits.size) % expected.size
                counts = np.maximum(np.bincount(index, minlength=expected.size), 1)
                means = np.bincount(index, weights=bits, minlength=expected.size) / counts
                decoded = (means * 255 > 127).astype(np.uint8)
                bias = _ones_probability(float(bits.mean()), int(counts.min()))
            errors = int((decoded != expected).sum())
            chance = max(binomial_tail(errors, expected.size), biased_tail(errors, expected, bias))
            matches.append(Match(payload, order, errors, min(1.0, chance * tests)))
    return sorted(matches, key=lambda m: m.false_alarm)


# --------------------------------------------------------------------------------------------------
# The expert


@dataclass(frozen=True)
class InvisibleWatermark:
    """Expert: invisible watermarks of known generators (imwatermark schemes), decided statistically."""

    name = "invisible_watermark"
    version = "1"
    description = (
        "Detects the invisible watermarks that Stable Diffusion 1.x/2.x/XL embed by default "
        "(imwatermark dwtDct), with a false-alarm probability from the number of bit errors."
    )
    false_alarm: float = DEFAULT_FALSE_ALARM
    extra_payloads: tuple[KnownPayload, ...] = ()

    def analyze(self, image: LoadedImage) -> Evidence:
        if image.height * image.width < MIN_PIXELS:
            return not_applicable(
                self.name,
                f"The image ({image.width}x{image.height}) is smaller than the 256x256 pixels these "
                "watermarks need, so none can be checked.",
            )
        payloads = KNOWN_PAYLOADS + tuple(self.extra_payloads)
        try:
            matches = check_payloads(image.pixels, payloads, self.false_alarm)
        except (ValueError, cv2.error) as exc:
            raise ExpertError(f"cannot decode invisible watermarks: {exc}") from exc
        details = {
            "checked": [m.to_dict() for m in matches],
            "false_alarm_threshold": self.false_alarm,
            "note": "only known payloads can be confirmed; resizing or cropping removes these marks",
        }
        found = [m for m in matches if m.false_alarm <= self.false_alarm]
        if not found:
            best = matches[0]
            return not_applicable(
                self.name,
                f"No known generator watermark found (closest: {best.payload.label}, {best.errors} of "
                f"{len(best.payload.bits)} bits wrong, as expected by chance). Absence is weak evidence: "
                "resizing, cropping or re-generating removes these marks.",
                **details,
            )
        best = found[0]
        user_payload = best.payload not in KNOWN_PAYLOADS
        details["indicates"] = best.payload.indicates
        details["match"] = best.to_dict()
        return Evidence(
            expert=self.name,
            score=0.9 if user_payload else 0.97,
            applicable=True,
            summary=(
                f"The invisible watermark that {best.payload.label} embeds by default is present "
                f"({best.payload.method}, {len(best.payload.bits) - best.errors} of {len(best.payload.bits)} "
                f"bits match; the chance of this on an unmarked image is {best.false_alarm:.0e})."
            ),
            details=details,
            version=self.version,
        )
