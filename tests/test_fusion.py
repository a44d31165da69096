from __future__ import annotations

import numpy as np
import pytest

from experts.base import Evidence
from experts.fusion import fuse

SHAPE = (20, 30)


def evidence(name: str, score: float | None, mask: np.ndarray | None = None, **details) -> Evidence:
    return Evidence(name, score, score is not None, f"{name} says {score}", mask=mask, details=details)


def test_too_little_evidence_is_uncertain_not_authentic():
    verdict = fuse([evidence("ela", None)], SHAPE)
    assert verdict.label == "uncertain" and verdict.probability == 0.5 and verdict.mask is None
    verdict = fuse([evidence("ela", None), evidence("metadata", 0.0)], SHAPE)
    assert verdict.label == "uncertain" and verdict.probability == 0.5


def test_strong_evidence_from_one_expert_still_counts():
    verdict = fuse([evidence("ela", None), evidence("metadata", 0.95, indicates="ai_generated")], SHAPE)
    assert verdict.label == "ai_generated"


def test_nothing_found_by_several_experts_is_authentic():
    verdict = fuse([evidence("ela", 0.0), evidence("noise", 0.05), evidence("jpeg", 0.0)], SHAPE)
    assert verdict.label == "authentic" and verdict.probability < 0.35


def test_weak_evidence_stays_authentic_or_uncertain_never_manipulated():
    verdict = fuse([evidence("ela", 0.3), evidence("noise", 0.3)], SHAPE)
    assert verdict.label in ("authentic", "uncertain")


def test_probability_is_noisy_or_of_weighted_scores():
    verdict = fuse([evidence("a", 0.8), evidence("b", 0.6)], SHAPE, weights={"a": 1.0, "b": 0.5})
    assert verdict.probability == pytest.approx(1 - (1 - 0.8) * (1 - 0.3), abs=1e-4)
    assert [d.expert for d in verdict.drivers] == ["a", "b"]


def test_uncertain_band():
    verdict = fuse([evidence("a", 0.5)], SHAPE, weights={"a": 1.0})
    assert verdict.label == "uncertain" and verdict.uncertain_band == (0.35, 0.65)


def test_strong_localised_evidence_gives_manipulated_with_the_mask():
    mask = np.zeros(SHAPE, bool)
    mask[2:8, 3:9] = True
    verdict = fuse([evidence("copy_move", 0.95, mask), evidence("ela", 0.2, ~mask)], SHAPE)
    assert verdict.label == "manipulated"
    assert np.array_equal(verdict.mask, mask)  # ela's low-score mask does not join


def test_generator_signature_gives_ai_generated():
    verdict = fuse([evidence("metadata", 0.95, indicates="ai_generated"), evidence("ela", 0.2)], SHAPE)
    assert verdict.label == "ai_generated"


def test_proof_of_integrity_lowers_suspicion_but_cannot_erase_strong_evidence():
    base = [evidence("ela", 0.6), evidence("noise", 0.4)]
    plain = fuse(base, SHAPE, weights={"ela": 1.0, "noise": 1.0})
    signed = fuse(
        [*base, evidence("c2pa", 0.05, supports_authentic=True)],
        SHAPE,
        weights={"ela": 1.0, "noise": 1.0, "c2pa": 1.0},
    )
    assert signed.probability == pytest.approx(plain.probability * (1 - 0.5 * 0.95), abs=1e-4)
    assert "c2pa" in [d.expert for d in signed.drivers]
    strong = fuse(
        [evidence("copy_move", 1.0), evidence("ela", 0.9), evidence("c2pa", 0.0, supports_authentic=True)],
        SHAPE,
        weights={"copy_move": 1.0, "ela": 1.0, "c2pa": 1.0},
    )
    assert strong.label == "uncertain" and strong.probability == 0.5
