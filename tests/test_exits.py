"""Exit heads, scores and calibration on a tiny ResNet and real Fashion-MNIST images.

The multi-exit models are checked against independent onnxruntime runs (fresh sessions, batch 1, numpy
formulas), never against the code under test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import binom
from torch import nn

import graph_models as gm
from distree.cli import cli
from distree.errors import DistreeError
from distree.exits import (
    Calibration,
    Dataset,
    ExitPoint,
    calibrate,
    clopper_pearson_lower,
    declared_exits,
    evaluate,
    exit_scores,
    load_dataset,
    split_fit_threshold,
    threshold_grid,
    train_exits,
)
from distree.exits.heads import candidate_blocks, fit_heads
from distree.exits.types import MAX_LEVELS
from distree.graph import build_chain, load_model

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 1000


def _fashion_mnist():
    spec = importlib.util.spec_from_file_location("fm_data", ROOT / "examples/fashion_mnist/data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyResNet(nn.Module):
    """Stem, two basic blocks, pool + linear; optionally a declared exit (pool + linear) after block 1."""

    def __init__(self, with_exit: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = gm.Basic(8, 8, 1)
        self.block2 = gm.Basic(8, 16, 2)
        self.fc = nn.Linear(16, 10)
        self.exit_fc = nn.Linear(8, 10) if with_exit else None

    def forward(self, x):
        h = self.block1(self.stem(x))
        logits = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.block2(h), 1), 1))
        if self.exit_fc is None:
            return logits
        return logits, self.exit_fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    fm = _fashion_mnist()
    raw = fm.load_split("train")
    mean, std = fm.normalization(raw.images[:N_SAMPLES])
    x = fm.to_input(raw.images[:N_SAMPLES], mean, std)
    np.savez(root / "calib.npz", x=x, y=raw.labels[:N_SAMPLES])
    test = fm.load_split("t10k")
    np.savez(root / "test.npz", x=fm.to_input(test.images[:300], mean, std), y=test.labels[:300])
    torch.manual_seed(0)
    plain = gm.export(TinyResNet(False), (1, 1, 28, 28), root / "plain.onnx")
    torch.manual_seed(0)
    declared = gm.export(TinyResNet(True), (1, 1, 28, 28), root / "declared.onnx", output_names=("logits", "exit_a"))
    return {"root": root, "calib": root / "calib.npz", "test": root / "test.npz", "plain": plain,
            "declared": declared}


@pytest.fixture(scope="module")
def trained(files):
    """The plain model with heads trained after every candidate block."""
    model = load_model(files["plain"])
    chain = build_chain(model)
    data = load_dataset(files["calib"])
    exits_model, exits = train_exits(model, chain, data)
    return model, chain, data, exits_model, exits


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """Independent reference: a fresh default session, one sample at a time (inner tensors made outputs)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    typed = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, typed.get(t, onnx.TensorProto.FLOAT), None)
                              for t in outputs if t not in have)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = [session.run(outputs, {"input": x[i:i + 1]}) for i in range(len(x))]
    return {name: np.concatenate([r[k] for r in rows]) for k, name in enumerate(outputs)}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- heads ----------------------------------------------------------------------------------------------


def test_heads_train_attach_and_leave_the_final_output_unchanged(trained):
    model, chain, data, exits_model, exits = trained
    assert [e.after_block for e in exits] == [b.index for b in chain.blocks[:-1]]
    outputs = [o.name for o in exits_model.graph.output]
    assert outputs[0] == chain.output_name
    assert {e.name for e in exits} | {e.entry_output for e in exits} <= set(outputs)
    x = data.x[:64]
    before = _run(model, x, [chain.output_name])[chain.output_name]
    after = _run(exits_model, x, outputs)
    assert np.abs(after[chain.output_name] - before).max() <= 1e-6
    # heads learned something from frozen random-init features (chance is 0.1)
    assert max(e.fit_accuracy for e in exits) > 0.5
    assert all(e.flops > 0 and e.param_bytes > 0 for e in exits)
    # the head on a block's input is the previous exit's head (shared), for block 0 a head on the image
    by_block = {e.after_block: e for e in exits}
    assert by_block[0].entry_output == "entry_b0"
    assert all(by_block[b].entry_output == by_block[b - 1].name for b in by_block if b > 0)


