"""CUDA devices here: where a bundle's TVM libraries run (this CPU, a CUDA GPU here, or nowhere here: then their
ONNX under ONNX Runtime, and the report says why), the runtime-only TVM path, and profiling a GPU device on the
machine that has it. Without a GPU (CI) the tests check the refusals and substitutions; with one (the device
machine, `benchmarks/cuda_runtime.py`'s notes) the same tests check that the GPU ran."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compiler_fixtures as cf
from distree.bench.measure import measure_bundle
from distree.compiler.bundle import build_bundle
from distree.compiler.verify import verify_bundle
from distree.compiler.manifest import read_manifest, read_thresholds
from distree.runtime.executor import FINAL, run_bundle
from distree.targets import get_device
from distree.targets.catalog import host_device
from distree.targets.spec import DeviceSpec, Topology
from distree.targets.toolchain import cuda_arch_runs_on, host_arch, host_cpu, host_runnable, load_tvm_cuda_runtime, \
    missing_cpu_features, tvm_device_here

REPO = Path(__file__).resolve().parents[1]


def _gpu_here() -> bool:
    import tvm

    return not load_tvm_cuda_runtime() and tvm.cuda(0).exist


def _cuda_device(arch: str = "sm_75") -> DeviceSpec:
    """A GPU whose host is this machine's CPU (an x86 GPU server, or a Jetson when run on one)."""
    return dataclasses.replace(get_device("jetson-orin-nano"), name="gpu", target={"kind": "cuda", "arch": arch},
                               host=dict(host_device().target))


def test_kernels_run_on_their_compute_capability_and_newer():
    assert cuda_arch_runs_on("sm_87", "8.7") and cuda_arch_runs_on("sm_87", "9.0")
    assert cuda_arch_runs_on("sm_87", "10.0") and cuda_arch_runs_on("sm_90", "12.1")
    assert not cuda_arch_runs_on("sm_87", "8.6") and not cuda_arch_runs_on("sm_90", "8.9")
    assert not cuda_arch_runs_on("sm_100", "9.0")


def test_each_library_runs_where_its_code_can():
    assert tvm_device_here(host_device()) == ("cpu", "")
    other = "aarch64" if host_arch() != "aarch64" else "x86_64"
    where, why = tvm_device_here(get_device("pi4" if other == "aarch64" else "x86-server"))
    assert where is None and f"its {other} code cannot run on this {host_arch()} machine" == why
    server = get_device("x86-server")                               # AVX-512 code: only where the CPU has it
    if host_arch() == "x86_64" and missing_cpu_features(server):
        assert tvm_device_here(server) == (None, f"its code may use {', '.join(missing_cpu_features(server))}, "
                                                 f"which this CPU ({host_cpu()}) lacks")
        assert not host_runnable(server)                            # the compiler does not time it here either
    elif host_arch() == "x86_64":
        assert tvm_device_here(server) == ("cpu", "") and host_runnable(server)
    where, why = tvm_device_here(get_device("jetson-orin-nano"))    # aarch64 host code: never on x86
    if host_arch() != "aarch64":
        assert where is None and why == f"its aarch64 code cannot run on this {host_arch()} machine"
    where, why = tvm_device_here(_cuda_device())
    if _gpu_here():
        assert (where, why) == ("cuda", "")
        assert "older than the code's sm_999" in tvm_device_here(_cuda_device("sm_999"))[1]
    else:
        assert where is None and ("CUDA runtime" in why or "no CUDA GPU" in why)


@pytest.fixture(scope="module")
def gpu_bundle(tiny, tmp_path_factory) -> Path:
    """The tiny model's two stages: this CPU (TVM) up to exit_1, then a CUDA device with this machine's CPU as its
    host, which runs two sub-segments (up to exit_2, then the rest): the activation passes between them on the GPU."""
    plan, _ = cf.two_stage_plan(tiny)
    first, second = plan.stages
    exit_1, exit_2 = first.exits
    stages = (dataclasses.replace(first, last_block=exit_1.after_block, exits=(exit_1,)),
              dataclasses.replace(second, device="gpu", first_block=exit_1.after_block + 1, exits=(exit_2,)))
    plan = dataclasses.replace(plan, stages=stages)
    topology = Topology(devices=(get_device("host"), _cuda_device()))
    out = tmp_path_factory.mktemp("gpu-bundle") / "bundle"
    return build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, out, backend="tvm")


