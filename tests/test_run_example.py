"""Acceptance on the Fashion-MNIST example: `distree compile` (real chain) then `run_bundle` on the whole
test set; predictions and exits equal ONNX Runtime running the multi-exit model with the same thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from distree.compiler.manifest import read_thresholds
from distree.compiler.pipeline import CompileOptions, compile_model
from distree.exits import exit_scores, load_dataset
from distree.runtime.executor import FINAL, run_bundle

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"
MODEL = EXAMPLE / "resnet_exits.onnx"

pytestmark = pytest.mark.slow


def reference(model: Path, x: np.ndarray, table) -> tuple[np.ndarray, np.ndarray]:
    """Whole multi-exit model under ONNX Runtime, one sample at a time like the runtime, then the first
    enabled exit whose score passes its threshold."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = ["logits", *(e.name for e in table.exits)]
    input_name = session.get_inputs()[0].name
    outs = {n: np.concatenate(v) for n, v in zip(names, zip(*(session.run(names, {input_name: x[i:i + 1]})
                                                            for i in range(len(x)))))}
    preds = outs["logits"].argmax(axis=1)
    exits = np.full(len(x), FINAL, dtype=object)
    for e in reversed(table.exits):               # the first exit passed wins: apply the deepest first
        leave = exit_scores(outs[e.name], table.score_kind) >= e.threshold
        preds = np.where(leave, outs[e.name].argmax(axis=1), preds)
        exits = np.where(leave, e.name, exits)
    return preds, exits


def test_example_bundle_predicts_like_onnxruntime(example_data, tmp_path):
    calib, test = example_data
    options = CompileOptions(devices=("host", "pi4"), backend="auto", accuracy_drop=0.01)
    result = compile_model(MODEL, calib, tmp_path / "bundle", options, cache_dir=tmp_path / "cache")
    data = load_dataset(test)
    report = run_bundle(result.bundle, data)
    table = read_thresholds(result.bundle)
    want_preds, want_exits = reference(MODEL, data.x, table)
    assert report.samples == len(data.y) == 10000
    assert np.array_equal(np.asarray(report.predictions), want_preds)
    assert list(report.exits) == list(want_exits)
    assert report.accuracy == pytest.approx(float((want_preds == data.y).mean()))
