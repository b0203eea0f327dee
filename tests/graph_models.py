"""Small models for the graph tests, built with torch (exported to ONNX) or onnx.helper.

Each torch builder returns the exported ONNX path; tests name expected cut points by the exporter's node
names (module path + op), which are stable for the legacy TorchScript exporter.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def export(module: nn.Module, shape: tuple[int, ...], path: Path, dynamic_batch: bool = True,
           output_names: tuple[str, ...] = ("logits",)) -> Path:
    torch.manual_seed(0)
    module.eval()
    x = torch.randn(*shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module(x)  # materialise lazy layers
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, input_names=["input"], output_names=list(output_names),
            dynamic_axes={"input": {0: "N"}, **{o: {0: "N"} for o in output_names}} if dynamic_batch else None,
            opset_version=17,
        )
    return path


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(self.flat(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))))


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + skip)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Stem, then ``blocks`` (basic or bottleneck), global pool, linear head."""

    def __init__(self, blocks: list[nn.Module], width: int, cin: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, blocks_in(blocks), 3, 1, 1, bias=False), nn.BatchNorm2d(blocks_in(blocks)), nn.ReLU())
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def blocks_in(blocks: list[nn.Module]) -> int:
    first = blocks[0]
    conv = first.conv1 if isinstance(first, Basic) else first.body[0]
    return conv.in_channels


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
            nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.ir1 = InvertedResidual(8, 8, 1)
        self.ir2 = InvertedResidual(8, 16, 2)
        self.ir3 = InvertedResidual(16, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.ir3(self.ir2(self.ir1(self.stem(x)))))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, 4) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(self.norm(self.layers(x)).mean(dim=1))


class ConvGru(nn.Module):
    """A conv front end, then a GRU over the feature map's rows, time-major as torch's default (L, N, D): a
    tensor whose first axis is not the batch, and an op (GRU) TVM 0.27's importer lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU())
        self.gru = nn.GRU(8 * 14, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        rows = self.conv(x).permute(2, 0, 1, 3).flatten(2)         # (14 rows, N, 8 * 14)
        _, h = self.gru(rows)
        return self.fc(h[0])


class RowsBiLstm(nn.Module):
    """The image's 28 rows as a sequence (batch first) through a bidirectional LSTM, mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, 12, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.lstm(x.squeeze(1))[0].mean(1))


class MhaViT(nn.Module):
    """A ViT built from torch's own ``nn.MultiheadAttention``: its export computes every reshape's target
    from ``Shape`` through Gather/Unsqueeze/Concat/Slice/Cast arithmetic, which TVM's importer rejects
    unless distree folds it to constants."""

    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attention = nn.ModuleList(nn.MultiheadAttention(dim, 4, batch_first=True) for _ in range(depth))
        self.fc = nn.Linear(dim, 10)

    @torch.enable_grad()        # under no_grad torch takes a fused fast path the ONNX exporter cannot export
    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for norm, attention in zip(self.norms, self.attention):
            a = norm(x)
            x = x + attention(a, a, a, need_weights=False)[0]
        return self.fc(x.mean(dim=1))


def constants_beside_weights() -> onnx.ModelProto:
    """y = x @ transpose(W) * scale, with scale = sqrt(2) / 4 computed by Constant arithmetic, and the
    arithmetic's value also a graph output: the scalar chain folds, the weight's transpose and the graph
    output stay."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Sqrt", ["two"], ["root"], name="root"),
        helper.make_node("Div", ["root", "four"], ["scale"], name="scale"),
        helper.make_node("Transpose", ["W"], ["WT"], name="wt", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "WT"], ["xw"], name="xw"),
        helper.make_node("Mul", ["xw", "scale"], ["y"], name="y"),
        helper.make_node("Identity", ["root"], ["root_out"], name="root_out"),
    ]
    graph = helper.make_graph(
        nodes, "constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96]),
         helper.make_tensor_value_info("root_out", TensorProto.FLOAT, [])],
        initializer=[w, numpy_helper.from_array(np.array(4.0, np.float32), "four")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class DenseBlockNet(nn.Module):
    """Stem, one DenseNet block (each layer reads the concat of all before), transition, head."""

    def __init__(self, growth: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dense = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(8 + i * growth, growth, 3, padding=1)) for i in range(layers)
        )
        self.trans = nn.Conv2d(8 + layers * growth, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.dense:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(self.trans(torch.cat(feats, 1)))


class InceptionLike(nn.Module):
    """Stem, a 3-branch Inception module concatenated, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 4, 1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))

    def forward(self, x):
        s = self.stem(x)
        return self.head(torch.cat([self.b1(s), self.b2(s), self.b3(s)], 1))


