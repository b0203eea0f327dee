"""Cross targets: the pi4 library runs under qemu-user, matches the host build and serves its stage in a
pipeline there; the Jetson library carries its CUDA kernels as an nvcc-built sm_87 fatbin (no NVRTC needed at
load)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

import compiler_fixtures as cf
from distree.compiler.bundle import build_bundle
from distree.compiler.cuda_aot import cuda_module_formats, find_nvcc
from distree.compiler.elf import elf_machine, symbol_bytes
from distree.compiler.emulated import run_on_aarch64
from distree.compiler.manifest import read_manifest
from distree.compiler.segments import plan_segments, segment_model
from distree.compiler.tvm_build import compile_segment
from distree.compiler.verify import LIBRARY_SYMBOL, verify_bundle
from distree.runtime.backends import ort_runner, tvm_runner
from distree.runtime.executor import FINAL, run_bundle
from distree.runtime.local import StageProcess
from distree.targets import get_device
from distree.targets.emulation import SITE, aarch64_command, aarch64_env, ensure_aarch64_root

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pi4_library_runs_under_qemu_and_matches_host_build(tiny, tmp_path):
    plan, _ = cf.two_stage_plan(tiny)
    spec = next(s for s in plan_segments(plan, tiny.chain, tiny.calibration.exits) if s.exit is not None)
    seg = segment_model(tiny.model, tiny.chain, spec)          # blocks 0..3 -> activation + exit_1 logits
    pi4 = compile_segment(seg, get_device("pi4"), tmp_path / "pi4.so").path
    host = compile_segment(seg, get_device("host"), tmp_path / "host.so").path
    assert elf_machine(pi4) == "aarch64"
    x = np.random.default_rng(5).standard_normal(cf.SHAPE).astype(np.float32)
    (emulated,) = run_on_aarch64([pi4], [x])
    expected = tvm_runner(host)(x)
    reference = ort_runner(seg.SerializeToString())(x)
    assert len(emulated) == len(spec.outputs) == 2
    for got, want, ref in zip(emulated, expected, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_tvm_runner_reuses_its_input_tensor_without_mixing_up_calls(tiny, tmp_path):
    """The runner stages inputs in one TVM tensor and reads outputs through DLPack: every call must still
    answer for its own input, and an answer must not change when the next call runs."""
    plan, _ = cf.two_stage_plan(tiny)
    spec = next(s for s in plan_segments(plan, tiny.chain, tiny.calibration.exits) if s.exit is not None)
    seg = segment_model(tiny.model, tiny.chain, spec)
    run = tvm_runner(compile_segment(seg, get_device("host"), tmp_path / "host.so").path)
    reference = ort_runner(seg.SerializeToString())
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal(cf.SHAPE).astype(np.float32) for _ in range(4)]
    answers = [run(x) for x in inputs]
    answers.append(run(np.asfortranarray(inputs[0])))       # not C-contiguous: copied in all the same
    for x, outs in zip(inputs + inputs[:1], answers):
        assert len(outs) == len(spec.outputs) == 2
        for got, want in zip(outs, reference(x)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(answers[0][1], answers[1][1])
    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    passthrough = tvm_runner(compile_segment(identity, get_device("host"), tmp_path / "identity.so").path)
    first = passthrough(np.zeros((1, 4), np.float32))[0]      # TVM returns the staging tensor itself here
    passthrough(np.ones((1, 4), np.float32))
    assert not first.any()


@pytest.mark.slow
def test_verify_emulate_runs_the_pi4_library(tiny, tmp_path):
    plan, topology = cf.two_stage_plan(tiny)
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "b", backend="tvm")
    status = {c.file: (c.status, c.detail) for c in verify_bundle(bundle, emulate=True).checks}
    assert status["pi4/s1_seg0_b6-10.so"][0] == "ran" and "qemu" in status["pi4/s1_seg0_b6-10.so"][1]


@pytest.mark.slow
def test_a_pi4_stage_served_under_qemu_answers_in_the_pipeline_like_run(tiny_bundle):
    """The aarch64 library a Pi 4 serves, served by distree's own server in the emulated aarch64 Python (its root
    holds grpcio, click and PyYAML for it), behind the host's stage: every answer equals `distree run`'s, which runs
    that stage as its ONNX here. Under qemu-user ONNX Runtime's aarch64 wheel dies on import, so the stage ran its
    TVM library (a server checks that library on start without ONNX Runtime), and the stage's counters say so."""
    root = ensure_aarch64_root()
    env = aarch64_env(root, {"PYTHONPATH": os.pathsep.join((str(Path(root).resolve() / SITE), str(REPO)))})
    pi4 = StageProcess(tiny_bundle, "pi4", python=aarch64_command([], root), env=env, start_timeout_s=900, cwd=REPO)
    host = StageProcess(tiny_bundle, "host", next_address=pi4.address, cwd=REPO)
    data = cf.dataset(40, seed=5)
    served, stats = cf.served_and_stats(host, pi4, data, timeout_s=120)
    want = run_bundle(tiny_bundle, data)
    assert (served.predictions, served.exits) == (want.predictions, want.exits)
    assert FINAL in served.exits                                    # some requests crossed to the emulated stage
    (second,) = [s for s in stats.stages if s["device"] == "pi4"]
    assert second["totals"] == {FINAL: served.exits.count(FINAL)} and second["compute_ms"]["median_ms"] > 0


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed: ahead-of-time CUDA untestable")
def test_jetson_library_ships_an_sm87_fatbin(tiny, tmp_path):
    plan, topology = cf.two_stage_plan(tiny, ("host", "jetson-orin-nano"))
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "b", backend="auto")
    jetson = read_manifest(bundle).stages[1]
    (seg,) = jetson.segments
    assert seg.backend == "tvm" and "CUDA target" in seg.backend_reason and seg.ratio is None
    assert seg.cuda.startswith("fatbin sm_87")
    # what the device must have, read from what ships: TVM's CUDA runtime library's links (readelf as the
    # independent reader) and the CUDA toolkit that built the kernels
    import tvm
    runtime = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    links = subprocess.run(["readelf", "-d", str(runtime)], capture_output=True, text=True, check=True).stdout
    cudart = re.search(r"\[(libcudart\.so\.(\d+))\]", links)
    release = re.search(r"release (\d+\.\d+)", subprocess.run([find_nvcc(), "--version"], capture_output=True,
                                                              text=True).stdout).group(1)
    (needs,) = [n for n in read_manifest(bundle).notes if n.startswith("jetson-orin-nano: its CUDA code needs")]
    assert f"needs CUDA {cudart.group(2)} or newer" in needs and cudart.group(1) in needs
    assert f"nvcc {release} built its kernels" in needs and f"nvcc {release} ahead of time" in seg.cuda
    lib = bundle / seg.file
    assert elf_machine(lib) == "aarch64"
    assert cuda_module_formats(symbol_bytes(lib, LIBRARY_SYMBOL)) == ["fatbin"]
    check = next(c for c in verify_bundle(bundle).checks if c.file == seg.file)
    assert check.status == "checked" and "fatbin sm_87" in check.detail
    report = run_bundle(bundle, cf.dataset(5, seed=0))
    assert any("jetson-orin-nano" in s and "cuda" in s for s in report.substitutions)
