"""TVM (as it comes, with distree's default schedules, MetaSchedule-tuned) vs ONNX Runtime on this machine
(issue 7; a benchmark, not a test).

For the whole model and for each block of its chain (distree.graph.build_chain / extract_segment), batch 1,
one thread for both (TVM_NUM_THREADS=1; ORT graph optimization ALL, intra-op threads 1):
  - TVM untuned as it comes (``tvm.compile`` alone), TVM with distree's default CPU schedules (what distree
    builds without records: distree/targets/schedules.py), TVM tuned (``--minutes`` of tuning on the whole
    model, its records applied to the blocks, default schedules for the rest), ONNX Runtime, and the ratios
    TVM/ORT;
  - "auto": per block the faster backend (what ``--backend auto`` ships), summed over the blocks.
Targets (issue 7): tuned whole model within 1.25x of ORT after <= 15 min of tuning; auto never slower than ORT.

    .venv/bin/python benchmarks/compiled_vs_ort.py [--model examples/fashion_mnist/resnet_plain.onnx]
        [--minutes 15] [--db-dir .distree-cache/tuning] [--rounds 21] [--records-note "..."]

``--minutes 0`` measures with the records already in ``--db-dir`` (say where they came from with
``--records-note``; the JSON also counts them).

Why interleaved: on the shared machine the load changes within seconds, so a ratio of two times taken at
different moments also measures the change in load between them. So each case is timed in short rounds; in a round every backend is timed back to back (the order rotates
from round to round) and the round's TVM/ORT ratio is taken. Reported: the median of the per-round ratios
and their spread (quartiles, min, max), the median times, and the 1-minute load average at the start, when
timing starts and at the end. Writes benchmarks/results/compiled_vs_ort.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
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
from distree.targets.schedules import schedule_defaults  # noqa: E402
from distree.targets.toolchain import tvm_target  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402
from distree.targets import host_device  # noqa: E402



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
        case.run["tvm_default"] = _tvm_runner(tvm.compile(schedule_defaults(mod, target).mod, target=target),
                                              case.feed)
        if tuned:
            case.run["tvm_tuned"] = _tvm_runner(tuning.build_tvm(mod, target, db_dir), case.feed)
    return cases


def _op_summary(ops: tuple[str, ...]) -> str:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return " ".join(f"{op}x{n}" if n > 1 else op for op, n in counts.items())


ROUND = TimingSettings(warmup=1, repeats=3, min_repeat_ms=5.0, threads=1)


def _time_cases(cases: list[Case], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per case and backend, one time (ms, median of a short burst) per round; within a round the backends
    of a case run back to back, starting with a different backend each round."""
    samples: dict[str, dict[str, list[float]]] = {c.name: {b: [] for b in c.run} for c in cases}
    for r in range(rounds):
        for case in cases:
            order = list(case.run)
            for backend in order[r % len(order):] + order[: r % len(order)]:
                samples[case.name][backend].append(float(np.median(time_callable(case.run[backend], ROUND))))
    return samples