def test_heads_fit_in_parallel_equal_heads_fit_one_at_a_time(trained, monkeypatch):
    """Heads are fit one per core; each fit is deterministic on its own, so the heads are bit for bit those of
    a one-worker fit, in the same order."""
    import distree.exits.heads as heads_module

    model, chain, data, _, _ = trained
    wanted = {b.output: f"exit_b{b.index}" for b in chain.blocks[:-1]}
    parallel = fit_heads(model, chain, data, wanted)
    monkeypatch.setattr(heads_module.os, "cpu_count", lambda: 1)
    serial = fit_heads(model, chain, data, wanted)
    assert list(parallel) == list(serial) == list(wanted)
    for tensor, head in parallel.items():
        assert np.array_equal(head.weight, serial[tensor].weight) and np.array_equal(head.bias, serial[tensor].bias)
        assert head.output == wanted[tensor] and head.fit_accuracy == serial[tensor].fit_accuracy


def _head_reference(v: np.ndarray, weights: dict[str, np.ndarray], exit_name: str) -> tuple[np.ndarray, str]:
    """What the head of ``exit_name`` should answer on cut values ``v`` (float), and its kind: linear on the
    global means, or on a 4x4 grid of means reduced by a 1x1 conv to <= 16 channels for wide maps."""
    base = f"distree_head_{exit_name}"
    if v.ndim == 4 and min(v.shape[2:]) >= 8:
        kh, kw = v.shape[2] // 4, v.shape[3] // 4
        cells = v[:, :, :4 * kh, :4 * kw].reshape(len(v), v.shape[1], 4, kh, 4, kw).mean(axis=(3, 5))
        reduce = weights[base + "_reduce_weight"][:, :, 0, 0]
        assert reduce.shape == (min(v.shape[1], 16), v.shape[1])
        cells = np.einsum("dc,ncij->ndij", reduce, cells) + weights[base + "_reduce_bias"][None, :, None, None]
        features, kind = cells.reshape(len(v), -1), "conv"
    else:
        features, kind = v.reshape(len(v), v.shape[1], -1).mean(axis=2), "linear"
    return features @ weights[base + "_weight"].T + weights[base + "_bias"], kind


def test_head_logits_equal_pooled_linear_features(trained):
    """Attached heads compute what their docstring says: (grid pool -> 1x1 conv ->) linear on the cut."""
    _, chain, data, exits_model, exits = trained
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in exits_model.graph.initializer}
    kinds = set()
    for e in exits:
        cut = chain.blocks[e.after_block].output
        got = _run(exits_model, data.x[:16], [cut, e.name])
        expected, kind = _head_reference(got[cut], weights, e.name)
        kinds.add(kind)
        np.testing.assert_allclose(expected, got[e.name], rtol=1e-4, atol=1e-4)
    assert kinds == {"conv", "linear"}


def test_trained_model_round_trips_through_a_file(trained, tmp_path):
    _, _, _, exits_model, exits = trained
    path = tmp_path / "m.onnx"
    path.write_bytes(exits_model.SerializeToString())
    reloaded = load_model(path)
    assert declared_exits(reloaded, build_chain(reloaded)) == exits


# --- calibration against an independent evaluation -------------------------------------------------------


