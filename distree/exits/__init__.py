"""Early exits: declared in the model or trained on the frozen backbone, and their calibration."""

from distree.exits.calibrate import (
    Behaviour,
    CurvePoint,
    Evaluation,
    calibrate,
    clopper_pearson_lower,
    evaluate,
    evaluate_arrays,
    exit_curve,
    run_exits,
    threshold_grid,
)
from distree.exits.data import Dataset, load_dataset, split_fit_threshold
from distree.exits.declared import declared_exits
from distree.exits.heads import attach_heads, candidate_blocks, train_exits
from distree.exits.scores import exit_scores, softmax
from distree.exits.types import SCORE_KINDS, Calibration, ExitPoint

__all__ = [
    "SCORE_KINDS",
    "Behaviour",
    "Calibration",
    "CurvePoint",
    "Dataset",
    "Evaluation",
    "ExitPoint",
    "attach_heads",
    "calibrate",
    "candidate_blocks",
    "clopper_pearson_lower",
    "declared_exits",
    "evaluate",
    "evaluate_arrays",
    "exit_curve",
    "exit_scores",
    "load_dataset",
    "run_exits",
    "softmax",
    "split_fit_threshold",
    "threshold_grid",
    "train_exits",
]
