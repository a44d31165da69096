from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from imaging import texture

from experts.base import Evidence
from experts.fusion import HAND_SET, PHOTO, THUMBNAIL, FusionModel, ImageModel, context_of, fuse, fusion_model
from experts.learned import available

SHAPE = (20, 30)
PHOTO_SHAPE = (300, 451)
MODEL = FusionModel(
    image_models={
        PHOTO: ImageModel(
            experts=("ela", "noise", "copy_move", "metadata"),
            bias=-1.0,
            presence=(-0.5, -0.5, -0.5, 0.0),
            weight=(3.0, 2.0, 6.0, 6.0),
            temperature=2.0,
        )
    },
    pixel_experts=("ela", "copy_move"),
    pixel_weight=(4.0, 8.0),
    pixel_bias=-4.0,
    pixel_threshold=0.5,
)


def evidence(name: str, score: float | None, heatmap: np.ndarray | None = None, **details) -> Evidence:
    return Evidence(name, score, score is not None, f"{name} says {score}", heatmap=heatmap, details=details)


def test_probability_is_the_logistic_model_over_presence_and_scores():
    verdict = fuse([evidence("ela", 0.8), evidence("noise", 0.1), evidence("copy_move", None)], SHAPE, MODEL)
    logit = (-1.0 + (-0.5 + 3.0 * 0.8) + (-0.5 + 2.0 * 0.1)) / 2.0
    assert verdict.probability == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-4)
    contributions = {d.expert: d.contribution for d in verdict.drivers}
    assert contributions == pytest.approx({"ela": 0.95, "noise": -0.15}, abs=1e-4)
    assert [d.expert for d in verdict.drivers] == ["ela", "noise"]  # strongest first, for or against


def test_an_expert_not_run_counts_at_its_typical_contribution_not_as_a_clean_finding():
    typical = replace(MODEL.image_models[PHOTO], typical=(0.4, 0.2, 0.6, 1.0))
    model = replace(MODEL, image_models={PHOTO: typical})
    ran = [evidence("ela", 0.8), evidence("noise", 0.1), evidence("copy_move", None)]  # metadata not run
    verdict = fuse(ran, SHAPE, model)
    logit = (-1.0 + (-0.5 + 3.0 * 0.8) + (-0.5 + 2.0 * 0.1) + 1.0) / 2.0
    assert verdict.probability == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-4)
    assert [d.expert for d in verdict.drivers] == ["ela", "noise"]  # a default, not evidence: no driver
    # copy_move ran and could not examine the image: that adds nothing, as before
    looked = fuse([*ran, evidence("metadata", None)], SHAPE, model)
    assert looked.probability == pytest.approx(fuse(ran, SHAPE, MODEL).probability, abs=1e-4)


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_a_partial_analysis_does_not_clear_on_experts_it_did_not_run():
    """The classical experts alone: the learned ones count at their typical contribution, so the
    built-in splice is still accused and the untouched photo is not cleared on their silence."""
    from assistant.analysis import analyze
    from experts import load_image, samples

    classical = ["ela", "noise", "jpeg", "copy_move", "metadata", "frequency"]
    assert analyze(load_image(samples.splice().data), classical).verdict.label == "manipulated"
    assert analyze(load_image(samples.authentic().data), classical).verdict.label == "uncertain"
    assert analyze(load_image(samples.authentic().data)).verdict.label == "authentic"  # every expert


def test_a_featureless_image_is_uncertain_not_cleared():
    """A flat colour gives the pixel experts nothing to examine: their silence must not clear it."""
    from assistant.analysis import analyze
    from experts import load_image

    flat = np.full((256, 384, 3), 200, np.uint8)
    flat[::7, ::5] = 203  # a faint flicker, as re-compression leaves: still featureless
    analysis = analyze(load_image(flat))
    assert analysis.verdict.label == "uncertain"
    for name in ("noise", "jpeg", "copy_move", "manipulation", "ai_generated"):
        evidence = analysis.evidence_for(name)
        assert not evidence.applicable and "flat colour" in evidence.summary, name
    photo = load_image(
        (flat.astype(np.float32) * 0.2 + np.indices((256, 384)).sum(0)[..., None] % 9).astype(np.uint8)
    )
    assert not photo.featureless  # a faint gradient with texture is still examined


