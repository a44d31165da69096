"""`forensics analyze`: the report contract, batch behaviour, bad inputs and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from assistant.cli import main
from experts import available_experts
from experts.samples import copy_move, splice


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "splice.jpg").write_bytes(splice().data)
    (folder / "copy.jpg").write_bytes(copy_move().data)
    return folder


def test_analyze_writes_the_report_contract(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(images / "splice.jpg"), "--out", str(out)]) == 0
    folder = out / "splice"
    report = json.loads((folder / "report.json").read_text())
    assert report["schema"] == "forensics-report/1"
    assert set(report["image"]) == {"path", "sha256", "format", "width", "height", "notes"}
    assert (report["image"]["width"], report["image"]["height"]) == (600, 400)
    assert set(report["verdict"]) >= {"label", "probability", "uncertain_band", "drivers", "mask", "where"}
    assert [e["expert"] for e in report["evidence"]] == available_experts()
    for item in report["evidence"]:
        assert set(item) >= {
            "expert",
            "version",
            "applicable",
            "score",
            "summary",
            "details",
            "regions",
            "heatmap",
            "mask",
            "seconds",
        }
        for key in ("heatmap", "mask"):
            if item[key]:
                assert Image.open(folder / item[key]).size == (600, 400)
    mask = np.asarray(Image.open(folder / "mask.png"))
    assert mask.shape == (400, 600) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(folder / "overlay.png").size == (600, 400)
    html = (folder / "report.html").read_text()
    assert "data:image/png;base64," in html and report["verdict"]["label"] in html
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["image"]["sha256"] == report["image"]["sha256"]


def test_bad_inputs_get_one_line_each_and_the_rest_are_analysed(images, tmp_path, capsys):
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not an image")
    out = tmp_path / "out"
    code = main(["analyze", str(images), "--out", str(out), "--experts", "ela,metadata"])
    assert code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    error_lines = [line for line in errors if line.startswith("forensics:")]
    assert len(error_lines) == 2
    assert any("empty.png: the file is empty (0 bytes)" in line for line in error_lines)
    assert any("notes.jpg: not a supported image" in line for line in error_lines)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum("error" in row for row in rows) == 2 and sum("verdict" in row for row in rows) == 2
    assert (out / "splice" / "report.json").exists() and (out / "copy" / "report.json").exists()


def test_interrupted_batch_resumes_without_redoing_finished_images(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", str(images / "splice.jpg"), "--out", str(out), "--experts", "ela"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(images), "--out", str(out), "--experts", "ela"]) == 0
    assert "skipped 1 image(s) already reported" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(row["image"]["path"].rsplit("/", 1)[-1] for row in rows) == ["copy.jpg", "splice.jpg"]


def test_inputs_sharing_a_stem_get_distinct_folders(images, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "splice.jpg").write_bytes(copy_move().data)
    out = tmp_path / "out"
    assert (
        main(
            [
                "analyze",
                str(images / "splice.jpg"),
                str(other / "splice.jpg"),
                "--out",
                str(out),
                "--experts",
                "metadata",
            ]
        )
        == 0
    )
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders[0] == "splice" and folders[1].startswith("splice-") and len(folders) == 2


def test_json_to_stdout(images, capsys):
    assert main(["analyze", str(images / "copy.jpg"), "--json", "--experts", "metadata"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["image"]["path"].endswith("copy.jpg") and len(report["evidence"]) == 1


def test_unknown_expert_is_a_usage_error(images):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", str(images / "copy.jpg"), "--experts", "nope"])
    assert exit_info.value.code == 2


def test_no_arguments_analyses_the_built_in_examples():
    result = subprocess.run(
        [sys.executable, "-m", "assistant", "analyze", "--experts", "metadata"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "example:splice_coffee_cat.jpg" in result.stdout
    assert "example:authentic_coffee.jpg" in result.stdout
