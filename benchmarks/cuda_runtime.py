"""CUDA stages on a real NVIDIA GPU: bundles built here, run where a GPU is.

    python benchmarks/cuda_runtime.py build DIR    # here: TVM's compiler and nvcc (no GPU needed)
    python benchmarks/cuda_runtime.py run DIR      # on a machine with an NVIDIA GPU; a runtime-only TVM suffices

``build`` compiles the example (``resnet_exits.onnx``) for two topologies whose GPU has an x86-64 host, so the
libraries load on an x86 GPU machine as they would on a Jetson:
- ``gpu``: one CUDA device (sm_90 kernels), planned by ``distree compile`` itself: its blocks and exit heads
  run as TVM kernels on the GPU, the exit decisions on its host;
- ``split``: a CPU device (the source: blocks up to the plan's last exit, with every exit) handing the rest to a
  CUDA device whose kernels are the Jetson Orin's (sm_87 SASS + PTX: on a newer GPU the driver compiles the PTX).
It also runs both bundles here, where no GPU runs the CUDA stage (each CUDA library replaced by its ONNX under
ONNX Runtime, as the report says), and keeps those answers as the reference.

``run`` checks, per bundle, that every CUDA stage runs on the GPU (no substitution), that ``verify`` ran each
CUDA library on the GPU against ONNX Runtime, and that ``run`` gives the reference's answers and exits; then
times each segment (``bench``) and, for ``split``, serves the two stages over gRPC on loopback and compares
the answers again. Where TVM's compiler is installed too, the ``gpu`` device is then profiled on that GPU, the
example compiled with that profile and run (predicted against measured latency). Prints a table and writes
``DIR/cuda_runtime.json`` (``--out`` copies it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
EXAMPLE = REPO / "examples" / "fashion_mnist"
SAMPLES = 1000                      # test images run per bundle
SERVED = 300                        # of them, answered through the served pipeline
X86_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}   # AVX2: any recent x86 server


def _gpu(name: str, arch: str) -> dict:
    return {"name": name, "target": {"kind": "cuda", "arch": arch}, "host": X86_HOST, "memory_gb": 80,
            "cores": 16, "peak_gflops": 60000, "mem_gbps": 4000,
            "description": f"x86-64 host with an NVIDIA GPU, kernels for {arch}"}


TOPOLOGIES = {
    "gpu": {"devices": [_gpu("gpu", "sm_90")]},
    "split": {"devices": [{"name": "cpu", "target": X86_HOST, "memory_gb": 16, "cores": 4, "peak_gflops": 300,
                           "mem_gbps": 50, "description": "x86-64 CPU (AVX2)"},
                          _gpu("orin-kernels", "sm_87")],
              "links": [{"src": "cpu", "dst": "orin-kernels", "bandwidth_mbps": 10000, "latency_ms": 0.05}],
              "source": "cpu"},
}


def build(work: Path) -> None:
    from distree.compiler.pipeline import CompileOptions, compile_model
    from distree.exits import calibrate, declared_exits, load_dataset
    from distree.graph import build_chain, load_model
    from distree.runtime.executor import run_bundle
    from distree.targets import load_topology
    from serve_loopback import split_after_last_exit

    work.mkdir(parents=True, exist_ok=True)
    model_path, calib_path = EXAMPLE / "resnet_exits.onnx", EXAMPLE / "calib.npz"
    for name, doc in TOPOLOGIES.items():
        (work / f"{name}.json").write_text(json.dumps(doc, indent=1))
    options = dict(backend="auto", require_aot_cuda=True, time_limit_s=30)
    compile_model(model_path, calib_path, work / "gpu", CompileOptions(topology=work / "gpu.json", **options),
                  cache_dir=work / "cache")
    planned = compile_model(model_path, calib_path, work / "split-plan",
                            CompileOptions(topology=work / "split.json", **options), cache_dir=work / "cache")
    model = load_model(model_path)
    chain = build_chain(model)
    calibration = calibrate(model, chain, declared_exits(model, chain), load_dataset(calib_path, chain.input_shape),
                            score_kind=planned.plan.score_kind)
    split_after_last_exit(planned.plan, model, chain, calibration, load_topology(work / "split.json"),
                          work / "split", "auto")
    shutil.copyfile(calib_path, work / "calib.npz")       # for the profile-and-compile step on the GPU machine
    test = np.load(EXAMPLE / "test.npz")
    np.savez(work / "test.npz", x=test["x"][:SAMPLES], y=test["y"][:SAMPLES])
    data = load_dataset(work / "test.npz", chain.input_shape)
    reference = {}
    for name in TOPOLOGIES:
        report = run_bundle(work / name, data)
        reference[name] = {"predictions": report.predictions, "exits": report.exits, "accuracy": report.accuracy,
                           "substitutions": report.substitutions, "host": platform.node()}
        print(f"{name}: reference here, accuracy {report.accuracy:.4f}; {len(report.substitutions)} substituted")
    (work / "reference.json").write_text(json.dumps(reference, indent=1))


def run(work: Path) -> dict:
    from distree.bench.measure import measure_bundle, segment_key
    from distree.runtime.backends import median_ms, ort_runner
    from distree.compiler.manifest import read_manifest
    from distree.compiler.verify import verify_bundle
    from distree.exits import load_dataset
    from distree.runtime.executor import run_bundle
    from distree.targets.toolchain import load_tvm_cuda_runtime, tvm_device_here

    import tvm

    missing = load_tvm_cuda_runtime()
    gpu = tvm.cuda(0)
    reference = json.loads((work / "reference.json").read_text())
    doc = {"host": platform.node(), "cuda_runtime": missing or "loaded", "gpu": gpu.device_name if gpu.exist else None,
           "compute_version": gpu.compute_version if gpu.exist else None, "tvm": tvm.__version__,
           "runtime_only": bool(tvm.base._RUNTIME_ONLY), "bundles": {}}
    for name, ref in reference.items():
        bundle = work / name
        manifest = read_manifest(bundle)
        data = load_dataset(work / "test.npz", tuple(manifest.input.shape))
        placement = {st.name: tvm_device_here(st.spec) for st in manifest.stages}
        checks = [c.to_dict() for c in verify_bundle(bundle).checks if c.file.endswith(".so")]
        report = run_bundle(bundle, data)
        same = int(sum(a == b for a, b in zip(report.predictions, ref["predictions"])))
        same_exit = int(sum(a == b for a, b in zip(report.exits, ref["exits"])))
        bench = measure_bundle(bundle, repeats=200, warmup=20)
        ort_cpu = {segment_key(st.name, seg): median_ms(ort_runner(bundle / seg.onnx_file), _probe(seg), repeat=200)
                   for st in manifest.stages for seg in st.segments}
        entry = {"placement": {k: {"runs_on": v[0], "why_not": v[1]} for k, v in placement.items()},
                 "verify": checks, "substitutions": report.substitutions, "samples": report.samples,
                 "accuracy": report.accuracy, "reference_accuracy": ref["accuracy"],
                 "same_prediction": same, "same_exit": same_exit, "exit_rates": report.exit_rates,
                 "segments": [s.to_dict() for s in report.segments], "end_to_end": report.end_to_end,
                 "bench": [{**{k: getattr(s, k) for k in ("key", "backend", "exit", "median_ms", "p90_ms", "reason")},
                            "ort_cpu_ms": ort_cpu.get(s.key)} for s in (*bench.segments, bench.end_to_end)]}
        if len(manifest.stages) > 1:
            entry["served"] = _served(bundle, data, ref)
        doc["bundles"][name] = entry
    doc["profiled"] = _profiled(work)
    return doc


def _profiled(work: Path) -> dict:
    """The ``gpu`` device profiled where its GPU is (``distree profile``), the example compiled with that profile
    (``compile --profile``) and run: the plan's expected latency against the measured mean. Needs TVM's compiler
    and nvcc on the GPU machine; otherwise it says why not."""
    import tvm

    from distree.compiler.pipeline import CompileOptions, compile_model
    from distree.errors import DistreeError
    from distree.exits import declared_exits, load_dataset
    from distree.graph import build_chain, load_model
    from distree.profiler import profile_model
    from distree.runtime.executor import run_bundle
    from distree.targets import load_topology

    if tvm.base._RUNTIME_ONLY:
        return {"skipped": "TVM's compiler is not installed here (runtime only): nothing to profile or compile with"}
    model_path = EXAMPLE / "resnet_exits.onnx"
    model = load_model(model_path)
    chain = build_chain(model)
    started = time.perf_counter()
    try:
        profile = profile_model(model, chain, declared_exits(model, chain), load_topology(work / "gpu.json").devices[0],
                                cache_dir=work / "cache")
    except DistreeError as exc:
        return {"skipped": str(exc)}
    profile_s = time.perf_counter() - started
    profile.save(work / "gpu_profile.json")
    compiled = compile_model(model_path, work / "calib.npz", work / "profiled",
                             CompileOptions(topology=work / "gpu.json", profiles=(work / "gpu_profile.json",),
                                            require_aot_cuda=True), cache_dir=work / "cache")
    report = run_bundle(work / "profiled", load_dataset(work / "test.npz", chain.input_shape))
    return {"profile_s": round(profile_s, 1), "costs": compiled.costs,
            "exits": [c.name for st in compiled.plan.stages for c in st.exits],
            "predicted_ms": compiled.plan.expected_latency_ms, "measured_mean_ms": report.end_to_end["mean_ms"],
            "measured_median_ms": report.end_to_end["median_ms"], "accuracy": report.accuracy,
            "predicted_accuracy": compiled.plan.accuracy, "substitutions": report.substitutions,
            "segments": [s.to_dict() for s in report.segments],
            "items": {m.item: m.median_ms for m in profile.entries}}


def _probe(seg) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(seg.input.shape).astype(seg.input.dtype)


def _served(bundle: Path, data, ref: dict) -> dict:
    from distree.runtime.client import InferenceClient, infer_dataset
    from serve_loopback import start_pipeline

    started = time.perf_counter()
    servers = start_pipeline(bundle)
    try:
        with InferenceClient(servers[0].address, timeout_s=60) as client:
            report = infer_dataset(client, data, limit=SERVED)
    finally:
        for s in servers:
            s.stop()
    return {"samples": report.samples, "stages": report.stages,
            "same_prediction": int(sum(a == b for a, b in zip(report.predictions, ref["predictions"]))),
            "same_exit": int(sum(a == b for a, b in zip(report.exits, ref["exits"]))),
            "end_to_end": report.end_to_end, "wall_s": round(time.perf_counter() - started, 1)}


def _print(doc: dict) -> None:
    print(f"GPU {doc['gpu']} (compute {doc['compute_version']}), TVM {doc['tvm']}"
          f"{' runtime only' if doc['runtime_only'] else ''}, host {doc['host']}")
    for name, b in doc["bundles"].items():
        places = ", ".join(f"{k}: {v['runs_on'] or 'not here (' + v['why_not'] + ')'}" for k, v in b["placement"].items())
        print(f"\n{name}: {places}")
        print(f"  run: {b['samples']} samples, accuracy {b['accuracy']:.4f} (reference {b['reference_accuracy']:.4f}),"
              f" same answer {b['same_prediction']}, same exit {b['same_exit']}, substitutions {len(b['substitutions'])}")
        for c in b["verify"]:
            print(f"  verify {c['file']}: {c['status']} ({c['detail']})")
        print(f"  {'segment':<26} {'backend':<9} {'exit':<8} {'median ms':>10} {'p90 ms':>8} {'ORT CPU ms':>11}")
        for s in b["bench"]:
            med, p90, ort = ("-" if s[k] is None else f"{s[k]:.4f}" for k in ("median_ms", "p90_ms", "ort_cpu_ms"))
            print(f"  {s['key']:<26} {s['backend']:<9} {str(s['exit'] or ''):<8} {med:>10} {p90:>8} {ort:>11}")
        if "served" in b:
            sv = b["served"]
            print(f"  served over gRPC ({' -> '.join(sv['stages'])}): {sv['samples']} samples, same answer "
                  f"{sv['same_prediction']}, same exit {sv['same_exit']}, p50 {sv['end_to_end']['median_ms']:.3f} ms")


def _print_profiled(pr: dict) -> None:
    if "skipped" in pr:
        print(f"\nprofiled here, compiled, run: skipped ({pr['skipped']})")
        return
    print(f"\nprofiled here ({pr['profile_s']} s), compiled with that profile (exits {', '.join(pr['exits'])}), run: "
          f"predicted {pr['predicted_ms']:.3f} ms, measured mean {pr['measured_mean_ms']:.3f} ms "
          f"(median {pr['measured_median_ms']:.3f}); accuracy {pr['accuracy']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("build", "run"))
    ap.add_argument("work", type=Path)
    ap.add_argument("--out", type=Path, help="also write the run's JSON here")
    args = ap.parse_args()
    if args.phase == "build":
        build(args.work)
        return
    doc = run(args.work)
    _print(doc)
    _print_profiled(doc["profiled"])
    text = json.dumps(doc, indent=1)
    (args.work / "cuda_runtime.json").write_text(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
