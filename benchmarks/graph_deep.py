"""How long graph analysis takes on deep models (ResNet-110-like, a 1000-layer plain chain, a 24-layer ViT).

    .venv/bin/python benchmarks/graph_deep.py [--out FILE]

Prints a table (model, nodes, blocks, seconds for load / build_chain / coarsen / extracting every block)
and writes benchmarks/results/graph_deep.json (or FILE).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distree.graph import SegmentExtractor, build_chain, coarsen, load_model  # noqa: E402


def resnet_like(stages: int = 3, blocks_per_stage: int = 18, width: int = 16) -> onnx.ModelProto:
    """CIFAR ResNet-110 shape (3 stages x 18 basic blocks) as raw ONNX: conv-relu-conv + skip, relu."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, stride: int, k: int, name: str) -> str:
        w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.05).astype(np.float32), f"{name}.w")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, w.name], [f"{name}.out"], name=name, strides=[stride, stride],
                                      pads=[k // 2] * 4, kernel_shape=[k, k]))
        return f"{name}.out"

    def relu(x: str, name: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
        return f"{name}.out"

    x = relu(conv("input", 3, width, 1, 3, "stem"), "stem.relu")
    cin = width
    for s in range(stages):
        cout = width * 2**s
        for b in range(blocks_per_stage):
            stride = 2 if s > 0 and b == 0 else 1
            p = f"s{s}b{b}"
            y = relu(conv(x, cin, cout, stride, 3, f"{p}.c1"), f"{p}.r1")
            y = conv(y, cout, cout, 1, 3, f"{p}.c2")
            skip = conv(x, cin, cout, stride, 1, f"{p}.down") if stride != 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [y, skip], [f"{p}.add"], name=f"{p}.add"))
            x = relu(f"{p}.add", f"{p}.r2")
            cin = cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array(rng.standard_normal((10, cin)).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet_like", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def plain_chain(layers: int = 1000) -> onnx.ModelProto:
    """``layers`` alternating Mul-by-weight and Tanh on a (1, 64) vector."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(layers):
        if i % 2 == 0:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, 64)).astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("Mul", [x, f"w{i}"], [f"t{i}"], name=f"mul{i}"))
        else:
            nodes.append(helper.make_node("Tanh", [x], [f"t{i}"], name=f"tanh{i}"))
        x = f"t{i}"
    graph = helper.make_graph(nodes, "plain_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def vit_like(depth: int = 24) -> onnx.ModelProto:
    """A torch-exported ViT encoder (dynamic batch: exercises Shape folding) with ``depth`` layers."""
    import torch  # noqa: F401  (only this model needs torch)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import graph_models as gm

    with tempfile.TemporaryDirectory() as d:
        path = gm.export(gm.TinyViT(depth=depth), (1, 1, 28, 28), Path(d) / "vit.onnx")
        return onnx.load(path)


def measure(name: str, model: onnx.ModelProto, workdir: Path) -> dict:
    path = workdir / f"{name}.onnx"
    onnx.save(model, path)
    t0 = time.perf_counter()
    loaded = load_model(path)
    t1 = time.perf_counter()
    chain = build_chain(loaded)
    t2 = time.perf_counter()
    small = coarsen(chain, 8)
    t3 = time.perf_counter()
    extractor = SegmentExtractor(loaded, chain)
    for b in chain.blocks:
        extractor.extract(b.index, b.index)
    t4 = time.perf_counter()
    return {"model": name, "nodes": len(loaded.graph.node), "blocks": len(chain.blocks), "coarse_blocks": len(small.blocks),
            "load_s": t1 - t0, "build_chain_s": t2 - t1, "coarsen_s": t3 - t2, "extract_all_s": t4 - t3}


RESULTS = Path(__file__).resolve().parent / "results" / "graph_deep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    out = parser.parse_args().out
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, build in [("resnet110_like", resnet_like), ("plain_chain_1000", plain_chain), ("vit24_like", vit_like)]:
            rows.append(measure(name, build(), Path(d)))
    header = f"{'model':18} {'nodes':>6} {'blocks':>6} {'load s':>8} {'chain s':>8} {'coarsen s':>9} {'extract all s':>13}"
    print(header)
    for r in rows:
        print(f"{r['model']:18} {r['nodes']:6d} {r['blocks']:6d} {r['load_s']:8.3f} {r['build_chain_s']:8.3f} "
              f"{r['coarsen_s']:9.4f} {r['extract_all_s']:13.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