def test_random_noise_is_uncertain_not_cleared():
    """Noise has no scene: the pixel experts' silence on it (and a face BlazeFace found in it) must not
    clear it; before they declined it, this image was "authentic" at 0.02."""
    from assistant.analysis import analyze
    from experts import load_image

    noise = np.random.default_rng(0).integers(0, 256, (384, 512, 3), dtype=np.uint8)
    analysis = analyze(load_image(noise))
    assert analysis.verdict.label == "uncertain" and analysis.verdict.rule == "too_little_examined"
    for name in ("ela", "noise", "jpeg", "copy_move", "frequency", "manipulation", "ai_generated", "faces"):
        evidence = analysis.evidence_for(name)
        assert not evidence.applicable and "random noise" in evidence.summary, name


def test_too_little_evidence_is_uncertain_not_authentic():
    from experts.fusion import UNEXAMINED_RULE

    verdict = fuse([evidence("ela", None)], SHAPE, MODEL)
    assert verdict.label == "uncertain" and verdict.probability == 0.5 and verdict.mask is None
    assert verdict.rule == UNEXAMINED_RULE
    verdict = fuse([evidence("ela", None), evidence("metadata", 0.0)], SHAPE, MODEL)
    assert verdict.label == "uncertain" and verdict.probability == 0.5


def test_clean_findings_are_defence_and_clear_the_image():
    verdict = fuse([evidence("ela", 0.0), evidence("noise", 0.0), evidence("copy_move", 0.0)], SHAPE, MODEL)
    assert verdict.label == "authentic" and verdict.mask is None
    assert all(d.contribution < 0 for d in verdict.drivers)


def test_an_expert_the_fusion_does_not_know_is_shown_but_not_counted():
    known = [evidence("ela", 0.0), evidence("noise", 0.0)]
    plain = fuse(known, SHAPE, MODEL)
    extra = fuse([*known, evidence("someone_elses", 1.0)], SHAPE, MODEL)
    assert extra.probability == plain.probability
    assert ("someone_elses", 0.0) in [(d.expert, d.contribution) for d in extra.drivers]


def test_localised_evidence_gives_the_fused_mask_at_half():
    heatmap = np.zeros(SHAPE, np.float32)
    heatmap[2:8, 3:9] = 1.0
    verdict = fuse([evidence("copy_move", 0.95, heatmap), evidence("ela", 0.9, heatmap * 0.2)], SHAPE, MODEL)
    assert verdict.label == "manipulated"
    assert np.array_equal(verdict.mask, heatmap > 0)
    fused = MODEL.heatmap([evidence("copy_move", 0.95, heatmap)], SHAPE)
    assert fused.dtype == np.float32 and fused.min() >= 0 and fused.max() <= 1


def test_a_strong_finding_does_not_mark_its_weak_halo():
    """With a relative share, a pixel is marked only where the pixel model reaches that share of the
    image's peak as well as the threshold: the faint ring around a strong region drops out, a weak
    region alone is marked as before, and the heatmap's 0.5 is that image's marking threshold."""
    from experts.fusion import marking_threshold

    core, halo = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    halo[2:12, 3:15] = 0.58  # the pixel model's probability there: sigmoid(-4 + 8 * 0.58) = 0.65
    core[4:10, 5:13] = 1.0  # 0.98
    strong = np.maximum(core, halo)
    plain = MODEL.heatmap([evidence("copy_move", 1.0, strong)], SHAPE)
    assert np.array_equal(plain >= 0.5, strong > 0)
    relative = replace(MODEL, pixel_threshold=0.3, pixel_relative=0.8)
    marked = relative.heatmap([evidence("copy_move", 1.0, strong)], SHAPE) >= 0.5
    assert np.array_equal(marked, core > 0)
    weak = relative.heatmap([evidence("copy_move", 1.0, halo)], SHAPE) >= 0.5
    assert np.array_equal(weak, halo > 0)  # its own peak: 0.8 * 0.65 = 0.52, the ring is marked
    probability = np.array([[0.1, 0.9]])
    assert marking_threshold(probability, 0.3, 0.0) == 0.3
    assert marking_threshold(probability, 0.3, 0.5) == pytest.approx(0.45)
    assert marking_threshold(np.ones((2, 2)), 0.3, 1.0) == 0.99  # something can always be marked