@pytest.mark.parametrize("score_kind", ["max_softmax", "entropy", "stability"])
def test_calibration_matches_independent_onnxruntime_evaluation(trained, score_kind):
    _, _, data, exits_model, exits = trained
    chain = build_chain(exits_model)
    cal = calibrate(exits_model, chain, exits, data, score_kind, seed=0, levels=6)
    fit_idx, thr_idx = split_fit_threshold(data, 0.5, 0)
    assert cal.split_sizes == {"fit": len(fit_idx), "threshold": len(thr_idx), "test": 0}
    assert cal.num_samples == len(thr_idx) and len(fit_idx) + len(thr_idx) == len(data)
    x, y = data.x[thr_idx], data.y[thr_idx]
    names = [e.name for e in exits]
    ref = _run(exits_model, x, [chain.output_name, *names, "entry_b0"])
    correct = np.stack([ref[n].argmax(1) == y for n in [*names, chain.output_name]], axis=1)
    # predictions whose top-2 logits are within float noise may flip between batched and batch-1 kernels
    margin = np.stack([np.diff(np.sort(ref[n], axis=1)[:, -2:], axis=1)[:, 0] for n in [*names, chain.output_name]],
                      axis=1)
    decided = margin > 1e-4
    assert (cal.correct_array()[decided] == correct[decided]).all()
    assert decided.mean() > 0.99
    expected = []
    for e in exits:
        p = _softmax(ref[e.name])
        if score_kind == "max_softmax":
            expected.append(p.max(1))
        elif score_kind == "entropy":
            expected.append((p * np.log(p)).sum(1))
        else:
            q = _softmax(ref[e.entry_output])
            c = p.argmax(1)
            expected.append(np.minimum(p[np.arange(len(p)), c], q[np.arange(len(q)), c]))
    np.testing.assert_allclose(cal.scores_array(), np.stack(expected, axis=1), atol=2e-5)
    for j, grid in enumerate(cal.thresholds):
        assert list(grid) == sorted(set(grid)) and 1 <= len(grid) <= 6


def test_calibrating_the_fit_data_with_another_split_is_refused(trained):
    _, _, data, exits_model, exits = trained
    with pytest.raises(DistreeError, match="--seed 0 --fit-fraction 0.5; calibrate with the same"):
        calibrate(exits_model, build_chain(exits_model), exits, data, seed=1)
    other = Dataset(x=data.x[::-1].copy(), y=data.y[::-1].copy())    # other data: any split is fine
    assert calibrate(exits_model, build_chain(exits_model), exits, other, seed=1).split_sizes["threshold"] > 0


def test_calibration_json_round_trip(trained, tmp_path):
    _, _, data, exits_model, exits = trained
    cal = calibrate(exits_model, build_chain(exits_model), exits, data, "entropy")
    loaded = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert loaded == cal
    np.testing.assert_array_equal(loaded.scores_array(), cal.scores_array())
    packed = cal.save(tmp_path / "cal.json.gz")          # gzip where the name ends in .gz
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and packed.stat().st_size < (tmp_path / "cal.json").stat().st_size / 2
    assert Calibration.load(packed) == cal
    assert cal.save(tmp_path / "again.json.gz").read_bytes() == packed.read_bytes()   # no timestamp inside


def test_declared_exits_by_convention_and_by_name(files):
    model = load_model(files["declared"])
    chain = build_chain(model)
    found = declared_exits(model, chain)
    assert [(e.name, e.source) for e in found] == [("exit_a", "model")]
    assert chain.blocks[found[0].after_block].output.startswith("/block1/")
    assert declared_exits(model, chain, ["exit_a"]) == found
    with pytest.raises(DistreeError, match="'exit_z' is not an extra output.*--exit-outputs"):
        declared_exits(model, chain, ["exit_z"])
    with pytest.raises(DistreeError, match="final classifier"):
        declared_exits(model, chain, ["logits"])


def test_declared_exits_get_entry_heads_for_stability(files):
    model = load_model(files["declared"])
    chain = build_chain(model)
    data = load_dataset(files["calib"])
    declared = declared_exits(model, chain)
    with pytest.raises(DistreeError, match="entry head"):
        calibrate(model, chain, declared, data, "stability")
    exits_model, exits = train_exits(model, chain, data, declared=declared)
    (e,) = exits
    assert e.source == "model" and e.entry_output == f"entry_b{e.after_block}" and e.entry_flops > 0
    x = data.x[:32]
    before = _run(model, x, ["logits", "exit_a"])
    after = _run(exits_model, x, ["logits", "exit_a"])
    assert np.abs(after["logits"] - before["logits"]).max() <= 1e-6
    assert np.abs(after["exit_a"] - before["exit_a"]).max() <= 1e-6
    cal = calibrate(exits_model, build_chain(exits_model), exits, data, "stability")
    assert cal.scores_array().shape == (cal.num_samples, 1)


