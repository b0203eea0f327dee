"""The exit policy: the static threshold table, with an optional per-request deadline override (DESIGN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from distree.compiler.manifest import ThresholdTable
from distree.exits import exit_scores


@dataclass(frozen=True)
class Decision:
    leave: bool
    reason: str                     # "threshold", "deadline" or "continue"
    score: float


@dataclass(frozen=True)
class ExitPolicy:
    """Leave at exit ``name`` iff its score >= its threshold (scores as in calibration: ``exit_scores``).

    With a deadline, a stage that predicts the rest of the pipeline would finish after it answers from
    its exit now, and the decision says so (``reason == "deadline"``).
    """

    table: ThresholdTable

    def threshold(self, name: str) -> float:
        for entry in self.table.exits:
            if entry.name == name:
                return entry.threshold
        raise KeyError(name)

    def score(self, logits: np.ndarray, entry_logits: Optional[np.ndarray] = None) -> np.ndarray:
        return exit_scores(logits, self.table.score_kind, entry_logits)

    def decide(self, name: str, logits: np.ndarray, entry_logits: Optional[np.ndarray] = None, *,
               elapsed_ms: float = 0.0, remaining_ms: float = 0.0,
               deadline_ms: Optional[float] = None) -> Decision:
        """Decision for one sample (``logits`` of shape (1, K))."""
        score = float(self.score(logits, entry_logits)[0])
        if score >= self.threshold(name):
            return Decision(True, "threshold", score)
        if deadline_ms is not None and elapsed_ms + remaining_ms > deadline_ms:
            return Decision(True, "deadline", score)
        return Decision(False, "continue", score)