def test_the_kind_of_fake_follows_the_experts_that_accuse():
    ai = fuse([evidence("metadata", 0.95, indicates="ai_generated"), evidence("ela", 0.1)], SHAPE, MODEL)
    assert ai.label == "ai_generated"
    hint = evidence("metadata", 0.2, indicates="ai_generated")
    edited = fuse([hint, evidence("copy_move", 1.0)], SHAPE, MODEL)
    assert edited.label == "manipulated"


def test_intact_provenance_lowers_suspicion_but_cannot_erase_strong_evidence():
    weak = [evidence("ela", 0.5), evidence("noise", 0.3)]
    signed = [evidence("c2pa", 0.0, supports_authentic=True)]
    assert fuse([*weak, *signed], SHAPE, MODEL).probability < fuse(weak, SHAPE, MODEL).probability
    strong = [evidence("copy_move", 1.0), evidence("ela", 1.0)]
    assert fuse([*strong, *signed], SHAPE, MODEL).label == "manipulated"
    tampered = fuse([evidence("ela", 0.0), evidence("noise", 0.0), evidence("watermark", 0.9)], SHAPE, MODEL)
    assert tampered.probability > 0.65


def test_a_heavily_compressed_jpeg_is_not_accused_on_its_artefacts():
    """Below quality 10 (the jpeg expert's estimate) block artefacts swamp every detector's traces: the
    evidence against stops at the band's upper edge, together, and the verdict names the rule. At 10
    the evidence counts as fitted; tampered provenance still accuses; a clean result stays clean."""
    from experts.fusion import HEAVY_COMPRESSION_BELOW, HEAVY_COMPRESSION_RULE

    def saved_at(quality: int) -> Evidence:
        return evidence("jpeg", 0.0, last_quality_estimate=quality)

    strong = [evidence("copy_move", 1.0), evidence("ela", 1.0), evidence("noise", 0.0)]
    heavy = fuse([*strong, saved_at(HEAVY_COMPRESSION_BELOW - 1)], SHAPE, MODEL)
    assert heavy.label == "uncertain" and heavy.rule == HEAVY_COMPRESSION_RULE
    assert MODEL.uncertain_band[1] - 0.01 < heavy.probability <= MODEL.uncertain_band[1]
    held = {d.expert: d for d in heavy.drivers}
    assert held["copy_move"].held and held["ela"].held and not held["noise"].held
    assert held["copy_move"].contribution > held["ela"].contribution > 0  # scaled alike, order kept
    plain = fuse([*strong, saved_at(HEAVY_COMPRESSION_BELOW)], SHAPE, MODEL)
    assert plain.label == "manipulated" and plain.rule is None and not any(d.held for d in plain.drivers)
    clean = fuse([evidence("ela", 0.0), evidence("noise", 0.0), saved_at(5)], SHAPE, MODEL)
    assert clean.label == "authentic" and clean.rule == HEAVY_COMPRESSION_RULE
    tampered = fuse(
        [evidence("ela", 0.0), evidence("noise", 0.0), evidence("watermark", 0.9), saved_at(5)], SHAPE, MODEL
    )
    assert tampered.label == "manipulated"


def test_heavy_compression_is_known_without_the_jpeg_expert():
    """A partial analysis that skips the jpeg expert still applies the rule from the file's own
    quantisation table (`jpeg_quality`); where the jpeg expert ran, its estimate is the one read."""
    from experts.fusion import HEAVY_COMPRESSION_RULE

    strong = [evidence("copy_move", 1.0), evidence("ela", 1.0)]
    assert fuse(strong, SHAPE, MODEL, jpeg_quality=5).rule == HEAVY_COMPRESSION_RULE
    assert fuse(strong, SHAPE, MODEL, jpeg_quality=None).label == "manipulated"
    ran = [*strong, evidence("jpeg", 0.0, last_quality_estimate=80)]
    assert fuse(ran, SHAPE, MODEL, jpeg_quality=5).label == "manipulated"


