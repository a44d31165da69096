"""Keeping the answer honest: check_answer() finds what a model's answer states that the fused verdict
and the evidence do not support, and compose_answer() writes a plain-language answer from the verdict
and the evidence alone, for when the model cannot.

The check reads the answer the way a careful reader would, with simple rules rather than a model:
- label: words that call the image authentic (genuine, real, unedited, ...), manipulated (edited,
  tampered, doctored, spliced, ...), AI-generated (synthetic, ...), fake, or uncertain (inconclusive,
  ...), with negations ("not manipulated", "no sign of editing") read as denials; conditional or
  descriptive mentions ("whether it was edited", "ELA detects edited regions") are not claims, and
  hedged ones ("may have been edited") are not held against an "uncertain" verdict;
- probability: a percentage or a decimal next to "probability", "chance", "likely", "confidence", ...
  must be the fused probability (or its complement when it is the chance of being authentic), within
  one unit of the last digit stated;
- numbers: every other number must appear in the evidence (scores, summaries, details, where
  phrases), within one unit of its last digit;
- places: region words (upper-left, top, centre, ...) must overlap the places that the verdict's or the
  evidence's where phrases or summaries name.
Evidence summaries (or their first sentences, as reason_line quotes them), where phrases and metadata
quotes copied verbatim into an answer are grounded by definition and are not re-read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from experts.base import Evidence, Verdict
from experts.fusion import GRAPHIC_RULE, HEAVY_COMPRESSION_RULE, NO_WITNESS_RULE, UNEXAMINED_RULE
from experts.registry import available_experts

# Experts whose summaries and details carry text read from the file (EXIF, XMP, PNG chunks, C2PA
# manifests, watermark payloads): untrusted data, quoted and labelled, never obeyed.
METADATA_EXPERTS = frozenset({"metadata", "c2pa", "watermark", "invisible_watermark"})

LABEL_WORDS = {
    "authentic": "authentic",
    "manipulated": "manipulated",
    "ai_generated": "AI-generated",
    "uncertain": "uncertain",
}

# --------------------------------------------------------------------------------------------------
# Text helpers

_TERMS = re.compile(
    r"\b(?:"
    r"(?P<ai_generated>ai[- ]?generated|ai[- ](?:made|created)"
    r"|(?:made|created|generated|produced)\s+(?:by|with)\s+(?:an?\s+)?"
    r"(?:ai|generative ai|image generator|generator|diffusion model|gan|text-to-image model)"
    r"|synthetic|synthesi[sz]ed|computer[- ]generated|fully generated)"
    r"|(?P<authentic>authentic|genuine|real(?![-'’])|unedited|unaltered|untouched|unmanipulated|untampered"
    r"|unmodified|undoctored)"
    r"|(?P<manipulated>manipulated|edited|tampered(?:\s+with)?|doctored|altered|spliced|photoshopped|forged"
    r"|retouched|copy[- ]moved|cloned)"
    r"|(?P<fake>fake|faked|fabricated|counterfeit|bogus|deepfake)"
    r"|(?P<uncertain>uncertain|inconclusive|unclear|undetermined|undecided|ambiguous)"
    r"|(?P<manipulation_noun>manipulations?|tampering|editing|edits|forgery|forgeries|alterations?"
    r"|splicing|doctoring|retouching|photoshopping)"
    r"|(?P<ai_noun>ai generation|generative ai|ai involvement|synthesis)"
    r")\b",
    re.IGNORECASE,
)
_NEGATION = re.compile(
    r"\b(?:not|no|never|without|nothing|none|neither|nor|cannot|free of|lack of|absence of|rather than"
    r"|instead of|as opposed to|unlike)\b|n['’]t\b",
    re.IGNORECASE,
)
_NOT_NEGATION = re.compile(
    r"\b(?:no doubt|without (?:a )?doubt|not only|no question|nothing but|none other than)\b", re.IGNORECASE
)
_WEAK = re.compile(
    r"\b(?:clear|clearly|strong|strongly|conclusive|definite|definitive|obvious|significant|compelling"
    r"|much|major|reliable)\b",
    re.IGNORECASE,
)
_SKIP = re.compile(
    r"\b(?:if|whether|unless|would|rule out|ruled out|prove|proves|proof|guarantee|tell|determine"
    r"|decide|hard to|question|ask|asked|asking|look for|looks for|detect|detects|detecting|verify"
    r"|can help|could help|kinds? of|types? of|probability|chance|likelihood|odds)\b|\d\s*%",
    re.IGNORECASE,
)
_HEDGE = re.compile(
    r"\b(?:may|might|could|possibly|perhaps|probably|likely|seems?|appears?|suggests?|indicates?"
    r"|consistent with|points? to|hints?|somewhat|partly)\b",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"[;:§()\[\]—–]|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\byet\b")
_CHAIN_GAP = re.compile(r"^(?:\s|,|/|\bor\b|\band\b|\bnor\b|\beven\b|\bbeing\b|\bbeen\b)*$", re.IGNORECASE)
_CONTRAST_GAP = re.compile(r"\b(?:rather than|instead of|as opposed to|not)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_EXEMPT_PHRASES = (  # fixed phrases that name a label without claiming it, and their stand-ins
    (re.compile(r"\bp\s*\(\s*not authentic\s*\)", re.IGNORECASE), " probability "),
    (
        re.compile(
            r"\b(?:probability|chance|likelihood|odds)\s+(?:that\s+(?:the|this)\s+(?:image|photo|picture|file)"
            r"\s+(?:is|was)\s+|of\s+(?:it\s+)?(?:being\s+)?)not authentic\b",
            re.IGNORECASE,
        ),
        " probability ",
    ),
    (re.compile(r"\buncertain\s+(?:band|range|zone|interval)\b", re.IGNORECASE), " band "),
    # what a network learned from, not what this image is: "a network trained on edited photos"
    (
        re.compile(
            r"\b(?:trained|learned|learnt)\s+(?:on|from)\s+(?:[\w-]+\s+){0,3}?"
            r"(?:photos|images|pictures|faces|examples|data)\b",
            re.IGNORECASE,
        ),
        " trained ",
    ),
)

_NUMBER = re.compile(
    r"(?<![\w.])(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
    r"(?P<unit>\s*(?:%|percent\b|per cent\b)|[x×](?!\w)|(?!\w|\.\d))"
)
_DIMENSIONS = re.compile(r"(?<![\w.])(\d+)\s*[x×]\s*(\d+)(?![\d.])")
_ANY_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s+", re.MULTILINE)
_IMAGE_ID = re.compile(r"\bimage[_ ]\d+\b", re.IGNORECASE)
_PROBABILITY_WORD = re.compile(
    r"\b(?:probability|probable|chance|chances|likelihood|likely|confidence|confident|certainty|odds)\b"
    r"|\bp\s*\(",
    re.IGNORECASE,
)
_AUTHENTIC_CONTEXT = re.compile(r"(?<!not )(?<!n't )\b(?:authentic|genuine|real)\b", re.IGNORECASE)
_LABEL_BEFORE = re.compile(
    r"\b(authentic|genuine|real|manipulated|edited|tampered|doctored|fake|ai[- ]generated|synthetic|uncertain"
    r"|inconclusive)\W{0,3}$",
    re.IGNORECASE,
)
_AFTER_PROBABILITY = re.compile(
    r"^\s*(?:\)|,)?\s*(?:probability|chance|likely|likelihood|confidence|certain|sure|authentic|genuine|real)\b",
    re.IGNORECASE,
)
_AFTER_AUTHENTIC = re.compile(
    r"^\s*(?:\)|,)?\s*(?:(?:probability|chance|likelihood|likely|sure|certain|confident)\s+)?(?:that\s+)?"
    r"(?:(?:it|this|the image|this image|the photo|the picture)\s+)?(?:is\s+|was\s+|'s\s+)?"
    r"(?:authentic|genuine|real)\b",
    re.IGNORECASE,
)
_QUOTED = re.compile(r"[\"“]([^\"”]{2,})[\"”]")

_GRID_ROWS = {"upper": 0, "top": 0, "lower": 2, "bottom": 2}
_GRID_COLS = {"left": 0, "right": 2}
_CENTRE = {"centre", "center", "middle"}
_COMPOUND_PLACE = re.compile(
    r"\b(?:(?P<row>upper|lower|top|bottom)[- ]?(?P<col>left|right)"
    r"|(?P<row2>upper|lower|top|bottom)[- ](?:centre|center|middle)"
    r"|(?:centre|center|middle)[- ](?P<col2>left|right))\b",
    re.IGNORECASE,
)
_SIMPLE_PLACE = re.compile(
    r"\b(?:in|on|at|near|to|towards?|along|around|across|of|from|into)\s+(?:the\s+)?(?:very\s+|far\s+)?"
    r"(?P<word>upper|lower|top|bottom|left|right|centre|center|middle)\b(?!-)(?P<after>[^.;:\n]{0,30})",
    re.IGNORECASE,
)
_RELATIVE_AFTER = re.compile(
    r"^\s*(?:of|side of|half of|part of|edge of)\s+(?!the (?:image|photo|picture|frame))"
)


@dataclass(frozen=True)
class _Claim:
    label: str  # authentic, manipulated, ai_generated, uncertain, fake
    denied: bool
    hedged: bool
    weak: bool
    text: str


def _exempt(text: str, exempt: Iterable[str]) -> str:
    """The text with grounded passages (evidence summaries, where phrases, quotes from the evidence)
    and fixed phrases replaced by a clause break, so that they are not re-read as claims."""
    for passage in sorted({p for p in exempt if p and len(p) > 3}, key=len, reverse=True):
        text = text.replace(passage, " § ")
    for pattern, stand_in in _EXEMPT_PHRASES:
        text = pattern.sub(stand_in, text)
    return text


def _claims(text: str) -> list[_Claim]:
    claims: list[_Claim] = []
    for sentence in _SENTENCE.split(text):
        if sentence.rstrip().endswith("?"):
            continue
        previous: _Claim | None = None
        previous_end = 0
        for match in _TERMS.finditer(sentence):
            kind = match.lastgroup or ""
            gap = sentence[previous_end : match.start()]
            if previous is not None and _CHAIN_GAP.match(gap):
                # "not edited, spliced or retouched": the list shares the first word's polarity.
                claim = _Claim(
                    _label_of(kind), previous.denied, previous.hedged, previous.weak, match.group(0)
                )
            elif previous is not None and _CONTRAST_GAP.search(gap) and not _CLAUSE_BREAK.search(gap):
                # "manipulated rather than AI-generated", "manipulated, not AI-generated"
                claim = _Claim(_label_of(kind), not previous.denied, False, False, match.group(0))
            else:
                claim = _read_claim(sentence[: match.start()], kind, match.group(0))
            previous_end = match.end()
            if claim is None:
                previous = None
                continue
            previous = claim
            if kind.endswith("_noun") and not claim.denied:
                continue  # "signs of editing" is not a claim that the image was edited
            claims.append(claim)
    return claims


def _label_of(kind: str) -> str:
    return {"manipulation_noun": "manipulated", "ai_noun": "ai_generated"}.get(kind, kind)


def _read_claim(prefix: str, kind: str, text: str) -> _Claim | None:
    clause = _CLAUSE_BREAK.split(prefix)[-1]
    if _SKIP.search(clause):
        return None
    local = _NOT_NEGATION.sub(" ", clause.split(",")[-1])
    window = " ".join(local.split()[-7:])
    denied = bool(_NEGATION.search(window))
    return _Claim(
        _label_of(kind),
        denied,
        hedged=bool(_HEDGE.search(window)),
        weak=denied and bool(_WEAK.search(window)),
        text=text,
    )


def _claim_problem(claim: _Claim, label: str) -> bool:
    """Whether this claim contradicts a verdict with this label. "Fake" is right for either kind of
    fake; denying "authentic" claims fake, denying "fake" claims authentic; a weak denial ("no clear
    sign of editing") fits an uncertain verdict, a flat one does not."""
    if claim.hedged and label == "uncertain":
        return False
    fake = label in ("manipulated", "ai_generated")
    if not claim.denied:
        return not fake if claim.label == "fake" else claim.label != label
    if claim.label == "authentic":
        return not fake
    if claim.label == "fake":
        return label != "authentic"
    if claim.label == "manipulated":
        return label == "manipulated" or (label == "uncertain" and not claim.weak)
    return claim.label == label


def _states_label(claim: _Claim, label: str) -> bool:
    if claim.hedged and label == "uncertain":
        return False
    if label == "manipulated":
        return (claim.label in ("manipulated", "fake") and not claim.denied) or (
            claim.label == "authentic" and claim.denied
        )
    if label == "authentic":
        return (claim.label == "authentic" and not claim.denied) or (
            claim.label in ("fake", "manipulated") and claim.denied and not claim.weak
        )
    return claim.label == label and not claim.denied


# --------------------------------------------------------------------------------------------------
# Numbers


def _harvest(value: Any, into: set[float], depth: int = 0) -> None:
    if isinstance(value, bool) or depth > 4:
        return
    if isinstance(value, (int, float)) and math.isfinite(value):
        into.add(float(value))
    elif isinstance(value, str):
        into.update(float(n) for n in _ANY_NUMBER.findall(value.replace(",", "")))
    elif isinstance(value, dict):
        for item in list(value.values())[:64]:
            _harvest(item, into, depth + 1)
    elif isinstance(value, (list, tuple)) and len(value) <= 16:
        for item in value:
            _harvest(item, into, depth + 1)


def _grounded_numbers(
    verdicts: Sequence[Verdict], evidence: Sequence[Evidence], where: Sequence[str], extra: Iterable[float]
) -> set[float]:
    numbers: set[float] = set(map(float, extra))
    for verdict in verdicts:
        numbers.update((verdict.probability, 1.0 - verdict.probability, *verdict.uncertain_band))
        for driver in verdict.drivers:
            numbers.update((driver.score, driver.weight, driver.contribution))
        numbers.add(len(verdict.drivers))
    numbers.update((len(evidence), sum(e.applicable for e in evidence)))
    for item in evidence:
        if item.score is not None:
            numbers.add(float(item.score))
        _harvest(item.summary, numbers)
        _harvest(item.details, numbers)
        for region in item.regions:
            numbers.add(float(region.score))
    for phrase in where:
        _harvest(phrase, numbers)
    return numbers


def _tolerance(integer: str, decimals: int) -> float:
    if decimals:
        return 10.0**-decimals
    digits = integer.replace(",", "")
    zeros = len(digits) - len(digits.rstrip("0")) if digits.strip("0") else 0
    return 10.0 ** min(zeros, len(digits) - 1)  # "7600" is a rounded 7631


def _close(value: float, tolerance: float, targets: Iterable[float]) -> bool:
    return any(abs(value - t) <= tolerance + 1e-9 for t in targets)


def _number_matches(value: float, tolerance: float, percent: bool, grounded: set[float]) -> bool:
    if percent:
        return _close(value, tolerance, grounded) or _close(value / 100, tolerance / 100, grounded)
    return (
        _close(value, tolerance, grounded)
        or _close(value / 100, tolerance / 100, grounded)
        or _close(value * 100, tolerance * 100, grounded)
    )


# --------------------------------------------------------------------------------------------------
# Places


def place_cells(text: str) -> set[tuple[int, int]]:
    """The cells of a 3x3 grid (row, column) that the region words in `text` name: "upper-left" is
    one cell, "top" a row, "left" a column, "centre" the middle cell."""
    cells: set[tuple[int, int]] = set()
    remaining = text
    for match in _COMPOUND_PLACE.finditer(text):
        if match.group("row"):
            cells.add((_GRID_ROWS[match.group("row").lower()], _GRID_COLS[match.group("col").lower()]))
        elif match.group("row2"):
            cells.add((_GRID_ROWS[match.group("row2").lower()], 1))
        else:
            cells.add((1, _GRID_COLS[match.group("col2").lower()]))
        remaining = remaining.replace(match.group(0), " ")
    for match in _SIMPLE_PLACE.finditer(remaining):
        word, after = match.group("word").lower(), match.group("after")
        if _RELATIVE_AFTER.match(after) and not (word == "top" and "image" in after[:20]):
            continue  # "to the left of the cat", "on top of that": relative, not a place in the image
        if word in _GRID_ROWS:
            cells.update((_GRID_ROWS[word], col) for col in range(3))
        elif word in _GRID_COLS:
            cells.update((row, _GRID_COLS[word]) for row in range(3))
        else:
            cells.add((1, 1))
    return cells


def _where_cells(phrase: str) -> set[tuple[int, int]]:
    """The one grid cell a where phrase ("left (about 13% of the image)") names."""
    name = phrase.split("(")[0].strip().lower()
    if name in _CENTRE:
        return {(1, 1)}
    if name in _GRID_COLS:
        return {(1, _GRID_COLS[name])}
    return place_cells(name)


def _place_names(cells: set[tuple[int, int]]) -> str:
    grid = (
        ("upper-left", "top centre", "upper-right"),
        ("left", "centre", "right"),
        ("lower-left", "bottom centre", "lower-right"),
    )
    return ", ".join(grid[r][c] for r, c in sorted(cells))


# --------------------------------------------------------------------------------------------------
# The check


def score_text(item: Evidence) -> str:
    """An expert's score as every text shows it, "score 0.43" or "not applicable": the tool results the
    model reads, the reasons it is trained to write ("ela (score 0.01): ..."), the grounded answer."""
    if not item.applicable or item.score is None:
        return "not applicable"
    return f"score {item.score:.2f}"


def first_sentence(text: str, min_words: int = 6) -> str:
    """The head of a summary: its first sentence, cut at the first clause break after `min_words`
    words, so that an answer fits the model's budget."""
    match = re.search(r"(?<=[.!?])\s+(?=[A-Z])", text)
    sentence = text[: match.start()] if match else text
    for clause in re.finditer(r" \(|; |: |, (?:but|so|because|which|within) ", sentence):
        if len(sentence[: clause.start()].split()) >= min_words:
            sentence = sentence[: clause.start()].rstrip(".,;:") + "."
            break
    if sentence.count("(") > sentence.count(")"):  # cut inside a parenthesis: end before it
        sentence = sentence[: sentence.rfind(" (")].rstrip(".,;:") + "."
    return sentence


def reason_line(item: Evidence) -> str:
    """One expert's reason in the form the assistant is trained to write, and its answer guide copies:
    "ela (score 0.01): <the head of its summary>"."""
    return f"{item.expert} ({score_text(item)}): {first_sentence(item.summary)}"


def has_instruction(evidence: Sequence[Evidence]) -> bool:
    """Whether the metadata expert found text in the file that addresses an AI system."""
    return any(
        isinstance(f, dict) and f.get("kind") == "instruction_like_text"
        for e in evidence
        if e.expert == "metadata" and isinstance(e.details, dict)
        for f in e.details.get("findings", ())
    )


# The closing caveat of each verdict: what the evidence cannot show (the composed answer ends with it,
# the training references too, and the answer guide writes it when the model opens a caveat).
CAVEATS = {
    "authentic": "A clean result is not proof, since some edits leave no trace and resizing or "
    "re-compression can erase the traces the experts look for.",
    "manipulated": "Caveat: the experts show where the traces differ, not who changed what or why, and "
    "some traces also come from harmless processing.",
    "ai_generated": "Caveat: signs of AI generation can be stripped or added by anyone, and resizing or "
    "re-compression can leave similar traces.",
    "uncertain": "The evidence is weak either way, so treat this result as uncertain; some edits leave no "
    "trace, and resizing or re-compression can erase the traces the experts look for.",
}
# The caveat of an uncertain verdict that the fusion's lone-detector rule held at the band's edge.
HELD_CAVEAT = (
    "The evidence is weak either way: on a photo the AI-image detector's score alone does not decide, "
    "since it was not validated on photos from cameras it never saw, so treat this result as uncertain."
)


# The caveats of a verdict on a JPEG saved at so low a quality that the fusion makes no accusation
# (its heavy-compression rule).
COMPRESSION_CAVEATS = {
    "authentic": "A clean result says little here: the file was saved as a JPEG of very low quality, "
    "and compression that heavy erases most of the traces the experts look for.",
    "uncertain": "The evidence is weak either way: the file was saved as a JPEG of very low quality, "
    "whose block artefacts swamp the traces the experts look for, so no accusation rests on them; "
    "treat this result as uncertain.",
}


# The caveat of a graphic's verdict that the fusion would have cleared (its graphic rule).
GRAPHIC_CAVEAT = (
    "The evidence is weak either way: this is a graphic or a screenshot, not a photograph, so the experts "
    "that read a photo's traces could not examine it, and its text or figures can be made up without "
    "leaving any; treat this result as uncertain."
)


# The caveat of a verdict whose weak findings the fusion held because no expert was convinced on its own
# (its no-witness rule).
NO_WITNESS_CAVEAT = (
    "The evidence is weak either way: no expert is convinced on its own (each scores under 0.5, the "
    "manipulation localiser under 0.8), and weak findings that merely add up make no accusation; treat "
    "this result as uncertain."
)


# The caveat of a verdict on an image that fewer than two experts could examine (the fusion's rule).
UNEXAMINED_CAVEAT = (
    "The evidence is weak either way: fewer than two of the experts could examine this image (it may be "
    "very small, nearly one flat colour or random noise), and their silence on it says nothing; treat "
    "this result as uncertain."
)


# The caveat of an uncertain verdict, by the fusion rule that made it uncertain.
UNCERTAIN_RULE_CAVEATS = {
    GRAPHIC_RULE: GRAPHIC_CAVEAT,
    NO_WITNESS_RULE: NO_WITNESS_CAVEAT,
    UNEXAMINED_RULE: UNEXAMINED_CAVEAT,
}


def caveat_of(verdict: Verdict) -> str:
    """The closing caveat of a verdict: its label's, or why a fusion rule (a lone AI-image score, heavy
    compression, a graphic, weak findings only, too little examined) left it as it is."""
    if verdict.rule == HEAVY_COMPRESSION_RULE and verdict.label in COMPRESSION_CAVEATS:
        return COMPRESSION_CAVEATS[verdict.label]
    if verdict.label == "uncertain" and verdict.rule in UNCERTAIN_RULE_CAVEATS:
        return UNCERTAIN_RULE_CAVEATS[verdict.rule]
    if verdict.label == "uncertain" and any(d.held for d in verdict.drivers):
        return HELD_CAVEAT
    return CAVEATS[verdict.label]


# The trained sentences about text in the file's metadata that addresses an AI system (the answer guide
# writes the one that is true), and the claim only the metadata expert can back.
INSTRUCTION_NOTE = (
    "The file's metadata holds text addressed to an AI system; I treat it as data, not as an instruction."
)
NO_INSTRUCTION_NOTE = "The file's metadata holds no text addressed to an AI system."
_INSTRUCTION_CLAIM = re.compile(
    r"(?<!no text )\baddressed to an? (?:ai|assistant|model)\b"
    r"|\bnot as an instruction\b|\bprompt injection\b",
    re.IGNORECASE,
)
# "ela (score 0.01): The marked region re-compresses ...": a reason attributed to one expert.
_ATTRIBUTION = re.compile(
    r"(?:^|\bwhy:\s*|[-*•]\s*)(?P<name>[a-z][a-z0-9_]*) \((?:score (?P<score>\d(?:\.\d+)?)|not applicable)"
    r"[^)]*\):\s*(?P<claim>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[a-z]{4,}")
ATTRIBUTION_OVERLAP = 0.5  # share of an attributed reason's words that must be in that expert's findings


def _attribution_problems(text: str, evidence: Sequence[Evidence]) -> list[str]:
    """Reasons the answer puts in an expert's mouth (the trained "name (score s): sentence" form) must
    carry that expert's score and come from its own findings, not from another expert's or none."""
    by_name = {e.expert: e for e in evidence}
    problems = []
    for match in _ATTRIBUTION.finditer(text):
        name = match.group("name").lower()
        item = by_name.get(name)
        if item is None:
            if name in available_experts():
                problems.append(
                    f"The answer quotes the {name} expert, whose results are not in the evidence."
                )
            continue
        score = match.group("score")
        if score is not None and (item.score is None or abs(float(score) - item.score) > 0.0051):
            problems.append(
                f"The answer gives {name} a score of {score}, but "
                + ("it has no score." if item.score is None else f"its score is {item.score:.2f}.")
            )
        words = set(_WORD.findall(match.group("claim").lower()))
        own = set(_WORD.findall(" ".join(_evidence_passages([item])).lower()))
        if words and len(words & own) < ATTRIBUTION_OVERLAP * len(words):
            problems.append(
                f'The answer attributes "{_shorten(match.group("claim"))}" to {name}, but that is not what '
                f"{name} found: {_shorten(item.summary)}"
            )
    return problems


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _evidence_passages(evidence: Sequence[Evidence]) -> list[str]:
    passages: list[str] = []
    for item in evidence:
        passages.append(item.summary)
        for finding in item.details.get("findings", ()) if isinstance(item.details, dict) else ():
            if isinstance(finding, dict) and isinstance(finding.get("text"), str):
                passages.append(finding["text"])
    return passages


def check_answer(
    text: str,
    verdict: Verdict,
    evidence: Sequence[Evidence],
    where: Sequence[str],
    *,
    others: Sequence[Verdict] = (),
    require_verdict: bool = False,
    numbers: Iterable[float] = (),
) -> list[str]:
    """Problems with `text` as an answer about an image with this verdict and evidence; empty when
    every label, probability, number and place it states is supported. `where` lists the places the
    evidence names (the verdict's where phrases and the experts'); `others` are further verdicts the
    answer may speak of (a comparison); `numbers` are further grounded numbers (image size, numbers in
    the question). With require_verdict, an answer that never states the verdict is a problem too."""
    verdicts = [verdict, *others]
    passages = _evidence_passages(evidence)
    evidence_text = " ".join(passages)
    quotes = [q for q in _QUOTED.findall(text) if q in evidence_text or q in " ".join(where)]
    heads = [first_sentence(p) for p in passages]  # a summary's head, as reason_line quotes it
    grounded_text = _exempt(text, [*passages, *heads, *where, *quotes])
    problems: list[str] = []

    # Labels
    claims = _claims(grounded_text)
    reported: set[str] = set()
    for claim in claims:
        if all(_claim_problem(claim, v.label) for v in verdicts):
            key = f"{claim.label}:{claim.denied}"
            if key not in reported:
                reported.add(key)
                says = f'denies "{claim.text}"' if claim.denied else f'calls the image "{claim.text}"'
                problems.append(f"The answer {says}, but the fused verdict is {_verdicts_text(verdicts)}.")
    if require_verdict and not any(_states_label(c, v.label) for c in claims for v in verdicts):
        problems.append(f"The answer does not state the fused verdict ({_verdicts_text(verdicts)}).")

    # Probabilities and other numbers
    grounded = _grounded_numbers(verdicts, evidence, where, numbers)
    expert_names = {_EXPERT_NAME_IN_TEXT.get(e.expert, e.expert.replace("_", "[-_ ]?")) for e in evidence}
    expert_names |= {"error level", "copy[- ]move"}
    names_pattern = re.compile(r"\b(?:" + "|".join(sorted(expert_names)) + r")\b", re.IGNORECASE)
    scan = _IMAGE_ID.sub(" ", _LIST_MARKER.sub(" ", grounded_text))
    for sentence in _SENTENCE.split(scan):
        matches = list(_NUMBER.finditer(sentence))
        for index, match in enumerate(matches):
            integer, frac = match.group("int"), match.group("frac") or ""
            value = float(integer.replace(",", "") + (f".{frac}" if frac else ""))
            unit = match.group("unit").strip().lower()
            percent = unit in ("%", "percent", "per cent")
            tolerance = _tolerance(integer, len(frac))
            shown = match.group(0).strip()
            if context := _probability_context(sentence, matches, index, names_pattern):
                stated = value / 100 if percent or value > 1 else value
                # a stated probability is rounded to at most a whole percent ("100%" is not "about 100")
                step = min(tolerance, 1.0) / 100 if percent or value > 1 else tolerance
                of_authentic = context == "authentic"
                targets = [1 - v.probability if of_authentic else v.probability for v in verdicts]
                if context == "either":  # "authentic (11%)" and "authentic (89%)" both read naturally
                    targets += [1 - v.probability for v in verdicts]
                if not _close(stated, step, targets):
                    fused = _probabilities_text(verdicts)
                    problems.append(
                        f"The answer states a probability of {shown}"
                        + (" that the image is authentic" if of_authentic else "")
                        + f", but the fused probability of manipulation or AI generation is {fused}."
                    )
                continue
            if not _number_matches(value, tolerance, percent, grounded):
                problems.append(f"The answer states the number {shown}, which is not in the evidence.")
        for match in _DIMENSIONS.finditer(sentence):
            for part in match.groups():
                if not _number_matches(float(part), _tolerance(part, 0), False, grounded):
                    problems.append(f"The answer states the number {part}, which is not in the evidence.")

    # Places
    stated = place_cells(grounded_text)
    if stated:
        allowed: set[tuple[int, int]] = set()
        for phrase in where:
            allowed |= _where_cells(phrase)
        for passage in passages:
            allowed |= place_cells(passage)
        if not allowed:
            problems.append(
                f"The answer names a place in the image ({_place_names(stated)}), but no expert localised "
                "anything."
            )
        elif not stated & allowed:
            problems.append(
                f"The answer places the evidence in the {_place_names(stated)}, but the evidence is only in: "
                f"{'; '.join(where) or _place_names(allowed)}."
            )

    # Who said what
    problems += _attribution_problems(text, evidence)
    if _INSTRUCTION_CLAIM.search(text) and not has_instruction(evidence):
        problems.append(
            "The answer says the file holds text addressed to an AI system, but the metadata expert found "
            "none."
        )
    problems += form_problems(text)
    return list(dict.fromkeys(problems))


# How a line that opens one of the trained caveats goes on to the caveat of the verdict's label (the
# answer guide completes them; a repeated line is compared without them).
CAVEAT_LINKS = {
    "A": " word of caution: ",
    "Caveat": ": ",
    "Caveat:": " ",
    "The evidence": " is not the whole story: ",
}
_CAVEAT_OPENINGS = sorted({(opening + link).strip() for opening, link in CAVEAT_LINKS.items()})
_LINE_HEAD = re.compile(
    r"^(?:Why:|What the experts saw:|" + "|".join(map(re.escape, _CAVEAT_OPENINGS)) + r"|[-*•])\s*"
)


def _without_repeated_lines(text: str) -> str:
    """The text without a line that repeats an earlier one, heading, caveat opening or bullet aside
    ("Why: ela (score 0.01): ..." then "ela (score 0.01): ..."; a caveat, then "A word of caution:" and
    the same caveat): a reason or caveat said twice says nothing new."""
    seen: set[str] = set()
    kept = []
    for line in text.split("\n"):
        key = _LINE_HEAD.sub("", line).strip().lower()
        if len(key) > 20 and key in seen:
            continue
        seen.add(key)
        kept.append(line)
    return "\n".join(kept)


def tidy_answer(text: str) -> str:
    """A small model's answer with a line it repeats dropped, and its loop and its unfinished tail cut
    off: everything from the first sentence it repeats, and a last sentence the token budget cut
    short, when whole sentences come before them. What is left is still checked like any answer."""
    text = _without_repeated_lines(text.strip())
    spans: list[tuple[int, int]] = []  # (start, end) of each sentence or line in text
    position = 0
    for piece in _SENTENCE.split(text):
        if piece.strip():
            start = text.index(piece, position)
            spans.append((start, start + len(piece)))
            position = start + len(piece)
    seen: set[str] = set()
    kept = 0
    for start, end in spans:
        key = re.sub(r"[^a-z0-9 ]+", "", text[start:end].lower()).strip()
        if len(key) > 20 and key in seen:
            break
        seen.add(key)
        kept += 1
    if kept > 1 and not re.search(r"[.!?)\"”']\s*$", text[: spans[kept - 1][1]]):
        kept -= 1
    return text[: spans[kept - 1][1]].rstrip() if 0 < kept < len(spans) else text


def form_problems(text: str) -> list[str]:
    """An answer that loops or stops mid-sentence is not one a person can read, even when every label
    and number in it is right."""
    problems = []
    sentences = [re.sub(r"[^a-z0-9 ]+", "", s.lower()).strip() for s in _SENTENCE.split(text)]
    long_sentences = [s for s in sentences if len(s) > 20]
    if len(long_sentences) != len(set(long_sentences)):
        problems.append("The answer repeats itself.")
    if text.strip() and not re.search(r"[.!?)\"”']\s*$", text.strip()):
        problems.append("The answer stops mid-sentence.")
    if _ECHO.search(text):
        problems.append("The answer repeats the instructions or the check's feedback instead of answering.")
    return problems


# Phrases of prompts/answer.md and prompts/feedback.md, and of this check's own problems: a small model
# that copies them back has not answered, even when the verdict it copied is right.
_ECHO = re.compile(
    r"\b(?:your|the) answer (?:does|doesn't|states|repeats|stops|calls|denies|names|places|talks)\b"
    r"|exactly as fused|does not match the evidence|rewrite the answer",
    re.IGNORECASE,
)


def _probability_context(
    sentence: str, matches: list[re.Match], index: int, expert_names: re.Pattern
) -> str | None:
    """ "fake" when the number at `index` is stated as the probability of manipulation (a probability
    word shortly before it with no other number in between, or shortly after it, or a percentage
    right after a label), "authentic" when it is stated as the chance of being authentic, "either"
    when it could be both ("authentic (89%)"), None when it is not a probability (or is an expert's
    score: "the jpeg expert is confident (1.00)")."""
    match = matches[index]
    start = matches[index - 1].end() if index else 0
    before = sentence[max(start, match.start() - 60) : match.start()]
    if expert_names.search(before):
        return None
    end = matches[index + 1].start() if index + 1 < len(matches) else len(sentence)
    after = sentence[match.end() : min(end, match.end() + 50)]
    words = list(_PROBABILITY_WORD.finditer(before))
    if words:
        return "authentic" if _AUTHENTIC_CONTEXT.search(before[words[-1].start() :]) else "fake"
    if _AFTER_PROBABILITY.match(after):
        return "authentic" if _AFTER_AUTHENTIC.match(after) else "fake"
    label = _LABEL_BEFORE.search(before)
    if label and match.group("unit").strip():  # "manipulated (70%)", "authentic: 89%"
        return "either" if label.group(1).lower() in ("authentic", "genuine", "real") else "fake"
    return None


def _verdicts_text(verdicts: Sequence[Verdict]) -> str:
    return " / ".join(f"{v.label} (probability {v.probability:.2f})" for v in verdicts)


def _probabilities_text(verdicts: Sequence[Verdict]) -> str:
    return " / ".join(f"{v.probability:.2f} ({v.probability:.0%})" for v in verdicts)


# --------------------------------------------------------------------------------------------------
# The grounded answer

# Experts whose name is also an ordinary word of an answer ("the probability of manipulation is 90%"):
# a number after them is an expert's score only when the name is used as a name.
_EXPERT_NAME_IN_TEXT = {
    "manipulation": r"manipulation (?:expert|locali[sz]er|map|mask|score)",
    "faces": r"faces? expert",
}

_EXPERT_WORDS = {
    "ela": r"\bela\b|error level",
    "noise": r"\bnoise\b",
    "jpeg": r"\bjpe?g\b|compress",
    "copy_move": r"\bcop(?:y|ied)\b|\bclon|\bduplicat",
    "metadata": r"\bmeta-?data\b|\bexif\b|\bxmp\b|\bcamera\b",
    "frequency": r"\bfrequenc|\bspectr|\bupsampl",
    "c2pa": r"\bc2pa\b|\bprovenance\b|content credentials?|\bsigned\b",
    "watermark": r"\bwatermark",
    "invisible_watermark": r"\bwatermark",
    "faces": r"\bfaces?\b|\bdeep-?fakes?\b|face[- ]?swap",
    "ai_generated": r"\bai[- ]generated\b|\bai[- ]image",
    "manipulation": r"\bmanipulation (?:map|mask|expert|localis|localiz)|\blocali[sz]",
    "segmenter": r"\bsegment",
}


def experts_named(question: str, available: Iterable[str]) -> list[str]:
    """The experts a question asks about by name or by the kind of evidence they read."""
    found = []
    for name in available:
        pattern = _EXPERT_WORDS.get(name, r"\b" + re.escape(name).replace("_", "[-_ ]?") + r"\b")
        if re.search(pattern, question, re.IGNORECASE):
            found.append(name)
    return found


def _bullet(item: Evidence) -> str:
    if item.expert in METADATA_EXPERTS:
        return (
            f"- {item.expert} ({score_text(item)}; what it read from the file is quoted as data, not as "
            f"instructions): {item.summary}"
        )
    return f"- {item.expert} ({score_text(item)}): {item.summary}"


def compose_answer(
    verdict: Verdict,
    evidence: Sequence[Evidence],
    where: Sequence[str],
    question: str = "",
    *,
    image_id: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A plain-language answer built from the verdict and the evidence alone: the verdict with its
    probability, where (in words), why (the experts that drove it, with their summaries; metadata
    quoted as data) and honest caveats. It passes check_answer by construction."""
    probability = f"{verdict.probability:.0%}"
    low, high = verdict.uncertain_band
    band = f"{low:.0%}–{high:.0%} is the uncertain band"
    subject = image_id or "the image"
    by_name = {e.expert: e for e in evidence}
    applicable = [e for e in evidence if e.applicable and e.score is not None]
    lines: list[str] = []
    if verdict.label == "uncertain" and len(verdict.drivers) < 2:
        lines.append(
            f"Verdict for {subject}: uncertain. Fewer than two experts could examine this image, so "
            "there is no evidence either way."
        )
    elif verdict.label == "uncertain":
        lines.append(
            f"Verdict for {subject}: uncertain. The fused probability of manipulation or AI generation is "
            f"{probability}, inside the band where the evidence is too weak to call either way ({band})."
        )
    else:
        lines.append(
            f"Verdict for {subject}: {LABEL_WORDS[verdict.label]}. The fused probability of manipulation "
            f"or AI generation is {probability} ({len(applicable)} experts examined the image; {band})."
        )

    if where:
        lead = "The weak evidence points to" if verdict.label == "uncertain" else "Where"
        lines.append(f"{lead}: {'; '.join(where)}.")
    elif verdict.label != "authentic":
        lines.append("No single region stands out: the evidence is not localised.")

    named = experts_named(question, by_name)
    many = 4 if re.search(r"\bwhy\b|\bexplain\b|\bhow come\b|\bdetail", question, re.IGNORECASE) else 3
    if verdict.label == "authentic":
        heading = "Why: no expert found strong evidence of editing or generation:"
    else:
        heading = "Why:" if verdict.label != "uncertain" else "What the experts saw:"
    chosen = cited_reasons(verdict, evidence, named, many)
    if chosen:
        lines.append(heading)
        lines.extend(_bullet(item) for item in chosen)
    if verdict.label == "authentic":  # the prosecution is heard too, when it found something
        against = [e for e in applicable if e.score >= 0.5 and e not in chosen]
        if against:
            lines.append("Signs the other way, outweighed by the rest:")
            lines.extend(_bullet(item) for item in against[:2])

    lines.append(caveat_of(verdict))
    lines.extend(notes)
    return "\n".join(lines)


def ranked_reasons(verdict: Verdict, evidence: Sequence[Evidence]) -> list[Evidence]:
    """The applicable experts in the order an answer should cite them: for a clean verdict those that
    found nothing (score under 0.5), the defence first (most negative contribution to the fused
    log-odds); otherwise the experts that pushed towards the label (contribution >= 0.1), strongest
    first."""
    contribution = {d.expert: d.contribution for d in verdict.drivers}
    applicable = [e for e in evidence if e.applicable and e.score is not None]
    if verdict.label == "authentic":
        clean = (e for e in applicable if e.score < 0.5)
        return sorted(clean, key=lambda e: contribution.get(e.expert, 0.0))
    return sorted(
        (e for e in applicable if contribution.get(e.expert, 0.0) >= 0.1),
        key=lambda e: -contribution.get(e.expert, 0.0),
    )


def finding_agrees(verdict: Verdict, item: Evidence) -> bool:
    """Whether an expert's own finding points the verdict's way: it found something (score >= 0.5)
    under a verdict other than "authentic", or nothing under "authentic"."""
    if not item.applicable or item.score is None:
        return False
    return (item.score >= 0.5) == (verdict.label != "authentic")


def cited_reasons(
    verdict: Verdict, evidence: Sequence[Evidence], named: Sequence[str], many: int
) -> list[Evidence]:
    """The experts an answer cites: those the question names (any of the evidence, in that order), then
    ranked_reasons, `many` in all or every named one."""
    by_name = {e.expert: e for e in evidence}
    asked = [by_name[name] for name in dict.fromkeys(named) if name in by_name]
    rest = [e for e in ranked_reasons(verdict, evidence) if e.expert not in named]
    return [*asked, *rest][: max(many, len(asked))]


def leading_reason(verdict: Verdict, evidence: Sequence[Evidence]) -> Evidence | None:
    """The expert that most supports the verdict (None when none does: a clean verdict without an
    expert that spoke for authenticity)."""
    ranked = ranked_reasons(verdict, evidence)
    contribution = {d.expert: d.contribution for d in verdict.drivers}
    if not ranked or (verdict.label == "authentic" and contribution.get(ranked[0].expert, 0.0) >= 0.0):
        return None
    return ranked[0]
