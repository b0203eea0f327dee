"""Default CPU schedules (distree/targets/schedules.py): every convolution shape they take still computes what
ONNX Runtime computes, on this machine and (slow) as the Pi 4's aarch64 library under qemu; they lay out the
kernels they claim to, pack weights only where every caller passes constants, and leave pools, reductions and
tuned kernels alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from distree.compiler.emulated import run_on_aarch64
from distree.compiler.tvm_build import compile_segment
from distree.runtime.backends import ort_runner, tvm_runner
from distree.targets import get_device, host_device
from distree.targets.schedules import (BLOCK_PIXELS, INPUT_CHANNEL_BLOCK, PARALLEL_MIN_MACS, PHASE_MIN_BYTES,
                                      column_tile, filled, largest_divisor, schedule_defaults, vector_lanes)
from distree.targets.toolchain import import_onnx, tvm_target


@dataclass(frozen=True)
class Conv:
    """One Conv (+ optional bias, residual Add, ReLU) as a one-node-chain ONNX model."""

    cin: int
    cout: int
    height: int
    width: int
    kernel: int = 3
    stride: int = 1
    pad: int = 1
    dilation: int = 1
    group: int = 1
    bias: bool = True
    residual: bool = False
    relu: bool = True

    @property
    def out_hw(self) -> tuple[int, int]:
        span = self.dilation * (self.kernel - 1) + 1
        return tuple((n + 2 * self.pad - span) // self.stride + 1 for n in (self.height, self.width))

    @property
    def depthwise(self) -> bool:
        return self.group == self.cin > 1

    def model(self, weight_as_input: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        oh, ow = self.out_hw
        weight = rng.standard_normal((self.cout, self.cin // self.group, self.kernel, self.kernel)).astype(np.float32)
        inits, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.cin, self.height, self.width])]
        if weight_as_input:
            inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape)))
        else:
            inits.append(numpy_helper.from_array(weight * 0.2, "w"))
        names = ["x", "w"]
        if self.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(self.cout).astype(np.float32), "b"))
            names.append("b")
        nodes = [helper.make_node("Conv", names, ["c"], kernel_shape=[self.kernel] * 2, strides=[self.stride] * 2,
                                  pads=[self.pad] * 4, dilations=[self.dilation] * 2, group=self.group)]
        last = "c"
        if self.residual:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, self.cout, oh, ow)).astype(np.float32), "r"))
            nodes.append(helper.make_node("Add", [last, "r"], ["a"]))
            last = "a"
        if self.relu:
            nodes.append(helper.make_node("Relu", [last], ["y"]))
            last = "y"
        graph = helper.make_graph(nodes, "conv", inputs,
                                  [helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, self.cout, oh, ow])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONVS = (
    Conv(8, 8, 14, 14),                                     # the example's: 8 channels fill half a vector
    Conv(8, 16, 14, 14, stride=2),                          # strided, 16 channels: a whole vector
    Conv(8, 8, 28, 28, kernel=1, stride=2, pad=0, bias=False),
    Conv(1, 8, 28, 28, residual=True),                      # the stem: one input channel
    Conv(32, 32, 4, 4, residual=True),
    Conv(24, 6, 13, 7, kernel=5, pad=2),                    # counts that divide no vector
    Conv(16, 32, 20, 20, pad=2, dilation=2, relu=False),
    Conv(16, 32, 17, 13, kernel=5, pad=2, group=4),         # grouped: columns as the vector, never packed
    Conv(16, 16, 15, 15, group=16),                         # depthwise: rows of one channel a tile
    Conv(24, 24, 28, 28, stride=2, group=24),
    Conv(16, 32, 32, 32, kernel=1, stride=2, pad=0),        # a tie in filled lanes, strided: channels
    Conv(32, 32, 48, 48),                                   # a tie, not strided: columns; 21 M multiply-adds: parallel
    Conv(32, 32, 96, 96, group=32),                         # depthwise, parallel over channels
    Conv(192, 32, 9, 9, kernel=1, pad=0, residual=True),    # input channels in three blocks, summed across them
    Conv(96, 16, 40, 40, kernel=1, pad=0),                  # two blocks of rows, two of input channels; parallel
    Conv(64, 16, 6, 6, bias=False, relu=False),             # channels as the vector, no epilogue: one block
    Conv(64, 8, 56, 56, kernel=1, stride=2, pad=0),         # strided, input 800 KB: read in phases
    Conv(32, 32, 80, 80, stride=2, group=32),               # depthwise, strided, padded input 860 KB: phases
)
HOST = host_device()


def _expect_packed(conv: Conv, target) -> bool:
    """What ``direct_conv`` should choose: channels as the vector where they fill it better, or as well when the
    input columns are not the output's shifted (stride or dilation)."""
    lanes = vector_lanes(target)
    by_channels = filled(largest_divisor(conv.cout, lanes), lanes)
    by_columns = filled(column_tile(conv.out_hw[1], lanes), lanes)
    strided = conv.stride > 1 or conv.dilation > 1
    return conv.group == 1 and (by_channels > by_columns or by_channels == by_columns and strided)