def test_a_partial_analysis_of_a_heavily_compressed_jpeg_names_the_rule(tmp_path):
    from PIL import Image

    from assistant.analysis import analyze
    from experts.fusion import HEAVY_COMPRESSION_RULE, UNEXAMINED_RULE
    from experts.image import load_image

    pixels = texture((96, 128))  # one expert examines it: the rule that held its evidence, else too little
    for quality, rule in ((5, HEAVY_COMPRESSION_RULE), (90, UNEXAMINED_RULE)):
        Image.fromarray(pixels).save(tmp_path / f"q{quality}.jpg", quality=quality)
        image = load_image(tmp_path / f"q{quality}.jpg")
        assert abs(image.last_jpeg_quality - quality) <= 1
        assert analyze(image, ["noise"]).verdict.rule == rule
    Image.fromarray(pixels).save(tmp_path / "lossless.png")
    assert load_image(tmp_path / "lossless.png").last_jpeg_quality is None


def test_weak_findings_alone_do_not_add_up_to_an_accusation():
    """Three experts each under 0.5 would together pass the band: with none convinced on its own, the
    evidence against stops at the band's upper edge and the verdict names the rule. One expert at 0.5
    (a witness) lets the same evidence accuse; so does provenance that prosecutes."""
    from experts.fusion import NO_WITNESS_RULE, WITNESS_SCORE

    high = MODEL.uncertain_band[1]
    below = WITNESS_SCORE - 0.05
    weak = [evidence("ela", below), evidence("copy_move", below), evidence("metadata", below)]
    unheld = fuse(weak, SHAPE, replace(MODEL, uncertain_band=(0.35, 0.999)))
    assert unheld.probability > high  # what the sum alone would say
    held = fuse(weak, SHAPE, MODEL)
    assert held.label == "uncertain" and held.rule == NO_WITNESS_RULE
    assert high - 0.01 < held.probability <= high
    assert all(d.held for d in held.drivers if d.contribution > 0)
    witnessed = fuse([evidence("ela", WITNESS_SCORE), *weak[1:]], SHAPE, MODEL)
    assert witnessed.label == "manipulated" and witnessed.rule is None
    provenance = fuse([*weak, evidence("watermark", 0.9)], SHAPE, MODEL)
    assert provenance.label == "manipulated" and provenance.rule is None
    clean = fuse([evidence("ela", 0.1), evidence("noise", 0.0), evidence("copy_move", 0.0)], SHAPE, MODEL)
    assert clean.label == "authentic" and clean.rule is None


def test_the_localiser_is_a_witness_only_from_its_own_witness_score():
    """A localiser score of 0.7 is no conviction (29% of untouched val photos pass 0.5): beside weak
    findings the evidence is held; from WITNESS_SCORES["manipulation"] on it accuses."""
    from experts.fusion import NO_WITNESS_RULE, WITNESS_SCORE, WITNESS_SCORES

    image = replace(
        MODEL.image_models[PHOTO],
        experts=("ela", "copy_move", "manipulation"),
        presence=(0.0, 0.0, 0.0),
        weight=(3.0, 6.0, 5.0),
    )
    model = replace(MODEL, image_models={PHOTO: image})
    bar = WITNESS_SCORES["manipulation"]
    assert bar > WITNESS_SCORE
    weak = [evidence("ela", 0.3), evidence("copy_move", 0.4)]
    held = fuse([*weak, evidence("manipulation", bar - 0.1)], SHAPE, model)
    assert held.label == "uncertain" and held.rule == NO_WITNESS_RULE
    accused = fuse([*weak, evidence("manipulation", bar)], SHAPE, model)
    assert accused.label == "manipulated" and accused.rule is None


