"""Tests for the JPEG compression-history expert (experts/jpeg.py)."""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest
from imaging import decode, iou, jpeg_bytes, png_bytes, texture
from PIL import Image

from experts import samples
from experts.image import load_image
from experts.jpeg import JpegCompression, aligned_double_quantisation, block_dct, decoded_luma
from experts.jpeg_tables import IJG_LUMA, ijg_table, nearest_quality_relative


@pytest.fixture(scope="module")
def expert() -> JpegCompression:
    return JpegCompression()


@pytest.fixture(scope="module")
def splice_result(expert):
    sample = samples.splice()
    return sample, expert.analyze(load_image(sample.data))


# --------------------------------------------------------------------------------------------------
# Building blocks


def test_ijg_table_matches_libjpeg_and_quality_is_recovered():
    assert np.array_equal(ijg_table(50), IJG_LUMA)
    for quality in (30, 70, 90, 95):
        buffer = io.BytesIO()
        Image.new("L", (16, 16)).save(buffer, "JPEG", quality=quality)
        table = np.asarray(Image.open(buffer).quantization[0]).reshape(8, 8)
        assert np.array_equal(ijg_table(quality), table)
        assert nearest_quality_relative(table.astype(float)) == (quality, 0.0)


def test_block_dct_equals_opencv_dct_per_block():
    luma = np.random.default_rng(0).uniform(0, 255, (24, 40)).astype(np.float32)
    coefficients = block_dct(luma)
    assert coefficients.shape == (3, 5, 8, 8)
    expected = cv2.dct(luma[8:16, 16:24] - 128.0)
    assert np.allclose(coefficients[1, 2], expected, atol=1e-3)


def test_double_quantisation_recovers_the_first_quality():
    """q70 then q90: the model should find the q70 steps on the frequencies it uses."""
    from skimage import data

    twice = load_image(jpeg_bytes(decode(jpeg_bytes(data.astronaut(), 70)), 90))
    luma = decoded_luma(twice)
    dq = aligned_double_quantisation(block_dct(luma), block_dct(luma, 1, (1, 1)), twice.quantization[0])
    known = dq.first_table > 0
    assert known.sum() >= 10
    truth = ijg_table(70)[known]
    assert np.mean(dq.first_table[known] == truth) >= 0.5  # exact on the low frequencies
    assert np.mean(np.abs(dq.first_table[known] - truth) <= 0.1 * truth) >= 0.8
    assert abs(nearest_quality_relative(dq.first_table.astype(float), known)[0] - 70) <= 3
    assert dq.llr.mean() > 0  # the untouched image is double-compressed nearly everywhere


def test_single_compression_finds_no_earlier_compression():
    from skimage import data

    once = load_image(jpeg_bytes(data.astronaut(), 85))
    luma = decoded_luma(once)
    dq = aligned_double_quantisation(block_dct(luma), block_dct(luma, 1, (1, 1)), once.quantization[0])
    assert dq.frequencies == 0
    assert not dq.llr.any()


# --------------------------------------------------------------------------------------------------
# The expert on the synthetic samples


def test_splice_region_is_found(splice_result):
    sample, evidence = splice_result
    assert evidence.applicable and evidence.score >= 0.8
    assert iou(evidence.mask, sample.mask) >= 0.6
    assert evidence.heatmap[sample.mask].mean() > 3 * evidence.heatmap[~sample.mask].mean()
    assert evidence.details["scores"]["aligned double quantisation"] == evidence.score
    assert 60 <= evidence.details["first_quality_estimate"] <= 80  # the host was saved at 70
    assert evidence.details["last_quality_estimate"] == 90
    assert "pasted" in evidence.summary and "compressed twice" in evidence.summary
    assert evidence.regions and evidence.regions[0].score > 0.5


def test_copy_move_region_is_found(expert):
    sample = samples.copy_move()
    evidence = expert.analyze(load_image(sample.data))
    assert evidence.score >= 0.8
    assert iou(evidence.mask, sample.mask) >= 0.4


def test_authentic_sample_scores_low_and_below_the_splice(expert, splice_result):
    evidence = expert.analyze(load_image(samples.authentic().data))
    assert evidence.applicable and evidence.score < 0.2
    assert evidence.mask.mean() < 0.01
    assert "compressed once" in evidence.summary
    assert splice_result[1].score > evidence.score + 0.5


