"""Cross targets: the pi4 library runs under qemu-user and matches the host build; the Jetson library
carries its CUDA kernels as an nvcc-built sm_87 fatbin (no NVRTC needed at load)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

import compiler_fixtures as cf
from distree.compiler.bundle import build_bundle
from distree.compiler.cuda_aot import cuda_module_formats, find_nvcc
from distree.compiler.elf import elf_machine, symbol_bytes
from distree.compiler.manifest import read_manifest
from distree.compiler.segments import plan_segments, segment_model
from distree.compiler.tvm_build import compile_segment
from distree.compiler.verify import LIBRARY_SYMBOL, verify_bundle
from distree.runtime.backends import ort_runner, tvm_runner
from distree.runtime.executor import run_bundle
from distree.targets import emulation, get_device

REPO = Path(__file__).resolve().parents[1]

RUN_ON_AARCH64 = textwrap.dedent("""
    import sys
    import numpy as np
    import tvm
    from tvm import relax
    lib, x_path, out_prefix = sys.argv[1:4]
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(np.load(x_path)))
    outs = [out] if hasattr(out, "numpy") else list(out)
    for i, o in enumerate(outs):
        np.save(f"{out_prefix}{i}.npy", o.numpy())
    print("aarch64 outputs:", len(outs))
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cf.tiny_model(tmp_path_factory.mktemp("tiny"))


def _aarch64_root() -> Path:
    cache = emulation.default_cache_dir()
    return emulation.ensure_aarch64_root((cache if cache.is_absolute() else REPO / cache) / "aarch64-root")


@pytest.mark.slow
def test_pi4_library_runs_under_qemu_and_matches_host_build(tiny, tmp_path):
    plan, _ = cf.two_stage_plan(tiny)
    spec = next(s for s in plan_segments(plan, tiny.chain, tiny.calibration.exits) if s.exit is not None)
    seg = segment_model(tiny.model, tiny.chain, spec)          # blocks 0..3 -> activation + exit_1 logits
    pi4 = compile_segment(seg, get_device("pi4"), tmp_path / "pi4.so").path
    host = compile_segment(seg, get_device("host"), tmp_path / "host.so").path
    assert elf_machine(pi4) == "aarch64"
    x = np.random.default_rng(5).standard_normal(cf.SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "run.py").write_text(RUN_ON_AARCH64)
    proc = emulation.run_aarch64([str(tmp_path / "run.py"), str(pi4), str(tmp_path / "x.npy"),
                                  str(tmp_path / "out")], _aarch64_root(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    emulated = [np.load(tmp_path / f"out{i}.npy") for i in range(len(spec.outputs))]
    expected = tvm_runner(host)(x)
    reference = ort_runner(seg.SerializeToString())(x)
    for got, want, ref in zip(emulated, expected, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed: ahead-of-time CUDA untestable")
def test_jetson_library_ships_an_sm87_fatbin(tiny, tmp_path):
    plan, topology = cf.two_stage_plan(tiny, ("host", "jetson-orin-nano"))
    bundle = build_bundle(tiny.model, tiny.chain, plan, topology, tiny.calibration, tmp_path / "b", backend="auto")
    jetson = read_manifest(bundle).stages[1]
    (seg,) = jetson.segments
    assert seg.backend == "tvm" and "CUDA target" in seg.backend_reason and seg.ratio is None
    assert seg.cuda.startswith("fatbin sm_87")
    lib = bundle / seg.file
    assert elf_machine(lib) == "aarch64"
    assert cuda_module_formats(symbol_bytes(lib, LIBRARY_SYMBOL)) == ["fatbin"]
    check = next(c for c in verify_bundle(bundle).checks if c.file == seg.file)
    assert check.status == "checked" and "fatbin sm_87" in check.detail
    report = run_bundle(bundle, cf.dataset(5, seed=0))
    assert any("jetson-orin-nano" in s and "cuda" in s for s in report.substitutions)
