"""pi4 artifacts run: an aarch64 Python + TVM under qemu-user serves RPC, the profiler times pi4 blocks on it.

Builds (once, cached under .distree-cache/aarch64-root) an aarch64 Debian root: ~5 min on 2 cores with
package registries reachable. Emulated timings are labelled ``qemu-emulated`` and are not Pi timings.
"""

from __future__ import annotations

import pytest

from distree.exits import declared_exits
from distree.graph import build_chain, load_model
from distree.profiler import TimingSettings, profile_model
from distree.profiler.profile import QEMU_NOTE
from distree.profiler.tvm_backend import compile_unit
from distree.profiler.units import profile_units
from distree.targets import get_device
from distree.targets.emulation import ensure_aarch64_root, run_aarch64
from test_profiler import tiny_exit_model

pytestmark = pytest.mark.slow

EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def aarch64_root():
    return ensure_aarch64_root()


def test_emulated_python_is_aarch64_with_tvm(aarch64_root):
    res = run_aarch64(["-c", "import platform, tvm, numpy; print(platform.machine(), tvm.__version__)"],
                      aarch64_root, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["aarch64", "0.27.0.post1"]


def test_pi4_blocks_compile_for_aarch64_and_run_under_qemu(aarch64_root, tmp_path):
    model = load_model(tiny_exit_model(tmp_path / "tiny.onnx"))
    chain = build_chain(model)
    exits = declared_exits(model, chain)
    conv = next(b.index for b in chain.blocks if "Conv" in b.ops)
    items = (f"block:{conv}", "exit:exit_1")
    pi4 = get_device("pi4")
    for unit in profile_units(model, chain, exits, items):
        elf = compile_unit(unit, pi4, tmp_path / "cache").path.read_bytes()
        assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == EM_AARCH64
    profile = profile_model(model, chain, exits, pi4, mode="qemu", items=items, cache_dir=tmp_path / "cache",
                            timing=TimingSettings(warmup=1, repeats=3, min_repeat_ms=1.0), aarch64_root=aarch64_root)
    assert [m.item for m in profile.entries] == list(items)
    for m in profile.entries:
        assert m.device == "pi4" and m.backend == "tvm" and m.provenance == "qemu-emulated"
        assert m.note == QEMU_NOTE and "NOT a device timing" in m.note
        assert len(m.samples_ms) == 3 and m.median_ms > 0
    assert profile.settings["pi4"]["provenance"] == "qemu-emulated"
