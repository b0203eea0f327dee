"""Bad input to ``distree inspect``: exit status 2 and one ``error:`` line naming the problem, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graph_models as gm
from distree.cli import cli
from distree.graph import Chain


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(shape=(1, 4)):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _y(shape=(1, 4)):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))


def _chain_model(shape=(1, 4)) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])], [_x(shape)], [_y(shape)])


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_missing_file(tmp_path):
    assert_one_line_error(invoke(str(tmp_path / "nope.onnx")), "no such file")


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\n")
    assert_one_line_error(invoke(str(path)), "not an ONNX model")


def test_empty_file_is_not_onnx(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert_one_line_error(invoke(str(path)), "not an ONNX model")


def test_truncated_protobuf(tmp_path):
    good = tmp_path / "good.onnx"
    gm.export(gm.PlainCNN(), (1, 1, 28, 28), good)
    data = good.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(invoke(str(path)), "truncated/corrupt", "copy the file again")


def test_fails_the_checker(tmp_path):
    bad = _model([helper.make_node("Relu", ["x", "extra"], ["y"])], [_x()], [_y()])  # Relu takes one input
    path = tmp_path / "bad.onnx"
    path.write_bytes(bad.SerializeToString())
    assert_one_line_error(invoke(str(path)), "fails the ONNX checker")


def test_no_cut_point(tmp_path):
    # y = Relu(x) + x: the input is needed until the very end, so nothing in between can be cut
    model = _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "x"], ["y"])], [_x()], [_y()])
    path = tmp_path / "nocut.onnx"
    onnx.save(model, path)
    assert_one_line_error(invoke(str(path)), "no cut point")


def test_several_graph_inputs(tmp_path):
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
    model = _model([helper.make_node("Add", ["x", "z"], ["y"])], [_x(), z], [_y()])
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    assert_one_line_error(invoke(str(path)), "2 graph inputs", "x, z")


@pytest.mark.parametrize("elem_type, name", [(TensorProto.FLOAT16, "float16"), (TensorProto.UINT8, "uint8")])
def test_an_input_other_than_float32_is_refused(tmp_path, elem_type, name):
    """Calibration data and stage inputs are float32: an fp16 export used to fail inside ONNX Runtime's exit
    training with a traceback."""
    x = helper.make_tensor_value_info("x", elem_type, [1, 4])
    y = helper.make_tensor_value_info("y", elem_type, [1, 4])
    path = tmp_path / "typed.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])], [x], [y]), path)
    assert_one_line_error(invoke(str(path)), f"input x is {name}", "float32 model")


def test_initializers_listed_as_inputs_are_weights_not_inputs(tmp_path):
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    w_input = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 4])
    model = _model([helper.make_node("Mul", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                   [_x(), w_input], [_y()], [w])
    model.ir_version = 8
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    result = invoke(str(path))
    assert result.exit_code == 0, result.output


def test_unknown_dims_other_than_batch(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(_chain_model(("N", "D")), path)
    assert_one_line_error(invoke(str(path)), "unknown dims [1]", "--input-shape x=1,D")
    ok = invoke(str(path), "--input-shape", "x=2,5")
    assert ok.exit_code == 0, ok.output
    assert "2x5" in ok.stdout


def test_batch_defaults_to_one_with_a_note(tmp_path):
    path = tmp_path / "batch.onnx"
    onnx.save(_chain_model(("N", 4)), path)
    result = invoke(str(path))
    assert result.exit_code == 0, result.output
    assert "note: batch dimension" in result.stderr
    assert "1x4" in result.stdout


def test_a_fixed_batch_other_than_one_is_refused(tmp_path):
    """Exported with a static batch of 8, a model compiled and profiled at batch 8, then every served request (one
    sample) failed in ONNX Runtime with a traceback."""
    path = tmp_path / "batch8.onnx"
    onnx.save(_chain_model((8, 4)), path)
    assert_one_line_error(invoke(str(path)), "fixed batch of 8", "dynamic_axes")
    assert invoke(str(path), "--input-shape", "x=8,4").exit_code == 0      # batched on purpose: allowed


@pytest.mark.parametrize("option, fragment", [
    ("x=1,a", "expected NAME=D1,D2"),
    ("z=1,4", "the model's input is 'x'"),
    ("x=1,4,4", "rank 3"),
    ("x=2,4", "differ from the model's fixed shape"),
])
def test_bad_input_shape_option(tmp_path, option, fragment):
    path = tmp_path / "fixed.onnx"
    onnx.save(_chain_model(), path)
    assert_one_line_error(invoke(str(path), "--input-shape", option), fragment)


def test_unknown_final_output(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(_chain_model(), path)
    assert_one_line_error(invoke(str(path), "--final-output", "z"), "'z' is not a graph output", "outputs: y")


def test_bad_coarsen(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(_chain_model(), path)
    assert_one_line_error(invoke(str(path), "--coarsen", "0"), "at least 1 block")


def test_inspect_prints_table_and_writes_json(tmp_path):
    path = tmp_path / "exits.onnx"
    gm.export(gm.WithExit(), (1, 1, 8, 8), path, output_names=("logits", "exit1", "exit2"))
    out = tmp_path / "chain.json"
    result = invoke(str(path), "--json", str(out))
    assert result.exit_code == 0, result.output
    for text in ("block", "FLOPs", "/stage1/stage1.1/Relu_output_0", "1x8x8x8", "exit1", "total"):
        assert text in result.stdout
    chain = Chain.load(out)
    assert len(chain.blocks) == 9 and chain.blocks[0].input == "input" and chain.blocks[-1].output == "logits"
    assert chain.exit_outputs == ("exit1", "exit2")
    stdout_json = invoke(str(path), "--json", "-", "--coarsen", "3")
    assert stdout_json.exit_code == 0
    doc = json.loads(stdout_json.stdout)
    assert doc["kind"] == "Chain" and len(doc["blocks"]) == 3
    # coarsening keeps the cuts where the model's exits attach
    assert doc["exit_attachments"] == {"exit1": 0, "exit2": 1}
    assert [b["output"] for b in doc["blocks"]][:2] == ["/stage1/stage1.1/Relu_output_0", "/stage2.1/Relu_output_0"]
