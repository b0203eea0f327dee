"""Exit points and the calibration record that the solver's accuracy promise rests on."""

from __future__ import annotations

from dataclasses import dataclass

from distree.serde import JsonRecord

SCORE_KINDS = ("max_softmax", "entropy", "stability")


@dataclass(frozen=True)
class ExitPoint(JsonRecord):
    """An exit head reading the cut tensor after block ``after_block``; its logits are graph output ``name``."""

    name: str
    after_block: int
    source: str                     # "model" (declared in the ONNX) or "trained" (attached by distree)
    head_nodes: tuple[str, ...]
    flops: int
    param_bytes: int


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
