"""Accuracy of an exported example model under ONNX Runtime: the final classifier and every exit output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

EXIT_PREFIX = "exit_"   # extra graph outputs named exit_* are early exits; distree finds them by this name
FINAL_OUTPUT = "logits"


def output_names(model_path: str | Path) -> list[str]:
    """Graph outputs in order: ``logits`` first, then the exits."""
    return [o.name for o in _session(model_path).get_outputs()]


def onnx_accuracies(model_path: str | Path, x: np.ndarray, y: np.ndarray,
                    batch_size: int = 1000) -> dict[str, float]:
    """Fraction of correct top-1 predictions per graph output (``logits`` and each ``exit_*``)."""
    session = _session(model_path)
    names = [o.name for o in session.get_outputs()]
    correct = dict.fromkeys(names, 0)
    for start in range(0, len(x), batch_size):
        outputs = session.run(names, {"input": x[start:start + batch_size]})
        for name, logits in zip(names, outputs):
            correct[name] += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    return {name: correct[name] / len(x) for name in names}


def _session(model_path: str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
