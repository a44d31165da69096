"""load_image: every input kind, every format, odd colour modes, and every bad input's exact error."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from experts.base import InvalidImageError
from experts.image import load_image, orient

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF"])
def test_every_supported_format_loads_at_its_size(fmt):
    image = load_image(encode(Image.fromarray(PIXELS), fmt))
    assert image.format == fmt
    assert image.pixels.shape == (48, 64, 3) and image.pixels.dtype == np.uint8
    assert len(image.sha256) == 64 and image.data


def test_a_phone_photo_in_heic_loads_upright_with_its_camera_data():
    """HEIF stores its rotation in the container; pillow-heif applies it, so the pixels are upright and
    the EXIF orientation reads 1. A cut file gets the corrupt-header message, not "not an image"."""
    from skimage import data

    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110] = 6, "Apple", "iPhone 15"
    heic = encode(Image.fromarray(data.astronaut()), "HEIF", quality=90, exif=exif.tobytes())
    image = load_image(heic)
    assert (image.format, image.orientation, image.exif["Make"], image.exif["Model"]) == (
        "HEIF",
        1,
        "Apple",
        "iPhone 15",
    )
    assert np.abs(image.pixels.astype(int) - np.rot90(data.astronaut(), 3)).mean() < 5  # turned upright
    with pytest.raises(InvalidImageError, match="starts like a HEIF file"):
        load_image(heic[:200])
    video = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64)  # an MP4 is not a photo
    with pytest.raises(InvalidImageError, match="not a supported image"):
        load_image(video)


def test_lossless_formats_keep_exact_pixels():
    for fmt in ("PNG", "TIFF", "BMP"):
        assert np.array_equal(load_image(encode(Image.fromarray(PIXELS), fmt)).pixels, PIXELS)


def test_path_bytes_pil_and_array_inputs_agree(tmp_path):
    data = encode(Image.fromarray(PIXELS), "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    loaded = [
        load_image(path),
        load_image(str(path)),
        load_image(data),
        load_image(Image.open(path)),
        load_image(PIXELS),
    ]
    for image in loaded:
        assert np.array_equal(image.pixels, PIXELS)
    assert loaded[0].sha256 == loaded[2].sha256
    assert loaded[0].source == str(path)


def test_array_kinds():
    assert load_image(PIXELS[..., 0]).pixels.shape == (48, 64, 3)
    floats = load_image(PIXELS.astype(np.float32) / 255)
    assert np.abs(floats.pixels.astype(int) - PIXELS).max() <= 1
    assert load_image(PIXELS.astype(np.uint16) << 8).pixels.shape == (48, 64, 3)
    rgba = np.dstack([PIXELS, np.full((48, 64), 128, np.uint8)])
    assert load_image(rgba).alpha is not None


def test_jpeg_keeps_quantisation_tables_and_subsampling():
    image = load_image(encode(Image.fromarray(PIXELS), "JPEG", quality=75, subsampling=2))
    assert image.is_jpeg
    assert image.quantization[0][0].tolist() == [8, 6, 5, 8, 12, 20, 26, 31]  # IJG q75, natural order
    assert image.quantization[0].shape == (8, 8) and 1 in image.quantization
    assert image.subsampling == "4:2:0"


def test_exif_is_kept_and_orientation_applied_only_for_display():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "Canon"
    exif[0x0131] = "Adobe Photoshop 25.0"
    data = encode(Image.fromarray(PIXELS), "JPEG", exif=exif.tobytes())
    image = load_image(data)
    assert image.orientation == 6
    assert image.exif["Make"] == "Canon" and image.exif["Software"] == "Adobe Photoshop 25.0"
    assert image.pixels.shape == (48, 64, 3)  # raw grid for forensics
    assert image.display.shape == (64, 48, 3)  # as a viewer shows it
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert np.array_equal(image.display, expected)
    assert any("orientation 6" in note for note in image.notes)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_for_all_eight_orientations(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(PIXELS), "PNG", exif=exif.tobytes())
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert np.array_equal(orient(PIXELS, orientation), expected)


def test_png_text_chunks_and_xmp_are_kept():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat, Steps: 20, Sampler: Euler a")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>CreatorTool=GIMP</x:xmpmeta>")
    image = load_image(encode(Image.fromarray(PIXELS), "PNG", pnginfo=info))
    assert image.text_chunks["parameters"].startswith("a cat")
    assert "GIMP" in image.xmp


def test_metadata_text_is_sanitised():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "ok\x1b[31mred\x00" + "x" * 10_000)
    image = load_image(encode(Image.fromarray(PIXELS), "PNG", pnginfo=info))
    comment = image.text_chunks["Comment"]
    assert "\x1b" not in comment and "\x00" not in comment
    assert len(comment) < 4200 and "more chars" in comment


def test_cmyk_is_converted():
    data = encode(Image.fromarray(PIXELS).convert("CMYK"), "JPEG")
    image = load_image(data)
    assert image.mode == "CMYK" and image.pixels.shape == (48, 64, 3)
    assert any("CMYK" in note for note in image.notes)


def test_16_bit_png_is_reduced_to_8_bits():
    gray16 = (RNG.integers(0, 65536, (20, 30))).astype(np.uint16)
    data = encode(Image.fromarray(gray16), "PNG")
    image = load_image(data)
    assert image.bit_depth == 16 and image.pixels.dtype == np.uint8
    assert abs(int(image.pixels[0, 0, 0]) - round(int(gray16[0, 0]) * 255 / 65535)) <= 1
    assert any("16-bit" in note for note in image.notes)


def test_palette_and_alpha():
    palette = Image.fromarray(PIXELS).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image = load_image(encode(palette, "PNG"))
    assert image.pixels.shape == (48, 64, 3) and any("palette" in n for n in image.notes)
    rgba = Image.fromarray(np.dstack([PIXELS, np.full((48, 64), 10, np.uint8)]))
    image = load_image(encode(rgba, "PNG"))
    assert image.alpha is not None and np.array_equal(image.pixels, PIXELS)
    assert any("transparency" in n for n in image.notes)


def test_gif_first_frame_is_analysed_and_said():
    frames = [Image.fromarray(np.full((10, 10, 3), v, np.uint8)) for v in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    image = load_image(buffer.getvalue())
    assert image.frames == 3
    assert image.pixels.max() == 0  # first frame
    assert "GIF with 3 frames: only the first frame is analysed" in image.notes


# ------------------------------------------------------------------------------------ bad input


def test_empty_bytes():
    with pytest.raises(InvalidImageError, match=r"^<bytes>: the file is empty \(0 bytes\)$"):
        load_image(b"")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty.jpg: the file is empty"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(InvalidImageError, match="is a folder, not an image file"):
        load_image(tmp_path)


def test_non_image_bytes():
    with pytest.raises(InvalidImageError, match=r"^<bytes>: not a supported image \(the bytes are not JPEG"):
        load_image(b"%PDF-1.4 this is a text document, not an image")


def test_unsupported_format_is_refused():
    data = encode(Image.fromarray(PIXELS), "ICO")
    with pytest.raises(InvalidImageError, match="not a supported image"):
        load_image(data)


def test_truncated_jpeg():
    data = encode(Image.fromarray(PIXELS), "JPEG", quality=90)
    with pytest.raises(InvalidImageError, match=r"^<bytes>: the image data is truncated"):
        load_image(data[: len(data) // 2])


def test_a_file_cut_inside_its_header_says_so():
    exif = Image.Exif()
    exif[0x010E] = "x" * 4000  # a long ImageDescription: the header runs past the cut
    data = encode(Image.fromarray(PIXELS), "JPEG", quality=90, exif=exif.tobytes())
    with pytest.raises(InvalidImageError, match=r"^<bytes>: the file ends inside its header"):
        load_image(data[:2000])


def test_truncated_png():
    data = encode(Image.fromarray(PIXELS), "PNG")
    with pytest.raises(InvalidImageError, match="the image data is (truncated|corrupt)"):
        load_image(data[: len(data) - 40])


def test_corrupt_jpeg_data():
    data = bytearray(encode(Image.fromarray(PIXELS), "JPEG", quality=90))
    data[2:40] = b"\xff" * 38  # destroy the headers after SOI
    with pytest.raises(
        InvalidImageError, match=r"^<bytes>: starts like a JPEG file but its header is corrupt"
    ):
        load_image(bytes(data))


def test_corrupt_png_crc():
    data = bytearray(encode(Image.fromarray(PIXELS), "PNG"))
    data[12:30] = bytes(18)  # wipe the IHDR chunk
    with pytest.raises(
        InvalidImageError, match=r"^<bytes>: starts like a PNG file but its header is corrupt"
    ):
        load_image(bytes(data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    row = b"\x00" + bytes(width)
    body = zlib.compress(row * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_with_a_limit_the_user_can_raise():
    bomb = _bomb_png(100_000, 100_000)
    with pytest.raises(
        InvalidImageError,
        match=r"declared size of 10,000,000,000 pixels is over the limit "
        r"of 50,000,000 pixels \(a possible decompression bomb\)",
    ):
        load_image(bomb)
    with pytest.raises(InvalidImageError, match="over the limit of 1,000 pixels"):
        load_image(_bomb_png(100, 100), max_pixels=1_000)


def test_size_limit_env_var(monkeypatch):
    monkeypatch.setenv("FORENSICS_MAX_PIXELS", "100")
    with pytest.raises(InvalidImageError, match="over the limit of 100 pixels"):
        load_image(PIXELS)


def test_byte_limit():
    with pytest.raises(InvalidImageError, match="over the 10-byte limit"):
        load_image(encode(Image.fromarray(PIXELS), "PNG"), max_bytes=10)


def test_bad_arrays_and_types():
    with pytest.raises(InvalidImageError, match=r"must be HxW, HxWx3 or HxWx4, not shape \(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InvalidImageError, match="the array has no pixels"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InvalidImageError, match="NaN or infinity"):
        load_image(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(InvalidImageError, match="cannot load an image from int"):
        load_image(42)


def test_one_pixel_image_loads():
    image = load_image(encode(Image.fromarray(PIXELS[:1, :1]), "PNG"))
    assert (image.width, image.height) == (1, 1)


def test_a_graphic_is_told_from_a_photo_even_when_small():
    from skimage import data

    drawing = np.where(data.horse()[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    assert load_image(drawing).graphic
    # small photos, sampled densely enough to show their many levels (every 4th pixel of this 32 px
    # patch of sky holds only 30 of its 57 green levels)
    for photo in (data.rocket()[50:82, 50:82], data.astronaut()[100:400, 150:450]):
        assert not load_image(np.ascontiguousarray(photo)).graphic


def test_an_antialiased_graphic_is_a_graphic_and_a_grey_photo_is_not():
    """Shrunk, a silhouette or a chart has hundreds of levels along its edges but nearly every pixel
    in a few flat colours; a low-contrast grey photo (the moon) has few levels in use, but spread."""
    from skimage import data

    silhouette = np.where(data.horse()[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    shrunk = cv2.resize(silhouette, (157, 129), interpolation=cv2.INTER_AREA)
    chart = np.full((500, 800, 3), 255, np.uint8)
    for i, height in enumerate((150, 250, 210, 350)):
        cv2.rectangle(chart, (80 + 160 * i, 450 - height), (180 + 160 * i, 450), (31, 119, 180), -1)
    cv2.putText(chart, "sales 2026", (300, 40), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2, cv2.LINE_AA)
    chart = cv2.resize(cv2.resize(chart, (1600, 1000)), (800, 500), interpolation=cv2.INTER_AREA)
    for graphic in (shrunk, chart):
        assert len(np.unique(graphic[..., 1])) >= 32 and load_image(graphic).graphic
    for photo in (data.moon(), data.camera(), data.coffee()):
        assert not load_image(photo).graphic


def test_a_screenshot_of_text_is_a_graphic_even_as_a_jpeg():
    """Dark antialiased text on a plain background (a post, an article): most pixels the background, the
    rest blends of it with the ink. A photo of a page, with its light falling off, is no graphic."""
    from skimage import data

    words = np.random.default_rng(0).choice(["council", "budget", "said", "the", "vote", "mayor", "plan"], 90)
    page = np.full((420, 700, 3), (250, 250, 248), np.uint8)
    for line in range(9):
        text = " ".join(words[line * 10 : line * 10 + 10])
        cv2.putText(
            page, text, (20, 40 + 42 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (30, 30, 40), 2, cv2.LINE_AA
        )
    assert load_image(page).graphic and load_image(encode(Image.fromarray(page), "JPEG", quality=85)).graphic
    post = np.full((700, 900, 3), 255, np.uint8)  # mostly page, with a picture too big for the blend test
    post[20:170, 20:170] = cv2.resize(data.astronaut(), (150, 150), interpolation=cv2.INTER_AREA)
    for line in range(6):
        text = " ".join(words[line * 10 : line * 10 + 10])
        cv2.putText(
            post, text, (20, 230 + 42 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (30, 30, 40), 2, cv2.LINE_AA
        )
    cv2.putText(
        post,
        "https://example.org/budget",
        (20, 620),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.8,
        (240, 155, 29),
        2,
        cv2.LINE_AA,
    )
    assert load_image(encode(Image.fromarray(post), "JPEG", quality=85)).graphic
    assert not load_image(data.page()).graphic and not load_image(data.text()).graphic


@pytest.mark.parametrize("quality", [None, 95, 75, 30])
def test_random_noise_is_no_scene_as_stored_and_re_saved(quality):
    """Neighbouring pixels of random noise are unrelated, as in no photograph or drawing."""
    noise = np.random.default_rng(quality or 0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image = load_image(noise if quality is None else encode(Image.fromarray(noise), "JPEG", quality=quality))
    assert image.noise_only and "random noise" in image.nothing_to_examine


def test_photos_textures_and_thumbnails_are_not_noise():
    """Grass, gravel, a texture and a 32 px thumbnail keep their neighbours related; so does an image
    only partly noisy, at the side or the centre (a region replaced by noise is for the experts to find)."""
    from skimage import data

    grass, gravel = data.grass(), data.gravel()
    rng = np.random.default_rng(0)
    partly, centre = data.astronaut().copy(), data.astronaut().copy()
    partly[:, :300] = rng.integers(0, 256, (512, 300, 3), dtype=np.uint8)
    centre[64:448, 64:448] = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)  # 56% of it
    for scene in (grass, gravel, data.brick(), data.rocket()[50:82, 50:82], partly, centre):
        image = load_image(np.ascontiguousarray(scene))
        assert not image.noise_only and image.nothing_to_examine is None


def test_no_image_of_the_data_sets_is_noise_and_the_least_related_not_halved(shared_data):
    """Every image of ../shared/data as stored, and halved the least correlated ones (CASIA's fine
    textures at 0.24, a CIFAKE thumbnail): neighbouring pixels related."""
    import csv

    with open(shared_data / "manifest.csv", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    assert len(paths) > 2800
    assert not [path for path in paths if load_image(shared_data / path).noise_only]
    for path in (
        "casia1/Au/Au_txt_0058.jpg",
        "casia1/Au/Au_txt_0062.jpg",
        "ai_generated/cifake/fake_sd14/4862_9.jpg",
    ):
        image = Image.open(shared_data / path).convert("RGB")
        halved = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
        assert not load_image(np.asarray(halved)).noise_only
