"""TVM (untuned and MetaSchedule-tuned) vs ONNX Runtime on this machine (issue 7; a benchmark, not a test).

For the whole model and for each block of its chain (distree.graph.build_chain / extract_segment), batch 1,
one thread for both (TVM_NUM_THREADS=1; ORT graph optimization ALL, intra-op threads 1):
  - TVM untuned, TVM tuned (``--minutes`` of tuning on the whole model; its records apply to the blocks),
    ONNX Runtime, and the ratios TVM/ORT;
  - "auto": per block the faster backend (what ``--backend auto`` ships), summed over the blocks.
Targets (issue 7): tuned whole model within 1.25x of ORT after <= 15 min of tuning; auto never slower than ORT.

    .venv/bin/python benchmarks/compiled_vs_ort.py [--model examples/fashion_mnist/resnet_plain.onnx]
        [--minutes 12] [--db-dir .distree-cache/tuning] [--rounds 5]

``--minutes 0`` measures with the records already in ``--db-dir``. Timings interleave the backends round by
round, so load from other processes hits all of them alike; the load average is recorded.
Writes benchmarks/results/compiled_vs_ort.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from distree.compiler import tuning  # noqa: E402
from distree.graph import build_chain, extract_segment, load_model, model_sha256  # noqa: E402
from distree.profiler.timing import TimingSettings, time_callable  # noqa: E402
from distree.targets.toolchain import tvm_target  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.targets import host_device  # noqa: E402

BACKENDS = ("ort", "tvm_untuned", "tvm_tuned")


@dataclass
class Case:
    """One model to time (the whole model or one block) and its runners per backend."""

    name: str
    ops: str
    model: onnx.ModelProto
    feed: np.ndarray
    run: dict[str, Callable[[], np.ndarray]]


def _ort_runner(model: onnx.ModelProto, x: np.ndarray) -> Callable[[], np.ndarray]:
    """ONNX Runtime as the profiler runs it: graph optimization ALL, one intra-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {model.graph.input[0].name: x}
    return lambda: sess.run(None, feed)[0]


def _tvm_runner(ex: tvm.runtime.Executable, x: np.ndarray) -> Callable[[], np.ndarray]:
    main = relax.VirtualMachine(ex, tvm.cpu())["main"]
    xt = tvm.runtime.tensor(x)

    def run() -> np.ndarray:
        out = main(xt)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return run


def _single_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep only the first graph output (the final classifier): exits are timed with their segments."""
    if len(model.graph.output) == 1:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[1:]
    return onnx.utils.Extractor(out).extract_model([i.name for i in out.graph.input], [out.graph.output[0].name])


def _cases(model: onnx.ModelProto, x: np.ndarray, target, db_dir: Path, tuned: bool) -> list[Case]:
    chain = build_chain(model)
    cases = [Case("whole model", f"{len(model.graph.node)} nodes", model, x, {})]
    feed = x
    for block in chain.blocks:
        seg = extract_segment(model, chain, block.index, block.index)
        cases.append(Case(f"block {block.index}", _op_summary(block.ops), seg, feed, {}))
        feed = _ort_runner(seg, feed)()
    for case in cases:
        case.run["ort"] = _ort_runner(case.model, case.feed)
        mod = tuning.import_onnx(case.model)
        case.run["tvm_untuned"] = _tvm_runner(tvm.compile(mod, target=target), case.feed)
        if tuned:
            case.run["tvm_tuned"] = _tvm_runner(tvm.compile(tuning.apply_tuning(mod, target, db_dir), target=target),
                                                case.feed)
    return cases


def _op_summary(ops: tuple[str, ...]) -> str:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return " ".join(f"{op}x{n}" if n > 1 else op for op, n in counts.items())


def _time_cases(cases: list[Case], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per case and backend, backends interleaved round by round."""
    settings = TimingSettings(warmup=2, repeats=3, min_repeat_ms=20.0, threads=1)
    samples: dict[str, dict[str, list[float]]] = {c.name: {b: [] for b in c.run} for c in cases}
    for _ in range(rounds):
        for case in cases:
            for backend, run in case.run.items():
                samples[case.name][backend].extend(time_callable(run, settings))
    return {name: {b: float(np.median(v)) for b, v in per.items()} for name, per in samples.items()}