def test_uniform_re_save_is_not_called_an_edit(expert):
    """Double-compressed but unedited: the earlier compression is found, no region is accused."""
    from skimage import data

    evidence = expert.analyze(load_image(jpeg_bytes(decode(jpeg_bytes(data.coffee(), 70)), 90)))
    assert evidence.details["earlier_compression_found"]
    assert evidence.score < 0.3
    assert evidence.mask.mean() < 0.02
    assert "re-saved" in evidence.summary and "not evidence of a local edit" in evidence.summary


def test_lossless_copy_of_a_jpeg_with_a_pasted_region(expert):
    """A JPEG host saved as PNG after a region was pasted off-grid: no tables in the file, but the
    host's earlier JPEG levels are still there and the pasted region lacks them."""
    from skimage import data

    host = decode(jpeg_bytes(data.coffee(), 75))
    donor = data.chelsea()
    result = host.copy()
    result[101:261, 37:217] = donor[40:200, 120:300]
    truth = np.zeros(host.shape[:2], bool)
    truth[101:261, 37:217] = True
    evidence = expert.analyze(load_image(png_bytes(result)))
    assert not evidence.details["is_jpeg"] and evidence.details["earlier_compression_found"]
    assert evidence.score >= 0.8
    assert iou(evidence.mask, truth) >= 0.6
    assert "stored without loss" in evidence.summary


def test_never_compressed_png_is_quiet_and_says_what_ran(expert):
    from skimage import data

    evidence = expert.analyze(load_image(png_bytes(data.coffee())))
    assert evidence.applicable and evidence.score < 0.2
    assert not evidence.details["earlier_compression_found"]
    assert "grid misalignment" not in evidence.details["analyses_run"]
    assert "Not a JPEG file" in evidence.summary


# --------------------------------------------------------------------------------------------------
# Contract and edge cases


@pytest.mark.parametrize("size", [(1, 1), (31, 200)])
def test_too_small_is_not_applicable(expert, size):
    evidence = expert.analyze(load_image(np.zeros((*size, 3), np.uint8)))
    assert not evidence.applicable and evidence.score is None
    assert "too small" in evidence.summary


def test_output_shapes_types_and_determinism(expert, splice_result):
    sample, first = splice_result
    second = expert.analyze(load_image(sample.data))
    image = load_image(sample.data)
    assert first.heatmap.shape == first.mask.shape == (image.height, image.width)
    assert first.heatmap.dtype == np.float32 and first.mask.dtype == bool
    assert first.heatmap.min() >= 0.0 and first.heatmap.max() <= 1.0
    assert np.array_equal(first.heatmap, second.heatmap) and first.score == second.score
    json.dumps(first.details)


def test_odd_sized_and_flat_images(expert):
    odd = texture((77, 101), seed=1)
    evidence = expert.analyze(load_image(jpeg_bytes(odd, 80)))
    assert evidence.heatmap.shape == (77, 101) and evidence.mask.shape == (77, 101)
    flat = expert.analyze(load_image(jpeg_bytes(np.full((64, 64, 3), 200, np.uint8), 90)))
    assert not flat.applicable and "flat colour" in flat.summary  # no blocks to read


def test_large_image_uses_block_sampling(expert):
    big = cv2.resize(decode(samples.authentic().data), (3600, 2700), interpolation=cv2.INTER_CUBIC)
    evidence = expert.analyze(load_image(jpeg_bytes(big, 90)))
    assert evidence.details["block_stride"] == 2
    assert evidence.heatmap.shape == (2700, 3600)
    assert evidence.score < 0.5


# --------------------------------------------------------------------------------------------------
# CASIA v1 (validation split only; the test split is reserved for the final report)


def test_casia_val_splice_is_localised_and_authentic_is_quiet(expert, shared_data):
    rows = list(csv.DictReader((shared_data / "manifest.csv").open()))
    tampered = next(r for r in rows if r["path"].endswith("Sp_D_CRN_A_pla0072_ani0019_0393.jpg"))
    assert tampered["split"] == "val" and tampered["mask"]
    truth = np.asarray(Image.open(shared_data / tampered["mask"])) > 127
    evidence = expert.analyze(load_image(shared_data / tampered["path"]))
    assert evidence.score >= 0.5
    f1 = 2 * (evidence.mask & truth).sum() / (evidence.mask.sum() + truth.sum())
    assert f1 >= 0.5
    authentic = [
        r for r in rows if r["dataset"] == "casia1" and r["split"] == "val" and r["label"] == "authentic"
    ]
    scores = [expert.analyze(load_image(shared_data / r["path"])).score for r in authentic[:10]]
    assert max(scores) < 0.5
