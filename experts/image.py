"""load_image(): the one place that opens images.

Accepts a path, bytes, a PIL image or a numpy array and returns a LoadedImage: the raw pixels as
stored (for forensics), the EXIF-oriented pixels (for display), the original bytes, the format, JPEG
quantisation tables, EXIF / XMP / PNG text, and notes on anything we had to convert. Anything we
cannot read raises InvalidImageError with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from experts.base import ImageFacts, InvalidImageError
from experts.jpeg_tables import nearest_quality_relative

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "AVIF")  # the JPEG reader also opens MPO
try:  # HEIC/HEIF (phone photos) through pillow-heif, when it is installed (it is a dependency)
    import pillow_heif

    pillow_heif.register_heif_opener()
    SUPPORTED_FORMATS += ("HEIF",)
except ImportError:  # pragma: no cover - a partial install: HEIF files get the "not supported" error
    pass
FEATURELESS_SPREAD = 2.0  # luma std; the least varied image in ../shared/data has 13
# Correlation of neighbouring pixels' luma (the larger of across and down) below which an image is random
# noise, not a scene: noise gives 0.00 as stored and -0.04 to 0.01 re-saved at JPEG 30-100; the 2,891
# images of ../shared/data at least 0.44 as stored (a CASIA texture; 32x32 CIFAKE thumbnails 0.67) and
# 0.24 halved (noise halved: 0.16, judged as an image).
NOISE_CORRELATION = 0.1
GRAPHIC_LEVELS = 32  # distinct green levels below which an image is a graphic, not a photo
# ... or the share of its pixels that its GRAPHIC_COLOURS most frequent exact colours cover, at or above
# which it is: an antialiased chart or silhouette has hundreds of levels along its edges, but 98-99% of
# its pixels in a few flat colours; no photo of ../shared/data passes 0.83 (a grey moon).
GRAPHIC_COLOURS, GRAPHIC_COVERAGE = 16, 0.95
# ... or text on a plain background (a screenshot of a post or an article): at least TEXT_BACKGROUND of
# the pixels within 2 levels of the commonest colour, and at least TEXT_ON_BLEND of the others within 24
# levels of a blend of it with the ink (antialiasing mixes the two), or PLAIN_BACKGROUND of the pixels
# that colour whatever the rest (a post with a small picture and coloured links). Screenshots of text:
# 0.73-0.91 and 0.89-1.00; photos of ../shared/data: at most 0.67 (a product shot on white, 0.82 on a
# blend) or, on a blend (grey photos), at most 0.39.
TEXT_BACKGROUND, TEXT_ON_BLEND, PLAIN_BACKGROUND = 0.5, 0.9, 0.8
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP; raise with max_pixels= or FORENSICS_MAX_PIXELS
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
MAX_METADATA_CHARS = 4096  # longer text values are cut: metadata is untrusted data

_PIL_LIMIT_LOCK = threading.Lock()

ImageInput = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray


def is_graphic(rgb: np.ndarray) -> bool:
    """Whether (n, 3) uint8 pixels are a graphic rather than a photo: few green levels, a few flat
    colours covering nearly all of it, or text on a plain background (the constants above)."""
    if len(np.unique(rgb[:, 1])) < GRAPHIC_LEVELS:
        return True
    wide = rgb.astype(np.int32)
    values, counts = np.unique((wide[:, 0] << 16) | (wide[:, 1] << 8) | wide[:, 2], return_counts=True)
    if float(np.sort(counts)[-GRAPHIC_COLOURS:].sum()) >= GRAPHIC_COVERAGE * len(rgb):
        return True
    commonest = values[np.argmax(counts)]
    background = np.array([commonest >> 16, (commonest >> 8) & 255, commonest & 255], np.float32)
    offset = wide.astype(np.float32) - background
    plain = np.abs(offset).max(axis=1) <= 2
    if plain.mean() >= PLAIN_BACKGROUND:
        return True
    if plain.mean() < TEXT_BACKGROUND:
        return False
    rest = offset[~plain]
    distance = np.abs(rest).max(axis=1)
    ink = rest[distance >= np.quantile(distance, 0.9)].mean(axis=0)  # the tenth farthest from the background
    length = float(np.linalg.norm(ink)) or 1.0
    along = np.clip(rest @ (ink / length), 0.0, length)
    off_blend = np.linalg.norm(rest - along[:, None] * (ink / length), axis=1)
    return float((off_blend <= 24).mean()) >= TEXT_ON_BLEND


def neighbour_correlation(rows: np.ndarray, columns: np.ndarray) -> float:
    """The larger of two correlations: of 2-D `rows` with each value's neighbour across, and of 2-D
    `columns` with each value's neighbour down (1.0 where a direction does not vary)."""
    found = []
    rows, columns = rows.astype(np.float64), columns.astype(np.float64)
    for first, second in ((rows[:, :-1], rows[:, 1:]), (columns[:-1], columns[1:])):
        first, second = first - first.mean(), second - second.mean()
        spread = float(np.sqrt((first * first).sum() * (second * second).sum()))
        found.append(float((first * second).sum()) / spread if spread else 1.0)
    return max(found)