# --- scores, thresholds, evaluate ------------------------------------------------------------------------


def test_scores_are_higher_for_more_confident_predictions():
    peaked = np.array([[5.0, 0.0, 0.0]])
    flat = np.array([[0.1, 0.0, 0.0]])
    for kind in ("max_softmax", "entropy"):
        assert exit_scores(peaked, kind)[0] > exit_scores(flat, kind)[0]
    # stability: same exit logits, entry head agreeing vs disagreeing
    agree = exit_scores(peaked, "stability", np.array([[4.0, 0.0, 0.0]]))[0]
    disagree = exit_scores(peaked, "stability", np.array([[0.0, 4.0, 0.0]]))[0]
    assert agree > 0.9 and disagree < 0.05
    with pytest.raises(DistreeError, match="unknown score kind"):
        exit_scores(peaked, "margin")


def test_threshold_grid_is_ascending_quantiles():
    scores = np.arange(1000) / 1000.0
    grid = threshold_grid(scores, 4)
    assert len(grid) == 4 and list(grid) == sorted(grid)
    rates = [(scores >= t).mean() for t in grid]
    np.testing.assert_allclose(rates, [0.8, 0.6, 0.4, 0.2], atol=0.002)
    assert threshold_grid(np.ones(50), 8) == (1.0,)   # saturated scores merge levels
    assert len(threshold_grid(scores, MAX_LEVELS)) == MAX_LEVELS
    for levels in (0, MAX_LEVELS + 1, 100_000):   # 100,000 once gave 2,499 levels a solve could not handle
        with pytest.raises(DistreeError, match=f"--levels {levels}: give 1 to {MAX_LEVELS} threshold levels"):
            threshold_grid(scores, levels)


def _toy_calibration() -> Calibration:
    exits = tuple(ExitPoint(name=f"e{j}", after_block=j, source="trained", head_nodes=(), flops=1, param_bytes=1)
                  for j in range(2))
    scores = ((0.9, 0.1), (0.2, 0.8), (0.2, 0.3), (0.95, 0.99), (0.5, 0.7))
    correct = ((True, False, True), (False, True, True), (False, False, False), (False, True, True),
               (True, True, False))
    return Calibration(model_sha256="x", score_kind="max_softmax", exits=exits, scores=scores, correct=correct,
                       thresholds=((0.5,), (0.7,)), split_sizes={"fit": 5, "threshold": 5, "test": 0})


def test_evaluate_uses_the_first_enabled_exit_that_passes():
    cal = _toy_calibration()
    ev = evaluate(cal, {"e0": 0.5, "e1": 0.7})
    # samples 0, 3, 4 leave at e0 (right, wrong, right); sample 1 at e1 (right); sample 2 at final (wrong)
    assert ev.exit_rates == {"e0": 0.6, "e1": 0.2, "final": 0.2}
    assert ev.accuracy == pytest.approx(0.6)
    ev_off = evaluate(cal, {"e0": None, "e1": 0.7})
    # e0 disabled: 1, 3, 4 leave at e1 (all right), 0 and 2 at final (right, wrong)
    assert ev_off.exit_rates == {"e0": 0.0, "e1": 0.6, "final": 0.4}
    assert ev_off.accuracy == pytest.approx(0.8)
    assert evaluate(cal, {}).accuracy == pytest.approx(cal.final_accuracy())
    with pytest.raises(DistreeError, match="no exit named 'e9'"):
        evaluate(cal, {"e9": 0.1})


