"""Evidence-guided decoding: the facts in an answer are copied from the evidence while the model writes.

A small model plans and phrases well but misquotes what it read: "ai_generated (score 0.91)" where the
expert said 0.96, or one expert's finding put in another's mouth. The guide watches the reply grow,
and when the model opens a slot that only the evidence can fill, it writes the slot itself:

    "image_1 is"                                    -> " manipulated"          (the fused verdict)
    "... manipulation or AI generation is"          -> " 46%, too close to call." (the fused probability)
    "ela (" or "ela (score"                         -> "score 0.01): <ELA's summary, first sentence>"
    "Where:"                                        -> " the lower-left quarter." (the verdict's mask)
    "The file's"                                    -> " metadata holds [no] text addressed to an AI
                                                       system..." (what the metadata expert found)
    "Why:"                                          -> " ela (score 0.98): ...\nnoise (score 0.71): ..."
                                                       (the experts the question names, or those the
                                                       model called whose own finding points the
                                                       verdict's way, then those that most support
                                                       the verdict: two lines, as the reference answers
                                                       cite them; or the note on text addressed to an
                                                       AI, when the file has some)
    a line opened with "A", "Caveat" or
    "The evidence" after the first line             -> the caveat that belongs to the verdict's label

The model still decides what the answer says: whether it quotes further experts and which, whether
it points to a place, whether it adds a caveat, the wording around the slots. The answer
check runs afterwards as before. A backend feeds forced text in one forward pass, so copied text is
also faster than generated text. `Agent(guided=False)` turns the guide off (finetune.eval_assistant
--no-guide measures the model alone).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from assistant.backends.base import Guide
from assistant.grounding import (
    CAVEAT_LINKS,
    INSTRUCTION_NOTE,
    LABEL_WORDS,
    NO_INSTRUCTION_NOTE,
    caveat_of,
    cited_reasons,
    has_instruction,
    leading_reason,
    reason_line,
    score_text,
)
from experts.base import Evidence, Verdict

# Slots end where the tokenizer's next word would begin: byte-level BPE puts a space before a word, so
# "image_1 is" is the boundary, not "image_1 is ".
_VERDICT_SLOT = re.compile(r"(?:^|\n)(?:The verdict for |Verdict for )?(?P<image>image_\d+)(?: is|:)$")
_PROBABILITY_SLOT = re.compile(r"probability of manipulation or AI generation is$")
_REASON_SLOT = re.compile(
    r"(?:^|\n|Why: |What the experts saw: |[-*•] )(?P<name>[a-z][a-z0-9_]*) \((?P<typed>score)?$"
)
_WHERE_SLOT = re.compile(r"(?:^|\n)Where:$")
_NOTE_SLOT = re.compile(r"(?:^|\n|Why: |What the experts saw: )The file's$")
_WHY_SLOT = re.compile(r"(?:^|\n)(?:Why|What the experts saw):$")
# A line that opens one of the trained caveats (CAVEAT_LINKS: how it goes on to the verdict's caveat).
_CAVEAT_SLOT = re.compile(r"\n(?P<opening>A|Caveat:?|The evidence)$")
_IMAGE_ID = re.compile(r"\bimage_\d+\b")


__all__ = ["AnswerGuide", "Guide"]


class AnswerGuide:
    """The guide of one answer, from the fused verdict of each image in the turn (the first is the
    subject), the evidence about the subject and the verdict's regions in words. Without evidence (a
    comparison) only the verdict and probability slots are filled."""

    def __init__(
        self,
        verdicts: Mapping[str, Verdict],
        evidence: Sequence[Evidence] = (),
        where: Sequence[str] = (),
        focus: Sequence[str] = (),
    ) -> None:
        if not verdicts:
            raise ValueError("a guide needs the verdict of at least one image")
        self.verdicts = dict(verdicts)
        self.subject = next(iter(self.verdicts))
        self.reasons = {item.expert: item for item in evidence}
        self.where = list(where)
        self.instruction = has_instruction(evidence)
        self.focus = [name for name in focus if name in self.reasons]  # asked about, or called and agreeing

    def __call__(self, text: str) -> str | None:
        if match := _VERDICT_SLOT.search(text):
            verdict = self.verdicts.get(match.group("image"))
            return None if verdict is None else " " + LABEL_WORDS[verdict.label]
        if _PROBABILITY_SLOT.search(text):
            verdict = self._verdict_in(text)
            close = ", too close to call" if verdict.label == "uncertain" else ""
            return f" {verdict.probability:.0%}{close}."
        if match := _REASON_SLOT.search(text):
            return self._reason(match.group("name"), typed=bool(match.group("typed")))
        if _WHERE_SLOT.search(text):
            return f" {'; '.join(self.where)}." if self.where else " no single region stands out."
        if _WHY_SLOT.search(text) and self.reasons:
            return self._first_reasons(text)
        if (match := _CAVEAT_SLOT.search(text)) and self.reasons:
            return _caveat(match.group("opening"), caveat_of(self._verdict_in(text)))
        if _NOTE_SLOT.search(text) and self.reasons:  # the note on instructions in the metadata: the true one
            note = INSTRUCTION_NOTE if self.instruction else NO_INSTRUCTION_NOTE + "\n"
            return note.removeprefix("The file's")
        return None

    def _verdict_in(self, text: str) -> Verdict:
        """The verdict of the image the sentence is about: the last one the reply names."""
        named = [i for i in _IMAGE_ID.findall(text) if i in self.verdicts]
        return self.verdicts[named[-1] if named else self.subject]

    def _first_reasons(self, text: str) -> str | None:
        """The note on text addressed to an AI in the metadata when there is some; else `focus` (asked
        about, or called with a finding that points the verdict's way), then the experts that most
        support the verdict, two lines in all (every expert in focus, when more are); None when no
        expert is in focus or speaks for the verdict."""
        if self.instruction:
            return " " + INSTRUCTION_NOTE
        verdict, evidence = self._verdict_in(text), list(self.reasons.values())
        if not self.focus and leading_reason(verdict, evidence) is None:
            return None
        return " " + "\n".join(reason_line(item) for item in cited_reasons(verdict, evidence, self.focus, 2))

    def _reason(self, name: str, typed: bool) -> str | None:
        item = self.reasons.get(name)
        if item is None or (typed and score_text(item) == "not applicable"):
            return None  # not an expert of this turn: the model's own text, and the check reads it
        completion = reason_line(item).removeprefix(f"{name} (")
        return completion.removeprefix("score") if typed else completion


def _caveat(opening: str, caveat: str) -> str:
    """The rest of a caveat line the model opened with `opening`: the verdict's caveat itself when it
    starts that way, else the opening linked to it ("A word of caution: the experts show ...")."""
    if caveat.startswith(opening):
        return caveat.removeprefix(opening)
    body = caveat.removeprefix("Caveat: ")
    return CAVEAT_LINKS[opening] + body[0].lower() + body[1:]
