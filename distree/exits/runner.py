"""Run a model with onnxruntime over a dataset in batches, reading any intermediate tensors.

Calibration and head training both need many tensors per sample from one pass. The runner adds the
wanted tensors as graph outputs of a copy of the model and frees the batch dimension so whole batches
run at once; a model whose graph pins the batch size (e.g. a Reshape to [1, -1]) runs one sample at a
time instead, and says so.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from distree.errors import DistreeError

BATCH_SIZE = 256
BATCH_BUDGET_BYTES = 512 * 2 ** 20   # a batch's requested tensors plus room for its largest intermediates
Consumer = Callable[[int, dict[str, np.ndarray]], None]   # (start index, outputs of the batch)


def tensor_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every typed tensor in the graph (inputs, value_info, outputs, initializers)."""
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.value_info, *g.output)
             if vi.type.HasField("tensor_type")}
    types.update({init.name: init.data_type for init in g.initializer})
    return types


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str, ...]]:
    """Static shape of every tensor shape inference could type (symbolic dims as their names)."""
    g = model.graph
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                           for d in vi.type.tensor_type.shape.dim)
            for vi in (*g.input, *g.value_info, *g.output) if vi.type.tensor_type.HasField("shape")}


def _with_outputs(model: onnx.ModelProto, outputs: Sequence[str], free_batch: bool) -> onnx.ModelProto:
    types = tensor_elem_types(model)
    m = copy.deepcopy(model)
    g = m.graph
    missing = [t for t in outputs if t not in types]
    if missing:
        raise DistreeError(f"tensor(s) {', '.join(missing)} not found in the model; "
                           "check the names against `distree inspect`")
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(t, types[t], None) for t in outputs)
    if free_batch:
        del g.value_info[:]
        g.input[0].type.tensor_type.shape.dim[0].Clear()
        g.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return m


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4          # failures raise with their message; the batch probe may fail on purpose
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@dataclass
class Runner:
    """An ORT session returning ``outputs`` for a batch; ``batch_size`` is 1 for batch-pinned models."""

    session: ort.InferenceSession
    input_name: str
    outputs: tuple[str, ...]
    batch_size: int

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(list(self.outputs), {self.input_name: x})))

    def over(self, x: np.ndarray, consume: Consumer, advance: Callable[[int], None] | None = None) -> None:
        """Feed ``x`` through in batches; ``consume(start, outputs)`` per batch, ``advance(n)`` for progress."""
        for start in range(0, len(x), self.batch_size):
            xb = x[start:start + self.batch_size]
            consume(start, self.run(xb))
            if advance:
                advance(len(xb))


def batch_size_for(model: onnx.ModelProto, outputs: Sequence[str]) -> int:
    """Samples per batch: up to ``BATCH_SIZE``, fewer where one sample's requested tensors plus twice its largest
    tensor (ONNX Runtime keeps an op's input and output alive) pass ``BATCH_BUDGET_BYTES``. At 256 a ResNet-18 on
    224x224 images peaked at 5.7 GB reading its 21 cuts; Fashion-MNIST models stay at 256."""
    shapes, types = tensor_shapes(model), tensor_elem_types(model)

    def sample_bytes(tensor: str) -> int:
        dims = shapes.get(tensor, ())[1:]
        if tensor not in types or not all(isinstance(d, int) for d in dims):
            return 0
        return int(np.prod(dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(types[tensor]).itemsize

    per_sample = sum(map(sample_bytes, outputs)) + 2 * max(map(sample_bytes, shapes), default=0)
    return int(max(1, min(BATCH_SIZE, BATCH_BUDGET_BYTES // max(per_sample, 1))))


def make_runner(model: onnx.ModelProto, outputs: Sequence[str], probe: np.ndarray) -> Runner:
    """A runner for ``outputs``; batched when a 2-sample ``probe`` runs batched with the right shapes."""
    input_name = model.graph.input[0].name
    outputs = tuple(dict.fromkeys(outputs))
    if len(probe) >= 2:
        try:
            batched = Runner(_session(_with_outputs(model, outputs, free_batch=True)), input_name, outputs,
                             batch_size_for(model, outputs))
            got = batched.run(probe[:2])
            if all(v.shape[:1] == (2,) for v in got.values()):
                return batched
        except Exception:   # noqa: BLE001 - ORT raises many types; the fixed-batch session below decides
            pass
    return Runner(_session(_with_outputs(model, outputs, free_batch=False)), input_name, outputs, 1)