def test_nothing_clears_a_graphic_but_evidence_still_accuses_it():
    """An expert that declines a graphic says so (details "graphic"): where the evidence would clear
    the image, it is uncertain at the band's lower edge instead; strong evidence still accuses."""
    from experts.base import graphic_declined
    from experts.fusion import GRAPHIC_RULE

    declined = graphic_declined("ela", "1", "it reads photos.")
    low = MODEL.uncertain_band[0]
    quiet = fuse([declined, evidence("noise", 0.0), evidence("copy_move", 0.0)], SHAPE, MODEL)
    assert quiet.label == "uncertain" and quiet.probability == low and quiet.rule == GRAPHIC_RULE
    photo = fuse([evidence("ela", 0.0), evidence("noise", 0.0), evidence("copy_move", 0.0)], SHAPE, MODEL)
    assert photo.label == "authentic" and photo.rule is None
    tampered = fuse([declined, evidence("noise", 0.0), evidence("watermark", 0.9)], SHAPE, MODEL)
    assert tampered.label == "manipulated" and tampered.rule is None


def test_model_round_trips_through_tensors():
    tensors, metadata = MODEL.to_tensors()
    again = FusionModel.from_tensors(tensors, metadata, "fitted")
    assert again.image_models.keys() == MODEL.image_models.keys()
    image, expected = again.image_models[PHOTO], MODEL.image_models[PHOTO]
    assert image.experts == expected.experts and again.pixel_experts == MODEL.pixel_experts
    assert image.weight == pytest.approx(expected.weight) and image.temperature == pytest.approx(2.0)
    assert again.uncertain_band == (0.35, 0.65)  # exactly the setting, as reports print it
    assert image.typical == ()  # a file without typical contributions (before stop 23) reads as none
    assert again.pixel_relative == 0.0 and again.pixel_smoothing == 0.0
    smooth = FusionModel.from_tensors(*replace(MODEL, pixel_smoothing=0.01).to_tensors(), "fitted")
    assert smooth.pixel_smoothing == 0.01
    shared = FusionModel.from_tensors(*replace(MODEL, pixel_relative=0.3).to_tensors(), "fitted")
    assert shared.pixel_relative == 0.3
    older = {k: v for k, v in tensors.items() if k not in ("pixel_relative", "pixel_smoothing")}
    assert FusionModel.from_tensors(older, metadata, "fitted").pixel_relative == 0.0  # before stop 35
    typical = replace(MODEL, image_models={PHOTO: replace(expected, typical=(0.5, -0.25, 1.0, 0.0))})
    again = FusionModel.from_tensors(*typical.to_tensors(), "fitted")
    assert again.image_models[PHOTO].typical == pytest.approx((0.5, -0.25, 1.0, 0.0))


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_the_shipped_fusion_is_fitted_and_sane():
    model = fusion_model()
    assert model is not HAND_SET and model.source == "fitted"
    assert PHOTO in model.image_models and set(model.image_models) <= {PHOTO, THUMBNAIL}
    for shape in (PHOTO_SHAPE, SHAPE):
        image = model.image_model(shape)
        assert all(w >= 0 for w in image.weight) and 0.2 <= image.temperature <= 20
        clean = [evidence(name, 0.0) for name in image.experts]
        assert fuse(clean, shape, model).label == "authentic"


def test_photos_and_thumbnails_are_weighed_by_their_own_image_model():
    thumbnail = ImageModel(experts=("ela", "noise"), bias=2.0, presence=(0.0, 0.0), weight=(0.0, 0.0))
    both = replace(MODEL, image_models={**MODEL.image_models, THUMBNAIL: thumbnail})
    assert context_of((64, 500)) == THUMBNAIL and context_of((65, 65)) == PHOTO
    found = [evidence("ela", 0.0), evidence("noise", 0.0)]
    assert fuse(found, PHOTO_SHAPE, both).label == "authentic"
    assert fuse(found, SHAPE, both).probability == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-4)
    assert fuse(found, SHAPE, MODEL).label == "authentic"  # no thumbnail model: the photo model