@pytest.mark.parametrize("k,n", [(7, 10), (95, 100), (1, 3)])
def test_lower_bound_is_one_sided_clopper_pearson(k, n):
    lcb = clopper_pearson_lower(k, n, 0.95)
    # at the bound, seeing >= k successes has probability exactly 5%
    assert binom.sf(k - 1, n, lcb) == pytest.approx(0.05, rel=1e-6)
    assert 0 < lcb < k / n
    assert clopper_pearson_lower(n, n, 0.95) == pytest.approx(0.05 ** (1 / n))
    assert clopper_pearson_lower(0, n, 0.95) == 0.0


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arrays,fragment", [
    ({"x": np.zeros((4, 1, 28, 28), np.float32)}, "missing array(s) y"),
    ({"x": np.zeros((4, 1, 28, 28), np.float64), "y": np.zeros(4, np.int64)}, "dtype float64, expected float32"),
    ({"x": np.zeros((4, 28, 28), np.float32), "y": np.zeros(4, np.int64)}, "expected 4 dims"),
    ({"x": np.zeros((4, 1, 28, 28), np.float32), "y": np.zeros((4, 10), np.int64)}, "not one-hot"),
    ({"x": np.zeros((4, 1, 28, 28), np.float32), "y": np.zeros(3, np.int64)}, "x has 4 samples but y has 3"),
    ({"x": np.zeros((4, 1, 32, 32), np.float32), "y": np.zeros(4, np.int64)}, "the model expects (1, 28, 28)"),
    ({"x": np.zeros((4, 28, 28, 1), np.float32), "y": np.zeros(4, np.int64)},
     "the model takes channels first (NCHW): save x.transpose(0, 3, 1, 2)"),
    ({"x": np.zeros((4, 1, 28, 28), np.float32), "y": np.array([0, 1, 2, 10])}, "labels span 0..10"),
])
def test_bad_data_is_a_one_line_error_with_the_fix(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DistreeError) as info:
        load_dataset(path, (1, 1, 28, 28), 10)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_too_few_samples_per_class(files):
    model = load_model(files["plain"])
    chain = build_chain(model)
    data = load_dataset(files["calib"])
    keep = np.flatnonzero(data.y != 3)[:300]
    few = Dataset(x=np.concatenate([data.x[keep], data.x[data.y == 3][:4]]),
                  y=np.concatenate([data.y[keep], data.y[data.y == 3][:4]]))
    with pytest.raises(DistreeError, match=r"too few samples per class.*class 3: 2.*add calibration data"):
        train_exits(model, chain, few, at=[2])


def test_bad_block_choice(files):
    model = load_model(files["plain"])
    chain = build_chain(model)
    data = load_dataset(files["calib"])
    last = len(chain.blocks) - 1
    with pytest.raises(DistreeError, match=f"pick blocks in 0..{last - 1}"):
        train_exits(model, chain, data, at=[last])


# --- CLI ------------------------------------------------------------------------------------------------


