"""The evaluation harness: metric functions against hand-computed values, manifest handling, input
transforms, and end-to-end runs of `forensics eval` on a tiny synthetic manifest and on ../shared/data."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from assistant import evaluate as ev
from assistant import metrics
from experts import available_experts, samples
from experts.image import load_image

DATA_MANIFEST = Path(__file__).resolve().parents[1] / "../shared/data/manifest.csv"
FIELDS = ["path", "dataset", "label", "manipulation", "mask", "source", "license", "split", "group"]


# ---------------------------------------------------------------------------------------------- metrics


def test_roc_auc_counts_ties_as_half():
    # pairs (pos, neg): 0.5 vs 0.5 -> 1/2, 0.5 vs 0.2 -> 1, 0.9 vs 0.5 -> 1, 0.9 vs 0.2 -> 1: 3.5 / 4
    assert metrics.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.3] * 4) == 0.5
    assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_curve_ends_at_one_and_groups_ties():
    false_rate, true_rate = metrics.roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    np.testing.assert_allclose(false_rate, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(true_rate, [0.0, 0.5, 1.0, 1.0])
    assert np.trapezoid(true_rate, false_rate) == pytest.approx(0.875)


def test_average_precision_as_sklearn():
    # scikit-learn's documented example: 0.8333
    assert metrics.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.833333, abs=1e-6)
    # tied top pair: one threshold with P=1/2, R=1/2, then P=2/3, R=1 -> 0.5*0.5 + 0.5*2/3
    assert metrics.average_precision([1, 0, 1], [0.5, 0.5, 0.1]) == pytest.approx(0.25 + 1 / 3)
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.9]))


def test_expected_calibration_error_and_accuracy():
    # one image per bin 0, 1, 8, 9: (0.05 + 0.15 + 0.15 + 0.05) / 4
    assert metrics.expected_calibration_error([0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95]) == pytest.approx(0.1)
    assert metrics.expected_calibration_error([0, 1, 0, 1], [0.55] * 4) == pytest.approx(0.05)
    counts, confidence, observed = metrics.reliability_bins([1, 1], [1.0, 0.999])
    assert counts[-1] == 2 and confidence[-1] == pytest.approx(0.9995) and observed[-1] == 1.0
    assert metrics.accuracy([0, 1, 1], [0.49, 0.5, 0.2]) == pytest.approx(2 / 3)
    # a weight counts as that many copies of the image
    weighted = metrics.expected_calibration_error([0, 1, 1], [0.35, 0.35, 0.95], weights=[2, 1, 1])
    copies = metrics.expected_calibration_error([0, 0, 1, 1], [0.35, 0.35, 0.35, 0.95])
    assert weighted == pytest.approx(copies)


def test_f1_iou_and_best_threshold():
    truth = np.array([[1, 1, 0, 0]], bool)
    assert metrics.f1_score(truth, np.array([[1, 0, 1, 0]], bool)) == pytest.approx(0.5)
    assert metrics.iou(truth, np.array([[1, 0, 1, 0]], bool)) == pytest.approx(1 / 3)
    assert metrics.f1_score(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    heatmap = np.array([[0.9, 0.4, 0.3, 0.1]], np.float32)
    assert metrics.f1_score(truth, heatmap >= 0.5) == pytest.approx(2 / 3)
    assert metrics.best_threshold_f1(truth, heatmap) == pytest.approx(1.0)  # threshold 0.4 separates exactly

    rng = np.random.default_rng(0)
    truth = np.zeros((40, 50), bool)
    truth[10:25, 5:30] = True
    for _ in range(5):
        heatmap = np.clip(truth * 0.3 + rng.random(truth.shape) * 0.7, 0, 1).astype(np.float32)
        assert metrics.best_threshold_f1(truth, heatmap) >= metrics.f1_score(truth, heatmap >= 0.5)


def test_missing_maps_score_as_empty_and_never_localising_shows_a_dash():
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:5] = True
    empty = metrics.pixel_scores(truth, None, None)
    assert (empty.f1_fixed, empty.f1_best, empty.mask_f1, empty.mask_iou) == (0.0, 0.0, 0.0, 0.0)
    assert empty.pixel_auc == 0.5 and not empty.has_heatmap and not empty.has_mask
    perfect = metrics.pixel_scores(truth, truth.astype(np.float32), truth)
    summary = ev._pixel_summary([empty, perfect])
    assert summary["f1_at_0.5"] == pytest.approx(0.5)  # the image without a map counts as F1 0
    assert summary["mask_iou"] == pytest.approx(0.5)
    never = ev._pixel_summary([empty, empty])
    assert never["f1_at_0.5"] is None and never["mask_f1"] is None


# --------------------------------------------------------------------------------------- manifest


def _write_manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field, "") for field in FIELDS})
    return manifest


def _row(path: str, label: str, split: str = "test", dataset: str = "synthetic", mask: str = "") -> dict:
    return {
        "path": path,
        "dataset": dataset,
        "label": label,
        "mask": mask,
        "split": split,
        "manipulation": "splicing" if label == "manipulated" else "none",
    }


def test_read_manifest_filters_and_honours_splits_csv(tmp_path):
    manifest = _write_manifest(
        tmp_path,
        [
            _row("a.jpg", "authentic"),
            _row("b.jpg", "manipulated", mask="b_gt.png"),
            _row("c.jpg", "excluded_near_duplicate"),
            _row("d.jpg", "ai_generated", split="train", dataset="other"),
            _row("e.jpg", "real_face", split="val", dataset="other"),
        ],
    )
    items = ev.read_manifest(manifest, "test")
    assert [item.path for item in items] == ["a.jpg", "b.jpg"]
    assert items[1].positive and not items[0].positive
    assert items[1].mask_file == tmp_path / "b_gt.png" and items[0].mask_file is None
    assert [i.path for i in ev.read_manifest(manifest, "all", ["other"])] == ["d.jpg", "e.jpg"]

    (tmp_path / "splits.csv").write_text("path,split\nd.jpg,test\na.jpg,val\n", encoding="utf-8")
    assert [item.path for item in ev.read_manifest(manifest, "test")] == ["b.jpg", "d.jpg"]
    with pytest.raises(ev.ManifestError, match="nope"):
        ev.read_manifest(manifest, "test", ["nope"])
    with pytest.raises(ev.ManifestError, match="no such manifest"):
        ev.read_manifest(tmp_path / "missing.csv")


def test_read_manifest_rejects_unknown_labels(tmp_path):
    manifest = _write_manifest(tmp_path, [_row("a.jpg", "photoshopped")])
    with pytest.raises(ev.ManifestError, match="unknown label 'photoshopped'"):
        ev.read_manifest(manifest)


def test_limit_is_balanced_deterministic_and_keeps_manifest_order(tmp_path):
    rows = [_row(f"au{i}.jpg", "authentic") for i in range(10)] + [
        _row(f"tp{i}.jpg", "manipulated") for i in range(3)
    ]
    items = ev.read_manifest(_write_manifest(tmp_path, rows))
    chosen = ev.limit_items(items, 4)
    assert sum(item.positive for item in chosen) == 2
    assert chosen == ev.limit_items(items, 4)
    assert [items.index(item) for item in chosen] == sorted(items.index(item) for item in chosen)
    assert sum(item.positive for item in ev.limit_items(items, 9)) == 3  # all positives, then negatives
    assert ev.limit_items(items, None) == items


# ------------------------------------------------------------------------------------- transforms


def test_transform_resizes_reencodes_and_masks_follow():
    image = load_image(samples.splice().data)  # 600x400
    assert ev.transform_image(image) is image
    resized = ev.transform_image(image, resize=0.5)
    assert (resized.width, resized.height, resized.format) == (300, 200, "PNG")
    jpeg = ev.transform_image(image, jpeg_quality=75, resize=0.5)
    assert jpeg.is_jpeg and (jpeg.width, jpeg.height) == (300, 200)
    reference = io.BytesIO()
    Image.new("RGB", (8, 8)).save(reference, "JPEG", quality=75)
    assert np.array_equal(jpeg.quantization[0], load_image(reference.getvalue()).quantization[0])
    mask = ev.fit_mask(samples.splice().mask, (200, 300))
    assert mask.shape == (200, 300) and mask.dtype == bool
    assert abs(mask.mean() - samples.splice().mask.mean()) < 0.01


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for name, make, label in (
        ("authentic", samples.authentic, "authentic"),
        ("splice", samples.splice, "manipulated"),
        ("copy_move", samples.copy_move, "manipulated"),
    ):
        sample = make()
        (folder / f"{name}.jpg").write_bytes(sample.data)
        mask = ""
        if sample.mask.any():
            mask = f"{name}_gt.png"
            Image.fromarray(sample.mask.astype(np.uint8) * 255).save(folder / mask)
        rows.append(_row(f"{name}.jpg", label, mask=mask))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(_row("broken.jpg", "authentic"))
    rows.append(_row("duplicate.jpg", "excluded_near_duplicate_of_authentic"))
    return _write_manifest(folder, rows)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    ev.configure_parser(parser)
    return ev.run(parser.parse_args([*argv, "--no-progress"]))


def test_eval_end_to_end_on_synthetic_forgeries(tiny_manifest, tmp_path, capsys):
    out = tmp_path / "report"
    assert _run(["--manifest", str(tiny_manifest), "--out", str(out)]) == 0
    for name in ("metrics.json", "metrics.md", "roc.png", "reliability.png", "worst_cases.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "metrics.json").read_text())
    names = [*available_experts(), "fused"]
    assert list(report["metrics"]) == names
    assert report["n_images"] == 3 and report["n_positive"] == 2 and report["n_pixel_images"] == 2
    assert report["dataset_counts"]["selected"] == {"synthetic": {"authentic": 2, "manipulated": 2}}
    assert [(e["path"], e["stage"]) for e in report["errors"] if e["stage"] == "load"] == [
        ("broken.jpg", "load")
    ]
    assert report["settings"]["split"] == "test" and report["versions"]["experts"].keys() == set(names[:-1])
    fused = report["metrics"]["fused"]
    assert fused["coverage"] == 1.0 and fused["median_seconds"] > 0 and fused["peak_mb"] is not None
    assert fused["image_applicable"]["n"] == 3
    for row in report["metrics"].values():
        assert 0.0 <= row["coverage"] <= 1.0
        pixel = row["pixel"]
        if pixel["f1_at_0.5"] is not None:
            assert pixel["f1_best_threshold_optimistic"] >= pixel["f1_at_0.5"] - 1e-9
    table = (out / "metrics.md").read_text()
    for name in names[:-1]:
        assert f"\n| {name} |" in table
    assert "\n| **fused** |" in table and "pixel-F1 best-thr (optimistic)" in table
    assert "| **fused** |" in capsys.readouterr().out


def test_eval_applies_jpeg_quality_and_resize_to_images_and_masks(tiny_manifest, tmp_path):
    out = tmp_path / "q80"
    assert (
        _run(
            [
                "--manifest",
                str(tiny_manifest),
                "--out",
                str(out),
                "--jpeg-quality",
                "80",
                "--resize",
                "0.5",
                "--experts",
                available_experts()[0],
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    sizes = {row["path"]: (tuple(row["size"]), row["format"]) for row in report["images"]}
    assert sizes["splice.jpg"] == ((300, 200), "JPEG")  # 600x400 halved
    assert sizes["copy_move.jpg"] == ((256, 256), "JPEG")  # 512x512 halved
    assert not [e for e in report["errors"] if e["stage"] in ("mask", "load") and e["path"] != "broken.jpg"]
    assert report["n_pixel_images"] == 2 and list(report["metrics"]) == [available_experts()[0], "fused"]
    assert report["settings"]["jpeg_quality"] == 80 and report["settings"]["resize"] == 0.5


def test_eval_reports_bad_selection_with_exit_code_2(tiny_manifest, tmp_path, capsys):
    assert _run(["--manifest", str(tiny_manifest), "--split", "train", "--out", str(tmp_path)]) == 2
    assert "no rows for split 'train'" in capsys.readouterr().err
    assert _run(["--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        _run(["--manifest", str(tiny_manifest), "--experts", "no_such_expert"])


@pytest.mark.skipif(not DATA_MANIFEST.is_file(), reason="../shared/data/manifest.csv is not present here")
def test_eval_on_the_real_manifest_with_a_limit(tmp_path):
    out = tmp_path / "casia"
    assert (
        _run(
            [
                "--manifest",
                str(DATA_MANIFEST),
                "--split",
                "val",
                "--datasets",
                "casia1",
                "--limit",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_images"] == 4 and report["n_positive"] == 2 and not report["errors"]
    assert report["dataset_counts"]["evaluated"]["casia1"] == {"authentic": 2, "manipulated": 2}
    assert 1 <= report["n_pixel_images"] <= 2
    assert report["metrics"]["fused"]["image_applicable"]["auc"] is not None


def test_bad_mask_is_recorded_and_the_image_still_scored(tmp_path):
    sample = samples.splice()
    (tmp_path / "splice.jpg").write_bytes(sample.data)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "wrong_size.png")
    item = ev.EvalItem(
        "splice.jpg",
        tmp_path / "splice.jpg",
        "synthetic",
        "manipulated",
        "splicing",
        "test",
        tmp_path / "wrong_size.png",
    )
    evaluation = ev.evaluate([item], available_experts()[:1], progress=False, memory_probe_images=0)
    assert [(e["path"], e["stage"]) for e in evaluation.errors] == [("splice.jpg", "mask")]
    assert "mask is 10x10 but the image is 600x400" in evaluation.errors[0]["error"]
    assert len(evaluation.records) == 1 and evaluation.records[0].pixel is None
    assert evaluation.metrics["fused"]["peak_mb"] is None


def test_command_line_is_what_a_user_would_type():
    assert ev.command_line(["/x/.venv/bin/forensics", "eval", "--out", "a b"]) == "forensics eval --out 'a b'"
    assert (
        ev.command_line(["/x/assistant/evaluate.py", "--limit", "4"])
        == "python -m assistant.evaluate --limit 4"
    )


def test_flag_rates_count_each_class_at_the_threshold():
    labels = [0, 0, 0, 0, 1, 1]
    scores = [0.1, 0.5, 0.7, 0.2, 0.4, 0.9]
    assert metrics.flag_rate(labels, scores, positive=False) == 0.5
    assert metrics.flag_rate(labels, scores, positive=True) == 0.5
    assert np.isnan(metrics.flag_rate([1, 1], [0.2, 0.3], positive=False))


def test_each_image_gets_the_verdicts_outcome_in_the_reports_words():
    from assistant.evaluate import EvalItem, ImageRecord, verdict_counts, verdict_outcome

    def record(label: str, probability: float) -> ImageRecord:
        item = EvalItem("x.jpg", Path("x.jpg"), "casia1", label, "none", "test")
        return ImageRecord(item, (8, 8), "JPEG", {"fused": probability}, {})

    cases = [("authentic", 0.9), ("authentic", 0.5), ("authentic", 0.1)]
    cases += [("manipulated", 0.9), ("manipulated", 0.65), ("manipulated", 0.2)]
    records = [record(label, p) for label, p in cases]
    outcomes = [verdict_outcome(r) for r in records]
    assert outcomes == ["falsely accused", "uncertain", "cleared", "caught", "uncertain", "missed"]
    assert verdict_counts(records) == {
        "negative": {"authentic": 1, "uncertain": 1, "accused": 1},
        "positive": {"authentic": 1, "uncertain": 1, "accused": 1},
    }
