"""run_experts(): runs experts on an image, times them, and caches results per
(image sha256, expert, version, parameters) so follow-up questions cost nothing. The cache is bounded
by the bytes of the maps it holds (full-size heatmaps and masks), not by a count, so a long session
over large images keeps a steady memory footprint."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from experts.base import Evidence, ExpertError, not_applicable
from experts.image import ImageInput, LoadedImage, load_image
from experts.registry import available_experts, get_expert

log = logging.getLogger(__name__)

_CACHE: OrderedDict[tuple, Evidence] = OrderedDict()
_LOCK = threading.Lock()  # sessions of the app analyse images in parallel threads
CACHE_BYTES = 256 * 1024 * 1024  # about the maps of all experts on 10 twelve-megapixel photos


def run_expert(image: LoadedImage, name: str, params: Mapping[str, Any] | None = None) -> Evidence:
    """One expert on one image. An ExpertError (the expert refuses this image) or an unexpected
    failure becomes non-applicable evidence that says what went wrong; it is logged, not hidden."""
    params = dict(params or {})
    expert = get_expert(name, **params)
    key = (image.sha256, name, expert.version, tuple(sorted(params.items())))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    start = time.perf_counter()
    try:
        evidence = expert.analyze(image)
    except ExpertError as exc:
        evidence = not_applicable(name, str(exc), expert.version)
    except MemoryError as exc:
        raise ExpertError(f"{name}: out of memory on a {image.width}x{image.height} image") from exc
    except Exception as exc:
        log.exception("expert %s failed on %s", name, image.source)
        evidence = not_applicable(
            name,
            f"{name} failed on this image ({type(exc).__name__}: {exc})",
            expert.version,
            error=f"{type(exc).__name__}: {exc}",
        )
    evidence = dataclasses.replace(
        evidence, seconds=round(time.perf_counter() - start, 4), version=expert.version
    )
    with _LOCK:
        _CACHE[key] = evidence
        while len(_CACHE) > 1 and sum(map(_nbytes, _CACHE.values())) > CACHE_BYTES:
            _CACHE.popitem(last=False)  # least recently used first
    return evidence


def _nbytes(evidence: Evidence) -> int:
    return sum(a.nbytes for a in (evidence.heatmap, evidence.mask) if a is not None) + 1024


def run_experts(
    image: ImageInput | LoadedImage,
    names: Iterable[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Evidence, ...]:
    """Run the named experts (default: all registered) and return their evidence in order."""
    loaded = image if isinstance(image, LoadedImage) else load_image(image)
    params = params or {}
    return tuple(run_expert(loaded, name, params.get(name)) for name in (names or available_experts()))


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
