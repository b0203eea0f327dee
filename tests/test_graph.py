"""Cut points, block costs and segment extraction on models of every shape the issue names."""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
import pytest

import graph_models as gm
from distree.graph import Chain, build_chain, coarsen, exit_attachments, exit_heads, extract_segment, load_model
from distree.graph.cuts import GraphIndex, find_cuts
from distree.errors import DistreeError

# (builder, input shape, expected cut tensors = every block's output, in order)
CASES = {
    "plain_cnn": (gm.PlainCNN, (1, 1, 28, 28), [
        "/conv1/Conv_output_0", "/relu1/Relu_output_0", "/pool/MaxPool_output_0", "/conv2/Conv_output_0",
        "/relu2/Relu_output_0", "/flat/Flatten_output_0", "logits"]),
    "resnet_basic": (lambda: gm.ResNet([gm.Basic(8, 8, 1), gm.Basic(8, 16, 2)], 16), (1, 3, 16, 16), [
        "/stem/stem.0/Conv_output_0", "/stem/stem.2/Relu_output_0",
        "/layers/layers.0/Add_output_0", "/layers/layers.0/relu_1/Relu_output_0",
        "/layers/layers.1/Add_output_0", "/layers/layers.1/relu_1/Relu_output_0",
        "/pool/GlobalAveragePool_output_0", "/Flatten_output_0", "logits"]),
    "resnet_bottleneck": (lambda: gm.ResNet([gm.Bottleneck(8, 4, 16, 1), gm.Bottleneck(16, 4, 16, 1)], 16),
                          (1, 3, 16, 16), [
        "/stem/stem.0/Conv_output_0", "/stem/stem.2/Relu_output_0",
        "/layers/layers.0/Add_output_0", "/layers/layers.0/relu/Relu_output_0",
        "/layers/layers.1/Add_output_0", "/layers/layers.1/relu/Relu_output_0",
        "/pool/GlobalAveragePool_output_0", "/Flatten_output_0", "logits"]),
    "mobilenetv2_like": (gm.MobileNetV2Like, (1, 3, 16, 16), [
        "/stem/stem.0/Conv_output_0", "/stem/stem.2/Clip_output_0", "/ir1/Add_output_0",
        # ir2 changes shape: no residual, so every layer inside it is a cut
        "/ir2/body/body.0/Conv_output_0", "/ir2/body/body.2/Clip_output_0", "/ir2/body/body.3/Conv_output_0",
        "/ir2/body/body.5/Clip_output_0", "/ir2/body/body.6/Conv_output_0", "/ir3/Add_output_0",
        "/head/head.0/GlobalAveragePool_output_0", "/head/head.1/Flatten_output_0", "logits"]),
    "vit_like": (gm.TinyViT, (1, 1, 28, 28), [
        "/patch/Conv_output_0", "/Reshape_output_0", "/Transpose_output_0", "/Add_output_0",
        "/layers/layers.0/Add_output_0", "/layers/layers.0/Add_1_output_0",   # attention, MLP residuals
        "/layers/layers.1/Add_output_0", "/layers/layers.1/Add_1_output_0",
        "/norm/LayerNormalization_output_0", "/ReduceMean_output_0", "logits"]),
    "densenet_like": (gm.DenseBlockNet, (1, 1, 8, 8), [
        "/stem/Conv_output_0", "/Concat_3_output_0", "/trans/Conv_output_0",
        "/head/head.0/GlobalAveragePool_output_0", "/head/head.1/Flatten_output_0", "logits"]),
    "inception_like": (gm.InceptionLike, (1, 1, 8, 8), [
        "/stem/Conv_output_0", "/Concat_output_0", "/head/head.0/Relu_output_0",
        "/head/head.1/GlobalAveragePool_output_0", "/head/head.2/Flatten_output_0", "logits"]),
    "with_exits": (gm.WithExit, (1, 1, 8, 8), [
        "/stage1/stage1.0/Conv_output_0", "/stage1/stage1.1/Relu_output_0", "/stage2.0/Conv_output_0",
        "/stage2.1/Relu_output_0", "/stage2.2/Conv_output_0", "/stage2.3/Relu_output_0",
        "/head/head.0/GlobalAveragePool_output_0", "/head/head.1/Flatten_output_0", "logits"]),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_models")
    paths = {}
    for name, (build, shape, _) in CASES.items():
        outs = ("logits", "exit1", "exit2") if name == "with_exits" else ("logits",)
        paths[name] = gm.export(build(), shape, root / f"{name}.onnx", output_names=outs)
    return paths


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


@pytest.mark.parametrize("name", list(CASES))
def test_exact_cut_points(exported, name):
    chain = build_chain(load_model(exported[name]))
    assert [b.output for b in chain.blocks] == CASES[name][2]
    assert chain.blocks[0].input == "input"
    assert all(b.input == a.output for a, b in zip(chain.blocks, chain.blocks[1:]))


@pytest.mark.parametrize("name", list(CASES))
def test_chained_single_block_segments_reproduce_model(exported, name):
    model = load_model(exported[name])
    chain = build_chain(model)
    x = np.random.default_rng(1).standard_normal(chain.input_shape).astype(np.float32)
    reference = run(model, {"input": x}, ["logits"])[0]
    t = x
    for block in chain.blocks:
        segment = extract_segment(model, chain, block.index, block.index)
        assert [i.name for i in segment.graph.input] == [block.input]
        assert [o.name for o in segment.graph.output] == [block.output]
        t = run(segment, {block.input: t})[0]
        assert t.shape == block.output_shape
    assert rel_diff(t, reference) <= 1e-4


def test_a_dynamo_export_with_external_weights_splits_into_segments_that_reproduce_it(tmp_path):
    """torch.onnx.export's default since torch 2.9 is the dynamo exporter: opset 18, ReduceMean for the global pool,
    names like ``add_40``, and the weights in a ``.onnx.data`` file beside the model. It loads (weights read from
    that file), cuts at the residual joins like the TorchScript export, and its segments answer as the file does."""
    import warnings

    import torch

    torch.manual_seed(0)
    module = gm.ResNet([gm.Basic(8, 8, 1), gm.Basic(8, 16, 2)], 16).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=True, verbose=False)
    assert (tmp_path / "dynamo.onnx.data").is_file()
    raw = onnx.load(path, load_external_data=False)
    assert raw.opset_import[0].version >= 18
    assert any(init.data_location == TensorProto.EXTERNAL for init in raw.graph.initializer)

    model = load_model(path)
    chain = build_chain(model)
    assert [b.ops.count("Add") for b in chain.blocks].count(1) == 2           # one block per residual join
    assert "ReduceMean" in {op for b in chain.blocks for op in b.ops}
    sample = x[:1].numpy()
    reference = run(onnx.load(path), {"input": sample}, ["logits"])[0]     # the file as exported
    np.testing.assert_allclose(reference, module(x[:1]).detach().numpy(), rtol=1e-4, atol=1e-5)
    t = sample
    for block in chain.blocks:
        t = run(extract_segment(model, chain, block.index, block.index), {block.input: t})[0]
    assert rel_diff(t, reference) <= 1e-4


