"""Exit points and the calibration record that the solver's accuracy promise rests on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distree.serde import JsonRecord

SCORE_KINDS = ("max_softmax", "entropy", "stability")
HEAD_KINDS = ("auto", "linear", "conv")   # trained heads: auto picks conv heads for wide maps, else linear
DEFAULT_LEVELS = 8                         # threshold levels per exit
MAX_LEVELS = 64                            # the most the solver takes: its local search scores every level pair of two
#                                            exits at once (65^2 = 4,225 a window; at 128 levels a 10 s plan of the
#                                            example took 34 s and 11 GB)
DEFAULT_CONFIDENCE = 0.95                  # of the accuracy lower bounds (Clopper-Pearson)


@dataclass(frozen=True)
class ExitPoint(JsonRecord):
    """An exit head reading the cut tensor after block ``after_block``; its logits are graph output ``name``.

    ``entry_output`` names the logits of the *entry head*: a light head on the input of block
    ``after_block`` (the previous cut tensor). Only the ``stability`` score reads it; it is available on the
    same device as the exit, because a block's input and output cut tensors both live where the block runs.
    """

    name: str
    after_block: int
    source: str                     # "model" (declared in the ONNX) or "trained" (attached by distree)
    head_nodes: tuple[str, ...]
    flops: int
    param_bytes: int
    entry_output: str | None = None         # logits of the head on block ``after_block``'s input (stability)
    entry_nodes: tuple[str, ...] = ()       # nodes computing ``entry_output`` that ``head_nodes`` lacks
    entry_flops: int = 0                    # extra cost of the stability score at runtime
    entry_param_bytes: int = 0
    fit_accuracy: float | None = None       # trained heads: accuracy on the fifth of the fit split held out


@dataclass(frozen=True)
class Calibration(JsonRecord):
    """Per-sample behaviour of every candidate exit and the final classifier on the calibration data.

    ``scores[i][j]``: exit j's score on sample i (higher = more confident; all kinds are oriented that way).
    ``correct[i][j]``: whether exit j's prediction is right; the last column is the final classifier.
    ``thresholds[j]``: the grid of candidate thresholds for exit j, ascending; a sample leaves at exit j
    under threshold t iff ``scores[i][j] >= t``. Only the ``threshold`` split is stored here; the ``fit``
    split trained heads and the test set is used only for reports.
    """

    model_sha256: str
    score_kind: str
    exits: tuple[ExitPoint, ...]
    scores: tuple[tuple[float, ...], ...]
    correct: tuple[tuple[bool, ...], ...]
    thresholds: tuple[tuple[float, ...], ...]
    split_sizes: dict[str, int]     # e.g. {"fit": 2500, "threshold": 2500, "test": 10000}
    seed: int = 0                   # seed of the fit/threshold split
    fit_fraction: float = 0.5       # share of the calibration data the heads were fit on

    @property
    def exit_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.exits)

    @property
    def num_samples(self) -> int:
        return len(self.correct)

    def scores_array(self) -> np.ndarray:
        """(N, E) float64 scores, one column per exit (no column for the final classifier)."""
        return np.asarray(self.scores, dtype=np.float64).reshape(self.num_samples, len(self.exits))

    def correct_array(self) -> np.ndarray:
        """(N, E + 1) bool; the last column is the final classifier."""
        return np.asarray(self.correct, dtype=bool).reshape(self.num_samples, len(self.exits) + 1)

    def final_accuracy(self) -> float:
        return float(self.correct_array()[:, -1].mean())
