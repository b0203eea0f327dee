"""The model as a chain of blocks between single-tensor cut points."""

from __future__ import annotations

from dataclasses import dataclass

from distree.serde import JsonRecord


@dataclass(frozen=True)
class Block(JsonRecord):
    """Nodes between two consecutive cut tensors; ``output`` alone carries all the rest of the network needs."""

    index: int
    nodes: tuple[str, ...]          # ONNX node names, in a valid topological order (constant-only nodes,
                                    # e.g. Identity of a weight, belong to no block: segments copy them)
    ops: tuple[str, ...]            # op types of those nodes (same order)
    input: str                      # cut tensor entering the block (graph input for block 0)
    output: str                     # cut tensor leaving the block (final output for the last block)
    output_shape: tuple[int, ...]
    output_dtype: str               # numpy dtype name, e.g. "float32"
    flops: int                      # 2*MACs for Conv/Gemm/MatMul, elementwise ops counted
    param_bytes: int                # bytes of the weights/constants this block reads (a shared one counts
                                    # in every block that reads it: each segment holds its own copy)
    out_bytes: int                  # bytes of ``output`` (what crosses the cut)
    workspace_bytes: int            # working-set estimate: peak live activation bytes inside the block


@dataclass(frozen=True)
class Chain(JsonRecord):
    """What ``distree inspect`` finds: the whole model as an ordered chain of blocks."""

    model_sha256: str
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_name: str                # the final classifier's output
    exit_outputs: tuple[str, ...]   # extra graph outputs already in the model (declared exits)
    blocks: tuple[Block, ...]

    @property
    def input_bytes(self) -> int:
        n = 1
        for d in self.input_shape:
            n *= d
        return n * _DTYPE_BYTES.get(self.input_dtype, 4)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1, "int8": 1}