def test_each_kind_of_image_gets_the_temperature_that_calibrates_it():
    """One weighing of evidence, a temperature per kind: logits twice as sharp as the truth get 2, half
    as sharp get 0.5, and nothing else of the model changes."""
    from finetune.train_fusion import temperature_per_kind

    rng = np.random.default_rng(0)
    truth = rng.normal(0.0, 3.0, 4000)  # calibrated logits
    labels = (rng.random(4000) < 1 / (1 + np.exp(-truth))).astype(np.float64)
    kinds = np.array([PHOTO, THUMBNAIL] * 2000)
    logits = np.where(kinds == PHOTO, 2.0 * truth, 0.5 * truth)
    models = temperature_per_kind(MODEL.image_models[PHOTO], logits, labels, kinds)
    assert set(models) == {PHOTO, THUMBNAIL}
    assert models[PHOTO].temperature == pytest.approx(2.0, rel=0.15)
    assert models[THUMBNAIL].temperature == pytest.approx(0.5, rel=0.15)
    for model in models.values():
        assert replace(model, temperature=2.0) == MODEL.image_models[PHOTO]


def test_a_fixed_weight_is_kept_and_the_others_are_fitted():
    from finetune.train_fusion import fit_logistic

    rng = np.random.default_rng(0)
    features = rng.random((400, 2))
    labels = (features[:, 0] + 0.1 * rng.standard_normal(400) > 0.5).astype(np.float64)
    coefficients, _ = fit_logistic(features, labels, slice(0, 2), 1e-4, fixed={1: 4.0})
    assert coefficients[1] == 4.0 and coefficients[0] > 4.0  # column 0 carries the label


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_editing_software_alone_accuses_nobody():
    """CASIA's tampered files say "written by Photoshop" and its authentic ones do not: a fitted weight
    learned that artefact (the fusion fitted with it called this photo manipulated, 0.73). The shipped
    fusion must not accuse a photo for its editing software ("uncertain" is allowed: it was edited)."""
    model = fusion_model()
    photoshop = 1 - (1 - 0.35) * (1 - 0.12)  # metadata: editing software + no camera data
    # the learned experts' mean scores on the pristine photos (`forensics eval` of clean_photos); no face
    typical = {"metadata": photoshop, "manipulation": 0.6, "ai_generated": 0.15, "faces": None}
    experts = model.image_models[PHOTO].experts
    found = [evidence(name, typical.get(name, 0.0)) for name in experts]
    assert fuse(found, PHOTO_SHAPE, model).label in ("authentic", "uncertain")
    without = [evidence(name, 0.12 if name == "metadata" else typical.get(name, 0.0)) for name in experts]
    assert fuse(without, PHOTO_SHAPE, model).label == "authentic"


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_one_face_judged_fake_alone_convicts_nobody():
    """Fitted on portrait val sets, the face expert's weight came out 6.2 and one pristine Kodak photo
    (face 0.93, every other expert quiet) was accused at 0.87. Its weight is fixed by design so that a
    fake face alone leaves a photo short of "manipulated"; with the AI-image expert agreeing (a
    generated face), it convicts."""
    model = fusion_model()
    typical = {"manipulation": 0.7, "ai_generated": 0.03, "faces": 0.93}  # kodim15's scores
    experts = model.image_models[PHOTO].experts
    alone = [evidence(name, typical.get(name, 0.0)) for name in experts]
    assert fuse(alone, PHOTO_SHAPE, model).label in ("authentic", "uncertain")
    generated = {**typical, "faces": 0.99, "ai_generated": 0.9}
    agreed = [evidence(name, generated.get(name, 0.0)) for name in experts]
    assert fuse(agreed, PHOTO_SHAPE, model).label != "authentic"


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_the_ai_image_detector_alone_cannot_make_a_photo_ai_generated():
    """On photos from cameras it never saw the AI-image detector errs (the skimage cat scored 0.99, a
    Canon photo 0.75, with every other expert quiet): alone it takes a photo to the uncertain band's
    upper edge, not past it. A second expert pointing to synthesis, or a thumbnail (CIFAKE, where it is
    validated), lets it convict; beside editing evidence that outweighs it, it counts as fitted."""
    model = fusion_model()
    high = model.uncertain_band[1]
    quiet = {"manipulation": 0.4, "ai_generated": 0.99, "faces": None}  # chelsea's scores, rounded
    synthesis = {"ai_generated", "frequency"}  # what these experts' evidence indicates

    def scored(scores: dict) -> list[Evidence]:
        return [
            evidence(n, scores.get(n, 0.0), indicates="ai_generated" if n in synthesis else "manipulated")
            for n in model.image_models[PHOTO].experts
        ]

    found = scored(quiet)
    photo = fuse(found, (300, 451), model)
    assert photo.label == "uncertain" and high - 0.01 < photo.probability <= high
    assert photo.drivers[0].expert == "ai_generated" and photo.drivers[0].held  # still the leading reason
    assert fuse(found, (32, 32), model).label == "ai_generated"
    assert fuse(scored({**quiet, "frequency": 0.8}), (300, 451), model).label == "ai_generated"
    assert fuse(scored({}), (300, 451), model).label == "authentic"  # nothing to hold back
    edited = {"copy_move": 0.99, "ai_generated": 0.99}  # a duplicated region outweighs the detector
    both = fuse(scored(edited), (300, 451), model)
    assert both.label == "manipulated" and both.probability > 0.99