class WithExit(nn.Module):
    """Plain CNN whose first stage also feeds an exit head (second output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.exit1 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        a = self.stage1(x)
        # the exit reads a tensor inside stage2 too (after its first conv): it attaches after that block
        b = self.stage2[1](self.stage2[0](a))
        c = self.stage2[3](self.stage2[2](b))
        return self.head(c), self.exit1(a), self.exit1(b) * 0.5


# --- onnx.helper models ----------------------------------------------------------------------------------


def with_local_function() -> onnx.ModelProto:
    """Two calls of a model-local function ``local.ConvRelu`` (Conv + Relu), then pool, flatten, MatMul: how
    exporters that keep module boundaries write a model."""
    rng = np.random.default_rng(0)
    fn = helper.make_function("local", "ConvRelu", ["x", "w"], ["y"],
                              [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                               helper.make_node("Relu", ["c"], ["y"])], [helper.make_opsetid("", 17)])
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 1, 3, 3)), ("w2", (8, 8, 3, 3)), ("fc", (8, 10)))]
    nodes = [helper.make_node("ConvRelu", ["input", "w1"], ["a"], domain="local", name="block1"),
             helper.make_node("ConvRelu", ["a", "w2"], ["b"], domain="local", name="block2"),
             helper.make_node("GlobalAveragePool", ["b"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights)
    return helper.make_model(graph, functions=[fn],
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def residual_with_constant_subgraph() -> onnx.ModelProto:
    """x -> Relu -> (Mul by DequantizeLinear(int8 weight)) + skip -> Relu -> Reshape(shape from
    Identity(Constant)) -> out. Loading folds the shape's arithmetic but keeps the dequantization (as in a QDQ
    model), a constant subgraph two blocks read."""
    w = numpy_helper.from_array(np.full((1, 4), 1, np.int8), "w")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "w_scale")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu_a"),
        helper.make_node("DequantizeLinear", ["w", "w_scale"], ["w_id"], name="w_dequantize"),
        helper.make_node("Constant", [], ["shape_c"], name="shape_const",
                         value=numpy_helper.from_array(np.array([1, 4], np.int64))),
        helper.make_node("Identity", ["shape_c"], ["shape"], name="shape_identity"),
        helper.make_node("Mul", ["a", "w_id"], ["b"], name="mul_b"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add_c"),
        helper.make_node("Relu", ["c"], ["d"], name="relu_d"),
        helper.make_node("Mul", ["d", "w_id"], ["e"], name="mul_e"),
        helper.make_node("Reshape", ["e", "shape"], ["y"], name="reshape_y"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, scale],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reorder(model: onnx.ModelProto, seed: int, side_branches_late: bool = False) -> onnx.ModelProto:
    """Same graph, nodes listed in another valid topological order (random, or side branches as late as possible)."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    deps = [{producer[t] for t in n.input if t in producer} for n in graph.node]
    rng = random.Random(seed)
    done: set[int] = set()
    order: list[int] = []
    depth = _depth_to_end(deps)
    while len(order) < len(graph.node):
        ready = [i for i in range(len(graph.node)) if i not in done and deps[i] <= done]
        if side_branches_late:
            # prefer nodes on the longest remaining path: the main path runs first, branches late
            pick = max(ready, key=lambda i: (depth[i], -i))
        else:
            pick = rng.choice(ready)
        order.append(pick)
        done.add(pick)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(graph.node[i] for i in order)
    return out


def _depth_to_end(deps: list[set[int]]) -> list[int]:
    """Length of the longest path from each node to a sink."""
    depth = [1] * len(deps)
    for i in reversed(range(len(deps))):  # the original order is topological
        for p in deps[i]:
            depth[p] = max(depth[p], depth[i] + 1)
    return depth


def quantize(source: Path, x: np.ndarray, out: Path, quant_format: str = "QOperator") -> Path:
    """ONNX Runtime's static int8 quantization of ``source`` calibrated on ``x``, in its QOperator format
    (QLinearConv, QLinearAdd, QGemm, ...) or its QDQ format (QuantizeLinear -> DequantizeLinear around float ops)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared))          # folds the exporter's constants into initializers

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"input": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat[quant_format],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out
