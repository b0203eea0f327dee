"""Static cost of nodes: FLOPs and bytes, from inferred shapes.

FLOP convention (one multiply-add = 2 FLOPs; a rough compute measure for the solver and estimates):

- Conv: 2 * out_numel * (Cin/group) * prod(kernel), + out_numel for the bias.
- ConvTranspose: 2 * in_numel * (Cout/group) * prod(kernel), + out_numel for the bias.
- MatMul: 2 * out_numel * K; Gemm: 2 * M * N * K, + M * N for C.
- Windowed pooling: out_numel * prod(kernel); global pooling and reductions: in_numel.
- BatchNormalization / InstanceNormalization: 2 * numel; LayerNormalization / GroupNormalization: 5 * numel;
  Softmax / LogSoftmax: 5 * numel; Gelu: 8 * numel.
- Einsum: 2 * the product of every index's size (a contraction's multiply-adds); no ellipsis: out_numel.
- ONNX Runtime's int8 ops cost as their float twins: QLinearConv (its bias, added in the int32 accumulator,
  not counted), QLinearMatMul, QGemm (with its C), QLinearGlobalAveragePool / QLinearAveragePool; QLinearConcat
  moves data.
- LSTM / GRU / RNN: per step, sample and direction, 2 * gates * hidden * (input + hidden) for the input and
  recurrent products, + 10 / 8 / 2 * hidden for the gates (gates: 4 / 3 / 1).
- Pure data movement (Reshape, Transpose, Concat, Slice, Gather, Pad, Cast, Identity, Flatten, ...): 0.
- Everything else (elementwise arithmetic, activations, unknown ops): out_numel per output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod

import numpy as np
import onnx
from onnx import helper

_MOVEMENT = frozenset(
    """Reshape Transpose Concat Split Slice Gather GatherElements GatherND Squeeze Unsqueeze Flatten Identity
    Pad Cast CastLike Expand Tile Shape Size Constant ConstantOfShape Dropout DepthToSpace SpaceToDepth
    ScatterND ScatterElements Range NonZero TopK ArgMax ArgMin Resize Upsample QLinearConcat""".split()
)
_REDUCE = frozenset(
    """GlobalAveragePool GlobalMaxPool GlobalLpPool QLinearGlobalAveragePool ReduceMean ReduceSum ReduceMax
    ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare""".split()
)
_RECURRENT_GATE_FLOPS = {"LSTM": 10, "GRU": 8, "RNN": 2}     # elementwise FLOPs per hidden unit and step
_PER_ELEMENT = {
    "BatchNormalization": 2,
    "InstanceNormalization": 2,
    "LayerNormalization": 5,
    "GroupNormalization": 5,
    "SimplifiedLayerNormalization": 4,
    "Softmax": 5,
    "LogSoftmax": 5,
    "Gelu": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and element type of one tensor."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@lru_cache(maxsize=None)
def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 4


@lru_cache(maxsize=None)
def np_dtype_name(elem_type: int) -> str:
    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return "float32"


def tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Shapes of every tensor whose shape is fully static: initializers, inputs, value_info, outputs."""
    infos: dict[str, TensorInfo] = {}
    for t in model.graph.initializer:
        infos[t.name] = TensorInfo(tuple(int(d) for d in t.dims), np_dtype_name(t.data_type))
    for v in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        if all(d >= 0 for d in dims):
            infos[v.name] = TensorInfo(dims, np_dtype_name(tt.elem_type))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None and value.type == onnx.AttributeProto.TENSOR:
                infos[node.output[0]] = TensorInfo(tuple(int(d) for d in value.t.dims), np_dtype_name(value.t.data_type))
    return infos


def _einsum_flops(equation: str, ins: list, out: TensorInfo) -> int:
    """2 * prod(size of every index) for an explicit equation such as ``bhqd,bhkd->bhqk``; out_numel otherwise."""
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if "." in equation or len(terms) != len(ins) or any(
            info is None or len(info.shape) != len(term) for info, term in zip(ins, terms)):
        return out.numel
    sizes = {letter: dim for term, info in zip(terms, ins) for letter, dim in zip(term, info.shape)}
    return 2 * prod(sizes.values())


def node_flops(node: onnx.NodeProto, infos: dict[str, TensorInfo]) -> int:
    """FLOPs of one node under the convention in the module docstring; 0 when shapes are unknown."""
    op = node.op_type
    ins = [infos.get(i) for i in node.input]
    outs = [infos.get(o) for o in node.output if o]
    out = outs[0] if outs else None
    if op in _MOVEMENT or out is None:
        return 0
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[1] if op != "QLinearConv" else ins[3]
        if w is None:
            return 0
        bias = out.numel if len(node.input) > 2 and node.input[2] and op == "Conv" else 0
        return 2 * out.numel * prod(w.shape[1:]) + bias
    if op == "ConvTranspose":
        x, w = ins[0], ins[1]
        if x is None or w is None:
            return 0
        bias = out.numel if len(node.input) > 2 and node.input[2] else 0
        return 2 * x.numel * prod(w.shape[1:]) + bias
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = ins[0]
        return 2 * out.numel * a.shape[-1] if a is not None and a.shape else 0
    if op in ("Gemm", "QGemm"):                     # QGemm (ONNX Runtime's int8 Gemm): its C is input 6
        a = ins[0]
        if a is None or len(a.shape) != 2:
            return 0
        k = a.shape[0] if attrs.get("transA", 0) else a.shape[1]
        c_at = 2 if op == "Gemm" else 6
        bias = out.numel if len(node.input) > c_at and node.input[c_at] else 0
        return 2 * out.numel * k + bias
    if op == "Einsum":
        return _einsum_flops(attrs.get("equation", b"").decode(), ins, out)
    if op in _RECURRENT_GATE_FLOPS:
        x, w, r = (ins + [None, None, None])[:3]
        if x is None or w is None or r is None or len(x.shape) != 3:
            return 0
        steps_times_batch = x.shape[0] * x.shape[1]          # (seq, batch, input) or, layout 1, (batch, seq, input)
        directions, gates_hidden, inputs = w.shape
        hidden = r.shape[-1]
        return steps_times_batch * directions * (2 * gates_hidden * (inputs + hidden)
                                                 + _RECURRENT_GATE_FLOPS[op] * hidden)
    if op in ("MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"):
        return out.numel * prod(attrs.get("kernel_shape", [1]))
    if op in _REDUCE:
        return ins[0].numel if ins and ins[0] is not None else out.numel
    return _PER_ELEMENT.get(op, 1) * sum(o.numel for o in outs if o is not None)
