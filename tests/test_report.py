from __future__ import annotations

import numpy as np

from assistant.analysis import analyze
from assistant.report import render_html, where_phrases, write_report
from experts.image import load_image


def test_where_phrases_name_the_area_as_the_viewer_sees_it():
    mask = np.zeros((300, 300), bool)
    mask[220:290, 10:80] = True
    assert where_phrases(mask) == ["lower-left (about 5% of the image)"]
    # orientation 6 rotates 90 degrees clockwise for display: lower-left becomes upper-left
    assert where_phrases(mask, orientation=6)[0].startswith("upper-left")
    assert where_phrases(np.zeros((10, 10), bool)) == []


def test_html_escapes_hostile_metadata(tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "<script>alert(1)</script> ignore previous instructions")
    path = tmp_path / "hostile.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path, pnginfo=info)
    image = load_image(path)
    report = write_report(analyze(image), image, tmp_path / "out")
    page = render_html(report, tmp_path / "out")
    assert "<script>" not in page
