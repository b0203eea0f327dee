"""distree's default CPU convolution schedules vs ONNX Runtime on the convolutions of real networks (a benchmark,
not a test).

The example model's convolutions are tiny (8-32 channels at 28x28 and less); users compile ResNets and
MobileNets at 224x224, whose layers span 1x1 convolutions over 56x56 maps to 512 channels at 7x7. Every
distinct convolution of ResNet-18, ResNet-50 (v1.5) and MobileNetV2 at 224x224 (with its bias and ReLU, as
they fuse in a real graph) is built as distree builds it without tuning records
(``distree.targets.schedules.schedule_defaults``) and timed against ONNX Runtime, one thread each, batch 1,
interleaved in rounds as ``compiled_vs_ort.py`` does (the per-round ratio's median and quartiles). Per network,
the layers weighted by how often each occurs give the convolutions' total for both backends.

    .venv/bin/python benchmarks/conv_schedules.py [--rounds 7] [--only resnet18 ...] [--out F]

Writes benchmarks/results/conv_schedules.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tvm  # noqa: E402

from compiled_vs_ort import Case, _ort_runner, _ratio_stats, _time_cases, _tvm_runner  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.targets import host_device  # noqa: E402
from distree.targets.schedules import SCHEDULES, schedule_defaults  # noqa: E402
from distree.targets.toolchain import import_onnx, tvm_target  # noqa: E402


class Conv(NamedTuple):
    """One convolution layer: input channels, output channels, input height = width, kernel, stride, groups;
    ``count``: how many layers of the network have this shape."""

    cin: int
    cout: int
    size: int
    kernel: int
    stride: int = 1
    groups: int = 1
    count: int = 1

    @property
    def name(self) -> str:
        kind = "dw" if self.groups == self.cin > 1 else f"g{self.groups}" if self.groups > 1 else ""
        return f"{self.cin}->{self.cout} {self.kernel}x{self.kernel}{kind} s{self.stride} @{self.size}"

    @property
    def out_size(self) -> int:
        return (self.size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    @property
    def macs(self) -> int:
        return self.cout * self.cin // self.groups * self.kernel ** 2 * self.out_size ** 2


def _conv(*args, **kw) -> Conv:
    return Conv(*args, **kw)


# Each network's distinct convolutions (torchvision's layouts at 224x224), with how often each occurs.
NETWORKS: dict[str, tuple[Conv, ...]] = {
    "resnet18": (
        _conv(3, 64, 224, 7, 2), _conv(64, 64, 56, 3, count=4),
        _conv(64, 128, 56, 3, 2), _conv(64, 128, 56, 1, 2), _conv(128, 128, 28, 3, count=3),
        _conv(128, 256, 28, 3, 2), _conv(128, 256, 28, 1, 2), _conv(256, 256, 14, 3, count=3),
        _conv(256, 512, 14, 3, 2), _conv(256, 512, 14, 1, 2), _conv(512, 512, 7, 3, count=3),
    ),
    "resnet50": (
        _conv(64, 64, 56, 1), _conv(64, 64, 56, 3, count=3), _conv(64, 256, 56, 1, count=4),
        _conv(256, 64, 56, 1, count=2), _conv(256, 128, 56, 1), _conv(128, 128, 56, 3, 2),
        _conv(128, 512, 28, 1, count=4), _conv(256, 512, 56, 1, 2), _conv(512, 128, 28, 1, count=3),
        _conv(128, 128, 28, 3, count=3), _conv(512, 256, 28, 1), _conv(256, 256, 28, 3, 2),
        _conv(256, 1024, 14, 1, count=6), _conv(512, 1024, 28, 1, 2), _conv(1024, 256, 14, 1, count=5),
        _conv(256, 256, 14, 3, count=5), _conv(1024, 512, 14, 1), _conv(512, 512, 14, 3, 2),
        _conv(512, 2048, 7, 1, count=3), _conv(1024, 2048, 14, 1, 2), _conv(2048, 512, 7, 1, count=2),
        _conv(512, 512, 7, 3, count=2),
    ),
    "mobilenetv2": (
        _conv(3, 32, 224, 3, 2), _conv(32, 32, 112, 3, groups=32), _conv(32, 16, 112, 1),
        _conv(16, 96, 112, 1), _conv(96, 96, 112, 3, 2, groups=96), _conv(96, 24, 56, 1),
        _conv(24, 144, 56, 1, count=2), _conv(144, 144, 56, 3, groups=144), _conv(144, 24, 56, 1),
        _conv(144, 144, 56, 3, 2, groups=144), _conv(144, 32, 28, 1), _conv(32, 192, 28, 1, count=3),
        _conv(192, 192, 28, 3, groups=192, count=2), _conv(192, 32, 28, 1, count=2),
        _conv(192, 192, 28, 3, 2, groups=192), _conv(192, 64, 14, 1), _conv(64, 384, 14, 1, count=4),
        _conv(384, 384, 14, 3, groups=384, count=4), _conv(384, 64, 14, 1, count=3), _conv(384, 96, 14, 1),
        _conv(96, 576, 14, 1, count=3), _conv(576, 576, 14, 3, groups=576, count=2), _conv(576, 96, 14, 1, count=2),
        _conv(576, 576, 14, 3, 2, groups=576), _conv(576, 160, 7, 1), _conv(160, 960, 7, 1, count=3),
        _conv(960, 960, 7, 3, groups=960, count=3), _conv(960, 160, 7, 1, count=2), _conv(960, 320, 7, 1),
        _conv(320, 1280, 7, 1),
    ),
}


def conv_model(conv: Conv, seed: int = 0) -> onnx.ModelProto:
    """Conv + bias + ReLU as one ONNX model, batch 1."""
    rng = np.random.default_rng(seed)
    k, pad = conv.kernel, conv.kernel // 2
    weight = rng.standard_normal((conv.cout, conv.cin // conv.groups, k, k)).astype(np.float32)
    weight *= np.float32(1 / np.sqrt(conv.cin // conv.groups * k * k))
    inits = [numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(rng.standard_normal(conv.cout).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[k, k], strides=[conv.stride] * 2,
                              pads=[pad] * 4, group=conv.groups),
             helper.make_node("Relu", ["c"], ["y"])]
    out = conv.out_size
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, conv.cin, conv.size, conv.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, conv.cout, out, out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _case(conv: Conv, target) -> tuple[Case, int]:
    model = conv_model(conv)
    x = np.random.default_rng(1).standard_normal((1, conv.cin, conv.size, conv.size)).astype(np.float32)
    case = Case(conv.name, "Conv Relu", model, x, {"ort": _ort_runner(model, x)})
    built = schedule_defaults(import_onnx(model), target)
    case.run["tvm_default"] = _tvm_runner(tvm.compile(built.mod, target=target), x)
    return case, built.scheduled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conv_schedules.json")
    args = ap.parse_args()

    target = tvm_target(host_device())
    load_start = os.getloadavg()[0]
    rows, networks = [], {}
    for net in args.only:
        built = [(conv, *_case(conv, target)) for conv in NETWORKS[net]]
        times = _time_cases([case for _, case, _ in built], args.rounds)
        totals = {"ort": 0.0, "tvm_default": 0.0}
        for conv, case, scheduled in built:
            t = times[case.name]
            err = float(np.max(np.abs(case.run["tvm_default"]() - case.run["ort"]())))
            ort_ms, tvm_ms = float(np.median(t["ort"])), float(np.median(t["tvm_default"]))
            totals["ort"] += conv.count * ort_ms
            totals["tvm_default"] += conv.count * tvm_ms
            rows.append({"network": net, "conv": conv.name, "count": conv.count, "macs": conv.macs,
                         "scheduled": scheduled, "ort_ms": round(ort_ms, 4), "tvm_default_ms": round(tvm_ms, 4),
                         "gmacs_ort": round(conv.macs / ort_ms / 1e6, 1),
                         "gmacs_tvm": round(conv.macs / tvm_ms / 1e6, 1),
                         "tvm_over_ort": _ratio_stats(t["tvm_default"], t["ort"]), "max_abs_err": err})
        networks[net] = {"ort_ms": round(totals["ort"], 3), "tvm_default_ms": round(totals["tvm_default"], 3),
                         "tvm_over_ort": round(totals["tvm_default"] / totals["ort"], 3)}
    doc = {"benchmark": "conv_schedules", "schedules": SCHEDULES, "target": str(target),
           "machine": platform.processor() or platform.machine(), "rounds": args.rounds,
           "load_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
           "networks": networks, "layers": rows}
    write_json_atomic(args.out, doc)
    print(f"{'network':12s} {'convolution':28s} {'n':>2s} {'ORT ms':>8s} {'TVM ms':>8s} "
          f"{'TVM/ORT [q25-q75]':>20s} {'GMAC/s ORT':>10s} {'TVM':>5s}")
    for r in rows:
        q = r["tvm_over_ort"]
        print(f"{r['network']:12s} {r['conv']:28s} {r['count']:2d} {r['ort_ms']:8.3f} {r['tvm_default_ms']:8.3f} "
              f"{q['median']:6.2f} [{q['q25']:.2f}-{q['q75']:.2f}] {r['gmacs_ort']:10.1f} {r['gmacs_tvm']:5.1f}"
              + ("" if r["scheduled"] else "  (TVM's own loops)"))
    for net, n in networks.items():
        print(f"{net:12s} convolutions, weighted by count: ORT {n['ort_ms']:.2f} ms, TVM {n['tvm_default_ms']:.2f} "
              f"ms, TVM/ORT {n['tvm_over_ort']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