def luma(rgb: np.ndarray) -> np.ndarray:
    """Luma (ITU-R BT.601, as JPEG uses) of RGB pixels, as float32 in [0, 255]; channel by channel, so
    no float copy of the whole RGB image is made."""
    value = rgb[..., 0] * np.float32(0.299)
    value += rgb[..., 1] * np.float32(0.587)
    value += rgb[..., 2] * np.float32(0.114)
    return value


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """An image ready for the experts. `pixels` is RGB uint8 HxWx3 exactly as stored (no EXIF
    rotation): forensic traces live on the stored pixel grid."""

    pixels: np.ndarray
    source: str
    format: str
    data: bytes
    sha256: str
    mode: str
    orientation: int = 1
    bit_depth: int = 8
    alpha: np.ndarray | None = None
    quantization: dict[int, np.ndarray] = field(default_factory=dict)  # JPEG tables, 8x8 natural order
    subsampling: str | None = None  # "4:2:0", "4:2:2", "4:4:4" for JPEG
    exif: dict[str, Any] = field(default_factory=dict)
    xmp: str | None = None
    text_chunks: dict[str, str] = field(default_factory=dict)
    icc_profile: bool = False
    frames: int = 1
    notes: tuple[str, ...] = ()

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_jpeg(self) -> bool:
        return self.format in ("JPEG", "MPO")

    @cached_property
    def gray(self) -> np.ndarray:
        """Luma (ITU-R BT.601, as JPEG uses) as float32 HxW in [0, 255]."""
        return luma(self.pixels)

    @cached_property
    def last_jpeg_quality(self) -> int | None:
        """The IJG quality nearest to the file's luma quantisation table (the quality it was last saved
        at, as the jpeg expert estimates it); None for a file that is not a JPEG."""
        table = self.quantization.get(0) if self.is_jpeg else None
        return None if table is None else nearest_quality_relative(np.asarray(table, np.float64))[0]

    @cached_property
    def featureless(self) -> bool:
        """Next to nothing in it (a flat colour, a blank page): the spread of its luma is under
        FEATURELESS_SPREAD grey levels. No pixel expert can examine such an image, so none may clear it."""
        return float(luma(self.pixels[::4, ::4]).std()) < FEATURELESS_SPREAD  # a sample: 50 MP stays cheap

    @cached_property
    def noise_only(self) -> bool:
        """Random noise, not a scene: neighbouring pixels are unrelated (`neighbour_correlation` under
        NOISE_CORRELATION), as in no photograph, drawing or generated image. Over the whole image (a
        photo partly replaced by noise is a scene), on about 256 of its rows and 256 of its columns at
        full resolution, so 50 MP stays cheap."""
        if min(self.height, self.width) < 2:
            return False
        step = max(1, min(self.height, self.width) // 256)
        rows, columns = luma(self.pixels[::step]), luma(self.pixels[:, ::step])
        return neighbour_correlation(rows, columns) < NOISE_CORRELATION

    @property
    def nothing_to_examine(self) -> str | None:
        """Why no pixel expert can examine this image (what it is, for their answers), or None."""
        if self.featureless:
            return "nearly one flat colour, so there is no detail"
        if self.noise_only:
            return (
                "random noise (neighbouring pixels are unrelated, as in no photograph), so there is no scene"
            )
        return None

    @cached_property
    def graphic(self) -> bool:
        """A chart, a logo, a drawing or a screenshot of text, not a photograph (`is_graphic`). Experts
        that read a photo's texture, compression traces or repeated regions decline such an image. The
        sample takes every 4th pixel each way, denser on an image under 512 px (every pixel under 256),
        so a small photo is not mistaken for a graphic."""
        step = max(1, min(4, min(self.height, self.width) // 128))
        return is_graphic(self.pixels[::step, ::step].reshape(-1, 3))

    @cached_property
    def display(self) -> np.ndarray:
        """The pixels with the EXIF orientation applied, as a viewer shows them."""
        return orient(self.pixels, self.orientation)

    @property
    def facts(self) -> ImageFacts:
        return ImageFacts(self.source, self.sha256, self.format, self.width, self.height, self.notes)

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def load_image(
    source: ImageInput,
    *,
    max_pixels: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
) -> LoadedImage:
    """Open an image from a path, bytes, a PIL image or a numpy array.

    max_pixels guards against decompression bombs (default 50 MP, or FORENSICS_MAX_PIXELS).
    """
    limit = max_pixels or int(os.environ.get("FORENSICS_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", limit)
    if isinstance(source, Image.Image):
        return _from_pil(
            source, data=b"", label=name or getattr(source, "filename", "") or "<PIL image>", limit=limit
        )
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, label = bytes(source), name or "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        data, label = _read_file(Path(source), max_bytes), name or str(source)
    else:
        raise InvalidImageError(
            f"cannot load an image from {type(source).__name__}: give a path, bytes, a PIL image "
            "or a numpy array"
        )
    if not data:
        raise InvalidImageError(f"{label}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidImageError(
            f"{label}: {len(data):,} bytes is over the {max_bytes:,}-byte limit; pass max_bytes= to raise it"
        )
    try:
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            # PIL's own bomb check uses a global; set it to our limit only while opening.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            default_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = default_limit
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(label, int(declared.group(1)) if declared else None, limit) from exc
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind:
            raise InvalidImageError(
                f"{label}: starts like a {kind} file but its header is corrupt; re-export the file"
            ) from None
        raise InvalidImageError(
            f"{label}: not a supported image (the bytes are not {', '.join(SUPPORTED_FORMATS)}); "
            "check the file or convert it to PNG or JPEG"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        if "truncated" in str(exc).lower():
            raise InvalidImageError(
                f"{label}: the file ends inside its header ({exc}): an incomplete download or copy; "
                "fetch or export it again"
            ) from exc
        raise InvalidImageError(f"{label}: corrupt image header ({exc}); re-export the file") from exc
    return _from_pil(image, data=data, label=label, limit=limit)


def _read_file(path: Path, max_bytes: int) -> bytes:
    if not path.exists():
        raise InvalidImageError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidImageError(f"{path}: is a folder, not an image file")
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidImageError(
            f"{path}: {size:,} bytes is over the {max_bytes:,}-byte limit; pass max_bytes= to raise it"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot be read ({exc.strerror})") from exc


def _too_large(label: str, size: tuple[int, int] | int | None, limit: int) -> InvalidImageError:
    if isinstance(size, tuple):
        dims = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:
        dims = f"its declared size of {size:,} pixels" if size else "its declared size"
    return InvalidImageError(
        f"{label}: {dims} is over the limit of {limit:,} pixels (a possible decompression bomb); "
        "if you trust the file, raise the limit with max_pixels= or FORENSICS_MAX_PIXELS"
    )


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


_BRANDS = {
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"), "HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}


def _sniff(data: bytes) -> str | None:
    """The format a file claims by its first bytes, to tell "corrupt JPEG" from "not an image"."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":  # ISO base media (a video too): the brand says which
        return _BRANDS.get(data[8:12])
    return next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)


def _from_pil(image: Image.Image, *, data: bytes, label: str, limit: int) -> LoadedImage:
    width, height = image.size
    if width * height > limit:
        raise _too_large(label, (width, height), limit)
    if width < 1 or height < 1:
        raise InvalidImageError(f"{label}: the image has no pixels ({width}x{height})")
    fmt = image.format or ("PNG" if not data else "UNKNOWN")
    notes: list[str] = []
    frames = int(getattr(image, "n_frames", 1) or 1)
    if frames > 1:
        notes.append(f"{fmt} with {frames} frames: only the first frame is analysed")
    info = dict(image.info)
    quantization = {
        int(k): np.asarray(v, dtype=np.int32).reshape(8, 8)
        for k, v in (getattr(image, "quantization", None) or {}).items()
    }
    exif, orientation = _exif(image)
    try:
        image.seek(0)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(label, (width, height), limit) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise InvalidImageError(f"{label}: the image data is {reason} ({exc}); re-export the file") from exc
    pixels, alpha, bit_depth, mode_notes = _to_rgb8(image)
    notes.extend(mode_notes)
    if orientation not in (1, 0):
        notes.append(f"EXIF orientation {orientation}: analysed as stored, shown rotated")
    text_chunks = {
        _clean(str(k)): _clean(v if isinstance(v, str) else repr(v))
        for k, v in (getattr(image, "text", None) or {}).items()
    }
    xmp = info.get("xmp") or text_chunks.get("XML:com.adobe.xmp")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    digest = hashlib.sha256(data or pixels.tobytes()).hexdigest()
    return LoadedImage(
        pixels=pixels,
        source=label,
        format=fmt,
        data=data,
        sha256=digest,
        mode=image.mode,
        orientation=orientation or 1,
        bit_depth=bit_depth,
        alpha=alpha,
        quantization=quantization,
        subsampling=_subsampling(image) if fmt in ("JPEG", "MPO") else None,
        exif=exif,
        xmp=_clean(xmp, limit=1_000_000) if xmp else None,
        text_chunks=text_chunks,
        icc_profile=bool(info.get("icc_profile")),
        frames=frames,
        notes=tuple(notes),
    )


def _from_array(array: np.ndarray, label: str, limit: int) -> LoadedImage:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(
            f"{label}: an array image must be HxW, HxWx3 or HxWx4, not shape {array.shape}"
        )
    if array.size == 0:
        raise InvalidImageError(f"{label}: the array has no pixels (shape {array.shape})")
    if array.shape[0] * array.shape[1] > limit:
        raise _too_large(label, (array.shape[1], array.shape[0]), limit)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError(f"{label}: the float array contains NaN or infinity")
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    else:
        raise InvalidImageError(f"{label}: unsupported array dtype {array.dtype}; use uint8 or float")
    return _from_pil(Image.fromarray(np.ascontiguousarray(array)), data=b"", label=label, limit=limit)


def _to_rgb8(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int, list[str]]:
    """Convert any PIL mode to RGB uint8; returns (rgb, alpha, original bit depth, notes)."""
    notes: list[str] = []
    mode, alpha, bit_depth = image.mode, None, 8
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        raw = np.asarray(image)
        bit_depth = 16
        top = 65535 if raw.max() > 255 or mode.startswith("I;16") else 255
        gray = np.clip(np.rint(raw.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
        notes.append("16-bit image: reduced to 8 bits per channel for analysis")
        return np.stack([gray] * 3, axis=-1), None, bit_depth, notes
    if mode == "F":
        raw = np.asarray(image, dtype=np.float64)
        lo, hi = float(raw.min()), float(raw.max())
        gray = (
            np.zeros(raw.shape, np.uint8)
            if hi <= lo
            else np.rint((raw - lo) * 255 / (hi - lo)).astype(np.uint8)
        )
        notes.append("floating-point image: rescaled to 8 bits for analysis")
        return np.stack([gray] * 3, axis=-1), None, 32, notes
    if mode in ("RGB;16", "RGBA;16") or image.info.get("bits", 8) == 16:
        bit_depth = 16
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette image: colours expanded to RGB")
        mode = image.mode
    if mode in ("1", "L", "LA"):
        if mode == "LA":
            alpha = np.asarray(image.getchannel("A"))
        gray = np.asarray(image.convert("L"))
        notes.append("grayscale image")
        rgb = np.stack([gray] * 3, axis=-1)
    elif mode == "CMYK":
        rgb = np.asarray(image.convert("RGB"))
        notes.append("CMYK image: converted to RGB for analysis")
    elif mode in ("RGBA", "RGBa", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        rgb = np.asarray(image.convert("RGB"))
    elif mode == "RGB":
        rgb = np.asarray(image)
    else:
        rgb = np.asarray(image.convert("RGB"))
        notes.append(f"{mode} image: converted to RGB for analysis")
    if alpha is not None:
        if alpha.min() < 255:
            notes.append("has transparency: the colour values are analysed, the alpha channel is ignored")
        else:
            alpha = None
    return np.ascontiguousarray(rgb, dtype=np.uint8), alpha, bit_depth, notes


def _exif(image: Image.Image) -> tuple[dict[str, Any], int]:
    """EXIF as {tag name: JSON-safe value}, including the Exif and GPS sub-IFDs, and orientation."""
    try:
        exif = image.getexif()
    except Exception:
        return {"_error": "unreadable EXIF block"}, 1
    out: dict[str, Any] = {}
    for tag, value in exif.items():
        out[ExifTags.TAGS.get(tag, f"0x{tag:04x}")] = _json_safe(value)
    for ifd_id, names in ((ExifTags.IFD.Exif, ExifTags.TAGS), (ExifTags.IFD.GPSInfo, ExifTags.GPSTAGS)):
        try:
            sub = exif.get_ifd(ifd_id)
        except Exception:
            continue
        for tag, value in sub.items():
            out[names.get(tag, f"0x{tag:04x}")] = _json_safe(value)
    for key in ("ExifOffset", "GPSInfo"):
        out.pop(key, None)
    orientation = out.get("Orientation", 1)
    return out, orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        text = value.rstrip(b"\x00")
        try:
            return _clean(text.decode("utf-8"))
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return _clean(value.rstrip("\x00"))
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value[:64]]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in list(value.items())[:64]}
    if isinstance(value, (int, bool)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return _clean(str(value))
    return number if np.isfinite(number) else None


def _clean(text: str, limit: int = MAX_METADATA_CHARS) -> str:
    """Strip control characters and cut long values: metadata text is data, never instructions."""
    cleaned = "".join(ch for ch in str(text) if ch.isprintable() or ch in "\n\t")
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + f"... [{len(cleaned) - limit} more chars]"


def _subsampling(image: Image.Image) -> str | None:
    try:
        from PIL import JpegImagePlugin

        return {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}.get(JpegImagePlugin.get_sampling(image))
    except Exception:
        return None


_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
    8: lambda a: np.rot90(a, k=1),
}


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxW[xC] array, as PIL's ImageOps.exif_transpose does."""
    transform = _ORIENT.get(orientation)
    return np.ascontiguousarray(transform(array)) if transform else array
