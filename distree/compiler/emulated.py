"""Run aarch64 TVM libraries under qemu-user (the targets part's emulation root) from this x86 machine.

Used by ``distree verify --emulate`` and the tests to prove a Raspberry Pi artifact loads and computes
the same numbers as the host build. Emulated runs prove correctness only, never speed.
"""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from distree.errors import DistreeError

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tvm
    from tvm import relax
    work = sys.argv[1]
    for k, lib in enumerate(sys.argv[2:]):
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.load(f"{work}/in{k}.npy")))
        outs = [out] if hasattr(out, "numpy") else list(out)
        np.savez(f"{work}/out{k}.npz", *[o.numpy() for o in outs])
""")


def run_on_aarch64(libraries: Sequence[Path], inputs: Sequence[np.ndarray], root: Optional[Path] = None,
                   timeout: float = 900) -> list[list[np.ndarray]]:
    """Outputs of each aarch64 library on its input, computed by the aarch64 TVM runtime under qemu."""
    from distree.targets.emulation import ensure_aarch64_root, run_aarch64

    root = ensure_aarch64_root(root)
    with tempfile.TemporaryDirectory(prefix="distree-qemu-") as work:
        for k, x in enumerate(inputs):
            np.save(Path(work) / f"in{k}.npy", x)
        script = Path(work) / "run.py"
        script.write_text(_SCRIPT)
        proc = run_aarch64([str(script), work, *(str(Path(p).resolve()) for p in libraries)], root, timeout=timeout)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DistreeError(f"the aarch64 TVM runtime under qemu failed: {last}; rebuild the bundle")
        results = []
        for k in range(len(libraries)):
            with np.load(Path(work) / f"out{k}.npz") as npz:
                results.append([npz[f"arr_{i}"] for i in range(len(npz.files))])
        return results