def test_cli_exits_then_calibrate_report_and_plot(files, tmp_path):
    runner = CliRunner()
    out_model = tmp_path / "m_exits.onnx"
    result = runner.invoke(cli, ["exits", str(files["plain"]), "--data", str(files["calib"]), "--at", "1,3",
                                 "-o", str(out_model)])
    assert result.exit_code == 0, result.output
    assert "exit_b1" in result.output and "exit_b3" in result.output and out_model.is_file()
    # heads go on the model as written, so it keeps the original's dynamic batch
    session = ort.InferenceSession(str(out_model), providers=["CPUExecutionProvider"])
    x = np.load(files["calib"])["x"][:8]
    logits, exit_b1 = session.run(["logits", "exit_b1"], {"input": x})
    assert logits.shape == (8, 10) and exit_b1.shape == (8, 10)
    cal_path, plot = tmp_path / "cal.json", tmp_path / "curves.png"
    result = runner.invoke(cli, ["calibrate", str(out_model), "--data", str(files["calib"]), "--score", "stability",
                                 "--report", "--test", str(files["test"]), "--plot", str(plot), "--levels", "4",
                                 "-o", str(cal_path)])
    assert result.exit_code == 0, result.output
    cal = Calibration.load(cal_path)
    assert cal.exit_names == ("exit_b1", "exit_b3") and cal.score_kind == "stability"
    assert cal.split_sizes["test"] == 300
    assert "test acc" in result.output and "LCB 95%" in result.output
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,fragment", [
    (["--exit-outputs", "nope"], "'nope' is not an extra output"),
    (["--at", "x"], "expected block indices"),
    (["--at", ""], "expected block indices"),
    (["--at", ","], "expected block indices"),
    (["--fit-fraction", "1.5"], "strictly between 0 and 1"),
])
def test_cli_errors_are_one_line(files, tmp_path, args, fragment):
    result = CliRunner().invoke(cli, ["exits", str(files["plain"]), "--data", str(files["calib"]), *args,
                                      "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert not (tmp_path / "o.onnx").exists()


def test_a_4d_classifier_output_is_refused_with_the_flatten_fix(tmp_path, files):
    """A SqueezeNet-style model ends in GlobalAveragePool: (N, K, 1, 1). Its last dim is 1, not K."""
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 28, 28])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10, 1, 1])
    w = onnx.numpy_helper.from_array(np.ones((10, 1, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
                                    onnx.helper.make_node("Relu", ["c"], ["r"]),
                                    onnx.helper.make_node("GlobalAveragePool", ["r"], ["logits"])],
                                   "squeeze", [x], [y], [w])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["exits", str(tmp_path / "m.onnx"), "--data", str(files["calib"]),
                                      "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and not (tmp_path / "o.onnx").exists()
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "has shape (1, 10, 1, 1)" in line and "Flatten" in line, line


def test_batches_shrink_to_the_memory_budget_and_answer_the_same(monkeypatch):
    """Reading every cut of a ResNet-18 on 224x224 images in batches of 256 peaked at 5.7 GB; a batch now holds
    what fits BATCH_BUDGET_BYTES (its tensors plus twice the largest), and smaller batches answer the same."""
    import distree.exits.runner as runner_module

    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 1, 3, 3)).astype(np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Relu", ["c"], ["r"]), onnx.helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         onnx.helper.make_node("Flatten", ["p"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])], [w])
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    x = np.random.default_rng(1).standard_normal((30, 1, 8, 8)).astype(np.float32)
    whole = runner_module.make_runner(model, ["r", "y"], x[:2])
    assert whole.batch_size == runner_module.BATCH_SIZE                        # 4 KB a sample: no limit
    monkeypatch.setattr(runner_module, "BATCH_BUDGET_BYTES", 100_000)          # (4 + 64 B) + 2 x 4 KB a sample
    small = runner_module.make_runner(model, ["r", "y"], x[:2])
    assert small.batch_size == 100_000 // (16 * 64 * 4 + 16 * 4 + 2 * 16 * 64 * 4) == 8
    got: dict[str, list[np.ndarray]] = {"r": [], "y": []}
    small.over(x, lambda _start, out: [got[k].append(out[k]) for k in got])
    assert len(got["y"]) == 4                                                   # 8 + 8 + 8 + 6
    want = whole.run(x)
    for k in got:
        np.testing.assert_allclose(np.concatenate(got[k]), want[k], rtol=1e-6, atol=1e-6)


def test_a_time_major_sequence_gets_no_head(files, tmp_path):
    """A GRU's input in torch's default layout is (L, N, D): its first axis is the sequence, so a head there would
    answer L rows per sample (training one crashed in the fit). It is no candidate; the other cuts keep theirs,
    and each head answers one row per sample."""
    path = gm.export(gm.ConvGru(), (1, 1, 28, 28), tmp_path / "gru.onnx")
    model = load_model(path)
    chain = build_chain(model)
    time_major = [b.index for b in chain.blocks[:-1] if b.output_shape[:2] == (14, 1)]
    assert time_major and not set(time_major) & set(candidate_blocks(model, chain))
    exits_model, exits = train_exits(model, chain, load_dataset(files["calib"]))
    assert {e.after_block for e in exits} == set(candidate_blocks(model, chain)) and len(exits) >= 2
    got = _run(exits_model, load_dataset(files["calib"]).x[:3], [e.name for e in exits])
    assert all(v.shape == (3, 10) for v in got.values()), {k: v.shape for k, v in got.items()}
    with pytest.raises(DistreeError, match="with the batch first"):
        train_exits(model, chain, load_dataset(files["calib"]), at=time_major[:1])


def test_transformer_layers_get_exits_reading_both_token_means(files, tmp_path):
    """(N, L, D) cuts (a ViT's encoder layers) had no exit candidates; their heads read the mean over D and the
    mean over L (which axis is which the graph does not say), concatenated, and the attached ONNX computes that."""
    path = gm.export(gm.TinyViT(), (1, 1, 28, 28), tmp_path / "vit.onnx")
    model = load_model(path)
    chain = build_chain(model)
    exits_model, exits = train_exits(model, chain, load_dataset(files["calib"]))
    tokens = [e for e in exits if len(chain.blocks[e.after_block].output_shape) == 3]
    layer_outputs = {"/layers/layers.0/Add_output_0", "/layers/layers.1/Add_1_output_0"}
    assert layer_outputs <= {chain.blocks[e.after_block].output for e in tokens}
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in exits_model.graph.initializer}
    x = load_dataset(files["calib"]).x[:16]
    for e in tokens:
        cut = chain.blocks[e.after_block].output
        got = _run(exits_model, x, [cut, e.name])
        v = got[cut].astype(np.float64)
        features = np.concatenate([v.mean(axis=2), v.mean(axis=1)], axis=1)
        base = f"distree_head_{e.name}"
        expected = features @ weights[base + "_weight"].T + weights[base + "_bias"]
        np.testing.assert_allclose(expected, got[e.name], rtol=1e-4, atol=1e-4)
    # the token means carry the class: the last layer's head is far above the per-token means' 0.54-0.64 level
    last = max(tokens, key=lambda e: e.after_block)
    assert last.fit_accuracy > 0.5, [(e.name, e.fit_accuracy) for e in tokens]


