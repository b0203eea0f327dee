"""The runtime exit policy: static thresholds (score >= threshold leaves) and the deadline override."""

from __future__ import annotations

import numpy as np
import pytest

from distree.compiler.manifest import SCORE_DEFINITIONS, ThresholdEntry, ThresholdTable
from distree.exits import exit_scores
from distree.runtime.policy import ExitPolicy


def _policy(threshold: float, kind: str = "max_softmax") -> ExitPolicy:
    table = ThresholdTable(score_kind=kind, score_definition=SCORE_DEFINITIONS[kind],
                           exits=(ThresholdEntry(name="exit_1", after_block=2, device="pi4", threshold=threshold),))
    return ExitPolicy(table)


LOGITS = np.array([[2.0, 0.5, -1.0]], dtype=np.float32)


@pytest.mark.parametrize("kind", ["max_softmax", "entropy"])
def test_score_is_the_calibration_score(kind):
    assert _policy(0.0, kind).score(LOGITS)[0] == exit_scores(LOGITS, kind)[0]


def test_threshold_is_inclusive():
    score = float(exit_scores(LOGITS, "max_softmax")[0])
    assert _policy(score).decide("exit_1", LOGITS).leave
    d = _policy(np.nextafter(score, 1.0)).decide("exit_1", LOGITS)
    assert not d.leave and d.reason == "continue" and d.score == score


def test_deadline_override_leaves_only_when_the_rest_would_be_late():
    policy = _policy(0.99)
    on_time = policy.decide("exit_1", LOGITS, elapsed_ms=3.0, remaining_ms=5.0, deadline_ms=10.0)
    late = policy.decide("exit_1", LOGITS, elapsed_ms=6.0, remaining_ms=5.0, deadline_ms=10.0)
    assert not on_time.leave
    assert late.leave and late.reason == "deadline"
    confident = _policy(0.1).decide("exit_1", LOGITS, elapsed_ms=6.0, remaining_ms=5.0, deadline_ms=10.0)
    assert confident.reason == "threshold"