def test_sample_weights_balance_data_sets_and_classes_as_asked():
    from finetune.train_fusion import balance

    records = [{"dataset": "casia1", "positive": True}] * 4 + [{"dataset": "cifake", "positive": True}]
    equal, root, none = (balance(records, mode) for mode in ("equal", "sqrt", "none"))
    assert equal[:4].sum() == pytest.approx(equal[4]) and equal.mean() == pytest.approx(1.0)
    assert root[:4].sum() == pytest.approx(2 * root[4])  # sqrt(4) : sqrt(1)
    assert none == pytest.approx(np.ones(5))
    with pytest.raises(ValueError):
        balance(records, "uniform")


def test_val_is_reweighed_to_the_train_splits_mix_of_manipulations():
    from finetune.train_fusion import balance, mix_weights

    def record(positive: bool, manipulation: str) -> dict:
        return {"dataset": "casia1", "positive": positive, "manipulation": manipulation}

    records = [record(True, "copy_move")] * 3 + [record(True, "splicing")] + [record(False, "none")] * 2
    mix = {("casia1", True): {"copy_move": 50, "splicing": 50, "removal": 7}, ("casia1", False): {"none": 9}}
    factors = mix_weights(records, mix)
    # half of the forgeries' weight each, among the manipulations val holds; the class keeps its total
    assert factors[:4] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0]) and factors[4:] == pytest.approx([1, 1])
    assert mix_weights(records, None) == pytest.approx(np.ones(6))
    unknown = {("casia1", True): {"copy_move": 50}}  # splicing not in the mix: taken as it comes
    assert mix_weights(records, unknown) == pytest.approx(np.ones(6))
    weights = balance(records, "equal", factors)
    assert weights[:4].sum() == pytest.approx(weights[4:].sum())
    assert weights[3] == pytest.approx(3 * weights[0])


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_val_verdicts_count_labels_with_and_without_the_lone_detector_rule():
    from finetune.train_fusion import val_verdicts

    model = fusion_model()

    def record(dataset: str, positive: bool, shape: list[int], ai: float) -> dict:
        names = model.image_models[PHOTO].experts
        experts = {n: {"applicable": True, "score": 0.0, "indicates": "manipulated"} for n in names}
        experts["faces"] = {"applicable": False, "score": None, "indicates": "manipulated"}
        experts["ai_generated"] = {"applicable": True, "score": ai, "indicates": "ai_generated"}
        return {"dataset": dataset, "positive": positive, "shape": shape, "experts": experts}

    records = [record("photos", False, [300, 451], 0.99), record("photos", False, [300, 451], 0.0)]
    records.append(record("thumbnails", True, [32, 32], 0.99))
    counts = {key.split(" val")[0]: value for key, value in val_verdicts(model, records).items()}
    assert counts == {"photos negative": "0 / 1 / 1 (1)", "thumbnails positive": "1 / 0 / 0 (1)"}