def test_model_local_functions_are_inlined_so_their_ops_are_costed_cut_and_imported(tmp_path):
    """A call of a model-local function was one block, costed as one elementwise op, which TVM could not import
    (the segment shipped as ONNX Runtime). Loading inlines it: its Conv and Relu are blocks of their own."""
    from distree.targets.toolchain import tvm_unsupported_ops

    original = gm.with_local_function()
    onnx.checker.check_model(original)
    onnx.save(original, tmp_path / "local.onnx")
    model = load_model(tmp_path / "local.onnx")
    assert not model.functions and {o.domain for o in model.opset_import} == {""}
    chain = build_chain(model)
    assert [b.ops for b in chain.blocks][:4] == [("Conv",), ("Relu",), ("Conv",), ("Relu",)]
    assert chain.blocks[0].flops == 2 * 8 * 28 * 28 * 1 * 9 and chain.blocks[1].output == "a"
    assert tvm_unsupported_ops(model) == {}
    x = np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"input": x})[0], run(original, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_exits_attach_where_their_heads_read_and_segments_carry_them(exported):
    model = load_model(exported["with_exits"])
    chain = build_chain(model)
    assert chain.output_name == "logits" and chain.exit_outputs == ("exit1", "exit2")
    heads = exit_heads(model, chain)
    assert exit_attachments(model, chain) == {"exit1": 1, "exit2": 3}
    assert not set(heads["exit1"].nodes) & {n for b in chain.blocks for n in b.nodes}  # heads are in no block
    assert heads["exit1"].flops > 0 and heads["exit1"].param_bytes == (8 * 10 + 10) * 4

    x = np.random.default_rng(2).standard_normal(chain.input_shape).astype(np.float32)
    logits, exit1, exit2 = run(model, {"input": x})
    first = extract_segment(model, chain, 0, 3, extra_outputs=("exit1", "exit2"))
    cut, e1, e2 = run(first, {"input": x})
    assert rel_diff(e1, exit1) <= 1e-4 and rel_diff(e2, exit2) <= 1e-4
    rest = extract_segment(model, chain, 4, len(chain.blocks) - 1)
    assert rel_diff(run(rest, {chain.blocks[4].input: cut})[0], logits) <= 1e-4
    # exit2 reads a tensor inside block 3's range: a segment ending before it cannot carry it
    with pytest.raises(DistreeError, match="not computed"):
        extract_segment(model, chain, 0, 2, extra_outputs=("exit2",))
    with pytest.raises(DistreeError, match="not computed"):
        extract_segment(model, chain, 3, 5, extra_outputs=("exit1",))
    # a head that reads the segment's input cut is computable there
    assert rel_diff(run(extract_segment(model, chain, 2, 5, extra_outputs=("exit1",)),
                        {chain.blocks[2].input: run(extract_segment(model, chain, 0, 1), {"input": x})[0]})[1],
                    exit1) <= 1e-4


@pytest.mark.parametrize("name", ["resnet_basic", "inception_like", "with_exits", "vit_like"])
def test_file_node_order_does_not_change_the_chain(exported, tmp_path, name):
    original = onnx.load(exported[name])
    expected = build_chain(load_model(exported[name]))
    for variant, reordered in [("late", gm.reorder(original, 0, side_branches_late=True)),
                               ("r1", gm.reorder(original, 1)), ("r2", gm.reorder(original, 2))]:
        if variant != "late":
            assert [n.name for n in reordered.graph.node] != [n.name for n in original.graph.node]
        path = tmp_path / f"{variant}.onnx"
        onnx.save(reordered, path)
        assert build_chain(load_model(path)) == expected


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "inception_like", "vit_like"])
def test_live_set_cuts_are_the_same_in_every_topological_order(exported, name):
    """The cut test is order-independent by proof; check it on random valid orders of the backbone."""
    model = load_model(exported[name])
    index = GraphIndex(model)
    expected = [t for t, _ in find_cuts(index)]
    backbone = index.backbone_order
    orders = {tuple(n.name for n in backbone)}
    for seed in range(8):
        shuffled = _random_topological_order(index, backbone, random.Random(seed))
        orders.add(tuple(n.name for n in shuffled))
        index.__dict__["backbone_order"] = shuffled  # replace the cached order
        assert [t for t, _ in find_cuts(index)] == expected
    assert len(orders) > 1


