"""What gets profiled: every block of the chain and every exit head, each as a standalone ONNX model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx.shape_inference
import onnx.utils
from onnx import TensorProto, helper

from distree.errors import DistreeError
from distree.exits.types import SCORE_KINDS, ExitPoint
from distree.graph import Chain, extract_segment
from distree.graph.cost import node_flops, tensor_infos
from distree.profiler.items import CALL_ITEM, HOP_ITEMS, block_item, decide_item, entry_item, exit_item


@dataclass(frozen=True)
class Unit:
    """One profiled item: a block (``block:<i>``), an exit head (``exit:<name>``), the entry head that the
    ``stability`` score of an exit also needs (``entry:<name>``), or an empty ``call``."""

    item: str
    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    flops: int
    dense_flops: int        # of Conv / Gemm / MatMul nodes (the rest is elementwise, pooling, normalization)
    param_bytes: int        # bytes of the unit model's initializers (what its artifact carries)
    io_bytes: int           # input + output bytes
    workspace_bytes: int    # the graph's working-set estimate (fallback when TVM cannot plan memory)
    num_ops: int
    sha256: str             # of the serialized unit model

    def sample_input(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.input_shape).astype(self.input_dtype)


CALL_WIDTH = 16


def profile_units(model: onnx.ModelProto, chain: Chain, exits: Sequence[ExitPoint] = (),
                  items: Sequence[str] | None = None) -> tuple[Unit, ...]:
    """Blocks in chain order, then exit heads by depth, then the call; ``items`` keeps only those named
    (``decide:``, ``rpc`` and ``serve:`` are known here but are no models: the profiler times them itself)."""
    wanted = None if items is None else set(items)
    with_entry = [e for e in exits if e.entry_output]
    known = ([block_item(b.index) for b in chain.blocks] + [exit_item(e.name) for e in exits]
             + [entry_item(e.name) for e in with_entry] + [CALL_ITEM, *HOP_ITEMS]
             + [decide_item(k) for k in SCORE_KINDS])
    if wanted is not None and wanted - set(known):
        bad = sorted(wanted - set(known))[0]
        raise DistreeError(f"no item {bad!r} to profile; items are {', '.join(known)}")
    units = []
    for b in chain.blocks:
        if wanted is None or block_item(b.index) in wanted:
            seg = extract_segment(model, chain, b.index, b.index)
            units.append(unit_from_model(block_item(b.index), seg, b.flops, b.workspace_bytes))
    for e in sorted(exits, key=lambda e: (e.after_block, e.name)):
        if wanted is None or exit_item(e.name) in wanted:
            head = _head_model(model, chain, e, chain.blocks[e.after_block].output, e.name)
            units.append(unit_from_model(exit_item(e.name), head, e.flops, 0))
    for e in sorted(with_entry, key=lambda e: (e.after_block, e.name)):
        if wanted is None or entry_item(e.name) in wanted:
            head = _head_model(model, chain, e, chain.blocks[e.after_block].input, e.entry_output)
            units.append(unit_from_model(entry_item(e.name), head, e.entry_flops, 0))
    if wanted is None or CALL_ITEM in wanted:
        units.append(call_unit())
    return tuple(units)


def call_unit() -> Unit:
    """One Relu over 16 floats: no work to speak of, what it measures is the fixed cost of a call, which
    every other unit of the same device and backend also carries (see :mod:`distree.profiler.dispatch`)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], CALL_ITEM,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CALL_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CALL_WIDTH])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="distree")
    onnx.checker.check_model(model)
    return unit_from_model(CALL_ITEM, model, CALL_WIDTH)


def _head_model(model: onnx.ModelProto, chain: Chain, exit: ExitPoint, cut: str, output: str) -> onnx.ModelProto:
    """A head alone: from ``cut`` (the exit's cut tensor, or its block's input for the entry head) to ``output``."""
    if not 0 <= exit.after_block < len(chain.blocks):
        raise DistreeError(f"exit {exit.name!r} attaches after block {exit.after_block}, outside the chain")
    try:
        head = onnx.utils.Extractor(model).extract_model([cut], [output])
    except Exception as exc:  # onnx raises bare errors for tensors that are not in the graph
        raise DistreeError(f"cannot cut head {output!r} of exit {exit.name!r} at {cut!r}: {exc}; is it an output of the "
                           "model?") from exc
    onnx.checker.check_model(head)
    return head


def unit_from_model(item: str, m: onnx.ModelProto, flops: int, workspace_bytes: int = 0) -> Unit:
    """Any single-input ONNX model with static shapes as a profiling unit (e.g. a whole segment)."""
    shapes = _static_shapes(m)
    (inp,) = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    in_shape, in_dtype = shapes[inp.name]
    io = _nbytes(in_shape, in_dtype) + sum(_nbytes(*shapes[o.name]) for o in m.graph.output)
    params = sum(onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    data = m.SerializeToString(deterministic=True)
    return Unit(item=item, model=m, input_name=inp.name, input_shape=in_shape, input_dtype=in_dtype, flops=flops,
                dense_flops=min(flops, _dense_flops(m)), param_bytes=params, io_bytes=io, workspace_bytes=workspace_bytes, num_ops=len(m.graph.node),
                sha256=hashlib.sha256(data).hexdigest())


_DENSE_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "QGemm", "MatMul",
                        "MatMulInteger", "QLinearMatMul"})


def _dense_flops(m: onnx.ModelProto) -> int:
    inferred = onnx.shape_inference.infer_shapes(m)
    infos = tensor_infos(inferred)
    return sum(node_flops(n, infos) for n in inferred.graph.node if n.op_type in _DENSE_OPS)


def _static_shapes(m: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for v in [*m.graph.input, *m.graph.output]:
        t = v.type.tensor_type
        dims = tuple(d.dim_value for d in t.shape.dim)
        if any(d <= 0 for d in dims):
            raise DistreeError(f"tensor {v.name!r} has no static shape; load the model with fixed input shapes")
        out[v.name] = (dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)
    return out


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