def test_an_int8_model_gets_heads_that_dequantize_its_uint8_cuts(files, tmp_path):
    """In ONNX Runtime's QOperator format every cut is a uint8 tensor (it had no exit candidate). A head there
    reads (q - zero point) * scale, with the scale and zero point of the op that writes the cut, and is useful."""
    path = gm.quantize(files["plain"], np.load(files["calib"])["x"][:64], tmp_path / "int8.onnx")
    model = load_model(path)
    chain = build_chain(model)
    assert {n.op_type for n in model.graph.node} >= {"QLinearConv", "QLinearAdd"}
    candidates = candidate_blocks(model, chain)
    cuts = [chain.blocks[b].output for b in candidates]
    x = load_dataset(files["calib"]).x[:8]
    assert len(candidates) >= 3 and all(v.dtype == np.uint8 for v in _run(model, x, cuts).values())

    exits_model, exits = train_exits(model, chain, load_dataset(files["calib"]))
    assert {e.after_block for e in exits} == set(candidates)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in exits_model.graph.initializer}
    writer = {o: n for n in model.graph.node for o in n.output}
    for e in exits:
        cut = chain.blocks[e.after_block].output
        node = writer[cut]
        while node.op_type in ("MaxPool", "Flatten"):
            node = writer[node.input[0]]
        scale_at = {"QLinearConv": 6, "QLinearAdd": 6, "QLinearGlobalAveragePool": 3, "QGemm": 7,
                    "QuantizeLinear": 1}[node.op_type]
        scale, zero = float(weights[node.input[scale_at]]), int(weights[node.input[scale_at + 1]])
        got = _run(exits_model, x, [cut, e.name])
        expected, _ = _head_reference((got[cut].astype(np.float64) - zero) * scale, weights, e.name)
        np.testing.assert_allclose(expected, got[e.name], rtol=1e-4, atol=1e-4)
    test = load_dataset(files["test"])
    final = _run(model, test.x, ["logits"])["logits"]
    np.testing.assert_array_equal(_run(exits_model, test.x, ["logits"])["logits"], final)
    # useful (held-out images; chance is 0.1): the best is as good as the float model's best head (this untrained
    # network's int8 features lose more towards its end: 0.61 against 0.79 after block 4)
    float_model = load_model(files["plain"])
    float_exits_model, float_exits = train_exits(float_model, build_chain(float_model), load_dataset(files["calib"]))

    def held_out(m: onnx.ModelProto, name: str) -> float:
        return float((_run(m, test.x, [name])[name].argmax(axis=1) == test.y).mean())

    int8_acc = [held_out(exits_model, e.name) for e in exits]
    float_acc = [held_out(float_exits_model, e.name) for e in float_exits]
    assert min(int8_acc) > 0.4 and max(int8_acc) >= max(float_acc) - 0.05, (int8_acc, float_acc)


