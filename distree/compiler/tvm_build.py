"""Compile one ONNX segment with TVM for a catalog device: host, aarch64 (cross-linked) or CUDA + aarch64."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx

from distree.compiler.cuda_aot import fatbin_packer, find_nvcc
from distree.errors import DistreeError
from distree.targets.spec import DeviceSpec
from distree.targets.toolchain import cross_compiler, import_onnx, tvm_target


@dataclass(frozen=True)
class TvmBuild:
    """What a build produced; ``cuda`` says how CUDA kernels ship (None for CPU targets)."""

    path: Path
    cuda: Optional[str]             # "fatbin sm_87 (nvcc, ahead of time)" or "CUDA source (NVRTC at load)"
    tuned: bool


def compile_segment(model: onnx.ModelProto, device: DeviceSpec, out_path: Path,
                    tuning_db: Optional[Path] = None, require_aot_cuda: bool = False) -> TvmBuild:
    """Build ``model`` for ``device`` into ``out_path`` (.so); apply tuning records from ``tuning_db``."""
    import tvm

    cc = cross_compiler(device)
    target = tvm_target(device)
    mod = import_onnx(model)
    tuned = False
    if tuning_db is not None:
        from distree.compiler.tuning import apply_tuning, has_records

        tuned = has_records(tuning_db, target)
        if tuned:
            mod = apply_tuning(mod, target, tuning_db)
    executable = tvm.compile(mod, target=target)
    export_kwargs = {"cc": cc} if cc else {}
    cuda = None
    if device.target.get("kind") == "cuda":
        arch = str(device.target.get("arch", ""))
        nvcc = find_nvcc()
        if nvcc is None:
            if require_aot_cuda:
                raise DistreeError(f"device {device.name}: nvcc not found, so the CUDA kernels cannot be "
                                   "compiled ahead of time; install the CUDA toolkit or drop --require-aot-cuda")
            cuda = "CUDA source, compiled at load time by NVRTC on the device (nvcc not found here)"
        else:
            converted: list[int] = []
            export_kwargs["fpack_imports"] = fatbin_packer(arch, nvcc, converted.append)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(out_path), **export_kwargs)
    if "fpack_imports" in export_kwargs:
        cuda = (f"fatbin {arch} (nvcc ahead of time; no NVRTC needed on the device)" if sum(converted)
                else "no CUDA kernels in this segment")
    return TvmBuild(path=out_path, cuda=cuda, tuned=tuned)