def _random_topological_order(index, nodes, rng):
    producer = {o: n.name for n in nodes for o in n.output}
    deps = {n.name: {producer[t] for t in index.inputs[n.name] if t in producer} for n in nodes}
    done, order = set(), []
    while len(order) < len(nodes):
        ready = [n for n in nodes if n.name not in done and deps[n.name] <= done]
        pick = rng.choice(ready)
        order.append(pick)
        done.add(pick.name)
    return order


def test_recurrent_layers_cost_their_products_and_gates(tmp_path):
    """An LSTM was costed as one elementwise op (1.5k FLOPs for a 1.2M-FLOP bidirectional layer): the estimates
    then priced it at nothing."""
    path = gm.export(gm.ConvGru(), (1, 1, 28, 28), tmp_path / "gru.onnx")
    (gru,) = [b for b in build_chain(load_model(path)).blocks if b.ops == ("GRU",)]
    assert gru.flops == 14 * 1 * (2 * 3 * 16 * (8 * 14 + 16) + 8 * 16)      # steps * batch * (products + gates)
    path = gm.export(gm.RowsBiLstm(), (1, 1, 28, 28), tmp_path / "lstm.onnx")
    (lstm,) = [b for b in build_chain(load_model(path)).blocks if "LSTM" in b.ops]
    assert lstm.flops == 28 * 2 * (2 * 4 * 12 * (28 + 12) + 10 * 12)         # 28 steps, 2 directions