def test_mean_scores_show_an_experts_scale_per_data_set_and_class():
    from finetune.train_fusion import mean_scores

    def record(dataset: str, positive: bool, score: float | None) -> dict:
        found = {"applicable": score is not None, "score": score, "indicates": "manipulated"}
        return {"dataset": dataset, "positive": positive, "experts": {"ela": found}}

    records = [record("casia1", False, 0.2), record("casia1", False, 0.4), record("casia1", True, 0.9)]
    records += [record("faces_real", False, 0.6), record("faces_real", False, None)]
    lines = mean_scores(records, ["ela"])
    assert lines == {"ela mean val score, authentic / fake": "casia1 0.30 / 0.90, faces_real 0.60 / -"}


def _casia_records(count: int = 12) -> list[dict]:
    """CASIA-like records whose copy-move map has a core (the forgery) in a weaker halo, some strong,
    some weak."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        truth = np.zeros((24, 32), bool)
        y, x = rng.integers(4, 12), rng.integers(4, 16)
        truth[y : y + 6, x : x + 8] = True
        heatmap = np.zeros(truth.shape, np.float32)
        strength = 1.0 if i % 2 else 0.5  # no one threshold parts every core from every halo
        heatmap[y - 3 : y + 9, x - 3 : x + 11] = 0.6 * strength
        heatmap[truth] = strength
        record = {
            "dataset": "casia1",
            "positive": True,
            "variant": "raw",
            "truth": truth,
            "manipulation": "splicing",
        }
        records.append(record | {"maps": {"copy_move": heatmap}, "path": f"casia1/Tp/{i}.jpg"})
    return records


def test_the_pixel_fit_chooses_a_relative_share_that_drops_the_halo():
    from finetune.train_fusion import FusionConfig, fit_pixel_model

    records = _casia_records()
    ones = np.ones(len(records))
    fields, scores = fit_pixel_model(FusionConfig(smoothing_shares=()), records, ones, ones)
    assert fields["pixel_experts"] == ("copy_move",) and fields["pixel_relative"] > 0.0
    plain = next(value for key, value in scores.items() if "raw mean pixel-F1 without" in key)
    shipped = scores["CASIA val raw mean pixel-F1, shipped"]
    assert shipped == pytest.approx(1.0) and shipped > plain
    unchosen, _ = fit_pixel_model(FusionConfig(relative_shares=(), smoothing_shares=()), records, ones, ones)
    assert unchosen["pixel_relative"] == 0.0 and unchosen["pixel_smoothing"] == 0.0


def test_smoothing_keeps_a_region_and_drops_a_speck():
    from experts.fusion import smoothed

    probability = np.full((300, 400), 0.1, np.float32)
    probability[100:200, 100:250] = 0.9
    probability[20, 350] = 0.9  # one pixel: a speck, not a region
    soft = smoothed(probability, 0.01)
    assert soft.shape == probability.shape and soft.dtype == np.float32
    assert soft[150, 175] > 0.85 and soft[20, 350] < 0.2
    assert smoothed(probability, 0.0) is probability
    large = smoothed(np.full((3000, 4000), 0.3, np.float32), 0.01)
    assert large.shape == (3000, 4000) and np.allclose(large, 0.3, atol=1e-4)


@pytest.mark.skipif(not available("fusion"), reason="experts/weights/fusion.safetensors not shipped")
def test_a_pixel_only_refit_keeps_the_shipped_image_models_and_their_scores(monkeypatch):
    from finetune import train_fusion
    from finetune.train_fusion import FusionConfig, refit_pixel_model

    monkeypatch.setattr(train_fusion, "manipulation_mix", lambda datasets, split="train": {})  # no data here

    model, scores = refit_pixel_model(FusionConfig(datasets=("casia1",)), _casia_records())
    assert model.image_models == fusion_model().image_models
    assert model.pixel_experts == ("copy_move",) and model.pixel_relative > 0.0
    assert "casia1 val AUC (out-of-fold)" in scores  # kept from the card, measured for these models
    assert scores["pixel relative share (best mean pixel-F1 on CASIA val at that threshold)"] > 0.0