def _check_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{c.cin}x{c.cout}x{c.height}x{c.width}k{c.kernel}s{c.stride}"
                         f"d{c.dilation}g{c.group}{'r' if c.residual else ''}")
def test_every_shape_computes_what_onnxruntime_computes(conv, tmp_path):
    model = conv.model()
    target = tvm_target(HOST)
    scheduled = schedule_defaults(import_onnx(model), target)
    assert (scheduled.kernels, scheduled.scheduled, scheduled.packed) == (1, 1, _expect_packed(conv, target))
    kernel = next(f for _, f in scheduled.mod.functions_items() if not isinstance(f, relax.Function))
    assert ("parallel" in kernel.script()) == (_macs(conv) >= PARALLEL_MIN_MACS)
    x = np.random.default_rng(1).standard_normal((1, conv.cin, conv.height, conv.width)).astype(np.float32)
    (want,) = ort_runner(model.SerializeToString())(x)
    (got,) = tvm_runner(compile_segment(model, HOST, tmp_path / "conv.so").path)(x)
    _check_close(got, want)


def test_a_channels_vector_tile_accumulates_input_channels_in_blocks():
    """With an epilogue, the input channels are split into blocks of INPUT_CHANNEL_BLOCK (every tile of a block
    of rows takes one block before the next), the rows into blocks of about BLOCK_PIXELS pixels; without one,
    a tile accumulates every input channel at once in registers."""
    target = tvm_target(HOST)
    lanes = vector_lanes(target)
    wide = _loops_around_update(Conv(192, 32, 9, 9, kernel=1, pad=0).model(), target)
    assert wide[-1] == lanes and 192 // INPUT_CHANNEL_BLOCK in wide and INPUT_CHANNEL_BLOCK in wide
    rows = _loops_around_update(Conv(96, 16, 40, 40, kernel=1, pad=0).model(), target)
    assert (96 // largest_divisor(96, INPUT_CHANNEL_BLOCK), largest_divisor(40, BLOCK_PIXELS // 40)) == (2, 20)
    assert 48 in rows and 20 in rows and 40 not in rows
    plain = _loops_around_update(Conv(64, 16, 6, 6, bias=False, relu=False).model(), target)
    assert plain[-5:] == [64, 3, 3, 6, lanes]        # all 64 input channels, the window, the columns, the vector


def test_a_large_strided_input_is_read_in_phases():
    """From PHASE_MIN_BYTES on, a strided convolution's padded input is laid out (row % s, column % s, channel,
    row // s, column // s); smaller inputs, and stride 1, keep their layout."""
    target = tvm_target(HOST)
    assert 64 * 56 * 56 * 4 >= PHASE_MIN_BYTES > 16 * 32 * 32 * 4
    assert _input_shapes(Conv(64, 8, 56, 56, kernel=1, stride=2, pad=0).model(), target) == [(1, 2, 2, 64, 28, 28)]
    assert _input_shapes(Conv(32, 32, 80, 80, stride=2, group=32).model(), target) == [(1, 2, 2, 32, 41, 41)]
    assert _input_shapes(Conv(16, 32, 32, 32, kernel=1, stride=2, pad=0).model(), target) == [(1, 16, 32, 32)]
    assert _input_shapes(Conv(64, 8, 56, 56).model(), target) == [(1, 64, 58, 58)]


def _kernel(model, target):
    return next(f for _, f in schedule_defaults(import_onnx(model), target).mod.functions_items()
                if not isinstance(f, relax.Function))


def _input_shapes(model, target) -> list[tuple[int, ...]]:
    """Shapes of the buffers the kernel's padding writes (the convolution's input as it reads it)."""
    root = _kernel(model, target).body.block
    return [tuple(int(n) for n in buf.shape) for buf in root.alloc_buffers if buf.name.startswith("pad")]


def _loops_around_update(model, target) -> list[int]:
    """Extents of the loops around the convolution's update block, outermost first."""
    from tvm import s_tir, tirx

    kernel = _kernel(model, target)
    found: list[list[int]] = []

    def walk(stmt, extents: list[int]) -> None:
        if isinstance(stmt, tirx.For):
            walk(stmt.body, extents + [int(stmt.extent)])
        elif isinstance(stmt, s_tir.SBlockRealize):
            if stmt.block.name_hint.endswith("_update"):
                found.append(extents)
            walk(stmt.block.body, extents)
        elif isinstance(stmt, tirx.SeqStmt):
            for child in stmt.seq:
                walk(child, extents)
        elif hasattr(stmt, "body"):
            walk(stmt.body, extents)

    walk(kernel.body, [])
    assert len(found) == 1, found
    return found[0]


def _macs(conv: Conv) -> int:
    oh, ow = conv.out_hw
    return conv.cout * oh * ow * (conv.cin // conv.group) * conv.kernel ** 2


def test_weights_a_caller_passes_at_run_time_are_not_packed(tmp_path):
    """A weight that is a graph input cannot be permuted at compile time: the columns are the vector."""
    conv = Conv(8, 16, 14, 14, stride=2)
    assert _expect_packed(conv, tvm_target(HOST))
    model = conv.model(weight_as_input=True)
    target = tvm_target(HOST)
    scheduled = schedule_defaults(import_onnx(model), target)
    assert (scheduled.scheduled, scheduled.packed) == (1, 0)
    ex = tvm.compile(scheduled.mod, target=target)
    x = np.random.default_rng(2).standard_normal((1, 8, 14, 14)).astype(np.float32)
    w = np.random.default_rng(3).standard_normal((16, 8, 3, 3)).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    import onnxruntime as ort
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "w": w})[0]
    _check_close(got, want)