def test_einsum_costs_its_contraction(tmp_path):
    """Attention written with Einsum (``bhqd,bhkd->bhqk``) was costed as one elementwise op per output."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 16, 8])
    k = numpy_helper.from_array(np.ones((1, 4, 16, 8), np.float32), "k")
    graph = helper.make_graph([helper.make_node("Einsum", ["q", "k"], ["s"], equation="bhqd,bhkd->bhqk"),
                               helper.make_node("Relu", ["s"], ["y"])], "g", [q],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "einsum.onnx")
    (einsum, relu) = build_chain(load_model(tmp_path / "einsum.onnx")).blocks
    assert einsum.flops == 2 * 1 * 4 * 16 * 8 * 16 and relu.flops == 4 * 16 * 16


def test_int8_qoperator_ops_cost_their_float_twins_products(exported, tmp_path):
    """ONNX Runtime's QOperator ops: QGemm was costed as one op per output (10 FLOPs for a 31k-FLOP classifier)
    and QLinearGlobalAveragePool per output instead of per input; a QLinearConv's bias is not counted (its
    int32 bias is added in the accumulator)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    chain = build_chain(load_model(gm.quantize(exported["plain_cnn"], x, tmp_path / "cnn.onnx")))
    assert [b.flops for b in chain.blocks if b.ops == ("QLinearConv",)] == [2 * 8 * 28 * 28 * 1 * 9,
                                                                           2 * 16 * 14 * 14 * 8 * 9]
    (gemm,) = [b.flops for b in chain.blocks if b.ops == ("QGemm",)]
    assert gemm == 2 * 10 * 16 * 14 * 14 + 10                                 # products + bias
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    chain = build_chain(load_model(gm.quantize(exported["resnet_basic"], x, tmp_path / "resnet.onnx")))
    (pool,) = [b for b in chain.blocks if b.ops == ("QLinearGlobalAveragePool",)]
    assert pool.flops == 16 * 8 * 8                                           # one per input element


def test_costs_follow_the_documented_convention(exported):
    chain = build_chain(load_model(exported["plain_cnn"]))
    conv1, relu1, pool, conv2, _, flat, fc = chain.blocks
    assert conv1.flops == 2 * 8 * 28 * 28 * 1 * 9 + 8 * 28 * 28       # 2*MACs + bias
    assert conv1.param_bytes == (8 * 9 + 8) * 4
    assert relu1.flops == 8 * 28 * 28
    assert pool.flops == 8 * 14 * 14 * 4                                # out numel * kernel
    assert conv2.flops == 2 * 16 * 14 * 14 * 8 * 9 + 16 * 14 * 14
    assert flat.flops == 0
    assert fc.flops == 2 * 10 * 3136 + 10 and fc.param_bytes == (3136 * 10 + 10) * 4
    assert conv1.out_bytes == 8 * 28 * 28 * 4 and conv1.output_dtype == "float32"
    assert conv1.workspace_bytes == 28 * 28 * 4 + 8 * 28 * 28 * 4       # input + output live together
    assert chain.input_shape == (1, 1, 28, 28) and chain.input_bytes == 28 * 28 * 4


def test_residual_block_workspace_holds_the_skip(exported):
    chain = build_chain(load_model(exported["resnet_basic"]))
    block = chain.blocks[2]                                             # conv-relu-conv + skip, 8x16x16
    act = 8 * 16 * 16 * 4
    assert block.ops == ("Conv", "Relu", "Conv", "Add")
    assert block.workspace_bytes == 3 * act                             # skip input + two live activations


def test_constant_subgraphs_do_not_block_cuts_and_are_copied_into_segments(tmp_path):
    path = tmp_path / "const.onnx"
    onnx.save(gm.residual_with_constant_subgraph(), path)
    model = load_model(path)
    chain = build_chain(model)
    assert [b.output for b in chain.blocks] == ["a", "c", "d", "e", "y"]
    assert all("w_dequantize" not in b.nodes for b in chain.blocks)
    assert not {"shape_const", "shape_identity"} & {n.name for n in model.graph.node}     # folded at load
    x = np.random.default_rng(3).standard_normal((1, 4)).astype(np.float32)
    reference = run(model, {"x": x})[0]
    t = x
    for block in chain.blocks:
        segment = extract_segment(model, chain, block.index, block.index)
        t = run(segment, {block.input: t})[0]
    assert rel_diff(t, reference) <= 1e-6
    mul_e = extract_segment(model, chain, 3, 3)
    assert {n.name for n in mul_e.graph.node} == {"mul_e", "w_dequantize"}


