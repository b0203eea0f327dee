"""Does the plan's predicted latency match what the compiled bundle then takes? (on this machine)

    .venv/bin/python benchmarks/predicted_vs_measured.py [--samples 3000] [--time-limit 20]

For each example model, `distree compile --devices host` (profile measured here, exits trained where the
model has none), then `distree run` on the first N Fashion-MNIST test images: the plan's expected latency
against the measured mean per sample, and the plan's no-exit latency against the whole model run by ONNX
Runtime in one call (what a bundle without exits does on this machine). Both runs are batch 1, one thread,
in one process, back to back. Then the same model planned over two processes of this machine (the first
one too small for the whole model) and served with `distree serve` on loopback: the plan's latency plus
the client's own hop against `distree infer`'s measured mean.
Prints a table; writes benchmarks/results/predicted_vs_measured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distree.runtime.backends import ort_runner  # noqa: E402
from distree.serde import write_json_atomic  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"
RESULTS = ROOT / "benchmarks" / "results" / "predicted_vs_measured.json"
MODELS = ("resnet_exits", "resnet_plain")
DISTREE = [sys.executable, "-m", "distree"]


def whole_model_ms(model: Path, x: np.ndarray, rounds: int = 3) -> float:
    """Mean ms per sample of the whole model, one ONNX Runtime call per image, best of ``rounds`` passes."""
    run = ort_runner(model.read_bytes())
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(len(x)):
            run(x[i:i + 1])
        best = min(best, (time.perf_counter() - started) * 1e3 / len(x))
    return best


def distree(*args: str) -> None:
    """Run the CLI (the code path users take); its error, not a traceback of this script, when it fails."""
    done = subprocess.run([*DISTREE, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"distree {args[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def measure(name: str, samples: int, time_limit: float, work: Path) -> dict:
    model = EXAMPLE / f"{name}.onnx"
    bundle = work / name
    started = time.time()
    distree("compile", str(model), "--devices", "host", "--data", str(EXAMPLE / "calib.npz"), "-o", str(bundle),
            "--time-limit", str(time_limit))
    compile_s = time.time() - started
    plan = json.loads((bundle / "manifest.json").read_text())["plan"]
    report = work / f"{name}.run.json"
    distree("run", str(bundle), "--input", str(EXAMPLE / "test.npz"), "--limit", str(samples), "-o", str(report))
    run = json.loads(report.read_text())
    x = np.load(EXAMPLE / "test.npz")["x"][:samples]
    exits = [e for s in plan["stages"] for e in s["exits"]]
    return {
        "model": name, "exits_enabled": len(exits), "segments": len(run["segments"]),
        "predicted_ms": plan["expected_latency_ms"], "measured_mean_ms": run["end_to_end"]["mean_ms"],
        "predicted_no_exit_ms": plan["no_exit_latency_ms"], "measured_whole_model_ms": whole_model_ms(model, x),
        "accuracy": run["accuracy"], "compile_s": compile_s,
    }


# Two stages on loopback: the front device holds only part of the model (its memory), so the plan must hop.
TWO_STAGE_TOPOLOGY = """\
devices:
  - {name: front, base: host, memory_gb: 0.06265}
  - {name: back, base: host}
links:
  - {src: front, dst: back, bandwidth_mbps: 10000, latency_ms: 0.02}
source: front
"""


def measure_served(samples: int, time_limit: float, work: Path) -> dict:
    """`resnet_exits` planned over two host processes and served with `distree serve` on loopback; measured by
    `distree infer` (a client process), requests back to back, so planned with ``--traffic steady`` (hops at
    their back-to-back round trip; `served_vs_simulated.py` covers lone requests). The plan's latency starts at
    the source, so the client's own request to it (one hop's software, the source's ``rpc`` entry) is added to
    the prediction."""
    from distree.compiler.manifest import read_manifest
    from distree.profiler.types import Profile
    from distree.runtime.client import InferenceClient, infer_dataset
    from distree.runtime.data import load_inputs
    from distree.runtime.local import StageProcess

    topology = work / "two_stage.yaml"
    topology.write_text(TWO_STAGE_TOPOLOGY)
    bundle = work / "served"
    distree("compile", str(EXAMPLE / "resnet_exits.onnx"), "--topology", str(topology), "--data",
            str(EXAMPLE / "calib.npz"), "-o", str(bundle), "--time-limit", str(time_limit), "--traffic", "steady")
    plan = read_manifest(bundle).plan
    stages = [s.device for s in plan.stages]
    if stages != ["front", "back"]:
        raise SystemExit(f"expected a plan over front and back, got {stages}: adjust front's memory_gb")
    rpc = Profile.load(bundle / "planning" / "profile.json").get("front", "rpc").median_ms
    back = StageProcess(bundle, "back", cwd=ROOT)
    try:
        front = StageProcess(bundle, "front", next_address=back.address, cwd=ROOT)
        try:
            with InferenceClient(front.address) as client:
                report = infer_dataset(client, load_inputs(str(EXAMPLE / "test.npz")), limit=samples)
        finally:
            front.stop()
    finally:
        back.stop()
    return {
        "model": "resnet_exits, served front->back", "exits_enabled": sum(len(s.exits) for s in plan.stages),
        "segments": None, "predicted_ms": plan.expected_latency_ms + rpc, "plan_ms": plan.expected_latency_ms,
        "client_hop_ms": rpc, "measured_mean_ms": report.end_to_end["mean_ms"],
        "measured_median_ms": report.end_to_end["median_ms"], "reach_back": plan.stages[1].reach_rate,
        "accuracy": report.accuracy,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--time-limit", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args.samples, args.time_limit, Path(tmp)) for name in MODELS]
        served = measure_served(args.samples, args.time_limit, Path(tmp))
    print(f"{'model':14} {'exits':>5} {'segs':>4} {'predicted':>10} {'measured':>9} {'ratio':>6}   "
          f"{'no-exit pred':>12} {'whole model':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:14} {r['exits_enabled']:5d} {r['segments']:4d} {r['predicted_ms']:10.4f} "
              f"{r['measured_mean_ms']:9.4f} {r['predicted_ms'] / r['measured_mean_ms']:6.2f}   "
              f"{r['predicted_no_exit_ms']:12.4f} {r['measured_whole_model_ms']:11.4f} "
              f"{r['predicted_no_exit_ms'] / r['measured_whole_model_ms']:6.2f}")
    print(f"served over two processes (front -> back, {served['reach_back']:.1%} reach back): predicted "
          f"{served['predicted_ms']:.3f} ms (plan {served['plan_ms']:.3f} + the client's hop "
          f"{served['client_hop_ms']:.3f}), "
          f"measured mean {served['measured_mean_ms']:.3f} ms (median {served['measured_median_ms']:.3f}), ratio "
          f"{served['predicted_ms'] / served['measured_mean_ms']:.2f}")
    write_json_atomic(args.out, {
        "kind": "benchmark", "benchmark": "predicted_vs_measured", "rows": rows, "served": served,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "command": " ".join(["benchmarks/predicted_vs_measured.py", f"--samples {args.samples}",
                             f"--time-limit {args.time_limit}"]),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