def _max_error(case: Case) -> float | None:
    if "tvm_tuned" not in case.run:
        return None
    return float(np.max(np.abs(case.run["tvm_tuned"]() - case.run["ort"]())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples/fashion_mnist/resnet_plain.onnx")
    ap.add_argument("--minutes", type=float, default=12.0, help="tuning budget; 0 = use the records in --db-dir")
    ap.add_argument("--db-dir", type=Path, default=ROOT / ".distree-cache/tuning")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compiled_vs_ort.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model = _single_output(load_model(args.model, {}))
    x = _sample_input(model)
    target = tvm_target(host_device())
    load_before = os.getloadavg()
    tuning_doc = None
    if args.minutes > 0:
        result = tuning.tune(model, target, args.minutes, args.db_dir)
        tuning_doc = {
            "minutes_budget": args.minutes, "wall_s": round(result.wall_s, 1), "trials": result.trials,
            "stopped": result.stopped,
            "tasks": [{"name": t.name, "calls": t.weight, "flops": t.flops, "trials": t.trials,
                       "best_us": None if t.best_us is None else round(t.best_us, 2)} for t in result.tasks],
        }
    tuned = tuning.has_records(args.db_dir, target)
    cases = _cases(model, x, target, args.db_dir, tuned)
    times = _time_cases(cases, args.rounds)
    rows = []
    for case in cases:
        t = times[case.name]
        row = {"name": case.name, "ops": case.ops, **{f"{b}_ms": round(t[b], 4) for b in t},
               "untuned_over_ort": round(t["tvm_untuned"] / t["ort"], 3)}
        if tuned:
            row["tuned_over_ort"] = round(t["tvm_tuned"] / t["ort"], 3)
            row["tuned_max_abs_error"] = _max_error(case)
            row["auto_backend"] = "tvm" if t["tvm_tuned"] < t["ort"] else "ort"
        rows.append(row)
    doc = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu": host_device().description, "cores": os.cpu_count(),
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                    "note": "shared 2-core machine, loaded by other work: trust ratios more than absolute times"},
        "versions": {"tvm": tvm.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "model": str(args.model), "model_sha256": model_sha256(model), "target": str(target),
        "threads": {"TVM_NUM_THREADS": os.environ["TVM_NUM_THREADS"], "ort_intra_op": 1},
        "tuning": tuning_doc, "db_dir": str(args.db_dir), "tuned_records": tuned,
        "rows": rows, "summary": _summary(rows, tuned),
    }
    write_json_atomic(args.out, doc)
    _print(rows, doc["summary"], tuning_doc)
    print(f"wrote {args.out}")


def _sample_input(model: onnx.ModelProto) -> np.ndarray:
    """A real Fashion-MNIST test image when the example data exist, else a fixed random one."""
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    test = ROOT / "examples/fashion_mnist/test.npz"
    if test.is_file() and shape == (1, 1, 28, 28):
        return np.load(test)["x"][:1].astype(np.float32)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _summary(rows: list[dict], tuned: bool) -> dict:
    whole, blocks = rows[0], rows[1:]
    out = {"whole_untuned_over_ort": whole["untuned_over_ort"]}
    if tuned:
        auto_ms = sum(min(r["tvm_tuned_ms"], r["ort_ms"]) for r in blocks)
        ort_blocks_ms = sum(r["ort_ms"] for r in blocks)
        out.update({
            "whole_tuned_over_ort": whole["tuned_over_ort"],
            "target_tuned_within_1.25x": whole["tuned_over_ort"] <= 1.25,
            "whole_auto_backend": whole["auto_backend"],
            "whole_auto_over_ort": round(min(whole["tvm_tuned_ms"], whole["ort_ms"]) / whole["ort_ms"], 3),
            "blocks_tvm_wins": [r["name"] for r in blocks if r["auto_backend"] == "tvm"],
            "blocks_auto_sum_ms": round(auto_ms, 4),
            "blocks_ort_sum_ms": round(ort_blocks_ms, 4),
            "blocks_auto_over_ort": round(auto_ms / ort_blocks_ms, 3),
        })
    return out


def _print(rows: list[dict], summary: dict, tuning_doc: dict | None) -> None:
    if tuning_doc:
        print(f"tuning: {tuning_doc['trials']} trials in {tuning_doc['wall_s']:.0f} s "
              f"(budget {tuning_doc['minutes_budget']} min, stopped: {tuning_doc['stopped']})")
    head = f"{'':12} {'ops':34} {'ORT ms':>8} {'untuned':>9} {'tuned':>8} {'untuned/ORT':>12} {'tuned/ORT':>10} {'auto':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:12} {r['ops'][:34]:34} {r['ort_ms']:8.4f} {r['tvm_untuned_ms']:9.4f} "
              f"{r.get('tvm_tuned_ms', float('nan')):8.4f} {r['untuned_over_ort']:12.2f} "
              f"{r.get('tuned_over_ort', float('nan')):10.2f} {r.get('auto_backend', '-'):>5}")
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
