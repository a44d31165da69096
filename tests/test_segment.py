"""The promptable segmenters: the student's SAM-style predictor, the SAM teacher path (a tiny random SAM
built from segment-anything's own modules), the distillation step, refinement and `forensics segment`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from imaging import decode, iou
from PIL import Image

from assistant.cli import main
from experts.base import ModelNotAvailableError
from experts.learned import available
from experts.manipulation import load_localiser
from experts.refine import refine
from experts.sam import SamTeacher, load_sam, prompts_from_mask, tiny_sam
from experts.samples import splice
from experts.student import (
    PROMPT_CHANNELS,
    StudentPredictor,
    StudentSegmenter,
    parameter_count,
    prompt_maps,
    student_predictor,
)
from finetune.train_student import StudentConfig, make_examples, train

needs_student = pytest.mark.skipif(
    not available("student"), reason="experts/weights/student.safetensors not trained yet"
)


@pytest.fixture(scope="module")
def random_student() -> StudentSegmenter:
    torch.manual_seed(0)
    return StudentSegmenter(pretrained_encoder=False).eval()


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A textured background with a bright disc: (RGB pixels 240x320, the disc's mask)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(40, 90, (240, 320, 3)).astype(np.uint8)
    mask = np.zeros((240, 320), np.uint8)
    cv2.circle(mask, (200, 110), 45, 1, -1)
    pixels[mask > 0] = (220, 180, 60)
    return pixels, mask.astype(bool)


def test_student_is_small(random_student):
    assert parameter_count(random_student) <= 10_000_000


def test_prompt_maps_draw_box_and_points():
    maps = prompt_maps(
        (64, 96),
        4,
        box=torch.tensor([[20.0, 8.0, 60.0, 40.0]]),
        points=torch.tensor([[[30.0, 30.0], [82.0, 50.0]]]),
        labels=torch.tensor([[1, 0]]),
    )
    assert maps.shape == (1, PROMPT_CHANNELS, 16, 24)
    inside, positive, negative, has_box, has_mask = maps[0, 0], maps[0, 3], maps[0, 4], maps[0, 6], maps[0, 7]
    assert inside[6, 10] > 0.95 and inside[14, 2] < 0.05 and inside[1, 20] < 0.05
    assert np.unravel_index(int(positive.argmax()), positive.shape) == (7, 7)
    assert np.unravel_index(int(negative.argmax()), negative.shape) == (12, 20)
    assert has_box.min() == 1 and has_mask.max() == 0


def test_student_predictor_follows_sams_interface(random_student, scene):
    pixels, _ = scene
    predictor = StudentPredictor(random_student)
    assert not predictor.is_image_set
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([10, 10, 50, 50]))
    predictor.set_image(pixels)
    assert predictor.is_image_set
    masks, scores, low_res = predictor.predict(box=np.array([150, 60, 250, 160]))
    assert masks.shape == (1, 240, 320) and masks.dtype == bool
    assert scores.shape == (1,) and 0 <= scores[0] <= 1
    assert low_res.shape == (1, 60, 80)
    again, again_scores, _ = predictor.predict(box=np.array([150, 60, 250, 160]))
    assert np.array_equal(masks, again) and np.array_equal(scores, again_scores)  # repeatable
    from_bgr = StudentPredictor(random_student)
    from_bgr.set_image(np.ascontiguousarray(pixels[..., ::-1]), image_format="BGR")
    assert np.array_equal(from_bgr.predict(box=np.array([150, 60, 250, 160]))[0], masks)
    logits, _, _ = predictor.predict(
        point_coords=np.array([[200, 110], [20, 20]]), point_labels=np.array([1, 0]), return_logits=True
    )
    assert logits.dtype == np.float32 and logits.shape == (1, 240, 320)
    # A fed-back low-resolution mask is a valid prompt, alone or with a box.
    predictor.predict(mask_input=low_res)
    predictor.predict(box=[150, 60, 250, 160], mask_input=predictor.mask_input_from(np.zeros((240, 320))))
    with pytest.raises(ValueError, match="box"):
        predictor.predict(box=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="prompt"):
        predictor.predict()
    predictor.reset_image()
    assert not predictor.is_image_set


def test_sam_teacher_with_a_tiny_random_sam(tmp_path, scene):
    pixels, truth = scene
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_sam().state_dict(), checkpoint)
    teacher = SamTeacher.from_checkpoint(checkpoint, "tiny", device="cpu")
    teacher.set_image(pixels)
    masks, scores, low_res = teacher.predict(box=np.array([150, 60, 250, 160]), multimask_output=True)
    assert masks.shape == (3, 240, 320) and masks.dtype == bool
    assert list(scores) == sorted(scores, reverse=True)
    low_res_size = teacher.predictor.model.prompt_encoder.mask_input_size  # 256 for real SAMs
    assert low_res.shape == (3, *low_res_size) == (3, 64, 64)
    mask_input = teacher.mask_input_from(truth.astype(np.float32))
    assert mask_input.shape == (1, 64, 64) and mask_input.max() > 0 > mask_input.min()
    teacher.predict(box=np.array([150, 60, 250, 160]), mask_input=mask_input)
    teacher.reset_image()
    union = teacher.masks_for_boxes(pixels, [(150, 60, 250, 160)])
    assert union.shape == truth.shape and union.dtype == bool
    # The refinement step takes the teacher as well as the student.
    result = refine(teacher, pixels, truth)
    assert result.mask.shape == truth.shape and len(result.components) == 1


def test_load_sam_refuses_bad_checkpoints(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no such SAM checkpoint"):
        load_sam(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="vit_b"):
        load_sam(tmp_path / "missing.pth", model_type="vit_x")
    state = tiny_sam().state_dict()
    state.pop(next(iter(state)))
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ModelNotAvailableError, match="does not hold a SAM tiny model"):
        load_sam(broken, "tiny", device="cpu")


def test_prompts_from_a_coarse_mask():
    heatmap = np.zeros((100, 200), np.float32)
    heatmap[10:40, 20:60] = 0.7
    heatmap[25, 30] = 0.95
    heatmap[60:90, 120:190] = 0.6
    prompts = prompts_from_mask(heatmap, margin=0.0)
    assert [p.box for p in prompts] == [(120.0, 60.0, 189.0, 89.0), (20.0, 10.0, 59.0, 39.0)]
    assert prompts[1].point[1] in range(10, 40) and prompts[1].point[0] in range(20, 60)


def test_distillation_from_a_tiny_sam_teacher(random_student, scene):
    pixels, truth = scene
    torch.manual_seed(0)
    teacher = SamTeacher(tiny_sam())
    pairs = [(pixels, truth), (np.ascontiguousarray(pixels[:, ::-1]), np.ascontiguousarray(truth[:, ::-1]))]
    examples = make_examples(pairs, random_student.encoder, teacher)
    assert len(examples) == 2
    expected = teacher.masks_for_boxes(pixels, [(155.0, 65.0, 245.0, 155.0)])
    assert np.array_equal(examples[0].mask, expected)  # targets are the teacher's, not the ground truth
    student = StudentSegmenter(pretrained_encoder=False)
    student.load_state_dict(random_student.state_dict())
    before = {k: v.clone() for k, v in student.decoder.state_dict().items()}
    config = StudentConfig(steps=2, prompts=2, warmup=1, ship=False, resume=False)
    result = train(config, student, examples, [])
    assert result["best_step"] == 2
    changed = [k for k, v in student.decoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


@needs_student
def test_segment_command_writes_a_mask(tmp_path, capsys):
    sample = splice()
    path = tmp_path / "splice.jpg"
    path.write_bytes(sample.data)
    out = tmp_path / "mask.png"
    ys, xs = np.nonzero(sample.mask)
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"
    assert main(["segment", str(path), "--box", box, "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(out))
    assert mask.shape == sample.mask.shape and set(np.unique(mask)) <= {0, 255}
    assert result["area"] == int((mask > 0).sum()) > 0 and result["model"] == "student"
    assert iou(mask > 0, sample.mask) > 0.6
    assert main(["segment", str(path), "--point", f"{xs.mean():.0f},{ys.mean():.0f}", "--out", str(out)]) == 0


def test_segment_command_refuses_bad_prompts(tmp_path, capsys):
    path = tmp_path / "splice.jpg"
    path.write_bytes(splice().data)
    out = tmp_path / "mask.png"
    assert main(["segment", str(path), "--box", "10,10,700,100", "--out", str(out)]) == 2
    assert "outside the 600x400 image" in capsys.readouterr().err
    assert main(["segment", str(path), "--box", "50,10,20,100", "--out", str(out)]) == 2
    assert "X0 must be less than X1" in capsys.readouterr().err
    assert main(["segment", str(path), "--out", str(out)]) == 2
    assert "give a prompt" in capsys.readouterr().err
    assert main(["segment", str(path), "--point=-5,3", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["segment", str(path), "--box", "1,2,3", "--out", str(out)])
    assert not out.exists()


@needs_student
def test_refinement_of_a_coarse_mask_keeps_or_improves_iou():
    sample = splice()
    pixels = decode(sample.data)
    # What a coarse localiser gives: the region grown, blocky and blurred.
    small = cv2.resize(sample.mask.astype(np.float32), (600 // 16, 400 // 16), interpolation=cv2.INTER_AREA)
    heatmap = cv2.GaussianBlur(cv2.resize(small, (600, 400)), (0, 0), 6)
    coarse = cv2.dilate((heatmap > 0.3).astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    result = refine(student_predictor(), pixels, coarse, heatmap)
    assert result.components and result.components[0]["confirmed"]
    assert iou(result.mask, sample.mask) >= iou(coarse, sample.mask)


@pytest.mark.skipif(not available("manipulation"), reason="the manipulation localiser is not trained yet")
def test_localiser_prompts_are_made_as_refinement_makes_them(random_student):
    """With the real localiser on the built-in splice: each of its regions becomes a box + point +
    heatmap prompt whose target is the ground-truth components it touches (nothing for a false alarm),
    and a short run trained on them is chosen by the refined pixel-F1 on val."""
    from experts.image import load_image
    from finetune.train_student import refinement_score, sample_prompts

    sample = splice()
    pixels = load_image(sample.data).pixels
    (found,) = make_examples([(pixels, sample.mask)], random_student.encoder, localiser=load_localiser())
    assert found.coarse is not None and found.coarse.any() and found.localiser
    # A "truth" far from every region the localiser marks: its regions become false alarms.
    far = cv2.dilate(found.coarse.astype(np.uint8), np.ones((61, 61), np.uint8)) == 0
    far = cv2.resize(far.astype(np.uint8), sample.mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    wrong = np.zeros_like(far)
    ys, xs = np.nonzero(far)
    wrong[ys[0] : ys[0] + 20, xs[0] : xs[0] + 20] = True
    wrong &= far
    (missed,) = make_examples([(pixels, wrong)], random_student.encoder, localiser=load_localiser())
    assert len(found.localiser) <= 2  # RefinedLocalisation's max_regions
    first = found.localiser[0]
    near = cv2.dilate(first.component.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    assert (first.target & first.component).any() and (first.target <= found.mask).all()
    assert first.heatmap.dtype == np.float16 and not first.heatmap[~near].any()
    assert missed.localiser and all(not p.target.any() for p in missed.localiser)  # false alarms
    f4, _, f16, _ = found.features
    batch = sample_prompts(np.random.default_rng(0), found, 3, f4.shape[-2:], f16.shape[-2:], 1.0)
    assert all(
        any(torch.equal(t[0].bool(), torch.from_numpy(p.target)) for p in found.localiser)
        for t in batch.targets
    )
    assert 0.0 <= refinement_score(random_student, [found])[0] <= 1.0
    student = StudentSegmenter(pretrained_encoder=False)
    student.load_state_dict(random_student.state_dict())
    config = StudentConfig(
        steps=2, prompts=2, warmup=1, val_every=2, localiser_prompts=0.5, ship=False, resume=False
    )
    result = train(config, student, [found, missed], [found])
    assert "val_refined_f1" in result["history"][-1] and result["best_step"] == 2


@pytest.mark.skipif(not available("manipulation"), reason="the manipulation localiser is not trained yet")
def test_cross_fitted_prompts_come_from_the_localiser_of_each_pair(random_student, tmp_path):
    """--localiser-folds: each pair gets the localiser that held its fold out (here the shipped one,
    saved as a training run saves it and loaded back), a pair without one gets no localiser prompts."""
    from safetensors.torch import save_file

    from experts.image import load_image
    from finetune.train_localiser import LOCALISER_FILE

    state = {k: v.half().contiguous() for k, v in load_localiser().state_dict().items()}
    save_file(state, tmp_path / LOCALISER_FILE)
    held_out = load_localiser(tmp_path / LOCALISER_FILE)
    sample = splice()
    pixels = load_image(sample.data).pixels
    pairs = [(pixels, sample.mask), (pixels, sample.mask)]
    without, with_fold = make_examples(pairs, random_student.encoder, localisers=[None, held_out])
    assert not without.localiser and without.coarse is None
    (shipped,) = make_examples(pairs[:1], random_student.encoder, localiser=load_localiser())
    assert with_fold.localiser and np.array_equal(with_fold.coarse, shipped.coarse)


def test_folds_follow_the_manifest_groups():
    from assistant.evaluate import EvalItem
    from finetune.data import fold_of, parse_fold

    def item(path: str, group: str) -> EvalItem:
        return EvalItem(path, Path(path), "casia1", "authentic", "none", "train", None, group)

    source, forgery = item("Au/a.jpg", "uf:pla0068"), item("Tp/b.jpg", "uf:pla0068")
    assert fold_of(source, 2) == fold_of(forgery, 2) and fold_of(source, 5) == fold_of(forgery, 5)
    assert {fold_of(item(f"{i}.jpg", f"g{i}"), 2) for i in range(20)} == {0, 1}
    assert parse_fold("1/2") == (1, 2)
    for wrong in ("2/2", "-1/2", "1"):
        with pytest.raises(ValueError):
            parse_fold(wrong)


def test_the_refinement_gain_interval_covers_the_mean_and_narrows_with_more_images():
    from benchmarks.segment import bootstrap_interval

    rng = np.random.default_rng(1)
    few, many = rng.normal(0.03, 0.1, 50), rng.normal(0.03, 0.1, 5000)
    low, high = bootstrap_interval(few)
    assert low < few.mean() < high
    narrow_low, narrow_high = bootstrap_interval(many)
    assert narrow_high - narrow_low < (high - low) / 5


@needs_student
@pytest.mark.skipif(not available("manipulation"), reason="the manipulation localiser is not trained yet")
def test_the_refined_regions_can_come_from_the_coarse_heatmap_at_another_threshold():
    from experts.image import load_image
    from experts.refine import RefinedLocalisation

    image = load_image(splice().data)
    own_mask = RefinedLocalisation(threshold=None).analyze(image).details["components"]
    at_half = RefinedLocalisation(threshold=0.5).analyze(image).details["components"]
    strict = RefinedLocalisation(threshold=0.999).analyze(image).details["components"]
    assert own_mask and at_half and len(strict) <= len(at_half)
    assert sum(c["coarse_fraction"] for c in strict) < sum(c["coarse_fraction"] for c in at_half)


@needs_student
@pytest.mark.skipif(not available("manipulation"), reason="the manipulation localiser is not trained yet")
def test_each_refined_region_is_scored_by_the_localisers_heatmap_inside_it():
    """The segmenter's probability says "part of this object", not "edited": a weak region of the
    localiser stays weak after it is re-drawn."""
    from experts.image import load_image
    from experts.maps import resize_map
    from experts.refine import RefinedLocalisation
    from experts.runner import run_expert

    image = load_image(splice().data)
    refined = RefinedLocalisation().analyze(image)
    heat = resize_map(run_expert(image, "manipulation").heatmap, refined.mask.shape)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(refined.mask.astype(np.uint8), connectivity=8)
    boxes = {(int(x), int(y), int(x + w), int(y + h)): i for i, (x, y, w, h, _) in enumerate(stats)}
    assert refined.regions
    for region in refined.regions:
        inside = labels == boxes[region.bbox]
        assert region.score == pytest.approx(float(heat[inside].mean()), abs=1e-4)