@pytest.mark.slow
def test_a_cuda_stage_runs_on_the_gpu_or_says_why_not(gpu_bundle, tiny):
    data = cf.dataset(60, seed=3)
    report = run_bundle(gpu_bundle, data)
    thresholds = {e.name: e.threshold for e in read_thresholds(gpu_bundle).exits}
    want_preds, want_exits = cf.ort_reference(tiny, data.x, thresholds)
    assert list(report.predictions) == list(want_preds) and list(report.exits) == want_exits
    assert {"exit_2", FINAL} <= set(want_exits)         # samples leave on the GPU and run through it
    gpu_files = [s.file for s in read_manifest(gpu_bundle).stages[1].segments]
    assert len(gpu_files) == 2
    checks = {c.file: c for c in verify_bundle(gpu_bundle).checks}
    rows = [s for s in measure_bundle(gpu_bundle, repeats=3, warmup=1).segments if s.device == "gpu"]
    if _gpu_here():
        assert not report.substitutions
        assert [s.backend for s in report.segments if s.device == "gpu"] == ["tvm-cuda", "tvm-cuda"]
        assert all(checks[f].status == "ran" and "CUDA GPU" in checks[f].detail for f in gpu_files)
        assert all(r.measurable and r.median_ms > 0 for r in rows)
    else:
        why = tvm_device_here(_cuda_device())[1]
        assert report.substitutions == tuple(
            f"{f}: gpu TVM library ({host_arch()}, cuda): {why}; ran {f.removesuffix('.so')}.onnx under ONNX "
            "Runtime on this CPU instead" for f in gpu_files)
        assert all(checks[f].status == "checked" and why in checks[f].detail
                   and "run it on the device)" in checks[f].detail for f in gpu_files)
        assert all(not r.measurable and why in r.reason for r in rows)


