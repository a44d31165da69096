"""analyze(): one image in, one Analysis out (load -> experts -> fusion)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from experts.base import Analysis
from experts.fusion import fuse
from experts.image import ImageInput, LoadedImage, load_image
from experts.runner import run_experts


def analyze(
    image: ImageInput | LoadedImage,
    experts: Iterable[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    max_pixels: int | None = None,
) -> Analysis:
    """Run the experts (default: all registered) on an image and fuse their evidence."""
    start = time.perf_counter()
    loaded = image if isinstance(image, LoadedImage) else load_image(image, max_pixels=max_pixels)
    loaded_at = time.perf_counter()
    evidence = run_experts(loaded, experts, params)
    experts_at = time.perf_counter()
    verdict = fuse(evidence, (loaded.height, loaded.width), jpeg_quality=loaded.last_jpeg_quality)
    timings = {
        "load": round(loaded_at - start, 4),
        "experts": round(experts_at - loaded_at, 4),
        "fusion": round(time.perf_counter() - experts_at, 4),
        "total": round(time.perf_counter() - start, 4),
    }
    return Analysis(loaded.facts, evidence, verdict, timings)
