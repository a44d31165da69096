"""Our own watermark (experts/watermark.py) and the `forensics protect` / `verify` commands."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from imaging import decode, iou, jpeg_bytes, png_bytes
from skimage import data

from assistant.cli import main
from experts import get_expert, load_image
from experts.watermark import WatermarkError, embed, verify


@pytest.fixture(scope="module")
def cover() -> np.ndarray:
    return cv2.resize(data.chelsea(), (768, 512), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def marked(cover) -> np.ndarray:
    return embed(cover, "alice42")


def test_payload_round_trip_at_high_quality(cover, marked):
    mse = np.mean((cover.astype(float) - marked) ** 2)
    assert 10 * np.log10(255**2 / mse) >= 40.0
    result = verify(marked)
    assert result.present and result.payload == "alice42" and not result.conflict
    assert result.false_alarm < 1e-20
    assert result.tampered_fraction == 0.0


def test_survives_jpeg_70_and_resize(marked):
    assert verify(decode(jpeg_bytes(marked, 70))).payload == "alice42"
    small = cv2.resize(marked, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    result = verify(small, tamper=False)
    assert result.payload == "alice42"
    assert result.scale == pytest.approx((0.75, 0.75), abs=0.01)


def test_tamper_mask_finds_a_pasted_block(marked):
    tampered = marked.copy()
    truth = np.zeros(marked.shape[:2], bool)
    patch = cv2.resize(data.coffee(), (180, 140), interpolation=cv2.INTER_AREA)
    tampered[200:340, 300:480] = patch
    truth[200:340, 300:480] = True
    result = verify(decode(png_bytes(tampered)))
    assert result.payload == "alice42"
    assert iou(result.tamper_mask, truth) >= 0.6
    evidence = get_expert("watermark").analyze(load_image(png_bytes(tampered)))
    assert evidence.score >= 0.9 and evidence.mask is not None and evidence.regions


def test_no_detection_on_a_clean_image(cover):
    result = verify(cover)
    assert not result.present and not result.conflict
    assert not get_expert("watermark").analyze(load_image(png_bytes(cover))).applicable


def test_second_embedding_is_reported_as_a_conflict(marked):
    result = verify(embed(marked, "mallory"))
    assert {p.payload for p in result.payloads} == {"alice42", "mallory"}
    assert result.conflict
    evidence = get_expert("watermark").analyze(load_image(png_bytes(embed(marked, "mallory"))))
    assert "Two different" in evidence.summary and evidence.score == 0.6


def test_payload_limits_are_explained(cover):
    with pytest.raises(WatermarkError, match="at most 8 bytes"):
        embed(cover, "a-much-too-long-owner-name")
    with pytest.raises(WatermarkError, match="at least"):
        embed(cover[:64, :64], "x")


def test_cli_protect_verify_round_trip(cover, tmp_path, capsys):
    source = tmp_path / "cat.png"
    source.write_bytes(png_bytes(cover))
    out = tmp_path / "cat.protected.png"
    assert main(["protect", str(source), "--payload", "bob", "--out", str(out)]) == 0
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["present"] and report["payload"] == "bob"
    assert main(["verify", str(source)]) == 4  # no watermark
    tampered = decode(out.read_bytes()).copy()
    tampered[100:260, 200:400] = 0
    (tmp_path / "t.png").write_bytes(png_bytes(tampered))
    mask = tmp_path / "mask.png"
    assert main(["verify", str(tmp_path / "t.png"), "--mask", str(mask)]) == 3
    assert decode(mask.read_bytes())[150, 300, 0] == 255
    assert main(["protect", str(source), "--payload", "x" * 9, "--out", str(out)]) == 1


def test_semi_fragile_layer_localises_a_paste_on_texture():
    # grass is busy texture everywhere: the robust layer's local gain is swamped there, the QIM bits are
    # not (1024x768: at 768x512 the robust payload itself is marginal on grass once a patch is pasted)
    grass = cv2.resize(data.grass(), (1024, 768), interpolation=cv2.INTER_AREA)
    marked = embed(np.repeat(grass[..., None], 3, axis=2), "alice42")
    tampered = marked.copy()
    truth = np.zeros(marked.shape[:2], bool)
    tampered[203:305, 301:454] = cv2.resize(data.astronaut(), (153, 102), interpolation=cv2.INTER_AREA)
    truth[203:305, 301:454] = True
    for version in (decode(png_bytes(tampered)), decode(jpeg_bytes(tampered, 90))):
        result = verify(version)
        assert result.payload == "alice42" and not result.notes  # read from the semi-fragile layer
        assert iou(result.tamper_mask, truth) >= 0.8
    # intact after JPEG 85: nothing flagged
    assert verify(decode(jpeg_bytes(marked, 85))).tampered_fraction == 0.0