def _one_op(op: str, shape: list[int], out: list[int], inits=(), **attrs):
    inputs = ["x", *(init.name for init in inits)]
    return helper.make_model(helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attrs)], op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], list(inits)),
        opset_imports=[helper.make_opsetid("", 17)])


OTHER_KERNELS = (      # reductions of other shapes: one read, spatial loops enough to pass for a convolution's
    _one_op("MatMul", [1, 16], [1, 4], [numpy_helper.from_array(np.ones((16, 4), np.float32), "w")]),
    _one_op("MaxPool", [1, 8, 14, 14], [1, 8, 7, 7], kernel_shape=[2, 2], strides=[2, 2]),
    _one_op("AveragePool", [1, 8, 14, 14], [1, 8, 12, 12], kernel_shape=[3, 3]),
    _one_op("GlobalAveragePool", [1, 32, 4, 4], [1, 32, 1, 1]),
    _one_op("ReduceMax", [1, 8, 6, 14], [1, 8, 6, 1], axes=[3], keepdims=1),
)


@pytest.mark.parametrize("model", OTHER_KERNELS, ids=lambda m: m.graph.node[0].op_type)
def test_other_kernels_keep_tvm_loops_and_their_answers(model, tmp_path):
    scheduled = schedule_defaults(import_onnx(model), tvm_target(HOST))
    assert scheduled.kernels >= 1 and scheduled.scheduled == 0
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    (want,) = ort_runner(model.SerializeToString())(x)
    (got,) = tvm_runner(compile_segment(model, HOST, tmp_path / "op.so").path)(x)
    _check_close(got, want)


def test_gpu_targets_are_left_alone_and_a_kernel_is_laid_out_once():
    target = tvm_target(HOST)
    mod = import_onnx(Conv(8, 16, 14, 14, stride=2).model())
    gpu = schedule_defaults(mod, tvm_target(get_device("jetson-orin-nano")))
    assert gpu.mod is mod and gpu.kernels == 0
    once = schedule_defaults(mod, target)
    assert (once.kernels, once.scheduled, once.packed) == (1, 1, 1)
    again = schedule_defaults(once.mod, target)           # a scheduled (or tuned) kernel is never laid out again
    assert (again.kernels, again.scheduled) == (0, 0)


@pytest.mark.slow
def test_pi4_libraries_compute_what_onnxruntime_computes_under_qemu(tmp_path):
    """NEON has 4 lanes, not AVX-512's 16: other tiles, other choices of vector, the same answers."""
    pi4 = get_device("pi4")
    convs = [c for c in CONVS if _macs(c) < PARALLEL_MIN_MACS]
    models = [c.model(seed=i) for i, c in enumerate(convs)]
    assert sum(_expect_packed(c, tvm_target(pi4)) for c in convs) >= 3     # both kinds of tile run
    assert sum(not _expect_packed(c, tvm_target(pi4)) for c in convs if not c.depthwise) >= 2
    libraries = []
    for i, model in enumerate(models):
        build = compile_segment(model, pi4, tmp_path / f"conv{i}.so")
        assert build.default_scheduled == 1
        libraries.append(build.path)
    inputs = [np.random.default_rng(i).standard_normal((1, c.cin, c.height, c.width)).astype(np.float32)
              for i, c in enumerate(convs)]
    for got, model, x in zip(run_on_aarch64(libraries, inputs), models, inputs):
        (want,) = ort_runner(model.SerializeToString())(x)
        _check_close(got[0], want)