def test_dynamic_batch_model_loads_at_any_batch_and_folds_shape_arithmetic(exported):
    raw = onnx.load(exported["vit_like"])
    assert any(n.op_type == "Shape" for n in raw.graph.node)           # exporter's b, n, d = x.shape
    model = load_model(exported["vit_like"], {"input": (3, 1, 28, 28)})
    assert not any(n.op_type == "Shape" for n in model.graph.node)
    chain = build_chain(model)
    assert [b.output for b in chain.blocks] == CASES["vit_like"][2]   # same names at every batch
    assert chain.blocks[-1].output_shape == (3, 10)
    x = np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)
    reference = run(model, {"input": x})[0]
    mid = 5
    head = run(extract_segment(model, chain, 0, mid), {"input": x})[0]
    tail = run(extract_segment(model, chain, mid + 1, len(chain.blocks) - 1), {chain.blocks[mid].output: head})[0]
    assert rel_diff(tail, reference) <= 1e-4


def _computed_from_constants(model: onnx.ModelProto) -> list[str]:
    known = {t.name for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            known.update(node.output)
        elif all(t in known for t in node.input if t):
            known.update(node.output)
            found.append(node.name)
    return found


def test_torch_attention_loads_with_literal_shapes_and_tvm_imports_it(tmp_path, capfd):
    """nn.MultiheadAttention's export computes reshape targets from Shape; TVM's ONNX importer rejects a
    computed target ("Reshape requires the input new shape to be Shape"), so distree folds all of it. Its q/k/v
    are picked by Gathers of one constant index, which TVM builds as "fast" takes that log a segfault warning
    each: they reach TVM as slices."""
    from distree.compiler.tvm_build import compile_segment
    from distree.runtime.backends import tvm_runner
    from distree.targets import get_device

    path = gm.export(gm.MhaViT(), (1, 1, 28, 28), tmp_path / "mha.onnx")
    raw = onnx.load(path)
    assert sum(n.op_type in ("Gather", "Concat", "Slice", "Cast") for n in raw.graph.node) >= 10
    model = load_model(path)
    assert _computed_from_constants(model) == []
    x = np.random.default_rng(6).standard_normal((1, 1, 28, 28)).astype(np.float32)
    reference = run(raw, {"input": x})[0]
    assert rel_diff(run(model, {"input": x})[0], reference) <= 1e-6
    chain = build_chain(model)
    whole = extract_segment(model, chain, 0, len(chain.blocks) - 1)
    assert sum(n.op_type == "Gather" for n in whole.graph.node) >= 6
    capfd.readouterr()
    got = tvm_runner(compile_segment(whole, get_device("host"), tmp_path / "mha.so").path)(x)[0]
    assert rel_diff(got, reference) <= 1e-4
    assert "Fast mode segfaults" not in capfd.readouterr().err


def test_constant_folding_leaves_weights_and_graph_outputs(tmp_path):
    onnx.save(gm.constants_beside_weights(), tmp_path / "c.onnx")
    model = load_model(tmp_path / "c.onnx")
    assert {n.name for n in model.graph.node} == {"wt", "xw", "y", "root_out"}   # the Constant went unread
    assert {t.name for t in model.graph.initializer} == {"W", "root", "scale"}     # "four" went unread
    x = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)
    y, root = run(model, {"x": x})
    np.testing.assert_allclose(root, np.sqrt(2.0), rtol=1e-6)
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W"))
    np.testing.assert_allclose(y, x @ w.T * np.sqrt(2.0) / 4, rtol=1e-5)


def test_constant_folding_never_materialises_a_big_constant(tmp_path):
    """A ConstantOfShape whose output inference knows to be 256 MB, and a 32k-float Constant node (weights as
    some exporters write them), stay nodes: loading neither computes nor copies them."""
    import tracemalloc

    big = np.ones((128, 64), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["dims"], value=numpy_helper.from_array(np.array([8192, 8192], np.int64))),
        helper.make_node("ConstantOfShape", ["dims"], ["mask"], name="mask"),
        helper.make_node("ReduceMax", ["mask"], ["one"], name="one", keepdims=0),
        helper.make_node("Constant", [], ["w"], name="w", value=numpy_helper.from_array(np.tile(big, (4, 1)))),
        helper.make_node("Transpose", ["w"], ["wt"], name="wt", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["xw"], name="xw"),
        helper.make_node("Mul", ["xw", "one"], ["y"], name="y"),
    ]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx")
    tracemalloc.start()
    model = load_model(tmp_path / "big.onnx")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert {"mask", "one", "w", "wt"} <= {n.name for n in model.graph.node}
    assert peak < 32 * 2 ** 20, peak