def _ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and spread of the per-round ratios num/den (rounds paired)."""
    ratios = np.asarray(num) / np.asarray(den)
    q = np.percentile(ratios, [0, 25, 50, 75, 100])
    return {"median": round(float(q[2]), 3), "q25": round(float(q[1]), 3), "q75": round(float(q[3]), 3),
            "min": round(float(q[0]), 3), "max": round(float(q[4]), 3), "rounds": int(ratios.size)}


def _max_error(case: Case, backend: str) -> float:
    return float(np.max(np.abs(case.run[backend]() - case.run["ort"]())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples/fashion_mnist/resnet_plain.onnx")
    ap.add_argument("--minutes", type=float, default=15.0, help="tuning budget; 0 = use the records in --db-dir")
    ap.add_argument("--db-dir", type=Path, default=ROOT / ".distree-cache/tuning")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    ap.add_argument("--records-note", default="", help="where the records in --db-dir came from (kept in the JSON)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compiled_vs_ort.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    model = _single_output(load_model(args.model, {}))
    x = _sample_input(model)
    target = tvm_target(host_device())
    load_start = os.getloadavg()
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
    load_timing = os.getloadavg()
    times = _time_cases(cases, args.rounds)
    load_end = os.getloadavg()
    rows = [_row(case, times[case.name], tuned) for case in cases]
    doc = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu": host_device().description, "cores": os.cpu_count(),
                    "load_avg_1min": {"start": round(load_start[0], 2), "timing_start": round(load_timing[0], 2),
                                      "end": round(load_end[0], 2)},
                    "load_avg_1_5_15min": {"start": load_start, "timing_start": load_timing, "end": load_end},
                    "note": "shared 2-core machine, loaded by other work: trust the per-round ratios, not "
                            "absolute times"},
        "versions": {"tvm": tvm.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "model": str(args.model), "model_sha256": model_sha256(model), "target": str(target),
        "threads": {"TVM_NUM_THREADS": os.environ["TVM_NUM_THREADS"], "ort_intra_op": 1},
        "timing": {"rounds": args.rounds, "per_round": ROUND.to_dict(),
                   "scheme": "per case and round: every backend back to back (rotating order), one median "
                             "of a short burst each; ratios are per round, then summarized"},
        "tuning": tuning_doc, "db_dir": str(args.db_dir), "tuned_records": tuned,
        "records": _records_doc(args.db_dir, target, args.records_note, tuning_doc) if tuned else None,
        "rows": rows, "summary": _summary(rows, times, tuned),
    }
    write_json_atomic(args.out, doc)
    _print(rows, doc["summary"], doc)
    print(f"wrote {args.out}")


def _row(case: Case, t: dict[str, list[float]], tuned: bool) -> dict:
    row = {"name": case.name, "ops": case.ops, **{f"{b}_ms": round(float(np.median(v)), 4) for b, v in t.items()},
           "untuned_over_ort": _ratio_stats(t["tvm_untuned"], t["ort"]),
           "default_over_ort": _ratio_stats(t["tvm_default"], t["ort"]),
           "default_max_abs_error": _max_error(case, "tvm_default")}
    shipped = "tvm_tuned" if tuned else "tvm_default"
    if tuned:
        row["tuned_over_ort"] = _ratio_stats(t["tvm_tuned"], t["ort"])
        row["tuned_max_abs_error"] = _max_error(case, "tvm_tuned")
    row["auto_backend"] = "tvm" if _ratio_stats(t[shipped], t["ort"])["median"] <= 1.0 else "ort"  # as the bundle
    return row


def _records_doc(db_dir: Path, target, note: str, tuning_doc: dict | None) -> dict:
    """What the timed records are: how many, and where they came from (this run's tuning or earlier runs)."""
    folder = tuning.records_dir(db_dir, target)
    count = sum(1 for line in (folder / "database_tuning_record.json").read_text().splitlines() if line.strip())
    source = (f"this run tuned {tuning_doc['minutes_budget']} min on top of the records already there"
              if tuning_doc else "cached records from earlier runs (no tuning in this run)")
    return {"folder": str(folder), "records": count, "source": source, "note": note}


def _summed(times: dict[str, dict[str, list[float]]], pick: dict[str, str]) -> list[float]:
    """Per round, the sum over blocks of the backend picked for each block."""
    return [float(sum(times[name][backend][r] for name, backend in pick.items()))
            for r in range(len(next(iter(times.values()))["ort"]))]


def _sample_input(model: onnx.ModelProto) -> np.ndarray:
    """A real Fashion-MNIST test image when the example data exist, else a fixed random one."""
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    test = ROOT / "examples/fashion_mnist/test.npz"
    if test.is_file() and shape == (1, 1, 28, 28):
        return np.load(test)["x"][:1].astype(np.float32)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _summary(rows: list[dict], times: dict[str, dict[str, list[float]]], tuned: bool) -> dict:
    whole, blocks = rows[0], rows[1:]
    shipped = "tvm_tuned" if tuned else "tvm_default"
    ort = _summed(times, {r["name"]: "ort" for r in blocks})
    out = {"whole_untuned_over_ort": whole["untuned_over_ort"], "whole_default_over_ort": whole["default_over_ort"],
           "blocks_default_sum_over_ort": _ratio_stats(_summed(times, {r["name"]: "tvm_default" for r in blocks}), ort)}
    if tuned:
        out.update({
            "whole_tuned_over_ort": whole["tuned_over_ort"],
            "target_tuned_within_1.25x": whole["tuned_over_ort"]["median"] <= 1.25,
            "blocks_tuned_sum_over_ort": _ratio_stats(_summed(times, {r["name"]: "tvm_tuned" for r in blocks}), ort),
        })
    out.update({
        "whole_auto_backend": whole["auto_backend"],
        "whole_auto_over_ort": (_ratio_stats(times[whole["name"]][shipped], times[whole["name"]]["ort"])
                                if whole["auto_backend"] == "tvm" else "1 (ORT ships)"),
        "blocks_tvm_wins": [r["name"] for r in blocks if r["auto_backend"] == "tvm"],
        "blocks_auto_sum_over_ort": _ratio_stats(
            _summed(times, {r["name"]: shipped if r["auto_backend"] == "tvm" else "ort" for r in blocks}), ort),
        "blocks_ort_sum_ms": round(float(np.median(ort)), 4),
    })
    return out


def _print(rows: list[dict], summary: dict, doc: dict) -> None:
    tuning_doc, load = doc["tuning"], doc["machine"]["load_avg_1min"]
    if tuning_doc:
        print(f"tuning: {tuning_doc['trials']} trials in {tuning_doc['wall_s']:.0f} s "
              f"(budget {tuning_doc['minutes_budget']} min, stopped: {tuning_doc['stopped']})")
    if doc["records"]:
        print(f"records: {doc['records']['records']} in {doc['records']['folder']} ({doc['records']['source']})")
    print(f"load average (1 min): start {load['start']}, timing start {load['timing_start']}, end {load['end']}; "
          f"{doc['timing']['rounds']} interleaved rounds; ratios: median of per-round ratios [q25-q75]")

    head = (f"{'':12} {'ops':30} {'ORT ms':>8} {'untuned':>9} {'default':>8} {'tuned':>8} {'untuned/ORT':>19} "
            f"{'default/ORT':>17} {'tuned/ORT':>17} {'auto':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:12} {r['ops'][:30]:30} {r['ort_ms']:8.4f} {r['tvm_untuned_ms']:9.4f} "
              f"{r['tvm_default_ms']:8.4f} {r.get('tvm_tuned_ms', float('nan')):8.4f} "
              f"{_ratio_text(r['untuned_over_ort']):>19} {_ratio_text(r['default_over_ort']):>17} "
              f"{_ratio_text(r.get('tuned_over_ort')):>17} {r['auto_backend']:>5}")
    for key, value in summary.items():
        print(f"{key}: {_ratio_text(value, spread=True) if isinstance(value, dict) else value}")


def _ratio_text(r: dict | None, spread: bool = False) -> str:
    if r is None:
        return "-"
    text = f"{r['median']:.2f} [{r['q25']:.2f}-{r['q75']:.2f}]"
    return text + (f" (min {r['min']:.2f}, max {r['max']:.2f}, {r['rounds']} rounds)" if spread else "")


if __name__ == "__main__":
    main()
