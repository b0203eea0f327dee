"""Calibration: how every exit and the final classifier behave on held-out data, and what that promises.

The multi-exit model runs once (batched) over the threshold split; for each sample and exit we keep the
score (:func:`~distree.exits.scores.exit_scores`) and whether the prediction is right. From these the
solver can evaluate any choice of thresholds exactly (:func:`evaluate`), with a one-sided Clopper-Pearson
lower bound on accuracy so a plan can promise accuracy at a stated confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import onnx

from distree.errors import DistreeError
from distree.exits.confidence import clopper_pearson_lower
from distree.exits.data import Dataset, check_dataset, split_fit_threshold
from distree.exits.heads import data_digest, fit_split_metadata, num_classes
from distree.exits.progress import progress_bar
from distree.exits.runner import make_runner
from distree.exits.scores import check_score_kind, exit_scores, predictions
from distree.exits.types import DEFAULT_CONFIDENCE, DEFAULT_LEVELS, MAX_LEVELS, Calibration, ExitPoint
from distree.graph import Chain

FINAL = "final"     # key of the final classifier in exit rates


@dataclass(frozen=True)
class Behaviour:
    """Per-sample scores (N, E) and correctness (N, E + 1; last column = final) on some data."""

    scores: np.ndarray
    correct: np.ndarray


def run_exits(model: onnx.ModelProto, chain: Chain, exits: Sequence[ExitPoint], data: Dataset,
              score_kind: str) -> Behaviour:
    """One batched onnxruntime pass over ``data``: every exit's score and correctness, and the final's."""
    check_score_kind(score_kind)
    check_dataset(data, "data", chain.input_shape, num_classes(model, chain))
    if score_kind == "stability":
        lacking = [e.name for e in exits if e.entry_output is None]
        if lacking:
            raise DistreeError(f"exit {lacking[0]!r} has no entry head, which the stability score needs; run "
                               "`distree exits model.onnx --data calib.npz -o model_exits.onnx` and calibrate that")
    entry = [e.entry_output for e in exits if score_kind == "stability"]
    runner = make_runner(model, [chain.output_name, *(e.name for e in exits), *entry], data.x[:2])
    logits: dict[str, list[np.ndarray]] = {name: [] for name in runner.outputs}

    def keep(_start: int, out: dict[str, np.ndarray]) -> None:
        for name, value in out.items():
            logits[name].append(value)

    with progress_bar(f"running {len(exits)} exit(s) + final, batch {runner.batch_size}", len(data)) as advance:
        runner.over(data.x, keep, advance)
    full = {k: np.concatenate(v) for k, v in logits.items()}
    scores = np.stack([exit_scores(full[e.name], score_kind,
                                   full[e.entry_output] if score_kind == "stability" else None)
                       for e in exits], axis=1) if exits else np.zeros((len(data), 0))
    correct = np.stack([predictions(full[name]) == data.y for name in (*(e.name for e in exits),
                                                                        chain.output_name)], axis=1)
    return Behaviour(scores=scores, correct=correct)


def threshold_grid(scores: np.ndarray, levels: int = DEFAULT_LEVELS) -> tuple[float, ...]:
    """Ascending distinct thresholds at the quantiles k/(levels+1), k = 1..levels, of one exit's scores.

    Level k lets about 1 - k/(levels+1) of the samples leave; ties (saturated scores) merge levels.
    """
    if not 1 <= levels <= MAX_LEVELS:
        raise DistreeError(f"--levels {levels}: give 1 to {MAX_LEVELS} threshold levels per exit, e.g. "
                           f"{DEFAULT_LEVELS} (the solver's work grows with their square)")
    q = np.arange(1, levels + 1) / (levels + 1)
    return tuple(float(t) for t in np.unique(np.quantile(scores, q, method="lower")))


def calibrate(model: onnx.ModelProto, chain: Chain, exits: Sequence[ExitPoint], data: Dataset,
              score_kind: str = "max_softmax", seed: int = 0, fit_fraction: float = 0.5,
              levels: int = DEFAULT_LEVELS, test_size: int = 0) -> Calibration:
    """Calibration on the threshold split of ``data`` (the split :func:`train_exits` did not fit on).

    ``seed`` and ``fit_fraction`` must be those the heads were trained with; ``test_size`` is only recorded
    (the test set never enters a calibration).
    """
    check_score_kind(score_kind)
    used = fit_split_metadata(model)
    if used is not None and used.data_sha256 == data_digest(data) and (used.seed, used.fit_fraction) != (
            seed, fit_fraction):
        raise DistreeError(f"the heads were fit on this data with --seed {used.seed} --fit-fraction "
                           f"{used.fit_fraction}; calibrate with the same values, or thresholds would be "
                           "estimated on samples the heads were fit on")
    fit_idx, threshold_idx = split_fit_threshold(data, fit_fraction, seed)
    b = run_exits(model, chain, exits, data.subset(threshold_idx), score_kind)
    grid = tuple(threshold_grid(b.scores[:, j], levels) for j in range(len(exits)))
    return Calibration(
        model_sha256=chain.model_sha256,
        score_kind=score_kind,
        exits=tuple(exits),
        scores=tuple(tuple(float(s) for s in row) for row in b.scores),
        correct=tuple(tuple(bool(c) for c in row) for row in b.correct),
        thresholds=grid,
        split_sizes={"fit": int(len(fit_idx)), "threshold": int(len(threshold_idx)), "test": int(test_size)},
        seed=seed,
        fit_fraction=fit_fraction,
    )


class Evaluation(NamedTuple):
    """Outcome of one threshold choice: share of samples answered at each exit (and ``final``)."""

    exit_rates: dict[str, float]
    accuracy: float
    lcb: float


def leaving_exit(scores: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """Index of the exit each sample leaves at (E = the final classifier): first enabled exit passed."""
    n, e = scores.shape
    where = np.full(n, e)
    for j in reversed(range(e)):
        if thresholds[j] is not None:
            where[scores[:, j] >= thresholds[j]] = j
    return where


def evaluate_arrays(scores: np.ndarray, correct: np.ndarray, thresholds: Sequence[float | None],
                    names: Sequence[str], confidence: float = DEFAULT_CONFIDENCE) -> Evaluation:
    """:func:`evaluate` on raw arrays (e.g. test-set behaviour)."""
    where = leaving_exit(scores, thresholds)
    n = len(where)
    answered = correct[np.arange(n), where]
    counts = np.bincount(where, minlength=len(names) + 1)
    rates = {name: float(c) / n for name, c in zip((*names, FINAL), counts)}
    hits = int(answered.sum())
    return Evaluation(rates, hits / n, clopper_pearson_lower(hits, n, confidence))


def evaluate(calibration: Calibration, thresholds_by_exit: Mapping[str, float | None],
             confidence: float = DEFAULT_CONFIDENCE) -> Evaluation:
    """Exit rates, accuracy and its lower confidence bound for one choice of thresholds.

    Exits missing from ``thresholds_by_exit`` (or mapped to None) are disabled; a sample leaves at the
    first enabled exit whose score >= its threshold, else the final classifier answers.
    """
    names = calibration.exit_names
    unknown = sorted(set(thresholds_by_exit) - set(names))
    if unknown:
        raise DistreeError(f"no exit named {unknown[0]!r} in the calibration (exits: {', '.join(names)})")
    thresholds = [thresholds_by_exit.get(name) for name in names]
    return evaluate_arrays(calibration.scores_array(), calibration.correct_array(), thresholds, names, confidence)


@dataclass(frozen=True)
class CurvePoint:
    """Exit j alone at threshold t: share of samples with score >= t, their accuracy and its LCB."""

    level: int
    threshold: float
    exit_rate: float
    accuracy: float
    lcb: float


def exit_curve(scores: np.ndarray, correct: np.ndarray, grid: Sequence[float],
               confidence: float = DEFAULT_CONFIDENCE) -> tuple[CurvePoint, ...]:
    """Per-level behaviour of one exit on its own (``scores`` (N,), ``correct`` (N,))."""
    points = []
    for level, t in enumerate(grid, start=1):
        leave = scores >= t
        k, m = int(correct[leave].sum()), int(leave.sum())
        points.append(CurvePoint(level, float(t), m / len(scores), k / m if m else float("nan"),
                                 clopper_pearson_lower(k, m, confidence)))
    return tuple(points)