def test_an_int8_model_compiles_with_exits_and_its_bundle_answers_as_the_whole_model(files, tmp_path):
    """`distree exits` then `distree compile` on a QOperator int8 model (ONNX Runtime ships it, TVM imports none
    of it): exits are enabled, and the bundle's answers are ONNX Runtime's on the whole multi-exit model with the
    bundle's thresholds."""
    import json

    from distree.runtime.executor import FINAL

    path = gm.quantize(files["plain"], np.load(files["calib"])["x"][:64], tmp_path / "int8.onnx")
    runner = CliRunner()
    made = runner.invoke(cli, ["exits", str(path), "--data", str(files["calib"]), "-o", str(tmp_path / "x.onnx")])
    assert made.exit_code == 0, made.output
    (note,) = [line for line in made.stderr.splitlines() if line.startswith("note: no exit after")]   # QGemm's
    assert "'logits_quantized' is read only by DequantizeLinear" in note, made.stderr
    bundle = tmp_path / "bundle"
    built = runner.invoke(cli, ["compile", str(tmp_path / "x.onnx"), "--devices", "pi4", "--data", str(files["calib"]),
                                "--accuracy-drop", "0.05", "--cache-dir", str(tmp_path / "cache"), "-o", str(bundle)])
    assert built.exit_code == 0, built.output
    table = json.loads((bundle / "thresholds.json").read_text())
    thresholds = {e["name"]: e["threshold"] for e in table["exits"]}
    assert thresholds, "no exit enabled"
    ran = runner.invoke(cli, ["run", str(bundle), "--input", str(files["test"]), "--json"])
    assert ran.exit_code == 0, ran.output
    report = json.loads(ran.stdout)

    exits_model = onnx.load(tmp_path / "x.onnx")
    order = sorted(thresholds, key=lambda name: next(e["after_block"] for e in table["exits"] if e["name"] == name))
    session = ort.InferenceSession(exits_model.SerializeToString(), providers=["CPUExecutionProvider"])
    test = load_dataset(files["test"])
    want_preds, want_exits = [], []
    for i in range(len(test.x)):
        out = dict(zip(["logits", *order], session.run(["logits", *order], {"input": test.x[i:i + 1]})))
        taken = next((name for name in order if _softmax(out[name]).max() >= thresholds[name]), FINAL)
        want_preds.append(int(out["logits" if taken == FINAL else taken].argmax()))
        want_exits.append(taken)
    assert report["exits"] == want_exits and report["predictions"] == want_preds
    assert set(want_exits) - {FINAL}


def test_in_a_qdq_model_a_quantized_tensor_read_only_by_dequantize_gets_no_head(files, tmp_path):
    """QDQ activations are QuantizeLinear -> DequantizeLinear pairs: the uint8 tensor between them holds what the
    float tensor after them holds, which has its own head; a head on both would be a twin exit for the solver."""
    model = load_model(gm.quantize(files["plain"], np.load(files["calib"])["x"][:64], tmp_path / "qdq.onnx", "QDQ"))
    chain = build_chain(model)
    between = [b.index for b in chain.blocks[:-1]
               if {n.op_type for n in model.graph.node if b.output in n.input} == {"DequantizeLinear"}]
    candidates = candidate_blocks(model, chain)
    assert len(between) >= 3 and not set(between) & set(candidates) and len(candidates) >= 3
    assert all(b + 1 in candidates for b in between if b + 1 < len(chain.blocks) - 1)   # the float twin has one
    with pytest.raises(DistreeError, match=f"--at {between[0]}: .* read only by DequantizeLinear, whose float output"):
        train_exits(model, chain, load_dataset(files["calib"]), at=between[:1])