@pytest.mark.slow
def test_run_verify_and_bench_need_only_the_tvm_runtime(gpu_bundle, tmp_path):
    """What a device installs: TVM's runtime library alone (no compiler, no LLVM) runs and checks a bundle,
    its CUDA stage included where a GPU is."""
    data = cf.dataset(20, seed=4)
    np.savez(tmp_path / "x.npz", x=data.x, y=data.y)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    probe = ("import tvm, tvm.base; assert tvm.base._RUNTIME_ONLY and 'tvm_compiler' not in tvm.base._LOADED_LIBS; "
             "from distree.compiler.verify import verify_bundle; from distree.bench.measure import measure_bundle; "
             f"verify_bundle({str(gpu_bundle)!r}); measure_bundle({str(gpu_bundle)!r}, repeats=2, warmup=1); "
             "print('runtime only')")
    checked = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0 and "runtime only" in checked.stdout, checked.stderr
    ran = subprocess.run([sys.executable, "-m", "distree", "run", str(gpu_bundle), "--input", str(tmp_path / "x.npz"),
                          "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["predictions"] == list(run_bundle(gpu_bundle, data).predictions)
    backends = {s["device"]: s["backend"] for s in report["segments"]}
    assert backends["host"] == "tvm" and backends["gpu"] == ("tvm-cuda" if _gpu_here() else "ort")


def test_a_gpu_device_is_profiled_where_its_gpu_is(tiny, tmp_path):
    """Its kernels are timed on this machine's GPU (TVM only: ONNX Runtime never ships for a CUDA device);
    without a fitting GPU the request is refused up front, saying why."""
    from distree.errors import DistreeError
    from distree.exits import declared_exits
    from distree.profiler import profile_model
    from distree.profiler.profile import check_request
    from distree.profiler.types import cost_sources

    gpu = _cuda_device()
    with pytest.raises(DistreeError, match="drop the ort backend"):
        check_request(gpu, "local", None, ("tvm", "ort"))
    exits = declared_exits(tiny.model, tiny.chain)
    items = ("block:0", "exit:exit_1", "call")
    if not _gpu_here():
        with pytest.raises(DistreeError, match=re.escape(f"kernels on this machine's GPU, and {tvm_device_here(gpu)[1]}")):
            profile_model(tiny.model, tiny.chain, exits, gpu, cache_dir=tmp_path, items=items)
        return
    profile = profile_model(tiny.model, tiny.chain, exits, gpu, cache_dir=tmp_path, items=items)
    timed = [m for m in profile.entries if m.item in items]
    assert sorted(m.item for m in timed) == sorted(items) and {m.backend for m in timed} == {"tvm"}
    assert all(m.provenance == "local" and m.median_ms > 0 and "kernels timed on this machine's" in m.note
               for m in timed)
    import tvm

    assert tvm.cuda(0).device_name in cost_sources(profile)["gpu"]



def test_on_a_gpu_tvm_keeps_what_it_can_import_and_ort_runs_the_rest_on_the_cpu(tmp_path):
    """A GRU (TVM 0.27's importer lacks it) between conv blocks and a classifier, on a Jetson: the stage is split
    where TVM stops and starts again, so only the GRU runs as ONNX Runtime (on the CPU); the solver charges the
    extra segment's call; the split bundle answers as ONNX Runtime on the whole model."""
    import graph_models as gm
    import onnxruntime as ort

    from distree.exits import Dataset, calibrate
    from distree.graph import build_chain, load_model
    from distree.profiler.profile import merge_profiles, profile_model
    from distree.solver.problem import Constraints, build_problem, gpu_handovers
    from distree.solver.solve import solve

    path = gm.export(gm.ConvGru(), (1, 1, 28, 28), tmp_path / "gru.onnx")
    model = load_model(path)
    chain = build_chain(model)
    (gru,) = [b.index for b in chain.blocks if "GRU" in b.ops]
    n_blocks = len(chain.blocks)
    assert 0 < gru < n_blocks - 1
    rng = np.random.default_rng(3)
    data = Dataset(x=rng.standard_normal((200, 1, 28, 28)).astype(np.float32), y=rng.integers(0, 10, 200))
    cal = calibrate(model, chain, (), data, score_kind="max_softmax")
    orin, pi4 = get_device("jetson-orin-nano"), get_device("pi4")
    profile = merge_profiles([profile_model(model, chain, (), dev, mode="estimate", cache_dir=tmp_path / "profiles")
                              for dev in (orin, pi4)])
    assert gpu_handovers(profile, orin, n_blocks) == {gru: True, gru + 1: False}
    assert gpu_handovers(profile, pi4, n_blocks) == {}            # a CPU stage is not split
    topology = Topology(devices=(orin,))
    problem, _ = build_problem(chain, cal, profile, topology, Constraints())
    calls = {m.backend: m.median_ms for m in profile.entries if m.device == orin.name and m.item == "call"}
    block = {(m.item, m.backend): m.median_ms for m in profile.entries if m.device == orin.name}
    assert problem.block_ms[0, gru] == pytest.approx(block[f"block:{gru}", "ort"])      # its own call, kept
    assert problem.block_ms[0, gru + 1] == pytest.approx(block[f"block:{gru + 1}", "tvm"])  # TVM's call again
    assert problem.block_ms[0, 0] == pytest.approx(block["block:0", "tvm"] - calls["tvm"])

    plan = solve(chain, cal, profile, topology, Constraints())
    bundle = build_bundle(model, chain, plan, topology, cal, tmp_path / "bundle", backend="auto", profile=profile)
    manifest = read_manifest(bundle)
    segments = [s for st in manifest.stages for s in st.segments]
    assert [(s.first_block, s.last_block, s.backend) for s in segments] == \
        [(0, gru - 1, "tvm"), (gru, gru, "ort"), (gru + 1, n_blocks - 1, "tvm")]
    assert "does not support GRU" in segments[1].backend_reason and "device's CPU" in segments[1].backend_reason
    assert any("on jetson-orin-nano they run on the CPU" in note for note in manifest.notes)
    report = run_bundle(bundle, data)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = [int(session.run(None, {"input": data.x[i:i + 1]})[0].argmax()) for i in range(len(data.x))]
    assert list(report.predictions) == want
