"""Metadata: what the file says about where it came from.

Reads EXIF, XMP, PNG text chunks and the raw container bytes for: generator signatures (Stable
Diffusion web UIs, ComfyUI, InvokeAI, NovelAI, Midjourney, DALL-E, Firefly, Imagen, IPTC
DigitalSourceType "trainedAlgorithmicMedia"), a C2PA manifest (noted, not verified), editing
software and edit history, an EXIF thumbnail that no longer matches the image (the classic
"thumbnail left behind" trace: Kee & Farid, "Digital image authentication from thumbnails", SPIE
2010), inconsistent EXIF dates, missing camera data, and text addressed to an AI model.

Metadata is easy to strip or forge: its presence can be strong evidence, its absence is weak
evidence. Every metadata string is untrusted data: it is quoted, truncated, and never obeyed.

Score: 1 - prod(1 - weight) over the findings (each finding's weight is its own strength); about 0.9
for a generator signature, 0.7-0.85 for a thumbnail that shows different content, 0.35 for editing
software alone (which does not prove deception) and 0.1-0.2 for missing camera data.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import cv2
import numpy as np
from PIL import ExifTags, Image

from experts.base import Evidence, Region, not_applicable
from experts.image import LoadedImage

# --------------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Finding:
    kind: str
    weight: float  # this finding's own strength in [0, 1]
    text: str  # one plain sentence, metadata quoted as data
    indicates: str = "manipulated"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight": round(self.weight, 3), "text": self.text}


GENERATOR_WEIGHT = 0.9
GENERATOR_MENTION_WEIGHT = 0.45  # a generator's name in a free-text caption, not in a tool field
C2PA_AI_WEIGHT = 0.85
PIXEL_EDITOR_WEIGHT = 0.35
RAW_DEVELOPER_WEIGHT = 0.2
CONVERTER_WEIGHT = 0.1
COMPOSITE_HISTORY_WEIGHT = 0.4
THUMBNAIL_MISMATCH_WEIGHT = 0.85
THUMBNAIL_LOCAL_WEIGHTS = (0.5, 0.8)  # from a just-visible to a clear local difference
THUMBNAIL_CROP_WEIGHT = 0.35
THUMBNAIL_ROTATED_WEIGHT = 0.1
MODIFIED_BEFORE_CAPTURE_WEIGHT = 0.35
MODIFIED_AFTER_CAPTURE_WEIGHT = 0.2
DIGITIZED_MISMATCH_WEIGHT = 0.2
GPS_TIME_MISMATCH_WEIGHT = 0.25
MISSING_CAMERA_WEIGHT = 0.12
INSTRUCTION_TEXT_WEIGHT = 0.1

QUOTE_CHARS = 70


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """Untrusted metadata text as a short quoted string: one line, double quotes neutralised."""
    flat = " ".join(str(text).split()).replace('"', "'")
    return f'"{flat[:limit]}..."' if len(flat) > limit else f'"{flat}"'


# --------------------------------------------------------------------------------------------------
# The text fields we read. "Tool" fields name the program that wrote the file; the others are free
# text that anyone can type anything into.

_TOOL_EXIF_TAGS = ("Software", "ProcessingSoftware", "HostComputer", "Make", "Model")
_FREE_EXIF_TAGS = (
    "ImageDescription",
    "UserComment",
    "Artist",
    "Copyright",
    "XPTitle",
    "XPComment",
    "XPSubject",
    "XPKeywords",
    "XPAuthor",
)
_TOOL_PNG_KEYS = ("software", "source", "generator", "creator tool", "creator")
_XMP_TOOL_PROPERTIES = ("CreatorTool", "softwareAgent", "Software", "Make", "Model")
_XMP_FREE_PROPERTIES = (
    "description",
    "title",
    "subject",
    "Credit",
    "Headline",
    "Instructions",
    "UserComment",
    "rights",
    "creator",
)


@dataclass(frozen=True)
class TextField:
    source: str  # e.g. "EXIF Software", "PNG text 'parameters'", "XMP CreatorTool"
    value: str
    is_tool: bool


_XMP_ATTRIBUTE = re.compile(r'\b([A-Za-z][\w.-]*):([A-Za-z][\w.-]*)\s*=\s*"([^"]*)"')
_XMP_LEAF = re.compile(r"<([A-Za-z][\w.-]*):([A-Za-z][\w.-]*)\b[^>]*>([^<]*)</\1:\2>")
_XMP_LIST = re.compile(
    r"<([A-Za-z][\w.-]*):([A-Za-z][\w.-]*)\b[^>]*>\s*<rdf:(?:Alt|Seq|Bag)>(.*?)</rdf:(?:Alt|Seq|Bag)>",
    re.DOTALL,
)


def parse_xmp(xmp: str | None) -> dict[str, list[str]]:
    """XMP properties as {"prefix:Name": [values]}, written as attributes, simple elements or
    rdf:Alt/Seq/Bag lists (flattened to their text). A regex reader, not an XML parser: XMP in the
    wild is often malformed, and we only need a few properties."""
    properties: dict[str, list[str]] = {}
    if not xmp:
        return properties
    for pattern in (_XMP_ATTRIBUTE, _XMP_LEAF, _XMP_LIST):
        for prefix, name, value in pattern.findall(xmp):
            text = " ".join(re.sub(r"<[^>]+>", " ", value).split())
            if text and prefix not in ("rdf", "xmlns", "x"):
                properties.setdefault(f"{prefix}:{name}", []).append(text)
    return properties


def xmp_values(properties: dict[str, list[str]], name: str) -> list[str]:
    """Values of a property by local name ("CreatorTool") or with its prefix ("photoshop:History")."""
    if ":" in name:
        return properties.get(name, [])
    return [v for key, values in properties.items() if key.split(":", 1)[1] == name for v in values]


def _decode_comment(raw: bytes) -> str:
    """EXIF UserComment / Windows XP* tags: an 8-byte charset prefix or UTF-16LE."""
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        # Big-endian when the high (even) bytes are mostly zero, as piexif writes it.
        even_zero = body[0::2].count(0) > body[1::2].count(0)
        return body.decode("utf-16-be" if even_zero else "utf-16-le", "replace").rstrip("\x00")
    if head.startswith((b"ASCII", b"\x00" * 8)):
        return body.decode("latin-1").rstrip("\x00 ")
    if len(raw) % 2 == 0 and raw[1::2].count(0) > len(raw) // 4:  # XP* tags: UTF-16LE
        return raw.decode("utf-16-le", "replace").rstrip("\x00")
    return raw.decode("utf-8", "replace").rstrip("\x00")


@dataclass(frozen=True)
class RawExif:
    """What we re-read from the file with PIL: the byte-valued comment tags that LoadedImage
    summarises as '<N bytes>', and IFD1 (the thumbnail directory)."""

    comments: dict[str, str]
    tiff: bytes
    ifd1: dict[int, Any]


def _read_raw_exif(image: LoadedImage) -> RawExif:
    if not image.exif:  # nothing to re-read (and PIL would decode a whole PNG looking for eXIf)
        return RawExif({}, b"", {})
    try:
        with Image.open(io.BytesIO(image.data)) as opened:
            raw = opened.info.get("exif") or b""
            exif = opened.getexif()
            main = {**dict(exif.items()), **dict(exif.get_ifd(ExifTags.IFD.Exif).items())}
            ifd1 = dict(exif.get_ifd(ExifTags.IFD.IFD1).items())
    except Exception:  # malformed EXIF is already reported by LoadedImage
        return RawExif({}, b"", {})
    comments = {}
    for tag in (0x9286, 0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F):
        value = main.get(tag)
        if isinstance(value, (bytes, tuple)):
            try:
                text = _decode_comment(bytes(value))
            except (TypeError, ValueError):
                continue
            text = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t").strip()
            if text:
                comments[ExifTags.TAGS[tag]] = text[:4096]
    tiff = raw[6:] if isinstance(raw, bytes) and raw.startswith(b"Exif\x00\x00") else bytes(raw or b"")
    return RawExif(comments, tiff, ifd1)


def _text_fields(image: LoadedImage, raw: RawExif, xmp: dict[str, list[str]]) -> list[TextField]:
    fields: list[TextField] = []
    for tag, value in image.exif.items():
        if not isinstance(value, str) or not value.strip() or value.startswith("<"):
            continue
        if tag in _TOOL_EXIF_TAGS or tag in _FREE_EXIF_TAGS:
            fields.append(TextField(f"EXIF {tag}", value.strip(), tag in _TOOL_EXIF_TAGS))
    for tag, value in raw.comments.items():
        fields.append(TextField(f"EXIF {tag}", value, False))
    for key, value in image.text_chunks.items():
        if key == "XML:com.adobe.xmp":
            continue  # read as XMP below
        fields.append(TextField(f"PNG text {quote(key, 40)}", value, key.lower() in _TOOL_PNG_KEYS))
    for prop in _XMP_TOOL_PROPERTIES + _XMP_FREE_PROPERTIES:
        for value in xmp_values(xmp, prop):
            fields.append(TextField(f"XMP {prop}", value, prop in _XMP_TOOL_PROPERTIES))
    return fields


# --------------------------------------------------------------------------------------------------
# Generator signatures

_GENERATOR_NAMES = re.compile(
    r"midjourney|dall[\s·•-]?e|openai|chatgpt|adobe firefly|\bfirefly\b|\bimagen\s?\d|google\s+(?:ai|imagen)"
    r"|gemini|stable[\s_-]?diffusion|stability\.?ai|dreamstudio|novelai|comfyui|invokeai|automatic1111"
    r"|fooocus|leonardo\.?ai|ideogram|black forest labs|\bflux(?:\.1)?\b|bing image creator"
    r"|image creator from (?:microsoft )?designer|microsoft designer|runwayml|nightcafe|craiyon"
    r"|draw things|diffusionbee|\bsdxl\b|\bmeta ai\b",
    re.IGNORECASE,
)
# In a free-text caption only names that cannot be ordinary words count (and only as a mention).
_GENERATOR_MENTIONS = re.compile(
    r"midjourney|dall[\s·•-]?e\b|adobe firefly|stable[\s_-]?diffusion|novelai|made with google ai"
    r"|bing image creator|\bai[- ]generated\b|generated (?:by|with) (?:an? )?ai\b",
    re.IGNORECASE,
)
_A1111_PARAMETERS = re.compile(r"\bSteps:\s*\d+.*\b(?:Sampler|Seed|CFG scale):", re.DOTALL)
_MIDJOURNEY_JOB = re.compile(r"\bJob ID:\s*[0-9a-f]{8}-[0-9a-f]{4}-", re.IGNORECASE)
_DIGITAL_SOURCE_AI = re.compile(r"\b(compositeWithTrainedAlgorithmicMedia|trainedAlgorithmicMedia)\b")


def _generator_findings(image: LoadedImage, fields: list[TextField]) -> list[Finding]:
    found: list[Finding] = []
    chunks = {k.lower(): v for k, v in image.text_chunks.items()}

    def add(kind: str, text: str, weight: float = GENERATOR_WEIGHT) -> None:
        found.append(Finding(kind, weight, text, "ai_generated"))

    parameters = chunks.get("parameters", "")
    a1111 = next((f for f in fields if _A1111_PARAMETERS.search(f.value)), None)
    if a1111:
        prompt = a1111.value.split("\n")[0]
        add(
            "generator_signature",
            f"{a1111.source} holds Stable Diffusion generation settings (steps, sampler, seed) in the "
            f"format of the AUTOMATIC1111/Forge web UI; prompt {quote(prompt)}.",
        )
    if '"class_type"' in chunks.get("prompt", "") or '"nodes"' in chunks.get("workflow", ""):
        add("generator_signature", "PNG text chunks 'prompt'/'workflow' hold a ComfyUI generation graph.")
    invoke_keys = [k for k in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "dream") if k in chunks]
    if invoke_keys:
        add("generator_signature", f"PNG text chunk '{invoke_keys[0]}' is InvokeAI generation metadata.")
    if "fooocus_scheme" in chunks or ("fooocus" in parameters.lower() and not a1111):
        add("generator_signature", "PNG text chunks hold Fooocus generation parameters.")
    if chunks.get("software", "").strip().lower().startswith("novelai") or (
        '"steps"' in chunks.get("comment", "") and '"sampler"' in chunks.get("comment", "")
    ):
        add(
            "generator_signature",
            f"PNG text says Software {quote(chunks.get('software', '?'), 30)} with NovelAI-style "
            "generation settings in 'Comment'.",
        )
    job = next(
        (f for f in fields if "description" in f.source.lower() and _MIDJOURNEY_JOB.search(f.value)), None
    )
    if job:
        add("generator_signature", f"{job.source} is a Midjourney job description ({quote(job.value, 50)}).")
    source_type = _DIGITAL_SOURCE_AI.search(image.xmp or "") or next(
        (m for f in fields if (m := _DIGITAL_SOURCE_AI.search(f.value))), None
    )
    if source_type:
        composite = source_type.group(1).startswith("composite")
        add(
            "digital_source_type",
            f"IPTC DigitalSourceType is '{source_type.group(1)}': the file declares itself "
            + ("partly made with generative AI." if composite else "made by a generative AI model."),
            0.8 if composite else GENERATOR_WEIGHT,
        )
    if not found:  # a named generator in a tool field, or a mention in a caption
        tool = next((f for f in fields if f.is_tool and _GENERATOR_NAMES.search(f.value)), None)
        if tool:
            add("generator_signature", f"{tool.source} names an AI image generator: {quote(tool.value, 50)}.")
        else:
            mention = next((f for f in fields if _GENERATOR_MENTIONS.search(f.value)), None)
            if mention:
                add(
                    "generator_mention",
                    f"{mention.source} mentions an AI image generator ({quote(mention.value, 50)}); a "
                    "caption anyone can type, so this is moderate evidence.",
                    GENERATOR_MENTION_WEIGHT,
                )
    return found


# --------------------------------------------------------------------------------------------------
# C2PA / JUMBF content credentials (presence only; another expert verifies the signature)

_C2PA_BOX = re.compile(rb"jumb[\s\S]{0,64}?c2pa")
_C2PA_AI_MARKERS = (
    (re.compile(rb"compositeWithTrainedAlgorithmicMedia"), "compositeWithTrainedAlgorithmicMedia", 0.75),
    (re.compile(rb"trainedAlgorithmicMedia"), "trainedAlgorithmicMedia", C2PA_AI_WEIGHT),
    (re.compile(rb"DALL[\xc2\xb7\- ]{0,2}E|OpenAI|ChatGPT|Adobe Firefly|Image Creator"), "", 0.8),
)
C2PA_SCAN_BYTES = 4 * 1024 * 1024


def _metadata_bytes(image: LoadedImage) -> bytes:
    """The part of the file that holds metadata: a JPEG's marker segments before the scan data
    (APP1 Exif/XMP, APP11 JUMBF), or the first few MB of other containers."""
    data = image.data
    if not image.is_jpeg:
        return data[:C2PA_SCAN_BYTES]
    # Walk the segments: an embedded thumbnail has its own SOS marker, so searching for one is wrong.
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan: the metadata is behind us
            break
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return data[:position]


def _c2pa_findings(header: bytes) -> tuple[list[Finding], bool]:
    match = _C2PA_BOX.search(header)
    if not match:
        return [], False
    manifest = header[match.start() : match.start() + C2PA_SCAN_BYTES]
    for pattern, label, weight in _C2PA_AI_MARKERS:
        hit = pattern.search(manifest)
        if hit:
            name = label or hit.group(0).decode("utf-8", "replace")
            return [
                Finding(
                    "c2pa_ai_declaration",
                    weight,
                    f"The file carries a C2PA content-credentials manifest (signature not verified "
                    f"here) that declares {quote(name, 40)}: made with generative AI.",
                    "ai_generated",
                )
            ], True
    return [
        Finding(
            "c2pa_manifest",
            0.0,
            "The file carries a C2PA content-credentials manifest; its signature and claims are "
            "checked by the provenance expert, not here.",
        )
    ], True


# --------------------------------------------------------------------------------------------------
# Editing software and edit history

_EDITORS: tuple[tuple[re.Pattern[str], str, float], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), name, weight)
    for pattern, name, weight in (
        (r"lightroom", "Adobe Lightroom", RAW_DEVELOPER_WEIGHT),
        (r"camera raw", "Adobe Camera Raw", RAW_DEVELOPER_WEIGHT),
        (r"photoshop express", "Photoshop Express", PIXEL_EDITOR_WEIGHT),
        (r"photoshop|imageready", "Adobe Photoshop", PIXEL_EDITOR_WEIGHT),
        (r"\bgimp\b", "GIMP", PIXEL_EDITOR_WEIGHT),
        (r"affinity", "Affinity Photo", PIXEL_EDITOR_WEIGHT),
        (r"paint\.net", "Paint.NET", PIXEL_EDITOR_WEIGHT),
        (r"pixelmator", "Pixelmator", PIXEL_EDITOR_WEIGHT),
        (r"photopea", "Photopea", PIXEL_EDITOR_WEIGHT),
        (r"\bkrita\b", "Krita", PIXEL_EDITOR_WEIGHT),
        (r"paintshop|corel", "Corel PaintShop", PIXEL_EDITOR_WEIGHT),
        (r"snapseed", "Snapseed", PIXEL_EDITOR_WEIGHT),
        (r"\bcanva\b", "Canva", PIXEL_EDITOR_WEIGHT),
        (r"picsart", "PicsArt", PIXEL_EDITOR_WEIGHT),
        (r"facetune", "Facetune", PIXEL_EDITOR_WEIGHT),
        (r"meitu|beautyplus|airbrush", "a beauty-retouch app", PIXEL_EDITOR_WEIGHT),
        (r"faceapp|remini|lensa", "an AI photo-enhancement app", PIXEL_EDITOR_WEIGHT),
        (r"luminar", "Luminar", PIXEL_EDITOR_WEIGHT),
        (r"fotor|pixlr|photoscape|inpaint", "a photo editor", PIXEL_EDITOR_WEIGHT),
        (
            r"capture one|darktable|rawtherapee|\bdxo\b|aperture|\bvsco\b|polarr|on1 photo",
            "a raw developer",
            RAW_DEVELOPER_WEIGHT,
        ),
        (
            r"picasa|acdsee|windows photo|photo gallery|shotwell|digikam",
            "a photo organiser",
            RAW_DEVELOPER_WEIGHT,
        ),
        (
            r"imagemagick|graphicsmagick|libvips|xnview|irfanview|faststone",
            "an image converter",
            CONVERTER_WEIGHT,
        ),
    )
)


def _editing_findings(
    image: LoadedImage, fields: list[TextField], xmp: dict[str, list[str]]
) -> list[Finding]:
    tools: dict[str, tuple[float, TextField]] = {}
    agents = xmp_values(xmp, "softwareAgent")
    candidates = [f for f in fields if f.is_tool and f.source not in ("EXIF Make", "EXIF Model")]
    for field in candidates:
        for pattern, name, weight in _EDITORS:
            if pattern.search(field.value):
                if name not in tools:
                    tools[name] = (weight, field)
                break
    found: list[Finding] = []
    if tools:
        strongest = max(tools.values(), key=lambda item: item[0])
        names = ", ".join(tools)
        saves = sum(v == "saved" for v in xmp_values(xmp, "action"))
        history = f"; its XMP history records {saves} save(s)" if saves else ""
        found.append(
            Finding(
                "editing_software",
                strongest[0],
                f"The file was written by {names} ({strongest[1].source} "
                f"{quote(strongest[1].value, 50)}){history}; "
                "editing software alone does not prove deception (most published photos are adjusted).",
            )
        )
    elif xmp_values(xmp, "photoshop:History"):
        found.append(
            Finding(
                "editing_software",
                PIXEL_EDITOR_WEIGHT,
                "The XMP carries a Photoshop edit-history log; editing alone does not prove deception.",
            )
        )
    elif agents:
        found.append(
            Finding(
                "editing_software",
                RAW_DEVELOPER_WEIGHT,
                f"The XMP edit history names software {quote(agents[-1], 50)}.",
            )
        )
    ancestors = sum(len(v.split()) for v in xmp_values(xmp, "DocumentAncestors"))
    if ancestors or xmp_values(xmp, "Ingredients"):
        count = f"{ancestors} other document(s)" if ancestors else "other documents"
        found.append(
            Finding(
                "composite_history",
                COMPOSITE_HISTORY_WEIGHT,
                f"The XMP lists {count} pasted or placed into this file (photoshop:DocumentAncestors / "
                "xmpMM:Ingredients), a trace of compositing, though it may be as harmless as a logo.",
            )
        )
    return found


# --------------------------------------------------------------------------------------------------
# Dates

_CAPTURE_TOLERANCE = timedelta(minutes=10)  # in-camera processing (HDR, noise reduction) takes seconds


def _exif_datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value.strip()[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _gps_datetime(exif: dict[str, Any]) -> datetime | None:
    stamp, clock = exif.get("GPSDateStamp"), exif.get("GPSTimeStamp")
    if not isinstance(stamp, str):
        return None
    try:
        day = datetime.strptime(stamp.strip()[:10], "%Y:%m:%d")
        if isinstance(clock, list) and len(clock) == 3:
            hours, minutes, seconds = (float(c or 0) for c in clock)
            return day + timedelta(hours=hours, minutes=minutes, seconds=seconds)
    except (ValueError, TypeError, OverflowError):
        return None
    return day + timedelta(hours=12)  # date only: compare against the middle of the day


def _utc_offset(value: Any) -> timedelta | None:
    match = re.fullmatch(r"\s*([+-])(\d{2}):(\d{2})\s*", value) if isinstance(value, str) else None
    if not match:
        return None
    delta = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
    return delta if match.group(1) == "+" else -delta


def _span(delta: timedelta) -> str:
    seconds = abs(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 60:.0f} minutes"


def _date_findings(exif: dict[str, Any]) -> list[Finding]:
    original = _exif_datetime(exif.get("DateTimeOriginal"))
    digitized = _exif_datetime(exif.get("DateTimeDigitized"))
    modified = _exif_datetime(exif.get("DateTime"))
    capture = original or digitized
    found: list[Finding] = []
    if capture and modified:
        gap = modified - capture
        if gap < -_CAPTURE_TOLERANCE:
            found.append(
                Finding(
                    "date_inconsistency",
                    MODIFIED_BEFORE_CAPTURE_WEIGHT,
                    f"EXIF says the file was modified ({modified:%Y-%m-%d %H:%M}) {_span(gap)} before "
                    f"the photo was taken ({capture:%Y-%m-%d %H:%M}), which is impossible for an "
                    "untouched file.",
                )
            )
        elif gap > _CAPTURE_TOLERANCE:
            found.append(
                Finding(
                    "date_inconsistency",
                    MODIFIED_AFTER_CAPTURE_WEIGHT,
                    f"EXIF says the file was re-written {_span(gap)} after capture ({capture:%Y-%m-%d} -> "
                    f"{modified:%Y-%m-%d}); this is common when photos are rotated, rated or edited "
                    "later, so it is weak on its own.",
                )
            )
    if original and digitized and abs(original - digitized) > _CAPTURE_TOLERANCE:
        found.append(
            Finding(
                "date_inconsistency",
                DIGITIZED_MISMATCH_WEIGHT,
                f"EXIF capture time and digitisation time differ by {_span(original - digitized)} "
                "(normal for film scans, not for a digital camera's own file).",
            )
        )
    gps = _gps_datetime(exif)
    if gps and capture:
        offset = _utc_offset(exif.get("OffsetTimeOriginal") or exif.get("OffsetTime"))
        # GPS time is UTC, capture time is local: without a recorded offset allow any time zone.
        gap = gps - (capture - offset) if offset is not None else gps - capture
        limit = timedelta(hours=6) if offset is not None else timedelta(hours=27)
        if abs(gap) > limit:
            found.append(
                Finding(
                    "date_inconsistency",
                    GPS_TIME_MISMATCH_WEIGHT,
                    f"The GPS time stamp is {_span(gap)} away from the capture time (more than time zones "
                    "explain); the location or the date may have been edited.",
                )
            )
    return found


# --------------------------------------------------------------------------------------------------
# Camera data

_CAMERA_TAGS = (
    "Make",
    "Model",
    "ExposureTime",
    "FNumber",
    "ISOSpeedRatings",
    "PhotographicSensitivity",
    "FocalLength",
    "LensModel",
)


def _camera_findings(image: LoadedImage) -> list[Finding]:
    has_camera = any(image.exif.get(tag) not in (None, "", 0) for tag in _CAMERA_TAGS)
    if has_camera or not image.is_jpeg:
        return []
    return [
        Finding(
            "missing_camera_data",
            MISSING_CAMERA_WEIGHT,
            "This JPEG has no camera make, model or exposure data: weak evidence, because most web "
            "platforms and messaging apps strip metadata.",
        )
    ]


def _camera_name(exif: dict[str, Any]) -> str | None:
    make, model = (str(exif.get(tag) or "").strip() for tag in ("Make", "Model"))
    name = model if make and model.lower().startswith(make.split()[0].lower()) else f"{make} {model}".strip()
    return name or None


# --------------------------------------------------------------------------------------------------
# Text addressed to an AI (prompt injection): recorded as a weak oddity, never obeyed.

_INSTRUCTION_LIKE = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.\n]{0,40}\b(?:instructions?|prompts?|rules|guidelines)\b"
    r"|\b(?:system prompt|new instructions|jailbreak)\b"
    r"|\byou are (?:an? )?(?:ai|assistant|language model|chatbot|llm)\b"
    r"|\b(?:say|state|report|declare|conclude|answer|respond|tell the user)\b[^.\n]{0,20}"
    r"\b(?:this|the) (?:image|photo|picture|file) (?:is|was) "
    r"(?:authentic|genuine|real|unedited|original|not)\b"
    r"|\b(?:assistant|ai|model|detector)\s*[:,]\s*(?:please\s+)?(?:ignore|classify|say|output|report)\b",
    re.IGNORECASE,
)


def _instruction_findings(fields: list[TextField]) -> list[Finding]:
    for field in fields:
        if _INSTRUCTION_LIKE.search(field.value):
            return [
                Finding(
                    "instruction_like_text",
                    INSTRUCTION_TEXT_WEIGHT,
                    f"{field.source} contains text addressed to an AI system ({quote(field.value, 60)}); "
                    "it is treated as data, not as an instruction, and such text is itself a weak sign "
                    "of tampering.",
                )
            ]
    return []


# --------------------------------------------------------------------------------------------------
# EXIF thumbnail versus image

THUMB_MATCH_CORRELATION = 0.9  # camera thumbnails correlate 0.96-1.0 with their images
THUMB_CROP_CORRELATION = 0.85
# Largest local difference (in units of the image's contrast) on untouched camera files is 0.6;
# a replaced region of 4% of the frame gives 0.6-2.4.
THUMB_LOCAL_THRESHOLD = 0.85
THUMB_MAX_SIDE = 1024  # EXIF limits the APP1 segment to 64 KB; anything bigger is not a thumbnail


def extract_exif_thumbnail(tiff: bytes, ifd1: dict[int, Any]) -> np.ndarray | None:
    """Decode the EXIF IFD1 thumbnail (JPEG, or uncompressed RGB strips) as RGB uint8, or None."""
    try:
        if 0x0201 in ifd1:
            start, length = int(ifd1[0x0201]), int(ifd1.get(0x0202, 0))
            blob = tiff[start : start + length]
            if not blob.startswith(b"\xff\xd8"):  # a wrong offset: fall back to the embedded SOI
                soi = tiff.find(b"\xff\xd8\xff", 8)
                blob = tiff[soi:] if soi > 0 else b""
            if not blob:
                return None
            with Image.open(io.BytesIO(blob)) as thumb:
                if max(thumb.size) > THUMB_MAX_SIDE:
                    return None
                return np.asarray(thumb.convert("RGB"))
        if 0x0111 in ifd1 and int(ifd1.get(0x0103, 1)) == 1:  # uncompressed: StripOffsets
            width, height = int(ifd1[0x0100]), int(ifd1[0x0101])
            offsets = ifd1[0x0111] if isinstance(ifd1[0x0111], tuple) else (ifd1[0x0111],)
            if not (0 < width <= THUMB_MAX_SIDE and 0 < height <= THUMB_MAX_SIDE):
                return None
            raw = tiff[int(offsets[0]) : int(offsets[0]) + width * height * 3]
            return (
                np.frombuffer(raw, np.uint8).reshape(height, width, 3)
                if len(raw) == width * height * 3
                else None
            )
    except Exception:  # a broken thumbnail is reported as such by the caller
        return None
    return None


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)


def _trim_borders(gray: np.ndarray) -> np.ndarray:
    """Cut the black bars cameras add when the thumbnail's aspect differs from the photo's."""
    live_rows = np.flatnonzero((gray.mean(1) > 12) | (gray.std(1) > 6))
    live_cols = np.flatnonzero((gray.mean(0) > 12) | (gray.std(0) > 6))
    if live_rows.size == 0 or live_cols.size == 0:
        return gray
    return gray[live_rows[0] : live_rows[-1] + 1, live_cols[0] : live_cols[-1] + 1]


def _smooth(gray: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(gray, (0, 0), 1.0)  # thumbnails and images differ in sharpening


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 1e-6 else 0.0


@dataclass(frozen=True)
class ThumbnailComparison:
    relation: str  # "matches", "local_difference", "rotated", "cropped", "thumbnail_is_crop", "mismatch"
    correlation: float
    local_difference: float
    bbox: tuple[int, int, int, int] | None  # raw-pixel box of the differing area, when localised

    def to_dict(self) -> dict[str, Any]:
        return {
            "relation": self.relation,
            "correlation": round(self.correlation, 3),
            "local_difference": round(self.local_difference, 3),
        }


def _full_frame(thumb: np.ndarray, main_gray: np.ndarray) -> tuple[float, np.ndarray]:
    """Correlation of thumbnail and image at thumbnail size, and the local residual map after a
    brightness/contrast fit (in units of the image's contrast)."""
    height, width = thumb.shape
    main = _smooth(cv2.resize(main_gray, (width, height), interpolation=cv2.INTER_AREA))
    thumb = _smooth(thumb)
    correlation = _correlation(thumb, main)
    centred = thumb - thumb.mean()
    gain = float((centred * (main - main.mean())).sum() / max(float((centred * centred).sum()), 1e-6))
    residual = np.abs(main - main.mean() - gain * centred) / max(float(main.std()), 1e-3)
    box = max(3, min(height, width) // 8)
    return correlation, cv2.blur(residual, (box, box))


def _best_crop_match(outer: np.ndarray, inner: np.ndarray) -> float:
    """Best normalised correlation of `inner` (scaled to 35-98% of `outer`'s width) inside `outer`."""
    best = -1.0
    outer = _smooth(outer)
    for fraction in np.geomspace(0.35, 0.98, 14):
        width = round(outer.shape[1] * fraction)
        height = round(width * inner.shape[0] / inner.shape[1])
        if width < 12 or height < 12 or height > outer.shape[0]:
            continue
        template = _smooth(cv2.resize(inner, (width, height), interpolation=cv2.INTER_AREA))
        if template.std() < 1e-3:
            continue
        result = cv2.matchTemplate(outer, template, cv2.TM_CCOEFF_NORMED)
        best = max(best, float(result.max()))
    return best


def compare_thumbnail(thumbnail: np.ndarray, pixels: np.ndarray) -> ThumbnailComparison:
    """Compare an EXIF thumbnail (RGB) with the image as stored (RGB, un-rotated)."""
    height, width = pixels.shape[:2]
    # Work from a copy about twice the thumbnail's size: a strided view first (cheap on 24 MP),
    # then an area resize to remove aliasing.
    target = min(640, max(64, 2 * max(thumbnail.shape[:2])))
    step = max(1, max(height, width) // (2 * target))
    view = pixels[::step, ::step]
    scale = min(1.0, target / max(view.shape[:2]))
    size = (max(1, round(view.shape[1] * scale)), max(1, round(view.shape[0] * scale)))
    small = cv2.resize(view, size, interpolation=cv2.INTER_AREA) if scale < 1 else view
    main_gray = _gray(small)
    thumb_gray = _trim_borders(_gray(thumbnail))
    if main_gray.std() < 2 or thumb_gray.std() < 2 or min(thumb_gray.shape) < 12:
        return ThumbnailComparison("not_compared", 0.0, 0.0, None)  # featureless: nothing to compare
    main_aspect = np.log(width / height)
    best: tuple[float, int, np.ndarray] | None = None
    for turns in range(4):  # a viewer may have rotated the pixels and left the thumbnail as it was
        candidate = np.rot90(thumb_gray, turns)
        if abs(np.log(candidate.shape[1] / candidate.shape[0]) - main_aspect) > 0.06:
            continue
        correlation, local = _full_frame(np.ascontiguousarray(candidate), main_gray)
        if best is None or correlation > best[0]:
            best = (correlation, turns, local)
    if best is not None and best[0] >= THUMB_MATCH_CORRELATION:
        correlation, turns, local = best
        peak = float(local.max())
        if turns:
            return ThumbnailComparison("rotated", correlation, peak, None)
        if peak <= THUMB_LOCAL_THRESHOLD:
            return ThumbnailComparison("matches", correlation, peak, None)
        # The box: the connected area around the peak where the difference is above half the peak.
        _, labels = cv2.connectedComponents((local > 0.5 * peak).astype(np.uint8))
        ys, xs = np.nonzero(labels == labels[np.unravel_index(int(np.argmax(local)), local.shape)])
        sy, sx = height / thumb_gray.shape[0], width / thumb_gray.shape[1]
        bbox = (
            int(xs.min() * sx),
            int(ys.min() * sy),
            min(width, int((xs.max() + 1) * sx) + 1),
            min(height, int((ys.max() + 1) * sy) + 1),
        )
        return ThumbnailComparison("local_difference", correlation, peak, bbox)
    correlation = best[0] if best else 0.0
    # Not the same frame: is the image a crop of the thumbnail (cropped after capture), or the
    # thumbnail a centre crop of the image (some cameras make them that way)?
    if _best_crop_match(thumb_gray, main_gray) >= THUMB_CROP_CORRELATION:
        return ThumbnailComparison("cropped", correlation, 0.0, None)
    if _best_crop_match(main_gray, thumb_gray) >= THUMB_CROP_CORRELATION:
        return ThumbnailComparison("thumbnail_is_crop", correlation, 0.0, None)
    return ThumbnailComparison("mismatch", correlation, 0.0, None)


_THUMBNAIL_FINDINGS = {
    "mismatch": (
        "thumbnail_mismatch",
        "The EXIF thumbnail shows a different picture from the image (correlation {correlation:.2f}; "
        "untouched camera files give 0.96-1.0): strong evidence that the image was changed after capture.",
    ),
    "local_difference": (
        "thumbnail_mismatch",
        "One area of the image differs from the EXIF thumbnail ({local_difference:.1f}x the image "
        "contrast; untouched camera files stay under 0.6): evidence that this area was edited after capture.",
    ),
    "cropped": (
        "thumbnail_crop",
        "The EXIF thumbnail shows a wider view than the image: it was cropped after capture (a common, "
        "usually harmless edit, but the file is not as the camera wrote it).",
    ),
    "rotated": (
        "thumbnail_rotated",
        "The EXIF thumbnail is turned relative to the image: the pixels were rotated after capture "
        "(harmless on its own).",
    ),
}


def _thumbnail_weight(result: ThumbnailComparison) -> float:
    if result.relation == "mismatch":
        return THUMBNAIL_MISMATCH_WEIGHT if result.correlation < 0.6 else 0.7
    if result.relation == "local_difference":
        low, high = THUMBNAIL_LOCAL_WEIGHTS
        return low + (high - low) * min(1.0, (result.local_difference - THUMB_LOCAL_THRESHOLD) / 0.8)
    return THUMBNAIL_CROP_WEIGHT if result.relation == "cropped" else THUMBNAIL_ROTATED_WEIGHT


def _thumbnail_findings(
    image: LoadedImage, raw: RawExif
) -> tuple[list[Finding], dict[str, Any], Region | None]:
    if not raw.ifd1 or not raw.tiff:
        return [], {"present": False}, None
    thumbnail = extract_exif_thumbnail(raw.tiff, raw.ifd1)
    if thumbnail is None:
        return [], {"present": True, "decodable": False}, None
    info: dict[str, Any] = {"present": True, "size": [int(thumbnail.shape[1]), int(thumbnail.shape[0])]}
    if min(thumbnail.shape[:2]) < 16 or min(image.height, image.width) < 16:
        info["relation"] = "not compared (too small)"
        return [], info, None
    result = compare_thumbnail(thumbnail, image.pixels)
    info.update(result.to_dict())
    if result.relation not in _THUMBNAIL_FINDINGS:
        return [], info, None
    kind, template = _THUMBNAIL_FINDINGS[result.relation]
    weight = _thumbnail_weight(result)
    text = template.format(correlation=result.correlation, local_difference=result.local_difference)
    region = Region(result.bbox, round(weight, 4), "differs from the EXIF thumbnail") if result.bbox else None
    return [Finding(kind, weight, text)], info, region


# --------------------------------------------------------------------------------------------------
# The expert


def combine(findings: list[Finding]) -> float:
    """Noisy-OR of the finding weights: independent clues add up, none alone exceeds its weight."""
    return float(1.0 - np.prod([1.0 - f.weight for f in findings])) if findings else 0.0


def _summary(findings: list[Finding], score: float, camera: str | None) -> str:
    ranked = sorted((f for f in findings if f.weight > 0), key=lambda f: -f.weight)
    if not ranked:
        where = f" (camera {quote(camera, 40)})" if camera else ""
        notes = " ".join(f.text for f in findings)
        return (
            f"No suspicious metadata{where}; metadata can be stripped or forged, so this does not prove "
            f"the image is authentic. {notes}"
        ).strip()
    lead = ranked[0].text
    if score < 0.3:
        lead = f"Only weak metadata evidence (score {score:.2f}): {lead}"
    extra = next((f for f in ranked[1:] if f.kind == "instruction_like_text"), None)
    if extra is None and len(ranked) > 1:
        extra = ranked[1]
    return f"{lead} Also: {extra.text}" if extra else lead


@dataclass(frozen=True)
class MetadataExpert:
    name = "metadata"
    version = "1"
    description = (
        "Metadata: AI-generator signatures, editing software, an EXIF thumbnail that no longer "
        "matches the image, inconsistent dates and missing camera data."
    )

    def analyze(self, image: LoadedImage) -> Evidence:
        if not image.data:
            return not_applicable(
                self.name,
                "No file bytes (the image was given as pixels), so there is no metadata to read.",
                self.version,
            )
        raw = _read_raw_exif(image)
        xmp = parse_xmp(image.xmp)
        fields = _text_fields(image, raw, xmp)
        c2pa, has_manifest = _c2pa_findings(_metadata_bytes(image))
        thumbnail, thumbnail_info, region = _thumbnail_findings(image, raw)
        findings = (
            _generator_findings(image, fields)
            + c2pa
            + thumbnail
            + _editing_findings(image, fields, xmp)
            + _date_findings(image.exif)
            + _camera_findings(image)
            + _instruction_findings(fields)
        )
        score = combine(findings)
        ai = any(f.indicates == "ai_generated" and f.weight > 0 for f in findings)
        camera = _camera_name(image.exif)
        return Evidence(
            expert=self.name,
            score=round(score, 4),
            applicable=True,
            summary=_summary(findings, score, camera),
            regions=(region,) if region else (),
            details={
                "indicates": "ai_generated" if ai else "manipulated",
                "findings": [f.to_dict() for f in findings],
                "camera": camera,
                "software": [
                    quote(f.value, 50) for f in fields if f.source.endswith(("Software", "CreatorTool"))
                ],
                "thumbnail": thumbnail_info,
                "c2pa_manifest": has_manifest,
            },
            version=self.version,
        )
