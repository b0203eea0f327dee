"""Early exits: declared in the model or trained on the frozen backbone, and their calibration."""

from distree.lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    **dict.fromkeys(("Behaviour", "CurvePoint", "Evaluation", "calibrate", "evaluate", "evaluate_arrays",
                     "exit_curve", "run_exits", "threshold_grid"), "calibrate"),
    "clopper_pearson_lower": "confidence",
    "Dataset": "data", "load_dataset": "data", "split_fit_threshold": "data", "declared_exits": "declared",
    "attach_heads": "heads", "candidate_blocks": "heads", "train_exits": "heads", "exit_scores": "scores",
    "softmax": "scores", "SCORE_KINDS": "types", "Calibration": "types", "ExitPoint": "types"})
