"""`forensics analyze` over folders: JSONL output (one line per image) and resume after an interruption."""

from __future__ import annotations

import json

import pytest

from assistant.cli import main
from experts.samples import authentic, copy_move, splice


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    (root / "splice.jpg").write_bytes(splice().data)
    (root / "nested" / "copy.jpg").write_bytes(copy_move().data)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "notes.txt").write_text("not an image, and not an image suffix: skipped")
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_has_one_line_per_image_with_verdict_and_scores(folder, tmp_path, capsys):
    jsonl = tmp_path / "results.jsonl"
    experts = "ela,jpeg,metadata,manipulation,ai_generated"
    assert main(["analyze", str(folder), "--jsonl", str(jsonl), "--experts", experts]) == 1
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in _rows(jsonl)}
    assert set(rows) == {"splice.jpg", "copy.jpg", "broken.png"}
    assert "header is corrupt" in rows["broken.png"]["error"]
    splice_row = rows["splice.jpg"]
    assert splice_row["schema"] == "forensics-batch/1"
    assert splice_row["label"] == "manipulated" and splice_row["probability"] > 0.65
    assert splice_row["rule"] is None  # the fusion rule that bounded the verdict, as in report.json
    assert set(splice_row["scores"]) == set(experts.split(","))
    assert splice_row["scores"]["jpeg"] > 0.5 and len(splice_row["sha256"]) == 64
    assert capsys.readouterr().err.count("forensics: ") == 1  # one line for the broken file


def test_resume_skips_images_already_in_the_jsonl_by_path_or_sha256(folder, tmp_path, capsys):
    jsonl = tmp_path / "results.jsonl"
    args = ["--jsonl", str(jsonl), "--experts", "metadata"]
    assert main(["analyze", str(folder / "splice.jpg"), *args]) == 0
    with jsonl.open("a") as handle:  # an interruption cut the next line half-way
        handle.write('{"schema": "forensics-batch/1", "path": "cut')
    (folder / "renamed_splice.jpg").write_bytes(splice().data)  # same bytes, other path
    (folder / "authentic.jpg").write_bytes(authentic().data)
    capsys.readouterr()
    assert main(["analyze", str(folder), *args, "--resume"]) == 1  # broken.png still fails
    err = capsys.readouterr().err
    assert "skipped 2 image(s) already reported" in err  # splice.jpg by path, renamed_splice.jpg by sha256
    lines = jsonl.read_text().splitlines()
    assert lines[1].endswith('"path": "cut')  # the cut line is kept, ended, and ignored
    rows = [json.loads(line) for i, line in enumerate(lines) if i != 1]
    names = sorted(row["path"].rsplit("/", 1)[-1] for row in rows)
    assert names == ["authentic.jpg", "broken.png", "copy.jpg", "splice.jpg"]


def test_without_resume_the_jsonl_starts_over_and_resume_needs_jsonl(folder, tmp_path, capsys):
    jsonl = tmp_path / "results.jsonl"
    jsonl.write_text('{"path": "old"}\n')
    assert main(["analyze", str(folder / "splice.jpg"), "--jsonl", str(jsonl), "--experts", "metadata"]) == 0
    assert [row["path"].rsplit("/", 1)[-1] for row in _rows(jsonl)] == ["splice.jpg"]
    assert main(["analyze", str(folder / "splice.jpg"), "--resume"]) == 2
    assert "--resume needs --jsonl" in capsys.readouterr().err
