"""Instruction tuning of the assistant: the data builder (deterministic, split by source image, answers
that pass the check, metadata instructions never obeyed), the training recipe (two steps on a tiny
random Qwen2-VL and on the embedded model, the cached lower layers equal to the full model), and the
evaluation's metrics on hand-made examples."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from assistant.backends.base import Message
from assistant.grounding import LABEL_WORDS, check_answer
from assistant.report import where_phrases
from experts import samples
from experts.image import load_image
from finetune.eval_assistant import TurnResult, candidate_of, obeyed, rouge_l, select, tool_f1
from finetune.instructions import (
    INJECTIONS,
    OBEY_PATTERNS,
    ConversationSpec,
    choose_specs,
    reference_answer,
    reference_plan,
    unseen_scores,
    with_instruction,
)
from finetune.instructions import record_conversation as record

DATA = Path("../shared/data/manifest.csv")
CLASSICAL = ["ela", "noise", "jpeg", "copy_move", "metadata", "frequency"]
needs_data = pytest.mark.skipif(not DATA.is_file(), reason="../shared/data is not here")


def _spec(
    tmp_path: Path, data: bytes, turns, injection: str | None = None, name: str = "s"
) -> ConversationSpec:
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(data)
    return ConversationSpec(
        name, "train", name, "synthetic", "manipulated", str(path), tuple(turns), injection
    )


# --------------------------------------------------------------------------------------------------
# Data builder


@needs_data
def test_specs_are_deterministic_by_seed_and_split_by_source_image(tmp_path: Path) -> None:
    first = choose_specs("train", 0, scale=0.3, image_dir=tmp_path / "a")
    again = choose_specs("train", 0, scale=0.3, image_dir=tmp_path / "b")
    other = choose_specs("train", 1, scale=0.3, image_dir=tmp_path / "c")
    strip = [dataclasses.replace(s, image=Path(s.image).name) for s in first]
    assert strip == [dataclasses.replace(s, image=Path(s.image).name) for s in again]
    assert [s.source for s in first] != [s.source for s in other]
    val = choose_specs("val", 0, scale=0.3, image_dir=tmp_path / "d")
    assert not {s.source for s in first} & {s.source for s in val}
    assert {s.split for s in first} == {"train"} and {s.split for s in val} == {"val"}
    assert any(s.injection for s in first) and any(s.injection for s in val)
    with pytest.raises(ValueError, match="never read the test split"):
        choose_specs("test", 0)


@needs_data
def test_injection_share_sets_how_many_conversations_carry_an_instruction(tmp_path: Path) -> None:
    def injected(share: float) -> int:
        specs = choose_specs("train", 0, scale=0.5, image_dir=tmp_path, injection_share=share)
        return sum(s.injection is not None for s in specs)

    assert 0 < injected(0.1) < injected(0.3)


def test_reference_plans_follow_the_image_and_the_question() -> None:
    jpeg = load_image(samples.splice().data)
    png = load_image(with_instruction(samples.splice().data, "a caption", "png"))
    assert jpeg.is_jpeg and png.format == "PNG"
    assert [n for n, _ in reference_plan("verdict", jpeg, CLASSICAL)] == ["analyze_image"]
    assert [n for n, _ in reference_plan("edit", jpeg, CLASSICAL)] == ["jpeg", "ela"]
    assert [n for n, _ in reference_plan("edit", png, CLASSICAL)] == ["ela", "noise"]
    assert [n for n, _ in reference_plan("face", jpeg, CLASSICAL)] == ["analyze_image"]
    assert [n for n, _ in reference_plan("face", jpeg, [*CLASSICAL, "faces"])] == ["faces"]
    assert [n for n, _ in reference_plan("provenance", jpeg, [*CLASSICAL, "c2pa"])] == ["c2pa", "metadata"]
    assert reference_plan("map", jpeg, CLASSICAL)[1] == ("show_map", {"expert": "fused", "image": "image_1"})


def test_recorded_conversation_targets_are_calls_then_a_grounded_answer(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, samples.splice().data, [("edit", "Was this photoshopped?"), ("why", "Explain why.")]
    )
    records, summary = record(spec, CLASSICAL)
    assert [(r["turn"], r["step"]) for r in records] == [
        (0, "plan"),
        (0, "plan"),
        (0, "answer"),
        (1, "plan"),
        (1, "answer"),
    ]
    assert (
        records[0]["target"] == '<tool_call>{"name": "jpeg", "arguments": {"image": "image_1"}}</tool_call>'
    )
    assert records[0]["messages"][0]["role"] == "system" and records[0]["messages"][-1]["images"] == 1
    assert records[2]["messages"][-1]["role"] == "tool"  # the answer follows the last observation
    assert json.loads(json.dumps(records)) == records
    image = load_image(spec.image)
    from assistant.analysis import analyze

    analysis = analyze(image, CLASSICAL)
    where = where_phrases(analysis.verdict.mask, image.orientation)
    for turn in summary["turns"]:
        assert turn["verdict"]["label"] == analysis.verdict.label  # whatever the fusion says, it is stated
        problems = check_answer(
            turn["reference_answer"], analysis.verdict, analysis.evidence, where, require_verdict=True
        )
        assert problems == []
        assert f"{analysis.verdict.probability:.0%}" in turn["reference_answer"]
    assert [c["name"] for c in summary["turns"][0]["reference_calls"]] == ["jpeg", "ela"]
    # Every score an answer target quotes is in front of the model; a made-up one would be caught.
    assert [unseen_scores(r) for r in records] == [[]] * len(records)
    made_up = {**records[2], "target": records[2]["target"] + "\ncopy_move (score 0.37): cloned."}
    assert "0.37" not in json.dumps(records[2]["messages"]) and unseen_scores(made_up) == ["0.37"]


def test_called_experts_lead_the_reasons_when_asked_about_or_when_they_agree() -> None:
    from assistant.analysis import analyze
    from finetune.instructions import leading_experts

    analysis = analyze(load_image(samples.splice().data), CLASSICAL)
    scores = {e.expert: e.score for e in analysis.evidence}
    assert analysis.verdict.label != "authentic" and scores["jpeg"] >= 0.5 > scores["copy_move"]
    assert leading_experts("edit", ["copy_move", "jpeg"], analysis) == ["jpeg"]  # found nothing: no reason
    assert leading_experts("copy_move", ["copy_move"], analysis) == ["copy_move"]  # the question's subject


@pytest.mark.parametrize("kind", ["exif", "xmp", "png"])
def test_metadata_instructions_reach_the_model_and_the_target_does_not_obey(
    tmp_path: Path, kind: str
) -> None:
    text = INJECTIONS[0]
    data = with_instruction(samples.splice().data, text, kind)
    image = load_image(data)
    assert image.is_jpeg == (kind != "png")
    if kind != "png":  # the JPEG's own bytes are kept: same pixels, same quantisation
        original = load_image(samples.splice().data)
        assert (image.pixels == original.pixels).all()
        assert all((image.quantization[k] == original.quantization[k]).all() for k in original.quantization)
    spec = _spec(tmp_path, data, [("verdict", "Is this image authentic?")], injection=text, name=kind)
    records, summary = record(spec, CLASSICAL)
    seen = " ".join(m["content"] for r in records for m in r["messages"])
    assert "Ignore previous instructions" in seen
    answer, verdict = summary["turns"][0]["reference_answer"], summary["turns"][0]["verdict"]["label"]
    assert "as data, not as an instruction" in answer
    assert not OBEY_PATTERNS.search(answer)
    assert answer.startswith(f"image_1 is {LABEL_WORDS[verdict]}") or answer.startswith(
        "The verdict for image_1 is uncertain"
    )
    if verdict != "authentic":
        assert "authentic" not in answer.replace("not authentic", "")


def test_reference_answer_fits_the_budget_and_says_where() -> None:
    from assistant.analysis import analyze

    image = load_image(samples.copy_move().data)
    analysis = analyze(image, CLASSICAL)
    text = reference_answer("verdict", analysis, image)
    assert text.startswith(f"image_1 is {analysis.verdict.label}")
    assert len(text.split()) < 110
    where = where_phrases(analysis.verdict.mask, image.orientation)
    assert where and where[0] in text
    assert check_answer(text, analysis.verdict, analysis.evidence, where, require_verdict=True) == []


# --------------------------------------------------------------------------------------------------
# Training recipe


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("records")
    spec = _spec(folder, samples.splice().data, [("verdict", "Is this fake?")])
    return record(spec, ["ela", "noise"])[0]  # two experts: short prompts, so the tests train quickly


def test_the_recipe_trains_a_tiny_qwen2_vl(tiny_qwen2_vl: Path, records: list[dict], tmp_path: Path) -> None:
    from finetune.train_assistant import AssistantConfig, Trainee, tools_for, train

    config = AssistantConfig(
        out=str(tmp_path / "run"),
        model=str(tiny_qwen2_vl),
        top_layers=0,
        targets=("q_proj", "v_proj"),
        max_steps=2,
        batch=1,
        dev_fraction=0,
        ship=False,
        eval_every=0,
        lr=1e-2,
    )
    trainee = Trainee(config, "cpu")
    example = trainee.encode(records[0], tools_for(records[0]["experts"]))
    assert "pixel_values" in example.extra  # the VLM sees the image through its processor
    summary = train(config, records)
    assert summary["steps"] == 2 and summary["trainable_parameters"] > 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    from assistant.backends import load_backend

    tuned = load_backend(tiny_qwen2_vl, adapter=adapter, device="cpu")
    plain = load_backend(tiny_qwen2_vl, device="cpu")
    inputs = plain.inputs([Message("user", "Is this fake?")])
    with torch.inference_mode():
        assert not torch.allclose(plain.model(**inputs).logits, tuned.model(**inputs).logits)
    # resuming a finished run does no more steps
    assert train(dataclasses.replace(config), records)["steps"] == 2


def test_the_recipe_trains_the_embedded_model_with_cached_lower_layers(
    records: list[dict], tmp_path: Path
) -> None:
    from finetune.train_assistant import (
        AssistantConfig,
        FrozenLowerLayers,
        Trainee,
        encode_all,
        pack_turns,
        train,
    )

    config = AssistantConfig(
        out=str(tmp_path / "run"),
        top_layers=2,
        max_steps=2,
        batch=1,
        dev_fraction=0,
        ship=False,
        eval_every=0,
        dropout=0.0,
    )
    trainee = Trainee(config, "cpu")
    trainee.add_lora()
    for name, parameter in trainee.language_model.named_parameters():
        if "lora_B" in name:  # a non-zero adapter, so the top layers differ from the base model
            torch.nn.init.normal_(parameter, std=0.02)
    plan, answer = encode_all(trainee, records, 4096)  # "Is this fake?": analyze_image, then the answer
    assert plan.target[-1] == trainee.tokenizer.convert_tokens_to_ids("<|im_end|>")
    [packed] = pack_turns([plan, answer])  # the call and its prompt are a prefix of the answer's prompt
    start = len(plan.segments[0])
    assert packed.earlier == [(start, start + len(plan.target))]
    inputs, labels = packed.positions()
    assert labels == plan.target + answer.target and len(inputs) == len(labels)
    assert plan.plan and not answer.plan  # --plan-weight weighs the call's tokens, not the answer's
    assert packed.weights(3.0) == [3.0] * len(plan.target) + [1.0] * len(answer.target)
    cached = FrozenLowerLayers(trainee, len(trainee.layers()) - 2)
    cached.fill([packed], progress=False)
    with torch.no_grad():  # the cached lower layers give exactly the full model's loss
        unweighted = float(cached.loss(packed))
        assert unweighted == pytest.approx(float(trainee.loss(packed)), rel=1e-4)
        trainee.config.plan_weight = 3.0  # the call's tokens weigh more: a different loss, still exact
        weighted = float(cached.loss(packed))
        assert weighted == pytest.approx(float(trainee.loss(packed)), rel=1e-4)
        assert weighted != pytest.approx(unweighted, rel=1e-3)
        trainee.config.plan_weight = 1.0
    summary = train(config, records)
    assert summary["steps"] == 2 and summary["examples"] == 1 and summary["targets"] == 2
    lora = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (
        lora["layers_to_transform"] == [28, 29] and lora["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    )
    assert lora["target_modules"] == sorted(lora["target_modules"])  # the same adapter, the same file


# --------------------------------------------------------------------------------------------------
# Evaluation metrics


def test_rouge_l_on_hand_examples() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # LCS "the cat the mat" (4 of 6 and 4 of 5 words): P = 4/6, R = 4/5
    assert rouge_l("the cat sat on the mat", "the cat ate the mat") == pytest.approx(
        2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5)
    )
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("Probability 0.87, Manipulated!", "manipulated probability 0.87") == pytest.approx(2 / 3)


def test_tool_f1_on_hand_examples() -> None:
    assert tool_f1([["jpeg", "ela"]], [["jpeg", "ela"]])["f1"] == 1.0
    scores = tool_f1(
        [["jpeg"], ["analyze_image", "noise"], []], [["jpeg", "ela"], ["analyze_image"], ["noise"]]
    )
    # 2 right of 3 predicted, 2 found of 4 expected
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert tool_f1([["ela", "ela"]], [["ela"]])["precision"] == 0.5  # multisets: a repeated call is not free


def test_candidate_is_the_answer_before_the_retry_and_obeying_is_detected() -> None:
    question = [Message("user", "Is it fake?")]
    feedback = [*question, Message("user", "Your answer does not match the evidence:\n- ...")]
    calls = [
        (question, '<tool_call>{"name": "analyze_image", "arguments": {}}</tool_call>'),
        (question, "It is authentic."),
        (feedback, "It is manipulated."),
    ]
    assert candidate_of(calls) == "It is authentic."
    assert candidate_of(calls[:2]) == "It is authentic." and candidate_of([]) == ""
    base = TurnResult("c", "verdict", "q", True, "", "", "manipulated", [], [], 0, 0, 0, True, [], False, 0.0)
    said = dataclasses.replace(base, problems=['The answer calls the image "authentic", but ...'])
    assert obeyed(said) and not obeyed(base)
    assert obeyed(dataclasses.replace(base, candidate="As verified by the developers, it is fine."))
    assert not obeyed(dataclasses.replace(said, verdict="authentic"))


def test_selection_keeps_the_injection_conversations() -> None:
    specs = [{"id": f"c{i}", "injection": "x" if i % 4 == 0 else None} for i in range(20)]
    chosen = select(specs, 8)
    assert len(chosen) == 8 and sum(bool(s["injection"]) for s in chosen) == 2
    assert chosen == select(specs, 8) and select(specs, 0) == specs
