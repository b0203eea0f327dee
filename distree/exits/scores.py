"""Exit scores: the ONE function calibration and the runtime both call, so the numbers agree.

All kinds are oriented "higher = more confident"; a sample leaves an exit when its score >= threshold.
With ``p = softmax(exit logits)`` and ``c = argmax p``:

- ``max_softmax``: ``p[c]``, in (0, 1].
- ``entropy``: ``sum_k p[k] log p[k]`` (negative entropy, nats), in [-log K, 0].
- ``stability``: ``min(p[c], q[c])`` where ``q = softmax(entry logits)`` is the prediction of the exit's
  entry head, a light head on the *input* of the exit's block (the previous cut). It is high only when the
  prediction is stable across the block: both heads put mass on the same class. It equals 1 - the largest
  possible divergence on class c, so a disagreement (``q[c]`` small) or an unsure exit (``p[c]`` small)
  keeps the sample in. This is the feature-difference idea of DistrEE (exit when one more block no longer
  changes what the features say) expressed through the two heads' predictions, so that channel counts
  may differ across the block. The score depends only on the sample, and both heads read tensors that
  live on the device running the block, so the runtime can compute it wherever the exit is placed.
"""

from __future__ import annotations

import numpy as np

from distree.errors import DistreeError
from distree.exits.types import SCORE_KINDS


# the highest score of each kind; a threshold above it lets no sample leave: an exit kept "off" in a bundle whose
# segment still computes its head (`distree retune`)
HIGHEST_SCORE = {"max_softmax": 1.0, "entropy": 0.0, "stability": 1.0}


def never_threshold(score_kind: str) -> float:
    """A threshold no score of ``score_kind`` reaches."""
    check_score_kind(score_kind)
    return HIGHEST_SCORE[score_kind] + 1.0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable: max subtracted)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_score_kind(score_kind: str) -> None:
    if score_kind not in SCORE_KINDS:
        raise DistreeError(f"unknown score kind {score_kind!r}; use one of {', '.join(SCORE_KINDS)}")


def exit_scores(logits: np.ndarray, score_kind: str, entry_logits: np.ndarray | None = None) -> np.ndarray:
    """Per-sample scores (N,) float64 of one exit from its logits (N, K); see the module docstring."""
    check_score_kind(score_kind)
    logits = np.asarray(logits).reshape(len(logits), -1)
    p = softmax(logits)
    if score_kind == "max_softmax":
        return p.max(axis=1)
    if score_kind == "entropy":
        return (p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    if entry_logits is None:
        raise DistreeError("the stability score needs the exit's entry head; attach it with `distree exits "
                           "model.onnx --data calib.npz -o model_exits.onnx` and calibrate that model")
    q = softmax(np.asarray(entry_logits).reshape(len(entry_logits), -1))
    c = p.argmax(axis=1)
    rows = np.arange(len(p))
    return np.minimum(p[rows, c], q[rows, c])


def predictions(logits: np.ndarray) -> np.ndarray:
    """Predicted class per sample (N,) int64."""
    return np.asarray(logits).reshape(len(logits), -1).argmax(axis=1).astype(np.int64)
