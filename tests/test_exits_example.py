"""Exits on the shipped Fashion-MNIST example models (real data, the committed ONNX files).

Checks the issue's acceptance points: heads train and attach on both models, the multi-exit model's final
output is the original model's, and calibration agrees with an independent onnxruntime evaluation (the
example's own ``evaluate.onnx_accuracies``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from distree.exits import calibrate, declared_exits, load_dataset, split_fit_threshold, train_exits
from distree.graph import build_chain, load_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist"
TRAIN_AT = {"resnet_plain.onnx": [4, 12, 20], "resnet_exits.onnx": None}   # plain: a few blocks keep it short

pytestmark = pytest.mark.slow


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("fashion_mnist_evaluate", EXAMPLE / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def calib(example_data):
    return load_dataset(example_data[0])


@pytest.mark.parametrize("file", sorted(TRAIN_AT))
def test_example_heads_attach_keep_final_output_and_calibrate_like_onnxruntime(file, calib, tmp_path):
    model = load_model(EXAMPLE / file)
    chain = build_chain(model)
    at = TRAIN_AT[file]
    at = None if at is None else [b for b in at if b < len(chain.blocks) - 1]
    declared = declared_exits(model, chain) if at is None else ()
    exits_model, exits = train_exits(model, chain, calib, at=at, declared=declared,
                                     attach_to=onnx.load(EXAMPLE / file))   # keeps the file's dynamic batch
    assert len(exits) >= 3 and all(e.entry_output for e in exits)
    if at is not None:
        assert all(e.fit_accuracy > 0.5 for e in exits)   # frozen ResNet features: far above chance (0.1)
    path = tmp_path / "exits.onnx"
    path.write_bytes(exits_model.SerializeToString())

    # the final output is unchanged, on the original file and the multi-exit file, fresh sessions
    x = calib.x[:256]
    original = ort.InferenceSession(str(EXAMPLE / file), providers=["CPUExecutionProvider"])
    multi = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    before = np.concatenate([original.run(["logits"], {"input": x[i:i + 1]})[0] for i in range(len(x))])
    after = np.concatenate([multi.run(["logits"], {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.abs(after - before).max() <= 1e-6

    # calibration = the example's own evaluator on the same threshold split
    reloaded = load_model(path)
    cal = calibrate(reloaded, build_chain(reloaded), exits, calib, "max_softmax")
    _, threshold_idx = split_fit_threshold(calib, 0.5, 0)
    reference = _evaluate_module().onnx_accuracies(path, calib.x[threshold_idx], calib.y[threshold_idx])
    measured = dict(zip([*cal.exit_names, "logits"], cal.correct_array().mean(axis=0)))
    for name, accuracy in measured.items():
        assert accuracy == pytest.approx(reference[name], abs=1.5 / len(threshold_idx)), name
