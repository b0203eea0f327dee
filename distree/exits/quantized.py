"""The float value of a quantized (uint8 / int8) tensor, so that a head can read a cut of an int8 model.

In ONNX Runtime's QOperator format (``QLinearConv``, ``QLinearAdd``, ``QGemm``, ...) every tensor between two
quantized ops is uint8 or int8, and the op that writes it names its scale and zero point among its inputs:
``real = (q - zero_point) * scale``. A head on such a tensor starts with a ``DequantizeLinear`` that uses them.
Only per-tensor parameters held as constants are read: ONNX Runtime quantizes activations that way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

QUANTIZED_TYPES = frozenset({onnx.TensorProto.UINT8, onnx.TensorProto.INT8})

# where an op's quantized output finds its (scale, zero point): input positions (ONNX and com.microsoft ops)
OUTPUT_QUANTIZATION = {
    "QuantizeLinear": (1, 2),
    "QLinearConv": (6, 7),
    "QLinearMatMul": (6, 7),
    "QLinearAdd": (6, 7),
    "QLinearMul": (6, 7),
    "QGemm": (7, 8),
    "QLinearGlobalAveragePool": (3, 4),
    "QLinearAveragePool": (3, 4),
    "QLinearLeakyRelu": (3, 4),
    "QLinearSigmoid": (3, 4),
    "QLinearConcat": (0, 1),
}
# ops whose quantized output keeps the quantization of their first input
SAME_QUANTIZATION = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


@dataclass(frozen=True)
class Quantization:
    """``real = (q - zero_point) * scale`` for every element of a tensor of ONNX type ``elem_type``."""

    scale: float
    zero_point: int
    elem_type: int

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Float64 values of ``q`` (quantized values, or means of them: the map is affine)."""
        return (np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale


def quantization_of(model: onnx.ModelProto, tensor: str) -> Quantization | None:
    """How ``tensor`` maps to float, read from the op that writes it; None when it is not a quantized tensor
    whose per-tensor scale and zero point are constants of the graph."""
    constants = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    while tensor in producer and producer[tensor].op_type in SAME_QUANTIZATION:
        tensor = producer[tensor].input[0]
    node = producer.get(tensor)
    if node is None or node.op_type not in OUTPUT_QUANTIZATION:
        return None
    scale_at, zero_at = OUTPUT_QUANTIZATION[node.op_type]
    names = list(node.input) + [""] * (zero_at + 1 - len(node.input))
    scale = constants.get(names[scale_at])
    if scale is None or int(np.prod(scale.dims)) != 1:
        return None
    if names[zero_at] == "":                         # QuantizeLinear's default: uint8, zero point 0
        zero, elem_type = 0, onnx.TensorProto.UINT8
    elif names[zero_at] in constants and int(np.prod(constants[names[zero_at]].dims)) == 1:
        zero_tensor = constants[names[zero_at]]
        zero, elem_type = int(numpy_helper.to_array(zero_tensor).reshape(())), zero_tensor.data_type
    else:
        return None
    if elem_type not in QUANTIZED_TYPES:
        return None
    return Quantization(float(numpy_helper.to_array(scale).reshape(())), zero, elem_type)


def only_dequantized(model: onnx.ModelProto, tensor: str) -> bool:
    """Whether every op reading ``tensor`` is a DequantizeLinear (a QDQ model's activations): its float output
    then holds the same values, and a head belongs there rather than on ``tensor``."""
    readers = [n.op_type for n in model.graph.node if tensor in n.input]
    return bool(readers) and all(op == "DequantizeLinear" for op in readers)