def test_chain_json_round_trip(exported, tmp_path):
    chain = build_chain(load_model(exported["with_exits"]))
    chain.save(tmp_path / "chain.json")
    assert Chain.load(tmp_path / "chain.json") == chain


def test_coarsen_keeps_cheapest_cuts_and_sums_costs(exported):
    model = load_model(exported["resnet_basic"])
    chain = build_chain(model)
    small = coarsen(chain, 3)
    assert len(small.blocks) == 3
    # the two smallest activations cross the cuts after global pooling and flatten (64 B each)
    assert [b.output for b in small.blocks] == ["/pool/GlobalAveragePool_output_0", "/Flatten_output_0", "logits"]
    assert sum(b.flops for b in small.blocks) == sum(b.flops for b in chain.blocks)
    assert small.blocks[0].workspace_bytes == max(b.workspace_bytes for b in chain.blocks[:7])
    assert [b.index for b in small.blocks] == [0, 1, 2]
    assert coarsen(chain, 50) == chain
    # merged blocks still extract and chain correctly
    x = np.random.default_rng(5).standard_normal(chain.input_shape).astype(np.float32)
    t = x
    for b in small.blocks:
        t = run(extract_segment(model, small, b.index, b.index), {b.input: t})[0]
    assert rel_diff(t, run(model, {"input": x}, ["logits"])[0]) <= 1e-4


def test_coarsen_breaks_ties_towards_balanced_flops():
    from distree.graph.chain import Block

    blocks = tuple(
        Block(index=i, nodes=(f"n{i}",), ops=("Relu",), input=f"t{i}", output=f"t{i + 1}", output_shape=(1,),
              output_dtype="float32", flops=100, param_bytes=0, out_bytes=4, workspace_bytes=8)
        for i in range(8)
    )
    chain = Chain(model_sha256="x", input_name="t0", input_shape=(1,), input_dtype="float32",
                  output_name="t8", exit_outputs=(), blocks=blocks)
    assert [b.flops for b in coarsen(chain, 2).blocks] == [400, 400]
    assert [b.flops for b in coarsen(chain, 4).blocks] == [200, 200, 200, 200]
    assert [b.output for b in coarsen(chain, 2, keep=("t1",)).blocks] == ["t1", "t8"]
    assert [b.flops for b in coarsen(chain, 3, keep=("t1",)).blocks] == [100, 300, 400]
    with pytest.raises(DistreeError, match="at least 3 blocks"):
        coarsen(chain, 2, keep=("t1", "t2"))
    with pytest.raises(DistreeError, match="not a block output"):
        coarsen(chain, 3, keep=("nope",))


def test_final_output_can_be_named(exported):
    model = load_model(exported["with_exits"])
    chain = build_chain(model, final_output="exit2")
    assert chain.output_name == "exit2" and chain.exit_outputs == ("logits", "exit1")
    assert chain.blocks[-1].output == "exit2"
    with pytest.raises(DistreeError, match="not a graph output"):
        build_chain(model, final_output="nope")


def test_shapes_inference_cannot_find_come_from_running_the_model(tmp_path):
    """A com.microsoft op has no ONNX shape function: its output shape is taken from onnxruntime."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("Gelu", ["a"], ["b"], name="g", domain="com.microsoft"),
             helper.make_node("Neg", ["b"], ["y"], name="n")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", "K"])])
    path = tmp_path / "ms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]), path)
    model = load_model(path, {"x": (2, 3)})
    chain = build_chain(model)
    assert [(b.output, b.output_shape) for b in chain.blocks] == [("a", (2, 3)), ("b", (2, 3)), ("y", (2, 3))]
    x = np.random.default_rng(6).standard_normal((2, 3)).astype(np.float32)
    mid = run(extract_segment(model, chain, 0, 1), {"x": x})[0]
    assert rel_diff(run(extract_segment(model, chain, 2, 2), {"b": mid})[0], run(model, {"x": x})[0]) <= 1e-6
